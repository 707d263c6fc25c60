"""Timed phases: a warm-up that is thrown away, then several runs, as warp measures.

A phase runs ``concurrency`` workers (threads, or coroutines for async clients) that issue
operations back to back until the phase's time is up; operations in flight then finish and
count, and the phase lasts until the last one ends. Every latency is kept, every exception is
counted by type (a wrong byte read is a ``VerifyError``), and the driver's request counter is
read just before and after, so setup and cleanup never leak into the figures.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from piecestore.bench.counting import RequestCounter

PHASE_BYTES_CAP = 2 * 1024**3  # a very fast provider (memory) must not fill the machine's RAM


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one timed call did: pieces moved, payload bytes, and time to first byte if seen."""

    pieces: int
    nbytes: int
    ttfb: float | None = None


class Exhausted(Exception):
    """The workload has nothing left to do in this phase (e.g. every object is deleted)."""


class Workload:
    """One cell of the matrix; subclasses fill in the hooks and the labels."""

    name = ""
    path = ""  # packed | direct | obstore | reference
    reads = False
    is_async = False

    def __init__(self, size: int, concurrency: int, batch: int = 1) -> None:
        self.size = size
        self.concurrency = concurrency
        self.batch = batch
        self.counter: RequestCounter | None = None
        self.requests_per_call: dict[str, int] | None = None  # fixed cost when uncountable
        self.notes: list[str] = []
        self.table_counts: list[int] = []

    def start_phase(self, phase: int) -> None:
        """Untimed: open handles, choose key ranges."""

    def op(self, worker: int, seq: int) -> Outcome:
        raise NotImplementedError

    async def aop(self, worker: int, seq: int) -> Outcome:
        raise NotImplementedError

    def end_phase(self, phase: int, measured: bool) -> None:
        """Untimed: record table stats, close handles, delete what the phase wrote."""

    def ttfb_probe(self) -> list[float]:
        """Untimed extra samples of time to first byte, for whole-object reads of large objects."""
        return []

    def close(self) -> None:
        """Untimed: release everything the cell holds."""


@dataclass
class PhaseStats:
    seconds: float = 0.0
    calls: int = 0
    pieces: int = 0
    nbytes: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    capped: bool = False
    exhausted: bool = False


@dataclass
class CellStats:
    warmup: PhaseStats
    runs: list[PhaseStats]
    probe_ttfbs: list[float] = field(default_factory=list)


class _Shared:
    """State the workers of one phase share: the op sequence, the byte budget, stop flags."""

    def __init__(self, seconds: float) -> None:
        self.seq = itertools.count()
        self.lock = threading.Lock()
        self.nbytes = 0
        self.capped = False
        self.exhausted = False
        self.start = time.perf_counter()
        self.deadline = self.start + seconds

    def go_on(self) -> bool:
        return time.perf_counter() < self.deadline and not self.capped and not self.exhausted

    def account(self, stats: PhaseStats, out: Outcome, t0: float, t1: float) -> None:
        stats.calls += 1
        stats.pieces += out.pieces
        stats.nbytes += out.nbytes
        stats.latencies.append(t1 - t0)
        if out.ttfb is not None:
            stats.ttfbs.append(out.ttfb)
        with self.lock:
            self.nbytes += out.nbytes
            if self.nbytes >= PHASE_BYTES_CAP:
                self.capped = True


def _fail(stats: PhaseStats, e: BaseException, t0: float, t1: float) -> None:
    stats.calls += 1
    stats.latencies.append(t1 - t0)
    stats.errors[type(e).__name__] += 1


def _thread_phase(w: Workload, seconds: float) -> PhaseStats:
    shared = _Shared(seconds)
    parts = [PhaseStats() for _ in range(w.concurrency)]
    ends = [shared.start] * w.concurrency

    def worker(k: int) -> None:
        stats = parts[k]
        while shared.go_on():
            i = next(shared.seq)
            t0 = time.perf_counter()
            try:
                out = w.op(k, i)
            except Exhausted:
                shared.exhausted = True
                break
            except Exception as e:
                _fail(stats, e, t0, time.perf_counter())
                continue
            shared.account(stats, out, t0, time.perf_counter())
        ends[k] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(k,), name=f"bench-{k}") for k in range(w.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _merge(parts, max(ends) - shared.start, shared)


def _async_phase(w: Workload, seconds: float) -> PhaseStats:
    parts = [PhaseStats() for _ in range(w.concurrency)]
    ends: list[float] = []

    async def main() -> _Shared:
        shared = _Shared(seconds)

        async def worker(k: int) -> None:
            stats = parts[k]
            while shared.go_on():
                i = next(shared.seq)
                t0 = time.perf_counter()
                try:
                    out = await w.aop(k, i)
                except Exhausted:
                    shared.exhausted = True
                    break
                except Exception as e:
                    _fail(stats, e, t0, time.perf_counter())
                    continue
                shared.account(stats, out, t0, time.perf_counter())
            ends.append(time.perf_counter())

        await asyncio.gather(*(worker(k) for k in range(w.concurrency)))
        return shared

    shared = asyncio.run(main())
    return _merge(parts, max(ends, default=shared.start) - shared.start, shared)


def _merge(parts: list[PhaseStats], seconds: float, shared: _Shared) -> PhaseStats:
    out = PhaseStats(seconds=seconds, capped=shared.capped, exhausted=shared.exhausted)
    for p in parts:
        out.calls += p.calls
        out.pieces += p.pieces
        out.nbytes += p.nbytes
        out.latencies.extend(p.latencies)
        out.ttfbs.extend(p.ttfbs)
        out.errors.update(p.errors)
    return out


def run_phase(w: Workload, seconds: float) -> PhaseStats:
    before = w.counter.snapshot() if w.counter is not None else Counter()
    stats = _async_phase(w, seconds) if w.is_async else _thread_phase(w, seconds)
    if w.counter is not None:
        stats.requests = w.counter.snapshot() - before
    elif w.requests_per_call is not None:
        stats.requests = Counter({k: v * stats.calls for k, v in w.requests_per_call.items()})
    return stats


def run_cell(
    w: Workload,
    *,
    warmup: float,
    runs: int,
    run_seconds: float,
    on_phase: Callable[[int], None] | None = None,
) -> CellStats:
    """Warm-up (discarded), then ``runs`` measured runs; hooks around each phase are untimed."""
    phases: list[PhaseStats] = []
    try:
        for phase in range(runs + 1):
            if on_phase is not None:
                on_phase(phase)
            w.start_phase(phase)
            try:
                stats = run_phase(w, warmup if phase == 0 else run_seconds)
            finally:
                w.end_phase(phase, measured=phase > 0)
            phases.append(stats)
        probes = w.ttfb_probe()
    finally:
        w.close()
    return CellStats(phases[0], phases[1:], probes)
