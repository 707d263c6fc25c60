"""Result rows, the headline ratios, JSON, and the rich tables the terminal shows."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from piecestore.bench.data import size_label
from piecestore.bench.measure import CellStats, Workload

MB = 1_000_000  # MB/s is decimal, as warp and juicefs objbench report


@dataclass
class Row:
    """One cell's figures: medians over the measured runs, with their min and max."""

    provider: str
    server: str
    workload: str
    path: str
    size: int
    concurrency: int
    batch: int
    pieces_per_s: float
    pieces_per_s_min: float
    pieces_per_s_max: float
    calls_per_s: float
    mb_per_s: float
    mb_per_s_min: float
    mb_per_s_max: float
    latency_ms: dict[str, float]  # per call: p50 p90 p99 max
    ttfb_ms: dict[str, float] | None  # reads only
    ttfb_how: str  # measured | probe | whole-value | ""
    reads: bool
    errors: dict[str, int]
    requests: dict[str, int]
    requests_per_piece: float | None
    requests_counted: str  # http | driver | per call | none
    pieces_per_table: dict[str, float] | None
    seconds: float
    runs: list[dict[str, float]]
    warmup_seconds: float
    pieces: int
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0  # the whole cell: setup, warm-up, runs, cleanup
    of_large: float | None = None  # MB/s as a fraction of the provider's best large-object PUT (GET)

    @property
    def label(self) -> str:
        return f"{self.workload} {size_label(self.size)} c{self.concurrency}"


def _pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(arr.max())}


def summarize(provider: str, server: str, w: Workload, stats: CellStats) -> Row:
    runs = [r for r in stats.runs if r.seconds > 0]
    rates = [r.pieces / r.seconds for r in runs] or [0.0]
    mbs = [r.nbytes / r.seconds / MB for r in runs] or [0.0]
    calls = [r.calls / r.seconds for r in runs] or [0.0]
    latencies = [x for r in stats.runs for x in r.latencies]
    errors: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    for r in stats.runs:
        errors.update(r.errors)
        requests.update(r.requests)
    pieces = sum(r.pieces for r in stats.runs)
    ttfbs = [x for r in stats.runs for x in r.ttfbs]
    ttfb: dict[str, float] | None = None
    how = ""
    if w.reads:
        if ttfbs:
            ttfb, how = _pct(ttfbs), "measured"
        elif stats.probe_ttfbs:
            ttfb, how = _pct(stats.probe_ttfbs), "probe"
        else:
            ttfb, how = _pct(latencies), "whole-value"
    notes = list(w.notes)
    if any(r.capped for r in stats.runs):
        notes.append("a run stopped early at the 2 GiB per-run byte cap")
    if any(r.exhausted for r in stats.runs):
        notes.append("a run stopped early: nothing left to do")
    tables = w.table_counts
    per_table = (
        {"mean": float(np.mean(tables)), "median": float(np.median(tables)), "tables": float(len(tables))}
        if tables
        else None
    )
    counted = w.counter.method if w.counter is not None else ("per call" if w.requests_per_call else "none")
    return Row(
        provider=provider,
        server=server,
        workload=w.name,
        path=w.path,
        size=w.size,
        concurrency=w.concurrency,
        batch=w.batch,
        pieces_per_s=statistics.median(rates),
        pieces_per_s_min=min(rates),
        pieces_per_s_max=max(rates),
        calls_per_s=statistics.median(calls),
        mb_per_s=statistics.median(mbs),
        mb_per_s_min=min(mbs),
        mb_per_s_max=max(mbs),
        latency_ms=_pct(latencies),
        ttfb_ms=ttfb,
        ttfb_how=how,
        reads=w.reads,
        errors=dict(errors),
        requests=dict(requests),
        requests_per_piece=(sum(requests.values()) / pieces) if pieces and requests else None,
        requests_counted=counted,
        pieces_per_table=per_table,
        seconds=sum(r.seconds for r in stats.runs),
        runs=[
            {"seconds": r.seconds, "calls": r.calls, "pieces": r.pieces, "bytes": r.nbytes}
            for r in stats.runs
        ],
        warmup_seconds=stats.warmup.seconds,
        pieces=pieces,
        notes=notes,
    )


def failed_row(
    provider: str, server: str, workload: str, path: str, size: int, conc: int, e: BaseException
) -> Row:
    """A cell that could not run at all still gets a row, so a failure is never silent."""
    return Row(
        provider, server, workload, path, size, conc, 1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, {}, None, "",
        False, {type(e).__name__: 1}, {}, None, "none", None, 0.0, [], 0.0, 0, [f"cell failed: {e}"[:300]],
    )  # fmt: skip


def relate_to_large(rows: list[Row]) -> None:
    """Express every payload-moving row as a fraction of the same provider's large-object bandwidth."""
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        if r.workload in ("large_put", "large_get") and r.pieces:
            key = (r.provider, r.workload)
            best[key] = max(best.get(key, 0.0), r.mb_per_s)
    for r in rows:
        ref = best.get((r.provider, "large_get" if r.reads else "large_put"))
        if ref and r.mb_per_s and r.path != "reference" and r.workload != "mixed":
            r.of_large = r.mb_per_s / ref


# -- headline --------------------------------------------------------------------------------


@dataclass
class Check:
    """One target of the piece-engine issue, computed from this run's rows."""

    provider: str
    check: str
    ratio: float | None
    target: float
    status: str  # PASS | FAIL | INFO | N/A
    figures: str


def _best(rows: list[Row], provider: str, workload: str, key: str, **match: int) -> Row | None:
    found = [
        r
        for r in rows
        if r.provider == provider
        and r.workload == workload
        and r.pieces > 0
        and all(getattr(r, k) == v for k, v in match.items())
    ]
    return max(found, key=lambda r: float(getattr(r, key)), default=None)


def headline(rows: list[Row]) -> list[Check]:
    """The ratios the piece-engine issue asks for, per provider, with PASS/FAIL where they apply."""
    out: list[Check] = []
    small = 4096
    for provider in dict.fromkeys(r.provider for r in rows):
        remote = any(r.provider == provider and r.requests_counted == "http" for r in rows)
        is_file = any(r.provider == provider and r.workload == "disk_write" for r in rows)
        many = _best(rows, provider, "put_many", "pieces_per_s", size=small)
        large = _best(rows, provider, "large_put", "mb_per_s")
        direct_put = _best(rows, provider, "direct_put", "pieces_per_s")
        threads = _best(rows, provider, "put", "pieces_per_s", size=small, concurrency=16)
        get_many = _best(rows, provider, "get_many", "pieces_per_s", size=small)
        direct_get = _best(rows, provider, "direct_get", "pieces_per_s")
        disk = _best(rows, provider, "disk_write", "mb_per_s")

        def add(
            check: str, num: Row | None, den: Row | None, key: str, target: float, applies: bool, unit: str,
            provider: str = provider,
        ) -> None:  # fmt: skip
            if num is None or den is None or not float(getattr(den, key)):
                out.append(Check(provider, check, None, target, "N/A", "a needed cell did not run or failed"))
                return
            a, b = float(getattr(num, key)), float(getattr(den, key))
            ratio = a / b
            status = ("PASS" if ratio >= target else "FAIL") if applies else "INFO"
            figures = f"{_fmt(a)} {unit} ({num.label}) / {_fmt(b)} {unit} ({den.label})"
            if num.errors or den.errors:
                figures += "; errors in these cells, see the table"
            out.append(Check(provider, check, ratio, target, status, figures))

        add("put_many 4KiB MB/s vs large-object PUT MB/s", many, large, "mb_per_s", 0.70, remote, "MB/s")
        add("put_many 4KiB vs best one-object-per-piece PUT", many, direct_put, "pieces_per_s", 13.0, remote,
            "pieces/s")  # fmt: skip
        add("16 threads calling put vs put_many", threads, many, "pieces_per_s", 0.50, remote, "pieces/s")
        # A durable put needs a table PUT and then a manifest PUT, one after the other, and a
        # thread has one put in flight: 16 threads cannot beat 16 / (2 x one PUT's latency).
        one_put = _best(rows, provider, "direct_put", "pieces_per_s", size=small, concurrency=1)
        if remote and threads and one_put and one_put.pieces_per_s and many and many.pieces_per_s:
            ceiling = 16 * one_put.pieces_per_s / 2
            figures = (
                f"{_fmt(threads.pieces_per_s)} pieces/s / {_fmt(ceiling)} pieces/s (8 x "
                f"{_fmt(one_put.pieces_per_s)} single-thread PUT/s); that ceiling is "
                f"{ceiling / many.pieces_per_s:.2f}x put_many"
            )
            check = "16 threads calling put vs 16 / (2 one-object PUT latencies)"
            out.append(Check(provider, check, threads.pieces_per_s / ceiling, 0.0, "INFO", figures))
        add("get_many 10k random (cold) vs best one-object-per-piece GET", get_many, direct_get,
            "pieces_per_s", 5.0, remote, "pieces/s")  # fmt: skip
        if is_file:
            add("put_many 4KiB MB/s vs disk fsync'd sequential write", many, disk, "mb_per_s", 0.50, True,
                "MB/s")  # fmt: skip
    return out


# -- formatting ------------------------------------------------------------------------------


def _ratio(r: float | None) -> str:
    """Truncated, never rounded up: 0.6996 shows as 0.69x, not as a passing-looking 0.70x."""
    return "-" if r is None else f"{math.floor(r * 100) / 100:.2f}x"


def _target(c: Check) -> str:
    return f">= {c.target:g}x" if c.target else "-"  # 0: a figure to read, not a target


def _fmt(x: float) -> str:
    if x >= 100_000:
        return f"{x / 1000:.0f}k"
    if x >= 10_000:
        return f"{x / 1000:.1f}k"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _ms(d: dict[str, float] | None, k: str) -> str:
    if not d or k not in d:
        return "-"
    v = d[k]
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _spread(r: Row) -> str:
    if r.pieces_per_s <= 0:
        return ""
    half = (r.pieces_per_s_max - r.pieces_per_s_min) / 2 / r.pieces_per_s * 100
    return f" ±{half:.0f}%"


def _per_piece(v: float) -> str:
    """0.00024 reads badly; "1/4096" says one request per 4,096 pieces."""
    return f"{v:.2g}" if v >= 0.1 else f"1/{1 / v:,.0f}"


def _requests(r: Row) -> str:
    if not r.requests or not r.pieces:
        return "-"
    top = sorted(r.requests.items(), key=lambda kv: -kv[1])[:2]
    return " ".join(f"{k} {_per_piece(v / r.pieces)}" for k, v in top)


def _of_large(r: Row) -> str:
    return "-" if r.of_large is None else f"{r.of_large * 100:.0f}%"


def _tables(r: Row) -> str:
    if r.pieces_per_table is None:
        return "-"
    return f"{r.pieces_per_table['median']:.0f}"


COLUMNS = (
    "Provider", "Workload", "Path", "Size", "Conc", "Batch", "Pieces/s", "MB/s", "vs large", "p50", "p90",
    "p99", "max", "TTFB", "Errors", "Requests/piece", "Pcs/table",
)  # fmt: skip
LEFT = {"Provider", "Workload", "Path", "Requests/piece"}


def _cells(r: Row) -> list[str]:
    lat = [_ms(r.latency_ms, k) for k in ("p50", "p90", "p99", "max")]
    return [
        r.provider, r.workload, r.path, size_label(r.size), str(r.concurrency), str(r.batch),
        _fmt(r.pieces_per_s) + _spread(r), _fmt(r.mb_per_s) if r.mb_per_s else "-", _of_large(r),
        *lat, _ms(r.ttfb_ms, "p50"), _errors(r), _requests(r), _tables(r),
    ]  # fmt: skip


def _errors(r: Row) -> str:
    if not r.errors:
        return "0"
    return ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items()))


@dataclass
class BenchResult:
    """Everything one bench run produced; ``to_json`` is what lands under benchmarks/results/."""

    rows: list[Row]
    checks: list[Check]
    meta: dict[str, Any]
    json_path: Path | None = None
    chart_paths: list[Path] = field(default_factory=list)
    markdown_path: Path | None = None

    @property
    def quick(self) -> bool:
        return bool(self.meta.get("quick"))

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "rows": [asdict(r) for r in self.rows],
            "headline": [asdict(c) for c in self.checks],
        }

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n")
        self.json_path = path
        return path

    def _caption(self) -> str:
        p = self.meta.get("params", {})
        return (
            f"medians of {p.get('runs')} runs of {p.get('run_seconds', 0):.2g} s after a "
            f"{p.get('warmup', 0):.2g} s warm-up; ±: half the min-max spread; latency per call in ms; "
            "vs large: MB/s as a share of the provider's large-object PUT (GET) MB/s; requests per "
            "piece; cold reads (no piece cache), every read verified"
        )

    def _title(self) -> str:
        return "piecestore bench" + (" — QUICK MODE (short cells, indicative only)" if self.quick else "")

    def render_table(self) -> Table:
        table = Table(title=self._title(), caption=self._caption())
        for name in COLUMNS:
            table.add_column(name, justify="left" if name in LEFT else "right")
        last = None
        for r in self.rows:
            if last is not None and r.provider != last:
                table.add_section()
            last = r.provider
            table.add_row(*_cells(r), style="red" if r.errors else None)
        return table

    def to_markdown(self) -> str:
        """The same tables as markdown, for pasting into a README."""
        lines = [f"**{self._title()}** — {self._caption()}", ""]
        lines.append("| " + " | ".join(COLUMNS) + " |")
        lines.append("|" + "|".join(":--" if c in LEFT else "--:" for c in COLUMNS) + "|")
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in self.rows]
        lines += [
            "",
            "| Provider | Check | Ratio | Target | Result | Figures (medians) |",
            "|:--|:--|--:|--:|:--|:--|",
        ]
        for c in self.checks:
            ratio = _ratio(c.ratio)
            lines.append(
                f"| {c.provider} | {c.check} | {ratio} | {_target(c)} | **{c.status}** | {c.figures} |"
            )
        return "\n".join(lines) + "\n"

    def render_headline(self) -> Table:
        table = Table(title="headline: piece-engine targets" + (" (QUICK MODE)" if self.quick else ""))
        for name in ("Provider", "Check", "Ratio", "Target", "Result", "Figures (medians)"):
            table.add_column(name)
        colors = {"PASS": "green", "FAIL": "red", "INFO": "cyan", "N/A": "yellow"}
        for c in self.checks:
            table.add_row(
                c.provider, c.check, _ratio(c.ratio), _target(c),
                f"[{colors[c.status]}]{c.status}[/]", c.figures,
            )  # fmt: skip
        return table
