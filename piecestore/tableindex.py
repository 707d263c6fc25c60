"""The in-RAM index of one table file: a handful of numpy arrays, never a Python object per record.

A reader keeps one of these per table the manifest lists, for as long as the table is live, so
its size is what bounds how many pieces a process can address. Per record it holds the 64-bit
key hash (sorted, for an exact membership test and lookup by binary search), the record's
position for that hash, the record's start offset (uint32 while the file is under 4 GiB), the
key length and the kind: 19 bytes a record (23 for files of 4 GiB or more).

It is built only by :func:`piecestore.table.parse_index`, which has checked every array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

# A module import (not ``from ... import``) so the two modules may import each other in either
# order, and so a test that monkeypatches ``table.key_hash`` changes what lookups hash with.
from piecestore import table as _table


class TableIndex:
    """Lookups by key hash, record spans and per-record kind/size of one immutable table file."""

    __slots__ = (
        "count",
        "file_size",
        "hashes",
        "index_bytes",
        "key_lens",
        "keys_bytes",
        "keys_checksum",
        "kinds",
        "name",
        "offsets",
        "positions",
        "records_bytes",
    )

    def __init__(
        self,
        *,
        name: str,
        file_size: int,
        index_bytes: int,
        keys_bytes: int,
        records_bytes: int,
        keys_checksum: int,
        hashes: NDArray[np.uint64],
        positions: NDArray[np.uint32],
        offsets: NDArray[np.unsignedinteger[Any]],
        key_lens: NDArray[np.uint16],
        kinds: NDArray[np.uint8],
    ) -> None:
        self.name = name
        self.count = int(kinds.shape[0])
        self.file_size = file_size
        self.index_bytes = index_bytes
        self.keys_bytes = keys_bytes
        self.records_bytes = records_bytes  # = offset of the key block
        self.keys_checksum = keys_checksum
        self.hashes = hashes  # sorted ascending; ties ordered by position
        self.positions = positions  # positions[i] = record whose key hash is hashes[i]
        self.offsets = offsets  # count + 1 record start offsets; the last is records_bytes
        self.key_lens = key_lens  # UTF-8 byte length of each record's key
        self.kinds = kinds

    def __repr__(self) -> str:
        return f"TableIndex({self.name!r}, count={self.count}, file_size={self.file_size})"

    def __len__(self) -> int:
        return self.count

    def find(self, key: str) -> list[int]:
        """Positions of the records whose key hash equals key's: [] means certainly absent.

        More than one only on a 64-bit hash collision; the caller then compares stored keys.
        """
        h = _table.key_hash(key)
        hashes = self.hashes
        lo = int(hashes.searchsorted(np.uint64(h)))  # np.uint64: a Python int may compare as float64
        if lo == self.count or int(hashes[lo]) != h:
            return []
        if lo + 1 == self.count or int(hashes[lo + 1]) != h:
            return [int(self.positions[lo])]
        hi = int(hashes.searchsorted(np.uint64(h), side="right"))
        return [int(p) for p in self.positions[lo:hi]]

    def find_many(self, keys: Sequence[str]) -> list[list[int]]:
        """``[find(k) for k in keys]``, with the binary searches done as one numpy call."""
        n = len(keys)
        if n == 0:
            return []
        out: list[list[int]] = [[] for _ in range(n)]
        if self.count == 0:
            return out
        kh = _table.key_hash
        wanted = np.fromiter((kh(k) for k in keys), dtype=np.uint64, count=n)
        lo = self.hashes.searchsorted(wanted, side="left")
        hi = self.hashes.searchsorted(wanted, side="right")
        width = hi - lo
        single = np.flatnonzero(width == 1)
        for i, pos in zip(single.tolist(), self.positions[lo[single]].tolist(), strict=True):
            out[i] = [pos]
        for i in np.flatnonzero(width > 1).tolist():  # 64-bit collisions only
            out[i] = self.positions[lo[i] : hi[i]].tolist()
        return out

    def may_contain(self, key_hash: int) -> bool:
        """Exact for this table's key hashes: False means no record has this hash, so no I/O is needed."""
        lo = int(self.hashes.searchsorted(np.uint64(key_hash)))
        return lo < self.count and int(self.hashes[lo]) == key_hash

    def kind(self, pos: int) -> int:
        """VALUE, TOMBSTONE or EXTERNAL, known without reading the record (list skips tombstones)."""
        return int(self.kinds[self._check(pos)])

    def value_size(self, pos: int) -> int:
        """Payload length of record pos, from the offsets: list reports sizes without reading values."""
        pos = self._check(pos)
        span = int(self.offsets[pos + 1]) - int(self.offsets[pos])
        return span - _table.RECORD_HEADER.size - int(self.key_lens[pos])

    def span(self, pos: int) -> tuple[int, int]:
        """(offset, length) of record pos in the file."""
        pos = self._check(pos)
        start = int(self.offsets[pos])
        return start, int(self.offsets[pos + 1]) - start

    def nbytes(self) -> int:
        """RAM held by the arrays (the per-object overhead is a few hundred bytes on top)."""
        return int(
            self.hashes.nbytes + self.positions.nbytes + self.offsets.nbytes + self.key_lens.nbytes
            + self.kinds.nbytes
        )  # fmt: skip

    def _check(self, pos: int) -> int:
        if not 0 <= pos < self.count:
            raise IndexError(f"record {pos} out of range for table {self.name} of {self.count} records")
        return pos
