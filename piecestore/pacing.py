"""Background work (GC, compaction) yields to this process's foreground writes.

Threads of one Python process share one interpreter lock, so a compaction decoding and copying
tables flat out takes most of the CPU from the writer threads beside it (measured: a writer kept
0.19 of its rate on the file backend during a same-process GC pass). While this process has
a foreground write in flight (or just finished), background work runs only ``share`` of the
time and sleeps the rest; when nothing is being written it runs at full speed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

RECENT_SECONDS = 0.05  # writers that finished this recently are still active (between calls)
MAX_PAUSE_SECONDS = 1.0  # one pause is never longer: a stalled GC would hold its lease idle

_lock = threading.Lock()
_in_flight = 0  # foreground write calls of this process now waiting for their commit
_recent: dict[int, float] = {}  # thread ident -> monotonic time its last write call returned


@contextlib.contextmanager
def foreground_write() -> Iterator[None]:
    """Wraps a store's write call (put, put_many, delete_many) while it waits for its commit."""
    global _in_flight
    with _lock:
        _in_flight += 1
    try:
        yield
    finally:
        now = time.monotonic()
        with _lock:
            _in_flight -= 1
            _recent[threading.get_ident()] = now
            for ident in [i for i, at in _recent.items() if now - at >= RECENT_SECONDS]:
                del _recent[ident]


def writers_active() -> bool:
    """Whether another thread of this process is writing, or wrote a moment ago.

    The calling thread's own past writes do not count: a thread that writes and then runs
    ``gc()`` itself is not writing while its GC runs.
    """
    if _in_flight > 0:
        return True
    me, now = threading.get_ident(), time.monotonic()
    with _lock:
        return any(now - at < RECENT_SECONDS for ident, at in _recent.items() if ident != me)


class Pacer:
    """Call :meth:`step` between units of background work; it pauses while writers are active.

    ``behind`` tells when the work is falling behind the writers (background compaction with
    tables piling up): then it runs flat out, since a paced merge that never catches up would
    let the table count grow without bound.
    """

    def __init__(self, share: float, behind: Callable[[], bool] | None = None) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        self.share = share
        self._behind = behind
        self.paused = 0.0  # seconds spent pausing, for reports and tests
        self._mark = time.monotonic()

    def pacing(self) -> bool:
        """Whether the work must yield now: writers are active and it is not falling behind."""
        return self.share < 1 and writers_active() and not (self._behind is not None and self._behind())

    def step(self) -> None:
        now = time.monotonic()
        worked = now - self._mark
        if self.pacing():
            pause = min(worked * (1 / self.share - 1), MAX_PAUSE_SECONDS)
            time.sleep(pause)
            self.paused += pause
        self._mark = time.monotonic()
