"""Security: secrets stay secret, stores stay inside their root, TLS is verified by default,
read-only means no write request at all, and server-side credentials scope what a store can do.

Secrets are checked by grepping everything the library and the CLI produced (reprs, log
records at DEBUG from every logger, error messages with their whole cause chain, CLI stdout
and stderr) for the secret values.
"""

from __future__ import annotations

import http.server
import logging
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import piecestore
from piecestore import (
    InvalidKeyError,
    PermissionDeniedError,
    PieceStore,
    PieceStoreError,
    ReadOnlyError,
)
from piecestore.backends import open_backend
from piecestore.settings import load_settings
from tests.conftest import BUCKET
from tests.reliability._support import REPO, open_store, s3_url

SECRET = "Sup3rSecret-value-9f8e7d"
TOKEN = "SessionToken-value-1a2b3c4d"


def everything_about(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.__cause__) + repr(exc.__context__)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def all_logs() -> Iterator[Collect]:
    """Every log record of every logger at DEBUG, formatted (args and exceptions included)."""
    handler = Collect()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in ("botocore", "aiobotocore", "s3fs", "urllib3", "minio", "piecestore", "fsspec"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def assert_hidden(text: str, where: str) -> None:
    for secret in (SECRET, TOKEN):
        assert secret not in text, f"a secret appears in {where}"


@pytest.mark.s3
@pytest.mark.parametrize("scheme", ["s3", "minio"])
def test_secrets_never_in_repr_logs_or_errors(
    scheme: str, s3_iam_server: Any, all_logs: Collect, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = s3_iam_server
    if scheme == "s3":
        url = s3_url(server.endpoint)
        dead = "s3://some-bucket/x?endpoint=http://127.0.0.1:9&region=us-east-1"
    else:
        url = f"minio://127.0.0.1:{server.s3_port}/{BUCKET}/sec-{os.getpid()}?secure=false"
        dead = "minio://127.0.0.1:9/some-bucket/x?secure=false"
    seen: list[str] = []
    quick = {"retry_max_retries": 1, "retry_deadline": 2.0, "s3_connect_timeout": 0.5}
    # 1. a wrong secret (and a session token) against a server that checks: refused
    with pytest.raises(PermissionDeniedError) as refused:
        open_store(url, s3_secret_key=SECRET, s3_session_token=TOKEN, **quick).put("k", b"v")
    seen.append(everything_about(refused.value))
    # 2. an unreachable endpoint: BackendUnavailableError
    with pytest.raises(PieceStoreError) as down:
        open_store(dead, s3_secret_key=SECRET, s3_session_token=TOKEN, **quick)
    seen.append(everything_about(down.value))
    # 3. the right credentials: a store's repr and a full round trip, logged at DEBUG
    with open_store(url) as store:
        store.put("k", b"v")
        assert store.get("k") == b"v"
        seen += [repr(store), str(store), repr(store.settings)]
    # 4. the same secrets from the environment, through settings and the driver
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    settings = load_settings(config_file="", store_url=url)
    seen += [repr(settings), str(settings), str(settings.redacted()), settings.model_dump_json()]
    backend = open_backend(url, secret_key=SECRET, session_token=TOKEN, access_key="someone")
    seen += [repr(backend), str(backend), repr(vars(backend))]
    with pytest.raises(PermissionDeniedError) as env_refused:
        backend.put("k", b"v")
    seen.append(everything_about(env_refused.value))
    backend.close()
    seen += all_logs.lines
    assert len(all_logs.lines) > 10, "DEBUG logging captured nothing: the log check would be empty"
    for i, text in enumerate(seen):
        assert_hidden(text, f"output #{i}: {text[:200]!r}")


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("piecestore", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-c", "from piecestore.cli import main; main()"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PIECESTORE_"))}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(REPO)
    return subprocess.run(cmd + args, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_cli_never_prints_secrets(tmp_path: Path) -> None:
    try:
        import piecestore.cli  # noqa: F401
    except ImportError:
        pytest.skip("the CLI (piecestore/cli.py) is not there yet")
    env = {"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN, "AWS_ACCESS_KEY_ID": "someone",
           "PIECESTORE_S3__SECRET_KEY": SECRET}  # fmt: skip
    dead = "s3://some-bucket/x?endpoint=http://127.0.0.1:9&region=us-east-1"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[s3]\nsecret_key = "{SECRET}"\nsession_token = "{TOKEN}"\n[retry]\nmax_retries = 0\n')
    runs = [
        (["-s", dead, "config", "show"], 0),
        (["-s", dead, "config", "show", "--json"], 0),
        (["-c", str(cfg), "-s", dead, "config", "show"], 0),
        (["-s", dead, "ls"], None),  # an error path: the endpoint is down
        (["--debug", "-s", dead, "ls"], None),  # with a traceback
        (["-c", str(cfg), "-s", dead + "&secret_key=" + SECRET, "ls"], None),  # a secret in the URL
        (["-s", "s3://someone:" + SECRET + "@bucket/x", "config", "show"], -1),
    ]
    for args, code in runs:
        result = run_cli(args, env, tmp_path)
        if code == -1:
            pass  # refused or shown with the password masked: either way, hidden
        elif code is not None:
            assert result.returncode == code, result.stderr
        else:
            assert result.returncode != 0 and result.stderr.strip(), "the error path printed no error"
        assert_hidden(result.stdout + result.stderr, f"`piecestore {' '.join(args)[:80]}`")
    shown = run_cli(["-s", dead, "config", "show"], env, tmp_path).stdout
    assert "***" in shown  # the secret is there, masked


# -- the file driver stays inside its root ---------------------------------------------------


def test_file_names_cannot_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    backend = open_backend(f"file://{root}")
    nasty = ["../escape", "a/../../escape", "/etc/passwd", "a//b", "./a", "a/./b", "..", ".", "a/",
             "x\x00y", "../" * 20 + "etc/passwd"]  # fmt: skip
    for name in nasty:
        with pytest.raises(InvalidKeyError):
            backend.put(name, b"x")
        with pytest.raises(InvalidKeyError):
            backend.get(name)
        with pytest.raises(InvalidKeyError):
            backend.delete(name)
    # names that look like paths but are valid stay inside, escaped
    for name in ["..a", "a..", "...", "a\\..\\..\\b", ".hidden", "%2e%2e/x", "\u2024\u2024/x"]:
        backend.put(name, b"inside")
        assert backend.get(name) == b"inside"
    backend.close()
    # piece keys are never paths: the worst keys are just keys
    with open_store(f"file://{root}") as store:
        keys = ["../../../escape", "/etc/passwd", "..", "a/../../b", "\\..\\x", "~/x", "$HOME/x"]
        store.put_many({k: k.encode() for k in keys})
        assert store.get_many(keys) == {k: k.encode() for k in keys}
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "escape").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "outside",
        "store",
    ]


def test_symlinks_inside_the_root_are_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim%obj").write_bytes(b"do not read me")
    with open_store(f"file://{root}") as store:
        store.put("k", b"v")
    tables = root / "tables"
    shutil.rmtree(tables)
    tables.symlink_to(outside, target_is_directory=True)
    backend = open_backend(f"file://{root}")
    with pytest.raises(PermissionDeniedError, match="symlink"):
        backend.put("tables/new", b"x")
    with pytest.raises(PermissionDeniedError, match="symlink"):
        backend.get("tables/victim")
    assert [m.name for m in backend.list("tables/")] == []
    backend.close()
    assert sorted(p.name for p in outside.iterdir()) == ["victim%obj"]


# -- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate: (endpoint, CA bundle path)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip

    class Handler(http.server.BaseHTTPRequestHandler):
        """Just enough S3 for a store to open and write: every object is missing, every PUT works."""

        def _reply(self, code: int, body: bytes = b"", etag: str | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            if etag:
                self.send_header("ETag", etag)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply(404, b"<Error><Code>NoSuchKey</Code><Message>no</Message></Error>")

        do_HEAD = do_GET

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
            self._reply(200, etag='"0123456789abcdef0123456789abcdef"')

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}", str(cert)
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # tls_verify=False
@pytest.mark.parametrize("scheme", ["s3", "minio"])
def test_tls_is_verified_by_default(scheme: str, tls_server: tuple[str, str]) -> None:
    endpoint, ca = tls_server
    port = endpoint.rsplit(":", 1)[1]
    url = (
        f"s3://tls-bucket/x?endpoint={endpoint}&region=us-east-1"
        if scheme == "s3"
        else f"minio://127.0.0.1:{port}/tls-bucket/x"  # secure (https) is the default
    )
    quick: dict[str, Any] = {"s3_access_key": "a", "s3_secret_key": "b", "retry_max_retries": 1}
    assert load_settings(config_file="").s3.tls_verify is True
    with pytest.raises(PieceStoreError) as info:
        piecestore.open(url, **quick)
    text = everything_about(info.value).lower()
    assert "certificate" in text or "tls" in text or "ssl" in text, str(info.value)
    # verification off (a setting) or the server's CA trusted (a driver option) gets through
    with piecestore.open(url, s3_tls_verify=False, **quick) as store:
        store.put("k", b"v")
    backend = open_backend(url, tls_verify=ca, access_key="a", secret_key="b", max_retries=1)
    try:
        backend.put("k", b"v")
    finally:
        backend.close()


# -- read-only: no write request at all ------------------------------------------------------


PRIMITIVES = ("_put", "_delete", "_delete_many", "_get", "_get_with_meta", "_head", "_list", "_get_groups")


def count_requests(store: PieceStore) -> dict[str, int]:
    calls = dict.fromkeys(PRIMITIVES, 0)
    backend = store.backend
    for name in PRIMITIVES:
        original = getattr(backend, name)

        def counted(*a: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls[_name] += 1
            return _original(*a, **kw)

        setattr(backend, name, counted)
    return calls


WRITES: dict[str, Callable[[PieceStore], Any]] = {
    "put": lambda s: s.put("new", b"v"),
    "put-large": lambda s: s.put("new", os.urandom(3 * 1024 * 1024)),
    "put_many": lambda s: s.put_many({"n1": b"1", "n2": b"2"}),
    "delete": lambda s: s.delete("k"),
    "delete_many": lambda s: s.delete_many(["k", "other"]),
    "gc": lambda s: s.gc(clock=lambda: datetime.now(UTC) + timedelta(days=1)),
}


def check_read_only(store: PieceStore, calls: dict[str, int]) -> None:
    for name, write in WRITES.items():
        before = dict(calls)
        t0 = time.monotonic()
        with pytest.raises(ReadOnlyError, match="read-only"):
            write(store)
        assert time.monotonic() - t0 < 0.5, f"{name} took time: it may have tried the network"
        assert calls == before, f"read-only {name} sent requests: {calls} vs {before}"


@pytest.mark.parametrize("backend", ["memory", "file", pytest.param("s3", marks=pytest.mark.s3)])
def test_read_only_sends_no_write_request(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if backend == "memory":
        url = f"memory://ro-{os.getpid()}"
    elif backend == "file":
        url = f"file://{tmp_path}/s"
    else:
        server = request.getfixturevalue("s3_server")
        url = s3_url(server.endpoint)
    with open_store(url) as s:
        s.put("k", b"v")
    with open_store(url, store_read_only=True) as ro:
        calls = count_requests(ro)
        check_read_only(ro, calls)
        assert ro.get("k") == b"v"
    if backend == "s3":  # and with the server frozen: a write still fails at once
        server = request.getfixturevalue("s3_server")
        with open_store(url, store_read_only=True, engine_refresh_interval_seconds=3600) as ro:
            server.pause()
            try:
                check_read_only(ro, count_requests(ro))
            finally:
                server.resume()
    raw = open_backend(url, read_only=True, **({} if backend != "s3" else _creds()))
    for call in (lambda: raw.put("x", b"v"), lambda: raw.delete("k"), lambda: raw.delete_many(["k"])):
        with pytest.raises(ReadOnlyError):
            call()
    raw.close()


def _creds() -> dict[str, str]:
    from tests.conftest import s3_credentials

    return s3_credentials()


# -- server-side scopes: a read-only identity, a per-prefix identity --------------------------


@pytest.mark.s3
def test_read_only_credentials(s3_iam_server: Any) -> None:
    url = s3_url(s3_iam_server.endpoint)
    with open_store(url) as admin:
        admin.put_many({"a": b"1", "b": b"2"})
    reader = {
        "s3_access_key": "reader-access-key",
        "s3_secret_key": "reader-secret-key-1",
        "retry_max_retries": 1,
    }
    with open_store(url, **reader) as s:
        assert s.get_many(["a", "b"]) == {"a": b"1", "b": b"2"}
        assert [p.key for p in s.list()] == ["a", "b"]
        for write in (lambda: s.put("c", b"3"), lambda: s.delete("a")):
            with pytest.raises(PermissionDeniedError, match="refused"):
                write()
    with open_store(url) as admin:
        assert admin.get_many(["a", "b"]) == {"a": b"1", "b": b"2"} and not admin.exists("c")


@pytest.mark.s3
def test_per_prefix_credentials(s3_iam_server: Any) -> None:
    """An identity scoped to team-a/ runs a whole store there and cannot touch team-b/."""
    team_a = {
        "s3_access_key": "team-a-access-key",
        "s3_secret_key": "team-a-secret-key-1",
        "retry_max_retries": 1,
    }
    endpoint = s3_iam_server.endpoint
    own = f"s3://{BUCKET}/team-a/store-{os.getpid()}?endpoint={endpoint}&region=us-east-1"
    other = f"s3://{BUCKET}/team-b/store-{os.getpid()}?endpoint={endpoint}&region=us-east-1"
    with open_store(other) as admin:
        admin.put("theirs", b"secret data")
    with open_store(own, gc_grace_seconds=0, **team_a) as s:
        s.put_many({f"k{i}": os.urandom(100) for i in range(50)})
        s.put("big", os.urandom(2 * 1024 * 1024))
        s.delete("k1")
        assert len(list(s.list())) == 50
        s.gc(clock=lambda: datetime.now(UTC) + timedelta(days=1))
        assert s.fsck().ok
    with pytest.raises(PermissionDeniedError), open_store(other, **team_a) as s:
        s.get("theirs")
    with open_store(other) as admin:
        assert admin.get("theirs") == b"secret data"
