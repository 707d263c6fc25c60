"""Which tables background compaction merges next: a pure policy over table sizes.

Two reasons to merge, and only these, because every merge rewrites bytes the writers also
need bandwidth for:

* many *small* tables (group commits under light load, small put_many calls): merged in
  size tiers, as LSM stores do, so each byte is rewritten about log2(n) times;
* too many tables of any size below the target (NBS's conjoin): the adjacent run with the
  fewest bytes is merged, which caps the manifest's length and the tables a lookup checks.

A table filled by a full flush or a large put_many is not small: rewriting it buys nothing a
reader notices, and merging each one as it lands would halve a bulk load's bandwidth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def small_table_bytes(table_target_bytes: int, flush_bytes: int) -> int:
    """Tables below this are small: less than half a full flush (or a quarter of the target)."""
    return max(1, min(table_target_bytes // 4, flush_bytes // 2))


def pick_run(
    sizes: Sequence[int], *, small: int, target: int, min_tables: int, max_tables: int
) -> tuple[int, int] | None:
    """``(start, stop)`` of the adjacent tables (newest first) to merge next, or None.

    ``min_tables`` small tables in a row at the top start a tiered merge; beyond
    ``max_tables`` tables, the adjacent ``min_tables`` below ``target`` with the fewest bytes
    are conjoined, but only where that at least halves their count (merged output is cut into
    tables of ``target`` bytes, so conjoining near-full tables would only rewrite them).
    """
    count = 0
    total = 0
    for size in sizes:
        # A table joins while it is no bigger than all newer ones of the run together.
        if size >= small or (count and size > total):
            break
        count += 1
        total += size
    if count >= min_tables:
        return 0, count
    if len(sizes) <= max_tables or len(sizes) < min_tables:
        return None
    arr = np.asarray(sizes, dtype=np.int64)
    sums = np.convolve(arr, np.ones(min_tables, dtype=np.int64), mode="valid")  # window totals
    full = np.convolve(arr >= target, np.ones(min_tables, dtype=np.int64), mode="valid") > 0
    sums[full] = np.iinfo(np.int64).max  # windows holding a table at target are never conjoined
    start = int(np.argmin(sums))
    outputs = -(-int(sums[start]) // target)  # ceil: tables the merge writes
    if full[start] or outputs > min_tables // 2:
        return None
    return start, start + min_tables
