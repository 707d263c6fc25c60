"""Model-based: the store against a dict, through put/get/delete/flush/reopen/crash/GC steps.

Hypothesis drives a state machine whose model holds only what was acknowledged:
* ``put``/``put_many``/``delete`` are acknowledged when they return (unbuffered stores), or on
  ``flush``/close (buffered stores);
* ``abandon`` drops the store object without closing it, as a crashed process would: buffered
  writes not yet flushed may be lost (or not), everything acknowledged must stay;
* ``crash`` (file and S3) runs a batch of writes, and sometimes a GC, in a forked child that is
  SIGKILLed at a random backend write; its acknowledged writes must survive and the one in
  flight must be all-or-nothing per key;
* ``gc`` runs with the grace period passed or not.
Keys in doubt (in flight at a crash) are settled by the next read, which must show either the
old or the new state. Resharding is not modelled here: it is built elsewhere (ShardedStore).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from piecestore import NotFoundError, PieceStore
from piecestore.lease import GCBusyError
from tests.reliability._support import REPO, SOAK, open_store, s3_url

KEYS = st.sampled_from([f"k/{i}" for i in range(10)] + ["a", "a/b", "ключ", "z" * 300, " "])
VALUES = st.one_of(st.binary(max_size=48), st.binary(min_size=4100, max_size=6000))
SMALL_LIMIT = 4096  # values above it become their own object, exercising the large path too
MISSING = object()


class Zygote:
    """The forking helper process (tests.reliability.crashchild), started once per test."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.crashchild"],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        self.runs = 0
        self.kills = 0

    def run(self, job: dict[str, Any], timeout: float = 60.0) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(job) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the crash child did not finish within {timeout}s"
        status = json.loads(self.proc.stdout.readline())["status"]
        code = os.waitstatus_to_exitcode(status)
        self.runs += 1
        self.kills += code == -9
        return code

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class StoreModel(RuleBasedStateMachine):
    """Override ``backend`` and ``url_factory``; ``zygote`` is set for backends that crash children."""

    url_factory: Callable[[], tuple[str, Callable[[], None]]]
    zygote: Zygote | None = None
    stats: dict[str, int]

    @initialize()
    def start(self) -> None:
        self.url, self.cleanup = self.url_factory()
        self.model: dict[str, bytes] = {}  # acknowledged state
        self.pending: dict[str, bytes | None] = {}  # buffered writes not yet acknowledged
        self.doubt: dict[str, list[bytes | None]] = {}  # keys whose last write was in flight
        self.buffered = False
        self.store = self._open()
        self.abandoned: list[PieceStore] = []

    def _open(self, **kw: Any) -> PieceStore:
        return open_store(self.url, engine_small_piece_max_bytes=SMALL_LIMIT, engine_flush_linger_ms=0.5,
                          gc_auto_compact=False, **kw)  # fmt: skip

    # -- what a key may hold -----------------------------------------------------------
    def expected(self, key: str) -> list[bytes | None]:
        if key in self.pending:
            return [self.pending[key]]
        if key in self.doubt:
            return self.doubt[key]
        return [self.model.get(key)]

    def settle(self, key: str, actual: bytes | None) -> None:
        allowed = self.expected(key)
        assert actual in allowed, f"{key!r} holds {actual!r:.60}, allowed {[repr(a)[:40] for a in allowed]}"
        if key in self.doubt and key not in self.pending:
            del self.doubt[key]
            if actual is None:
                self.model.pop(key, None)
            else:
                self.model[key] = actual

    def _write(self, changes: dict[str, bytes | None]) -> None:
        for key, value in changes.items():
            if self.buffered:
                # The doubt stays until this write is acknowledged: if the store is abandoned
                # first, the key may still hold any value it was in doubt between.
                self.pending[key] = value
                continue
            self.doubt.pop(key, None)
            if value is None:
                self.model.pop(key, None)
            else:
                self.model[key] = value

    def _acknowledge_pending(self) -> None:
        for key, value in self.pending.items():
            self.doubt.pop(key, None)
            if value is None:
                self.model.pop(key, None)
            else:
                self.model[key] = value
        self.pending.clear()

    # -- rules ---------------------------------------------------------------------------
    @rule(key=KEYS, value=VALUES)
    def put(self, key: str, value: bytes) -> None:
        self.store.put(key, value)
        self._write({key: value})

    @rule(items=st.dictionaries(KEYS, VALUES, max_size=6))
    def put_many(self, items: dict[str, bytes]) -> None:
        self.store.put_many(items)
        self._write(dict(items))

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        self.store.delete(key)
        self._write({key: None})

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        try:
            actual: bytes | None = self.store.get(key)
        except NotFoundError:
            actual = None
        self.settle(key, actual)

    @rule(keys=st.lists(KEYS, max_size=6, unique=True))
    def get_many(self, keys: list[str]) -> None:
        got = self.store.get_many(keys, missing="skip")
        for key in keys:
            self.settle(key, got.get(key))

    @rule()
    def flush(self) -> None:
        self.store.flush()
        self._acknowledge_pending()

    @rule(grace_passed=st.booleans())
    def gc(self, grace_passed: bool) -> None:
        ahead = timedelta(days=1) if grace_passed else timedelta(0)
        try:
            self.store.gc(clock=lambda: datetime.now(UTC) + ahead)
            self.stats["gc"] += 1
        except GCBusyError:  # a crashed child's GC holds the lease until it expires
            self.stats["gc_busy"] += 1
        self._acknowledge_pending()  # gc flushes first

    @rule(buffered=st.booleans())
    def reopen(self, buffered: bool) -> None:
        self.store.close()
        self._acknowledge_pending()
        self.buffered = buffered
        self.store = self._open(store_buffered_writes=buffered)

    @rule()
    def abandon(self) -> None:
        """Drop the store object without close(): unflushed buffered writes are in doubt."""
        committer = self.store._committer
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and committer.busy():
            time.sleep(0.005)  # an urgent batch already on its way lands (or not) before we look
        for key, value in self.pending.items():
            self.doubt[key] = [value, *self.expected_without_pending(key)]
        self.pending.clear()
        self.abandoned.append(self.store)
        self.store = self._open(store_buffered_writes=self.buffered)
        self.stats["abandon"] += 1

    def expected_without_pending(self, key: str) -> list[bytes | None]:
        return self.doubt.get(key, [self.model.get(key)])

    @precondition(lambda self: self.zygote is not None)
    @rule(
        ops=st.lists(
            st.one_of(
                st.tuples(st.just("put"), KEYS, VALUES),
                st.tuples(st.just("put_many"), st.dictionaries(KEYS, VALUES, min_size=1, max_size=4)),
                st.tuples(st.just("delete"), KEYS),
                st.tuples(st.just("gc")),
            ),
            min_size=1,
            max_size=6,
        ),
        kill_at=st.integers(1, 14),
        after=st.booleans(),
    )
    def crash(self, ops: list[tuple[Any, ...]], kill_at: int, after: bool) -> None:
        """A child process writes and is SIGKILLed at a random backend write."""
        assert self.zygote is not None
        self.store.flush()
        self._acknowledge_pending()
        acks = os.path.join(tempfile.gettempdir(), f"ps-acks-{uuid.uuid4().hex}")
        wire: list[list[Any]] = []
        for op in ops:
            if op[0] == "put":
                wire.append(["put", op[1], op[2].hex()])
            elif op[0] == "put_many":
                wire.append(["put_many", {k: v.hex() for k, v in op[1].items()}])
            else:
                wire.append(list(op))
        overrides = {"engine_small_piece_max_bytes": SMALL_LIMIT, "engine_flush_linger_ms": 0.5,
                     "gc_auto_compact": False}  # fmt: skip
        if self.url.startswith("s3://"):
            from tests.conftest import s3_credentials

            creds = s3_credentials()
            overrides.update(s3_access_key=creds["access_key"], s3_secret_key=creds["secret_key"])
        job = {"url": self.url, "overrides": overrides, "ops": wire, "kill_at": kill_at, "after": after,
               "acks": acks}  # fmt: skip
        try:
            code = self.zygote.run(job)
            if code not in (0, -9):
                with open(acks + ".err") as f:
                    raise AssertionError(f"crash child failed ({code}):\n{f.read()}")
            with open(acks) as f:
                done = {int(line) for line in f.read().split()}
        except FileNotFoundError:
            done = set()
        finally:
            for path in (acks, acks + ".err"):
                if os.path.exists(path):
                    os.unlink(path)
        self.stats["crash"] += 1
        self.stats["killed"] += code == -9
        for i, op in enumerate(ops):
            changes: dict[str, bytes | None] = {}
            if op[0] == "put":
                changes = {op[1]: op[2]}
            elif op[0] == "put_many":
                changes = dict(op[1])
            elif op[0] == "delete":
                changes = {op[1]: None}
            if i in done:
                for key, value in changes.items():
                    self.doubt.pop(key, None)
                    if value is None:
                        self.model.pop(key, None)
                    else:
                        self.model[key] = value
            elif i == len(done):  # in flight when the child died: landed or not, per whole op
                for key, value in changes.items():
                    self.doubt[key] = [value, *self.expected_without_pending(key)]
                break
        self.store.refresh()

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def listing_matches(self) -> None:
        if not hasattr(self, "store"):
            return
        listed = {p.key: p.size for p in self.store.list()}
        keys = set(listed) | set(self.model) | set(self.pending) | set(self.doubt)
        for key in keys:
            allowed = self.expected(key)
            size = listed.get(key, MISSING)
            assert any(
                (a is None and size is MISSING) or (a is not None and size == len(a)) for a in allowed
            ), f"listing shows {key!r} as {size}, allowed {[None if a is None else len(a) for a in allowed]}"

    def teardown(self) -> None:
        if not hasattr(self, "store"):
            return
        for s in self.abandoned:  # their unflushed writes never land: drop them, then free the store
            with s._committer._cond:
                s._committer._open.records.clear()
            s.close()
        self.store.close()
        self._acknowledge_pending()
        with self._open() as fresh:  # everything acknowledged is there after a clean reopen
            got = fresh.get_many(sorted(set(self.model) | set(self.doubt)), missing="skip")
            for key in set(self.model) | set(self.doubt):
                self.settle(key, got.get(key))
            report = fresh.fsck()
            assert report.ok, str(report)
        self.cleanup()


def memory_url() -> tuple[str, Callable[[], None]]:
    return f"memory://model-{uuid.uuid4().hex}", lambda: None


def file_url() -> tuple[str, Callable[[], None]]:
    path = tempfile.mkdtemp(prefix="piecestore-model-")
    return "file://" + path, lambda: shutil.rmtree(path, ignore_errors=True)


def run_machine(url_factory: Any, zygote: Zygote | None, examples: int, steps: int) -> dict[str, int]:
    stats = {"gc": 0, "gc_busy": 0, "abandon": 0, "crash": 0, "killed": 0}
    machine = type(
        "Machine",
        (StoreModel,),
        {"url_factory": staticmethod(url_factory), "zygote": zygote, "stats": stats},
    )
    runner = settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                      suppress_health_check=list(HealthCheck))(machine)  # fmt: skip
    runner.TestCase().runTest()
    return stats


@pytest.fixture
def zygote() -> Iterator[Zygote]:
    z = Zygote()
    yield z
    z.close()


def test_model_keeps_doubt_through_an_unacknowledged_buffered_write() -> None:
    """A sequence hypothesis found: an abandoned store's urgent delete lands, then a buffered put
    of another store is abandoned too; the key may then be missing, and the model must allow it."""

    class Machine(StoreModel):
        url_factory = staticmethod(memory_url)

    state = Machine()
    state.stats = {"gc": 0, "gc_busy": 0, "abandon": 0, "crash": 0, "killed": 0}
    state.start()
    steps: list[Callable[[], None]] = [
        lambda: state.put("k/0", b""),
        lambda: state.reopen(buffered=True),
        lambda: state.delete("k/0"),
        lambda: state.abandon(),
        lambda: state.put("k/0", b""),
        lambda: state.abandon(),
    ]
    for step in steps:
        step()
        state.listing_matches()
    state.teardown()


def test_model_memory(figures: dict[str, Any]) -> None:
    figures.update(run_machine(memory_url, None, examples=300 if SOAK else 50, steps=30))


def test_model_file(zygote: Zygote, figures: dict[str, Any]) -> None:
    figures.update(run_machine(file_url, zygote, examples=200 if SOAK else 30, steps=30))


@pytest.mark.s3
def test_model_s3_short(s3_server: Any, zygote: Zygote, figures: dict[str, Any]) -> None:
    def url() -> tuple[str, Callable[[], None]]:
        return s3_url(s3_server.endpoint), lambda: None

    figures.update(run_machine(url, zygote, examples=20 if SOAK else 3, steps=15))
