"""Shared by the durability-hole tests and their worker processes (tests.reliability.holes_worker).

Values describe themselves: the first 8 bytes are the id of the operation that wrote them and
the rest is derived from (op id, key), so any reader can tell which operation a value it got
came from, and whether every byte is right, without asking anyone.

The history log is one JSON line per event, appended by every process (O_APPEND, one write a
line): ``{"i": op, "c": {key: size or -1 (delete)}, "p": process, "how": kind}`` before an
operation, ``{"a": op}`` once it returned (acknowledged), ``{"f": op, "e": error}`` if it
raised. Keys are owned by one writer thread, so per key the operations are sequential.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piecestore import CorruptionError, NotFoundError, PieceStore
from tests.reliability._procs import WorkerProc
from tests.reliability._support import open_store

HEADER = 8  # bytes of op id at the start of every value
State = tuple[int, int] | None  # (op id, size) of a put, or None: absent


def make_value(opid: int, key: str, size: int) -> bytes:
    """The bytes op ``opid`` puts under ``key`` (``size`` >= HEADER)."""
    assert size >= HEADER
    filler = hashlib.shake_256(f"{opid}\x00{key}".encode()).digest(size - HEADER)
    return opid.to_bytes(HEADER, "big") + filler


def value_opid(key: str, value: bytes) -> int | None:
    """The op that wrote ``value`` under ``key``, or None if the bytes are not exactly its value."""
    if len(value) < HEADER:
        return None
    opid = int.from_bytes(value[:HEADER], "big")
    return opid if make_value(opid, key, len(value)) == value else None


class Log:
    """The shared history log (thread-safe within a process; O_APPEND across processes)."""

    def __init__(self, path: str | Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def write(self, **obj: Any) -> None:
        line = (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()
        with self.lock:
            os.write(self.fd, line)

    def close(self) -> None:
        os.close(self.fd)


class SlowStream:
    """A file-like value whose every read() sleeps first: a slow upload (client or network)."""

    def __init__(self, data: bytes, delay: float) -> None:
        self.data = data
        self.pos = 0
        self.delay = delay
        self.reads = 0

    def read(self, n: int = -1) -> bytes:
        time.sleep(self.delay)
        self.reads += 1
        end = len(self.data) if n is None or n < 0 else min(len(self.data), self.pos + n)
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(self.data) + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos


# -- the parent's side -------------------------------------------------------------------


@dataclass
class Op:
    opid: int
    proc: str
    how: str
    changes: dict[str, State]
    t: float
    status: str = "open"  # "acked", "failed", or "open" (never finished)
    error: str = ""

    def describe(self, key: str) -> str:
        state = self.changes.get(key)
        what = "delete" if state is None else f"put {state[1]} bytes"
        err = f" ({self.error[:160]})" if self.error else ""
        return f"op {self.opid} [{self.proc}, {self.how}, {what}, {self.status}{err}]"


@dataclass
class History:
    ops: dict[int, Op] = field(default_factory=dict)
    by_key: dict[str, list[int]] = field(default_factory=dict)  # op ids in intent order
    notes: list[dict[str, Any]] = field(default_factory=list)

    @staticmethod
    def load(path: str | Path) -> History:
        h = History()
        for line in Path(path).read_bytes().splitlines():
            obj = json.loads(line)
            if "i" in obj:
                opid = int(obj["i"])
                changes = {k: (None if v < 0 else (opid, int(v))) for k, v in obj["c"].items()}
                h.ops[opid] = Op(
                    opid, str(obj.get("p", "?")), str(obj.get("how", "?")), changes, float(obj.get("t", 0))
                )
                for key in changes:
                    h.by_key.setdefault(key, []).append(opid)
            elif "a" in obj:
                h.ops[int(obj["a"])].status = "acked"
            elif "f" in obj:
                op = h.ops[int(obj["f"])]
                op.status, op.error = "failed", str(obj.get("e", ""))
            else:
                h.notes.append(obj)
        return h

    def allowed(self, key: str) -> tuple[State, list[Op], Op | None]:
        """(acknowledged state, ops in doubt after it, the op that acknowledged it)."""
        acked: State = None
        last: Op | None = None
        doubt: list[Op] = []
        for opid in self.by_key.get(key, []):
            op = self.ops[opid]
            if op.status == "acked":
                acked, last, doubt = op.changes[key], op, []
            else:
                doubt.append(op)
        return acked, doubt, last

    def counts(self) -> dict[str, int]:
        out = {"ops": len(self.ops), "acked": 0, "failed": 0, "open": 0}
        for op in self.ops.values():
            out[op.status] += 1
        return out

    def failures(self) -> list[Op]:
        return [op for op in self.ops.values() if op.status == "failed"]

    def problems(self) -> list[dict[str, Any]]:
        return [n for n in self.notes if n.get("bad") or n.get("error")]

    def done(self) -> list[dict[str, Any]]:
        return [n for n in self.notes if "done" in n]


def _matches(key: str, actual: bytes | None, state: State) -> bool:
    if state is None:
        return actual is None
    return actual is not None and actual == make_value(state[0], key, state[1])


def _shown(history: History, key: str, actual: bytes | BaseException | None) -> str:
    if actual is None:
        return "absent"
    if isinstance(actual, BaseException):
        return f"{type(actual).__name__}: {str(actual)[:200]}"
    opid = value_opid(key, actual)
    if opid is None:
        return f"{len(actual)} bytes no operation wrote (first 16: {actual[:16].hex()})"
    op = history.ops.get(opid)
    return f"the value of {op.describe(key) if op else f'unknown op {opid}'}"


@dataclass
class FinalCheck:
    keys: int = 0
    acked_pieces: int = 0  # keys whose acknowledged state is a piece, read back byte-exact
    acked_absent: int = 0  # keys whose acknowledged state is "deleted" (or never written): absent
    doubt_landed: int = 0  # keys holding the state of an op that raised
    lost: list[str] = field(default_factory=list)


def check_final(store: PieceStore, history: History, extra_keys: Iterable[str] = ()) -> FinalCheck:
    """Read every key one by one (so one lost piece does not hide the others) and compare it with
    the history: the latest acknowledged state, or that of an op after it that raised."""
    result = FinalCheck()
    keys = sorted(set(history.by_key) | set(extra_keys))
    present: set[str] = set()
    for key in keys:
        result.keys += 1
        actual: bytes | BaseException | None
        try:
            actual = store.get(key)
            present.add(key)
        except NotFoundError:
            actual = None
        except (CorruptionError, OSError) as e:
            actual = e
        acked, doubt, last = history.allowed(key)
        if not isinstance(actual, BaseException) and _matches(key, actual, acked):
            if acked is None:
                result.acked_absent += 1
            else:
                result.acked_pieces += 1
            continue
        if not isinstance(actual, BaseException) and any(
            _matches(key, actual, op.changes[key]) for op in doubt
        ):
            result.doubt_landed += 1
            continue
        expected = last.describe(key) if last is not None else "absent (never acknowledged)"
        also = f"; or one in doubt: {[op.describe(key) for op in doubt]}" if doubt else ""
        result.lost.append(f"{key!r}: expected {expected}{also}; got {_shown(history, key, actual)}")
    try:
        listed = {p.key for p in store.list()}
    except (CorruptionError, OSError) as e:
        result.lost.append(f"the listing fails: {type(e).__name__}: {str(e)[:300]}")
        return result
    if listed != present:
        result.lost.append(
            f"the listing disagrees with reads: listed only {sorted(listed - present)[:5]}, "
            f"read only {sorted(present - listed)[:5]}"
        )
    return result


@dataclass
class Observations:
    """What reader processes saw, checked against the history after the run."""

    checked: int = 0
    doubt_seen: int = 0  # values of ops that raised (they landed): allowed, counted
    bad: list[str] = field(default_factory=list)


def check_observations(history: History, paths: Iterable[Path]) -> Observations:
    out = Observations()
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            obs = json.loads(line)
            key, proc = obs["k"], obs["p"]
            out.checked += 1
            if "o" in obs:  # a value: the op that wrote it must have been acknowledged (or raised)
                op = history.ops.get(int(obs["o"]))
                state = op.changes.get(key, None) if op is not None else None
                if op is None or state is None or state[1] != obs["n"]:
                    out.bad.append(
                        f"{proc} read {key!r} ({obs['m']}): a value of op {obs['o']} "
                        f"({obs['n']} bytes) that no op wrote there"
                    )
                elif op.status == "failed":
                    out.doubt_seen += 1
                elif op.status != "acked":
                    out.bad.append(
                        f"{proc} read {key!r} ({obs['m']}): {op.describe(key)}, never acknowledged"
                    )
            elif "s" in obs:  # a listed size: some acknowledged (or raised) put of that size
                sizes = set()
                for opid in history.by_key.get(key, []):
                    put = history.ops[opid]
                    state = put.changes.get(key)
                    if put.status != "open" and state is not None:
                        sizes.add(state[1])
                if obs["s"] not in sizes:
                    out.bad.append(
                        f"{proc} listed {key!r} with {obs['s']} bytes; puts there: {sorted(sizes)}"
                    )
    return out


class HolesProc(WorkerProc):
    """A tests.reliability.holes_worker process; it starts its work when told ``go``."""

    MODULE = "tests.reliability.holes_worker"

    def __init__(self, cfg: dict[str, Any], workdir: Path, name: str) -> None:
        super().__init__(cfg, workdir, name, module=self.MODULE, stdin=True)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        super().close()


def run_procs(roles: list[dict[str, Any]], workdir: Path, *, duration: float) -> list[int]:
    """Start every role, wait until all are ready, let them run ``duration`` s; their exit codes."""
    procs = [HolesProc({**role, "duration": duration}, workdir, role["name"]) for role in roles]
    try:
        for p in procs:
            p.wait_ready()
        for p in procs:
            p.go()
        codes = [p.finish(duration + 120) for p in procs]
        failed = [(p.cfg["name"], c, p.stderr()[-2000:]) for p, c in zip(procs, codes, strict=True) if c != 0]
        assert not failed, f"worker processes failed: {failed}"
        return codes
    finally:
        for p in procs:
            p.kill()
            p.close()


def open_check_store(url: str, overrides: dict[str, Any]) -> PieceStore:
    """A fresh store for the final check: no cache, background compaction off."""
    return open_store(url, **{**overrides, "gc_auto_compact": False, "cache_memory_bytes": 0})
