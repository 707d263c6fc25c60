"""The data profile: exact numbers on a small store whose contents the test knows."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import piecestore
from piecestore.profile import (
    Profile,
    SizeHistogram,
    bucket_bounds,
    bucket_label,
    bucket_of,
    human_bytes,
    profile_store,
)

SMALL_MAX = 4096


def open_memory(**overrides: Any) -> Any:
    return piecestore.open(
        f"memory://profile-{uuid.uuid4().hex[:10]}",
        config_file="",
        engine_small_piece_max_bytes=SMALL_MAX,
        **overrides,
    )


@pytest.fixture
def store() -> Iterator[Any]:
    """Three commits: 7 pieces (one large), an overwrite of one, then a delete of another."""
    s = open_memory()
    s.put_many({f"p/{n}": b"x" * n for n in (0, 1, 2, 3, 100, 1000)} | {"big": b"y" * 5000})
    s.put_many({"p/100": b"z" * 300})  # shadows the first p/100
    s.delete("p/3")  # a tombstone shadowing p/3
    try:
        yield s
    finally:
        s.close()


def test_buckets_are_powers_of_two() -> None:
    assert [bucket_of(n) for n in (0, 1, 2, 3, 4, 7, 8, 1023, 1024)] == [0, 1, 2, 2, 3, 3, 4, 10, 11]
    for b in range(0, 40):
        lo, hi = bucket_bounds(b)
        assert bucket_of(lo) == b and bucket_of(hi) == b
        assert b == 0 or bucket_of(hi + 1) == b + 1
    assert bucket_label(0) == "0 B" and bucket_label(11) == "1 KiB–2 KiB"
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"


def test_exact_counts(store: Any) -> None:
    prof = profile_store(store)
    live = {"p/0": 0, "p/1": 1, "p/2": 2, "p/100": 300, "p/1000": 1000, "big": 5000}
    assert prof.exact
    assert prof.pieces == len(live) == sum(1 for _ in store.list())
    assert prof.piece_bytes == sum(live.values())
    assert (prof.packed_pieces, prof.external_pieces, prof.external_bytes) == (5, 1, 5000)
    assert prof.buffered_pieces == 0
    # 7 + 1 + 1 records in three tables; the tombstone and the first p/100 and p/3 are not live.
    assert len(prof.tables) == 3
    assert prof.records == 9
    assert prof.tombstones == 1
    assert prof.dead_records == 3
    assert [t.records for t in prof.tables] == [1, 1, 7]  # newest first, as the manifest lists
    assert [t.live_pieces for t in prof.tables] == [0, 1, 5]
    assert [t.tombstones for t in prof.tables] == [1, 0, 0]
    assert [t.externals for t in prof.tables] == [0, 0, 1]
    assert prof.tables[0].dead_record_fraction == 1.0
    assert prof.tables[2].dead_record_fraction == pytest.approx(2 / 7)
    assert all(t.dead_fraction == 0.0 for t in prof.tables)  # GC has not estimated dead bytes yet
    assert prof.table_bytes == sum(s.size for s in store.manifest.tables)
    assert prof.manifest_version == store.manifest.version == 3
    assert prof.index_ram_bytes == store.tables.nbytes() > 0
    assert prof.shards == [] and prof.shard_imbalance is None


def test_histogram_sums_match(store: Any) -> None:
    prof = profile_store(store)
    hist = prof.histogram
    assert hist.total_count == prof.pieces
    assert hist.total_bytes == prof.piece_bytes
    expected = {0: 1, 1: 1, 2: 1, 9: 1, 10: 1, 13: 1}  # 0, 1, 2, 300, 1000, 5000
    assert {b: c for b, c in hist.counts.items() if c} == expected
    rows = hist.to_json()
    assert rows[0]["bucket"] == 0 and rows[-1]["bucket"] == 13
    assert len(rows) == 14  # empty buckets in between are kept, so plots have a linear axis
    assert sum(r["count"] for r in rows) == prof.pieces
    assert sum(r["bytes"] for r in rows) == prof.piece_bytes
    for r in rows:
        assert bucket_of(r["min_size"]) == r["bucket"] == bucket_of(r["max_size"])


def test_fast_profile_is_an_upper_bound_without_io(store: Any) -> None:
    exact = profile_store(store)
    fast = profile_store(store, exact=False)
    assert not fast.exact
    # Every value record counts (the shadowed p/100 and p/3 too); tombstones do not.
    assert fast.pieces == 8 >= exact.pieces
    assert fast.external_pieces == 1
    assert fast.histogram.total_count == fast.packed_pieces == 7
    assert fast.piece_bytes == 0 + 1 + 2 + 3 + 100 + 1000 + 300  # large pieces' sizes are unknown
    assert all(t.live_pieces is None and t.dead_record_fraction is None for t in fast.tables)
    assert fast.records == exact.records and fast.tombstones == exact.tombstones


def test_cache_counters(store: Any) -> None:
    store.get("p/1000")
    store.get("p/1000")
    prof = profile_store(store)
    assert prof.cache_hits == store.cache.hits >= 1
    assert prof.cache_misses == store.cache.misses >= 1
    assert prof.cache_hit_rate == pytest.approx(prof.cache_hits / (prof.cache_hits + prof.cache_misses))
    assert prof.cache_bytes == store.cache.nbytes > 0


def test_empty_store() -> None:
    with open_memory() as s:
        prof = profile_store(s)
    assert (prof.pieces, prof.piece_bytes, prof.records, len(prof.tables)) == (0, 0, 0, 0)
    assert prof.histogram.rows() == [] and prof.cache_hit_rate is None
    data = json.loads(json.dumps(prof.to_json()))
    assert data["tables"]["count"] == 0 and data["histogram"] == []


def test_json_round_trips(store: Any) -> None:
    data = json.loads(json.dumps(profile_store(store).to_json()))
    assert data["pieces"] == 6 and data["piece_bytes"] == 6303
    assert data["tables"]["count"] == 3 and len(data["tables"]["items"]) == 3
    assert data["tables"]["dead_records"] == 3 and data["tables"]["tombstones"] == 1
    assert data["manifest"]["version"] == 3
    assert set(data["cache"]) == {"hits", "misses", "hit_rate", "bytes", "capacity"}


def test_render_and_plot(store: Any, tmp_path: Path) -> None:
    prof = profile_store(store)
    console = Console(record=True, width=120)
    console.print(prof.render())
    text = console.export_text()
    assert "pieces" in text and "piece sizes" in text and "largest tables (3 of 3)" in text
    out = prof.plot(tmp_path / "profile.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000
    empty = Profile(**{**prof.__dict__, "histogram": SizeHistogram(), "tables": []})
    assert empty.plot(tmp_path / "empty.png").stat().st_size > 0


class _Sharded:
    """What profile_store needs from a sharded store: ``shards`` and ``url``."""

    def __init__(self, shards: list[Any]) -> None:
        self.shards = shards
        self.url = "sharded://test"


def test_sharded_store_aggregates(store: Any) -> None:
    with open_memory() as other:
        other.put_many({f"q/{i}": b"q" * 10 for i in range(4)})
        prof = profile_store(_Sharded([store, other]))
        one, two = profile_store(store), profile_store(other)
    assert prof.pieces == one.pieces + two.pieces == 10
    assert prof.piece_bytes == one.piece_bytes + two.piece_bytes
    assert prof.histogram.total_count == 10
    assert prof.histogram.counts[bucket_of(10)] == 4
    assert len(prof.tables) == 4 and {t.shard for t in prof.tables} == {0, 1}
    assert prof.manifest_version is None
    assert [(s.index, s.pieces, s.manifest_version) for s in prof.shards] == [(0, 6, 3), (1, 4, 1)]
    assert prof.shard_imbalance == pytest.approx(6 / 5)
    data = json.loads(json.dumps(prof.to_json()))
    assert len(data["shards"]) == 2 and data["shard_imbalance"] == pytest.approx(1.2)
    console = Console(record=True, width=120)
    console.print(prof.render())
    assert "shards" in console.export_text()
