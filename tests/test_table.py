"""Table file format and its in-RAM index: round trips, lookups, collisions, and corruption.

The corruption tests hold the format to one rule: a damaged file either raises
CorruptionError or still decodes to exactly the original data, never to wrong bytes.
"""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Sequence

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from piecestore import table as table_mod
from piecestore.errors import CorruptionError, InvalidKeyError
from piecestore.table import (
    EXTERNAL,
    FOOTER_BYTES,
    FORMAT_VERSION,
    MAGIC,
    TOMBSTONE,
    VALUE,
    BuiltTable,
    build_table,
    checksum,
    decode_external,
    decode_keys,
    decode_record,
    encode_external,
    key_hash,
    keys_span,
    parse_index,
    record_span,
    table_name,
    verify_table,
)
from piecestore.tableindex import TableIndex

Record = tuple[str, int, bytes]


def load(built: BuiltTable, data: bytes | None = None) -> TableIndex:
    data = built.data if data is None else data
    return parse_index(built.name, data[len(data) - built.index_bytes :], file_size=len(data))


def read(built: BuiltTable, index: TableIndex, pos: int, data: bytes | None = None) -> Record:
    data = built.data if data is None else data
    off, length = record_span(index, pos)
    return decode_record(built.name, data[off : off + length])


def read_keys(built: BuiltTable, index: TableIndex, data: bytes | None = None) -> list[str]:
    data = built.data if data is None else data
    off, length = keys_span(index)
    return decode_keys(built.name, data[off : off + length], index)


def expected(records: Sequence[Record]) -> dict[str, tuple[int, bytes]]:
    last: dict[str, tuple[int, bytes]] = {}
    for key, kind, payload in records:
        last[key] = (kind, payload)
    return dict(sorted(last.items(), key=lambda kv: kv[0].encode()))


def check_round_trip(records: Sequence[Record]) -> None:
    built = build_table(records)
    want = expected(records)
    index = load(built)
    assert built.count == index.count == len(want)
    assert built.name == xxhash.xxh3_128_hexdigest(built.data) + ".tbl"
    assert built.size == len(built.data) and b"".join(built.parts) == built.data
    for n in (0, 1, built.index_bytes - 1, built.index_bytes, built.size):
        assert built.tail(n) == built.data[len(built.data) - n :]
    assert built.live_bytes == sum(len(p) for k, p in want.values() if k != TOMBSTONE)
    assert index.index_bytes == built.index_bytes and index.keys_bytes == built.keys_bytes
    keys = read_keys(built, index)
    assert keys == list(want)
    for pos, key in enumerate(keys):
        kind, payload = want[key]
        assert index.find(key) == [pos]
        assert read(built, index, pos) == (key, kind, payload)
        off, length = record_span(index, pos)
        assert decode_record(built.name, built.data[off : off + length], expect_key=key)[2] == payload
        assert index.kind(pos) == kind
        assert index.value_size(pos) == len(payload)
        assert index.may_contain(key_hash(key))
    assert index.find_many(keys) == [[i] for i in range(len(keys))]
    assert verify_table(built.name, built.data) == []


# -- round trips ---------------------------------------------------------------------------

keys_st = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=40
)
records_st = st.lists(
    st.tuples(
        keys_st,
        st.sampled_from([VALUE, VALUE, TOMBSTONE]),
        st.binary(max_size=64),
    ).map(lambda r: (r[0], r[1], b"" if r[1] == TOMBSTONE else r[2])),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(records_st)
def test_round_trip_hypothesis(records: list[Record]) -> None:
    check_round_trip(records)


def test_round_trip_mixed() -> None:
    rng = random.Random(1)
    records: list[Record] = []
    for i in range(2000):
        key = f"dir{rng.randrange(50)}/piece-{i}" + rng.choice(["", "é", "日本", "🦀", "z" * 300])
        kind = rng.choice([VALUE, VALUE, VALUE, TOMBSTONE, EXTERNAL])
        if kind == VALUE:
            payload = rng.randbytes(rng.choice([0, 1, 10, 5000]))
        elif kind == TOMBSTONE:
            payload = b""
        else:
            payload = encode_external(f"blobs/{i}", 3_000_000, 1 << 20, [1, 2, 3])
        records.append((key, kind, payload))
    records += [(records[5][0], VALUE, b"overwritten"), (records[9][0], TOMBSTONE, b"")]  # last wins
    records.append(("k" * 1024, VALUE, b"longest key"))
    records.append(("\U0010ffff" * 256, VALUE, b"4-byte chars"))
    check_round_trip(records)


def test_duplicates_last_wins() -> None:
    built = build_table([("a", VALUE, b"1"), ("b", VALUE, b"2"), ("a", TOMBSTONE, b""), ("b", VALUE, b"3")])
    index = load(built)
    assert read_keys(built, index) == ["a", "b"]
    assert read(built, index, 0) == ("a", TOMBSTONE, b"")
    assert read(built, index, 1) == ("b", VALUE, b"3")
    assert built.live_bytes == 1


def test_sorted_by_utf8_bytes() -> None:
    keys = ["b", "a", "\uffff", "\U00010000", "Z", "é", "aa"]
    built = build_table([(k, VALUE, k.encode()) for k in keys])
    got = read_keys(built, load(built))
    assert got == sorted(keys, key=lambda k: k.encode()) == sorted(keys)


def test_empty_table() -> None:
    built = build_table([])
    index = load(built)
    assert index.count == 0 and built.count == 0 and built.keys_bytes == 0
    assert index.find("x") == [] and index.find_many(["x", "y"]) == [[], []] and index.find_many([]) == []
    assert not index.may_contain(key_hash("x"))
    assert read_keys(built, index) == []
    assert verify_table(built.name, built.data) == []
    with pytest.raises(IndexError):
        record_span(index, 0)


def test_name_is_the_content_hash_and_record_order_does_not_matter() -> None:
    records = [("x", VALUE, b"1"), ("y", VALUE, b"2")]
    a, b = build_table(records), build_table(list(reversed(records)))
    assert a.data[:-FOOTER_BYTES] == b.data[:-FOOTER_BYTES]  # same records, index and key block
    assert a.name == table_name(a.data) and b.name == table_name(b.data)


def test_bad_input_refused() -> None:
    for key in ["", "a\x00b", "k" * 1025, "\ud800", b"bytes"]:
        with pytest.raises(InvalidKeyError):
            build_table([(key, VALUE, b"")])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        build_table([("k", 7, b"")])
    with pytest.raises(ValueError):
        build_table([("k", TOMBSTONE, b"not empty")])
    with pytest.raises(ValueError):
        build_table([("k", EXTERNAL, b"not a descriptor")])
    with pytest.raises(TypeError):
        build_table([("k", VALUE, "text")])  # type: ignore[list-item]


def test_memoryview_and_bytearray_payloads() -> None:
    built = build_table([("a", VALUE, memoryview(b"xyz")[1:]), ("b", VALUE, bytearray(b"q"))])  # type: ignore[list-item]
    index = load(built)
    assert read(built, index, 0) == ("a", VALUE, b"yz") and read(built, index, 1) == ("b", VALUE, b"q")


# -- lookups -------------------------------------------------------------------------------


def test_find_present_and_absent() -> None:
    records = [(f"key-{i}", VALUE, str(i).encode()) for i in range(0, 5000, 2)]
    built = build_table(records)
    index = load(built)
    present = [f"key-{i}" for i in range(0, 5000, 2)]
    absent = [f"key-{i}" for i in range(1, 5000, 2)] + ["", "nope", "key-"]
    for k in present[:200]:
        (pos,) = index.find(k)
        assert read(built, index, pos)[0] == k
    assert all(index.find(k) == [] for k in absent)
    assert not any(index.may_contain(key_hash(k)) for k in absent)
    mixed = present + absent
    random.Random(3).shuffle(mixed)
    found = index.find_many(mixed)
    for k, hits in zip(mixed, found, strict=True):
        assert hits == index.find(k)
        assert (len(hits) == 1) == (k in set(present))
    # extreme hashes compare as uint64, not via float64
    assert not index.may_contain(0) and not index.may_contain(2**64 - 1)
    stored = set(index.hashes.tolist())
    for h in index.hashes[:50].tolist():
        assert index.may_contain(h) and index.may_contain(h ^ 1) == ((h ^ 1) in stored)


def test_find_many_on_a_large_table() -> None:
    """10k lookups, half absent, in a 100k-record table (its speed is benchmarked, not tested)."""
    built = build_table([(f"k{i:07d}", VALUE, b"v") for i in range(100_000)])
    index = load(built)
    keys = [f"k{i:07d}" for i in range(0, 200_000, 20)]
    hits = index.find_many(keys)
    assert sum(1 for h in hits if h) == 5000
    assert all(h == ([int(k[1:])] if int(k[1:]) < 100_000 else []) for k, h in zip(keys, hits, strict=True))


def test_hash_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    real = table_mod.key_hash

    def colliding(key: str) -> int:
        return 12345 if key.startswith("c") else real(key)

    monkeypatch.setattr(table_mod, "key_hash", colliding)
    records = [(f"c{i}", VALUE, f"value {i}".encode()) for i in range(5)]
    records += [("a", VALUE, b"A"), ("z", TOMBSTONE, b"")]
    built = build_table(records)
    index = load(built)
    hits = index.find("c3")
    assert len(hits) == 5
    matches = [pos for pos in hits if read(built, index, pos)[0] == "c3"]
    assert len(matches) == 1 and read(built, index, matches[0]) == ("c3", VALUE, b"value 3")
    assert index.find("cX") == hits  # absent but colliding: the engine compares keys and finds none
    assert index.find_many(["c0", "a", "b", "z"]) == [hits, index.find("a"), [], index.find("z")]
    assert len(index.find("a")) == 1
    with pytest.raises(CorruptionError):
        off, length = record_span(index, hits[0])
        decode_record(built.name, built.data[off : off + length], expect_key="c-other")
    assert verify_table(built.name, built.data) == []


# -- corruption ----------------------------------------------------------------------------


def _sample_table() -> tuple[BuiltTable, TableIndex, list[Record], list[str]]:
    records: list[Record] = [
        ("alpha", VALUE, b"first value"),
        ("beta", TOMBSTONE, b""),
        ("empty", VALUE, b""),
        ("ext", EXTERNAL, encode_external("blobs/abc", 2_500_000, 1 << 20, [11, 22, 33])),
        ("日本/κλειδί", VALUE, bytes(range(256))),
    ]
    built = build_table(records)
    index = load(built)
    decoded = [read(built, index, pos) for pos in range(index.count)]
    return built, index, decoded, read_keys(built, index)


SAMPLE = _sample_table()


def _same_index(a: TableIndex, b: TableIndex) -> bool:
    arrays = ("hashes", "positions", "offsets", "key_lens", "kinds")
    return (
        a.count == b.count and a.records_bytes == b.records_bytes and a.keys_bytes == b.keys_bytes
        and a.keys_checksum == b.keys_checksum
        and all(np.array_equal(getattr(a, f), getattr(b, f)) for f in arrays)
    )  # fmt: skip


def assert_never_wrong(data: bytes) -> None:
    """Every decoder either raises CorruptionError or returns exactly the original data."""
    built, index, records, keys = SAMPLE
    for pos, want in enumerate(records):  # reads located by the good index
        try:
            got = read(built, index, pos, data)
        except CorruptionError:
            continue
        assert got == want
    with contextlib.suppress(CorruptionError):
        assert read_keys(built, index, data) == keys
    try:
        damaged = load(built, data)
    except CorruptionError:
        pass
    else:
        assert _same_index(damaged, index)
    for pos in range(index.count):  # a record checked against its expected key
        off, length = record_span(index, pos)
        try:
            got = decode_record(built.name, data[off : off + length], expect_key=keys[pos])
        except CorruptionError:
            continue
        assert got == records[pos]


def flip(data: bytes, bit: int) -> bytes:
    buf = bytearray(data)
    buf[bit // 8] ^= 1 << (bit % 8)
    return bytes(buf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(SAMPLE[0].data) * 8 - 1))
def test_bit_flip_anywhere_never_returns_wrong_bytes(bit: int) -> None:
    built = SAMPLE[0]
    bad = flip(built.data, bit)
    assert_never_wrong(bad)
    assert verify_table(built.name, bad), f"flipping bit {bit} went unnoticed by verify_table"


def test_every_byte_flipped_is_caught() -> None:
    """Exhaustive over the sample file: every byte is covered by some checksum."""
    built = SAMPLE[0]
    for i in range(len(built.data)):
        bad = flip(built.data, i * 8 + (i % 8))
        assert_never_wrong(bad)
        assert verify_table(built.name, bad), f"flipping a bit of byte {i} went unnoticed"


@settings(max_examples=150, deadline=None)
@given(st.integers(min_value=0), st.binary(min_size=1, max_size=16))
def test_overwritten_bytes_never_return_wrong_data(where: int, junk: bytes) -> None:
    data = bytearray(SAMPLE[0].data)
    at = where % len(data)
    data[at : at + len(junk)] = junk[: len(data) - at]
    if bytes(data) != SAMPLE[0].data:
        assert_never_wrong(bytes(data))
        assert verify_table(SAMPLE[0].name, bytes(data))


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=len(SAMPLE[0].data)))
def test_truncation(cut: int) -> None:
    built, index, _, _ = SAMPLE
    suffix = built.data[-built.index_bytes :]
    with pytest.raises(CorruptionError):  # a short suffix for the same file size
        parse_index(built.name, suffix[cut:], file_size=len(built.data))
    short = built.data[: len(built.data) - cut]
    with pytest.raises(CorruptionError):  # a truncated file read by its own size
        parse_index(built.name, short[-built.index_bytes :], file_size=len(short))
    assert verify_table(built.name, short)
    for pos in range(index.count):
        off, length = record_span(index, pos)
        blob = built.data[off : off + length]
        with pytest.raises(CorruptionError):
            decode_record(built.name, blob[: max(0, length - cut)])
        with pytest.raises(CorruptionError):
            decode_record(built.name, blob + b"\x00" * cut)  # a read past the record
    off, length = keys_span(index)
    with pytest.raises(CorruptionError):
        decode_keys(built.name, built.data[off : off + max(0, length - cut)], index)


def test_wrong_file_size_and_misplaced_reads() -> None:
    built, index, _, _ = SAMPLE
    suffix = built.data[-built.index_bytes :]
    for size in (len(built.data) - 1, len(built.data) + 1, 0):
        with pytest.raises(CorruptionError, match="file is"):
            parse_index(built.name, suffix, file_size=size)
    whole_file = parse_index(built.name, built.data, file_size=len(built.data))  # a longer tail is fine
    assert _same_index(whole_file, index)
    off, length = record_span(index, 1)
    for shift in (-1, 1):
        with pytest.raises(CorruptionError):
            decode_record(built.name, built.data[off + shift : off + shift + length])
    with pytest.raises(CorruptionError):  # the right bytes for another key
        decode_record(built.name, built.data[off : off + length], expect_key="alpha")
    off, length = keys_span(index)
    other = build_table([("a", VALUE, b""), ("b", VALUE, b"")])
    with pytest.raises(CorruptionError):  # key block of one table checked against another's index
        decode_keys(built.name, built.data[off : off + length], load(other))


def _reseal(data: bytes, **changes: int | bytes) -> bytes:
    """Rewrite footer fields and recompute its checksum, to reach the checks behind it."""
    fields = list(table_mod.FOOTER.unpack(data[-FOOTER_BYTES:]))
    # "reserved" is the footer's nonce field
    names = ["count", "records", "keys", "index_len", "keys_cks", "version", "reserved", "cks", "magic"]
    for name, value in changes.items():
        fields[names.index(name)] = value
    head = table_mod.FOOTER.pack(*fields)[: FOOTER_BYTES - 16]
    index_len = int(fields[3])  # type: ignore[call-overload]
    body = data[: len(data) - FOOTER_BYTES]
    cks = checksum(body[len(body) - index_len :] + head)
    return body + head + struct.pack("<Q", cks) + bytes(fields[8])  # type: ignore[arg-type]


def test_magic_and_version() -> None:
    built = SAMPLE[0]
    assert len(MAGIC) == 8 and FORMAT_VERSION == 1
    bad_magic = built.data[:-8] + b"NOTTABLE"
    with pytest.raises(CorruptionError, match="magic"):
        parse_index(built.name, bad_magic[-built.index_bytes :], file_size=len(built.data))
    resealed = _reseal(built.data)
    assert resealed == built.data
    newer = _reseal(built.data, version=FORMAT_VERSION + 1)
    with pytest.raises(CorruptionError, match="version 2"):
        parse_index(built.name, newer[-built.index_bytes :], file_size=len(newer))
    assert any("version" in p for p in verify_table(built.name, newer))
    size = len(built.data)
    # the nonce is free-form (it only makes names unique) but still covered by the checksum
    assert parse_index(built.name, _reseal(built.data, reserved=7)[-built.index_bytes :], file_size=size)
    with pytest.raises(CorruptionError, match="records but an index"):
        parse_index(built.name, _reseal(built.data, count=4)[-built.index_bytes :], file_size=size)
    with pytest.raises(CorruptionError, match="shorter than"):
        parse_index(built.name, b"tiny", file_size=4)
    with pytest.raises(CorruptionError, match="magic"):
        parse_index(built.name, b"\x00" * 200, file_size=200)


def test_malformed_index_is_rejected_even_with_valid_checksum() -> None:
    """A buggy writer's index (checksum fine) must still not produce wrong spans."""
    built = SAMPLE[0]
    n = built.count
    data = bytearray(built.data)
    index_start = len(data) - built.index_bytes

    def resealed(mutate: object) -> bytes:
        buf = bytearray(data)
        mutate(buf)  # type: ignore[operator]
        return _reseal(bytes(buf))

    def swap_hashes(buf: bytearray) -> None:
        a, b = index_start, index_start + 8
        buf[a:b], buf[b : b + 8] = buf[b : b + 8], buf[a:b]

    def dup_position(buf: bytearray) -> None:
        p = index_start + 16 * n + 8
        buf[p + 4 : p + 8] = buf[p : p + 4]

    def bad_offset(buf: bytearray) -> None:
        o = index_start + 8 * n + 8  # offsets[1]
        buf[o : o + 8] = struct.pack("<Q", 3)

    def bad_kind(buf: bytearray) -> None:
        buf[-FOOTER_BYTES - 1] = 9

    def zero_key_len(buf: bytearray) -> None:
        k = index_start + 20 * n + 8
        buf[k : k + 2] = b"\x00\x00"

    for mutate, what in [
        (swap_hashes, "not sorted"),
        (dup_position, "permutation"),
        (bad_offset, "shorter than its header"),
        (bad_kind, "unknown record kind"),
        (zero_key_len, "key length"),
    ]:
        bad = resealed(mutate)
        with pytest.raises(CorruptionError, match=what):
            parse_index(built.name, bad[-built.index_bytes :], file_size=len(bad))


def test_verify_table_reports() -> None:
    built, index, _, _ = SAMPLE
    assert verify_table(built.name, built.data) == []
    off, _ = record_span(index, 4)
    problems = verify_table(built.name, flip(built.data, (off + 30) * 8))
    assert any("record 4" in p and "checksum" in p for p in problems), problems
    assert any("content hash" in p for p in problems)
    ko, _ = keys_span(index)
    problems = verify_table(built.name, flip(built.data, ko * 8))
    assert any("key block" in p for p in problems), problems
    problems = verify_table("tables/" + "0" * 32 + ".tbl", built.data)
    assert problems and "content hash" in problems[0]
    assert verify_table("other-name", built.data) == []  # names not of the content form are not checked
    assert verify_table(built.name, b"")
    many = build_table([(f"k{i}", VALUE, b"v" * 10) for i in range(200)])
    data = bytearray(many.data)
    mi = load(many)
    for pos in range(200):
        o, _ = record_span(mi, pos)
        data[o + 25] ^= 1
    problems = verify_table(many.name, bytes(data))
    assert any("and 150 more record problems" in p for p in problems), problems[-3:]


# -- external descriptors ------------------------------------------------------------------


def test_external_round_trip_and_malformed() -> None:
    sums = [0, 2**64 - 1, 12345]
    payload = encode_external("blobs/x/y", 2 * 1024 + 1, 1024, sums)
    ref = decode_external(payload)
    assert (ref.obj_name, ref.size, ref.chunk_bytes) == ("blobs/x/y", 2049, 1024)
    assert ref.chunk_checksums == tuple(sums)
    assert ref.chunk_span(2) == (2048, 1)
    assert decode_external(encode_external("o", 0, 1, [])).chunk_checksums == ()
    for bad in [payload[:-1], payload + b"\x00", b"", b"\x02" + payload[1:], payload[:3]]:
        with pytest.raises(CorruptionError):
            decode_external(bad, "t1")
    with pytest.raises(ValueError):
        encode_external("o", 10, 4, [1, 2])  # needs 3 chunk checksums
    with pytest.raises(ValueError):
        encode_external("", 0, 1, [])
    with pytest.raises(ValueError):
        encode_external("o", 1, 0, [1])


# -- size ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def million() -> BuiltTable:
    return build_table((f"piece/{i:09d}", VALUE, b"") for i in range(1_000_000))


def test_index_ram_at_1m(million: BuiltTable) -> None:
    """At most 48 bytes of index RAM a piece at 1M pieces (open time: benchmarks/bench_open.py)."""
    index = parse_index(million.name, million.tail(million.index_bytes), file_size=million.size)
    assert index.count == 1_000_000
    assert index.nbytes() / index.count <= 48
    assert index.find("piece/000765432") == [765432]
    assert index.find("piece/1000000000") == []


def test_build_100k_4kib_records() -> None:
    """A 400 MB table builds and reads back (its build rate is benchmarked, not tested)."""
    payload = random.Random(7).randbytes(4096)
    records = [(f"piece/{i:08d}", VALUE, payload) for i in range(100_000)]
    built = build_table(records)
    assert built.count == 100_000 and built.size == len(built.data)
    index = load(built)
    assert read(built, index, 54_321) == ("piece/00054321", VALUE, payload)


def test_identical_records_build_distinct_names() -> None:
    """GC safety: rewriting the same records must never reuse a name that may be pending deletion."""
    records = [("k", VALUE, b"v")]
    names = {build_table(records).name for _ in range(50)}
    assert len(names) == 50
