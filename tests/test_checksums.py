"""Pure tests of the per-block checksum records and the checksum file."""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from rbd2qcow2.core.errors import ChainDamaged
from rbd2qcow2.store import checksums as cs

B = cs.BLOCK_SIZE
RECORD = struct.Struct("<Q16s")
HEADER = struct.Struct("<8sIIQ")


def parse(records: bytes) -> list[tuple[int, bytes]]:
    assert len(records) % RECORD.size == 0
    return [(int(i), bytes(d)) for i, d in RECORD.iter_unpack(records)]


# -- block_records / zero_records ------------------------------------------


def test_block_records_4mib_with_zero_blocks() -> None:
    rnd = random.Random(1)
    blocks = [bytes(B) if i % 5 == 0 else rnd.randbytes(B) for i in range(64)]
    blocks[7] = bytes(B - 1) + b"\x01"  # zero but for the last byte
    blocks[9] = b"\x01" + bytes(B - 1)  # zero but for the first byte
    data = b"".join(blocks)
    assert len(data) == 4 << 20
    offset = 1000 * B
    records, zeros = cs.block_records(offset, data)
    parsed = parse(records)
    assert [i for i, _ in parsed] == list(range(1000, 1064))
    assert zeros == [i % 5 == 0 for i in range(64)]
    for (_, dig), block in zip(parsed, blocks, strict=True):
        assert dig == xxhash.xxh3_128_digest(block)
    assert parsed[0][1] == cs.ZERO_DIGEST


def test_block_records_short_last_block() -> None:
    data = os.urandom(2 * B) + bytes(100)
    records, zeros = cs.block_records(3 * B, data)
    parsed = parse(records)
    assert [i for i, _ in parsed] == [3, 4, 5]
    assert zeros == [False, False, True]
    assert parsed[2][1] == xxhash.xxh3_128_digest(bytes(100)) == cs.zero_digest(100)
    assert parsed[2][1] != cs.ZERO_DIGEST

    data = bytes(2 * B) + b"abc"
    records, zeros = cs.block_records(0, data)
    assert zeros == [True, True, False]
    assert parse(records)[2] == (2, xxhash.xxh3_128_digest(b"abc"))


def test_block_records_empty() -> None:
    assert cs.block_records(0, b"") == (b"", [])


@given(st.binary(max_size=300), st.integers(0, 1000), st.sampled_from([1, 7, 16, 64]))
def test_block_records_model(data: bytes, first: int, block: int) -> None:
    records, zeros = cs.block_records(first * block, data, block)
    pieces = [data[p : p + block] for p in range(0, len(data), block)]
    assert parse(records) == [(first + i, xxhash.xxh3_128_digest(p)) for i, p in enumerate(pieces)]
    assert zeros == [not any(p) for p in pieces]


def test_zero_records_match_block_records_of_zeros() -> None:
    size = 10 * B + 1234
    # a zero run in the middle, and one ending at the (unaligned) image end
    assert cs.zero_records(2 * B, 3 * B, size) == cs.block_records(2 * B, bytes(3 * B))[0]
    assert cs.zero_records(8 * B, 2 * B + 1234, size) == cs.block_records(8 * B, bytes(2 * B + 1234))[0]
    parsed = parse(cs.zero_records(8 * B, 2 * B + 1234, size))
    assert parsed == [(8, cs.ZERO_DIGEST), (9, cs.ZERO_DIGEST), (10, cs.zero_digest(1234))]
    assert cs.zero_records(0, 0, size) == b""


@given(st.integers(0, 40), st.integers(0, 40), st.integers(1, 16), st.sampled_from([4, 16]))
def test_zero_records_model(first: int, blocks: int, tail: int, block: int) -> None:
    size = (first + blocks) * block + tail
    length = size - first * block
    expected = cs.block_records(first * block, bytes(length), block)[0]
    assert cs.zero_records(first * block, length, size, block) == expected


def test_zero_digest() -> None:
    assert cs.zero_digest(B) == cs.ZERO_DIGEST == xxhash.xxh3_128_digest(bytes(B))
    assert cs.zero_digest(1) == xxhash.xxh3_128_digest(b"\0")
    assert cs.digest(memoryview(b"abc")) == cs.digest(b"abc") == xxhash.xxh3_128_digest(b"abc")
    assert len(cs.ZERO_DIGEST) == 16
    assert cs.ALGORITHM == "xxh3-128"


# -- OrderedWriter / read_records ------------------------------------------


def batches(n: int) -> list[bytes]:
    rnd = random.Random(n)
    out = []
    for seq in range(n):
        data = b"".join(bytes(B) if rnd.random() < 0.3 else rnd.randbytes(B) for _ in range(rnd.randint(0, 4)))
        out.append(cs.block_records(seq * 4 * B, data)[0])
    return out


def test_ordered_writer_out_of_order(tmp_path: Path) -> None:
    recs = batches(40)
    order = list(range(len(recs)))
    random.Random(7).shuffle(order)
    path = tmp_path / "p.sums"
    writer = cs.OrderedWriter(path)
    for seq in order:
        writer.add(seq, recs[seq])
    sha = writer.finish()
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest() == cs.file_sha256(path)
    expected = parse(b"".join(recs))
    got = list(cs.read_records(path))
    assert got == expected
    assert got == sorted(got)
    assert len({i for i, _ in got}) == len(got)
    magic, block, zero, count = HEADER.unpack(path.read_bytes()[: HEADER.size])
    assert (magic, block, zero, count) == (cs.MAGIC, B, 0, len(expected))
    assert path.stat().st_size == HEADER.size + RECORD.size * len(expected)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@given(st.permutations(list(range(12))))
@settings(max_examples=30, deadline=None)
def test_ordered_writer_any_order(tmp_path_factory: pytest.TempPathFactory, order: list[int]) -> None:
    recs = batches(12)
    path = tmp_path_factory.mktemp("sums") / "p.sums"
    writer = cs.OrderedWriter(path)
    for seq in order:
        writer.add(seq, recs[seq])
    writer.finish()
    assert list(cs.read_records(path)) == parse(b"".join(recs))


def test_ordered_writer_writes_as_soon_as_possible(tmp_path: Path) -> None:
    path = tmp_path / "p.sums"
    writer = cs.OrderedWriter(path)
    one = cs.block_records(0, b"x")[0]
    writer.add(1, one)
    writer.add(2, one)
    assert len(writer.pending) == 2  # waiting for batch 0
    writer.add(0, one)
    assert writer.pending == []
    writer.finish()
    assert [i for i, _ in cs.read_records(path)] == [0, 0, 0]


def test_ordered_writer_missing_batch(tmp_path: Path) -> None:
    writer = cs.OrderedWriter(tmp_path / "p.sums")
    writer.add(1, cs.block_records(0, b"x")[0])
    with pytest.raises(RuntimeError, match="missing"):
        writer.finish()
    writer.abort()


def test_ordered_writer_empty(tmp_path: Path) -> None:
    path = tmp_path / "p.sums"
    cs.OrderedWriter(path).finish()
    assert path.read_bytes() == HEADER.pack(cs.MAGIC, B, 0, 0)
    assert list(cs.read_records(path)) == []


def test_ordered_writer_empty_batches(tmp_path: Path) -> None:
    path = tmp_path / "p.sums"
    writer = cs.OrderedWriter(path)
    writer.add(1, cs.zero_records(0, B, B))
    writer.add(0, b"")
    writer.finish()
    assert list(cs.read_records(path)) == [(0, cs.ZERO_DIGEST)]


# -- damaged files ---------------------------------------------------------


@pytest.fixture
def sums_file(tmp_path: Path) -> Path:
    path = tmp_path / "p.sums"
    writer = cs.OrderedWriter(path)
    writer.add(0, cs.block_records(0, os.urandom(3 * B))[0])
    writer.finish()
    return path


@pytest.mark.parametrize(
    "keep", [0, 1, HEADER.size - 1, HEADER.size, HEADER.size + 1, HEADER.size + 2 * RECORD.size - 1]
)
def test_truncated_file(sums_file: Path, keep: int) -> None:
    sums_file.write_bytes(sums_file.read_bytes()[:keep])
    with pytest.raises(ChainDamaged, match="truncated"):
        list(cs.read_records(sums_file))


def test_bad_magic(sums_file: Path) -> None:
    data = bytearray(sums_file.read_bytes())
    data[0] ^= 0xFF
    sums_file.write_bytes(data)
    with pytest.raises(ChainDamaged, match="not a checksum file"):
        list(cs.read_records(sums_file))


def test_other_block_size(sums_file: Path) -> None:
    data = bytearray(sums_file.read_bytes())
    data[8:12] = struct.pack("<I", 4096)
    sums_file.write_bytes(data)
    with pytest.raises(ChainDamaged, match="not a checksum file"):
        list(cs.read_records(sums_file))


def test_count_larger_than_records(sums_file: Path) -> None:
    data = bytearray(sums_file.read_bytes())
    data[16:24] = struct.pack("<Q", 4)
    sums_file.write_bytes(data)
    with pytest.raises(ChainDamaged, match="truncated"):
        list(cs.read_records(sums_file))


def test_damage_names_the_file(sums_file: Path) -> None:
    sums_file.write_bytes(b"R2QSUMS2" + sums_file.read_bytes()[8:])
    with pytest.raises(ChainDamaged) as info:
        list(cs.read_records(sums_file))
    assert str(info.value) == f"chain {sums_file} is damaged: not a checksum file"


# -- stacked layers ----------------------------------------------------------------------------


def _write(path: Path, records: dict[int, bytes]) -> Path:
    cs.write_records(path, iter(sorted(records.items())))
    return path


DIGESTS = st.sampled_from([b"a" * 16, b"b" * 16, cs.ZERO_DIGEST])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.dictionaries(st.integers(0, 40), DIGESTS), max_size=4))
def test_stacked_records_model(tmp_path_factory: pytest.TempPathFactory, layers: list[dict[int, bytes]]) -> None:
    """Stacked records equal a dict updated layer by layer, oldest first."""
    tmp = tmp_path_factory.mktemp("stack")
    paths = [_write(tmp / f"{i}.sums", layer) for i, layer in enumerate(layers)]
    model: dict[int, bytes] = {}
    for layer in layers:
        model.update(layer)
    assert list(cs.stacked_records(paths)) == sorted(model.items())


def test_write_records_counts_and_sha(tmp_path: Path) -> None:
    records = [(0, b"x" * 16), (3, cs.ZERO_DIGEST), (9, b"y" * 16)]
    sha, data, zeros = cs.write_records(tmp_path / "s", iter(records))
    assert (data, zeros) == (2, 1)
    assert sha == cs.file_sha256(tmp_path / "s")
    assert list(cs.read_records(tmp_path / "s")) == records


def test_write_records_failure_removes_the_file(tmp_path: Path) -> None:
    def broken() -> Iterator[tuple[int, bytes]]:
        yield 0, b"x" * 16
        raise OSError("read failed")

    with pytest.raises(OSError):
        cs.write_records(tmp_path / "s", broken())
    assert not (tmp_path / "s").exists()
