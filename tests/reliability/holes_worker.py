"""A writer, reader or GC process for the durability-hole and multi-process model tests.

    python -m tests.reliability.holes_worker '<json config>'

It opens the store, prints READY, waits for ``go`` on stdin, works for ``duration`` seconds
and exits. Config keys: role ("writer" | "reader" | "gc" | "litter"), name, url, overrides,
log (the shared history, see tests.reliability._holes), seed, duration, and per role:

* writer: owner (key prefix), opid_base, threads, keys (per thread), small_max, large_frac,
  ops (weights of put, put_many, delete, batch, slow, nap, flush, and verify: read own keys
  back), batch_sleep (seconds asleep inside ``store.batch()``, and per nap), stream_delay
  (seconds each read() of a slow stream sleeps), buffered (the store buffers writes: a put is
  acknowledged by the next flush, batch exit or close that returns), write_latency (seconds
  every backend put/put_parts of this process waits first: a slow network), pending_latency
  (seconds more for a compaction's pending-delete record, written between its uploads and its
  swap);
* reader: read_keys, prefixes, threads, obs (file of what it read: op id and size per key),
  refresh_every (seconds between manifest re-reads: views this old), read_pause (seconds
  between reads);
* gc: pause (seconds between passes), compact_every (compact on every n-th pass only; 0:
  never);
* litter: every (seconds between unreferenced objects it uploads, as crashed writers leave).

Every write is logged before (intent) and after (ack, or fail with the error). Readers log a
"bad" note at once for bytes no operation wrote; whether the op they saw was acknowledged is
judged by the parent after the run (an op may be committed before its call returns).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import threading
import time
import traceback
import uuid
from typing import Any

from piecestore import NotFoundError, PieceStore
from piecestore.lease import GCBusyError
from tests.reliability._holes import HEADER, Log, SlowStream, State, make_value, value_opid
from tests.reliability._support import open_store


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.name = str(cfg["name"])
        self.log = Log(cfg["log"])
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.count_lock = threading.Lock()
        self.store: PieceStore = open_store(cfg["url"], **cfg.get("overrides", {}))
        self.observed: set[tuple[Any, ...]] = set()
        self._count_compactions()
        if cfg.get("write_latency") or cfg.get("pending_latency"):
            self._add_write_latency(float(cfg.get("write_latency", 0)), float(cfg.get("pending_latency", 0)))

    def bump(self, what: str, n: int = 1) -> None:
        with self.count_lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def _count_compactions(self) -> None:
        """Count background compactions that wrote tables, and note the tables they wrote
        (wrappers in this process: the library is untouched)."""
        from piecestore import gc as gcmod

        collector = getattr(gcmod, "GarbageCollector", None)
        original = getattr(collector, "compact_tiered", None)
        if collector is None or original is None:
            return

        def counted(gc_self: Any, *a: Any, **kw: Any) -> Any:
            self.bump("compaction_attempts")
            try:
                report = original(gc_self, *a, **kw)
            except Exception as e:  # the store ignores it (the next commit tries again): note why
                self.bump("compaction_failures")
                self.log.write(compaction_failed=f"{type(e).__name__}: {e}"[:300], p=self.name)
                raise
            self.bump("compactions")
            self.bump("compacted_tables", int(getattr(report, "compacted_tables", 0) or 0))
            self.bump("compaction_outputs", int(getattr(report, "written_tables", 0) or 0))
            return report

        collector.compact_tiered = counted  # type: ignore[attr-defined]
        copy = getattr(gcmod, "copy_table", None)
        if copy is not None:  # note each table a compaction writes, to tell whose a lost one was

            def noted(*a: Any, **kw: Any) -> Any:
                table = copy(*a, **kw)
                self.log.write(compaction_output=getattr(table, "name", "?"), p=self.name)
                return table

            gcmod.copy_table = noted  # type: ignore[attr-defined]

    def _add_write_latency(self, seconds: float, pending: float) -> None:
        """Every write request of this process waits first, as over a slow network (the object's
        time stamp is still taken when it is written, after the wait); a compaction's
        pending-delete record, written between its uploads and its swap, waits ``pending``
        seconds more, as a compaction paced to yield to writers may."""
        backend = self.store.backend
        for name in ("put", "put_parts"):
            original = getattr(backend, name)

            def slow(*a: Any, _original: Any = original, **kw: Any) -> Any:
                target = str(a[0]) if a else str(kw.get("name", ""))
                time.sleep(seconds + (pending if target.startswith("gc/pending/") else 0.0))
                return _original(*a, **kw)

            setattr(backend, name, slow)

    # -- writers -------------------------------------------------------------------------
    def writer(self, t: int) -> None:
        cfg = self.cfg
        rng = random.Random(f"{cfg['seed']}-{t}")
        keys = [f"{cfg['owner']}t{t}/k{j:03d}" for j in range(int(cfg.get("keys", 12)))]
        small_max = int(cfg["small_max"])
        large_frac = float(cfg.get("large_frac", 0.4))
        weights: dict[str, float] = cfg.get("ops", {"put": 1.0})
        kinds, kind_weights = list(weights), list(weights.values())
        buffered = bool(cfg.get("buffered"))
        batch_sleep = float(cfg.get("batch_sleep", 0.0))
        stream_delay = float(cfg.get("stream_delay", 0.2))
        opid = int(cfg["opid_base"]) + t * 1_000_000
        unacked: list[int] = []  # buffered: returned, not yet made durable by a flush
        # What each own key may hold, as this thread knows it: the acknowledged state first,
        # then states in doubt (raised) or, on a buffered store, returned but not yet flushed.
        known: dict[str, list[State]] = {k: [None] for k in keys}
        pending: dict[int, dict[str, State]] = {}  # op id -> its changes, until acked or failed

        def large() -> int:
            return rng.randint(small_max + small_max // 20, small_max + small_max // 2)

        def size(force_large: bool = False) -> int:
            if force_large or rng.random() < large_frac:
                return large()
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
            )
            pending[opid] = {k: None if v is None else (opid, v) for k, v in changes.items()}
            return opid

        def ack(ops: list[int]) -> None:
            for op in ops:
                self.log.write(a=op)
                for k, state in pending.pop(op, {}).items():
                    known[k] = [state]
            self.bump("acked", len(ops))

        def fail(ops: list[int], e: BaseException) -> None:
            for op in ops:
                self.log.write(f=op, e=f"{type(e).__name__}: {e}"[:500])
                for k, state in pending.pop(op, {}).items():
                    known[k] = [*known[k], state]
            self.bump("failed", len(ops))

        def returned(ops: list[int]) -> None:
            """A call returned: acknowledged now, or by the next flush on a buffered store."""
            if buffered:
                unacked.extend(ops)
                for op in ops:  # read-your-writes shows it now; a failed background flush would not
                    for k, state in pending[op].items():
                        known[k] = [state, *known[k]]
            else:
                ack(ops)

        def verify() -> None:
            """Read own keys back: each must hold a state this thread knows it may hold."""
            chosen = rng.sample(keys, rng.choice([1, 4, len(keys)]))
            try:
                got = self.store.get_many(chosen, missing="skip")
            except Exception as e:
                self.log.write(bad=True, p=self.name, k=chosen[0], m="own get_many", n=len(chosen),
                               what=f"reading own keys failed: {type(e).__name__}: {e}"[:600])  # fmt: skip
                return
            for k in chosen:
                value = got.get(k)
                state: State = None if value is None else (value_opid(k, value) or -1, len(value))
                if state not in known[k]:
                    self.log.write(
                        bad=True,
                        p=self.name,
                        k=k,
                        m="own get_many",
                        got=state,
                        allowed=known[k],
                        what="own key holds a state this writer never left there",
                    )
            self.bump("verified", len(chosen))

        while not self.stop.is_set():
            kind = rng.choices(kinds, kind_weights)[0]
            self.bump(kind)
            if kind == "put":
                key = rng.choice(keys)
                op = intent({key: (s := size())}, "put")
                try:
                    self.store.put(key, make_value(op, key, s))
                except Exception as e:
                    fail([op], e)
                else:
                    returned([op])
            elif kind == "put_many":
                chosen = rng.sample(keys, rng.randint(2, 4))
                changes: dict[str, int | None] = {k: size() for k in chosen}
                op = intent(changes, "put_many")
                try:
                    self.store.put_many(
                        {k: make_value(op, k, s) for k, s in changes.items() if s is not None}
                    )
                except Exception as e:
                    fail([op], e)
                else:
                    returned([op])
            elif kind == "delete":
                chosen = rng.sample(keys, rng.choice([1, 2]))
                op = intent(dict.fromkeys(chosen), "delete")
                try:
                    if len(chosen) == 1:
                        self.store.delete(chosen[0])
                    else:
                        self.store.delete_many(chosen)
                except Exception as e:
                    fail([op], e)
                else:
                    returned([op])
            elif kind == "batch":
                # One op per put; a large piece first, so its object is the oldest at commit.
                chosen = rng.sample(keys, rng.randint(1, 3))
                ops = []
                try:
                    with self.store.batch():
                        for n, k in enumerate(chosen):
                            op = intent({k: (s := size(force_large=n == 0))}, "batch")
                            ops.append(op)
                            self.store.put(k, make_value(op, k, s))
                        self.stop.wait(batch_sleep)  # longer than the grace period
                except Exception as e:
                    fail(unacked + ops, e)
                    unacked.clear()
                else:
                    ack(unacked + ops)  # the batch's exit flushed everything
                    unacked.clear()
            elif kind == "slow":
                # put_many: a large piece uploaded first, then a slow stream, then the commit.
                first, second = rng.sample(keys, 2)
                s1, s2 = large(), large()
                op = intent({first: s1, second: s2}, "slow_put_many")
                try:
                    self.store.put_many(
                        {
                            first: make_value(op, first, s1),
                            second: SlowStream(make_value(op, second, s2), stream_delay),
                        }
                    )
                except Exception as e:
                    fail([op], e)
                else:
                    returned([op])
            elif kind == "verify":
                verify()
            elif kind == "nap":  # hold what a buffered store has not flushed past the grace period
                self.stop.wait(batch_sleep)
            elif kind == "flush":
                try:
                    self.store.flush()
                except Exception as e:
                    fail(unacked, e)
                else:
                    ack(unacked)
                unacked.clear()
        if unacked:
            try:
                self.store.flush()
            except Exception as e:
                fail(unacked, e)
            else:
                ack(unacked)

    # -- readers -------------------------------------------------------------------------
    def reader(self, t: int) -> None:
        rng = random.Random(f"{self.cfg['seed']}-r{t}")
        keys: list[str] = self.cfg["read_keys"]
        prefixes: list[str] = self.cfg.get("prefixes", [""])
        refresh_every = float(self.cfg.get("refresh_every", 0))  # 0: only when the store itself does
        pause = float(self.cfg.get("read_pause", 0))
        refreshed = time.monotonic()

        def saw(key: str, value: bytes | None, method: str) -> None:
            if value is None:
                return
            op = value_opid(key, value)
            if op is None:
                self.log.write(bad=True, p=self.name, k=key, m=method, n=len(value), what="bytes no op wrote")
                return
            with self.count_lock:
                self.observed.add((key, op, len(value), method))

        while not self.stop.is_set():
            if pause:
                self.stop.wait(pause)
            if refresh_every and t == 0 and time.monotonic() - refreshed > refresh_every:
                self.store.refresh()  # a view this old, then held again
                refreshed = time.monotonic()
            r = rng.random()
            method = ""
            key = ""
            chosen: list[str] = []
            try:
                if r < 0.3:
                    method, key = "get", rng.choice(keys)
                    with contextlib.suppress(NotFoundError):
                        saw(key, self.store.get(key), method)
                    self.bump("reads")
                elif r < 0.6:
                    method = "get_many"
                    chosen = rng.sample(keys, min(len(keys), rng.choice([2, 8, 24])))
                    key = chosen[0]
                    got = self.store.get_many(chosen, missing="skip")
                    for k, v in got.items():
                        saw(k, v, method)
                    self.bump("reads", len(chosen))
                elif r < 0.8:
                    method, key = "exists", rng.choice(keys)
                    self.store.exists(key)
                    self.bump("reads")
                else:
                    method, key = "list", rng.choice(prefixes)
                    for info in self.store.list(key):
                        with self.count_lock:
                            self.observed.add((info.key, None, info.size, method))
                    self.bump("lists")
            except Exception as e:
                # Again after a refresh: an error only a stale view shows (an object of a record
                # that was live when the view was read, reclaimed since) is told apart from a
                # piece that cannot be read at all.
                again: str | None = None
                try:
                    self.store.refresh()
                    if method == "list":
                        list(self.store.list(key))
                    elif method == "get_many":
                        self.store.get_many(chosen, missing="skip")
                    elif method == "get":
                        with contextlib.suppress(NotFoundError):
                            self.store.get(key)
                    else:
                        self.store.exists(key)
                except Exception as e2:
                    again = f"{type(e2).__name__}: {e2}"[:600]
                self.bump("read_errors" if again else "stale_read_errors")
                self.log.write(
                    read_error=f"{type(e).__name__}: {e}"[:600],
                    again=again,
                    p=self.name,
                    k=key,
                    m=method,
                    t=time.time(),
                )

    def dump_observations(self) -> None:
        path = self.cfg.get("obs")
        if not path:
            return
        with open(path, "w") as f:
            for key, op, size, method in sorted(self.observed, key=repr):
                obs: dict[str, Any] = {"k": key, "p": self.name, "m": method}
                if op is None:
                    obs["s"] = size
                else:
                    obs.update(o=op, n=size)
                f.write(json.dumps(obs) + "\n")

    # -- GC ------------------------------------------------------------------------------
    def gc_loop(self) -> None:
        pause = float(self.cfg.get("pause", 0.0))
        # 2: every other pass only reclaims (shorter passes); 0: it never compacts
        every = int(self.cfg.get("compact_every", 1))
        passes = 0
        while not self.stop.is_set():
            passes += 1
            try:
                report = self.store.gc(compact=every > 0 and passes % every == 0)
            except GCBusyError:
                self.bump("gc_busy")
            except Exception as e:
                self.bump("gc_errors")
                self.log.write(gc_error=f"{type(e).__name__}: {e}"[:600], p=self.name, t=time.time())
                self.stop.wait(0.05)
            else:
                self.bump("gc_runs")
                self.bump("gc_deleted", report.deleted)
                self.bump("gc_compacted_tables", report.compacted_tables)
            self.stop.wait(pause)

    # -- litter: what crashed writers leave behind ---------------------------------------
    def litter(self) -> None:
        """Upload an unreferenced large-piece object now and then, as a writer that died before
        its commit would: GC always has old orphans, so it announces sweeps all the time."""
        every = float(self.cfg.get("every", 0.1))
        while not self.stop.is_set():
            self.store.backend.put(f"blobs/{uuid.uuid4().hex}", os.urandom(1024))
            self.bump("littered")
            self.stop.wait(every)

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

        if role == "writer":
            targets = [(self.writer, t) for t in range(int(cfg.get("threads", 1)))]
        elif role == "reader":
            targets = [(self.reader, t) for t in range(int(cfg.get("threads", 1)))]
        elif role == "gc":
            targets = [(self.gc_loop,)]
        elif role == "litter":
            targets = [(self.litter,)]
        else:
            raise SystemExit(f"unknown role {role!r}")
        threads = [threading.Thread(target=guard, args=target, daemon=True) for target in targets]
        print("READY", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 2
        for th in threads:
            th.start()
        self.stop.wait(float(cfg["duration"]))
        self.stop.set()
        for th in threads:
            th.join(120)
        try:
            self.store.close()
        except Exception:
            errors.append(traceback.format_exc())
            self.log.write(error=traceback.format_exc()[-3000:], p=self.name)
        self.dump_observations()
        self.log.write(done=self.name, role=role, errors=len(errors), **self.counts)
        return 1 if errors else 0


def main() -> None:
    cfg = json.loads(sys.argv[1])
    sys.exit(Worker(cfg).run())


if __name__ == "__main__":
    main()
