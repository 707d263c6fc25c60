"""Where the piecestore command writes its output: ``get -o -`` means standard output."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from piecestore.cli import app


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith(("PIECESTORE_", "AWS_", "MINIO_")) or name == "BUCKET_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIECESTORE_CONFIG", "")
    monkeypatch.chdir(tmp_path)


def test_get_dash_o_dash_writes_to_stdout(tmp_path: Path) -> None:
    runner = CliRunner()
    url = f"memory://out-{uuid.uuid4().hex[:10]}"
    blob = os.urandom(3000) + b"\n\x00"
    assert runner.invoke(app, ["-s", url, "put", "k"], input=blob).exit_code == 0

    result = runner.invoke(app, ["-s", url, "get", "k", "-o", "-"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes == blob
    assert not (tmp_path / "-").exists(), "`-o -` created a file named '-'"

    result = runner.invoke(app, ["-s", url, "get", "k", "--output", "-", "--offset", "5", "--length", "7"])
    assert result.exit_code == 0 and result.stdout_bytes == blob[5:12]

    result = runner.invoke(app, ["-s", url, "get", "k", "-o", "copy.bin"])  # a file still works
    assert result.exit_code == 0 and result.stdout_bytes == b""
    assert (tmp_path / "copy.bin").read_bytes() == blob
