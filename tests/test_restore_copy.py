"""The RBD restore's copy path with plain fakes: request planning, zero runs, async writes, the copier."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rbd2qcow2.adapters.ceph import AsyncWrites
from rbd2qcow2.core.errors import CephError
from rbd2qcow2.core.extents import Chunk, Kind
from rbd2qcow2.transfer.copier import Copier as _Copier
from rbd2qcow2.transfer.copier import block_runs, split_at

KiB, MiB = 1 << 10, 1 << 20
OBJECT = 4 * MiB


# -- planning ---------------------------------------------------------------------


def test_split_at_cuts_reads_at_object_boundaries_only() -> None:
    chunks = [
        Chunk(3 * MiB, 2 * MiB, Kind.READ),
        Chunk(5 * MiB, 2 * OBJECT, Kind.ZERO),
        Chunk(16 * MiB, OBJECT, Kind.READ),
    ]
    assert list(split_at(chunks, OBJECT)) == [
        Chunk(3 * MiB, MiB, Kind.READ),
        Chunk(4 * MiB, MiB, Kind.READ),
        Chunk(5 * MiB, 2 * OBJECT, Kind.ZERO),
        Chunk(16 * MiB, OBJECT, Kind.READ),
    ]


@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 200), st.booleans()), max_size=20))
def test_split_at_covers_the_same_bytes(specs: list[tuple[int, int, bool]]) -> None:
    unit = 64 * KiB
    chunks, pos = [], 0
    for gap, length, zero in specs:
        pos += gap * unit
        chunks.append(Chunk(pos, length * unit, Kind.ZERO if zero else Kind.READ))
        pos += length * unit
    out = list(split_at(chunks, OBJECT))
    assert sum(c.length for c in out) == sum(c.length for c in chunks)
    assert all(c.offset // OBJECT == (c.end - 1) // OBJECT for c in out if c.kind is Kind.READ)
    assert all(a.end <= b.offset for a, b in itertools.pairwise(out))


def test_block_runs() -> None:
    block = 64 * KiB
    data = bytearray(os.urandom(5 * block + 100))
    data[block : 3 * block] = bytes(2 * block)
    data[5 * block :] = bytes(100)  # a short, all-zero last block
    assert block_runs(bytes(data), block) == [
        (0, block, False),
        (block, 3 * block, True),
        (3 * block, 5 * block, False),
        (5 * block, 5 * block + 100, True),
    ]
    assert block_runs(os.urandom(3 * block), block) == [(0, 3 * block, False)]
    assert block_runs(b"", block) == []


# -- AsyncWrites ----------------------------------------------------------------------


class Completion:
    def __init__(self, ret: int) -> None:
        self.ret = ret

    def get_return_value(self) -> int:
        return self.ret


class FakeRbdImage:
    """``aio_write``/``aio_write_zeroes`` completed from another thread after ``delay``, like librbd."""

    def __init__(self, size: int, delay: float = 0.002) -> None:
        self.data = bytearray(b"\xee" * size)
        self.delay = delay
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.peak_bytes = 0
        self.bytes = 0
        self.fail_offset: int | None = None
        self.hang = False
        self.buffers: list[Any] = []

    def aio_write(self, data: bytes, offset: int, oncomplete: Callable[[Completion], None]) -> None:
        self.buffers.append(data)
        self._start(len(data), lambda: self._store(offset, data), offset, oncomplete)

    def aio_write_zeroes(self, offset: int, length: int, oncomplete: Callable[[Completion], None]) -> None:
        self._start(0, lambda: self._store(offset, bytes(length)), offset, oncomplete)

    def _store(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data

    def _start(self, size: int, apply: Callable[[], None], offset: int, cb: Callable[[Completion], None]) -> None:
        if offset >= len(self.data):
            raise CephError("beyond the end")  # as _wrap turns a synchronous rbd error into
        with self.lock:
            self.in_flight += 1
            self.bytes += size
            self.peak = max(self.peak, self.in_flight)
            self.peak_bytes = max(self.peak_bytes, self.bytes)

        def complete() -> None:
            if self.hang:
                return
            time.sleep(self.delay)
            failed = offset == self.fail_offset
            if not failed:
                apply()
            with self.lock:
                self.in_flight -= 1
                self.bytes -= size
            cb(Completion(-5 if failed else 0))

        threading.Thread(target=complete, daemon=True).start()


def test_async_writes_bounded_in_count_and_bytes() -> None:
    img = FakeRbdImage(64 * MiB)
    writes = AsyncWrites(img, "pool/img", depth=4, max_bytes=3 * MiB, timeout=10)
    expected = bytearray(img.data)
    for i in range(40):
        data = os.urandom(MiB if i % 2 else 64 * KiB)
        writes.pwrite(data, i * MiB)
        expected[i * MiB : i * MiB + len(data)] = data
    writes.wait()
    assert img.data == expected
    assert img.peak <= 4 and img.peak_bytes <= 3 * MiB
    assert img.in_flight == 0


def test_async_writes_one_larger_than_the_byte_bound_still_goes() -> None:
    img = FakeRbdImage(16 * MiB)
    writes = AsyncWrites(img, "pool/img", depth=4, max_bytes=MiB, timeout=10)
    writes.pwrite(os.urandom(4 * MiB), 0)
    writes.pwrite(os.urandom(4 * MiB), 4 * MiB)
    writes.wait()
    assert img.peak == 1


def test_async_writes_zero_and_whole_buffers_unchanged() -> None:
    img = FakeRbdImage(8 * MiB)
    writes = AsyncWrites(img, "pool/img", depth=8, max_bytes=64 * MiB, timeout=10)
    whole, raw = os.urandom(MiB), bytearray(os.urandom(MiB))
    writes.pwrite(whole, 0)
    writes.pwrite(memoryview(whole), MiB)
    writes.pwrite(raw, 2 * MiB)
    writes.pwrite(memoryview(whole)[:KiB], 3 * MiB)
    writes.zero(MiB, 4 * MiB)
    writes.wait()
    assert img.buffers[0] is whole and img.buffers[1] is whole and img.buffers[2] is raw
    assert isinstance(img.buffers[3], bytes) and img.buffers[3] == whole[:KiB]
    assert img.data[4 * MiB : 5 * MiB] == bytes(MiB)
    assert img.data[3 * MiB + KiB : 4 * MiB] == b"\xee" * (MiB - KiB)


def test_async_writes_failure_raised_by_next_submit_and_by_wait() -> None:
    img = FakeRbdImage(16 * MiB)
    img.fail_offset = MiB
    writes = AsyncWrites(img, "pool/img", depth=2, max_bytes=64 * MiB, timeout=10)
    writes.pwrite(os.urandom(KiB), 0)
    writes.pwrite(os.urandom(KiB), MiB)
    with pytest.raises(CephError, match=r"pool/img: write 1024 at 1048576: Input/output error"):
        for i in range(2, 16):
            time.sleep(0.01)
            writes.pwrite(os.urandom(KiB), i * MiB)
    with pytest.raises(CephError, match="Input/output error"):
        writes.wait()
    writes.settle()  # raises nothing
    assert img.in_flight == 0


def test_async_writes_synchronous_error_does_not_leak_a_slot() -> None:
    img = FakeRbdImage(MiB)
    writes = AsyncWrites(img, "pool/img", depth=1, max_bytes=MiB, timeout=1)
    with pytest.raises(CephError, match="beyond the end"):
        writes.pwrite(b"x", 2 * MiB)
    writes.pwrite(b"x", 0)  # the slot of the failed submit was given back
    writes.wait()


def test_async_writes_time_out_instead_of_hanging() -> None:
    img = FakeRbdImage(MiB)
    img.hang = True
    writes = AsyncWrites(img, "pool/img", depth=1, max_bytes=MiB, timeout=0.2)
    writes.pwrite(b"x", 0)
    with pytest.raises(CephError, match="no write completed in 0 s"):
        writes.pwrite(b"y", 1)
    with pytest.raises(CephError, match="no write completed"):
        writes.wait()
    writes.settle()  # gives up quietly


# -- the copier -------------------------------------------------------------------------


class FakeReader:
    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self.data = data
        self.fail_at = fail_at
        self.reads: list[tuple[int, int]] = []
        self.opened = 0
        self.closed = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def open(self) -> Iterator[FakeReader]:
        with self.lock:
            self.opened += 1
        try:
            yield self
        finally:
            with self.lock:
                self.closed += 1

    def read_buffer(self, offset: int, length: int) -> bytes:
        if offset == self.fail_at:
            raise OSError("injected read error")
        with self.lock:
            self.reads.append((offset, length))
        return self.data[offset : offset + length]


def source(size: int) -> bytes:
    data = bytearray(os.urandom(size))
    data[MiB : 3 * MiB] = bytes(2 * MiB)  # all-zero blocks inside read chunks
    data[8 * MiB : 12 * MiB] = bytes(4 * MiB)  # the zero chunk of the plan
    return bytes(data)


def plan(size: int) -> list[Chunk]:
    """Reads of 4 MiB, except one zero chunk the allocation map reported."""
    chunks = [Chunk(off, min(OBJECT, size - off), Kind.READ) for off in range(0, 8 * MiB, OBJECT)]
    chunks.append(Chunk(8 * MiB, 4 * MiB, Kind.ZERO))
    chunks += [Chunk(off, min(OBJECT, size - off), Kind.READ) for off in range(12 * MiB, size, OBJECT)]
    return chunks


def copier(reader: FakeReader, writes: AsyncWrites, *, overwrite: bool, readers: int = 3) -> tuple[_Copier, list[int]]:
    done: list[int] = []
    c = _Copier(reader.open, writes, readers=readers, overwrite=overwrite, progress=done.append)
    return c, done


@pytest.mark.parametrize("overwrite", [False, True], ids=["new-image", "overwrite"])
def test_copier_content_and_zeros(overwrite: bool) -> None:
    size = 24 * MiB + 4096
    data = source(size)
    img = FakeRbdImage(size)
    writes = AsyncWrites(img, "pool/img", depth=8, max_bytes=16 * MiB, timeout=10)
    reader = FakeReader(data)
    c, done = copier(reader, writes, overwrite=overwrite)
    c.run(plan(size))
    writes.wait()
    expected = bytearray(data)
    if not overwrite:  # zeros are not written into a new image: the old bytes stay
        expected[MiB : 3 * MiB] = b"\xee" * (2 * MiB)
        expected[8 * MiB : 12 * MiB] = b"\xee" * (4 * MiB)
    assert img.data == expected
    assert sum(done) == size
    assert (8 * MiB, 4 * MiB) not in reader.reads  # the zero chunk is never read
    assert reader.opened == reader.closed >= 1


def test_copier_reader_failure_stops_and_is_raised() -> None:
    size = 64 * MiB
    img = FakeRbdImage(size)
    writes = AsyncWrites(img, "pool/img", depth=8, max_bytes=16 * MiB, timeout=10)
    reader = FakeReader(source(size), fail_at=8 * MiB)
    c, _ = copier(reader, writes, overwrite=False)
    with pytest.raises(OSError, match="injected read error"):
        c.run(Chunk(off, OBJECT, Kind.READ) for off in range(0, size, OBJECT))
    writes.settle()
    assert reader.opened == reader.closed
    assert not any(t.name.startswith("read-") for t in threading.enumerate())


def test_copier_write_failure_is_raised() -> None:
    size = 64 * MiB
    img = FakeRbdImage(size)
    img.fail_offset = 4 * MiB
    writes = AsyncWrites(img, "pool/img", depth=2, max_bytes=16 * MiB, timeout=10)
    reader = FakeReader(source(size))
    c, _ = copier(reader, writes, overwrite=False)
    with pytest.raises(CephError, match="at 4194304: Input/output error"):
        c.run(Chunk(off, OBJECT, Kind.READ) for off in range(0, size, OBJECT))
        writes.wait()
    writes.settle()


def test_copier_interrupted_feed_stops_readers() -> None:
    size = 64 * MiB
    img = FakeRbdImage(size)
    writes = AsyncWrites(img, "pool/img", depth=8, max_bytes=16 * MiB, timeout=10)
    reader = FakeReader(source(size))
    c, _ = copier(reader, writes, overwrite=False)

    def chunks() -> Iterator[Chunk]:
        for off in range(0, size, OBJECT):
            if off == 32 * MiB:
                raise KeyboardInterrupt  # as a signal raises in the main thread
            yield Chunk(off, OBJECT, Kind.READ)

    with pytest.raises(KeyboardInterrupt):
        c.run(chunks())
    writes.settle()
    assert reader.opened == reader.closed
    assert not any(t.name.startswith("read-") for t in threading.enumerate())
