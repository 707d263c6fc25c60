"""The benchmark suite and the provider functional check.

``run_bench`` measures piecestore against the storage under it (large-object bandwidth, one
object per piece through the same driver, and obstore as a peer) and writes JSON and PNGs;
``run_check`` tells in one call whether a storage service can hold a piecestore.
"""

from __future__ import annotations

from piecestore.bench.check import CheckResult, run_check
from piecestore.bench.results import BenchResult, Check, Row
from piecestore.bench.runner import run_bench
from piecestore.bench.workloads import WORKLOADS

__all__ = ["WORKLOADS", "BenchResult", "Check", "CheckResult", "Row", "run_bench", "run_check"]
