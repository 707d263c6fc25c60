"""fsck: check every byte a store's manifest can reach, and say exactly what is wrong.

Reads each listed table whole (every record checksum, key block and index), compares it with
its manifest entry, and streams each large piece's object to verify its chunk checksums.
Objects no manifest references are reported as orphans (GC reclaims them), not as damage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from piecestore.errors import CorruptionError, NotFoundError, PieceStoreError
from piecestore.gc import read_pending
from piecestore.manifest import BLOBS_PREFIX, TABLES_PREFIX
from piecestore.table import EXTERNAL, checksum, decode_external, decode_record, parse_index, verify_table
from piecestore.tableset import table_object

if TYPE_CHECKING:
    from piecestore.store import PieceStore


@dataclass
class FsckReport:
    tables_checked: int = 0
    records_checked: int = 0
    bytes_checked: int = 0
    externals_checked: int = 0
    orphans: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def __str__(self) -> str:
        head = "fsck: OK" if self.ok else f"fsck: {len(self.problems)} problem(s)"
        lines = [
            f"{head} in {self.seconds:.2f}s: {self.tables_checked} tables, "
            f"{self.records_checked:,} records, "
            f"{self.externals_checked} large pieces, {self.bytes_checked:,} bytes verified",
        ]
        lines += [f"  PROBLEM {p}" for p in self.problems]
        if self.orphans:
            lines.append(
                f"  {len(self.orphans)} unreferenced object(s) (GC reclaims them after the grace period)"
            )
        return "\n".join(lines)


def fsck(store: PieceStore, progress: Callable[[int, int], None] | None = None) -> FsckReport:
    started = time.monotonic()
    report = FsckReport()
    backend = store.backend
    try:
        view = store.manifests.read()
    except CorruptionError as e:
        report.problems.append(f"manifest: {e}")
        report.seconds = time.monotonic() - started
        return report
    manifest = view.manifest
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
            report.problems.extend(_check_external(store, key, ref))
        if progress is not None:
            progress(i + 1, len(specs))
    try:
        pending = {n for batch in read_pending(backend) for n in batch.names}
        for prefix in (TABLES_PREFIX, BLOBS_PREFIX):
            for meta in backend.list(prefix):
                if meta.name not in referenced and meta.name not in pending:
                    report.orphans.append(meta.name)
    except PieceStoreError as e:
        report.problems.append(f"listing the store failed: {e}")
    report.seconds = time.monotonic() - started
    return report


def _check_external(store: PieceStore, key: str, ref: Any) -> list[str]:
    where = f"large piece {key[:80]!r} ({ref.obj_name})"
    try:
        meta = store.backend.head(ref.obj_name)
    except NotFoundError:
        return [f"{where}: object missing"]
    if meta.size != ref.size:
        return [f"{where}: object is {meta.size} bytes, the record says {ref.size}"]
    problems: list[str] = []
    for i, chunk in enumerate(store.backend.iter_chunks(ref.obj_name, chunk_bytes=ref.chunk_bytes)):
        if i >= len(ref.chunk_checksums) or checksum(chunk) != ref.chunk_checksums[i]:
            problems.append(f"{where}: chunk {i} fails its checksum")
    return problems
