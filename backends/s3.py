"""S3 driver on s3fs's async core, for AWS and any S3-compatible server.

``s3://bucket[/prefix]?endpoint=http://host:port&region=...&addressing=path|virtual``.
One driver-owned event loop thread runs every request, so range groups, delete batches and
multipart parts go out concurrently (bounded by ``concurrency``) while callers stay
synchronous. botocore's and s3fs's own retries are turned down to one attempt so our
RetryPolicy alone bounds how long a call can take.

Conditional writes send ``If-None-Match: *`` / ``If-Match`` on PutObject, and on
CompleteMultipartUpload for large objects, so create and compare-and-swap stay atomic at
any size (servers that ignore the header on CompleteMultipartUpload only honour it for
objects below ``multipart_threshold``).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import heapq
import ipaddress
import logging
import random
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import partial
from typing import Any, BinaryIO, TypeVar
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from piecestore.backends.base import Backend, Capabilities, IfMatch, ObjectMeta, PutMode, validate_name
from piecestore.backends.base import read_exact as base_read_exact
from piecestore.backends.credentials import (
    ResolvedCredentials,
    env_region,
    hide_in_logs,
    parse_bool,
    redact,
    resolve_credentials,
)
from piecestore.backends.retry import Retryable, RetryPolicy
from piecestore.backends.s3errors import ErrorContext, Outcome, classify, map_error
from piecestore.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    PermissionDeniedError,
    PieceStoreError,
    PreconditionFailedError,
)

T = TypeVar("T")
log = logging.getLogger("piecestore.backends.s3")

MiB = 1024 * 1024
MIN_PART = 5 * MiB  # S3's floor for every part but the last
MAX_PART = 5 * 1024 * MiB
PART_BYTES = 8 * MiB  # upload part size: concurrent 8 MiB parts beat fewer, larger ones here
DEFAULT_MULTIPART_THRESHOLD = 32 * MiB  # a single PUT of a 16 MiB table beat 8 MiB parts by 8-14%
MAX_PARTS = 10_000
DELETE_BATCH = 1000
CONTINUE_ABOVE = 1 * MiB
LIST_PAGE = 1000

# -- settings shared by both S3-protocol drivers --------------------------------------------


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """Connection behaviour common to the s3 and minio drivers (never credentials)."""

    retry: RetryPolicy
    connect_timeout: float
    read_timeout: float
    tls_verify: bool | str
    concurrency: int
    multipart_threshold: int
    read_only: bool
    list_order: str = "auto"


def _number(options: dict[str, Any], key: str, default: float, kind: type, lo: float, hi: float) -> Any:
    raw = options.pop(key, default)
    if isinstance(raw, bool):
        raise ConfigError(f"option {key} must be a number, got {raw!r}")
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key} must be a number, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"option {key} must be between {lo:g} and {hi:g}, got {value!r}")
    return value


def pop_settings(options: dict[str, Any]) -> RemoteSettings:
    """Take the connection options out of ``options`` (what is left is unknown)."""
    retry = RetryPolicy(
        max_retries=_number(options, "max_retries", 5, int, 0, 100),
        min_delay=_number(options, "min_retry_delay", 0.05, float, 0, 60),
        max_delay=_number(options, "max_retry_delay", 2.0, float, 0, 600),
        deadline=_number(options, "retry_deadline", 30.0, float, 0.001, 3600),
    )
    tls: object = options.pop("tls_verify", True)
    tls_verify: bool | str
    if isinstance(tls, str) and tls.strip().lower() not in (
        "1",
        "0",
        "true",
        "false",
        "yes",
        "no",
        "on",
        "off",
    ):
        tls_verify = tls  # a CA bundle path
    else:
        tls_verify = parse_bool("tls_verify", tls)
    return RemoteSettings(
        retry=retry,
        connect_timeout=_number(options, "connect_timeout", 5.0, float, 0.001, 600),
        read_timeout=_number(options, "read_timeout", 30.0, float, 0.001, 3600),
        tls_verify=tls_verify,
        concurrency=_number(options, "concurrency", 16, int, 1, 1024),
        multipart_threshold=_number(
            options, "multipart_threshold", DEFAULT_MULTIPART_THRESHOLD, int, MIN_PART, MAX_PART
        ),
        read_only=parse_bool("read_only", options.pop("read_only", False)),
        list_order=_list_order(options.pop("list_order", "auto")),
    )


def _list_order(value: object) -> str:
    if value not in ("auto", "flat", "walk"):
        raise ConfigError(f"list_order must be 'auto', 'flat' or 'walk', got {value!r}")
    return str(value)


def is_aws_host(host: str | None) -> bool:
    """AWS lists keys in byte order; filer-backed servers (SeaweedFS) list depth-first."""
    return host is None or host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def walk_listing(settings: RemoteSettings, host: str | None) -> bool:
    if settings.list_order == "auto":
        return not is_aws_host(host)
    return settings.list_order == "walk"


def reject_leftovers(driver: str, options: dict[str, Any]) -> None:
    if options:
        raise ConfigError(
            f"unknown option(s) for the {driver} driver: {', '.join(sorted(options))}; see the driver's docs"
        )


def parse_query(query: str, allowed: tuple[str, ...], scheme: str) -> dict[str, str]:
    """URL query parameters, refusing unknown and repeated ones (and credentials)."""
    out: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"{scheme}:// URL query is malformed; use key=value pairs joined by '&'") from None
    for key, value in pairs:
        if key in ("access_key", "secret_key", "session_token", "key", "secret", "token", "password"):
            raise ConfigError(
                f"{scheme}:// URL must not carry credentials (query parameter {key!r}); "
                "pass them as options or environment variables"
            )
        if key not in allowed:
            raise ConfigError(
                f"unknown query parameter {key!r} in {scheme}:// URL; allowed: {', '.join(allowed)}"
            )
        if key in out:
            raise ConfigError(f"query parameter {key!r} is repeated in the {scheme}:// URL; give it once")
        out[key] = value
    return out


def reject_userinfo(parts: SplitResult, scheme: str) -> None:
    if "@" in parts.netloc:
        raise ConfigError(
            f"{scheme}:// URL must not carry credentials before '@'; "
            "pass access_key/secret_key as options or environment variables"
        )


_BUCKET_CHARS = re.compile(r"^[a-z0-9.-]+$")


def validate_bucket(bucket: str) -> str:
    """S3's bucket naming rules, checked before any request (the server's answer is vaguer)."""
    if not bucket:
        raise ConfigError("the store URL names no bucket; use s3://BUCKET[/prefix]")
    problem = None
    if not 3 <= len(bucket) <= 63:
        problem = f"must be 3 to 63 characters long (it has {len(bucket)})"
    elif not _BUCKET_CHARS.match(bucket):
        problem = "may contain only lowercase letters, digits, dots and hyphens"
    elif not (bucket[0].isalnum() and bucket[-1].isalnum()):
        problem = "must begin and end with a letter or digit"
    elif ".." in bucket:
        problem = "must not contain two adjacent dots"
    elif bucket.startswith("xn--") or bucket.endswith(("-s3alias", "--ol-s3")):
        problem = "must not start with 'xn--' or end with '-s3alias' or '--ol-s3' (reserved)"
    else:
        try:
            ipaddress.IPv4Address(bucket)
            problem = "must not be formatted as an IP address"
        except ValueError:
            pass
    if problem:
        raise ConfigError(f"bucket name {bucket!r} is invalid: an S3 bucket name {problem}")
    return bucket


def validate_store_prefix(path: str) -> str:
    """The URL path below the bucket: '' or segments that are valid object names."""
    prefix = unquote(path).strip("/")
    if not prefix:
        return ""
    try:
        return validate_name(prefix)
    except InvalidKeyError as e:
        raise ConfigError(f"store prefix {prefix!r} in the URL is invalid: {e}") from None


# -- sorted listing on servers that do not list in byte order ------------------------------

M = TypeVar("M")
# One page of a delimiter listing: [(key, meta)] and the common prefixes (each ending in '/').
LevelPages = Callable[[str], Iterator[tuple[list[tuple[str, M]], list[str]]]]


def sorted_walk(list_level: LevelPages[M], prefix: str) -> Iterator[M]:
    """Objects under ``prefix`` in byte order, listing one directory level at a time.

    S3 lists in byte order, where 'p-x' < 'p/...'; filer-backed servers list depth-first by
    entry name, where 'p/...' comes first. Both agree that no later entry has a name below
    the largest name on the current page, so an entry is released once its sort key is at
    or below that bound. Memory stays at about one page per level; cost is one listing per
    directory.
    """
    heap: list[tuple[str, int, M | None]] = []
    counter = 0
    pages = list_level(prefix)
    while True:
        page = next(pages, None)
        if page is not None:
            keys, prefixes = page
            for key, meta in keys:
                heapq.heappush(heap, (key, counter, meta))
                counter += 1
            for sub in prefixes:
                if sub != prefix and sub.startswith(prefix):
                    heapq.heappush(heap, (sub, counter, None))
                    counter += 1
            names = [k for k, _ in keys] + [p[:-1] for p in prefixes]
            if not names:
                continue
            bound = max(names)
        while heap and (page is None or heap[0][0] <= bound):
            key, _, found = heapq.heappop(heap)
            if found is None:
                yield from sorted_walk(list_level, key)
            else:
                yield found
        if page is None:
            return


# -- reading upload parts without holding the object twice ----------------------------------


def part_size(number: int, base: int) -> int:
    """Size of part ``number`` (1-based): doubles every 1000 parts so 10,000 parts reach TiBs."""
    return int(min(MAX_PART, base * 2 ** ((number - 1) // 1000)))


def read_exact(f: BinaryIO, n: int) -> bytes:
    """Read ``n`` bytes or up to EOF (raw files and sockets may return short reads)."""

    def read(size: int) -> bytes:
        chunk = f.read(size)
        if chunk is None:
            raise InvalidValueError("non-blocking file objects are not supported; pass a blocking one")
        return chunk

    return base_read_exact(read, n)


def split_upload(data: memoryview | BinaryIO, threshold: int) -> tuple[bytes | None, Iterator[bytes]]:
    """(whole body, no parts) for an object of at most ``threshold`` bytes, else (None, parts).

    Parts are PART_BYTES (or ``threshold``, if smaller) and double every 1000 parts; they are
    read lazily, so a large stream is never held whole.
    """
    base = min(threshold, PART_BYTES)
    if isinstance(data, memoryview):
        if data.nbytes <= threshold:
            obj = data.obj
            if isinstance(obj, bytes) and data.nbytes == len(obj) and data.contiguous:
                return obj, iter(())
            return data.tobytes(), iter(())
        return None, _view_parts(data, base)
    head = read_exact(data, threshold + 1)
    if len(head) <= threshold:
        return head, iter(())
    return None, _file_parts(data, base, head)


def _view_parts(view: memoryview, base: int) -> Iterator[bytes]:
    offset, number = 0, 1
    while offset < view.nbytes:
        size = part_size(number, base)
        yield view[offset : offset + size].tobytes()
        offset += size
        number += 1


def _file_parts(f: BinaryIO, base: int, head: bytes) -> Iterator[bytes]:
    """Parts of ``head`` and then the rest of ``f``, every part but the last of full size."""
    buffered, number = head, 1
    while True:
        size = part_size(number, base)
        if len(buffered) < size:
            buffered += read_exact(f, size - len(buffered))
        if not buffered:
            return
        yield buffered[:size]
        buffered = buffered[size:]
        number += 1


# -- the loop thread and async retries ------------------------------------------------------


class LoopThread:
    """An event loop on a daemon thread that synchronous callers hand coroutines to."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("S3Backend methods must not be called from its own event loop thread")
        return self.submit(coro).result()

    def cancel_pending(self) -> None:
        """Cancel whatever is still running (say, after a caller gave up) before closing."""

        async def cancel() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if not self.loop.is_closed() and self.thread.is_alive():
            try:
                self.submit(cancel()).result(timeout=5)
                self.submit(self.loop.shutdown_default_executor()).result(timeout=5)  # DNS lookups
            except Exception as e:
                log.debug("cancelling pending requests failed: %s", type(e).__name__)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


async def retry_async(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    classify_error: Callable[[Exception], tuple[Exception, BaseException]],
    what: str,
    min_attempt: float = 0.0,
) -> T:
    """RetryPolicy.call for coroutines: same budget, same BackendUnavailableError at the end.

    ``classify_error`` returns (exception to raise or Retryable, the SDK error to chain).
    Each attempt is also cut off at the remaining deadline (but given at least
    ``min_attempt``), so a server that accepts a connection and then never answers, or
    never sends 100-continue, cannot hold a call past the policy.
    """
    started = time.monotonic()
    tries = 0
    while True:
        try:
            limit = max(min_attempt, policy.deadline - (time.monotonic() - started))
            return await asyncio.wait_for(attempt(), timeout=limit)
        except Exception as e:
            mapped, cause = classify_error(e)
            if not isinstance(mapped, Retryable):
                if mapped is e:
                    raise
                raise mapped from cause
            elapsed = time.monotonic() - started
            if tries >= policy.max_retries or elapsed >= policy.deadline:
                raise BackendUnavailableError(
                    f"{what} failed after {tries + 1} attempts ({mapped.reason}); "
                    "check that the endpoint is up and reachable, or raise max_retries"
                ) from mapped.cause
            base = min(policy.max_delay, policy.min_delay * 2**tries)
            log.debug("retrying %s after %s", what, mapped.reason)
            await asyncio.sleep(min(random.uniform(base / 2, base), max(0.0, policy.deadline - elapsed)))
            tries += 1


# -- botocore error plumbing ---------------------------------------------------------------


def client_error_of(e: BaseException) -> Any | None:
    """The botocore ClientError behind ``e`` (s3fs re-raises it as an OSError ``from`` it)."""
    from botocore.exceptions import ClientError

    seen: BaseException | None = e
    for _ in range(4):
        if seen is None:
            return None
        if isinstance(seen, ClientError):
            return seen
        seen = seen.__cause__
    return None


def error_code(e: BaseException) -> tuple[str | None, int | None, str | None]:
    err = client_error_of(e)
    if err is None:
        return None, None, None
    body = err.response.get("Error", {}) or {}
    status = (err.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
    code = body.get("Code")
    return (str(code) if code is not None else None), status, body.get("Message")


def classify_botocore(e: Exception, ctx: ErrorContext) -> tuple[Exception, BaseException]:
    """(Retryable or piecestore error, cause to chain) for any exception from s3fs/aiobotocore."""
    client_error = client_error_of(e)
    if client_error is not None:
        code, status, message = error_code(e)
        return map_error(code, status, message, ctx, client_error), client_error
    return _classify_transport(e, ctx), e


def _classify_transport(e: Exception, ctx: ErrorContext) -> Exception:
    import aiohttp
    from botocore import exceptions as bx
    from botocore.parsers import ResponseParserError

    if isinstance(e, (PieceStoreError, Retryable)):
        return e
    if isinstance(e, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
        detail = "" if isinstance(e, bx.NoCredentialsError) else f" ({type(e).__name__}: {e})"
        return PermissionDeniedError(
            f"no credentials found for {ctx.display_url}{detail}: pass access_key and secret_key, set "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, configure web identity, or use anonymous=True"
        )
    if isinstance(e, bx.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(e):
        return PieceStoreError(
            f"TLS verification failed for {ctx.display_url}; fix the server certificate, pass a CA bundle "
            "path as tls_verify, or (for a test server only) tls_verify=False"
        )
    transport = (bx.HTTPClientError, bx.ConnectionError, bx.ResponseStreamingError, ResponseParserError)
    if isinstance(e, (*transport, aiohttp.ClientError, TimeoutError, ConnectionError, OSError)):
        what = repr(ctx.name) if ctx.name else "the store"
        return Retryable(f"{ctx.op} {what}: {type(e).__name__}", e)
    return unexpected(e, ctx)


def unexpected(e: Exception, ctx: ErrorContext) -> PieceStoreError:
    """Anything unclassified still becomes a piecestore error (chained by the caller)."""
    what = f" {ctx.name!r}" if ctx.name else ""
    return PieceStoreError(
        f"{ctx.op}{what} on {ctx.display_url} failed: {type(e).__name__}: {redact(str(e))}"
    )


def skip_continue_for_small_bodies(request: Any, **_: Any) -> None:
    """botocore asks for 100-continue on every PutObject: a whole extra round trip, which
    only pays off when a refusal would save sending a big body."""
    from botocore.utils import determine_content_length

    if "Expect" in request.headers:
        size = determine_content_length(request.data)
        if size is not None and size <= CONTINUE_ABOVE:
            del request.headers["Expect"]


def _strip(etag: str) -> str:
    return etag.strip('"')


def _server_time(response: dict[str, Any]) -> datetime:
    """Last-modified for a write: the server's Date header (a PUT answer has no Last-Modified)."""
    date = (response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("date")
    if date:
        try:
            return parsedate_to_datetime(date)
        except (TypeError, ValueError):
            pass
    return datetime.now(UTC)


def content_md5(body: bytes) -> str:
    """The Content-MD5 header of a body. With it the server refuses a body that arrives short:
    SeaweedFS otherwise commits a PUT whose connection dropped after its headers (a request
    abandoned by a timeout while waiting for 100-continue) as an empty object, which for a
    manifest commit means an empty manifest."""
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def conditions(mode: PutMode) -> dict[str, str]:
    if mode == "create":
        return {"IfNoneMatch": "*"}
    if isinstance(mode, IfMatch):
        return {"IfMatch": f'"{mode.etag}"'}
    return {}


# -- the driver ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class S3Location:
    bucket: str
    prefix: str
    endpoint: str | None
    region: str | None
    addressing: str


class S3Backend(Backend):
    """Objects under ``bucket/prefix/`` on any S3-compatible server, via s3fs."""

    scheme = "s3"

    def __init__(
        self, location: S3Location, settings: RemoteSettings, credentials: ResolvedCredentials
    ) -> None:
        display = f"s3://{location.bucket}" + (f"/{location.prefix}" if location.prefix else "")
        if location.endpoint:
            display += f"?endpoint={location.endpoint}"
        super().__init__(display_url=display, read_only=settings.read_only)
        self._loc = location
        self._settings = settings
        self._credentials = credentials
        self._root = f"{location.prefix}/" if location.prefix else ""
        self._walk = walk_listing(
            settings, urlsplit(location.endpoint).hostname if location.endpoint else None
        )
        self._caps = Capabilities(
            conditional_create=True,
            conditional_match=True,
            batch_delete=True,
            max_delete_batch=DELETE_BATCH,
            multipart_upload=True,
            multipart_threshold=settings.multipart_threshold,
            coalesce_gap=512 * 1024,
            max_request_bytes=8 * MiB,
            concurrency=settings.concurrency,
            remote=True,
            timestamp_resolution=1.0,
        )
        self._loop = LoopThread(f"piecestore-s3-{location.bucket}")
        self._sem = asyncio.Semaphore(settings.concurrency)
        self._fs = self._make_fs()
        self._hooked: Any = None
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._fs, hide_in_logs(credentials))

    def _make_fs(self) -> Any:
        import s3fs

        creds, loc, st = self._credentials, self._loc, self._settings
        config: dict[str, Any] = {
            "connect_timeout": st.connect_timeout,
            "read_timeout": st.read_timeout,
            "retries": {"total_max_attempts": 1},  # our RetryPolicy retries, nothing below it
            "max_pool_connections": max(10, st.concurrency),
            "request_checksum_calculation": "when_required",  # S3-compatible servers vary
            "response_checksum_validation": "when_required",
        }
        if loc.addressing != "auto":
            config["s3"] = {"addressing_style": loc.addressing}
        client_kwargs: dict[str, Any] = {"verify": st.tls_verify}
        if loc.region:
            client_kwargs["region_name"] = loc.region
        kwargs: dict[str, Any] = {}
        if creds.kind == "static":
            assert creds.secret_key is not None
            kwargs["key"] = creds.access_key
            kwargs["secret"] = creds.secret_key.get_secret_value()
            if creds.session_token is not None:
                kwargs["token"] = creds.session_token.get_secret_value()
        elif creds.kind == "anonymous":
            kwargs["anon"] = True
        elif creds.kind == "web_identity":
            kwargs["session"] = _web_identity_session(creds)
        fs = s3fs.S3FileSystem(
            endpoint_url=loc.endpoint,
            client_kwargs=client_kwargs,
            config_kwargs=config,
            asynchronous=True,
            skip_instance_cache=True,  # the instance cache would share (and keep) our credentials
            use_listings_cache=False,
            **kwargs,
        )
        fs.retries = 1  # s3fs's own retry loop: one attempt
        return fs

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    # -- plumbing ------------------------------------------------------------------------
    def _ctx(self, op: str, name: str | None, mode: PutMode | None = None) -> ErrorContext:
        return ErrorContext(
            op=op,
            name=name,
            display_url=self.display_url,
            bucket=self._loc.bucket,
            credential_source=self._credentials.source,
            create=mode == "create",
            expected_etag=mode.etag if isinstance(mode, IfMatch) else None,
        )

    async def _s3(self, method: str, **kwargs: Any) -> Any:
        async with self._sem:
            client = await self._fs.set_session()
            if client is not self._hooked:  # s3fs may rebuild its client; hook each one once
                client.meta.events.register("before-sign.s3.PutObject", skip_continue_for_small_bodies)
                self._hooked = client
            return await self._fs._call_s3(method, Bucket=self._loc.bucket, **kwargs)

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], ctx: ErrorContext) -> T:
        what = (
            f"{ctx.op} {ctx.name!r} on {self.display_url}" if ctx.name else f"{ctx.op} on {self.display_url}"
        )
        try:
            st = self._settings
            return await retry_async(
                st.retry,
                attempt,
                lambda e: classify_botocore(e, ctx),
                what,
                st.connect_timeout + st.read_timeout,
            )
        except PermissionDeniedError as e:
            # SeaweedFS (and some proxies) answer a write to a missing bucket with 403.
            if error_code(e)[1] == 403 and await self._bucket_missing():
                raise map_error("NoSuchBucket", 404, None, ctx, e) from e
            raise

    async def _bucket_missing(self) -> bool:
        try:
            await self._s3("head_bucket")
        except Exception as e:
            return classify(*error_code(e)[:2]) in (Outcome.NOT_FOUND, Outcome.NO_BUCKET)
        return False

    def _call(self, attempt: Callable[[], Awaitable[T]], ctx: ErrorContext) -> T:
        return self._loop.run(self._retrying(attempt, ctx))

    def client_endpoint(self) -> str:
        """The endpoint requests go to, as botocore resolved it (no request is sent)."""

        async def resolve() -> str:
            client = await self._fs.set_session()
            return str(client.meta.endpoint_url)

        return self._loop.run(resolve())

    def addressing_style(self) -> str:
        async def resolve() -> str:
            client = await self._fs.set_session()
            return str((client.meta.config.s3 or {}).get("addressing_style", "auto"))

        return self._loop.run(resolve())

    # -- writes --------------------------------------------------------------------------
    def _put(self, name: str, data: memoryview | BinaryIO, mode: PutMode) -> ObjectMeta:
        key = self._root + name
        ctx = self._ctx("put", name, mode)
        body, parts = split_upload(data, self._settings.multipart_threshold)
        if body is None:
            return self._put_multipart(name, key, parts, mode, ctx)
        return self._put_single(name, key, body, mode, ctx)

    def _put_single(self, name: str, key: str, body: bytes, mode: PutMode, ctx: ErrorContext) -> ObjectMeta:
        attempts = 0
        md5 = content_md5(body)

        async def once() -> Any:
            nonlocal attempts
            attempts += 1
            return await self._s3("put_object", Key=key, Body=body, ContentMD5=md5, **conditions(mode))

        try:
            response = self._call(once, ctx)
        except (AlreadyExistsError, PreconditionFailedError):
            # A retried conditional PUT may have won on an attempt whose answer was lost;
            # if the object now holds exactly our bytes, that win is ours.
            if attempts > 1:
                meta = self._head_or_none(name)
                if meta is not None and meta.etag == hashlib.md5(body, usedforsecurity=False).hexdigest():
                    return meta
            raise
        return ObjectMeta(name, len(body), _strip(response["ETag"]), _server_time(response))

    def _head_or_none(self, name: str) -> ObjectMeta | None:
        try:
            return self._head(name)
        except PieceStoreError:
            return None

    def _put_multipart(
        self, name: str, key: str, parts: Iterator[bytes], mode: PutMode, ctx: ErrorContext
    ) -> ObjectMeta:
        created = self._call(
            lambda: self._s3("create_multipart_upload", Key=key, ContentType="application/octet-stream"), ctx
        )
        upload_id = created["UploadId"]
        window: deque[tuple[int, concurrent.futures.Future[Any]]] = deque()
        done: list[dict[str, Any]] = []
        in_flight = max(1, min(4, self._settings.concurrency))  # bounds memory to a few parts
        size = 0
        try:
            for number, chunk in enumerate(parts, 1):
                if number > MAX_PARTS:
                    raise InvalidValueError(
                        f"{name!r} is too large for {MAX_PARTS} parts; raise multipart_threshold"
                    )
                size += len(chunk)

                def upload(chunk: bytes = chunk, number: int = number) -> Awaitable[Any]:
                    return self._s3(
                        "upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=chunk,
                        ContentMD5=content_md5(chunk),
                    )  # fmt: skip

                window.append((number, self._loop.submit(self._retrying(upload, ctx))))
                del chunk
                while len(window) >= in_flight:
                    number_done, fut = window.popleft()
                    done.append({"PartNumber": number_done, "ETag": fut.result()["ETag"]})
            while window:
                number_done, fut = window.popleft()
                done.append({"PartNumber": number_done, "ETag": fut.result()["ETag"]})
            response = self._call(
                lambda: self._s3(
                    "complete_multipart_upload",
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": done},
                    **conditions(mode),
                ),
                ctx,
            )
        except BaseException:
            for _, fut in window:
                fut.cancel()
            concurrent.futures.wait([f for _, f in window], timeout=self._settings.read_timeout)
            self._abort_upload(key, upload_id)
            raise
        return ObjectMeta(name, size, _strip(response["ETag"]), _server_time(response))

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._loop.run(self._s3("abort_multipart_upload", Key=key, UploadId=upload_id))
        except Exception as e:  # best effort: a lifecycle rule reaps what is left
            log.warning(
                "could not abort multipart upload of %r on %s: %s", key, self.display_url, type(e).__name__
            )

    def _delete(self, name: str) -> None:
        key = self._root + name
        self._call(lambda: self._s3("delete_object", Key=key), self._ctx("delete", name))

    def _delete_many(self, names: list[str]) -> None:
        batches = [names[i : i + DELETE_BATCH] for i in range(0, len(names), DELETE_BATCH)]
        self._loop.run(self._gather([self._delete_batch(batch) for batch in batches]))

    async def _delete_batch(self, names: list[str]) -> None:
        ctx = self._ctx("delete", names[0])

        async def once() -> None:
            response = await self._s3(
                "delete_objects", Delete={"Objects": [{"Key": self._root + n} for n in names], "Quiet": True}
            )
            errors = [e for e in response.get("Errors", []) or [] if e.get("Code") not in ("NoSuchKey", None)]
            if errors:
                first = errors[0]
                key = str(first.get("Key", ""))
                failed = ErrorContext(
                    "delete", key[len(self._root) :], ctx.display_url, ctx.bucket, ctx.credential_source
                )
                cause = PieceStoreError(
                    f"DeleteObjects reported {len(errors)} failure(s), first {first.get('Code')}"
                )
                raise map_error(str(first.get("Code")), None, first.get("Message"), failed, cause)

        await self._retrying(once, ctx)

    @staticmethod
    async def _gather(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
        """Run all, wait for all, then raise the first failure (no orphaned requests)."""
        results = await asyncio.gather(*coros, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    # -- reads ---------------------------------------------------------------------------
    async def _read(self, name: str, offset: int, length: int | None) -> bytes:
        key = self._root + name
        ctx = self._ctx("get", name)
        if length == 0:
            await self._ahead(name)
            return b""

        async def once() -> bytes:
            kwargs: dict[str, Any] = {"Key": key}
            if offset or length is not None:
                end = "" if length is None else str(offset + length - 1)
                kwargs["Range"] = f"bytes={offset}-{end}"
            try:
                response = await self._s3("get_object", **kwargs)
            except Exception as e:
                if classify(*error_code(e)[:2]) is Outcome.INVALID_RANGE:
                    return b""  # the object exists (else 404) and the range starts past its end
                raise
            async with response["Body"] as stream:
                return bytes(await stream.read())

        return await self._retrying(once, ctx)

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        return self._loop.run(self._read(name, offset, length))

    def _get_groups(self, name: str, spans: list[tuple[int, int]]) -> list[bytes]:
        return self._loop.run(self._gather([self._read(name, off, length) for off, length in spans]))

    def _get_with_meta(self, name: str) -> tuple[bytes, ObjectMeta]:
        key = self._root + name

        async def once() -> tuple[bytes, ObjectMeta]:
            response = await self._s3("get_object", Key=key)
            async with response["Body"] as stream:
                data = bytes(await stream.read())
            return data, ObjectMeta(name, len(data), _strip(response["ETag"]), response["LastModified"])

        return self._call(once, self._ctx("get", name))

    async def _ahead(self, name: str) -> ObjectMeta:
        key = self._root + name

        async def once() -> ObjectMeta:
            r = await self._s3("head_object", Key=key)
            return ObjectMeta(name, int(r["ContentLength"]), _strip(r["ETag"]), r["LastModified"])

        return await self._retrying(once, self._ctx("head", name))

    def _head(self, name: str) -> ObjectMeta:
        return self._loop.run(self._ahead(name))

    def _list(self, prefix: str) -> Iterator[ObjectMeta]:
        full = self._root + prefix
        if self._walk:
            return sorted_walk(lambda p: self._pages(p, "/"), full)
        return (meta for keys, _ in self._pages(full, None) for _, meta in keys)

    def _pages(
        self, full: str, delimiter: str | None
    ) -> Iterator[tuple[list[tuple[str, ObjectMeta]], list[str]]]:
        """ListObjectsV2 pages under ``full``: [(key, meta)] and common prefixes, lazily."""
        ctx = self._ctx("list", full[len(self._root) :] or None)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": full, "MaxKeys": LIST_PAGE}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            page: dict[str, Any] = self._call(partial(self._s3, "list_objects_v2", **kwargs), ctx)
            keys = [
                (item["Key"], ObjectMeta(item["Key"][len(self._root) :], int(item["Size"]),
                                         _strip(item["ETag"]), item["LastModified"]))
                for item in page.get("Contents", []) or []
                if not item["Key"].endswith("/")  # directory markers made by other tools
            ]  # fmt: skip
            yield keys, [p["Prefix"] for p in page.get("CommonPrefixes", []) or []]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    def _close(self) -> None:
        self._finalizer()


def _shutdown(loop: LoopThread, fs: Any, unhide: Callable[[], None]) -> None:
    """Close the HTTP session, then the loop; also run by the finalizer if close() was skipped."""
    unhide()
    loop.cancel_pending()
    creator = getattr(fs, "_s3creator", None)
    if creator is not None and not loop.loop.is_closed():
        try:
            loop.submit(creator.__aexit__(None, None, None)).result(timeout=5)
        except Exception as e:  # closing must not raise
            log.debug("closing the s3 session failed: %s", type(e).__name__)
    loop.stop()


def _web_identity_session(creds: ResolvedCredentials) -> Any:
    """An aiobotocore session whose first credential provider is our web identity settings.

    botocore would read AWS_ROLE_ARN/AWS_WEB_IDENTITY_TOKEN_FILE itself, but not options, so
    both go through one provider (which re-reads the token file on every refresh).
    """
    from aiobotocore.credentials import AioAssumeRoleWithWebIdentityProvider
    from aiobotocore.session import AioSession

    session = AioSession()
    profile = {
        "role_arn": creds.role_arn,
        "web_identity_token_file": creds.web_identity_token_file,
        "role_session_name": "piecestore",
    }
    provider = AioAssumeRoleWithWebIdentityProvider(
        load_config=lambda: {"profiles": {"piecestore": profile}},
        client_creator=session.create_client,
        profile_name="piecestore",
        cache={},
        disable_env_vars=True,
    )
    session.get_component("credential_provider").insert_before("env", provider)
    return session


# -- URL -> driver -------------------------------------------------------------------------


def validate_endpoint(endpoint: str) -> str:
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"endpoint {endpoint!r} must look like http(s)://host[:port]")
    if "@" in parts.netloc:
        raise ConfigError("endpoint must not carry credentials before '@'; pass them as options")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"endpoint {endpoint!r} must be just scheme://host[:port], without a path or query")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(f"endpoint {endpoint!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


def from_url(parts: SplitResult, options: dict[str, Any]) -> S3Backend:
    """``s3://bucket[/prefix]?endpoint=...&region=...&addressing=path|virtual`` + options."""
    reject_userinfo(parts, "s3")
    if parts.fragment:
        raise ConfigError("s3:// URL must not have a '#fragment'")
    bucket = validate_bucket(parts.netloc)
    prefix = validate_store_prefix(parts.path)
    query = parse_query(parts.query, ("endpoint", "region", "addressing"), "s3")
    endpoint_raw = options.pop("endpoint", None) or query.get("endpoint") or None
    endpoint = validate_endpoint(str(endpoint_raw)) if endpoint_raw else None
    region = options.pop("region", None) or query.get("region") or env_region("s3")
    if region is None and endpoint is not None:
        region = "us-east-1"  # S3-compatible servers sign with a region but rarely care which
    if region is not None and not re.fullmatch(r"[a-z0-9-]{1,64}", str(region)):
        raise ConfigError(f"region {region!r} is invalid; use a region name such as us-east-1")
    addressing = str(
        options.pop("addressing", None) or query.get("addressing") or ("path" if endpoint else "auto")
    )
    if addressing not in ("path", "virtual", "auto"):
        raise ConfigError(f"addressing must be 'path', 'virtual' or 'auto', got {addressing!r}")
    settings = pop_settings(options)
    credentials = resolve_credentials(options, flavor="s3")
    reject_leftovers("s3", options)
    location = S3Location(bucket, prefix, endpoint, str(region) if region else None, addressing)
    return S3Backend(location, settings, credentials)
