"""The piecestore command: every command's happy path, --json output, and the exit-code contract.

Most tests run in-process with typer's CliRunner (memory:// stores persist between invocations
there); the exit-code tests also run the installed console script in a real subprocess.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from piecestore.cli import (
    EXIT_CORRUPT,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    app,
    exit_code_for,
    mask_url,
)
from piecestore.errors import (
    BackendUnavailableError,
    ConfigError,
    ConflictError,
    CorruptionError,
    InvalidKeyError,
    LayoutMismatchError,
    NotFoundError,
    PermissionDeniedError,
    ReadOnlyError,
)

COMMANDS = [
    ["put"], ["get"], ["cat"], ["ls"], ["rm"], ["stat"], ["profile"], ["gc"], ["fsck"],
    ["bench"], ["check"], ["reshard"], ["config"], ["config", "show"], ["demo"],
]  # fmt: skip

_ENV_PREFIXES = ("PIECESTORE_", "AWS_", "MINIO_")
_ENV_NAMES = ("BUCKET_URL",)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES) and k not in _ENV_NAMES}
    env["PIECESTORE_CONFIG"] = ""  # no config file, whatever the working directory holds
    return env


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No settings from the developer's environment or a config.toml; cwd is a fresh directory."""
    for name in list(os.environ):
        if name.startswith(_ENV_PREFIXES) or name in _ENV_NAMES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIECESTORE_CONFIG", "")
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(params=["file", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return "file://" + str(tmp_path / "store")
    return f"memory://cli-{uuid.uuid4().hex[:10]}"


def run(runner: CliRunner, *args: str, input: bytes | str | None = None, code: int = 0) -> Result:
    result = runner.invoke(app, list(args), input=input)
    assert result.exit_code == code, (
        f"exit {result.exit_code} != {code}\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
        f"exception: {result.exception!r}"
    )
    return result


# -- help and the exit-code contract ---------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_exit_codes(runner: CliRunner, command: list[str]) -> None:
    result = run(runner, *command, "--help")
    assert "Usage" in result.stdout
    assert "Exit codes" in result.stdout
    leaf = command != ["config"]
    if leaf and command != ["check"]:
        assert "--store" in result.stdout
    if leaf:
        assert "--debug" in result.stdout


def test_root_help_lists_exit_codes(runner: CliRunner) -> None:
    out = " ".join(run(runner, "--help").stdout.split())  # undo the help's line wrapping
    for code in ("0 ok", "1 piece or object not found", "2 usage", "3 corruption", "4 backend", "5 any"):
        assert code in out
    assert run(runner, "--version").stdout.startswith("piecestore ")


def test_exit_code_mapping() -> None:
    assert exit_code_for(NotFoundError("x")) == 1
    assert exit_code_for(ConfigError("x")) == 2
    assert exit_code_for(LayoutMismatchError("x")) == 2
    assert exit_code_for(InvalidKeyError("x")) == 2
    assert exit_code_for(CorruptionError("x")) == 3
    assert exit_code_for(BackendUnavailableError("x")) == 4
    assert exit_code_for(PermissionDeniedError("x")) == 4
    assert exit_code_for(ReadOnlyError("x")) == 4
    assert exit_code_for(ConflictError("x")) == 5


# -- piece commands ----------------------------------------------------------------------------


def test_put_get_cat_ls_stat_rm(runner: CliRunner, url: str, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 4 + b"\r\n\x00end"
    src = tmp_path / "blob.bin"
    src.write_bytes(blob)
    put = json.loads(run(runner, "put", "a/file", str(src), "-s", url, "--json").stdout)
    assert put["key"] == "a/file" and put["size"] == len(blob) and not put["external"]
    assert "packed" in run(runner, "put", "a/stdin", "-", "-s", url, input=b"from stdin").stdout
    run(runner, "put", "b/default-stdin", "-s", url, input=b"xyz")

    assert run(runner, "get", "a/file", "-s", url).stdout_bytes == blob
    assert (
        run(runner, "get", "a/file", "-s", url, "--offset", "256", "--length", "3").stdout_bytes == b"\0\1\2"
    )
    out = tmp_path / "out.bin"
    assert run(runner, "get", "a/stdin", "-o", str(out), "-s", url).stdout_bytes == b""
    assert out.read_bytes() == b"from stdin"
    assert run(runner, "cat", "a/stdin", "b/default-stdin", "a/stdin", "-s", url).stdout_bytes == (
        b"from stdinxyzfrom stdin"
    )

    assert run(runner, "ls", "-s", url).stdout.splitlines() == ["a/file", "a/stdin", "b/default-stdin"]
    assert run(runner, "ls", "a/", "-s", url).stdout.splitlines() == ["a/file", "a/stdin"]
    assert run(runner, "ls", "-s", url, "--limit", "1").stdout.splitlines() == ["a/file"]
    assert run(runner, "ls", "-0", "-s", url).stdout == "a/file\0a/stdin\0b/default-stdin\0"
    long = run(runner, "ls", "--long", "-s", url).stdout.splitlines()
    assert long[0].split()[0] == str(len(blob)) and long[0].endswith("a/file")
    listed = json.loads(run(runner, "ls", "--json", "-s", url).stdout)
    assert [(i["key"], i["size"]) for i in listed] == [
        ("a/file", len(blob)), ("a/stdin", 10), ("b/default-stdin", 3),
    ]  # fmt: skip
    assert json.loads(run(runner, "ls", "nothing/", "--json", "-s", url).stdout) == []

    info = json.loads(run(runner, "stat", "a/file", "--json", "-s", url).stdout)
    assert info["size"] == len(blob) and len(info["checksum"]) == 16 and info["table"]
    human = run(runner, "stat", "a/file", "-s", url).stdout
    assert "size" in human and f"{len(blob):,}" in human

    assert json.loads(run(runner, "rm", "a/stdin", "nope", "--json", "-s", url).stdout) == {"deleted": 2}
    assert run(runner, "ls", "-s", url).stdout.splitlines() == ["a/file", "b/default-stdin"]
    run(runner, "rm", "--stdin", "-s", url, input="a/file\nb/default-stdin\n")
    assert run(runner, "ls", "-s", url).stdout == ""


def test_large_piece_streams_to_its_own_object(
    runner: CliRunner, url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIECESTORE_ENGINE__SMALL_PIECE_MAX_BYTES", "1KiB")
    big = os.urandom(300_000)
    (tmp_path / "big").write_bytes(big)
    info = json.loads(run(runner, "put", "big", str(tmp_path / "big"), "-s", url, "--json").stdout)
    assert info["external"] and info["size"] == len(big)
    assert run(runner, "get", "big", "-s", url).stdout_bytes == big
    assert "large" in run(runner, "ls", "-l", "-s", url).stdout


def test_not_found_exit_1(runner: CliRunner, url: str) -> None:
    run(runner, "put", "here", "-s", url, input=b"1")
    for args in (["get", "gone"], ["stat", "gone"], ["cat", "here", "gone"]):
        result = run(runner, *args, "-s", url, code=EXIT_NOT_FOUND)
        assert result.stderr.startswith("piecestore: error: NotFoundError:")
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    result = run(runner, "rm", "--strict", "here", "gone", "-s", url, code=EXIT_NOT_FOUND)
    assert "'gone'" in result.stderr
    assert run(runner, "ls", "-s", url).stdout == "here\n"  # --strict deleted nothing


def test_read_commands_do_not_create_a_store(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-store"
    run(runner, "ls", "-s", str(missing), code=EXIT_NOT_FOUND)
    run(runner, "get", "k", "-s", str(missing), code=EXIT_NOT_FOUND)
    assert not missing.exists()


def test_usage_and_config_errors_exit_2(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run(runner, "ls", "-s", "bogus://x", code=EXIT_USAGE)
    assert "unknown scheme" in result.stderr and "--store" in result.stderr
    run(runner, "ls", "-s", "file://./relative", code=EXIT_USAGE)
    run(runner, "ls", "-c", str(tmp_path / "missing.toml"), code=EXIT_USAGE)
    run(runner, "put", "", "-s", "memory://x", input=b"1", code=EXIT_USAGE)  # empty key
    run(runner, "put", "k", str(tmp_path / "no-such-file"), "-s", "memory://x", code=EXIT_USAGE)
    run(runner, "rm", "-s", "memory://x", code=EXIT_USAGE)  # no keys
    run(runner, "ls", "--no-such-option", code=EXIT_USAGE)
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nflush_count = 0\n")
    result = run(runner, "ls", "-c", str(bad), code=EXIT_USAGE)
    assert "engine.flush_count" in result.stderr and len(result.stderr.splitlines()) == 1
    monkeypatch.setenv("PIECESTORE_GC__GRACE_SECONDS", "-1")
    assert "gc.grace_seconds" in run(runner, "ls", "-s", "memory://x", code=EXIT_USAGE).stderr


def test_read_only_store_exit_4(runner: CliRunner, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    run(runner, "put", "k", "-s", url, input=b"1")
    monkeypatch.setenv("PIECESTORE_STORE__READ_ONLY", "true")
    result = run(runner, "put", "k2", "-s", url, input=b"1", code=EXIT_UNAVAILABLE)
    assert "read-only" in result.stderr
    assert run(runner, "get", "k", "-s", url).stdout_bytes == b"1"


def _corrupt_first_table(root: Path) -> None:
    tables = sorted((root / "tables").iterdir())
    assert tables, "no table files written"
    path = tables[0]
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
    data = bytearray(path.read_bytes())
    data[30] ^= 0xFF  # inside the first record's value
    path.write_bytes(bytes(data))


def test_corruption_exit_3(runner: CliRunner, tmp_path: Path) -> None:
    root = tmp_path / "store"
    url = str(root)
    run(runner, "put", "k", "-s", url, input=b"v" * 100)
    assert json.loads(run(runner, "fsck", "--json", "-s", url).stdout)["ok"] is True
    assert "OK" in run(runner, "fsck", "-s", url).stdout
    _corrupt_first_table(root)
    result = run(runner, "get", "k", "-s", url, code=EXIT_CORRUPT)
    assert result.stderr.startswith("piecestore: error: CorruptionError:") and result.stdout_bytes == b""
    out = tmp_path / "out"
    run(runner, "get", "k", "-o", str(out), "-s", url, code=EXIT_CORRUPT)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))  # no partial output left behind
    report = json.loads(run(runner, "fsck", "--json", "-s", url, code=EXIT_CORRUPT).stdout)
    assert report["ok"] is False and report["problems"]


# -- store commands ----------------------------------------------------------------------------


def test_profile(runner: CliRunner, url: str, tmp_path: Path) -> None:
    for i, size in enumerate((0, 10, 100, 1000)):
        run(runner, "put", f"k{i}", "-s", url, input=b"x" * size)
    data = json.loads(run(runner, "profile", "--json", "-s", url).stdout)
    assert data["pieces"] == 4 and data["piece_bytes"] == 1110
    assert data["tables"]["count"] == 4 and data["manifest"]["version"] == 4
    assert sum(r["count"] for r in data["histogram"]) == 4
    human = run(runner, "profile", "-s", url).stdout
    assert "piece sizes" in human and "index RAM" in human
    png = tmp_path / "p.png"
    result = run(runner, "profile", "--fast", "--plot", str(png), "--json", "-s", url)
    assert json.loads(result.stdout)["exact"] is False
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_gc_dry_run_then_delete(runner: CliRunner, url: str) -> None:
    run(runner, "put", "k", "-s", url, input=b"1")
    run(runner, "put", "k", "-s", url, input=b"2")
    run(runner, "rm", "k", "-s", url)
    dry = json.loads(run(runner, "gc", "--json", "-s", url).stdout)
    assert dry["dry_run"] is True
    assert json.loads(run(runner, "profile", "--json", "-s", url).stdout)["tables"]["count"] == 3
    assert "dry run" in run(runner, "gc", "-s", url).stdout
    done = json.loads(run(runner, "gc", "--delete", "--json", "-s", url).stdout)
    assert done["dry_run"] is False
    assert run(runner, "ls", "-s", url).stdout == ""


def test_options_before_the_command(runner: CliRunner, url: str) -> None:
    """The README's form: `piecestore -s URL put ...`; an option after the command wins."""
    run(runner, "-s", url, "put", "k", input=b"v")
    assert run(runner, "-s", url, "ls").stdout == "k\n"
    assert run(runner, "-s", "memory://elsewhere-x", "ls", "-s", url).stdout == "k\n"
    assert "Traceback" in run(runner, "--debug", "-s", url, "get", "nope", code=EXIT_NOT_FOUND).stderr


def test_sharded_store(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = [str(tmp_path / f"s{i}") for i in range(3)]
    monkeypatch.setenv("PIECESTORE_SHARDING__TARGETS", ",".join(shards[:2]))
    for i in range(12):
        run(runner, "put", f"k{i:02d}", input=b"v" * i)
    assert run(runner, "ls").stdout.split() == [f"k{i:02d}" for i in range(12)]
    prof = json.loads(run(runner, "profile", "--json").stdout)
    assert prof["pieces"] == 12 and prof["manifest"]["version"] is None
    assert [s["url"] for s in prof["shards"]] == ["file://" + s for s in shards[:2]]
    assert sum(s["pieces"] for s in prof["shards"]) == 12
    fsck = json.loads(run(runner, "fsck", "--json").stdout)
    assert len(fsck["shards"]) == 2 and all(r["ok"] for r in fsck["shards"])
    assert len(json.loads(run(runner, "gc", "--json").stdout)["shards"]) == 2

    # The usual reshard: name the new targets in the configuration, then run reshard.
    monkeypatch.setenv("PIECESTORE_SHARDING__TARGETS", ",".join(shards))
    assert "LayoutMismatchError" in run(runner, "ls", code=EXIT_USAGE).stderr
    run(runner, "reshard", code=EXIT_USAGE)  # no --yes and stdin is not a terminal
    report = json.loads(run(runner, "reshard", "--yes", "--grace", "0", "--json").stdout)
    assert report["keys_examined"] == 12 and report["new_targets"] == shards
    assert sum(report["counts_after"].values()) == 12
    assert run(runner, "ls").stdout.split() == [f"k{i:02d}" for i in range(12)]
    assert run(runner, "cat", "k03", "k05").stdout_bytes == b"v" * 8
    human = run(runner, "reshard", *shards[:1], "--yes", "--grace", "0").stdout
    assert "keys_moved" in human


def test_reshard_needs_a_sharded_store(runner: CliRunner) -> None:
    result = run(runner, "reshard", "memory://a", "memory://b", "--yes", "-s", "memory://x", code=EXIT_USAGE)
    assert "not sharded" in result.stderr


def test_check(runner: CliRunner, tmp_path: Path) -> None:
    import piecestore.cli as cli

    try:
        cli._bench_function("run_check")
    except BaseException:
        pytest.skip("piecestore.bench.run_check is not available")
    report = json.loads(run(runner, "check", str(tmp_path / "probe"), "--json").stdout)
    assert report["ok"] is True and report["rows"]
    # The first failing step names a ConfigError: a usage error.
    result = run(runner, "check", str(tmp_path / "probe"), "--set", "no_such_option=1", code=EXIT_USAGE)
    assert "no_such_option" in result.stdout


def test_bench_runs_one_tiny_cell(runner: CliRunner, tmp_path: Path) -> None:
    import piecestore.cli as cli

    try:
        cli._bench_function("run_bench")
    except BaseException:
        pytest.skip("piecestore.bench.run_bench is not available")
    out = tmp_path / "bench"
    args = ["memory", "--quick", "--seconds", "0.02", "-w", "direct_put", "--out", str(out), "--json"]
    result = json.loads(run(runner, "bench", *args).stdout)
    assert result["rows"] and {"meta", "rows", "headline"} <= set(result)
    assert list(out.glob("*.json"))
    run(runner, "bench", "memory", "-w", "no_such_workload", "--out", str(out), code=EXIT_USAGE)


# -- settings ----------------------------------------------------------------------------------


def test_config_show_masks_secrets(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    secret, token = "Sup3rS3cretValue!", "T0kenValue-xyz"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("PIECESTORE_S3__SESSION_TOKEN", token)
    monkeypatch.setenv("PIECESTORE_S3__ACCESS_KEY", "AKIDEXAMPLE")
    monkeypatch.setenv("PIECESTORE_GC__GRACE_SECONDS", "7")
    for args in (["config", "show"], ["config", "show", "--json"]):
        result = run(runner, *args)
        assert (
            secret not in result.output and token not in result.output and "AKIDEXAMPLE" not in result.output
        )
        assert "***" in result.output
    data = json.loads(run(runner, "config", "show", "--json").stdout)
    assert data["s3"]["secret_key"] == "***" and data["gc"]["grace_seconds"] == 7
    assert data["store"]["url"] == "./piecestore-data"  # the default store
    human = run(runner, "config", "show", "-s", "minio://user:pw-secret-1@127.0.0.1:9000/b").stdout
    assert "pw-secret-1" not in human and 'url = "minio://user:***@127.0.0.1:9000/b"' in human


def test_mask_url() -> None:
    assert mask_url("s3://b/p?endpoint=http://h&secret_key=abc&region=x") == (
        "s3://b/p?endpoint=http://h&secret_key=***&region=x"
    )
    assert mask_url("minio://u:p4ss@h:9000/b") == "minio://u:***@h:9000/b"
    assert mask_url("./relative/path") == "./relative/path"
    assert mask_url("memory://x") == "memory://x"


def test_store_option_overrides_configured_sharding(runner: CliRunner, tmp_path: Path) -> None:
    cfg = tmp_path / "sharded.toml"
    cfg.write_text('[sharding]\ntargets = ["memory://s0", "memory://s1"]\n')
    data = json.loads(run(runner, "config", "show", "--json", "-c", str(cfg), "-s", "memory://one").stdout)
    assert data["sharding"]["targets"] == [] and data["store"]["url"] == "memory://one"


# -- demo --------------------------------------------------------------------------------------


def test_demo_on_the_default_store(runner: CliRunner, tmp_path: Path) -> None:
    result = run(
        runner, "demo", "--pieces", "400", "--large", "2", "--large-size", "100000", "--threads", "4"
    )
    assert "verified 442 pieces byte for byte" in result.stdout
    assert "throughput" in result.stdout and "piece sizes" in result.stdout
    assert (tmp_path / "piecestore-data" / "tables").is_dir()  # ./piecestore-data, from the cwd
    data = json.loads(
        run(runner, "demo", "--pieces", "200", "--large", "1", "--large-size", "50000", "--json").stdout
    )
    assert data["written"] == 221 and data["remaining"] == 221 - data["deleted"]
    assert data["phases"][0]["phase"] == "put_many (small)"
    assert data["profile"]["pieces"] >= data["remaining"]


# -- real processes: the exit codes a shell sees -------------------------------------------------


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "piecestore"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from piecestore.cli import main; main()"]


def sh(*args: str, cwd: Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*_cli(), *args], cwd=cwd, input=input, capture_output=True, env=_clean_env(), timeout=120
    )


@pytest.fixture
def subprocess_store(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "store")


def test_subprocess_exit_codes(tmp_path: Path, subprocess_store: str) -> None:
    s = subprocess_store
    blob = os.urandom(5000) + b"\n\r\n\x00"
    assert sh("put", "k", "-s", s, cwd=tmp_path, input=blob).returncode == 0
    got = sh("get", "k", "-s", s, cwd=tmp_path)
    assert got.returncode == 0 and got.stdout == blob

    missing = sh("get", "missing", "-s", s, cwd=tmp_path)
    assert missing.returncode == 1 and missing.stdout == b""
    assert missing.stderr.decode().count("\n") == 1 and b"Traceback" not in missing.stderr

    debug = sh("get", "missing", "-s", s, "--debug", cwd=tmp_path)
    assert debug.returncode == 1 and b"Traceback" in debug.stderr

    assert sh("ls", "-s", "bogus://nowhere", cwd=tmp_path).returncode == 2
    assert sh("ls", "--bad-flag", cwd=tmp_path).returncode == 2
    assert sh(cwd=tmp_path).returncode == 2  # no command: help, and a usage exit

    _corrupt_first_table(Path(s))
    assert sh("get", "k", "-s", s, cwd=tmp_path).returncode == 3
    assert sh("fsck", "-s", s, cwd=tmp_path).returncode == 3


def test_subprocess_default_store_and_config_file(tmp_path: Path) -> None:
    assert sh("put", "k", cwd=tmp_path, input=b"v").returncode == 0
    assert (tmp_path / "piecestore-data").is_dir()
    (tmp_path / "config.toml").write_text(f'[store]\nurl = "{tmp_path / "elsewhere"}"\n')
    env_cfg = _clean_env()
    del env_cfg["PIECESTORE_CONFIG"]  # ./config.toml is read when present
    proc = subprocess.run(
        [*_cli(), "ls"], cwd=tmp_path, capture_output=True, env=env_cfg, timeout=60, check=False
    )
    assert proc.returncode == 1  # the configured store does not exist, and ls must not create it
    assert b"elsewhere" in proc.stderr
