"""Shard router benchmark: balance, keys moved on resharding (vs hash % N), weights, cost.

Run: /work/venv/bin/python benchmarks/bench_router.py [--keys 1000000] [--json out.json] [--check]

Why a script and not a test: the numbers (1M keys, timings) are too slow and too noisy for the
unit tests, which check the same guarantees on 100k keys. ``--check`` exits 1 if a target of
the issue is missed: max/mean load <= 1.05 over 16 shards, N -> N+1 moves <= 1.1 x 1/(N+1),
routing <= 2 us per key in batch (hashing included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from piecestore.sharding import Router, ShardTarget, hash_keys, owners_changed

TARGET_BALANCE = 1.05
TARGET_MOVE_RATIO = 1.1
TARGET_US_PER_KEY = 2.0


def urls(n: int) -> list[str]:
    return [f"s3://pieces-{i}" for i in range(n)]


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return runs


def per_key_us(runs: list[float], n: int) -> dict[str, float]:
    us = sorted(r / n * 1e6 for r in runs)
    return {"median": statistics.median(us), "min": us[0], "max": us[-1]}


def identities(r: Router, idx: npt.NDArray[np.intp]) -> npt.NDArray[Any]:
    names: npt.NDArray[Any] = np.array([t.identity for t in r.targets], dtype=object)[idx]
    return names


def balance(hashes: npt.NDArray[np.uint64], shards: int) -> dict[str, float]:
    counts = np.bincount(Router(urls(shards)).route_hashes(hashes), minlength=shards)
    mod = np.bincount((hashes % np.uint64(shards)).astype(np.intp), minlength=shards)
    mean = len(hashes) / shards
    return {
        "shards": shards,
        "max_over_mean": float(counts.max() / mean),
        "min_over_mean": float(counts.min() / mean),
        "modulo_max_over_mean": float(mod.max() / mean),
    }


def movement(hashes: npt.NDArray[np.uint64], n: int) -> dict[str, Any]:
    old, new = Router(urls(n)), Router(urls(n + 1))
    before = identities(old, old.route_hashes(hashes))
    after = identities(new, new.route_hashes(hashes))
    moved = before != after
    ideal = 1 / (n + 1)
    mod_moved = (hashes % np.uint64(n)) != (hashes % np.uint64(n + 1))
    return {
        "n": n,
        "ideal": ideal,
        "moved": float(moved.mean()),
        "ratio": float(moved.mean() / ideal),
        "only_to_new": bool(set(after[moved]) <= {f"s3://pieces-{n}"}),
        "owners_changed_agrees": bool((owners_changed(old, new, hashes) == moved).all()),
        "modulo_moved": float(mod_moved.mean()),
        "modulo_ratio": float(mod_moved.mean() / ideal),
    }


def removal(hashes: npt.NDArray[np.uint64], n: int, gone: int) -> dict[str, Any]:
    full = urls(n)
    old, new = Router(full), Router(full[:gone] + full[gone + 1 :])
    before = identities(old, old.route_hashes(hashes))
    after = identities(new, new.route_hashes(hashes))
    moved = before != after
    return {
        "n": n,
        "removed": full[gone],
        "moved": float(moved.mean()),
        "ideal": 1 / n,
        "only_its_keys": bool((moved == (before == full[gone])).all()),
    }


def weighted(hashes: npt.NDArray[np.uint64], weights: list[float]) -> dict[str, Any]:
    r = Router([ShardTarget(u, w) for u, w in zip(urls(len(weights)), weights, strict=True)])
    share = np.bincount(r.route_hashes(hashes), minlength=len(weights)) / len(hashes)
    expected = np.array(weights) / sum(weights)
    return {
        "weights": weights,
        "expected": expected.tolist(),
        "share": share.tolist(),
        "max_rel_error": float(np.max(np.abs(share - expected) / expected)),
    }


def cost(keys: list[str], shards: int, repeat: int) -> dict[str, Any]:
    r = Router(urls(shards))
    hashes = hash_keys(keys)
    r.route_hashes(hashes[:10_000])  # warm up
    n = len(keys)
    single = keys[:20_000]
    return {
        "shards": shards,
        "keys": n,
        "repeat": repeat,
        "hash_only_us": per_key_us(timed(lambda: hash_keys(keys), repeat), n),
        "route_excluding_hash_us": per_key_us(timed(lambda: r.route_hashes(hashes), repeat), n),
        "route_many_including_hash_us": per_key_us(timed(lambda: r.route_many(keys), repeat), n),
        "route_one_key_us": per_key_us(timed(lambda: [r.route(k) for k in single], repeat), len(single)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per cost figure (median reported)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    args = ap.parse_args(argv)

    keys = [f"pieces/{i:08d}" for i in range(args.keys)]  # generated outside every timing
    hashes = hash_keys(keys)
    res: dict[str, Any] = {
        "env": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
        "balance": balance(hashes, args.shards),
        "movement": [movement(hashes, n) for n in (4, 8, 16)],
        "removal": removal(hashes, args.shards, 5),
        "weighted": weighted(hashes, [1.0, 2.0, 3.0, 4.0]),
        "cost": cost(keys, args.shards, args.repeat),
    }
    b, c = res["balance"], res["cost"]
    checks = {
        "balance": b["max_over_mean"] <= TARGET_BALANCE,
        "movement": all(m["ratio"] <= TARGET_MOVE_RATIO and m["only_to_new"] for m in res["movement"]),
        "removal": res["removal"]["only_its_keys"],
        "cost": c["route_many_including_hash_us"]["median"] <= TARGET_US_PER_KEY,
    }
    res["checks"] = checks

    env = res["env"]
    print(f"keys={args.keys:,}  python {env['python']}  numpy {env['numpy']}  cpus={env['cpus']}")
    print(f"\nbalance over {b['shards']} equal shards (target max/mean <= {TARGET_BALANCE})")
    print(f"  rendezvous  max/mean {b['max_over_mean']:.4f}  min/mean {b['min_over_mean']:.4f}")
    print(f"  hash % N    max/mean {b['modulo_max_over_mean']:.4f}")
    print(f"\nkeys moved going N -> N+1 (target rendezvous/ideal <= {TARGET_MOVE_RATIO})")
    print(
        f"  {'N':>3} {'ideal':>8} {'rendezvous':>11} {'ratio':>6} {'only->new':>9} {'hash%N':>8} {'ratio':>6}"
    )
    for m in res["movement"]:
        print(
            f"  {m['n']:>3} {m['ideal']:>8.4f} {m['moved']:>11.4f} {m['ratio']:>6.3f} "
            f"{m['only_to_new']!s:>9} {m['modulo_moved']:>8.4f} {m['modulo_ratio']:>6.2f}"
        )
    rm = res["removal"]
    print(
        f"\nremoving {rm['removed']} of {rm['n']}: moved {rm['moved']:.4f} (its share ~{rm['ideal']:.4f}), "
        f"only its keys moved: {rm['only_its_keys']}"
    )
    w = res["weighted"]
    print("\nweighted shares (weights " + ", ".join(f"{x:g}" for x in w["weights"]) + ")")
    print("  expected " + "  ".join(f"{x:.4f}" for x in w["expected"]))
    print("  measured " + "  ".join(f"{x:.4f}" for x in w["share"]))
    print(f"  max relative error {w['max_rel_error']:.4f}")
    print(
        f"\nrouting cost, {c['shards']} shards, batch of {c['keys']:,} keys, us/key "
        f"(median [min..max] of {c['repeat']} runs; target <= {TARGET_US_PER_KEY})"
    )
    for label, k in (
        ("hash keys only (xxh3_64)", "hash_only_us"),
        ("route_hashes (hash excluded)", "route_excluding_hash_us"),
        ("route_many (hash included)", "route_many_including_hash_us"),
        ("route() one key at a time", "route_one_key_us"),
    ):
        v = c[k]
        print(f"  {label:<30} {v['median']:>7.3f}  [{v['min']:.3f} .. {v['max']:.3f}]")
    print("\nchecks: " + "  ".join(f"{k}={'PASS' if ok else 'FAIL'}" for k, ok in checks.items()))

    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    return 0 if (all(checks.values()) or not args.check) else 1


if __name__ == "__main__":
    sys.exit(main())
