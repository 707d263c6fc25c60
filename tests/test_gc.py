"""GC and compaction: reclaim dead and orphaned data, never a live piece."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import piecestore
from piecestore import CorruptionError, PieceStore
from piecestore.gc import PENDING_PREFIX
from piecestore.lease import LEASE_NAME, GCBusyError, Lease
from piecestore.manifest import BLOBS_PREFIX, TABLES_PREFIX
from piecestore.table import build_table
from tests.test_store import open_store


def later(seconds: float) -> Any:
    """A clock running ``seconds`` ahead of now: how tests let a grace period pass."""
    return lambda: datetime.now(UTC) + timedelta(seconds=seconds)


@pytest.fixture
def store(driver: str, store_url: str) -> Iterator[PieceStore]:
    # Background compaction off: these tests assert exactly what one explicit pass does.
    with open_store(
        driver,
        store_url,
        gc_grace_seconds=60,
        engine_table_target_bytes=2 * 1024 * 1024,
        gc_auto_compact=False,
    ) as s:
        yield s


def table_objects(store: PieceStore) -> set[str]:
    return {m.name for m in store.backend.list(TABLES_PREFIX)}


def test_gc_reclaims_dead_bytes_and_keeps_live(store: PieceStore) -> None:
    n = 2000
    values = {f"k/{i:05d}": os.urandom(200) for i in range(n)}
    for start in range(0, n, 250):  # several tables
        store.put_many({k: values[k] for k in list(values)[start : start + 250]})
    for i in range(0, n, 2):  # overwrite half...
        values[f"k/{i:05d}"] = os.urandom(200)
    store.put_many({f"k/{i:05d}": values[f"k/{i:05d}"] for i in range(0, n, 2)})
    store.delete_many([f"k/{i:05d}" for i in range(1, n, 4)])  # ...and delete a quarter
    for i in range(1, n, 4):
        del values[f"k/{i:05d}"]
    report = store.gc(clock=later(0))
    assert report.before.dead_bytes > 0
    assert report.after.dead_bytes <= 0.05 * report.before.dead_bytes
    assert report.after.live_pieces == len(values) == report.before.live_pieces
    assert report.compacted_tables >= 2 and report.written_tables >= 1
    assert report.pending_delete == report.compacted_tables  # old tables wait out the grace period
    assert store.get_many(list(values)) == values
    # after the grace period the replaced tables are deleted, still nothing live is lost
    second = store.gc(clock=later(3600))
    assert second.deleted >= report.compacted_tables
    assert table_objects(store) == {TABLES_PREFIX + t.name for t in store.manifest.tables}
    assert list(store.backend.list(PENDING_PREFIX)) == []  # every pending record finished
    store.cache = type(store.cache)(0)
    assert store.get_many(list(values)) == values
    assert [p.key for p in store.list()] == sorted(values)


def test_dry_run_changes_nothing(store: PieceStore) -> None:
    store.put_many({f"a/{i}": b"x" * 100 for i in range(100)})
    store.put_many({f"a/{i}": b"y" * 100 for i in range(100)})
    objects = {m.name for m in store.backend.list()}
    version = store.manifest.version
    report = store.gc(dry_run=True, clock=later(7200))
    assert report.dry_run and report.before.dead_records == 100 and report.deleted == 0
    assert report.compacted_tables == 2
    store.refresh()
    assert store.manifest.version == version
    assert {m.name for m in store.backend.list()} == objects


def test_orphans_reclaimed_after_grace_and_not_before(store: PieceStore) -> None:
    store.put("live", b"1")
    orphan_table = build_table([("ghost", 0, b"never committed")])
    store.backend.put(TABLES_PREFIX + orphan_table.name, orphan_table.data)  # a writer died here
    store.backend.put(BLOBS_PREFIX + "deadbeef" * 4, b"z" * 1000)
    early = store.gc(clock=later(30))  # grace is 60 s
    assert early.orphaned == 2 and early.deleted == 0
    assert store.backend.exists(TABLES_PREFIX + orphan_table.name)
    late = store.gc(clock=later(61))
    assert late.deleted == 2
    assert not store.backend.exists(TABLES_PREFIX + orphan_table.name)
    assert not store.backend.exists(BLOBS_PREFIX + "deadbeef" * 4)
    assert store.get("live") == b"1"


def test_large_piece_objects_follow_their_records(store: PieceStore) -> None:
    big_old, big_new = os.urandom(2 * 1024 * 1024), os.urandom(2 * 1024 * 1024)
    store.put("big", big_old)
    store.put("small", b"s")
    store.put("big", big_new)  # the first object is now referenced only by a dead record
    assert len(list(store.backend.list(BLOBS_PREFIX))) == 2
    store.gc(clock=later(0))
    store.gc(clock=later(3600))
    assert len(list(store.backend.list(BLOBS_PREFIX))) == 1
    assert store.get("big") == big_new and store.get("small") == b"s"


def test_reader_with_old_view_survives_compaction(driver: str, store_url: str) -> None:
    with (
        open_store(driver, store_url, gc_grace_seconds=60, gc_auto_compact=False) as writer,
        open_store(driver, store_url, engine_refresh_interval_seconds=3600) as reader,
    ):
        for r in range(3):
            writer.put_many({f"r/{i}": f"{r}-{i}".encode() for i in range(50)})
        reader.refresh()
        writer.gc(clock=later(0))
        reader.cache = type(reader.cache)(0)
        assert reader.get("r/7") == b"2-7"  # old tables still exist within grace
        writer.gc(clock=later(3600))  # now they are gone; the reader refreshes and retries
        assert reader.get("r/8") == b"2-8"
        assert reader.get_many([f"r/{i}" for i in range(50)]) == {
            f"r/{i}": f"2-{i}".encode() for i in range(50)
        }


def test_one_gc_at_a_time_and_crashed_lease_expires(store: PieceStore) -> None:
    held = Lease(store.backend, 30, later(0))
    held.acquire()  # a GC that then crashes without releasing
    with pytest.raises(GCBusyError, match="running"):
        store.gc(clock=later(0))
    report = store.gc(clock=later(31))  # the lease expired by the server's clock
    assert not report.dry_run
    assert not store.backend.exists(LEASE_NAME)
    with pytest.raises(GCBusyError):
        held.renew()  # the crashed GC, if it woke up, must not go on


def test_fsck_finds_damage_and_reads_stay_safe(tmp_path: Any) -> None:
    url = f"file://{tmp_path}"
    with piecestore.open(url, gc_auto_compact=False) as store:
        store.put_many({f"f/{i}": bytes([i]) * 300 for i in range(50)})
        store.put_many({f"g/{i}": bytes([i]) * 300 for i in range(50)})
        store.put("big", os.urandom(1_500_000))
        assert store.fsck().ok
        spec = store.manifest.tables[-1]  # the table of f/*
        path = next(tmp_path.rglob(spec.name + "*"))
        raw = bytearray(path.read_bytes())
        raw[100] ^= 0x01  # flip one bit inside the first records
        path.write_bytes(bytes(raw))
        report = store.fsck()
        assert not report.ok and any(spec.name in p for p in report.problems)
        store.cache = type(store.cache)(0)
        with pytest.raises(CorruptionError):
            store.get("f/0")
        assert store.get("g/3") == bytes([3]) * 300  # other pieces still read


@pytest.mark.parametrize("where", ["payload", "header", "key"])
def test_compaction_refuses_a_damaged_record_and_keeps_the_table(tmp_path: Any, where: str) -> None:
    """Compaction copies records verbatim, so it must verify them: damage stops it, loses nothing."""
    url = f"file://{tmp_path}"
    with piecestore.open(url, gc_auto_compact=False, gc_grace_seconds=0) as store:
        store.put_many({f"f/{i:02d}": bytes([i]) * 300 for i in range(50)})
        store.put_many({f"f/{i:02d}": bytes([i + 1]) * 300 for i in range(25)})  # half of f/* dead
        spec = store.manifest.tables[-1]
        path = next(tmp_path.rglob(spec.name + "*"))
        raw = bytearray(path.read_bytes())
        rec = 20 + 4 + 300  # header, "f/NN", payload: the records are all this size
        # live record f/30: a payload byte, its key_len, or its embedded key ("f/30" -> "f/31")
        at = 30 * rec + {"payload": 100, "header": 10, "key": 20 + 3}[where]
        raw[at] ^= 0x01
        path.write_bytes(bytes(raw))
        report = store.gc(clock=later(10))
        assert report.skipped and "record 30" in report.skipped_reasons[0]
        assert path.exists() and spec.name in store.manifest.table_names()
        store.cache = type(store.cache)(0)
        with pytest.raises(CorruptionError):
            store.get("f/30")
        assert store.get("f/31") == bytes([31]) * 300 and store.get("f/01") == bytes([2]) * 300


def _churn(url: str, worker: int, rounds: int) -> None:
    with piecestore.open(url, engine_flush_linger_ms=1.0, gc_grace_seconds=1, gc_auto_compact=False) as s:
        for r in range(rounds):
            s.put_many({f"w{worker}/{i}": f"{worker}-{r}-{i}".encode() * 20 for i in range(40)})
            s.delete(f"w{worker}/{r % 40}")
            s.put(f"w{worker}/{r % 40}", f"{worker}-{r}-{r % 40}".encode() * 20)


def test_gc_concurrent_with_writer_processes_and_readers(tmp_path: Any) -> None:
    url = f"file://{tmp_path}"
    workers, rounds = 3, 60
    with piecestore.open(
        url, gc_grace_seconds=1, engine_refresh_interval_seconds=0.2, gc_auto_compact=False
    ) as store:
        store.put_many({f"stable/{i}": f"s{i}".encode() for i in range(200)})
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_churn, args=(url, w, rounds)) for w in range(workers)]
        for p in procs:
            p.start()
        failures: list[BaseException] = []
        stop = threading.Event()

        def read_loop() -> None:
            with piecestore.open(url, engine_refresh_interval_seconds=0.2, cache_memory_bytes=0) as r:
                while not stop.is_set():
                    try:
                        got = r.get_many([f"stable/{i}" for i in range(0, 200, 7)])
                        assert all(v == f"s{k.split('/')[1]}".encode() for k, v in got.items())
                    except BaseException as e:
                        failures.append(e)
                        return

        readers = [threading.Thread(target=read_loop) for _ in range(2)]
        for t in readers:
            t.start()
        passes, compacted, deleted = 0, 0, 0
        while any(p.is_alive() for p in procs) or passes < 3:
            report = store.gc()  # real server clock, 1 s grace
            passes, compacted, deleted = (
                passes + 1,
                compacted + report.compacted_tables,
                deleted + report.deleted,
            )
            time.sleep(0.3)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        stop.set()
        for t in readers:
            t.join()
        assert not failures, failures
        assert compacted > 0 and deleted > 0  # GC really worked while the others did
        store.refresh()
        final = store.get_many([p.key for p in store.list()])
        for w in range(workers):
            for i in range(40):
                last_round = rounds - 1
                # every key's newest write is the put_many of the last round, or the single put after it
                expected = {f"{w}-{last_round}-{i}".encode() * 20}
                assert final[f"w{w}/{i}"] in expected
        assert all(final[f"stable/{i}"] == f"s{i}".encode() for i in range(200))
        assert store.fsck().ok


def test_background_compaction_merges_small_tables(tmp_path: Any) -> None:
    url = f"file://{tmp_path}"
    with piecestore.open(url, gc_auto_compact=True, gc_compact_min_tables=4, gc_grace_seconds=60) as s:
        for r in range(12):
            s.put_many({f"bg/{r}/{i}": b"v" * 50 for i in range(20)})
        s.gc(dry_run=True)  # waits for a running background compaction
        s.refresh()
        # size tiers keep the count near compact_min_tables, far below one table per commit
        assert len(s.manifest.tables) <= 2 * 4 < 12
        assert len(list(s.list("bg/"))) == 240
    with piecestore.open(url, gc_auto_compact=False) as s:  # and the switch turns it off
        for r in range(6):
            s.put(f"off/{r}", b"x")
        assert len(s.manifest.tables) >= 6


def test_background_compaction_is_tiered(tmp_path: Any) -> None:
    """Small new tables merge among themselves; a big older table is not rewritten each time."""
    url = f"file://{tmp_path}"
    with piecestore.open(url, gc_compact_min_tables=4, gc_grace_seconds=60) as s:
        s.put_many({f"big/{i}": b"b" * 100 for i in range(2000)})
        big = s.manifest.tables[0].name
        for i in range(40):
            s.put(f"small/{i}", b"s" * 100)
        s.gc(dry_run=True)  # waits for a running background compaction
        s.refresh()
        names = [t.name for t in s.manifest.tables]
        assert big in names and names[-1] == big
        assert len(names) < 10
        assert len(list(s.list("small/"))) == 40 and len(list(s.list("big/"))) == 2000


def test_one_pass_converges_and_a_second_rewrites_nothing(driver: str, store_url: str) -> None:
    """Grace 0: one gc() reclaims what it replaced (tables and large pieces), drops tombstones
    that no longer hide anything, and a second gc() on the unchanged store rewrites nothing."""
    with open_store(
        driver, store_url, gc_grace_seconds=0, gc_auto_compact=False, engine_small_piece_max_bytes=4096
    ) as s:
        values = {f"k/{i:04d}": os.urandom(100) for i in range(400)}
        s.put_many(values)
        s.put_many({f"big/{i}": os.urandom(5000) for i in range(3)})
        s.put_many({f"k/{i:04d}": os.urandom(100) for i in range(0, 400, 2)})  # overwrite half
        s.delete_many([f"k/{i:04d}" for i in range(1, 400, 2)])  # delete the other half
        s.delete_many([f"big/{i}" for i in range(3)])
        first = s.gc()
        assert first.deleted >= first.compacted_tables + 3, first  # replaced tables and the objects
        assert first.after.tombstones == 0 and first.after.dead_bytes == 0, first
        assert {m.name for m in s.backend.list(BLOBS_PREFIX)} == set()
        second = s.gc()
        assert (second.compacted_tables, second.written_tables, second.deleted) == (0, 0, 0), second
        assert sorted(p.key for p in s.list()) == [f"k/{i:04d}" for i in range(0, 400, 2)]


def test_tombstones_stay_while_an_older_table_holds_their_key(driver: str, store_url: str) -> None:
    """A tombstone over a big live table (not rewritten) must stay: it hides the old value."""
    with open_store(driver, store_url, gc_grace_seconds=0, gc_auto_compact=False) as s:
        s.put_many({f"k/{i:04d}": os.urandom(2000) for i in range(1000)})  # one big table, mostly live
        s.delete("k/0001")
        s.gc()
        with pytest.raises(piecestore.NotFoundError):
            s.get("k/0001")
        second = s.gc()
        assert second.written_tables == 0, second
        with pytest.raises(piecestore.NotFoundError):
            s.get("k/0001")
