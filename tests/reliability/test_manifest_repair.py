"""A damaged or lost manifest has a way back: the history every commit leaves, and fsck --repair.

Each commit that wins the compare-and-swap writes the bytes it committed to
``manifests/<version>.json`` before it is acknowledged, so restoring the newest readable copy
loses nothing acknowledged. These tests damage the manifest the way a bad disk or a stray write
would, and check that the store refuses to open, fsck names the damage and the version it can
restore, and --repair brings every acknowledged piece back without clobbering anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import piecestore
from piecestore import ConflictError, CorruptionError
from piecestore.backends import Backend, IfMatch, open_backend
from piecestore.backends.file import physical_path
from piecestore.backends.memory import drop_space
from piecestore.cli import EXIT_CORRUPT, app
from piecestore.errors import BackendUnavailableError
from piecestore.manifest import (
    HISTORY_KEEP,
    HISTORY_PRUNE_EVERY,
    MANIFEST_NAME,
    Manifest,
    ManifestStore,
    TableSpec,
    history_name,
    list_history,
)
from piecestore.repair import restore_manifest
from tests.conftest import s3_credentials
from tests.reliability._support import open_store, remote, s3_url


@pytest.fixture(autouse=True)
def no_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI reads no settings from the developer's environment or a config.toml."""
    for name in list(os.environ):
        if name.startswith(("PIECESTORE_", "AWS_", "MINIO_")) or name == "BUCKET_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIECESTORE_CONFIG", "")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(params=["file", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "file":
        yield "file://" + str(tmp_path / "store")
        return
    if request.param == "s3":
        creds = s3_credentials()  # for the CLI, which reads them from the environment
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["access_key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["secret_key"])
        yield s3_url(request.getfixturevalue("s3_server").endpoint)
        return
    space = f"repair-{uuid.uuid4().hex[:10]}"
    yield f"memory://{space}"
    drop_space(space)


def raw(url: str) -> Backend:
    """A second, independent handle on the store's objects."""
    return open_backend(url, **(s3_credentials() if remote(url) else {}))


def damage(url: str, name: str, edit: Any) -> None:
    """Rewrite an object's bytes: in place on disk (same inode, as a bad disk would), else a raw PUT."""
    if url.startswith("file://"):
        dirs, leaf = physical_path(name)
        path = Path(url[len("file://") :], *dirs, leaf)
        data = edit(bytearray(path.read_bytes()))
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
        return
    with raw(url) as backend:
        backend.put(name, bytes(edit(bytearray(backend.get(name)))))


def flip(url: str, name: str) -> None:
    def edit(data: bytearray) -> bytearray:
        data[len(data) // 2] ^= 0x10
        return data

    damage(url, name, edit)


def fill(url: str, batches: int = 4) -> tuple[dict[str, bytes], int, int]:
    """Several commits (so several versions); the values, the newest version and its sweep."""
    values: dict[str, bytes] = {}
    with open_store(url) as s:
        for b in range(batches):
            batch = {f"b{b}/{i:02d}": os.urandom(50 + i) for i in range(20)}
            s.put_many(batch)
            values.update(batch)
        s.put("single", b"one put")
        values["single"] = b"one put"
        return values, s.manifest.version, s.manifest.sweep


def cli(*args: str, code: int) -> Result:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (
        f"exit {result.exit_code} != {code}\nstdout: {result.stdout}\nstderr: {result.stderr}\n"
        f"exception: {result.exception!r}"
    )
    return result


def raw_get(url: str, name: str) -> bytes:
    with raw(url) as backend:
        return backend.get(name)


# -- the store cannot open; the CLI reports and repairs ------------------------------------------


def test_cli_fsck_reports_and_repair_restores_the_newest_version(url: str) -> None:
    values, version, sweep = fill(url)
    flip(url, MANIFEST_NAME)
    damaged = raw_get(url, MANIFEST_NAME)
    with pytest.raises(CorruptionError):
        piecestore.open(url)

    out = cli("-s", url, "fsck", code=EXIT_CORRUPT).stdout
    assert "PROBLEM manifest of" in out and "fails its checksum" in out
    assert f"`piecestore fsck --repair` can restore manifest version {version} " in out
    assert "nothing acknowledged is lost" in out
    report = json.loads(cli("-s", url, "fsck", "--json", code=EXIT_CORRUPT).stdout)
    assert report["restore"]["restored_version"] == version and not report["restore"]["written"]
    assert raw_get(url, MANIFEST_NAME) == damaged, "fsck without --repair must write nothing"

    out = cli("-s", url, "fsck", "--repair", code=0).stdout
    assert f"REPAIRED restored manifest version {version}" in out and "fsck: OK" in out
    with open_store(url) as s:
        assert s.get_many(list(values)) == values
        assert s.manifest.version > version and s.manifest.sweep == sweep + 1
        s.put("after", b"writes work again")
    assert "fsck: OK" in cli("-s", url, "fsck", code=0).stdout
    with open_store(url) as s:
        assert s.get("after") == b"writes work again"


def test_open_store_repairs_a_manifest_damaged_after_open(url: str) -> None:
    values, _, _ = fill(url)
    with open_store(url) as s:
        flip(url, MANIFEST_NAME)
        report = s.fsck()
        assert not report.ok and "--repair" in report.problems[0]
        report = s.fsck(repair=True)
        assert report.ok, report
        assert report.restore is not None and report.restore.written and report.restore.lossless
        assert s.manifest.version == report.restore.new_version  # refreshed onto the restored one
        assert s.get_many(list(values)) == values
        s.put("later", b"x")
    with open_store(url) as s:
        assert s.get("later") == b"x" and s.get_many(list(values)) == values


def test_a_deleted_manifest_is_not_mistaken_for_an_empty_store(url: str) -> None:
    values, version, _ = fill(url)
    with raw(url) as backend:
        backend.delete(MANIFEST_NAME)
    with pytest.raises(CorruptionError, match="fsck --repair"):
        piecestore.open(url)
    out = cli("-s", url, "fsck", code=EXIT_CORRUPT).stdout
    assert "is missing" in out and f"can restore manifest version {version} " in out
    cli("-s", url, "fsck", "--repair", code=0)
    with open_store(url) as s:
        assert s.get_many(list(values)) == values


def test_repair_with_the_newest_copy_damaged_restores_the_one_before(url: str) -> None:
    values, version, _ = fill(url)
    flip(url, MANIFEST_NAME)
    flip(url, history_name(version))
    out = cli("-s", url, "fsck", "--repair", code=EXIT_CORRUPT).stdout  # restored, but lossy
    assert f"REPAIRED restored manifest version {version - 1}" in out
    assert f"newer committed version(s) {version} are lost" in out
    assert f"history copy damaged: {history_name(version)}" in out
    with open_store(url) as s:
        assert s.get_many([k for k in values if k != "single"]) == {
            k: v for k, v in values.items() if k != "single"
        }
        assert not s.exists("single")  # the one lost commit: the report said so
    cli("-s", url, "fsck", code=0)


def test_nothing_to_restore_from_says_so(url: str) -> None:
    fill(url)
    with raw(url) as backend:
        backend.delete_many([m.name for _, m in list_history(backend)])
    flip(url, MANIFEST_NAME)
    out = cli("-s", url, "fsck", "--repair", code=EXIT_CORRUPT).stdout
    assert "no history copy of it is readable" in out and "backup" in out


def test_sharded_store_with_a_damaged_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shards = [str(tmp_path / f"s{i}") for i in range(2)]
    monkeypatch.setenv("PIECESTORE_SHARDING__TARGETS", ",".join(shards))
    for i in range(12):
        cli("put", f"k{i:02d}", "-", code=0)
    flip("file://" + shards[0], MANIFEST_NAME)
    cli("ls", code=EXIT_CORRUPT)
    report = json.loads(cli("fsck", "--json", code=EXIT_CORRUPT).stdout)
    assert [r["ok"] for r in report["shards"]] == [False, True]
    assert "--repair" in report["shards"][0]["problems"][0]
    report = json.loads(cli("fsck", "--repair", "--json", code=0).stdout)
    assert report["shards"][0]["restore"]["written"] and report["shards"][1]["restore"] is None
    assert cli("ls", code=0).stdout.split() == [f"k{i:02d}" for i in range(12)]


# -- restore_manifest: the sweep fence and concurrent changes ------------------------------------


def _spec(i: int) -> TableSpec:
    return TableSpec(f"{i:032x}", 1, 100, 40, 10, 60)


def test_repair_never_lowers_sweep_or_version() -> None:
    space = f"sweep-{uuid.uuid4().hex[:8]}"
    try:
        with open_backend(f"memory://{space}") as raw:
            ms = ManifestStore(raw)
            ms.commit(lambda m: dataclasses.replace(m, sweep=9))  # v1: sweep 9
            ms.commit(lambda m: dataclasses.replace(m, sweep=3, tables=(_spec(1),)))  # v2: sweep 3
            current = raw.get(MANIFEST_NAME)
            raw.put(MANIFEST_NAME, current.replace(b'"sweep":3', b'"sweep":4'))  # damaged, claims 4
            report = restore_manifest(raw)
            restored = ms.read().manifest
            assert report.restored_version == 2 and report.lossless
            assert restored.sweep == 10 == report.new_sweep  # above every copy, v1's 9 included
            assert restored.version == 3 and restored.tables == (_spec(1),)
            assert report.missing_tables == [_spec(1).name]  # listed, never written: reported

            # The damaged manifest's own (unverified) numbers are stayed above too.
            data = raw.get(MANIFEST_NAME)
            claims = data.replace(b'"sweep":10', b'"sweep":70').replace(b'"version":3', b'"version":80')
            raw.put(MANIFEST_NAME, claims)
            restore_manifest(raw)
            assert (ms.read().manifest.sweep, ms.read().manifest.version) == (71, 81)
            assert raw.get(history_name(81)) == raw.get(MANIFEST_NAME)  # the repair is history too
    finally:
        drop_space(space)


@pytest.mark.parametrize("meanwhile", ["fixed", "damaged again"])
def test_repair_never_clobbers_a_manifest_that_changed_under_it(meanwhile: str) -> None:
    space = f"clobber-{uuid.uuid4().hex[:8]}"
    try:
        with open_backend(f"memory://{space}") as raw:
            ms = ManifestStore(raw)
            for i in range(3):
                ms.commit(lambda m, i=i: dataclasses.replace(m, tables=(_spec(i), *m.tables)))
            good = raw.get(MANIFEST_NAME)
            raw.put(MANIFEST_NAME, good[:-5])
            concurrent = good if meanwhile == "fixed" else good[:-7]
            original_put = raw.put

            def racing_put(name: str, data: Any, *, mode: Any = "overwrite") -> Any:
                if name == MANIFEST_NAME and isinstance(mode, IfMatch):
                    original_put(MANIFEST_NAME, concurrent)  # another process got there first
                return original_put(name, data, mode=mode)

            raw.put = racing_put  # type: ignore[method-assign]
            if meanwhile == "fixed":
                report = restore_manifest(raw)
                assert not report.written and "changed during the restore" in report.notes[0]
            else:
                with pytest.raises(ConflictError, match="changed while it was being restored"):
                    restore_manifest(raw)
            assert raw.get(MANIFEST_NAME) == concurrent
    finally:
        drop_space(space)


# -- the history itself --------------------------------------------------------------------------


def test_first_commit_is_in_the_history(url: str) -> None:
    with open_store(url) as s:
        s.put("k", b"v")
        assert s.manifest.version == 1
    assert raw_get(url, history_name(1)) == raw_get(url, MANIFEST_NAME)


def test_history_holds_only_winning_commits(url: str) -> None:
    """Writers racing for each version: every history copy holds the winner's bytes, the bytes
    readers saw at that version, and no losing attempt's."""
    winners: dict[int, bytes] = {}
    losers: list[bytes] = []
    seen: dict[int, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    handles: list[Backend] = [raw(url) for _ in range(4)]

    def recording(backend: Backend) -> None:
        original = backend.put

        def put(name: str, data: Any, *, mode: Any = "overwrite") -> Any:
            try:
                meta = original(name, data, mode=mode)
            except Exception:
                if name == MANIFEST_NAME:
                    with lock:
                        losers.append(bytes(data))
                raise
            if name == MANIFEST_NAME:
                with lock:
                    winners[Manifest.from_bytes(bytes(data), "test").version] = bytes(data)
            return meta

        backend.put = put  # type: ignore[method-assign]

    def writer(n: int, backend: Backend) -> None:
        ms = ManifestStore(backend, commit_retries=10_000)

        def change(m: Manifest) -> Manifest:
            time.sleep(0.0005)  # widen the read-to-CAS window so writers really collide
            return dataclasses.replace(m, tables=(_spec(n * 1000 + len(m.tables)), *m.tables))

        for _ in range(25):
            ms.commit(change)

    def reader() -> None:
        with raw(url) as backend:
            while not stop.is_set():
                try:
                    data = backend.get(MANIFEST_NAME)
                except FileNotFoundError:
                    continue
                seen.setdefault(Manifest.from_bytes(data, "test").version, data)

    for h in handles:
        recording(h)
    watcher = threading.Thread(target=reader)
    watcher.start()
    threads = [threading.Thread(target=writer, args=(n, h)) for n, h in enumerate(handles)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    try:
        assert losers, "no commit lost a race: the test did not exercise conflicts"
        assert sorted(winners) == list(range(1, 101))
        with raw(url) as backend:
            history = {v: backend.get(m.name) for v, m in list_history(backend)}
        pruned_at = 100 // HISTORY_PRUNE_EVERY * HISTORY_PRUNE_EVERY  # keeps the HISTORY_KEEP up to it
        assert set(range(pruned_at - HISTORY_KEEP + 1, 101)) <= set(history), sorted(history)
        assert len(history) <= HISTORY_KEEP + HISTORY_PRUNE_EVERY
        assert all(history[v] == winners[v] for v in history)
        assert not set(losers) & set(history.values())
        assert all(seen[v] == history[v] for v in seen if v in history)
    finally:
        for h in handles:
            h.close()


def test_pruning_keeps_history_bounded_and_touches_only_history_names() -> None:
    space = f"prune-{uuid.uuid4().hex[:8]}"
    decoys = [
        "manifests/1.json",
        "manifests/00000000000000000001.json.bak",
        "manifests/sub/00000000000000000001.json",
        "manifests/0000000000000000000x.json",
        "manifests/manifest.json",
    ]
    try:
        with open_backend(f"memory://{space}") as raw:
            for name in decoys:
                raw.put(name, b"not ours")
            ms = ManifestStore(raw)
            most = 0
            for i in range(200):
                ms.commit(lambda m, i=i: dataclasses.replace(m, tables=(_spec(i),)))
                most = max(most, len(list_history(raw)))
            versions = [v for v, _ in list_history(raw)]
            assert most <= HISTORY_KEEP + HISTORY_PRUNE_EVERY
            assert versions[-HISTORY_KEEP:] == list(range(200 - HISTORY_KEEP + 1, 201))
            assert all(raw.exists(name) for name in decoys)

            # A failing prune never fails a commit; the next prune catches up.
            original = raw.delete_many

            def failing(names: Any) -> None:
                raise BackendUnavailableError("simulated outage")

            raw.delete_many = failing  # type: ignore[method-assign]
            for i in range(2 * HISTORY_PRUNE_EVERY):
                ms.commit(lambda m, i=i: dataclasses.replace(m, tables=(_spec(i),)))
            assert len(list_history(raw)) > HISTORY_KEEP + HISTORY_PRUNE_EVERY
            raw.delete_many = original  # type: ignore[method-assign]
            for i in range(HISTORY_PRUNE_EVERY):
                ms.commit(lambda m, i=i: dataclasses.replace(m, tables=(_spec(i),)))
            assert len(list_history(raw)) <= HISTORY_KEEP + HISTORY_PRUNE_EVERY
    finally:
        drop_space(space)


def test_a_history_copy_left_from_an_abandoned_past_is_replaced() -> None:
    """The manifest put back to an older version by hand: the next commits own those versions."""
    space = f"past-{uuid.uuid4().hex[:8]}"
    try:
        with open_backend(f"memory://{space}") as raw:
            ms = ManifestStore(raw)
            for i in range(3):
                ms.commit(lambda m, i=i: dataclasses.replace(m, tables=(_spec(i),)))
            raw.put(MANIFEST_NAME, raw.get(history_name(1)))  # rolled back to version 1
            view = ms.commit(lambda m: dataclasses.replace(m, tables=(_spec(7),)))
            assert view.manifest.version == 2
            assert raw.get(history_name(2)) == raw.get(MANIFEST_NAME)
    finally:
        drop_space(space)


def test_a_commit_whose_version_was_won_twice_is_not_acknowledged() -> None:
    """A backend that ignores If-Match lets two writers "win" one version; the history create
    is a second arbiter, and the commit that readers do not see fails instead of returning."""
    space = f"twice-{uuid.uuid4().hex[:8]}"
    try:
        with open_backend(f"memory://{space}") as raw:
            ms = ManifestStore(raw)
            ms.commit(lambda m: dataclasses.replace(m, tables=(_spec(0),)))
            original_put = raw.put

            def rival_wins_too(name: str, data: Any, *, mode: Any = "overwrite") -> Any:
                meta = original_put(name, data, mode=mode)
                if name == MANIFEST_NAME:  # the rival commits version 2 as well, just after us
                    rival = dataclasses.replace(Manifest.from_bytes(bytes(data), "t"), tables=(_spec(9),))
                    original_put(MANIFEST_NAME, rival.to_bytes())
                    original_put(history_name(rival.version), rival.to_bytes(), mode="create")
                return meta

            raw.put = rival_wins_too  # type: ignore[method-assign]
            with pytest.raises(ConflictError, match="committed twice"):
                ms.commit(lambda m: dataclasses.replace(m, tables=(_spec(1), *m.tables)))
    finally:
        drop_space(space)
