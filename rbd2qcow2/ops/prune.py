"""Retention: ``prune`` by policy, ``delete`` of one point, ``--max-depth``.

Per image, under the chain lock:

1. finish any merge an interrupted run left (the manifest's ``pending``);
2. decide (pure: :mod:`rbd2qcow2.core.retention`), then plan the actions (pure:
   :func:`plan_actions`): each run of consecutive dropped points is merged
   into its child; a run at the end of an old chain is simply deleted;
3. per merge (:mod:`rbd2qcow2.ops.merge`), method ``copy``: build and verify
   the new layer beside the old one, write the manifest with the merge
   pending, rename the new files over the child's; method ``commit`` (one
   size throughout, and the oldest dropped layer's file has no other hard
   link: the commit writes it): write the merged checksums and the manifest with the
   merge pending, let qemu commit the upper layers into the oldest dropped
   layer's file, check and verify it, rename it over the child's.  Then
   write the manifest without the dropped points and delete their files.

Every step is idempotent and a crash at any point is finished forward by
the next run that takes the lock (backup or prune).  The files a merge
builds are named in the manifest's journal (``writing``) before they are
created, and the files of dropped points when the manifest drops them, so
the next run removes what a kill left and nothing else.  Pruning never
removes an RBD snapshot, and the newest point (the base of the next backup)
is always kept.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..adapters import qemu
from ..core import names
from ..core.errors import (
    FULL_ERRNOS,
    STORAGE_ERRNOS,
    ChainDamaged,
    Error,
    Locked,
    NotFound,
    StorageError,
    TargetFull,
    UsageError,
    storage_error,
)
from ..core.faults import crashpoint
from ..core.retention import Decision, Policy, Stamp, decide
from ..store import manifest as mf
from ..store.activity import point_latest, record
from ..store.chain import remove_orphan_files
from ..store.fsutil import chain_lock, fsync_dir, keep_reserve, release_reserve
from ..store.qcow2 import read_header
from ..store.target import iter_chains, open_target
from . import merge

logger = logging.getLogger(__name__)
RECOVER_PARALLEL = 4  # connections of a merge finished by copy during recovery (PruneOptions' default)


@dataclass(frozen=True)
class Merge:
    drop: tuple[str, ...]
    child: str


@dataclass(frozen=True)
class Delete:
    drop: tuple[str, ...]


Action = Merge | Delete


@dataclass(frozen=True)
class PruneOptions:
    target: Path
    policy: Policy = dataclasses.field(default_factory=Policy)
    max_depth: int | None = None
    dry_run: bool = False
    parallel: int = 4
    progress: bool = False
    wait: bool = False
    now: datetime | None = None


@dataclass(frozen=True)
class ImagePlan:
    image: names.ImageSpec
    decisions: dict[str, Decision]
    actions: tuple[Action, ...]
    error: Error | None = None


def chains(m: mf.Manifest) -> list[list[mf.Point]]:
    """The linear chains of a manifest, each base first, oldest chain first."""
    out = []
    for p in m.points:
        if p.parent is None:
            chain = [p]
            while kids := m.children(chain[-1].id):
                chain.append(kids[0])
            out.append(chain)
    return out


def depth_drops(m: mf.Manifest, drop: set[str], max_depth: int) -> dict[str, str]:
    """Oldest points to drop so that no chain is deeper than ``max_depth`` (pure)."""
    newest = m.latest.id if m.latest else None
    extra: dict[str, str] = {}
    for chain in chains(m):
        kept = [p for p in chain if p.id not in drop]
        for p in kept[: max(0, len(kept) - max_depth)]:
            if p.id != newest:
                extra[p.id] = f"chain deeper than --max-depth {max_depth}"
    return extra


def plan_actions(m: mf.Manifest, drop: set[str]) -> list[Action]:
    """Runs of dropped points: merged into their child, or deleted at a chain's end (pure)."""
    actions: list[Action] = []
    for chain in chains(m):
        run: list[str] = []
        for p in chain:
            if p.id in drop:
                run.append(p.id)
            elif run:
                actions.append(Merge(tuple(run), p.id))
                run = []
        if run:
            actions.append(Delete(tuple(run)))
    return actions


def stamps(m: mf.Manifest) -> list[Stamp]:
    return [
        Stamp(p.id, datetime.strptime(p.id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC), seq)
        for seq, p in enumerate(m.points)
    ]


def plan_image(m: mf.Manifest, opts: PruneOptions) -> ImagePlan:
    now = opts.now or datetime.now(UTC)
    decisions = decide(stamps(m), opts.policy, now) if not opts.policy.empty else {}
    if opts.policy.empty:
        decisions = {p.id: Decision(True, ("no keep rule given",)) for p in m.points}
    drop = {pid for pid, d in decisions.items() if not d.keep}
    if opts.max_depth is not None:
        for pid, why in depth_drops(m, drop, opts.max_depth).items():
            decisions[pid] = Decision(False, (why,))
            drop.add(pid)
    return ImagePlan(m.image, decisions, tuple(plan_actions(m, drop)))


def plan_dict(plan: ImagePlan) -> dict[str, Any]:
    """A plan for ``--json``."""
    actions: list[dict[str, Any]] = []
    for a in plan.actions:
        entry: dict[str, Any] = {"action": "delete" if isinstance(a, Delete) else "merge", "drop": list(a.drop)}
        if isinstance(a, Merge):
            entry["into"] = a.child
        actions.append(entry)
    return {
        "image": str(plan.image),
        "error": None if plan.error is None else str(plan.error),
        "points": {pid: {"keep": d.keep, "reasons": list(d.reasons)} for pid, d in sorted(plan.decisions.items())},
        "actions": actions,
    }


def format_plan(plan: ImagePlan, *, dry_run: bool) -> str:
    """One line per point (keep or drop, and why), then one per action."""
    verb = "would " if dry_run else ""
    lines = []
    for pid, d in sorted(plan.decisions.items()):
        how = "keep" if d.keep else f"{verb}drop"
        lines.append(f"{plan.image}@{pid}  {how:<10}  {', '.join(d.reasons)}")
    for a in plan.actions:
        into = f" into {a.child}" if isinstance(a, Merge) else ""
        kind = "merge" if isinstance(a, Merge) else "delete"
        lines.append(f"{plan.image}  {verb}{kind} {', '.join(a.drop)}{into}")
    if plan.error is not None:
        lines.append(f"{plan.image}  error: {plan.error}")
    return "\n".join(lines)


# -- execution ----------------------------------------------------------------------


def recover(
    directory: Path, m: mf.Manifest, daemon: qemu.StorageDaemon | None = None, *, target: Path | None = None
) -> mf.Manifest:
    """Finish a merge that an interrupted run left pending (idempotent).

    ``target``: the target's root, whose reserve may be released to commit.
    """
    pm = m.pending
    if pm is None:
        return m
    logger.warning("%s: finishing the interrupted merge of %s into %s", m.image, ", ".join(pm.drop), pm.child)
    shared = merge.pending_commit_is_shared(directory, m, pm)
    if (pm.method == merge.COMMIT or shared) and daemon is None:
        with qemu.storage_daemon() as own:
            return _resume(directory, m, pm, own, shared=shared, target=target)
    return _resume(directory, m, pm, daemon, shared=shared, target=target)


def _resume(
    directory: Path,
    m: mf.Manifest,
    pm: mf.PendingMerge,
    daemon: qemu.StorageDaemon | None,
    *,
    shared: bool,
    target: Path | None,
) -> mf.Manifest:
    if shared:
        assert daemon is not None
        m, pm = _commit_as_copy(directory, m, pm, daemon)
    return _finish(directory, m, pm, daemon, progress=False, resumed=True, target=target)


def _commit_as_copy(
    directory: Path, m: mf.Manifest, pm: mf.PendingMerge, daemon: qemu.StorageDaemon
) -> tuple[mf.Manifest, mf.PendingMerge]:
    """A pending commit whose base got other hard links: journaled again as a copy merge of the same points.

    The base is not written (nor cut back): the child's view, which the copy
    reads, never depended on what the commit did to it.  Killed before the
    new journal is written, the next run comes here again.
    """
    base = merge.commit_base(directory, m, pm.drop)
    logger.warning("%s: %s has other hard links; the merge copies instead of writing it", m.image, base.name)
    copy = merge.build(directory, m, pm.drop, pm.child, daemon, parallel=RECOVER_PARALLEL, progress=False)
    journaled = dataclasses.replace(m, pending=copy)
    mf.save(directory, journaled)
    return journaled, copy


def _finish(
    directory: Path,
    m: mf.Manifest,
    pm: mf.PendingMerge,
    daemon: qemu.StorageDaemon | None,
    *,
    progress: bool,
    resumed: bool = False,
    target: Path | None = None,
) -> mf.Manifest:
    """Put the merged files in place, commit, delete the dropped files (each step idempotent)."""
    child = m.point(pm.child)
    layer, sums = merge.merge_files(directory, child)
    if not merge.merged_sums_ready(directory, m, pm):
        return _give_up(directory, m, pm)
    renames = [(sums, directory / names.sums_file(child.id))]
    if pm.method == merge.COMMIT:
        assert daemon is not None
        merge.commit_in_place(directory, m, pm, daemon, progress=progress, resumed=resumed)
    else:
        renames.insert(0, (layer, directory / child.file))
    for tmp, final in renames:
        if tmp.exists():
            os.replace(tmp, final)
    fsync_dir(directory)
    crashpoint("prune-after-rename")
    if pm.method == merge.COMMIT:
        pm = dataclasses.replace(pm, stored_bytes=(directory / child.file).stat().st_blocks * 512)
    built = {path.name for path in merge.merge_files(directory, child)}
    dropped = [m.point(d) for d in pm.drop]
    writing = (*(n for n in m.writing if n not in built), *_files(dropped))
    done = dataclasses.replace(m, pending=pm, writing=writing).finish_merge()
    _save_dropping(directory, done, target)
    crashpoint("prune-after-commit")
    return _unlink_points(directory, done, dropped)


def _give_up(directory: Path, m: mf.Manifest, pm: mf.PendingMerge) -> mf.Manifest:
    """Drop a copy merge whose checksums were lost before its layer was renamed: the chain stays as it was."""
    child = m.point(pm.child)
    first = m.point(pm.drop[0])
    parent = m.point(first.parent).file if first.parent else None
    if read_header(directory / child.file).backing_file == parent:  # the merged layer is in place already
        raise ChainDamaged(str(directory), f"the merged checksums of {child.id} are missing or damaged")
    logger.warning("%s: the merge into %s lost its checksums; given up, the chain stays as it was", m.image, child.id)
    undone = dataclasses.replace(m, pending=None)
    mf.save(directory, undone)
    for path in merge.merge_files(directory, child):
        if path.is_file() or path.is_symlink():
            path.unlink()
    fsync_dir(directory)
    return undone


def _save_dropping(directory: Path, m: mf.Manifest, target: Path | None) -> None:
    """Save a manifest that drops points; on a full file system, in the room of the target's reserve.

    The dropped points' files go only once the manifest no longer names
    them, so freeing space starts with writing the manifest.
    """
    try:
        mf.save(directory, m)
    except TargetFull:
        if target is None or not release_reserve(target):
            raise
        mf.save(directory, m)


def _files(points: Sequence[mf.Point]) -> tuple[str, ...]:
    return tuple(name for p in points for name in (p.file, names.sums_file(p.id)))


def _unlink_points(directory: Path, m: mf.Manifest, points: Sequence[mf.Point]) -> mf.Manifest:
    """Delete the files of points ``m`` no longer has (its journal names them), then clear the journal."""
    gone = _files(points)
    for name in gone:
        (directory / name).unlink(missing_ok=True)
    fsync_dir(directory)
    m = dataclasses.replace(m, writing=tuple(n for n in m.writing if n not in gone))
    mf.save(directory, m)
    return m


def apply(directory: Path, m: mf.Manifest, actions: Sequence[Action], opts: PruneOptions) -> mf.Manifest:
    """Run the actions, deletions first: they need no room, and free what the merges need."""
    try:
        with qemu.storage_daemon() as daemon:
            for action in sorted(actions, key=lambda a: isinstance(a, Merge)):
                if isinstance(action, Delete):
                    m = _delete(directory, m, action, opts.target)
                    record(directory, f"prune deleted {' '.join(action.drop)}")
                else:
                    m = _merge(directory, m, action, daemon, opts)
                    record(directory, f"prune merged {' '.join(action.drop)} into {action.child}")
        point_latest(directory, m.latest.file if m.latest else None)
    finally:
        keep_reserve(opts.target)
    return m


def _delete(directory: Path, m: mf.Manifest, action: Delete, target: Path) -> mf.Manifest:
    points = [m.point(d) for d in action.drop]
    for p in reversed(points):
        m = m.without(p.id)
    # The journal names the dropped files: a kill before they are gone leaves them to the next run.
    m = dataclasses.replace(m, writing=(*m.writing, *_files(points)))
    _save_dropping(directory, m, target)
    m = _unlink_points(directory, m, points)
    logger.info("%s: deleted %s", m.image, ", ".join(action.drop))
    return m


def _merge(
    directory: Path, m: mf.Manifest, action: Merge, daemon: qemu.StorageDaemon, opts: PruneOptions
) -> mf.Manifest:
    # The journal names the merge's files before they are created: a kill before the entry
    # below is recorded leaves them to the next run's clean-up.
    built = tuple(path.name for path in merge.merge_files(directory, m.point(action.child)))
    m = dataclasses.replace(m, writing=(*m.writing, *(n for n in built if n not in m.writing)))
    mf.save(directory, m)
    shared = merge.linked_elsewhere(merge.commit_base(directory, m, action.drop))
    if merge.method(m, action.drop, action.child, shared=shared) == merge.COMMIT:
        pending = merge.journal_commit(directory, m, action.drop, action.child)
    else:
        pending = merge.build(
            directory, m, action.drop, action.child, daemon, parallel=opts.parallel, progress=opts.progress
        )
        crashpoint("prune-after-build")
    journaled = dataclasses.replace(m, pending=pending)
    try:
        mf.save(directory, journaled)
    except StorageError:  # the manifest stayed as it was: the merge's files are nobody's
        for path in merge.merge_files(directory, m.point(action.child)):
            path.unlink(missing_ok=True)
        raise
    crashpoint("prune-after-journal")
    try:
        done = _finish(directory, journaled, pending, daemon, progress=opts.progress, target=opts.target)
    except Locked:
        # The commit did not start: nothing was written, the journal is undone.
        mf.save(directory, m)
        merge.merge_files(directory, m.point(action.child))[1].unlink(missing_ok=True)
        raise
    logger.info("%s: merged %s into %s (%s)", m.image, ", ".join(action.drop), action.child, pending.method)
    return done


def prune(specs: Sequence[str], opts: PruneOptions) -> list[ImagePlan]:
    """Apply the policy to every selected chain under the target."""
    if opts.policy.empty and opts.max_depth is None:
        raise UsageError("give at least one --keep-* option or --max-depth")
    if opts.max_depth is not None and opts.max_depth < 1:
        raise UsageError("--max-depth must be at least 1")
    selectors = [names.parse_spec(s) for s in specs]
    open_target(opts.target, create=False)
    results = []
    for directory, item in iter_chains(opts.target):
        if isinstance(item, Error):
            results.append(ImagePlan(names.ImageSpec("?", "", str(directory)), {}, (), item))
            continue
        if selectors and not any(s.matches(item.image) for s in selectors):
            continue
        results.append(prune_chain(directory, item.image, opts))
    return results


def _lock(directory: Path, target: Path, *, wait: bool, what: str) -> ExitStack:
    """The chain's lock; a lock file that a full file system has no room for is made in the reserve's."""
    stack = ExitStack()
    try:
        stack.enter_context(chain_lock(directory, wait=wait, what=what))
    except TargetFull:
        if not release_reserve(target):
            raise
        stack.callback(keep_reserve, target)  # again once the chain is unlocked, where there is room
        stack.enter_context(chain_lock(directory, wait=wait, what=what))
    return stack


def prune_chain(directory: Path, image: names.ImageSpec, opts: PruneOptions) -> ImagePlan:
    """Recover, plan and apply the policy to one chain, under its lock."""
    try:
        with _lock(directory, opts.target, wait=opts.wait, what=str(image)):
            m = mf.load(directory)
            if m is None:
                return ImagePlan(image, {}, ())
            if not opts.dry_run:
                m = recover(directory, m, target=opts.target)
                m = remove_orphan_files(directory, m)
            plan = plan_image(m, opts)
            if not opts.dry_run and plan.actions:
                apply(directory, m, plan.actions, opts)
            return plan
    except Error as exc:
        exc = _full(exc)
        logger.error("%s: %s", image, exc)
        return ImagePlan(image, {}, (), exc)
    except OSError as exc:  # the target's file system; the other chains go on
        if exc.errno not in STORAGE_ERRNOS:
            raise
        err = storage_error(exc)
        logger.error("%s: %s", image, err)
        return ImagePlan(image, {}, (), err)


def delete_point(target: Path, ref_text: str, *, wait: bool = False, parallel: int = 4, progress: bool = False) -> str:
    """Remove one point; the points after it keep their content.  Returns its reference."""
    from ..store.refs import parse_ref, select
    from ..store.target import chain_dir

    ref = parse_ref(ref_text)
    open_target(target, create=False)
    directory = chain_dir(target, ref.image)
    missing = NotFound(f"no backups of {ref.image} in {target}")
    # Before the lock, which would create a file there; layers without a manifest are damage (65), not absence.
    if not directory.is_dir() or mf.load(directory) is None:
        raise missing
    try:
        with _lock(directory, target, wait=wait, what=str(ref.image)):
            m = mf.load(directory)
            if m is None:
                raise missing
            m = recover(directory, m, target=target)
            m = remove_orphan_files(directory, m)
            point = select(m, ref)
            if m.latest is not None and point.id == m.latest.id:
                logger.warning("%s: deleting the newest point; the next backup is a full one", ref.image)
            opts = PruneOptions(target=target, parallel=parallel, progress=progress)
            apply(directory, m, plan_actions(m, {point.id}), opts)
            return f"{ref.image}@{point.id}"
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        raise storage_error(exc) from exc
    except Error as exc:
        full = _full(exc)
        if full is exc:
            raise
        raise full from exc


def _full(exc: Error) -> Error:
    """A qemu or NBD error that says the file system is full, as such (qemu reports it as text)."""
    if isinstance(exc, TargetFull) or not any(os.strerror(e) in str(exc) for e in FULL_ERRNOS):
        return exc
    return TargetFull(str(exc))
