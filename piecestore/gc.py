"""Garbage collection and compaction, driven by the manifest, safe beside live writers.

One pass, under the store's GC lease:

1. note the server's time, list every object under ``tables/`` and ``blobs/``, and only then
   read the manifest: an object written after the scan began is never in scope;
2. find, by exact key, which records are shadowed by newer tables or tombstones (dead);
3. compact: rewrite runs of adjacent tables that are mostly dead or small into new tables of
   live records only (NBS conjoin), committed by compare-and-swap; the replaced tables and the
   large-piece objects only dead records referenced become *pending deletes* in the manifest;
4. delete pending deletes older than the grace period, and orphans (objects no manifest ever
   referenced, from crashed writers) whose server LastModified is older than the grace period.
   Orphans go only after the sweep is announced in the manifest (piecestore.fence), and only
   if the manifest it was announced on does not reference them: an upload that a writer may
   still commit is never deleted. Only names this store generates are touched
   (piecestore.names), never a nested store's objects.

If listing or reading the manifest fails, nothing is deleted. Every step is idempotent: a GC
killed at any point leaves work the next one finishes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from piecestore.backends import ObjectMeta
from piecestore.errors import CorruptionError, NotFoundError, PieceStoreError
from piecestore.fence import live_sessions, may_be_swept
from piecestore.lease import Clock, Lease, server_clock
from piecestore.manifest import Manifest, TableSpec
from piecestore.names import DATA_PREFIXES, is_data_object
from piecestore.pacing import Pacer
from piecestore.table import (
    EXTERNAL,
    RECORD_HEADER,
    TOMBSTONE,
    Bytes,
    RawRecords,
    checksum,
    content_intact,
    copy_table,
    decode_external,
    decode_keys,
    decode_record,
)
from piecestore.tableindex import TableIndex
from piecestore.tableset import table_object
from piecestore.tiering import small_table_bytes

if TYPE_CHECKING:
    from piecestore.store import PieceStore

Progress = Callable[[str, int, int], None]

PENDING_PREFIX = "gc/pending/"
_PENDING_RECORD = re.compile(re.escape(PENDING_PREFIX) + r"\d{8}T\d{6}-[0-9a-f]{32}\.json\Z")


@dataclass(frozen=True)
class PendingBatch:
    """Objects that left the manifest together, deletable once ``since`` + grace has passed.

    Kept as small immutable objects beside the manifest, not inside it: every commit rewrites
    the manifest, and a list that grows with write rate x grace period (hundreds of names a
    second under many small writers) would make every commit slower. Written before the
    manifest swap that removes the names, so a crash between the two leaves a record whose
    names are still referenced (skipped by the re-check), never an unrecorded removal.
    """

    record: str
    since: datetime
    names: tuple[str, ...]


def write_pending(backend: Any, since: datetime, names: Sequence[str]) -> str:
    record = f"{PENDING_PREFIX}{since:%Y%m%dT%H%M%S}-{uuid.uuid4().hex}.json"
    body = {"since": since.isoformat(), "names": list(names)}
    backend.put(record, json.dumps(body).encode(), mode="create")
    return str(record)


def read_pending(backend: Any) -> list[PendingBatch]:
    """Every pending-delete record; a damaged one stops GC from deleting anything."""
    batches: list[PendingBatch] = []
    for meta in backend.list(PENDING_PREFIX):
        if not _PENDING_RECORD.match(meta.name):
            continue  # not ours: another store nested under this one's gc/pending/
        try:
            obj = json.loads(backend.get(meta.name))
            since = datetime.fromisoformat(obj["since"])
            names = tuple(str(n) for n in obj["names"])
        except NotFoundError:
            continue  # finished by another GC meanwhile
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptionError(
                f"pending-delete record {meta.name} is unreadable ({e}); GC deletes nothing until it is "
                "repaired or removed (see `piecestore fsck`)"
            ) from e
        batches.append(PendingBatch(meta.name, since, names))
    return batches


@dataclass
class DataStats:
    tables: int = 0
    table_bytes: int = 0
    live_pieces: int = 0
    live_bytes: int = 0
    dead_records: int = 0
    dead_bytes: int = 0
    tombstones: int = 0


@dataclass
class GCReport:
    """What a GC pass found and did; ``before``/``after`` describe the tables the manifest lists."""

    dry_run: bool
    before: DataStats = field(default_factory=DataStats)
    after: DataStats = field(default_factory=DataStats)
    compacted_tables: int = 0
    written_tables: int = 0
    rewritten_bytes: int = 0
    pending_delete: int = 0
    pending_delete_bytes: int = 0
    orphaned: int = 0
    orphaned_bytes: int = 0
    deleted: int = 0
    deleted_bytes: int = 0
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    paused_seconds: float = 0.0  # of ``seconds``, spent yielding to this process's writers

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        mode = "dry run (nothing changed; pass --delete to act)" if self.dry_run else "done"
        b, a = self.before, self.after
        paused = f" ({self.paused_seconds:.2f}s of it yielding to writers)" if self.paused_seconds else ""
        lines = [
            f"GC {mode} in {self.seconds:.2f}s{paused}",
            f"  tables        {b.tables} -> {a.tables} ({b.table_bytes:,} -> {a.table_bytes:,} bytes)",
            f"  live          {b.live_pieces:,} pieces, {b.live_bytes:,} bytes",
            f"  dead          {b.dead_records:,} records, {b.dead_bytes:,} bytes -> {a.dead_bytes:,} bytes",
            f"  compacted     {self.compacted_tables} tables into {self.written_tables} "
            f"({self.rewritten_bytes:,} bytes rewritten)",
            f"  pending       {self.pending_delete} objects, "
            f"{self.pending_delete_bytes:,} bytes (within grace)",
            f"  orphaned      {self.orphaned} objects, {self.orphaned_bytes:,} bytes",
            f"  deleted       {self.deleted} objects, {self.deleted_bytes:,} bytes",
            f"  skipped       {self.skipped}"
            + (f" ({'; '.join(self.skipped_reasons[:3])})" if self.skipped else ""),
        ]
        return "\n".join(lines)


@dataclass
class TableAnalysis:
    spec: TableSpec
    index: TableIndex
    keys: list[str]
    dead: np.ndarray[Any, np.dtype[np.bool_]]  # per record: shadowed by a newer table
    record_bytes: np.ndarray[Any, np.dtype[np.int64]]
    # per record: a tombstone whose key no older table holds, so it shadows nothing any more
    droppable: np.ndarray[Any, np.dtype[np.bool_]]
    position: int = 0  # in the analysed list, newest first
    # per tombstone (record position -> position of the oldest analysed table holding its key)
    reach: dict[int, int] = field(default_factory=dict)

    @property
    def dead_bytes(self) -> int:
        """Bytes a rewrite would reclaim (a tombstone still shadowing something is not dead)."""
        return int(self.record_bytes[self.dead | self.droppable].sum())

    @property
    def dead_fraction(self) -> float:
        return self.dead_bytes / max(1, int(self.record_bytes.sum()))

    def tombstones_hiding_nothing_below(self, last: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Per record: a tombstone whose key no table older than position ``last`` holds (when
        a run down to ``last`` is rewritten, older copies inside the run go with it)."""
        out = np.zeros(self.index.count, np.bool_)
        for p, reach in self.reach.items():
            out[p] = reach <= last
        return out

    def kept(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """Per record: whether compaction copies it (not shadowed, not a droppable tombstone)."""
        kept: np.ndarray[Any, np.dtype[np.bool_]] = ~self.dead & ~self.droppable
        return kept


def analyze(
    store: PieceStore,
    tables: Sequence[tuple[TableSpec, TableIndex]],
    *,
    concurrent: bool = False,
    to_oldest: bool = True,
) -> list[TableAnalysis]:
    """Mark every record shadowed by a newer one, comparing exact keys (never just hashes).

    With ``to_oldest`` (``tables`` reach down to the store's oldest table) a tombstone whose
    key no older table holds is marked droppable: nothing is left for it to hide.
    """
    def key_block(table: tuple[TableSpec, TableIndex]) -> bytes:
        spec, index = table
        return store.backend.get(table_object(spec.name), offset=index.records_bytes, length=index.keys_bytes)

    seen: set[str] = set()
    out: list[TableAnalysis] = []
    # Concurrent fetches suit the background compaction's many small tables; a full GC pass
    # reads one key block at a time so that writers sharing the store keep their throughput.
    blocks = store._read_pool.map(key_block, tables) if concurrent else map(key_block, tables)
    for (spec, index), block in zip(tables, blocks, strict=True):
        keys = decode_keys(spec.name, block, index)
        dead = np.fromiter(map(seen.__contains__, keys), dtype=np.bool_, count=len(keys))
        seen.update(keys)
        record_bytes = np.diff(index.offsets).astype(np.int64)
        out.append(TableAnalysis(spec, index, keys, dead, record_bytes, np.zeros(len(keys), np.bool_)))
    deepest: dict[str, int] = {}  # key -> position of the oldest table holding it
    for i, a in enumerate(out):
        a.position = i
        deepest.update(dict.fromkeys(a.keys, i))
    if to_oldest:
        for a in out:
            for p in np.flatnonzero(a.index.kinds == TOMBSTONE).tolist():
                a.reach[p] = deepest[a.keys[p]]
            a.droppable = a.tombstones_hiding_nothing_below(a.position)
    return out


def stats_of(analysis: Sequence[TableAnalysis]) -> DataStats:
    s = DataStats()
    for a in analysis:
        tomb = a.index.kinds == TOMBSTONE
        live = ~a.dead & ~tomb
        s.tables += 1
        s.table_bytes += a.spec.size
        s.live_pieces += int(live.sum())
        value_bytes = a.record_bytes - a.index.key_lens.astype(np.int64) - RECORD_HEADER.size
        s.live_bytes += int(value_bytes[live].sum())
        s.dead_records += int((a.dead | tomb).sum())
        s.dead_bytes += a.dead_bytes
        s.tombstones += int(tomb.sum())
    return s


def live_records(a: TableAnalysis, data: bytes, dead_blobs: list[str]) -> RawRecords:
    """The records of one table that compaction keeps, verified and ready to copy verbatim.

    A table whose content hash matches its name is intact to the byte, so its records are
    only located (from the index, in bulk). Any other is checked record by record: headers
    and embedded keys against the index and the key block (in bulk with numpy) and every
    checksum, so a damaged record stops the compaction (CorruptionError) instead of being
    carried into a new table. Large pieces whose records die are added to ``dead_blobs``.
    """
    index, name = a.index, a.spec.name
    view = memoryview(data)
    offsets = index.offsets.astype(np.int64)
    keep = a.kept()
    for pos in np.flatnonzero(~keep & (index.kinds == EXTERNAL)).tolist():
        start, end = int(offsets[pos]), int(offsets[pos + 1])
        _, _, payload = decode_record(name, view[start:end], expect_key=a.keys[pos])
        dead_blobs.append(decode_external(payload).obj_name)

    kept = np.flatnonzero(keep)
    if len(kept) == 0:
        return _NO_RECORDS
    starts, ends = offsets[kept], offsets[kept + 1]
    if int(ends[-1]) > len(data):
        raise CorruptionError(f"table {name}: {len(data)} bytes read, the index needs {int(ends[-1])}")
    key_lens = index.key_lens[kept].astype(np.int64)
    value_lens = ends - starts - RECORD_HEADER.size - key_lens
    kept_list = kept.tolist()
    records: list[Bytes] = list(map(view.__getitem__, map(slice, starts.tolist(), ends.tolist())))
    if content_intact(name, data):
        block = data[index.records_bytes : index.records_bytes + index.keys_bytes]
        keys: list[bytes] = list(map(block.split(b"\x00").__getitem__, kept_list))
    else:  # damage somewhere in the file: find it record by record
        keys = "\x00".join([a.keys[p] for p in kept_list]).encode("utf-8").split(b"\x00")
        _check_records(a, data, kept, starts, ends, key_lens, keys, records)
    # Views into ``data`` keep the whole input alive until its records are written out; when
    # most of it is dead, copy the few live records instead, so memory stays near the output.
    if len(kept) * 2 < index.count:
        records = [bytes(r) for r in records]
    hash_of = np.empty(index.count, dtype=np.uint64)
    hash_of[index.positions] = index.hashes
    return RawRecords(keys, records, index.kinds[kept], value_lens.astype(np.uint64), hash_of[kept])


def _check_records(
    a: TableAnalysis,
    data: bytes,
    kept: np.ndarray[Any, np.dtype[np.intp]],
    starts: np.ndarray[Any, np.dtype[np.int64]],
    ends: np.ndarray[Any, np.dtype[np.int64]],
    key_lens: np.ndarray[Any, np.dtype[np.int64]],
    keys: list[bytes],
    records: list[Bytes],
) -> None:
    """CorruptionError naming the first kept record whose header, key or checksum is wrong."""
    index, name = a.index, a.spec.name
    whole = np.frombuffer(data, dtype=np.uint8)
    hdr = RECORD_HEADER.size
    fields = whole[starts[:, None] + np.arange(hdr)].view(_HEADER_DTYPE).ravel()
    bad = (
        (fields["kind"] != index.kinds[kept])
        | (fields["flags"] != 0)
        | (fields["key_len"] != key_lens)
        | (hdr + key_lens + fields["value_len"].astype(np.int64) != ends - starts)
    )
    if bool(bad.any()):
        pos = int(kept[int(np.argmax(bad))])
        raise CorruptionError(f"table {name}: record {pos}'s header does not match the index")
    # The key block (checksummed, lengths checked by decode_keys) must match the keys embedded
    # in the records byte for byte: gather those and compare once.
    firsts = np.cumsum(key_lens) - key_lens
    at = np.repeat(starts + hdr - firsts, key_lens) + np.arange(int(key_lens.sum()))
    if not np.array_equal(whole[at], np.frombuffer(b"".join(keys), dtype=np.uint8)):
        for pos, key, record in zip(kept.tolist(), keys, records, strict=True):
            if record[hdr : hdr + len(key)] != key:
                raise CorruptionError(f"table {name}: record {pos} ({a.keys[pos][:80]!r}) holds another key")
    sums = np.fromiter(map(checksum, [r[8:] for r in records]), dtype=np.uint64, count=len(records))
    bad = sums != fields["checksum"]
    if bool(bad.any()):
        pos = int(kept[int(np.argmax(bad))])
        raise CorruptionError(f"table {name}: record {pos} ({a.keys[pos][:80]!r}) fails its checksum")


_NO_RECORDS = RawRecords([], [], np.empty(0, np.uint8), np.empty(0, np.uint64), np.empty(0, np.uint64))


PREFETCH_BYTES = 8 * 1024 * 1024


class _Prefetch:
    """Fetch a run's tables a few at a time ahead of their use, within a byte budget."""

    def __init__(self, pool: Any, backend: Any, specs: list[TableSpec], budget: int) -> None:
        self._pool, self._backend, self._budget = pool, backend, budget
        self._todo = list(reversed(specs))
        self._inflight: list[tuple[int, Future[bytes]]] = []
        self._fill()

    def _fill(self) -> None:
        held = sum(size for size, _ in self._inflight)
        while self._todo and len(self._inflight) < 8 and (not self._inflight or held < self._budget):
            spec = self._todo.pop()
            self._inflight.append((spec.size, self._pool.submit(self._backend.get, table_object(spec.name))))
            held += spec.size

    def next(self) -> bytes:
        _, future = self._inflight.pop(0)
        data: bytes = future.result()
        self._fill()
        return data


_HEADER_DTYPE = np.dtype(
    [("checksum", "<u8"), ("kind", "u1"), ("flags", "u1"), ("key_len", "<u2"), ("value_len", "<u8")]
)


class GarbageCollector:
    def __init__(self, store: PieceStore, *, clock: Clock | None = None, progress: Progress | None = None):
        self.store = store
        self.backend = store.backend
        self.clock = clock or server_clock(store.backend)
        self.progress = progress or (lambda phase, done, total: None)
        gc = store.settings.gc
        self.grace = timedelta(seconds=gc.grace_seconds)
        self.dead_fraction = gc.dead_fraction
        self.lease_seconds = gc.lease_seconds
        eng = store.settings.engine
        self.target = eng.table_target_bytes
        self.small = small_table_bytes(eng.table_target_bytes, eng.flush_bytes)

    # -- the pass ------------------------------------------------------------------------
    def run(self, *, dry_run: bool = False, compact: bool = True, delete: bool = True) -> GCReport:
        started = time.monotonic()
        report = GCReport(dry_run=dry_run)
        lease = Lease(self.backend, self.lease_seconds, self.clock)
        if not dry_run:
            lease.acquire()
        try:
            scan_time = self.clock()
            listed = {
                m.name: m
                for prefix in DATA_PREFIXES
                for m in self.backend.list(prefix)
                if is_data_object(m.name)
            }
            self.store.refresh()
            tables = self.store.tables.snapshot()
            analysis = analyze(self.store, tables)
            report.before = stats_of(analysis)
            # A pass converges: a rewrite can leave tombstones with nothing left to hide (or
            # small outputs beside each other), so plan again until a round commits nothing.
            for _round in range(3 if compact and not dry_run else 1 if compact else 0):
                if not self._compact(analysis, report, dry_run, lease):
                    break
                self.store.refresh()
                analysis = analyze(self.store, self.store.tables.snapshot())
            if not dry_run:
                lease.renew()
            self.store.refresh()
            report.after = (
                stats_of(analyze(self.store, self.store.tables.snapshot())) if not dry_run else report.before
            )
            if delete:
                self._reclaim(listed, scan_time, report, dry_run, lease)
        finally:
            if not dry_run:
                lease.release()
        report.seconds = time.monotonic() - started
        return report

    # -- compaction ----------------------------------------------------------------------
    def compact_tiered(self) -> GCReport:
        """Background compaction: merge the run of tables :func:`pick_run` picks, if any.

        It reads only the run's tables and needs no lease: the swap is a CAS that fails
        cleanly if anything else changed those tables. Records are dropped only when shadowed
        inside the run, so nothing outside it must be read.
        """
        started = time.monotonic()
        report = GCReport(dry_run=False)
        tables = self.store.tables.snapshot()
        picked = self.store.compaction_run([spec for spec, _ in tables])
        if picked is not None:
            start, stop = picked
            report.compacted_tables = stop - start
            run = tables[start:stop]
            # Paced only while it keeps up: past twice the trigger, the merge runs flat out.
            piling_up = 2 * self.store.settings.gc.compact_min_tables

            def behind() -> bool:
                return len(self.store.manifest.tables) >= piling_up

            analysis = analyze(self.store, run, concurrent=True, to_oldest=stop == len(tables))
            self._rewrite(analysis, report, behind=behind)
        report.seconds = time.monotonic() - started
        return report

    def plan_runs(self, analysis: Sequence[TableAnalysis]) -> list[list[TableAnalysis]]:
        """Adjacent tables worth rewriting together: mostly dead, or small enough to merge."""
        small = self.small
        runs: list[list[TableAnalysis]] = []
        current: list[TableAnalysis] = []
        for a in analysis:
            if a.dead_fraction > self.dead_fraction or a.spec.size < small:
                current.append(a)
            else:
                if current:
                    runs.append(current)
                current = []
        if current:
            runs.append(current)
        return [r for r in runs if len(r) > 1 or r[0].dead_fraction > self.dead_fraction]

    def _compact(self, analysis: list[TableAnalysis], report: GCReport, dry_run: bool, lease: Lease) -> int:
        """Rewrite the planned runs; how many were committed."""
        runs = self.plan_runs(analysis)
        total = sum(len(r) for r in runs)
        done = committed = 0
        for run in runs:
            report.compacted_tables += len(run)
            if dry_run:
                done += len(run)
                self.progress("compact", done, total)
                continue
            for a in run:  # tombstones whose key only this run's (dead) records hold go too
                a.droppable = a.tombstones_hiding_nothing_below(run[-1].position)
            below = [a.spec.name for a in analysis[run[-1].position + 1 :]]
            try:
                self._rewrite(run, report, below=below, renew=lease.renew)
                committed += 1
            except PieceStoreError as e:
                report.skipped += len(run)
                report.skipped_reasons.append(f"compaction of {len(run)} tables: {e}")
            done += len(run)
            self.progress("compact", done, total)
            lease.renew()
        return committed

    def _rewrite(
        self,
        run: list[TableAnalysis],
        report: GCReport,
        *,
        below: Sequence[str] = (),
        renew: Callable[[], None] | None = None,
        behind: Callable[[], bool] | None = None,
    ) -> None:
        """Stream the run's live records into new tables of the target size, then swap them in.

        ``below``: the tables older than the run when it was analysed; a run that drops
        tombstones is swapped in only if they are still exactly those. ``renew`` (the GC
        lease's) is called every third of the lease, since a long run, or one slowed down to
        yield to writers, may outlast the lease itself. ``behind``: see Pacer.

        Memory stays bounded (one input table, one output group, a few uploads in flight)
        however long the run; the next input is fetched and outputs are uploaded while the
        current table is decoded. Live keys are unique across the run (older copies are
        marked dead), so output tables may overlap in key range without ambiguity.
        """
        dead_blobs: list[str] = []
        built_specs: list[TableSpec] = []
        uploads: list[Future[Any]] = []
        group: list[RawRecords] = []
        size = 0
        # Outputs are uploads like a writer's: a sweep must not delete them before the swap.
        stamp = self.store.session.stamp(self.store.manifest)
        reads, writes = self.store._read_pool, self.store._write_pool
        limit = self.store.settings.engine.write_concurrency
        # As few outputs as the target size allows, all of one size: the last one's upload is
        # all that cannot overlap the decoding, so it should not be a full target's worth.
        live_bytes = sum(
            int((a.record_bytes - RECORD_HEADER.size)[a.kept()].sum()) for a in run
        )
        cut_bytes = math.ceil(live_bytes / max(1, math.ceil(live_bytes / self.target)))

        def emit() -> None:
            nonlocal group, size
            if not group:
                return
            t = copy_table(RawRecords.concat(group))
            group, size = [], 0
            while len(uploads) >= limit:
                uploads.pop(0).result()
            uploads.append(writes.submit(self.backend.put_parts, table_object(t.name), t.parts))
            built_specs.append(self.store.tables.add_built(t))
            report.rewritten_bytes += t.size

        try:
            # Many small tables are fetched well ahead (latency-bound); big ones one ahead, so
            # a compaction does not crowd out the writers sharing the store.
            fetches = _Prefetch(reads, self.backend, [a.spec for a in run], PREFETCH_BYTES)
            pacer = Pacer(self.store.settings.gc.share_while_writing, behind)
            renewed = time.monotonic()
            for a in run:
                if pacer.pacing():  # the writers' disk too: this run's uploads count as its work
                    while uploads:
                        uploads.pop(0).result()
                pacer.step()
                if renew is not None and time.monotonic() - renewed > self.lease_seconds / 3:
                    renew()
                    renewed = time.monotonic()
                live = live_records(a, fetches.next(), dead_blobs)
                # An output table is cut after the record that brings it to cut_bytes.
                key_lens = np.fromiter(map(len, live.keys), np.int64, len(live))
                ends = np.cumsum(live.value_lens.astype(np.int64) + key_lens)
                taken = 0
                while taken < len(live):
                    base = int(ends[taken - 1]) if taken else 0
                    cut = int(np.searchsorted(ends, base + cut_bytes - size)) + 1
                    if cut > len(live):
                        group.append(live.slice(taken, len(live)))
                        size += int(ends[-1]) - base
                        break
                    group.append(live.slice(taken, cut))
                    taken = cut
                    emit()
            emit()
            report.paused_seconds += pacer.paused
            for upload in uploads:
                upload.result()
        except BaseException:  # nothing of this run will be committed
            self.store.tables.discard(s.name for s in built_specs)
            raise
        specs = tuple(built_specs)
        replaced = [a.spec.name for a in run]
        record = write_pending(self.backend, self.clock(), [table_object(n) for n in replaced] + dead_blobs)

        drops_tombstones = any(bool(a.droppable.any()) for a in run)  # set by _compact per run
        below = list(below)
        applied = [False]

        def swap(m: Manifest) -> Manifest | None:
            applied[0] = False
            if may_be_swept(stamp, m):
                return None  # a sweep may have taken our outputs: drop the run, retry later
            names = [t.name for t in m.tables]
            try:
                at = names.index(replaced[0])
            except ValueError:
                return None
            if names[at : at + len(replaced)] != replaced:
                return None  # the run is no longer intact: leave this one alone
            if drops_tombstones and names[at + len(replaced) :] != below:
                return None  # the tables below changed: a dropped tombstone may hide a key there
            tables = m.tables[:at] + specs + m.tables[at + len(replaced) :]
            applied[0] = True
            return dataclasses.replace(m, tables=tables)

        self.store._commit(swap)
        if not applied[0]:
            # not committed: our new tables are referenced by nobody, remove them now
            self.store.tables.discard(s.name for s in specs)
            self.backend.delete_many([table_object(s.name) for s in specs] + [record])
            raise PieceStoreError(
                "the tables changed under the compaction; it will be retried by the next GC"
            )
        report.written_tables += len(specs)

    # -- deletion ------------------------------------------------------------------------
    def _referenced_blobs(self, m: Manifest) -> set[str]:
        refs: set[str] = set()
        for spec, index in self.store.tables.snapshot():
            ext = np.flatnonzero(index.kinds == EXTERNAL)
            if len(ext) == 0:
                continue
            spans = [index.span(int(p)) for p in ext]
            blobs = self.backend.get_ranges(table_object(spec.name), spans)
            for blob in blobs:
                _, _, payload = decode_record(spec.name, blob)
                refs.add(decode_external(payload).obj_name)
        return refs

    def _reclaim(
        self,
        listed: dict[str, ObjectMeta],
        scan_time: datetime,
        report: GCReport,
        dry_run: bool,
        lease: Lease,
    ) -> None:
        # An age is the difference of two server timestamps, each rounded to the store's
        # resolution: every threshold is extended by it, so no age is ever overestimated.
        res = timedelta(seconds=self.backend.capabilities.timestamp_resolution)
        grace, held = self.grace + res, timedelta(seconds=self.lease_seconds) + res
        m = self.store.manifest
        referenced = {table_object(t.name) for t in m.tables} | self._referenced_blobs(m)
        # Read after the manifest: a compaction writes its record before its swap, so any name
        # that left the manifest we read is covered by a record we see here.
        batches = read_pending(self.backend)
        pending_names = {n for b in batches for n in b.names}
        # Pending deletes are judged by the time now, not at the scan: what this pass replaced
        # is due in this pass when the grace period is 0 (a pass converges).
        # (No rounding margin here: the grace period of what left the manifest is a courtesy to
        # readers with old views, who look again when an object is gone; writers never refer
        # to such names again.)
        clock_now = self.clock() if batches else scan_time
        due = [b for b in batches if clock_now - b.since >= self.grace]
        for b in batches:
            if b not in due:
                waiting = [n for n in b.names if n not in referenced]
                report.pending_delete += len(waiting)
                report.pending_delete_bytes += sum(listed[n].size for n in waiting if n in listed)
        # Listed after the objects: a writer renews its session before it uploads (fence).
        live = live_sessions(self.backend, scan_time, held.total_seconds(), remove_stale=not dry_run)
        spare = held if live else timedelta(0)
        orphans: list[ObjectMeta] = []
        for name, meta in listed.items():
            if name in referenced or name in pending_names:
                continue
            report.orphaned += 1
            report.orphaned_bytes += meta.size
            age = scan_time - meta.last_modified
            if age < grace or age < spare:
                report.skipped += 1
                if len(report.skipped_reasons) < 20:
                    why = "the grace period" if age < grace else "the lease, while writers are live"
                    report.skipped_reasons.append(f"{name}: orphan younger than {why}")
                continue
            orphans.append(meta)
        if dry_run:
            return
        lease.renew()
        if orphans:
            # Announce the sweep before deleting any orphan (piecestore.fence): a writer that
            # commits after this sees it and does not reference an upload we may delete; one
            # that committed before is in the manifest we announce on, checked below.
            grace_s, lease_s = self.grace.total_seconds(), self.lease_seconds
            self.store._commit(lambda m: m.announce_sweep(grace_s, lease_s))
        else:
            self.store.refresh()  # re-check against the newest manifest just before deleting
        m = self.store.manifest
        referenced = {table_object(t.name) for t in m.tables} | self._referenced_blobs(m)
        total = sum(len(b.names) for b in due) + len(orphans)
        done = 0
        for batch in due:
            gone = [n for n in batch.names if n not in referenced]
            self.backend.delete_many(gone)
            report.deleted += len(gone)
            report.deleted_bytes += sum(listed[n].size for n in gone if n in listed)
            # Names still referenced were put back (a failed swap): nothing left to do for them.
            self.backend.delete(batch.record)
            done += len(batch.names)
            self.progress("delete", done, total)
        for meta in orphans:
            done += 1
            if meta.name in referenced:
                continue
            try:
                now = self.backend.head(meta.name)
            except NotFoundError:
                continue
            if now.etag != meta.etag or now.last_modified != meta.last_modified:
                report.skipped += 1
                report.skipped_reasons.append(f"{meta.name}: changed since the scan")
                continue
            self.backend.delete(meta.name)
            report.deleted += 1
            report.deleted_bytes += meta.size
            self.progress("delete", done, total)
