"""Bad input: every kind of wrong argument gets its own error with a useful message, and
nothing is written — not a piece, not a table, not a manifest version.

Keys, values, keys passed as one string, URLs, settings, wrong credentials, missing buckets
and read-only stores, on memory and file (S3 where the server is involved).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import piecestore
from piecestore import (
    BucketNotFoundError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    NotFoundError,
    PermissionDeniedError,
    PieceStore,
    PieceStoreError,
    ReadOnlyError,
)
from piecestore.backends import open_backend
from tests.conftest import s3_credentials
from tests.reliability._support import open_store, s3_url


@pytest.fixture(params=["memory", "file"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PieceStore]:
    url = f"memory://bad-{os.getpid()}-{id(request)}" if request.param == "memory" else f"file://{tmp_path}/s"
    with open_store(url) as s:
        s.put_many({"a": b"1", "b": b"2", "keep": b"3"})
        yield s


def snapshot(store: PieceStore) -> tuple[int, set[str], dict[str, bytes]]:
    store.refresh()
    objects = {m.name for m in store.backend.list()} - {"gc/clock"}
    pieces = {p.key: store.get(p.key) for p in store.list()}
    return store.manifest.version, objects, pieces


def refused(store: PieceStore, error: type[Exception], call: Callable[[], Any], *words: str) -> str:
    """``call`` raises ``error`` naming ``words``, and the store is exactly as before."""
    before = snapshot(store)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{error.__name__} message lacks {word!r}: {message}"
    store.flush()
    assert snapshot(store) == before, "a refused call wrote something"
    return message


BAD_KEYS: list[tuple[Any, str]] = [
    ("", "empty"),
    ("x" * 1025, "1025"),
    ("é" * 513, "1026"),  # 513 characters, 1026 UTF-8 bytes
    ("nul\x00key", "NUL"),
    ("\udcff", "UTF-8"),
    (b"bytes-key", "bytes"),
    (5, "int"),
    (None, "NoneType"),
    (["a"], "list"),
]


@pytest.mark.parametrize(("key", "word"), BAD_KEYS, ids=[w for _, w in BAD_KEYS])
def test_bad_keys(store: PieceStore, key: Any, word: str) -> None:
    refused(store, InvalidKeyError, lambda: store.put(key, b"v"), word)
    refused(store, InvalidKeyError, lambda: store.put_many([("ok-key", b"v"), (key, b"v")]), word)
    refused(store, InvalidKeyError, lambda: store.delete(key), word)
    refused(store, InvalidKeyError, lambda: store.delete_many(["a", key]), word)
    refused(store, InvalidKeyError, lambda: store.get(key), word)
    refused(store, InvalidKeyError, lambda: store.get_many(["a", key]), word)
    refused(store, InvalidKeyError, lambda: store.head(key), word)
    assert not store.exists("ok-key")


def test_a_string_is_not_a_list_of_keys(store: PieceStore) -> None:
    """``delete_many("ab")`` must not delete the pieces "a" and "b"."""
    refused(store, InvalidKeyError, lambda: store.delete_many("ab"), "str")
    refused(store, InvalidKeyError, lambda: store.get_many("ab"), "str")
    refused(store, (InvalidKeyError, InvalidValueError), lambda: store.put_many("ab"))  # type: ignore[arg-type]
    assert store.get_many(["a", "b"]) == {"a": b"1", "b": b"2"}


def test_bad_list_and_range_arguments(store: PieceStore) -> None:
    refused(store, InvalidKeyError, lambda: list(store.list(5)), "str")  # type: ignore[arg-type]
    refused(store, InvalidValueError, lambda: store.get("a", offset=-1), "offset")
    refused(store, InvalidValueError, lambda: store.get("a", length=-2), "length")
    refused(store, InvalidValueError, lambda: store.get("a", offset=1.5), "offset")  # type: ignore[arg-type]
    refused(store, InvalidValueError, lambda: store.get_many(["a"], missing="maybe"), "missing")  # type: ignore[arg-type]


BAD_VALUES: list[tuple[Any, str]] = [
    ("text", "encode"),
    (None, "NoneType"),
    (12, "int"),
    (1.5, "float"),
    ({"a": 1}, "dict"),
    ([b"x"], "list"),
    (object(), "object"),
]


@pytest.mark.parametrize(("value", "word"), BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_bad_values(store: PieceStore, value: Any, word: str) -> None:
    refused(store, InvalidValueError, lambda: store.put("k", value), word)
    refused(store, InvalidValueError, lambda: store.put_many({"ok-key": b"v", "k": value}), word)


def test_text_mode_file_objects_are_refused(store: PieceStore, tmp_path: Path) -> None:
    path = tmp_path / "value.txt"
    path.write_text("hello")
    with open(path) as text:  # text mode: read() returns str
        refused(store, InvalidValueError, lambda: store.put("k", text), "binary")
    refused(store, InvalidValueError, lambda: store.put("k", io.StringIO("abc")), "binary")
    big = io.StringIO("x" * (2 * 1024 * 1024))  # past the small-piece limit: the streamed path
    refused(store, InvalidValueError, lambda: store.put("k", big), "binary")
    with open(path, "rb") as binary:
        store.put("k", binary)
    assert store.get("k") == b"hello"


def test_a_bad_value_does_not_fail_other_writers(store: PieceStore) -> None:
    """Group commit shares batches: one caller's bad value must not fail anyone else's put."""
    errors: list[BaseException] = []

    def good(t: int) -> None:
        for i in range(100):
            try:
                store.put(f"good/{t}/{i}", b"v")
            except BaseException as e:
                errors.append(e)

    threads = [threading.Thread(target=good, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for i in range(100):
        with pytest.raises(InvalidValueError):
            store.put(f"bad/{i}", io.StringIO("text"))
    for th in threads:
        th.join(60)
    assert not errors, errors[:3]
    assert len(list(store.list("good/"))) == 300 and not list(store.list("bad/"))


def test_failing_and_huge_streams(store: PieceStore) -> None:
    class Failing(io.RawIOBase):
        def __init__(self, fail_after: int) -> None:
            self.left = fail_after

        def readable(self) -> bool:
            return True

        def readinto(self, b: Any) -> int:
            if self.left <= 0:
                raise OSError("the source disk failed")
            n = min(len(b), self.left)
            b[:n] = b"z" * n
            self.left -= n
            return n

    for fail_after in (10, 3 * 1024 * 1024):  # inside the first read, and mid-way through a large piece
        before = snapshot(store)
        with pytest.raises((OSError, PieceStoreError), match="source disk failed"):
            store.put("streamed", io.BufferedReader(Failing(fail_after)))
        assert snapshot(store)[0::2] == before[0::2]  # no piece, no commit
    huge = os.urandom(24 * 1024 * 1024)
    info = store.put("huge", io.BytesIO(huge))
    assert info.external and info.size == len(huge)
    assert store.get("huge", offset=len(huge) - 10) == huge[-10:]
    assert store.get("huge") == huge


BAD_URLS: list[tuple[str, str]] = [
    ("", "empty"),
    ("ftp://host/x", "unknown scheme"),
    ("memory://", "needs a name"),
    ("memory://x?a=1", "query"),
    ("file://otherhost/tmp/x", "host"),
    ("file:///tmp/x?fsync=0", "query"),
    ("s3://", "names no bucket"),
    ("s3://Bad_Bucket/x", "bucket name"),
    ("s3://ab/x", "3 to 63"),
    ("s3://bucket/x?endpoint=ftp://h", "endpoint"),
    ("s3://bucket/x?colour=red", "unknown query parameter"),
    ("s3://bucket/x?region=US%20East", "region"),
    ("s3://bucket/a/../b", "prefix"),
    ("s3://AKIAEXAMPLE:topsecret-value@bucket/x", "credentials"),
    ("s3://bucket/x?secret_key=topsecret-value", "credentials"),
    ("minio://bucket-only", "bucket"),
    ("minio://host:0/bucket", "port"),
    ("minio://host:9000/bucket?secure=perhaps", "secure"),
]


@pytest.mark.parametrize(("url", "word"), BAD_URLS, ids=[u or "empty" for u, _ in BAD_URLS])
def test_bad_urls(url: str, word: str) -> None:
    with pytest.raises(ConfigError) as info:
        piecestore.open(url, s3_access_key="k", s3_secret_key="topsecret-value").close()
    message = str(info.value)
    assert word.lower() in message.lower(), message
    assert "topsecret-value" not in message, "the error echoes a secret"


BAD_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"engine_flush_byts": 5}, "flush_byts"),  # a typo: the message suggests the right name
    ({"engine_flush_bytes": "lots"}, "flush_bytes"),
    ({"retry_max_retries": -1}, "max_retries"),
    ({"s3_concurrency": 0}, "concurrency"),
    ({"gc_grace_seconds": -5}, "grace_seconds"),
    ({"engine_table_target_bytes": 10}, "table_target_bytes"),
    ({"store_read_only": "perhaps"}, "read_only"),
]


@pytest.mark.parametrize(("overrides", "word"), BAD_SETTINGS, ids=[w for _, w in BAD_SETTINGS])
def test_bad_settings(tmp_path: Path, overrides: dict[str, Any], word: str) -> None:
    url = f"file://{tmp_path}/s"
    with pytest.raises(ConfigError, match=word):
        piecestore.open(url, **overrides)
    assert not (tmp_path / "s").exists(), "a refused configuration created the store"


def test_bad_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[engine]\nflush_bytes = "a lot"\n')
    with pytest.raises(ConfigError, match="flush_bytes"):
        piecestore.api.open_with_settings(piecestore.settings.load_settings(config_file=cfg))  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="does not exist"):
        piecestore.settings.load_settings(config_file=tmp_path / "missing.toml")  # type: ignore[attr-defined]


def test_file_store_paths(tmp_path: Path) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a directory"):
        piecestore.open(f"file://{a_file}")
    missing = tmp_path / "missing"
    with pytest.raises(NotFoundError, match="does not exist"):
        piecestore.open(f"file://{missing}", store_read_only=True)
    assert not missing.exists(), "a read-only open created the directory"


def test_read_only_store_refuses_every_write(store: PieceStore) -> None:
    with open_store(store.url, store_read_only=True) as ro:
        assert ro.get("a") == b"1"
        refused(store, ReadOnlyError, lambda: ro.put("k", b"v"), "read-only")
        refused(store, ReadOnlyError, lambda: ro.put_many({"k": b"v"}), "read-only")
        refused(store, ReadOnlyError, lambda: ro.delete("a"), "read-only")
        refused(store, ReadOnlyError, lambda: ro.delete_many(["a", "b"]), "read-only")
        refused(store, ReadOnlyError, lambda: ro.gc(), "read-only")

        def in_batch() -> None:
            with ro.batch():
                ro.put("k", b"v")

        refused(store, ReadOnlyError, in_batch, "read-only")


@pytest.mark.s3
def test_missing_bucket(s3_server: Any) -> None:
    """A store in a bucket that does not exist: open says so (not "piece not found" later)."""
    bucket = f"no-such-bucket-{os.getpid()}"
    urls = [
        f"s3://{bucket}/x?endpoint={s3_server.endpoint}&region=us-east-1",
        f"minio://127.0.0.1:{s3_server.s3_port}/{bucket}/x?secure=false",
    ]
    for url in urls:
        for read_only in (False, True):
            with pytest.raises(BucketNotFoundError, match=f"{bucket}.*does not exist.*create the bucket"):
                open_store(url, store_read_only=read_only)
        raw = open_backend(url, **s3_credentials())
        try:
            with pytest.raises(BucketNotFoundError):
                list(raw.list())  # still no bucket: nothing was created
        finally:
            raw.close()


@pytest.mark.s3
def test_wrong_credentials(s3_iam_server: Any) -> None:
    url = s3_url(s3_iam_server.endpoint)
    secret = "not-the-secret-42"
    for access_key in (s3_credentials()["access_key"], "no-such-access-key"):
        with (
            pytest.raises(PermissionDeniedError) as info,
            open_store(url, s3_access_key=access_key, s3_secret_key=secret, retry_max_retries=1) as s,
        ):
            s.put("k", b"v")
        message = str(info.value)
        assert "refused" in message and ("secret" in message or "access key" in message), message
        assert secret not in message
    with open_store(url) as s:  # the right credentials: nothing was written
        assert list(s.list()) == []


def test_errors_are_one_hierarchy(store: PieceStore) -> None:
    """Whatever goes wrong, callers can catch PieceStoreError (and the builtin it also is)."""
    for call in (lambda: store.put("", b""), lambda: store.put("k", "s"), lambda: store.get("nope")):
        with pytest.raises(PieceStoreError):
            call()
    with pytest.raises(ValueError):
        store.put("", b"")
    with pytest.raises(FileNotFoundError):
        store.get("nope")
