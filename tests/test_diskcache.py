"""The on-disk cache of table ranges: serves repeat reads, survives damage, stays in budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import piecestore
from piecestore.diskcache import DiskCache


def count_gets(store: Any) -> dict[str, int]:
    calls = {"n": 0}
    backend = store.backend
    get, groups = backend._get, backend._get_groups

    def counting_get(name: str, off: int, length: int | None) -> bytes:
        calls["n"] += 1
        return bytes(get(name, off, length))

    def counting_groups(name: str, spans: list[tuple[int, int]]) -> list[bytes]:
        calls["n"] += len(spans)
        return list(groups(name, spans))

    backend._get, backend._get_groups = counting_get, counting_groups
    return calls


def test_repeat_reads_come_from_disk(tmp_path: Path) -> None:
    url, cache_dir = f"file://{tmp_path / 'store'}", tmp_path / "cache"
    items = {f"d/{i}": bytes([i % 251]) * 500 for i in range(300)}
    with piecestore.open(url) as s:
        s.put_many(items)
    opts: dict[str, Any] = {"cache_disk_dir": str(cache_dir), "cache_memory_bytes": 0}
    with piecestore.open(url, **opts) as s:
        assert s.get_many(list(items)) == items
        assert s.get("d/7") == items["d/7"]
    assert any(cache_dir.glob("*.range"))
    with piecestore.open(url, **opts) as s:  # index and records now on local disk
        calls = count_gets(s)
        assert s.get_many(list(items)) == items
        assert s.get("d/9") == items["d/9"]
        assert calls["n"] == 0
        assert s.disk_cache is not None and s.disk_cache.hits > 0


def test_damaged_cache_file_is_never_returned(tmp_path: Path) -> None:
    url, cache_dir = f"file://{tmp_path / 'store'}", tmp_path / "cache"
    opts: dict[str, Any] = {"cache_disk_dir": str(cache_dir), "cache_memory_bytes": 0}
    with piecestore.open(url, **opts) as s:
        s.put("k", b"precious bytes" * 10)
        assert s.get("k") == b"precious bytes" * 10
    for path in cache_dir.glob("*.range"):
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    with piecestore.open(url, **opts) as s:
        assert s.get("k") == b"precious bytes" * 10
        assert s.get_many(["k"]) == {"k": b"precious bytes" * 10}


def test_budget_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, capacity_bytes=4000)
    for i in range(10):
        cache.put("t", i * 1000, 1000, bytes([i]) * 1000)
        if i >= 1:
            assert cache.get("t", 0, 1000) is not None  # keep entry 0 hot
    assert cache.nbytes <= 4000
    assert cache.get("t", 0, 1000) == bytes([0]) * 1000
    assert cache.get("t", 1000, 1000) is None
    assert len(list(tmp_path.glob("*.range"))) == len(cache._entries)
    reopened = DiskCache(tmp_path, capacity_bytes=4000)  # files are reused by the next process
    assert reopened.get("t", 9000, 1000) == bytes([9]) * 1000
