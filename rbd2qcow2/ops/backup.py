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

:meth:`ImageBackup.start` does steps 1-3 and creates the empty layer file;
:meth:`ImageBackup.finish` the rest.  A ``run`` calls them in different
threads, so that the next images are ready before their job takes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import random
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..adapters import qemu
from ..adapters.ceph import CephOptions, Cluster, RbdImage, SnapInfo
from ..adapters.nbdio import ConnectionPool
from ..core import names
from ..core.errors import (
    Cancelled,
    ChainDamaged,
    DiffMismatch,
    Error,
    Locked,
    NotFound,
    QemuError,
    UsageError,
    storage_error,
)
from ..core.extents import Chunk, Extent, Range, boundary_extent, plan, sample_ranges, subtract, union, windows
from ..core.faults import crashpoint, drop_extent
from ..core.kinds import PointKind
from ..store import manifest as mf
from ..store import qcow2
from ..store.activity import point_latest, record
from ..store.chain import checked_chain, remove_orphan_files
from ..store.checksums import ALGORITHM, BLOCK_SIZE, OrderedWriter
from ..store.fsutil import chain_lock, commit_file, make_dirs
from ..store.target import open_target
from ..transfer.pipeline import Stats, Transfer, peek_small
from ..transfer.progress import Progress
from .prune import recover

logger = logging.getLogger(__name__)

DIFF_WINDOW = 16 << 30  # one diff call per 16 GiB: each call costs ~20 ms of set-up
# An image up to this size has its diff made with its snapshot, ahead of its job in a run; the
# extents of a larger one could be many to hold while it waits, and its diff is small beside its copy.
AHEAD_DIFF_MAX = 1 << 30
UNCHANGED_REGION = 256 << 10


@dataclass(frozen=True)
class BackupOptions:
    """Options of a backup run; every field has a default a config file can fill."""

    target: Path
    ceph: CephOptions = dataclasses.field(default_factory=CephOptions)
    parallel: int = 4
    full: bool = False
    whole_object: bool = False
    wait: bool = False
    progress: bool = False
    direct_io: bool = True
    check_unchanged: float = 0.002  # fraction of unchanged regions compared with the snapshot
    # Called often during a transfer and once before the commit; raises (Cancelled, ClaimLost) to stop it.
    interrupt: Callable[[], None] = dataclasses.field(default=lambda: None, compare=False, repr=False)


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
class Base:
    """What the new point builds on: a point (incremental) or nothing (full)."""

    point: mf.Point | None
    reason: str


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
        # The daemon quits (30-60 ms) while the last image's old snapshot is removed.
        daemon.close()
    return results


class SnapshotJanitor:
    """Removes the RBD snapshots that committed points no longer need, in the background.

    Once a new point is committed, the previous point's snapshot is only
    clean-up: removing it is a round trip to the monitors (50-80 ms) that the
    next image need not wait for.  :meth:`submit` takes the image handle the
    backup used, with what closes it; leaving the context waits for every
    removal (after an exception, removals not yet started are skipped).  A
    removal that fails is logged; the next run of the image removes what is
    left.
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
        with ExitStack() as stack:
            head = stack.enter_context(cluster.image(image))
            old: list[str] = []
            point, reason = ImageBackup(cluster, tag, image, opts).run(daemon, head, old_snapshots=old)
            janitor.submit(image, head, old, stack.pop_all())
    except OSError as exc:  # the target's file system: disk full, I/O error, permissions
        err = storage_error(exc)
        logger.error("%s: %s", image, err)
        return BackupResult(image, error=err)
    except Error as exc:
        logger.error("%s: %s", image, exc)
        return BackupResult(image, error=exc)
    return BackupResult(image, point=point, reason=reason)


class Started:
    """A backup between its snapshot and its commit (steps 1-3 done).

    Holds the chain lock.  Closing it before :meth:`ImageBackup.finish` has
    committed the point undoes the point (its files and its snapshot), so a
    backup prepared ahead and then cancelled leaves nothing behind.
    """

    def __init__(
        self,
        *,
        img: RbdImage,
        manifest: mf.Manifest,
        image_id: str,
        base: Base,
        files: list[Path],
        point_id: str,
        snap: SnapInfo,
        src: RbdImage,
        layer: Path,
        lock: ExitStack,
        source: ExitStack,
        undo: Callable[[], None],
        first_diff: list[Extent] | None,
    ) -> None:
        self.img = img
        self.manifest = manifest
        self.image_id = image_id
        self.base = base
        self.files = files
        self.point_id = point_id
        self.snap = snap
        self.src = src
        self.layer = layer
        self.first_diff = first_diff  # the first window's diff, made ahead with the snapshot (small images)
        self._lock = lock
        self._source = source
        self._undo = undo
        self.settled = False

    def abandon(self) -> None:
        """Undo the uncommitted point, once (the handle is set back to the head first)."""
        if not self.settled:
            self.settled = True
            try:
                self._source.close()
            finally:
                self._undo()

    def close(self) -> None:
        try:
            try:
                self.abandon()
            finally:
                self._source.close()
        finally:
            self._lock.close()

    def __enter__(self) -> Started:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class ImageBackup:
    """One image's backup run (the steps in the module docstring)."""

    def __init__(self, cluster: Cluster, tag: str, image: names.ImageSpec, opts: BackupOptions) -> None:
        self.cluster = cluster
        self.tag = tag
        self.image = image
        self.opts = opts
        self.dir = make_dirs(opts.target, names.chain_relpath(image))
        self.stats = Stats()

    def run(
        self, daemon: qemu.StorageDaemon, head: RbdImage | None = None, old_snapshots: list[str] | None = None
    ) -> tuple[mf.Point, str]:
        """Make the point.  ``head``: the image already open at its head (read-write), else opened here.

        The snapshots that no point needs any more are removed before this
        returns, or, given ``old_snapshots``, appended to it for the caller
        to remove (through ``head``: see :class:`SnapshotJanitor`).
        """
        with ExitStack() as stack:
            img = head if head is not None else stack.enter_context(self.cluster.image(self.image))
            with self.start(img) as started:
                point, reason = self.finish(started, daemon)
                old = self.old_snapshots(started)
                if old_snapshots is None:
                    remove_snapshots(self.image, img, old)
                else:
                    old_snapshots += old
        return point, reason

    def start(self, img: RbdImage) -> Started:
        """Steps 1-3, and 4's set-up: lock the chain, clean up, choose the base, create the snapshot,
        set the handle to it, create the layer file.

        ``img``: the image open at its head, kept open by the caller until
        the returned :class:`Started` is closed.
        """
        with ExitStack() as lock:
            lock.enter_context(chain_lock(self.dir, wait=self.opts.wait, what=str(self.image)))
            manifest = mf.load(self.dir)
            if manifest is not None:
                try:
                    manifest = recover(self.dir, manifest)
                except Locked as exc:
                    # The points the backup builds on read right while a commit merge is pending.
                    logger.warning("%s: the interrupted merge stays pending: %s", self.image, exc)
            image_id = img.id()
            if manifest is None:
                manifest = mf.Manifest(self.image, image_id, self.tag)
            elif manifest.target_tag != self.tag:
                raise ChainDamaged(str(self.dir), "manifest belongs to another target")
            manifest = self._clean_orphans(manifest, img)
            base = choose_base(manifest, img.snapshots(), image_id, full=self.opts.full, directory=self.dir)
            base, files = self._base_chain(manifest, base)
            logger.info("%s: %s backup (%s)", self.image, "incremental" if base.point else "full", base.reason)
            point_id = names.point_id(datetime.now(UTC), {p.id for p in manifest.points})
            manifest = dataclasses.replace(manifest, writing=point_files(point_id))
            mf.save(self.dir, manifest)  # the journal: the next run removes only what it names
            crashpoint("after-journal")
            snap = img.create_snapshot(names.snapshot_name(self.tag, point_id))
            undo = functools.partial(self._abandon, img, point_id, snap.name)
            layer = self.dir / names.partial(names.layer_file(point_id))
            with ExitStack() as source:
                try:
                    # The head's handle, set to the snapshot, for the diff, the first reader and the sample.
                    src = source.enter_context(img.at_snapshot(snap.name))
                    qcow2.create_layer(layer, snap.size, base.point.file if base.point else None)
                    # A small image's diff, here: in a run that is ahead of the job, beside the
                    # snapshot create of the next image.
                    first_diff = self._diff(src, base, 0, snap.size) if 0 < snap.size <= AHEAD_DIFF_MAX else None
                except BaseException:
                    source.close()
                    undo()
                    raise
                return Started(
                    img=img,
                    manifest=manifest,
                    image_id=image_id,
                    base=base,
                    files=files,
                    point_id=point_id,
                    snap=snap,
                    src=src,
                    layer=layer,
                    lock=lock.pop_all(),
                    source=source.pop_all(),
                    undo=undo,
                    first_diff=first_diff,
                )

    def finish(self, started: Started, daemon: qemu.StorageDaemon) -> tuple[mf.Point, str]:
        """Steps 4-6: write the layer and commit the point; the chain stays locked until ``started`` closes."""
        base = started.base
        try:
            crashpoint("after-snapshot")
            point = self._write_point(daemon, started)
            # The last word before the commit: a signal, or a run's claim that lapsed, undoes the point.
            self.opts.interrupt()
            committed = started.manifest.with_point(point, started.image_id)
            mf.save(self.dir, dataclasses.replace(committed, writing=()))
        except DiffMismatch as exc:
            started.abandon()
            self._flag_latest("no-incremental", str(exc))
            raise
        except BaseException:
            started.abandon()
            raise
        started.settled = True
        crashpoint("after-commit")
        point_latest(self.dir, point.file)
        record(
            self.dir,
            f"backup {point.id} {point.kind} data={point.data_bytes} zeros={point.zero_bytes} ({base.reason})",
        )
        return point, base.reason

    def old_snapshots(self, started: Started) -> list[str]:
        """After :meth:`finish`: our snapshots that no point needs any more (step 7's work)."""
        return self._old_snapshots(started.img, started.snap.name)

    # -- step 1 ------------------------------------------------------------
    def _clean_orphans(self, manifest: mf.Manifest, img: RbdImage) -> mf.Manifest:
        manifest = remove_orphan_files(self.dir, manifest)
        keep = manifest.latest.snapshot.name if manifest.latest else None
        for snap in img.snapshots():
            if names.is_own_snapshot(snap.name, self.tag) and snap.name != keep:
                logger.warning("%s: removing snapshot %s left by an interrupted run", self.image, snap.name)
                with contextlib.suppress(NotFound):  # removed meanwhile, by a run on another host
                    img.remove_snapshot(snap.name)
        return manifest

    def _flag_latest(self, flag: str, reason: str) -> None:
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
        for name in (names.layer_file(point_id), names.sums_file(point_id)):
            for path in (self.dir / name, self.dir / names.partial(name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        try:
            img.remove_snapshot(snap_name)
        except Error as exc:
            logger.error("%s: could not remove snapshot %s: %s (the next run removes it)", self.image, snap_name, exc)

    def _old_snapshots(self, img: RbdImage, keep: str) -> list[str]:
        """Our snapshots other than ``keep`` (the new point's): no point needs them any more."""
        try:
            return [s.name for s in img.snapshots() if names.is_own_snapshot(s.name, self.tag) and s.name != keep]
        except Error as exc:
            logger.warning("%s: old snapshots not listed: %s (the next run removes them)", self.image, exc)
            return []

    # -- steps 4 and 5 -----------------------------------------------------
    def _base_chain(self, manifest: mf.Manifest, base: Base) -> tuple[Base, list[Path]]:
        """The base's layer files, headers checked; a damaged chain gets a new full chain."""
        if base.point is None:
            return base, []
        try:
            return base, checked_chain(self.dir, manifest, base.point.id)
        except ChainDamaged as exc:
            logger.error("%s: %s", self.image, exc)
            return Base(None, f"chain of {base.point.id} is damaged: new chain"), []

    def _write_point(self, daemon: qemu.StorageDaemon, started: Started) -> mf.Point:
        base, point_id, snap, image_id = started.base, started.point_id, started.snap, started.image_id
        layer = self.dir / names.layer_file(point_id)
        tmp = started.layer
        sums_final = self.dir / names.sums_file(point_id)
        sums = OrderedWriter(self.dir / names.partial(sums_final.name))
        try:
            stats = self._transfer(daemon, started.src, [*started.files, tmp], base, snap, sums, started.first_diff)
            crashpoint("before-rename")
            qemu.check_layer(tmp)
            sha = sums.finish()
        except BaseException:
            sums.abort()
            raise
        commit_file(sums.path, sums_final)
        commit_file(tmp, layer)
        crashpoint("after-rename")
        return mf.Point(
            id=point_id,
            file=layer.name,
            parent=base.point.id if base.point else None,
            created=datetime.now(UTC).isoformat(timespec="milliseconds"),
            size=snap.size,
            image_id=image_id,
            snapshot=mf.Snapshot(snap.name, snap.id),
            kind=PointKind.INCREMENTAL if base.point else PointKind.FULL,
            stored_bytes=layer.stat().st_blocks * 512,
            data_bytes=stats.data_bytes,
            zero_bytes=stats.zero_bytes,
            checksums=mf.Checksums(sums_final.name, ALGORITHM, BLOCK_SIZE, sha),
        )

    def _export(self, daemon: qemu.StorageDaemon, files: list[Path], *, small: bool) -> qemu.Export:
        """The new layer's export: O_DIRECT where the target has it, else the page cache.

        A small diff's writes go through Linux AIO: each completes in qemu's
        own thread, where io_uring hands every write that extends the file to
        a worker thread (about 20 us more per write here).  A large diff keeps
        io_uring, whose workers overlap its writes (its full backup took 10 %
        longer with Linux AIO).  Either way the layer's file is extended ahead
        of the writes (qemu's ``preallocate`` filter, see
        :func:`qemu.chain_options`).
        """
        if self.opts.direct_io:
            for aio in ("native", "io_uring") if small else ("io_uring",):
                try:
                    return self._open_export(daemon, files, direct=True, direct_aio=aio)
                except QemuError as exc:
                    if not daemon.alive:
                        raise
                    logger.info("direct I/O with aio=%s not available on the target (%s)", aio, exc)
            logger.info("%s: writing through the page cache", self.image)
        return self._open_export(daemon, files, direct=False)

    @staticmethod
    def _open_export(daemon: qemu.StorageDaemon, files: list[Path], **how: Any) -> qemu.Export:
        try:
            return daemon.export_chain(files, writable=True, preallocate=True, **how)
        except QemuError as exc:
            if "preallocate" not in str(exc) or not daemon.alive:
                raise
            logger.info("qemu has no preallocate filter (%s); the layer file grows write by write", exc)
        return daemon.export_chain(files, writable=True, **how)

    def _transfer(
        self,
        daemon: qemu.StorageDaemon,
        src: RbdImage,
        files: list[Path],
        base: Base,
        snap: SnapInfo,
        sums: OrderedWriter,
        first_diff: list[Extent] | None,
    ) -> Stats:
        """``src``: the snapshot, for the diff, the first reader and the sample; it is set back
        to the head (by :class:`Started`) only after every reader has stopped."""
        changed: list[Range] = []
        with (
            Progress(str(self.image), snap.size, enabled=self.opts.progress) as bar,
            # Closed here, in this thread: a generator left to the garbage
            # collector would run its clean-up in whatever thread runs it.
            contextlib.closing(self._chunks(src, base, snap, bar.skip, changed, first_diff)) as planned,
        ):
            head, rest = peek_small(planned)  # the diff decides how the layer is written
            export = self._export(daemon, files, small=rest is None)
            try:
                pool = ConnectionPool(export.socket, export.name, self.opts.parallel)
                try:
                    if pool.size < snap.size:
                        raise QemuError(f"layer is {pool.size} bytes, snapshot {snap.size}")
                    chunks = head if rest is None else itertools.chain(head, rest)
                    stats = self._pull(src, base, snap, pool, sums, bar, chunks)
                    if base.point is not None:
                        self._check_unchanged(pool, src, snap, changed)
                    pool.flush()
                finally:
                    pool.close()
            finally:
                daemon.remove_export(export)
        self.stats = stats
        logger.info(
            "%s: %d bytes data, %d bytes zeros written, %d zero bytes skipped",
            self.image,
            stats.data_bytes,
            stats.zero_bytes,
            stats.skipped_bytes,
        )
        return stats

    def _pull(
        self,
        src: RbdImage,
        base: Base,
        snap: SnapInfo,
        pool: ConnectionPool,
        sums: OrderedWriter,
        bar: Progress,
        chunks: Iterable[Chunk],
    ) -> Stats:
        return Transfer(
            open_reader=self._readers(src, snap),
            sink=pool,
            sums=sums,
            size=snap.size,
            workers=self.opts.parallel,
            hide_zeros=base.point is not None,
            progress=bar.update,
            fault=_mid_transfer_fault,
            interrupt=self.opts.interrupt,
        ).run(chunks)

    def _readers(self, src: RbdImage, snap: SnapInfo) -> Callable[[], AbstractContextManager[RbdImage]]:
        """Opens a reader for each puller thread; the first gets ``src`` itself.

        Only when the diff is one call: a diff call of a later window then
        never runs on ``src`` while a puller reads through it.
        """
        shared = [src] if snap.size <= DIFF_WINDOW else []
        lock = threading.Lock()

        def open_reader() -> AbstractContextManager[RbdImage]:
            with lock:
                first = shared.pop() if shared else None
            if first is not None:
                return contextlib.nullcontext(first)
            return self.cluster.image(self.image, snapshot=snap.name, read_only=True)

        return open_reader

    def _diff(self, img: RbdImage, base: Base, start: int, length: int) -> list[Extent]:
        return img.diff(start, length, base.point.snapshot.name if base.point else None, self.opts.whole_object)

    def _chunks(
        self,
        img: RbdImage,
        base: Base,
        snap: SnapInfo,
        skip: Callable[[int], None],
        changed: list[Range],
        first: list[Extent] | None,
    ) -> Generator[Chunk, None, None]:
        """Planned requests, window by window (``first``: the first window's diff, if made ahead);
        ``changed`` collects the ranges they cover."""
        seen = 0
        for start, end in windows(snap.size, DIFF_WINDOW):
            extents = first if start == 0 and first is not None else self._diff(img, base, start, end - start)
            kept = drop_extent(extents, seen) + boundary_extent(base.point.size if base.point else None, snap.size)
            seen += len(extents)
            chunks = plan(kept, start=start, end=end)
            changed += union((c.offset, c.end) for c in chunks)
            skip(end - start - sum(c.length for c in chunks))
            yield from chunks

    def _check_unchanged(self, pool: ConnectionPool, img: RbdImage, snap: SnapInfo, changed: list[Range]) -> None:
        """Compare a random sample of what the diff calls unchanged with the snapshot itself.

        The new layer reads those regions from its backing chain (the previous
        point); they must equal the snapshot.  A difference means librbd's
        diff cannot be trusted for this image.
        """
        unchanged = subtract([(0, snap.size)], union(changed))
        sample = sample_ranges(unchanged, self.opts.check_unchanged, UNCHANGED_REGION, random.Random())
        if not sample:
            return
        conn = pool.for_thread()
        for (start, end), data in zip(sample, img.read_many(sample), strict=True):
            if data != conn.pread(end - start, start):
                raise DiffMismatch(self.image, f"region {start}-{end} differs from the previous point")
        logger.info("%s: %d unchanged regions sampled, all equal to the snapshot", self.image, len(sample))


def point_files(point_id: str) -> tuple[str, ...]:
    """The files a backup of ``point_id`` creates: its layer and checksums, and their ``.partial`` files."""
    files = (names.layer_file(point_id), names.sums_file(point_id))
    return (*files, *(names.partial(f) for f in files))


def _mid_transfer_fault(seq: int) -> None:
    if seq == 2:
        crashpoint("mid-transfer")


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
    if "damaged" in latest.flags:
        return Base(None, f"point {latest.id} failed verification: new chain")
    if "no-incremental" in latest.flags:
        return Base(None, f"librbd's diff since {latest.id} missed changes: new chain")
    snap = next((s for s in snapshots if s.name == latest.snapshot.name), None)
    if snap is None:
        return Base(None, f"snapshot {latest.snapshot.name} of the last point is gone: new chain")
    if snap.id != latest.snapshot.id:
        return Base(None, f"snapshot {snap.name} has id {snap.id}, manifest says {latest.snapshot.id}: new chain")
    if not (directory / latest.file).is_file():
        return Base(None, f"layer {latest.file} is missing: new chain")
    return Base(latest, f"changes since {latest.id}")


__all__ = ["BackupOptions", "BackupResult", "Cancelled", "backup", "choose_base"]
