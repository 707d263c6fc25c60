"""Shard router and recorded layout: placement guarantees, determinism, validation, messages."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piecestore.errors import (
    ConfigError,
    CorruptionError,
    InvalidKeyError,
    LayoutMismatchError,
    UnsupportedError,
)
from piecestore.sharding import (
    ROUTING_SCHEME,
    Router,
    ShardLayout,
    ShardTarget,
    check_matches,
    diff_targets,
    from_template,
    hash_keys,
    owners_changed,
    strip_url_secrets,
    targets_fingerprint,
    targets_from_config,
)
from piecestore.sharding import router as router_mod

KEYS = [f"pieces/{i:07d}" for i in range(100_000)]


def urls(n: int, prefix: str = "s3://pieces-") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def owners(r: Router, idx: np.ndarray) -> np.ndarray:
    """Route indexes -> target identities, to compare routers with different target lists."""
    names: np.ndarray = np.array([t.identity for t in r.targets], dtype=object)[idx]
    return names


@pytest.fixture(scope="module")
def hashes() -> np.ndarray:
    return hash_keys(KEYS)


# --- determinism -------------------------------------------------------------------------


def test_golden_assignment_never_changes() -> None:
    """Pinned answers: a change here misroutes every existing sharded store (bump ROUTING_SCHEME)."""
    keys = [f"k{i}" for i in range(10_000)]
    r = Router(urls(8))
    a = r.route_many(keys)
    assert a[:16].tolist() == [2, 4, 2, 4, 1, 2, 5, 2, 3, 3, 3, 5, 5, 3, 3, 4]
    assert xxhash.xxh3_64_hexdigest(a.astype("<i8").tobytes()) == "fb7c66e4bbae1396"
    w = Router([ShardTarget(f"s3://w-{i}", float(i + 1)) for i in range(4)])
    b = w.route_many(keys)
    assert b[:16].tolist() == [1, 3, 2, 3, 2, 0, 2, 3, 2, 1, 3, 3, 1, 0, 3, 1]
    assert xxhash.xxh3_64_hexdigest(b.astype("<i8").tobytes()) == "1faf95fc14e4d72a"
    assert hash_keys(["a", "b"]).tolist() == [16629034431890738719, 6294355645245719615]
    assert ROUTING_SCHEME == "hrw-xxh3-splitmix64-v1"


def test_same_answer_in_another_process_with_another_hash_seed() -> None:
    code = (
        "import xxhash; from piecestore.sharding import Router\n"
        "r = Router([f's3://pieces-{i}' for i in range(8)])\n"
        "print(xxhash.xxh3_64_hexdigest(r.route_many([f'k{i}' for i in range(10000)])"
        ".astype('<i8').tobytes()))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "fb7c66e4bbae1396"


def test_route_equals_route_many_bit_for_bit() -> None:
    """route() has a scalar (pure Python) path and a numpy path: they must agree exactly."""
    keys = [*KEYS[:20_000], "", "héllo/ключ/🙂", "x" * 1024]
    weighted = [ShardTarget(f"s3://w-{i}", w) for i, w in enumerate([1, 2.5, 3, 0.125, 7, 1e-3, 1e6])]
    for targets in (urls(16), weighted, urls(router_mod._SCALAR_MAX_TARGETS + 5)):
        r = Router(targets)
        many = r.route_many(keys)
        assert [r.route(k) for k in keys] == many.tolist()


def test_order_of_targets_does_not_change_placement(hashes: np.ndarray) -> None:
    targets = [ShardTarget(u, w) for u, w in zip(urls(7), [1, 2, 1, 3, 1, 1, 0.5], strict=True)]
    shuffled = targets[:]
    random.Random(3).shuffle(shuffled)
    a, b = Router(targets), Router(shuffled)
    assert (owners(a, a.route_hashes(hashes)) == owners(b, b.route_hashes(hashes))).all()
    assert a.fingerprint == b.fingerprint


def test_credentials_in_urls_do_not_change_placement(hashes: np.ndarray) -> None:
    plain = Router(urls(5, "s3://bucket/p"))
    secret = Router([f"s3://AK:SK@bucket/p{i}?secret_key=x" for i in range(5)])
    assert (plain.route_hashes(hashes) == secret.route_hashes(hashes)).all()
    assert plain.fingerprint == secret.fingerprint


def test_deterministic_log_matches_libm() -> None:
    """The hand-rolled ln (bit-identical on every CPU) is as accurate as libm's to ~1 ulp."""
    rng = np.random.default_rng(7)
    u = np.concatenate([rng.random(50_000), 2.0 ** -rng.uniform(1, 52, 20_000), 1 - rng.random(5_000) * 1e-9])
    u = u[(u > 0) & (u < 1)]
    ref = np.array([math.log(x) for x in u])
    got = router_mod._ln_unit(u.copy())
    assert np.max(np.abs(got - ref) / np.abs(ref)) < 3e-15


# --- placement guarantees ------------------------------------------------------------------


def test_balance_over_eight_shards(hashes: np.ndarray) -> None:
    counts = np.bincount(Router(urls(8)).route_hashes(hashes), minlength=8)
    mean = len(KEYS) / 8
    assert counts.max() / mean < 1.03 and counts.min() / mean > 0.97, counts


@pytest.mark.parametrize("n", [1, 4, 8, 16])
def test_adding_a_shard_moves_only_keys_to_it(hashes: np.ndarray, n: int) -> None:
    old, new = Router(urls(n)), Router(urls(n + 1))
    before = owners(old, old.route_hashes(hashes))
    after = owners(new, new.route_hashes(hashes))
    moved = before != after
    assert set(after[moved]) <= {f"s3://pieces-{n}"}
    assert (after[~moved] == before[~moved]).all()
    ideal = 1 / (n + 1)
    assert abs(moved.mean() - ideal) < 0.1 * ideal, (moved.mean(), ideal)
    assert (owners_changed(old, new, hashes) == moved).all()


def test_removing_a_shard_moves_only_its_keys(hashes: np.ndarray) -> None:
    full = urls(10)
    old = Router(full)
    new = Router(full[:3] + full[4:])
    before = owners(old, old.route_hashes(hashes))
    after = owners(new, new.route_hashes(hashes))
    moved = before != after
    assert (moved == (before == full[3])).all()
    assert (owners_changed(old, new, KEYS[:5000]) == moved[:5000]).all()


def test_weighted_shares_are_proportional(hashes: np.ndarray) -> None:
    weights = [1.0, 2.0, 3.0, 4.0]
    r = Router([ShardTarget(u, w) for u, w in zip(urls(4), weights, strict=True)])
    share = np.bincount(r.route_hashes(hashes), minlength=4) / len(KEYS)
    assert np.allclose(share, np.array(weights) / sum(weights), atol=0.006), share


def test_changing_one_weight_moves_keys_only_to_or_from_it(hashes: np.ndarray) -> None:
    a = Router(urls(6))
    b = Router([ShardTarget(u, 2.0 if i == 2 else 1.0) for i, u in enumerate(urls(6))])
    ia, ib = a.route_hashes(hashes), b.route_hashes(hashes)
    assert (ib[ia != ib] == 2).all()
    assert abs((ib == 2).mean() - 2 / 7) < 0.01


def test_equal_weights_use_the_weighted_formula(hashes: np.ndarray) -> None:
    plain = Router(urls(9)).route_hashes(hashes)
    assert (Router([ShardTarget(u, 1.0) for u in urls(9)]).route_hashes(hashes) == plain).all()
    assert (Router([ShardTarget(u, 3.0) for u in urls(9)]).route_hashes(hashes) == plain).all()


def test_single_target_takes_everything() -> None:
    assert (Router(["memory://only"]).route_many(KEYS[:100]) == 0).all()


_url_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(st.text(max_size=30), min_size=1, max_size=200),
    names=st.lists(_url_names, min_size=2, max_size=10, unique=True),
    weights=st.lists(st.floats(0.05, 20.0), min_size=10, max_size=10),
)
def test_property_adding_a_target_never_moves_keys_between_old_targets(
    keys: list[str], names: list[str], weights: list[float]
) -> None:
    *old_names, added = names
    old = Router([ShardTarget(f"s3://{n}", w) for n, w in zip(old_names, weights, strict=False)])
    new = Router([*old.targets, ShardTarget(f"s3://{added}", weights[-1])])
    before = owners(old, old.route_many(keys))
    after = owners(new, new.route_many(keys))
    moved = before != after
    assert set(after[moved]) <= {f"s3://{added}"}
    # and the reverse: removing the target sends its keys back exactly where they were
    assert (owners(old, old.route_many(keys)) == before).all()
    assert (owners_changed(new, old, keys) == moved).all()


# --- configuration and validation ----------------------------------------------------------


def test_template_expansion() -> None:
    assert [t.url for t in from_template("s3://pieces-{shard}", 3)] == [
        "s3://pieces-0",
        "s3://pieces-1",
        "s3://pieces-2",
    ]
    assert [t.url for t in from_template("s3://b/{shard:03d}/x", 2)] == ["s3://b/000/x", "s3://b/001/x"]
    assert [t.url for t in Router.from_template("memory://s{shard}", 2).targets] == [
        "memory://s0",
        "memory://s1",
    ]


@pytest.mark.parametrize(
    ("template", "count"),
    [
        ("s3://pieces", 4),
        ("s3://pieces-{n}", 4),
        ("s3://pieces-{shard}", 0),
        ("s3://pieces-{shard}", -1),
        ("s3://pieces-{shard}", True),
        ("s3://pieces-{shard}", 2.0),
        ("s3://pieces-{shard:q}", 2),
        ("s3://b?token={shard}", 2),  # expands to duplicates once the credential is stripped
    ],
)
def test_bad_template(template: str, count: int) -> None:
    with pytest.raises(ConfigError):
        from_template(template, count)


@pytest.mark.parametrize(
    "targets",
    [
        [],
        "s3://one-string-not-a-list",
        ["s3://a", "s3://a"],
        ["s3://a", "s3://user:pw@a"],
        ["s3://a", ""],
        ["s3://a", " s3://b"],
        ["s3://a", 3],
    ],
)
def test_bad_target_lists(targets: object) -> None:
    with pytest.raises(ConfigError):
        Router(targets)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "weight", [0, 0.0, -1.0, float("nan"), float("inf"), -0.0, True, "2", None, 1e-320, 1e300]
)
def test_bad_weights(weight: object) -> None:
    with pytest.raises(ConfigError):
        ShardTarget("s3://a", weight)  # type: ignore[arg-type]


def test_weights_are_normalized_to_float() -> None:
    t = ShardTarget("s3://a", 3)
    assert t.weight == 3.0 and isinstance(t.weight, float)


def test_secrets_are_stripped_from_identity_and_repr() -> None:
    url = "s3://AKIA:s3cr3t@host:9000/bucket/p?region=eu&secret_key=SK&X-Amz-Security-Token=T&access_key=AK"
    t = ShardTarget(url)
    assert t.identity == "s3://host:9000/bucket/p?region=eu"
    assert "s3cr3t" not in repr(t) and "SK" not in repr(t) and "AKIA" not in repr(t)
    assert t.url == url  # the engine still needs the full URL to connect
    plain = "s3://b/p?endpoint=http://127.0.0.1:8333&region=us-east-1"
    assert strip_url_secrets(plain) == plain  # no secrets: text kept exactly


def test_targets_from_config() -> None:
    assert targets_from_config() is None
    assert targets_from_config(shards=0) is None
    assert targets_from_config(shards=0, template="s3://p-{shard}") is None
    got = targets_from_config(shards=3, template="s3://p-{shard}")
    assert got is not None and [t.url for t in got] == ["s3://p-0", "s3://p-1", "s3://p-2"]
    got = targets_from_config(targets=["s3://a", ShardTarget("s3://b", 2)])
    assert got is not None and [(t.url, t.weight) for t in got] == [("s3://a", 1.0), ("s3://b", 2.0)]
    bad: dict[str, Any]
    for bad in (
        {"shards": 2},
        {"template": "s3://p-{shard}"},
        {"shards": -1, "template": "s3://p-{shard}"},
        {"targets": ["s3://a"], "shards": 2, "template": "s3://p-{shard}"},
        {"targets": []},
    ):
        with pytest.raises(ConfigError):
            targets_from_config(**bad)


def test_bad_keys() -> None:
    r = Router(urls(3))
    with pytest.raises(InvalidKeyError):
        r.route(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError):
        r.route("lone \ud800 surrogate")
    with pytest.raises(InvalidKeyError):
        r.route_many(["ok", 5])  # type: ignore[list-item]
    with pytest.raises(InvalidKeyError):
        r.route_many(["ok", "\udfff"])
    with pytest.raises(InvalidKeyError):
        r.route_many("abc")
    assert r.route_many([]).shape == (0,)


def test_numpy_string_keys_and_pickling() -> None:
    r = Router([ShardTarget(u, 1.0 + i) for i, u in enumerate(urls(5))])
    arr = np.array(KEYS[:1000])
    assert (r.route_many(arr) == r.route_many(KEYS[:1000])).all()  # type: ignore[arg-type]
    assert owners_changed(r, Router(urls(5)), arr).any()
    clone = pickle.loads(pickle.dumps(r))
    assert (clone.route_many(KEYS[:1000]) == r.route_many(KEYS[:1000])).all()
    lay = ShardLayout.initial(r.targets)
    assert pickle.loads(pickle.dumps(lay)) == lay
    assert pickle.loads(pickle.dumps(lay.targets[0])).seed == lay.targets[0].seed


def test_index_of() -> None:
    r = Router(urls(3))
    assert r.index_of("s3://pieces-1") == 1
    assert r.index_of("s3://u:p@pieces-2") == 2
    assert r.index_of(ShardTarget("s3://pieces-9")) is None


# --- recorded layout -----------------------------------------------------------------------


def layout(n: int = 4) -> ShardLayout:
    return ShardLayout.initial([ShardTarget(u, 1.0 + (i == 0)) for i, u in enumerate(urls(n))])


def test_layout_json_round_trip() -> None:
    stable = layout()
    assert ShardLayout.from_json(stable.to_json()) == stable
    moving = stable.begin_reshard(urls(5))
    assert moving.version == 2 and moving.state == "resharding" and moving.previous == stable.targets
    back = ShardLayout.from_json(moving.to_json())
    assert back == moving and back.previous_router() is not None
    done = moving.finish_reshard()
    assert (done.version, done.state, done.previous) == (3, "stable", None)
    assert ShardLayout.from_json(done.to_json()) == done
    assert stable.to_json() == ShardLayout.from_json(stable.to_json()).to_json()  # canonical bytes


def test_layout_json_holds_no_secrets() -> None:
    lay = ShardLayout.initial(["s3://AK:SK@b/p0?secret_key=SK2", "s3://b/p1"])
    raw = lay.to_json()
    assert b"SK" not in raw and b"AK" not in raw
    assert [t.url for t in ShardLayout.from_json(raw).targets] == ["s3://b/p0", "s3://b/p1"]


def test_layout_fingerprint() -> None:
    a = layout()
    assert a.fingerprint == targets_fingerprint(reversed(a.targets)) == a.router().fingerprint
    assert a.fingerprint != layout(5).fingerprint
    assert a.fingerprint != ShardLayout.initial(urls(4)).fingerprint  # weights count


def _doc(lay: ShardLayout) -> dict[str, object]:
    doc: dict[str, object] = json.loads(lay.to_json())
    return doc


def _corrupt(**changes: object) -> bytes:
    doc = _doc(layout())
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[]",
        b'{"kind": "something-else"}',
        _corrupt(format="1"),
        _corrupt(version=0),
        _corrupt(version="1"),
        _corrupt(state="moving"),
        _corrupt(targets=[]),
        _corrupt(targets="s3://a"),
        _corrupt(targets=[{"url": "s3://a"}]),
        _corrupt(targets=[{"url": "s3://a", "weight": -1}]),
        _corrupt(targets=[{"url": "s3://a", "weight": 1}, {"url": "s3://a", "weight": 1}]),
        _corrupt(previous=[{"url": "s3://a", "weight": 1}]),  # previous while stable
        _corrupt(fingerprint="0" * 32),  # hand-edited
        _corrupt(targets=[{"url": "s3://pieces-0", "weight": 5.0}]),  # fingerprint no longer matches
        layout().to_json().replace(b'"weight":2.0', b'"weight":NaN'),
    ],
)
def test_malformed_layout_is_corruption(raw: bytes) -> None:
    with pytest.raises(CorruptionError):
        ShardLayout.from_json(raw)


def test_layout_from_the_future_is_unsupported() -> None:
    with pytest.raises(UnsupportedError, match="newer piecestore"):
        ShardLayout.from_json(_corrupt(format=99))
    with pytest.raises(UnsupportedError, match="routing scheme"):
        ShardLayout.from_json(_corrupt(scheme="modulo-v0"))


def test_layout_construction_rules() -> None:
    with pytest.raises(ConfigError):
        ShardLayout(1, (ShardTarget("s3://a"),), state="resharding")  # no previous
    with pytest.raises(ConfigError):
        ShardLayout(1, (), None)
    with pytest.raises(ConfigError):
        layout().finish_reshard()
    with pytest.raises(ConfigError):
        layout().begin_reshard(reversed(layout().targets))  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        layout().begin_reshard(urls(5)).begin_reshard(urls(6))


def test_check_matches_accepts_same_set_any_order_and_credentials() -> None:
    lay = layout()
    check_matches(lay, list(reversed(lay.targets)))
    check_matches(
        lay, [ShardTarget(f"s3://u:pw@pieces-{i}?secret_key=x", 2.0 if i == 0 else 1) for i in range(4)]
    )
    check_matches(None, None)
    check_matches(None, [])


def _mismatch(recorded: ShardLayout | None, configured: Sequence[ShardTarget | str] | None) -> str:
    with pytest.raises(LayoutMismatchError) as info:
        check_matches(recorded, configured)
    msg = str(info.value)
    assert isinstance(info.value, ConfigError)
    assert "reshard" in msg
    return msg


def test_mismatch_messages_name_the_difference() -> None:
    lay = layout()
    conf = [ShardTarget(u, 2.0 if i == 0 else 1.0) for i, u in enumerate(urls(4))]
    msg = _mismatch(lay, [*conf, "s3://pieces-4"])
    assert "'s3://pieces-4'" in msg and "not in the recorded layout" in msg
    assert "store.reshard(" in msg and "piecestore reshard" in msg and "fix the configuration" in msg
    msg = _mismatch(lay, conf[:3])
    assert "missing from the configuration: 's3://pieces-3'" in msg
    msg = _mismatch(lay, urls(4))
    assert "weight changed: 's3://pieces-0' recorded 2.0, configured 1.0" in msg
    msg = _mismatch(lay, None)
    assert "no sharding" in msg and "'s3://pieces-0'" in msg
    msg = _mismatch(None, urls(2))
    assert "not sharded" in msg
    msg = _mismatch(lay, urls(40, "s3://other-"))
    assert "and 32 more" in msg


def test_mismatch_during_reshard_points_at_the_new_targets() -> None:
    moving = layout().begin_reshard(urls(5))
    check_matches(moving, urls(5))
    msg = _mismatch(moving, [ShardTarget(u, 2.0 if i == 0 else 1.0) for i, u in enumerate(urls(4))])
    assert "in progress" in msg and "'s3://pieces-4'" in msg


def test_diff_targets() -> None:
    d = diff_targets(
        [ShardTarget("s3://a"), ShardTarget("s3://b", 2)], [ShardTarget("s3://b"), ShardTarget("s3://c")]
    )
    assert d.missing == ("s3://a",) and d.extra == ("s3://c",) and d.reweighted == (("s3://b", 2.0, 1.0),)
    assert bool(d) and not diff_targets([ShardTarget("s3://a")], [ShardTarget("s3://a")])
