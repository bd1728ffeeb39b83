"""Copying a point from a qemu NBD export of its chain into a destination, checked block by block.

The main thread plans requests from the export's allocation map
(:func:`allocated_chunks`); ``read-N`` threads read them, check each 64 KiB
block against the digests recorded at backup (:class:`BlockCheck`) and
write them into a :class:`Sink` (RBD, a file or device, an NBD export).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from ..adapters.nbdio import Connection
from ..core.errors import ChainDamaged, QemuError
from ..core.extents import Chunk, Extent, Kind, align_down, plan, windows
from ..core.faults import crashpoint
from ..core.threads import Crew, every
from ..store.checksums import BLOCK_SIZE
from .deepcheck import Checker

logger = logging.getLogger(__name__)

MAP_WINDOW = 1 << 30
POLL = 0.1
JOIN_TIMEOUT = 120.0
STALL_TIMEOUT = 300.0  # seconds without a chunk copied: qemu (or the destination) is stuck


class BlockCheck:
    """Checks the blocks a restore copies against the recorded digests; the first difference is raised."""

    def __init__(self, ref: str, digests: dict[int, bytes], size: int) -> None:
        self._ref = ref
        self._size = size
        self._checker = Checker(digests, size)

    def data(self, offset: int, data: bytes | bytearray) -> None:
        """``data`` read at ``offset`` (a multiple of the block size)."""
        self._checker.check_view(offset // BLOCK_SIZE, memoryview(data))
        self._raise()

    def zeros(self, offset: int, length: int) -> None:
        """``[offset, offset+length)`` reads as zeros (qemu's allocation map): compared without reading."""
        self._checker.zeros(offset // BLOCK_SIZE, -(-(offset + length) // BLOCK_SIZE))
        self._raise()

    def _raise(self) -> None:
        bad = self._checker.bad
        if bad:
            first = min(bad)
            last = first
            while last + 1 in bad:
                last += 1
            raise ChainDamaged(
                self._ref,
                f"bytes {first * BLOCK_SIZE}-{min((last + 1) * BLOCK_SIZE, self._size)} read from the chain "
                "differ from the checksums recorded when they were backed up; restore stopped",
            )


class Source(Protocol):
    """What a reader thread of :class:`Copier` reads from (an NBD :class:`Connection`)."""

    def read_buffer(self, offset: int, length: int) -> bytes | bytearray: ...


class Sink(Protocol):
    """Where :class:`Copier` writes: an RBD image's :class:`AsyncWrites`, a file, an NBD export."""

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...

    def zero(self, length: int, offset: int) -> None: ...

    def wait(self) -> None: ...


class Copier:
    """Copies planned chunks from an NBD export into a sink, from ``read-N`` threads.

    Each reader thread owns an NBD connection: it reads a chunk (at most one
    RBD object), checks its blocks against the recorded digests, and writes
    the data to the sink.  All-zero blocks are not written into a new
    destination (it reads as zeros already); over an existing one they become
    write-zeroes, like the zero chunks of the plan, which the main thread
    checks and submits itself.  The main thread feeds a bounded queue and
    re-raises the first failure of any reader.  A failure, a signal, or
    :data:`STALL_TIMEOUT` without a chunk done calls ``abort`` (which kills
    qemu, so that no reader stays blocked on it) and drops queued work.
    """

    def __init__(
        self,
        open_reader: Callable[[], contextlib.AbstractContextManager[Source]],
        writes: Sink,
        *,
        readers: int,
        overwrite: bool,
        progress: Callable[[int], None],
        check: BlockCheck | None = None,
        abort: Callable[[], None] = lambda: None,
        stall_timeout: float = STALL_TIMEOUT,
    ) -> None:
        self._open_reader = open_reader
        self._writes = writes
        self._readers = max(1, readers)
        self._overwrite = overwrite
        self._progress = progress
        self._check = check
        self._abort = abort
        self._stall_timeout = stall_timeout
        self._todo: queue.Queue[Chunk | None] = queue.Queue(maxsize=2 * self._readers)
        self._done: queue.Queue[int] = queue.Queue()
        self._crew = Crew()  # the readers
        self._moved = time.monotonic()

    def run(self, chunks: Iterable[Chunk]) -> None:
        watchdog = every(POLL, self._watch, "watchdog")
        try:
            for seq, chunk in enumerate(chunks):
                _mid_restore_fault(seq)
                self._moved = time.monotonic()
                if chunk.kind is Kind.ZERO:
                    if self._check is not None:
                        self._check.zeros(chunk.offset, chunk.length)
                    if self._overwrite:
                        self._writes.zero(chunk.length, chunk.offset)
                    self._progress(chunk.length)
                    continue
                if len(self._crew) < self._readers and (len(self._crew) == 0 or self._todo.qsize() > 0):
                    self._crew.start(self._reader, f"read-{len(self._crew)}")
                self._put(chunk)
            for _ in range(len(self._crew)):
                self._put(None)
            self._crew.wait(each=self._check_readers)
            self._check_readers()
        except BaseException:
            self._crew.stopping.set()  # a reader failed, or a signal: queued work is dropped
            self._abort()
            raise
        finally:
            # Readers drop queued chunks once stopped; a None ends each.
            self._crew.stop(nudge=self._end_readers, timeout=JOIN_TIMEOUT)
            watchdog.stop(timeout=JOIN_TIMEOUT)

    def _watch(self) -> None:
        """A stall (no chunk done for ``stall_timeout``) fails the copy and aborts, once."""
        if not self._crew.stopping.is_set() and time.monotonic() - self._moved > self._stall_timeout:
            self._crew.fail(QemuError(f"no data copied in {self._stall_timeout:.0f} s; restore stopped"))
            self._abort()

    def _put(self, item: Chunk | None) -> None:
        while True:
            self._check_readers()
            try:
                self._todo.put(item, timeout=POLL)
                return
            except queue.Full:
                continue

    def _check_readers(self) -> None:
        """Progress so far; the first failure of a reader is raised here."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._progress(self._done.get_nowait())
        self._crew.check()

    def _end_readers(self) -> None:
        with contextlib.suppress(queue.Full):
            self._todo.put_nowait(None)

    def _reader(self) -> None:
        with self._open_reader() as conn:
            while (chunk := self._todo.get()) is not None:
                if not self._crew.stopping.is_set():
                    self._copy(conn, chunk)

    def _copy(self, conn: Source, chunk: Chunk) -> None:
        data = conn.read_buffer(chunk.offset, chunk.length)
        if self._check is not None:
            self._check.data(chunk.offset, data)
        for start, end, zero in block_runs(data, BLOCK_SIZE):
            if not zero:
                self._writes.pwrite(
                    data if end - start == len(data) else memoryview(data)[start:end], chunk.offset + start
                )
            elif self._overwrite:
                self._writes.zero(end - start, chunk.offset + start)
        self._moved = time.monotonic()
        self._done.put(chunk.length)


def block_runs(data: bytes | bytearray, block: int) -> list[tuple[int, int, bool]]:
    """``(start, end, all_zero)`` runs of ``data`` in whole blocks (the last may be shorter)."""
    zero = bytes(block)
    runs: list[tuple[int, int, bool]] = []
    for pos in range(0, len(data), block):
        end = min(pos + block, len(data))
        is_zero = data.startswith(zero if end - pos == block else zero[: end - pos], pos)
        if runs and runs[-1][2] == is_zero:
            runs[-1] = (runs[-1][0], end, is_zero)
        else:
            runs.append((pos, end, is_zero))
    return runs


def allocated_chunks(conn: Connection, size: int, align: int = 4 << 20) -> Iterator[Chunk]:
    """Requests covering an export by its allocation map: data to read, and zeros.

    Reads are cut at multiples of ``align`` (the RBD object size), so that
    each write goes to one object.
    """
    for start, end in windows(size, MAP_WINDOW):
        runs = conn.allocation(start, end - start)
        chunks = plan((Extent(off, ln, not zero) for off, ln, zero in runs), start=start, end=end, max_read=align)
        yield from split_at(chunks, align)


def split_at(chunks: Iterable[Chunk], align: int) -> Iterator[Chunk]:
    """Read chunks cut where they cross a multiple of ``align``; zero chunks as they are."""
    for chunk in chunks:
        if chunk.kind is Kind.ZERO:
            yield chunk
            continue
        off = chunk.offset
        while off < chunk.end:
            cut = min(chunk.end, align_down(off, align) + align)
            yield Chunk(off, cut - off, chunk.kind)
            off = cut


def _mid_restore_fault(seq: int) -> None:
    if seq == 2:
        crashpoint("mid-restore")


__all__ = ["BlockCheck", "Copier", "Sink", "Source", "allocated_chunks", "block_runs", "split_at"]
