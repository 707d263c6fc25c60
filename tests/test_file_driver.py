"""What only the file driver must get right: containment, layout, crash safety, URLs."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from piecestore.backends import IfMatch, open_backend
from piecestore.backends import file as filemod
from piecestore.backends.file import FileBackend
from piecestore.errors import (
    ConfigError,
    InvalidKeyError,
    NotFoundError,
    PermissionDeniedError,
    PieceStoreError,
    PreconditionFailedError,
    ReadOnlyError,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[FileBackend]:
    with open_backend(f"file://{root}") as b:
        assert isinstance(b, FileBackend)
        yield b


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# -- containment --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", "../x", "a/../../x", "/etc/passwd", "a/./b", "nul\x00x", "a//b"])
def test_escaping_names_are_refused_before_touching_disk(
    store: FileBackend, root: Path, tmp_path: Path, name: str
) -> None:
    before = _tree(tmp_path)
    for call in (lambda: store.put(name, b"x"), lambda: store.get(name), lambda: store.delete(name)):
        with pytest.raises(InvalidKeyError):
            call()
    assert _tree(tmp_path) == before


def test_symlinked_directory_cannot_lead_outside(store: FileBackend, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PermissionDeniedError, match="symlink"):
        store.put("evil/x", b"written outside?")
    assert list(outside.iterdir()) == []
    (outside / "x%obj").write_bytes(b"secret")
    for call in (lambda: store.get("evil/x"), lambda: store.head("evil/x"), lambda: store.delete("evil/x")):
        with pytest.raises(PermissionDeniedError, match="symlink"):
            call()
    assert (outside / "x%obj").read_bytes() == b"secret"
    assert list(store.list()) == []


def test_symlinked_object_file_is_never_followed(store: FileBackend, root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not read")
    (root / "leak%obj").symlink_to(secret)
    with pytest.raises(PermissionDeniedError, match="symlink"):
        store.get("leak")
    with pytest.raises(PermissionDeniedError, match="symlink"):
        store.head("leak")
    assert list(store.list()) == []
    store.put("leak", b"mine")  # replaces the link itself, not its target
    assert store.get("leak") == b"mine" and secret.read_bytes() == b"do not read"
    assert not (root / "leak%obj").is_symlink()


def test_symlinked_root_is_allowed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with open_backend(str(tmp_path / "link")) as b:
        b.put("k", b"v")
        assert b.get("k") == b"v"
    assert (real / "k%obj").read_bytes() == b"v"


# -- layout -------------------------------------------------------------------------------
def test_object_and_directory_can_share_a_name(store: FileBackend) -> None:
    names = ["a", "a/b", "a/b/c", "a-b", "a.b", "a0", "a/b0", "b"]
    for n in names:
        store.put(n, n.encode())
    assert [m.name for m in store.list()] == sorted(names)
    assert [m.name for m in store.list("a/")] == ["a/b", "a/b/c", "a/b0"]
    store.delete("a")
    assert store.get("a/b") == b"a/b" and not store.exists("a")


def test_listing_is_sorted_by_utf8_bytes_and_python_str_order_agrees() -> None:
    names = ["a", "a/b", "a-b", "a.b", "a~", "é", "\U0001f600", "\uffff", "Z", "a\x01"]
    assert sorted(names) == sorted(names, key=lambda n: n.encode())


ODD_NAMES = [
    "x" * 1024,  # the longest name, one segment: split across continuation dirs
    "x" * 1000 + "/z",
    "x" * 240,
    "x" * 241,
    "x" * 240 + "a",
    "x" * 239 + "/y",
    "ü" * 512,  # 1024 UTF-8 bytes
    "d/" + "y" * 1000,
    "%41",
    "%obj",
    "x%+",
    "a%",
    ".dot",
    "..a",
    "dir/.hidden",
    "ctl\x01\x1f\x7f",
    "tab\tname",
    "ünï/ключ",
]


def test_long_and_odd_segments_roundtrip_and_list_in_order(store: FileBackend, root: Path) -> None:
    for n in ODD_NAMES:
        store.put(n, n.encode())
    for n in ODD_NAMES:
        assert store.get(n) == n.encode() and store.head(n).size == len(n.encode())
    assert [m.name for m in store.list()] == sorted(ODD_NAMES)
    for prefix in ["x" * 240, "x" * 241, "x" * 239, "x" * 1000, "d/", "%", ".", "ü" * 200, "dir/."]:
        assert [m.name for m in store.list(prefix)] == sorted(n for n in ODD_NAMES if n.startswith(prefix))
    assert all(len(p.name.encode()) <= 255 for p in root.rglob("*"))
    assert not any(p.name.startswith(".") for p in root.iterdir() if p.name != ".piecestore")
    for n in ODD_NAMES:
        store.delete(n)
    assert [p.name for p in root.iterdir()] == [".piecestore"]


def test_random_names_list_like_a_sorted_dict(store: FileBackend) -> None:
    rng = random.Random(7)
    alphabet = ["a", "b", "/", ".", "%", "-", "é", "~", "\x01"]
    names: set[str] = set()
    while len(names) < 300:
        size = rng.choice([1, 2, 3, 5, 8, 238, 239, 240, 241, 242, 480])
        candidate = "".join(rng.choice(alphabet) for _ in range(size))
        try:
            filemod.validate_name(candidate)
        except InvalidKeyError:
            continue
        names.add(candidate)
    for n in names:
        store.put(n, b"")
    assert [m.name for m in store.list()] == sorted(names)
    for prefix in ["a", "a/", "b.", "%", "é", "a" * 3]:
        assert [m.name for m in store.list(prefix)] == sorted(n for n in names if n.startswith(prefix))


def test_delete_removes_empty_parents_only(store: FileBackend, root: Path) -> None:
    store.put("a/b/c", b"1")
    store.put("a/d", b"2")
    store.delete("a/b/c")
    assert (root / "a").is_dir() and not (root / "a" / "b").exists()
    store.delete("a/d")
    assert [p.name for p in root.iterdir()] == [".piecestore"]


def test_writers_and_deleters_sharing_a_directory(store: FileBackend) -> None:
    """Deletes prune empty parents while other writers create files in them: writers retry."""
    errors: list[BaseException] = []

    def churn(me: str) -> None:
        try:
            for i in range(300):
                store.put(f"shared/deep/{me}", str(i).encode())
                store.delete(f"shared/deep/{me}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=churn, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert list(store.list()) == []


# -- etags --------------------------------------------------------------------------------
def test_etags_never_repeat_for_identical_bytes(store: FileBackend) -> None:
    etags = [store.put("same", b"same bytes").etag for _ in range(300)]
    assert len(set(etags)) == len(etags)
    store.delete("same")
    again = store.put("same", b"same bytes", mode="create")
    assert again.etag not in etags
    with pytest.raises(PreconditionFailedError):
        store.put("same", b"late", mode=IfMatch(etags[-1]))
    assert store.head("same").etag == again.etag


def test_etags_stay_unique_on_a_coarse_clock(store: FileBackend) -> None:
    """Inodes are recycled at once, so on a filesystem keeping whole seconds only the
    stamps handed out under the stripe lock keep (mtime, size, inode) from repeating."""
    store._granularity = 1_000_000_000  # as if the filesystem kept whole seconds
    metas = [store.put("coarse", b"same") for _ in range(20)]
    assert len({m.etag for m in metas}) == len(metas)
    stamps = [int(m.etag.split("-")[0], 16) for m in metas]
    assert stamps == sorted(stamps) and all(s % 1_000_000_000 == 0 for s in stamps)


# -- crash safety -------------------------------------------------------------------------
class _Stalling:
    """A source that sends 2 MiB and then never finishes, like a writer stuck mid-upload."""

    def __init__(self) -> None:
        self.sent = 0

    def read(self, n: int = -1) -> bytes:
        if self.sent < 2 << 20:
            self.sent += 1 << 20
            return b"x" * (1 << 20)
        time.sleep(3600)
        return b""


def _stalled_writer(url: str) -> None:
    with open_backend(url) as b:
        b.put("victim", _Stalling())  # type: ignore[arg-type]


def _temps(root: Path) -> list[Path]:
    return [p for p in (root / ".piecestore" / "tmp").iterdir() if p.suffix == ".tmp"]


def test_killed_writer_leaves_no_object(store: FileBackend, root: Path) -> None:
    store.put("keep", b"1")
    proc = mp.get_context("spawn").Process(target=_stalled_writer, args=(f"file://{root}",))
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size >= 2 << 20 for p in _temps(root)):
            assert time.monotonic() < deadline and proc.is_alive(), "the writer never got going"
            time.sleep(0.02)
        assert store.sweep_temp(older_than=0) == 0  # a live writer's temp is locked: kept
    finally:
        proc.kill()
        proc.join()
    assert [m.name for m in store.list()] == ["keep"] and not store.exists("victim")
    assert len(_temps(root)) == 1  # the dead writer's leftover, invisible
    with open_backend(f"file://{root}") as again:
        assert [m.name for m in again.list()] == ["keep"]
        assert again.sweep_temp() == 0  # too young for the default grace period
        assert again.sweep_temp(older_than=0) == 1
    assert _temps(root) == []


def test_foreign_and_temp_files_are_invisible(store: FileBackend, root: Path) -> None:
    store.put("real", b"1")
    (root / ".piecestore" / "tmp" / "abandoned.tmp").write_bytes(b"half")
    (root / "README").write_bytes(b"not an object")
    (root / ".hidden%obj").write_bytes(b"dot files are reserved")
    (root / "bad%ZZ%obj").write_bytes(b"not an escape")
    (root / "%41%obj").write_bytes(b"non-canonical spelling of A")
    (root / "dir%obj").mkdir()
    (root / ".git").mkdir()
    assert [m.name for m in store.list()] == ["real"]


def test_failed_write_leaves_nothing(store: FileBackend, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, view: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filemod, "_write_all", full)
    with pytest.raises(PieceStoreError, match=r"'obj/name'.*no space") as info:
        store.put("obj/name", b"data")
    assert not isinstance(info.value, NotFoundError)
    assert isinstance(info.value.__cause__, OSError)
    assert _temps(root) == [] and not store.exists("obj/name")


def test_short_writev_resumes(store: FileBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    """writev may write less than asked, even mid-buffer: every byte still lands, in order."""
    real = os.writev
    rng = random.Random(7)

    def short(fd: int, buffers: Any) -> int:
        total = sum(len(b) for b in buffers)
        return real(fd, [memoryview(b"".join(buffers))[: rng.randint(1, total)]]) if total else 0

    monkeypatch.setattr(filemod.os, "writev", short)
    parts = [os.urandom(rng.randint(0, 300)) for _ in range(2500)]
    store.put_parts("short", parts)
    assert store.get("short") == b"".join(parts)


def test_failed_writev_leaves_nothing(
    store: FileBackend, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, buffers: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filemod.os, "writev", full)
    with pytest.raises(PieceStoreError, match=r"'obj/parts'.*no space"):
        store.put_parts("obj/parts", [b"a", b"b"])
    assert _temps(root) == [] and not store.exists("obj/parts")


def test_permission_errors_are_mapped(store: FileBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put("k", b"v")

    def denied(*args: Any, **kwargs: Any) -> list[int]:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(FileBackend, "_walk", denied)
    with pytest.raises(PermissionDeniedError, match="'k'") as info:
        store.get("k")
    assert isinstance(info.value, PermissionError) and isinstance(info.value.__cause__, PermissionError)


# -- opening ------------------------------------------------------------------------------
def test_relative_paths_resolve_once_at_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_backend("data") as a, open_backend("./nested/data2") as b:
        monkeypatch.chdir("/")
        a.put("k", b"a")
        b.put("k", b"b")
        assert a.display_url == f"file://{tmp_path / 'data'}"
    assert (tmp_path / "data" / "k%obj").read_bytes() == b"a"
    assert (tmp_path / "nested" / "data2" / "k%obj").read_bytes() == b"b"


def test_file_url_forms(tmp_path: Path) -> None:
    with open_backend(f"file://localhost{tmp_path}/viahost") as b:
        b.put("k", b"1")
    with open_backend(f"file://{tmp_path}/my%20dir") as b:
        b.put("k", b"2")
    assert (tmp_path / "viahost" / "k%obj").exists() and (tmp_path / "my dir" / "k%obj").exists()


@pytest.mark.parametrize(
    ("url", "options", "needle"),
    [
        ("file://somehost/x", {}, "somehost"),
        ("file://relative/path", {}, "'relative'"),
        ("file:///tmp/x?fsync=0", {}, "fsync=0"),
        ("file:///tmp/x#frag", {}, "frag"),
        ("file://", {}, "no path"),
        ("file:/tmp/x", {}, "malformed"),
        ("file:///tmp/x", {"bogus": 1, "other": 2}, "bogus, other"),
        ("file:///tmp/x", {"fsync": "maybe"}, "fsync"),
    ],
)
def test_bad_file_urls(url: str, options: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_backend(url, **options)
    assert needle in str(info.value)


def test_root_must_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "afile").write_bytes(b"")
    with pytest.raises(ConfigError, match="not a directory"):
        open_backend(str(tmp_path / "afile"))
    with pytest.raises(NotFoundError):
        open_backend(str(tmp_path / "missing"), create=False)
    assert not (tmp_path / "missing").exists()


def test_other_format_is_refused(root: Path) -> None:
    open_backend(str(root)).close()
    (root / ".piecestore" / "format").write_bytes(b"something else\n")
    with pytest.raises(ConfigError, match="format"):
        open_backend(str(root))


def test_options_accept_strings_and_fsync_off(root: Path) -> None:
    with open_backend(str(root), fsync="false", create="yes") as b:
        assert b.put("k", b"v").size == 1 and b.get("k") == b"v"


def test_read_only_on_a_directory(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        open_backend(str(tmp_path / "missing"), read_only=True)
    assert not (tmp_path / "missing").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    with open_backend(str(plain), read_only=True) as ro:
        assert list(ro.list()) == [] and not ro.exists("k")
    assert list(plain.iterdir()) == []  # opening read-only wrote nothing
    with open_backend(str(plain)) as rw:
        rw.put("k/v", b"1")
    os.chmod(plain, 0o555)
    try:
        with open_backend(str(plain), read_only=True) as ro:
            assert ro.get("k/v") == b"1" and [m.name for m in ro.list()] == ["k/v"]
            with pytest.raises(ReadOnlyError):
                ro.put("k/w", b"2")
            with pytest.raises(ReadOnlyError):
                ro.delete("k/v")
    finally:
        os.chmod(plain, 0o755)
