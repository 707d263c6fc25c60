"""Table files: immutable, content-named files that pack many small pieces (after Noms/Dolt NBS).

Layout (all integers little-endian; ``n`` = record count)::

    records    n records, sorted by key (UTF-8 bytes), each:
                 checksum   u64  xxh3_64 of everything after it in the record (header rest, key, payload)
                 kind       u8   VALUE 0, TOMBSTONE 1, EXTERNAL 2
                 flags      u8   0 (reserved)
                 key_len    u16  1..1024
                 value_len  u64  payload length
                 key        key_len bytes of UTF-8
                 payload    value_len bytes (EXTERNAL: a descriptor, see encode_external)
    key block  every key followed by one NUL byte, in record order (keys never contain NUL), so
               list(prefix) streams all keys with one ranged read and one ``str.split``
    index      hashes     u64[n]    key_hash of each key, ascending (ties by position)
               offsets    u64[n+1]  start of each record; offsets[n] = start of the key block
               positions  u32[n]    positions[i] = the record whose hash is hashes[i]
               key_lens   u16[n]    key length of each record (so value sizes need no read)
               kinds      u8[n]     kind of each record (so list skips tombstones without a read)
    footer     64 bytes:
               count u64, records_bytes u64, keys_bytes u64, index_len u64 (index without footer),
               keys_checksum u64 (xxh3_64 of the key block), version u32, nonce u32 (random),
               checksum u64 (xxh3_64 of index + footer up to here), magic 8 bytes

The index and footer are the file's suffix of ``index_bytes = index_len + 64`` bytes: with that
number from the manifest a reader loads the index with one suffix-range read and never probes.
Every byte of the file is covered by a checksum (record, key block, or index+footer), so a
flipped bit is reported as :class:`CorruptionError`, never returned as data. The file's name is
the xxh3_128 of its whole content, so two writers can never produce different files of one name.
"""

from __future__ import annotations

import collections
import functools
import math
import re
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
from numpy.typing import NDArray

from piecestore import tableindex as _tableindex
from piecestore.errors import CorruptionError, InvalidKeyError, InvalidValueError

FORMAT_VERSION = 1
MAGIC = b"PCSTBL\x00\x01"
assert len(MAGIC) == 8

VALUE = 0
TOMBSTONE = 1
EXTERNAL = 2
KINDS = (VALUE, TOMBSTONE, EXTERNAL)
KIND_NAMES = {VALUE: "value", TOMBSTONE: "tombstone", EXTERNAL: "external"}

MAX_KEY_BYTES = 1024
KEY_HASH_SEED = 0x9E3779B97F4A7C15  # differs from the checksum's seed 0: a key's hash is not its checksum

RECORD_HEADER = struct.Struct("<QBBHQ")  # checksum, kind, flags, key_len, value_len
FOOTER = struct.Struct("<QQQQQIIQ8s")  # count, records, keys, index_len, keys_cks, version, nonce, cks, magic
FOOTER_BYTES = FOOTER.size
_FOOTER_CHECKED = FOOTER_BYTES - 16  # the footer bytes before its checksum and magic
INDEX_BYTES_PER_RECORD = 8 + 8 + 4 + 2 + 1

_HEADER_REST = struct.Struct("<BBHQ")  # the header after its checksum
_U64 = struct.Struct("<Q")
_NAME_RE = re.compile(r"([0-9a-f]{32})\.tbl")

Bytes = bytes | bytearray | memoryview


def checksum(data: Bytes) -> int:
    """xxh3_64 of data: the checksum of records, key blocks, indexes and external chunks."""
    return xxhash.xxh3_64_intdigest(data)


def key_hash(key: str) -> int:
    """xxh3_64 of the UTF-8 key, seeded apart from checksum; what the index is sorted by."""
    return xxhash.xxh3_64_intdigest(key.encode("utf-8"), KEY_HASH_SEED)


def table_name(data: Bytes) -> str:
    """The content name of a table file: hex xxh3_128 of all of it, plus ``.tbl``."""
    return xxhash.xxh3_128_hexdigest(data) + ".tbl"


def content_intact(name: str, data: Bytes) -> bool:
    """Whether ``data`` is exactly the file its content name ``name`` was made from.

    One C-level pass over the whole file vouches for every record in it, which is far cheaper
    than one checksum call per record; False (not a content name, or damage anywhere in the
    file) means the caller must check record by record.
    """
    base = name.rsplit("/", 1)[-1]
    return _NAME_RE.fullmatch(base) is not None and table_name(data) == base


# -- building ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltTable:
    """A finished table file and what the manifest records about it.

    The file is kept as the buffers it is made of, in order (record headers, values, key
    block, index, footer), not joined: a driver that can write them as they are
    (``Backend.put_parts``) saves a copy of the whole file on the writer's critical path.
    """

    name: str
    parts: tuple[Bytes, ...]
    size: int
    count: int
    index_bytes: int  # the suffix (index + footer) a reader fetches to load the index
    keys_bytes: int
    live_bytes: int  # sum of payload lengths of non-tombstone records (external: the descriptor)

    @functools.cached_property
    def data(self) -> bytes:
        """The whole file as one bytes object (joined on first use)."""
        return b"".join(self.parts)

    def tail(self, n: int) -> bytes:
        """The file's last ``n`` bytes (the index suffix), without joining the rest."""
        got: list[Bytes] = []
        left = n
        for part in reversed(self.parts):
            if left <= 0:
                break
            view = memoryview(part).cast("B")
            got.append(view if len(view) <= left else view[len(view) - left :])
            left -= len(view)
        return b"".join(reversed(got))

    @property
    def keys_offset(self) -> int:
        return self.size - self.index_bytes - self.keys_bytes


def build_table(records: Iterable[tuple[str, int, bytes]]) -> BuiltTable:
    """Pack (key, kind, payload) records, each validated, into one table file; the last of a
    key wins. The store, which validates on put, calls :func:`build_sorted` directly."""
    latest = _validated(records)
    return build_sorted(sorted(latest), latest)


def build_sorted(keys: Sequence[str], records: Mapping[str, tuple[int, Bytes]]) -> BuiltTable:
    """Pack ``records[key]`` (kind, payload) for each of ``keys``: sorted, unique, validated.

    Str order is code point order, which is also UTF-8 byte order. Per record Python packs a
    20-byte header and runs one checksum, creating no container objects (so a big batch
    does not set off the cyclic GC); the index is built with numpy, and the values are
    copied once, by the final join.
    """
    # Each record's bytes but the payload (header + key, checksum first) are built here; the
    # payload itself is left uncopied until the join.
    parts: list[Bytes] = []
    add = parts.append
    pack_rest, pack_u64, stream = _HEADER_REST.pack, _U64.pack, xxhash.xxh3_64
    kinds_l: list[int] = []
    value_lens_l: list[int] = []
    hashes_l: list[int] = []
    encoded: list[bytes] = []
    hash_key = key_hash  # looked up per build, so a monkeypatched key_hash is honoured
    for key in keys:
        kind, value = records[key]
        kb = key.encode("utf-8")
        size = value.nbytes if isinstance(value, memoryview) else len(value)
        rest = pack_rest(kind, 0, len(kb), size) + kb
        h = stream(rest)
        h.update(value)
        add(pack_u64(h.intdigest()) + rest)
        add(value)
        encoded.append(kb)
        kinds_l.append(kind)
        value_lens_l.append(size)
        hashes_l.append(hash_key(key))
    return _finish_table(encoded, parts, kinds_l, value_lens_l, hashes_l)


def _validated(records: Iterable[tuple[str, int, Bytes]]) -> dict[str, tuple[int, Bytes]]:
    """build_table's records by key (the last of a key wins), each checked or refused."""
    latest: dict[str, tuple[int, Bytes]] = {}
    for key, kind, payload in records:
        try:
            kb = key.encode("utf-8")
        except AttributeError:
            raise InvalidKeyError(f"table key must be str, got {type(key).__name__}") from None
        except UnicodeEncodeError as e:
            raise InvalidKeyError(f"table key {key[:60]!r} is not valid UTF-8") from e
        if not 0 < len(kb) <= MAX_KEY_BYTES or b"\x00" in kb:
            raise InvalidKeyError(
                f"table key {key[:60]!r} must be 1..{MAX_KEY_BYTES} UTF-8 bytes without NUL"
            )
        if kind not in KINDS:
            raise ValueError(f"record kind must be one of {KINDS}, got {kind!r} for key {key[:60]!r}")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidValueError(
                f"payload for key {key[:60]!r} must be bytes, got {type(payload).__name__}"
            )
        if kind == TOMBSTONE and len(payload):
            raise ValueError(f"tombstone for key {key[:60]!r} must have an empty payload")
        if kind == EXTERNAL:
            try:
                decode_external(payload)
            except CorruptionError as e:
                raise ValueError(f"external record for key {key[:60]!r}: {e}") from None
        latest[key] = (kind, payload)
    return latest


@dataclass(frozen=True)
class RawRecords:
    """Whole stored records to copy verbatim (compaction), as columns: one entry per record."""

    keys: list[bytes]  # UTF-8 keys
    records: list[Bytes]  # each record's whole bytes, checksum first
    kinds: NDArray[np.uint8]
    value_lens: NDArray[np.uint64]
    hashes: NDArray[np.uint64]  # key hashes, from the source index

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, start: int, stop: int) -> RawRecords:
        return RawRecords(
            self.keys[start:stop], self.records[start:stop], self.kinds[start:stop],
            self.value_lens[start:stop], self.hashes[start:stop],
        )  # fmt: skip

    @staticmethod
    def concat(parts: Sequence[RawRecords]) -> RawRecords:
        if len(parts) == 1:
            return parts[0]
        return RawRecords(
            [k for p in parts for k in p.keys], [r for p in parts for r in p.records],
            np.concatenate([p.kinds for p in parts]), np.concatenate([p.value_lens for p in parts]),
            np.concatenate([p.hashes for p in parts]),
        )  # fmt: skip


def copy_table(records: RawRecords) -> BuiltTable:
    """Pack records copied verbatim from other tables (compaction) into one new table file.

    Each record keeps its bytes and checksum, and its key hash comes from the source index,
    so no record is re-encoded or re-hashed: per record Python only sorts and gathers.
    Keys must be unique; the caller has verified each record against its source.
    """
    keys = records.keys
    order = sorted(range(len(keys)), key=keys.__getitem__)
    sorted_keys = list(map(keys.__getitem__, order))
    if len(set(sorted_keys)) != len(sorted_keys):
        raise ValueError("copy_table got the same key twice; compaction keeps one live record per key")
    parts = list(map(records.records.__getitem__, order))
    at = np.asarray(order, dtype=np.int64)
    return _finish_table(sorted_keys, parts, records.kinds[at], records.value_lens[at], records.hashes[at])


def _finish_table(
    keys: list[bytes],
    parts: list[Bytes],
    kinds_l: Sequence[int] | NDArray[Any],
    value_lens_l: Sequence[int] | NDArray[Any],
    hashes_l: Sequence[int] | NDArray[Any],
) -> BuiltTable:
    """Key block, index and footer after the records (``parts``, in key order), and the name."""
    n = len(keys)
    kinds = np.array(kinds_l, dtype=np.uint8)
    value_lens = np.array(value_lens_l, dtype=np.uint64)
    key_lens = np.fromiter(map(len, keys), dtype=np.uint16, count=n)
    offsets = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(RECORD_HEADER.size + key_lens.astype(np.uint64) + value_lens, out=offsets[1:])
    records_bytes = int(offsets[-1])

    key_block = b"\x00".join(keys) + b"\x00" if n else b""
    hashes = np.array(hashes_l, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")
    index = b"".join(
        (
            hashes[order].astype("<u8").tobytes(),
            offsets.astype("<u8").tobytes(),
            order.astype("<u4").tobytes(),
            key_lens.astype("<u2").tobytes(),
            kinds.tobytes(),
        )
    )
    # A random nonce makes every build's content, and so its content-hash name, unique: two
    # writes of identical records must never share a name, or GC could delete a file that one
    # of them is about to reference again.
    nonce = secrets.randbits(32)
    footer_head = FOOTER.pack(
        n, records_bytes, len(key_block), len(index), checksum(key_block), FORMAT_VERSION, nonce, 0, MAGIC
    )[:_FOOTER_CHECKED]
    index_sum = xxhash.xxh3_64(index)
    index_sum.update(footer_head)
    parts += (key_block, index, footer_head, _U64.pack(index_sum.intdigest()), MAGIC)
    name = xxhash.xxh3_128()
    collections.deque(map(name.update, parts), maxlen=0)  # the content name, without a join
    size = records_bytes + len(key_block) + len(index) + FOOTER_BYTES
    live = int(value_lens[kinds != TOMBSTONE].sum())
    return BuiltTable(
        name.hexdigest() + ".tbl", tuple(parts), size, n, len(index) + FOOTER_BYTES, len(key_block), live
    )


# -- reading -------------------------------------------------------------------------------


def parse_index(table: str, suffix: Bytes, *, file_size: int) -> _tableindex.TableIndex:
    """Load the index from the file's last ``index_bytes`` bytes (a longer tail is fine too).

    Checks magic, version, the index checksum and that every array is consistent with the
    file size, so a bad index is a CorruptionError here rather than a wrong read later.
    """
    mv = memoryview(suffix).cast("B")
    if len(mv) < FOOTER_BYTES:
        raise CorruptionError(
            f"table {table}: index suffix is {len(mv)} bytes, "
            f"shorter than the {FOOTER_BYTES}-byte footer (truncated?)"
        )
    count, records_bytes, keys_bytes, index_len, keys_cks, version, _nonce, cks, magic = FOOTER.unpack(
        mv[-FOOTER_BYTES:]
    )
    if magic != MAGIC:
        raise CorruptionError(
            f"table {table}: bad magic {bytes(magic)!r} at the end (want {MAGIC!r}); "
            "not a table file, or truncated"
        )
    if version != FORMAT_VERSION:
        raise CorruptionError(
            f"table {table}: unsupported format version {version} (this build reads {FORMAT_VERSION})"
        )
    if index_len != count * INDEX_BYTES_PER_RECORD + 8:
        raise CorruptionError(f"table {table}: footer says {count} records but an index of {index_len} bytes")
    need = index_len + FOOTER_BYTES
    if len(mv) < need:
        raise CorruptionError(
            f"table {table}: index suffix is {len(mv)} bytes but the footer needs {need} (truncated?)"
        )
    mv = mv[len(mv) - need :]
    if checksum(mv[: index_len + _FOOTER_CHECKED]) != cks:
        raise CorruptionError(f"table {table}: index checksum mismatch")
    if records_bytes + keys_bytes + need != file_size:
        raise CorruptionError(
            f"table {table}: sections add up to {records_bytes + keys_bytes + need} bytes "
            f"but the file is {file_size} bytes"
        )
    n = count
    at = 0

    def take(dtype: str, length: int) -> NDArray[Any]:
        nonlocal at
        arr = np.frombuffer(mv, dtype=dtype, count=length, offset=at).copy()  # own, aligned memory
        at += arr.nbytes
        return arr

    hashes: NDArray[np.uint64] = take("<u8", n).astype(np.uint64, copy=False)
    offsets: NDArray[np.uint64] = take("<u8", n + 1).astype(np.uint64, copy=False)
    positions: NDArray[np.uint32] = take("<u4", n).astype(np.uint32, copy=False)
    key_lens: NDArray[np.uint16] = take("<u2", n).astype(np.uint16, copy=False)
    kinds: NDArray[np.uint8] = take("u1", n)

    def bad(what: str) -> CorruptionError:
        return CorruptionError(f"table {table}: malformed index: {what}")

    if n and bool(np.any(hashes[1:] < hashes[:-1])):
        raise bad("key hashes are not sorted")
    if n and int(positions.max()) >= n:
        raise bad("a record position is out of range")
    seen = np.zeros(n, dtype=bool)
    seen[positions] = True
    if not bool(seen.all()):
        raise bad("record positions are not a permutation")
    if int(offsets[0]) != 0 or int(offsets[-1]) != records_bytes:
        raise bad(f"record offsets run {int(offsets[0])}..{int(offsets[-1])}, not 0..{records_bytes}")
    if n:
        if int(key_lens.min()) < 1 or int(key_lens.max()) > MAX_KEY_BYTES:
            raise bad("a key length is out of 1..1024")
        if int(kinds.max()) > max(KINDS):
            raise bad(f"unknown record kind {int(kinds.max())}")
        if bool(np.any(offsets[1:] < offsets[:-1])):
            raise bad("record offsets decrease")
        if bool(np.any(np.diff(offsets) < RECORD_HEADER.size + key_lens.astype(np.uint64))):
            raise bad("a record is shorter than its header and key")
    offs: NDArray[np.unsignedinteger[Any]] = offsets.astype(np.uint32) if records_bytes < 2**32 else offsets
    return _tableindex.TableIndex(
        name=table,
        file_size=file_size,
        index_bytes=need,
        keys_bytes=keys_bytes,
        records_bytes=records_bytes,
        keys_checksum=keys_cks,
        hashes=hashes,
        positions=positions,
        offsets=offs,
        key_lens=key_lens,
        kinds=kinds,
    )


def record_span(index: _tableindex.TableIndex, pos: int) -> tuple[int, int]:
    """(offset, length) of record pos: one ranged read fetches the whole record."""
    return index.span(pos)


def decode_record(table: str, blob: Bytes, expect_key: str | None = None) -> tuple[str, int, bytes]:
    """(key, kind, payload) of one record read from the file, checksum verified.

    CorruptionError when the checksum fails, the lengths do not match the bytes read, or the
    key is not ``expect_key``: the caller never gets wrong bytes.
    """
    mv = memoryview(blob).cast("B")
    hs = RECORD_HEADER.size
    if len(mv) < hs:
        raise CorruptionError(
            f"table {table}: record of {len(mv)} bytes is shorter than its {hs}-byte header"
        )
    cks, kind, flags, key_len, value_len = RECORD_HEADER.unpack(mv[:hs])
    if hs + key_len + value_len != len(mv):
        raise CorruptionError(
            f"table {table}: record header says {hs}+{key_len}+{value_len} bytes but {len(mv)} were read"
        )
    if checksum(mv[8:]) != cks:
        raise CorruptionError(f"table {table}: record checksum mismatch ({len(mv)} bytes)")
    if kind not in KINDS or flags != 0 or not 0 < key_len <= MAX_KEY_BYTES:
        raise CorruptionError(
            f"table {table}: malformed record header (kind {kind}, flags {flags}, key_len {key_len})"
        )
    try:
        key = str(mv[hs : hs + key_len], "utf-8")
    except UnicodeDecodeError as e:
        raise CorruptionError(f"table {table}: record key is not UTF-8") from e
    if expect_key is not None and key != expect_key:
        raise CorruptionError(f"table {table}: record holds key {key[:80]!r}, expected {expect_key[:80]!r}")
    return key, kind, bytes(mv[hs + key_len :])


def keys_span(index: _tableindex.TableIndex) -> tuple[int, int]:
    """(offset, length) of the key block: one ranged read lists every key without touching values."""
    return index.records_bytes, index.keys_bytes


def decode_keys(table: str, blob: Bytes, index: _tableindex.TableIndex) -> list[str]:
    """All keys in record order (sorted), checked against the footer's checksum and the index."""
    mv = memoryview(blob).cast("B")
    if len(mv) != index.keys_bytes:
        raise CorruptionError(f"table {table}: key block is {len(mv)} bytes, expected {index.keys_bytes}")
    if checksum(mv) != index.keys_checksum:
        raise CorruptionError(f"table {table}: key block checksum mismatch")
    n = index.count
    if n == 0:
        if len(mv):
            raise CorruptionError(f"table {table}: key block of an empty table is not empty")
        return []
    nul = np.flatnonzero(np.frombuffer(mv, dtype=np.uint8) == 0)
    if len(nul) != n or int(nul[-1]) != len(mv) - 1:
        raise CorruptionError(f"table {table}: key block holds {len(nul)} keys, the index {n}")
    lens = np.diff(nul, prepend=-1) - 1
    if not np.array_equal(lens, index.key_lens):
        raise CorruptionError(f"table {table}: key block key lengths disagree with the index")
    try:
        text = str(mv[:-1], "utf-8")
    except UnicodeDecodeError as e:
        raise CorruptionError(f"table {table}: key block is not UTF-8") from e
    return text.split("\x00")


# -- external pieces -----------------------------------------------------------------------

_EXT_VERSION = 1
_EXT_HEAD = struct.Struct("<BH")  # version, name length
_EXT_SIZES = struct.Struct("<QQI")  # size, chunk_bytes, chunk count


@dataclass(frozen=True)
class ExternalRef:
    """Where a large piece lives (its own object) and the checksum of each of its chunks."""

    obj_name: str
    size: int
    chunk_bytes: int
    chunk_checksums: tuple[int, ...]

    @property
    def chunks(self) -> int:
        return len(self.chunk_checksums)

    def chunk_span(self, i: int) -> tuple[int, int]:
        """(offset, length) of chunk i within the piece."""
        start = i * self.chunk_bytes
        return start, min(self.chunk_bytes, self.size - start)


def _chunk_count(size: int, chunk_bytes: int) -> int:
    return math.ceil(size / chunk_bytes) if size else 0


def encode_external(obj_name: str, size: int, chunk_bytes: int, chunk_checksums: Sequence[int]) -> bytes:
    """The payload of an EXTERNAL record: object name, size, chunk size and per-chunk xxh3_64."""
    name = obj_name.encode("utf-8")
    if not 0 < len(name) < 2**16:
        raise ValueError(f"external object name must be 1..65535 UTF-8 bytes, got {len(name)}")
    if size < 0 or chunk_bytes < 1 or chunk_bytes >= 2**64:
        raise ValueError(f"external piece needs size >= 0 and chunk_bytes >= 1, got {size}, {chunk_bytes}")
    if len(chunk_checksums) != _chunk_count(size, chunk_bytes):
        raise ValueError(
            f"external piece of {size} bytes in chunks of {chunk_bytes} needs "
            f"{_chunk_count(size, chunk_bytes)} checksums, got {len(chunk_checksums)}"
        )
    sums = np.asarray(chunk_checksums, dtype=np.uint64).astype("<u8").tobytes()
    head = _EXT_HEAD.pack(_EXT_VERSION, len(name))
    return b"".join((head, name, _EXT_SIZES.pack(size, chunk_bytes, len(chunk_checksums)), sums))


def decode_external(payload: Bytes, table: str | None = None) -> ExternalRef:
    """Parse an EXTERNAL payload; CorruptionError if it is malformed."""
    where = f"table {table}: " if table else ""
    mv = memoryview(payload).cast("B")
    try:
        version, name_len = _EXT_HEAD.unpack_from(mv, 0)
        if version != _EXT_VERSION:
            raise CorruptionError(f"{where}external descriptor has unknown version {version}")
        at = _EXT_HEAD.size
        name = str(mv[at : at + name_len], "utf-8")
        at += name_len
        size, chunk_bytes, chunks = _EXT_SIZES.unpack_from(mv, at)
        at += _EXT_SIZES.size
    except (struct.error, UnicodeDecodeError) as e:
        raise CorruptionError(f"{where}malformed external descriptor ({len(mv)} bytes): {e}") from e
    if not name or chunk_bytes < 1 or chunks != _chunk_count(size, chunk_bytes) or len(mv) != at + 8 * chunks:
        raise CorruptionError(
            f"{where}malformed external descriptor: name {name[:80]!r}, size {size}, "
            f"chunk_bytes {chunk_bytes}, {chunks} chunks in {len(mv)} bytes"
        )
    sums = tuple(np.frombuffer(mv, dtype="<u8", count=chunks, offset=at).tolist())
    return ExternalRef(name, size, chunk_bytes, sums)


# -- fsck ----------------------------------------------------------------------------------

MAX_PROBLEMS = 50


def verify_table(name: str, data: Bytes) -> list[str]:
    """Check a whole table file: footer, index, every record, the key block and the content name.

    Returns human-readable problems; an empty list means the file is sound.
    """
    problems: list[str] = []
    base = name.rsplit("/", 1)[-1]
    match = _NAME_RE.fullmatch(base)
    if match and table_name(data) != base:
        problems.append(
            f"table {name}: content hash {table_name(data)} does not match the name (altered or mislabeled)"
        )
    try:
        index = parse_index(name, data, file_size=len(data))
    except CorruptionError as e:
        problems.append(str(e))
        return problems
    mv = memoryview(data).cast("B")
    n = index.count
    rank = np.empty(n, dtype=np.intp)
    rank[index.positions] = np.arange(n, dtype=np.intp)
    record_keys: list[str | None] = []
    bad_records = 0
    prev: bytes | None = None

    def report(msg: str) -> None:
        nonlocal bad_records
        bad_records += 1
        if bad_records <= MAX_PROBLEMS:
            problems.append(msg)

    for pos in range(n):
        off, length = record_span(index, pos)
        try:
            key, kind, payload = decode_record(name, mv[off : off + length])
        except CorruptionError as e:
            report(f"record {pos} at offset {off}: {e}")
            record_keys.append(None)
            prev = None
            continue
        record_keys.append(key)
        kb = key.encode("utf-8")
        if prev is not None and kb <= prev:
            report(f"table {name}: record {pos} key {key[:80]!r} is not after the previous key")
        prev = kb
        if kind != index.kind(pos):
            said = KIND_NAMES.get(index.kind(pos))
            report(f"table {name}: record {pos} is a {KIND_NAMES[kind]} but the index says {said}")
        if len(kb) != int(index.key_lens[pos]):
            report(f"table {name}: record {pos} key length differs from the index")
        if key_hash(key) != int(index.hashes[rank[pos]]):
            report(f"table {name}: record {pos} key {key[:80]!r} hash differs from the index")
        if kind == EXTERNAL:
            try:
                decode_external(payload, name)
            except CorruptionError as e:
                report(f"record {pos}: {e}")
        elif kind == TOMBSTONE and payload:
            report(f"table {name}: tombstone record {pos} carries {len(payload)} payload bytes")
    if bad_records > MAX_PROBLEMS:
        problems.append(f"table {name}: ... and {bad_records - MAX_PROBLEMS} more record problems")
    off, length = keys_span(index)
    try:
        keys = decode_keys(name, mv[off : off + length], index)
    except CorruptionError as e:
        problems.append(str(e))
    else:
        pairs = enumerate(zip(keys, record_keys, strict=True))
        wrong = [i for i, (a, b) in pairs if b is not None and a != b]
        if wrong:
            problems.append(
                f"table {name}: key block disagrees with {len(wrong)} records (first: record {wrong[0]})"
            )
    return problems


__all__ = [
    "EXTERNAL",
    "FORMAT_VERSION",
    "MAGIC",
    "TOMBSTONE",
    "VALUE",
    "BuiltTable",
    "ExternalRef",
    "build_table",
    "checksum",
    "content_intact",
    "decode_external",
    "decode_keys",
    "decode_record",
    "encode_external",
    "key_hash",
    "keys_span",
    "parse_index",
    "record_span",
    "table_name",
    "verify_table",
]
