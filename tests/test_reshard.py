"""Resharding: move only the keys whose owner changes, lose nothing under concurrent use, resume."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule

import piecestore
from piecestore.errors import ConfigError, LayoutMismatchError
from piecestore.sharding import Router
from piecestore.sharding.reshard import ReshardReport
from piecestore.sharding.router import strip_url_secrets
from piecestore.sharding.store import ShardedStore, read_layout
from tests.test_sharded_store import ShardedModel, open_sharded, shard_buckets, shard_urls
from tests.test_store_model import StoreModel

__all__ = ["shard_buckets"]  # the session fixture, shared with test_sharded_store


class Interrupt(Exception):
    """Raised from a progress callback to stop a reshard midway, like a crash."""


def memory_targets(n: int) -> list[str]:
    tag = uuid.uuid4().hex[:8]
    return [f"memory://rs-{tag}-{i}" for i in range(n)]


def holdings(store: ShardedStore, urls: list[str]) -> dict[str, set[str]]:
    """Live keys held by each shard store (by URL), read directly from the shards."""
    out: dict[str, set[str]] = {}
    for url in urls:
        shard = store._stores[_ident(url)]
        shard.refresh()
        out[url] = {p.key for p in shard.list()}
    return out


def _ident(url: str) -> str:
    return strip_url_secrets(url)


def assert_placed_by(store: ShardedStore, urls: list[str], keys: set[str]) -> None:
    """Every shard holds exactly the keys the router gives it, nothing else."""
    router = Router(urls)
    held = holdings(store, urls)
    for i, url in enumerate(urls):
        want = {k for k in keys if router.route(k) == i}
        assert held[url] == want, (
            f"shard {url}: {len(held[url] - want)} extra, {len(want - held[url])} missing"
        )


def check_moves(report: ReshardReport, n_keys: int, lo: float = 0.12, hi: float = 0.28) -> None:
    assert report.keys_examined >= n_keys
    assert lo <= report.moved_fraction <= hi, report


# -- 4 -> 5 under concurrent readers and a writer -----------------------------------------------


def run_under_load(
    store: ShardedStore,
    items: dict[str, bytes],
    reshard: Callable[[Callable[[int, int], None]], ReshardReport],
    warm_writes: int = 20,
) -> tuple[ReshardReport, dict[str, bytes], dict[str, int]]:
    """Reshard while readers loop over every key and a writer overwrites and adds keys.

    Returns the report, the writer's final values and counters (failures must stay 0).
    """
    stable = sorted(items)[: len(items) * 9 // 10]  # readers check these; the writer owns the rest
    hot = sorted(items)[len(items) * 9 // 10 :]
    written: dict[str, bytes] = {k: items[k] for k in hot}
    stats = {"reads": 0, "failed_reads": 0, "writes": 0, "stale_reads": 0, "reads_during_move": 0}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                batch = rng.sample(stable, min(40, len(stable)))
                got = store.get_many(batch, missing="skip")
                one = rng.choice(stable)
                single = store.get(one) if store.exists(one) else None
                bad = sum(got.get(k) != items[k] for k in batch) + (single != items[one])
                with lock:
                    stats["reads"] += len(batch) + 1
                    stats["failed_reads"] += bad
        except BaseException as e:  # surfaced below
            errors.append(e)

    def writer() -> None:
        rng = random.Random(7)
        n = 0
        try:
            while not stop.is_set():
                n += 1
                key = rng.choice(hot) if n % 3 else f"new/{n:06d}"
                value = f"{key}={n}".encode()
                store.put(key, value)
                written[key] = value
                if store.get(key) != value:  # read-your-writes, also while the key is moving
                    with lock:
                        stats["stale_reads"] += 1
                with lock:
                    stats["writes"] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    marks: list[int] = []

    def progress(done: int, total: int) -> None:
        with lock:
            marks.append(stats["reads"])

    try:
        while stats["writes"] < warm_writes and not errors:
            stop.wait(0.01)
        report = reshard(progress)
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    stats["reads_during_move"] = marks[-1] - marks[0]
    return report, written, stats


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_reshard_4_to_5_under_concurrent_reads_and_writes(
    kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    urls = shard_urls(kind, request, tmp_path_factory, n=5)
    old, new = urls[:4], urls
    items = {f"k/{i:05d}": os.urandom(64 + i % 200) for i in range(2000)}
    with open_sharded(old) as store:
        store.put_many(items)
        before = holdings(store, old)
        report, written, stats = run_under_load(
            store, items, lambda p: store.reshard(new, p, grace_seconds=0, batch_keys=40)
        )
        assert stats["failed_reads"] == 0 and stats["stale_reads"] == 0, stats
        assert stats["reads_during_move"] > 0, stats
        check_moves(report, len(items))
        final = {**items, **written}
        assert store.get_many(list(final)) == final
        assert [p.key for p in store.list()] == sorted(final)
        assert_placed_by(store, new, set(final))
        after = holdings(store, new)
        router = Router(new)
        for i, url in enumerate(old):  # an old shard lost exactly the keys whose owner changed
            assert before[url] - after[url] == {k for k in before[url] if router.route(k) != i}
        assert store.layout.state == "stable" and len(store.layout.targets) == 5
        # the sweep counted while the writer was still adding keys
        assert 0 < report.counts_after[_ident(new[4])] <= len(after[new[4]])
        print(
            f"\n{kind}: reshard 4->5 of {report.keys_examined} keys: moved {report.keys_moved} "
            f"({report.moved_fraction:.3f}), {report.bytes_moved} bytes, {report.seconds:.3f} s; "
            f"{stats['reads']} reads ({stats['reads_during_move']} during the move), {stats['writes']} writes"
        )
    with pytest.raises(LayoutMismatchError):
        open_sharded(old)
    with open_sharded(new) as store:
        assert store.get_many(list(final)) == final


def test_reshard_4_to_5_on_s3_buckets(request: pytest.FixtureRequest, tmp_path_factory: Any) -> None:
    urls = shard_urls("s3", request, tmp_path_factory, n=5)
    items = {f"s/{i:04d}": os.urandom(100) for i in range(200)}
    with open_sharded(urls[:4]) as store:
        store.put_many(items)
        report, written, stats = run_under_load(
            store, items, lambda p: store.reshard(urls, p, grace_seconds=0, batch_keys=20), warm_writes=5
        )
        assert stats["failed_reads"] == 0 and stats["stale_reads"] == 0, stats
        check_moves(report, len(items), 0.08, 0.35)
        final = {**items, **written}
        assert store.get_many(list(final)) == final
        assert_placed_by(store, urls, set(final))


def test_reshard_mixed_file_and_s3(request: pytest.FixtureRequest, tmp_path_factory: Any) -> None:
    urls = shard_urls("mixed", request, tmp_path_factory, n=4)
    items = {f"x/{i:04d}": os.urandom(50) for i in range(200)}
    with open_sharded(urls[:3]) as store:
        store.put_many(items)
        store.put("big", os.urandom(2 * 1024 * 1024 + 3))  # a large piece moves too (or stays)
        big = store.get("big")
        report = store.reshard(urls, grace_seconds=0)
        assert report.keys_examined == 201
        assert store.get_many(list(items)) == items and store.get("big") == big
        assert_placed_by(store, urls, {*items, "big"})


# -- 5 -> 4: removing a shard ---------------------------------------------------------------------


def test_reshard_5_to_4_removes_a_shard() -> None:
    urls = memory_targets(5)
    items = {f"r/{i:05d}": os.urandom(32) for i in range(2000)}
    with open_sharded(urls) as store:
        store.put_many(items)
        report = store.reshard(urls[:4], grace_seconds=0)
        check_moves(report, len(items))
        assert report.counts_after[urls[4]] == 0
        assert store.get_many(list(items)) == items
        assert_placed_by(store, urls[:4], set(items))
        removed = store._stores[urls[4]]
        assert list(removed.list()) == []
        recorded = read_layout(removed.backend)[0]  # a config still naming it fails clearly
        assert recorded is not None and [t.identity for t in recorded.targets] == urls[:4]
    with pytest.raises(LayoutMismatchError):
        open_sharded(urls)
    with open_sharded(urls[:4]) as store:
        assert len(list(store.list())) == len(items)
        # and back to 5: the removed shard is re-added after being swept
        report = store.reshard(urls, grace_seconds=0)
        assert store.get_many(list(items)) == items
        assert_placed_by(store, urls, set(items))


# -- interruption and resumption -----------------------------------------------------------------


def interrupt_after(batches: int) -> Callable[[int, int], None]:
    calls = {"n": 0}

    def progress(done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] > batches:
            raise Interrupt(f"stopped at {done}/{total}")

    return progress


def test_interrupted_reshard_resumes_and_loses_nothing() -> None:
    urls = memory_targets(5)
    old, new = urls[:4], urls
    items = {f"i/{i:05d}": os.urandom(40) for i in range(1500)}
    with open_sharded(old) as store:
        store.put_many(items)
        with pytest.raises(Interrupt):
            store.reshard(new, interrupt_after(3), grace_seconds=0, batch_keys=30)
        assert store.layout.state == "resharding"
        assert store.get_many(list(items)) == items  # new owner, then previous owner
        assert [p.key for p in store.list()] == sorted(items)
        # writes while interrupted land on both owners of a moving key
        items.update({f"i/{i:05d}": b"rewritten" for i in range(0, 1500, 7)})
        store.put_many({f"i/{i:05d}": b"rewritten" for i in range(0, 1500, 7)})
        store.delete_many([f"i/{i:05d}" for i in range(3, 1500, 11)])
        for i in range(3, 1500, 11):
            items.pop(f"i/{i:05d}", None)
        with pytest.raises(ConfigError, match="in progress"):
            store.reshard(urls[:3], grace_seconds=0)
    with pytest.raises(LayoutMismatchError, match="in progress"):
        open_sharded(old)
    with open_sharded(new) as store:  # "a process started later" finds the reshard half done
        assert store.layout.state == "resharding"
        assert store.get_many(list(items)) == items
        report = store.reshard(new, grace_seconds=0)
        assert report.resumed
        assert 0 < report.keys_copied < report.keys_moved
        check_moves(report, len(items))
        assert store.layout.state == "stable"
        assert store.get_many(list(items)) == items
        assert [p.key for p in store.list()] == sorted(items)
        assert_placed_by(store, new, set(items))
        again = store.reshard(new, grace_seconds=0)  # done: nothing more to move
        assert again.keys_moved == 0 and again.keys_deleted == 0


def test_crash_after_finish_leaves_stale_copies_that_a_rerun_sweeps() -> None:
    urls = memory_targets(5)
    items = {f"c/{i:04d}": os.urandom(20) for i in range(500)}
    with open_sharded(urls[:4]) as store:
        store.put_many(items)
        from piecestore.sharding import reshard as mover

        real = mover.sweep
        calls = {"n": 0}

        def crash_on_final_sweep(*args: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                raise Interrupt("crash before the final sweep")
            return real(*args)

        mover.sweep = crash_on_final_sweep  # type: ignore[assignment]
        try:
            with pytest.raises(Interrupt):
                store.reshard(urls, grace_seconds=0)
        finally:
            mover.sweep = real  # type: ignore[assignment]
        assert store.layout.state == "stable"
        assert [p.key for p in store.list()] == sorted(items)  # stale copies are not listed
        report = store.reshard(urls, grace_seconds=0)
        assert report.keys_moved == 0 and 0.12 * 500 <= report.keys_deleted <= 0.28 * 500
        assert_placed_by(store, urls, set(items))


# -- other handles and other processes -----------------------------------------------------------


def test_another_handle_follows_the_reshard() -> None:
    """A handle that is not resharding keeps reading everything, thanks to the grace periods.

    ``b`` re-reads the layout and its shards' manifests every 0.2 s; the mover waits 0.5 s
    after each layout change, so ``b`` never routes by a layout or shard view that is too old
    (and a read that outlasts that anyway reads its misses again through fresh views).
    """
    urls = memory_targets(5)
    items = {f"h/{i:04d}": os.urandom(30) for i in range(1000)}
    with (
        open_sharded(urls[:4]) as a,
        open_sharded(urls[:4], engine_refresh_interval_seconds=0.2) as b,
    ):
        b.layout_check_seconds = 0.2
        a.put_many(items)
        b.refresh()
        failures: list[str] = []
        reads = {"n": 0}
        stop = threading.Event()

        def reader() -> None:
            rng = random.Random(1)
            while not stop.is_set():
                keys = rng.sample(sorted(items), 50)
                got = b.get_many(keys, missing="skip")
                failures.extend(k for k in keys if got.get(k) != items[k])
                reads["n"] += 1

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            a.reshard(urls, grace_seconds=0.5, batch_keys=100)
            stop.wait(0.3)
        finally:
            stop.set()
            thread.join()
        assert failures == [] and reads["n"] > 10
        assert b.get_many(list(items)) == items
        assert b.layout.fingerprint == a.layout.fingerprint and b.layout.state == "stable"
        b.put("from-b", b"1")
        a.refresh()
        assert a.get("from-b") == b"1"


@pytest.mark.parametrize("call", ["get_many", "get", "head"])
def test_a_read_that_outlives_the_grace_period_still_finds_moved_pieces(call: str) -> None:
    """A read that began before a whole reshard (grace 0) and ends after its sweep: no miss.

    ``b`` routes by the old layout; its first read of an old shard stalls while ``a`` reshards
    and sweeps, then past ``b``'s check intervals. The miss it finds must be read again through
    re-checked views, which send it to the new owner.
    """
    urls = memory_targets(5)
    items = {f"s/{i:04d}": os.urandom(20) for i in range(400)}
    with (
        open_sharded(urls[:4]) as a,
        open_sharded(urls[:4], engine_refresh_interval_seconds=0.1) as b,
    ):
        b.layout_check_seconds = 0.1
        a.put_many(items)
        b.refresh()
        moving = [k for k in items if Router(urls).route(k) == 4]
        stalled = threading.Lock()
        done = threading.Event()
        for shard in b.shards:
            real = getattr(shard, call)

            def stall_once(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                with stalled:
                    if not done.is_set():
                        a.reshard(urls, grace_seconds=0)
                        threading.Event().wait(0.3)  # b's views age past their intervals
                        done.set()
                return _real(*args, **kwargs)

            setattr(shard, call, stall_once)
        if call == "get_many":
            assert b.get_many(list(items)) == items
        elif call == "get":
            assert b.get(moving[0]) == items[moving[0]]
        else:
            assert b.head(moving[0]).size == len(items[moving[0]])
        assert done.is_set() and a.layout.state == "stable"
        assert moving[0] not in holdings(a, urls)[urls[Router(urls[:4]).route(moving[0])]]


def test_a_racing_writer_elsewhere_is_not_shadowed_by_the_copy() -> None:
    """Another process overwrites keys between the mover's read and its write: it must win.

    Handle ``b`` stands for the other process (its own shard stores, no shared gate). It writes
    new values exactly while the mover is about to put its (now stale) copies.
    """
    urls = memory_targets(5)
    items = {f"w/{i:04d}": b"old" for i in range(600)}
    with open_sharded(urls[:4]) as a, open_sharded(urls[:4]) as b:
        b.layout_check_seconds = 0.0
        a.put_many(items)
        with pytest.raises(Interrupt):
            a.reshard(urls, interrupt_after(0), grace_seconds=0)
        b.refresh()
        assert b.layout.state == "resharding"
        target = a._stores[urls[4]]
        real_put_many = target.put_many
        raced: dict[str, bytes] = {}

        def put_many_after_a_race(batch: Any) -> Any:
            pairs = dict(batch)
            if not raced:  # the first copy: b writes newer values under the mover's feet
                raced.update({k: b"newer" for k in list(pairs)[:10]})
                b.put_many(raced)
                b.delete_many(list(pairs)[10:15])
            return real_put_many(batch)

        target.put_many = put_many_after_a_race  # type: ignore[method-assign]
        a.reshard(urls, grace_seconds=0)
        a.refresh()
        gone = [k for k in list(items) if k not in raced and not a.exists(k)]
        assert raced and all(a.get(k) == b"newer" for k in raced)
        assert len(gone) == 5  # the deletes won too
        b.refresh()
        assert all(b.get(k) == b"newer" for k in raced)


# -- refusals -------------------------------------------------------------------------------------


def test_a_new_target_holding_foreign_pieces_is_refused() -> None:
    urls = memory_targets(5)
    with piecestore.open(urls[4]) as foreign:
        foreign.put("theirs", b"x")
    with open_sharded(urls[:4]) as store:
        store.put("k", b"v")
        with pytest.raises(ConfigError, match="already holds pieces"):
            store.reshard(urls, grace_seconds=0)
        assert store.layout.state == "stable" and store.get("k") == b"v"
    with piecestore.open(urls[4]) as foreign:
        assert foreign.get("theirs") == b"x"


def test_reshard_refuses_read_only() -> None:
    urls = memory_targets(5)
    with open_sharded(urls[:4]) as s:
        s.put("k", b"v")
    with open_sharded(urls[:4], store_read_only=True) as ro, pytest.raises(piecestore.ReadOnlyError):
        ro.reshard(urls, grace_seconds=0)


# -- the model, with reshards (and interrupted ones) between the operations ---------------------


class ReshardingModel(ShardedModel):
    """ShardedModel plus a rule that reshards to another subset of five targets (or starts to:
    an interrupted reshard leaves the store resharding until the rule runs again and resumes)."""

    def _open(self, **kw: Any) -> Any:
        if not hasattr(self, "pool"):  # the first open: four of the five targets
            self.pool = [*self.url, self.url[0][:-1] + "4"]
        return super()._open(**kw)

    @rule(data=st.data(), interrupt=st.booleans())
    def reshard(self, data: st.DataObject, interrupt: bool) -> None:
        store: ShardedStore = self.store  # type: ignore[assignment]
        if store.layout.state == "resharding":
            new = self.url  # resume the interrupted one
        else:
            size = data.draw(st.integers(2, 5))
            new = sorted(data.draw(st.permutations(self.pool))[:size])
            if set(new) == set(self.url):
                return
        progress = interrupt_after(0) if interrupt and store.layout.state == "stable" else None
        with contextlib.suppress(Interrupt):
            store.reshard(new, progress, grace_seconds=0, batch_keys=3)
        self.url = new


def resharding_memory() -> tuple[list[str], Any]:
    return memory_targets(5)[:4], lambda: None


def resharding_files() -> tuple[list[str], Any]:
    root = tempfile.mkdtemp(prefix="piecestore-reshard-model-")
    return [f"file://{root}/s{i}" for i in range(4)], lambda: shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("factory", [resharding_memory, resharding_files], ids=["memory", "file"])
def test_resharding_store_matches_dict_model(factory: Any) -> None:
    init = {"__init__": lambda self: StoreModel.__init__(self, factory)}
    machine = type("Machine", (ReshardingModel,), init)
    runner = settings(
        max_examples=20, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )(machine)
    runner.TestCase().runTest()
