"""The transfer pipeline with plain fakes: content, zeros, records, errors, bounded memory."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator

import pytest

from rbd2qcow2.core.extents import Chunk, Kind
from rbd2qcow2.store.checksums import BLOCK_SIZE, block_records, unpack_records, zero_digest
from rbd2qcow2.transfer.pipeline import INLINE_CHUNKS, READER_WORTH, Transfer, TransferOptions, peek_small

MiB = 1 << 20


class FakeImage:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads = 0
        self.live = 0  # chunks read and not yet written
        self.peak = 0
        self.lock = threading.Lock()
        self.fail_at: int | None = None

    def read(self, offset: int, length: int) -> bytes:
        if self.fail_at is not None and offset == self.fail_at:
            raise OSError("injected read error")
        with self.lock:
            self.reads += 1
            self.live += 1
            self.peak = max(self.peak, self.live)
        time.sleep(0.001)
        return self.data[offset : offset + length]


class FakeDisk:
    def __init__(self, size: int, image: FakeImage) -> None:
        self.buf = bytearray(b"\xee" * size)  # "old data" that zeros must hide
        self.image = image
        self.zeroed = 0

    def for_thread(self) -> FakeDisk:
        return self

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.buf[offset : offset + len(data)] = data
        self._written(offset, len(data))

    def zero(self, length: int, offset: int) -> None:
        self.buf[offset : offset + length] = bytes(length)
        self.zeroed += length
        self._written(offset, length)

    def _written(self, offset: int, length: int) -> None:
        if (offset + length) % (4 * MiB) == 0 or offset + length == len(self.buf):
            with self.image.lock:
                self.image.live -= 1


class BatchDisk(FakeDisk):
    """A disk that takes a batch's writes at once, like an NBD connection with requests in flight."""

    def __init__(self, size: int, image: FakeImage) -> None:
        super().__init__(size, image)
        self.batches: list[int] = []

    def write_many(self, writes: list[tuple[int, memoryview | int]]) -> None:
        ends = sorted((offset, offset + (p if isinstance(p, int) else len(p))) for offset, p in writes)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends))  # never overlapping
        self.batches.append(len(writes))
        for offset, payload in reversed(writes):  # in any order
            if isinstance(payload, int):
                self.zero(payload, offset)
            else:
                self.pwrite(payload, offset)


class Records:
    def __init__(self) -> None:
        self.seen: dict[int, bytes] = {}

    def add(self, seq: int, records: bytes) -> None:
        for index, digest in unpack_records(records):
            self.seen[index] = digest


@contextlib.contextmanager
def opened(image: FakeImage) -> Iterator[FakeImage]:
    yield image


def source(size: int) -> bytes:
    data = bytearray(os.urandom(size))
    data[MiB : 3 * MiB] = bytes(2 * MiB)  # all-zero blocks inside read chunks
    return bytes(data)


def chunks(size: int, step: int = 4 * MiB) -> list[Chunk]:
    return [Chunk(off, min(step, size - off), Kind.READ) for off in range(0, size, step)]


INLINE, THREADS = 1 << 40, 0  # ``inline_bytes`` that make the transfer run in the calling thread, or in threads


@pytest.mark.parametrize("disk_kind", [FakeDisk, BatchDisk], ids=["one-by-one", "batched"])
@pytest.mark.parametrize("inline_bytes", [INLINE, THREADS], ids=["inline", "threads"])
@pytest.mark.parametrize("hide_zeros", [True, False])
def test_copies_content_and_records(hide_zeros: bool, inline_bytes: int, disk_kind: type[FakeDisk]) -> None:
    size = 32 * MiB + 12345
    image = FakeImage(source(size))
    disk = disk_kind(size, image)
    sums = Records()
    plan = [*chunks(20 * MiB), Chunk(20 * MiB, 4 * MiB, Kind.ZERO), *chunks(size - 24 * MiB)]
    plan = [Chunk(c.offset + (24 * MiB if i >= 6 else 0), c.length, c.kind) for i, c in enumerate(plan)]
    stats = Transfer(
        open_reader=lambda: opened(image),
        sink=disk,
        sums=sums,
        size=size,
        hide_zeros=hide_zeros,
        options=TransferOptions(workers=3, inline_bytes=inline_bytes),
    ).run(plan)
    expected = bytearray(image.data)
    expected[20 * MiB : 24 * MiB] = bytes(4 * MiB)
    if not hide_zeros:  # zeros are not written: the old data stays (a layer without backing reads zeros)
        for lo, hi in ((MiB, 3 * MiB), (20 * MiB, 24 * MiB)):
            expected[lo:hi] = b"\xee" * (hi - lo)
    assert bytes(disk.buf) == bytes(expected)
    assert stats.read_bytes == size - 4 * MiB
    assert stats.data_bytes == size - 4 * MiB - 2 * MiB
    assert (stats.zero_bytes, stats.skipped_bytes) == ((6 * MiB, 0) if hide_zeros else (0, 6 * MiB))
    want, _ = block_records(0, bytes(image.data[: 20 * MiB]))
    assert {i: sums.seen[i] for i in range(20 * MiB // BLOCK_SIZE)} == dict(unpack_records(want))
    assert sums.seen[20 * MiB // BLOCK_SIZE] == zero_digest(BLOCK_SIZE)
    assert len(sums.seen) == -(-size // BLOCK_SIZE)
    if isinstance(disk, BatchDisk):
        assert max(disk.batches) > 1


@pytest.mark.parametrize("inline_bytes", [INLINE, THREADS], ids=["inline", "threads"])
def test_worker_error_reaches_the_caller_without_hanging(inline_bytes: int) -> None:
    size = 64 * MiB
    image = FakeImage(source(size))
    image.fail_at = 40 * MiB
    disk = FakeDisk(size, image)
    started = time.monotonic()
    with pytest.raises(OSError, match="injected"):
        Transfer(
            open_reader=lambda: opened(image),
            sink=disk,
            sums=Records(),
            size=size,
            hide_zeros=True,
            options=TransferOptions(workers=4, inline_bytes=inline_bytes),
        ).run(chunks(size))
    assert time.monotonic() - started < 30
    assert image.reads < len(chunks(size))  # the feed stopped


def test_memory_stays_bounded() -> None:
    """Chunks in memory at once: at most readers + the hand-off queue + writers, whatever the size."""
    size = 256 * MiB
    image = FakeImage(bytes(size))
    workers = 4
    transfer = Transfer(
        open_reader=lambda: opened(image),
        sink=FakeDisk(size, image),
        sums=Records(),
        size=size,
        hide_zeros=True,
        options=TransferOptions(workers=workers),
    )
    transfer.run(chunks(size))
    assert image.peak <= workers + 2 + (workers + 1) // 2 + 1


class BatchImage(FakeImage):
    """A reader with requests in flight at once, as librbd's aio reads."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.batches: list[int] = []

    def read_many(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        self.batches.append(len(ranges))
        return [self.read(start, end - start) for start, end in ranges]


class SlowDisk(FakeDisk):
    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        time.sleep(0.0002)  # the feed outruns the writes: the planned-chunk queue fills up
        super().pwrite(data, offset)


@pytest.mark.parametrize("inline_bytes", [INLINE, THREADS], ids=["inline", "threads"])
def test_small_chunks_in_batches_with_a_full_queue(inline_bytes: int) -> None:
    """Hundreds of 64 KiB chunks: read in batches, every one written and counted once."""
    size = 64 * MiB
    image = BatchImage(source(size))
    disk = SlowDisk(size, image)
    small = [c for c in chunks(size, BLOCK_SIZE) if (c.offset // BLOCK_SIZE) % 3 != 1]
    records = Records()
    stats = Transfer(
        open_reader=lambda: opened(image),
        sink=disk,
        sums=records,
        size=size,
        hide_zeros=True,
        options=TransferOptions(workers=4, inline_bytes=inline_bytes),
    ).run(small)
    assert stats.read_bytes == len(small) * BLOCK_SIZE
    assert max(image.batches) > 1 and sum(image.batches) <= len(small)
    for c in small:
        assert disk.buf[c.offset : c.end] == image.data[c.offset : c.end]
    assert sorted(records.seen) == [c.offset // BLOCK_SIZE for c in small]


class Opens:
    """``open_reader`` that counts the readers the transfer opens."""

    def __init__(self, image: FakeImage) -> None:
        self.image = image
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self) -> contextlib.AbstractContextManager[FakeImage]:
        with self.lock:
            self.count += 1
        return opened(self.image)


@pytest.mark.parametrize(
    ("size", "step", "readers"),
    [
        (8 * MiB, BLOCK_SIZE, range(1, 2)),  # a small diff: one reader, whatever the number of chunks
        (256 * MiB, 4 * MiB, range(2, 5)),  # much waiting to be read: more readers
    ],
)
def test_readers_start_only_when_much_waits(size: int, step: int, readers: range) -> None:
    image = FakeImage(source(size))
    opens = Opens(image)
    disk = FakeDisk(size, image)
    stats = Transfer(
        open_reader=opens, sink=disk, sums=Records(), size=size, hide_zeros=True, options=TransferOptions(workers=4)
    ).run(chunks(size, step))
    assert opens.count in readers
    assert stats.read_bytes == size
    assert bytes(disk.buf) == image.data


class ThreadsSeen(FakeDisk):
    def __init__(self, size: int, image: FakeImage) -> None:
        super().__init__(size, image)
        self.threads: set[str] = set()

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        self.threads.add(threading.current_thread().name)
        super().pwrite(data, offset)


@pytest.mark.parametrize(
    ("size", "step", "limit", "inline"),
    [
        (8 * MiB, BLOCK_SIZE, READER_WORTH, True),  # a small diff: read and written by the caller
        (READER_WORTH, 4 * MiB, READER_WORTH, True),  # exactly the limit
        (READER_WORTH + 4 * MiB, 4 * MiB, READER_WORTH, False),  # more data than the limit: threads
        ((INLINE_CHUNKS + 1) * BLOCK_SIZE, BLOCK_SIZE, INLINE, False),  # more chunks than the limit: threads
    ],
)
def test_a_small_diff_runs_in_the_calling_thread(size: int, step: int, limit: int, inline: bool) -> None:
    image = BatchImage(source(size))
    disk = ThreadsSeen(size, image)
    plan = chunks(size, step)
    records = Records()
    progress: list[int] = []
    stats = Transfer(
        open_reader=lambda: opened(image),
        sink=disk,
        sums=records,
        size=size,
        hide_zeros=True,
        options=TransferOptions(workers=4, progress=progress.append, inline_bytes=limit),
    ).run(plan)
    assert (disk.threads == {threading.current_thread().name}) is inline
    assert bytes(disk.buf) == image.data
    assert stats.read_bytes == size and sum(progress) == size
    assert len(records.seen) == size // BLOCK_SIZE


def test_peek_small_takes_only_what_it_needs_to_tell() -> None:
    small = chunks(READER_WORTH, 4 * MiB)
    head, rest = peek_small(iter(small))
    assert head == small and rest is None
    zeros = [Chunk(i * 4 * MiB, 4 * MiB, Kind.ZERO) for i in range(INLINE_CHUNKS)]
    assert peek_small(zeros) == (zeros, None)  # zeros are not read: only the count limits them

    taken: list[Chunk] = []

    def plan() -> Iterator[Chunk]:
        for c in chunks(READER_WORTH * 4, 4 * MiB):
            taken.append(c)
            yield c

    head, rest = peek_small(plan())
    assert rest is not None
    assert len(head) == len(taken) == READER_WORTH // (4 * MiB) + 1  # one past the limit, no further
    assert head + list(rest) == chunks(READER_WORTH * 4, 4 * MiB)
    many = chunks((INLINE_CHUNKS + 1) * 4096, 4096)  # few bytes, too many chunks
    head, rest = peek_small(many)
    assert rest is not None and len(head) == INLINE_CHUNKS + 1 and list(rest) == []
