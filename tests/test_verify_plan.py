"""Pure tests of the deep check's plan (qemu's map to block reads) and of the digest checker."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbd2qcow2.adapters.qemu import HostExtent, split_map_output
from rbd2qcow2.core.errors import QemuError
from rbd2qcow2.store.checksums import BLOCK_SIZE, ZERO_DIGEST, digest, zero_digest
from rbd2qcow2.transfer.deepcheck import Checker, HostRun, Planner, ReadPlan, plan_reads

B = BLOCK_SIZE
MiB = 1 << 20


def data(start: int, length: int, depth: int, offset: int | None) -> HostExtent:
    return HostExtent(start, length, depth, zero=False, data=True, offset=offset)


def zero(start: int, length: int, depth: int = 0) -> HostExtent:
    return HostExtent(start, length, depth, zero=True, data=False, offset=None)


# -- the plan: examples --------------------------------------------------------------------


def test_data_zeros_and_compressed() -> None:
    extents = [
        zero(0, B, depth=1),  # a zero cluster of the middle layer
        data(B, 15 * B, depth=2, offset=393216),  # the base's data
        data(16 * B, 2 * B, depth=1, offset=327680),
        data(18 * B, B, depth=0, offset=None),  # compressed: qemu names no host offset
        zero(19 * B, 13 * B, depth=2),  # allocated nowhere
    ]
    assert plan_reads(extents, 32 * B, 3) == ReadPlan(
        host=[HostRun(0, 393216, 1, 15 * B), HostRun(1, 327680, 16, 2 * B)],
        zeros=[(0, 1), (19, 32)],
        qemu=[(18, 19)],
    )


def test_adjacent_ranges_merge() -> None:
    extents = [zero(0, B), zero(B, B, depth=1), data(2 * B, B, 0, None), data(3 * B, B, 1, None)]
    assert plan_reads(extents, 4 * B, 2) == ReadPlan(zeros=[(0, 2)], qemu=[(2, 4)])


def test_short_last_block() -> None:
    size = 3 * B + 12345
    plan = plan_reads([data(0, size, depth=0, offset=B)], size, 1)
    assert plan == ReadPlan(host=[HostRun(0, B, 0, size)])


def test_block_split_between_extents_goes_to_qemu() -> None:
    """A layer shorter than its child, by a size that is not a whole number of blocks."""
    end = 2 * B + 4096
    extents = [data(0, end, depth=1, offset=B), zero(end, 4 * B - end, depth=1)]
    assert plan_reads(extents, 4 * B, 2) == ReadPlan(host=[HostRun(0, B, 0, 2 * B)], zeros=[(3, 4)], qemu=[(2, 3)])


def test_unsorted_extents() -> None:
    extents = [zero(2 * B, 2 * B), data(0, 2 * B, 0, 0)]
    assert plan_reads(extents, 4 * B, 1) == ReadPlan(host=[HostRun(0, 0, 0, 2 * B)], zeros=[(2, 4)])


@pytest.mark.parametrize(
    ("extents", "qemu"),
    [
        ([], [(0, 4)]),  # an empty map
        ([data(0, B, 0, 0)], [(1, 4)]),  # the map stops early
        ([data(0, B, 0, 0), data(2 * B, 2 * B, 0, B)], [(1, 2)]),  # a gap
        ([data(0, 4 * B, depth=3, offset=0)], [(0, 4)]),  # a layer the chain does not have
        ([HostExtent(0, 4 * B, 0, zero=False, data=False, offset=None)], [(0, 4)]),  # neither data nor zeros
    ],
)
def test_whatever_the_map_does_not_place_goes_to_qemu(extents: list[HostExtent], qemu: list[tuple[int, int]]) -> None:
    assert plan_reads(extents, 4 * B, 2).qemu == qemu


def test_extents_past_the_end_are_cut() -> None:
    plan = plan_reads([data(0, 8 * B, 0, 0), zero(8 * B, 8 * B)], 2 * B + 1, 1)
    assert plan == ReadPlan(host=[HostRun(0, 0, 0, 2 * B + 1)])


# -- the plan: properties ------------------------------------------------------------------


@st.composite
def maps(draw: st.DrawFn) -> tuple[list[HostExtent], int, int]:
    """A map that covers an image with extents of every kind, at any byte boundary."""
    layers = draw(st.integers(1, 4))
    size = draw(st.integers(1, 40 * B))
    cuts = sorted(set(draw(st.lists(st.integers(1, size - 1), max_size=12)) if size > 1 else []))
    bounds = [0, *cuts, size]
    extents = []
    for start, end in itertools.pairwise(bounds):
        kind = draw(st.sampled_from(["data", "compressed", "zero", "unknown"]))
        depth = draw(st.integers(0, layers - 1))
        offset = draw(st.integers(0, 1 << 30))
        extents.append(
            HostExtent(start, end - start, depth, kind == "zero", kind in ("data", "compressed"), offset)
            if kind != "compressed"
            else data(start, end - start, depth, None)
        )
    return extents, size, layers


@settings(max_examples=300, deadline=None)
@given(maps())
def test_every_block_is_planned_once_and_where_qemu_says(case: tuple[list[HostExtent], int, int]) -> None:
    extents, size, layers = case
    plan = plan_reads(extents, size, layers)
    blocks = -(-size // B)

    def holder(index: int) -> HostExtent | None:
        """The one extent that holds the whole block, if one does."""
        lo, hi = index * B, min((index + 1) * B, size)
        return next((e for e in extents if e.start <= lo and hi <= e.start + e.length), None)

    seen: list[int] = []
    for run in plan.host:
        assert run.length > 0 and (run.length % B == 0 or run.block * B + run.length == size)
        for i in range(run.block, run.block + -(-run.length // B)):
            e = holder(i)
            assert e is not None and e.data and not e.zero and e.offset is not None
            assert run.layer == layers - 1 - e.depth
            assert run.offset + (i - run.block) * B == e.offset + i * B - e.start
            seen.append(i)
    for first, end in plan.zeros:
        for i in range(first, end):
            e = holder(i)
            assert e is not None and e.zero
            seen.append(i)
    for first, end in plan.qemu:
        for i in range(first, end):
            e = holder(i)
            assert e is None or (not e.zero and e.offset is None) or not e.data
            seen.append(i)
    assert sorted(seen) == list(range(blocks))
    for ranges in (plan.zeros, plan.qemu):
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))  # sorted, merged


# -- the checker ---------------------------------------------------------------------------


def test_checker_views_and_zeros() -> None:
    size = 6 * B + 100
    blocks = [bytes([i + 1]) * B for i in range(6)] + [b"\0" * 100]
    digests = {i: digest(b) for i, b in enumerate(blocks[:4])}
    digests[5] = ZERO_DIGEST  # recorded zeros
    checker = Checker(digests, size)
    checker.check_view(0, memoryview(b"".join(blocks[:4])))
    assert checker.bad == set()
    damaged = bytearray(b"".join(blocks[:4]))
    damaged[2 * B + 7] ^= 1
    checker.check_view(0, memoryview(damaged))
    assert checker.bad == {2}
    checker.zeros(4, 7)  # 4 unrecorded, 5 recorded as zeros, 6 the short last block
    assert checker.bad == {2}
    checker.zeros(0, 2)  # recorded data read as zeros
    assert checker.bad == {0, 1, 2}


def test_checker_short_last_block() -> None:
    size = B + 100
    checker = Checker({}, size)
    checker.check_view(1, memoryview(bytes(100)))
    assert checker.bad == set()
    assert checker.expected(1) == zero_digest(100) != ZERO_DIGEST
    checker.check_view(1, memoryview(b"\1" + bytes(99)))
    assert checker.bad == {1}


def test_checker_blocks_out_of_order() -> None:
    """Digests of scattered blocks at once, as the hashing helper returns them."""
    size = 9 * B + 100
    digests = {i: digest(bytes([i]) * B) for i in (1, 4, 7)}
    checker = Checker(digests, size)
    blocks = [7, 1, 3, 9, 4]  # 3: never recorded (zeros); 9: the short last block, zeros
    actual = [digests[7], digests[1], ZERO_DIGEST, zero_digest(100), digests[4]]
    checker.check_blocks(blocks, b"".join(actual))
    assert checker.bad == set()
    actual[1], actual[3] = ZERO_DIGEST, ZERO_DIGEST  # block 1 reads as zeros; block 9 as a whole block of zeros
    checker.check_blocks(blocks, b"".join(actual))
    assert checker.bad == {1, 9}


def test_checker_records_from_the_pipeline() -> None:
    from rbd2qcow2.store.checksums import block_records

    content = b"\7" * B + bytes(B)
    checker = Checker({0: digest(b"\7" * B)}, 2 * B)
    checker.add(0, block_records(0, content)[0])
    assert checker.bad == set()
    checker.add(1, block_records(0, bytes(2 * B))[0])
    assert checker.bad == {0}


# -- the map as qemu prints it, and the plan as the map comes ---------------------------------


MAP_TEXT = (
    b'[{ "start": 0, "length": 65536, "depth": 1, "present": true, "zero": true, "data": false},\n'
    b'{ "start": 65536, "length": 983040, "depth": 2, "present": true, "zero": false, "data": true,'
    b' "offset": 393216},\n'
    b'{ "start": 1048576, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true},\n'
    b'{ "start": 1114112, "length": 983040, "depth": 2, "present": false, "zero": true, "data": false}]\n'
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(MAP_TEXT)), max_size=6))
def test_map_output_in_pieces(cuts: list[int]) -> None:
    whole, rest = split_map_output(MAP_TEXT)
    assert rest.strip() == b"]"
    assert whole == [
        zero(0, B, depth=1),
        data(B, 15 * B, depth=2, offset=393216),
        data(16 * B, B, depth=0, offset=None),
        zero(17 * B, 15 * B, depth=2),
    ]
    got: list[HostExtent] = []
    rest = b""
    for start, end in itertools.pairwise([0, *sorted(cuts), len(MAP_TEXT)]):
        extents, rest = split_map_output(rest + MAP_TEXT[start:end])
        got += extents
    assert got == whole and rest.strip() == b"]"


def test_unexpected_map_output() -> None:
    with pytest.raises(QemuError):
        split_map_output(b'[{ "start": 0, "length": 65536}]')


@settings(max_examples=200, deadline=None)
@given(maps(), st.lists(st.integers(0, 12), max_size=4))
def test_the_plan_fed_in_batches_is_the_same(case: tuple[list[HostExtent], int, int], cuts: list[int]) -> None:
    extents, size, layers = case
    planner = Planner(size, layers)
    runs = []
    for start, end in itertools.pairwise([0, *sorted(cuts), len(extents)]):
        runs += planner.feed(extents[start:end])
    plan = planner.finish()
    assert plan == plan_reads(extents, size, layers)
    assert runs == plan.host
