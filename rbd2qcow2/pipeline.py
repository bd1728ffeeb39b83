"""The parallel diff-puller: RBD reads in worker threads, NBD writes, checksums.

The main thread feeds planned chunks into a bounded queue (``2*workers+1``
deep, so memory stays flat whatever the image size).  Each ``pull-N`` worker
owns a reader (its own ``rbd.Image``), reads a chunk, cuts it into blocks,
records a checksum per block, and writes the data blocks with NBD WRITE and
the all-zero blocks with WRITE_ZEROES (or, in a layer without backing file,
not at all: such a layer reads as zeros already).  Results come back to the
main thread in a second queue; the first worker exception stops the feed and
is re-raised in the main thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from .checksums import BLOCK_SIZE, block_records, zero_records
from .extents import Chunk, Kind

logger = logging.getLogger(__name__)
POLL = 0.1
JOIN_TIMEOUT = 120.0


class Reader(Protocol):
    def read(self, offset: int, length: int) -> bytes: ...


class Writer(Protocol):
    def pwrite(self, data: bytes | memoryview, offset: int) -> None: ...
    def zero(self, length: int, offset: int) -> None: ...


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


def _runs(flags: list[bool]) -> Iterable[tuple[bool, int, int]]:
    """Runs of equal flags as ``(flag, first index, end index)``."""
    start = 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            yield flags[start], start, i
            start = i


class Transfer:
    """One layer's transfer; :meth:`run` returns the totals."""

    def __init__(
        self,
        *,
        open_reader: Callable[[], AbstractContextManager[Reader]],
        sink: Sink,
        sums: RecordSink,
        size: int,
        workers: int,
        hide_zeros: bool,
        progress: Callable[[int], None] = lambda n: None,
        fault: Callable[[int], None] = lambda seq: None,
    ) -> None:
        self._open_reader = open_reader
        self._sink = sink
        self._sums = sums
        self._size = size
        self._workers = max(1, workers)
        self._hide_zeros = hide_zeros
        self._progress = progress
        self._fault = fault
        self._todo: queue.Queue[tuple[int, Chunk] | None] = queue.Queue(maxsize=2 * self._workers + 1)
        self._done: queue.Queue[_Done] = queue.Queue()
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self.stats = Stats()

    def run(self, chunks: Iterable[Chunk]) -> Stats:
        threads = [threading.Thread(target=self._worker, name=f"pull-{i}", daemon=True) for i in range(self._workers)]
        for t in threads:
            t.start()
        sent = received = 0
        try:
            for seq, chunk in enumerate(chunks):
                self._fault(seq)
                self._put((seq, chunk))
                sent += 1
                received += self._drain(block=False)
            while received < sent:
                self._raise_if_failed()
                received += self._drain(block=True)
        finally:
            self._shutdown(threads)
        self._raise_if_failed()
        return self.stats

    def _put(self, item: tuple[int, Chunk]) -> None:
        while True:
            self._raise_if_failed()
            try:
                self._todo.put(item, timeout=POLL)
                return
            except queue.Full:
                self._drain(block=False)

    def _drain(self, *, block: bool) -> int:
        n = 0
        while True:
            try:
                done = self._done.get(timeout=POLL) if block and n == 0 else self._done.get_nowait()
            except queue.Empty:
                return n
            self._sums.add(done.seq, done.records)
            for field in ("data_bytes", "zero_bytes", "skipped_bytes", "read_bytes"):
                setattr(self.stats, field, getattr(self.stats, field) + getattr(done.stats, field))
            self._progress(done.length)
            n += 1

    def _raise_if_failed(self) -> None:
        if self._errors:
            raise self._errors[0]

    def _shutdown(self, threads: list[threading.Thread]) -> None:
        self._stop.set()
        for _ in threads:
            while any(t.is_alive() for t in threads):
                try:
                    self._todo.put(None, timeout=POLL)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self._todo.get_nowait()
        for t in threads:
            t.join(JOIN_TIMEOUT)
            if t.is_alive():
                logger.error("worker %s did not stop", t.name)

    def _worker(self) -> None:
        try:
            with self._open_reader() as reader:
                writer = self._sink.for_thread()
                while True:
                    item = self._todo.get()
                    if item is None or self._stop.is_set():
                        return
                    seq, chunk = item
                    self._done.put(self._one(reader, writer, seq, chunk))
        except BaseException as exc:  # carried to the main thread
            self._errors.append(exc)
            self._stop.set()

    def _one(self, reader: Reader, writer: Writer, seq: int, chunk: Chunk) -> _Done:
        stats = Stats()
        if chunk.kind is Kind.ZERO:
            if self._hide_zeros:
                writer.zero(chunk.length, chunk.offset)
                stats.zero_bytes = chunk.length
            else:
                stats.skipped_bytes = chunk.length
            return _Done(seq, zero_records(chunk.offset, chunk.length, self._size), stats, chunk.length)
        data = reader.read(chunk.offset, chunk.length)
        stats.read_bytes = len(data)
        records, zeros = block_records(chunk.offset, data)
        view = memoryview(data)
        for is_zero, first, end in _runs(zeros):
            start, stop = first * BLOCK_SIZE, min(end * BLOCK_SIZE, len(data))
            if not is_zero:
                writer.pwrite(view[start:stop], chunk.offset + start)
                stats.data_bytes += stop - start
            elif self._hide_zeros:
                writer.zero(stop - start, chunk.offset + start)
                stats.zero_bytes += stop - start
            else:
                stats.skipped_bytes += stop - start
        return _Done(seq, records, stats, chunk.length)
