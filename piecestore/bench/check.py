"""``run_check``: can this storage service hold a piecestore? One command, one table.

In the spirit of ``juicefs objbench``'s functional pass: every behaviour the piece engine and
the drivers rely on is exercised against the real service, under a throwaway prefix that is
removed afterwards: not-found answers, idempotent deletes, empty objects, awkward key names,
list order and pagination, ranges past the end, conditional create and If-Match (each also
raced by many writers), batch delete, large multipart uploads, and a piecestore end to end.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from piecestore.api import backend_options
from piecestore.backends import Backend, IfMatch, open_backend
from piecestore.bench.providers import join_url
from piecestore.errors import AlreadyExistsError, NotFoundError, PreconditionFailedError
from piecestore.settings import FLAT_KEYS, Settings, load_settings

MiB = 1024 * 1024
SPECIAL_NAMES = (
    "sp ace", "plus+sign", "per%cent", "q?x=1&y#z", "colon:semi;comma,", "tilde~bang!star*",
    "quote'paren()", "brackets[]{}", "at@dollar$eq=", "caret^pipe|back`tick", "ünïcödé/ключ/键",
    "emoji-\U0001f600", "tab\tname", "trailing.dot.", "-leading-dash", "many/nested/dirs/leaf",
)  # fmt: skip
ORDER_NAMES = ("a", "a b", "a-b", "a.b", "a/b", "a/c", "a0", "aB", "ab", "b", "é", "A")


class CheckFailed(Exception):
    """The service answered, but not as the piece engine needs."""


@dataclass(frozen=True, slots=True)
class CheckRow:
    feature: str
    ok: bool
    detail: str
    seconds: float


@dataclass
class CheckResult:
    url: str
    rows: list[CheckRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ok": self.ok,
            "seconds": round(self.seconds, 2),
            "rows": [
                {"feature": r.feature, "ok": r.ok, "detail": r.detail, "seconds": r.seconds}
                for r in self.rows
            ],
        }

    def render_table(self) -> Table:
        verdict = "[green]can hold a piecestore[/]" if self.ok else "[red]cannot hold a piecestore as is[/]"
        table = Table(title=f"provider check: {self.url} — {verdict}")
        table.add_column("Feature")
        table.add_column("Result")
        table.add_column("Detail")
        table.add_column("ms", justify="right")
        for r in self.rows:
            table.add_row(
                r.feature, "[green]ok[/]" if r.ok else "[red]FAIL[/]", r.detail, f"{r.seconds * 1000:.0f}"
            )
        return table


def _split_options(url: str, options: dict[str, Any]) -> tuple[Settings, dict[str, Any]]:
    """Setting names (s3_access_key, access_key, ...) go through the settings; the rest to the driver."""
    setting_kw = {k: v for k, v in options.items() if k in FLAT_KEYS}
    driver_kw = {k: v for k, v in options.items() if k not in FLAT_KEYS}
    settings = load_settings(store_url=url, **setting_kw)
    opts = backend_options(settings, url)
    opts.update(driver_kw)
    return settings, opts


def run_check(url: str, **options: Any) -> CheckResult:
    """Check a provider under ``<url>/piecestore-check-<random>/``; everything written is removed.

    ``options`` are setting names (``s3_access_key=...``) or driver options (``access_key=...``);
    ``large_bytes`` sets the size of the multipart upload (default: past two parts).
    """
    large_bytes = options.pop("large_bytes", None)
    root = join_url(url if "://" in url else "file://" + url, f"piecestore-check-{uuid.uuid4().hex[:10]}")
    result = CheckResult(url)
    t0 = time.perf_counter()
    settings, opts = _split_options(root, options)
    checker = _Checker(result)
    backend = checker.step("open the driver", lambda: _open(root, opts))
    if not isinstance(backend, Backend):
        result.seconds = time.perf_counter() - t0
        return result
    reached = False
    try:
        c = _Cases(backend, root, settings, opts, large_bytes)
        for n, (feature, fn) in enumerate(c.cases()):
            if n and not reached:  # the service never answered: one reason beats seventeen copies of it
                result.rows.append(CheckRow(feature, False, "not run: the first round trip failed", 0.0))
                continue
            checker.step(feature, fn)
            reached = True if n == 0 and result.rows[-1].ok else reached
    finally:
        if reached:
            checker.step("clean up (delete everything written)", lambda: _cleanup(backend))
        backend.close()
        result.seconds = time.perf_counter() - t0
    return result


def _open(root: str, opts: dict[str, Any]) -> tuple[Backend, str]:
    backend = open_backend(root, **opts)
    caps = backend.capabilities
    return backend, (
        f"{type(backend).__name__}; conditional create {'yes' if caps.conditional_create else 'NO'}, "
        f"If-Match {'yes' if caps.conditional_match else 'NO'}, batch delete "
        f"{caps.max_delete_batch if caps.batch_delete else 'no'}, multipart from "
        f"{caps.multipart_threshold // MiB if caps.multipart_upload else '-'} MiB"
    )


def _cleanup(backend: Backend) -> str:
    names = [m.name for m in backend.list()]
    backend.delete_many(names)
    left = [m.name for m in backend.list()]
    if left:
        raise CheckFailed(f"{len(left)} objects remain after delete_many, e.g. {left[:3]}")
    return f"deleted {len(names)} objects; the prefix lists empty"


class _Checker:
    def __init__(self, result: CheckResult) -> None:
        self.result = result

    def step(self, feature: str, fn: Callable[[], Any]) -> Any:
        """Run one case; a failure becomes a row and the next case still runs."""
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:
            detail = f"{type(e).__name__}: {e}"[:400]
            self.result.rows.append(CheckRow(feature, False, detail, time.perf_counter() - t0))
            return None
        value, detail = out if isinstance(out, tuple) else (None, out)
        self.result.rows.append(CheckRow(feature, True, str(detail), time.perf_counter() - t0))
        return value


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise CheckFailed(message)


def _raises(
    exc: type[BaseException] | tuple[type[BaseException], ...], fn: Callable[[], Any], what: str
) -> str:
    try:
        fn()
    except exc as e:
        return type(e).__name__
    raise CheckFailed(f"{what} did not raise {exc}")


class _Cases:
    """Each case returns a detail string, or raises with what went wrong."""

    def __init__(
        self, b: Backend, root: str, settings: Settings, opts: dict[str, Any], large_bytes: int | None
    ) -> None:
        self.b = b
        self.root = root
        self.settings = settings
        self.opts = opts
        caps = b.capabilities
        floor = 2 * caps.multipart_threshold + MiB + 123 if caps.multipart_upload else 0
        self.large = int(large_bytes) if large_bytes else max(12 * MiB + 123, floor)

    def cases(self) -> list[tuple[str, Callable[[], Any]]]:
        out: list[tuple[str, Callable[[], Any]]] = [
            ("put, get, head round trip", self.roundtrip),
            ("overwrite: new bytes, new etag", self.overwrite),
            ("empty objects", self.empty),
            ("not found: get, head, ranged get, get_with_meta", self.not_found),
            ("idempotent delete (missing, twice, batch)", self.idempotent_delete),
            ("special-character keys", self.special_keys),
            ("ranged reads (inside, past the end, many)", self.ranges),
            ("listing order (byte order, a vs a/b vs a-b)", self.list_order),
            ("list pagination (past one 1,000-key page)", self.pagination),
            ("batch delete (over 1,000 names, some missing)", self.batch_delete),
            ("conditional create (If-None-Match: *)", self.create),
            ("conditional create race: one winner of 16", self.create_race),
            ("If-Match compare-and-swap", self.if_match),
            ("If-Match race: one winner of 16", self.match_race),
            ("get_with_meta pairs bytes with their etag", self.get_with_meta),
            (f"large multipart upload ({self.large / MiB:.0f} MiB, streamed)", self.large_upload),
            ("piecestore end to end (packed + large pieces, reopen)", self.store_end_to_end),
        ]
        return out

    def roundtrip(self) -> str:
        meta = self.b.put("rt/obj", b"hello piecestore")
        _expect(meta.size == 16 and bool(meta.etag), f"put returned {meta}")
        _expect(self.b.get("rt/obj") == b"hello piecestore", "get returned other bytes")
        head = self.b.head("rt/obj")
        _expect(head.size == 16 and head.etag == meta.etag, f"head {head} differs from put {meta}")
        _expect(head.last_modified.tzinfo is not None, "last_modified has no timezone")
        return "read-after-write consistent; head matches put's size and etag"

    def overwrite(self) -> str:
        first = self.b.put("ow", b"one")
        second = self.b.put("ow", b"two")
        _expect(self.b.get("ow") == b"two", "overwrite not visible to the next read")
        _expect(first.etag != second.etag, "etag did not change with the bytes")
        return "ok"

    def empty(self) -> str:
        self.b.put("empty", b"")
        _expect(self.b.get("empty") == b"", "empty object read back non-empty")
        _expect(self.b.head("empty").size == 0, "empty object has a size")
        _expect(self.b.get_ranges("empty", [(0, 0)]) == [b""], "zero-length range of an empty object")
        return "stored, read and listed as 0 bytes"

    def not_found(self) -> str:
        kinds = {
            _raises(NotFoundError, lambda: self.b.get("nope"), "get of a missing object"),
            _raises(NotFoundError, lambda: self.b.head("nope"), "head of a missing object"),
            _raises(
                NotFoundError,
                lambda: self.b.get("nope", offset=5, length=10),
                "ranged get of a missing object",
            ),
            _raises(NotFoundError, lambda: self.b.get_with_meta("nope"), "get_with_meta of a missing object"),
        }
        _expect(not self.b.exists("nope"), "exists() says a missing object exists")
        return f"all raise {', '.join(sorted(kinds))}"

    def idempotent_delete(self) -> str:
        self.b.put("del/x", b"x")
        self.b.delete("del/x")
        self.b.delete("del/x")
        self.b.delete("del/never-was")
        self.b.delete_many(["del/never-1", "del/never-2"])
        _expect(not self.b.exists("del/x"), "deleted object still exists")
        return "missing objects delete without error"

    def special_keys(self) -> str:
        names = [f"sp/{n}" for n in SPECIAL_NAMES]
        for n in names:
            self.b.put(n, n.encode())
        wrong = [n for n in names if self.b.get(n) != n.encode()]
        _expect(not wrong, f"read back other bytes for {wrong[:3]}")
        listed = [m.name for m in self.b.list("sp/")]
        _expect(listed == sorted(names), f"listing differs: {sorted(set(listed) ^ set(names))[:4]}")
        return f"{len(names)} names round-trip and list exactly (space, %, +, ?, #, unicode, emoji, tab)"

    def ranges(self) -> str:
        data = bytes(range(256)) * 64
        n = len(data)
        self.b.put("rg", data)
        cases = {
            "inside": (self.b.get("rg", offset=10, length=20), data[10:30]),
            "open end": (self.b.get("rg", offset=100), data[100:]),
            "past the end (clipped)": (self.b.get("rg", offset=n - 5, length=100), data[-5:]),
            "starting past the end": (self.b.get("rg", offset=n + 10, length=5), b""),
            "zero length": (self.b.get("rg", offset=3, length=0), b""),
        }
        bad = [k for k, (got, want) in cases.items() if got != want]
        _expect(not bad, f"wrong bytes for: {', '.join(bad)}")
        spans = [(0, 10), (5000, 100), (20, 30), (n - 1, 1), (n - 3, 50)]
        got = self.b.get_ranges("rg", spans)
        _expect(got == [data[o : o + k] for o, k in spans], "get_ranges returned wrong slices")
        return "clipped at the end, empty past it; merged multi-range reads correct"

    def list_order(self) -> str:
        names = [f"ord/{n}" for n in ORDER_NAMES]
        for n in names:
            self.b.put(n, b"o")
        listed = [m.name for m in self.b.list("ord/")]
        _expect(listed == sorted(names), f"order {listed} is not byte order {sorted(names)}")
        sub = [m.name for m in self.b.list("ord/a")]
        want = sorted(n for n in names if n.startswith("ord/a"))
        _expect(sub == want, f"prefix 'ord/a' listed {sub}, expected {want}")
        return "sorted by name; prefixes are plain string prefixes"

    def pagination(self) -> str:
        names = [f"page/{i:05d}" for i in range(1100)]
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(lambda n: self.b.put(n, n.encode()), names))
        listed = [m.name for m in self.b.list("page/")]
        _expect(listed == names, f"listed {len(listed)} of {len(names)} (or out of order / duplicated)")
        part = [m.name for m in self.b.list("page/009")]
        _expect(part == [n for n in names if n.startswith("page/009")], "prefix within the pages is wrong")
        _expect(next(iter(self.b.list("page/00042"))).size == len(b"page/00042"), "listed size is wrong")
        return f"{len(listed)} objects listed once each, in order"

    def batch_delete(self) -> str:
        names = [m.name for m in self.b.list("page/")]
        self.b.delete_many([*names, *(f"page/missing-{i}" for i in range(200))])
        left = list(self.b.list("page/"))
        _expect(not left, f"{len(left)} objects survived delete_many")
        caps = self.b.capabilities
        how = f"batches of {caps.max_delete_batch}" if caps.batch_delete else "one request per name"
        return f"{len(names)} objects + 200 missing names deleted ({how})"

    def create(self) -> str:
        self.b.put("cc/key", b"first", mode="create")
        kind = _raises(
            AlreadyExistsError, lambda: self.b.put("cc/key", b"second", mode="create"), "second create"
        )
        _expect(self.b.get("cc/key") == b"first", "a refused create changed the object")
        return f"second create refused ({kind}); object unchanged"

    def create_race(self) -> str:
        def attempt(i: int) -> bool:
            try:
                self.b.put("cc/race", f"writer-{i}".encode(), mode="create")
            except AlreadyExistsError:
                return False
            return True

        with ThreadPoolExecutor(16) as ex:
            wins = list(ex.map(attempt, range(16)))
        _expect(sum(wins) == 1, f"{sum(wins)} of 16 concurrent creates succeeded; exactly one must")
        _expect(
            self.b.get("cc/race") == f"writer-{wins.index(True)}".encode(),
            "the winner's bytes are not stored",
        )
        return "exactly one create won; its bytes are stored"

    def if_match(self) -> str:
        v1 = self.b.put("cas", b"v1")
        v2 = self.b.put("cas", b"v2", mode=IfMatch(v1.etag))
        kind = _raises(
            PreconditionFailedError, lambda: self.b.put("cas", b"v3", mode=IfMatch(v1.etag)), "stale If-Match"
        )
        _expect(self.b.get("cas") == b"v2", "a refused If-Match write changed the object")
        self.b.put("cas", b"v4", mode=IfMatch(v2.etag))
        missing = lambda: self.b.put("cas-missing", b"x", mode=IfMatch(v1.etag))  # noqa: E731
        _raises((PreconditionFailedError, NotFoundError), missing, "If-Match on a missing object")
        _expect(not self.b.exists("cas-missing"), "If-Match on a missing object created it")
        return f"current etag accepted, stale refused ({kind}), missing object refused"

    def match_race(self) -> str:
        base = self.b.put("cas-race", b"base")

        def attempt(i: int) -> bool:
            try:
                self.b.put("cas-race", f"writer-{i}".encode(), mode=IfMatch(base.etag))
            except PreconditionFailedError:
                return False
            return True

        with ThreadPoolExecutor(16) as ex:
            wins = list(ex.map(attempt, range(16)))
        _expect(
            sum(wins) == 1,
            f"{sum(wins)} of 16 If-Match writers with the same etag succeeded; exactly one must",
        )
        _expect(
            self.b.get("cas-race") == f"writer-{wins.index(True)}".encode(),
            "the winner's bytes are not stored",
        )
        return "exactly one compare-and-swap won"

    def get_with_meta(self) -> str:
        first = self.b.put("gm", b"one")
        data, meta = self.b.get_with_meta("gm")
        _expect(data == b"one" and meta.etag == first.etag, "etag returned with the bytes is not put's etag")
        second = self.b.put("gm", b"two!", mode=IfMatch(meta.etag))
        data, meta = self.b.get_with_meta("gm")
        _expect(
            data == b"two!" and meta.etag == second.etag and meta.size == 4, "stale bytes or etag after CAS"
        )
        return "bytes and etag come from the same version"

    def large_upload(self) -> str:
        size = self.large
        block = hashlib.sha256(b"piecestore-check").digest() * (MiB // 32)
        data = (block * (size // len(block) + 1))[:size]
        data = data[: size - 8] + size.to_bytes(8, "big")  # not periodic at the very end
        t0 = time.perf_counter()
        meta = self.b.put("large/obj", io.BytesIO(data))
        put_s = time.perf_counter() - t0
        _expect(meta.size == size and self.b.head("large/obj").size == size, "size after upload is wrong")
        t0 = time.perf_counter()
        got = self.b.get("large/obj")
        get_s = time.perf_counter() - t0
        _expect(
            hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), "large object read back differs"
        )
        caps = self.b.capabilities
        edge = caps.multipart_threshold if caps.multipart_upload else 8 * MiB
        span = self.b.get("large/obj", offset=edge - 7, length=14)
        _expect(span == data[edge - 7 : edge + 7], "a range across a part boundary is wrong")
        parts = -(-size // caps.multipart_threshold) if caps.multipart_upload else 1
        return (
            f"{size:,} bytes in ~{parts} parts; PUT {size / put_s / 1e6:.0f} MB/s, "
            f"GET {size / get_s / 1e6:.0f} MB/s; sha256 equal; range across a part edge ok"
        )

    def store_end_to_end(self) -> str:
        from piecestore.api import open_with_settings

        url = join_url(self.root, "store")
        settings = self.settings.model_copy(
            update={"store": self.settings.store.model_copy(update={"url": url})}
        )
        small = {f"k/{i:04d}": hashlib.sha256(str(i).encode()).digest() * 32 for i in range(200)}
        big = hashlib.sha256(b"big").digest() * (3 * MiB // 32)
        with open_with_settings(settings) as store:
            store.put_many(small)
            store.put("big", big)
            _expect(store.get("k/0007") == small["k/0007"], "packed piece read back differs")
            store.delete("k/0000")
            tables = len(store.manifest.tables)
        with open_with_settings(settings) as again:
            got = again.get_many(list(small)[1:])
            _expect(got == {k: v for k, v in small.items() if k != "k/0000"}, "get_many after reopen differs")
            _expect(again.get("big") == big, "large piece read back differs after reopen")
            _expect(not again.exists("k/0000"), "deleted piece is back after reopen")
            listed = sum(1 for _ in again.list())
            _expect(listed == len(small), f"listed {listed} pieces, expected {len(small)}")
        with open_backend(url, **self.opts) as own:  # the store's own prefix, named as it wrote them
            own.delete_many([m.name for m in own.list()])
        return f"200 packed + 1 large piece written, read, deleted, listed after reopen; {tables} table files"
