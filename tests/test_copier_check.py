"""The copy's block check with plain fakes: data read, zero chunks of the map, the image's short tail."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from rbd2qcow2.core.errors import ChainDamaged
from rbd2qcow2.core.extents import Chunk, Kind
from rbd2qcow2.store.checksums import BLOCK_SIZE, digest
from rbd2qcow2.transfer.copier import BlockCheck, Copier

B = BLOCK_SIZE


def recorded(data: bytes) -> dict[int, bytes]:
    """Digests of every non-zero block, as a backup records them."""
    out = {}
    for i in range(0, len(data), B):
        block = data[i : i + B]
        if block.strip(b"\0"):
            out[i // B] = digest(block)
    return out


def test_equal_blocks_pass_and_a_changed_byte_names_its_block() -> None:
    data = os.urandom(4 * B) + bytes(2 * B) + os.urandom(100)  # a short last block
    check = BlockCheck("p/img@1", recorded(data), len(data))
    check.data(0, data[: 4 * B])
    check.data(4 * B, data[4 * B :])
    bad = bytearray(data[: 4 * B])
    bad[2 * B + 7] ^= 1
    with pytest.raises(ChainDamaged, match=f"p/img@1.*bytes {2 * B}-{3 * B}"):
        check.data(0, bytes(bad))


def test_zeros_of_the_map_are_checked_without_data() -> None:
    data = os.urandom(B) + bytes(3 * B)
    check = BlockCheck("p/img@1", recorded(data), len(data))
    check.zeros(B, 3 * B)  # truly zero: nothing recorded there
    with pytest.raises(ChainDamaged, match=f"bytes 0-{B}"):
        check.zeros(0, 2 * B)  # qemu says zeros where data was backed up


def test_a_truncated_read_fails_the_copy_before_anything_is_written() -> None:
    data = os.urandom(8 * B)
    written: list[int] = []

    class Reader:
        @contextlib.contextmanager
        def open(self) -> Iterator[Reader]:
            yield self

        def read_buffer(self, offset: int, length: int) -> bytes:
            piece = data[offset : offset + length]
            return piece if offset == 0 else bytes(length)  # the second chunk reads zeros: a truncated layer

    class Writes:
        def pwrite(self, buf: bytes | bytearray | memoryview, offset: int) -> None:
            written.append(offset)

        def zero(self, length: int, offset: int) -> None:
            pass

        def wait(self) -> None:
            pass

    copier = Copier(
        Reader().open,
        Writes(),
        readers=1,
        overwrite=False,
        progress=lambda n: None,
        check=BlockCheck("p/img@1", recorded(data), len(data)),
    )
    with pytest.raises(ChainDamaged, match=f"bytes {4 * B}-{8 * B}"):
        copier.run([Chunk(0, 4 * B, Kind.READ), Chunk(4 * B, 4 * B, Kind.READ)])
    assert written == [0]
