"""Group commit: concurrent puts share one table flush and one manifest commit.

Two stages run on two threads. The flusher turns the open batch into table files and uploads
them while new puts collect in the next batch, so batch size grows with load by itself. The
committer makes uploaded batches durable with one manifest compare-and-swap, several at once
when they queue up, so the next batch's upload overlaps this batch's commit. Batches commit
strictly in the order they were taken, so a later put of a key always shadows an earlier one
from the same process.

Reads in this process see an uncommitted record only once it has been acknowledged, that is
when it was submitted without waiting (buffered writes, ``store.batch()``). A record whose put
still waits for its commit is invisible until the commit lands: if the commit fails, no reader
has seen a value that was never acknowledged.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Record = tuple[int, bytes]  # (kind, payload)

# A batch moves through these states; the committer takes PREPARED ones, oldest first.
_PREPARING, _PREPARED, _COMMITTING = 0, 1, 2


@dataclass(eq=False)  # identity: a batch is removed from the pipeline as itself
class Batch:
    records: dict[str, Record] = field(default_factory=dict)
    # the records already acknowledged (submitted without waiting): what readers may see
    visible: dict[str, Record] = field(default_factory=dict)
    # opaque marks handed in with submissions (the store's upload stamps), for prepare_fn
    marks: list[Any] = field(default_factory=list)
    nbytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    started: float = field(default_factory=time.monotonic)
    urgent: bool = False
    waiters: int = 0
    state: int = _PREPARING
    prepared: Any = None  # what prepare_fn returned: the uploaded tables, for commit_fn

    def add(self, key: str, record: Record) -> None:
        if not self.records:
            self.started = time.monotonic()
        old = self.records.get(key)
        if old is not None:
            self.nbytes -= len(old[1]) + len(key)
        self.records[key] = record
        self.nbytes += len(record[1]) + len(key)

    def add_many(self, records: dict[str, Record]) -> None:
        if not self.records:
            self.started = time.monotonic()
        elif len(records) == 1:
            for key, record in records.items():
                self.add(key, record)
            return
        else:
            for key in records.keys() & self.records.keys():
                self.nbytes -= len(self.records[key][1]) + len(key)
        self.records.update(records)
        self.nbytes += sum([len(record[1]) + len(key) for key, record in records.items()])

    def add_submission(self, records: dict[str, Record], *, acknowledged: bool, mark: Any) -> None:
        self.add_many(records)
        # An unacknowledged record leaves an older acknowledged one of its key visible.
        if acknowledged:
            self.visible.update(records)
        if mark is not None:
            self.marks.append(mark)

    def wait(self) -> None:
        self.done.wait()
        if self.error is not None:
            raise self.error


class GroupCommitter:
    """Collects records; ``prepare_fn`` uploads a batch, ``commit_fn`` commits uploaded batches.

    ``prepare_fn`` receives a batch's records and the marks submitted with them; ``commit_fn``
    receives the prepared results of one or more consecutive batches, oldest first, and must
    make them durable together or raise.
    """

    def __init__(
        self,
        prepare_fn: Callable[[dict[str, Record], list[Any]], Any],
        commit_fn: Callable[[list[Any]], None],
        *,
        linger: float,
        flush_bytes: int,
        flush_count: int,
        buffered: bool,
        depth: int = 2,
        name: str = "piecestore",
    ) -> None:
        self._prepare_fn = prepare_fn
        self._commit_fn = commit_fn
        self.linger = linger
        self.flush_bytes = flush_bytes
        self.flush_count = flush_count
        self.buffered = buffered
        self.depth = max(1, depth)  # uploaded batches that may wait while another commits
        self._cond = threading.Condition()
        self._open = Batch()
        self._pipeline: deque[Batch] = deque()  # taken from _open, not yet done; oldest first
        self._stopping = False
        # A failed flush of buffered records nobody waited for: raised by the next flush(), so
        # a lost buffered write is never silent.
        self._unreported: BaseException | None = None
        self._flusher = threading.Thread(target=self._run_flusher, name=f"{name}-flusher", daemon=True)
        self._committer = threading.Thread(target=self._run_committer, name=f"{name}-committer", daemon=True)
        self._flusher.start()
        self._committer.start()

    # -- producers ---------------------------------------------------------------------
    def submit(
        self, records: dict[str, Record], *, wait: bool, urgent: bool = False, mark: Any = None
    ) -> Batch:
        """Add records to the open batch; with ``wait``, return once they are committed.

        Without ``wait`` the records count as acknowledged: reads see them from now on.
        """
        with self._cond:
            if self._stopping:
                raise RuntimeError("store is closed")
            # Back-pressure: buffered writers may run ahead of the flusher by a few batches only.
            while self._open.nbytes > 4 * self.flush_bytes and not self._stopping:
                self._open.urgent = True
                self._cond.notify_all()
                self._cond.wait(0.05)
            batch = self._open
            batch.add_submission(records, acknowledged=not wait, mark=mark)
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
            batches = [b for b in (*self._pipeline, self._open) if b.records]
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
        """Read-your-writes: the newest acknowledged, uncommitted record of ``key``, if any."""
        with self._cond:
            record = self._open.visible.get(key)
            if record is not None:
                return record
            for batch in reversed(self._pipeline):
                record = batch.visible.get(key)
                if record is not None:
                    return record
        return None

    def pending(self) -> dict[str, Record]:
        """Acknowledged, uncommitted records (newest wins), for listing."""
        with self._cond:
            merged: dict[str, Record] = {}
            for batch in (*self._pipeline, self._open):
                merged.update(batch.visible)
        return merged

    def busy(self) -> bool:
        """Whether a batch is being uploaded or committed, or an urgent one waits to start."""
        with self._cond:
            return bool(self._pipeline) or (self._open.urgent and bool(self._open.records))

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._flusher.join(timeout=60)
        self._committer.join(timeout=60)

    # -- the flusher: build and upload -------------------------------------------------
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
        # upload already waited one upload's time, so they go at once.
        return batch.started < idle_since or time.monotonic() - batch.started >= self.linger

    def _waiting_for_commit(self) -> int:
        return sum(1 for b in self._pipeline if b.state == _PREPARED)

    def _run_flusher(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._cond:
                while self._waiting_for_commit() >= self.depth or not self._ready(self._open, idle_since):
                    if self._stopping and not self._open.records:
                        return
                    timeout = 0.5
                    if self._open.records and (self._open.waiters or not self.buffered):
                        timeout = max(0.0, self.linger - (time.monotonic() - self._open.started))
                    self._cond.wait(timeout)
                batch, self._open = self._open, Batch()
                self._pipeline.append(batch)
            try:
                prepared = self._prepare_fn(batch.records, batch.marks)
            except BaseException as e:  # handed to every waiter of this batch
                self._finish([batch], e)
            else:
                with self._cond:
                    batch.prepared, batch.state = prepared, _PREPARED
                    self._cond.notify_all()
            idle_since = time.monotonic()

    # -- the committer: one manifest commit for every uploaded batch in line ------------
    def _run_committer(self) -> None:
        while True:
            with self._cond:
                while not (self._pipeline and self._pipeline[0].state == _PREPARED):
                    if self._stopping and not self._pipeline and not self._open.records:
                        return
                    self._cond.wait(0.5)
                group: list[Batch] = []
                for batch in self._pipeline:  # consecutive from the oldest: order is kept
                    if batch.state != _PREPARED:
                        break
                    group.append(batch)
                    batch.state = _COMMITTING
            try:
                self._commit_fn([b.prepared for b in group])
            except BaseException as e:
                self._finish(group, e)
            else:
                self._finish(group, None)

    def _finish(self, batches: list[Batch], error: BaseException | None) -> None:
        with self._cond:
            for batch in batches:
                batch.error = error
                batch.prepared = None
                self._pipeline.remove(batch)
                if error is not None and batch.waiters == 0:
                    self._unreported = self._unreported or error
            self._cond.notify_all()
        for batch in batches:
            batch.done.set()
