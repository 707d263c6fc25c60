"""GC and compaction pause for this process's writers, and only for them."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

import piecestore
from piecestore import pacing
from piecestore.pacing import Pacer


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A fake monotonic clock; time.sleep advances it instead of sleeping."""
    now = [1000.0]
    monkeypatch.setattr(pacing.time, "monotonic", lambda: now[0])

    def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(pacing.time, "sleep", sleep)
    monkeypatch.setattr(pacing, "_recent", {})
    return now


def wrote() -> None:
    """A write call by another thread of this process."""

    def write() -> None:
        with pacing.foreground_write():
            pass

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()


def test_this_threads_own_past_writes_do_not_pace_its_gc(clock: list[float]) -> None:
    """A thread that writes and then runs gc() itself is not writing while the GC runs."""
    pacer = Pacer(0.1)
    with pacing.foreground_write():
        pass
    clock[0] += 0.01
    assert not pacing.writers_active()
    pacer.step()
    assert pacer.paused == 0
    wrote()  # another thread's write a moment ago does count
    clock[0] += 0.01
    pacer.step()
    assert pacer.paused == pytest.approx(0.09)


def test_idle_background_work_never_pauses(clock: list[float]) -> None:
    pacer = Pacer(0.25)
    clock[0] += 0.2
    pacer.step()
    assert pacer.paused == 0


def test_while_writers_commit_it_works_its_share(clock: list[float]) -> None:
    pacer = Pacer(0.25)
    with pacing.foreground_write():  # a write waiting for its commit counts however long it takes
        clock[0] += 10
        assert pacing.writers_active()
        pacer.step()
    assert pacer.paused == pacing.MAX_PAUSE_SECONDS
    pacer.paused = 0
    for _ in range(10):
        with pacing.foreground_write():
            clock[0] += 0.1  # a unit of work
            pacer.step()
    assert pacer.paused == pytest.approx(3.0)  # 0.1 s work : 0.3 s pause
    wrote()
    clock[0] += pacing.RECENT_SECONDS / 2  # a writer between two calls still counts
    pacer.step()
    assert pacer.paused > 3.0
    clock[0] += pacing.RECENT_SECONDS + 0.1  # writers went quiet
    before = pacer.paused
    pacer.step()
    assert pacer.paused == before


def test_one_pause_is_bounded_and_share_one_never_pauses(clock: list[float]) -> None:
    pacer = Pacer(0.1)
    flat_out = Pacer(1.0)
    with pacing.foreground_write():
        clock[0] += 0.3  # a long unit would ask for a 2.7 s pause
        pacer.step()
        flat_out.step()
    assert pacer.paused == pacing.MAX_PAUSE_SECONDS
    assert flat_out.paused == 0
    with pytest.raises(ValueError, match="share"):
        Pacer(0)


def test_work_that_falls_behind_runs_flat_out(clock: list[float]) -> None:
    backlog = [True]
    pacer = Pacer(0.1, lambda: backlog[0])
    with pacing.foreground_write():
        clock[0] += 0.05
        pacer.step()
        assert pacer.paused == 0  # tables are piling up: no pause
        backlog[0] = False
        clock[0] += 0.05
        pacer.step()
    assert pacer.paused == pytest.approx(0.45)


def test_gc_beside_writes_in_this_process_yields_and_loses_nothing(tmp_path: Any) -> None:
    url = f"file://{tmp_path}"
    opts: dict[str, Any] = {"gc_auto_compact": False, "gc_grace_seconds": 0, "gc_share_while_writing": 0.5}
    with piecestore.open(url, **opts) as store:
        for r in range(6):
            store.put_many({f"k/{r}/{i}": os.urandom(64) for i in range(300)})
        store.put_many({f"k/{r}/{i}": b"new" for r in range(6) for i in range(0, 300, 2)})
        done = threading.Event()
        written: list[int] = []

        def writer() -> None:
            while not done.is_set():
                n = len(written)
                store.put_many({f"w/{n}/{i}": b"w" for i in range(50)})
                written.append(n)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            while not written:  # the writer is under way before the pass starts
                time.sleep(0.01)
            report = store.gc()
        finally:
            done.set()
            thread.join()
        assert report.written_tables > 0 and report.paused_seconds > 0
        assert store.get_many([f"k/{r}/{i}" for r in range(6) for i in range(0, 300, 2)]) == {
            f"k/{r}/{i}": b"new" for r in range(6) for i in range(0, 300, 2)
        }
        assert len(store.get_many([f"w/{n}/{i}" for n in written for i in range(50)])) == 50 * len(written)
        assert store.fsck().ok


def test_a_long_compaction_run_keeps_its_lease(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run slower than the lease (big, or yielding to writers) renews it as it goes."""
    from piecestore import gc as gc_mod
    from piecestore.lease import GCBusyError, Lease, server_clock

    url = f"file://{tmp_path}"
    opts: dict[str, Any] = {"gc_auto_compact": False, "gc_grace_seconds": 0, "gc_lease_seconds": 0.6}
    with piecestore.open(url, **opts) as store:
        for r in range(6):
            store.put_many({f"k/{r}/{i}": b"v" * 40 for i in range(100)})
        real_live = gc_mod.live_records
        rivals: list[str] = []

        def slow_live(*args: Any) -> Any:
            time.sleep(0.25)  # six tables: 1.5 s, well past the 0.6 s lease
            rival = Lease(store.backend, 0.6, server_clock(store.backend))
            try:
                rival.acquire()  # another GC must find the lease held all along
            except GCBusyError:
                rivals.append("busy")
            else:
                rivals.append("acquired")
                rival.release()
            return real_live(*args)

        monkeypatch.setattr(gc_mod, "live_records", slow_live)
        report = store.gc()
        assert rivals and set(rivals) == {"busy"}, rivals
        assert report.written_tables > 0 and not report.skipped, report.skipped_reasons
        assert len(store.get_many([f"k/{r}/{i}" for r in range(6) for i in range(100)])) == 600
