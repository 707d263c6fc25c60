"""The server's clock, and a lease that keeps GC to one process per store.

Ages are judged by the storage server's LastModified, never the local clock (Arvados Keep and
JuiceFS learned this from skewed machines): "now" is the LastModified of an object we just
wrote. The lease is an object created with create-if-absent and renewed with If-Match; a GC
that crashes stops renewing, and its lease expires by the same server clock.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from piecestore.backends import Backend, IfMatch
from piecestore.errors import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
)

CLOCK_NAME = "gc/clock"
LEASE_NAME = "gc/lease"

Clock = Callable[[], datetime]


def server_clock(backend: Backend) -> Clock:
    """A clock reading the storage server's time (one tiny PUT per reading)."""

    def now() -> datetime:
        return backend.put(CLOCK_NAME, b"").last_modified

    return now


class GCBusyError(ConflictError):
    """Another process holds the store's GC lease."""


class Lease:
    """``with Lease(backend, seconds, clock):`` holds the GC lease or raises GCBusyError."""

    def __init__(self, backend: Backend, seconds: float, clock: Clock) -> None:
        self.backend = backend
        self.seconds = seconds
        self.clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._etag: str | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "seconds": self.seconds}).encode()

    def acquire(self) -> None:
        try:
            self._etag = self.backend.put(LEASE_NAME, self._body(), mode="create").etag
            return
        except AlreadyExistsError:
            pass
        try:
            data, meta = self.backend.get_with_meta(LEASE_NAME)
        except NotFoundError:  # released in between: try once more from the start
            self._etag = self.backend.put(LEASE_NAME, self._body(), mode="create").etag
            return
        try:
            holder = json.loads(data)
            held_for = float(holder.get("seconds", self.seconds))
            owner = str(holder.get("owner", "?"))
        except (ValueError, AttributeError):
            held_for, owner = self.seconds, "unreadable lease"
        age = self.clock() - meta.last_modified
        if age < timedelta(seconds=held_for):
            raise GCBusyError(
                f"GC of {self.backend.display_url} is running in {owner} (lease renewed "
                f"{age.total_seconds():.0f}s ago, expires after {held_for:.0f}s); wait for it to finish"
            )
        try:  # the holder stopped renewing: take the lease over, exactly one contender wins
            self._etag = self.backend.put(LEASE_NAME, self._body(), mode=IfMatch(meta.etag)).etag
        except (PreconditionFailedError, NotFoundError) as e:
            raise GCBusyError(f"another process took over the GC lease of {self.backend.display_url}") from e

    def renew(self) -> None:
        """Extend the lease; raises GCBusyError if it was lost, so the caller deletes nothing."""
        if self._etag is None:
            raise GCBusyError("GC lease is not held")
        try:
            self._etag = self.backend.put(LEASE_NAME, self._body(), mode=IfMatch(self._etag)).etag
        except (PreconditionFailedError, NotFoundError) as e:
            self._etag = None
            raise GCBusyError(
                f"GC lease of {self.backend.display_url} was lost (this GC stalled past its lease); "
                "stopping before deleting anything"
            ) from e

    def release(self) -> None:
        if self._etag is None:
            return
        try:
            _, meta = self.backend.get_with_meta(LEASE_NAME)
            if meta.etag == self._etag:
                self.backend.delete(LEASE_NAME)
        except NotFoundError:
            pass
        self._etag = None

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
