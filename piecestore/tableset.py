"""The loaded indexes of the tables a manifest lists, and where each key lives.

Each table's index is fetched once, with one suffix-range read whose length the manifest
gives, and kept as compact arrays; lookups of absent keys are answered from the sorted key
hashes without any I/O.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np

from piecestore.backends import Backend
from piecestore.diskcache import DiskCache
from piecestore.errors import CorruptionError, NotFoundError, PieceStoreError
from piecestore.manifest import TABLES_PREFIX, TableSpec
from piecestore.table import (
    FOOTER,
    FOOTER_BYTES,
    FORMAT_VERSION,
    MAGIC,
    BuiltTable,
    checksum,
    key_hash,
    parse_index,
)
from piecestore.tableindex import TableIndex

# How long a built table may wait for its commit before a sync forgets its index (it is then
# fetched again if the commit still lands): bounds what a failed commit can leave in memory.
UNPUBLISHED_TTL = 600.0


def table_object(name: str) -> str:
    return TABLES_PREFIX + name


class BrokenIndex:
    """Stands in for a listed table whose index cannot be loaded (damaged, truncated, missing).

    The store still opens (so fsck can run) and tables newer than this one still read. A key
    that may live in this table raises CorruptionError rather than fall through to an older
    version; only a key the table's checksummed key block proves absent falls through. Listing
    and GC need the whole index, so any other use raises CorruptionError too.
    """

    def __init__(self, name: str, error: PieceStoreError, keys: frozenset[str] | None) -> None:
        self.name = name
        self.error = error
        self.keys = keys
        if keys is not None:  # lookups by hash arrays see the proven keys; reading them raises
            self.hashes = np.sort(np.fromiter(map(key_hash, keys), dtype=np.uint64, count=len(keys)))
            self.positions = np.arange(len(keys), dtype=np.uint32)

    def _raise(self) -> CorruptionError:
        return CorruptionError(
            f"table {self.name} listed in the manifest is damaged or missing ({self.error}); "
            "pieces it may hold cannot be read: run `piecestore fsck`"
        )

    def find(self, key: str) -> list[int]:
        if self.keys is not None and key not in self.keys:
            return []
        raise self._raise()

    def find_many(self, keys: Sequence[str]) -> list[list[int]]:
        return [self.find(k) for k in keys]

    def nbytes(self) -> int:
        return 0

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise self._raise()

    def __repr__(self) -> str:
        return f"BrokenIndex({self.name!r})"


class TableSet:
    def __init__(self, backend: Backend, pool: Executor, disk_cache: DiskCache | None = None) -> None:
        self.backend = backend
        self.disk_cache = disk_cache
        self._pool = pool
        self._lock = threading.Lock()
        self._indexes: dict[str, TableIndex] = {}
        self._order: tuple[TableSpec, ...] = ()  # newest first
        # Tables this process built that no manifest has listed yet (a batch or a compaction
        # about to commit), with when they were added: a sync in between must not drop them,
        # or their commit would fetch back an index it had in hand.
        self._unpublished: dict[str, float] = {}

    def add_built(self, table: BuiltTable) -> TableSpec:
        """Register a table this process just wrote, from bytes already in hand; its manifest entry."""
        spec = TableSpec(
            table.name, table.count, table.size, table.index_bytes, table.keys_bytes, table.live_bytes
        )
        index = parse_index(spec.name, table.tail(table.index_bytes), file_size=spec.size)
        with self._lock:
            self._indexes[spec.name] = index
            self._unpublished[spec.name] = time.monotonic()
        return spec

    def discard(self, names: Iterable[str]) -> None:
        """Forget built tables whose commit failed."""
        with self._lock:
            for name in names:
                if self._unpublished.pop(name, None) is not None:
                    self._indexes.pop(name, None)

    def sync(self, specs: Sequence[TableSpec]) -> list[str]:
        """Make the loaded set match a manifest: load new indexes concurrently, drop old ones.

        Returns the names of listed tables found missing from the store: removed since the
        manifest was read (then a newer manifest no longer lists them), or lost.
        """
        with self._lock:  # broken indexes are retried: the damage may have been repaired
            missing = [s for s in specs if not isinstance(self._indexes.get(s.name), TableIndex)]
        loaded = list(self._pool.map(self._load, missing))
        wanted = {s.name for s in specs}
        stale = time.monotonic() - UNPUBLISHED_TTL
        with self._lock:
            for spec, index in zip(missing, loaded, strict=True):
                self._indexes[spec.name] = index
            for name in wanted.intersection(self._unpublished):
                del self._unpublished[name]
            for name, added in list(self._unpublished.items()):
                if added < stale:
                    del self._unpublished[name]
            for name in [n for n in self._indexes if n not in wanted and n not in self._unpublished]:
                del self._indexes[name]
            self._order = tuple(specs)
        return [
            spec.name
            for spec, index in zip(missing, loaded, strict=True)
            if isinstance(index, BrokenIndex) and isinstance(index.error, NotFoundError)
        ]

    def _load(self, spec: TableSpec) -> TableIndex:
        try:
            return self._load_index(spec)
        except NotFoundError as e:
            return BrokenIndex(spec.name, e, None)  # type: ignore[return-value]
        except CorruptionError as e:
            return BrokenIndex(spec.name, e, self._keys_if_footer_intact(spec))  # type: ignore[return-value]

    def _keys_if_footer_intact(self, spec: TableSpec) -> frozenset[str] | None:
        """The table's keys, if its footer agrees with the manifest and its key block checksum."""
        try:
            suffix = self.backend.get(
                table_object(spec.name), offset=spec.size - spec.index_bytes, length=spec.index_bytes
            )
        except PieceStoreError:
            return None
        if len(suffix) != spec.index_bytes or len(suffix) < FOOTER_BYTES:
            return None
        count, records, keys_bytes, index_len, keys_cks, version, _, _, magic = FOOTER.unpack(
            suffix[-FOOTER_BYTES:]
        )
        if (
            magic != MAGIC
            or version != FORMAT_VERSION
            or index_len + FOOTER_BYTES != spec.index_bytes
            or records + keys_bytes + spec.index_bytes != spec.size
            or (count, keys_bytes) != (spec.count, spec.keys_bytes)
        ):
            return None
        try:
            block = self.backend.get(table_object(spec.name), offset=records, length=keys_bytes)
            if len(block) != keys_bytes or checksum(block) != keys_cks:
                return None
            keys = block[:-1].decode("utf-8").split("\x00") if count else []
        except (PieceStoreError, UnicodeDecodeError):
            return None
        return frozenset(keys) if len(keys) == count else None

    def _load_index(self, spec: TableSpec) -> TableIndex:
        off, length = spec.size - spec.index_bytes, spec.index_bytes
        if self.disk_cache is not None:
            cached = self.disk_cache.get(spec.name, off, length)
            if cached is not None:
                try:
                    return parse_index(spec.name, cached, file_size=spec.size)
                except CorruptionError:
                    self.disk_cache.drop(spec.name, off, length)
        suffix = self.backend.get(table_object(spec.name), offset=off, length=length)
        index = parse_index(spec.name, suffix, file_size=spec.size)
        if self.disk_cache is not None:
            self.disk_cache.put(spec.name, off, length, suffix)
        return index

    def snapshot(self) -> list[tuple[TableSpec, TableIndex]]:
        """The tables newest first with their indexes, as one consistent list."""
        with self._lock:
            return [(s, self._indexes[s.name]) for s in self._order if s.name in self._indexes]

    def nbytes(self) -> int:
        with self._lock:
            return sum(i.nbytes() for i in self._indexes.values())
