"""minio driver: the same S3 protocol through the minio SDK (sync, urllib3).

``minio://host:port/bucket[/prefix]?secure=false&region=...``. Range groups, delete batches
and multipart parts run on a thread pool bounded by ``concurrency``, over one urllib3 pool
of the same size. The SDK's ``put_object`` drops conditional headers (they become user
metadata), so writes go through its lower-level ``_put_object``/``_execute``, which send
``If-None-Match``/``If-Match`` as real headers, also on CompleteMultipartUpload.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import logging
import re
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, BinaryIO, TypeVar
from urllib.parse import SplitResult, urlsplit

import certifi
import urllib3
from minio import Minio
from minio.credentials.credentials import Credentials
from minio.credentials.providers import (
    ChainedProvider,
    EnvAWSProvider,
    EnvMinioProvider,
    IamAwsProvider,
    Provider,
    WebIdentityProvider,
)
from minio.helpers import DictType

from piecestore.backends.base import Backend, Capabilities, IfMatch, ObjectMeta, PutMode
from piecestore.backends.credentials import (
    ResolvedCredentials,
    env_region,
    hide_in_logs,
    parse_bool,
    read_token_file,
    resolve_credentials,
)
from piecestore.backends.retry import Retryable
from piecestore.backends.s3 import (
    DELETE_BATCH,
    LIST_PAGE,
    MAX_PARTS,
    MiB,
    RemoteSettings,
    is_aws_host,
    parse_query,
    pop_settings,
    reject_leftovers,
    reject_userinfo,
    sorted_walk,
    split_upload,
    unexpected,
    validate_bucket,
    validate_store_prefix,
    walk_listing,
)
from piecestore.backends.s3errors import ErrorContext, Outcome, classify, map_error
from piecestore.errors import (
    AlreadyExistsError,
    ConfigError,
    InvalidValueError,
    PermissionDeniedError,
    PieceStoreError,
    PreconditionFailedError,
)

T = TypeVar("T")
log = logging.getLogger("piecestore.backends.minio")
_OCTET = {"Content-Type": "application/octet-stream"}


def condition_headers(mode: PutMode) -> dict[str, str]:
    if mode == "create":
        return {"If-None-Match": "*"}
    if isinstance(mode, IfMatch):
        return {"If-Match": f'"{mode.etag}"'}
    return {}


def classify_minio(e: Exception, ctx: ErrorContext) -> Exception:
    """Retryable or a piecestore error for anything the minio SDK or urllib3 raised."""
    import urllib3.exceptions as ux
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(e, (PieceStoreError, Retryable)):
        return e
    if isinstance(e, S3Error):
        status = getattr(e.response, "status", None)
        return map_error(e.code, status, e.message, ctx, e)
    if isinstance(e, ServerError):
        return map_error(None, e.status_code, None, ctx, e)
    if isinstance(e, InvalidResponseError):
        return map_error(None, int(getattr(e, "_code", 0) or 0) or None, "non-XML answer", ctx, e)
    if isinstance(e, ux.SSLError):
        return PieceStoreError(
            f"TLS verification failed for {ctx.display_url}; fix the server certificate, pass a CA bundle "
            "path as tls_verify, or (for a test server only) tls_verify=False"
        )
    if isinstance(e, (ux.HTTPError, TimeoutError, ConnectionError, OSError)):
        what = repr(ctx.name) if ctx.name else "the store"
        return Retryable(f"{ctx.op} {what}: {type(e).__name__}", e)
    return unexpected(e, ctx)


def _error_status(e: BaseException) -> tuple[str | None, int | None]:
    from minio.error import S3Error

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, S3Error):
            return seen.code, getattr(seen.response, "status", None)
        seen = seen.__cause__
    return None, None


def _server_time(headers: Any) -> datetime:
    value = headers.get("date") if headers is not None else None
    if value:
        try:
            return parsedate_to_datetime(value)
        except (TypeError, ValueError):
            pass
    return datetime.now(UTC)


class SecretProvider(Provider):
    """Static keys kept as SecretStr until a request is signed (minio's Credentials repr shows them)."""

    def __init__(self, creds: ResolvedCredentials) -> None:
        self._creds = creds

    def retrieve(self) -> Credentials:
        creds = self._creds
        assert creds.access_key and creds.secret_key
        token = creds.session_token.get_secret_value() if creds.session_token else None
        return Credentials(creds.access_key, creds.secret_key.get_secret_value(), token)

    def __repr__(self) -> str:
        return f"SecretProvider({self._creds!r})"


class ExplainedChain(Provider):
    """The SDK's default chain, failing with a hint instead of a bare ValueError."""

    def __init__(self, http: urllib3.PoolManager) -> None:
        self._chain = ChainedProvider(
            [EnvAWSProvider(), EnvMinioProvider(), IamAwsProvider(http_client=http)]
        )

    def retrieve(self) -> Credentials:
        try:
            return self._chain.retrieve()
        except Exception as e:
            raise PermissionDeniedError(
                "no credentials found: pass access_key and secret_key, set MINIO_ACCESS_KEY/"
                "MINIO_SECRET_KEY or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, configure web identity, "
                "or use anonymous=True"
            ) from e


def make_provider(
    creds: ResolvedCredentials, http: urllib3.PoolManager, sts_endpoint: str
) -> Provider | None:
    """A minio credential Provider for the resolved identity; None means unsigned."""
    if creds.kind == "anonymous":
        return None
    if creds.kind == "static":
        return SecretProvider(creds)
    if creds.kind == "web_identity":
        token_file = str(creds.web_identity_token_file)
        return WebIdentityProvider(
            jwt_provider_func=lambda: {"access_token": read_token_file(token_file)},
            sts_endpoint=sts_endpoint,
            role_arn=creds.role_arn,
            role_session_name="piecestore",
            http_client=http,
        )
    return ExplainedChain(http)


class MinioBackend(Backend):
    """Objects under ``bucket/prefix/`` through the minio SDK."""

    scheme = "minio"

    def __init__(
        self,
        *,
        host: str,
        secure: bool,
        bucket: str,
        prefix: str,
        region: str | None,
        addressing: str,
        settings: RemoteSettings,
        credentials: ResolvedCredentials,
    ) -> None:
        display = f"minio://{host}/{bucket}" + (f"/{prefix}" if prefix else "")
        super().__init__(display_url=display, read_only=settings.read_only)
        self._bucket = bucket
        self._root = f"{prefix}/" if prefix else ""
        self._settings = settings
        self._credentials = credentials
        self._walk = walk_listing(settings, urlsplit(f"//{host}").hostname)
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
        verify = settings.tls_verify
        self._http = urllib3.PoolManager(
            maxsize=settings.concurrency,
            timeout=urllib3.Timeout(connect=settings.connect_timeout, read=settings.read_timeout),
            retries=False,  # our RetryPolicy alone decides, so a call's time is bounded
            cert_reqs="CERT_REQUIRED" if verify else "CERT_NONE",
            ca_certs=verify if isinstance(verify, str) else certifi.where(),
        )
        scheme = "https" if secure else "http"
        sts = f"{scheme}://{host}"
        if is_aws_host(urlsplit(f"//{host}").hostname):
            sts = f"https://sts.{region}.amazonaws.com" if region else "https://sts.amazonaws.com"
            sts += ".cn" if (region or "").startswith("cn-") else ""
        self._client = Minio(
            host,
            secure=secure,
            region=region,
            http_client=self._http,
            credentials=make_provider(credentials, self._http, sts),
            cert_check=bool(verify),
        )
        if addressing == "virtual":
            self._client.enable_virtual_style_endpoint()  # type: ignore[no-untyped-call]
        elif addressing == "path":
            self._client.disable_virtual_style_endpoint()  # type: ignore[no-untyped-call]
        self._pool = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="piecestore-minio")
        self._unhide = hide_in_logs(credentials)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    # -- plumbing ------------------------------------------------------------------------
    def _ctx(self, op: str, name: str | None, mode: PutMode | None = None) -> ErrorContext:
        return ErrorContext(
            op=op,
            name=name,
            display_url=self.display_url,
            bucket=self._bucket,
            credential_source=self._credentials.source,
            create=mode == "create",
            expected_etag=mode.etag if isinstance(mode, IfMatch) else None,
        )

    def _call(self, fn: Callable[[], T], ctx: ErrorContext) -> T:
        """One SDK call under the retry policy, every failure mapped into piecestore.errors."""

        def attempt() -> T:
            try:
                return fn()
            except Exception as e:
                mapped = classify_minio(e, ctx)
                if mapped is e:
                    raise
                raise mapped from e

        what = (
            f"{ctx.op} {ctx.name!r} on {self.display_url}" if ctx.name else f"{ctx.op} on {self.display_url}"
        )
        try:
            return self._settings.retry.call(attempt, what=what)
        except PermissionDeniedError as e:
            # SeaweedFS (and some proxies) answer a write to a missing bucket with 403.
            if _error_status(e)[1] == 403 and self._bucket_missing():
                raise map_error("NoSuchBucket", 404, None, ctx, e) from e
            raise

    def _bucket_missing(self) -> bool:
        try:
            return not self._client.bucket_exists(self._bucket)
        except Exception:
            return False

    # -- writes --------------------------------------------------------------------------
    def _put(self, name: str, data: memoryview | BinaryIO, mode: PutMode) -> ObjectMeta:
        key = self._root + name
        ctx = self._ctx("put", name, mode)
        body, parts = split_upload(data, self._settings.multipart_threshold)
        if body is None:
            return self._put_multipart(name, key, parts, mode, ctx)
        attempts = 0

        def once() -> Any:
            nonlocal attempts
            attempts += 1
            headers: DictType = {**_OCTET, **condition_headers(mode)}
            return self._client._put_object(self._bucket, key, body, headers=headers)

        try:
            result = self._call(once, ctx)
        except (AlreadyExistsError, PreconditionFailedError):
            # A retried conditional PUT may have won on an attempt whose answer was lost.
            if attempts > 1:
                meta = self._head_or_none(name)
                if meta is not None and meta.etag == hashlib.md5(body, usedforsecurity=False).hexdigest():
                    return meta
            raise
        return ObjectMeta(name, len(body), str(result.etag), _server_time(result.http_headers))

    def _head_or_none(self, name: str) -> ObjectMeta | None:
        try:
            return self._head(name)
        except PieceStoreError:
            return None

    def _put_multipart(
        self, name: str, key: str, parts: Iterator[bytes], mode: PutMode, ctx: ErrorContext
    ) -> ObjectMeta:
        upload_id: str = self._call(
            lambda: self._client._create_multipart_upload(self._bucket, key, dict(_OCTET)), ctx
        )
        window: deque[tuple[int, concurrent.futures.Future[str]]] = deque()
        done: list[tuple[int, str]] = []
        in_flight = max(1, min(4, self._settings.concurrency))  # bounds memory to a few parts
        size = 0

        def upload(chunk: bytes, number: int) -> str:
            return str(
                self._call(
                    lambda: self._client._upload_part(self._bucket, key, chunk, None, upload_id, number), ctx
                )
            )

        try:
            for number, chunk in enumerate(parts, 1):
                if number > MAX_PARTS:
                    raise InvalidValueError(
                        f"{name!r} is too large for {MAX_PARTS} parts; raise multipart_threshold"
                    )
                size += len(chunk)
                window.append((number, self._pool.submit(upload, chunk, number)))
                del chunk
                while len(window) >= in_flight:
                    number_done, fut = window.popleft()
                    done.append((number_done, fut.result()))
            while window:
                number_done, fut = window.popleft()
                done.append((number_done, fut.result()))
            etag, headers = self._call(lambda: self._complete(key, upload_id, done, mode, ctx), ctx)
        except BaseException:
            for _, fut in window:
                fut.cancel()
            concurrent.futures.wait([f for _, f in window], timeout=self._settings.read_timeout)
            self._abort_upload(key, upload_id)
            raise
        return ObjectMeta(name, size, etag, _server_time(headers))

    def _complete(
        self, key: str, upload_id: str, parts: list[tuple[int, str]], mode: PutMode, ctx: ErrorContext
    ) -> tuple[str, Any]:
        """CompleteMultipartUpload with the conditional header the SDK's own call cannot send."""
        root = ET.Element("CompleteMultipartUpload")
        for number, etag in parts:
            part = ET.SubElement(root, "Part")
            ET.SubElement(part, "PartNumber").text = str(number)
            ET.SubElement(part, "ETag").text = f'"{etag}"'
        body = ET.tostring(root)
        headers: DictType = {
            "Content-Type": "application/xml",
            "Content-MD5": base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode(),
            **condition_headers(mode),
        }
        response = self._client._execute(
            "POST", self._bucket, key, body=body, headers=headers, query_params={"uploadId": upload_id}
        )
        answer = ET.fromstring(response.data)
        if answer.tag.endswith("Error"):  # S3 may answer 200 and still fail the completion
            code = _findtext(answer, "Code")
            raise map_error(code, None, _findtext(answer, "Message"), ctx, PieceStoreError(str(code)))
        return (_findtext(answer, "ETag") or "").strip('"'), response.headers

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._client._abort_multipart_upload(self._bucket, key, upload_id)
        except Exception as e:  # best effort: a lifecycle rule reaps what is left
            log.warning(
                "could not abort multipart upload of %r on %s: %s", key, self.display_url, type(e).__name__
            )

    def _delete(self, name: str) -> None:
        key = self._root + name
        self._call(lambda: self._client.remove_object(self._bucket, key), self._ctx("delete", name))

    def _delete_many(self, names: list[str]) -> None:
        batches = [names[i : i + DELETE_BATCH] for i in range(0, len(names), DELETE_BATCH)]
        self._gather([self._pool.submit(self._delete_batch, batch) for batch in batches])

    def _delete_batch(self, names: list[str]) -> None:
        from minio.deleteobjects import DeleteObject

        ctx = self._ctx("delete", names[0])

        def once() -> None:
            errors = [
                e
                for e in self._client.remove_objects(
                    self._bucket, [DeleteObject(self._root + n) for n in names]
                )
                if e.code != "NoSuchKey"
            ]
            if errors:
                first = errors[0]
                failed = ErrorContext(
                    "delete",
                    str(first.name)[len(self._root) :],
                    ctx.display_url,
                    ctx.bucket,
                    ctx.credential_source,
                )
                cause = PieceStoreError(
                    f"DeleteObjects reported {len(errors)} failure(s), first {first.code}"
                )
                raise map_error(first.code, None, first.message, failed, cause)

        self._call(once, ctx)

    @staticmethod
    def _gather(futures: list[concurrent.futures.Future[T]]) -> list[T]:
        """Wait for all, then raise the first failure (no orphaned requests)."""
        concurrent.futures.wait(futures)
        return [f.result() for f in futures]

    # -- reads ---------------------------------------------------------------------------
    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        key = self._root + name
        if length == 0:
            self._head(name)
            return b""

        def once() -> bytes:
            try:
                response = self._client.get_object(self._bucket, key, offset=offset, length=length or 0)
            except Exception as e:
                if classify(*_error_status(e)) is Outcome.INVALID_RANGE:
                    return b""  # the object exists (else 404) and the range starts past its end
                raise
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._call(once, self._ctx("get", name))

    def _get_groups(self, name: str, spans: list[tuple[int, int]]) -> list[bytes]:
        if len(spans) == 1:
            return [self._get(name, *spans[0])]
        return self._gather([self._pool.submit(self._get, name, off, length) for off, length in spans])

    def _get_with_meta(self, name: str) -> tuple[bytes, ObjectMeta]:
        key = self._root + name

        def once() -> tuple[bytes, ObjectMeta]:
            response = self._client.get_object(self._bucket, key)
            try:
                data = bytes(response.read())
                headers = response.headers
            finally:
                response.close()
                response.release_conn()
            modified = (
                parsedate_to_datetime(headers["last-modified"]) if headers.get("last-modified") else None
            )
            etag = headers.get("etag", "").strip('"')
            return data, ObjectMeta(name, len(data), etag, modified or datetime.now(UTC))

        return self._call(once, self._ctx("get", name))

    def _head(self, name: str) -> ObjectMeta:
        key = self._root + name
        stat = self._call(lambda: self._client.stat_object(self._bucket, key), self._ctx("head", name))
        return ObjectMeta(
            name, int(stat.size or 0), str(stat.etag or ""), stat.last_modified or datetime.now(UTC)
        )

    def _list(self, prefix: str) -> Iterator[ObjectMeta]:
        full = self._root + prefix
        if self._walk:
            return sorted_walk(lambda p: self._pages(p, "/"), full)
        return (meta for keys, _ in self._pages(full, None) for _, meta in keys)

    def _pages(
        self, full: str, delimiter: str | None
    ) -> Iterator[tuple[list[tuple[str, ObjectMeta]], list[str]]]:
        """ListObjectsV2 pages, fetched one at a time (the SDK's list_objects hides the pages)."""
        from minio.datatypes import parse_list_objects

        ctx = self._ctx("list", full[len(self._root) :] or None)
        token: str | None = None
        while True:
            query: DictType = {
                "list-type": "2",
                "prefix": full,
                "delimiter": delimiter or "",
                "max-keys": str(LIST_PAGE),
                "encoding-type": "url",
            }
            if token:
                query["continuation-token"] = token

            def fetch(query: DictType = query) -> Any:
                return parse_list_objects(self._client._execute("GET", self._bucket, query_params=query))

            objects, truncated, token, _ = self._call(fetch, ctx)
            keys: list[tuple[str, ObjectMeta]] = []
            prefixes: list[str] = []
            for obj in objects:
                name = str(obj.object_name)
                if obj.is_dir:
                    prefixes.append(name)
                elif not name.endswith("/"):  # skip directory markers made by other tools
                    modified = obj.last_modified or datetime.now(UTC)
                    meta = ObjectMeta(
                        name[len(self._root) :], int(obj.size or 0), str(obj.etag or ""), modified
                    )
                    keys.append((name, meta))
            yield keys, prefixes
            if not truncated or not token:
                return

    def _close(self) -> None:
        self._pool.shutdown(wait=True)
        self._http.clear()
        self._unhide()


def _findtext(element: ET.Element, tag: str) -> str | None:
    for child in element.iter():
        if child.tag == tag or child.tag.endswith("}" + tag):
            return child.text
    return None


_HOST = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")


def from_url(parts: SplitResult, options: dict[str, Any]) -> MinioBackend:
    """``minio://host:port/bucket[/prefix]?secure=false&region=...`` + options."""
    reject_userinfo(parts, "minio")
    if parts.fragment:
        raise ConfigError("minio:// URL must not have a '#fragment'")
    host = parts.netloc
    if not host or not _HOST.match(host):
        raise ConfigError(
            f"minio:// URL needs a host[:port], got {host!r}; e.g. minio://127.0.0.1:9000/bucket"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"minio:// URL has an invalid port in {host!r}") from None
    if port == 0:
        raise ConfigError(f"minio:// URL has an invalid port in {host!r}")
    bucket, _, rest = parts.path.lstrip("/").partition("/")
    if not bucket:
        raise ConfigError("minio:// URL names no bucket; use minio://host:port/BUCKET[/prefix]")
    validate_bucket(bucket)
    prefix = validate_store_prefix(rest)
    query = parse_query(parts.query, ("secure", "region", "addressing"), "minio")
    secure = parse_bool("secure", options.pop("secure", query.get("secure", True)))
    region = options.pop("region", None) or query.get("region") or env_region("minio")
    if region is None and not is_aws_host(parts.hostname):
        region = "us-east-1"  # saves a GetBucketLocation round trip; such servers ignore it
    if region is not None and not re.fullmatch(r"[a-z0-9-]{1,64}", str(region)):
        raise ConfigError(f"region {region!r} is invalid; use a region name such as us-east-1")
    addressing = str(options.pop("addressing", None) or query.get("addressing") or "auto")
    if addressing not in ("path", "virtual", "auto"):
        raise ConfigError(f"addressing must be 'path', 'virtual' or 'auto', got {addressing!r}")
    settings = pop_settings(options)
    credentials = resolve_credentials(options, flavor="minio")
    reject_leftovers("minio", options)
    return MinioBackend(
        host=host,
        secure=secure,
        bucket=bucket,
        prefix=prefix,
        region=str(region) if region else None,
        addressing=addressing,
        settings=settings,
        credentials=credentials,
    )
