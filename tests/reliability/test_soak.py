"""Load: concurrent mixed traffic for a fixed time; report ops done, errors and memory growth.

Threads own disjoint keys and remember what they last wrote; they put, put_many, get,
get_many, head, delete and list, one thread runs GC now and then, and background compaction
is on. The process RSS is sampled every half second; growth is the median of the last
quarter of samples minus the median of the first quarter (after a warm-up), so a leak shows
as growth that a steady state does not. Short by default (10 s); PIECESTORE_SOAK=1 runs the
long ones (PIECESTORE_SOAK=<seconds>, else 300 s) on file and S3.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from piecestore import NotFoundError, PieceStore
from piecestore.lease import GCBusyError
from tests.reliability._support import SOAK_SECONDS, open_store, rss_bytes, s3_url

MiB = 1024 * 1024
SETTINGS = {
    "cache_memory_bytes": 4 * MiB,  # bounded caches, so steady state is flat
    "engine_small_piece_max_bytes": 64 * 1024,
    "engine_table_target_bytes": 4 * MiB,
    "gc_grace_seconds": 2,
    "engine_refresh_interval_seconds": 1.0,
}


@dataclass
class Load:
    store: PieceStore
    threads: int
    keys_per_thread: int = 200
    ops: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    models: list[dict[str, bytes]] = field(default_factory=list)

    def count(self, what: str, seconds: float) -> None:
        with self.lock:
            self.ops[what] = self.ops.get(what, 0) + 1
            if len(self.latencies) < 200_000:
                self.latencies.append(seconds)

    def worker(self, t: int) -> None:
        rng = random.Random(t)
        model: dict[str, bytes] = {}
        self.models.append(model)
        keys = [f"t{t}/{i:04d}" for i in range(self.keys_per_thread)]
        while not self.stop.is_set():
            r = rng.random()
            t0 = time.monotonic()
            try:
                if r < 0.25:
                    k = rng.choice(keys)
                    v = os.urandom(rng.choice([10, 300, 3000, 100_000]))
                    self.store.put(k, v)
                    model[k] = v
                    what = "put"
                elif r < 0.35:
                    batch = {k: os.urandom(rng.randint(0, 2000)) for k in rng.sample(keys, 20)}
                    self.store.put_many(batch)
                    model.update(batch)
                    what = "put_many"
                elif r < 0.40:
                    k = rng.choice(keys)
                    self.store.delete(k)
                    model.pop(k, None)
                    what = "delete"
                elif r < 0.70:
                    k = rng.choice(keys)
                    try:
                        got: bytes | None = self.store.get(k)
                    except NotFoundError:
                        got = None
                    if got != model.get(k):
                        raise AssertionError(f"{k}: read {None if got is None else len(got)} bytes")
                    what = "get"
                elif r < 0.90:
                    chosen = rng.sample(keys, 30)
                    many = self.store.get_many(chosen, missing="skip")
                    if many != {k: model[k] for k in chosen if k in model}:
                        raise AssertionError("get_many disagrees with what this thread wrote")
                    what = "get_many"
                elif r < 0.97:
                    self.store.exists(rng.choice(keys))
                    what = "head"
                else:
                    listed = {p.key for p in self.store.list(f"t{t}/")}
                    if listed != set(model):
                        raise AssertionError(f"listing t{t}/ disagrees: {len(listed)} vs {len(model)}")
                    what = "list"
            except Exception as e:
                with self.lock:
                    self.errors.append(f"{type(e).__name__}: {e}")
                continue
            self.count(what, time.monotonic() - t0)

    def gc_loop(self) -> None:
        while not self.stop.wait(2.0):
            try:
                self.store.gc()
                self.count("gc", 0.0)
            except GCBusyError:
                pass
            except Exception as e:
                with self.lock:
                    self.errors.append(f"gc: {type(e).__name__}: {e}")


def soak(url: str, seconds: float, threads: int = 6) -> dict[str, Any]:
    with open_store(url, **SETTINGS) as store:
        load = Load(store, threads)
        pool = [threading.Thread(target=load.worker, args=(t,), daemon=True) for t in range(threads)]
        pool.append(threading.Thread(target=load.gc_loop, daemon=True))
        started = time.monotonic()
        for th in pool:
            th.start()
        samples: list[tuple[float, int]] = []
        while time.monotonic() - started < seconds:
            time.sleep(0.5)
            samples.append((time.monotonic() - started, rss_bytes()))
        load.stop.set()
        for th in pool:
            th.join(60)
            assert not th.is_alive(), "a load thread hung"
        elapsed = time.monotonic() - started
        ops_done = sum(v for k, v in load.ops.items() if k != "gc")
        # everything each thread last wrote is there, from a fresh handle too
        expected: dict[str, bytes] = {}
        for m in load.models:
            expected.update(m)
        with open_store(url, **SETTINGS) as fresh:
            assert fresh.get_many(sorted(expected)) == expected
            assert {p.key for p in fresh.list()} == set(expected)
            assert fresh.fsck().ok
    warm = [rss for t, rss in samples if t >= min(2.0, seconds / 5)]
    quarter = max(1, len(warm) // 4)
    first, last = statistics.median(warm[:quarter]), statistics.median(warm[-quarter:])
    # a leak grows without end; warming caches and pools level off: the slope of the second half
    half = samples[len(samples) // 2 :]
    slope = (
        statistics.linear_regression([t for t, _ in half], [r for _, r in half]).slope
        if len(half) > 2
        else 0.0
    )
    lat = sorted(load.latencies)
    return {
        "seconds": round(elapsed, 1),
        "ops": ops_done,
        "ops_per_s": round(ops_done / elapsed),
        "by_op": dict(sorted(load.ops.items())),
        "errors": len(load.errors),
        "first_errors": load.errors[:3],
        "p50_ms": round(1000 * lat[len(lat) // 2], 2) if lat else None,
        "p99_ms": round(1000 * lat[int(len(lat) * 0.99)], 2) if lat else None,
        "rss_start_mib": round(first / MiB, 1),
        "rss_end_mib": round(last / MiB, 1),
        "rss_growth_mib": round((last - first) / MiB, 1),
        "rss_peak_mib": round(max(r for _, r in samples) / MiB, 1),
        "rss_slope_second_half_mib_per_min": round(slope * 60 / MiB, 2),
        "pieces_verified": len(expected),
    }


def check(result: dict[str, Any], growth_limit_mib: float, slope_limit: float | None = None) -> None:
    assert result["errors"] == 0, result["first_errors"]
    assert result["ops"] > 0
    assert result["rss_growth_mib"] < growth_limit_mib, f"memory grew by {result['rss_growth_mib']} MiB"
    if slope_limit is not None:
        slope = result["rss_slope_second_half_mib_per_min"]
        assert slope < slope_limit, f"memory still grows {slope} MiB/min after warming up"


def test_soak_short_file(tmp_path: Path, figures: dict[str, Any]) -> None:
    result = soak(f"file://{tmp_path}/store", seconds=10.0)
    figures.update(result)
    check(result, growth_limit_mib=48)


@pytest.mark.slow
def test_soak_long_file(tmp_path: Path, figures: dict[str, Any]) -> None:
    result = soak(f"file://{tmp_path}/store", seconds=SOAK_SECONDS)
    figures.update(result)
    check(result, growth_limit_mib=48, slope_limit=2.0)


@pytest.mark.slow
@pytest.mark.s3
def test_soak_long_s3(s3_server: Any, figures: dict[str, Any]) -> None:
    result = soak(s3_url(s3_server.endpoint), seconds=SOAK_SECONDS)
    figures.update(result)
    check(result, growth_limit_mib=64, slope_limit=2.0)
