"""ShardedStore: the PieceStore API tests and model test on four shards, and the recorded layout.

The store-level tests of tests/test_store.py are imported and run here against a ``store``
fixture that is a ShardedStore over 4 memory stores, 4 directories, 4 buckets on the real S3
server, and a mixed set (2 directories + 2 buckets).
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule

import piecestore
from piecestore import NotFoundError, PieceStore, ReadOnlyError
from piecestore.api import open_store_backend
from piecestore.errors import ConfigError, LayoutMismatchError
from piecestore.localserver import LocalS3Server
from piecestore.settings import load_settings
from piecestore.sharding import ShardLayout
from piecestore.sharding.store import LAYOUT_OBJECT, ShardedStore, check_unsharded, read_layout
from tests.conftest import s3_credentials
from tests.test_store import test_bad_keys as test_bad_keys
from tests.test_store import test_bad_values as test_bad_values
from tests.test_store import test_keys_at_the_limits as test_keys_at_the_limits
from tests.test_store import test_large_pieces_are_streamed_and_verified as test_large_pieces
from tests.test_store import test_list_sorted_prefix_and_sizes as test_list_sorted_prefix_and_sizes
from tests.test_store import test_overwrite_newest_wins_across_tables as test_overwrite_newest_wins
from tests.test_store import test_put_get_head_exists_delete as test_put_get_head_exists_delete
from tests.test_store import test_put_many_get_many as test_put_many_get_many
from tests.test_store_model import StoreModel, memory_url

KINDS = ["memory", "file", "s3", "mixed"]
# Kinds per test: validation happens before any I/O, and layout logic does not depend on the
# driver, so those run locally (plus one mixed run); S3 time goes to the behaviour that does.
LOCAL_ONLY = {
    "test_bad_keys",
    "test_bad_values",
    "test_keys_at_the_limits",
    "test_get_many_missing_and_order",
}
NOT_ON_S3 = {"test_other_targets_fail_clearly", "test_opening_one_shard_unsharded_is_refused"}
NOT_MIXED = {
    "test_concurrent_puts",
    "test_two_handles_see_each_other_after_refresh",
    "test_overwrite_newest_wins",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kind" in metafunc.fixturenames:
        name = metafunc.definition.name
        kinds = ["memory", "file"] if name in LOCAL_ONLY else KINDS
        kinds = [k for k in kinds if not (k == "s3" and name in NOT_ON_S3)]
        kinds = [k for k in kinds if not (k == "mixed" and name in NOT_MIXED)]
        metafunc.parametrize("kind", kinds)


@pytest.fixture(scope="session")
def shard_buckets(s3_server: LocalS3Server) -> list[str]:
    """Five buckets pieces-<uuid8>-0..4 for the session; each test uses fresh prefixes in them.

    Why not new buckets per test: SeaweedFS gives each bucket its own volumes, so bucket
    creation is slow and a few dozen of them exhaust the test server.
    """
    tag = uuid.uuid4().hex[:8]
    names = [f"pieces-{tag}-{i}" for i in range(5)]
    for name in names:
        s3_server.make_bucket(name)
    return [f"s3://{name}/{{prefix}}?endpoint={s3_server.endpoint}&region=us-east-1" for name in names]


def shard_urls(
    kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, n: int = 4
) -> list[str]:
    """``n`` fresh, empty shard targets of one kind; on S3 one per bucket, under a fresh prefix."""
    tag = uuid.uuid4().hex[:8]
    if kind == "memory":
        return [f"memory://shard-{tag}-{i}" for i in range(n)]
    files = ["file://" + str(tmp_path_factory.mktemp(f"shard{i}")) for i in range(n)]
    if kind == "file":
        return files
    buckets: list[str] = request.getfixturevalue("shard_buckets")
    s3 = [b.format(prefix=f"t-{tag}") for b in buckets[:n]]
    if kind == "s3":
        return s3
    return [files[i] if i % 2 == 0 else s3[i] for i in range(n)]  # mixed


def open_sharded(urls: list[str], **overrides: Any) -> ShardedStore:
    if any(u.startswith("s3://") for u in urls):
        creds = s3_credentials()
        overrides.setdefault("s3_access_key", creds["access_key"])
        overrides.setdefault("s3_secret_key", creds["secret_key"])
    overrides.setdefault("engine_flush_linger_ms", 1.0)
    store = piecestore.open(shards=urls, **overrides)
    assert isinstance(store, ShardedStore)
    return store


@pytest.fixture
def urls(kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return shard_urls(kind, request, tmp_path_factory)


@pytest.fixture
def store(urls: list[str]) -> Iterator[ShardedStore]:
    with open_sharded(urls) as s:
        yield s


# -- the same API behaviour as PieceStore (imported tests run on the fixture above) -----------


def test_pieces_spread_over_all_shards(store: ShardedStore) -> None:
    items = {f"s/{i}": str(i).encode() for i in range(400)}
    store.put_many(items)
    counts = [len(list(s.list())) for s in store.shards]
    assert sum(counts) == 400 and min(counts) > 50
    for s in store.shards:  # each key is on exactly the shard the router names
        for p in s.list():
            assert store.shards[store.router.route(p.key)] is s


def test_reopen_sees_everything(urls: list[str]) -> None:
    with open_sharded(urls) as s:
        s.put_many({f"r/{i}": str(i).encode() for i in range(100)})
        s.put("r/x", b"x")
        s.delete("r/5")
    with open_sharded(list(reversed(urls))) as s:  # target order does not matter
        assert s.get("r/x") == b"x" and s.get("r/99") == b"99" and not s.exists("r/5")
        assert len(list(s.list("r/"))) == 100


def test_concurrent_puts(store: ShardedStore) -> None:
    def worker(t: int) -> None:
        for i in range(20):
            store.put(f"t{t}/{i}", f"{t}:{i}".encode())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert len(list(store.list("t"))) == 8 * 20
    assert store.get("t7/19") == b"7:19"


def test_two_handles_see_each_other_after_refresh(urls: list[str]) -> None:
    with open_sharded(urls) as a, open_sharded(urls, engine_refresh_interval_seconds=3600) as b:
        a.put_many({f"shared/{i}": b"1" for i in range(20)})
        b.refresh()
        assert b.get_many([f"shared/{i}" for i in range(20)]) == {f"shared/{i}": b"1" for i in range(20)}
        a.put("later", b"3")
        b.refresh()
        assert b.get("later") == b"3"


def test_batch_and_buffered_writes(urls: list[str]) -> None:
    with open_sharded(urls) as s:
        with s.batch():
            for i in range(100):
                s.put(f"b/{i}", b"v")
        assert len(list(s.list("b/"))) == 100
    with open_sharded(urls, store_buffered_writes=True) as s:
        s.put("buf", b"1")
        assert s.get("buf") == b"1"
        s.flush()
    with open_sharded(urls) as s:
        assert s.get("buf") == b"1"


def test_read_only_refuses_writes(urls: list[str]) -> None:
    with open_sharded(urls) as s:
        s.put("k", b"v")
    with open_sharded(urls, store_read_only=True) as ro:
        assert ro.get("k") == b"v"
        with pytest.raises(ReadOnlyError):
            ro.put("k2", b"v")
        with pytest.raises(ReadOnlyError):
            ro.delete_many(["k"])


def test_get_many_missing_and_order(store: ShardedStore) -> None:
    store.put_many({f"m/{i}": bytes([i]) for i in range(30)})
    keys = [f"m/{i}" for i in reversed(range(30))]
    assert list(store.get_many(keys)) == keys
    with pytest.raises(NotFoundError, match="1 of 3 pieces"):
        store.get_many(["m/1", "nope", "m/2"])
    with pytest.raises(piecestore.InvalidValueError):
        store.get_many(["m/1"], missing="ignore")  # type: ignore[arg-type]


# -- the recorded layout -----------------------------------------------------------------------


def test_layout_is_recorded_in_every_shard(urls: list[str], kind: str) -> None:
    with open_sharded(urls) as s:
        layouts = [read_layout(shard.backend)[0] for shard in s.shards]
    assert all(lay is not None and lay.to_json() == layouts[0].to_json() for lay in layouts)  # type: ignore[union-attr]
    first = layouts[0]
    assert first is not None and first.state == "stable" and first.version == 1
    assert first.fingerprint == s.layout.fingerprint


def test_other_targets_fail_clearly(urls: list[str], tmp_path: Path) -> None:
    with open_sharded(urls) as s:
        s.put("k", b"v")
    with pytest.raises(LayoutMismatchError, match="recorded but missing from the configuration"):
        open_sharded(urls[:3])
    with pytest.raises(LayoutMismatchError, match="configured but not in the recorded layout"):
        open_sharded([*urls, "file://" + str(tmp_path / "extra")])
    with pytest.raises(LayoutMismatchError, match="weight changed"):
        open_sharded(urls, sharding_weights=[1, 1, 1, 2])
    with open_sharded(urls) as s:  # nothing was changed by the refused opens
        assert s.get("k") == b"v"


def test_opening_one_shard_unsharded_is_refused(urls: list[str]) -> None:
    with open_sharded(urls) as s:
        s.put("k", b"v")
    settings = load_settings(
        s3_access_key=s3_credentials()["access_key"], s3_secret_key=s3_credentials()["secret_key"]
    )
    backend = open_store_backend(urls[0], settings)
    try:
        with pytest.raises(LayoutMismatchError, match="configuration has no sharding"):
            check_unsharded(backend)
    finally:
        backend.close()


def test_an_unsharded_store_is_not_taken_for_a_shard() -> None:
    tag = uuid.uuid4().hex[:8]
    with piecestore.open(f"memory://plain-{tag}") as plain:
        plain.put("k", b"v")
        check_unsharded(plain.backend)  # no layout: fine
    with pytest.raises(LayoutMismatchError, match="store is not sharded"):
        piecestore.open(shards=[f"memory://plain-{tag}", f"memory://other-{tag}"])


def test_template_and_count() -> None:
    tag = uuid.uuid4().hex[:8]
    with piecestore.open(f"memory://tpl-{tag}-{{shard}}", shards=4) as s:
        assert isinstance(s, ShardedStore)
        assert [t.identity for t in s.layout.targets] == [f"memory://tpl-{tag}-{i}" for i in range(4)]
        s.put_many({f"k{i}": b"x" for i in range(50)})
    with piecestore.open(shards=[f"memory://tpl-{tag}-{i}" for i in (3, 1, 2, 0)]) as s:
        assert len(list(s.list())) == 50
    with pytest.raises(LayoutMismatchError):
        piecestore.open(f"memory://tpl-{tag}-{{shard}}", shards=5)


def test_open_from_settings_with_weights() -> None:
    tag = uuid.uuid4().hex[:8]
    targets = [f"memory://w-{tag}-{i}" for i in range(3)]
    settings = load_settings(sharding_targets=targets, sharding_weights=[1, 1, 4])
    with piecestore.open_with_settings(settings) as s:
        assert isinstance(s, ShardedStore)
        s.put_many({f"k{i}": b"x" for i in range(600)})
        counts = [len(list(shard.list())) for shard in s.shards]
        assert counts[2] > counts[0] + counts[1]


def test_concurrent_first_opens_agree() -> None:
    tag = uuid.uuid4().hex[:8]
    targets = [f"memory://race-{tag}-{i}" for i in range(4)]
    with ThreadPoolExecutor(6) as pool:
        stores = list(pool.map(lambda _: piecestore.open(shards=targets), range(6)))
    try:
        assert len({s.layout.to_json() for s in stores}) == 1
        stores[0].put("k", b"v")
        stores[5].refresh()
        assert stores[5].get("k") == b"v"
    finally:
        for s in stores:
            s.close()


def test_interrupted_layout_write_is_repaired_on_open() -> None:
    tag = uuid.uuid4().hex[:8]
    old = [f"memory://rep-{tag}-{i}" for i in range(4)]
    new = [*old, f"memory://rep-{tag}-4"]
    with piecestore.open(shards=old) as s:
        s.put_many({f"k{i}": b"x" for i in range(100)})
        moving = s.layout.begin_reshard(new)
        s.shards[0].backend.put(LAYOUT_OBJECT, moving.to_json())  # a crash after the first write
    with pytest.raises(LayoutMismatchError, match="in progress"):
        piecestore.open(shards=old)
    with piecestore.open(shards=new) as s:
        assert s.layout.state == "resharding"
        assert len(list(s.list())) == 100
        for shard in s.shards:
            assert read_layout(shard.backend)[0] == ShardLayout.from_json(moving.to_json())


def test_corrupt_layout_object_is_reported() -> None:
    tag = uuid.uuid4().hex[:8]
    targets = [f"memory://bad-{tag}-{i}" for i in range(2)]
    with piecestore.open(shards=targets) as s:
        s.shards[1].backend.put(LAYOUT_OBJECT, b"{not json")
    with pytest.raises(piecestore.CorruptionError, match="shard layout"):
        piecestore.open(shards=targets)


def test_bad_sharding_config() -> None:
    with pytest.raises(ConfigError):
        piecestore.open(shards=["memory://dup", "memory://dup"])


# -- the model-based test on four shards -------------------------------------------------------


def sharded_memory() -> tuple[list[str], Any]:
    base, cleanup = memory_url()
    return [f"{base}-{i}" for i in range(4)], cleanup


def sharded_files() -> tuple[list[str], Any]:
    root = tempfile.mkdtemp(prefix="piecestore-sharded-model-")
    return [f"file://{root}/s{i}" for i in range(4)], lambda: shutil.rmtree(root, ignore_errors=True)


class ShardedModel(StoreModel):
    """StoreModel's rules and invariant, against a ShardedStore over the factory's targets."""

    def _open(self, **kw: Any) -> PieceStore:
        s = piecestore.open(
            shards=self.url, engine_small_piece_max_bytes=4096, engine_flush_linger_ms=0.5, **kw
        )
        assert isinstance(s, ShardedStore)
        return s  # type: ignore[return-value]  # the same API

    @rule(grace_passed=st.booleans())
    def gc(self, grace_passed: bool) -> None:
        """GC is per shard (each has its own tables); the CLI runs it on each of ``shards``."""
        ahead = timedelta(days=1) if grace_passed else timedelta(0)
        for shard in self.store.shards:  # type: ignore[attr-defined]
            shard.gc(clock=lambda: datetime.now(UTC) + ahead)


@pytest.mark.parametrize("factory", [sharded_memory, sharded_files], ids=["memory", "file"])
def test_sharded_store_matches_dict_model(factory: Any) -> None:
    machine = type("Machine", (ShardedModel,), {"__init__": lambda self: StoreModel.__init__(self, factory)})
    runner = settings(
        max_examples=20, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
    )(machine)
    runner.TestCase().runTest()


__all__ = [
    "test_bad_keys",
    "test_bad_values",
    "test_keys_at_the_limits",
    "test_large_pieces",
    "test_list_sorted_prefix_and_sizes",
    "test_overwrite_newest_wins",
    "test_put_get_head_exists_delete",
    "test_put_many_get_many",
]


def test_one_shard_opened_alone_is_refused(tmp_path: Path) -> None:
    urls = [f"file://{tmp_path}/s{i}" for i in range(3)]
    with piecestore.open(shards=urls) as s:
        s.put_many({f"k{i}": b"v" for i in range(30)})
    with pytest.raises(LayoutMismatchError):
        piecestore.open(urls[0])
