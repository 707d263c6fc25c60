"""Run the piecestore benchmark suite (or the provider check) from a source checkout.

    python benchmarks/run.py                      # memory, file, local SeaweedFS (s3 + minio)
    python benchmarks/run.py --quick              # about two minutes, indicative only
    python benchmarks/run.py --providers memory s3://bucket/prefix?endpoint=http://host:9000
    python benchmarks/run.py --workloads headline # only the cells the piece-engine targets need
    python benchmarks/run.py --check minio://host:9000/bucket?secure=false

Everything lives in ``piecestore.bench``; this script only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

from piecestore.bench import run_bench, run_check

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--providers", nargs="+", help="memory, file, s3, minio, or store URLs")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and levels, short cells")
    parser.add_argument("--workloads", nargs="+", help="workload names or patterns, or 'headline'")
    parser.add_argument("--seconds-per-cell", type=float, help="measured seconds per cell (all runs)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results directory (default {RESULTS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--check", metavar="URL", help="run the provider functional check instead")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 220)  # a log file gets the whole table
    if args.check:
        check = run_check(args.check)
        console.print(check.render_table())
        return 0 if check.ok else 1
    t0 = time.monotonic()
    result = run_bench(
        args.providers,
        quick=args.quick,
        out_dir=args.out,
        progress=not args.no_progress,
        workloads=args.workloads,
        seconds_per_cell=args.seconds_per_cell,
    )
    console.print(result.render_table())
    console.print(result.render_headline())
    console.print(f"results: {result.json_path}")
    console.print(f"table:   {result.markdown_path}")
    for path in result.chart_paths:
        console.print(f"chart:   {path}")
    console.print(f"took {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
