"""Holes an adversarial review found in the durability promises, each driven by real processes.

* Large pieces and another process's GC: a large piece is uploaded as its own object before
  the commit that references it. A GC in another process with a short grace period must never
  delete that object as an orphan while the commit is on its way, however long the piece waits
  before it (inside ``store.batch()``, in a buffered store until ``flush()``, or in a
  ``put_many`` whose later value is a slow stream).
* Background compaction and another process's GC: the tables a compaction writes are
  unreferenced until its swap commits; a GC elsewhere must not delete them meanwhile.
* Dirty reads: a put that fails (its table upload or its manifest commit raises) was never
  acknowledged, so no thread of a non-buffered store may ever read its value.

Every acknowledged write (the call returned) must read back byte-exact at the end, the listing
must agree, and fsck must be clean. A write that raised is in doubt: either state may be there.
"""

from __future__ import annotations

import random
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from piecestore import NotFoundError, PieceStoreError
from piecestore.errors import BackendUnavailableError
from piecestore.localserver import LocalS3Server
from piecestore.manifest import MANIFEST_NAME
from tests.reliability._holes import History, check_final, make_value, open_check_store, run_procs
from tests.reliability._support import SOAK, open_store, s3_url

SMALL = 64 * 1024  # engine.small_piece_max_bytes: large pieces of 67-96 KiB stay cheap

# What each writer process does, per mode (weights of the operations; see holes_worker).
# ``buffered_writers``: which writer processes open the store with buffered writes.
MODES: dict[str, dict[str, Any]] = {
    # plain puts and put_manys, half of them large, and deletes, over a slow network (30 ms a
    # write request, so a commit lands a few requests after its large pieces were uploaded)
    "put": {"ops": {"put": 4, "put_many": 2, "delete": 1}, "large_frac": 0.5, "write_latency": 0.03},
    # store.batch() holding a large piece (put first) while it sleeps past the grace period; a
    # batch on a buffered store commits at its exit, on the other (writer0) in the background
    "batch": {
        "ops": {"batch": 3, "put": 1},
        "batch_sleep": 0.4,
        "large_frac": 0.3,
        "threads": 1,
        "buffered_writers": [1, 2],
    },
    # buffered stores: puts wait for flush() (or another op that flushes); naps hold them past
    # the grace period first. One thread each, so no other thread flushes them early.
    "buffered": {
        "ops": {"put": 3, "put_many": 1, "delete": 1, "nap": 1, "flush": 1},
        "batch_sleep": 0.4,
        "large_frac": 0.5,
        "threads": 1,
        "buffered_writers": [0, 1, 2],
    },
    # put_many(large bytes, slow stream): the first object is old by the time the commit lands
    "slow": {"ops": {"slow": 3, "put": 1}, "stream_delay": 0.2, "large_frac": 0.3},
}


def gc_race(
    url: str,
    workdir: Path,
    *,
    writer_cfg: dict[str, Any],
    overrides: dict[str, Any],
    gc_overrides: dict[str, Any],
    writers: int,
    duration: float,
    seed: int,
    gc_compacts_every: int = 2,
    litter: bool = False,
) -> tuple[History, dict[str, Any]]:
    """``writers`` writer processes beside one process looping ``store.gc()`` (compacting on
    every ``gc_compacts_every``-th pass; 0: never) and, with ``litter``, one leaving orphans.

    Checks the end state against the history and returns it with the run's figures.
    """
    rng = random.Random(seed)
    log = workdir / "history.log"
    log.touch()
    roles: list[dict[str, Any]] = []
    cfg = dict(writer_cfg)
    buffered_writers = cfg.pop("buffered_writers", [])
    compacting_writers = cfg.pop("compacting_writers", None)  # None: as the overrides say
    for w in range(writers):
        buffered = w in buffered_writers
        compacting = {} if compacting_writers is None else {"gc_auto_compact": w in compacting_writers}
        roles.append(
            {
                "role": "writer",
                "name": f"writer{w}" + ("-buffered" if buffered else ""),
                "url": url,
                "log": str(log),
                "owner": f"w{w}/",
                "seed": rng.randrange(2**32),
                "opid_base": (w + 1) * 10_000_000,
                "threads": 2,
                "keys": 10,
                "small_max": SMALL,
                **cfg,
                "buffered": buffered,
                "overrides": {**overrides, "store_buffered_writes": buffered, **compacting},
            }
        )
    # Passes that only reclaim are shorter: more of them land inside a window.
    roles.append(
        {
            "role": "gc",
            "name": "gc",
            "url": url,
            "log": str(log),
            "seed": 0,
            "pause": 0.0,
            "compact_every": gc_compacts_every,
            "overrides": gc_overrides,
        }
    )
    if litter:  # old orphans all the time: GC announces (and runs) sweeps all the time
        roles.append({"role": "litter", "name": "litter", "url": url, "log": str(log), "seed": 0,
                      "every": 0.1, "overrides": overrides})  # fmt: skip
    run_procs(roles, workdir, duration=duration)
    history = History.load(log)
    counts = history.counts()
    done = {n["done"]: n for n in history.done()}
    gc_done = done.get("gc", {})
    figures: dict[str, Any] = {
        **counts,
        "gc_runs": gc_done.get("gc_runs", 0),
        "gc_busy": gc_done.get("gc_busy", 0),
        "gc_deleted": gc_done.get("gc_deleted", 0),
        "gc_errors": gc_done.get("gc_errors", 0),
        "compaction_attempts": sum(n.get("compaction_attempts", 0) for n in done.values()),
        "compaction_outputs": sum(n.get("compaction_outputs", 0) for n in done.values()),
    }
    problems = history.problems()
    gc_errors = [n for n in history.notes if "gc_error" in n]
    failures = history.failures()

    def detail() -> str:
        first_failed = [f"{op.opid} {op.proc}: {op.error[:200]}" for op in failures[:3]]
        return (
            f"\nfigures: {figures}"
            f"\nfailed writes ({len(failures)}), first: {first_failed}"
            f"\ngc errors ({len(gc_errors)}), first: {gc_errors[:3]}"
            f"\nworker errors or wrong reads ({len(problems)}), first: {problems[:3]}"
        )

    try:
        store = open_check_store(url, overrides)
    except PieceStoreError as e:  # a table the manifest lists is gone: every piece in it is lost
        raise AssertionError(f"the store cannot even be opened after the run: {e}{detail()}") from e
    with store:
        final = check_final(store, history)
        report = store.fsck()
        figures["sweeps_announced"] = getattr(store.manifest, "sweep", None)  # where the fence exists
    figures.update(
        pieces_verified=final.acked_pieces,
        deleted_verified=final.acked_absent,
        doubt_landed=final.doubt_landed,
        lost=len(final.lost),
    )
    assert not problems, f"{len(problems)} wrong reads or worker errors, first: {problems[:3]}{detail()}"
    assert not final.lost, (
        f"{len(final.lost)} of {final.keys} keys lost their acknowledged state:\n  "
        + "\n  ".join(final.lost[:12])
        + f"\nfsck: {report}{whose_tables(history, str(report))}{detail()}"
    )
    assert report.ok, f"fsck after the run: {report}{detail()}"
    assert not gc_errors, f"GC passes failed beside the writers: {gc_errors[:5]}{detail()}"
    assert counts["open"] == 0, f"writes neither acknowledged nor failed in a clean run{detail()}"
    assert counts["failed"] * 2 <= counts["ops"], f"more than half of the writes raised{detail()}"
    assert counts["acked"] > 0 and figures["gc_runs"] > 0, f"no race was run{detail()}"
    return history, figures


def whose_tables(history: History, text: str) -> str:
    """Which tables named in ``text`` (fsck's report) a background compaction wrote."""
    outputs = {n["compaction_output"]: n["p"] for n in history.notes if "compaction_output" in n}
    named = sorted(set(re.findall(r"[0-9a-f]{32}\.tbl", text)))
    if not named:
        return ""
    lines = [f"{name}: {'written by a compaction in ' + outputs[name] if name in outputs else 'a commit'}"
             for name in named]  # fmt: skip
    return "\ntables named: " + "; ".join(lines)


def _url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "file":
        return "file://" + str(tmp_path / "store")
    server: LocalS3Server = request.getfixturevalue("s3_server")
    return s3_url(server.endpoint)


# A short GC lease (0.6 s): writer sessions protect young uploads only that long, so a write
# held past half of it (a batch, a nap, a slow stream) must face the sweep fence, while a
# littering process keeps GC sweeping. Default: the default lease (60 s).
LEASES = {"default": {}, "short": {"gc_lease_seconds": 0.6}}


# The default run keeps one case of each kind (about 1 min); PIECESTORE_SOAK=1 runs them all.
_QUICK = {
    ("file", "put", 0.0, "default"),
    ("file", "batch", 0.0, "short"),
    ("file", "buffered", 0.0, "short"),
    ("file", "slow", 0.0, "short"),
    ("file", "slow", 0.2, "default"),
    ("s3", "put", 0.0, "default"),
    ("s3", "buffered", 0.0, "default"),
}
_CASES = [
    pytest.param(
        backend,
        mode,
        grace,
        lease,
        marks=[
            *([pytest.mark.s3] if backend == "s3" else []),
            *([] if (backend, mode, grace, lease) in _QUICK else [pytest.mark.slow]),
        ],
        id=f"{backend}-{mode}-{grace}-{lease}",
    )
    for backend in ("file", "s3")
    for mode in MODES
    for grace, lease in ((0.0, "default"), (0.2, "default"), (0.0, "short"))
    if backend == "file" or (grace, lease) == (0.0, "default")
]


@pytest.mark.parametrize(("backend", "mode", "grace", "lease"), _CASES)
def test_large_pieces_survive_gc_in_another_process(
    backend: str,
    mode: str,
    grace: float,
    lease: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    figures: dict[str, Any],
) -> None:
    """Hole 2: 3 writer processes put large (and small) pieces beside a process looping gc()."""
    url = _url(backend, request, tmp_path)
    overrides = {
        "engine_small_piece_max_bytes": SMALL,
        "gc_grace_seconds": grace,
        "gc_auto_compact": False,
        "engine_table_target_bytes": 1024 * 1024,
        **LEASES[lease],
    }
    writer_cfg = dict(MODES[mode])
    if lease == "short" and mode == "slow":
        # ~0.36 s from the first object to the commit: past half the lease (the fence decides:
        # the objects are copied anew), not past the lease itself, after which a sweep deletes
        # them and the put fails by design (nothing acknowledged): that is not what is tested.
        writer_cfg["stream_delay"] = 0.12
    duration = 30.0 if SOAK else (4.0 if backend == "file" else 5.0)
    history, figs = gc_race(
        url,
        tmp_path,
        writer_cfg=writer_cfg,
        overrides=overrides,
        gc_overrides=overrides,
        writers=3,
        duration=duration,
        seed=zlib.crc32(f"{mode}-{grace}-{lease}".encode()),
        litter=lease == "short",
    )
    large_acked = sum(
        1
        for op in history.ops.values()
        if op.status == "acked" and any(s is not None and s[1] > SMALL for s in op.changes.values())
    )
    figs["large_acked_ops"] = large_acked
    figures.update(figs)
    assert large_acked > 0, f"no large piece was acknowledged: {figs}"


@pytest.mark.parametrize(
    ("grace", "lease"),
    [pytest.param(0.0, "default", marks=pytest.mark.slow), (0.2, "default"), (0.0, "short")],
)
def test_compaction_output_survives_gc_in_another_process(
    grace: float, lease: str, tmp_path: Path, figures: dict[str, Any]
) -> None:
    """Hole 3: background compaction in a writer process (it triggers after 2 small commits)
    beside a process looping gc() with a short grace (reclaiming only, so the writers' own
    compactions do the merging): the merged tables must not be reclaimed as orphans before
    the swap that references them commits."""
    url = "file://" + str(tmp_path / "store")
    overrides = {
        "engine_small_piece_max_bytes": SMALL,
        "engine_table_target_bytes": 64 * 1024,
        "engine_flush_bytes": 16 * 1024,  # tables below 8 KiB are small: every commit here
        "gc_compact_min_tables": 2,
        "gc_auto_compact": True,
        "gc_grace_seconds": grace,
        "gc_share_while_writing": 1.0,  # compaction does not pause for the writers: more runs
        **LEASES[lease],
    }
    # Small pieces only (large ones are hole 2's). 30 ms a write request, and more for a
    # compaction's pending-delete record, written between its uploads and its swap (as a
    # compaction paced to yield to writers may take): its merged tables wait over 0.25 s for
    # the swap that references them, longer than the 0.2 s grace; with the short lease less
    # (a run held past half the lease is dropped by design, and then nothing is tested).
    # Writer 0 compacts everybody's small tables in the background; three compactors would
    # mostly undo each other's runs.
    writer_cfg = {
        "ops": {"put": 6, "put_many": 2, "delete": 1},
        "large_frac": 0.0,
        "write_latency": 0.03,
        "pending_latency": 0.25 if lease == "default" else 0.1,
        "compacting_writers": [0],
    }
    _, figs = gc_race(
        url,
        tmp_path,
        writer_cfg=writer_cfg,
        overrides=overrides,
        gc_overrides={**overrides, "gc_auto_compact": False},
        writers=3,
        duration=30.0 if SOAK else 6.0,
        seed=7,
        gc_compacts_every=0,
        litter=lease == "short",
    )
    figures.update(figs)
    if lease == "default":
        assert figs["compaction_outputs"] > 0, f"background compaction never committed a table: {figs}"
    else:  # a run that a sweep may have reached is dropped (by design): it must have been tried
        assert figs["compaction_attempts"] > 0, f"background compaction never ran: {figs}"


# -- dirty reads -------------------------------------------------------------------------


class _Injected(BackendUnavailableError):
    """The failure the test injects (a subclass, so it is told apart from real ones)."""


def _caused_by_injection(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, _Injected):
            return True
        error = error.__cause__ or error.__context__
    return False


@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("fail_at", ["table_upload", "manifest_commit"])
@pytest.mark.parametrize("call", ["put", "put_many"])
def test_a_failed_put_is_never_read(tmp_path: Path, call: str, fail_at: str, size: str) -> None:
    """Hole 6: thread A's write fails after a 0.6 s stall in its table upload or its manifest
    commit; thread B polls get, get_many, exists and list all along and must never see A's
    value (it was never acknowledged), nor afterwards, nor from a fresh store."""
    url = f"file://{tmp_path}/store"
    store = open_store(url, engine_small_piece_max_bytes=SMALL, gc_auto_compact=False)
    old_key, fresh_key = "k/old", "k/fresh"
    old = make_value(1, old_key, 100)
    store.put(old_key, old)
    n = SMALL + 5000 if size == "large" else 300
    new = {old_key: make_value(2, old_key, n), fresh_key: make_value(2, fresh_key, n)}
    if call == "put":
        del new[fresh_key]

    backend = store.backend
    armed = threading.Event()
    stalled = threading.Event()
    name = "put_parts" if fail_at == "table_upload" else "put"
    original = getattr(backend, name)

    def failing(obj: str, *a: Any, **kw: Any) -> Any:
        if armed.is_set() and (fail_at == "table_upload" or obj == MANIFEST_NAME):
            # The first call stalls, then it and every retry fail until the writer gives up.
            if not stalled.is_set():
                stalled.set()
                time.sleep(0.6)
            raise _Injected(f"injected failure of {name}({obj!r})")
        return original(obj, *a, **kw)

    setattr(backend, name, failing)  # a test seam on this store's backend object only
    outcome: list[BaseException | None] = []
    finished = threading.Event()

    def writer() -> None:
        try:
            if call == "put":
                store.put(old_key, new[old_key])
            else:
                store.put_many(new)
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)
        finally:
            finished.set()

    seen: list[str] = []
    polls_in_window = 0

    def check(method: str, key: str, got: bytes | None) -> None:
        if got is not None and got == new.get(key):
            seen.append(f"{method}({key!r}) returned the failed put's value ({len(got)} bytes)")
        elif key == fresh_key and got is not None:
            seen.append(f"{method}({key!r}) returned {len(got)} bytes; it was never written")
        elif key == old_key and got != old:
            seen.append(
                f"{method}({key!r}) returned {None if got is None else len(got)} bytes, not the old value"
            )

    def poll() -> None:
        for key in (old_key, fresh_key):
            try:
                got: bytes | None = store.get(key)
            except NotFoundError:
                got = None
            check("get", key, got)
            check("get_many", key, store.get_many([key], missing="skip").get(key))
            exists = store.exists(key)
            if exists != (key == old_key):
                seen.append(f"exists({key!r}) returned {exists}")
        listed = {p.key: p.size for p in store.list()}
        if listed != {old_key: len(old)}:
            seen.append(f"list() returned {listed}")

    try:
        poll()
        armed.set()
        thread = threading.Thread(target=writer)
        thread.start()
        deadline = time.monotonic() + 60
        while not finished.is_set() and time.monotonic() < deadline:
            poll()
            if stalled.is_set() and not finished.is_set():
                polls_in_window += 1
        armed.clear()
        thread.join(30)
        poll()
    finally:
        setattr(backend, name, original)
        store.close()
    assert outcome and _caused_by_injection(outcome[0]), f"the {call} did not fail as injected: {outcome}"
    assert stalled.is_set() and polls_in_window >= 3, f"the reader polled {polls_in_window}x during the stall"
    assert not seen, (
        f"{len(seen)} reads of a never-acknowledged {size} {call} (failed at {fail_at}), "
        f"first: {sorted(set(seen))[:5]}"
    )
    with open_store(url) as fresh:
        assert fresh.get_many([old_key, fresh_key], missing="skip") == {old_key: old}
        assert fresh.fsck().ok
