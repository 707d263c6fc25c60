"""A writer/reader/GC process for the crash and race scenarios.

    python -m tests.reliability.worker '<json config>'

Config keys: url, overrides, log (the acknowledgement log), seed, owner (key namespace),
opid_base, writers (threads), readers (threads), gc ("none" | "real" | "ahead": a clock one
hour ahead, so every orphan and pending delete is due), gc_loop (a thread that only runs GC),
stable (keys that must always read back exactly), duration (seconds, then a clean exit; None
runs until killed), selfkill_at (SIGKILL itself at that backend write call, before or after
it), keys (per writer thread), small_max.

Writers log an intent before and an ack after every write (see _support). Every read is
checked: a writer's own keys against what it knows, other keys against every value the log
says was ever written there, stable keys byte-exact. A wrong read is logged as a "bad" note.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import traceback
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from piecestore import NotFoundError, PieceStore
from piecestore.lease import GCBusyError
from tests.reliability._support import AckLog, State, kill_at_write, matches, open_store, replay, value_for


class LogTail:
    """Every (op id, size) the log ever announced per key, read incrementally."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pos = 0
        self.seen: dict[str, set[State]] = {}
        self.lock = threading.Lock()

    def update(self) -> None:
        with self.lock, open(self.path, "rb") as f:
            f.seek(self.pos)
            chunk = f.read()
            end = chunk.rfind(b"\n") + 1
            self.pos += end
            for line in chunk[:end].splitlines():
                obj = json.loads(line)
                if "i" in obj:
                    opid = int(obj["i"])
                    for k, v in obj["c"].items():
                        self.seen.setdefault(k, {None}).add(None if v < 0 else (opid, v))

    def plausible(self, key: str, actual: bytes | None) -> bool:
        for attempt in range(2):
            with self.lock:
                states = list(self.seen.get(key, {None}))
            if any(matches(key, actual, s) for s in states):
                return True
            if attempt == 0:
                self.update()
        return False


class Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg["seed"])
        self.log = AckLog(cfg["log"])
        self.tail = LogTail(cfg["log"])
        self.tail.update()
        self.prior = replay(cfg["log"])
        self.stop = threading.Event()
        self.counts = {"writes": 0, "reads": 0, "gc": 0, "gc_busy": 0, "gc_deleted": 0}
        self.count_lock = threading.Lock()
        self.store: PieceStore = open_store(cfg["url"], **cfg.get("overrides", {}))
        if cfg.get("selfkill_at"):
            kill_at_write(self.store, int(cfg["selfkill_at"]), after=self.rng.random() < 0.5)

    def bump(self, what: str, n: int = 1) -> None:
        with self.count_lock:
            self.counts[what] += n

    def bad(self, **detail: Any) -> None:
        self.log.note(bad=True, pid=os.getpid(), **detail)

    # -- writer threads ------------------------------------------------------------------
    def writer(self, t: int) -> None:
        cfg = self.cfg
        rng = random.Random(f"{cfg['seed']}-{t}")
        keys = [f"{cfg['owner']}t{t}/k{j:03d}" for j in range(int(cfg.get("keys", 60)))]
        known: dict[str, list[State]] = {k: self.prior.allowed(k) for k in keys}
        opid = int(cfg["opid_base"]) + t * 1_000_000
        small_max = int(cfg.get("small_max", 16384))

        def size() -> int:
            r = rng.random()
            if r < 0.05:
                return 0
            if r < 0.70:
                return rng.randint(1, 300)
            if r < 0.95:
                return rng.randint(300, 8000)
            return rng.randint(small_max + 1, 4 * small_max)

        while not self.stop.is_set():
            r = rng.random()
            opid += 1
            if r < 0.55:  # put / put_many / batch
                chosen = rng.sample(keys, rng.choice([1, 1, 2, 5, 12]))
                changes: dict[str, int | None] = {k: size() for k in chosen}
                self.log.intent(opid, changes)
                items = {k: value_for(opid, k, s) for k, s in changes.items() if s is not None}
                how = rng.random()
                if len(items) == 1 and how < 0.6:
                    ((k, v),) = items.items()
                    self.store.put(k, v)
                elif how < 0.85:
                    self.store.put_many(items)
                else:
                    with self.store.batch():
                        for k, v in items.items():
                            self.store.put(k, v)
                self.log.ack(opid)
                for k, s in changes.items():
                    known[k] = [None if s is None else (opid, s)]
                self.bump("writes")
            elif r < 0.65:  # delete / delete_many
                chosen = rng.sample(keys, rng.choice([1, 3]))
                self.log.intent(opid, dict.fromkeys(chosen))
                if len(chosen) == 1:
                    self.store.delete(chosen[0])
                else:
                    self.store.delete_many(chosen)
                self.log.ack(opid)
                for k in chosen:
                    known[k] = [None]
                self.bump("writes")
            elif r < 0.90:  # read back own keys: must hold what this thread knows
                chosen = rng.sample(keys, rng.choice([1, 4, 20]))
                if len(chosen) == 1:
                    try:
                        got = {chosen[0]: self.store.get(chosen[0])}
                    except NotFoundError:
                        got = {}
                else:
                    got = self.store.get_many(chosen, missing="skip")
                for k in chosen:
                    hit = [s for s in known[k] if matches(k, got.get(k), s)]
                    if not hit:
                        actual = got.get(k)
                        self.bad(key=k, allowed=known[k], got=None if actual is None else len(actual))
                    else:
                        known[k] = hit[:1]  # what was in flight has now settled
                self.bump("reads", len(chosen))
            elif r < 0.95:
                self.store.flush()
            elif cfg.get("gc", "none") != "none" and t == 0:
                self.run_gc()

    def run_gc(self) -> None:
        ahead = timedelta(hours=1) if self.cfg.get("gc") == "ahead" else None
        clock = (lambda: datetime.now(UTC) + ahead) if ahead is not None else None
        self.log.note(gc="start", pid=os.getpid())
        try:
            report = self.store.gc(clock=clock)
            self.bump("gc")
            self.bump("gc_deleted", report.deleted)
        except GCBusyError:
            self.bump("gc_busy")
        self.log.note(gc="end", pid=os.getpid())

    def gc_loop(self) -> None:
        while not self.stop.is_set():
            self.run_gc()
            self.stop.wait(0.2)

    # -- reader threads ------------------------------------------------------------------
    def reader(self, t: int) -> None:
        rng = random.Random(f"{self.cfg['seed']}-r{t}")
        stable: dict[str, list[int]] = self.cfg.get("stable", {})
        stable_keys = sorted(stable)
        while not self.stop.is_set():
            r = rng.random()
            if stable_keys and r < 0.5:
                chosen = rng.sample(stable_keys, rng.choice([1, 10, 50]))
                try:
                    got = (
                        {chosen[0]: self.store.get(chosen[0])}
                        if len(chosen) == 1
                        else self.store.get_many(chosen)
                    )
                except Exception as e:
                    self.bad(stable=chosen[:3], error=f"{type(e).__name__}: {e}")
                    continue
                for k in chosen:
                    opid, size = stable[k]
                    if got.get(k) != value_for(opid, k, size):
                        self.bad(stable=k, got=len(got.get(k) or b""))
                self.bump("reads", len(chosen))
            elif r < 0.95:
                owned = [k for k in self.tail.seen if k not in stable]
                if not owned:
                    self.tail.update()
                    time.sleep(0.01)
                    continue
                chosen = rng.sample(owned, min(len(owned), rng.choice([1, 10])))
                got = self.store.get_many(chosen, missing="skip")
                for k in chosen:
                    if not self.tail.plausible(k, got.get(k)):
                        self.bad(key=k, got=len(got.get(k) or b""), what="value never written")
                self.bump("reads", len(chosen))
            else:
                listed = {p.key for p in self.store.list()}
                missing = [k for k in stable_keys if k not in listed]
                if missing:
                    self.bad(listing_missing=missing[:3], count=len(missing))

    # -- the run -------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        threads: list[threading.Thread] = []
        errors: list[str] = []

        def guard(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except BaseException:
                errors.append(traceback.format_exc())
                self.log.note(error=traceback.format_exc()[-3000:], pid=os.getpid())
                self.stop.set()

        for t in range(int(cfg.get("writers", 1))):
            threads.append(threading.Thread(target=guard, args=(self.writer, t), daemon=True))
        for t in range(int(cfg.get("readers", 0))):
            threads.append(threading.Thread(target=guard, args=(self.reader, t), daemon=True))
        if cfg.get("gc_loop"):
            threads.append(threading.Thread(target=guard, args=(self.gc_loop,), daemon=True))
        print("READY", flush=True)
        for th in threads:
            th.start()
        duration = cfg.get("duration")
        self.stop.wait(None if duration is None else float(duration))
        self.stop.set()
        for th in threads:
            th.join(120)
        conflicts = self.store.manifests.conflicts
        self.store.close()
        self.log.note(done=os.getpid(), conflicts=conflicts, errors=len(errors), **self.counts)
        return 1 if errors else 0


def main() -> None:
    cfg = json.loads(sys.argv[1])
    os.chdir(Path(cfg["log"]).parent)
    sys.exit(Worker(cfg).run())


if __name__ == "__main__":
    main()
