"""Durability holes, each made to happen at a chosen instant: two handles on one store stand
for two processes, and a hook runs the other handle's GC at the worst moment.

Each test failed on the code before the fix it covers (the sweep fence, own-name sweeps, exact
stream reads, retry of a missing large-piece object, views bounded by the grace period).
"""

from __future__ import annotations

import contextlib
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import piecestore
from piecestore import ConflictError, InvalidValueError, NotFoundError, PieceStore, PieceStoreError
from piecestore.gc import GarbageCollector
from piecestore.lease import GCBusyError
from piecestore.manifest import BLOBS_PREFIX
from tests.test_store import open_store

SMALL = 4096  # engine.small_piece_max_bytes in these tests: larger pieces get their own object
LEASE = 0.3  # gc.lease_seconds where a test stalls a writer past its session's lease
STALL = 0.45  # longer than LEASE: the writer's session is stale, its young uploads unprotected


@pytest.fixture(params=["memory", "file"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://durability-{os.urandom(6).hex()}"
    return "file://" + str(tmp_path / "store")


def handle(url: str, **overrides: Any) -> PieceStore:
    overrides.setdefault("engine_small_piece_max_bytes", SMALL)
    overrides.setdefault("gc_grace_seconds", 0)
    overrides.setdefault("gc_auto_compact", False)
    return open_store("file" if url.startswith("file") else "memory", url, **overrides)


@pytest.fixture
def pair(url: str) -> Iterator[tuple[PieceStore, PieceStore]]:
    """A writer and another "process" that runs GC with grace 0 and a short lease."""
    with handle(url, gc_lease_seconds=LEASE) as writer, handle(url, gc_lease_seconds=LEASE) as collector:
        yield writer, collector


def blob_objects(store: PieceStore) -> set[str]:
    return {m.name for m in store.backend.list(BLOBS_PREFIX)}


def assert_reads(store: PieceStore, expected: dict[str, bytes]) -> None:
    store.refresh()
    for key, value in expected.items():
        assert store.get(key) == value, key
    assert {p.key for p in store.list()} == set(expected)
    assert store.fsck().ok


class HookedStream(io.RawIOBase):
    """A readable stream that runs ``hook`` once, on its first read (a slow client, say)."""

    def __init__(self, data: bytes, hook: Callable[[], None]) -> None:
        self._data = io.BytesIO(data)
        self._hook: Callable[[], None] | None = hook

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        return self._data.readinto(buf)


# -- 2. a large piece uploaded before its commit is never swept from under it ------------------
def test_put_many_whose_later_stream_lets_gc_sweep_the_earlier_upload(
    pair: tuple[PieceStore, PieceStore],
) -> None:
    writer, collector = pair
    writer.put("old", b"o" * 10)
    big = os.urandom(3 * SMALL)
    swept: list[int] = []

    def other_process_gc() -> None:  # "big"'s object is uploaded, unreferenced: an orphan to GC
        time.sleep(STALL)  # a slow stream: the writer's session goes stale
        swept.append(collector.gc().deleted)

    try:
        writer.put_many({"big": big, "later": HookedStream(os.urandom(2 * SMALL), other_process_gc)})
    except ConflictError as e:
        assert "GC sweep" in str(e)  # refused, with nothing of the call acknowledged
        assert_reads(writer, {"old": b"o" * 10})
    else:  # acknowledged: then every byte must be there
        assert_reads(writer, {"old": b"o" * 10, "big": big})
    assert swept and swept[0] >= 1  # the sweep did delete the upload: the commit had to notice


def test_a_busy_writers_uploads_are_spared_by_a_grace_0_sweep(url: str) -> None:
    """The writer's session is fresh: GC keeps young unreferenced objects, so the put succeeds."""
    with handle(url) as writer, handle(url) as collector:
        big = os.urandom(3 * SMALL)
        reports = []
        later = HookedStream(b"x" * 10, lambda: reports.append(collector.gc()))
        writer.put_many({"big": big, "later": later})
        assert reports[0].deleted == 0 and reports[0].orphaned == 1
        assert "lease, while writers are live" in reports[0].skipped_reasons[0]
        assert_reads(writer, {"big": big, "later": b"x" * 10})
        assert len(blob_objects(writer)) == 1  # not copied: no sweep was announced


def test_buffered_writes_holding_a_large_piece_across_a_sweep(url: str) -> None:
    with handle(url, store_buffered_writes=True, gc_lease_seconds=LEASE) as writer, handle(
        url, gc_lease_seconds=LEASE
    ) as collector:
        big = os.urandom(3 * SMALL)
        writer.put("big", big)
        writer.put("small", b"s")
        time.sleep(STALL)
        assert collector.gc().deleted >= 1  # another process's GC, grace 0, takes the upload
        with pytest.raises(ConflictError, match="GC sweep"):
            writer.flush()  # the buffered puts fail here, with nothing committed
        assert_reads(writer, {})


def test_a_sweep_that_did_not_delete_the_upload_still_forces_new_names(url: str) -> None:
    """Grace 1 s: the sweep (announced for an old orphan) spares our young upload; the commit,
    past half the grace period, copies it to a new name rather than trust it, and succeeds."""
    short = {"gc_grace_seconds": 1, "gc_lease_seconds": LEASE}
    with handle(url, store_buffered_writes=True, **short) as writer, handle(url, **short) as collector:
        stray = BLOBS_PREFIX + "ab" * 16
        writer.backend.put(stray, b"crashed writer's leftover")
        time.sleep(1.1)
        big = os.urandom(3 * SMALL)
        writer.put("big", big)
        time.sleep(0.6)  # past half the grace period
        report = collector.gc()
        assert report.deleted == 1  # the stray, not our upload
        writer.flush()
        assert_reads(writer, {"big": big})
        assert not writer.backend.exists(stray)
        assert len(blob_objects(writer)) == 1  # the copy; the first upload was removed


@pytest.mark.parametrize("stalled", [False, True])
def test_small_pieces_survive_a_sweep_between_upload_and_commit(url: str, stalled: bool) -> None:
    """A table uploaded but not yet committed is an orphan to GC. A busy writer's is spared; a
    stalled writer's is deleted (grace 0), and the commit, seeing the announced sweep, uploads
    the table again under a new name."""
    lease = LEASE if stalled else 60
    writer, collector = handle(url, gc_lease_seconds=lease), handle(url, gc_lease_seconds=lease)
    original = writer.backend.put_parts
    calls = 0

    def upload_then_sweep(name: str, parts: Any, **kw: Any) -> Any:
        nonlocal calls
        meta = original(name, parts, **kw)
        calls += 1
        if calls == 1:
            if stalled:
                time.sleep(STALL)
            assert collector.gc().deleted == (1 if stalled else 0)
        return meta

    with writer, collector:
        writer.backend.put_parts = upload_then_sweep  # type: ignore[method-assign]
        writer.put_many({f"k{i}": b"v%d" % i for i in range(50)})
        assert calls == (2 if stalled else 1)  # uploaded again only if it was swept
        writer.backend.put_parts = original  # type: ignore[method-assign]
        assert_reads(writer, {f"k{i}": b"v%d" % i for i in range(50)})


# -- 3. compaction's outputs carry the same protection ---------------------------------------
@pytest.mark.parametrize("stalled", [False, True])
def test_compaction_outputs_swept_before_the_swap_are_never_committed(url: str, stalled: bool) -> None:
    lease = LEASE if stalled else 60
    writer, collector = handle(url, gc_lease_seconds=lease), handle(url, gc_lease_seconds=lease)
    expected = {}
    for i in range(10):  # ten small tables: background compaction would merge them
        batch = {f"t{i}/{j}": os.urandom(64) for j in range(20)}
        writer.put_many(batch)
        expected.update(batch)
    original = writer.backend.put
    hooked = True

    def sweep_before_the_pending_record(name: str, data: Any, **kw: Any) -> Any:
        nonlocal hooked
        if hooked and name.startswith("gc/pending/"):  # outputs uploaded, swap not yet made
            hooked = False
            if stalled:
                time.sleep(STALL)
            try:  # another process's GC pass, with no compaction of its own
                assert collector.gc(compact=False).deleted == (1 if stalled else 0)
            except GCBusyError:
                pytest.fail("background compaction must not hold the GC lease")
        return original(name, data, **kw)

    with writer, collector:
        writer.backend.put = sweep_before_the_pending_record  # type: ignore[method-assign]
        if stalled:
            with pytest.raises(PieceStoreError, match="changed under the compaction"):
                GarbageCollector(writer).compact_tiered()
        else:
            assert GarbageCollector(writer).compact_tiered().written_tables == 1
        writer.backend.put = original  # type: ignore[method-assign]
        assert not hooked
        assert_reads(writer, expected)


# -- 5. a store nested inside another store's namespace ---------------------------------------
@pytest.mark.parametrize("inner", ["blobs", "tables", "gc/pending"])
def test_gc_never_reaches_into_a_nested_store(url: str, inner: str) -> None:
    inner_url = url.rstrip("/") + "/" + inner
    with handle(url) as outer, handle(inner_url) as nested:
        nested.put_many({f"n{i}": os.urandom(100) for i in range(20)})
        nested.put("n-big", os.urandom(3 * SMALL))
        outer.put("o", b"outer")
        expected = {k: nested.get(k) for k in [f"n{i}" for i in range(20)] + ["n-big"]}
        report = outer.gc()
        assert report.deleted == 0, report
        assert outer.fsck().ok
    with handle(inner_url) as reopened:
        assert_reads(reopened, expected)


# -- 1. streams: read to the end, or refused ----------------------------------------------------
@pytest.mark.parametrize("size", [10_000, 3 * SMALL + 5])
def test_a_pipe_that_returns_short_reads_is_stored_whole(url: str, size: int) -> None:
    data = os.urandom(size)
    r, w = os.pipe()

    def feed() -> None:
        with open(w, "wb", buffering=0) as out:
            for start in range(0, size, 1000):
                out.write(data[start : start + 1000])
                time.sleep(0.002)

    feeder = threading.Thread(target=feed)
    feeder.start()
    with handle(url, engine_small_piece_max_bytes=SMALL if size > 10_000 else 1 << 20) as store:
        with open(r, "rb", buffering=0) as pipe:
            info = store.put("piped", pipe)
        feeder.join()
        assert info.size == size
        assert store.get("piped") == data


def test_a_socket_stream_is_stored_whole(url: str) -> None:
    data = os.urandom(10_000)
    a, b = socket.socketpair()

    def feed() -> None:
        for start in range(0, len(data), 3000):
            a.sendall(data[start : start + 3000])
            time.sleep(0.005)
        a.close()

    feeder = threading.Thread(target=feed)
    feeder.start()
    with handle(url) as store, b, b.makefile("rb", buffering=0) as stream:
        assert store.put("sock", stream).size == len(data)
        feeder.join()
        assert store.get("sock") == data


def test_unreadable_streams_are_refused_and_nothing_is_written(url: str, tmp_path: Path) -> None:
    with handle(url) as store:
        with open(tmp_path / "out", "wb") as wfile, pytest.raises(InvalidValueError, match="not readable"):
            store.put("w", wfile)
        with open(tmp_path / "out", "w") as text, pytest.raises(InvalidValueError, match="binary"):
            store.put("t", text)  # type: ignore[arg-type]

        class NonBlocking(io.RawIOBase):
            def readable(self) -> bool:
                return True

            def readinto(self, buf: Any) -> int | None:
                return None  # what a non-blocking pipe says when it has nothing yet

        with pytest.raises(InvalidValueError, match="non-blocking"):
            store.put("nb", NonBlocking())
        assert list(store.list()) == [] and not blob_objects(store)


def test_put_many_refused_midway_leaves_no_object_behind(url: str) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buf: Any) -> int:
            raise OSError("connection reset")

    with handle(url) as store:
        with pytest.raises(OSError, match="reset"):
            store.put_many({"big": os.urandom(3 * SMALL), "bad": Broken()})
        assert list(store.list()) == [] and not blob_objects(store)


# -- readers whose view is older than the grace period ----------------------------------------
def test_an_old_view_reads_a_large_piece_whose_object_was_reclaimed(url: str, tmp_path: Path) -> None:
    """The reader's view (and its disk cache of the table's record) outlives the other handle's
    grace period: the missing object makes it refresh and find the new record."""
    with handle(url) as writer, handle(
        url, engine_refresh_interval_seconds=3600, gc_grace_seconds=3600, cache_disk_dir=str(tmp_path / "c")
    ) as reader:
        first, second = os.urandom(3 * SMALL), os.urandom(3 * SMALL)
        writer.put("big", first)
        reader.refresh()
        assert reader.get("big") == first
        writer.put("big", second)
        assert writer.gc().deleted >= 1  # grace 0: the tables it replaced and the first object go
        assert reader.get("big") == second  # not CorruptionError: the view is refreshed


def test_a_cached_value_does_not_outlive_a_view_older_than_the_grace_period(url: str, tmp_path: Path) -> None:
    with handle(url) as writer, handle(
        url, engine_refresh_interval_seconds=3600, cache_disk_dir=str(tmp_path / "cache")
    ) as reader:
        writer.put_many({"k": b"value", "other": b"x"})
        assert reader.get("k") == b"value"  # now in the reader's caches
        writer.delete("k")
        writer.gc()
        with pytest.raises(NotFoundError):
            reader.get("k")


def test_a_table_removed_between_manifest_read_and_index_load(url: str) -> None:
    old_view = {"engine_refresh_interval_seconds": 3600, "gc_grace_seconds": 3600}
    with handle(url) as writer, handle(url, **old_view) as reader:
        for i in range(3):
            writer.put_many({f"k{i}": b"v%d" % i})
        stale = writer.manifests.read()  # lists the three tables
        writer.gc()  # merges them and, grace 0, deletes them
        real = reader.manifests.read
        views = iter([stale])
        reader.manifests.read = lambda: next(views, None) or real()  # type: ignore[method-assign]
        reader.refresh()
        assert reader.get_many(["k0", "k1", "k2"]) == {"k0": b"v0", "k1": b"v1", "k2": b"v2"}


def test_concurrent_loop_of_gc_and_large_puts_loses_nothing_acknowledged(url: str) -> None:
    """Threads of two handles, as a quick in-process version of the multi-process test."""
    acked: dict[str, bytes] = {}
    failed = 0
    stop = threading.Event()
    lock = threading.Lock()

    def collect(store: PieceStore) -> None:
        while not stop.is_set():
            with contextlib.suppress(GCBusyError):
                store.gc()

    def write(store: PieceStore, name: str) -> None:
        nonlocal failed
        for i in range(40):
            value = os.urandom(SMALL + 1 + i)
            try:
                store.put(f"{name}/{i}", value)
            except ConflictError:
                with lock:
                    failed += 1
                continue
            with lock:
                acked[f"{name}/{i}"] = value

    with handle(url) as a, handle(url) as b, handle(url) as c:
        gc_thread = threading.Thread(target=collect, args=(c,))
        gc_thread.start()
        writers = [threading.Thread(target=write, args=(s, n)) for s, n in ((a, "a"), (b, "b"))]
        for t in writers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        gc_thread.join()
        assert failed <= 40, failed
        with piecestore.open(url) as check:
            assert_reads(check, acked)


@pytest.mark.parametrize("grace", [1e15, float("inf"), float("nan")])
def test_a_grace_period_too_large_to_be_a_date_is_refused_at_open(grace: float) -> None:
    with pytest.raises(piecestore.ConfigError, match="grace_seconds"):
        piecestore.open("memory://huge-grace", gc_grace_seconds=grace)


def test_a_listing_that_outlives_the_grace_period_keeps_going(url: str) -> None:
    """A lazy listing (and one begun on an old view) whose tables GC deletes meanwhile: it
    finishes, reporting what the newest view holds, instead of raising NotFoundError."""
    old_view = {"engine_refresh_interval_seconds": 3600, "gc_grace_seconds": 3600}
    with handle(url) as writer, handle(url, **old_view) as reader:
        writer.put_many({f"big{i}": os.urandom(2 * SMALL) for i in range(5)})
        reader.refresh()
        listing = reader.list()
        assert next(listing).key == "big0"
        newer = {f"big{i}": os.urandom(3 * SMALL) for i in range(5)}
        writer.put_many(newer)
        writer.gc()  # grace 0: the first table and objects are gone
        assert [(p.key, p.size) for p in listing] == [(k, len(newer[k])) for k in sorted(newer)[1:]]
        # a listing begun on the old view: its key blocks are gone too
        assert {p.key: p.size for p in reader.list()} == {k: len(v) for k, v in newer.items()}
