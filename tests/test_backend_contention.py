"""Conditional writes stay atomic under real contention, for every driver.

Threads share one interpreter (and one GIL), so they can hide races a second process would
expose; these tests also race separate processes (spawn context: nothing inherited, each opens
its own handle) on one store. The memory driver lives inside one process, so it gets threads only.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from piecestore.backends import Backend, IfMatch, open_backend
from piecestore.errors import AlreadyExistsError, PreconditionFailedError
from tests.conftest import driver_options

WORKERS = 6
COUNTER = "contention/counter"
# Names raced one after another (each must have exactly one winner) and compare-and-swap
# increments per worker; remote drivers pay a round trip per attempt, so they do fewer.
ROUNDS = {"memory": 12, "file": 12, "s3": 5, "minio": 5}
INCREMENTS = {"memory": 15, "file": 15, "s3": 6, "minio": 6}


def _race_creates(backend: Backend, ident: int, rounds: int) -> list[int]:
    """Try to create every race name; return the rounds this worker won."""
    won = []
    for r in range(rounds):
        try:
            backend.put(f"contention/create-{r}", f"worker-{ident}".encode(), mode="create")
            won.append(r)
        except AlreadyExistsError:
            pass
    return won


def _increment(backend: Backend, ident: int, increments: int) -> int:
    """Add to the counter by read, IfMatch write, retry; return how many races were lost."""
    lost = 0
    done = 0
    while done < increments:
        data, meta = backend.get_with_meta(COUNTER)
        try:
            backend.put(COUNTER, str(int(data) + 1).encode(), mode=IfMatch(meta.etag))
            done += 1
        except PreconditionFailedError:
            lost += 1
    return lost


WORK: dict[str, Callable[[Backend, int, int], Any]] = {"create": _race_creates, "increment": _increment}


def _child(
    kind: str, url: str, options: dict[str, str], count: int, barrier: Any, results: Any, ident: int
) -> None:
    """One racer: open its own handle, wait for all, run, report (errors too, as text)."""
    try:
        with open_backend(url, **options) as backend:
            barrier.wait(timeout=120)
            out = WORK[kind](backend, ident, count)
        results.put((ident, "ok", out))
    except BaseException as e:  # report everything: a silent child would only time out
        results.put((ident, "error", f"{type(e).__name__}: {e}"))


def _run(via: str, kind: str, url: str, options: dict[str, str], count: int) -> list[Any]:
    """Run WORKERS racers as processes or threads; return their results by worker id."""
    got: list[tuple[int, str, Any]] = []
    if via == "threads":
        barrier: Any = threading.Barrier(WORKERS)
        results: Any = queue.Queue()
        with ThreadPoolExecutor(WORKERS) as pool:
            for i in range(WORKERS):
                pool.submit(_child, kind, url, options, count, barrier, results, i)
        got = [results.get_nowait() for _ in range(WORKERS)]
    else:
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(WORKERS)
        results = ctx.Queue()
        procs = [
            ctx.Process(target=_child, args=(kind, url, options, count, barrier, results, i))
            for i in range(WORKERS)
        ]
        for p in procs:
            p.start()
        try:
            got = [results.get(timeout=120) for _ in range(WORKERS)]
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    errors = [f"worker {i}: {out}" for i, status, out in got if status != "ok"]
    assert not errors, errors
    return [out for _, _, out in sorted(got, key=lambda item: item[0])]


@pytest.fixture(params=["threads", "processes"])
def via(request: pytest.FixtureRequest, driver: str) -> str:
    if request.param == "processes" and driver == "memory":
        pytest.skip("the memory driver's objects live in one process; other processes cannot see them")
    return str(request.param)


def test_create_race_has_one_winner_per_name(driver: str, store_url: str, via: str) -> None:
    options = driver_options(driver)
    wins = _run(via, "create", store_url, options, ROUNDS[driver])
    with open_backend(store_url, **options) as backend:
        for r in range(ROUNDS[driver]):
            winners = [i for i, rounds in enumerate(wins) if r in rounds]
            assert len(winners) == 1, f"round {r}: winners {winners}"
            assert backend.get(f"contention/create-{r}") == f"worker-{winners[0]}".encode()


def test_compare_and_swap_counter_loses_no_update(driver: str, store_url: str, via: str) -> None:
    options = driver_options(driver)
    with open_backend(store_url, **options) as backend:
        backend.put(COUNTER, b"0")
    lost = _run(via, "increment", store_url, options, INCREMENTS[driver])
    with open_backend(store_url, **options) as backend:
        assert int(backend.get(COUNTER)) == WORKERS * INCREMENTS[driver], f"lost races per worker: {lost}"
