"""The loaded indexes of the tables a manifest lists, and where each key lives.

Each table's index is fetched once, with one suffix-range read whose length the manifest
gives, and kept as compact arrays; lookups of absent keys are answered from the sorted key
hashes without any I/O.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Executor

from piecestore.backends import Backend
from piecestore.diskcache import DiskCache
from piecestore.errors import CorruptionError
from piecestore.manifest import TABLES_PREFIX, TableSpec
from piecestore.table import parse_index
from piecestore.tableindex import TableIndex


def table_object(name: str) -> str:
    return TABLES_PREFIX + name


class TableSet:
    def __init__(self, backend: Backend, pool: Executor, disk_cache: DiskCache | None = None) -> None:
        self.backend = backend
        self.disk_cache = disk_cache
        self._pool = pool
        self._lock = threading.Lock()
        self._indexes: dict[str, TableIndex] = {}
        self._order: tuple[TableSpec, ...] = ()  # newest first

    def add_built(self, spec: TableSpec, suffix: bytes) -> None:
        """Register a table this process just wrote, from bytes already in hand."""
        index = parse_index(spec.name, suffix, file_size=spec.size)
        with self._lock:
            self._indexes[spec.name] = index

    def sync(self, specs: Sequence[TableSpec]) -> None:
        """Make the loaded set match a manifest: load new indexes concurrently, drop old ones."""
        with self._lock:
            missing = [s for s in specs if s.name not in self._indexes]
        loaded = list(self._pool.map(self._load, missing))
        wanted = {s.name for s in specs}
        with self._lock:
            for spec, index in zip(missing, loaded, strict=True):
                self._indexes[spec.name] = index
            for name in [n for n in self._indexes if n not in wanted]:
                del self._indexes[name]
            self._order = tuple(specs)

    def _load(self, spec: TableSpec) -> TableIndex:
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
