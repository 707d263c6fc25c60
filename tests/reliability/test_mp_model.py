"""Multi-process model test: the store against a dict, with real processes doing everything at once.

The single-process model (test_model.py) steps one store through put/get/delete/flush/GC. Here
the same promise is checked with the work spread over real processes, as in production:

* writer processes, each owning its keys: plain ``put``, ``put_many`` (some with a slow stream
  as a value), ``delete``/``delete_many``, ``store.batch()``, buffered stores flushed now and
  then; small pieces and large ones (their own objects); background compaction on. Each logs
  every write before it starts and whether it returned (acknowledged) or raised (in doubt),
  and now and then reads its own keys back: each must hold a state the writer may have left;
* reader processes with old views (``refresh_interval`` 30 s, refreshed by hand every 1.5 s,
  far past the grace period): every value they read must be
  exactly the value of a write to that key that was acknowledged (or raised: in doubt), never
  bytes nobody wrote there; every size they list likewise;
* one process looping ``store.gc()`` with grace 0 or a small grace; with a short GC lease, one
  more process leaves orphans all along, as crashed writers do, so GC sweeps all the time.

At the end every key must hold its latest acknowledged state (a deleted key stays deleted), or
that of a later write that raised; the listing must agree and fsck must be clean. A failure
names the key, what it should hold, what it holds, and which process and operation wrote each.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from piecestore import PieceStoreError
from piecestore.localserver import LocalS3Server
from tests.reliability._holes import History, check_final, check_observations, open_check_store, run_procs
from tests.reliability._support import SOAK, SOAK_SECONDS, s3_url

SMALL = 64 * 1024
KEYS_PER_THREAD = 10

BASE = {
    "engine_small_piece_max_bytes": SMALL,
    "engine_table_target_bytes": 256 * 1024,
    "engine_flush_bytes": 32 * 1024,  # tables below 16 KiB count as small: compaction starts early
    "gc_compact_min_tables": 3,
    "gc_auto_compact": True,
    "engine_refresh_interval_seconds": 0.5,
}

# A short GC lease: writer sessions protect young uploads only that long, so writes held past
# half of it (the batch writer's) face the sweep fence; a littering process keeps GC sweeping.
LEASES: dict[str, dict[str, Any]] = {"default": {}, "short": {"gc_lease_seconds": 0.6}}

# name, buffered store, writer config (see holes_worker)
WRITERS: list[tuple[str, bool, dict[str, Any]]] = [
    (
        "plain",
        False,
        {
            "threads": 2,
            "ops": {"put": 4, "put_many": 2, "delete": 2, "slow": 0.3, "batch": 1, "verify": 2},
            "batch_sleep": 0.05,
            "stream_delay": 0.1,
            "large_frac": 0.3,
        },
    ),
    (
        "batch",
        True,
        {
            "threads": 1,
            "ops": {"batch": 3, "put": 2, "put_many": 1, "delete": 1, "flush": 1, "nap": 0.5, "verify": 2},
            "batch_sleep": 0.8,  # well past the small grace period (a GC pass here takes ~0.3 s)
            "large_frac": 0.3,
        },
    ),
    (
        "buffered",
        True,
        {
            "threads": 2,
            "ops": {"put": 4, "put_many": 1, "delete": 2, "flush": 1, "verify": 2},
            "large_frac": 0.3,
        },
    ),
]


def model_run(
    url: str, workdir: Path, *, grace: float, lease: str, duration: float, seed: int, readers: int = 2
) -> dict[str, Any]:
    rng = random.Random(seed)
    log = workdir / "history.log"
    log.touch()
    overrides = {**BASE, "gc_grace_seconds": grace, **LEASES[lease]}
    roles: list[dict[str, Any]] = []
    all_keys: list[str] = []
    for w, (kind, buffered, cfg) in enumerate(WRITERS):
        owner = f"w{w}/"
        all_keys += [f"{owner}t{t}/k{j:03d}" for t in range(cfg["threads"]) for j in range(KEYS_PER_THREAD)]
        roles.append(
            {
                **cfg,
                "role": "writer",
                "name": f"writer{w}-{kind}",
                "url": url,
                "log": str(log),
                "owner": owner,
                "seed": rng.randrange(2**32),
                "opid_base": (w + 1) * 10_000_000,
                "keys": KEYS_PER_THREAD,
                "small_max": SMALL,
                "buffered": buffered,
                "overrides": {**overrides, "store_buffered_writes": buffered},
            }
        )
    obs_paths = [workdir / f"reader{r}.obs" for r in range(readers)]
    for r in range(readers):
        roles.append(
            {
                "role": "reader",
                "name": f"reader{r}",
                "url": url,
                "log": str(log),
                "seed": rng.randrange(2**32),
                "threads": 2,
                "read_keys": all_keys,
                "prefixes": ["", *(f"w{w}/" for w in range(len(WRITERS)))],
                "obs": str(obs_paths[r]),
                # Old views: the store re-reads the manifest only when a table it needs is gone,
                # and the reader refreshes it every 1.5 s: views far older than the grace period.
                "refresh_every": 1.5,
                "read_pause": 0.002,
                "overrides": {**overrides, "engine_refresh_interval_seconds": 30, "gc_auto_compact": False},
            }
        )
    roles.append(
        {
            "role": "gc",
            "name": "gc",
            "url": url,
            "log": str(log),
            "seed": 0,
            "pause": 0.02,
            "overrides": {**overrides, "gc_auto_compact": False},
        }
    )
    if lease == "short":  # old orphans all the time: GC announces (and runs) sweeps all the time
        roles.append({"role": "litter", "name": "litter", "url": url, "log": str(log), "seed": 0,
                      "every": 0.1, "overrides": overrides})  # fmt: skip
    run_procs(roles, workdir, duration=duration)

    history = History.load(log)
    counts = history.counts()
    done = {n["done"]: n for n in history.done()}
    problems = history.problems()
    gc_errors = [n for n in history.notes if "gc_error" in n]
    read_errors = [n for n in history.notes if "read_error" in n]
    persistent = [n for n in read_errors if n.get("again")]
    observed = check_observations(history, obs_paths)
    acked_deletes = sum(
        1 for op in history.ops.values() if op.status == "acked" and None in op.changes.values()
    )
    figures: dict[str, Any] = {
        **counts,
        "acked_deletes": acked_deletes,
        "own_reads_checked": sum(n.get("verified", 0) for n in done.values()),
        "reader_reads": sum(n.get("reads", 0) + n.get("lists", 0) for n in done.values()),
        "observations_checked": observed.checked,
        "doubt_values_seen": observed.doubt_seen,
        "stale_view_read_errors": len(read_errors) - len(persistent),
        "gc_runs": done.get("gc", {}).get("gc_runs", 0),
        "gc_deleted": done.get("gc", {}).get("gc_deleted", 0),
        "background_compactions": sum(n.get("compaction_outputs", 0) for n in done.values()),
    }

    def detail() -> str:
        failed = [f"{op.opid} {op.proc} {op.how}: {op.error[:200]}" for op in history.failures()[:3]]
        return (
            f"\nfigures: {figures}"
            f"\nfailed writes ({counts['failed']}), first: {failed}"
            f"\ngc errors ({len(gc_errors)}), first: {gc_errors[:3]}"
            f"\nread errors ({len(read_errors)}; {len(persistent)} persist after a refresh), "
            f"first: {read_errors[:3]}"
        )

    try:
        store = open_check_store(url, overrides)
    except PieceStoreError as e:
        raise AssertionError(f"the store cannot even be opened after the run: {e}{detail()}") from e
    with store:
        final = check_final(store, history)
        report = store.fsck()
        figures["sweeps_announced"] = getattr(store.manifest, "sweep", None)  # where the fence exists
    figures.update(pieces_verified=final.acked_pieces, absent_verified=final.acked_absent,
                   doubt_landed=final.doubt_landed)  # fmt: skip

    assert not final.lost, (
        f"{len(final.lost)} of {final.keys} keys do not hold their acknowledged state:\n  "
        + "\n  ".join(final.lost[:12])
        + f"\nfsck: {report}{detail()}"
    )
    assert not problems, (
        f"{len(problems)} wrong reads (bytes nobody wrote, or an own key in a state its writer never "
        f"left it in) or worker errors:\n  " + "\n  ".join(map(str, problems[:8])) + detail()
    )
    assert not observed.bad, (
        f"readers saw {len(observed.bad)} values never acknowledged:\n  "
        + "\n  ".join(observed.bad[:8])
        + detail()
    )
    assert report.ok, f"fsck after the run: {report}{detail()}"
    assert not gc_errors, f"GC passes failed beside the writers: {gc_errors[:5]}{detail()}"
    assert not persistent, f"reads failed even after a refresh: {persistent[:5]}{detail()}"
    assert counts["open"] == 0, f"writes neither acknowledged nor failed in a clean run{detail()}"
    assert counts["failed"] * 2 <= counts["ops"], f"more than half of the writes raised{detail()}"
    assert counts["acked"] > 0 and acked_deletes > 0, f"too little was written{detail()}"
    assert figures["gc_runs"] > 0 and observed.checked > 0, f"GC or the readers never ran{detail()}"
    return figures


@pytest.mark.parametrize(("grace", "lease"), [(0.0, "default"), (0.25, "short")])
def test_processes_match_the_dict_model(
    grace: float, lease: str, tmp_path: Path, figures: dict[str, Any]
) -> None:
    url = "file://" + str(tmp_path / "store")
    figures.update(
        model_run(url, tmp_path, grace=grace, lease=lease, duration=6.0, seed=int(grace * 100) + 1)
    )


@pytest.mark.slow
@pytest.mark.parametrize("lease", ["default", "short"])
@pytest.mark.parametrize("grace", [0.0, 0.25])
def test_processes_match_the_dict_model_long(
    grace: float, lease: str, tmp_path: Path, figures: dict[str, Any]
) -> None:
    url = "file://" + str(tmp_path / "store")
    duration = min(SOAK_SECONDS, 120.0) if SOAK else 60.0
    figures.update(
        model_run(
            url, tmp_path, grace=grace, lease=lease, duration=duration, seed=int(grace * 100) + 2, readers=3
        )
    )


@pytest.mark.s3
def test_processes_match_the_dict_model_s3(
    s3_server: LocalS3Server, tmp_path: Path, figures: dict[str, Any]
) -> None:
    url = s3_url(s3_server.endpoint)
    figures.update(model_run(url, tmp_path, grace=0.0, lease="default", duration=6.0, seed=3))
