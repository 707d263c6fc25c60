"""Restore a damaged or lost manifest from the history copies every commit leaves behind.

Every commit writes the exact bytes it committed to ``manifests/<version>.json`` before it is
acknowledged (see piecestore.manifest), so the newest history copy that passes its checksum
holds every acknowledged piece unless newer copies are damaged too. The restored manifest is
written as a *new* version above every version seen, so processes that hold an older view
accept it, and with the sweep fence bumped, so no writer's stale uploads slip past a GC sweep.
It is written with If-Match on the damaged object, so a concurrent change is never clobbered.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from piecestore.backends import Backend, IfMatch
from piecestore.errors import (
    AlreadyExistsError,
    BucketNotFoundError,
    ConflictError,
    CorruptionError,
    NotFoundError,
    PreconditionFailedError,
)
from piecestore.manifest import (
    MANIFEST_NAME,
    TABLES_PREFIX,
    Manifest,
    ManifestStore,
    list_history,
    unverified_field,
)
from piecestore.tableset import table_object


@dataclass
class RestoreReport:
    """What a restore found and did; ``problems`` say what could not be recovered."""

    url: str
    damage: str | None = None  # what is wrong with manifest.json; None: nothing to restore
    restored_version: int | None = None  # the history version whose tables were restored
    new_version: int | None = None  # the version the restored manifest is (or would be) written as
    new_sweep: int | None = None
    newest_version: int | None = None  # the newest committed version any history name shows
    lost_versions: list[int] = field(default_factory=list)  # committed, newer than the one restored
    damaged_copies: list[str] = field(default_factory=list)  # history copies that are unreadable
    missing_tables: list[str] = field(default_factory=list)  # listed by the restored manifest, absent
    losses: list[str] = field(default_factory=list)  # what the restore cannot bring back, if anything
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    written: bool = False  # False: a dry run, nothing to do, or nothing to restore from

    @property
    def lossless(self) -> bool:
        """The newest committed version was restored: nothing acknowledged is lost."""
        return self.restored_version is not None and not self.losses

    @property
    def ok(self) -> bool:
        return not self.problems and not self.missing_tables

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "lossless": self.lossless, "ok": self.ok}

    def summary(self) -> str:
        """One sentence: what was restored, or what ``fsck --repair`` would restore."""
        if self.damage is None:
            return "manifest reads fine; nothing to restore"
        if self.restored_version is None:
            return "no readable history copy of the manifest: restore manifest.json from a backup"
        verb = "restored" if self.written else "`piecestore fsck --repair` can restore"
        head = f"{verb} manifest version {self.restored_version} (as version {self.new_version})"
        if self.lossless:
            return f"{head}: the newest committed version, so nothing acknowledged is lost"
        if self.written:  # the losses are among the problems
            return f"{head}: the newest readable copy, but not all that was committed"
        return f"{head}: " + "; ".join(self.losses)

    def lines(self) -> list[str]:
        """The summary, then what else the restore found (damaged copies, notes)."""
        out = [self.summary()]
        out += [f"history copy damaged: {name}" for name in self.damaged_copies]
        out += self.notes
        return out


def damage_only(message: str) -> str:
    """A manifest error without its generic advice, for lines that give the specific remedy."""
    for advice in ("; run `piecestore fsck", "; restore it from a backup"):
        cut = message.find(advice)
        if cut > 0:
            message = message[:cut]
    return message


def _lost_sentence(versions: list[int]) -> str:
    shown = ", ".join(str(v) for v in versions[:10]) + (" ..." if len(versions) > 10 else "")
    return (
        f"newer committed version(s) {shown} are lost (their history copies are damaged); pieces "
        "committed in them may be missing, and the tables they added are now unreferenced, so GC "
        "deletes them after its grace period: copy them out first if you need them"
    )


def restore_manifest(backend: Backend, *, dry_run: bool = False) -> RestoreReport:
    """Restore a damaged or missing manifest.json from its newest readable history copy.

    A manifest that reads fine is left alone, and so is a missing one without history (an
    empty store). ``dry_run`` reports what would be restored and writes nothing.
    """
    url = backend.display_url
    report = RestoreReport(url)
    damaged: bytes | None = None
    etag: str | None = None
    try:
        damaged, meta = backend.get_with_meta(MANIFEST_NAME)
        etag = meta.etag
    except BucketNotFoundError:
        raise
    except NotFoundError:
        pass
    if damaged is not None:
        try:
            Manifest.from_bytes(damaged, url)
            return report
        except CorruptionError as e:
            report.damage = damage_only(str(e))
    history = list_history(backend)
    if damaged is None:
        if not history:
            return report
        report.damage = f"manifest of {url} is missing, but the store has manifest history"
    if history:
        report.newest_version = history[-1][0]
    readable: list[Manifest] = []
    for version, meta in reversed(history):
        try:
            data = backend.get(meta.name)
        except NotFoundError:
            continue  # pruned meanwhile: only old copies are
        try:
            copy = Manifest.from_bytes(data, f"{url} ({meta.name})")
        except CorruptionError:
            report.damaged_copies.append(meta.name)
            continue
        if copy.version != version:
            report.damaged_copies.append(meta.name)
            continue
        readable.append(copy)
    if not readable:
        report.problems.append(
            f"manifest of {url} cannot be restored: no history copy of it is readable "
            f"({len(history)} found); restore manifest.json from a backup"
        )
        return report
    chosen = readable[0]
    report.restored_version = chosen.version
    report.lost_versions = [v for v, _ in history if v > chosen.version]
    if report.lost_versions:
        report.losses.append(_lost_sentence(report.lost_versions))
    newest = history[-1][0]
    versions = [newest]
    sweeps = [m.sweep for m in readable]
    if damaged is not None:
        # Unverified, but a process may have read these before the damage: stay above them.
        claimed = unverified_field(damaged, "version")
        versions += [claimed] if claimed is not None else []
        sweeps += [s] if (s := unverified_field(damaged, "sweep")) is not None else []
        if claimed is not None and claimed > newest:
            claim = f"the damaged manifest claims version {claimed} (unverified), newer than any history copy"
            if claimed == newest + 1:  # its history write failed or never ran: it returned an error
                report.notes.append(f"{claim}: if so, that commit was never acknowledged")
            else:
                report.losses.append(
                    f"{claim}: if so, {claimed - newest} commits left no history copy (made by a piecestore "
                    "that keeps no manifest history?) and pieces committed in them may be missing"
                )
    report.problems += [f"manifest of {url}: {loss}" for loss in report.losses]
    restored = replace(chosen, version=max(versions) + 1, sweep=max(sweeps) + 1)
    report.new_version, report.new_sweep = restored.version, restored.sweep
    listed = {m.name for m in backend.list(TABLES_PREFIX)}  # one listing, not a HEAD per table
    report.missing_tables = [s.name for s in restored.tables if table_object(s.name) not in listed]
    if report.missing_tables:
        report.notes.append(
            f"{len(report.missing_tables)} table(s) the restored manifest lists are missing; "
            "fsck names them, and reads of their pieces fail"
        )
    if dry_run:
        return report
    data = restored.to_bytes()
    try:
        backend.put(MANIFEST_NAME, data, mode="create" if etag is None else IfMatch(etag))
    except (PreconditionFailedError, AlreadyExistsError, NotFoundError) as e:
        try:
            now = ManifestStore(backend).read().manifest
        except CorruptionError:
            raise ConflictError(
                f"manifest of {url} changed while it was being restored (another repair?) and is "
                "still damaged; nothing was written: run `piecestore fsck --repair` again"
            ) from e
        note = f"the manifest changed during the restore and now reads fine (version {now.version}); "
        return RestoreReport(url, notes=[note + "nothing was written"])
    report.written = True
    ManifestStore(backend).record_history(restored.version, data)
    return report


__all__ = ["RestoreReport", "damage_only", "restore_manifest"]
