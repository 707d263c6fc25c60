"""One conformance suite, run against every driver on real storage."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from piecestore.backends import Backend, IfMatch, open_backend
from piecestore.errors import (
    AlreadyExistsError,
    InvalidKeyError,
    InvalidValueError,
    NotFoundError,
    PreconditionFailedError,
    ReadOnlyError,
)
from tests.conftest import driver_options


@pytest.fixture
def backend(driver: str, store_url: str) -> Iterator[Backend]:
    with open_backend(store_url, **driver_options(driver)) as b:
        yield b


def test_put_get_head_roundtrip(backend: Backend) -> None:
    meta = backend.put("a/b/c.bin", b"hello world")
    assert meta.name == "a/b/c.bin" and meta.size == 11 and meta.etag
    assert backend.get("a/b/c.bin") == b"hello world"
    head = backend.head("a/b/c.bin")
    assert head.size == 11 and head.etag == meta.etag
    assert isinstance(head.last_modified, datetime) and head.last_modified.tzinfo is not None
    assert backend.exists("a/b/c.bin") and not backend.exists("a/b/nope")


def test_empty_object(backend: Backend) -> None:
    backend.put("empty", b"")
    assert backend.get("empty") == b""
    assert backend.head("empty").size == 0
    assert backend.get_ranges("empty", [(0, 0)]) == [b""]


def test_not_found_behaviour(backend: Backend) -> None:
    for call in (lambda: backend.get("missing"), lambda: backend.head("missing"),
                 lambda: backend.get("missing", offset=1, length=0)):  # fmt: skip
        with pytest.raises(NotFoundError) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert "missing" in str(info.value)


def test_put_parts_writes_their_join(backend: Backend) -> None:
    """A file made of many buffers (more than one writev takes) reads back as their join."""
    parts = [os.urandom(i % 7) for i in range(3000)] + [bytearray(b"tail"), memoryview(b"-end")]
    meta = backend.put_parts("p/obj", parts)
    joined = b"".join(parts)
    assert backend.get("p/obj") == joined and meta.size == len(joined)
    backend.put_parts("p/empty", [])
    assert backend.get("p/empty") == b""
    backend.put_parts("p/c", [b"a", b"b"], mode="create")
    with pytest.raises(AlreadyExistsError):
        backend.put_parts("p/c", [b"x"], mode="create")
    with pytest.raises(PreconditionFailedError):
        backend.put_parts("p/c", [b"x"], mode=IfMatch("not-the-etag"))
    backend.put_parts("p/gen", (p for p in [b"from ", b"a generator"]))
    assert backend.get("p/gen") == b"from a generator"
    for bad in (b"bytes", b"", "str", [b"ok", "not bytes"], [b"ok", 3]):
        with pytest.raises(InvalidValueError, match="sequence of bytes-like"):
            backend.put_parts("p/bad", bad)  # type: ignore[arg-type]
    assert backend.get("p/c") == b"ab" and not backend.exists("p/bad")


def test_ranges(backend: Backend) -> None:
    data = bytes(range(256)) * 64
    backend.put("r", data)
    assert backend.get("r", offset=10, length=20) == data[10:30]
    assert backend.get("r", offset=100) == data[100:]
    assert backend.get("r", offset=len(data) - 5, length=100) == data[-5:]  # past the end: clipped
    assert backend.get("r", offset=len(data) + 10, length=5) == b""
    ranges = [(0, 10), (5000, 100), (20, 30), (16000, 384), (16383, 1)]
    assert backend.get_ranges("r", ranges) == [data[o : o + n] for o, n in ranges]


def test_overwrite_changes_etag(backend: Backend) -> None:
    first = backend.put("o", b"one")
    second = backend.put("o", b"two")
    assert backend.get("o") == b"two" and first.etag != second.etag


def test_create_mode(backend: Backend) -> None:
    backend.put("c", b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        backend.put("c", b"second", mode="create")
    assert backend.get("c") == b"first"


def test_if_match(backend: Backend) -> None:
    meta = backend.put("m", b"v1")
    updated = backend.put("m", b"v2", mode=IfMatch(meta.etag))
    with pytest.raises(PreconditionFailedError):
        backend.put("m", b"v3", mode=IfMatch(meta.etag))
    assert backend.get("m") == b"v2"
    backend.put("m", b"v4", mode=IfMatch(updated.etag))
    with pytest.raises((PreconditionFailedError, NotFoundError)):
        backend.put("never-written", b"x", mode=IfMatch(meta.etag))
    assert not backend.exists("never-written")


def test_list_sorted_prefix_and_pagination(backend: Backend) -> None:
    names = [f"p/{i:04d}" for i in range(1205)] + ["q/x", "p-sibling"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: backend.put(n, n.encode()), names))
    listed = [m.name for m in backend.list("p/")]
    assert listed == sorted(n for n in names if n.startswith("p/"))
    assert [m.name for m in backend.list("q")] == ["q/x"]
    everything = [m.name for m in backend.list()]
    assert everything == sorted(names)
    assert next(iter(backend.list("p/0001"))).size == len(b"p/0001")


def test_delete_idempotent_and_batch(backend: Backend) -> None:
    names = [f"d/{i}" for i in range(1500)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: backend.put(n, b"x"), names))
    backend.delete("d/0")
    backend.delete("d/0")
    backend.delete("never/there")
    backend.delete_many([*names, "also/missing"])
    assert list(backend.list("d/")) == []


def test_special_character_names(backend: Backend) -> None:
    names = ["sp ace", "ünïcödé/ключ", "q?x=1&y#z", "plus+sign", "per%cent", "emoji-\U0001f600", "tab\tname"]
    for n in names:
        backend.put(n, n.encode())
    for n in names:
        assert backend.get(n) == n.encode()
    assert sorted(m.name for m in backend.list()) == sorted(names)


@pytest.mark.parametrize(
    "name",
    ["", "/abs", "a/../b", "..", "a//b", "trail/", "nul\x00x", "x" * 1025, "bad\udcff", 7, None, b"bytes"],
)
def test_bad_names_rejected_and_nothing_written(backend: Backend, name: object) -> None:
    with pytest.raises(InvalidKeyError):
        backend.put(name, b"x")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        backend.get(name)  # type: ignore[arg-type]
    assert list(backend.list()) == []


@pytest.mark.parametrize("value", ["text", None, 42, ["a"]])
def test_bad_values_rejected(backend: Backend, value: object) -> None:
    with pytest.raises(InvalidValueError):
        backend.put("v", value)  # type: ignore[arg-type]
    assert not backend.exists("v")


def test_streaming_put_and_chunks(backend: Backend) -> None:
    size = 12 * 1024 * 1024 + 123  # above every driver's multipart threshold in tests
    data = os.urandom(size)
    meta = backend.put("big", io.BytesIO(data))
    assert meta.size == size
    assert backend.head("big").size == size
    chunks = list(backend.iter_chunks("big", chunk_bytes=5 * 1024 * 1024))
    assert len(chunks) == 3 and b"".join(chunks) == data


def test_capabilities(backend: Backend) -> None:
    caps = backend.capabilities
    assert caps.conditional_create and caps.conditional_match and caps.ranged_get


def test_read_only_refuses_writes(driver: str, store_url: str) -> None:
    with open_backend(store_url, **driver_options(driver)) as rw:
        rw.put("keep", b"1")
    with open_backend(store_url, read_only=True, **driver_options(driver)) as ro:
        assert ro.get("keep") == b"1"
        for call in (lambda: ro.put("x", b"1"), lambda: ro.delete("keep"), lambda: ro.delete_many(["keep"])):
            with pytest.raises(ReadOnlyError):
                call()
        assert ro.get("keep") == b"1" and not ro.exists("x")


def test_create_race_exactly_one_winner(backend: Backend) -> None:
    def attempt(i: int) -> bool:
        try:
            backend.put("race/create", f"writer-{i}".encode(), mode="create")
            return True
        except AlreadyExistsError:
            return False

    with ThreadPoolExecutor(16) as pool:
        wins = list(pool.map(attempt, range(32)))
    assert sum(wins) == 1
    winner = wins.index(True)
    assert backend.get("race/create") == f"writer-{winner}".encode()


def test_if_match_race_exactly_one_winner(backend: Backend) -> None:
    base = backend.put("race/match", b"base")

    def attempt(i: int) -> bool:
        try:
            backend.put("race/match", f"writer-{i}".encode(), mode=IfMatch(base.etag))
            return True
        except PreconditionFailedError:
            return False

    with ThreadPoolExecutor(16) as pool:
        wins = list(pool.map(attempt, range(32)))
    assert sum(wins) == 1
    assert backend.get("race/match") == f"writer-{wins.index(True)}".encode()


def test_prefix_isolates_stores(driver: str, store_url: str) -> None:
    if driver == "file":
        pytest.skip("a file store is its own directory")
    sep = "&" if "?" in store_url else ""
    base, _, query = store_url.partition("?")
    a_url = f"{base}/one" + (f"?{query}" if query else "") + sep * 0
    b_url = f"{base}/two" + (f"?{query}" if query else "")
    with (
        open_backend(a_url, **driver_options(driver)) as a,
        open_backend(b_url, **driver_options(driver)) as b,
    ):
        a.put("k", b"a")
        b.put("k", b"b")
        assert a.get("k") == b"a" and b.get("k") == b"b"
        assert [m.name for m in a.list()] == ["k"]


def test_get_with_meta_pairs_bytes_and_etag(backend: Backend) -> None:
    first = backend.put("gm", b"one")
    data, meta = backend.get_with_meta("gm")
    assert data == b"one" and meta.etag == first.etag and meta.size == 3
    second = backend.put("gm", b"two!")
    data, meta = backend.get_with_meta("gm")
    assert data == b"two!" and meta.etag == second.etag
    with pytest.raises(NotFoundError):
        backend.get_with_meta("gm-missing")


def test_parent_prefix_lists_child_names(driver: str, store_url: str) -> None:
    if driver == "file":
        pytest.skip("a file store is its own directory")
    base, _, query = store_url.partition("?")
    child = f"{base}/child" + (f"?{query}" if query else "")
    with (
        open_backend(child, **driver_options(driver)) as c,
        open_backend(store_url, **driver_options(driver)) as p,
    ):
        c.put("obj", b"1")
        assert [m.name for m in p.list()] == ["child/obj"]
        assert p.head("child/obj").name == "child/obj" and c.head("obj").name == "obj"
