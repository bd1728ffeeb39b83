"""Which transfers write the layer with O_DIRECT: those whose data comes mostly in large requests."""

from __future__ import annotations

from rbd2qcow2.engine import _wants_direct_io
from rbd2qcow2.extents import Chunk, Kind

KiB, MiB = 1 << 10, 1 << 20


def reads(size: int, count: int, start: int = 0) -> list[Chunk]:
    return [Chunk(start + i * 2 * size, size, Kind.READ) for i in range(count)]


def test_full_backup_of_whole_objects_is_direct() -> None:
    assert _wants_direct_io(reads(4 * MiB, 300))


def test_scattered_small_changes_use_the_page_cache() -> None:
    assert not _wants_direct_io(reads(64 * KiB, 1600))


def test_decided_by_where_most_data_is() -> None:
    big = reads(4 * MiB, 10, start=1 << 40)  # 40 MiB in large requests
    assert _wants_direct_io(big + reads(64 * KiB, 600))  # against 37.5 MiB in small ones
    assert not _wants_direct_io(big + reads(64 * KiB, 700))  # against 43.75 MiB


def test_zeros_and_nothing_do_not_count() -> None:
    assert not _wants_direct_io([])
    assert not _wants_direct_io([Chunk(0, 1 << 30, Kind.ZERO)])
    assert _wants_direct_io([Chunk(0, 1 << 30, Kind.ZERO), *reads(4 * MiB, 1, start=1 << 30)])
