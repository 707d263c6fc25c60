"""The manifest: the store's only mutable object, changed by compare-and-swap.

Why one root object with If-Match rather than numbered create-if-absent manifests: a
numbered scheme must prune old numbers, and once number N is pruned a writer stalled on a
view older than N can "create" it again and believe a lost commit succeeded. With one root,
the etag of the exact bytes read (``get_with_meta``) is the CAS token and it covers every
field, so no field can be updated without a conflict being seen (the NBS lost-update bug).
The first commit uses create-if-absent, so two processes opening an empty store race safely.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import xxhash

from piecestore.backends import Backend, IfMatch
from piecestore.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    ConflictError,
    CorruptionError,
    NotFoundError,
    PreconditionFailedError,
)

MANIFEST_NAME = "manifest.json"
TABLES_PREFIX = "tables/"
BLOBS_PREFIX = "blobs/"
MANIFEST_FORMAT = 2  # 2 = 1 plus a trailing xxh3-64 checksum of the bytes before it
_CHECKSUM_TAIL = re.compile(rb',"checksum":"([0-9a-f]{16})"\}\Z')


@dataclass(frozen=True, slots=True)
class TableSpec:
    """What a reader needs to load a table's index with one suffix read, and what GC needs."""

    name: str
    count: int
    size: int
    index_bytes: int
    keys_bytes: int
    live_bytes: int
    # bytes of records shadowed by newer tables or tombstones; GC keeps this estimate
    dead_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "count": self.count, "size": self.size, "index_bytes": self.index_bytes,
            "keys_bytes": self.keys_bytes, "live_bytes": self.live_bytes, "dead_bytes": self.dead_bytes,
        }  # fmt: skip

    @staticmethod
    def from_json(obj: dict[str, Any]) -> TableSpec:
        return TableSpec(
            name=str(obj["name"]), count=int(obj["count"]), size=int(obj["size"]),
            index_bytes=int(obj["index_bytes"]), keys_bytes=int(obj["keys_bytes"]),
            live_bytes=int(obj["live_bytes"]), dead_bytes=int(obj.get("dead_bytes", 0)),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Manifest:
    version: int
    store_id: str
    tables: tuple[TableSpec, ...]  # newest first: on equal keys the earlier table wins

    @staticmethod
    def empty() -> Manifest:
        return Manifest(version=0, store_id=uuid.uuid4().hex, tables=())

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "store_id": self.store_id,
            "tables": [t.to_json() for t in self.tables],
        }
        data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return data[:-1] + b',"checksum":"%016x"}' % xxhash.xxh3_64_intdigest(data)

    @staticmethod
    def from_bytes(data: bytes, where: str) -> Manifest:
        tail = _CHECKSUM_TAIL.search(data)
        if tail is not None and int(tail[1], 16) != xxhash.xxh3_64_intdigest(data[: tail.start()] + b"}"):
            raise CorruptionError(
                f"manifest of {where} fails its checksum; run `piecestore fsck` and restore it from a backup"
            )
        try:
            obj = json.loads(data)
            if obj.get("format") == MANIFEST_FORMAT and tail is None:
                raise CorruptionError(
                    f"manifest of {where} has lost its checksum (damaged); restore it from a backup"
                )
            if obj.get("format") not in (1, MANIFEST_FORMAT):  # format 1: no checksum yet
                raise CorruptionError(
                    f"manifest of {where} has format {obj.get('format')!r}; this piecestore reads format "
                    f"{MANIFEST_FORMAT}: upgrade piecestore"
                )
            return Manifest(
                version=int(obj["version"]),
                store_id=str(obj["store_id"]),
                tables=tuple(TableSpec.from_json(t) for t in obj["tables"]),
            )
        except CorruptionError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptionError(
                f"manifest of {where} is unreadable ({e}); run `piecestore fsck` and restore it from a backup"
            ) from e

    def table_names(self) -> set[str]:
        return {t.name for t in self.tables}


@dataclass(frozen=True, slots=True)
class ManifestView:
    """A manifest together with the etag of the bytes it was parsed from (None: not yet created)."""

    manifest: Manifest
    etag: str | None
    read_at: float


Change = Callable[[Manifest], Manifest | None]


class ManifestStore:
    """Reads and commits the manifest of one store."""

    def __init__(
        self, backend: Backend, *, commit_retries: int = 50, sleep: Callable[[float], None] = time.sleep
    ):
        self.backend = backend
        self.commit_retries = commit_retries
        self._sleep = sleep
        self.conflicts = 0  # lost CAS races, for profiling

    def read(self) -> ManifestView:
        try:
            data, meta = self.backend.get_with_meta(MANIFEST_NAME)
        except BucketNotFoundError:
            raise  # no bucket is not an empty store: say so rather than answer "not found" later
        except NotFoundError:
            return ManifestView(Manifest.empty(), None, time.monotonic())
        return ManifestView(Manifest.from_bytes(data, self.backend.display_url), meta.etag, time.monotonic())

    def commit(self, change: Change, view: ManifestView | None = None) -> ManifestView:
        """Apply ``change`` to the newest manifest and write it with CAS, rebasing on conflict.

        ``change`` must be a pure function of the manifest it is given: after a lost race it
        is re-applied to the winner's manifest. Returning None means "nothing to do" (e.g. a
        compaction whose inputs another process already replaced).
        """
        current = view if view is not None else self.read()
        for attempt in range(self.commit_retries + 1):
            updated = change(current.manifest)
            if updated is None:
                return current
            updated = replace(updated, version=current.manifest.version + 1)
            data = updated.to_bytes()
            try:
                if current.etag is None:
                    meta = self.backend.put(MANIFEST_NAME, data, mode="create")
                else:
                    meta = self.backend.put(MANIFEST_NAME, data, mode=IfMatch(current.etag))
            except (PreconditionFailedError, AlreadyExistsError, NotFoundError):
                self.conflicts += 1
                # Jittered backoff keeps many contending writers from retrying in lockstep.
                self._sleep(random.uniform(0, min(0.05, 0.002 * 2 ** min(attempt, 5))))
                current = self.read()
                continue
            return ManifestView(updated, meta.etag, time.monotonic())
        raise ConflictError(
            f"manifest of {self.backend.display_url} kept changing: "
            f"{self.commit_retries} commit attempts lost "
            "to other writers; raise engine.commit_retries or reduce the number of writers"
        )


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
