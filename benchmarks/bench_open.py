"""Open-time and index RAM of a store holding many pieces (the piece engine's read-path targets).

    python benchmarks/bench_open.py [--pieces 1000000] [--json out.json]

Targets: opening a store of 1M pieces on the file backend in under a second, and at most 48
bytes of index RAM per piece. Reports medians of several opens with min..max.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc

import piecestore


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pieces", type=int, default=1_000_000)
    ap.add_argument("--value-bytes", type=int, default=16)
    ap.add_argument("--opens", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="piecestore-open-")
    url = f"file://{root}"
    value = os.urandom(args.value_bytes)
    t0 = time.perf_counter()
    with piecestore.open(url) as store:
        batch = 100_000
        for start in range(0, args.pieces, batch):
            store.put_many({f"piece/{i:09d}": value for i in range(start, min(args.pieces, start + batch))})
        tables = len(store.manifest.tables)
    write_s = time.perf_counter() - t0
    opens: list[float] = []
    ram: list[int] = []
    for _ in range(args.opens):
        tracemalloc.start()
        t = time.perf_counter()
        store = piecestore.open(url)
        opens.append(time.perf_counter() - t)
        current, _peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        ram.append(current)
        index_bytes = store.tables.nbytes()
        t = time.perf_counter()
        hit = store.get(f"piece/{args.pieces // 2:09d}") == value
        miss = not store.exists("absent/key")
        lookup_s = time.perf_counter() - t
        store.close()
        assert hit and miss
    result = {
        "pieces": args.pieces,
        "tables": tables,
        "write_seconds": round(write_s, 2),
        "open_seconds_median": round(statistics.median(opens), 4),
        "open_seconds_min": round(min(opens), 4),
        "open_seconds_max": round(max(opens), 4),
        "index_bytes_per_piece": round(index_bytes / args.pieces, 2),
        "traced_ram_bytes_per_piece_after_open": round(statistics.median(ram) / args.pieces, 2),
        "first_get_plus_miss_seconds": round(lookup_s, 4),
    }
    for k, v in result.items():
        print(f"{k:40s} {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    ok = result["open_seconds_median"] < 1.0 and result["index_bytes_per_piece"] <= 48
    print("targets (open < 1 s, <= 48 B/piece):", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
