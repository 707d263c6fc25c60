"""The bench matrix: what each cell does, on which data, and in which order.

Every workload reads or writes the deterministic pieces of :mod:`piecestore.bench.data`, so
all providers see the same keys and bytes. Reads go through store handles opened with the
piece cache off (``cache_memory_bytes=0``): every read is a cold read from the provider, and
every byte read is compared with what was written.
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from piecestore.bench.counting import RequestCounter, instrument
from piecestore.bench.data import DataPool, KiB, MiB, VerifyError, piece_key, rng_for, size_label
from piecestore.bench.measure import Exhausted, Outcome, Workload
from piecestore.bench.providers import Provider
from piecestore.store import PieceStore

SMALL = 4 * KiB
DIRECT_KEYSPACE = 20_000  # direct writers reuse names past this, bounding what a fast provider holds


@dataclass(frozen=True)
class Params:
    """The shape of a run; ``quick`` trades coverage and cell time for a result in a minute or two."""

    quick: bool
    warmup: float
    runs: int
    run_seconds: float
    sizes: tuple[int, ...]
    levels: tuple[int, ...]  # one-object-per-piece concurrency (direct and obstore are compared at these)
    put_levels: tuple[int, ...]  # threads calling put (16 is the headline's)
    get_levels: tuple[int, ...]  # threads calling get
    large_levels: tuple[int, ...]
    large_size: int
    large_objects: int
    small_dataset: int  # 4 KiB pieces in the read dataset (the get_many headline reads 10k of them)
    dataset_bytes: int  # byte budget of the read datasets of the other sizes
    get_many_batch: int
    direct_objects: int
    peer_concurrency: int
    skip: tuple[str, ...] = ()  # workloads quick mode leaves out
    put_many_bytes: int = 16 * MiB
    put_many_max: int = 8192
    many_threads: int = 4  # threads each calling put_many, the second put_many cell

    @staticmethod
    def make(quick: bool, seconds_per_cell: float | None = None) -> Params:
        if quick:
            p = Params(
                quick=True, warmup=0.15, runs=2, run_seconds=0.35,
                sizes=(SMALL, MiB), levels=(1, 16), put_levels=(16,), get_levels=(16,), large_levels=(1,),
                large_size=64 * MiB, large_objects=1, small_dataset=20_480, dataset_bytes=16 * MiB,
                get_many_batch=10_000, direct_objects=256, peer_concurrency=64,
                skip=("get_many_seq", "direct_head", "direct_list"),
            )  # fmt: skip
        else:
            p = Params(
                quick=False, warmup=0.4, runs=3, run_seconds=0.9,
                sizes=(KiB, SMALL, 64 * KiB, MiB, 64 * MiB), levels=(1, 16, 64),
                put_levels=(1, 16, 64), get_levels=(1, 16), large_levels=(1, 4), large_size=64 * MiB,
                large_objects=2, small_dataset=40_960, dataset_bytes=64 * MiB, get_many_batch=10_000,
                direct_objects=2048, peer_concurrency=64,
            )  # fmt: skip
        if seconds_per_cell is not None:
            if seconds_per_cell <= 0:
                raise ValueError(f"seconds_per_cell must be > 0, got {seconds_per_cell}")
            run = seconds_per_cell / p.runs
            p = Params(**{**p.__dict__, "run_seconds": run, "warmup": min(p.warmup, max(run / 2, 0.02))})
        return p

    @property
    def seconds_per_cell(self) -> float:
        return self.runs * self.run_seconds

    def dataset_count(self, size: int) -> int:
        if size == SMALL:
            return self.small_dataset
        return max(2, min(self.small_dataset, self.dataset_bytes // size))

    def get_batch(self, size: int) -> int:
        if size == SMALL:  # the headline figure: get_many of 10k random 4 KiB pieces
            return min(self.get_many_batch, self.dataset_count(size) // 2)
        return max(1, min(self.get_many_batch, self.dataset_count(size) // 4, (32 * MiB) // size))

    def put_batch(self, size: int) -> int:
        return max(1, min(self.put_many_max, self.put_many_bytes // size))


@dataclass
class Context:
    """Per provider: the data pool, the datasets written for reads, and names left to delete."""

    provider: Provider
    pool: DataPool
    params: Params
    datasets: dict[int, int] = field(default_factory=dict)  # size -> pieces written under data/<size>
    dataset_tables: dict[int, list[int]] = field(default_factory=dict)
    direct_names: set[str] = field(default_factory=set)  # written by direct_put, deleted by direct_delete
    peer_ready: bool = False
    large_ready: bool = False
    direct_ready: bool = False
    notes: list[str] = field(default_factory=list)

    def data_sub(self, size: int) -> str:
        return f"data/{size_label(size)}"

    def reader(self, size: int, counter: RequestCounter) -> PieceStore:
        """A cold handle on a read dataset: no piece cache, counted requests."""
        store = self.provider.open_store(self.data_sub(size), cache_memory_bytes=0)
        instrument(store.backend, counter)
        return store


# -- datasets (untimed setup) ---------------------------------------------------------------


def write_dataset(ctx: Context, size: int) -> None:
    if size in ctx.datasets:
        return
    count = ctx.params.dataset_count(size)
    batch = ctx.params.put_batch(size)
    pool = ctx.pool
    with ctx.provider.open_store(ctx.data_sub(size)) as store:
        for start in range(0, count, batch):
            idx = range(start, min(count, start + batch))
            store.put_many([(piece_key(size, i), pool.piece(size, i)) for i in idx])
        ctx.dataset_tables[size] = [t.count for t in store.manifest.tables]
    ctx.datasets[size] = count


def write_direct_dataset(ctx: Context) -> None:
    if ctx.direct_ready:
        return
    with ctx.provider.open_backend("direct-data", direct=True) as b, ThreadPoolExecutor(32) as ex:
        list(
            ex.map(
                lambda i: b.put(piece_key(SMALL, i), ctx.pool.piece(SMALL, i)),
                range(ctx.params.direct_objects),
            )
        )
    ctx.direct_ready = True


def write_large_dataset(ctx: Context) -> None:
    if ctx.large_ready:
        return
    size = ctx.params.large_size
    with ctx.provider.open_backend("large-data", direct=True) as b:
        for i in range(ctx.params.large_objects):
            b.put(piece_key(size, i), ctx.pool.piece(size, i))
    ctx.large_ready = True


def write_peer_dataset(ctx: Context) -> None:
    if ctx.peer_ready:
        return
    import asyncio

    import obstore

    store = ctx.provider.peer_store("peer-data")

    async def fill() -> None:
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with sem:
                await obstore.put_async(store, piece_key(SMALL, i), ctx.pool.piece(SMALL, i))

        await asyncio.gather(*(one(i) for i in range(ctx.params.direct_objects)))

    asyncio.run(fill())
    ctx.peer_ready = True


# -- workloads -------------------------------------------------------------------------------


class _Base(Workload):
    def __init__(self, ctx: Context, size: int, concurrency: int, batch: int = 1) -> None:
        super().__init__(size, concurrency, batch)
        self.ctx = ctx
        self.counter = RequestCounter()

    @property
    def cell_sub(self) -> str:
        return f"cells/{self.name}-{size_label(self.size)}-c{self.concurrency}"

    def rng(self, worker: int) -> Any:
        local = self.__dict__.setdefault("_rngs", {})
        if worker not in local:
            local[worker] = rng_for(self.name, self.size, self.concurrency, worker)
        return local[worker]


class LargePut(_Base):
    """Large objects through the bare driver: the bandwidth every piece figure is a fraction of."""

    name, path = "large_put", "reference"

    def start_phase(self, phase: int) -> None:
        self.backend = self.ctx.provider.open_backend(self.cell_sub, direct=True)
        assert self.counter is not None
        instrument(self.backend, self.counter)
        self.phase = phase

    def op(self, worker: int, seq: int) -> Outcome:
        self.backend.put(f"p{self.phase}/{seq:06d}", self.ctx.pool.piece(self.size, seq))
        return Outcome(1, self.size)

    def end_phase(self, phase: int, measured: bool) -> None:
        self.backend.close()
        self.ctx.provider.cleanup(self.cell_sub)


class LargeGet(_Base):
    name, path, reads = "large_get", "reference", True

    def start_phase(self, phase: int) -> None:
        if phase == 0:
            write_large_dataset(self.ctx)
            self.backend = self.ctx.provider.open_backend("large-data", direct=True)
            assert self.counter is not None
            instrument(self.backend, self.counter)

    def op(self, worker: int, seq: int) -> Outcome:
        i = self.rng(worker).randrange(self.ctx.params.large_objects)
        key = piece_key(self.size, i)
        self.ctx.pool.verify(key, self.size, i, self.backend.get(key))
        return Outcome(1, self.size)

    def ttfb_probe(self) -> list[float]:
        """Whole-object GETs return all bytes at once; a 1-byte ranged GET shows the first byte's wait."""
        out = []
        for i in range(7):
            t0 = time.perf_counter()
            self.backend.get(piece_key(self.size, i % self.ctx.params.large_objects), offset=0, length=1)
            out.append(time.perf_counter() - t0)
        return out

    def close(self) -> None:
        if hasattr(self, "backend"):
            self.backend.close()


class DiskWrite(Workload):
    """The disk under a file store: sequential 4 MiB writes, fsync, per 64 MiB file."""

    name, path = "disk_write", "reference"

    def __init__(self, ctx: Context, size: int) -> None:
        super().__init__(size, 1)
        assert ctx.provider.local_dir is not None
        self.dir = ctx.provider.local_dir / "disk"
        self.pool = ctx.pool
        self.requests_per_call = {"WRITE+FSYNC": 1}

    def start_phase(self, phase: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)

    def op(self, worker: int, seq: int) -> Outcome:
        data = self.pool.piece(self.size, seq)
        fd = os.open(self.dir / f"f{seq}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, self.size, 4 * MiB):
                view = data[off : off + 4 * MiB]
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return Outcome(1, self.size)

    def end_phase(self, phase: int, measured: bool) -> None:
        for f in self.dir.glob("f*"):
            f.unlink()


class _StoreWriter(_Base):
    """Writes into a fresh store per phase, so cells never see each other's tables."""

    def start_phase(self, phase: int) -> None:
        self.phase_sub = f"{self.cell_sub}/p{phase}"
        self.store = self.ctx.provider.open_store(self.phase_sub)
        assert self.counter is not None
        instrument(self.store.backend, self.counter)

    def end_phase(self, phase: int, measured: bool) -> None:
        try:
            self.store.close()
            if measured:
                self.table_counts.extend(t.count for t in self.store.manifest.tables)
        finally:
            self.ctx.provider.cleanup(self.phase_sub)


class PutMany(_StoreWriter):
    """Durable put_many batches (about 16 MiB each): one table, one commit per call."""

    name, path = "put_many", "packed"

    def op(self, worker: int, seq: int) -> Outcome:
        base = seq * self.batch
        pool = self.ctx.pool
        items = [(piece_key(self.size, i), pool.piece(self.size, i)) for i in range(base, base + self.batch)]
        self.store.put_many(items)
        return Outcome(self.batch, self.batch * self.size)


class PutThreads(_StoreWriter):
    """Many threads each calling put: group commit must turn them into few table files."""

    name, path = "put", "packed"

    def op(self, worker: int, seq: int) -> Outcome:
        self.store.put(piece_key(self.size, seq), self.ctx.pool.piece(self.size, seq))
        return Outcome(1, self.size)


class DirectPut(_Base):
    """One object per piece through the same driver: what packing is measured against."""

    name, path = "direct_put", "direct"

    def start_phase(self, phase: int) -> None:
        if phase == 0:
            self.backend = self.ctx.provider.open_backend("direct-w", direct=True)
            assert self.counter is not None
            instrument(self.backend, self.counter)
        self.phase = phase

    def op(self, worker: int, seq: int) -> Outcome:
        name = f"c{self.concurrency}/{piece_key(self.size, seq % DIRECT_KEYSPACE)}"
        self.backend.put(name, self.ctx.pool.piece(self.size, seq))
        self.ctx.direct_names.add(name)
        return Outcome(1, self.size)

    def close(self) -> None:
        if hasattr(self, "backend"):
            self.backend.close()


class PeerPut(Workload):
    """The same one-object-per-piece writes with obstore (async, Rust), the peer baseline."""

    name, path, is_async = "obstore_put", "obstore", True

    def __init__(self, ctx: Context, size: int, concurrency: int) -> None:
        super().__init__(size, concurrency)
        self.ctx = ctx
        self.requests_per_call = {"PUT": 1}
        self.notes.append("requests counted as one per call (obstore has no request hook)")

    def start_phase(self, phase: int) -> None:
        import obstore

        self.obs = obstore
        self.store = self.ctx.provider.peer_store("peer-w")
        self.phase = phase

    async def aop(self, worker: int, seq: int) -> Outcome:
        name = piece_key(self.size, seq % DIRECT_KEYSPACE)
        await self.obs.put_async(self.store, name, self.ctx.pool.piece(self.size, seq))
        return Outcome(1, self.size)

    def close(self) -> None:
        self.ctx.provider.cleanup("peer-w")


class GetMany(_Base):
    """get_many of a batch of pieces on a cold handle: random keys, or a key-order window."""

    path, reads = "packed", True

    def __init__(self, ctx: Context, size: int, batch: int, sequential: bool = False) -> None:
        super().__init__(ctx, size, 1, batch)
        self.sequential = sequential
        self.name = "get_many_seq" if sequential else "get_many"

    def start_phase(self, phase: int) -> None:
        if phase == 0:
            write_dataset(self.ctx, self.size)
            assert self.counter is not None
            self.store = self.ctx.reader(self.size, self.counter)
            self.table_counts = list(self.ctx.dataset_tables.get(self.size, []))

    def op(self, worker: int, seq: int) -> Outcome:
        count = self.ctx.datasets[self.size]
        if self.sequential:
            start = (seq * self.batch) % max(1, count - self.batch + 1)
            idx = list(range(start, start + self.batch))
        else:
            idx = self.rng(worker).sample(range(count), self.batch)
        got = self.store.get_many([piece_key(self.size, i) for i in idx])
        pool, nbytes = self.ctx.pool, 0
        for i in idx:
            key = piece_key(self.size, i)
            value = got.get(key)
            if value is None:
                raise VerifyError(f"{key}: missing from get_many")
            pool.verify(key, self.size, i, value)
            nbytes += len(value)
        return Outcome(len(idx), nbytes)

    def close(self) -> None:
        if hasattr(self, "store"):
            self.store.close()


class _SmallReader(_Base):
    """Random single-piece reads from the 4 KiB dataset through a cold store handle."""

    path, reads = "packed", True

    def start_phase(self, phase: int) -> None:
        if phase == 0:
            write_dataset(self.ctx, self.size)
            assert self.counter is not None
            self.store = self.ctx.reader(self.size, self.counter)
            self.table_counts = list(self.ctx.dataset_tables.get(self.size, []))

    def pick(self, worker: int) -> tuple[str, int]:
        i = self.rng(worker).randrange(self.ctx.datasets[self.size])
        return piece_key(self.size, i), i

    def close(self) -> None:
        if hasattr(self, "store"):
            self.store.close()


class GetThreads(_SmallReader):
    name = "get"

    def op(self, worker: int, seq: int) -> Outcome:
        key, i = self.pick(worker)
        self.ctx.pool.verify(key, self.size, i, self.store.get(key))
        return Outcome(1, self.size)


class StoreHead(_SmallReader):
    name = "head"
    reads = False  # no payload: time to first byte does not apply

    def op(self, worker: int, seq: int) -> Outcome:
        key, _ = self.pick(worker)
        info = self.store.head(key)
        if info.size != self.size:
            raise VerifyError(f"{key}: head says {info.size} bytes, {self.size} were written")
        return Outcome(1, 0)


class StoreList(_SmallReader):
    """Open a fresh handle and list every piece: what a cold listing costs (open included)."""

    name = "list"
    reads = False  # no payload: time to first byte does not apply

    def op(self, worker: int, seq: int) -> Outcome:
        store = self.ctx.provider.open_store(self.ctx.data_sub(self.size), cache_memory_bytes=0)
        assert self.counter is not None
        instrument(store.backend, self.counter)
        try:
            n = sum(1 for _ in store.list())
        finally:
            store.close()
        if n != self.ctx.datasets[self.size]:
            raise VerifyError(f"listed {n} pieces, {self.ctx.datasets[self.size]} were written")
        return Outcome(n, 0)


class Mixed(_SmallReader):
    """70% cold gets of stored pieces, 30% durable puts of new ones, from many threads."""

    name = "mixed"
    reads = False  # no payload: time to first byte does not apply

    def start_phase(self, phase: int) -> None:
        super().start_phase(phase)
        self.phase = phase

    def op(self, worker: int, seq: int) -> Outcome:
        if seq % 10 < 7:
            key, i = self.pick(worker)
            self.ctx.pool.verify(key, self.size, i, self.store.get(key))
        else:
            self.store.put(f"mixed/p{self.phase}/{seq:08d}", self.ctx.pool.piece(self.size, seq))
        return Outcome(1, self.size)


class StoreDelete(_SmallReader):
    """Durable delete_many of 1,000 stored pieces per call (tombstones in one table)."""

    name = "delete_many"
    reads = False  # no payload: time to first byte does not apply

    def op(self, worker: int, seq: int) -> Outcome:
        count = self.ctx.datasets[self.size]
        start = (seq * self.batch) % count
        keys = [piece_key(self.size, (start + j) % count) for j in range(self.batch)]
        self.store.delete_many(keys)
        return Outcome(len(keys), 0)

    def close(self) -> None:
        super().close()
        self.ctx.datasets.pop(self.size, None)  # the dataset is gone now
        self.ctx.provider.cleanup(self.ctx.data_sub(self.size))


class _DirectReader(_Base):
    path, reads = "direct", True

    def start_phase(self, phase: int) -> None:
        if phase == 0:
            write_direct_dataset(self.ctx)
            self.backend = self.ctx.provider.open_backend("direct-data", direct=True)
            assert self.counter is not None
            instrument(self.backend, self.counter)

    def pick(self, worker: int) -> tuple[str, int]:
        i = self.rng(worker).randrange(self.ctx.params.direct_objects)
        return piece_key(self.size, i), i

    def close(self) -> None:
        if hasattr(self, "backend"):
            self.backend.close()


class DirectGet(_DirectReader):
    name = "direct_get"

    def op(self, worker: int, seq: int) -> Outcome:
        key, i = self.pick(worker)
        self.ctx.pool.verify(key, self.size, i, self.backend.get(key))
        return Outcome(1, self.size)


class DirectHead(_DirectReader):
    name = "direct_head"
    reads = False  # no payload: time to first byte does not apply

    def op(self, worker: int, seq: int) -> Outcome:
        key, _ = self.pick(worker)
        if self.backend.head(key).size != self.size:
            raise VerifyError(f"{key}: head size differs from the {self.size} bytes written")
        return Outcome(1, 0)


class DirectList(_DirectReader):
    name = "direct_list"
    reads = False  # no payload: time to first byte does not apply

    def op(self, worker: int, seq: int) -> Outcome:
        n = sum(1 for _ in self.backend.list())
        if n != self.ctx.params.direct_objects:
            raise VerifyError(f"listed {n} objects, {self.ctx.params.direct_objects} were written")
        return Outcome(n, 0)


class DirectDelete(_Base):
    """delete_many of 1,000 objects per call (the objects direct_put left behind)."""

    name, path = "direct_delete", "direct"

    def start_phase(self, phase: int) -> None:
        if phase == 0:
            self.names = sorted(self.ctx.direct_names)
            self.backend = self.ctx.provider.open_backend("direct-w", direct=True)
            assert self.counter is not None
            instrument(self.backend, self.counter)
            self.lock = threading.Lock()
            self.fresh = 0
            self.total = 0

    def op(self, worker: int, seq: int) -> Outcome:
        if not self.names:
            raise Exhausted
        start = seq * self.batch
        chunk = [self.names[(start + j) % len(self.names)] for j in range(self.batch)]
        self.backend.delete_many(chunk)
        with self.lock:
            self.fresh += max(0, min(self.batch, len(self.names) - start))
            self.total += self.batch
        return Outcome(len(chunk), 0)

    def close(self) -> None:
        if hasattr(self, "backend"):
            self.backend.close()
            if self.total > self.fresh:
                self.notes.append(
                    f"{self.fresh} of {self.total} deletes removed live objects; the rest repeated "
                    "deletes of removed names (direct_put left too few)"
                )
        self.ctx.direct_names.clear()


class PeerGet(Workload):
    """obstore GETs of one object per piece; time to first byte is when the headers arrive."""

    name, path, reads, is_async = "obstore_get", "obstore", True, True

    def __init__(self, ctx: Context, size: int, concurrency: int) -> None:
        super().__init__(size, concurrency)
        self.ctx = ctx
        self.requests_per_call = {"GET": 1}
        self.notes.append("requests counted as one per call (obstore has no request hook)")

    def start_phase(self, phase: int) -> None:
        if phase == 0:
            import obstore

            write_peer_dataset(self.ctx)
            self.obs = obstore
            self.store = self.ctx.provider.peer_store("peer-data")
            self.rngs: dict[int, Any] = {}

    async def aop(self, worker: int, seq: int) -> Outcome:
        rng = self.rngs.setdefault(worker, rng_for(self.name, worker))
        i = rng.randrange(self.ctx.params.direct_objects)
        key = piece_key(self.size, i)
        t0 = time.perf_counter()
        resp = await self.obs.get_async(self.store, key)
        ttfb = time.perf_counter() - t0
        data = await resp.bytes_async()
        self.ctx.pool.verify(key, self.size, i, bytes(data))
        return Outcome(1, self.size, ttfb)


# -- the plan --------------------------------------------------------------------------------

Factory = Callable[[Context], Workload]


@dataclass(frozen=True)
class Planned:
    """A cell to run: its label (for progress and filtering) and how to build it."""

    name: str
    label: str
    make: Factory


def plan(ctx: Context, wanted: Iterable[str] | None, *, peer: bool) -> list[Planned]:
    """The cells for one provider, in run order (deletes last: they consume the datasets)."""
    p = ctx.params
    big, pc = p.large_size, p.peer_concurrency
    cells: list[Planned] = []

    def add(name: str, label: str, make: Factory) -> None:
        cells.append(Planned(name, label, make))

    for c in p.large_levels:
        add("large_put", f"large_put {size_label(big)} c{c}", partial(LargePut, size=big, concurrency=c))
    for c in p.large_levels:
        add("large_get", f"large_get {size_label(big)} c{c}", partial(LargeGet, size=big, concurrency=c))
    if ctx.provider.local_dir is not None:
        add("disk_write", "disk_write 64MiB fsync", partial(DiskWrite, size=64 * MiB))
    for s in p.sizes:
        add(
            "put_many",
            f"put_many {size_label(s)}",
            partial(PutMany, size=s, concurrency=1, batch=p.put_batch(s)),
        )
    many = partial(PutMany, size=SMALL, concurrency=p.many_threads, batch=p.put_batch(SMALL))
    add("put_many", f"put_many 4KiB c{p.many_threads}", many)
    for c in p.put_levels:
        add("put", f"put 4KiB c{c}", partial(PutThreads, size=SMALL, concurrency=c))
    for c in p.levels:
        add("direct_put", f"direct_put 4KiB c{c}", partial(DirectPut, size=SMALL, concurrency=c))
    if peer:
        add("obstore_put", f"obstore_put 4KiB c{pc}", partial(PeerPut, size=SMALL, concurrency=pc))
    for s in p.sizes:
        add("get_many", f"get_many {size_label(s)}", partial(GetMany, size=s, batch=p.get_batch(s)))
    seq = partial(GetMany, size=SMALL, batch=p.get_batch(SMALL), sequential=True)
    add("get_many_seq", "get_many_seq 4KiB", seq)
    for c in p.get_levels:
        add("get", f"get 4KiB c{c}", partial(GetThreads, size=SMALL, concurrency=c))
    for c in p.levels:
        add("direct_get", f"direct_get 4KiB c{c}", partial(DirectGet, size=SMALL, concurrency=c))
    if peer:
        add("obstore_get", f"obstore_get 4KiB c{pc}", partial(PeerGet, size=SMALL, concurrency=pc))
    add("head", "head 4KiB c16", partial(StoreHead, size=SMALL, concurrency=16))
    add("list", "list 4KiB", partial(StoreList, size=SMALL, concurrency=1))
    add("direct_head", "direct_head 4KiB c16", partial(DirectHead, size=SMALL, concurrency=16))
    add("direct_list", "direct_list 4KiB", partial(DirectList, size=SMALL, concurrency=1))
    add("mixed", "mixed 70/30 4KiB c16", partial(Mixed, size=SMALL, concurrency=16))
    add("delete_many", "delete_many 4KiB x1000", partial(StoreDelete, size=SMALL, concurrency=1, batch=1000))
    add(
        "direct_delete",
        "direct_delete 4KiB x1000",
        partial(DirectDelete, size=SMALL, concurrency=1, batch=1000),
    )
    return [c for c in cells if selected(c.name, wanted) and c.name not in p.skip]


HEADLINE_WORKLOADS = ("large_put", "disk_write", "put_many", "put", "direct_put", "get_many", "direct_get")
WORKLOADS = (
    "large_put", "large_get", "disk_write", "put_many", "put", "direct_put", "obstore_put", "get_many",
    "get_many_seq", "get", "direct_get", "obstore_get", "head", "list", "direct_head", "direct_list",
    "mixed", "delete_many", "direct_delete",
)  # fmt: skip


def selected(name: str, wanted: Iterable[str] | None) -> bool:
    """Names or shell patterns (``direct_*``); ``headline`` selects what the headline needs."""
    if wanted is None:
        return True
    for w in wanted:
        if w == "headline" and name in HEADLINE_WORKLOADS:
            return True
        if fnmatch.fnmatchcase(name, w):
            return True
    return False


def unknown_workloads(wanted: Iterable[str]) -> list[str]:
    return [w for w in wanted if w != "headline" and not any(fnmatch.fnmatchcase(n, w) for n in WORKLOADS)]
