"""Which tables background compaction picks: small runs tier, full tables wait for the cap."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import piecestore
from piecestore.tiering import pick_run, small_table_bytes

MiB = 1 << 20
TARGET = 64 * MiB
SMALL = small_table_bytes(TARGET, 16 * MiB)


def pick(sizes: list[int], *, min_tables: int = 8, max_tables: int = 256) -> tuple[int, int] | None:
    return pick_run(sizes, small=SMALL, target=TARGET, min_tables=min_tables, max_tables=max_tables)


def test_small_means_under_half_a_flush() -> None:
    assert small_table_bytes(TARGET, 16 * MiB) == 8 * MiB
    assert small_table_bytes(64 * MiB, 1 << 30) == 16 * MiB  # and never above a quarter of the target


def test_newest_small_tables_merge_in_tiers() -> None:
    assert pick([MiB] * 7) is None  # one short of the trigger
    assert pick([MiB] * 8) == (0, 8)
    # an older table joins while no bigger than the run above it, so it is not rewritten with
    # every few small ones
    assert pick([MiB] * 8 + [7 * MiB, MiB]) == (0, 10)
    assert pick([MiB] * 4 + [6 * MiB] + [MiB] * 8) is None


def test_full_tables_are_left_alone_below_the_cap() -> None:
    """A bulk load of 16 MiB put_many tables is not rewritten as it lands."""
    assert pick([16 * MiB] * 200) is None
    assert pick([MiB] * 8 + [16 * MiB] * 200) == (0, 8)


def test_beyond_the_cap_the_smallest_adjacent_run_is_conjoined() -> None:
    sizes = [16 * MiB] * 300
    sizes[100:108] = [10 * MiB] * 8
    assert pick(sizes) == (100, 108)
    # tables at the target are never conjoined, nor runs that would not halve their count
    assert pick([TARGET] * 300) is None
    assert pick([40 * MiB] * 300) is None
    assert pick([TARGET, 16 * MiB] * 150) is None  # every window holds a table at the target


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 2 * TARGET), max_size=60),
    min_tables=st.integers(2, 9),
    max_tables=st.integers(2, 40),
)
def test_compacting_until_nothing_is_picked_terminates(
    sizes: list[int], min_tables: int, max_tables: int
) -> None:
    """Every pick is a valid window and its merge lowers the table count, so it ends."""
    tables = list(sizes)
    for _ in range(len(sizes) + 1):
        picked = pick(tables, min_tables=min_tables, max_tables=max_tables)
        if picked is None:
            break
        start, stop = picked
        window = tables[start:stop]
        assert 0 <= start < stop <= len(tables) and len(window) >= min_tables
        if start > 0 or not all(s < SMALL for s in window):
            assert len(tables) > max_tables and len(window) == min_tables
            assert all(s < TARGET for s in window)
        total = sum(window)
        outputs = -(-total // TARGET)
        assert outputs < len(window)
        tables[start:stop] = [total // outputs] * outputs
    else:
        raise AssertionError(f"compaction did not settle: {tables}")
    assert pick(tables, min_tables=min_tables, max_tables=max_tables) is None


def test_store_leaves_full_tables_and_conjoins_past_the_cap(tmp_path: Any) -> None:
    url = f"file://{tmp_path}"
    small_flush = {"flush_bytes": 64 * 1024, "table_target_bytes": 1 * MiB}
    with piecestore.open(url, gc_compact_min_tables=4, gc_compact_max_tables=12, **small_flush) as s:
        for r in range(10):  # each put_many fills a flush: full tables, below the cap
            s.put_many({f"full/{r}/{i}": bytes([r]) * 1024 for i in range(64)})
        s.gc(dry_run=True)  # waits for a running background compaction
        assert len(s.manifest.tables) == 10
        for r in range(10, 16):  # past the cap: adjacent runs are conjoined
            s.put_many({f"full/{r}/{i}": bytes([r]) * 1024 for i in range(64)})
        s.gc(dry_run=True)
        s.refresh()
        assert len(s.manifest.tables) <= 12
        got = s.get_many([f"full/{r}/{i}" for r in range(16) for i in range(64)])
        assert all(v == bytes([int(k.split("/")[1])]) * 1024 for k, v in got.items())
