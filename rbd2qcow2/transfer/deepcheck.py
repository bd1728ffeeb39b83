"""The content check of ``verify --deep``: every block of a point against its recorded digest.

qemu says where each byte of the point lives (``qemu-img map`` of its chain:
which layer serves an extent, and at which host offset its raw data sits),
so no qcow2 table is parsed here.  Blocks whose data qemu places in a layer
file are hashed straight from that file (mapped, no copy), blocks qemu
reports as zeros are compared with the digest of zeros without reading
them, and every other block (compressed clusters, blocks split between
extents, anything the map leaves out or places beyond the end of a file)
is read through a qemu NBD export of the chain, as a restore reads it.

A damaged L2 table makes qemu fail (an error) or name another cluster (a
block that differs); a flipped data byte in any layer makes a block differ.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import itertools
import logging
import mmap
import os
import subprocess
import sys
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import xxhash

from ..adapters import qemu
from ..core.extents import Chunk, Kind
from ..store.checksums import BLOCK_SIZE, ZERO_DIGEST, unpack_records, zero_digest
from ..store.checksums import digest as block_digest
from ..store.fsutil import open_regular
from . import hashworker

logger = logging.getLogger(__name__)
QEMU_REQUEST = 4 << 20  # bytes per NBD read of the blocks qemu reads
HASH_STEP = 8 << 20  # bytes hashed between looks at qemu's map output
MAPPED_LIMIT = 64 << 20  # bytes hashed between drops of the mapped pages (keeps the RSS flat)
WORKER_MIN = 256 << 20  # smaller chains (bytes of layer files): no helper
WORKER_PIPE = 8192  # bytes: the helper's input pipe holds this many runs at most (28 bytes each)
WORKER_BATCH = 140  # runs per write: below PIPE_BUF, so a write is whole or refused
DIGEST_SIZE = 16


class Checker:
    """Compares block digests with the expected ones; collects the blocks that differ.

    ``digests`` holds the expected digest of every block that a layer
    recorded; any other block is expected to read as zeros.
    """

    def __init__(self, digests: dict[int, bytes], size: int) -> None:
        self._digests = digests
        self._size = size
        self._recorded: list[int] | None = None
        self.bad: set[int] = set()
        self._lock = threading.Lock()

    def expected(self, index: int) -> bytes:
        found = self._digests.get(index)
        return found if found is not None else self._zero(index)

    def _zero(self, index: int) -> bytes:
        return zero_digest(min(BLOCK_SIZE, self._size - index * BLOCK_SIZE))

    def add(self, seq: int, records: bytes) -> None:
        """Record sink of the pipeline."""
        for index, actual in unpack_records(records):
            self.check(index, actual)

    def check(self, index: int, actual: bytes) -> None:
        if actual != self.expected(index):
            with self._lock:
                self.bad.add(index)

    def check_view(self, first: int, view: memoryview) -> None:
        """Hash the blocks of ``view`` (block ``first`` onwards) and check them."""
        digests = b"".join(map(block_digest, map(view.__getitem__, hashworker.pieces(len(view)))))
        self.check_blocks(range(first, first + len(digests) // DIGEST_SIZE), digests)

    def check_blocks(self, blocks: Sequence[int], digests: bytes) -> None:
        """Check the digests of ``blocks`` (16 bytes each, in that order).

        All at once first (no Python code runs per block); block by block
        only when something differs.
        """
        if digests == b"".join(map(self._digests.get, blocks, itertools.repeat(ZERO_DIGEST, len(blocks)))):
            return
        for i, index in enumerate(blocks):  # the image's short last block expects a shorter zero digest, too
            self.check(index, digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE])

    def zeros(self, first: int, end: int) -> None:
        """Blocks ``[first, end)`` read as zeros: only those with a recorded digest need a look."""
        if self._recorded is None:
            self._recorded = sorted(self._digests)
        recorded = self._recorded
        for i in range(bisect_left(recorded, first), bisect_left(recorded, end)):
            self.check(recorded[i], self._zero(recorded[i]))


# -- the plan -----------------------------------------------------------------------------


class HostRun(NamedTuple):
    """Whole blocks that one layer file holds contiguously and raw."""

    layer: int  # index in the chain, base first
    offset: int  # host offset of block ``block`` in that layer's file
    block: int
    length: int  # bytes: whole blocks; the last may be short at the end of the image


Blocks = tuple[int, int]  # block indexes [first, end)


@dataclass
class ReadPlan:
    host: list[HostRun] = field(default_factory=list)  # hashed from the layer files
    zeros: list[Blocks] = field(default_factory=list)  # read as zeros: not read
    qemu: list[Blocks] = field(default_factory=list)  # read through qemu


def _extend(ranges: list[Blocks], first: int, end: int) -> None:
    if ranges and ranges[-1][1] == first:
        ranges[-1] = (ranges[-1][0], end)
    else:
        ranges.append((first, end))


class Planner:
    """Plans the blocks of a point of ``size`` bytes from qemu's map of its ``layers`` files, extent by extent.

    A block lying wholly in one extent is read from its layer's file where
    qemu names a raw host offset, or not read at all where qemu reports
    zeros.  Every other block goes to qemu: compressed clusters (no host
    offset), blocks split between extents, any part the map leaves out.
    Extents come in order of ``start``; blocks that an extent out of order
    would cover again are left as already planned.
    """

    def __init__(self, size: int, layers: int) -> None:
        self.plan = ReadPlan()
        self._size = size
        self._layers = layers
        self._blocks = -(-size // BLOCK_SIZE)
        self._done = 0  # blocks [0, done) are planned

    def feed(self, extents: Iterable[qemu.HostExtent]) -> list[HostRun]:
        """Plan the blocks the extents hold; returns the new runs to read from the files."""
        plan, size, layers, blocks, done = self.plan, self._size, self._layers, self._blocks, self._done
        runs: list[HostRun] = []
        for start, length, depth, zero, data, offset in extents:
            if start >= size:
                break
            end = min(start + length, size)
            first = max(done, -(-start // BLOCK_SIZE))
            last = blocks if end == size else end // BLOCK_SIZE  # blocks [first, last) lie wholly in the extent
            if first > done:
                _extend(plan.qemu, done, first)  # split between extents, or left out of the map
                done = first
            if last <= first:
                continue
            if zero:
                _extend(plan.zeros, first, last)
            elif data and offset is not None and 0 <= depth < layers:
                pos = first * BLOCK_SIZE
                runs.append(
                    HostRun(layers - 1 - depth, offset + pos - start, first, min(last * BLOCK_SIZE, size) - pos)
                )
            else:
                _extend(plan.qemu, first, last)
            done = last
        self._done = done
        plan.host += runs
        return runs

    def finish(self) -> ReadPlan:
        """The whole plan, once the map is complete: what it left out goes to qemu."""
        if self._done < self._blocks:
            _extend(self.plan.qemu, self._done, self._blocks)
            self._done = self._blocks
        return self.plan


def plan_reads(extents: Iterable[qemu.HostExtent], size: int, layers: int) -> ReadPlan:
    """The plan of a point from a whole map (see :class:`Planner`)."""
    planner = Planner(size, layers)
    planner.feed(sorted(extents))
    return planner.finish()


# -- the check ----------------------------------------------------------------------------


class MappedChain:
    """A chain's files (base first), opened, with qemu mapping its top meanwhile.

    qemu maps the files through ``/dev/fd``, so the map and the reads see the
    same files.  A large chain also gets its hashing helper process, which
    starts up meanwhile too.  Raises ``OSError`` or ``QemuError``;
    :meth:`close` ends it all.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self.fds: list[int] = []
        self.worker: _Worker | None = None
        try:
            for path in self.files:
                self.fds.append(open_regular(path))
            self.map = qemu.HostMap([Path(f"/dev/fd/{fd}") for fd in self.fds], pass_fds=self.fds)
            if sum(os.fstat(fd).st_size for fd in self.fds) >= WORKER_MIN:
                self.worker = _Worker(self.fds)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if hasattr(self, "map"):
            self.map.close()
        self._close_files()

    def _close_files(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def check_point(
    chain: MappedChain,
    size: int,
    checker: Checker,
    daemon: qemu.StorageDaemon,
    *,
    workers: int = 4,
    progress: Callable[[int], None] = lambda n: None,
    on_mapped: Callable[[], None] = lambda: None,
) -> int:
    """Check every block of the chain's top; returns the bytes read.

    Blocks are hashed as soon as qemu has mapped them, here and in the
    chain's helper process; ``on_mapped`` is called once qemu has mapped
    all.  Raises ``OSError`` or :class:`~rbd2qcow2.core.errors.Error` when the
    chain cannot be read.
    """
    planner = Planner(size, len(chain.fds))
    worker = chain.worker
    with _Files(chain.fds) as files:
        backlog: collections.deque[HostRun] = collections.deque()
        mapping = True
        while mapping or backlog:
            if mapping and (extents := chain.map.read(wait=not backlog)) is not None:
                backlog += files.clip(planner.feed(extents))
            elif mapping:
                mapping = False
                on_mapped()
            if worker is not None:
                worker.take(backlog)
            files.hash(backlog, checker, progress, HASH_STEP)
        if worker is not None:
            shared = sum(r.length for r in worker.sent)
            digests = worker.digests()
            if digests is None:  # the helper failed: its share is hashed here, a tool's failure is no damage
                files.hash(collections.deque(worker.sent), checker, progress, shared)
            else:
                checker.check_blocks(worker.blocks(), digests)
                progress(shared)
    plan = planner.finish()
    for blocks in plan.zeros:
        checker.zeros(*blocks)
        progress(_bytes(blocks, size))
    chunks = [
        Chunk(start, min(start + QEMU_REQUEST, end) - start, Kind.READ)
        for first, last in [*plan.qemu, *files.beyond]
        for end in [min(last * BLOCK_SIZE, size)]
        for start in range(first * BLOCK_SIZE, end, QEMU_REQUEST)
    ]
    read = files.read
    if chunks:
        read += _through_qemu(chain.files, size, chunks, checker, daemon, workers, progress)
    return read


def _bytes(blocks: Blocks, size: int) -> int:
    return min(blocks[1] * BLOCK_SIZE, size) - blocks[0] * BLOCK_SIZE


class _Files:
    """The layer files mapped read-only and shared: hashing reads the page cache, nothing is copied.

    Only bytes below each file's size at open are touched (layer files are
    never truncated in place, so no mapped page can vanish); blocks that a
    run places beyond the end of its file are collected in ``beyond``, for
    qemu (a valid layer has none).  Every ``MAPPED_LIMIT`` bytes the pages
    are unmapped from this process again, so that its RSS does not grow by
    the size of the point.
    """

    def __init__(self, fds: Sequence[int]) -> None:
        self._stack = contextlib.ExitStack()
        self.sizes = [os.fstat(fd).st_size for fd in fds]
        self._maps = [
            self._stack.enter_context(mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)) if n else None
            for fd, n in zip(fds, self.sizes, strict=True)
        ]
        self._views = [self._stack.enter_context(memoryview(m)) if m else memoryview(b"") for m in self._maps]
        self._since_drop = 0
        self.beyond: list[Blocks] = []
        self.read = 0

    def __enter__(self) -> _Files:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def clip(self, runs: Iterable[HostRun]) -> list[HostRun]:
        """The runs cut to the whole blocks inside their files, in pieces of at most ``HASH_STEP`` bytes."""
        inside: list[HostRun] = []
        sizes = self.sizes
        for run in runs:
            layer, offset, block, length = run
            if length <= HASH_STEP and offset + length <= sizes[layer]:
                inside.append(run)
                self.read += length
                continue
            whole = max(0, min(length, sizes[layer] - offset))
            if whole < length:
                whole -= whole % BLOCK_SIZE
                self.beyond.append((block + whole // BLOCK_SIZE, block + -(-length // BLOCK_SIZE)))
            for pos in range(0, whole, HASH_STEP):
                inside.append(HostRun(layer, offset + pos, block + pos // BLOCK_SIZE, min(HASH_STEP, whole - pos)))
            self.read += whole
        return inside

    def hash(
        self, runs: collections.deque[HostRun], checker: Checker, progress: Callable[[int], None], limit: int
    ) -> None:
        """Hash runs from the left of ``runs``, about ``limit`` bytes of them."""
        done = 0
        while runs and done < limit:
            layer, offset, block, length = runs.popleft()
            with self._views[layer][offset : offset + length] as view:
                checker.check_view(block, view)
            progress(length)
            done += length
            self._since_drop += length
            if self._since_drop >= MAPPED_LIMIT:
                for m in self._maps:
                    if m is not None:
                        m.madvise(mmap.MADV_DONTNEED)  # the page cache stays; only our mappings of it go
                self._since_drop = 0


def _through_qemu(
    files: Sequence[Path],
    size: int,
    chunks: list[Chunk],
    checker: Checker,
    daemon: qemu.StorageDaemon,
    workers: int,
    progress: Callable[[int], None],
) -> int:
    """Hash ``chunks`` of the chain's top read through an NBD export of it."""
    from ..adapters.nbdio import Connection  # only here: most chains never need it, and it costs start-up time
    from .pipeline import Transfer, TransferOptions

    export = daemon.export_chain(files, writable=False)
    try:
        stats = Transfer(
            open_reader=lambda: Connection(export.socket, export.name),
            sink=NullSink(),
            sums=checker,
            size=size,
            hide_zeros=False,
            options=TransferOptions(workers=workers, progress=progress),
        ).run(chunks)
    finally:
        daemon.remove_export(export)
    return stats.read_bytes


class NullSink:
    """A pipeline sink for checks: reads only."""

    def for_thread(self) -> NullSink:
        return self

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        pass

    def zero(self, length: int, offset: int) -> None:
        pass


class _Worker:
    """The helper process (:mod:`rbd2qcow2.transfer.hashworker`) that hashes runs handed to it, on another core.

    Its input pipe holds a few milliseconds of work: it takes runs only
    while it keeps up, so the two processes share the work whatever else
    the machine does.  :meth:`close` ends it if it still runs.
    """

    def __init__(self, fds: Sequence[int]) -> None:
        self._fds = fds
        self.sent: list[HostRun] = []
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-S", hashworker.__file__, str(Path(xxhash.__file__).parent.parent), *map(str, fds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=fds,
        )
        assert self._proc.stdin is not None
        self._in = self._proc.stdin.fileno()
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._in, fcntl.F_SETPIPE_SZ, WORKER_PIPE)
        os.set_blocking(self._in, False)
        self._open = True

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def take(self, runs: collections.deque[HostRun]) -> None:
        """Hand runs from the right end of ``runs`` to the helper, as many as its pipe takes now."""
        while self._open and runs:
            batch = [runs.pop() for _ in range(min(len(runs), WORKER_BATCH))]
            try:
                os.write(self._in, b"".join(itertools.starmap(hashworker.RUN.pack, batch)))
            except (BlockingIOError, BrokenPipeError) as exc:  # full (or gone: said by digests())
                runs.extend(reversed(batch))
                self._open = not isinstance(exc, BrokenPipeError)
                return
            self.sent += batch

    def blocks(self) -> list[int]:
        """The blocks of the runs handed over, in order."""
        return list(
            itertools.chain.from_iterable(range(r.block, r.block + -(-r.length // BLOCK_SIZE)) for r in self.sent)
        )

    def digests(self) -> bytes | None:
        """The digests of :meth:`blocks`, once the helper is done; ``None`` if it failed."""
        self._open = False
        out, err = self._proc.communicate()  # closes its input: the helper finishes and writes the digests
        expected = sum(-(-run.length // BLOCK_SIZE) for run in self.sent) * DIGEST_SIZE
        if self._proc.returncode != 0 or len(out) != expected:
            why = err.decode(errors="replace").strip() or f"{len(out)} bytes of digests instead of {expected}"
            logger.warning("the hashing helper failed (exit %s): %s", self._proc.returncode, why)
            return None
        return out


__all__ = [
    "Checker",
    "HostRun",
    "MappedChain",
    "NullSink",
    "Planner",
    "ReadPlan",
    "check_point",
    "plan_reads",
]
