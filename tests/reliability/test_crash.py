"""Crash: writers are SIGKILLed at random moments, over many cycles; nothing acknowledged is lost.

Each cycle starts a writer process on the same store and kills it with SIGKILL, either after
a random delay (from this process) or by itself at a random backend write call (before or
after the call), which lands kills inside table uploads, manifest commits, large-piece
uploads and every step of GC (lease, compaction commit, deletes). After each kill the store
must open, every acknowledged piece must read back byte-exact (a write in flight at the kill
may have landed or not), the listing must agree, and fsck must find no dangling reference
or damage. The writers themselves verify reads of their own keys as they go.
"""

from __future__ import annotations

import random
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from piecestore.localserver import LocalS3Server
from tests.reliability._procs import WorkerProc, trim_torn_tail
from tests.reliability._support import open_store, replay, s3_url, scaled, verify_against


def crash_cycles(
    url: str,
    workdir: Path,
    *,
    cycles: int,
    mode: str,
    seed: int,
    overrides: dict[str, Any],
    max_delay: float,
) -> dict[str, Any]:
    rng = random.Random(seed)
    log = workdir / "ack.log"
    figures = {"cycles": 0, "kills": 0, "timer_kills": 0, "self_kills": 0, "acked_ops": 0,
               "acked_pieces_verified": 0, "in_flight_landed": 0, "kills_during_gc": 0}  # fmt: skip
    for cycle in range(cycles):
        selfkill = rng.random() < 0.5
        cfg = {
            "url": url,
            "overrides": overrides,
            "log": str(log),
            "seed": rng.randrange(2**32),
            "owner": "",
            "opid_base": (cycle + 1) * 10_000_000,
            "writers": 1 if mode == "seq" else 3,
            "gc": "ahead" if mode == "seq" else "real",
            "keys": 60 if mode == "seq" else 30,
            "small_max": 16384,
            "selfkill_at": rng.randint(1, 60) if selfkill else None,
        }
        worker = WorkerProc(cfg, workdir, f"cycle{cycle}")
        try:
            worker.wait_ready()
            delay = rng.uniform(0.05, max_delay) if not selfkill else max_delay * 3
            try:
                worker.proc.wait(delay)
            except subprocess.TimeoutExpired:
                worker.kill()
                figures["timer_kills"] += 1
            else:
                figures["self_kills"] += 1
            if worker.proc.returncode != -signal.SIGKILL:
                notes = [n for n in replay(log).notes if n.get("error") or n.get("bad")]
                raise AssertionError(
                    f"cycle {cycle}: writer exited with {worker.proc.returncode}, not by SIGKILL:\n"
                    f"{worker.stderr()[-3000:]}\n{notes[-3:]}"
                )
        finally:
            worker.kill()
            worker.close()
        figures["kills"] += 1
        figures["cycles"] += 1
        trim_torn_tail(log)
        state = replay(log)
        mine = [n["gc"] for n in state.notes if "gc" in n and n.get("pid") == worker.proc.pid]
        figures["kills_during_gc"] += bool(mine) and mine[-1] == "start"
        bad = [n for n in state.notes if n.get("bad") or n.get("error")]
        assert not bad, f"cycle {cycle}: the writer saw wrong reads or errors: {bad[:3]}"
        with open_store(url, **overrides) as store:
            checked = verify_against(store, state)
            report = store.fsck()
            assert report.ok, f"cycle {cycle}: fsck after the kill: {report}"
        figures["acked_pieces_verified"] += checked.acked_pieces
        figures["in_flight_landed"] += checked.in_flight_landed
    state = replay(log)
    figures["acked_ops"] = state.acked_ops
    assert state.acked_ops > cycles, "the writers acknowledged almost nothing: the scenario did not run"
    # Everything the killed writers left behind is reclaimed once the grace period has passed.
    ahead = datetime.now(UTC) + timedelta(hours=2)
    with open_store(url, **overrides) as store:
        store.gc(clock=lambda: ahead)
        store.gc(clock=lambda: ahead + timedelta(hours=2))
        report = store.fsck()
        assert report.ok and not report.orphans, f"after the final GC: {report}"
        figures["final_verified"] = verify_against(store, state).acked_pieces
    return figures


BASE = {
    "engine_small_piece_max_bytes": 16384,
    "engine_table_target_bytes": 64 * 1024,
    "gc_grace_seconds": 60,
    "gc_lease_seconds": 1,
}


@pytest.mark.parametrize("mode", ["seq", "threads"])
def test_crash_file(mode: str, tmp_path: Path, figures: dict[str, Any]) -> None:
    store_dir = tmp_path / "store"
    url = "file://" + str(store_dir)
    cycles = scaled(14 if mode == "seq" else 8, 200)
    figures.update(
        crash_cycles(url, tmp_path, cycles=cycles, mode=mode, seed=1000 + len(mode), overrides=BASE,
                     max_delay=1.2)
    )  # fmt: skip


@pytest.mark.s3
def test_crash_s3(s3_server: LocalS3Server, tmp_path: Path, figures: dict[str, Any]) -> None:
    url = s3_url(s3_server.endpoint)
    overrides = {**BASE, "retry_deadline": 20.0}
    figures.update(
        crash_cycles(url, tmp_path, cycles=scaled(8, 80), mode="seq", seed=7, overrides=overrides,
                     max_delay=2.0)
    )  # fmt: skip
