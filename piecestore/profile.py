"""A data profile of a store: what is in it, how it is packed, and what it costs to hold.

Why a separate module: the profile is read-only reporting built on the store's public-ish
internals (table snapshot, manifest, cache counters); keeping it out of ``store.py`` keeps
the engine small, and ``rich``/``matplotlib`` are imported only when output is rendered.

Exact numbers come from the newest-wins merged listing (``store.list()``), because table
record counts include tombstones and records shadowed by newer tables. ``exact=False`` skips
the listing and estimates from the in-RAM indexes only (no I/O): record counts are then upper
bounds on the live pieces, and large pieces' sizes are unknown.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piecestore.gc import read_pending
from piecestore.table import EXTERNAL, RECORD_HEADER, TOMBSTONE, VALUE

if TYPE_CHECKING:
    from rich.console import RenderableType

    from piecestore.store import PieceStore


# -- size buckets ---------------------------------------------------------------------------


def bucket_of(size: int) -> int:
    """Power-of-two bucket: 0 holds size 0, bucket b >= 1 holds sizes in [2**(b-1), 2**b)."""
    return int(size).bit_length()


def bucket_bounds(bucket: int) -> tuple[int, int]:
    """(lowest size, highest size) of a bucket, both inclusive."""
    if bucket == 0:
        return 0, 0
    return 1 << (bucket - 1), (1 << bucket) - 1


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; binary units, as the settings use."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    value = float(n)
    for unit in units:
        if abs(value) < 1024 or unit == units[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def bucket_label(bucket: int) -> str:
    lo, hi = bucket_bounds(bucket)
    if lo == hi:
        return human_bytes(lo)
    return f"{_short(lo)}–{_short(hi + 1)}"


def _short(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


@dataclass
class SizeHistogram:
    """Piece counts and bytes per power-of-two size bucket."""

    counts: dict[int, int] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)

    def add(self, size: int, count: int = 1) -> None:
        b = bucket_of(size)
        self.counts[b] = self.counts.get(b, 0) + count
        self.sizes[b] = self.sizes.get(b, 0) + size * count

    def add_bucketed(self, bucket: int, count: int, nbytes: int) -> None:
        self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.sizes[bucket] = self.sizes.get(bucket, 0) + nbytes

    def merge(self, other: SizeHistogram) -> None:
        for b, c in other.counts.items():
            self.add_bucketed(b, c, other.sizes.get(b, 0))

    @property
    def total_count(self) -> int:
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def rows(self) -> list[tuple[int, int, int]]:
        """(bucket, count, bytes) from the smallest to the largest used bucket, gaps included."""
        if not self.counts:
            return []
        lo, hi = min(self.counts), max(self.counts)
        return [(b, self.counts.get(b, 0), self.sizes.get(b, 0)) for b in range(lo, hi + 1)]

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for b, count, nbytes in self.rows():
            lo, hi = bucket_bounds(b)
            out.append({"bucket": b, "min_size": lo, "max_size": hi, "count": count, "bytes": nbytes})
        return out


# -- the profile ------------------------------------------------------------------------------


@dataclass
class TableProfile:
    """One table file as the manifest records it, plus what the listing saw live in it."""

    name: str
    shard: int | None
    records: int  # every record, tombstones and shadowed ones included
    size: int
    index_bytes: int
    live_bytes: int  # TableSpec.live_bytes: payload bytes of non-tombstone records when built
    dead_bytes: int  # TableSpec.dead_bytes: GC's estimate; 0 until GC computes it
    tombstones: int
    externals: int
    live_pieces: int | None  # pieces whose newest record is here (None: not measured)

    @property
    def dead_fraction(self) -> float:
        """GC's view (TableSpec.dead_bytes / live_bytes), what compaction decides on."""
        if self.live_bytes <= 0:
            return 0.0
        return min(1.0, self.dead_bytes / self.live_bytes)

    @property
    def dead_record_fraction(self) -> float | None:
        """Measured now: the share of this table's records that no longer give a live piece."""
        if self.live_pieces is None or self.records == 0:
            return None
        return 1.0 - self.live_pieces / self.records

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "shard": self.shard, "records": self.records, "size": self.size,
            "index_bytes": self.index_bytes, "live_bytes": self.live_bytes, "dead_bytes": self.dead_bytes,
            "tombstones": self.tombstones, "externals": self.externals, "live_pieces": self.live_pieces,
            "dead_fraction": self.dead_fraction, "dead_record_fraction": self.dead_record_fraction,
        }  # fmt: skip


@dataclass
class ShardProfile:
    index: int
    url: str
    pieces: int
    piece_bytes: int
    tables: int
    table_bytes: int
    manifest_version: int

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index, "url": self.url, "pieces": self.pieces, "piece_bytes": self.piece_bytes,
            "tables": self.tables, "table_bytes": self.table_bytes,
            "manifest_version": self.manifest_version,
        }  # fmt: skip


@dataclass
class Profile:
    """Everything ``piecestore profile`` shows; ``to_json`` is the stable machine form."""

    url: str
    exact: bool
    pieces: int  # live pieces (an upper bound when not exact)
    piece_bytes: int  # their value bytes (packed pieces only when not exact)
    packed_pieces: int
    external_pieces: int
    external_bytes: int
    buffered_pieces: int  # acknowledged but not yet in a table (buffered writes)
    histogram: SizeHistogram
    tables: list[TableProfile]
    records: int
    tombstones: int
    cache_hits: int
    cache_misses: int
    cache_bytes: int
    cache_capacity: int
    manifest_version: int | None  # None for a sharded store: see shards
    manifest_conflicts: int
    pending_deletes: int
    index_ram_bytes: int
    shards: list[ShardProfile] = field(default_factory=list)
    seconds: float = 0.0

    # -- derived numbers
    @property
    def table_bytes(self) -> int:
        return sum(t.size for t in self.tables)

    @property
    def dead_records(self) -> int:
        """Records in tables that give no live piece: tombstones plus shadowed records."""
        return max(0, self.records - (self.pieces - self.buffered_pieces))

    @property
    def cache_hit_rate(self) -> float | None:
        total = self.cache_hits + self.cache_misses
        return None if total == 0 else self.cache_hits / total

    @property
    def mean_piece_bytes(self) -> float:
        return self.piece_bytes / self.pieces if self.pieces else 0.0

    @property
    def shard_imbalance(self) -> float | None:
        """Largest shard's piece count over the mean; 1.0 is perfectly even."""
        if len(self.shards) < 2:
            return None
        mean = statistics.fmean(s.pieces for s in self.shards)
        return max(s.pieces for s in self.shards) / mean if mean else None

    def to_json(self) -> dict[str, Any]:
        sizes = [t.size for t in self.tables]
        per_table = [t.live_pieces for t in self.tables if t.live_pieces is not None]
        return {
            "url": self.url,
            "exact": self.exact,
            "pieces": self.pieces,
            "piece_bytes": self.piece_bytes,
            "mean_piece_bytes": self.mean_piece_bytes,
            "packed_pieces": self.packed_pieces,
            "external_pieces": self.external_pieces,
            "external_bytes": self.external_bytes,
            "buffered_pieces": self.buffered_pieces,
            "histogram": self.histogram.to_json(),
            "tables": {
                "count": len(self.tables),
                "bytes": self.table_bytes,
                "records": self.records,
                "tombstones": self.tombstones,
                "dead_records": self.dead_records,
                "min_size": min(sizes, default=0),
                "median_size": statistics.median(sizes) if sizes else 0,
                "max_size": max(sizes, default=0),
                "mean_live_pieces": statistics.fmean(per_table) if per_table else None,
                "items": [t.to_json() for t in self.tables],
            },
            "cache": {
                "hits": self.cache_hits,
                "misses": self.cache_misses,
                "hit_rate": self.cache_hit_rate,
                "bytes": self.cache_bytes,
                "capacity": self.cache_capacity,
            },
            "manifest": {
                "version": self.manifest_version,
                "conflicts": self.manifest_conflicts,
                "pending_deletes": self.pending_deletes,
            },
            "index_ram_bytes": self.index_ram_bytes,
            "shards": [s.to_json() for s in self.shards],
            "shard_imbalance": self.shard_imbalance,
            "seconds": self.seconds,
        }

    # -- rich output
    def render(self, *, max_tables: int = 10) -> RenderableType:
        """Rich renderables: a summary, the size histogram, the largest tables, the shards."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        summary = Table.grid(padding=(0, 2))
        summary.add_column(style="bold")
        summary.add_column()
        rate = self.cache_hit_rate
        rows: list[tuple[str, str]] = [
            ("store", self.url),
            ("pieces", f"{self.pieces:,}" + ("" if self.exact else " (upper bound: estimated from indexes)")),
            ("piece bytes", f"{human_bytes(self.piece_bytes)} (mean {human_bytes(self.mean_piece_bytes)})"),
            ("packed / large", f"{self.packed_pieces:,} / {self.external_pieces:,} "
                               f"({human_bytes(self.external_bytes)} in large pieces)"),
            ("tables", f"{len(self.tables):,} holding {human_bytes(self.table_bytes)}"),
            ("records", f"{self.records:,} ({self.tombstones:,} tombstones, "
                        f"{self.dead_records:,} not live)"),
            ("cache", f"{self.cache_hits:,} hits / {self.cache_misses:,} misses"
                      + ("" if rate is None else f" ({rate:.1%})")
                      + f", {human_bytes(self.cache_bytes)} of {human_bytes(self.cache_capacity)}"),
            ("manifest", ("sharded" if self.manifest_version is None else f"version {self.manifest_version}")
                         + f", {self.manifest_conflicts} CAS conflicts, "
                         f"{self.pending_deletes} pending deletes"),
            ("index RAM", human_bytes(self.index_ram_bytes)),
        ]  # fmt: skip
        if self.buffered_pieces:
            rows.append(("buffered", f"{self.buffered_pieces:,} pieces not yet in a table"))
        for name, value in rows:
            summary.add_row(name, Text(value))

        parts: list[RenderableType] = [summary]
        hist_rows = self.histogram.rows()
        if hist_rows:
            hist = Table(title="piece sizes", title_justify="left", show_edge=False)
            hist.add_column("size")
            hist.add_column("pieces", justify="right")
            hist.add_column("bytes", justify="right")
            hist.add_column("")
            peak = max(c for _, c, _ in hist_rows) or 1
            gap = False
            for b, count, nbytes in hist_rows:
                if not count:  # a run of empty buckets shows as one row
                    if not gap:
                        hist.add_row("…", "0", "", "")
                    gap = True
                    continue
                gap = False
                bar = "█" * max(1, round(30 * count / peak))
                hist.add_row(bucket_label(b), f"{count:,}", human_bytes(nbytes), Text(bar, style="cyan"))
            parts.append(hist)
        if self.tables:
            biggest = sorted(self.tables, key=lambda t: t.size, reverse=True)[:max_tables]
            tab = Table(
                title=f"largest tables ({len(biggest)} of {len(self.tables)})",
                title_justify="left",
                show_edge=False,
            )
            for col in ("table", "size", "records", "live", "dead (GC)", "dead (now)"):
                tab.add_column(col, justify="left" if col == "table" else "right")
            for t in biggest:
                measured = t.dead_record_fraction
                name = t.name if t.shard is None else f"{t.shard}:{t.name}"
                tab.add_row(
                    Text(name[:28]),
                    human_bytes(t.size),
                    f"{t.records:,}",
                    "?" if t.live_pieces is None else f"{t.live_pieces:,}",
                    f"{t.dead_fraction:.0%}",
                    "?" if measured is None else f"{measured:.0%}",
                )
            parts.append(tab)
        if self.shards:
            sh = Table(title="shards", title_justify="left", show_edge=False)
            for col in ("#", "url", "pieces", "bytes", "tables", "manifest"):
                sh.add_column(col, justify="left" if col == "url" else "right")
            for s in self.shards:
                sh.add_row(
                    str(s.index), Text(s.url), f"{s.pieces:,}", human_bytes(s.piece_bytes),
                    f"{s.tables:,}", str(s.manifest_version),
                )  # fmt: skip
            imbalance = self.shard_imbalance
            if imbalance is not None:
                sh.caption = f"imbalance (max/mean pieces): {imbalance:.3f}"
            parts.append(sh)
        return Group(*parts)

    # -- plot
    def plot(self, path: str | Path) -> Path:
        """Write a PNG: the piece size histogram and the table sizes (live vs GC-dead bytes)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        # Figure + the Agg canvas directly: no pyplot, so no global backend switch in the caller.
        fig = Figure(figsize=(11, 4.5), dpi=100)
        FigureCanvasAgg(fig)
        ax1, ax2 = fig.subplots(1, 2)
        rows = self.histogram.rows()
        if rows:
            xs = list(range(len(rows)))
            counts = [c for _, c, _ in rows]
            ax1.bar(xs, counts, color="#3b7dd8")
            step = -(-len(rows) // 12)
            ax1.set_xticks(xs[::step])
            ax1.set_xticklabels(
                [_short(bucket_bounds(b)[0]) for b, _, _ in rows][::step], rotation=45, ha="right"
            )
            ax1.set_xlabel("size bucket (from; power of two)")
            positive = [c for c in counts if c]
            if max(positive) > 100 * min(positive):
                ax1.set_yscale("log")
        else:
            ax1.text(0.5, 0.5, "no pieces", ha="center", va="center", transform=ax1.transAxes)
        ax1.set_title(f"piece sizes ({self.pieces:,} pieces, {human_bytes(self.piece_bytes)})")
        ax1.set_ylabel("pieces")

        tables = sorted(self.tables, key=lambda t: t.size, reverse=True)
        if tables:
            xs2 = np.arange(len(tables))
            sizes = np.array([t.size for t in tables], dtype=float)
            measured = all(t.dead_record_fraction is not None for t in tables)
            if measured:  # share of records not live now, applied to the record bytes
                dead = np.array(
                    [(t.size - t.index_bytes) * (t.dead_record_fraction or 0.0) for t in tables], dtype=float
                )
                which = "records not live now"
            else:
                dead = np.array([min(t.size, t.dead_bytes) for t in tables], dtype=float)
                which = "GC estimate"
            ax2.bar(xs2, sizes - dead, width=1.0, color="#4caf50", label="live")
            ax2.bar(xs2, dead, width=1.0, bottom=sizes - dead, color="#e57373", label=f"dead ({which})")
            ax2.set_yscale("log" if sizes.max() > 100 * max(1.0, sizes.min()) else "linear")
            ax2.legend(loc="upper right", fontsize="small")
        else:
            ax2.text(0.5, 0.5, "no tables", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_title(f"table sizes ({len(tables):,} tables, {human_bytes(self.table_bytes)})")
        ax2.set_xlabel("tables, largest first")
        ax2.set_ylabel("bytes")
        fig.suptitle(self.url)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, format="png")
        return out


# -- building it ------------------------------------------------------------------------------


def profile_store(store: Any, *, exact: bool = True) -> Profile:
    """Profile a PieceStore, or a sharded store (anything with ``.shards``: each is profiled)."""
    started = time.perf_counter()
    shards = getattr(store, "shards", None)
    if isinstance(shards, Sequence) and not isinstance(shards, str | bytes):
        parts = [_profile_one(s, exact=exact, shard=i) for i, s in enumerate(shards)]
        result = _aggregate(str(getattr(store, "url", "sharded store")), parts, exact)
    else:
        result = _profile_one(store, exact=exact, shard=None)
    result.seconds = time.perf_counter() - started
    return result


def _profile_one(store: PieceStore, *, exact: bool, shard: int | None) -> Profile:
    snapshot = store.tables.snapshot()
    manifest = store.manifest
    histogram = SizeHistogram()
    live_by_table: dict[str, int] = {}
    pieces = piece_bytes = packed = externals = external_bytes = buffered = 0
    if exact:
        for info in store.list():
            pieces += 1
            piece_bytes += info.size
            histogram.add(info.size)
            if info.external:
                externals += 1
                external_bytes += info.size
            else:
                packed += 1
            if info.table is None:
                buffered += 1
            else:
                live_by_table[info.table] = live_by_table.get(info.table, 0) + 1
    tables: list[TableProfile] = []
    records = tombstones = 0
    for spec, index in snapshot:
        kinds = index.kinds
        n_tomb = int(np.count_nonzero(kinds == TOMBSTONE))
        n_ext = int(np.count_nonzero(kinds == EXTERNAL))
        records += index.count
        tombstones += n_tomb
        tables.append(
            TableProfile(
                name=spec.name, shard=shard, records=spec.count, size=spec.size,
                index_bytes=spec.index_bytes, live_bytes=spec.live_bytes, dead_bytes=spec.dead_bytes,
                tombstones=n_tomb, externals=n_ext,
                live_pieces=live_by_table.get(spec.name, 0) if exact else None,
            )
        )  # fmt: skip
        if not exact:
            _estimate_from_index(index, histogram)
    if not exact:
        # No listing: every value record counts, shadowed ones too, so these are upper bounds.
        packed = sum(int(np.count_nonzero(ix.kinds == VALUE)) for _, ix in snapshot)
        externals = sum(t.externals for t in tables)
        pieces = packed + externals
        piece_bytes = histogram.total_bytes
    cache = store.cache
    return Profile(
        url=store.url,
        exact=exact,
        pieces=pieces,
        piece_bytes=piece_bytes,
        packed_pieces=packed,
        external_pieces=externals,
        external_bytes=external_bytes,
        buffered_pieces=buffered,
        histogram=histogram,
        tables=tables,
        records=records,
        tombstones=tombstones,
        cache_hits=cache.hits,
        cache_misses=cache.misses,
        cache_bytes=cache.nbytes,
        cache_capacity=cache.capacity,
        manifest_version=manifest.version,
        manifest_conflicts=store.manifests.conflicts,
        pending_deletes=sum(len(b.names) for b in read_pending(store.backend)),
        index_ram_bytes=store.tables.nbytes(),
    )


def _estimate_from_index(index: Any, histogram: SizeHistogram) -> None:
    """Add the value sizes of a table's packed records to the histogram, from the offsets alone."""
    if index.count == 0:
        return
    offsets = np.asarray(index.offsets, dtype=np.int64)
    sizes = np.diff(offsets) - RECORD_HEADER.size - index.key_lens.astype(np.int64)
    sizes = sizes[index.kinds == VALUE]
    if sizes.size == 0:
        return
    # frexp's exponent is the bit length, exactly, for integers below 2**53.
    _, buckets = np.frexp(sizes.astype(np.float64))
    for b in np.unique(buckets).tolist():
        sel = sizes[buckets == b]
        histogram.add_bucketed(int(b), int(sel.size), int(sel.sum()))


def _aggregate(url: str, parts: list[Profile], exact: bool) -> Profile:
    histogram = SizeHistogram()
    for p in parts:
        histogram.merge(p.histogram)
    return Profile(
        url=url,
        exact=exact,
        pieces=sum(p.pieces for p in parts),
        piece_bytes=sum(p.piece_bytes for p in parts),
        packed_pieces=sum(p.packed_pieces for p in parts),
        external_pieces=sum(p.external_pieces for p in parts),
        external_bytes=sum(p.external_bytes for p in parts),
        buffered_pieces=sum(p.buffered_pieces for p in parts),
        histogram=histogram,
        tables=[t for p in parts for t in p.tables],
        records=sum(p.records for p in parts),
        tombstones=sum(p.tombstones for p in parts),
        cache_hits=sum(p.cache_hits for p in parts),
        cache_misses=sum(p.cache_misses for p in parts),
        cache_bytes=sum(p.cache_bytes for p in parts),
        cache_capacity=sum(p.cache_capacity for p in parts),
        manifest_version=None,
        manifest_conflicts=sum(p.manifest_conflicts for p in parts),
        pending_deletes=sum(p.pending_deletes for p in parts),
        index_ram_bytes=sum(p.index_ram_bytes for p in parts),
        shards=[
            ShardProfile(
                i, p.url, p.pieces, p.piece_bytes, len(p.tables), p.table_bytes, p.manifest_version or 0
            )
            for i, p in enumerate(parts)
        ],
    )
