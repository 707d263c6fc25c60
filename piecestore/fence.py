"""The sweep fence: GC never deletes an object that a writer may still commit.

Every object a writer uploads (a table, a large piece) exists before the manifest commit that
references it, so for a while it looks exactly like an orphan left by a crashed writer. GC may
delete orphans older than ``gc.grace_seconds`` — with grace 0, at once. The fence makes the
two sides meet at the manifest, whose compare-and-swap orders every commit:

* GC lists the objects first, then commits ``Manifest.sweep + 1`` (it *announces* the sweep),
  and deletes only what the manifest it announced on does not reference. A commit that landed
  before the announcement is in that manifest, so its objects are spared.
* A writer stamps each upload with the sweep number of the view it held before the upload
  began (:class:`UploadStamp`). Its commit is re-applied to whatever manifest wins the CAS; if
  that manifest carries a higher sweep number, an announced sweep may have listed the upload,
  and the writer must not reference it (:func:`may_be_swept`): it uploads again under a new
  name. A sweep announced on an older manifest listed objects before this writer's view was
  read, so before its upload began: those could not include it.

Two facts narrow the check without weakening it; each sweep notes in the manifest the grace
and lease it applies (:class:`~piecestore.manifest.SweepNote`), since other processes may be
configured otherwise:

* a sweep deletes only objects at least its grace period old by the server's clock, measured
  from its scan, which begins before its announcement, which the writer sees. So an upload
  begun less than half that grace ago by this machine's clock (half: room for clocks that run
  at different rates) was not a candidate;
* while any writer's session object (:class:`WriterSession`, renewed before uploads) is
  fresher than the sweep's lease, a sweep also spares objects younger than that lease. An
  upload whose session was renewed less than half a lease before now was therefore spared too:
  a busy writer is never disturbed by GC, whatever the grace period, grace 0 included. Only a
  write held longer than that (a buffered batch, a stalled process) must check and upload again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from piecestore.backends import Backend
from piecestore.errors import ConflictError, PieceStoreError
from piecestore.manifest import Manifest

SESSIONS_PREFIX = "gc/sessions/"
_SESSION_OBJECT = re.compile(re.escape(SESSIONS_PREFIX) + r"[0-9a-f]{32}\Z")


@dataclass(frozen=True, slots=True)
class UploadStamp:
    """When an upload began: the sweep number of the view held then, the monotonic time, and
    when this writer's session was last renewed before it (monotonic)."""

    sweep: int
    started: float
    renewed: float

    def earliest(self, other: UploadStamp | None) -> UploadStamp:
        """The stamp covering both uploads: the older view, the earlier start and renewal."""
        if other is None:
            return self
        return UploadStamp(
            min(self.sweep, other.sweep), min(self.started, other.started), min(self.renewed, other.renewed)
        )


def may_be_swept(stamp: UploadStamp | None, manifest: Manifest) -> bool:
    """Whether a sweep announced in ``manifest`` since the stamp may have deleted the uploads."""
    if stamp is None or manifest.sweep <= stamp.sweep:
        return False
    since = [n for n in manifest.sweep_notes if n.number > stamp.sweep]
    if len(since) < manifest.sweep - stamp.sweep:
        return True  # a sweep whose note is gone: assume grace and lease 0
    now = time.monotonic()
    grace = min(n.grace_seconds for n in since)
    lease = min(n.lease_seconds for n in since)
    return now - stamp.started >= grace / 2 and now - stamp.renewed >= lease / 2


def live_sessions(backend: Backend, at: datetime, lease_seconds: float, *, remove_stale: bool) -> bool:
    """Whether any writer session of the store was renewed less than a lease before ``at``
    (server time); with ``remove_stale``, sessions stale for four leases go (best effort)."""
    live = False
    for meta in backend.list(SESSIONS_PREFIX):
        if not _SESSION_OBJECT.match(meta.name):
            continue
        age = at - meta.last_modified
        if age < timedelta(seconds=lease_seconds):
            live = True
        elif remove_stale and age > timedelta(seconds=4 * lease_seconds):
            with contextlib.suppress(PieceStoreError):
                backend.delete(meta.name)
    return live


class WriterSession:
    """A writing handle's liveness object, ``gc/sessions/<id>``, renewed before uploads.

    While it is fresh (renewed within a sweep's lease, by the server's clock), GC spares young
    unreferenced objects: they may be this writer's uploads on their way to a commit. Renewal
    costs one small PUT per quarter lease of writing, none while idle; close() removes it.
    """

    def __init__(self, backend: Backend, lease_seconds: float) -> None:
        self.backend = backend
        self.name = f"{SESSIONS_PREFIX}{uuid.uuid4().hex}"
        self.lease_seconds = lease_seconds
        self._lock = threading.Lock()
        self._renewed: float | None = None

    def stamp(self, manifest: Manifest) -> UploadStamp:
        """Renew the session if due, then stamp an upload: call right before it starts."""
        # Renewed often enough for the shortest lease a recent sweep used (other processes' GC
        # may be configured with a shorter one than ours).
        lease = min([self.lease_seconds, *(n.lease_seconds for n in manifest.sweep_notes)])
        with self._lock:
            now = time.monotonic()
            if self._renewed is None or now - self._renewed > lease / 4:
                body = {"host": socket.gethostname(), "pid": os.getpid()}
                self.backend.put(self.name, json.dumps(body).encode())
                self._renewed = now  # taken before the PUT: the server stamped it later
            renewed = self._renewed
        return UploadStamp(manifest.sweep, time.monotonic(), renewed)

    def close(self) -> None:
        with self._lock:
            if self._renewed is not None:
                self._renewed = None
                with contextlib.suppress(PieceStoreError):
                    self.backend.delete(self.name)


class SweptError(ConflictError):
    """A commit's uploads may have been deleted by a GC sweep announced since they began.

    Raised from inside a commit's change function; the writer uploads again (new names) and
    commits anew, or gives up with this error, having acknowledged nothing.
    """

    def __init__(self, message: str, manifest: Manifest) -> None:
        super().__init__(message)
        self.manifest = manifest  # the one seen: uploads begun after it are safe from its sweeps
