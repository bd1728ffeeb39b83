"""The parallel diff-puller: reads in ``pull-N`` threads, writes in ``write-N`` threads.

The main thread feeds planned chunks into a bounded queue (``TODO_DEPTH``
descriptors).  Each ``pull-N`` thread owns a reader (an ``rbd.Image``), reads a
batch (one chunk, or small chunks up to ``BATCH_BYTES`` with all requests in
flight), cuts it into blocks, records a checksum per block and sorts them into
data runs and all-zero runs.  It hands the batch to the ``write-N`` threads
through a second bounded queue (2 deep), so reads never wait for writes and
at most ``workers + 2 + writers`` batches are in memory, whatever the image
size.  A writer sends data runs as NBD WRITE and zero runs as WRITE_ZEROES
(or, in a layer without backing file, not at all: it reads as zeros
already).  Results come back to the main thread in a third queue, a batch
per item (a queue operation per 64 KiB chunk would cost more than the chunk); the
first exception in any thread stops the feed and is re-raised in the main
thread.  Threads start as work arrives: the first puller and writer with the
first chunk, another puller only while much waits to be read (``READER_WORTH``
or a full queue), since each opens an image.

A small diff (no more than ``READER_WORTH`` of data to read) would get one
puller and one writer anyway: it is read and written in the calling thread
instead, batch by batch, with no thread started and no hand-off: in a pool
run the jobs already overlap each other's reads and writes, and threads would
only add their start-up and hand-offs to the run's CPU time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from ..core.extents import Chunk, Kind
from ..core.threads import Crew
from ..store.checksums import BLOCK_SIZE, block_records, zero_records

logger = logging.getLogger(__name__)
POLL = 0.1
_T = TypeVar("_T")
JOIN_TIMEOUT = 120.0
BATCH_BYTES = 4 << 20  # a puller reads small chunks in batches of up to this many bytes ...
BATCH_COUNT = 32  # ... and requests, all in flight at once
TODO_DEPTH = 256  # planned chunks waiting for a puller: descriptors only, no data
# Another reader opens its own image, which costs about as long as reading tens of MiB:
# it starts only while more than this waits to be read, or while the queue is full.
READER_WORTH = 32 << 20
INLINE_CHUNKS = 1024  # a diff of more chunks than this goes to the threads, whatever their size


def peek_small(chunks: Iterable[Chunk], limit: int = READER_WORTH) -> tuple[list[Chunk], Iterator[Chunk] | None]:
    """``(every chunk, None)`` for a small diff, else ``(the chunks taken so far, the rest)``.

    Small: at most ``limit`` bytes to read and ``INLINE_CHUNKS`` chunks.
    Only as many chunks are taken as it takes to tell.
    """
    pending = iter(chunks)
    head: list[Chunk] = []
    data = 0
    for chunk in pending:
        head.append(chunk)
        data += chunk.length if chunk.kind is not Kind.ZERO else 0
        if data > limit or len(head) > INLINE_CHUNKS:
            return head, pending
    return head, None


class Reader(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...


@runtime_checkable
class BatchReader(Protocol):
    """A reader that can have several requests in flight at once."""

    def read(self, offset: int, length: int) -> bytes: ...
    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]: ...


class Writer(Protocol):
    def pwrite(self, data: bytes | memoryview, offset: int) -> None: ...
    def zero(self, length: int, offset: int) -> None: ...


@runtime_checkable
class BatchWriter(Protocol):
    """A writer that can have several requests in flight at once."""

    def pwrite(self, data: bytes | memoryview, offset: int) -> None: ...
    def zero(self, length: int, offset: int) -> None: ...
    def write_many(self, writes: list[tuple[int, memoryview | int]]) -> None: ...


class Sink(Protocol):
    def for_thread(self) -> Writer: ...


class RecordSink(Protocol):
    """Receives each chunk's checksum records with the chunk's sequence number."""

    def add(self, seq: int, records: bytes) -> None: ...


class NoRecords:
    """A :class:`RecordSink` that keeps nothing."""

    def add(self, seq: int, records: bytes) -> None:
        pass


@dataclass
class Stats:
    data_bytes: int = 0  # written as data
    zero_bytes: int = 0  # written as WRITE_ZEROES
    skipped_bytes: int = 0  # zeros not written (no backing file to hide)
    read_bytes: int = 0  # read from the source


@dataclass(frozen=True)
class _Done:
    seq: int
    records: bytes
    stats: Stats
    length: int


@dataclass(frozen=True)
class _Job:
    """A read chunk, cut into runs: ``(is_zero, offset, view)``; zero runs carry a length."""

    done: _Done
    runs: list[tuple[bool, int, memoryview | int]]


def _runs(flags: list[bool]) -> Iterable[tuple[bool, int, int]]:
    """Runs of equal flags as ``(flag, first index, end index)``."""
    start = 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            yield flags[start], start, i
            start = i


def _ignore(_: int) -> None:
    pass


def _go_on() -> None:
    pass


@dataclass(frozen=True)
class TransferOptions:
    """How a :class:`Transfer` runs: its threads, and the caller's hooks."""

    workers: int  # puller threads, each with its own reader
    writers: int | None = None  # writer threads; by default half as many as pullers, rounded up
    progress: Callable[[int], None] = _ignore  # bytes done
    fault: Callable[[int], None] = _ignore  # called with each chunk's sequence number (fault points)
    interrupt: Callable[[], None] = _go_on  # raises (Cancelled) when the caller wants the transfer stopped
    inline_bytes: int = READER_WORTH  # a diff with no more data to read is done in the calling thread


class Transfer:
    """One layer's transfer; :meth:`run` returns the totals.

    ``hide_zeros``: zero runs are written (the layer has a backing file whose
    data they must hide), else skipped.
    """

    def __init__(
        self,
        *,
        open_reader: Callable[[], AbstractContextManager[Reader]],
        sink: Sink,
        sums: RecordSink,
        size: int,
        hide_zeros: bool,
        options: TransferOptions,
    ) -> None:
        self._open_reader = open_reader
        self._sink = sink
        self._sums = sums
        self._size = size
        self._hide_zeros = hide_zeros
        self._opts = options
        self._workers = max(1, options.workers)
        self._writers = max(1, options.writers or (options.workers + 1) // 2)
        self._todo: queue.Queue[tuple[int, Chunk] | None] = queue.Queue(maxsize=TODO_DEPTH)
        # A puller's batch of jobs goes to a writer, and their results come back, in one queue item each.
        self._writes: queue.Queue[list[_Job] | None] = queue.Queue(maxsize=2)
        self._done: queue.Queue[list[_Done]] = queue.Queue()
        self._crew = Crew()  # pullers and writers
        self._queued = 0  # bytes to read put into the planned-chunk queue (by the feeding thread only)
        self._taken = 0  # ... and taken out of it by the pullers
        self._taken_lock = threading.Lock()
        self.stats = Stats()

    def run(self, chunks: Iterable[Chunk]) -> Stats:
        """Transfer ``chunks``: in this thread if the diff is small, else in puller and writer threads."""
        head, rest = peek_small(chunks, self._opts.inline_bytes)
        if rest is not None:
            return self._run_threads(itertools.chain(head, rest))
        return self._run_inline(head) if head else self.stats

    def _run_inline(self, chunks: list[Chunk]) -> Stats:
        """Read a batch (requests in flight at once), write it, record it; then the next."""
        with self._open_reader() as reader:
            writer = self._sink.for_thread()
            batched = isinstance(reader, BatchReader)
            batch: list[tuple[int, Chunk]] = []
            size = 0
            for seq, chunk in enumerate(chunks):
                self._opts.fault(seq)
                self._raise_if_failed()
                batch.append((seq, chunk))
                size += chunk.length if chunk.kind is not Kind.ZERO else 0
                if not batched or size >= BATCH_BYTES or len(batch) >= BATCH_COUNT or seq == len(chunks) - 1:
                    jobs = self._prepare_batch(reader, batch)
                    self._write(writer, jobs)
                    self._done.put([job.done for job in jobs])
                    self._drain(block=False)
                    batch, size = [], 0
        return self.stats

    def _run_threads(self, chunks: Iterable[Chunk]) -> Stats:
        # Threads start as chunks arrive: a small diff opens few readers and connections.
        pullers = writers = sent = received = 0
        try:
            for seq, chunk in enumerate(chunks):
                self._opts.fault(seq)
                if pullers < self._workers and (not pullers or self._reader_pays()):
                    self._crew.start(self._puller, f"pull-{pullers}")
                    pullers += 1
                if writers < self._writers and (not writers or self._writes.qsize() > 0):
                    self._crew.start(self._writer, f"write-{writers}")
                    writers += 1
                received += self._put((seq, chunk))
                sent += 1
                received += self._drain(block=False)
            while received < sent:
                self._raise_if_failed()
                received += self._drain(block=True)
        finally:
            # Every result is in (the threads idle) or a worker failed or a signal came: queued work is dropped.
            self._crew.stop(nudge=self._end_queues, timeout=JOIN_TIMEOUT)
        self._raise_if_failed()
        return self.stats

    def _reader_pays(self) -> bool:
        """Whether another reader is worth its image open: much waits to be read, or the queue is full."""
        return self._queued - self._taken > READER_WORTH or self._todo.full()

    def _put(self, item: tuple[int, Chunk]) -> int:
        """Queue ``item``; returns how many results were drained while the queue was full."""
        drained = 0
        if item[1].kind is not Kind.ZERO:
            self._queued += item[1].length
        while True:
            self._raise_if_failed()
            try:
                self._todo.put(item, timeout=POLL)
                return drained
            except queue.Full:
                drained += self._drain(block=False)

    def _drain(self, *, block: bool) -> int:
        n = 0
        while True:
            try:
                batch = self._done.get(timeout=POLL) if block and n == 0 else self._done.get_nowait()
            except queue.Empty:
                return n
            for done in batch:
                self._sums.add(done.seq, done.records)
                self.stats.data_bytes += done.stats.data_bytes
                self.stats.zero_bytes += done.stats.zero_bytes
                self.stats.skipped_bytes += done.stats.skipped_bytes
                self.stats.read_bytes += done.stats.read_bytes
            self._opts.progress(sum(done.length for done in batch))
            n += len(batch)

    def _raise_if_failed(self) -> None:
        self._crew.check()
        self._opts.interrupt()

    def _end_queues(self) -> None:
        """While stopping: a ``None`` into each thread's queue, dropping the oldest queued item if full."""
        _end(self._todo)
        _end(self._writes)

    def _puller(self) -> None:
        with self._open_reader() as reader:
            batched = isinstance(reader, BatchReader)
            last = False
            while not last:
                batch, last = self._next_batch(batched)
                if batch and not self._crew.stopping.is_set():
                    self._handoff(self._prepare_batch(reader, batch))

    def _next_batch(self, batched: bool) -> tuple[list[tuple[int, Chunk]], bool]:
        """The next chunk and, while they are small and waiting, more; and whether the end was seen.

        A small diff is thousands of 64 KiB chunks; one round trip to the
        OSDs each, one after another, would leave the pullers idle.
        """
        item = self._todo.get()
        if item is None:
            return [], True
        batch = [item]
        size = item[1].length
        last = False
        while batched and size < BATCH_BYTES and len(batch) < BATCH_COUNT:
            try:
                item = self._todo.get_nowait()
            except queue.Empty:
                break
            if item is None:
                last = True  # this puller's end: it stops after the batch
                break
            batch.append(item)
            size += item[1].length
        with self._taken_lock:
            self._taken += sum(c.length for _, c in batch if c.kind is not Kind.ZERO)
        return batch, last

    def _prepare_batch(self, reader: Reader, batch: list[tuple[int, Chunk]]) -> list[_Job]:
        reads = [(seq, c) for seq, c in batch if c.kind is not Kind.ZERO]
        data: dict[int, bytes] = {}
        if len(reads) > 1 and isinstance(reader, BatchReader):
            ranges = [(c.offset, c.offset + c.length) for _, c in reads]
            data = {seq: d for (seq, _), d in zip(reads, reader.read_many(ranges), strict=True)}
        return [self._prepare(reader, seq, chunk, data.get(seq)) for seq, chunk in batch]

    def _handoff(self, jobs: list[_Job]) -> None:
        while not self._crew.stopping.is_set():
            try:
                self._writes.put(jobs, timeout=POLL)
                return
            except queue.Full:
                continue

    def _writer(self) -> None:
        writer = self._sink.for_thread()
        while (jobs := self._writes.get()) is not None:
            if not self._crew.stopping.is_set():
                self._write(writer, jobs)
                self._done.put([job.done for job in jobs])

    def _prepare(self, reader: Reader, seq: int, chunk: Chunk, data: bytes | None = None) -> _Job:
        stats = Stats()
        if chunk.kind is Kind.ZERO:
            records = zero_records(chunk.offset, chunk.length, self._size)
            return _Job(_Done(seq, records, stats, chunk.length), [(True, chunk.offset, chunk.length)])
        if data is None:
            data = reader.read(chunk.offset, chunk.length)
        stats.read_bytes = len(data)
        records, zeros = block_records(chunk.offset, data)
        view = memoryview(data)
        runs: list[tuple[bool, int, memoryview | int]] = []
        for is_zero, first, end in _runs(zeros):
            start, stop = first * BLOCK_SIZE, min(end * BLOCK_SIZE, len(data))
            runs.append((is_zero, chunk.offset + start, stop - start if is_zero else view[start:stop]))
        return _Job(_Done(seq, records, stats, chunk.length), runs)

    def _write(self, writer: Writer, jobs: list[_Job]) -> None:
        """Write a batch's runs: all in flight at once where the writer can, else one by one."""
        writes: list[tuple[int, memoryview | int]] = []
        for job in jobs:
            stats = job.done.stats
            for is_zero, offset, payload in job.runs:
                if not is_zero:
                    assert isinstance(payload, memoryview)
                    writes.append((offset, payload))
                    stats.data_bytes += len(payload)
                elif self._hide_zeros:
                    assert isinstance(payload, int)
                    writes.append((offset, payload))
                    stats.zero_bytes += payload
                else:
                    assert isinstance(payload, int)
                    stats.skipped_bytes += payload
        if len(writes) > 1 and isinstance(writer, BatchWriter):
            writer.write_many(writes)
            return
        for offset, payload in writes:
            if isinstance(payload, int):
                writer.zero(payload, offset)
            else:
                writer.pwrite(payload, offset)


def _end(q: queue.Queue[_T | None]) -> None:
    """Put a ``None`` (a reader's end) into ``q``, making room by dropping its oldest item if it is full."""
    try:
        q.put_nowait(None)
    except queue.Full:
        with contextlib.suppress(queue.Empty):
            q.get_nowait()
        with contextlib.suppress(queue.Full):
            q.put_nowait(None)
