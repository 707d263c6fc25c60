"""The driver interface every backend implements.

Public methods here validate names, enforce read-only mode and coalesce ranges once, for
every driver; drivers implement only the underscored primitives. That keeps the rules
(what a valid name is, that a refused write sends nothing) in one place.
"""

from __future__ import annotations

import builtins
import io
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import BinaryIO, Literal, Self, TypeAlias

from piecestore.errors import ConfigError, InvalidKeyError, InvalidValueError, ReadOnlyError

MAX_NAME_BYTES = 1024
CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a backend knows of one object. ``name`` is relative to the backend's prefix."""

    name: str
    size: int
    etag: str
    last_modified: datetime


@dataclass(frozen=True, slots=True)
class IfMatch:
    """Put mode: replace the object only if its current etag is still ``etag``."""

    etag: str


PutMode: TypeAlias = Literal["overwrite", "create"] | IfMatch
Data: TypeAlias = bytes | bytearray | memoryview | BinaryIO


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a driver can do, so callers choose a strategy instead of failing late."""

    conditional_create: bool
    conditional_match: bool
    ranged_get: bool = True
    batch_delete: bool = False
    max_delete_batch: int = 1
    multipart_upload: bool = False
    multipart_threshold: int = 0
    # Ranged reads closer together than this are merged into one request (NBS: a few KiB
    # on local media, about half a MiB on S3), up to max_request_bytes per request.
    coalesce_gap: int = 4096
    max_request_bytes: int = 8 * 1024 * 1024
    concurrency: int = 8
    remote: bool = False
    # granularity of ObjectMeta.last_modified, in seconds (S3 answers whole seconds): GC adds
    # it to every age threshold, since each age is a difference of two such readings
    timestamp_resolution: float = 0.0

    @property
    def conditional_writes(self) -> bool:
        return self.conditional_create and self.conditional_match


@dataclass(frozen=True, slots=True)
class RangeGroup:
    """One request covering several wanted ranges: [start, end) plus the members' slices."""

    start: int
    end: int
    members: list[tuple[int, int, int]] = field(default_factory=list)  # (index, offset, length)


def coalesce_ranges(ranges: Sequence[tuple[int, int]], gap: int, max_request: int) -> list[RangeGroup]:
    """Group (offset, length) ranges into as few requests as the gap and cap allow."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    groups: list[RangeGroup] = []
    cur: RangeGroup | None = None
    for i in order:
        off, length = ranges[i]
        end = off + length
        if cur is not None and off <= cur.end + gap and max(end, cur.end) - cur.start <= max_request:
            cur.members.append((i, off, length))
            cur = RangeGroup(cur.start, max(cur.end, end), cur.members)
            groups[-1] = cur
        else:
            cur = RangeGroup(off, end, [(i, off, length)])
            groups.append(cur)
    return groups


def read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    """``n`` bytes from ``read``, or fewer only at the end of the stream (``b""``): pipes and
    sockets return short reads, so one read is never taken for the whole."""
    first = read(n)
    if len(first) >= n or not first:
        return bytes(first)
    parts = [first]
    got = len(first)
    while got < n:
        more = read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def validate_name(name: object) -> str:
    """Check an object name: the same rules on every driver, so a store is portable."""
    if not isinstance(name, str):
        raise InvalidKeyError(f"object name must be str, got {type(name).__name__}")
    if not name:
        raise InvalidKeyError("object name is empty; give a non-empty name")
    if "\x00" in name:
        raise InvalidKeyError(f"object name {name!r} contains NUL; remove it")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidKeyError(f"object name {name!r} is not valid UTF-8 (lone surrogate?)") from e
    if len(encoded) > MAX_NAME_BYTES:
        raise InvalidKeyError(
            f"object name is {len(encoded)} UTF-8 bytes; at most {MAX_NAME_BYTES} are allowed"
        )
    if name.startswith("/") or name.endswith("/"):
        raise InvalidKeyError(f"object name {name!r} must not start or end with '/'")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise InvalidKeyError(
                f"object name {name!r} has an empty, '.' or '..' path segment; use plain segments"
            )
    return name


def validate_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"list prefix must be str, got {type(prefix).__name__}")
    if "\x00" in prefix:
        raise InvalidKeyError("list prefix contains NUL; remove it")
    return prefix


def validate_range(offset: object, length: object) -> tuple[int, int | None]:
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidValueError(f"offset must be an int >= 0, got {offset!r}")
    if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 0):
        raise InvalidValueError(f"length must be None or an int >= 0, got {length!r}")
    return offset, length


def as_buffer(data: object) -> memoryview | BinaryIO:
    """Accept bytes-like values or binary file objects; refuse str and None up front."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if hasattr(data, "read") and not isinstance(data, io.TextIOBase):
        return data  # type: ignore[return-value]
    raise InvalidValueError(
        f"data must be bytes-like or a binary file object, got {type(data).__name__}"
        + ("; encode str first, e.g. value.encode()" if isinstance(data, str) else "")
    )


def check_mode(mode: object) -> PutMode:
    if mode in ("overwrite", "create") or isinstance(mode, IfMatch):
        return mode  # type: ignore[return-value]
    raise ConfigError(f"put mode must be 'overwrite', 'create' or IfMatch(etag), got {mode!r}")


class Backend(ABC):
    """A flat namespace of objects under one root (bucket + prefix, directory, dict).

    Thread-safe. Names are '/'-separated, validated by :func:`validate_name`.
    """

    scheme: str = ""

    def __init__(self, *, display_url: str, read_only: bool = False) -> None:
        self.display_url = display_url  # never carries a secret
        self.read_only = read_only
        self._closed = False
        self._close_lock = threading.Lock()

    # -- the interface -----------------------------------------------------------------
    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    def put(self, name: str, data: Data, *, mode: PutMode = "overwrite") -> ObjectMeta:
        """Write an object; 'create' and IfMatch are atomic conditional writes."""
        name = validate_name(name)
        buf = as_buffer(data)
        mode = check_mode(mode)
        self._check_writable("put", name)
        return self._put(name, buf, mode)

    def put_parts(
        self, name: str, parts: Iterable[bytes | bytearray | memoryview], *, mode: PutMode = "overwrite"
    ) -> ObjectMeta:
        """Write an object made of ``parts``, in order, as ``put`` would write their join.

        For objects built from many buffers (a table file is a few per record): a driver that
        can write them as they are (the file driver, with writev) skips joining them first.
        """
        name = validate_name(name)
        bad = InvalidValueError(f"parts of {name!r} must be a sequence of bytes-like objects")
        if isinstance(parts, (bytes, bytearray, memoryview, str)):
            raise bad
        items = list(parts)
        if not all(isinstance(p, (bytes, bytearray, memoryview)) for p in items):
            raise bad
        mode = check_mode(mode)
        self._check_writable("put", name)
        return self._put_parts(name, [memoryview(p).cast("B") for p in items], mode)

    def get(self, name: str, *, offset: int = 0, length: int | None = None) -> bytes:
        """Read an object or a range of it; a range past the end is clipped, never an error."""
        name = validate_name(name)
        offset, length = validate_range(offset, length)
        if length == 0:
            self._head(name)  # still raise NotFoundError for a missing object
            return b""
        return self._get(name, offset, length)

    def get_ranges(
        self,
        name: str,
        ranges: Sequence[tuple[int, int]],
        *,
        gap: int | None = None,
        max_request: int | None = None,
    ) -> list[bytes]:
        """Read several (offset, length) ranges, merging nearby ones into single requests.

        ``gap`` and ``max_request`` override the driver's defaults for how close two ranges
        must be to share a request, and how large one request may grow.
        """
        name = validate_name(name)
        checked = [(o, n) for o, n in (validate_range(o, n) for o, n in ranges) if n is not None]
        if len(checked) != len(ranges):
            raise InvalidValueError("every range needs an explicit length")
        if not checked:
            return []
        caps = self.capabilities
        groups = coalesce_ranges(
            checked,
            caps.coalesce_gap if gap is None else gap,
            caps.max_request_bytes if max_request is None else max_request,
        )
        blobs = self._get_groups(name, [(g.start, g.end - g.start) for g in groups])
        out: list[bytes] = [b""] * len(checked)
        for group, blob in zip(groups, blobs, strict=True):
            view: memoryview = memoryview(blob)
            for index, off, length in group.members:
                out[index] = bytes(view[off - group.start : off - group.start + length])
        return out

    def get_with_meta(self, name: str) -> tuple[bytes, ObjectMeta]:
        """Read a whole object together with the etag of exactly those bytes.

        Compare-and-swap needs this pairing: an etag from a separate HEAD may belong to a
        newer version than the bytes read, which would turn a CAS into a lost update.
        """
        return self._get_with_meta(validate_name(name))

    def head(self, name: str) -> ObjectMeta:
        return self._head(validate_name(name))

    def exists(self, name: str) -> bool:
        from piecestore.errors import NotFoundError

        try:
            self._head(validate_name(name))
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[ObjectMeta]:
        """Lazily list objects whose name starts with ``prefix``, sorted by name."""
        return self._list(validate_prefix(prefix))

    def delete(self, name: str) -> None:
        """Delete an object; deleting a missing object is not an error."""
        name = validate_name(name)
        self._check_writable("delete", name)
        self._delete(name)

    def delete_many(self, names: Iterable[str]) -> None:
        """Delete many objects, batched where the backend allows; idempotent."""
        checked = [validate_name(n) for n in names]
        if not checked:
            return
        self._check_writable("delete", checked[0])
        self._delete_many(checked)

    def iter_chunks(self, name: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
        """Stream an object out in chunks, never holding all of it at once."""
        name = validate_name(name)
        size = self._head(name).size
        for off in range(0, size, chunk_bytes):
            yield self._get(name, off, min(chunk_bytes, size - off))

    def close(self) -> None:
        with self._close_lock:
            if not self._closed:
                self._closed = True
                self._close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_url!r})"

    # -- what drivers implement --------------------------------------------------------
    @abstractmethod
    def _put(self, name: str, data: memoryview | BinaryIO, mode: PutMode) -> ObjectMeta: ...

    def _put_parts(self, name: str, parts: builtins.list[memoryview], mode: PutMode) -> ObjectMeta:
        """Default: join, then ``_put``; drivers that can write a list of buffers override it."""
        return self._put(name, memoryview(b"".join(parts)), mode)

    @abstractmethod
    def _get(self, name: str, offset: int, length: int | None) -> bytes: ...

    def _get_with_meta(self, name: str) -> tuple[bytes, ObjectMeta]:
        """Fallback: HEAD, GET, HEAD until the etag is stable around the read.

        Sound because every driver's etag changes whenever the bytes do; drivers whose GET
        returns the etag (S3, minio, file via fstat) override this with one request.
        """
        for _attempt in range(20):
            before = self._head(name)
            data = self._get(name, 0, None)
            after = self._head(name)
            if before.etag == after.etag and len(data) == after.size:
                return data, after
        from piecestore.errors import ConflictError

        raise ConflictError(f"{name!r} in {self.display_url} kept changing while being read; retry later")

    def _get_groups(self, name: str, spans: builtins.list[tuple[int, int]]) -> builtins.list[bytes]:
        """Fetch already-coalesced spans; drivers with concurrency override this."""
        return [self._get(name, off, length) for off, length in spans]

    @abstractmethod
    def _head(self, name: str) -> ObjectMeta: ...

    @abstractmethod
    def _list(self, prefix: str) -> Iterator[ObjectMeta]: ...

    @abstractmethod
    def _delete(self, name: str) -> None: ...

    def _delete_many(self, names: builtins.list[str]) -> None:
        for name in names:
            self._delete(name)

    def _close(self) -> None:  # noqa: B027 - optional hook
        pass

    def _check_writable(self, op: str, name: str) -> None:
        if self.read_only:
            raise ReadOnlyError(
                f"cannot {op} {name!r}: {self.display_url} is opened read-only; "
                "open it without read_only to write"
            )


def read_all(data: memoryview | BinaryIO) -> bytes:
    """Materialise a value (for drivers whose storage is itself in memory)."""
    if isinstance(data, memoryview):
        return data.tobytes()
    chunks: list[bytes] = []
    while chunk := data.read(CHUNK_BYTES):
        chunks.append(chunk)
    return b"".join(chunks)
