"""The piece engine's public API, the same tests on all four drivers."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import piecestore
from piecestore import (
    InvalidKeyError,
    InvalidValueError,
    NotFoundError,
    PieceStore,
    ReadOnlyError,
)
from tests.conftest import s3_credentials


def open_store(driver: str, url: str, **overrides: Any) -> PieceStore:
    if driver in ("s3", "minio"):
        creds = s3_credentials()
        overrides.setdefault("s3_access_key", creds["access_key"])
        overrides.setdefault("s3_secret_key", creds["secret_key"])
    overrides.setdefault("engine_flush_linger_ms", 1.0)
    store = piecestore.open(url, **overrides)
    assert isinstance(store, PieceStore)
    return store


@pytest.fixture
def store(driver: str, store_url: str) -> Iterator[PieceStore]:
    with open_store(driver, store_url) as s:
        yield s


def test_put_get_head_exists_delete(store: PieceStore) -> None:
    info = store.put("a/1", b"hello")
    assert info.key == "a/1" and info.size == 5 and info.checksum is not None
    assert store.get("a/1") == b"hello"
    assert store.get("a/1", offset=1, length=3) == b"ell"
    assert store.get("a/1", offset=3) == b"lo"
    head = store.head("a/1")
    assert head.size == 5 and head.checksum == info.checksum and head.table
    assert store.exists("a/1") and not store.exists("a/2")
    store.delete("a/1")
    assert not store.exists("a/1")
    with pytest.raises(NotFoundError):
        store.get("a/1")
    store.delete("a/1")  # idempotent


def test_put_many_get_many(store: PieceStore) -> None:
    items = {f"k/{i:05d}": os.urandom(i % 300) for i in range(2000)}
    store.put_many(items)
    keys = list(items)[::7]
    got = store.get_many(keys)
    assert got == {k: items[k] for k in keys}
    with pytest.raises(NotFoundError, match="missing='skip'"):
        store.get_many(["k/00001", "nope"])
    assert store.get_many(["k/00001", "nope"], missing="skip") == {"k/00001": items["k/00001"]}
    store.put_many([("pair/1", b"x"), ("pair/2", bytearray(b"y"))])
    assert store.get_many(["pair/1", "pair/2"]) == {"pair/1": b"x", "pair/2": b"y"}
    # lists as pairs, non-ASCII keys, views of a caller's buffer that changes afterwards
    buffer = bytearray(b"mv")
    infos = store.put_many([["pair/3", memoryview(buffer)], ("pair/é", b"u"), ("pair/3", b"last")])
    buffer[:] = b"XX"
    assert [i.key for i in infos] == ["pair/3", "pair/é", "pair/3"]
    assert store.get_many(["pair/3", "pair/é"]) == {"pair/3": b"last", "pair/é": b"u"}
    store.put_many([["pair/4", memoryview(buffer)]])
    buffer[:] = b"YY"
    assert store.get("pair/4") == b"XX"


def test_overwrite_newest_wins_across_tables(store: PieceStore) -> None:
    for round_ in range(4):
        store.put_many({f"o/{i}": f"{round_}-{i}".encode() for i in range(50)})
    store.delete_many([f"o/{i}" for i in range(0, 50, 2)])
    expected = {f"o/{i}": f"3-{i}".encode() for i in range(1, 50, 2)}
    assert store.get_many([f"o/{i}" for i in range(50)], missing="skip") == expected
    assert [p.key for p in store.list("o/")] == sorted(expected)


def test_list_sorted_prefix_and_sizes(store: PieceStore) -> None:
    store.put_many({"b/2": b"22", "a/1": b"1", "b/1": b"", "c": b"333"})
    store.put("b/3", b"4444")
    listing = list(store.list("b/"))
    assert [(p.key, p.size) for p in listing] == [("b/1", 0), ("b/2", 2), ("b/3", 4)]
    assert [p.key for p in store.list()] == ["a/1", "b/1", "b/2", "b/3", "c"]
    assert list(store.list("zzz")) == []


def test_large_pieces_are_streamed_and_verified(store: PieceStore) -> None:
    big = os.urandom(3 * 1024 * 1024 + 17)
    info = store.put("big/1", big)
    assert info.external and info.size == len(big)
    assert store.get("big/1") == big
    assert (
        store.get("big/1", offset=1024 * 1024 - 5, length=1024 * 1024 + 10)
        == big[1024 * 1024 - 5 : 2 * 1024 * 1024 + 5]
    )
    store.put("big/2", io.BytesIO(big))
    assert store.get_many(["big/1", "big/2"]) == {"big/1": big, "big/2": big}
    assert store.head("big/2").size == len(big)
    assert [(p.key, p.size) for p in store.list("big/")] == [("big/1", len(big)), ("big/2", len(big))]


def test_reopen_sees_everything(driver: str, store_url: str) -> None:
    with open_store(driver, store_url) as s:
        s.put_many({f"r/{i}": str(i).encode() for i in range(100)})
        s.put("r/x", b"x")
        s.delete("r/5")
    with open_store(driver, store_url) as s:
        assert s.get("r/x") == b"x" and s.get("r/99") == b"99" and not s.exists("r/5")
        assert len(list(s.list("r/"))) == 100


def test_concurrent_puts_share_commits(store: PieceStore) -> None:
    def worker(t: int) -> None:
        for i in range(40):
            store.put(f"t{t}/{i}", f"{t}:{i}".encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(worker, range(16)))
    assert len(list(store.list("t"))) == 16 * 40
    # group commit: far fewer manifest versions than puts
    assert store.manifest.version < 16 * 40
    assert store.get("t7/39") == b"7:39"


def test_two_handles_see_each_other_after_refresh(driver: str, store_url: str) -> None:
    if driver == "memory":
        pass  # named memory stores are shared within a process, so this still applies
    with (
        open_store(driver, store_url) as a,
        open_store(driver, store_url, engine_refresh_interval_seconds=3600) as b,
    ):
        a.put("shared", b"1")
        b.put("other", b"2")  # b rebases on a's commit
        assert b.get("shared") == b"1"
        a.put("later", b"3")
        assert not b.exists("later")
        b.refresh()
        assert b.get("later") == b"3"
        a.refresh()
        assert a.get("other") == b"2"


def test_batch_context_and_buffered_writes(driver: str, store_url: str) -> None:
    with open_store(driver, store_url) as s:
        before = s.manifest.version
        with s.batch():
            for i in range(100):
                s.put(f"b/{i}", b"v")
        assert s.manifest.version <= before + 2
        assert len(list(s.list("b/"))) == 100
    with open_store(driver, store_url, store_buffered_writes=True) as s:
        s.put("buf", b"1")
        assert s.get("buf") == b"1"  # read-your-writes before the flush
        s.flush()
    with open_store(driver, store_url) as s:
        assert s.get("buf") == b"1"


@pytest.mark.parametrize("key", ["", "x" * 1025, "nul\x00", "\udcff", 5, None, b"bytes"])
def test_bad_keys(store: PieceStore, key: Any) -> None:
    with pytest.raises(InvalidKeyError):
        store.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        store.get(key)
    with pytest.raises(InvalidKeyError):
        store.put_many({"ok": b"1", key: b"x"} if isinstance(key, str) else [("ok", b"1"), (key, b"x")])
    assert list(store.list()) == []


@pytest.mark.parametrize("value", ["text", None, 12, 1.5, object()])
def test_bad_values(store: PieceStore, value: Any) -> None:
    with pytest.raises(InvalidValueError):
        store.put("k", value)
    with pytest.raises(InvalidValueError):
        store.put_many({"ok": b"1", "k": value})
    assert list(store.list()) == []


def test_keys_at_the_limits(store: PieceStore) -> None:
    keys = ["x" * 1024, "é" * 512, "\U0001f600", "a b/c?d#e%f", "\n"]
    store.put_many({k: k.encode() for k in keys})
    assert store.get_many(keys) == {k: k.encode() for k in keys}


def test_read_only_store_refuses_writes(driver: str, store_url: str) -> None:
    with open_store(driver, store_url) as s:
        s.put("k", b"v")
    with open_store(driver, store_url, store_read_only=True) as ro:
        assert ro.get("k") == b"v"
        with pytest.raises(ReadOnlyError):
            ro.put("k2", b"v")
        with pytest.raises(ReadOnlyError):
            ro.delete("k")
    with open_store(driver, store_url) as s:
        assert not s.exists("k2") and s.exists("k")


def test_get_many_uses_few_requests(store: PieceStore) -> None:
    if store.backend.capabilities.coalesce_gap == 0:
        pytest.skip("in-memory reads cost no requests, so the driver does not merge them")
    store.put_many({f"g/{i:05d}": os.urandom(100) for i in range(1000)})
    calls = {"n": 0}
    backend = store.backend
    original = backend._get_groups
    lock = threading.Lock()

    def counting(name: str, spans: list[tuple[int, int]]) -> list[bytes]:
        with lock:
            calls["n"] += len(spans)
        return original(name, spans)

    backend._get_groups = counting  # type: ignore[method-assign]
    store.cache = type(store.cache)(0)
    got = store.get_many([f"g/{i:05d}" for i in range(0, 1000, 3)])
    assert len(got) == 334
    assert calls["n"] <= 5


def test_failed_buffered_flush_is_reported_by_flush(tmp_path: Any) -> None:
    from piecestore import BackendUnavailableError

    with piecestore.open(f"file://{tmp_path}", store_buffered_writes=True) as s:
        original = s.backend._put

        def failing_put(name: str, data: Any, mode: Any) -> Any:
            if name.startswith("tables/"):
                raise BackendUnavailableError("simulated outage")
            return original(name, data, mode)

        s.backend._put = failing_put  # type: ignore[method-assign]
        s.put("lost", b"1")
        s._committer._open.urgent = True  # let the flusher try now, with nobody waiting
        with pytest.raises(BackendUnavailableError):
            for _ in range(100):
                s.flush()
        s.backend._put = original  # type: ignore[method-assign]
        s.put("kept", b"2")
        s.flush()
        assert s.get("kept") == b"2"


def test_backend_without_conditional_writes_is_refused_for_writing() -> None:
    import dataclasses

    from piecestore import UnsupportedError
    from piecestore.backends.memory import MemoryBackend
    from piecestore.settings import load_settings

    class NoCAS(MemoryBackend):
        @property
        def capabilities(self) -> Any:
            return dataclasses.replace(
                super().capabilities, conditional_create=False, conditional_match=False
            )

    backend = NoCAS("nocas-test")
    backend.put("tables/x", b"untouched")
    with PieceStore(backend, load_settings()) as s:
        with pytest.raises(UnsupportedError, match="conditional writes"):
            s.put("k", b"v")
        with pytest.raises(UnsupportedError):
            s.delete("k")
        assert list(s.list()) == []  # reads still work
    assert [m.name for m in backend.list()] == ["tables/x"]  # nothing was written


def test_keys_whose_64_bit_hashes_collide(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A newer table holding another key of the same hash must not hide (or be returned for) a key."""
    import piecestore.store as store_mod
    import piecestore.table as table_mod

    real = table_mod.key_hash

    def colliding(key: str) -> int:
        return 4242 if key.startswith("c/") else real(key)

    monkeypatch.setattr(table_mod, "key_hash", colliding)
    monkeypatch.setattr(store_mod, "key_hash", colliding)
    with piecestore.open(f"file://{tmp_path}", gc_auto_compact=False) as s:
        s.put("c/old", b"old table")
        s.put_many({"c/new": b"new table", "c/twin": b"same table"})
        assert len(s.manifest.tables) == 2
        for _ in range(2):  # the second round reads through the piece cache
            assert s.get("c/old") == b"old table"
            assert s.get("c/new") == b"new table" and s.get("c/twin") == b"same table"
            assert s.get_many(["c/twin", "c/old", "c/new"]) == {
                "c/old": b"old table", "c/new": b"new table", "c/twin": b"same table"
            }
        with pytest.raises(NotFoundError):
            s.get("c/absent")
        assert s.get_many(["c/absent", "c/old"], missing="skip") == {"c/old": b"old table"}
        assert not s.exists("c/absent")
        s.delete("c/old")
        assert s.get_many(["c/old", "c/new"], missing="skip") == {"c/new": b"new table"}
        assert [p.key for p in s.list("c/")] == ["c/new", "c/twin"]
