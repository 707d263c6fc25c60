"""Group commit: concurrent puts share one table flush and one manifest commit.

One flusher thread per store turns the open batch into a table while new puts collect in the
next batch, so batch size grows with load by itself. Batches commit strictly in order, so a
later put of a key always shadows an earlier one from the same process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Record = tuple[int, bytes]  # (kind, payload)


@dataclass
class Batch:
    records: dict[str, Record] = field(default_factory=dict)
    nbytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)
    urgent: bool = False
    waiters: int = 0

    def add(self, key: str, record: Record) -> None:
        if not self.records:
            self.started = time.monotonic()
        old = self.records.get(key)
        if old is not None:
            self.nbytes -= len(old[1]) + len(key)
        self.records[key] = record
        self.nbytes += len(record[1]) + len(key)

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class GroupCommitter:
    """Collects records and hands batches to ``flush_fn`` on one background thread."""

    def __init__(
        self,
        flush_fn: Callable[[dict[str, Record]], None],
        *,
        linger: float,
        flush_bytes: int,
        flush_count: int,
        buffered: bool,
        name: str = "piecestore-flusher",
    ) -> None:
        self._flush_fn = flush_fn
        self.linger = linger
        self.flush_bytes = flush_bytes
        self.flush_count = flush_count
        self.buffered = buffered
        self._cond = threading.Condition()
        self._open = Batch()
        self._inflight: Batch | None = None
        self._stopping = False
        # A failed flush of buffered records nobody waited for: raised by the next flush(), so
        # a lost buffered write is never silent.
        self._unreported: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- producers ---------------------------------------------------------------------
    def submit(self, records: dict[str, Record], *, wait: bool, urgent: bool = False) -> Batch:
        """Add records to the open batch; with ``wait``, return once they are committed."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("store is closed")
            # Back-pressure: buffered writers may run ahead of the flusher by a few batches only.
            while self._open.nbytes > 4 * self.flush_bytes and not self._stopping:
                self._open.urgent = True
                self._cond.notify_all()
                self._cond.wait(0.05)
            batch = self._open
            for key, record in records.items():
                batch.add(key, record)
            if wait:
                batch.waiters += 1
            if urgent:
                batch.urgent = True
            self._cond.notify_all()
        if wait:
            batch.wait()
        return batch

    def flush(self) -> None:
        """Commit everything submitted so far; raise the first error of those batches."""
        with self._cond:
            batches = [b for b in (self._inflight, self._open) if b is not None and b.records]
            self._open.urgent = True
            self._cond.notify_all()
        first: BaseException | None = None
        for batch in batches:
            batch.done.wait()
            first = first or batch.error
        with self._cond:
            unreported, self._unreported = self._unreported, None
        error = first or unreported
        if error is not None:
            raise error

    def lookup(self, key: str) -> Record | None:
        """Read-your-writes: the newest uncommitted record of ``key``, if any."""
        with self._cond:
            for batch in (self._open, self._inflight):
                if batch is not None:
                    record = batch.records.get(key)
                    if record is not None:
                        return record
        return None

    def pending(self) -> dict[str, Record]:
        """Uncommitted records (newest wins), for listing."""
        with self._cond:
            merged = dict(self._inflight.records) if self._inflight is not None else {}
            merged.update(self._open.records)
        return merged

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=60)

    # -- the flusher ---------------------------------------------------------------------
    def _ready(self, batch: Batch, idle_since: float) -> bool:
        if not batch.records:
            return False
        if batch.urgent or self._stopping:
            return True
        if batch.nbytes >= self.flush_bytes or len(batch.records) >= self.flush_count:
            return True
        if self.buffered and batch.waiters == 0:
            return False
        # Linger only when the batch began while idle: puts that arrived during the previous
        # flush already waited one flush's time, so they go at once.
        return batch.started < idle_since or time.monotonic() - batch.started >= self.linger

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                while not self._ready(self._open, idle_since):
                    if self._stopping and not self._open.records:
                        return
                    timeout = None
                    if self._open.records and (self._open.waiters or not self.buffered):
                        timeout = max(0.0, self.linger - (time.monotonic() - self._open.started))
                    self._cond.wait(timeout if timeout is not None else 0.5)
                batch, self._open = self._open, Batch()
                self._inflight = batch
            try:
                self._flush_fn(batch.records)
            except BaseException as e:  # handed to every waiter of this batch
                batch.error = e
                if batch.waiters == 0:
                    with self._cond:
                        self._unreported = self._unreported or e
            finally:
                with self._cond:
                    self._inflight = None
                    idle_since = time.monotonic()
                    self._cond.notify_all()
                batch.done.set()
