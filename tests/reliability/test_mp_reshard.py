"""Multi-process model test of a sharded store resharded under load, the mover killed midway.

Three (or four) shards on local file stores. Real processes do everything at once, as in
production (workers: tests.reliability.reshard_worker):

* writer processes, each owning its keys: ``put``, ``put_many``, ``delete``/``delete_many`` of
  small pieces and large ones (their own objects), background compaction on. Writes are NOT
  buffered: the reshard protocol needs a write in another process than the mover to be durable
  on the previous owner before it goes to the new one (see piecestore.sharding.reshard, step
  3); buffered writes or an open ``batch()`` there could commit the new owner first. Each
  write is logged before it starts and whether it returned (acknowledged) or raised (in
  doubt); each writer now and then reads its own keys back;
* a reader process with old views (shard manifests re-read by hand every 1.5 s, far past the
  grace period): every value it reads must be that of a write to that key that was
  acknowledged (or raised: in doubt), never bytes nobody wrote there;
* a process looping the plain stores' GC over every shard (grace 0), GCBusyError ignored;
* a mover process calling ``store.reshard(new_targets, progress, grace_seconds=GRACE)``,
  killed with SIGKILL after some progress callbacks (mid-move: between or inside copy
  batches); then a new mover process, opened with the new targets, resumes it with the same
  targets and finishes. The other handles check the layout every LAYOUT_CHECK seconds
  (< GRACE, as the protocol requires) and keep writing across both movers. The protocol also
  assumes that a write routed by one layout lands within GRACE (nothing fences a write that
  stalls longer after routing); the writes here take milliseconds on an idle machine, and a
  failure lists any that took longer than GRACE.

At the end every key holds its latest acknowledged state (a deleted key stays deleted), or
that of a later write that raised; ``list()`` agrees with reads; each shard holds exactly the
keys it owns under the final layout (a removed shard none); every shard's fsck is clean; and
all of that still holds after one more GC pass. A writer reading an *older* state of its own
key back while its handle routes by the resharding layout is counted, not failed: until the
mover's verify round (or the resumed mover) re-applies the newer value, a copy can shadow it
for handles in other processes (the module docstring of piecestore.sharding.store says only
this process's gate prevents that). A failure names the key, what it should hold, what it
holds, and which process and operation wrote each.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import time
from pathlib import Path
from typing import Any, cast

import pytest

from piecestore import PieceStore, PieceStoreError
from piecestore.api import open_store_backend
from piecestore.sharding import Router
from piecestore.sharding.router import coerce_targets, targets_fingerprint
from piecestore.sharding.store import ShardedStore, read_layout
from tests.reliability._holes import History, HolesProc, Log, Op, check_final, check_observations, make_value
from tests.reliability._support import SOAK, SOAK_SECONDS
from tests.reliability.reshard_worker import open_sharded

SMALL = 64 * 1024
# The movers' grace_seconds. It must exceed the other handles' layout check and manifest refresh
# intervals, and the time a write takes from routing to landing (up to 0.6 s seen here on two
# busy cores): writes that straddle a layout change by more are not fenced (see the docstring).
GRACE = 1.0
LAYOUT_CHECK = 0.1  # every other handle's layout_check_seconds: well below GRACE

BASE: dict[str, Any] = {
    "engine_small_piece_max_bytes": SMALL,
    "engine_table_target_bytes": 256 * 1024,
    "engine_flush_bytes": 32 * 1024,
    "gc_compact_min_tables": 3,
    "gc_auto_compact": True,
    "engine_refresh_interval_seconds": 0.2,  # below GRACE too: see run_reshard's docstring
    "gc_grace_seconds": 0.0,
    "gc_lease_seconds": 5.0,  # a killed mover's compaction lease runs out within the run
    "store_buffered_writes": False,
}

WRITER: dict[str, Any] = {
    "threads": 2,
    "ops": {"put": 4, "put_many": 2, "delete": 2, "verify": 2},
    "large_frac": 0.3,
}


class ShardProc(HolesProc):
    """A tests.reliability.reshard_worker process: READY, then ``go``; ``stop`` ends a worker."""

    MODULE = "tests.reliability.reshard_worker"

    def __init__(self, cfg: dict[str, Any], workdir: Path, name: str) -> None:
        super().__init__(cfg, workdir, name)
        self.buf = b""

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()

    def readline(self, timeout: float) -> str | None:
        """The next line it prints; None at the end of its output or after ``timeout``."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")


def moves(keys: list[str], old: list[str], new: list[str]) -> set[str]:
    """The keys whose owner changes from ``old`` to ``new`` (routing does not depend on order)."""
    before, after = Router(old), Router(new)
    old_ids = [t.identity for t in coerce_targets(old)]
    new_ids = [t.identity for t in coerce_targets(new)]
    a, b = before.route_many(keys).tolist(), after.route_many(keys).tolist()
    return {k for k, i, j in zip(keys, a, b, strict=True) if old_ids[i] != new_ids[j]}


def large(rng: random.Random) -> int:
    return rng.randint(SMALL + SMALL // 20, SMALL + SMALL // 2)


def preload(targets: list[str], log_path: Path, overrides: dict[str, Any], n: int, seed: int) -> list[str]:
    """``n`` keys nobody touches afterwards (logged as acknowledged ops): bulk for the mover."""
    rng = random.Random(seed)
    log = Log(log_path)
    keys = [f"pre/k{i:05d}" for i in range(n)]
    opid = 0
    with open_sharded(targets, overrides, LAYOUT_CHECK) as store:
        for start in range(0, n, 40):
            opid += 1
            chunk = keys[start : start + 40]
            sizes = {k: large(rng) if rng.random() < 0.1 else rng.randint(8, 2000) for k in chunk}
            log.write(i=opid, c=sizes, p="preload", how="put_many", t=time.time())
            store.put_many({k: make_value(opid, k, s) for k, s in sizes.items()})
            log.write(a=opid)
    log.close()
    return keys


def kill_midway(mover: ShardProc, after: int, rng: random.Random) -> dict[str, Any]:
    """Let ``mover`` copy ``after`` batches, then SIGKILL it at a random moment of the next."""
    seen: list[tuple[int, int]] = []
    copied = 0
    while copied < after:
        line = mover.readline(60)
        if line is None or line == "DONE":
            raise AssertionError(
                f"the mover {'finished' if line else 'stopped'} before it could be killed midway "
                f"(progress {seen}): {mover.stderr()[-2000:]}"
            )
        if line.startswith("PROGRESS"):
            done, total = map(int, line.split()[1:])
            seen.append((done, total))
            if done > 0:
                copied += 1
            if done >= total:
                raise AssertionError(f"too little to move to kill the mover midway: progress {seen}")
    time.sleep(rng.uniform(0.0, 0.08))  # inside the next batch: its reads, copy, flush or verify
    mover.kill()
    mover.close()
    assert mover.proc.returncode == -9, mover.proc.returncode
    return {"killed_at": seen[-1], "progress_calls": len(seen)}


def reshard_run(
    workdir: Path,
    *,
    grow: bool,
    seed: int,
    kills: int = 1,
    writers: int = 3,
    keys_per_thread: int = 16,
    preloaded: int = 320,
    warmup: float = 1.0,
    interrupted: float = 0.5,
    tail: float = 1.0,
    batch_keys: int = 8,
    progress_pause: float = 0.04,
) -> dict[str, Any]:
    began = time.monotonic()
    rng = random.Random(seed)
    urls = []
    for i in range(4):
        (workdir / f"shard{i}").mkdir()
        urls.append("file://" + str(workdir / f"shard{i}"))
    old, new = (urls[:3], urls) if grow else (urls, urls[:3])
    removed = [u for u in old if u not in new]
    log = workdir / "history.log"
    log.touch()
    overrides = dict(BASE)
    pre_keys = preload(old, log, overrides, preloaded, seed)
    phases: dict[str, float] = {"preload": time.monotonic() - began}

    common = {"log": str(log), "overrides": overrides, "layout_check_seconds": LAYOUT_CHECK,
              "max_seconds": 240}  # fmt: skip
    roles: list[dict[str, Any]] = []
    all_keys = list(pre_keys)
    for w in range(writers):
        owner = f"w{w}/"
        all_keys += [
            f"{owner}t{t}/k{j:03d}" for t in range(WRITER["threads"]) for j in range(keys_per_thread)
        ]
        roles.append({**WRITER, **common, "role": "writer", "name": f"writer{w}", "targets": old,
                      "owner": owner, "seed": rng.randrange(2**32), "opid_base": (w + 1) * 10_000_000,
                      "keys": keys_per_thread, "small_max": SMALL})  # fmt: skip
    obs = workdir / "reader.obs"
    roles.append({**common, "role": "reader", "name": "reader", "targets": old, "seed": rng.randrange(2**32),
                  "threads": 2, "read_keys": all_keys, "obs": str(obs),
                  "prefixes": ["", "pre/", *(f"w{w}/" for w in range(writers))],
                  # old views: manifests re-read every 1.5 s (by hand), not every 0.2 s
                  "refresh_every": 1.5, "read_pause": 0.002,
                  "overrides": {**overrides, "engine_refresh_interval_seconds": 30,
                                "gc_auto_compact": False}})  # fmt: skip
    roles.append({**common, "role": "gc", "name": "gc", "targets": old, "seed": 0, "pause": 0.02,
                  "overrides": {**overrides, "gc_auto_compact": False}})  # fmt: skip

    def mover_cfg(n: int, targets: list[str]) -> dict[str, Any]:
        last = n == kills
        return {**common, "role": "mover", "name": f"mover{n}", "targets": targets, "new_targets": new,
                "seed": 0, "grace": GRACE, "batch_keys": batch_keys,
                "progress_pause": progress_pause / 4 if last else progress_pause}  # fmt: skip

    procs = [ShardProc(role, workdir, role["name"]) for role in roles]
    movers: list[ShardProc] = []
    figures: dict[str, Any] = {}
    killed: list[dict[str, Any]] = []
    try:
        for p in procs:
            p.wait_ready()
        phases["startup"] = time.monotonic() - began
        for p in procs:
            p.go()
        warm = time.monotonic() + warmup
        # Movers start while the others warm up. The first is configured with the old targets;
        # the ones that resume it, with the new ones (what opening accepts while the layout
        # records the reshard): each opens the store only when told to go.
        movers += [ShardProc(mover_cfg(n, new if n else old), workdir, f"mover{n}") for n in range(kills + 1)]
        for p in movers:
            p.wait_ready()
        time.sleep(max(0.0, warm - time.monotonic()))
        moving_since = time.time()
        movers[0].go()
        for n in range(1, kills + 1):
            # Kill the running mover midway; the next one resumes with the same targets.
            killed.append(kill_midway(movers[n - 1], after=2 + rng.randrange(3), rng=rng))
            time.sleep(interrupted)  # the writers go on, the layout resharding, nobody moving
            movers[n].go()
        code = movers[-1].finish(120)
        moved_until = time.time()
        assert code == 0, f"the resuming mover failed ({code}): {movers[-1].stderr()[-3000:]}"
        time.sleep(tail)
        for p in procs:
            p.send("stop")
        codes = [p.finish(120) for p in procs]
        failed = [(p.cfg["name"], c, p.stderr()[-2000:]) for p, c in zip(procs, codes, strict=True) if c != 0]
        assert not failed, f"worker processes failed: {failed}"
    finally:
        for p in [*procs, *movers]:
            p.kill()
            p.close()
    run_seconds = time.monotonic() - began
    checks_began = time.monotonic()

    history = History.load(log)
    counts = history.counts()
    done = {n["done"]: n for n in history.done()}
    problems = history.problems()
    stale = [n for n in history.notes if n.get("stale")]
    gc_errors = [n for n in history.notes if "gc_error" in n]
    read_errors = [n for n in history.notes if "read_error" in n]
    persistent = [n for n in read_errors if n.get("again")]
    reports = [n["reshard_report"] for n in history.notes if "reshard_report" in n]
    observed = check_observations(history, [obs])
    moving = moves(all_keys, old, new)
    written = [op for op in history.ops.values() if op.proc != "preload"]
    during = [op for op in written if moving_since <= op.t <= moved_until]
    acked_deletes = sum(1 for op in written if op.status == "acked" and None in op.changes.values())
    gc = done.get("gc", {})
    slow = slow_writes(log, history)
    figures.update(
        {
            **counts,
            "acked_deletes": acked_deletes,
            "keys": len(all_keys),
            "moving_keys": len(moving),
            "ops_while_resharding": len(during),
            "ops_on_moving_keys_while_resharding": sum(1 for op in during if moving & set(op.changes)),
            "kills": [k["killed_at"] for k in killed],
            "resumed_moved": reports[0]["keys_moved"] if reports else None,
            "resumed_copied": reports[0]["keys_copied"] if reports else None,
            "resumed_removed": reports[0]["keys_removed"] if reports else None,
            "resumed_swept": reports[0]["keys_deleted"] if reports else None,
            "own_reads_checked": sum(n.get("verified", 0) for n in done.values()),
            "stale_own_reads_while_resharding": len(stale),
            "reader_reads": sum(n.get("reads", 0) + n.get("lists", 0) for n in done.values()),
            "observations_checked": observed.checked,
            "doubt_values_seen": observed.doubt_seen,
            "stale_view_read_errors": len(read_errors) - len(persistent),
            "gc_runs": gc.get("gc_runs", 0),
            "gc_busy": gc.get("gc_busy", 0),
            "gc_deleted": gc.get("gc_deleted", 0),
            "slowest_write_seconds": round(slow[0][0], 3) if slow else None,
            "reshard_seconds": round(moved_until - moving_since, 2),
            "preload_seconds": round(phases["preload"], 2),
            "startup_seconds": round(phases["startup"], 2),
            "run_seconds": round(run_seconds, 2),
        }
    )

    def detail() -> str:
        failed = [f"{op.opid} {op.proc} {op.how}: {op.error[:200]}" for op in history.failures()[:3]]
        return (
            f"\nfigures: {figures}"
            f"\nreshard reports: {reports}"
            f"\nfailed writes ({counts['failed']}), first: {failed}"
            f"\nstale own reads while resharding ({len(stale)}), first: {stale[:3]}"
            f"\ngc errors ({len(gc_errors)}), first: {gc_errors[:3]}"
            f"\nread errors ({len(read_errors)}; {len(persistent)} persist after a refresh), "
            f"first: {read_errors[:3]}"
            # The protocol assumes a write routed by one layout lands within the grace period.
            f"\nwrites slower than the grace period ({GRACE} s): "
            f"{[(round(s, 2), op.describe(next(iter(op.changes)))) for s, op in slow if s > GRACE][:5]}"
            f"\nworkdir (history.log, *.stderr): {workdir}"
        )

    check_overrides = {**overrides, "gc_auto_compact": False, "cache_memory_bytes": 0}
    for attempt in ("after the run", "after one more GC pass"):
        try:
            store = open_sharded(new, check_overrides, LAYOUT_CHECK)
        except PieceStoreError as e:
            raise AssertionError(f"the store cannot be opened {attempt}: {e}{detail()}") from e
        with store:
            final = check_final(cast(PieceStore, store), history)  # the API the two share
            placement = misplaced(store, new, removed)
            recorded = {u: read_layout(store._backend(t.identity))[0] for u, t in zip(
                new + removed, coerce_targets(new + removed), strict=True)}  # fmt: skip
            reports_fsck = {s.url: s.fsck() for s in store.shards}
            for url in removed:
                with plain(url, store) as shard:
                    reports_fsck[url] = shard.fsck()
            assert not final.lost, (
                f"{attempt}: {len(final.lost)} of {final.keys} keys do not hold their acknowledged state:"
                "\n  " + "\n  ".join(final.lost[:12]) + detail()
            )
            assert not placement, (
                f"{attempt}: shards hold keys they do not own:\n  " + "\n  ".join(placement[:12]) + detail()
            )
            layout = store.layout
            assert layout.state == "stable" and layout.fingerprint == targets_fingerprint(
                coerce_targets(new)
            ), f"{attempt}: layout {layout}{detail()}"
            assert all(r == layout for r in recorded.values()), f"{attempt}: recorded {recorded}{detail()}"
            bad_fsck = {u: r for u, r in reports_fsck.items() if not r.ok}
            assert not bad_fsck, f"{attempt}: fsck {bad_fsck}{detail()}"
            if attempt == "after the run":
                figures.update(pieces_verified=final.acked_pieces, absent_verified=final.acked_absent,
                               doubt_landed=final.doubt_landed)  # fmt: skip
                for shard in store.shards:
                    shard.gc()
    figures["check_seconds"] = round(time.monotonic() - checks_began, 2)

    assert not problems, (
        f"{len(problems)} wrong reads (bytes nobody wrote, or an own key in a state its writer never "
        "left it in) or worker errors:\n  " + "\n  ".join(map(str, problems[:8])) + detail()
    )
    assert not observed.bad, (
        f"the reader saw {len(observed.bad)} values never acknowledged:\n  "
        + "\n  ".join(observed.bad[:8])
        + detail()
    )
    assert not gc_errors, f"GC passes failed beside the writers: {gc_errors[:5]}{detail()}"
    assert not persistent, f"reads failed even after a refresh: {persistent[:5]}{detail()}"
    assert len(reports) == 1 and reports[0]["resumed"], f"the last mover did not resume{detail()}"
    assert counts["open"] == 0, f"writes neither acknowledged nor failed{detail()}"
    assert counts["failed"] * 2 <= counts["ops"], f"more than half of the writes raised{detail()}"
    assert acked_deletes > 0 and figures["ops_on_moving_keys_while_resharding"] > 0, (
        f"too little was written while resharding{detail()}"
    )
    assert figures["gc_runs"] > 0 and observed.checked > 0, f"GC or the reader never ran{detail()}"
    return figures


def slow_writes(log: Path, history: History) -> list[tuple[float, Op]]:
    """(seconds from intent to ack or failure, op) of every write, slowest first."""
    ended: dict[int, float] = {}
    for line in log.read_bytes().splitlines():
        obj = json.loads(line)
        if ("a" in obj or "f" in obj) and "t" in obj:
            ended[int(obj.get("a", obj.get("f")))] = float(obj["t"])
    out = [(ended[op.opid] - op.t, op) for op in history.ops.values() if op.opid in ended and op.t]
    return sorted(out, key=lambda x: -x[0])


def misplaced(store: ShardedStore, new: list[str], removed: list[str]) -> list[str]:
    """Keys a shard holds that it does not own under the final layout (a removed one owns none)."""
    out: list[str] = []
    listed = {p.key for p in store.list()}
    held: set[str] = set()
    by_url = dict(zip([t.identity for t in coerce_targets(new)], new, strict=True))
    for i, shard in enumerate(store.shards):
        shard.refresh()
        keys = [p.key for p in shard.list()]
        held.update(keys)
        owners = store.router.route_many(keys).tolist() if keys else []
        url = by_url.get(store.layout.targets[i].identity, shard.url)
        out += [
            f"{k!r} on {url} (owner {store.shards[o].url})"
            for k, o in zip(keys, owners, strict=True)
            if o != i
        ]
    for url in removed:
        with plain(url, store) as shard:
            out += [f"{p.key!r} on the removed target {url}" for p in shard.list()]
    if held != listed:
        out.append(
            f"the shards hold {sorted(held - listed)[:5]} unlisted, list {sorted(listed - held)[:5]} unheld"
        )
    return out


@contextlib.contextmanager
def plain(url: str, store: ShardedStore) -> Any:
    """One shard opened as a plain store (bypassing the check that refuses that: a test's look)."""
    shard = PieceStore(open_store_backend(url, store.settings), store.settings)
    try:
        yield shard
    finally:
        shard.close()


@pytest.mark.parametrize("direction", ["grow", pytest.param("shrink", marks=pytest.mark.slow)])
def test_an_interrupted_reshard_under_load_matches_the_dict_model(
    direction: str, tmp_path: Path, figures: dict[str, Any]
) -> None:
    figures.update(reshard_run(tmp_path, grow=direction == "grow", seed=11 if direction == "grow" else 12))


@pytest.mark.slow
@pytest.mark.parametrize("kills", [1, 3])
@pytest.mark.parametrize("direction", ["grow", "shrink"])
def test_an_interrupted_reshard_under_load_matches_the_dict_model_long(
    direction: str, kills: int, tmp_path: Path, figures: dict[str, Any]
) -> None:
    """More keys, a slower mover killed once or three times, longer pauses and tails."""
    tail = max(5.0, min(SOAK_SECONDS, 120.0) / 4) if SOAK else 5.0
    figures.update(
        reshard_run(
            tmp_path,
            grow=direction == "grow",
            seed=20 + kills,
            kills=kills,
            keys_per_thread=40,
            preloaded=3000,
            warmup=3.0,
            interrupted=2.0,
            tail=tail,
            batch_keys=16,
            progress_pause=0.1,
        )
    )
