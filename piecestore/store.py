"""PieceStore: the piece engine over one backend (one shard).

Writes: pieces collect in a group-commit batch, become one immutable table file (large
pieces become their own object plus a small reference record), and are made durable by one
compare-and-swap commit of the manifest. Reads: the newest table holding a key wins; records
are checksum-verified on every read, so corrupt bytes raise instead of being returned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import io
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

import numpy as np

from piecestore.backends import Backend
from piecestore.backends.base import validate_range
from piecestore.cache import ByteLRU
from piecestore.diskcache import DiskCache
from piecestore.errors import (
    ConflictError,
    CorruptionError,
    InvalidKeyError,
    InvalidValueError,
    NotFoundError,
    PieceStoreError,
    ReadOnlyError,
    UnsupportedError,
)
from piecestore.fence import SweptError, UploadStamp, WriterSession, may_be_swept
from piecestore.groupcommit import GroupCommitter, Record
from piecestore.keys import check_items, check_key, check_keys, check_value, read_exact, read_some
from piecestore.manifest import Manifest, ManifestStore, ManifestView, TableSpec
from piecestore.names import new_blob_name
from piecestore.pacing import foreground_write
from piecestore.table import (
    EXTERNAL,
    TOMBSTONE,
    VALUE,
    BuiltTable,
    build_sorted,
    checksum,
    decode_external,
    decode_keys,
    decode_record,
    encode_external,
    key_hash,
    keys_span,
    record_span,
)
from piecestore.tableindex import TableIndex
from piecestore.tableset import TableSet, table_object
from piecestore.tiering import pick_run, small_table_bytes

if TYPE_CHECKING:
    from piecestore.fsck import FsckReport
    from piecestore.gc import GCReport
    from piecestore.lease import Clock
    from piecestore.settings import Settings

EXTERNAL_CHUNK = 1024 * 1024
# How often a commit whose uploads a GC sweep may have reached uploads them again (new names)
# before it gives up; each round needs another sweep announced during one upload and commit.
SWEPT_RETRIES = 8


@dataclass(frozen=True, slots=True)
class PieceInfo:
    key: str
    size: int
    checksum: int | None = None  # xxh3_64 of the value (packed) or None when not read
    table: str | None = None  # table file holding the record; None while only buffered
    external: bool = False  # stored as its own object (large piece)


@dataclass(frozen=True, slots=True)
class _Location:
    spec: TableSpec
    index: TableIndex
    pos: int


class PieceStore:
    """A store of pieces on one backend. Thread-safe; any number of processes may share it."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings
        eng = settings.engine
        self.url = backend.display_url
        self._read_pool = ThreadPoolExecutor(eng.read_concurrency, thread_name_prefix="piecestore-read")
        self._write_pool = ThreadPoolExecutor(eng.write_concurrency, thread_name_prefix="piecestore-write")
        self.manifests = ManifestStore(backend, commit_retries=eng.commit_retries)
        self.cache = ByteLRU(settings.cache.memory_bytes)
        self.disk_cache = (
            DiskCache(settings.cache.disk_dir, settings.cache.disk_bytes) if settings.cache.disk_dir else None
        )
        self.tables = TableSet(backend, self._read_pool, self.disk_cache)
        self._keys_cache: dict[str, list[str]] = {}
        self._view_lock = threading.Lock()
        self._view: ManifestView = self.manifests.read()
        self.tables.sync(self._view.manifest.tables)
        self._closed = False
        self._local = threading.local()
        self._compactor: threading.Thread | None = None
        self._last_full_gc = time.monotonic()
        self._compacted_since_full_gc = False
        self._writable_reason = self._why_not_writable(settings)
        self.session = WriterSession(backend, settings.gc.lease_seconds)  # created on first upload
        self._committer = GroupCommitter(
            self._prepare_batch,
            self._commit_batches,
            linger=eng.flush_linger_ms / 1000.0,
            flush_bytes=eng.flush_bytes,
            flush_count=eng.flush_count,
            buffered=settings.store.buffered_writes,
        )

    def _why_not_writable(self, settings: Settings) -> str | None:
        if settings.store.read_only or self.backend.read_only:
            return f"{self.url} is opened read-only; open it without read_only to write"
        if not self.backend.capabilities.conditional_writes:
            return (
                f"{self.url} cannot do conditional writes (If-None-Match/If-Match), which the manifest "
                "needs to keep concurrent writers from losing commits; use a backend that supports them"
            )
        return None

    # -- writes --------------------------------------------------------------------------
    def put(self, key: str, value: bytes | bytearray | memoryview | BinaryIO) -> PieceInfo:
        """Store a piece; returns once it is durable (unless the store buffers writes)."""
        key = check_key(key)
        data = check_value(key, value)
        self._check_writable()
        records: dict[str, Record] = {}
        stamps: list[UploadStamp] = []
        info = self._prepare(key, data, records, stamps)
        with foreground_write():
            self._committer.submit(records, wait=self._must_wait(), mark=stamps[0] if stamps else None)
        return info

    def put_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[PieceInfo]:
        """Store many pieces as one commit; all are validated before anything is written."""
        values = check_items(items)
        self._check_writable()
        records: dict[str, Record] = {}
        stamps: list[UploadStamp] = []
        prepare = self._prepare
        try:
            infos = [prepare(key, data, records, stamps) for key, data in values]
        except BaseException:
            # A later value was refused (or its stream failed): nothing of the call is written,
            # so the large pieces already uploaded for it go now rather than wait for GC.
            self._drop_uploaded(records)
            raise
        if records:
            with foreground_write():
                mark = _earliest(stamps[0], stamps[1:]) if stamps else None
                self._committer.submit(records, wait=self._must_wait(), urgent=True, mark=mark)
        return infos

    def delete(self, key: str) -> None:
        """Delete a piece (a tombstone); deleting a missing piece is not an error."""
        self.delete_many([key])

    def delete_many(self, keys: Iterable[str]) -> None:
        checked = check_keys(keys)
        self._check_writable()
        if checked:
            records: dict[str, Record] = {k: (TOMBSTONE, b"") for k in checked}
            with foreground_write():
                self._committer.submit(records, wait=self._must_wait(), urgent=True)

    def flush(self) -> None:
        """Everything put so far is durable when this returns."""
        self._committer.flush()

    @contextlib.contextmanager
    def batch(self) -> Iterator[PieceStore]:
        """Within the block this thread's writes return at once; on exit all are made durable."""
        self._local.batch_depth = getattr(self._local, "batch_depth", 0) + 1
        try:
            yield self
        finally:
            self._local.batch_depth -= 1
        if self._local.batch_depth == 0:
            self.flush()

    def _must_wait(self) -> bool:
        return not self.settings.store.buffered_writes and not getattr(self._local, "batch_depth", 0)

    def _check_writable(self) -> None:
        if self._closed:
            raise ReadOnlyError(f"{self.url} is closed")
        if self._writable_reason is not None:
            if "read-only" in self._writable_reason:
                raise ReadOnlyError(f"cannot write: {self._writable_reason}")
            raise UnsupportedError(f"cannot write: {self._writable_reason}")

    def _prepare(
        self, key: str, data: bytes | BinaryIO, into: dict[str, Record], stamps: list[UploadStamp]
    ) -> PieceInfo:
        """Put the piece's record in ``into`` (a large piece is uploaded first, its upload
        stamped in ``stamps``); its PieceInfo."""
        limit = self.settings.engine.small_piece_max_bytes
        if isinstance(data, bytes) and len(data) <= limit:
            into[key] = (VALUE, data)
            return PieceInfo(key, len(data), checksum(data))
        stream = io.BytesIO(data) if isinstance(data, bytes) else data
        # Read to the limit or the end of the stream: a pipe or socket may return less.
        head = read_exact(key, stream, limit + 1)
        if len(head) <= limit:
            into[key] = (VALUE, head)
            return PieceInfo(key, len(head), checksum(head))
        old = into.get(key)
        into[key], info = self._write_external(key, head, stream, stamps)
        if old is not None:
            self._drop_uploaded({key: old})  # the same key twice in one put_many
        return info

    def _write_external(
        self, key: str, head: bytes, stream: BinaryIO, stamps: list[UploadStamp]
    ) -> tuple[Record, PieceInfo]:
        """Stream a large piece to its own object, checksumming each chunk on the way."""
        reader = _ChunkSummer(key, head, stream, EXTERNAL_CHUNK)
        name = new_blob_name()
        stamps.append(self.session.stamp(self._view.manifest))
        try:
            self.backend.put(name, reader)  # type: ignore[arg-type]
        except BaseException:
            with contextlib.suppress(PieceStoreError):
                self.backend.delete(name)  # a stream that failed midway may have left a part
            raise
        payload = encode_external(name, reader.size, EXTERNAL_CHUNK, reader.sums)
        return (EXTERNAL, payload), PieceInfo(key, reader.size, None, None, external=True)

    def _drop_uploaded(self, records: Mapping[str, Record]) -> None:
        """Delete the large-piece objects of records that will never be committed (best effort)."""
        names = [decode_external(p).obj_name for kind, p in records.values() if kind == EXTERNAL]
        if names:
            with contextlib.suppress(PieceStoreError):
                self.backend.delete_many(names)

    def _copy_external(self, key: str, payload: bytes) -> bytes:
        """Copy a large piece's object to a new name (its uploads may have been swept); the new
        record payload. The copy is checked chunk by chunk against the record's checksums."""
        ref = decode_external(payload)
        name = new_blob_name()
        source = _ChunkSummer(key, b"", _ChunkStream(self.backend.iter_chunks(ref.obj_name, ref.chunk_bytes)),
                              ref.chunk_bytes)  # fmt: skip
        try:
            self.backend.put(name, source)  # type: ignore[arg-type]
        except PieceStoreError as e:
            with contextlib.suppress(PieceStoreError):
                self.backend.delete(name)
            if isinstance(e, NotFoundError) or not self.backend.exists(ref.obj_name):
                raise ConflictError(
                    f"large piece {key[:80]!r} was deleted from {self.url} by a GC sweep before its commit "
                    "could land: it was held uncommitted past the grace period and half the GC lease "
                    "(a long batch or buffered write, or a stalled process); nothing was acknowledged: "
                    "put it again"
                ) from e
            raise
        if source.size != ref.size or source.sums != list(ref.chunk_checksums):
            self.backend.delete(name)
            raise CorruptionError(
                f"large piece {key[:80]!r}: its object {ref.obj_name} changed before its commit; "
                "nothing was acknowledged: put it again"
            )
        return encode_external(name, ref.size, ref.chunk_bytes, list(ref.chunk_checksums))

    def _prepare_batch(self, records: dict[str, Record], marks: list[Any]) -> _Uploaded:
        """Build table files from a batch and upload them; the committer makes them durable.

        ``marks`` are the upload stamps of the batch's large pieces.
        """
        stamp = _earliest(self.session.stamp(self._view.manifest), marks)
        built = self._build_tables(records)
        # The committer waits for the uploads: the flusher goes on to build the next batch.
        uploads = [self._write_pool.submit(self._upload, t) for t in built]
        return _Uploaded(records, built, [self.tables.add_built(t) for t in built], uploads, stamp)

    def _build_tables(self, records: dict[str, Record]) -> list[BuiltTable]:
        """Table files of the target size holding ``records`` (each build named anew)."""
        target = self.settings.engine.table_target_bytes
        groups: list[list[str]] = [[]]
        size = 0
        for key in sorted(records):
            payload = records[key][1]
            if size > 0 and size + len(payload) > target:
                groups.append([])
                size = 0
            groups[-1].append(key)
            size += len(payload) + len(key)
        return [build_sorted(keys, records) for keys in groups]  # keys and values checked on put

    def _commit_batches(self, batches: list[_Uploaded]) -> None:
        """Commit the tables of several batches (oldest first) with one manifest CAS.

        A failed upload fails every batch of the call: none of them is acknowledged. A commit
        never references an upload that a GC sweep may have deleted (piecestore.fence): if a
        sweep was announced since the uploads began, they are made again under new names.
        """
        made = [spec.name for batch in batches for spec in batch.specs]
        try:
            for batch in batches:
                for upload in batch.uploads:
                    upload.result()
            for _attempt in range(SWEPT_RETRIES):
                stamp = _earliest(batches[0].stamp, [batch.stamp for batch in batches[1:]])
                newest_first = tuple(spec for batch in reversed(batches) for spec in batch.specs)

                def add_tables(m: Manifest, stamp: UploadStamp = stamp,
                               tables: tuple[TableSpec, ...] = newest_first) -> Manifest | None:  # fmt: skip
                    if tables and tables[0].name in {t.name for t in m.tables}:
                        return None  # landed already: a retried request whose answer was lost
                    if may_be_swept(stamp, m):
                        raise SweptError("a GC sweep may have reached this commit's uploads", m)
                    # Within one batch later groups hold later keys only: their order is immaterial.
                    return dataclasses.replace(m, tables=tables + m.tables)

                try:
                    self._commit(add_tables)
                    break
                except SweptError as swept:
                    replaced = [self._upload_again(batch, swept.manifest) for batch in batches]
                    for old in batches:
                        self._drop_uploaded(old.records)
                    self.tables.discard(made)
                    batches = replaced
                    made = [spec.name for batch in batches for spec in batch.specs]
            else:
                raise ConflictError(
                    f"{self.url}: GC sweeps kept reaching this commit's uploads ({SWEPT_RETRIES} rounds); "
                    "nothing was acknowledged: retry, or raise gc.grace_seconds"
                )
        except BaseException:
            self.tables.discard(made)
            raise
        if self.settings.gc.auto_compact:
            self._maybe_auto_compact()

    def _upload_again(self, batch: _Uploaded, seen: Manifest) -> _Uploaded:
        """The batch's objects made anew under new names, begun after ``seen``'s sweeps."""
        stamp = self.session.stamp(seen)
        records = {
            key: (kind, self._copy_external(key, payload)) if kind == EXTERNAL else (kind, payload)
            for key, (kind, payload) in batch.records.items()
        }
        built = self._build_tables(records)
        specs = [self.tables.add_built(t) for t in built]
        list(self._write_pool.map(self._upload, built))
        return _Uploaded(records, built, specs, [], stamp)

    def _maybe_auto_compact(self) -> None:
        """Start a background compaction when tables pile up; one at a time per process."""
        if self.compaction_run(self._view.manifest.tables) is None:
            return
        if self._compactor is not None and self._compactor.is_alive():
            return

        def work() -> None:
            from piecestore.gc import GarbageCollector
            from piecestore.lease import GCBusyError

            with contextlib.suppress(PieceStoreError):
                # Commits that land during a run are not in it: go again while they pile up
                # (bounded), since the next trigger is only the next commit.
                for _ in range(8):
                    if not GarbageCollector(self).compact_tiered().written_tables:
                        break
                    self._compacted_since_full_gc = True
                    if self.compaction_run(self._view.manifest.tables) is None:
                        break
            # Deletions become due only after the grace period, so a full pass (listing and
            # all) runs at most every half grace period, and only when compaction left work.
            every = max(60.0, self.settings.gc.grace_seconds / 2)
            if self._compacted_since_full_gc and time.monotonic() - self._last_full_gc > every:
                self._compacted_since_full_gc = False
                self._last_full_gc = time.monotonic()
                with contextlib.suppress(GCBusyError, ReadOnlyError):
                    self.gc(compact=False)

        compactor = threading.Thread(target=work, name="piecestore-compactor", daemon=True)
        compactor.start()
        self._compactor = compactor  # published once started: gc() and close() join it

    def compaction_run(self, tables: Sequence[TableSpec]) -> tuple[int, int] | None:
        """The slice of ``tables`` (newest first) background compaction would merge now."""
        eng, gc = self.settings.engine, self.settings.gc
        return pick_run(
            [t.size for t in tables],
            small=small_table_bytes(eng.table_target_bytes, eng.flush_bytes),
            target=eng.table_target_bytes,
            min_tables=gc.compact_min_tables,
            max_tables=gc.compact_max_tables,
        )

    def _upload(self, table: BuiltTable) -> None:
        self.backend.put_parts(table_object(table.name), table.parts)

    def _commit(self, change: Any) -> ManifestView:
        view = self.manifests.commit(change, self._view)
        self._install(view)
        return view

    def _install(self, view: ManifestView) -> list[str]:
        """Adopt ``view`` unless ours is newer; the listed tables found missing from the store."""
        with self._view_lock:
            if view.manifest.version < self._view.manifest.version:
                return []
            missing = self.tables.sync(view.manifest.tables)
            self._view = view
            return missing

    # -- reads ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up commits made by other processes."""
        for _attempt in range(3):
            if not self._install(self.manifests.read()):
                return
            # A listed table was missing when its index was fetched: removed (compaction, then
            # GC) between our manifest read and the fetch. A newer manifest no longer lists it.

    def _maybe_refresh(self) -> None:
        """Refresh a view older than the refresh interval, or than the grace period: past that,
        GC may have deleted objects the view names, and the caches would hide it."""
        max_age = min(self.settings.engine.refresh_interval_seconds, self.settings.gc.grace_seconds)
        if time.monotonic() - self._view.read_at > max_age:
            self.refresh()

    def _read_at(self, loc: _Location, key: str) -> Record | None:
        """(kind, payload) of the record at ``loc`` if it holds ``key``; None if it holds another
        key with the same 64-bit hash (then older tables may still hold ``key``)."""
        name = loc.spec.name
        cached = self.cache.get((name, loc.pos, key))
        if cached is not None:
            return VALUE, cached
        off, length = record_span(loc.index, loc.pos)
        decoded = self._disk_cached(name, off, length)
        if decoded is None:
            blob = self.backend.get(table_object(name), offset=off, length=length)
            decoded = self._decode_fetched(name, off, length, blob)
        return self._matching(name, loc.pos, key, decoded)

    def _disk_cached(self, name: str, off: int, length: int) -> tuple[str, int, bytes] | None:
        """The record at ``off`` from the on-disk range cache, decoded; None if not there."""
        blob = self.disk_cache.get(name, off, length) if self.disk_cache is not None else None
        if blob is None:
            return None
        try:
            return decode_record(name, blob)
        except CorruptionError:  # a damaged cache file: forget it, read the store
            self.disk_cache.drop(name, off, length)  # type: ignore[union-attr]
            return None

    def _decode_fetched(self, name: str, off: int, length: int, blob: bytes) -> tuple[str, int, bytes]:
        decoded = decode_record(name, blob)
        if self.disk_cache is not None:
            self.disk_cache.put(name, off, length, blob)
        return decoded

    def _matching(self, name: str, pos: int, key: str, decoded: tuple[str, int, bytes]) -> Record | None:
        """The decoded record if it holds ``key`` (a value is kept in the piece cache), else None."""
        found_key, kind, payload = decoded
        if found_key != key:
            return None
        if kind == VALUE:
            self.cache.put((name, pos, key), payload)
        return kind, payload

    def _resolve(self, key: str) -> tuple[int, bytes, _Location | None]:
        """(kind, payload, location) of the newest record of key; NotFoundError if none."""
        pending = self._committer.lookup(key)
        if pending is not None:
            return pending[0], pending[1], None
        self._maybe_refresh()
        for attempt in range(2):
            try:
                for spec, index in self.tables.snapshot():
                    for pos in index.find(key):
                        loc = _Location(spec, index, pos)
                        found = self._read_at(loc, key)
                        if found is not None:
                            return found[0], found[1], loc
                break
            except NotFoundError:
                if attempt:
                    raise
                self.refresh()  # the table left the manifest (compaction); look again
        raise NotFoundError(f"piece {key[:80]!r} not found in {self.url}")

    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Read a piece, or a range of it; every byte returned passed its checksum."""
        key = check_key(key)
        offset, length = validate_range(offset, length)
        try:
            return self._get(key, offset, length)
        except _StaleView:  # a large piece's object left with its record (GC): look again
            self.refresh()
        try:
            return self._get(key, offset, length)
        except _StaleView as e:
            raise CorruptionError(
                f"piece {key[:80]!r} in {self.url}: its object {e} is missing; run `piecestore fsck`"
            ) from e

    def _get(self, key: str, offset: int, length: int | None) -> bytes:
        kind, payload, _ = self._resolve(key)
        if kind == TOMBSTONE:
            raise NotFoundError(f"piece {key[:80]!r} not found in {self.url} (deleted)")
        if kind == EXTERNAL:
            return self._read_external(key, payload, offset, length)
        end = len(payload) if length is None else offset + length
        return payload[offset:end]

    def _read_external(self, key: str, payload: bytes, offset: int, length: int | None) -> bytes:
        ref = decode_external(payload)
        end = ref.size if length is None else min(ref.size, offset + length)
        if offset >= end:
            return b""
        first, last = offset // ref.chunk_bytes, (end - 1) // ref.chunk_bytes
        spans = [
            (i * ref.chunk_bytes, min(ref.chunk_bytes, ref.size - i * ref.chunk_bytes))
            for i in range(first, last + 1)
        ]
        try:
            chunks = self.backend.get_ranges(ref.obj_name, spans)
        except NotFoundError as e:
            raise _StaleView(ref.obj_name) from e
        for i, chunk in zip(range(first, last + 1), chunks, strict=True):
            if len(chunk) != spans[i - first][1] or checksum(chunk) != ref.chunk_checksums[i]:
                raise CorruptionError(
                    f"piece {key[:80]!r} in {self.url}: chunk {i} of {ref.obj_name} fails its checksum"
                )
        joined = b"".join(chunks)
        base = first * ref.chunk_bytes
        return joined[offset - base : end - base]

    def get_many(
        self, keys: Iterable[str], *, missing: Literal["raise", "skip"] = "raise"
    ) -> dict[str, bytes]:
        """Read many pieces: grouped by table, nearby records fetched in one ranged request."""
        wanted = list(dict.fromkeys(check_keys(keys)))
        if missing not in ("raise", "skip"):
            raise InvalidValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
        self._maybe_refresh()
        try:
            return self._get_many(wanted, missing)
        except _StaleView:
            self.refresh()  # a table left the manifest (compaction) after we looked it up
        try:
            return self._get_many(wanted, missing)
        except _StaleView as e:
            raise CorruptionError(
                f"{self.url}: object {e}, which the manifest references, is missing; run `piecestore fsck`"
            ) from e

    def _get_many(self, wanted: list[str], missing: str) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        externals: dict[str, bytes] = {}
        todo: list[str] = []
        for key in wanted:
            pending = self._committer.lookup(key)
            if pending is None:
                todo.append(key)
            elif pending[0] == VALUE:
                out[key] = pending[1]
            elif pending[0] == EXTERNAL:
                externals[key] = pending[1]
        by_table: list[tuple[TableSpec, TableIndex, list[tuple[str, int]]]] = []
        # Hash every key once; each table then costs two vectorised binary searches over the
        # keys still unresolved, so many tables stay cheap.
        hashes = np.fromiter((key_hash(k) for k in todo), dtype=np.uint64, count=len(todo))
        remaining = np.arange(len(todo))
        for spec, index in self.tables.snapshot():
            if remaining.size == 0:
                break
            probe = hashes[remaining]
            lo = index.hashes.searchsorted(probe, side="left")
            hi = index.hashes.searchsorted(probe, side="right")
            found = hi > lo
            if not found.any():
                continue
            hits: list[tuple[str, int]] = []
            for i, start, end in zip(
                remaining[found].tolist(), lo[found].tolist(), hi[found].tolist(), strict=True
            ):
                hits.extend((todo[i], int(p)) for p in index.positions[start:end])
            by_table.append((spec, index, hits))
            remaining = remaining[~found]
        resolved: set[str] = set()

        def take(key: str, kind: int, payload: bytes) -> None:
            resolved.add(key)
            if kind == VALUE:
                out[key] = payload
            elif kind == EXTERNAL:
                externals[key] = payload

        for table_result in self._read_pool.map(self._fetch_table_records, by_table):
            for key, (kind, payload) in table_result.items():
                take(key, kind, payload)
        # A key whose hash matched a record of another key (a 64-bit collision) may still be in
        # an older table: look it up alone.
        for key in (k for _, _, hits in by_table for k, _ in hits if k not in resolved):
            try:
                kind, payload, _ = self._resolve(key)
            except NotFoundError:
                continue
            take(key, kind, payload)
        if externals:
            fetched = self._read_pool.map(
                lambda kv: (kv[0], self._read_external(kv[0], kv[1], 0, None)), externals.items()
            )
            out.update(dict(fetched))
        if missing == "raise" and len(out) < len(wanted):
            absent = [k for k in wanted if k not in out]
            shown = ", ".join(repr(k[:60]) for k in absent[:5])
            raise NotFoundError(
                f"{len(absent)} of {len(wanted)} pieces not found in {self.url}: {shown}"
                + (" ..." if len(absent) > 5 else "")
                + "; pass missing='skip' to get the others"
            )
        return {k: out[k] for k in wanted if k in out}

    def _fetch_table_records(
        self, job: tuple[TableSpec, TableIndex, list[tuple[str, int]]]
    ) -> dict[str, Record]:
        spec, index, hits = job
        result: dict[str, Record] = {}
        need: list[tuple[str, int]] = []
        for key, pos in hits:
            cached = self.cache.get((spec.name, pos, key))
            if cached is not None:
                result[key] = (VALUE, cached)
                continue
            decoded = self._disk_cached(spec.name, *record_span(index, pos))
            if decoded is None:
                need.append((key, pos))
            elif decoded[0] == key:  # else another key of the same hash: not in this table
                result[key] = (decoded[1], decoded[2])
        if not need:
            return result
        spans = [record_span(index, pos) for _, pos in need]
        eng = self.settings.engine
        try:
            blobs = self.backend.get_ranges(
                table_object(spec.name), spans, gap=eng.coalesce_gap_bytes, max_request=eng.max_request_bytes
            )
        except NotFoundError as e:
            raise _StaleView(spec.name) from e
        for (key, pos), blob, (off, length) in zip(need, blobs, spans, strict=True):
            found = self._matching(spec.name, pos, key, self._decode_fetched(spec.name, off, length, blob))
            if found is not None:  # None: another key of the same hash
                result[key] = found
        return result

    def head(self, key: str) -> PieceInfo:
        key = check_key(key)
        kind, payload, loc = self._resolve(key)
        table = loc.spec.name if loc is not None else None
        if kind == TOMBSTONE:
            raise NotFoundError(f"piece {key[:80]!r} not found in {self.url} (deleted)")
        if kind == EXTERNAL:
            return PieceInfo(key, decode_external(payload).size, None, table, external=True)
        return PieceInfo(key, len(payload), checksum(payload), table)

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[PieceInfo]:
        """Pieces whose key starts with ``prefix``, sorted by key, merged lazily across tables."""
        if not isinstance(prefix, str):
            raise InvalidKeyError(f"list prefix must be str, got {type(prefix).__name__}")
        self._maybe_refresh()
        return self._merge_listing(prefix)

    def _merge_listing(self, prefix: str) -> Iterator[PieceInfo]:
        pending = sorted((k, r) for k, r in self._committer.pending().items() if k.startswith(prefix))
        sources: list[Iterator[tuple[str, int, int, TableSpec | None, TableIndex | None]]] = [
            iter([(k, -1, 0, None, None) for k, _ in pending])
        ]
        pending_records = dict(pending)
        for attempt in range(2):
            try:  # every table's key block, fetched now, so that a listing is one view
                tables = [
                    self._table_keys(rank, self._keys_of(spec, index), spec, index, prefix)
                    for rank, (spec, index) in enumerate(self.tables.snapshot())
                ]
                break
            except NotFoundError:
                if attempt:
                    raise
                self.refresh()  # a table left the manifest (compaction, then GC) meanwhile
        sources.extend(tables)
        last: str | None = None
        for key, _rank, pos, spec, index in heapq.merge(*sources, key=lambda t: (t[0], t[1])):
            if key == last:
                continue
            last = key
            if spec is None or index is None:
                kind, payload = pending_records[key]
                if kind == VALUE:
                    yield PieceInfo(key, len(payload), checksum(payload))
                elif kind == EXTERNAL:
                    yield PieceInfo(key, decode_external(payload).size, external=True)
                continue
            kind = index.kind(pos)
            if kind == TOMBSTONE:
                continue
            if kind == EXTERNAL:
                try:
                    found = self._read_at(_Location(spec, index, pos), key)
                except NotFoundError:  # a listing outlived the grace period: ask the newest view
                    with contextlib.suppress(NotFoundError):
                        yield self.head(key)
                    continue
                if found is None:
                    raise CorruptionError(f"table {spec.name}: record {pos} does not hold {key[:80]!r}")
                payload = found[1]
                yield PieceInfo(key, decode_external(payload).size, None, spec.name, external=True)
            else:
                yield PieceInfo(key, index.value_size(pos), None, spec.name)

    def _keys_of(self, spec: TableSpec, index: TableIndex) -> Sequence[str]:
        keys = self._keys_cache.get(spec.name)
        if keys is None:
            off, length = keys_span(index)
            blob = self.backend.get(table_object(spec.name), offset=off, length=length)
            keys = decode_keys(spec.name, blob, index)
            if len(self._keys_cache) > 256:
                self._keys_cache.clear()
            self._keys_cache[spec.name] = keys
        return keys

    @staticmethod
    def _table_keys(
        rank: int, keys: Sequence[str], spec: TableSpec, index: TableIndex, prefix: str
    ) -> Iterator[tuple[str, int, int, TableSpec | None, TableIndex | None]]:
        import bisect

        start = bisect.bisect_left(keys, prefix) if prefix else 0
        for pos in range(start, len(keys)):
            key = keys[pos]
            if not key.startswith(prefix):
                return
            yield key, rank, pos, spec, index

    # -- maintenance ---------------------------------------------------------------------
    def gc(
        self,
        dry_run: bool = False,
        *,
        compact: bool = True,
        clock: Clock | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> GCReport:
        """Compact tables and reclaim dead and orphaned data (see piecestore.gc).

        ``clock`` replaces the server clock (tests pass one instead of sleeping).
        """
        from piecestore.gc import GarbageCollector

        compactor = self._compactor
        if compactor is not None and compactor is not threading.current_thread():
            compactor.join()  # our own background compaction holds the lease: let it finish
        if not dry_run:
            self._check_writable()
            self.flush()
        return GarbageCollector(self, clock=clock, progress=progress).run(dry_run=dry_run, compact=compact)

    def fsck(self, progress: Callable[[int, int], None] | None = None, *, repair: bool = False) -> FsckReport:
        """Verify every checksum, manifest reference and index; report exactly what is wrong.

        ``repair`` restores a damaged manifest from the versions kept for the purpose.
        """
        from piecestore.fsck import fsck

        if not repair:
            self.flush()
        return fsck(self, progress, repair=repair)

    def profile(self) -> Any:
        """Piece counts, size histogram, tables, cache hit rates (see piecestore.profile)."""
        from piecestore.profile import profile_store

        return profile_store(self)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self._view.manifest

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._committer.close()
            if self._compactor is not None:
                self._compactor.join()
        finally:
            self._closed = True
            self._read_pool.shutdown(wait=True)
            self._write_pool.shutdown(wait=True)
            self.session.close()
            self.backend.close()

    def __enter__(self) -> PieceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PieceStore({self.url!r})"


@dataclass(frozen=True, slots=True)
class _Uploaded:
    """A batch's table files, uploading or uploaded, waiting to be committed."""

    records: dict[str, Record]  # what the tables hold, to build them again if a sweep may reach them
    built: list[BuiltTable]
    specs: list[TableSpec]  # their manifest entries, in the same order
    uploads: list[Future[None]]  # one per table; the committer waits for them
    stamp: UploadStamp  # when the earliest of its uploads (large pieces included) began


def _earliest(first: UploadStamp, others: Iterable[UploadStamp]) -> UploadStamp:
    """The stamp covering every upload of a batch (see UploadStamp.earliest)."""
    for stamp in others:
        first = first.earliest(stamp)
    return first


class _StaleView(Exception):
    """An object named by our view of the manifest is gone: refresh and look again."""


class _ChunkStream:
    """A file-like reader over an iterator of chunks (a stored object read back in pieces)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._left = b""

    def read(self, n: int = -1) -> bytes:
        if not self._left:
            self._left = next(self._chunks, b"")
        if n < 0 or n >= len(self._left):
            out, self._left = self._left, b""
        else:
            out, self._left = self._left[:n], self._left[n:]
        return out


class _ChunkSummer:
    """A file-like reader that checksums fixed-size chunks as the driver streams them."""

    def __init__(self, key: str, head: bytes, rest: BinaryIO | _ChunkStream, chunk: int) -> None:
        self._key = key
        self._head = head
        self._rest = rest
        self._chunk = chunk
        self._partial = bytearray()
        self.sums: list[int] = []
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n < 0 or n >= len(self._head):
                out, self._head = self._head, b""
                if n > len(out) or n < 0:
                    out += read_some(self._key, self._rest, -1 if n < 0 else n - len(out))
            else:
                out, self._head = self._head[:n], self._head[n:]
        else:
            out = read_some(self._key, self._rest, n)
        self._account(out)
        return out

    def _account(self, data: bytes) -> None:
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self._chunk - len(self._partial))
            self._partial += view[:take]
            view = view[take:]
            if len(self._partial) == self._chunk:
                self.sums.append(checksum(bytes(self._partial)))
                self._partial.clear()
        if not data and self._partial:
            self.sums.append(checksum(bytes(self._partial)))
            self._partial.clear()
