"""fsck: check every byte a store's manifest can reach, and say exactly what is wrong.

Reads each listed table whole (every record checksum, key block and index), compares it with
its manifest entry, and streams each large piece's object to verify its chunk checksums.
Objects no manifest references are reported as orphans (GC reclaims them), not as damage.

A damaged manifest is named with what ``--repair`` would restore from the manifest history;
``fsck_backend`` runs on a store whose manifest is too damaged for the store to open at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from piecestore.backends import Backend
from piecestore.errors import CorruptionError, NotFoundError, PieceStoreError
from piecestore.gc import read_pending
from piecestore.manifest import Manifest, ManifestStore
from piecestore.names import DATA_PREFIXES, is_data_object
from piecestore.repair import RestoreReport, damage_only, restore_manifest
from piecestore.table import EXTERNAL, checksum, decode_external, decode_record, parse_index, verify_table
from piecestore.tableset import table_object

if TYPE_CHECKING:
    from piecestore.settings import Settings
    from piecestore.store import PieceStore

Progress = Callable[[int, int], None]


@dataclass
class FsckReport:
    tables_checked: int = 0
    records_checked: int = 0
    bytes_checked: int = 0
    externals_checked: int = 0
    orphans: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    restore: RestoreReport | None = None  # what --repair did to a damaged manifest

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        restore = None if self.restore is None else self.restore.to_json()
        return {**asdict(self), "restore": restore, "ok": self.ok}

    def __str__(self) -> str:
        head = "fsck: OK" if self.ok else f"fsck: {len(self.problems)} problem(s)"
        lines = [
            f"{head} in {self.seconds:.2f}s: {self.tables_checked} tables, "
            f"{self.records_checked:,} records, "
            f"{self.externals_checked} large pieces, {self.bytes_checked:,} bytes verified",
        ]
        if self.restore is not None and self.restore.written:
            first, *rest = self.restore.lines()
            lines += [f"  REPAIRED {first}", *(f"  NOTE {line}" for line in rest)]
        lines += [f"  PROBLEM {p}" for p in self.problems]
        if self.orphans:
            lines.append(
                f"  {len(self.orphans)} unreferenced object(s) (GC reclaims them after the grace period)"
            )
        return "\n".join(lines)


def fsck(store: PieceStore, progress: Progress | None = None, repair: bool = False) -> FsckReport:
    """Check an open store; ``repair`` first restores its manifest if it was damaged since."""
    started = time.monotonic()
    report = FsckReport()
    try:
        manifest = store.manifests.read().manifest
    except CorruptionError as e:
        if not repair:
            report.problems.append(_damaged_manifest(store.backend, e, report))
            report.seconds = time.monotonic() - started
            return report
        report.restore = restore_manifest(store.backend)
        report.problems += report.restore.problems
        try:
            manifest = store.manifests.read().manifest
        except CorruptionError as again:
            report.problems.append(damage_only(str(again)))
            report.seconds = time.monotonic() - started
            return report
        store.refresh()
    _check(store.backend, manifest, report, progress)
    report.seconds = time.monotonic() - started
    return report


def fsck_backend(
    backend: Backend, settings: Settings, progress: Progress | None = None, *, repair: bool = False
) -> FsckReport:
    """fsck of the store on ``backend``, even one whose manifest is too damaged to open it.

    A damaged manifest is reported with what ``repair`` would restore; with ``repair`` it is
    restored first (the backend must be writable), then the store is opened and fully checked.
    Takes ownership of ``backend``: it is closed on return.
    """
    from piecestore.store import PieceStore

    started = time.monotonic()
    restore: RestoreReport | None = None
    with backend:
        try:
            ManifestStore(backend).read()
        except CorruptionError as e:
            if not repair:
                report = FsckReport()
                report.problems.append(_damaged_manifest(backend, e, report))
                report.seconds = time.monotonic() - started
                return report
            restore = restore_manifest(backend)
            if not restore.written and restore.damage is not None:
                report = FsckReport(problems=[damage_only(str(e)), *restore.problems], restore=restore)
                report.seconds = time.monotonic() - started
                return report
        with PieceStore(backend, settings) as store:
            report = fsck(store, progress, repair=repair)
    if restore is not None:
        report.restore = restore
        report.problems[:0] = restore.problems
    report.seconds = time.monotonic() - started
    return report


def _damaged_manifest(backend: Backend, error: CorruptionError, report: FsckReport) -> str:
    """The problem line of a damaged manifest: the damage, and what ``--repair`` would restore
    (the plan also goes in ``report.restore``, unwritten)."""
    try:
        report.restore = restore_manifest(backend, dry_run=True)
    except PieceStoreError as e:
        return f"{error} (looking for a history copy to restore failed: {e})"
    if report.restore.damage is None:  # repaired meanwhile
        return f"{error} (it reads fine again now: run fsck again)"
    return f"{report.restore.damage}; {report.restore.summary()}"


def _check(backend: Backend, manifest: Manifest, report: FsckReport, progress: Progress | None) -> None:
    referenced: set[str] = set()
    specs = manifest.tables
    for i, spec in enumerate(specs):
        name = table_object(spec.name)
        referenced.add(name)
        try:
            data = backend.get(name)
        except NotFoundError:
            report.problems.append(f"table {spec.name}: listed in the manifest but missing from the store")
            continue
        report.tables_checked += 1
        report.bytes_checked += len(data)
        if len(data) != spec.size:
            report.problems.append(f"table {spec.name}: {len(data)} bytes, the manifest says {spec.size}")
        report.problems.extend(verify_table(spec.name, data))
        try:
            index = parse_index(spec.name, data[-spec.index_bytes :], file_size=len(data))
        except CorruptionError as e:
            report.problems.append(
                f"table {spec.name}: index unreadable with the manifest's index_bytes: {e}"
            )
            continue
        if index.count != spec.count:
            report.problems.append(
                f"table {spec.name}: {index.count} records, the manifest says {spec.count}"
            )
        report.records_checked += index.count
        for pos in range(index.count):
            if index.kind(pos) != EXTERNAL:
                continue
            start, length = index.span(pos)
            try:
                key, _, payload = decode_record(spec.name, data[start : start + length])
                ref = decode_external(payload, spec.name)
            except CorruptionError as e:
                report.problems.append(str(e))
                continue
            referenced.add(ref.obj_name)
            report.externals_checked += 1
            report.problems.extend(_check_external(backend, key, ref))
        if progress is not None:
            progress(i + 1, len(specs))
    try:
        pending = {n for batch in read_pending(backend) for n in batch.names}
        for prefix in DATA_PREFIXES:
            for meta in backend.list(prefix):
                if is_data_object(meta.name) and meta.name not in referenced and meta.name not in pending:
                    report.orphans.append(meta.name)
    except PieceStoreError as e:
        report.problems.append(f"listing the store failed: {e}")


def _check_external(backend: Backend, key: str, ref: Any) -> list[str]:
    where = f"large piece {key[:80]!r} ({ref.obj_name})"
    try:
        meta = backend.head(ref.obj_name)
    except NotFoundError:
        return [f"{where}: object missing"]
    if meta.size != ref.size:
        return [f"{where}: object is {meta.size} bytes, the record says {ref.size}"]
    problems: list[str] = []
    for i, chunk in enumerate(backend.iter_chunks(ref.obj_name, chunk_bytes=ref.chunk_bytes)):
        if i >= len(ref.chunk_checksums) or checksum(chunk) != ref.chunk_checksums[i]:
            problems.append(f"{where}: chunk {i} fails its checksum")
    return problems
