"""Outage: the S3 server freezes or stops in the middle of writes and reads, then comes back.

While it is away every call must fail with BackendUnavailableError within the retry budget
(never hang, never another error), and afterwards the same store object must carry on and
every acknowledged piece must be there, byte-exact, through a fresh handle too; fsck clean.
A frozen server (SIGSTOP: connections accepted, never answered) costs timeouts; a stopped one
(connection refused) fails at once; a restarted one comes back on the same port and data.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from piecestore import BackendUnavailableError, PieceStore
from piecestore.backends import open_backend
from piecestore.settings import load_settings
from tests.conftest import BUCKET
from tests.reliability._server import RestartableS3Server
from tests.reliability._support import SOAK, open_store, s3_url

pytestmark = pytest.mark.s3

# Small budgets so the scenario is quick: one backend call gives up after about
# deadline + connect + read timeouts; a store operation spans at most a few such calls.
FAST = {
    "retry_max_retries": 2,
    "retry_min_retry_delay": 0.05,
    "retry_max_retry_delay": 0.2,
    "retry_deadline": 3.0,
    "s3_connect_timeout": 1.0,
    "s3_read_timeout": 2.0,
    "cache_memory_bytes": 0,  # every read goes to the server
    "engine_refresh_interval_seconds": 0.0,
    "engine_small_piece_max_bytes": 16384,
}
CALL_BOUND = 3.0 + 1.0 + 2.0 + 1.0  # deadline + connect + read timeouts + scheduling slack
OP_BOUND = 4 * CALL_BOUND  # a put may wait for the batch ahead of it, then upload and commit
RESUME_BOUND = 20.0  # after a restart, a write must get through within this


def resumed_writes(traffic: Traffic, restarted_at: float) -> bool:
    """A put that started after the restart (plus a moment for the port to open) succeeded."""
    return any(o.kind.startswith("put") for o in traffic.ok_after(restarted_at + 0.5))


@dataclass
class Op:
    started: float
    seconds: float
    kind: str
    error: str | None


@dataclass
class Traffic:
    """Writer and reader threads on one store, recording every call's outcome and duration."""

    store: PieceStore
    writers: int = 2
    readers: int = 2
    acked: dict[str, bytes] = field(default_factory=dict)
    ops: list[Op] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def _timed(self, kind: str, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        error = None
        result = None
        try:
            result = fn()
        except BackendUnavailableError:
            error = "BackendUnavailableError"
        except Exception as e:
            error = type(e).__name__
            with self.lock:
                self.unexpected.append(f"{kind}: {type(e).__name__}: {e}")
        with self.lock:
            self.ops.append(Op(t0, time.monotonic() - t0, kind, error))
        return error, result

    def _writer(self, t: int) -> None:
        rng = random.Random(t)
        i = 0
        while not self.stop.is_set():
            i += 1
            if rng.random() < 0.7:
                key = f"w{t}/{i}"
                value = os.urandom(rng.choice([50, 500, 40_000]))
                error, _ = self._timed("put", lambda k=key, v=value: self.store.put(k, v))
                batch = {key: value}
            else:
                batch = {f"w{t}/{i}/{j}": os.urandom(rng.randint(1, 3000)) for j in range(8)}
                error, _ = self._timed("put_many", lambda b=batch: self.store.put_many(b))
            if error is None:
                with self.lock:
                    self.acked.update(batch)
            time.sleep(0.01)

    def _reader(self, t: int) -> None:
        rng = random.Random(100 + t)
        while not self.stop.is_set():
            with self.lock:
                keys = rng.sample(sorted(self.acked), min(8, len(self.acked)))
                want = {k: self.acked[k] for k in keys}
            if not keys:
                time.sleep(0.01)
                continue
            if rng.random() < 0.5:
                error, got = self._timed("get", lambda k=keys[0]: {k: self.store.get(k)})
                want = {keys[0]: want[keys[0]]}
            else:
                error, got = self._timed("get_many", lambda ks=keys: self.store.get_many(ks))
            if error is None and got != want:
                with self.lock:
                    self.unexpected.append(f"read returned wrong bytes for {sorted(want)[:3]}")
            time.sleep(0.01)

    def start(self) -> None:
        for t in range(self.writers):
            self.threads.append(threading.Thread(target=self._writer, args=(t,), daemon=True))
        for t in range(self.readers):
            self.threads.append(threading.Thread(target=self._reader, args=(t,), daemon=True))
        for th in self.threads:
            th.start()

    def finish(self) -> None:
        self.stop.set()
        for th in self.threads:
            th.join(OP_BOUND + 10)
            assert not th.is_alive(), "a traffic thread hung past the retry budget"

    def failed_between(self, start: float, end: float) -> list[Op]:
        return [o for o in self.ops if o.error and start <= o.started < end]

    def ok_after(self, when: float) -> list[Op]:
        return [o for o in self.ops if o.error is None and o.started >= when]


def verify(url: str, store: PieceStore, acked: dict[str, bytes]) -> None:
    keys = sorted(acked)
    assert store.get_many(keys) == acked
    with open_store(url, **FAST) as fresh:
        assert fresh.get_many(keys) == acked
        listed = {p.key for p in fresh.list()}
        assert set(keys) <= listed
        report = fresh.fsck()
        assert report.ok, str(report)


def timed_failure(fn: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        fn()
    seconds = time.monotonic() - t0
    assert "attempts" in str(info.value)  # the message says how hard it tried
    return seconds


def test_frozen_server_fails_fast_then_resumes(
    s3_server: RestartableS3Server, figures: dict[str, Any]
) -> None:
    url = s3_url(s3_server.endpoint)
    with open_store(url, **FAST) as store:
        preload = {f"pre/{i:03d}": os.urandom(100 + i) for i in range(200)}
        preload["pre/big"] = os.urandom(100_000)
        with open_store(url) as loader:  # default budget: the machine may be busy
            loader.put_many(preload)
        traffic = Traffic(store)
        traffic.acked.update(preload)
        traffic.start()
        try:
            time.sleep(1.0)
            paused_at = time.monotonic()
            s3_server.pause()
            try:
                get_s = timed_failure(lambda: store.get("pre/007"))
                put_s = timed_failure(lambda: store.put("during/1", b"x"))
                list_s = timed_failure(lambda: list(store.list("pre/")))
                time.sleep(max(0.0, paused_at + 7.0 - time.monotonic()))
            finally:
                s3_server.resume()
            resumed_at = time.monotonic()
            time.sleep(3.0)
        finally:
            traffic.finish()
        assert not traffic.unexpected, traffic.unexpected[:5]
        failed = traffic.failed_between(paused_at, resumed_at)
        assert failed, "no call failed while the server was frozen: the outage was not exercised"
        slowest = max(o.seconds for o in traffic.ops)
        assert slowest <= OP_BOUND, f"a call took {slowest:.1f}s, past the retry budget"
        for seconds in (get_s, put_s, list_s):
            assert seconds <= 2 * CALL_BOUND
        recovered = traffic.ok_after(resumed_at + 1.0)
        assert any(o.kind.startswith("put") for o in recovered), "writes did not resume"
        assert any(o.kind.startswith("get") for o in recovered), "reads did not resume"
        store.put("after/1", b"ok")
        traffic.acked["after/1"] = b"ok"
        verify(url, store, traffic.acked)
    figures.update(
        get_fail_s=round(get_s, 2), put_fail_s=round(put_s, 2), list_fail_s=round(list_s, 2),
        failed_calls=len(failed),
        median_failed_call_s=round(statistics.median(o.seconds for o in failed), 2),
        slowest_call_s=round(slowest, 2), ok_calls=sum(o.error is None for o in traffic.ops),
        acked_verified=len(traffic.acked),
    )  # fmt: skip


@pytest.fixture
def own_server() -> Iterator[RestartableS3Server]:
    with RestartableS3Server() as server:
        server.make_bucket(BUCKET)
        yield server


def test_stopped_and_restarted_server(own_server: RestartableS3Server, figures: dict[str, Any]) -> None:
    server = own_server
    url = s3_url(server.endpoint)
    with open_store(url, **FAST) as store:
        preload = {f"pre/{i:03d}": os.urandom(100 + i) for i in range(100)}
        with open_store(url) as loader:
            loader.put_many(preload)
        traffic = Traffic(store)
        traffic.acked.update(preload)
        traffic.start()
        try:
            time.sleep(1.0)
            server.halt()
            stopped_at = time.monotonic()
            refused_get = timed_failure(lambda: store.get("pre/001"))
            refused_put = timed_failure(lambda: store.put("during/1", b"x"))
            time.sleep(1.5)
            server.restart()
            restarted_at = time.monotonic()
            # Wait for a write to get through (the server may take a few seconds to accept
            # writes again under load), bounded: a store that never resumes fails below.
            give_up = restarted_at + RESUME_BOUND
            while time.monotonic() < give_up and not resumed_writes(traffic, restarted_at):
                time.sleep(0.2)
            resumed_s = time.monotonic() - restarted_at
            time.sleep(1.0)
        finally:
            traffic.finish()
        assert not traffic.unexpected, traffic.unexpected[:5]
        failed = traffic.failed_between(stopped_at, restarted_at)
        assert failed, "no call failed while the server was down"
        assert refused_get <= CALL_BOUND and refused_put <= 2 * CALL_BOUND
        slowest = max(o.seconds for o in traffic.ops)
        assert slowest <= OP_BOUND, f"a call took {slowest:.1f}s, past the retry budget"
        assert resumed_writes(traffic, restarted_at), f"writes did not resume within {RESUME_BOUND:.0f}s"
        verify(url, store, traffic.acked)
    figures.update(
        refused_get_fail_s=round(refused_get, 2), refused_put_fail_s=round(refused_put, 2),
        writes_resumed_after_s=round(resumed_s, 1),
        down_s=round(restarted_at - stopped_at, 1), failed_calls=len(failed),
        slowest_call_s=round(slowest, 2), acked_verified=len(traffic.acked),
    )  # fmt: skip


def test_unreachable_endpoint_fails_fast() -> None:
    """No server at all (a closed port): a clear error, quickly, from open on."""
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="reachable"):
        open_store("s3://nobody-home/x?endpoint=http://127.0.0.1:9&region=us-east-1", **FAST)
    assert time.monotonic() - t0 <= CALL_BOUND


def test_default_budget_is_well_under_a_minute() -> None:
    """With no settings, one call to a dead endpoint gives up within the default budget."""
    s = load_settings(config_file="")
    worst = s.retry.deadline + s.s3.connect_timeout + s.s3.read_timeout
    assert s.retry.deadline <= 30 and s.retry.max_retries <= 10
    # the deadline stops new attempts; one attempt in flight can add its own timeouts
    assert worst <= 65, worst


@pytest.mark.slow
def test_frozen_server_with_default_settings(s3_server: RestartableS3Server, figures: dict[str, Any]) -> None:
    """Soak only: measure how long a call waits on a frozen server with every default."""
    assert SOAK
    url = s3_url(s3_server.endpoint)
    with open_store(url, cache_memory_bytes=0, engine_refresh_interval_seconds=0.0) as store:
        store.put("k", b"v")
        s3_server.pause()
        try:
            seconds = timed_failure(lambda: store.get("k"))
        finally:
            s3_server.resume()
    figures["default_frozen_get_fail_s"] = round(seconds, 1)
    assert seconds < 60


@pytest.mark.parametrize(
    ("scheme", "size"),
    [("s3", 200_000), ("s3", 2 * 1024 * 1024), ("s3", 6 * 1024 * 1024), ("minio", 2 * 1024 * 1024)],
    ids=["s3-200k", "s3-2m", "s3-6m", "minio-2m"],
)
def test_put_cut_off_by_an_outage_never_leaves_a_truncated_object(
    scheme: str, size: int, s3_server: RestartableS3Server
) -> None:
    """A conditional PUT (a manifest commit) whose request the client abandons while the
    server is frozen: afterwards the object holds the old bytes or the new, never a stub.

    SeaweedFS commits a PUT whose connection closed after its headers (an Expect:
    100-continue request still waiting for the go-ahead) as an empty object, so the driver
    must make an incomplete body impossible to accept (Content-MD5)."""
    from piecestore.backends.base import IfMatch
    from tests.conftest import s3_credentials

    prefix = f"cut-{os.getpid()}-{size}"
    url = (
        s3_url(s3_server.endpoint, prefix=prefix)
        if scheme == "s3"
        else f"minio://127.0.0.1:{s3_server.s3_port}/{BUCKET}/{prefix}?secure=false"
    )
    backend = open_backend(url, **s3_credentials(), max_retries=1, retry_deadline=1.0,
                           read_timeout=0.5, connect_timeout=0.5)  # fmt: skip
    try:
        old, new = os.urandom(size), os.urandom(size)
        etag = backend.put("manifest.json", old).etag
        s3_server.pause()
        try:
            with pytest.raises(BackendUnavailableError):
                backend.put("manifest.json", new, mode=IfMatch(etag))
        finally:
            s3_server.resume()
        time.sleep(1.0)  # the server works through what it received while frozen
        now = backend.get("manifest.json")
        assert now in (old, new), f"the object now holds {len(now)} bytes: neither the old nor the new"
    finally:
        backend.close()
