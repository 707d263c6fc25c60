"""The two-stage group committer: uploads overlap commits, and order is never broken."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from piecestore.groupcommit import Batch, GroupCommitter, Record

VALUE = 0


class Recorder:
    """prepare/commit functions that log what they saw and can be held at a gate."""

    def __init__(self) -> None:
        self.prepared: list[list[str]] = []
        self.commits: list[list[list[str]]] = []
        self.commit_gate = threading.Event()
        self.commit_gate.set()
        self.in_commit = threading.Event()
        self.fail_prepare: set[str] = set()
        self.fail_commit = False
        self.marks: list[list[Any]] = []
        self.lock = threading.Lock()

    def prepare(self, records: dict[str, Record], marks: list[Any]) -> list[str]:
        keys = sorted(records)
        if self.fail_prepare & set(keys):
            raise OSError(f"upload of {keys} failed")
        with self.lock:
            self.prepared.append(keys)
        self.marks.append(marks)
        return keys

    def commit(self, batches: list[Any]) -> None:
        self.in_commit.set()
        assert self.commit_gate.wait(10)
        if self.fail_commit:
            raise OSError("manifest commit failed")
        with self.lock:
            self.commits.append(list(batches))


def committer(rec: Recorder, **kw: Any) -> GroupCommitter:
    opts: dict[str, Any] = {"linger": 0.0, "flush_bytes": 1 << 20, "flush_count": 1000, "buffered": False}
    opts.update(kw)
    return GroupCommitter(rec.prepare, rec.commit, **opts)


def put_async(gc: GroupCommitter, key: str) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            gc.submit({key: (VALUE, key.encode())}, wait=True, urgent=True)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, errors


def wait_until(cond: Any, timeout: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        done.wait(0.005)
    raise AssertionError("condition not reached")


def test_next_upload_overlaps_the_commit_and_queued_uploads_commit_together() -> None:
    rec = Recorder()
    gc = committer(rec)
    try:
        rec.commit_gate.clear()
        t1, e1 = put_async(gc, "a")
        assert rec.in_commit.wait(10)  # batch 1 is uploaded and its commit is held
        t2, e2 = put_async(gc, "b")
        wait_until(lambda: ["b"] in rec.prepared)  # batch 2 uploads while 1 commits
        t3, e3 = put_async(gc, "c")
        wait_until(lambda: ["c"] in rec.prepared)  # and batch 3 (depth 2: 2 and 3 wait)
        # puts that still wait for their commit are not acknowledged: readers do not see them
        assert gc.lookup("c") is None and gc.lookup("a") is None and gc.pending() == {}
        rec.commit_gate.set()
        for t in (t1, t2, t3):
            t.join(10)
        assert not (e1 or e2 or e3)
        # one commit for batch 1, then one for batches 2 and 3 together, oldest first
        assert rec.commits == [[["a"]], [["b"], ["c"]]]
        assert gc.lookup("a") is None and not gc.busy()
    finally:
        rec.commit_gate.set()
        gc.close()


def test_only_acknowledged_records_are_visible_before_their_commit() -> None:
    """A record submitted without waiting is acknowledged (buffered): reads see it at once. A
    waiting put's record is seen only once committed, so a failed commit shows nothing."""
    rec = Recorder()
    gc = committer(rec, buffered=True)
    try:
        rec.commit_gate.clear()
        gc.submit({"k": (VALUE, b"acked")}, wait=False, mark="m1")
        t, errors = put_async(gc, "k")  # the same key, waiting: not visible over the acked one
        wait_until(lambda: rec.in_commit.is_set())
        assert gc.lookup("k") == (VALUE, b"acked")
        assert gc.pending() == {"k": (VALUE, b"acked")}
        rec.fail_commit = True
        rec.commit_gate.set()
        t.join(10)
        assert errors and gc.lookup("k") is None
    finally:
        rec.commit_gate.set()
        rec.fail_commit = False
        gc.close()
    assert rec.prepared == [["k"]] and rec.marks == [["m1"]]


def test_uploads_wait_when_the_commit_queue_is_full() -> None:
    rec = Recorder()
    gc = committer(rec, depth=1)
    try:
        rec.commit_gate.clear()
        threads = [put_async(gc, "a")]
        assert rec.in_commit.wait(10)
        threads.append(put_async(gc, "b"))
        wait_until(lambda: ["b"] in rec.prepared)
        threads.append(put_async(gc, "c"))
        threading.Event().wait(0.2)
        assert ["c"] not in rec.prepared  # b waits for a commit, so c is not uploaded yet
        rec.commit_gate.set()
        for t, errors in threads:
            t.join(10)
            assert not errors
        assert [k for group in rec.commits for batch in group for k in batch] == ["a", "b", "c"]
    finally:
        rec.commit_gate.set()
        gc.close()


def test_a_failed_upload_fails_only_its_batch() -> None:
    rec = Recorder()
    rec.fail_prepare = {"bad"}
    gc = committer(rec)
    try:
        with pytest.raises(OSError, match="upload"):
            gc.submit({"bad": (VALUE, b"x")}, wait=True, urgent=True)
        gc.submit({"good": (VALUE, b"y")}, wait=True, urgent=True)
        assert rec.commits == [[["good"]]]
        assert gc.lookup("bad") is None
    finally:
        gc.close()


def test_a_failed_commit_fails_every_batch_in_it_and_buffered_failures_surface_on_flush() -> None:
    rec = Recorder()
    gc = committer(rec)
    try:
        rec.commit_gate.clear()
        t1, e1 = put_async(gc, "a")
        assert rec.in_commit.wait(10)
        t2, e2 = put_async(gc, "b")
        wait_until(lambda: ["b"] in rec.prepared)
        gc.submit({"c": (VALUE, b"c")}, wait=False, urgent=True)  # nobody waits for c
        wait_until(lambda: ["c"] in rec.prepared)
        rec.fail_commit = True
        rec.commit_gate.set()
        t1.join(10)
        t2.join(10)
        assert e1 and e2
        with pytest.raises(OSError, match="manifest commit failed"):
            gc.flush()
        rec.fail_commit = False
        gc.flush()  # reported once
    finally:
        rec.commit_gate.set()
        gc.close()


def test_many_threads_commit_in_order_and_nothing_is_lost() -> None:
    rec = Recorder()
    gc = committer(rec, linger=0.001)
    per_thread = 200

    def writer(t: int) -> None:
        for i in range(per_thread):
            gc.submit({f"{t}/{i:04d}": (VALUE, b"v")}, wait=True)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    gc.close()
    committed = [k for group in rec.commits for batch in group for k in batch]
    assert sorted(committed) == sorted(f"{t}/{i:04d}" for t in range(8) for i in range(per_thread))
    for t in range(8):  # each thread's puts committed in the order it made them
        mine = [k for k in committed if k.startswith(f"{t}/")]
        assert mine == sorted(mine)
    assert len(rec.commits) < 8 * per_thread  # they shared commits


@given(st.lists(st.dictionaries(st.sampled_from("abcdef"), st.binary(max_size=8), max_size=4), max_size=8))
def test_batch_byte_count_matches_its_records(adds: list[dict[str, bytes]]) -> None:
    """The byte count drives flush_bytes; overwrites within a batch must not inflate it."""
    batch = Batch()
    for add in adds:
        batch.add_many({k: (VALUE, v) for k, v in add.items()})
    assert batch.nbytes == sum(len(k) + len(v) for k, (_, v) in batch.records.items())
