"""Pure tests of prune planning, merge extents and the manifest side of a merge."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from factories import chain
from factories import manifest as made_manifest

from rbd2qcow2.adapters import qemu
from rbd2qcow2.core.errors import ChainDamaged, NotFound
from rbd2qcow2.core.extents import Extent
from rbd2qcow2.core.kinds import MergeMethod
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.core.retention import Decision, Policy
from rbd2qcow2.ops import prune
from rbd2qcow2.ops.merge import merge_extents
from rbd2qcow2.ops.merge import method as merge_method
from rbd2qcow2.ops.prune import Delete, ImagePlan, Merge, PruneOptions
from rbd2qcow2.ops.readback import VERIFY_READ, plan_read_back
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.refs import PointRef, parse_ref, select

IMAGE = ImageSpec("p", "", "i")
MiB = 1 << 20


def pid(day: int, hour: int = 0, suffix: str = "") -> str:
    return f"202601{day:02d}T{hour:02d}0000Z{suffix}"


def manifest(*chains: list[str], pending: mf.PendingMerge | None = None) -> mf.Manifest:
    """Chains of point ids, each base first, appended in order."""
    points = [p for ids in chains for p in chain(*ids, size=8 * MiB, with_sums=True)]
    return made_manifest(*points, image=IMAGE, pending=pending)


A, B, C, D, E, F, G = (pid(d) for d in range(1, 8))
NOW = datetime(2026, 1, 8, tzinfo=UTC)
NOWHERE = Path("/nonexistent")  # plans are pure: the target is never touched


def ids(chains: list[list[mf.Point]]) -> list[list[str]]:
    return [[p.id for p in c] for c in chains]


# -- chains ------------------------------------------------------------------------------


def test_chains_one() -> None:
    assert ids(prune.chains(manifest([A, B, C]))) == [[A, B, C]]


def test_chains_two_after_a_new_full_point() -> None:
    assert ids(prune.chains(manifest([A, B, C], [D, E]))) == [[A, B, C], [D, E]]


def test_chains_single_points_and_empty() -> None:
    assert ids(prune.chains(manifest([A], [B], [C, D]))) == [[A], [B], [C, D]]
    assert prune.chains(manifest()) == []


# -- plan_actions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        (set(), []),
        ({B, C}, [Merge((B, C), D)]),
        ({B}, [Merge((B,), C)]),
        ({A}, [Merge((A,), B)]),  # the base: its child becomes the base
        ({A, B, C, D}, [Merge((A, B, C, D), E)]),
        ({A, C, D}, [Merge((A,), B), Merge((C, D), E)]),
        ({B, D}, [Merge((B,), C), Merge((D,), E)]),
        ({E}, [Delete((E,))]),  # the newest point itself (delete of the latest)
        ({D, E}, [Delete((D, E))]),
        ({A, C, E}, [Merge((A,), B), Merge((C,), D), Delete((E,))]),
    ],
)
def test_plan_actions_one_chain(drop: set[str], expected: list[prune.Action]) -> None:
    assert prune.plan_actions(manifest([A, B, C, D, E]), drop) == expected


@pytest.mark.parametrize(
    ("drop", "expected"),
    [
        ({B, C}, [Delete((B, C))]),  # the tail of an old chain: nothing depends on it
        ({C}, [Delete((C,))]),
        ({A, B, C}, [Delete((A, B, C))]),  # a whole old chain
        ({A}, [Merge((A,), B)]),
        ({A, C}, [Merge((A,), B), Delete((C,))]),
        ({B, E}, [Merge((B,), C), Merge((E,), F)]),
        ({A, B, C, D, E, F}, [Delete((A, B, C)), Merge((D, E, F), G)]),
    ],
)
def test_plan_actions_two_chains(drop: set[str], expected: list[prune.Action]) -> None:
    assert prune.plan_actions(manifest([A, B, C], [D, E, F, G]), drop) == expected


def test_plan_actions_runs_never_cross_chains() -> None:
    """C ends the old chain and D starts the new one: C is deleted, D merged; no run spans both."""
    actions = prune.plan_actions(manifest([A, B, C], [D, E]), {C, D})
    assert actions == [Delete((C,)), Merge((D,), E)]


# -- depth_drops ---------------------------------------------------------------------------


def test_depth_drops_oldest_first() -> None:
    m = manifest([A, B, C, D, E])
    assert prune.depth_drops(m, set(), 3) == {
        A: "chain deeper than --max-depth 3",
        B: "chain deeper than --max-depth 3",
    }
    assert prune.depth_drops(m, set(), 5) == {}
    assert prune.depth_drops(m, set(), 50) == {}


def test_depth_drops_never_the_newest() -> None:
    m = manifest([A, B, C])
    assert set(prune.depth_drops(m, set(), 1)) == {A, B}
    assert set(prune.depth_drops(m, set(), 0)) == {A, B}
    assert prune.depth_drops(manifest([A]), set(), 0) == {}


def test_depth_drops_count_planned_drops() -> None:
    m = manifest([A, B, C, D, E])
    # B and C already go: A D E remain, one too many for depth 2
    assert set(prune.depth_drops(m, {B, C}, 2)) == {A}
    assert prune.depth_drops(m, {B, C}, 3) == {}
    # planned drops are not reported again
    assert set(prune.depth_drops(m, {A}, 2)) == {B, C}


def test_depth_drops_per_chain() -> None:
    m = manifest([A, B, C, D], [E, F])
    assert set(prune.depth_drops(m, set(), 2)) == {A, B}
    assert set(prune.depth_drops(m, set(), 1)) == {A, B, C, E}


# -- stamps and plan_image ---------------------------------------------------------------


def test_stamps_parse_ids_as_utc() -> None:
    m = manifest([pid(1, 5), pid(1, 5, "-2"), pid(2, 23)])
    assert [(s.id, s.time) for s in prune.stamps(m)] == [
        (pid(1, 5), datetime(2026, 1, 1, 5, tzinfo=UTC)),
        (pid(1, 5, "-2"), datetime(2026, 1, 1, 5, tzinfo=UTC)),
        (pid(2, 23), datetime(2026, 1, 2, 23, tzinfo=UTC)),
    ]


def test_plan_image_keep_last() -> None:
    m = manifest([A, B, C, D, E])
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, policy=Policy(keep_last=2), now=NOW))
    assert plan.image == IMAGE
    assert plan.error is None
    assert {p for p, d in plan.decisions.items() if d.keep} == {D, E}
    assert plan.actions == (Merge((A, B, C), D),)


def test_plan_image_daily_two_chains() -> None:
    a1, a2, b1, b2, c1 = pid(1, 1), pid(1, 2), pid(2, 1), pid(2, 2), pid(3, 1)
    m = manifest([a1, a2, b1], [b2, c1])
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, policy=Policy(keep_daily=2), now=NOW))
    assert {p for p, d in plan.decisions.items() if d.keep} == {c1, b2}
    assert plan.decisions[c1].reasons == ("daily #1",)
    assert plan.decisions[b2].reasons == ("daily #2",)
    assert plan.decisions[a1] == Decision(False, ())
    assert plan.actions == (Delete((a1, a2, b1)),)


def test_plan_image_keep_within_uses_now() -> None:
    m = manifest([A, B, C, D, E])  # days 1..5
    within = Policy(keep_within=timedelta(days=2))
    # younger than two days at 01-05 23:00: D (01-04) and E (01-05), not C (01-03)
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, policy=within, now=datetime(2026, 1, 5, 23, tzinfo=UTC)))
    assert {p for p, d in plan.decisions.items() if d.keep} == {D, E}
    assert plan.decisions[D].reasons == ("within",)
    assert plan.actions == (Merge((A, B, C), D),)
    # a day later only E is young enough
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, policy=within, now=datetime(2026, 1, 6, 23, tzinfo=UTC)))
    assert {p for p, d in plan.decisions.items() if d.keep} == {E}
    assert plan.decisions[E].reasons == ("within",)
    assert plan.actions == (Merge((A, B, C, D), E),)


def test_plan_image_max_depth_only() -> None:
    m = manifest([A, B, C, D, E])
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, max_depth=2, now=NOW))
    assert plan.decisions[E] == Decision(True, ("no keep rule given",))
    assert plan.decisions[D] == Decision(True, ("no keep rule given",))
    assert plan.decisions[A] == Decision(False, ("chain deeper than --max-depth 2",))
    assert plan.actions == (Merge((A, B, C), D),)


def test_plan_image_policy_and_max_depth() -> None:
    m = manifest([A, B, C, D, E, F])
    # keep_last=4 keeps C..F; depth 2 drops C and D as well
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, policy=Policy(keep_last=4), max_depth=2, now=NOW))
    assert {p for p, d in plan.decisions.items() if d.keep} == {E, F}
    assert plan.decisions[C].reasons == ("chain deeper than --max-depth 2",)
    assert plan.decisions[A] == Decision(False, ())
    assert plan.actions == (Merge((A, B, C, D), E),)


def test_plan_image_empty_policy_no_depth_keeps_all() -> None:
    m = manifest([A, B], [C])
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, now=NOW))
    assert all(d.keep for d in plan.decisions.values())
    assert set(plan.decisions) == {A, B, C}
    assert plan.actions == ()


def test_plan_image_keeps_the_latest_with_ten_points_in_one_second() -> None:
    """point_id() makes X, X-2 .. X-10 in one second; the manifest's latest (X-10) is the next backup's base."""
    same = [pid(1), *(pid(1, 0, f"-{n}") for n in range(2, 11))]
    m = manifest(same)
    assert m.latest is not None and m.latest.id == pid(1, 0, "-10")
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, policy=Policy(keep_last=1), now=NOW))
    assert plan.decisions[m.latest.id].keep, plan.decisions[m.latest.id]
    assert not any(isinstance(a, Delete) and m.latest.id in a.drop for a in plan.actions), plan.actions


def test_plan_image_keeps_the_latest_after_the_clock_stepped_back() -> None:
    """The manifest's last point is the next backup's base even if its id sorts before an earlier point's."""
    m = manifest([pid(1, 12), pid(2, 0), pid(1, 18)])  # the clock went back between the 2nd and 3rd backup
    assert m.latest is not None
    plan = prune.plan_image(m, PruneOptions(target=NOWHERE, policy=Policy(keep_last=1), now=NOW))
    assert plan.decisions[m.latest.id].keep, plan.decisions[m.latest.id]
    assert not any(isinstance(a, Delete) and m.latest.id in a.drop for a in plan.actions), plan.actions


# -- plan_dict and format_plan ---------------------------------------------------------------


def sample_plan() -> ImagePlan:
    return ImagePlan(
        IMAGE,
        {A: Decision(False, ()), B: Decision(True, ("daily #1", "last #1")), C: Decision(False, ("x",))},
        (Merge((A,), B), Delete((C,))),
    )


def test_plan_dict() -> None:
    assert prune.plan_dict(sample_plan()) == {
        "image": str(IMAGE),
        "error": None,
        "points": {
            A: {"keep": False, "reasons": []},
            B: {"keep": True, "reasons": ["daily #1", "last #1"]},
            C: {"keep": False, "reasons": ["x"]},
        },
        "actions": [
            {"action": "merge", "drop": [A], "into": B},
            {"action": "delete", "drop": [C]},
        ],
    }


def test_format_plan() -> None:
    text = prune.format_plan(sample_plan(), dry_run=True)
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[0].startswith(f"{IMAGE}@{A}  would drop")
    assert lines[1].startswith(f"{IMAGE}@{B}  keep") and lines[1].endswith("daily #1, last #1")
    assert lines[3] == f"{IMAGE}  would merge {A} into {B}"
    assert lines[4] == f"{IMAGE}  would delete {C}"
    real = prune.format_plan(sample_plan(), dry_run=False)
    assert "would" not in real
    assert f"{IMAGE}  merge {A} into {B}" in real.splitlines()


# -- merge_extents -----------------------------------------------------------------------------


def ext(start: int, length: int, depth: int, *, present: bool = True, zero: bool = False) -> qemu.MapExtent:
    return qemu.MapExtent(start * MiB, length * MiB, depth, present, zero)


def out(start: int, length: int, data: bool) -> Extent:
    return Extent(start * MiB, length * MiB, data)


def test_merge_extents_copies_child_and_dropped_layers() -> None:
    view = [
        ext(0, 1, 0),  # child data
        ext(1, 1, 0, zero=True),  # child zeros
        ext(2, 1, 1),  # dropped data
        ext(3, 1, 2, zero=True),  # dropped zeros (depth == dropped)
        ext(4, 1, 3),  # served by the new parent: not copied
        ext(5, 1, 3, zero=True),  # zeros in the new parent: not copied
    ]
    assert merge_extents(view, 2, None) == [out(0, 1, True), out(1, 1, False), out(2, 1, True), out(3, 1, False)]


def test_merge_extents_depth_boundary() -> None:
    view = [ext(0, 1, 1), ext(1, 1, 2)]
    assert merge_extents(view, 1, []) == [out(0, 1, True)]
    assert merge_extents(view, 2, []) == [out(0, 1, True), out(1, 1, True)]


def test_merge_extents_holes_masked_only_over_parent_data() -> None:
    view = [ext(0, 1, 0), ext(1, 4, 3, present=False)]
    base = [
        ext(0, 1, 0),  # under child data: irrelevant
        ext(1, 1, 0, present=False),  # parent hole under the hole: nothing
        ext(2, 1, 0),  # parent data under the hole: must be zeroed
        ext(3, 1, 1, zero=True),  # parent zeros: nothing
        ext(4, 2, 0),  # parent data, half under the hole: clipped
    ]
    assert merge_extents(view, 2, base) == [out(0, 1, True), out(2, 1, False), out(4, 1, False)]


def test_merge_extents_hole_partial_overlap_at_both_ends() -> None:
    view = [ext(2, 2, 1, present=False)]
    base = [ext(0, 3, 0), ext(3, 3, 0)]
    assert merge_extents(view, 1, base) == [out(2, 1, False), out(3, 1, False)]


def test_merge_extents_without_base_holes_stay_holes() -> None:
    view = [ext(0, 1, 0), ext(1, 3, 2, present=False), ext(4, 1, 1, zero=True)]
    assert merge_extents(view, 1, None) == [out(0, 1, True), out(4, 1, False)]


def test_merge_extents_empty() -> None:
    assert merge_extents([], 1, None) == []
    assert merge_extents([ext(0, 4, 1, present=False)], 1, []) == []


# -- Manifest: finish_merge, without, children, pending consistency ----------------------------


def new_sums(child: str) -> mf.Checksums:
    """The merged checksums of ``child``: a manifest accepts no other file name for them."""
    return mf.Checksums(f"{child}.sums", "xxh3-128", 65536, "ef" * 32)


def pending(drop: tuple[str, ...], child: str) -> mf.PendingMerge:
    return mf.PendingMerge(
        child=child, drop=drop, checksums=new_sums(child), stored_bytes=111, data_bytes=222, zero_bytes=333
    )


def test_finish_merge_incremental() -> None:
    m = manifest([A, B, C, D], [E, F], pending=pending((B, C), D))
    done = m.finish_merge()
    assert done.pending is None
    assert [p.id for p in done.points] == [A, D, E, F]
    old, new = m.point(D), done.point(D)
    assert new.parent == A
    assert new.kind == "incremental"
    assert new.checksums == new_sums(D)
    assert (new.stored_bytes, new.data_bytes, new.zero_bytes) == (111, 222, 333)
    unchanged = ("id", "file", "created", "size", "image_id", "snapshot", "flags")
    assert all(getattr(new, f) == getattr(old, f) for f in unchanged)
    assert done.point(A) == m.point(A)
    assert done.points[2:] == m.points[4:]
    assert mf.loads(mf.dumps(done), "here") == done


def test_finish_merge_of_the_base_makes_a_full_point() -> None:
    m = manifest([A, B, C], pending=pending((A, B), C))
    done = m.finish_merge()
    assert [p.id for p in done.points] == [C]
    assert done.point(C).parent is None
    assert done.point(C).kind == "full"
    assert done.point(C).is_full
    assert done.point(C).checksums == new_sums(C)
    assert mf.loads(mf.dumps(done), "here") == done


def test_finish_merge_second_chain() -> None:
    m = manifest([A, B], [C, D, E], pending=pending((C,), D))
    done = m.finish_merge()
    assert [(p.id, p.parent, p.kind) for p in done.points] == [
        (A, None, "full"),
        (B, A, "incremental"),
        (D, None, "full"),
        (E, D, "incremental"),
    ]


def test_finish_merge_without_pending_is_identity() -> None:
    m = manifest([A, B])
    assert m.finish_merge() is m


def test_children_and_without() -> None:
    m = manifest([A, B, C], [D])
    assert [p.id for p in m.children(A)] == [B]
    assert m.children(C) == []
    assert m.children(D) == []
    assert [p.id for p in m.without(C).points] == [A, B, D]
    assert [p.id for p in m.without(D).points] == [A, B, C]
    with pytest.raises(ValueError):
        m.without(B)
    with pytest.raises(ValueError):
        m.without(A)


def test_round_trip_with_pending() -> None:
    m = manifest([A, B, C, D], pending=pending((B, C), D))
    back = mf.loads(mf.dumps(m), "here")
    assert back == m
    assert back.pending == m.pending
    assert isinstance(back.pending, mf.PendingMerge) and back.pending.drop == (B, C)


@pytest.mark.parametrize(
    ("drop", "child"),
    [
        ((B, C), D),
        ((A,), B),
        ((A, B, C), D),
        ((D,), E),
        ((C,), D),
    ],
)
def test_loads_accepts_consecutive_pending(drop: tuple[str, ...], child: str) -> None:
    m = manifest([A, B, C, D, E], pending=pending(drop, child))
    assert mf.loads(mf.dumps(m), "here") == m


@pytest.mark.parametrize(
    ("drop", "child"),
    [
        ((A, C), D),  # a gap inside the run
        ((B,), D),  # the run does not end at the child's parent
        ((C, B), D),  # not oldest first
        ((B, C), C),  # the child is in the run
        ((), B),  # nothing to drop
        ((B,), pid(20)),  # unknown child
        ((pid(20),), B),  # unknown dropped point
        ((D,), E),  # across chains: E is the full point of the next chain
        ((F,), D),  # backwards
    ],
)
def test_loads_rejects_non_consecutive_pending(drop: tuple[str, ...], child: str) -> None:
    m = manifest([A, B, C, D], [E, F], pending=pending(drop, child))
    data = mf.dumps(m)  # dumps does not check: the damage must be caught on load
    with pytest.raises(ChainDamaged):
        mf.loads(data, "here")


def test_loads_rejects_pending_after_finish_merge_points_gone() -> None:
    """A manifest that still names a pending merge whose dropped points are already gone is damaged."""
    m = manifest([A, B, C], pending=pending((B,), C))
    broken = dataclasses.replace(m.finish_merge(), pending=m.pending)
    with pytest.raises(ChainDamaged):
        mf.loads(mf.dumps(broken), "here")


def test_round_trip_commit_method_and_unknown_method() -> None:
    m = manifest([A, B, C], pending=dataclasses.replace(pending((B,), C), method=MergeMethod.COMMIT))
    assert mf.loads(mf.dumps(m), "here") == m
    bad = manifest([A, B, C], pending=dataclasses.replace(pending((B,), C), method="rsync"))  # type: ignore[arg-type]
    with pytest.raises(ChainDamaged, match="method"):
        mf.loads(mf.dumps(bad), "here")


def _changed(m: mf.Manifest, point_id: str, **changes: Any) -> mf.Manifest:
    return dataclasses.replace(
        m, points=tuple(dataclasses.replace(p, **changes) if p.id == point_id else p for p in m.points)
    )


def test_merge_method_commit_only_for_one_size_with_checksums() -> None:
    m = manifest([A, B, C, D])
    assert merge_method(m, (B, C), D) == "commit"
    resized = _changed(m, C, size=4 * MiB)
    assert merge_method(resized, (B, C), D) == "copy"
    assert merge_method(resized, (A,), B) == "commit"  # only the run and its child count
    assert merge_method(_changed(m, B, checksums=None), (B,), C) == "copy"


def test_merge_method_copy_when_the_file_a_commit_writes_has_other_links() -> None:
    m = manifest([A, B, C, D])
    assert merge_method(m, (B, C), D, shared=True) == "copy"


def test_only_the_oldest_dropped_layer_is_written_by_a_commit(tmp_path: Path) -> None:
    from rbd2qcow2.ops.merge import commit_base, linked_elsewhere

    m = manifest([A, B, C, D])
    base = commit_base(tmp_path, m, (B, C))
    assert base == tmp_path / m.point(B).file
    base.write_bytes(b"x")
    assert not linked_elsewhere(base)
    (tmp_path / "rotation").mkdir()
    (tmp_path / "rotation" / base.name).hardlink_to(base)
    assert linked_elsewhere(base)


# -- plan_read_back ------------------------------------------------------------------------------

BS = 65536


def hx(start: int, length: int, depth: int, *, zero: bool = False, offset: int | None = None) -> qemu.HostExtent:
    return qemu.HostExtent(start * BS, length * BS, depth, zero, not zero, offset)


def test_plan_read_back_coalesces_contiguous_host_blocks() -> None:
    extents = [hx(0, 4, 0, offset=10 * BS), hx(4, 2, 1, offset=0), hx(6, 2, 0, zero=True)]
    records = [(0, b"a"), (1, b"b"), (3, b"c"), (4, b"d"), (5, b"e"), (6, b"z")]
    plan = plan_read_back(extents, records, 8 * BS, 2)
    assert plan.host == [  # in file order: layer, then host offset
        (0, 0, [(4, b"d"), (5, b"e")]),
        (1, 10 * BS, [(0, b"a"), (1, b"b")]),  # depth 0 = the top = index 1 of two files
        (1, 13 * BS, [(3, b"c")]),  # block 2 is not recorded: a new read
    ]
    assert plan.zeros == [(6, b"z")]
    assert plan.qemu == []


def test_plan_read_back_follows_the_file_not_the_virtual_order() -> None:
    # A commit appends clusters: virtual blocks 7, 2 and 5 stored one after another.
    extents = [hx(2, 1, 0, offset=21 * BS), hx(5, 1, 0, offset=22 * BS), hx(7, 1, 0, offset=20 * BS)]
    plan = plan_read_back(extents, [(2, b"b"), (5, b"c"), (7, b"a")], 8 * BS, 1)
    assert plan.host == [(0, 20 * BS, [(7, b"a"), (2, b"b"), (5, b"c")])]


def test_plan_read_back_splits_reads_at_the_limit() -> None:
    blocks = 2 * VERIFY_READ // BS + 1
    plan = plan_read_back([hx(0, blocks, 0, offset=0)], [(i, b"x") for i in range(blocks)], blocks * BS, 1)
    assert [(offset, len(run)) for _, offset, run in plan.host] == [
        (0, VERIFY_READ // BS),
        (VERIFY_READ, VERIFY_READ // BS),
        (2 * VERIFY_READ, 1),
    ]


def test_plan_read_back_sends_the_rest_to_qemu() -> None:
    half = qemu.HostExtent(0, BS // 2, 0, False, True, 0)
    rest = qemu.HostExtent(BS // 2, 3 * BS // 2, 0, False, True, BS)
    extents = [half, rest, hx(2, 1, 0), hx(3, 1, 2, offset=0)]  # no host offset; depth beyond the chain
    records = [(0, b"split"), (2, b"compressed"), (3, b"beyond"), (9, b"unmapped")]
    plan = plan_read_back(extents, records, 10 * BS, 2)
    assert plan.host == [] and plan.zeros == []
    assert [i for i, _ in plan.qemu] == [0, 2, 3, 9]


def test_plan_read_back_short_last_block() -> None:
    size = 2 * BS + 512
    plan = plan_read_back([qemu.HostExtent(0, size, 0, False, True, 0)], [(2, b"t")], size, 1)
    assert plan.host == [(0, 2 * BS, [(2, b"t")])]


def test_select_refuses_a_point_a_commit_merge_is_rewriting() -> None:
    def ref(point_id: str) -> PointRef:
        return parse_ref(f"{IMAGE}@{point_id}")

    m = manifest([A, B, C], pending=dataclasses.replace(pending((A, B), C), method=MergeMethod.COMMIT))
    for victim in (A, B):
        with pytest.raises(NotFound, match="unfinished prune"):
            select(m, ref(victim))
    assert select(m, ref(C)).id == C  # the child reads right throughout
    copying = manifest([A, B, C], pending=pending((A, B), C))
    assert select(copying, ref(A)).id == A  # the copy method never writes the dropped files


def test_map_of_one_layer_marks_what_it_leaves_to_its_backing() -> None:
    from rbd2qcow2.adapters.qemu import host_extents

    text = (
        '[{ "start": 0, "length": 65536, "depth": 0, "present": false, "zero": true, "data": false},\n'
        '{ "start": 65536, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true,'
        ' "offset": 327680},\n'
        '{ "start": 131072, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false}]'
    )
    own = host_extents(text, own=True)
    assert [e.depth for e in own] == [-1, 0, 0]
    assert own[1].offset == 327680 and own[2].zero
    assert [e.depth for e in host_extents(text)] == [0, 0, 0]
