"""sample_ranges and boundary_extent (pure)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from rbd2qcow2.core.extents import Extent, boundary_extent, sample_ranges, union

ranges_st = st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 3_000)), max_size=8).map(
    lambda xs: union((s, s + n) for s, n in xs)
)


@given(ranges_st, st.floats(0.0, 1.0), st.sampled_from([16, 64, 100]), st.integers(0, 2**32))
def test_sample_is_inside_aligned_sorted_unique(
    ranges: list[tuple[int, int]], fraction: float, region: int, seed: int
) -> None:
    sample = sample_ranges(ranges, fraction, region, random.Random(seed))
    assert sample == sorted(set(sample))
    for lo, hi in sample:
        assert lo < hi and hi - lo <= region
        assert lo // region == (hi - 1) // region  # within one aligned region
        assert any(s <= lo and hi <= e for s, e in ranges)
    pieces = sum(len({o // region for o in range(s, e)}) for s, e in ranges)
    if fraction <= 0 or pieces == 0:
        assert sample == []
    else:
        assert len(sample) == min(pieces, max(1, round(pieces * fraction)))


def test_full_fraction_covers_everything() -> None:
    ranges = [(10, 70), (200, 260)]
    sample = sample_ranges(ranges, 1.0, 32, random.Random(1))
    assert sample == [(10, 32), (32, 64), (64, 70), (200, 224), (224, 256), (256, 260)]


def test_boundary_extent() -> None:
    assert boundary_extent(None, 100) == []
    assert boundary_extent(1000, 1000) == []
    assert boundary_extent(100_000, 300_000, 65536) == [Extent(65536, 65536, True)]  # grow: old end block
    assert boundary_extent(300_000, 100_000, 65536) == [Extent(65536, 100_000 - 65536, True)]  # shrink: new end
    assert boundary_extent(131072, 65536 * 4, 65536) == [Extent(131072, 65536, True)]  # aligned grow
    assert boundary_extent(65536 * 4, 131072, 65536) == []  # aligned shrink: nothing partial
