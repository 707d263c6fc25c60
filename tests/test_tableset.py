"""The loaded index set: what a manifest sync keeps, fetches and drops."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from piecestore import tableset
from piecestore.backends import open_backend
from piecestore.manifest import TableSpec
from piecestore.table import VALUE, BuiltTable, build_table
from piecestore.tableset import TableSet, table_object


def built(key: str) -> tuple[TableSpec, BuiltTable]:
    t = build_table([(key, VALUE, b"v")])
    return TableSpec(t.name, t.count, len(t.data), t.index_bytes, t.keys_bytes, t.live_bytes), t


class CountingGets:
    def __init__(self, backend: Any) -> None:
        self.backend, self.gets = backend, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def get(self, *a: Any, **kw: Any) -> bytes:
        self.gets += 1
        return self.backend.get(*a, **kw)  # type: ignore[no-any-return]


@pytest.fixture
def tables() -> Any:
    backend = CountingGets(open_backend("memory://tableset-test"))
    with ThreadPoolExecutor(2) as pool:
        yield TableSet(backend, pool), backend  # type: ignore[arg-type]


def test_a_sync_before_its_commit_keeps_a_built_table(tables: Any) -> None:
    """With pipelined commits, batch N's commit syncs while batch N+1 is uploaded, not committed."""
    ts, backend = tables
    old, t_old = built("a")
    new, t_new = built("b")
    for spec, t in ((old, t_old), (new, t_new)):
        backend.put(table_object(spec.name), t.data)
        ts.add_built(t)
    ts.sync([old])  # a manifest that lists only the older table
    ts.sync([new, old])  # the newer one's commit
    assert backend.gets == 0  # its index was kept, not fetched back
    assert [s.name for s, _ in ts.snapshot()] == [new.name, old.name]
    ts.sync([new])
    assert [s.name for s, _ in ts.snapshot()] == [new.name]
    assert old.name not in ts._indexes  # published, then left the manifest: dropped


def test_failed_and_stale_commits_do_not_pin_indexes(tables: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ts, _ = tables
    a, t_a = built("a")
    b, t_b = built("b")
    ts.add_built(t_a)
    ts.add_built(t_b)
    ts.discard([a.name])  # its commit failed
    ts.sync([])
    assert a.name not in ts._indexes and b.name in ts._indexes
    monkeypatch.setattr(tableset, "UNPUBLISHED_TTL", 0.0)
    ts.sync([])  # b waited longer than the TTL for its commit
    assert b.name not in ts._indexes
