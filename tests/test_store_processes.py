"""Several real processes write one store at once; no commit may be lost."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest

import piecestore
from tests.conftest import s3_credentials


def _writer(url: str, overrides: dict[str, Any], worker: int, rounds: int) -> None:
    with piecestore.open(url, engine_flush_linger_ms=1.0, **overrides) as store:
        for r in range(rounds):
            store.put_many({f"w{worker}/{r}/{i}": f"{worker}-{r}-{i}".encode() for i in range(20)})
            store.put(f"w{worker}/single/{r}", b"s")


@pytest.mark.parametrize("driver", ["file", "s3", "minio"])
def test_processes_writing_one_store_lose_nothing(driver: str, store_url: str) -> None:
    overrides: dict[str, Any] = {}
    if driver in ("s3", "minio"):
        creds = s3_credentials()
        overrides = {"s3_access_key": creds["access_key"], "s3_secret_key": creds["secret_key"]}
    workers, rounds = 4, 8
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(store_url, overrides, w, rounds)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with piecestore.open(store_url, **overrides) as store:
        keys = [p.key for p in store.list()]
        assert len(keys) == workers * rounds * 21
        sample = [f"w{w}/{r}/{i}" for w in range(workers) for r in range(rounds) for i in (0, 19)]
        got = store.get_many(sample)
        assert all(got[k] == "-".join(k.replace("w", "", 1).split("/")).encode() for k in sample)
