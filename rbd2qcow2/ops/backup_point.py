"""One image's new point: steps 1-3 and 6 of the commit sequence in :mod:`rbd2qcow2.ops.backup`.

:meth:`ImageBackup.start` locks the chain, cleans up, chooses the base,
journals the point, creates the snapshot and the empty layer file, and
returns a :class:`Started`; :meth:`ImageBackup.finish` writes the layer
(:mod:`rbd2qcow2.ops.backup_layer`) and commits the point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..adapters import qemu
from ..adapters.ceph import Cluster, RbdImage, SnapInfo
from ..core import names
from ..core.errors import ChainDamaged, DiffMismatch, Error, NotFound
from ..core.faults import crashpoint
from ..core.kinds import PointFlag, PointKind
from ..store import manifest as mf
from ..store import qcow2
from ..store.activity import point_latest, record
from ..store.chain import checked_chain
from ..store.fsutil import make_dirs
from ..store.layout import layer_file, partial, sums_file
from .access import BACKUP, chain_session
from .backup_layer import BackupOptions, Base, LayerWriter, Plan, Source, diff

logger = logging.getLogger(__name__)

# An image up to this size has its diff made with its snapshot, ahead of its job in a run; the
# extents of a larger one could be many to hold while it waits, and its diff is small beside its copy.
AHEAD_DIFF_MAX = 1 << 30


@dataclass
class Holds:
    """What a :class:`Started` releases: the chain lock, the handle set to the snapshot, and the undo."""

    lock: ExitStack
    source: ExitStack
    undo: Callable[[], None]


class Started:
    """A backup between its snapshot and its commit (steps 1-3 done).

    Holds the chain lock.  Closing it before :meth:`ImageBackup.finish` has
    committed the point undoes the point (its files and its snapshot), so a
    backup prepared ahead and then cancelled leaves nothing behind.
    """

    def __init__(self, img: RbdImage, plan: Plan, source: Source, holds: Holds) -> None:
        self.img = img
        self.plan = plan
        self.source = source
        self._holds = holds
        self.settled = False

    def abandon(self) -> None:
        """Undo the uncommitted point, once (the handle is set back to the head first)."""
        if not self.settled:
            self.settled = True
            try:
                self._holds.source.close()
            finally:
                self._holds.undo()

    def close(self) -> None:
        try:
            try:
                self.abandon()
            finally:
                self._holds.source.close()
        finally:
            self._holds.lock.close()

    def __enter__(self) -> Started:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class ImageBackup:
    """One image's backup run (the steps in :mod:`rbd2qcow2.ops.backup`)."""

    def __init__(self, cluster: Cluster, tag: str, image: names.ImageSpec, opts: BackupOptions) -> None:
        self.cluster = cluster
        self.tag = tag
        self.image = image
        self.opts = opts
        self.dir = make_dirs(opts.target, names.chain_relpath(image))
        self.writer = LayerWriter(cluster, image, opts, self.dir)

    def start(self, img: RbdImage) -> Started:
        """Steps 1-3, and 4's set-up: lock the chain, clean up, choose the base, create the snapshot,
        set the handle to it, create the layer file.

        ``img``: the image open at its head, kept open by the caller until
        the returned :class:`Started` is closed.
        """
        with ExitStack() as lock:
            # The target is open (its tag known): one chain of it, locked until the point is settled.
            session = chain_session(self.dir, str(self.image), BACKUP, wait=self.opts.wait, tag=self.tag)
            plan = self._plan(img, lock.enter_context(session))
            mf.save(self.dir, plan.manifest)  # the journal: the next run removes only what it names
            crashpoint("after-journal")
            snap = img.create_snapshot(names.snapshot_name(self.tag, plan.point_id))
            undo = functools.partial(self._abandon, img, plan.point_id, snap.name)
            with ExitStack() as source:
                try:
                    taken = self._source(img, plan, snap, source)
                except BaseException:
                    source.close()
                    undo()
                    raise
                return Started(img, plan, taken, Holds(lock.pop_all(), source.pop_all(), undo))

    def _plan(self, img: RbdImage, manifest: mf.Manifest | None) -> Plan:
        """Steps 1 and 2, and the journal of step 3: the manifest to save before the snapshot."""
        image_id = img.id()
        if manifest is None:
            manifest = mf.Manifest(self.image, image_id, self.tag)
        self._clean_snapshots(manifest, img)
        base = choose_base(manifest, img.snapshots(), image_id, full=self.opts.full, directory=self.dir)
        base, files = self._base_chain(manifest, base)
        logger.info(
            "%s: %s backup (%s)",
            self.image,
            PointKind.FULL if base.point is None else PointKind.INCREMENTAL,
            base.reason,
        )
        point_id = names.point_id(datetime.now(UTC), {p.id for p in manifest.points})
        manifest = dataclasses.replace(manifest, writing=point_files(point_id))
        return Plan(manifest, image_id, base, files, point_id)

    def _source(self, img: RbdImage, plan: Plan, snap: SnapInfo, source: ExitStack) -> Source:
        """The head's handle set to the snapshot (into ``source``), for the diff, the first reader and
        the sample; the empty layer file."""
        src = source.enter_context(img.at_snapshot(snap.name))
        layer = self.dir / partial(layer_file(plan.point_id))
        qcow2.create_layer(layer, snap.size, plan.base.point.file if plan.base.point else None)
        # A small image's diff, here: in a run that is ahead of the job, beside the
        # snapshot create of the next image.
        first_diff = None
        if 0 < snap.size <= AHEAD_DIFF_MAX:
            first_diff = diff(src, plan.base, 0, snap.size, whole_object=self.opts.whole_object)
        return Source(snap, src, layer, first_diff)

    def finish(self, started: Started, daemon: qemu.StorageDaemon) -> tuple[mf.Point, str]:
        """Steps 4-6: write the layer and commit the point; the chain stays locked until ``started`` closes."""
        plan = started.plan
        try:
            crashpoint("after-snapshot")
            point = self.writer.write(daemon, plan, started.source)
            # The last word before the commit: a signal, or a run's claim that lapsed, undoes the point.
            self.opts.interrupt()
            committed = plan.manifest.with_point(point, plan.image_id)
            mf.save(self.dir, dataclasses.replace(committed, writing=()))
        except DiffMismatch as exc:
            started.abandon()
            self._flag_latest(PointFlag.NO_INCREMENTAL, str(exc))
            raise
        except BaseException:
            started.abandon()
            raise
        started.settled = True
        crashpoint("after-commit")
        point_latest(self.dir, point.file)
        record(
            self.dir,
            f"backup {point.id} {point.kind} data={point.data_bytes} zeros={point.zero_bytes} ({plan.base.reason})",
        )
        return point, plan.base.reason

    def old_snapshots(self, started: Started) -> list[str]:
        """After :meth:`finish`: our snapshots other than the new point's, which no point needs any more."""
        keep = started.source.snap.name
        try:
            return [
                s.name for s in started.img.snapshots() if names.is_own_snapshot(s.name, self.tag) and s.name != keep
            ]
        except Error as exc:
            logger.warning("%s: old snapshots not listed: %s (the next run removes them)", self.image, exc)
            return []

    def _clean_snapshots(self, manifest: mf.Manifest, img: RbdImage) -> None:
        """Remove our snapshots that no point names (left by an interrupted run)."""
        keep = manifest.latest.snapshot.name if manifest.latest else None
        for snap in img.snapshots():
            if names.is_own_snapshot(snap.name, self.tag) and snap.name != keep:
                logger.warning("%s: removing snapshot %s left by an interrupted run", self.image, snap.name)
                with contextlib.suppress(NotFound):  # removed meanwhile, by a run on another host
                    img.remove_snapshot(snap.name)

    def _flag_latest(self, flag: PointFlag, reason: str) -> None:
        """Mark the latest point so that the next backup does not build on it."""
        m = mf.load(self.dir)
        if m is not None and m.latest is not None and flag not in m.latest.flags:
            now = datetime.now(UTC).isoformat(timespec="seconds")
            flagged = m.latest.flagged(mf.Flag(flag, "backup", reason, now))
            mf.save(self.dir, dataclasses.replace(m, points=(*m.points[:-1], flagged)))

    def _abandon(self, img: RbdImage, point_id: str, snap_name: str) -> None:
        """Undo an uncommitted point: its files and its snapshot.

        If the manifest on disk already names the point (the commit went
        through and a later step failed), nothing is undone.
        """
        with contextlib.suppress(Error):
            committed = mf.load(self.dir)
            if committed is not None and any(p.id == point_id for p in committed.points):
                return
        for name in (layer_file(point_id), sums_file(point_id)):
            for path in (self.dir / name, self.dir / partial(name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        try:
            img.remove_snapshot(snap_name)
        except Error as exc:
            logger.error("%s: could not remove snapshot %s: %s (the next run removes it)", self.image, snap_name, exc)

    def _base_chain(self, manifest: mf.Manifest, base: Base) -> tuple[Base, list[Path]]:
        """The base's layer files, headers checked; a damaged chain gets a new full chain."""
        if base.point is None:
            return base, []
        try:
            return base, checked_chain(self.dir, manifest, base.point.id)
        except ChainDamaged as exc:
            logger.error("%s: %s", self.image, exc)
            return Base(None, f"chain of {base.point.id} is damaged: new chain"), []


def point_files(point_id: str) -> tuple[str, ...]:
    """The files a backup of ``point_id`` creates: its layer and checksums, and their ``.partial`` files."""
    files = (layer_file(point_id), sums_file(point_id))
    return (*files, *(partial(f) for f in files))


def choose_base(
    manifest: mf.Manifest, snapshots: list[SnapInfo], image_id: str, *, full: bool, directory: Path
) -> Base:
    """Pure decision: incremental from the latest point, or a new full chain (and why)."""
    latest = manifest.latest
    if full:
        return Base(None, "full backup requested")
    if latest is None:
        return Base(None, "first backup of this image")
    if latest.image_id != image_id:
        return Base(None, f"image was re-created (id {image_id}, chain has {latest.image_id}): new chain")
    if PointFlag.DAMAGED in latest.flags:
        return Base(None, f"point {latest.id} failed verification: new chain")
    if PointFlag.NO_INCREMENTAL in latest.flags:
        return Base(None, f"librbd's diff since {latest.id} missed changes: new chain")
    snap = next((s for s in snapshots if s.name == latest.snapshot.name), None)
    if snap is None:
        return Base(None, f"snapshot {latest.snapshot.name} of the last point is gone: new chain")
    if snap.id != latest.snapshot.id:
        return Base(None, f"snapshot {snap.name} has id {snap.id}, manifest says {latest.snapshot.id}: new chain")
    if not (directory / latest.file).is_file():
        return Base(None, f"layer {latest.file} is missing: new chain")
    return Base(latest, f"changes since {latest.id}")
