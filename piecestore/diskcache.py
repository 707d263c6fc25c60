"""An on-disk cache of table byte ranges, bounded in bytes, least recently used out first.

Table files are immutable and uniquely named, so a cached range can never be stale, only
evicted. Bytes from the cache still pass the record checksums on decode; a damaged cache file
is dropped and read again from the store (see PieceStore), never returned.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path


class DiskCache:
    def __init__(self, directory: str | os.PathLike[str], capacity_bytes: int) -> None:
        self.root = Path(directory).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        # Files left by an earlier process are reused, oldest access first out.
        found = []
        for path in self.root.glob("*.range"):
            with contextlib.suppress(OSError):
                st = path.stat()
                found.append((st.st_atime, path.name, st.st_size))
        for _, name, size in sorted(found):
            self._entries[name] = size
            self._bytes += size
        self._evict()

    @staticmethod
    def _file(table: str, offset: int, length: int) -> str:
        return f"{table}.{offset}.{length}.range"

    def get(self, table: str, offset: int, length: int) -> bytes | None:
        name = self._file(table, offset, length)
        with self._lock:
            if name not in self._entries:
                self.misses += 1
                return None
            self._entries.move_to_end(name)
        try:
            data = (self.root / name).read_bytes()
        except OSError:
            self.drop(table, offset, length)
            return None
        if len(data) != length:
            self.drop(table, offset, length)
            return None
        with self._lock:
            self.hits += 1
        return data

    def put(self, table: str, offset: int, length: int, data: bytes) -> None:
        if self.capacity <= 0 or len(data) > self.capacity // 4 or len(data) != length:
            return
        name = self._file(table, offset, length)
        with self._lock:
            if name in self._entries:
                return
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / name)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        with self._lock:
            self._entries[name] = len(data)
            self._bytes += len(data)
            self._evict()

    def drop(self, table: str, offset: int, length: int) -> None:
        name = self._file(table, offset, length)
        with self._lock:
            size = self._entries.pop(name, None)
            if size is not None:
                self._bytes -= size
        with contextlib.suppress(OSError):
            (self.root / name).unlink()

    def _evict(self) -> None:
        while self._bytes > self.capacity and self._entries:
            name, size = self._entries.popitem(last=False)
            self._bytes -= size
            with contextlib.suppress(OSError):
                (self.root / name).unlink()

    @property
    def nbytes(self) -> int:
        return self._bytes
