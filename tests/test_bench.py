"""Smoke tests of the bench and the provider check: tiny cells, real storage, every row verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.table import Table

from piecestore.backends import open_backend
from piecestore.bench import WORKLOADS, BenchResult, run_bench, run_check
from piecestore.bench.counting import RequestCounter, http_kind, instrument
from piecestore.bench.data import DataPool, VerifyError, piece_key
from piecestore.bench.providers import join_url
from piecestore.errors import ConfigError
from tests.conftest import driver_url, s3_credentials

ROW_FIELDS = {
    "provider", "workload", "path", "size", "concurrency", "batch", "pieces_per_s", "pieces_per_s_min",
    "pieces_per_s_max", "mb_per_s", "latency_ms", "ttfb_ms", "errors", "requests", "requests_per_piece",
    "pieces_per_table", "runs", "seconds", "warmup_seconds",
}  # fmt: skip


@pytest.fixture(scope="module")
def quick_memory(tmp_path_factory: pytest.TempPathFactory) -> tuple[BenchResult, Path]:
    out = tmp_path_factory.mktemp("bench")
    return run_bench(["memory"], quick=True, out_dir=out, progress=False, seconds_per_cell=0.06), out


def test_quick_bench_rows_cover_every_workload(quick_memory: tuple[BenchResult, Path]) -> None:
    result, _ = quick_memory
    rows = result.rows
    assert {r.workload for r in rows} >= set(WORKLOADS) - {"disk_write", "get_many_seq", "direct_head",
                                                            "direct_list"}  # fmt: skip
    for r in rows:
        assert not r.errors, (r.workload, r.errors, r.notes)
        assert r.pieces > 0 and r.pieces_per_s > 0, r.workload
        assert r.pieces_per_s_min <= r.pieces_per_s <= r.pieces_per_s_max
        assert r.latency_ms["p50"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
        assert r.requests and r.requests_per_piece is not None, r.workload
        assert len(r.runs) == 2
    by = {(r.workload, r.size, r.concurrency): r for r in rows}
    assert by[("put_many", 4096, 1)].pieces_per_table is not None
    assert by[("get_many", 4096, 1)].batch == 10_000  # the headline's 10k random pieces
    assert by[("get_many", 4096, 1)].ttfb_ms is not None
    assert by[("direct_put", 4096, 16)].requests == {"PUT": by[("direct_put", 4096, 16)].pieces}


def test_quick_bench_writes_json_charts_and_tables(quick_memory: tuple[BenchResult, Path]) -> None:
    result, out = quick_memory
    path = result.json_path
    assert path is not None and path.parent == out and path.name.endswith("-quick.json")
    data = json.loads(path.read_text())
    assert data["meta"]["quick"] is True
    assert {"machine", "versions", "settings", "params", "providers"} <= set(data["meta"])
    assert data["meta"]["versions"]["piecestore"]
    assert all(set(row) >= ROW_FIELDS for row in data["rows"])
    assert {c["provider"] for c in data["headline"]} == {"memory"}
    for chart in result.chart_paths:
        assert chart.exists() and chart.read_bytes()[:4] == b"\x89PNG"
    assert len(result.chart_paths) == 2
    table = result.render_table()
    assert isinstance(table, Table) and "QUICK" in str(table.title)
    headers = [str(c.header) for c in table.columns]
    for name in ("Pieces/s", "MB/s", "p50", "p90", "p99", "max", "TTFB", "Errors", "Requests/piece"):
        assert name in headers
    assert isinstance(result.render_headline(), Table)


def test_bench_workload_filter(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown workload"):
        run_bench(["memory"], quick=True, out_dir=tmp_path, progress=False, workloads=["nope"])
    result = run_bench(
        ["memory"], quick=True, out_dir=tmp_path, progress=False, seconds_per_cell=0.04,
        workloads=["direct_*", "large_put"],
    )  # fmt: skip
    assert {r.workload for r in result.rows} == {"direct_put", "direct_get", "direct_delete", "large_put"}


def test_request_counting_on_a_driver() -> None:
    backend = open_backend("memory://bench-count")
    counter = instrument(backend, RequestCounter())
    backend.put("a", b"12345")
    backend.get("a")
    backend.get_ranges("a", [(0, 1), (3, 1)], gap=0)  # two requests
    backend.head("a")
    list(backend.list())
    backend.delete_many(["a", "b"])
    assert counter.method == "driver"
    assert counter.snapshot() == {"PUT": 1, "GET": 3, "HEAD": 1, "LIST": 1, "DELETE_BATCH": 1}


def test_http_request_kinds() -> None:
    base = "http://h:1/bucket/key"
    assert http_kind("GET", base) == "GET"
    assert http_kind("GET", "http://h:1/bucket?list-type=2&prefix=a") == "LIST"
    assert http_kind("PUT", base + "?partNumber=2&uploadId=x") == "PUT"
    assert http_kind("POST", "http://h:1/bucket?delete") == "DELETE_BATCH"
    assert http_kind("POST", base + "?uploads") == "MPU"
    assert http_kind("HEAD", base) == "HEAD"


def test_data_is_deterministic_and_verified() -> None:
    a, b = DataPool(8 << 20), DataPool(8 << 20)
    assert bytes(a.piece(4096, 7)) == bytes(b.piece(4096, 7)) != bytes(a.piece(4096, 8))
    a.verify("k", 4096, 7, bytes(b.piece(4096, 7)))
    a.verify("k", 2 << 20, 3, bytes(b.piece(2 << 20, 3)))
    with pytest.raises(VerifyError):
        a.verify("k", 4096, 7, bytes(a.piece(4096, 8)))
    assert piece_key(4096, 12) == "4KiB/00000012"


def test_join_url_keeps_the_query() -> None:
    assert join_url("s3://b/p?endpoint=http://h:1", "x/y") == "s3://b/p/x/y?endpoint=http://h:1"
    assert join_url("memory://n", "sub") == "memory://n/sub"


@pytest.mark.parametrize("driver", ["memory", "file", pytest.param("s3", marks=pytest.mark.s3),
                                    pytest.param("minio", marks=pytest.mark.s3)])  # fmt: skip
def test_check_passes_on_every_driver(
    driver: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    url = driver_url(driver, request, tmp_path_factory)
    options = s3_credentials() if driver in ("s3", "minio") else {}
    result = run_check(url, **options)
    failed = [(r.feature, r.detail) for r in result.rows if not r.ok]
    assert result.ok and not failed, failed
    assert len(result.rows) >= 18
    assert isinstance(result.render_table(), Table)
    with open_backend(url, **options) as backend:  # nothing left behind
        assert list(backend.list()) == []


def test_check_reports_an_unreachable_provider() -> None:
    result = run_check(
        "s3://piecestore-none/x?endpoint=http://127.0.0.1:9",
        access_key="k", secret_key="s", max_retries=0, connect_timeout=0.5,
    )  # fmt: skip
    assert not result.ok
    first, second = result.rows[1], result.rows[2]
    assert not first.ok and "BackendUnavailableError" in first.detail
    assert not second.ok and second.detail.startswith("not run")


def test_headline_states_the_round_trip_ceiling_of_threaded_puts() -> None:
    """16 threads x durable put is bounded by two sequential PUTs; the headline says how close."""
    from piecestore.bench.results import Row, headline

    def row(workload: str, concurrency: int, pieces_per_s: float, size: int = 4096) -> Row:
        return Row(
            "s3", "test", workload, "packed", size, concurrency, 1, pieces_per_s, pieces_per_s, pieces_per_s,
            pieces_per_s, pieces_per_s * size / 1e6, 0, 0, {}, None, "", False, {}, {}, None, "http", None,
            1.0, [], 0.0, 100,
        )  # fmt: skip

    rows = [row("put_many", 1, 20_000), row("put", 16, 1_000), row("direct_put", 1, 300),
            row("direct_put", 16, 1_500), row("large_put", 1, 30, size=64 << 20)]  # fmt: skip
    checks = {c.check: c for c in headline(rows)}
    assert checks["16 threads calling put vs put_many"].ratio == pytest.approx(0.05)
    ceiling = checks["16 threads calling put vs 16 / (2 one-object PUT latencies)"]
    assert ceiling.status == "INFO" and ceiling.ratio == pytest.approx(1_000 / 2_400)
    assert "0.12x put_many" in ceiling.figures
