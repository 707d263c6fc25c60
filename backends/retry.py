"""Bounded retries with jittered exponential backoff, shared by the remote drivers.

Drivers classify each failure (retryable or not) and map it into piecestore.errors; this
module only decides whether and when to try again, and turns an exhausted budget into
BackendUnavailableError, so no call can hang longer than the policy allows.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from piecestore.errors import BackendUnavailableError

T = TypeVar("T")


class Retryable(Exception):
    """Raised by a classifier to mark a failure worth another try (throttling, 5xx, drops)."""

    def __init__(self, reason: str, cause: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 5
    min_delay: float = 0.05
    max_delay: float = 2.0
    # Upper bound on the whole call including waits, so an outage surfaces well under a minute.
    deadline: float = 30.0

    def delays(self) -> list[float]:
        return [min(self.max_delay, self.min_delay * 2**i) for i in range(self.max_retries)]

    def call(self, fn: Callable[[], T], *, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
        """Run ``fn``; on Retryable, back off and retry until the budget or deadline runs out."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except Retryable as r:
                if attempt >= self.max_retries or time.monotonic() - started >= self.deadline:
                    raise BackendUnavailableError(
                        f"{what} failed after {attempt + 1} attempts ({r.reason}); "
                        "check that the endpoint is up and reachable, or raise max_retries"
                    ) from r.cause
                base = min(self.max_delay, self.min_delay * 2**attempt)
                delay = min(
                    random.uniform(base / 2, base), max(0.0, self.deadline - (time.monotonic() - started))
                )
                sleep(delay)
                attempt += 1
