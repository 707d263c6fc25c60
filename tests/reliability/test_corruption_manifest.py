"""Corruption of the manifest: every bit flip and truncation is detected on open or by fsck.

The manifest is the store's root: a flipped table name, size or count would silently point
reads elsewhere, so it carries its own checksum and damage is refused (CorruptionError).
"""

from __future__ import annotations

import random

import pytest

from piecestore import CorruptionError
from piecestore.manifest import MANIFEST_NAME
from tests.reliability._support import open_store, remote
from tests.reliability.test_corruption import Built, assert_reads, built

__all__ = ["built"]


def test_manifest_damage_is_detected(built: Built) -> None:
    """Every sampled bit flip of the manifest, and every truncation, is refused on open."""
    b = built
    original = b.raw.get(MANIFEST_NAME)
    rng = random.Random(5)
    positions = sorted(rng.sample(range(len(original) * 8), min(120, len(original) * 8)))
    if remote(b.url):
        positions = positions[::12]
    undetected: list[str] = []
    for bitpos in positions:
        data = bytearray(original)
        data[bitpos // 8] ^= 1 << (bitpos % 8)
        b.raw.put(MANIFEST_NAME, bytes(data))
        try:
            with open_store(b.url) as s:
                report = s.fsck()
                if report.ok:
                    undetected.append(f"byte {bitpos // 8} ({original[bitpos // 8 - 8 : bitpos // 8 + 8]!r})")
        except CorruptionError:
            pass
    for size in (0, 1, len(original) // 2, len(original) - 1):
        b.raw.put(MANIFEST_NAME, original[:size])
        with pytest.raises(CorruptionError):
            open_store(b.url).close()
    b.raw.put(MANIFEST_NAME, original)
    assert not undetected, f"{len(undetected)} manifest bit flips went unnoticed: {undetected[:5]}"
    with open_store(b.url) as s:
        assert_reads(s, b, list(b.values))
        assert s.fsck().ok
