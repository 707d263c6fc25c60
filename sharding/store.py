"""ShardedStore: one PieceStore per shard target behind the PieceStore API.

Keys are routed by the recorded layout's Router (weighted rendezvous hashing). Each shard is a
complete PieceStore with its own tables and manifest; many-key calls group keys by shard and
fan out on a pool sized to the shard count.

The layout is recorded in the store, not only in the config: every shard's backend holds the
same ``shard-layout.json`` (written with create / If-Match, so two writers cannot both win).
Opening compares it with the configured targets and raises LayoutMismatchError on any
difference, so a process started with another config fails instead of using the wrong shards.
A running handle re-reads the layout at least every ``layout_check_seconds`` (before its next
operation) and follows a reshard done by another process.

During a reshard (layout state "resharding", see ``piecestore.sharding.reshard``):

* reads go to a key's new owner first, then to its previous owner; a miss is read once more
  through views re-checked at that moment, so a read slower than the grace period (which the
  mover waits out before sweeping) cannot report a moved piece as absent;
* writes and deletes of a key whose owner changes go to the previous owner first and then to
  the new one. The mover copies from the previous owner, so with writes landing there first
  it can detect, by re-reading the previous owner after its copy, any client write that raced
  it, and re-apply that write; in this process a gate also keeps client writes of the keys of
  a batch being copied out of the way, so no reader here ever sees a copy shadow a newer write.
"""

from __future__ import annotations

import builtins
import contextlib
import heapq
import io
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, TypeVar

from piecestore.api import open_store_backend
from piecestore.backends import Backend, IfMatch
from piecestore.errors import (
    AlreadyExistsError,
    ConfigError,
    ConflictError,
    InvalidKeyError,
    InvalidValueError,
    NotFoundError,
    PreconditionFailedError,
    ReadOnlyError,
)
from piecestore.keys import check_key, check_value, read_some
from piecestore.manifest import MANIFEST_NAME
from piecestore.sharding.layout import LAYOUT_OBJECT, ShardLayout, check_matches
from piecestore.sharding.router import Router, ShardTarget, coerce_targets, targets_fingerprint
from piecestore.store import PieceInfo, PieceStore

if TYPE_CHECKING:
    from piecestore.settings import Settings
    from piecestore.sharding.reshard import ReshardReport

__all__ = [
    "LAYOUT_CHECK_SECONDS",
    "LAYOUT_OBJECT",
    "ShardedStore",
    "check_unsharded",
    "configured_targets",
    "read_layout",
]

#: The object, in every shard's backend next to manifest.json, that records the shard layout.
#: A handle re-reads the recorded layout at least this often (before its next operation).
LAYOUT_CHECK_SECONDS = 5.0
_LIST_CHUNK = 512
_OPEN_ATTEMPTS = 8

T = TypeVar("T")


def read_layout(backend: Backend) -> tuple[ShardLayout | None, str | None]:
    """The layout recorded in one backend and the etag of exactly those bytes; (None, None) if none."""
    try:
        data, meta = backend.get_with_meta(LAYOUT_OBJECT)
    except NotFoundError:
        return None, None
    return ShardLayout.from_json(data), meta.etag


def check_unsharded(backend: Backend) -> None:
    """Refuse to open one shard of a sharded store as a plain store (LayoutMismatchError).

    A plain PieceStore on a shard would see only that shard's share of the pieces, and its
    writes would land where sharded readers never look.
    """
    recorded, _ = read_layout(backend)
    if recorded is not None:
        check_matches(recorded, None)


def configured_targets(settings: Settings) -> tuple[ShardTarget, ...]:
    """The shard targets the settings name (explicit list or template + count), with weights."""
    urls = settings.shard_urls()
    weights = list(settings.sharding.weights) or [1.0] * len(urls)
    if len(weights) != len(urls):
        raise ConfigError(f"sharding.weights has {len(weights)} entries for {len(urls)} shards")
    return coerce_targets(ShardTarget(u, w) for u, w in zip(urls, weights, strict=True))


def _rank(layout: ShardLayout) -> tuple[int, str, str]:
    """Total order on layouts: newest version first; a tie (two reshards raced) broken stably."""
    prev = "" if layout.previous is None else targets_fingerprint(layout.previous)
    return layout.version, layout.fingerprint, prev


def _behind(found: ShardLayout | None, recorded: ShardLayout) -> bool:
    return found is None or _rank(found) != _rank(recorded)


def _involved(layout: ShardLayout) -> list[str]:
    """Identities of every shard that must record ``layout``: previous targets first."""
    idents = [t.identity for t in layout.previous or ()]
    idents += [t.identity for t in layout.targets if t.identity not in idents]
    return idents


@dataclass(frozen=True)
class _Routing:
    """An immutable routing snapshot, swapped whole so each operation sees one layout."""

    layout: ShardLayout
    router: Router
    stores: tuple[PieceStore, ...]  # by index into layout.targets
    prev_router: Router | None
    prev_stores: tuple[PieceStore, ...] | None

    def place(self, key: str) -> tuple[PieceStore, PieceStore | None]:
        """(new owner, previous owner if it differs) of one key."""
        owner = self.stores[self.router.route(key)]
        if self.prev_router is None or self.prev_stores is None:
            return owner, None
        prev = self.prev_stores[self.prev_router.route(key)]
        return owner, (None if prev is owner else prev)

    def place_many(self, keys: Sequence[str]) -> tuple[list[PieceStore], list[PieceStore | None]]:
        owners = [self.stores[i] for i in self.router.route_many(keys).tolist()]
        if self.prev_router is None or self.prev_stores is None:
            return owners, [None] * len(keys)
        prevs = [self.prev_stores[i] for i in self.prev_router.route_many(keys).tolist()]
        return owners, [None if p is o else p for o, p in zip(owners, prevs, strict=True)]

    def all_stores(self) -> list[PieceStore]:
        """New targets' stores, then previous-only ones, each once."""
        out = list(self.stores)
        for s in self.prev_stores or ():
            if not any(s is o for o in out):
                out.append(s)
        return out


class _WriteGate:
    """Orders this process's client writes against the mover and layout switches.

    Client writes register the keys they write. ``hold(keys)`` (the mover, one batch) waits
    for in-flight writes of those keys and blocks new ones until released; ``hold(None)`` (a
    layout switch) does the same for every key, so no write runs under a layout being replaced.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._writing: Counter[str] = Counter()
        self._writers = 0
        self._held: frozenset[str] | None = None
        self._all = False

    @contextlib.contextmanager
    def write(self, keys: Sequence[str]) -> Iterator[None]:
        with self._cond:
            while self._all or (self._held is not None and any(k in self._held for k in keys)):
                self._cond.wait()
            self._writers += 1
            self._writing.update(keys)
        try:
            yield
        finally:
            with self._cond:
                self._writers -= 1
                for k in keys:
                    left = self._writing[k] - 1
                    if left > 0:
                        self._writing[k] = left
                    else:
                        del self._writing[k]
                self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, keys: Iterable[str] | None) -> Iterator[None]:
        with self._cond:
            while self._all or self._held is not None:
                self._cond.wait()
            if keys is None:
                self._all = True
                while self._writers:
                    self._cond.wait()
            else:
                held = frozenset(keys)
                self._held = held
                while any(k in self._writing for k in held):
                    self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._all = False
                self._held = None
                self._cond.notify_all()


def _materialize(key: str, data: bytes | BinaryIO) -> bytes:
    """A stream can be written once; a value written to two shards must be bytes."""
    if isinstance(data, bytes):
        return data
    buf = io.BytesIO()
    while chunk := read_some(key, data, 1024 * 1024):  # b"" only at the end of the stream
        buf.write(chunk)
    return buf.getvalue()


class ShardedStore:
    """Pieces spread over several stores; the same API as PieceStore, plus ``reshard``.

    Thread-safe. Many-key calls (put_many, get_many, delete_many) are atomic per shard, not
    across shards: each shard commits its share of the keys on its own.
    """

    def __init__(
        self,
        settings: Settings,
        targets: Sequence[ShardTarget | str] | None = None,
        *,
        layout_check_seconds: float = LAYOUT_CHECK_SECONDS,
    ) -> None:
        configured = configured_targets(settings) if targets is None else coerce_targets(targets)
        self.settings = settings
        self.layout_check_seconds = layout_check_seconds
        self._urls: dict[str, str] = {t.identity: t.url for t in configured}
        self._backends: dict[str, Backend] = {}
        self._stores: dict[str, PieceStore] = {}
        self._etags: dict[str, str | None] = {}
        self._layout_lock = threading.RLock()
        self._reshard_lock = threading.Lock()
        self._gate = _WriteGate()
        self._closed = False
        self._pool = ThreadPoolExecutor(max(8, 2 * len(configured)), thread_name_prefix="piecestore-shard")
        try:
            layout = self._open_layout(configured)
            self._install(layout)
        except BaseException:
            self._close_all()
            raise

    @classmethod
    def open(cls, settings: Settings) -> ShardedStore:
        """Open the shards the settings name; LayoutMismatchError if the store records others."""
        return cls(settings)

    # -- layout recording ---------------------------------------------------------------
    def _backend(self, ident: str) -> Backend:
        backend = self._backends.get(ident)
        if backend is None:
            # A target known only from the recorded layout is opened by its identity (no secrets
            # in it): the settings' credentials apply.
            backend = open_store_backend(self._urls.get(ident, ident), self.settings)
            self._backends[ident] = backend
        return backend

    def _fan_out(self, fn: Callable[[T], Any], items: Sequence[T]) -> list[Any]:
        if len(items) <= 1:
            return [fn(i) for i in items]
        return list(self._pool.map(fn, items))

    def _read_layouts(self, idents: Sequence[str]) -> dict[str, ShardLayout | None]:
        for ident in idents:
            self._backend(ident)
        found = self._fan_out(lambda i: read_layout(self._backends[i]), idents)
        out: dict[str, ShardLayout | None] = {}
        for ident, (layout, etag) in zip(idents, found, strict=True):
            out[ident] = layout
            self._etags[ident] = etag
        return out

    def _write_layout(self, ident: str, layout: ShardLayout) -> None:
        etag = self._etags.get(ident)
        mode: Literal["create"] | IfMatch = "create" if etag is None else IfMatch(etag)
        meta = self._backend(ident).put(LAYOUT_OBJECT, layout.to_json(), mode=mode)
        self._etags[ident] = meta.etag

    def _has_pieces(self, ident: str) -> bool:
        return self._backend(ident).exists(MANIFEST_NAME)

    def _open_layout(self, configured: tuple[ShardTarget, ...]) -> ShardLayout:
        """Read, check and (if needed) create or repair the recorded layout."""
        read_only = self.settings.store.read_only
        for _attempt in range(_OPEN_ATTEMPTS):
            found = self._read_layouts([t.identity for t in configured])
            present = [lay for lay in found.values() if lay is not None]
            if not present:
                if any(self._fan_out(self._has_pieces, list(found))):
                    check_matches(None, configured)  # an unsharded store: raises
                layout = ShardLayout.initial(configured)
                if read_only:
                    return layout
                try:
                    for ident in _involved(layout):
                        self._write_layout(ident, layout)
                except (AlreadyExistsError, PreconditionFailedError):
                    continue  # another process is creating it: read what it wrote
                return layout
            recorded = max(present, key=_rank)
            check_matches(recorded, configured)
            extra = [i for i in _involved(recorded) if i not in found]
            found.update(self._read_layouts(extra))
            best = max((lay for lay in found.values() if lay is not None), key=_rank)
            if _rank(best) != _rank(recorded):
                check_matches(best, configured)
                recorded = best
            lagging = [i for i in _involved(recorded) if _behind(found[i], recorded)]
            if lagging and not read_only:
                try:  # an interrupted layout change: finish writing it
                    for ident in lagging:
                        self._write_layout(ident, recorded)
                except (AlreadyExistsError, PreconditionFailedError, NotFoundError):
                    continue
            return recorded
        raise ConflictError(
            f"the shard layout of {len(configured)} targets kept changing while opening; "
            "is another process resharding? retry"
        )

    def _install(self, layout: ShardLayout) -> None:
        """Open any missing shard stores and switch routing to ``layout``."""
        needed = [i for i in _involved(layout) if i not in self._stores]
        for ident in needed:
            self._backend(ident)
        opened = self._fan_out(lambda i: PieceStore(self._backends[i], self.settings), needed)
        self._stores.update(zip(needed, opened, strict=True))
        prev_router = layout.previous_router()
        routing = _Routing(
            layout=layout,
            router=layout.router(),
            stores=tuple(self._stores[t.identity] for t in layout.targets),
            prev_router=prev_router,
            prev_stores=None
            if layout.previous is None
            else tuple(self._stores[t.identity] for t in layout.previous),
        )
        with self._gate.hold(None):
            self._routing = routing
        self._layout_read_at = time.monotonic()

    def _reload_layout(self) -> None:
        """Re-read the recorded layout and adopt it if another process moved it on."""
        with self._layout_lock:
            current = self._routing.layout
            found = self._read_layouts(_involved(current))
            present = [lay for lay in found.values() if lay is not None]
            self._layout_read_at = time.monotonic()
            if not present:
                return
            best = max(present, key=_rank)
            if _rank(best) == _rank(current):
                return
            if best.version <= current.version:
                raise ConflictError(
                    f"the shard layout recorded in {self.url} (v{best.version}) conflicts with the one "
                    f"in use (v{current.version}): two reshards raced; reopen the store"
                )
            self._install(best)

    def _maybe_check_layout(self) -> None:
        if time.monotonic() - self._layout_read_at >= self.layout_check_seconds:
            with self._layout_lock:
                if time.monotonic() - self._layout_read_at >= self.layout_check_seconds:
                    self._reload_layout()

    def _publish(self, layout: ShardLayout, also: Iterable[str] = ()) -> None:
        """Record ``layout`` in every involved shard (compare-and-swap each), then route by it."""
        with self._layout_lock:
            idents = _involved(layout) + [i for i in also if i not in _involved(layout)]
            for ident in idents:
                try:
                    self._write_layout(ident, layout)
                except (AlreadyExistsError, PreconditionFailedError, NotFoundError) as e:
                    now = self._read_layouts([ident])[ident]
                    if now is None or _rank(now) != _rank(layout):
                        raise ConflictError(
                            f"the shard layout in {ident} changed while this process was updating it "
                            "(another reshard running?); nothing more was changed"
                        ) from e
            self._install(layout)

    # -- introspection --------------------------------------------------------------------
    def _identity(self, shard: PieceStore) -> str:
        for ident, s in self._stores.items():
            if s is shard:
                return ident
        return shard.url

    @property
    def layout(self) -> ShardLayout:
        """The layout in use (as recorded in the shards)."""
        return self._routing.layout

    @property
    def router(self) -> Router:
        return self._routing.router

    @property
    def shards(self) -> list[PieceStore]:
        """The shard stores of the current targets, in layout order."""
        return list(self._routing.stores)

    @property
    def url(self) -> str:
        targets = self._routing.layout.targets
        return f"sharded({len(targets)}: {', '.join(t.identity for t in targets)})"

    def __repr__(self) -> str:
        lay = self._routing.layout
        return f"ShardedStore({len(lay.targets)} shards, layout v{lay.version} {lay.state})"

    # -- writes -----------------------------------------------------------------------------
    def _check_writable(self) -> None:
        if self._closed:
            raise ReadOnlyError(f"{self.url} is closed")
        if self.settings.store.read_only:
            raise ReadOnlyError(f"cannot write: {self.url} is opened read-only; open it without read_only")

    def _routing_now(self) -> _Routing:
        if self._closed:
            raise ReadOnlyError(f"{self.url} is closed")
        self._maybe_check_layout()
        return self._routing

    def put(self, key: str, value: bytes | bytearray | memoryview | BinaryIO) -> PieceInfo:
        """Store a piece on its shard (on both owners while a reshard moves it)."""
        key = check_key(key)
        data = check_value(key, value)
        self._check_writable()
        self._maybe_check_layout()
        with self._gate.write([key]):
            owner, prev = self._routing.place(key)
            if prev is None:
                return owner.put(key, data)
            data = _materialize(key, data)
            prev.put(key, data)
            return owner.put(key, data)

    def put_many(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[PieceInfo]:
        """Store many pieces: all validated first, then one commit per shard, shards in parallel."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        checked = [(check_key(k), v) for k, v in pairs]
        values = [(k, check_value(k, v)) for k, v in checked]
        self._check_writable()
        if not values:
            return []
        self._maybe_check_layout()
        keys = [k for k, _ in values]
        infos: list[PieceInfo | None] = [None] * len(values)
        with self._gate.write(keys):
            owners, prevs = self._routing.place_many(keys)
            first: dict[int, list[tuple[str, bytes | BinaryIO]]] = {}
            second: dict[int, list[int]] = {}
            stores: dict[int, PieceStore] = {}
            for pos, ((key, data), owner, prev) in enumerate(zip(values, owners, prevs, strict=True)):
                if prev is not None:
                    data = _materialize(key, data)
                    values[pos] = (key, data)
                    stores[id(prev)] = prev
                    first.setdefault(id(prev), []).append((key, data))
                stores[id(owner)] = owner
                second.setdefault(id(owner), []).append(pos)
            if first:  # the previous owners first: see the module docstring
                self._fan_out(lambda sid: stores[sid].put_many(first[sid]), list(first))
            groups = list(second)
            results = self._fan_out(
                lambda sid: stores[sid].put_many([values[p] for p in second[sid]]), groups
            )
        for sid, got in zip(groups, results, strict=True):
            for pos, info in zip(second[sid], got, strict=True):
                infos[pos] = info
        return [i for i in infos if i is not None]

    def delete(self, key: str) -> None:
        """Delete a piece; deleting a missing piece is not an error."""
        self.delete_many([key])

    def delete_many(self, keys: Iterable[str]) -> None:
        checked = list(dict.fromkeys(check_key(k) for k in keys))
        self._check_writable()
        if not checked:
            return
        self._maybe_check_layout()
        with self._gate.write(checked):
            owners, prevs = self._routing.place_many(checked)
            first: dict[int, list[str]] = {}
            second: dict[int, list[str]] = {}
            stores: dict[int, PieceStore] = {}
            for key, owner, prev in zip(checked, owners, prevs, strict=True):
                if prev is not None:
                    stores[id(prev)] = prev
                    first.setdefault(id(prev), []).append(key)
                stores[id(owner)] = owner
                second.setdefault(id(owner), []).append(key)
            if first:
                self._fan_out(lambda sid: stores[sid].delete_many(first[sid]), list(first))
            self._fan_out(lambda sid: stores[sid].delete_many(second[sid]), list(second))

    def flush(self) -> None:
        """Everything put so far, on every shard, is durable when this returns."""
        self._fan_out(lambda s: s.flush(), self._routing.all_stores())

    @contextlib.contextmanager
    def batch(self) -> Iterator[ShardedStore]:
        """Within the block this thread's writes return at once; on exit every shard flushes."""
        with contextlib.ExitStack() as stack:
            for s in self._routing.all_stores():
                stack.enter_context(s.batch())
            yield self

    # -- reads ------------------------------------------------------------------------------
    def get(self, key: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Read a piece (or a range) from its shard; during a reshard, new owner then previous."""
        key = check_key(key)
        return self._read_one(key, lambda s: s.get(key, offset=offset, length=length))

    def _read_one(self, key: str, read: Callable[[PieceStore], T]) -> T:
        """``read`` on the key's owner (then previous owner); a miss is confirmed on fresh views.

        The layout and shard views were fresh when the call began, but a slow read (a busy
        process, a reshard copying beside it) can outlive the reshard's grace period: then a
        miss may only mean the piece moved. A miss is therefore read again, once, through views
        re-checked at that moment (no request unless a view has aged past its interval).
        """
        routing = self._routing_now()
        try:
            return self._read_placed(routing.place(key), read)
        except NotFoundError:
            return self._read_placed(self._routing_now().place(key), read)

    @staticmethod
    def _read_placed(placed: tuple[PieceStore, PieceStore | None], read: Callable[[PieceStore], T]) -> T:
        owner, prev = placed
        if prev is None:
            return read(owner)
        try:
            return read(owner)
        except NotFoundError:
            return read(prev)

    def get_many(
        self, keys: Iterable[str], *, missing: Literal["raise", "skip"] = "raise"
    ) -> dict[str, bytes]:
        """Read many pieces: one get_many per shard, shards in parallel; result in request order.

        Misses are read once more through re-checked views, as in ``get``.
        """
        wanted = list(dict.fromkeys(check_key(k) for k in keys))
        if missing not in ("raise", "skip"):
            raise InvalidValueError(f"missing must be 'raise' or 'skip', got {missing!r}")
        out: dict[str, bytes] = {}
        self._gather_routed(out, wanted, self._routing_now())
        if len(out) < len(wanted):
            self._gather_routed(out, [k for k in wanted if k not in out], self._routing_now())
        if missing == "raise" and len(out) < len(wanted):
            absent = [k for k in wanted if k not in out]
            shown = ", ".join(repr(k[:60]) for k in absent[:5])
            raise NotFoundError(
                f"{len(absent)} of {len(wanted)} pieces not found in {self.url}: {shown}"
                + (" ..." if len(absent) > 5 else "")
                + "; pass missing='skip' to get the others"
            )
        return {k: out[k] for k in wanted if k in out}

    def _gather_routed(self, out: dict[str, bytes], keys: builtins.list[str], routing: _Routing) -> None:
        """Read ``keys`` from their owners under ``routing``, then the misses from previous owners."""
        if not keys:
            return
        owners, prevs = routing.place_many(keys)
        self._gather(out, zip(keys, owners, strict=True))
        if routing.prev_router is not None:
            fallback = [(k, p) for k, p in zip(keys, prevs, strict=True) if p is not None and k not in out]
            self._gather(out, fallback)

    def _gather(self, out: dict[str, bytes], placed: Iterable[tuple[str, PieceStore]]) -> None:
        groups: dict[int, list[str]] = {}
        stores: dict[int, PieceStore] = {}
        for key, store in placed:
            stores[id(store)] = store
            groups.setdefault(id(store), []).append(key)
        for got in self._fan_out(lambda sid: stores[sid].get_many(groups[sid], missing="skip"), list(groups)):
            out.update(got)

    def head(self, key: str) -> PieceInfo:
        key = check_key(key)
        return self._read_one(key, lambda s: s.head(key))

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[PieceInfo]:
        """Pieces whose key starts with ``prefix``, sorted: a lazy merge of the shards' listings.

        Each shard contributes only the keys it owns (or, during a reshard, owned before), so a
        stale copy left on a shard by an interrupted reshard is never listed.
        """
        if not isinstance(prefix, str):
            raise InvalidKeyError(f"list prefix must be str, got {type(prefix).__name__}")
        routing = self._routing_now()
        sources = [self._owned(routing, s, s.list(prefix)) for s in routing.all_stores()]
        return self._merge(sources)

    @staticmethod
    def _merge(sources: builtins.list[Iterator[tuple[str, int, PieceInfo]]]) -> Iterator[PieceInfo]:
        last: str | None = None
        for key, _pref, info in heapq.merge(*sources, key=lambda t: (t[0], t[1])):
            if key != last:
                last = key
                yield info

    @staticmethod
    def _owned(
        routing: _Routing, store: PieceStore, listing: Iterator[PieceInfo]
    ) -> Iterator[tuple[str, int, PieceInfo]]:
        """(key, 0 if ``store`` is the owner / 1 if the previous owner, info), routed in chunks."""
        while chunk := list(itertools.islice(listing, _LIST_CHUNK)):
            keys = [p.key for p in chunk]
            owners, prevs = routing.place_many(keys)
            for info, owner, prev in zip(chunk, owners, prevs, strict=True):
                if owner is store:
                    yield info.key, 0, info
                elif prev is store:
                    yield info.key, 1, info

    # -- lifecycle ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """Pick up other processes' commits on every shard, and any change of the layout."""
        self._reload_layout()
        self._fan_out(lambda s: s.refresh(), self._routing.all_stores())

    def reshard(
        self,
        new_targets: Sequence[ShardTarget | str],
        progress: Callable[[int, int], None] | None = None,
        *,
        grace_seconds: float | None = None,
        batch_keys: int = 512,
        batch_bytes: int = 32 * 1024 * 1024,
    ) -> ReshardReport:
        """Move the pieces whose owner changes to ``new_targets``; see piecestore.sharding.reshard.

        Resumes an interrupted reshard when called again with the same targets.
        ``progress(done, total)`` is called after each copied batch of keys.
        """
        from piecestore.sharding.reshard import run_reshard

        return run_reshard(
            self,
            new_targets,
            progress,
            grace_seconds=grace_seconds,
            batch_keys=batch_keys,
            batch_bytes=batch_bytes,
        )

    def _close_all(self) -> None:
        stores = list(self._stores.values())
        opened = {id(s.backend) for s in stores}
        errors: list[BaseException] = []
        for s in stores:
            try:
                s.close()
            except Exception as e:  # close every shard even if one fails
                errors.append(e)
        for b in self._backends.values():
            if id(b) not in opened:
                b.close()
        self._pool.shutdown(wait=True)
        if errors:
            raise errors[0]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_all()

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
