"""Shared pieces of the reliability suite: scaling, deterministic values, the acknowledgement
log and its replay, store opening and memory measurement.

The acknowledgement log is the ground truth of the crash and race scenarios. A writer appends
an *intent* line (op id and the keys it changes) before each write and an *ack* line after the
call returned, fsyncing both. Keys are owned by one writer thread, so per key the operations
are sequential: after a crash the key must hold the state of its last acknowledged operation,
or that of the one operation after it that was in flight when the writer died.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import piecestore
from piecestore import PieceStore
from tests.conftest import BUCKET, s3_credentials

# PIECESTORE_SOAK=1 runs the long scenarios (soaks of SOAK_SECONDS, 300 by default);
# PIECESTORE_SOAK=<seconds> (10 or more) does the same with soaks that long.
_SOAK = os.environ.get("PIECESTORE_SOAK", "").strip()
SOAK = _SOAK not in ("", "0")
SOAK_SECONDS = float(_SOAK) if _SOAK.isdigit() and int(_SOAK) >= 10 else 300.0
REPO = Path(__file__).resolve().parents[2]

State = tuple[int, int] | None  # (op id, size) of a put, or None: absent


def scaled(ci: int, soak: int) -> int:
    """A count for the default (CI) run, or the larger one in soak mode."""
    return soak if SOAK else ci


def value_for(opid: int, key: str, size: int) -> bytes:
    """The bytes op ``opid`` writes under ``key``: anyone can recompute them from the log."""
    return hashlib.shake_256(f"{opid}\x00{key}".encode()).digest(size) if size else b""


def remote(url: str) -> bool:
    return url.startswith(("s3://", "minio://"))


def open_store(url: str, **overrides: Any) -> PieceStore:
    if remote(url):
        creds = s3_credentials()
        overrides.setdefault("s3_access_key", creds["access_key"])
        overrides.setdefault("s3_secret_key", creds["secret_key"])
    overrides.setdefault("engine_flush_linger_ms", 1.0)
    store = piecestore.open(url, **overrides)
    assert isinstance(store, PieceStore)
    return store


def s3_url(endpoint: str, bucket: str = BUCKET, prefix: str | None = None) -> str:
    prefix = prefix or f"rel-{uuid.uuid4().hex[:12]}"
    return f"s3://{bucket}/{prefix}?endpoint={endpoint}&region=us-east-1"


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


# -- the acknowledgement log ----------------------------------------------------------------


class AckLog:
    """Append-only, fsynced log of write intents and acknowledgements (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.lock = threading.Lock()

    def _write(self, obj: dict[str, Any]) -> None:
        line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        with self.lock:
            os.write(self.fd, line)
            os.fsync(self.fd)

    def intent(self, opid: int, changes: dict[str, int | None]) -> None:
        """Op ``opid`` is about to put (size) or delete (None) each key."""
        self._write({"i": opid, "c": {k: (-1 if v is None else v) for k, v in changes.items()}})

    def ack(self, opid: int) -> None:
        self._write({"a": opid})

    def note(self, **fields: Any) -> None:
        self._write(fields)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Replay:
    """What a log says each key may hold now."""

    acked: dict[str, State] = field(default_factory=dict)  # state after the last acked op
    maybe: dict[str, list[State]] = field(default_factory=dict)  # in-flight ops after it
    acked_ops: int = 0
    intents: int = 0
    notes: list[dict[str, Any]] = field(default_factory=list)

    def allowed(self, key: str) -> list[State]:
        return [self.acked.get(key), *self.maybe.get(key, [])]

    def keys(self) -> set[str]:
        return set(self.acked) | set(self.maybe)


def replay(path: str | Path) -> Replay:
    out = Replay()
    pending: dict[int, dict[str, State]] = {}
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return out
    lines = raw.split(b"\n")
    for line in lines[:-1]:  # a last line without newline was torn by the kill: ignore it
        obj = json.loads(line)
        if "i" in obj:
            opid = int(obj["i"])
            changes = {k: (None if v < 0 else (opid, v)) for k, v in obj["c"].items()}
            pending[opid] = changes
            out.intents += 1
            for key, state in changes.items():
                out.maybe.setdefault(key, []).append(state)
        elif "a" in obj:
            changes = pending.pop(int(obj["a"]))
            out.acked_ops += 1
            for key, state in changes.items():
                out.acked[key] = state
                out.maybe[key] = []  # one writer per key: everything before is settled
        else:
            out.notes.append(obj)
    return out


def matches(key: str, actual: bytes | None, state: State) -> bool:
    if state is None:
        return actual is None
    return actual is not None and actual == value_for(state[0], key, state[1])


@dataclass
class Verified:
    keys: int = 0  # keys checked
    acked_pieces: int = 0  # keys whose acknowledged state is a piece, read back byte-exact
    in_flight_landed: int = 0  # keys holding the state of an unacknowledged in-flight op


def verify_against(store: PieceStore, log: Replay, extra_keys: Iterable[str] = ()) -> Verified:
    """Every key holds an allowed state and the listing agrees; raises AssertionError otherwise."""
    keys = sorted(log.keys() | set(extra_keys))
    got = store.get_many(keys, missing="skip")
    result = Verified(keys=len(keys))
    bad: list[str] = []
    for key in keys:
        actual = got.get(key)
        allowed = log.allowed(key)
        if matches(key, actual, allowed[0]):
            if allowed[0] is not None:
                result.acked_pieces += 1
        elif any(matches(key, actual, s) for s in allowed[1:]):
            result.in_flight_landed += 1
        else:
            shown = None if actual is None else f"{len(actual)} bytes"
            bad.append(f"{key!r}: holds {shown}, allowed {allowed}")
    assert not bad, f"{len(bad)} keys hold a state no acknowledged write explains: {bad[:5]}"
    listed = {p.key for p in store.list()}
    assert listed == set(got), f"listing disagrees with reads: {sorted(listed ^ set(got))[:5]}"
    return result


def kill_at_write(store: PieceStore, at: int, *, after: bool) -> None:
    """SIGKILL this process at the ``at``-th write request of the store (put, delete,
    delete_many), just before it is sent or just after it returns: a crash at a chosen I/O."""
    backend = store.backend
    calls = 0
    lock = threading.Lock()

    def tick() -> None:
        nonlocal calls
        with lock:
            calls += 1
            if calls == at:
                os.kill(os.getpid(), signal.SIGKILL)

    for name in ("put", "delete", "delete_many"):
        original = getattr(backend, name)

        def wrapped(*a: Any, _original: Any = original, **kw: Any) -> Any:
            if not after:
                tick()
            result = _original(*a, **kw)
            if after:
                tick()
            return result

        setattr(backend, name, wrapped)
