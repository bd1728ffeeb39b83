"""Backup orchestration: one new point per image, committed atomically.

Commit sequence of one image (see ``docs/design.md`` for the crash matrix):

1. lock the chain directory; load the manifest (layer files without one:
   refused, see :func:`rbd2qcow2.store.manifest.load`); remove what an
   interrupted run left (files the manifest's journal names, snapshots of
   ours it does not name);
2. choose the base: the latest point, if its RBD snapshot still exists with
   the recorded id and the image id is unchanged; otherwise a new full chain;
3. journal the new point's file names in the manifest (``writing``), then
   create the RBD snapshot ``rbd2qcow2.<tag>.<point>``;
4. create ``<point>.qcow2.partial`` (backing file: the base, by relative
   name), export it through qemu-storage-daemon, pull the diff into it;
5. flush, close the export, ``qemu-img check``, fsync, rename to
   ``<point>.qcow2``, fsync the directory (likewise the checksum file);
6. commit the manifest (atomic replace; the journal is cleared with it);
7. remove the base's RBD snapshot: only now is it no longer needed.  A
   :class:`SnapshotJanitor` does this in the background, through the image
   handle the run used, while the next image is backed up.

:func:`prepare` does steps 1-3 and creates the empty layer file
(:mod:`rbd2qcow2.ops.backup_point`); :meth:`Prepared.finish` steps 4-6
(the layer is written by :mod:`rbd2qcow2.ops.backup_layer`); the
:class:`SnapshotJanitor` step 7.  :func:`backup` runs them one image after
the other; a ``run`` calls them in different threads, so that the next
images are ready before their job takes them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

from ..adapters import qemu
from ..adapters.ceph import Cluster, RbdImage
from ..core import names
from ..core.errors import Cancelled, Error, NotFound, UsageError, as_error
from ..store import manifest as mf
from ..store.target import open_target
from .backup_layer import BackupOptions, Base
from .backup_point import ImageBackup, Started, choose_base

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupResult:
    """The outcome for one image: a point, or the error that stopped it."""

    image: names.ImageSpec
    point: mf.Point | None = None
    reason: str = ""
    error: Error | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.error is None else self.error.exit_code

    @property
    def point_ref(self) -> str:
        return f"{self.image}@{self.point.id}" if self.point else ""


@dataclass(frozen=True)
class Committed:
    """What :meth:`Prepared.finish` committed."""

    point: mf.Point
    reason: str  # why incremental, or why a new full chain
    read_bytes: int  # read from RBD
    old_snapshots: list[str]  # ours that no point needs any more: for :meth:`SnapshotJanitor.submit`


class Prepared:
    """One image's backup between its snapshot and its commit (steps 1-3 done), made by :func:`prepare`.

    Holds the chain lock until closed.  Closing it before :meth:`finish` has
    committed the point undoes the point (its files and its snapshot), so a
    backup prepared ahead and then given up leaves nothing behind.
    """

    def __init__(self, job: ImageBackup, started: Started) -> None:
        self._job = job
        self._started = started

    def finish(self, daemon: qemu.StorageDaemon) -> Committed:
        """Steps 4-6: write the layer through ``daemon`` and commit the point."""
        point, reason = self._job.finish(self._started, daemon)
        old = self._job.old_snapshots(self._started)
        return Committed(point, reason, self._job.writer.stats.read_bytes, old)

    def close(self) -> None:
        self._started.close()

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def prepare(cluster: Cluster, tag: str, image: names.ImageSpec, opts: BackupOptions, head: RbdImage) -> Prepared:
    """Steps 1-3 for ``image`` of target ``tag``: lock its chain, clean up, choose the base, snapshot it.

    ``head``: the image open at its head, kept open by the caller until the
    returned :class:`Prepared` is closed (and then while the janitor removes
    the old snapshots through it).
    """
    job = ImageBackup(cluster, tag, image, opts)
    return Prepared(job, job.start(head))


def backup(specs: Sequence[str], opts: BackupOptions) -> list[BackupResult]:
    """Back up every image that ``specs`` select; one result per image.

    A failing image never stops the others; ``Cancelled`` (a signal) does,
    after cleaning up the image in progress.
    """
    if opts.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    selectors = [names.parse_spec(s) for s in specs]
    if not selectors:
        raise UsageError("no image or pool given")
    tag = open_target(opts.target, create=True)
    results: list[BackupResult] = []
    # The daemon boots while we connect to the cluster.
    # The daemon works in the target, where it is given short names (see qemu.chain_options).
    with qemu.storage_daemon(root=opts.target) as daemon, Cluster(opts.ceph) as cluster, SnapshotJanitor() as janitor:
        for image in _select(cluster, selectors):
            results.append(_backup_one(cluster, daemon, tag, image, opts, janitor))
        # The daemon's shutdown overlaps the removal of the last image's old snapshot.
        daemon.close()
    return results


class SnapshotJanitor:
    """Removes the RBD snapshots that committed points no longer need, in the background.

    Once a new point is committed, the previous point's snapshot is only
    clean-up: removing it is a round trip to the monitors that the next image
    need not wait for.  :meth:`submit` takes the image handle the backup
    used, with what closes it; leaving the context waits for every removal
    (after an exception, removals not yet started are skipped).  A removal
    that fails is logged; the next run of the image removes what is left.
    """

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snap-rm")
        self._skip = threading.Event()

    def __enter__(self) -> SnapshotJanitor:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.close(skip_pending=exc_type is not None)

    def submit(self, image: names.ImageSpec, img: RbdImage, snapshots: list[str], closer: ExitStack) -> None:
        """Remove ``snapshots`` through ``img``, then close ``closer`` (which owns ``img``)."""
        try:
            self._pool.submit(self._remove, image, img, snapshots, closer)
        except BaseException:
            closer.close()
            raise

    def _remove(self, image: names.ImageSpec, img: RbdImage, snapshots: list[str], closer: ExitStack) -> None:
        try:
            with closer:
                if not self._skip.is_set():
                    remove_snapshots(image, img, snapshots)
        except Exception:  # nobody waits for this thread's result: a bug is logged, not lost
            logger.exception("%s: removing old snapshots failed (the next run removes them)", image)

    def close(self, *, skip_pending: bool = False) -> None:
        if skip_pending:
            self._skip.set()
        self._pool.shutdown(wait=True)


def remove_snapshots(image: names.ImageSpec, img: RbdImage, snapshots: list[str]) -> None:
    """Remove snapshots of ours that no point needs; a failure is a warning, a snapshot already gone is fine."""
    for name in snapshots:
        try:
            img.remove_snapshot(name)
        except NotFound:
            continue  # removed meanwhile, by a run on another host
        except Error as exc:
            logger.warning("%s: old snapshot %s not removed: %s (the next run removes it)", image, name, exc)


def _select(cluster: Cluster, selectors: list[names.Selector]) -> list[names.ImageSpec]:
    images: list[names.ImageSpec] = []
    for sel in selectors:
        if sel.name is not None:
            images.append(names.ImageSpec(sel.pool, sel.namespace or "", sel.name))
        else:
            images += cluster.list_images(sel.pool, sel.namespace)
    return list(dict.fromkeys(images))


def _backup_one(
    cluster: Cluster,
    daemon: qemu.StorageDaemon,
    tag: str,
    image: names.ImageSpec,
    opts: BackupOptions,
    janitor: SnapshotJanitor,
) -> BackupResult:
    try:
        with ExitStack() as head:
            img = head.enter_context(cluster.image(image))
            with prepare(cluster, tag, image, opts, img) as prepared:
                done = prepared.finish(daemon)
            janitor.submit(image, img, done.old_snapshots, head.pop_all())
    except (OSError, Error) as exc:  # OSError: the target's file system (disk full, I/O error, permissions)
        err = as_error(exc, target_io=True)
        logger.error("%s: %s", image, err)
        return BackupResult(image, error=err)
    return BackupResult(image, point=done.point, reason=done.reason)


__all__ = [
    "BackupOptions",
    "BackupResult",
    "Base",
    "Cancelled",
    "Committed",
    "Prepared",
    "SnapshotJanitor",
    "backup",
    "choose_base",
    "prepare",
    "remove_snapshots",
]
