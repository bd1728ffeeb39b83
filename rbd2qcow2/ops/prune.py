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
is always kept.  The recovery of a pending merge lives in :mod:`rbd2qcow2.ops.journal`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..adapters import qemu
from ..core import names
from ..core.errors import (
    FULL_ERRNOS,
    STORAGE_ERRNOS,
    Error,
    Locked,
    StorageError,
    TargetFull,
    UsageError,
    storage_error,
)
from ..core.faults import crashpoint
from ..core.kinds import MergeMethod
from ..core.retention import Decision, Policy, Stamp, decide
from ..store import manifest as mf
from ..store.activity import point_latest, record
from ..store.fsutil import keep_reserve
from ..store.layout import point_time
from ..store.refs import parse_ref, select
from ..store.target import iter_chains, open_target
from . import merge
from .access import CHANGE, chain_session, with_chain
from .journal import finish, point_files, save_dropping, unlink_points

logger = logging.getLogger(__name__)


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
    return [Stamp(p.id, point_time(p.id), seq) for seq, p in enumerate(m.points)]


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
    m = dataclasses.replace(m, writing=(*m.writing, *point_files(points)))
    save_dropping(directory, m, target)
    m = unlink_points(directory, m, points)
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
    if merge.method(m, action.drop, action.child, shared=shared) == MergeMethod.COMMIT:
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
        done = finish(directory, journaled, pending, daemon, progress=opts.progress, target=opts.target)
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


def prune_chain(directory: Path, image: names.ImageSpec, opts: PruneOptions) -> ImagePlan:
    """Recover, plan and apply the policy to one chain, under its lock."""
    access = dataclasses.replace(CHANGE, recover=False, clean=False) if opts.dry_run else CHANGE
    try:
        with chain_session(directory, str(image), access, wait=opts.wait, target=opts.target) as m:
            if m is None:
                return ImagePlan(image, {}, ())
            plan = plan_image(m, opts)
            if not opts.dry_run and plan.actions:
                apply(directory, m, plan.actions, opts)
            return plan
    except Error as exc:
        exc = as_target_full(exc)
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
    ref = parse_ref(ref_text)
    try:
        with with_chain(target, ref.image, CHANGE, wait=wait) as chain:
            m = chain.manifest
            assert m is not None
            point = select(m, ref)
            if m.latest is not None and point.id == m.latest.id:
                logger.warning("%s: deleting the newest point; the next backup is a full one", ref.image)
            opts = PruneOptions(target=target, parallel=parallel, progress=progress)
            apply(chain.directory, m, plan_actions(m, {point.id}), opts)
            return f"{ref.image}@{point.id}"
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        raise storage_error(exc) from exc
    except Error as exc:
        full = as_target_full(exc)
        if full is exc:
            raise
        raise full from exc


def as_target_full(exc: Error) -> Error:
    """A qemu or NBD error that says the file system is full, as such (qemu reports it as text)."""
    if isinstance(exc, TargetFull) or not any(os.strerror(e) in str(exc) for e in FULL_ERRNOS):
        return exc
    return TargetFull(str(exc))


__all__ = [
    "Action",
    "Delete",
    "ImagePlan",
    "Merge",
    "PruneOptions",
    "apply",
    "as_target_full",
    "chains",
    "delete_point",
    "depth_drops",
    "format_plan",
    "plan_actions",
    "plan_dict",
    "plan_image",
    "prune",
    "prune_chain",
    "stamps",
]
