"""The reshard mover: copy the pieces whose owner changes, then drop the stale copies.

Protocol (crash-safe; every step is idempotent, so calling ``reshard`` again with the same
targets resumes wherever a crash or an exception stopped it, as safely as a run that never
stopped):

1. Sweep: delete from every shard the keys it does not own under the current (stable) layout.
   Only a crash after step 4 leaves such copies; they must go before step 2, or one could
   reappear when the new layout makes its shard the owner again.
2. Publish the layout state "resharding" (previous = old targets, targets = new) to every old
   and new shard. From then on handles read new owner then previous owner, and write a moving
   key to the previous owner first, then to the new one (see ``piecestore.sharding.store``).
   Other processes pick the change up within their ``layout_check_seconds``; the mover waits
   ``grace_seconds`` so that none of them still writes by the old layout while keys move.
3. Copy: while resharding the previous owner is authoritative for every moving key (clients
   write and delete it first), so the mover makes each new owner match it. It lists every
   shard and takes each key whose owner changes that is held by its previous owner or by its
   new one; then, in bounded batches per (previous, new) owner, it reads the new owner, then
   a fresh view of the previous one, and copies what differs (put_many + flush) and deletes
   from the new owner what the previous owner no longer holds. Listing the new owners too is
   what makes a resumed run safe: a copy an interrupted run (or a client) left there may have
   been deleted or overwritten on the previous owner since, and would otherwise shadow that
   once the new layout is stable. After each batch the mover re-reads the previous owner;
   a key that changed there was written (or deleted) by a client meanwhile, and since clients
   write the previous owner first, re-applying what it now holds, until it stops changing,
   guarantees a copy never shadows a newer client write. (For writers in other processes this
   needs their writes and deletes to be durable in that order: buffered writes or an open
   batch() there can commit the new owner first; in this process the gate covers them.)
4. Publish the stable layout with the new targets (also to removed targets, so a config still
   naming one fails clearly), wait ``grace_seconds`` again, and sweep: every shard deletes the
   keys it no longer owns. A removed target thus keeps only tombstones and its layout object;
   its bucket or directory can be deleted by hand afterwards.

Resuming: a run that finds the layout resharding waits ``grace_seconds`` before step 3 (the
crash may have come right after step 2's publish); a sweep that finds stale copies (a crash
after step 4's publish) waits it before deleting. A run that finds the stable layout already
published completes step 4: it records the layout on shards a stopped publish did not reach
and sweeps. Removed targets it can do that for only through a handle that still has them open
(the one that ran the reshard): the stable layout no longer names them, so after a crash of
the process their pieces are left for deletion by hand; nothing reads them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from piecestore.errors import (
    AlreadyExistsError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
)
from piecestore.sharding.layout import ShardLayout
from piecestore.sharding.router import ShardTarget, coerce_targets, targets_fingerprint
from piecestore.store import PieceStore

if TYPE_CHECKING:
    from piecestore.sharding.store import ShardedStore, _Routing

__all__ = ["ReshardReport", "run_reshard", "sweep"]

_VERIFY_ROUNDS = 20
_DELETE_BATCH = 4096
_LIST_CHUNK = 2048

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ReshardReport:
    """What a reshard did. Counts are pieces; ``*_before``/``*_after`` are keyed by target identity."""

    old_targets: tuple[str, ...]
    new_targets: tuple[str, ...]
    layout_version: int  # of the stable layout written at the end
    keys_examined: int  # pieces listed on the old shards
    keys_moved: int  # pieces whose owner changed and that the new owner now holds
    keys_copied: int  # pieces written by this run (< keys_moved when resuming)
    bytes_moved: int  # bytes written to new owners by this run
    keys_deleted: int  # stale copies removed from shards that no longer own them
    # copies on new owners of pieces their previous owner no longer holds (deleted while the
    # move was interrupted or racing it), removed before they could shadow the delete
    keys_removed: int = 0
    counts_before: dict[str, int] = field(default_factory=dict)
    counts_after: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False  # an interrupted reshard was found and finished

    @property
    def moved_fraction(self) -> float:
        return self.keys_moved / self.keys_examined if self.keys_examined else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "moved_fraction": round(self.moved_fraction, 6)}


@dataclass
class _Move:
    key: str
    size: int
    src: PieceStore  # previous owner: authoritative while resharding
    dst: PieceStore  # new owner: made to match ``src``


@dataclass
class _Tally:
    moved: int = 0
    copied: int = 0
    removed: int = 0
    bytes: int = 0


def _chunks(it: Iterator[str], n: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def sweep(
    owner: ShardedStore, routing: _Routing, stores: Sequence[PieceStore], grace: float = 0.0
) -> tuple[dict[str, int], int]:
    """Delete from each store the keys ``routing`` does not give it; (kept per store, deleted).

    Safe in a stable layout once other handles have adopted it: readers and writers only touch
    owners. A caller that cannot know when the layout was published passes ``grace``: it is
    waited before the first delete, so only when stale copies are found (a reshard stopped
    after publishing it, maybe just before).
    """
    kept: dict[str, int] = {}
    deleted = 0
    waited = False
    for store in stores:
        store.refresh()
        doomed: list[str] = []
        count = 0
        for keys in _chunks((p.key for p in store.list()), _LIST_CHUNK):
            owners = routing.router.route_many(keys).tolist()
            for key, i in zip(keys, owners, strict=True):
                if routing.stores[i] is store:
                    count += 1
                else:
                    doomed.append(key)
        if doomed and not waited:
            _wait(grace)
            waited = True
        for start in range(0, len(doomed), _DELETE_BATCH):
            store.delete_many(doomed[start : start + _DELETE_BATCH])
        store.flush()
        kept[owner._identity(store)] = count
        deleted += len(doomed)
    return kept, deleted


def _plan(owner: ShardedStore, routing: _Routing) -> tuple[list[_Move], int, dict[str, int]]:
    """Every key whose owner changes that its previous owner or its new owner holds.

    Keys on previous owners are the pieces to copy. Keys on new owners are copies made earlier
    (by clients, or by a run that stopped before verifying them) that the previous owner may
    have deleted or overwritten since: they must be compared too, or a resumed run would let
    them shadow those changes. ``examined`` counts only the previous owners' keys.
    """
    assert routing.prev_router is not None and routing.prev_stores is not None
    moves: dict[str, _Move] = {}
    examined = 0
    counts: dict[str, int] = {}
    for store in routing.all_stores():
        store.refresh()
        listed = 0
        for chunk in _chunks_info(store):
            listed += len(chunk)
            keys = [k for k, _ in chunk]
            prev = routing.prev_router.route_many(keys).tolist()
            new = routing.router.route_many(keys).tolist()
            for (key, size), p, n in zip(chunk, prev, new, strict=True):
                src, dst = routing.prev_stores[p], routing.stores[n]
                if src is store:
                    examined += 1
                elif dst is not store:
                    continue  # neither owner's: a stale copy the final sweep deletes
                if src is not dst and (store is src or key not in moves):
                    moves[key] = _Move(key, size, src, dst)  # the source's size when it has one
        counts[owner._identity(store)] = listed
    return list(moves.values()), examined, counts


def _chunks_info(store: PieceStore) -> Iterator[list[tuple[str, int]]]:
    listing = ((p.key, p.size) for p in store.list())
    while chunk := list(itertools.islice(listing, _LIST_CHUNK)):
        yield chunk


def _batches(moves: list[_Move], max_keys: int, max_bytes: int) -> Iterator[list[_Move]]:
    """Moves grouped by (source, destination), cut at ``max_keys`` keys or ``max_bytes`` bytes."""
    groups: dict[tuple[int, int], list[_Move]] = {}
    for m in moves:
        groups.setdefault((id(m.src), id(m.dst)), []).append(m)
    for group in groups.values():
        batch: list[_Move] = []
        size = 0
        for m in group:
            if batch and (len(batch) >= max_keys or size + m.size > max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(m)
            size += m.size
        if batch:
            yield batch


def _apply(dst: PieceStore, puts: dict[str, bytes], gone: list[str]) -> None:
    if puts:
        dst.put_many(puts)
    if gone:
        dst.delete_many(gone)
    if puts or gone:
        dst.flush()


def _copy_batch(store: ShardedStore, batch: list[_Move], tally: _Tally) -> None:
    """Make the batch's new owner match its previous owner: copy what differs, drop what is gone.

    The new owner is read before a fresh view of the previous owner, so a key the former holds
    and the latter does not was deleted there (clients write the previous owner first): its
    copy is stale and is deleted. The verify rounds then catch client writes that raced this.
    """
    src, dst = batch[0].src, batch[0].dst
    keys = [m.key for m in batch]
    with store._gate.hold(keys):
        have = dst.get_many(keys, missing="skip")
        src.refresh()
        values = src.get_many(keys, missing="skip")
        puts = {k: v for k, v in values.items() if have.get(k) != v}
        gone = [k for k in have if k not in values]
        _apply(dst, puts, gone)
    tally.moved += len(values)
    tally.copied += len(puts)
    tally.removed += len(gone)
    tally.bytes += sum(len(v) for v in puts.values())
    # Verify against writers in other processes: they write the old owner first, so a key
    # that changed there since we read it may have had its newer value (or its delete)
    # undone by what we wrote.
    written: dict[str, bytes | None] = {**puts, **dict.fromkeys(gone)}
    for _round in range(_VERIFY_ROUNDS):
        if not written:
            return
        src.refresh()
        now = src.get_many(list(written), missing="skip")
        changed = {k: now.get(k) for k, v in written.items() if now.get(k) != v}
        if not changed:
            return
        with store._gate.hold(list(changed)):
            again = {k: v for k, v in changed.items() if v is not None}
            _apply(dst, again, [k for k, v in changed.items() if v is None])
        tally.bytes += sum(len(v) for v in again.values())
        written = changed
    raise ConflictError(
        f"{len(written)} pieces kept changing on {src.url} while being moved to {dst.url}; "
        "run the reshard again to resume"
    )


def _wait(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


def run_reshard(
    store: ShardedStore,
    new_targets: Sequence[ShardTarget | str],
    progress: Progress | None = None,
    *,
    grace_seconds: float | None = None,
    batch_keys: int = 512,
    batch_bytes: int = 32 * 1024 * 1024,
) -> ReshardReport:
    """Perform (or resume) the move to ``new_targets``; see the module docstring for the steps.

    ``grace_seconds`` is how long to wait after each layout change before moving or deleting
    anything: other handles adopt a new layout within their ``layout_check_seconds``, and see
    a shard's new commits within ``engine.refresh_interval_seconds``; a handle whose view of a
    new owner predates the copy must not yet see the old owner's delete. The default is the
    larger of the two (as configured here) plus one second; 0 is safe when no other handle
    has the store open.
    """
    started = time.monotonic()
    new = coerce_targets(new_targets)
    if batch_keys < 1 or batch_bytes < 1:
        raise ConfigError("batch_keys and batch_bytes must be >= 1")
    store._check_writable()
    if grace_seconds is None:
        refresh = max(store.settings.engine.refresh_interval_seconds, 0.0)
        grace_seconds = max(store.layout_check_seconds, refresh) + 1.0
    grace = grace_seconds
    with store._reshard_lock:
        for t in new:
            store._urls.setdefault(t.identity, t.url)
        store._reload_layout()
        current = store.layout
        deleted = 0
        if current.state == "stable":
            if targets_fingerprint(new) == current.fingerprint:
                # Nothing to move; a reshard stopped during or after its last publish left stale
                # copies, and maybe removed targets still recording it as running.
                routing = store._routing
                removed, rewritten = _finish_publish(store, current)
                kept, deleted = sweep(store, routing, routing.all_stores() + removed, grace)
                return ReshardReport(
                    old_targets=tuple(t.identity for t in current.targets),
                    new_targets=tuple(t.identity for t in current.targets),
                    layout_version=current.version,
                    keys_examined=sum(kept.values()),
                    keys_moved=0,
                    keys_copied=0,
                    bytes_moved=0,
                    keys_deleted=deleted,
                    counts_before=kept,
                    counts_after=kept,
                    seconds=time.monotonic() - started,
                    resumed=bool(deleted or rewritten),
                )
            moving = current.begin_reshard(new)
            added = _check_new_targets(store, current, new)
            routing = store._routing
            _, deleted = sweep(store, routing, routing.all_stores() + added, grace)
            store._publish(moving)
            _wait(grace)
            resumed = False
        else:
            if targets_fingerprint(new) != current.fingerprint:
                raise ConfigError(
                    f"a reshard to {', '.join(t.identity for t in current.targets)} is in progress "
                    f"(layout v{current.version}); finish it first with those targets, e.g. "
                    "store.reshard(store.layout.targets)"
                )
            moving = current
            resumed = True
            # The run that published this layout may have stopped before its grace period ran
            # out: handles still routing by the stable layout would write the previous owners
            # only, after the copy.
            _wait(grace)
        routing = store._routing
        moves, examined, before = _plan(store, routing)
        total = len(moves)
        if progress is not None:
            progress(0, total)
        tally = _Tally()
        done = 0
        for batch in _batches(moves, batch_keys, batch_bytes):
            _copy_batch(store, batch, tally)
            done += len(batch)
            if progress is not None:
                progress(done, total)
        final = moving.finish_reshard()
        old = [t.identity for t in moving.previous or ()]
        store._publish(final, also=old)
        _wait(grace)
        after_routing = store._routing
        involved = after_routing.all_stores() + [
            s for s in routing.all_stores() if not any(s is o for o in after_routing.all_stores())
        ]
        after, swept = sweep(store, after_routing, involved)
    return ReshardReport(
        old_targets=tuple(old),
        new_targets=tuple(t.identity for t in final.targets),
        layout_version=final.version,
        keys_examined=examined,
        keys_moved=tally.moved,
        keys_copied=tally.copied,
        bytes_moved=tally.bytes,
        keys_deleted=deleted + swept,
        keys_removed=tally.removed,
        counts_before=before,
        counts_after=after,
        seconds=time.monotonic() - started,
        resumed=resumed,
    )


def _check_new_targets(
    store: ShardedStore, current: ShardLayout, new: tuple[ShardTarget, ...]
) -> list[PieceStore]:
    """Open the targets being added; refuse one holding pieces of something else.

    A new target must be empty, or a shard this store removed earlier (it records an older
    layout of this store); the latter is swept clean before the move.
    """
    known = {t.identity for t in current.targets}
    added: list[PieceStore] = []
    for t in new:
        if t.identity in known:
            continue
        recorded = store._read_layouts([t.identity])[t.identity]
        if recorded is not None and recorded.version > current.version:
            raise ConflictError(
                f"target {t.identity!r} records a newer shard layout (v{recorded.version}) than this "
                f"store's (v{current.version}); it belongs to another store or another reshard ran"
            )
        with store._layout_lock:
            shard = store._stores.get(t.identity)
            if shard is None:
                shard = PieceStore(store._backend(t.identity), store.settings)
                store._stores[t.identity] = shard
        if recorded is None and next(iter(shard.list()), None) is not None:
            raise ConfigError(
                f"new shard target {t.identity!r} already holds pieces of another store; "
                "give an empty bucket or directory"
            )
        added.append(shard)
    return added


def _finish_publish(store: ShardedStore, current: ShardLayout) -> tuple[list[PieceStore], int]:
    """Complete step 4 for the shards this handle has open; (removed targets to sweep, rewritten).

    A final publish that stopped partway leaves some shards recording the reshard to
    ``current`` as running: record ``current`` there (compare-and-swap). A removed target
    (it reaches them last) still holds its pieces, also when the stop came before the final
    sweep; it is returned for the sweep. Only a handle that still has one open can find it:
    the stable layout no longer names it.
    """
    named = {t.identity for t in current.targets}
    removed: list[PieceStore] = []
    rewritten = 0
    with store._layout_lock:
        for ident, recorded in store._read_layouts(list(store._stores)).items():
            if recorded is None or recorded.fingerprint != current.fingerprint:
                continue
            if recorded.state == "resharding" and recorded.version + 1 == current.version:
                try:
                    store._write_layout(ident, current)
                except (AlreadyExistsError, PreconditionFailedError, NotFoundError):
                    continue  # it changed meanwhile: not this reshard's to finish
                rewritten += 1
            elif recorded.state != "stable" or recorded.version != current.version:
                continue  # an older layout, or another reshard's: not this one's to finish
            if ident not in named:
                removed.append(store._stores[ident])
    return removed, rewritten
