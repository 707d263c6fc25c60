"""In-process driver: objects in a dict, shared by every handle opened on the same name.

Useful for tests and for services that want the piece engine without any storage; nothing
survives the process.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import BinaryIO

import xxhash

from piecestore.backends.base import Backend, Capabilities, IfMatch, ObjectMeta, PutMode, read_all
from piecestore.errors import AlreadyExistsError, NotFoundError, PreconditionFailedError

_CAPS = Capabilities(
    conditional_create=True,
    conditional_match=True,
    batch_delete=True,
    max_delete_batch=1_000_000,
    coalesce_gap=0,
    concurrency=1,
)


class _Space:
    """One named namespace: the objects and the lock that makes conditional writes atomic."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[str, tuple[bytes, ObjectMeta]] = {}


_SPACES: dict[str, _Space] = {}
_SPACES_LOCK = threading.Lock()


def _space(name: str) -> _Space:
    with _SPACES_LOCK:
        return _SPACES.setdefault(name, _Space())


def drop_space(name: str) -> None:
    """Forget a named memory store (tests use it to start clean)."""
    with _SPACES_LOCK:
        _SPACES.pop(name, None)


class MemoryBackend(Backend):
    scheme = "memory"

    def __init__(self, space: str, *, prefix: str = "", read_only: bool = False) -> None:
        super().__init__(
            display_url=f"memory://{space}" + (f"/{prefix}" if prefix else ""), read_only=read_only
        )
        self._space = _space(space)
        self._prefix = f"{prefix}/" if prefix else ""

    @property
    def capabilities(self) -> Capabilities:
        return _CAPS

    def _put(self, name: str, data: memoryview | BinaryIO, mode: PutMode) -> ObjectMeta:
        blob = read_all(data)
        key = self._prefix + name
        with self._space.lock:
            current = self._space.objects.get(key)
            if mode == "create" and current is not None:
                raise AlreadyExistsError(f"{name!r} already exists in {self.display_url}")
            if isinstance(mode, IfMatch) and (current is None or current[1].etag != mode.etag):
                raise PreconditionFailedError(
                    f"{name!r} in {self.display_url} changed (expected etag {mode.etag!r}); re-read and retry"
                )
            # A write counter in the etag keeps rewrites of identical bytes distinguishable.
            serial = 0 if current is None else int(current[1].etag.split("-")[1], 16) + 1
            meta = ObjectMeta(
                name=key,  # the full key: handles on other prefixes see their own relative name
                size=len(blob),
                etag=f"{xxhash.xxh3_64_hexdigest(blob)}-{serial:x}",
                last_modified=datetime.now(UTC),
            )
            self._space.objects[key] = (blob, meta)
            return self._relative(meta)

    def _relative(self, meta: ObjectMeta) -> ObjectMeta:
        return dataclasses.replace(meta, name=meta.name[len(self._prefix) :])

    def _lookup(self, name: str) -> tuple[bytes, ObjectMeta]:
        with self._space.lock:
            found = self._space.objects.get(self._prefix + name)
        if found is None:
            raise NotFoundError(f"{name!r} not found in {self.display_url}")
        return found

    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        blob = self._lookup(name)[0]
        end = len(blob) if length is None else offset + length
        return blob[offset:end]

    def _head(self, name: str) -> ObjectMeta:
        return self._relative(self._lookup(name)[1])

    def _get_with_meta(self, name: str) -> tuple[bytes, ObjectMeta]:
        blob, meta = self._lookup(name)
        return blob, self._relative(meta)

    def _list(self, prefix: str) -> Iterator[ObjectMeta]:
        full = self._prefix + prefix
        with self._space.lock:
            keys = sorted(k for k in self._space.objects if k.startswith(full))
        for key in keys:
            with self._space.lock:
                found = self._space.objects.get(key)
            if found is not None:
                yield self._relative(found[1])

    def _delete(self, name: str) -> None:
        with self._space.lock:
            self._space.objects.pop(self._prefix + name, None)

    def _delete_many(self, names: list[str]) -> None:
        with self._space.lock:
            for name in names:
                self._space.objects.pop(self._prefix + name, None)
