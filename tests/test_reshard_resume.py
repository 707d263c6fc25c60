"""A resumed reshard is as safe as one that never stopped, wherever the interrupted run stopped.

While resharding, the previous owner of a moving key is authoritative (clients write and
delete it first). A run that stops after a copy landed but before verifying it can leave that
copy stale on the new owner: the key was deleted or overwritten on the previous owner while
the copy was in flight. The resumed run must find and fix such copies, or they come back as
soon as the new layout is stable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from piecestore.errors import ConflictError, NotFoundError
from piecestore.sharding import reshard as mover
from piecestore.sharding.layout import ShardLayout
from piecestore.sharding.store import ShardedStore, read_layout
from piecestore.store import PieceStore
from tests.test_reshard import Interrupt, _ident, assert_placed_by, holdings, interrupt_after, memory_targets
from tests.test_sharded_store import open_sharded, shard_urls

OnWrite = Callable[[int, list[str]], None]


def hook_writes(monkeypatch: pytest.MonkeyPatch, handle: ShardedStore, on_write: OnWrite) -> None:
    """Call ``on_write(n, keys)`` before the n-th put_many/delete_many on ``handle``'s shards.

    Only the mover writes through ``handle`` here, so these are its copies and deletes; the
    other handle's shard stores are other objects, so its writes (made from ``on_write``) pass.
    """
    calls = {"n": 0}

    def fire(store: PieceStore, keys: list[str]) -> None:
        if any(store is s for s in handle._stores.values()):
            calls["n"] += 1
            on_write(calls["n"], keys)

    real_put_many = PieceStore.put_many
    real_delete_many = PieceStore.delete_many

    def put_many(self: PieceStore, items: Any) -> Any:
        items = dict(items)
        fire(self, list(items))
        return real_put_many(self, items)

    def delete_many(self: PieceStore, keys: Any) -> None:
        keys = list(keys)
        fire(self, keys)
        real_delete_many(self, keys)

    monkeypatch.setattr(PieceStore, "put_many", put_many)
    monkeypatch.setattr(PieceStore, "delete_many", delete_many)


@contextlib.contextmanager
def other_handle(urls: list[str]) -> Iterator[ShardedStore]:
    """A handle standing for another process: its own shard stores, no shared gate, fresh views."""
    with open_sharded(urls, engine_refresh_interval_seconds=0) as b:
        b.layout_check_seconds = 0.0
        yield b


def records_layout(store: ShardedStore, urls: list[str], layout: ShardLayout) -> bool:
    """Whether every one of ``urls`` records exactly ``layout``."""
    return all(read_layout(store._backend(_ident(u)))[0] == layout for u in urls)


# -- the hole: a delete made while the copy was in flight -----------------------------------------


@pytest.mark.parametrize("resumer", ["same", "fresh"])
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_piece_deleted_under_an_unverified_copy_stays_deleted(
    kind: str,
    resumer: str,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mover reads a batch from the old owner; another process deletes three of its keys
    (old owner, then new owner); the copy lands on the new owner; the mover stops before its
    verify round. The resumed reshard (by the same handle, or a new one) must drop the stale
    copies: before the fix it only looked at keys still on old owners, so they came back."""
    urls = shard_urls(kind, request, tmp_path_factory, n=5)
    old, new = urls[:4], urls
    items = {f"d/{i:04d}": f"v{i}".encode() for i in range(400)}
    a = open_sharded(old)
    try:
        with other_handle(old) as b:
            a.put_many(items)
            b.refresh()
            doomed: list[str] = []

            def delete_under_the_copy(n: int, keys: list[str]) -> None:
                if n == 1:  # the mover has read these keys from the old owner already
                    doomed.extend(keys[:3])
                    b.delete_many(doomed)

            hook_writes(monkeypatch, a, delete_under_the_copy)
            monkeypatch.setattr(mover, "_VERIFY_ROUNDS", 0)  # stop right after the copy lands
            with pytest.raises(ConflictError):
                a.reshard(new, grace_seconds=0, batch_keys=50)
            monkeypatch.undo()
            assert a.layout.state == "resharding" and len(doomed) == 3
            held = holdings(a, new)
            assert set(doomed) <= held[new[4]]  # the stale copies did land on the new owner
            assert not set(doomed) & set().union(*(held[u] for u in old))

            if resumer == "fresh":
                a.close()
                a = open_sharded(new)
            report = a.reshard(new, grace_seconds=0)
            assert report.resumed and a.layout.state == "stable"
            expected = {k: v for k, v in items.items() if k not in doomed}
            for key in doomed:
                with pytest.raises(NotFoundError):
                    a.get(key)
                assert not a.exists(key)
            assert a.get_many(doomed, missing="skip") == {}
            assert [p.key for p in a.list()] == sorted(expected)
            assert a.get_many(list(expected)) == expected
            assert_placed_by(a, new, set(expected))
            b.refresh()
            assert b.get_many(list(items), missing="skip") == expected
            assert report.keys_removed == len(doomed)
            assert report.to_json()["keys_removed"] == len(doomed)
    finally:
        a.close()


# -- crashes at several points, against a model of another handle's writes -----------------------


class OtherProcess:
    """Writes through the other handle, mirrored in a dict model of what must be read back."""

    def __init__(self, b: ShardedStore, model: dict[str, bytes]) -> None:
        self.b = b
        self.model = model
        self.seen = set(model)
        self.first: list[str] = []  # the keys of the first mover write raced
        self.n = 0

    def put(self, items: dict[str, bytes]) -> None:
        self.b.put_many(items)
        self.model.update(items)
        self.seen.update(items)

    def delete(self, keys: list[str]) -> None:
        self.b.delete_many(keys)
        for k in keys:
            self.model.pop(k, None)

    def value(self, key: str) -> bytes:
        self.n += 1
        return f"{key}@{self.n}".encode()

    def race(self, keys: list[str]) -> None:
        """Under a mover write of ``keys``: delete some, overwrite some, add and touch others."""
        self.first = self.first or keys
        self.delete(keys[:3])
        self.put({k: self.value(k) for k in keys[3:6]})
        self.put({f"new/{self.n}/{i:02d}": self.value("new") for i in range(12)})
        others = [k for k in sorted(self.model, reverse=True) if k not in keys][:4]
        self.delete(others[:2])
        self.put({k: self.value(k) for k in others[2:]})

    def meanwhile(self) -> None:
        """While the reshard is stopped: re-create a deleted key, delete copied ones, add more."""
        first = self.first or sorted(self.model)[:10]
        self.put({first[0]: self.value(first[0])})
        self.delete(first[6:8])
        self.put({f"late/{i:02d}": self.value("late") for i in range(10)})
        self.delete(sorted(self.model)[100:103])

    @property
    def gone(self) -> list[str]:
        return sorted(self.seen - set(self.model))


def check_against_model(store: ShardedStore, other: OtherProcess, urls: list[str]) -> None:
    model = other.model
    assert [p.key for p in store.list()] == sorted(model)
    assert store.get_many(list(model)) == model
    assert other.gone and store.get_many(other.gone, missing="skip") == {}
    for key in other.gone:
        with pytest.raises(NotFoundError):
            store.get(key)
    assert_placed_by(store, urls, set(model))


def arm_crash(monkeypatch: pytest.MonkeyPatch, handle: ShardedStore, crash: str) -> Any:
    """Make the next reshard by ``handle`` stop at ``crash``; its progress callback (or None)."""
    if crash == "before_copy":
        return interrupt_after(0)
    if crash == "mid_copy":
        return interrupt_after(3)
    if crash in ("before_verify", "before_verify_twice"):
        monkeypatch.setattr(mover, "_VERIFY_ROUNDS", 0)
    elif crash == "final_publish":  # two shards record the stable layout, the others do not
        real = handle._write_layout
        written = {"n": 0}

        def write_layout(ident: str, layout: ShardLayout) -> None:
            if layout.state == "stable":
                written["n"] += 1
                if written["n"] > 2:
                    raise Interrupt("crash while publishing the final layout")
            real(ident, layout)

        monkeypatch.setattr(handle, "_write_layout", write_layout)
    elif crash == "final_sweep":
        real_sweep = mover.sweep
        calls = {"n": 0}

        def sweep(*args: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                raise Interrupt("crash before the final sweep")
            return real_sweep(*args)

        monkeypatch.setattr(mover, "sweep", sweep)
    return None


CRASHES = [
    "before_copy",
    "mid_copy",
    "before_verify",
    "before_verify_twice",
    "in_verify",
    "final_publish",
    "final_sweep",
]


@pytest.mark.parametrize("resumer", ["same", "fresh"])
@pytest.mark.parametrize("direction", ["grow", "shrink"])
@pytest.mark.parametrize("crash", CRASHES)
def test_a_resumed_reshard_matches_a_model_of_the_other_process(
    crash: str, direction: str, resumer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another handle deletes, overwrites and adds keys under the mover's first write (and
    under the first write of a resume that stops again), and more while the reshard is
    stopped; then the reshard is resumed. Every read must match the model, and every shard
    must hold exactly its keys, as after an uninterrupted run."""
    urls = memory_targets(5)
    old, new = (urls[:4], urls) if direction == "grow" else (urls, urls[:4])
    model = {f"m/{i:04d}": f"m{i}".encode() for i in range(600)}
    a = open_sharded(old)
    try:
        with other_handle(old) as b:
            a.put_many(model)
            b.refresh()
            other = OtherProcess(b, model)

            def race(n: int, keys: list[str]) -> None:
                if n == 1:
                    other.race(keys)
                elif n == 2 and crash == "in_verify":  # re-applying what the race changed
                    raise Interrupt("crash in the verify round")

            for _stop in range(2 if crash.endswith("_twice") else 1):
                hook_writes(monkeypatch, a, race)
                progress = arm_crash(monkeypatch, a, crash)
                with pytest.raises((Interrupt, ConflictError)):
                    a.reshard(new, progress, grace_seconds=0, batch_keys=25)
                monkeypatch.undo()
                other.meanwhile()

            if resumer == "fresh":
                a.close()
                a = open_sharded(new)
            report = a.reshard(new, grace_seconds=0)
            assert a.layout.state == "stable"
            check_against_model(a, other, new)
            b.refresh()
            check_against_model(b, other, new)
            assert records_layout(a, new, a.layout)
            stale = crash in ("before_verify", "before_verify_twice", "in_verify")
            assert (report.keys_removed > 0) == stale, report
            removed = urls[4]
            # Once the stable layout is recorded, a new process cannot know the removed target:
            # it sees nothing left to finish, and that target keeps its (unread) pieces.
            blind = resumer == "fresh" and direction == "shrink" and crash.startswith("final_")
            assert report.resumed or blind
            if direction == "shrink" and not blind:
                assert holdings(a, [removed])[removed] == set()
                assert records_layout(a, [removed], a.layout)
    finally:
        a.close()
