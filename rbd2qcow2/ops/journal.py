"""A merge's journal: finishing a pending merge, forward, and dropping points' files.

A merge is recorded in the manifest (``pending``) before anything a kept
point reads is changed; from then on every step here is idempotent, so the
next run that takes the chain lock (backup, prune, delete, verify) finishes
what a killed one left (see :mod:`rbd2qcow2.ops.merge` for the two methods).
The files of dropped points are named in the manifest's journal
(``writing``) when the manifest drops them, and removed after.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..adapters import qemu
from ..core.errors import ChainDamaged, TargetFull
from ..core.faults import crashpoint
from ..core.kinds import MergeMethod
from ..store import manifest as mf
from ..store.fsutil import fsync_dir, release_reserve
from ..store.layout import sums_file
from ..store.qcow2 import read_header
from . import merge

logger = logging.getLogger(__name__)
RECOVER_PARALLEL = 4  # connections of a merge finished by copy during recovery (PruneOptions' default)


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
    if (pm.method == MergeMethod.COMMIT or shared) and daemon is None:
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
    return finish(directory, m, pm, daemon, progress=False, resumed=True, target=target)


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


def finish(
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
    if not merge.merged_sums_ready(directory, m, pm):
        return _give_up(directory, m, pm)
    _put_in_place(directory, m, pm, daemon, progress=progress, resumed=resumed)
    crashpoint("prune-after-rename")
    if pm.method == MergeMethod.COMMIT:
        pm = dataclasses.replace(pm, stored_bytes=(directory / child.file).stat().st_blocks * 512)
    built = {path.name for path in merge.merge_files(directory, child)}
    dropped = [m.point(d) for d in pm.drop]
    writing = (*(n for n in m.writing if n not in built), *point_files(dropped))
    done = dataclasses.replace(m, pending=pm, writing=writing).finish_merge()
    save_dropping(directory, done, target)
    crashpoint("prune-after-commit")
    return unlink_points(directory, done, dropped)


def _put_in_place(
    directory: Path,
    m: mf.Manifest,
    pm: mf.PendingMerge,
    daemon: qemu.StorageDaemon | None,
    *,
    progress: bool,
    resumed: bool,
) -> None:
    """The merged layer (committed in place, or built beside) and its checksums renamed over the child's."""
    child = m.point(pm.child)
    layer, sums = merge.merge_files(directory, child)
    renames = [(sums, directory / sums_file(child.id))]
    if pm.method == MergeMethod.COMMIT:
        assert daemon is not None
        merge.commit_in_place(directory, m, pm, daemon, progress=progress, resumed=resumed)
    else:
        renames.insert(0, (layer, directory / child.file))
    for tmp, final in renames:
        if tmp.exists():
            os.replace(tmp, final)
    fsync_dir(directory)


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


def save_dropping(directory: Path, m: mf.Manifest, target: Path | None) -> None:
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


def point_files(points: Sequence[mf.Point]) -> tuple[str, ...]:
    """The files of ``points``: each one's layer and checksums."""
    return tuple(name for p in points for name in (p.file, sums_file(p.id)))


def unlink_points(directory: Path, m: mf.Manifest, points: Sequence[mf.Point]) -> mf.Manifest:
    """Delete the files of points ``m`` no longer has (its journal names them), then clear the journal."""
    gone = point_files(points)
    for name in gone:
        (directory / name).unlink(missing_ok=True)
    fsync_dir(directory)
    m = dataclasses.replace(m, writing=tuple(n for n in m.writing if n not in gone))
    mf.save(directory, m)
    return m
