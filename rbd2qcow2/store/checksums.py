"""Per-block checksums, recorded while a layer is written.

The virtual disk is cut into blocks of :data:`BLOCK_SIZE` (64 KiB, the qcow2
cluster size, so every planned request covers whole blocks and no block needs
a second read).  Each layer records the blocks it wrote, as
``(block index, XXH3-128 digest)`` sorted by index, in a small binary file
beside the layer.  A block a layer does not record is inherited from its
parent; a block no layer records is zeros.  XXH3-128 is chosen because it is
far faster than the rest of the data path, so hashing never limits a backup,
and 128 bits keep accidental collisions out of reach; this is integrity
against rot and bugs, not a defence against an adversary who can write the chain.

File format: magic ``R2QSUMS1``, u32 block size, u32 zero, u64 count, then
``count`` records of u64 little-endian index and 16 digest bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import xxhash

from ..core.errors import ChainDamaged
from .fsutil import open_regular
from .layout import BLOCK_SIZE as BLOCK_SIZE  # re-exported: the block of every checksum file

ALGORITHM = "xxh3-128"
MAGIC = b"R2QSUMS1"
_HEADER = struct.Struct("<8sIIQ")
_RECORD = struct.Struct("<Q16s")
_ZERO = bytes(BLOCK_SIZE)
ZERO_DIGEST = xxhash.xxh3_128_digest(_ZERO)


def digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def zero_digest(length: int) -> bytes:
    return ZERO_DIGEST if length == BLOCK_SIZE else digest(bytes(length))


def block_records(offset: int, data: bytes, block: int = BLOCK_SIZE) -> tuple[bytes, list[bool]]:
    """Records for ``data`` at ``offset`` (block-aligned) and a zero flag per block."""
    out = bytearray()
    zeros: list[bool] = []
    view = memoryview(data)
    first = offset // block
    for i, pos in enumerate(range(0, len(data), block)):
        piece = view[pos : pos + block]
        is_zero = data.startswith(_ZERO[: len(piece)], pos)
        zeros.append(is_zero)
        out += _RECORD.pack(first + i, zero_digest(len(piece)) if is_zero else digest(piece))
    return bytes(out), zeros


def zero_records(offset: int, length: int, size: int, block: int = BLOCK_SIZE) -> bytes:
    out = bytearray()
    for pos in range(offset, offset + length, block):
        out += _RECORD.pack(pos // block, zero_digest(min(block, size - pos)))
    return bytes(out)


class OrderedWriter:
    """Writes record batches to the checksum file in offset order.

    Batches arrive out of order from the worker threads; each is keyed by its
    sequence number and written once every earlier one has arrived, so the
    buffer never holds more than the in-flight window.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        self._fh: BinaryIO = os.fdopen(fd, "wb")
        self._fh.write(_HEADER.pack(MAGIC, BLOCK_SIZE, 0, 0))
        self.pending: list[tuple[int, bytes]] = []  # batches held until every earlier one has arrived
        self._next = 0
        self._count = 0

    def add(self, seq: int, records: bytes) -> None:
        heapq.heappush(self.pending, (seq, records))
        while self.pending and self.pending[0][0] == self._next:
            _, recs = heapq.heappop(self.pending)
            self._fh.write(recs)
            self._count += len(recs) // _RECORD.size
            self._next += 1

    def finish(self) -> str:
        """Complete the file (count in the header, fsync); returns its SHA-256."""
        if self.pending:
            raise RuntimeError("checksum batches missing")
        self._fh.seek(0)
        self._fh.write(_HEADER.pack(MAGIC, BLOCK_SIZE, 0, self._count))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        return file_sha256(self.path)

    def abort(self) -> None:
        """Close an unfinished file (its caller removes it): a write error of its buffer is moot now."""
        with contextlib.suppress(OSError):
            self._fh.close()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as fh:
        for piece in iter(lambda: fh.read(1 << 20), b""):
            h.update(piece)
    return h.hexdigest()


MISMATCH = "checksum file does not match the manifest"


class SumsMismatch(ChainDamaged):
    """A checksum file that reads, but not as the manifest recorded it."""


def check_sums_file(path: Path, sha256: str) -> None:
    """Check a checksum file against the SHA-256 the manifest recorded.

    Raises :class:`SumsMismatch` (at ``path``) when it differs; a file that
    cannot be read raises the ``OSError`` or :class:`ChainDamaged` (a link,
    a FIFO) of :func:`file_sha256`, for the caller to report as it must.
    """
    if file_sha256(path) != sha256:
        raise SumsMismatch(str(path), MISMATCH)


def unpack_records(records: bytes) -> list[tuple[int, bytes]]:
    return [(int(i), bytes(d)) for i, d in _RECORD.iter_unpack(records)]


def chain_digests(layers: Iterable[tuple[Path | None, int]]) -> dict[int, bytes]:
    """The expected digest per block of a chain's view, from its layers' ``(checksum file, size)``, base first.

    A block's digest is the record of the newest layer that recorded it (a
    layer without a file records none); a layer smaller than its parent cuts
    off its parent's blocks beyond its size.  Blocks not in the result read
    as zeros.
    """
    digests: dict[int, bytes] = {}
    size = 0
    for path, layer_size in layers:
        if layer_size < size:
            limit = -(-layer_size // BLOCK_SIZE)
            for index in [i for i in digests if i >= limit]:
                del digests[index]
        size = layer_size
        if path is not None:
            digests.update(read_records(path))
    return digests


def read_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """The ``(block index, digest)`` records of a checksum file, in order."""
    with os.fdopen(open_regular(path), "rb") as fh:
        header = fh.read(_HEADER.size)
        if len(header) != _HEADER.size:
            raise ChainDamaged(str(path), "checksum file truncated")
        magic, block, _, count = _HEADER.unpack(header)
        if magic != MAGIC or block != BLOCK_SIZE:
            raise ChainDamaged(str(path), "not a checksum file")
        left = count
        while left:
            # Records in bounded pieces: few calls, and memory that does not grow with the file.
            want = min(left, 4096)
            raw = fh.read(want * _RECORD.size)
            if len(raw) != want * _RECORD.size:
                raise ChainDamaged(str(path), "checksum file truncated")
            yield from _RECORD.iter_unpack(raw)
            left -= want


def stacked_records(paths: list[Path]) -> Iterator[tuple[int, bytes]]:
    """The records of layers stacked oldest first, as one layer: per block, the newest record.

    Streams the files (sorted by index) with a heap merge, so memory does not
    grow with the image.
    """

    def ranked(rank: int, path: Path) -> Iterator[tuple[int, int, bytes]]:
        for index, dig in read_records(path):
            yield index, -rank, dig

    last = -1
    for index, _, dig in heapq.merge(*(ranked(rank, p) for rank, p in enumerate(paths))):
        if index != last:
            last = index
            yield index, dig


def write_records(path: Path, records: Iterator[tuple[int, bytes]]) -> tuple[str, int, int]:
    """Write a checksum file from sorted records; returns its SHA-256 and the data and zero block counts."""
    writer = OrderedWriter(path)
    data = zeros = 0
    try:
        batch = bytearray()
        seq = 0
        for index, dig in records:
            if dig == ZERO_DIGEST:
                zeros += 1
            else:
                data += 1
            batch += _RECORD.pack(index, dig)
            if len(batch) >= 1 << 20:
                writer.add(seq, bytes(batch))
                seq += 1
                batch.clear()
        writer.add(seq, bytes(batch))
        return writer.finish(), data, zeros
    except BaseException:
        writer.abort()
        path.unlink(missing_ok=True)
        raise
