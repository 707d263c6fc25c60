"""s3 and minio drivers beyond the conformance suite: errors, retries, races, secrets.

Most tests run against the real SeaweedFS server (``s3_server``); failure answers that
SeaweedFS will not give (it accepts any keys) come from a tiny canned-answer HTTP server on
loopback, so the drivers still parse real HTTP responses.
"""

from __future__ import annotations

import asyncio
import io
import logging
import multiprocessing
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from piecestore.backends import Backend, IfMatch, open_backend
from piecestore.backends.retry import Retryable
from piecestore.backends.s3 import PART_BYTES, S3Backend, sorted_walk, split_upload
from piecestore.backends.s3errors import ErrorContext
from piecestore.errors import (
    AlreadyExistsError,
    BackendUnavailableError,
    BucketNotFoundError,
    NotFoundError,
    PermissionDeniedError,
    PieceStoreError,
    PreconditionFailedError,
)
from piecestore.localserver import LocalS3Server
from tests.conftest import BUCKET, s3_credentials

REMOTE = ["s3", "minio"]
SECRET = "sUpEr-SeCrEt-ValUe-0123"
TOKEN = "sEsSiOn-ToKeN-ValUe-4567"
FAST = {"max_retries": 2, "min_retry_delay": 0.01, "max_retry_delay": 0.05, "connect_timeout": 0.5}


def remote_url(driver: str, endpoint: str, port: int, bucket: str = BUCKET, prefix: str | None = None) -> str:
    prefix = prefix or f"t-{uuid.uuid4().hex[:12]}"
    if driver == "s3":
        return f"s3://{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1"
    return f"minio://127.0.0.1:{port}/{bucket}/{prefix}?secure=false"


@pytest.fixture(params=REMOTE)
def remote(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(remote: str, s3_server: LocalS3Server) -> Iterator[Backend]:
    with open_backend(remote_url(remote, s3_server.endpoint, s3_server.s3_port), **s3_credentials()) as b:
        yield b


# -- a canned-answer S3 server for failures SeaweedFS does not produce ----------------------


class Canned:
    """Answers every request with one status and S3 error code; records what it was sent."""

    def __init__(self, status: int, code: str) -> None:
        self.status, self.code = status, code
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers Expect: 100-continue, as S3 does

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                canned.requests.append((self.command, self.path, dict(self.headers)))
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{canned.code}</Code>'
                    f"<Message>canned {canned.code}</Message><RequestId>r1</RequestId></Error>"
                ).encode()
                self.send_response(canned.status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def canned() -> Iterator[Any]:
    servers: list[Canned] = []

    def make(status: int, code: str) -> Canned:
        servers.append(Canned(status, code))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.mark.parametrize(
    ("status", "code", "hint"),
    [
        (403, "AccessDenied", "check the access key and secret"),
        (403, "InvalidAccessKeyId", "check access_key"),
        (403, "SignatureDoesNotMatch", "check secret_key"),
        (400, "ExpiredToken", "refresh it"),
    ],
)
def test_refused_credentials_are_permission_errors_not_retried(
    remote: str, canned: Any, status: int, code: str, hint: str
) -> None:
    server = canned(status, code)
    url = remote_url(remote, server.endpoint, server.port, prefix="p")
    with open_backend(url, access_key="AKIAWRONG", secret_key=SECRET, session_token=TOKEN, **FAST) as b:
        for call in (lambda: b.get("k"), lambda: b.put("k", b"v"), lambda: list(b.list())):
            with pytest.raises(PermissionDeniedError) as info:
                call()
            message = str(info.value)
            assert hint in message and code in message and "credentials from options" in message
            assert SECRET not in message and TOKEN not in message
            assert info.value.__cause__ is not None  # chained to the SDK's error
    # one request per call plus at most one bucket probe: never retried
    assert len(server.requests) <= 6


@pytest.mark.parametrize(
    ("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests")]
)
def test_throttling_and_5xx_are_retried_then_unavailable(
    remote: str, canned: Any, status: int, code: str
) -> None:
    server = canned(status, code)
    url = remote_url(remote, server.endpoint, server.port, prefix="p")
    with open_backend(url, **s3_credentials(), **FAST) as b:
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError, match="failed after 3 attempts") as info:
            b.get("k")
        assert time.monotonic() - started < 5
        assert code in str(info.value)
    assert len(server.requests) == 3  # max_retries=2: three attempts, no hidden SDK retries


def test_anonymous_sends_no_signature(remote: str, canned: Any) -> None:
    server = canned(404, "NoSuchKey")
    url = remote_url(remote, server.endpoint, server.port, prefix="p")
    with open_backend(url, anonymous=True, **FAST) as b, pytest.raises(NotFoundError):
        b.get("k")
    with open_backend(url, **s3_credentials(), **FAST) as b, pytest.raises(NotFoundError):
        b.get("k")
    unsigned, signed = server.requests[0][2], server.requests[-1][2]
    assert "Authorization" not in unsigned
    assert signed["Authorization"].startswith("AWS4-HMAC-SHA256")


def test_small_puts_skip_the_100_continue_round_trip(canned: Any) -> None:
    server = canned(412, "PreconditionFailed")
    with open_backend(
        remote_url("s3", server.endpoint, server.port, prefix="p"), **s3_credentials(), **FAST
    ) as b:
        for body in (b"small", os.urandom(2 * 1024 * 1024)):
            with pytest.raises(AlreadyExistsError):
                b.put("k", body, mode="create")
    small, large = (headers for method, _, headers in server.requests if method == "PUT")
    assert "Expect" not in small and small["If-None-Match"] == "*"
    assert large["Expect"] == "100-continue"


def test_unreachable_endpoint_fails_fast(remote: str) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = remote_url(remote, f"http://127.0.0.1:{port}", port, prefix="p")
    with open_backend(url, **s3_credentials(), **FAST, retry_deadline=3) as b:
        started = time.monotonic()
        for call in (lambda: b.get("k"), lambda: b.put("k", b"v"), lambda: b.delete_many(["a", "b"])):
            with pytest.raises(BackendUnavailableError, match="check that the endpoint is up") as info:
                call()
            assert isinstance(info.value, ConnectionError) and info.value.__cause__ is not None
        assert time.monotonic() - started < 5


def test_frozen_server_times_out_within_deadline(s3_server: LocalS3Server, remote: str) -> None:
    url = remote_url(remote, s3_server.endpoint, s3_server.s3_port)
    with open_backend(url, **s3_credentials()) as writer:
        writer.put("k", b"v")
    with open_backend(url, **s3_credentials(), **FAST, read_timeout=0.5, retry_deadline=2) as b:
        assert b.get("k") == b"v"
        s3_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                b.get("k")
            assert time.monotonic() - started < 5
        finally:
            s3_server.resume()
        assert b.get("k") == b"v"  # and the driver recovers


# -- real server behaviour ------------------------------------------------------------------


def test_missing_bucket_is_not_found_with_hint(s3_server: LocalS3Server, remote: str) -> None:
    url = remote_url(remote, s3_server.endpoint, s3_server.s3_port, bucket="never-created-bucket")
    with open_backend(url, **s3_credentials(), **FAST) as b:
        for call in (lambda: b.get("k"), lambda: b.put("k", b"v"), lambda: list(b.list()),
                     lambda: b.delete_many(["k"])):  # fmt: skip
            with pytest.raises(NotFoundError, match="bucket 'never-created-bucket' does not exist") as info:
                call()
            assert "create the bucket" in str(info.value)


def test_missing_object_message_names_object_and_store(store: Backend) -> None:
    with pytest.raises(NotFoundError) as info:
        store.get("no/such/thing")
    assert "'no/such/thing'" in str(info.value) and store.display_url in str(info.value)
    assert info.value.__cause__ is not None


def test_large_conditional_writes_use_multipart_and_stay_atomic(
    s3_server: LocalS3Server, remote: str
) -> None:
    url = remote_url(remote, s3_server.endpoint, s3_server.s3_port)
    mib = 1024 * 1024
    with open_backend(url, **s3_credentials(), multipart_threshold=5 * mib) as b:
        first = os.urandom(11 * mib + 7)
        meta = b.put("big", io.BytesIO(first), mode="create")
        assert meta.etag.endswith("-3") and meta.size == len(first)  # three parts
        with pytest.raises(AlreadyExistsError):
            b.put("big", io.BytesIO(os.urandom(6 * mib)), mode="create")
        with pytest.raises(PreconditionFailedError):
            b.put("big", memoryview(os.urandom(6 * mib)), mode=IfMatch("0" * 32 + "-2"))
        assert b.get("big") == first
        second = os.urandom(6 * mib)
        updated = b.put("big", bytearray(second), mode=IfMatch(meta.etag))
        assert b.head("big").etag == updated.etag and b.get("big") == second
        assert list(b.list("big-upload")) == []  # failed uploads were aborted, nothing left over


class _Trickle(io.RawIOBase):
    """A file object that returns at most 1 MiB per read, as sockets and pipes may."""

    def __init__(self, data: bytes) -> None:
        self._inner = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._inner.read(min(n, 1 << 20) if n >= 0 else 1 << 20)


@pytest.mark.parametrize("threshold_mib", [5, 8, 20, 32])
@pytest.mark.parametrize("extra", [-1, 0, 1, 9 * 1024 * 1024 + 3])
def test_split_upload_parts_are_full_but_the_last(threshold_mib: int, extra: int) -> None:
    mib = 1024 * 1024
    threshold = threshold_mib * mib
    data = os.urandom(threshold + extra)
    for source in (memoryview(data), io.BytesIO(data), _Trickle(data)):
        body, parts = split_upload(source, threshold)  # type: ignore[arg-type]
        if len(data) <= threshold:
            assert body == data and list(parts) == []
            continue
        assert body is None
        chunks = list(parts)
        assert b"".join(chunks) == data
        base = min(threshold, PART_BYTES)
        assert all(len(c) == base for c in chunks[:-1]) and 0 < len(chunks[-1]) <= base


def test_sorted_listing_with_tricky_names(store: Backend) -> None:
    names = ["a", "a-b", "a/b", "a/b-c", "a/b/c", "a.b/x", "a0", "a/b.c/d", "b", "a!", "a/b/c/d/e"]
    for n in names:
        store.put(n, b"x")
    assert [m.name for m in store.list()] == sorted(names)
    assert [m.name for m in store.list("a/b")] == sorted(n for n in names if n.startswith("a/b"))
    assert [m.name for m in store.list("a/b/")] == ["a/b/c", "a/b/c/d/e"]


def test_delete_many_runs_batches_concurrently(store: Backend) -> None:
    names = [f"x/{i:05d}" for i in range(2100)]  # three batches
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda n: store.put(n, b"1"), names))
    started = time.monotonic()
    store.delete_many(names)
    assert time.monotonic() - started < 20
    assert list(store.list("x/")) == []


def test_many_range_groups(store: Backend) -> None:
    data = os.urandom(4 * 1024 * 1024)
    store.put("r", data)
    ranges = [(i * 600_000, 1000) for i in range(6)] + [(10, 5), (4 * 1024 * 1024 - 3, 10)]
    assert store.get_ranges("r", ranges) == [data[o : o + n] for o, n in ranges]


# -- secrets --------------------------------------------------------------------------------


def test_secrets_never_shown(
    s3_server: LocalS3Server, remote: str, caplog: pytest.LogCaptureFixture, canned: Any
) -> None:
    url = remote_url(remote, s3_server.endpoint, s3_server.s3_port)
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        with open_backend(url, access_key="AKIAEXAMPLEKEY", secret_key=SECRET, session_token=TOKEN) as b:
            b.put("k", b"v")
            b.get("k")
            list(b.list())
            texts += [repr(b), str(b), b.display_url, repr(b.__dict__)]
            with pytest.raises(NotFoundError) as missing:
                b.get("missing")
            texts += [str(missing.value), repr(missing.value)]
        server = canned(403, "SignatureDoesNotMatch")
        bad = remote_url(remote, server.endpoint, server.port, prefix="p")
        with open_backend(
            bad, access_key="AKIAEXAMPLEKEY", secret_key=SECRET, session_token=TOKEN, **FAST
        ) as b:
            with pytest.raises(PermissionDeniedError) as denied:
                b.put("k", b"v")
            texts += [str(denied.value), repr(denied.value), str(denied.value.__cause__)]
    texts.append(caplog.text)
    assert len(caplog.text) > 0
    for text in texts:
        assert SECRET not in text and TOKEN not in text


# -- credentials wiring ---------------------------------------------------------------------


def test_no_credentials_anywhere_is_a_clear_error(
    remote: str, s3_server: LocalS3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in list(os.environ):
        if name.startswith(("AWS_", "MINIO_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "1")
    if remote == "minio":  # minio's chain would try the EC2 metadata address otherwise; this is refused
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:1/creds")
    monkeypatch.setenv("HOME", str(tmp_path))
    url = remote_url(remote, s3_server.endpoint, s3_server.s3_port)
    with open_backend(url, **FAST) as b:
        started = time.monotonic()
        with pytest.raises(PermissionDeniedError, match="no credentials found"):
            b.get("k")
        assert time.monotonic() - started < 10


def test_web_identity_wiring_without_network(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("header.payload.signature")
    options = {
        "role_arn": "arn:aws:iam::123456789012:role/piecestore",
        "web_identity_token_file": str(token_file),
    }
    with open_backend("s3://bucket/p?region=eu-west-1", **options) as b:
        assert isinstance(b, S3Backend)
        resolver = b._fs.session.get_component("credential_provider")
        first = resolver.providers[0]
        assert first.METHOD == "assume-role-with-web-identity"
        creds = b._loop.run(first.load())  # deferred: no STS call until a request is signed
        assert creds is not None and creds.method == "assume-role-with-web-identity"
    with open_backend("minio://s3.eu-west-1.amazonaws.com/bucket/p?region=eu-west-1", **options) as m:
        provider = m._client._provider  # type: ignore[attr-defined]
        assert type(provider).__name__ == "WebIdentityProvider"
        assert provider._sts_endpoint == "https://sts.eu-west-1.amazonaws.com"
        assert provider._jwt_provider_func() == {"access_token": "header.payload.signature"}


# -- error classification, directly ---------------------------------------------------------

CTX = ErrorContext("put", "obj", "s3://b/p", "b", "options", create=True)


def botocore_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    response = {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}
    return ClientError(response, "PutObject")  # type: ignore[arg-type]


def minio_error(status: int, code: str) -> Exception:
    from minio.error import S3Error
    from urllib3 import HTTPResponse

    return S3Error(HTTPResponse(status=status), code, "m", "/b/p/obj", "r", "h", "b", "p/obj")


@pytest.mark.parametrize("make", [botocore_error, minio_error])
@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (404, "NoSuchKey", NotFoundError),
        (404, "NoSuchBucket", BucketNotFoundError),
        (403, "AccessDenied", PermissionDeniedError),
        (403, "InvalidAccessKeyId", PermissionDeniedError),
        (403, "SignatureDoesNotMatch", PermissionDeniedError),
        (400, "ExpiredToken", PermissionDeniedError),
        (412, "PreconditionFailed", AlreadyExistsError),
        (503, "SlowDown", Retryable),
        (503, "ServiceUnavailable", Retryable),
        (500, "InternalError", Retryable),
        (400, "RequestTimeout", Retryable),
        (429, "TooManyRequests", Retryable),
        (502, "BadGateway", Retryable),
        (400, "InvalidArgument", PieceStoreError),
    ],
)
def test_classifier(make: Any, status: int, code: str, expected: type) -> None:
    from piecestore.backends.minio import classify_minio
    from piecestore.backends.s3 import classify_botocore

    error = make(status, code)
    mapped = classify_botocore(error, CTX)[0] if make is botocore_error else classify_minio(error, CTX)
    assert type(mapped) is expected
    if isinstance(mapped, Retryable):
        assert mapped.cause is error
    else:
        assert "'obj'" in str(mapped) or "bucket 'b'" in str(mapped)


def test_classifier_if_match_and_transport_errors() -> None:
    import urllib3.exceptions
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    from piecestore.backends.minio import classify_minio
    from piecestore.backends.s3 import classify_botocore

    ctx = ErrorContext("put", "obj", "s3://b/p", "b", expected_etag="abc")
    assert isinstance(
        classify_botocore(botocore_error(412, "PreconditionFailed"), ctx)[0], PreconditionFailedError
    )
    for e in (EndpointConnectionError(endpoint_url="http://x"), ReadTimeoutError(endpoint_url="http://x")):
        assert isinstance(classify_botocore(e, ctx)[0], Retryable)
    refused = urllib3.exceptions.NewConnectionError(None, "refused")  # type: ignore[arg-type]
    assert isinstance(classify_minio(refused, ctx), Retryable)
    assert isinstance(classify_minio(urllib3.exceptions.ProtocolError("dropped"), ctx), Retryable)


# -- sorted listing over both server orders -------------------------------------------------


@pytest.mark.parametrize("order", ["bytes", "depth-first"])
@pytest.mark.parametrize("page", [1, 2, 1000])
def test_sorted_walk(order: str, page: int) -> None:
    keys = ["a", "a-b", "a/b", "a/b-c", "a/b/c", "a.b/x", "a0", "b", "a/b/c/d/e", "a/b.c/d", "z/z/z", "a!"]

    def level(prefix: str) -> list[str]:
        entries = set()
        for k in keys:
            if k.startswith(prefix):
                rest = k[len(prefix) :]
                entries.add(prefix + rest.split("/", 1)[0] + ("/" if "/" in rest else ""))
        if order == "bytes":
            return sorted(entries)
        return sorted(entries, key=lambda e: e.rstrip("/"))  # a filer: by entry name, dirs inline

    def pages(prefix: str) -> Iterator[tuple[list[tuple[str, str]], list[str]]]:
        entries = level(prefix)
        for i in range(0, max(1, len(entries)), page):
            chunk = entries[i : i + page]
            yield [(e, e) for e in chunk if not e.endswith("/")], [e for e in chunk if e.endswith("/")]

    assert list(sorted_walk(pages, "")) == sorted(keys)
    assert list(sorted_walk(pages, "a/b")) == sorted(k for k in keys if k.startswith("a/b"))


# -- several processes racing a create ------------------------------------------------------


def _race_worker(url: str, options: dict[str, Any], barrier: Any, results: Any, index: int) -> None:
    with open_backend(url, **options) as b:
        barrier.wait(timeout=60)
        try:
            b.put("race/proc", f"process-{index}".encode(), mode="create")
            results.put((index, True))
        except AlreadyExistsError:
            results.put((index, False))
        except Exception as e:  # report, do not hang the parent
            results.put((index, f"{type(e).__name__}: {e}"))


def test_multi_process_create_race_has_one_winner(s3_server: LocalS3Server, remote: str) -> None:
    url = remote_url(remote, s3_server.endpoint, s3_server.s3_port)
    ctx = multiprocessing.get_context("spawn")
    workers = 4
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [
        ctx.Process(target=_race_worker, args=(url, s3_credentials(), barrier, results, i))
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert all(v in (True, False) for v in outcomes.values()), outcomes
    winners = [i for i, won in outcomes.items() if won is True]
    assert len(winners) == 1, outcomes
    with open_backend(url, **s3_credentials()) as b:
        assert b.get("race/proc") == f"process-{winners[0]}".encode()


def test_driver_loop_is_shut_down_on_close(s3_server: LocalS3Server) -> None:
    url = remote_url("s3", s3_server.endpoint, s3_server.s3_port)
    before = set(threading.enumerate())
    b = open_backend(url, **s3_credentials())
    assert isinstance(b, S3Backend)
    b.put("k", b"v")
    b.close()
    b.close()  # idempotent
    assert not b._loop.thread.is_alive() and b._loop.loop.is_closed()
    assert [t.name for t in set(threading.enumerate()) - before if t.is_alive()] == []  # loop and DNS threads
    assert asyncio.iscoroutinefunction(S3Backend._read)
