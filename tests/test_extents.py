"""Pure tests of the extent planner: :func:`plan`, :func:`union`, :func:`subtract`, :func:`windows`."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbd2qcow2.core.extents import Chunk, Extent, Kind, Range, align_down, align_up, plan, subtract, union, windows

R, Z = Kind.READ, Kind.ZERO
K = 65536  # the default cluster size
MiB = 1 << 20


# -- models ----------------------------------------------------------------


def byte_set(ranges: list[Range]) -> set[int]:
    return {b for s, e in ranges for b in range(s, e)}


def chunk_bytes(chunks: list[Chunk], kind: Kind | None = None) -> set[int]:
    return {b for c in chunks if kind is None or c.kind == kind for b in range(c.offset, c.end)}


def extent_bytes(extents: list[Extent], exists: bool, lo: int, hi: int) -> set[int]:
    return {
        b
        for e in extents
        if e.exists == exists and e.length > 0
        for b in range(max(e.offset, lo), min(e.offset + e.length, hi))
    }


def normalized(ranges: list[Range]) -> bool:
    """Sorted, non-empty, non-touching: the form :func:`union` returns."""
    return all(s < e for s, e in ranges) and all(a[1] < b[0] for a, b in itertools.pairwise(ranges))


# -- strategies ------------------------------------------------------------

PlanArgs = tuple[list[Extent], int, int, int, int, int]  # extents, start, end, cluster, max_read, max_zero
clusters = st.sampled_from([1, 2, 4, 8, 16])


@st.composite
def plan_inputs(draw: st.DrawFn) -> PlanArgs:
    cluster = draw(clusters)
    extents = draw(
        st.lists(
            st.builds(
                Extent,
                offset=st.integers(0, 200),
                length=st.integers(-2, 80),
                exists=st.booleans(),
            ),
            max_size=12,
        )
    )
    start = draw(st.integers(0, 120 // cluster)) * cluster
    if draw(st.booleans()):
        end = start + draw(st.integers(1, 160 // cluster)) * cluster  # an aligned window end
    else:
        end = start + draw(st.integers(1, 160))  # the image end, aligned or not
    max_read = draw(st.integers(cluster, 64))
    max_zero = draw(st.integers(cluster, 128))
    return extents, start, end, cluster, max_read, max_zero


def run_plan(args: PlanArgs) -> list[Chunk]:
    extents, start, end, cluster, max_read, max_zero = args
    return plan(extents, start=start, end=end, cluster=cluster, max_read=max_read, max_zero=max_zero)


# -- plan: properties ------------------------------------------------------


@given(plan_inputs(), st.randoms(use_true_random=False))
@settings(max_examples=300)
def test_plan_properties(args: PlanArgs, rnd: random.Random) -> None:
    """The invariants of every plan, checked against a byte-set model (one test, one generation)."""
    extents, start, end, cluster, max_read, max_zero = args
    chunks = run_plan(args)
    data = extent_bytes(extents, True, start, end)
    discarded = extent_bytes(extents, False, start, end)
    read, zero = chunk_bytes(chunks, R), chunk_bytes(chunks, Z)

    # sorted, non-overlapping, non-empty
    assert all(c.length > 0 for c in chunks), chunks
    for x, y in itertools.pairwise(chunks):
        assert x.end <= y.offset, ("overlap or unsorted", x, y)
    # nothing outside [start, end)
    for c in chunks:
        assert start <= c.offset < c.end <= end, ("outside the window", c)
    # every data byte is read
    assert data <= read, ("data bytes not read", sorted(data - read)[:8])
    # zero chunks lie inside zero extents and touch no data
    assert zero <= discarded, ("zeroed outside zero extents", sorted(zero - discarded)[:8])
    assert not zero & data, ("data bytes zeroed", sorted(zero & data)[:8])
    # every changed byte is written (a skipped discard would keep the parent's data)
    assert data | discarded <= read | zero, ("changed bytes not written", sorted((data | discarded) - read - zero)[:8])
    # nothing is read from a cluster that no extent touches
    touched = {
        b
        for e in extents
        if e.length > 0
        for b in range(align_down(e.offset, cluster), align_up(e.offset + e.length, cluster))
    }
    assert read <= touched, ("untouched cluster read", sorted(read - touched)[:8])
    # cluster alignment
    for c in chunks:
        assert c.offset % cluster == 0, ("unaligned offset", c)
        assert c.end % cluster == 0 or c.end == end, ("unaligned end", c)
    # request size limits
    for c in chunks:
        assert c.length <= (max_read if c.kind is R else max_zero), ("too large", c)
    # unsorted input plans the same
    shuffled = list(extents)
    rnd.shuffle(shuffled)
    assert run_plan((shuffled, start, end, cluster, max_read, max_zero)) == chunks


@given(plan_inputs())
def test_documented_zero_rule(args: PlanArgs) -> None:
    """Module docstring: "a cluster wholly covered by zero extents and touched by no data
    extent is written as NBD WRITE_ZEROES without reading it" (checked for whole clusters)."""
    extents, start, end, cluster, *_ = args
    zero_extents = extent_bytes(extents, False, 0, 1 << 30)
    data_clusters = {
        off
        for e in extents
        if e.exists and e.length > 0
        for off in range(align_down(e.offset, cluster), e.offset + e.length, cluster)
    }
    zero_chunks = chunk_bytes(run_plan(args), Z)
    for off in range(start, align_down(end, cluster), cluster):
        whole = set(range(off, off + cluster))
        if whole <= zero_extents and off not in data_clusters:
            assert whole <= zero_chunks, f"cluster at {off} is wholly zeroed but not planned as ZERO: {run_plan(args)}"


# -- plan: tables ----------------------------------------------------------

E = Extent


@pytest.mark.parametrize(
    ("extents", "end", "expected"),
    [
        pytest.param([], 4 * K, [], id="empty input"),
        pytest.param([E(K, 0, True), E(K, -5, False)], 4 * K, [], id="empty extents ignored"),
        pytest.param([E(10, 100, True)], 4 * K, [Chunk(0, K, R)], id="small data extent reads its cluster"),
        pytest.param([E(K - 1, 2, True)], 4 * K, [Chunk(0, 2 * K, R)], id="data across a cluster boundary"),
        pytest.param([E(10, 100, False)], 4 * K, [Chunk(0, K, R)], id="zero extent inside one cluster is read"),
        pytest.param(
            [E(K, K - 1, False)], 4 * K, [Chunk(K, K, R)], id="zero extent one byte short of a cluster is read"
        ),
        pytest.param([E(0, 2 * K, False)], 4 * K, [Chunk(0, 2 * K, Z)], id="aligned zero extent"),
        pytest.param(
            [E(K // 2, 3 * K, False)],
            4 * K,
            [Chunk(0, K, R), Chunk(K, 2 * K, Z), Chunk(3 * K, K, R)],
            id="zero extent with unaligned edges: edges read, inside zeroed",
        ),
        pytest.param([E(0, K, True), E(K, K, True)], 4 * K, [Chunk(0, 2 * K, R)], id="touching data extents merge"),
        pytest.param(
            [E(0, K, False), E(K, K, False)], 4 * K, [Chunk(0, 2 * K, Z)], id="touching aligned zero extents merge"
        ),
        pytest.param([E(0, 3 * K, True), E(K, K, True)], 4 * K, [Chunk(0, 3 * K, R)], id="overlapping data extents"),
        pytest.param(
            [E(0, 4 * K, False), E(K + 5, 10, True)],
            4 * K,
            [Chunk(0, K, Z), Chunk(K, K, R), Chunk(2 * K, 2 * K, Z)],
            id="data inside a zero extent wins",
        ),
        pytest.param(
            [E(3 * K, K, True), E(0, K, True)], 4 * K, [Chunk(0, K, R), Chunk(3 * K, K, R)], id="unsorted input"
        ),
        pytest.param([E(0, 10 * K, True)], 2 * K, [Chunk(0, 2 * K, R)], id="clipped at the window end"),
    ],
)
def test_plan_table(extents: list[Extent], end: int, expected: list[Chunk]) -> None:
    assert plan(extents, start=0, end=end) == expected


@pytest.mark.parametrize(
    "extents",
    [
        pytest.param([E(0, 30000, False), E(30000, K - 30000, False)], id="touching unaligned zero extents"),
        pytest.param([E(0, 100000, False), E(50000, 150000, False)], id="overlapping zero extents"),
    ],
)
def test_cluster_wholly_covered_by_several_zero_extents_is_zeroed(extents: list[Extent]) -> None:
    """Per the module docstring, coverage counts the union of the zero extents: cluster 0 is
    wholly covered by zero extents and touched by no data extent, so it is WRITE_ZEROES."""
    chunks = plan(extents, start=0, end=4 * K)
    zeroed = chunk_bytes(chunks, Z)
    assert all(b in zeroed for b in range(K)), f"cluster 0 not planned as ZERO: {chunks}"


def test_image_end_not_cluster_aligned() -> None:
    size = 3 * K + 1000
    chunks = plan([E(2 * K + 7, K, True)], start=0, end=size)
    assert chunks == [Chunk(2 * K, K + 1000, R)]


def test_zero_extent_to_unaligned_image_end() -> None:
    size = 3 * K + 1000
    chunks = plan([E(0, size, False)], start=0, end=size)
    assert chunks[0] == Chunk(0, 3 * K, Z)
    # the short last cluster may be read or zeroed, but it must be written, and end at the image end
    assert chunk_bytes(chunks) == set(range(size))
    assert chunks[-1].end == size


def test_window_in_the_middle() -> None:
    extents = [E(0, 10 * K, True), E(12 * K, 4 * K, False)]
    assert plan(extents, start=8 * K, end=14 * K) == [Chunk(8 * K, 2 * K, R), Chunk(12 * K, 2 * K, Z)]


def test_read_and_zero_split_limits() -> None:
    chunks = plan([E(0, 10 * MiB, True), E(16 * MiB, 8 * MiB, False)], start=0, end=32 * MiB, max_zero=3 * MiB)
    assert [(c.offset // MiB, c.length // MiB, c.kind) for c in chunks] == [
        (0, 4, R),
        (4, 4, R),
        (8, 2, R),
        (16, 3, Z),
        (19, 3, Z),
        (22, 2, Z),
    ]


def test_unaligned_limits_round_down_to_clusters() -> None:
    chunks = plan([E(0, 4 * K, True)], start=0, end=4 * K, max_read=K + 1)
    assert chunks == [Chunk(i * K, K, R) for i in range(4)]


def test_unaligned_window_start_is_rejected() -> None:
    with pytest.raises(ValueError, match="not aligned"):
        plan([], start=K + 1, end=2 * K)


def test_default_sizes() -> None:
    chunks = plan([E(0, 8 * MiB, True), E(8 * MiB, 2 << 30, False)], start=0, end=(2 << 30) + 8 * MiB)
    assert all(c.length == 4 * MiB for c in chunks if c.kind is R)
    assert [c.length for c in chunks if c.kind is Z] == [1 << 30, 1 << 30]


# -- union / subtract ------------------------------------------------------

small_ranges = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=8)


@given(small_ranges)
def test_union_matches_set_model(ranges: list[Range]) -> None:
    out = union(ranges)
    assert normalized(out)
    assert byte_set(out) == byte_set(ranges)


@pytest.mark.parametrize(
    ("ranges", "expected"),
    [
        ([], []),
        ([(5, 5), (7, 3)], []),
        ([(0, 10), (10, 20)], [(0, 20)]),
        ([(10, 20), (0, 5)], [(0, 5), (10, 20)]),
        ([(0, 10), (2, 3)], [(0, 10)]),
        ([(0, 10), (5, 15), (14, 30)], [(0, 30)]),
    ],
)
def test_union_table(ranges: list[Range], expected: list[Range]) -> None:
    assert union(ranges) == expected


@given(small_ranges, small_ranges)
def test_subtract_matches_set_model(ranges: list[Range], holes: list[Range]) -> None:
    out = subtract(union(ranges), union(holes))
    assert normalized(out)
    assert byte_set(out) == byte_set(ranges) - byte_set(holes)


@pytest.mark.parametrize(
    ("ranges", "holes", "expected"),
    [
        ([], [(0, 10)], []),
        ([(0, 10)], [], [(0, 10)]),
        ([(0, 10)], [(0, 10)], []),
        ([(0, 10)], [(3, 5)], [(0, 3), (5, 10)]),
        ([(0, 10), (20, 30)], [(5, 25)], [(0, 5), (25, 30)]),
        ([(0, 10), (20, 30)], [(-5, 2), (8, 12), (28, 40)], [(2, 8), (20, 28)]),
        ([(5, 10)], [(0, 5), (10, 15)], [(5, 10)]),
    ],
)
def test_subtract_table(ranges: list[Range], holes: list[Range], expected: list[Range]) -> None:
    assert subtract(ranges, holes) == expected


# -- windows ---------------------------------------------------------------


@given(st.integers(0, 5000), st.integers(1, 700), st.sampled_from([1, 16, 64, 100]))
@settings(max_examples=200)
def test_windows_cover_the_image(size: int, window: int, cluster: int) -> None:
    out = list(windows(size, window, cluster))
    assert byte_set(out) == set(range(size))
    assert all(a[1] == b[0] for a, b in itertools.pairwise(out))
    step = max(cluster, align_down(window, cluster))
    for s, e in out:
        assert s % cluster == 0
        assert 0 < e - s <= step
        assert e % cluster == 0 or e == size


@pytest.mark.parametrize(
    ("size", "window", "expected"),
    [
        (0, 1 << 30, []),
        (3 * K, 1 << 30, [(0, 3 * K)]),
        (5 * K + 3, 2 * K, [(0, 2 * K), (2 * K, 4 * K), (4 * K, 5 * K + 3)]),
        (2 * K, 10, [(0, K), (K, 2 * K)]),
        (3 * K, K + 5, [(0, K), (K, 2 * K), (2 * K, 3 * K)]),
    ],
)
def test_windows_table(size: int, window: int, expected: list[Range]) -> None:
    assert list(windows(size, window)) == expected


def test_windows_feed_plan() -> None:
    """Planning window by window gives the same requests as one big window (for aligned windows)."""
    size = 10 * K + 123
    extents = [E(0, 3 * K + 1, True), E(4 * K, 5 * K, False), E(9 * K + 9, K + 114, True)]
    whole = plan(extents, start=0, end=size, max_read=2 * K, max_zero=2 * K)
    pieces = [c for s, e in windows(size, 2 * K) for c in plan(extents, start=s, end=e, max_read=2 * K, max_zero=2 * K)]
    assert chunk_bytes(pieces, R) == chunk_bytes(whole, R)
    assert chunk_bytes(pieces, Z) == chunk_bytes(whole, Z)
