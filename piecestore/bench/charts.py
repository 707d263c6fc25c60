"""PNG charts of a bench run: throughput by piece size, and packed versus one object per piece."""

from __future__ import annotations

from pathlib import Path

from piecestore.bench.data import size_label
from piecestore.bench.results import BenchResult, Row


def write_charts(result: BenchResult, out_dir: Path, stem: str) -> list[Path]:
    """Write the PNGs next to the JSON; matplotlib is imported here only (headless Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    paths = []
    for draw, suffix in ((_by_size, "throughput_by_size"), (_packed_vs_direct, "packed_vs_direct")):
        path = out_dir / f"{stem}-{suffix}.png"
        if draw(result, path):
            paths.append(path)
    return paths


def _providers(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.provider for r in rows))


def _by_size(result: BenchResult, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.pieces > 0]
    if not any(r.workload in ("put_many", "get_many") for r in rows):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (workload, reference, title) in zip(
        axes,
        (
            ("put_many", "large_put", "write: put_many (durable)"),
            ("get_many", "large_get", "read: get_many (cold)"),
        ),
        strict=True,
    ):
        for n, provider in enumerate(_providers(rows)):
            color = colors[n % len(colors)]
            points = sorted(
                (r.size, r.mb_per_s) for r in rows
                if r.provider == provider and r.workload == workload and r.concurrency == 1
            )  # fmt: skip
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=color, label=provider)
            ref = [r.mb_per_s for r in rows if r.provider == provider and r.workload == reference]
            if ref:
                ax.axhline(max(ref), color=color, linestyle="--", linewidth=1, alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({r.size for r in rows if r.workload == workload})
        ax.set_xticks(sizes, [size_label(s) for s in sizes])
        ax.set_xlabel("piece size")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("MB/s (median of runs)")
    axes[0].legend(title="provider (dashed: large-object bandwidth)")
    fig.suptitle("piecestore throughput by piece size" + (" — QUICK MODE" if result.quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _pick(rows: list[Row], provider: str, workload: str, conc: int | None = None) -> float:
    server = {r.server for r in rows if r.provider == provider}
    found = [
        r.pieces_per_s
        for r in rows
        if (r.provider == provider or (workload.startswith("obstore") and r.server in server))
        and r.workload == workload
        and r.size == 4096
        and (conc is None or r.concurrency == conc)
    ]
    return max(found, default=0.0)


def _packed_vs_direct(result: BenchResult, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.pieces > 0]
    providers = _providers(rows)
    writes = (
        ("put_many", None, "packed put_many"),
        ("put", 16, "packed put x16 threads"),
        ("direct_put", None, "one object per piece (best c)"),
        ("obstore_put", None, "obstore, one object per piece"),
    )
    reads = (
        ("get_many", None, "packed get_many 10k random"),
        ("get", 16, "packed get x16 threads"),
        ("direct_get", None, "one object per piece (best c)"),
        ("obstore_get", None, "obstore, one object per piece"),
    )
    groups = (("write 4 KiB pieces", writes), ("read 4 KiB pieces (cold)", reads))
    if not providers:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.2
    for ax, (title, bars) in zip(axes, groups, strict=True):
        drawn_any = False
        for k, (workload, conc, label) in enumerate(bars):
            values = [_pick(rows, p, workload, conc) for p in providers]
            drawn_any = drawn_any or any(v > 0 for v in values)
            xs = [i + (k - 1.5) * width for i in range(len(providers))]
            drawn = ax.bar(xs, values, width, label=label)
            ax.bar_label(drawn, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=7, rotation=90,
                         padding=2)  # fmt: skip
        ax.set_xticks(range(len(providers)), providers)
        if drawn_any:  # a log scale needs a positive value (a tiny run may have none in a panel)
            ax.set_yscale("log")
            low, high = ax.get_ylim()
            ax.set_ylim(low, high * 4)  # room for the value labels above the bars
        ax.set_ylabel("pieces/s (median of runs)")
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("packed pieces vs one object per piece" + (" — QUICK MODE" if result.quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
