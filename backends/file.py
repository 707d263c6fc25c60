"""Local-filesystem driver: one directory is one store, safe for many processes at once.

Layout, and why each part exists:

* ``ROOT/<seg>/.../<last>%obj`` is an object. Only object files end in ``%obj`` and directories
  never do, so ``a`` and ``a/b`` can both exist, as on S3.
* Segments are escaped (``%``, control characters and a leading ``.`` become ``%XX``), so no
  segment can look like a suffix or like the reserved ``ROOT/.piecestore``. A segment too long
  for one file name is split into chunks; every chunk but the last is a directory ending ``%+``.
* ``ROOT/.piecestore/tmp/``: a write goes to a temp file here, is fsynced and then renamed (or,
  for create, hard-linked) into place, so readers and crashes never see half an object.
* ``ROOT/.piecestore/locks/NNN``: flock stripes keyed by a hash of the name. Every write and delete
  of a name holds its stripe across check-and-rename, which makes ``create`` and ``IfMatch``
  atomic across threads and processes. A stripe also hands out unique modification times, so
  an etag (mtime, size, inode) never repeats for a name, even for identical bytes written
  within one clock tick into a recycled inode.

Nothing below the root is followed if it is a symlink: each component is opened ``O_NOFOLLOW``
relative to its parent's descriptor, so a link cannot lead a read or write out of the store.
POSIX only (fcntl). Names are case-sensitive, so a case-insensitive filesystem is not supported.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, BinaryIO
from urllib.parse import SplitResult, unquote

from piecestore.backends.base import Backend, Capabilities, IfMatch, ObjectMeta, PutMode, validate_name
from piecestore.errors import (
    AlreadyExistsError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    NotFoundError,
    PermissionDeniedError,
    PieceStoreError,
    PreconditionFailedError,
)

_CAPS = Capabilities(
    conditional_create=True,
    conditional_match=True,
    ranged_get=True,
    batch_delete=False,
    coalesce_gap=4096,
    concurrency=8,
    remote=False,
)

OBJ_SUFFIX = "%obj"  # '%' followed by a non-hex letter: never produced by escaping
MORE_SUFFIX = "%+"  # a long segment continues in this directory
META_DIR = ".piecestore"
FORMAT = "piecestore-file 1\n"
CHUNK_NAME_BYTES = 240  # < NAME_MAX (255) minus the longest suffix
LOCK_STRIPES = 1024
TEMP_GRACE_SECONDS = 600.0  # an unlocked temp file older than this is a dead writer's leftover
_IO_BYTES = 1 << 20
_IOV_MAX = 1024  # buffers per writev: IOV_MAX on Linux and the BSDs
_RETRIES = 64

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _O_CLOEXEC
_HEX = frozenset("0123456789ABCDEF")


# -- name mapping -------------------------------------------------------------------------
def _escape(text: str) -> list[str]:
    """Escape one segment (or chunk) into units that are never split across file names."""
    return [f"%{ord(ch):02X}" if ord(ch) < 0x20 or ch in "%\x7f" else ch for ch in text]


def _chunks(segment: str) -> list[str]:
    """Encode one name segment as one or more file-name-sized chunks, none starting with '.'."""
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for unit in _escape(segment):
        n = len(unit.encode())
        if cur and size + n > CHUNK_NAME_BYTES:
            chunks.append("".join(cur))
            cur, size = [], 0
        if not cur and unit == ".":
            unit, n = "%2E", 3
        cur.append(unit)
        size += n
    chunks.append("".join(cur))
    return chunks


def physical_path(name: str) -> tuple[list[str], str]:
    """Map a valid name to (directory components, file name) below the root."""
    dirs: list[str] = []
    for segment in name.split("/"):
        chunks = _chunks(segment)
        dirs.extend(c + MORE_SUFFIX for c in chunks[:-1])
        dirs.append(chunks[-1])
    return dirs, dirs.pop() + OBJ_SUFFIX


def _decode(chunk: str) -> str | None:
    """Undo the escaping; None for anything this driver would not have written."""
    if not chunk or chunk.startswith("."):
        return None
    out: list[str] = []
    i = 0
    while i < len(chunk):
        ch = chunk[i]
        if ch == "%":
            code = chunk[i + 1 : i + 3]
            if len(code) != 2 or not _HEX.issuperset(code):
                return None
            out.append(chr(int(code, 16)))
            i += 3
        else:
            out.append(ch)
            i += 1
    text = "".join(out)
    unescaped = "".join(_escape(text))
    if unescaped.startswith("."):
        unescaped = "%2E" + unescaped[1:]
    if unescaped != chunk:  # not canonical: two files would claim one name
        return None
    try:
        text.encode("utf-8")  # undecodable bytes on disk arrive as lone surrogates
    except UnicodeEncodeError:
        return None
    return text


# -- small helpers ------------------------------------------------------------------------
def _etag(st: os.stat_result) -> str:
    return f"{st.st_mtime_ns:x}-{st.st_size:x}-{st.st_ino:x}"


def _meta(name: str, st: os.stat_result) -> ObjectMeta:
    seconds, ns = divmod(st.st_mtime_ns, 1_000_000_000)
    when = datetime.fromtimestamp(seconds, UTC) + timedelta(microseconds=ns // 1000)
    return ObjectMeta(name=name, size=st.st_size, etag=_etag(st), last_modified=when)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _writev_all(fd: int, parts: list[memoryview]) -> None:
    """Write every buffer in order with writev, at most IOV_MAX at a time, resuming short writes."""
    pending = list(parts)
    at = 0
    while at < len(pending):
        before = at
        written = os.writev(fd, pending[at : at + _IOV_MAX])
        while at < len(pending) and written >= len(pending[at]):
            written -= len(pending[at])
            at += 1
        if written:  # a short write ended inside this buffer: its rest goes first next time
            pending[at] = pending[at][written:]
        elif at == before:
            raise OSError(errno.EIO, "writev wrote nothing")


def _read_span(fd: int, size: int, offset: int, length: int | None) -> bytes:
    end = size if length is None else min(size, offset + length)
    want = end - offset
    if want <= 0:
        return b""
    first = os.pread(fd, want, offset)
    if len(first) == want or not first:
        return first
    parts, got = [first], len(first)
    while got < want:
        more = os.pread(fd, want - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _close_all(fds: list[int]) -> None:
    for fd in reversed(fds):
        with contextlib.suppress(OSError):
            os.close(fd)


def _fsync_dir(fd: int) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        os.fsync(fd)


class FileBackend(Backend):
    """A store in one local directory; see the module docstring for the layout."""

    scheme = "file"

    def __init__(
        self, root: str, *, read_only: bool = False, fsync: bool = True, create: bool = True
    ) -> None:
        root = os.path.abspath(root)
        super().__init__(display_url=f"file://{root}", read_only=read_only)
        self.root = root
        self._fsync = fsync
        self._granularity = 1
        self._fds: list[int] = []
        self._root_fd = self._open_root(create=create and not read_only)
        self._tmp_fd = self._locks_fd = -1
        try:
            self._prepare(writable=not read_only)
        except BaseException:
            _close_all(self._fds)
            raise

    @property
    def capabilities(self) -> Capabilities:
        return _CAPS

    # -- opening ---------------------------------------------------------------------------
    def _open_root(self, *, create: bool) -> int:
        try:
            if not os.path.lexists(self.root) and create:
                os.makedirs(self.root, exist_ok=True)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
        except FileNotFoundError as e:
            how = "open it writable with create=True" if self.read_only else "pass create=True"
            raise NotFoundError(f"store directory {self.root} does not exist; create it or {how}") from e
        except NotADirectoryError as e:
            raise ConfigError(f"store path {self.root} exists but is not a directory") from e
        except PermissionError as e:
            raise PermissionDeniedError(f"cannot open store directory {self.root}: {e.strerror}") from e
        except OSError as e:
            raise PieceStoreError(f"cannot open store directory {self.root}: {e}") from e
        self._fds.append(fd)
        return fd

    def _subdir(self, parent: int, name: str, *, create: bool) -> int:
        if create:
            try:
                os.mkdir(name, 0o777, dir_fd=parent)
                if self._fsync:
                    _fsync_dir(parent)
            except FileExistsError:
                pass
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        self._fds.append(fd)
        return fd

    def _prepare(self, *, writable: bool) -> None:
        """Check the format marker; when writable, make the work dirs and sweep dead temps."""
        try:
            meta = self._subdir(self._root_fd, META_DIR, create=writable)
        except FileNotFoundError:
            return  # read-only and never written: nothing to check
        except OSError as e:
            raise self._error(e, META_DIR, "prepare") from e
        try:
            self._check_format(meta, writable=writable)
            if writable:
                self._tmp_fd = self._subdir(meta, "tmp", create=True)
                self._locks_fd = self._subdir(meta, "locks", create=True)
                self._granularity = self._probe_granularity()
                self.sweep_temp()
        except PieceStoreError:
            raise
        except OSError as e:
            raise self._error(e, META_DIR, "prepare") from e

    def _check_format(self, meta: int, *, writable: bool) -> None:
        try:
            fd = os.open("format", os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=meta)
        except FileNotFoundError:
            if not writable:
                return
            temp = f"format.{uuid.uuid4().hex}"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666, dir_fd=meta)
            try:
                _write_all(fd, memoryview(FORMAT.encode()))
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process won: check theirs
                os.link(temp, "format", src_dir_fd=meta, dst_dir_fd=meta)
            os.unlink(temp, dir_fd=meta)
            fd = os.open("format", os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=meta)
        try:
            found = os.read(fd, 256)
        finally:
            os.close(fd)
        if found != FORMAT.encode():
            raise ConfigError(
                f"{self.root} holds a store of another format ({found[:40]!r}, expected {FORMAT.strip()!r}); "
                "open it with the piecestore version that wrote it"
            )

    def _probe_granularity(self) -> int:
        """Find the finest mtime step the filesystem keeps, so unique stamps stay unique."""
        name = f"probe.{uuid.uuid4().hex}.tmp"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o666, dir_fd=self._tmp_fd)
        try:
            base = 1_600_000_000 * 1_000_000_000
            for step in (1, 100, 1000, 1_000_000, 1_000_000_000):
                os.utime(fd, ns=(base + step, base + step))
                if os.fstat(fd).st_mtime_ns == base + step:
                    return step
            return 2_000_000_000
        finally:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):  # an eager sweep_temp(0) elsewhere
                os.unlink(name, dir_fd=self._tmp_fd)

    def sweep_temp(self, older_than: float = TEMP_GRACE_SECONDS) -> int:
        """Remove temp files of writers that died (unlocked and old); returns how many."""
        if self._tmp_fd < 0:
            return 0
        removed = 0
        cutoff = time.time() - older_than
        with os.scandir(self._tmp_fd) as entries:
            names = [e.name for e in entries if e.name.endswith(".tmp")]
        for name in names:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=self._tmp_fd)
            except OSError:
                continue
            try:
                # A live writer holds an flock on its temp file; a dead one's lock is gone.
                if os.fstat(fd).st_ctime > cutoff:
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(name, dir_fd=self._tmp_fd)
                removed += 1
            except OSError:
                continue
            finally:
                os.close(fd)
        return removed

    def _close(self) -> None:
        _close_all(self._fds)
        self._fds.clear()

    # -- errors ----------------------------------------------------------------------------
    def _error(self, e: OSError, name: str, action: str) -> PieceStoreError:
        """Map an OSError into piecestore.errors, naming the object (callers chain it)."""
        where = f"{name!r} in {self.display_url}"
        if e.errno == errno.ENOENT:
            return NotFoundError(f"{where} not found")
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return PermissionDeniedError(f"cannot {action} {where}: {e.strerror}")
        if e.errno == errno.ELOOP:
            return PermissionDeniedError(
                f"cannot {action} {where}: it is a symlink, which the store never follows"
            )
        if e.errno == errno.ENAMETOOLONG:
            return InvalidKeyError(f"cannot {action} {where}: the filesystem refuses the name as too long")
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return PieceStoreError(
                f"cannot {action} {where}: no space left (or quota exceeded) on the device"
            )
        return PieceStoreError(f"cannot {action} {where}: [Errno {e.errno}] {e.strerror}")

    def _symlink_error(self, name: str, component: str) -> PermissionDeniedError:
        return PermissionDeniedError(
            f"cannot reach {name!r} in {self.display_url}: {component!r} is a symlink, "
            "and the file driver never follows symlinks inside a store"
        )

    # -- walking ---------------------------------------------------------------------------
    def _walk(self, name: str, dirs: list[str], *, create: bool, start: int = -1) -> list[int]:
        """Open each directory component (from ``start``, default the root) without following
        symlinks; the caller closes the returned descriptors.

        Raises FileNotFoundError when a component is missing (or vanished under a concurrent
        delete while creating), so writers can retry.
        """
        chain: list[int] = []
        cur = self._root_fd if start < 0 else start
        try:
            for comp in dirs:
                for _ in range(_RETRIES):
                    try:
                        fd = os.open(comp, _DIR_FLAGS, dir_fd=cur)
                        break
                    except FileNotFoundError:
                        if not create:
                            raise
                    except OSError as e:
                        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                            raise
                        if stat.S_ISLNK(os.stat(comp, dir_fd=cur, follow_symlinks=False).st_mode):
                            raise self._symlink_error(name, comp) from e
                        if not create:
                            raise FileNotFoundError(errno.ENOENT, "not a directory", comp) from e
                        raise PieceStoreError(
                            f"cannot write {name!r} in {self.display_url}: {comp!r} is in the way "
                            "(a file this driver did not write)"
                        ) from e
                    try:
                        os.mkdir(comp, 0o777, dir_fd=cur)
                        if self._fsync:
                            _fsync_dir(cur)
                    except FileExistsError:
                        pass
                else:
                    raise PieceStoreError(f"cannot create the directories of {name!r}: they keep vanishing")
                chain.append(fd)
                cur = fd
            return chain
        except BaseException:
            _close_all(chain)
            raise

    def _open_object(self, name: str) -> tuple[int, os.stat_result]:
        dirs, leaf = physical_path(name)
        chain = self._walk(name, dirs, create=False)
        try:
            fd = os.open(
                leaf, os.O_RDONLY | os.O_NOFOLLOW | _O_CLOEXEC, dir_fd=chain[-1] if chain else self._root_fd
            )
        finally:
            _close_all(chain)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise FileNotFoundError(errno.ENOENT, "not a regular file", leaf)
        return fd, st

    # -- reads -----------------------------------------------------------------------------
    def _get(self, name: str, offset: int, length: int | None) -> bytes:
        return self._read_spans(name, [(offset, length)])[0]

    def _get_groups(self, name: str, spans: list[tuple[int, int]]) -> list[bytes]:
        return self._read_spans(name, list(spans))

    def _read_spans(self, name: str, spans: list[tuple[int, int | None]]) -> list[bytes]:
        """Read every span from one open file: one snapshot of the object, one open."""
        try:
            fd, st = self._open_object(name)
            try:
                return [_read_span(fd, st.st_size, off, length) for off, length in spans]
            finally:
                os.close(fd)
        except PieceStoreError:
            raise
        except OSError as e:
            raise self._error(e, name, "read") from e

    def _get_with_meta(self, name: str) -> tuple[bytes, ObjectMeta]:
        """Bytes and etag from one open file: the rename-only writes make them one version."""
        try:
            fd, st = self._open_object(name)
            try:
                return _read_span(fd, st.st_size, 0, None), _meta(name, st)
            finally:
                os.close(fd)
        except PieceStoreError:
            raise
        except OSError as e:
            raise self._error(e, name, "read") from e

    def _head(self, name: str) -> ObjectMeta:
        dirs, leaf = physical_path(name)
        try:
            chain = self._walk(name, dirs, create=False)
            try:
                st = os.stat(leaf, dir_fd=chain[-1] if chain else self._root_fd, follow_symlinks=False)
            finally:
                _close_all(chain)
        except PieceStoreError:
            raise
        except OSError as e:
            raise self._error(e, name, "stat") from e
        if stat.S_ISLNK(st.st_mode):
            raise self._symlink_error(name, leaf)
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"{name!r} not found in {self.display_url}")
        return _meta(name, st)

    def _list(self, prefix: str) -> Iterator[ObjectMeta]:
        try:
            yield from self._list_dir(self._root_fd, "", prefix)
        except PieceStoreError:
            raise
        except OSError as e:
            raise self._error(e, prefix, "list") from e

    def _list_dir(self, fd: int, logical: str, prefix: str) -> Iterator[ObjectMeta]:
        """Yield one logical directory's objects in name order, descending only where useful.

        Siblings sort by name for files and name + '/' for directories: every name below a
        directory starts with that, so a depth-first walk in this order is globally sorted.
        """
        found: list[tuple[str, os.DirEntry[str] | os.stat_result | list[str]]] = []
        self._collect(fd, logical, prefix, [], found)
        found.sort(key=lambda item: item[0])
        for key, what in found:
            if isinstance(what, list):
                try:
                    chain = self._walk(key, what, create=False, start=fd)
                except FileNotFoundError:
                    continue  # removed since the scan
                except PieceStoreError:
                    continue  # a symlink appeared: not part of the store
                try:
                    yield from self._list_dir(chain[-1], key, prefix)
                finally:
                    _close_all(chain)
                continue
            try:
                st = what.stat(follow_symlinks=False) if isinstance(what, os.DirEntry) else what
            except FileNotFoundError:
                continue  # deleted since the scan
            if not stat.S_ISREG(st.st_mode):
                continue
            try:
                validate_name(key)
            except InvalidKeyError:
                continue
            yield _meta(key, st)

    def _collect(
        self,
        fd: int,
        logical: str,
        prefix: str,
        via: list[str],
        found: list[tuple[str, os.DirEntry[str] | os.stat_result | list[str]]],
    ) -> None:
        """Gather one logical directory's entries, expanding long-segment continuation dirs."""
        with os.scandir(fd) as entries:
            scanned = list(entries)
        for entry in scanned:
            fname = entry.name
            if fname.endswith(OBJ_SUFFIX):
                text = _decode(fname[: -len(OBJ_SUFFIX)])
                if text is None or not (logical + text).startswith(prefix):
                    continue
                if not entry.is_file(follow_symlinks=False):
                    continue
                if not via:
                    found.append((logical + text, entry))
                    continue
                # Inside a continuation dir the descriptor closes before the yield: stat now.
                with contextlib.suppress(FileNotFoundError):
                    found.append((logical + text, entry.stat(follow_symlinks=False)))
                continue
            if not entry.is_dir(follow_symlinks=False):
                continue
            if fname.endswith(MORE_SUFFIX):
                text = _decode(fname[: -len(MORE_SUFFIX)])
                if text is None:
                    continue
                partial = logical + text
                if not (partial.startswith(prefix) or prefix.startswith(partial)):
                    continue
                try:
                    sub = os.open(fname, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                try:
                    self._collect(sub, partial, prefix, [*via, fname], found)
                finally:
                    os.close(sub)
                continue
            text = _decode(fname)
            if text is None:
                continue
            key = logical + text + "/"
            if key.startswith(prefix) or prefix.startswith(key):
                found.append((key, [*via, fname]))

    # -- writes ----------------------------------------------------------------------------
    def _lock_fd(self, name: str) -> int:
        digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
        stripe = int.from_bytes(digest, "big") % LOCK_STRIPES
        return os.open(f"{stripe:03x}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC, 0o666,
                       dir_fd=self._locks_fd)  # fmt: skip

    def _stamp(self, lock_fd: int) -> int:
        """A modification time no earlier write of this stripe got (call with the lock held)."""
        raw = os.pread(lock_fd, 8, 0)
        last = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        step = self._granularity
        stamp = max(-(-time.time_ns() // step) * step, last + step)
        os.pwrite(lock_fd, stamp.to_bytes(8, "little"), 0)
        return stamp

    def _write_temp(self, name: str, data: memoryview | BinaryIO | list[memoryview]) -> tuple[int, str]:
        temp = f"{uuid.uuid4().hex}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(temp, flags, 0o666, dir_fd=self._tmp_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # tells sweep_temp this writer lives
            if isinstance(data, memoryview):
                _write_all(fd, data)
            elif isinstance(data, list):
                _writev_all(fd, data)
            else:
                while True:
                    try:
                        chunk = data.read(_IO_BYTES)
                    except OSError as e:
                        raise PieceStoreError(f"reading the data for {name!r} failed: {e}") from e
                    if not chunk:
                        break
                    if not isinstance(chunk, (bytes, bytearray, memoryview)):
                        raise InvalidValueError(
                            f"the file object for {name!r} returned {type(chunk).__name__}, not bytes; "
                            "open it in binary mode"
                        )
                    _write_all(fd, memoryview(chunk).cast("B"))
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=self._tmp_fd)
            raise
        return fd, temp

    def _put_parts(self, name: str, parts: list[memoryview], mode: PutMode) -> ObjectMeta:
        return self._put(name, parts, mode)

    def _put(self, name: str, data: memoryview | BinaryIO | list[memoryview], mode: PutMode) -> ObjectMeta:
        dirs, leaf = physical_path(name)
        try:
            fd, temp = self._write_temp(name, data)
        except PieceStoreError:
            raise
        except OSError as e:
            raise self._error(e, name, "write") from e
        placed = False
        try:
            lock = self._lock_fd(name)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                stamp = self._stamp(lock)
                fcntl.flock(lock, fcntl.LOCK_UN)
                os.utime(fd, ns=(stamp, stamp))
                if self._fsync:
                    os.fsync(fd)  # data and mtime durable before the name points at them
                st = os.fstat(fd)
                fcntl.flock(lock, fcntl.LOCK_EX)
                chain = self._commit(name, dirs, leaf, temp, mode)
                placed = True
            finally:
                os.close(lock)  # releases the flock
            try:
                if self._fsync:
                    _fsync_dir(chain[-1] if chain else self._root_fd)
            finally:
                _close_all(chain)
            return _meta(name, st)
        except PieceStoreError:
            raise
        except OSError as e:
            raise self._error(e, name, "write") from e
        finally:
            os.close(fd)
            if not placed or mode == "create":
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=self._tmp_fd)

    def _commit(self, name: str, dirs: list[str], leaf: str, temp: str, mode: PutMode) -> list[int]:
        """Check the condition and move the temp into place (stripe lock held); returns the dir fds."""
        for _ in range(_RETRIES):
            try:
                chain = self._walk(name, dirs, create=True)
            except FileNotFoundError:
                continue  # a concurrent delete removed an empty parent: recreate it
            parent = chain[-1] if chain else self._root_fd
            try:
                if mode == "create":
                    try:
                        os.link(temp, leaf, src_dir_fd=self._tmp_fd, dst_dir_fd=parent)
                    except FileExistsError as e:
                        raise AlreadyExistsError(f"{name!r} already exists in {self.display_url}") from e
                else:
                    if isinstance(mode, IfMatch):
                        self._check_etag(name, leaf, parent, mode.etag)
                    os.rename(temp, leaf, src_dir_fd=self._tmp_fd, dst_dir_fd=parent)
                return chain
            except FileNotFoundError:
                _close_all(chain)  # the parent vanished between walk and rename
                continue
            except BaseException:
                _close_all(chain)
                raise
        raise PieceStoreError(f"cannot write {name!r} in {self.display_url}: its directory keeps vanishing")

    def _check_etag(self, name: str, leaf: str, parent: int, expected: str) -> None:
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError as e:
            raise PreconditionFailedError(
                f"{name!r} does not exist in {self.display_url} (expected etag {expected!r}); "
                "re-read and retry"
            ) from e
        if not stat.S_ISREG(st.st_mode) or _etag(st) != expected:
            raise PreconditionFailedError(
                f"{name!r} in {self.display_url} changed (expected etag {expected!r}); re-read and retry"
            )

    def _delete(self, name: str) -> None:
        dirs, leaf = physical_path(name)
        try:
            lock = self._lock_fd(name)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    chain = self._walk(name, dirs, create=False)
                except FileNotFoundError:
                    return
                try:
                    os.unlink(leaf, dir_fd=chain[-1] if chain else self._root_fd)
                except FileNotFoundError:
                    _close_all(chain)
                    return
                except BaseException:
                    _close_all(chain)
                    raise
            finally:
                os.close(lock)
            try:
                if self._fsync:
                    _fsync_dir(chain[-1] if chain else self._root_fd)
                self._prune(dirs, chain)
            finally:
                _close_all(chain)
        except PieceStoreError:
            raise
        except OSError as e:
            raise self._error(e, name, "delete") from e

    def _prune(self, dirs: list[str], chain: list[int]) -> None:
        """Remove directories left empty, deepest first; a writer racing us retries its makedirs."""
        for i in range(len(dirs) - 1, -1, -1):
            parent = chain[i - 1] if i else self._root_fd
            try:
                os.rmdir(dirs[i], dir_fd=parent)
            except OSError:
                return  # not empty (or already gone): stop climbing


# -- construction from URLs and paths -----------------------------------------------------
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool_option(options: dict[str, Any], key: str, default: bool) -> bool:
    value = options.pop(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"file driver option {key}= must be true or false, got {value!r}")


def _open(path: str, options: dict[str, Any]) -> FileBackend:
    if not path or "\x00" in path:
        raise ConfigError(f"file store path {path!r} is empty or contains NUL")
    read_only = _bool_option(options, "read_only", False)
    fsync = _bool_option(options, "fsync", True)
    create = _bool_option(options, "create", True)
    if options:
        raise ConfigError(
            f"unknown option(s) for the file driver: {', '.join(sorted(options))}; "
            "known: create, fsync, read_only"
        )
    return FileBackend(path, read_only=read_only, fsync=fsync, create=create)


def from_url(parts: SplitResult, options: dict[str, Any]) -> FileBackend:
    """Open ``file:///abs/path`` (or ``file://localhost/abs/path``); the path is percent-decoded."""
    if parts.netloc and parts.netloc.lower() != "localhost":
        raise ConfigError(
            f"file:// URL names host {parts.netloc!r}, but only local paths work: write file:///abs/path "
            f"(three slashes), or pass a plain relative path such as {parts.netloc + parts.path!r}"
        )
    if parts.query:
        raise ConfigError(
            f"file:// URLs take no query parameters, got {parts.query!r}; pass options as keywords "
            "(create, fsync, read_only), or percent-encode '?' in the path as %3F"
        )
    if parts.fragment:
        raise ConfigError(
            f"file:// URL has a fragment {parts.fragment!r}; percent-encode '#' in the path as %23"
        )
    path = unquote(parts.path)
    if not path:
        raise ConfigError("file:// URL has no path; write file:///abs/path")
    return _open(path, options)


def from_path(path: str, options: dict[str, Any]) -> FileBackend:
    """Open a plain path; relative paths are taken from the current directory, once, at open."""
    if path.lower().startswith("file:"):
        raise ConfigError(f"{path!r} looks like a malformed file URL; write file:///abs/path")
    return _open(os.path.expanduser(path), options)
