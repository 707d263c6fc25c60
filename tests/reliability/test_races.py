"""Races: writer processes with several threads each, reader processes and a GC process, all on
one store at once, with a short GC grace period so compacted tables really get deleted.

Every process checks every read as it goes (stable pieces byte-exact, other keys against the
values the log says were ever written there); at the end every acknowledged write must be the
state of its key, fsck must be clean, and the manifest must actually have been contended.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from piecestore.localserver import LocalS3Server
from tests.reliability._procs import WorkerProc
from tests.reliability._support import SOAK, AckLog, open_store, replay, s3_url, value_for, verify_against

OVERRIDES = {
    "engine_small_piece_max_bytes": 16384,
    "engine_table_target_bytes": 64 * 1024,
    "engine_refresh_interval_seconds": 0.2,
    "gc_grace_seconds": 2,
}


def race(url: str, workdir: Path, *, writers: int, duration: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    log_path = workdir / "ack.log"
    log = AckLog(log_path)
    stable: dict[str, tuple[int, int]] = {}
    for i in range(300):
        size = rng.choice([0, 10, 200, 3000, 20000])  # some become large-piece objects
        stable[f"stable/{i:03d}"] = (1, size)
    with open_store(url, **OVERRIDES) as store:
        store.put_many({k: value_for(opid, k, size) for k, (opid, size) in stable.items()})
    log.intent(1, {k: size for k, (_, size) in stable.items()})
    log.ack(1)
    log.close()
    base: dict[str, Any] = {"url": url, "overrides": OVERRIDES, "log": str(log_path), "duration": duration,
                            "stable": stable, "keys": 40}  # fmt: skip
    # Writer 0 also compacts in the background (auto_compact); the others leave GC to the GC
    # process, so the lease is contended but GC does get its turns.
    quiet = {**OVERRIDES, "gc_auto_compact": False}
    roles: list[dict[str, Any]] = [
        {
            "writers": 2,
            "readers": 1,
            "gc": "none",
            "owner": f"p{p}/",
            "overrides": OVERRIDES if p == 0 else quiet,
        }
        for p in range(writers)
    ]
    roles.append({"writers": 0, "readers": 3, "owner": "r/", "overrides": quiet})  # readers only
    roles.append(
        {"writers": 0, "readers": 1, "gc_loop": True, "gc": "real", "owner": "gc/", "overrides": quiet}
    )
    procs = []
    for n, role in enumerate(roles):
        cfg = {**base, **role, "seed": rng.randrange(2**32), "opid_base": (n + 1) * 10_000_000}
        procs.append(WorkerProc(cfg, workdir, f"proc{n}"))
    try:
        for p in procs:
            p.wait_ready()
        codes = [p.finish(duration + 120) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.close()
    state = replay(log_path)
    problems = [n for n in state.notes if n.get("bad") or n.get("error")]
    stderr = "\n".join(p.stderr()[-1500:] for p, c in zip(procs, codes, strict=True) if c != 0)
    assert not problems, f"{len(problems)} wrong reads or errors, first: {problems[:3]}"
    assert codes == [0] * len(procs), f"exit codes {codes}:\n{stderr}"
    done = [n for n in state.notes if "done" in n]
    assert len(done) == len(procs)
    assert state.intents == state.acked_ops, "a clean run left writes unacknowledged"
    with open_store(url, **OVERRIDES) as store:
        checked = verify_against(store, state)
        report = store.fsck()
        assert report.ok, str(report)
        tables = len(store.manifest.tables)
    figures = {
        "processes": len(procs),
        "writer_threads": 2 * writers,
        "acked_writes": state.acked_ops,
        "reads_checked": sum(n["reads"] for n in done),
        "failed_reads": 0,
        "manifest_conflicts": sum(n["conflicts"] for n in done),
        "gc_runs": sum(n["gc"] for n in done),
        "gc_busy": sum(n["gc_busy"] for n in done),
        "gc_deleted_objects": sum(n["gc_deleted"] for n in done),
        "pieces_verified": checked.acked_pieces,
        "tables_at_end": tables,
    }
    assert figures["manifest_conflicts"] > 0, "the manifest was never contended: no race was run"
    assert figures["gc_runs"] > 0, "GC never ran beside the writers"
    return figures


@pytest.mark.parametrize("backend", ["file", pytest.param("s3", marks=pytest.mark.s3)])
def test_writers_readers_and_gc_race(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, figures: dict[str, Any]
) -> None:
    if backend == "file":
        url = "file://" + str(tmp_path / "store")
        duration = 60.0 if SOAK else 8.0
    else:
        server: LocalS3Server = request.getfixturevalue("s3_server")
        url = s3_url(server.endpoint)
        duration = 60.0 if SOAK else 6.0
    figures.update(race(url, tmp_path, writers=3, duration=duration, seed=11))


def test_gc_beside_a_background_compaction_that_is_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A foreground gc() while a flush is starting background compaction must not fail.

    gc() waits for the store's compactor thread; it must never see one not yet started
    (found by the crash test: RuntimeError "cannot join thread before it is started").
    """
    import threading
    import time

    real_thread = threading.Thread
    started = threading.Event()

    class SlowStart(real_thread):  # widens the window between creating and starting it
        def start(self) -> None:
            if self.name == "piecestore-compactor":
                started.set()
                time.sleep(0.3)
            super().start()

    with open_store(f"file://{tmp_path}/s", gc_compact_min_tables=2, gc_auto_compact=True) as store:
        store.put("a", b"1")
        monkeypatch.setattr(threading, "Thread", SlowStart)
        writer = real_thread(target=lambda: store.put("b", b"2"))  # its flush starts the compactor
        writer.start()
        assert started.wait(10), "no background compaction was started"
        store.gc()  # must wait for the compactor (or skip it), not raise
        writer.join(10)
        monkeypatch.setattr(threading, "Thread", real_thread)
        assert store.get_many(["a", "b"]) == {"a": b"1", "b": b"2"}
