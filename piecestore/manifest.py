"""The manifest: the store's only mutable object, changed by compare-and-swap.

Why one root object with If-Match rather than numbered create-if-absent manifests: a
numbered scheme must prune old numbers, and once number N is pruned a writer stalled on a
view older than N can "create" it again and believe a lost commit succeeded. With one root,
the etag of the exact bytes read (``get_with_meta``) is the CAS token and it covers every
field, so no field can be updated without a conflict being seen (the NBS lost-update bug).
The first commit uses create-if-absent, so two processes opening an empty store race safely.

History: every commit that wins the CAS also writes the exact bytes it committed to an
immutable ``manifests/<version>.json`` before it returns, and the newest ``HISTORY_KEEP`` of
them are kept. These copies are never read to serve the store (the root stays the only source
of truth, so the pruning hazard above does not apply); they exist so a damaged root can be
restored (``piecestore.repair``) without losing any acknowledged commit.
"""

from __future__ import annotations

import contextlib
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

from piecestore.backends import Backend, IfMatch, ObjectMeta
from piecestore.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    ConflictError,
    CorruptionError,
    NotFoundError,
    PermissionDeniedError,
    PieceStoreError,
    PreconditionFailedError,
)

MANIFEST_NAME = "manifest.json"
TABLES_PREFIX = "tables/"
BLOBS_PREFIX = "blobs/"
HISTORY_PREFIX = "manifests/"
# Copies kept for repair: the newest HISTORY_KEEP versions, pruned every HISTORY_PRUNE_EVERY
# versions (so at most HISTORY_KEEP + HISTORY_PRUNE_EVERY exist while pruning keeps up).
HISTORY_KEEP = 32
HISTORY_PRUNE_EVERY = 16
_HISTORY_NAME = re.compile(re.escape(HISTORY_PREFIX) + r"([0-9]{20})\.json\Z")
# 2 = 1 plus a trailing xxh3-64 checksum of the bytes before it; 3 = 2 plus the sweep fence
# (``sweep``). A piecestore that reads only format 2 would drop the fence when it commits, so
# it must refuse a format-3 store (it does: "upgrade piecestore").
MANIFEST_FORMAT = 3
_READABLE_FORMATS = (1, 2, MANIFEST_FORMAT)
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
class SweepNote:
    """What one announced orphan sweep may delete: objects older than ``grace_seconds``, and
    while any writer session is live, only those older than ``lease_seconds`` too."""

    number: int
    grace_seconds: float
    lease_seconds: float

    def to_json(self) -> list[float]:
        return [self.number, self.grace_seconds, self.lease_seconds]

    @staticmethod
    def from_json(obj: Any) -> SweepNote:
        number, grace, lease = obj
        return SweepNote(int(number), float(grace), float(lease))


SWEEP_NOTES_KEPT = 16


@dataclass(frozen=True, slots=True)
class Manifest:
    version: int
    store_id: str
    tables: tuple[TableSpec, ...]  # newest first: on equal keys the earlier table wins
    # The sweep fence: how many orphan sweeps have been announced. GC commits a higher number
    # before it deletes any object no manifest references; a writer whose uploads began under
    # a lower number, long enough ago for a sweep to count them as orphans, must not commit a
    # reference to them (see piecestore.fence).
    sweep: int = 0
    # the newest announced sweeps (newest first, at most SWEEP_NOTES_KEPT): a sweep numbered
    # above a writer's stamp but missing here counts as one with grace and lease 0
    sweep_notes: tuple[SweepNote, ...] = ()

    def announce_sweep(self, grace_seconds: float, lease_seconds: float) -> Manifest:
        """This manifest with one more sweep announced (see piecestore.fence)."""
        note = SweepNote(self.sweep + 1, grace_seconds, lease_seconds)
        return replace(self, sweep=note.number, sweep_notes=(note, *self.sweep_notes)[:SWEEP_NOTES_KEPT])

    @staticmethod
    def empty() -> Manifest:
        return Manifest(version=0, store_id=uuid.uuid4().hex, tables=())

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": self.version,
            "store_id": self.store_id,
            "sweep": self.sweep,
            "sweep_notes": [n.to_json() for n in self.sweep_notes],
            "tables": [t.to_json() for t in self.tables],
        }
        data = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return data[:-1] + b',"checksum":"%016x"}' % xxhash.xxh3_64_intdigest(data)

    @staticmethod
    def from_bytes(data: bytes, where: str) -> Manifest:
        tail = _CHECKSUM_TAIL.search(data)
        if tail is not None and int(tail[1], 16) != xxhash.xxh3_64_intdigest(data[: tail.start()] + b"}"):
            raise CorruptionError(
                f"manifest of {where} fails its checksum; run `piecestore fsck --repair` to restore it"
            )
        try:
            obj = json.loads(data)
            if obj.get("format") in (2, MANIFEST_FORMAT) and tail is None:
                raise CorruptionError(
                    f"manifest of {where} has lost its checksum (damaged); "
                    "run `piecestore fsck --repair` to restore it"
                )
            if obj.get("format") not in _READABLE_FORMATS:  # format 1: no checksum yet
                raise CorruptionError(
                    f"manifest of {where} has format {obj.get('format')!r}; this piecestore reads format "
                    f"{MANIFEST_FORMAT}: upgrade piecestore"
                )
            return Manifest(
                version=int(obj["version"]),
                store_id=str(obj["store_id"]),
                tables=tuple(TableSpec.from_json(t) for t in obj["tables"]),
                sweep=int(obj.get("sweep", 0)),
                sweep_notes=tuple(SweepNote.from_json(n) for n in obj.get("sweep_notes", ())),
            )
        except CorruptionError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptionError(
                f"manifest of {where} is unreadable ({e}); run `piecestore fsck --repair` to restore it"
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


def history_name(version: int) -> str:
    """The object holding the bytes committed as ``version`` (zero-padded: names sort by version)."""
    return f"{HISTORY_PREFIX}{version:020d}.json"


def history_version(name: str) -> int | None:
    """The version a history object name stands for; None for any other name."""
    found = _HISTORY_NAME.match(name)
    return int(found[1]) if found is not None else None


def list_history(backend: Backend) -> list[tuple[int, ObjectMeta]]:
    """The history copies in the store, oldest first; only names of the exact history pattern."""
    found = [(v, m) for m in backend.list(HISTORY_PREFIX) if (v := history_version(m.name)) is not None]
    return sorted(found, key=lambda item: item[0])


class ManifestStore:
    """Reads and commits the manifest of one store, keeping recent committed versions for repair."""

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
            return self._read_missing()
        return ManifestView(Manifest.from_bytes(data, self.backend.display_url), meta.etag, time.monotonic())

    def _read_missing(self) -> ManifestView:
        """No manifest: an empty store, unless its history shows it had one (then it was lost).

        Why refuse rather than start empty: the first commit of a "new" store would bury every
        table under a fresh manifest and overwrite the history that could restore them.
        """
        try:
            had_one = any(history_version(m.name) is not None for m in self.backend.list(HISTORY_PREFIX))
        except BucketNotFoundError:
            raise
        except (PermissionDeniedError, NotFoundError):
            # Credentials that may read but not list, or a server that answers a listing with
            # "no such key": the check cannot be made, so the store opens as it always did.
            had_one = False
        if not had_one:
            return ManifestView(Manifest.empty(), None, time.monotonic())
        # History is written after the manifest it copies: a first commit may just have landed.
        try:
            data, meta = self.backend.get_with_meta(MANIFEST_NAME)
        except BucketNotFoundError:
            raise
        except NotFoundError:
            raise CorruptionError(
                f"manifest of {self.backend.display_url} is missing, but the store has manifest history "
                f"({HISTORY_PREFIX}): it was deleted or lost; run `piecestore fsck --repair` to restore it"
            ) from None
        return ManifestView(Manifest.from_bytes(data, self.backend.display_url), meta.etag, time.monotonic())

    def commit(self, change: Change, view: ManifestView | None = None) -> ManifestView:
        """Apply ``change`` to the newest manifest and write it with CAS, rebasing on conflict.

        ``change`` must be a pure function of the manifest it is given: after a lost race it
        is re-applied to the winner's manifest. Returning None means "nothing to do" (e.g. a
        compaction whose inputs another process already replaced).

        A won commit is copied to the history before this returns, so nothing is acknowledged
        that repair could not restore. If that copy cannot be written the call raises although
        the manifest changed: the commit is then unacknowledged, which callers already allow for.
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
            # Only here, after the CAS was won: a losing attempt must leave no history behind.
            self.record_history(updated.version, data)
            if updated.version % HISTORY_PRUNE_EVERY == 0:
                self._prune_quietly(updated.version)
            return ManifestView(updated, meta.etag, time.monotonic())
        raise ConflictError(
            f"manifest of {self.backend.display_url} kept changing: "
            f"{self.commit_retries} commit attempts lost "
            "to other writers; raise engine.commit_retries or reduce the number of writers"
        )

    def record_history(self, version: int, data: bytes) -> None:
        """Keep ``data``, just committed as ``version``, as that version's immutable history copy.

        CAS admits one winner per version, so a copy already there with other bytes is either
        left from an abandoned past (the manifest was put back to an older version by hand) and
        is replaced, or proof that two commits both "won" this version (a backend ignoring
        If-Match): then this commit is not the one readers see, and it must not be acknowledged.
        """
        name = history_name(version)
        for _attempt in range(3):
            try:
                self.backend.put(name, data, mode="create")
                return
            except AlreadyExistsError:
                pass
            try:
                existing, meta = self.backend.get_with_meta(name)
            except NotFoundError:
                continue  # pruned or removed meanwhile: create it again
            if existing == data:
                return  # our own create, retried by the driver after it had landed
            try:
                current = self.backend.get(MANIFEST_NAME)
            except NotFoundError:
                current = b""
            if current != data and (unverified_field(current, "version") or 0) <= version:
                raise ConflictError(
                    f"manifest version {version} of {self.backend.display_url} was committed twice: "
                    f"{name} and manifest.json hold another commit than the one that just won its "
                    "compare-and-swap, so this commit is lost and not acknowledged; retry it, and check "
                    "that the backend honours If-Match (`piecestore check URL`)"
                )
            try:
                self.backend.put(name, data, mode=IfMatch(meta.etag))
                return
            except (PreconditionFailedError, NotFoundError):
                continue
        raise ConflictError(
            f"history copy {name} of {self.backend.display_url} kept changing while it was written; "
            "another process writes the same manifest version: check that only piecestore writes there"
        )

    def _prune_quietly(self, newest: int) -> None:
        """Prune the history, best-effort: a failure never fails the commit, a later prune retries.

        Inline rather than in a background thread: a thread could outlive the store and use
        the backend after close (on the file driver, a closed and reused directory descriptor).
        Every HISTORY_PRUNE_EVERY-th commit pays one listing and one batched delete.
        """
        with contextlib.suppress(PieceStoreError, OSError):
            self.prune_history(newest)

    def prune_history(self, newest: int) -> int:
        """Delete the history copies older than the ``HISTORY_KEEP`` versions up to ``newest``."""
        doomed = [m.name for v, m in list_history(self.backend) if v <= newest - HISTORY_KEEP]
        if doomed:
            self.backend.delete_many(doomed)
        return len(doomed)


def unverified_field(data: bytes, name: str) -> int | None:
    """An integer field of manifest bytes, read even when they fail their checksum (so not to be
    trusted: only to stay above it); None if it is not there."""
    found = re.search(rb'"%s":([0-9]{1,20})[,}]' % re.escape(name.encode()), data)
    return int(found[1]) if found is not None else None


def now_iso() -> str:
    return datetime.now(UTC).isoformat()
