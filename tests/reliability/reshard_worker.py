"""A writer, reader, GC or mover process of the sharded multi-process model test.

    python -m tests.reliability.reshard_worker '<json config>'

It opens a ShardedStore on ``targets`` (``layout_check_seconds`` set from the config: it must
be below the mover's grace period), prints READY and waits for ``go`` on stdin. Writers,
readers and the GC loop then work until ``stop`` arrives on stdin (or ``max_seconds`` pass);
a mover reshards to ``new_targets`` and exits. Config keys: role ("writer" | "reader" | "gc" |
"mover"), name, targets, overrides, layout_check_seconds, log (the shared history, see
tests.reliability._holes), seed, max_seconds, and per role:

* writer: owner (key prefix), opid_base, threads, keys (per thread), small_max, large_frac,
  ops (weights of put, put_many, delete and verify: read own keys back). Writes are not
  buffered: a call that returns is durable, on the previous owner first and then the new one,
  which is what the reshard protocol needs of writers in other processes;
* reader: as in tests.reliability.holes_worker (read_keys, prefixes, threads, obs,
  refresh_every, read_pause), on the sharded store;
* gc: pause (seconds between passes over the shards), compact_every;
* mover: new_targets, grace (``grace_seconds``), batch_keys, progress_pause (seconds the
  progress callback sleeps after each batch: a slow mover). It prints ``PROGRESS done total``
  at the end of each callback (so a kill soon after lands inside the next batch), and
  ``DONE`` once the report is logged.

Every write is logged before (intent) and after (ack, or fail with the error), with the layout
the writer routed it by. A writer reading its own keys back logs a "bad" note for a state it
never left there; an *older* state of the key read while its handle routes by a resharding
layout is logged as a "stale" note instead: a reader in another process than the mover can
briefly see a copy of the previous owner's older value until the mover's verify round (or the
resumed mover) re-applies the newer one (see piecestore.sharding.reshard, step 3).
"""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import traceback
from typing import Any, cast

import piecestore
from piecestore import PieceStore
from piecestore.lease import GCBusyError
from piecestore.sharding.store import ShardedStore
from tests.reliability._holes import HEADER, Log, State, make_value, value_opid
from tests.reliability.holes_worker import Worker


def open_sharded(targets: list[str], overrides: dict[str, Any], layout_check_seconds: float) -> ShardedStore:
    overrides = {"engine_flush_linger_ms": 1.0, **overrides}
    store = piecestore.open(shards=targets, **overrides)
    assert isinstance(store, ShardedStore)
    store.layout_check_seconds = layout_check_seconds
    return store


class ShardWorker(Worker):
    """holes_worker's reader (and bookkeeping) on a sharded store, with its own writer, GC
    loop and mover."""

    def __init__(self, cfg: dict[str, Any]) -> None:  # no super(): it opens a plain store
        self.cfg = cfg
        self.name = str(cfg["name"])
        self.log = Log(cfg["log"])
        self.stop = threading.Event()
        self.sharded: ShardedStore
        self.counts = {}
        self.count_lock = threading.Lock()
        self.observed = set()
        if cfg["role"] != "mover":  # a mover opens the store when told to go (see run)
            self.open()

    def open(self) -> None:
        cfg = self.cfg
        self.sharded = open_sharded(
            list(cfg["targets"]), dict(cfg.get("overrides", {})), float(cfg["layout_check_seconds"])
        )
        # The inherited reader only uses the API the two share (get, get_many, exists, list, refresh).
        self.store = cast(PieceStore, self.sharded)

    def layout_tag(self) -> str:
        lay = self.sharded.layout
        return f"v{lay.version}:{lay.state}"

    # -- writers -------------------------------------------------------------------------
    def writer(self, t: int) -> None:
        cfg = self.cfg
        rng = random.Random(f"{cfg['seed']}-{t}")
        keys = [f"{cfg['owner']}t{t}/k{j:03d}" for j in range(int(cfg.get("keys", 12)))]
        small_max = int(cfg["small_max"])
        large_frac = float(cfg.get("large_frac", 0.3))
        weights: dict[str, float] = cfg.get("ops", {"put": 1.0})
        kinds, kind_weights = list(weights), list(weights.values())
        opid = int(cfg["opid_base"]) + t * 1_000_000
        store = self.sharded
        # What each own key may hold: the acknowledged state first, then states in doubt.
        known: dict[str, list[State]] = {k: [None] for k in keys}
        ever: dict[str, set[State]] = {k: {None} for k in keys}  # every state it was ever given

        def size() -> int:
            if rng.random() < large_frac:
                return rng.randint(small_max + small_max // 20, small_max + small_max // 2)
            return rng.randint(HEADER, min(2000, small_max))

        def intent(changes: dict[str, int | None], how: str) -> int:
            nonlocal opid
            opid += 1
            self.log.write(
                i=opid,
                c={k: -1 if v is None else v for k, v in changes.items()},
                p=self.name,
                how=how,
                t=time.time(),
                lay=self.layout_tag(),
            )
            for k, v in changes.items():
                ever[k].add(None if v is None else (opid, v))
            return opid

        def ack(op: int, changes: dict[str, int | None]) -> None:
            self.log.write(a=op, t=time.time())
            for k, v in changes.items():
                known[k] = [None if v is None else (op, v)]
            self.bump("acked")

        def fail(op: int, changes: dict[str, int | None], e: BaseException) -> None:
            self.log.write(f=op, e=f"{type(e).__name__}: {e}"[:500], t=time.time(), lay=self.layout_tag())
            for k, v in changes.items():
                known[k] = [*known[k], None if v is None else (op, v)]
            self.bump("failed")

        def verify() -> None:
            chosen = rng.sample(keys, rng.choice([1, 4, len(keys)]))
            before = self.layout_tag()
            try:
                if len(chosen) == 1 and rng.random() < 0.5:
                    method = "own get"
                    try:
                        got = {chosen[0]: store.get(chosen[0])}
                    except piecestore.NotFoundError:
                        got = {}
                else:
                    method = "own get_many"
                    got = store.get_many(chosen, missing="skip")
            except Exception as e:
                self.log.write(bad=True, p=self.name, k=chosen[0], m="own read", n=len(chosen),
                               what=f"reading own keys failed: {type(e).__name__}: {e}"[:600])  # fmt: skip
                return
            after = self.layout_tag()
            moving = "resharding" in before or "resharding" in after
            for k in chosen:
                value = got.get(k)
                state: State = None if value is None else (value_opid(k, value) or -1, len(value))
                if state in known[k]:
                    continue
                note: dict[str, Any] = dict(p=self.name, k=k, m=method, got=state, allowed=known[k],
                                            lay=f"{before}->{after}", t=time.time())  # fmt: skip
                if moving and state in ever[k]:
                    self.bump("stale_own_reads")
                    self.log.write(stale=True, what="an older state of the key, read while resharding",
                                   **note)  # fmt: skip
                else:
                    self.log.write(bad=True, what="own key holds a state this writer never left there",
                                   **note)  # fmt: skip
            self.bump("verified", len(chosen))

        while not self.stop.is_set():
            kind = rng.choices(kinds, kind_weights)[0]
            self.bump(kind)
            if kind == "verify":
                verify()
                continue
            changes: dict[str, int | None]
            if kind == "put":
                key = rng.choice(keys)
                changes = {key: size()}
            elif kind == "put_many":
                changes = {k: size() for k in rng.sample(keys, rng.randint(2, 4))}
            elif kind == "delete":
                changes = dict.fromkeys(rng.sample(keys, rng.choice([1, 2])))
                kind = "delete" if len(changes) == 1 else "delete_many"
            else:
                raise ValueError(f"unknown writer op {kind!r}")
            op = intent(changes, kind)
            try:
                if kind == "put":
                    ((k, s),) = changes.items()
                    assert s is not None
                    store.put(k, make_value(op, k, s))
                elif kind == "put_many":
                    store.put_many({k: make_value(op, k, s) for k, s in changes.items() if s is not None})
                elif kind == "delete":
                    store.delete(next(iter(changes)))
                else:
                    store.delete_many(list(changes))
            except Exception as e:
                fail(op, changes, e)
            else:
                ack(op, changes)

    # -- GC ------------------------------------------------------------------------------
    def gc_loop(self) -> None:
        """Plain stores' GC on every shard, following the layout (the shards a reshard moves
        between included); GCBusyError (another process's compaction holds the lease) ignored."""
        pause = float(self.cfg.get("pause", 0.0))
        every = int(self.cfg.get("compact_every", 1))
        passes = 0
        while not self.stop.is_set():
            passes += 1
            try:
                self.sharded.refresh()
                shards = self.sharded._routing.all_stores()
            except Exception as e:
                self.bump("gc_errors")
                self.log.write(gc_error=f"refresh: {type(e).__name__}: {e}"[:600], p=self.name, t=time.time())
                self.stop.wait(0.05)
                continue
            for shard in shards:
                if self.stop.is_set():
                    break
                try:
                    report = shard.gc(compact=every > 0 and passes % every == 0)
                except GCBusyError:
                    self.bump("gc_busy")
                except Exception as e:
                    self.bump("gc_errors")
                    self.log.write(gc_error=f"{shard.url}: {type(e).__name__}: {e}"[:600], p=self.name,
                                   t=time.time())  # fmt: skip
                else:
                    self.bump("gc_runs")
                    self.bump("gc_deleted", report.deleted)
                    self.bump("gc_compacted_tables", report.compacted_tables)
            self.stop.wait(pause)

    # -- the mover -----------------------------------------------------------------------
    def move(self) -> None:
        cfg = self.cfg
        pause = float(cfg.get("progress_pause", 0.0))

        def progress(done: int, total: int) -> None:
            self.log.write(progress=[done, total], p=self.name, t=time.time())
            if pause:  # before telling: a kill right after the line lands in the next batch
                time.sleep(pause)
            print(f"PROGRESS {done} {total}", flush=True)

        self.log.write(mover_start=self.layout_tag(), p=self.name, t=time.time())
        report = self.sharded.reshard(
            list(cfg["new_targets"]),
            progress,
            grace_seconds=float(cfg["grace"]),
            batch_keys=int(cfg.get("batch_keys", 512)),
        )
        self.log.write(reshard_report=report.to_json(), p=self.name, t=time.time())
        print("DONE", flush=True)

    # -- the run -------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        role = cfg["role"]
        errors: list[str] = []

        def guard(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except BaseException:
                errors.append(traceback.format_exc())
                self.log.write(error=traceback.format_exc()[-3000:], p=self.name)
                self.stop.set()

        targets: list[tuple[Any, ...]]
        if role == "writer":
            targets = [(self.writer, t) for t in range(int(cfg.get("threads", 1)))]
        elif role == "reader":
            targets = [(self.reader, t) for t in range(int(cfg.get("threads", 1)))]
        elif role == "gc":
            targets = [(self.gc_loop,)]
        elif role == "mover":
            targets = [(self.move,)]
        else:
            raise SystemExit(f"unknown role {role!r}")
        threads = [threading.Thread(target=guard, args=target, daemon=True) for target in targets]
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 2
        if role == "mover":
            # Started ahead of time, it opens the store only now: a resuming mover must be
            # configured with the new targets, which opening accepts only once the resharding
            # layout is recorded.
            guard(self.open)
            if not errors:
                for th in threads:
                    th.start()
                    th.join()
        else:
            for th in threads:
                th.start()

            def await_stop() -> None:
                for line in sys.stdin:
                    if line.strip() == "stop":
                        break
                self.stop.set()  # "stop", or the parent went away

            threading.Thread(target=await_stop, daemon=True).start()
            self.stop.wait(float(cfg.get("max_seconds", 120)))
            self.stop.set()
            for th in threads:
                th.join(120)
        try:
            if hasattr(self, "sharded"):  # a mover that failed to open has none
                self.sharded.close()
        except Exception:
            errors.append(traceback.format_exc())
            self.log.write(error=traceback.format_exc()[-3000:], p=self.name)
        self.dump_observations()
        self.log.write(done=self.name, role=role, errors=len(errors), **self.counts)
        return 1 if errors else 0


def main() -> None:
    cfg = json.loads(sys.argv[1])
    sys.exit(ShardWorker(cfg).run())


if __name__ == "__main__":
    main()
