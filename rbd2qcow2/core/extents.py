"""Pure extent planning: from librbd diff extents to aligned NBD requests.

librbd reports ``(offset, length, exists)`` extents.  ``exists=True`` ranges
hold data at the new snapshot; ``exists=False`` ranges were discarded or zeroed
and must read as zeros in the new point.  The plan works in clusters (the
qcow2 cluster size, which is also the checksum block size):

* a cluster touched by a data extent, or only partly covered by a zero
  extent, is *read* from the snapshot (the read returns its exact content);
* a cluster wholly covered by zero extents and touched by no data extent is
  written as NBD WRITE_ZEROES without reading it.

Read runs are split into requests of at most ``max_read`` bytes, zero runs
into requests of at most ``max_zero`` bytes.  Every request starts on a
cluster boundary and ends on one, or at the end of the image.  Input extents
may be unsorted or overlapping (librbd's diff has had such bugs).
"""

from __future__ import annotations

import bisect
import enum
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

Range = tuple[int, int]  # [start, end)
# The qcow2 cluster of every layer written, and the block of the per-block checksums: one
# size, so that every planned request covers whole checksum blocks.
BLOCK_SIZE = 64 << 10


class Kind(enum.Enum):
    READ = "read"
    ZERO = "zero"


@dataclass(frozen=True)
class Extent:
    """One extent as librbd's diff reports it."""

    offset: int
    length: int
    exists: bool


@dataclass(frozen=True)
class Chunk:
    """One planned request: read-and-write, or write zeros."""

    offset: int
    length: int
    kind: Kind

    @property
    def end(self) -> int:
        return self.offset + self.length


def align_down(value: int, align: int) -> int:
    return value - value % align


def align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def union(ranges: Iterable[Range]) -> list[Range]:
    """Sorted, merged union of half-open ranges (touching ranges merge)."""
    out: list[Range] = []
    for start, end in sorted(r for r in ranges if r[0] < r[1]):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def subtract(ranges: list[Range], holes: list[Range]) -> list[Range]:
    """``ranges`` minus ``holes``; both sorted and merged (see :func:`union`)."""
    out: list[Range] = []
    j = 0
    for start, end in ranges:
        cur = start
        while j < len(holes) and holes[j][1] <= cur:
            j += 1
        k = j
        while k < len(holes) and holes[k][0] < end:
            if holes[k][0] > cur:
                out.append((cur, holes[k][0]))
            cur = max(cur, holes[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def _cluster_ranges(extents: Iterable[Extent], cluster: int) -> tuple[list[Range], list[Range]]:
    data: list[Range] = []
    zero: list[Range] = []
    for ext in extents:
        if ext.length > 0:
            (data if ext.exists else zero).append((ext.offset, ext.offset + ext.length))
    reads = [(align_down(s, cluster), align_up(e, cluster)) for s, e in data]
    zeros: list[Range] = []
    # Zero extents are merged first, so that clusters covered by several of
    # them together count as wholly covered.
    for start, end in union(zero):
        inner = (align_up(start, cluster), align_down(end, cluster))
        outer = (align_down(start, cluster), align_up(end, cluster))
        if inner[0] >= inner[1]:
            reads.append(outer)
            continue
        zeros.append(inner)
        reads += [(outer[0], inner[0]), (inner[1], outer[1])]
    merged_reads = union(reads)
    return merged_reads, subtract(union(zeros), merged_reads)


def _clip(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    return [(max(s, lo), min(e, hi)) for s, e in ranges if min(e, hi) > max(s, lo)]


def _split(ranges: list[Range], kind: Kind, limit: int, cluster: int) -> Iterator[Chunk]:
    step = max(cluster, align_down(limit, cluster))
    for start, end in ranges:
        for off in range(start, end, step):
            yield Chunk(off, min(step, end - off), kind)


def plan(
    extents: Iterable[Extent],
    *,
    start: int,
    end: int,
    cluster: int = BLOCK_SIZE,
    max_read: int = 4 << 20,
    max_zero: int = 1 << 30,
) -> list[Chunk]:
    """Plan the requests for the window ``[start, end)`` of an image.

    ``start`` must be cluster-aligned; ``end`` is cluster-aligned or the image
    end.  Extents are clipped to the window.  The result is sorted by offset.
    """
    if start % cluster:
        raise ValueError(f"window start {start} not aligned to {cluster}")
    reads, zeros = _cluster_ranges(extents, cluster)
    reads, zeros = _clip(reads, start, end), _clip(zeros, start, end)
    chunks = list(_split(reads, Kind.READ, max_read, cluster))
    chunks += _split(zeros, Kind.ZERO, max_zero, cluster)
    chunks.sort(key=lambda c: c.offset)
    return chunks


def windows(size: int, window: int, cluster: int = BLOCK_SIZE) -> Iterator[Range]:
    """Cluster-aligned windows that cover ``[0, size)``."""
    step = max(cluster, align_down(window, cluster))
    for off in range(0, size, step):
        yield off, min(off + step, size)


def sample_ranges(ranges: list[Range], fraction: float, region: int, rng: random.Random) -> list[Range]:
    """A random sample of ``region``-sized, ``region``-aligned pieces of ``ranges``.

    About ``fraction`` of the aligned pieces, at least one when there is any
    and ``fraction > 0``; the result is sorted.  Pieces are counted, not
    listed, so a sample of a huge image costs only the pieces it picks.
    """
    starts, firsts, total = [], [], 0
    for start, end in ranges:
        if start < end:
            starts.append((start, end))
            firsts.append(total)
            total += (align_up(end, region) - align_down(start, region)) // region
    if fraction <= 0 or total == 0:
        return []
    count = min(total, max(1, round(total * fraction)))
    picked = []
    for n in rng.sample(range(total), count):
        i = bisect.bisect_right(firsts, n) - 1
        start, end = starts[i]
        off = align_down(start, region) + (n - firsts[i]) * region
        picked.append((max(off, start), min(off + region, end)))
    return sorted(picked)


def boundary_extent(parent_size: int | None, size: int, block: int = BLOCK_SIZE) -> list[Extent]:
    """The block at the old end of a resized image, re-read so that the layer records its checksum.

    Its content changes with the size (cut off, or followed by zeros now), so
    the new layer must hold it even when the diff does not report it.
    """
    if parent_size is None or parent_size == size:
        return []
    start = align_down(min(parent_size, size), block)
    return [Extent(start, min(block, size - start), True)] if start < size else []
