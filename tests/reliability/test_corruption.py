"""Corruption: bits flipped and files truncated on disk and in the bucket.

Damage goes to table records, key blocks, indexes and footers, large-piece objects, the
manifest and the local disk cache. Reads of affected pieces must raise CorruptionError (never
return wrong or older bytes), other pieces must still read, the store must still open so fsck
can run, and fsck must name the damaged object. GC must refuse to act on a damaged store.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from piecestore import CorruptionError, NotFoundError, PieceStore, PieceStoreError
from piecestore.backends import Backend, open_backend
from piecestore.backends.file import physical_path
from piecestore.table import FOOTER_BYTES, RECORD_HEADER
from piecestore.tableset import table_object
from tests.conftest import s3_credentials
from tests.reliability._support import open_store, remote, s3_url

SMALL = 16384
BIG = 2 * 1024 * 1024 + 12345  # three 1 MiB chunks


def val(key: str, gen: int = 0) -> bytes:
    return (f"{key}:{gen}:".encode() * 40)[: 100 + len(key) * 7]


@dataclass
class Built:
    url: str
    raw: Backend  # a second, independent handle that writes damage straight into the store
    tables: dict[str, str]  # label -> table name ("old", "mid", "new")
    values: dict[str, bytes]
    big: bytes

    def damage_at(self, name: str, edit: Callable[[bytearray], bytes | bytearray]) -> None:
        """Rewrite an object's bytes: in place on disk for file stores, a raw PUT for buckets."""
        if self.url.startswith("file://"):
            dirs, leaf = physical_path(name)
            path = Path(self.url[len("file://") :], *dirs, leaf)
            data = edit(bytearray(path.read_bytes()))
            with open(path, "r+b") as f:  # same inode, as a bad disk would leave it
                f.write(data)
                f.truncate(len(data))
        else:
            self.raw.put(name, bytes(edit(bytearray(self.raw.get(name)))))

    def flip(self, name: str, offset: int, bit: int = 3) -> None:
        def edit(data: bytearray) -> bytearray:
            data[offset] ^= 1 << bit
            return data

        self.damage_at(name, edit)

    def truncate(self, name: str, size: int) -> None:
        self.damage_at(name, lambda data: data[:size])


def raw_backend(url: str) -> Backend:
    return open_backend(url, **(s3_credentials() if remote(url) else {}))


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def built(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Built]:
    if request.param == "file":
        url = "file://" + str(tmp_path / "store")
    else:
        url = s3_url(request.getfixturevalue("s3_server").endpoint)
    values: dict[str, bytes] = {}
    tables: dict[str, str] = {}
    big = os.urandom(BIG)
    with open_store(url, engine_small_piece_max_bytes=SMALL) as s:
        for label, prefix, gen in (("old", "a", 0), ("mid", "b", 1), ("new", "c", 2)):
            batch = {f"{prefix}/{i:02d}": val(f"{prefix}/{i:02d}") for i in range(40)}
            batch["dup"] = val("dup", gen)  # each table shadows the one before
            if label == "mid":
                batch["big"] = big
            s.put_many(batch)
            values.update(batch)
            tables[label] = s.head(f"{prefix}/00").table or ""
    raw = raw_backend(url)
    yield Built(url, raw, tables, values, big)
    raw.close()


def spans(store: PieceStore, table: str, key: str) -> tuple[int, int]:
    for spec, index in store.tables.snapshot():
        if spec.name == table:
            (pos,) = index.find(key)
            return index.span(pos)
    raise AssertionError(f"{table} not loaded")


def table_size(store: PieceStore, table: str) -> tuple[int, int, int]:
    """(size, index_bytes, keys offset) of a table, from the manifest and its index."""
    for spec, index in store.tables.snapshot():
        if spec.name == table:
            return spec.size, spec.index_bytes, index.records_bytes
    raise AssertionError(f"{table} not loaded")


def keys_of(b: Built, prefix: str) -> list[str]:
    return [k for k in b.values if k.startswith(prefix + "/")]


def assert_reads(store: PieceStore, b: Built, keys: list[str]) -> None:
    assert store.get_many(keys) == {k: b.values[k] for k in keys}
    for k in keys[:5]:
        assert store.get(k) == b.values[k]


def assert_corrupt(store: PieceStore, keys: list[str]) -> None:
    for k in keys:
        with pytest.raises(CorruptionError):
            store.get(k)
    with pytest.raises(CorruptionError):
        store.get_many(keys)


def fsck_names(store: PieceStore, what: str) -> str:
    report = store.fsck()
    assert not report.ok, "fsck found nothing wrong in a damaged store"
    text = "\n".join(report.problems)
    assert what in text, f"fsck does not name {what}: {text}"
    return text


def gc_refuses(store: PieceStore, b: Built) -> None:
    """GC on a damaged store raises, and deletes nothing."""
    before = {m.name for m in b.raw.list()}
    ahead = datetime.now(UTC) + timedelta(days=1)
    with pytest.raises(CorruptionError):
        store.gc(clock=lambda: ahead)
    after = {m.name for m in b.raw.list()}
    lost = {n for n in before - after if n.startswith(("tables/", "blobs/"))}
    assert not lost, f"GC deleted {lost} from a damaged store"


def test_flipped_record_bit(built: Built) -> None:
    b = built
    mid = b.tables["mid"]
    with open_store(b.url) as s:
        off, length = spans(s, mid, "b/07")
    b.flip(table_object(mid), off + length - 10)
    with open_store(b.url) as s:
        assert_corrupt(s, ["b/07"])
        with pytest.raises(CorruptionError):
            s.get_many(["b/06", "b/07", "a/00"])
        # every other record of the same table, and the other tables, still read
        assert_reads(s, b, [k for k in keys_of(b, "b") if k != "b/07"] + keys_of(b, "a") + keys_of(b, "c"))
        assert s.get("dup") == b.values["dup"] and s.get("big") == b.big
        assert {p.key for p in s.list("b/")} == set(keys_of(b, "b"))  # the key block is intact
        text = fsck_names(s, mid)
        assert "record" in text


def test_flipped_newest_record_never_falls_back_to_an_older_version(built: Built) -> None:
    b = built
    new = b.tables["new"]
    with open_store(b.url) as s:
        off, length = spans(s, new, "dup")
    for bit in (0, 7):
        b.flip(table_object(new), off + length // 2, bit)
        with open_store(b.url) as s:
            assert_corrupt(s, ["dup"])  # not the older "dup" of the mid or old table
            assert_reads(s, b, keys_of(b, "c"))
        b.flip(table_object(new), off + length // 2, bit)  # undo
    with open_store(b.url) as s:
        assert s.get("dup") == b.values["dup"] and s.fsck().ok


def test_flipped_record_header(built: Built) -> None:
    b = built
    old = b.tables["old"]
    with open_store(b.url) as s:
        off, _ = spans(s, old, "a/05")
    b.flip(table_object(old), off + 9)  # the kind byte, right after the record checksum
    with open_store(b.url) as s:
        assert_corrupt(s, ["a/05"])
        assert_reads(s, b, [k for k in keys_of(b, "a") if k != "a/05"])
        fsck_names(s, old)


def test_flipped_key_block(built: Built) -> None:
    b = built
    mid = b.tables["mid"]
    with open_store(b.url) as s:
        _, _, keys_at = table_size(s, mid)
    b.flip(table_object(mid), keys_at + 3)
    with open_store(b.url) as s:
        # values never depend on the key block: they all still read
        assert_reads(s, b, keys_of(b, "a") + keys_of(b, "b") + keys_of(b, "c"))
        with pytest.raises(CorruptionError):
            list(s.list())  # any prefix: the damaged block may hold keys under it
        assert "key block" in fsck_names(s, mid)
        gc_refuses(s, b)


DAMAGES: dict[str, Callable[[Built, str, int, int], None]] = {
    "index-bit": lambda b, name, size, ib: b.flip(name, size - ib + 5),
    "footer-bit": lambda b, name, size, ib: b.flip(name, size - FOOTER_BYTES + 2),
    "magic-bit": lambda b, name, size, ib: b.flip(name, size - 1),
    "truncated-1": lambda b, name, size, ib: b.truncate(name, size - 1),
    "truncated-half": lambda b, name, size, ib: b.truncate(name, size // 2),
    "emptied": lambda b, name, size, ib: b.truncate(name, 0),
    "deleted": lambda b, name, size, ib: b.raw.delete(name),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_index_or_missing_table(built: Built, damage: str) -> None:
    """A table whose index cannot be loaded: the store still opens, newer tables still read,
    keys that may live in the damaged table raise CorruptionError, fsck names the table."""
    b = built
    mid = b.tables["mid"]
    with open_store(b.url) as s:
        size, index_bytes, _ = table_size(s, mid)
    DAMAGES[damage](b, table_object(mid), size, index_bytes)
    with open_store(b.url) as s:  # must open: fsck needs an open store
        assert_reads(s, b, keys_of(b, "c"))
        assert s.get("dup") == b.values["dup"]  # found in the newest table before the damage
        assert_corrupt(s, ["b/00", "b/39", "big"])
        # the older table's keys: never an older or missing answer, the right bytes or an error
        for k in keys_of(b, "a")[:5]:
            with contextlib.suppress(CorruptionError):
                assert s.get(k) == b.values[k]
        # an absent key might have been in the damaged table, unless its verified key block
        # (only an index bit flip leaves one) proves otherwise
        absent = NotFoundError if damage == "index-bit" else CorruptionError
        with pytest.raises(absent):
            s.get("never-written")
        with pytest.raises(CorruptionError):
            list(s.list())
        fsck_names(s, mid)
        gc_refuses(s, b)


def test_damaged_index_key_block_still_clears_older_tables(built: Built) -> None:
    """An index bit flip leaves the footer's key-block checksum usable: keys provably absent
    from the damaged table still read from older tables."""
    b = built
    mid = b.tables["mid"]
    with open_store(b.url) as s:
        size, index_bytes, _ = table_size(s, mid)
    DAMAGES["index-bit"](b, table_object(mid), size, index_bytes)
    with open_store(b.url) as s:
        assert_reads(s, b, keys_of(b, "a"))
        assert_corrupt(s, ["b/03"])


def test_large_piece_damage(built: Built) -> None:
    b = built
    with open_store(b.url) as s:
        ref = s.head("big")
        assert ref.external
        blob = next(m.name for m in b.raw.list("blobs/"))
    b.flip(blob, 1024 * 1024 + 100)  # inside the second 1 MiB chunk
    with open_store(b.url) as s:
        assert_corrupt(s, ["big"])
        mib = 1024 * 1024
        assert s.get("big", offset=10, length=1000) == b.big[10:1010]  # chunk 0 is fine
        assert s.get("big", offset=2 * mib, length=100) == b.big[2 * mib : 2 * mib + 100]
        with pytest.raises(CorruptionError):
            s.get("big", offset=mib + 50, length=100)
        assert_reads(s, b, keys_of(b, "b"))
        assert "chunk 1" in fsck_names(s, blob)
    b.truncate(blob, BIG - 7)
    with open_store(b.url) as s:
        with pytest.raises(CorruptionError):
            s.get("big", offset=2 * 1024 * 1024, length=100)
        fsck_names(s, blob)
    b.raw.delete(blob)
    with open_store(b.url) as s:
        assert_corrupt(s, ["big"])
        assert "missing" in fsck_names(s, blob)


def test_corrupt_disk_cache_is_never_returned(tmp_path: Path) -> None:
    """The local range cache is checked like the store: damaged entries are dropped and re-read."""
    url = "file://" + str(tmp_path / "store")
    cache = tmp_path / "cache"
    values = {f"k/{i:03d}": os.urandom(200 + i) for i in range(200)}
    with open_store(url) as s:
        s.put_many(values)
    opts: dict[str, Any] = {"cache_disk_dir": str(cache), "cache_memory_bytes": 0}
    with open_store(url, **opts) as s:
        assert s.get_many(list(values)) == values  # fills the disk cache
    files = [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files, "the disk cache stored nothing"
    rng = random.Random(9)
    for p in files:
        data = bytearray(p.read_bytes())
        for _ in range(3):
            data[rng.randrange(len(data))] ^= 0x10
        p.write_bytes(bytes(data))
    with open_store(url, **opts) as s:
        assert s.get_many(list(values)) == values
        for k in list(values)[::17]:
            assert s.get(k) == values[k]


def test_damage_from_another_error_class_is_still_a_piecestore_error(built: Built) -> None:
    """Garbage in place of a table (not a truncation) is CorruptionError, not an IndexError etc."""
    b = built
    old = b.tables["old"]

    def garbage(data: bytearray) -> bytes:
        return os.urandom(len(data))

    b.damage_at(table_object(old), garbage)
    with open_store(b.url) as s:
        for k in ["a/00", "a/10"]:
            with pytest.raises(PieceStoreError) as info:
                s.get(k)
            assert isinstance(info.value, CorruptionError)
        assert_reads(s, b, keys_of(b, "b") + keys_of(b, "c"))
        fsck_names(s, old)
    assert RECORD_HEADER.size == 20
