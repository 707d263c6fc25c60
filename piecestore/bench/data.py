"""Deterministic bench data: every provider gets byte-identical pieces under identical keys.

Pieces are windows into one seeded random pool, so values are incompressible, cost nothing to
produce during a timed run, and any read can be verified by recomputing its window.
"""

from __future__ import annotations

import random

import numpy as np

KiB = 1024
MiB = 1024 * KiB
POOL_BYTES = 128 * MiB  # room for 64 MiB windows at many offsets
SEED = 20240607


class VerifyError(Exception):
    """A read returned bytes other than those written (counted as an error, never hidden)."""


class DataPool:
    """Piece ``i`` of ``size`` bytes is ``pool[offset(size, i):][:size]``; the same on every run."""

    def __init__(self, nbytes: int = POOL_BYTES, seed: int = SEED) -> None:
        self._pool = np.random.default_rng(seed).bytes(nbytes)
        self._view = memoryview(self._pool)
        self.nbytes = nbytes

    def offset(self, size: int, i: int) -> int:
        span = self.nbytes - size + 1
        if span <= 0:
            raise ValueError(f"piece size {size} exceeds the {self.nbytes}-byte data pool")
        return (i * 2_654_435_761 + size * 97) % span

    def piece(self, size: int, i: int) -> memoryview:
        off = self.offset(size, i)
        return self._view[off : off + size]

    def verify(self, key: str, size: int, i: int, got: bytes) -> None:
        if len(got) != size or not self.same(got, size, i):
            raise VerifyError(f"{key}: read {len(got)} bytes that differ from the {size} written")

    def same(self, got: bytes, size: int, i: int) -> bool:
        off = self.offset(size, i)
        if size <= 256 * KiB:  # a bytes slice compares with memcmp; memoryview == is element-wise
            return got == self._pool[off : off + size]
        want = np.frombuffer(self._pool, dtype=np.uint8, count=size, offset=off)
        return bool(np.array_equal(np.frombuffer(got, dtype=np.uint8), want))


def piece_key(size: int, i: int) -> str:
    """Keys sort in write order, so a sequential scan is also a key-order scan."""
    return f"{size_label(size)}/{i:08d}"


def key_index(key: str) -> int:
    return int(key.rsplit("/", 1)[1])


def size_label(size: int) -> str:
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit}{name}"
    return f"{size}B"


def rng_for(*parts: object) -> random.Random:
    """A random stream that depends only on its labels, so every provider sees the same choices."""
    return random.Random("/".join(str(p) for p in parts))
