"""Writing a new point's layer (steps 4 and 5 of :mod:`rbd2qcow2.ops.backup`).

The diff of the snapshot against the base's snapshot is planned window by
window, pulled from RBD into the layer through a qemu-storage-daemon NBD
export, and a sample of what the diff calls unchanged is compared with the
snapshot before the layer is checked and renamed into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import random
import threading
from collections.abc import Callable, Generator, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..adapters import qemu
from ..adapters.ceph import CephOptions, Cluster, RbdImage, SnapInfo
from ..adapters.nbdio import ConnectionPool
from ..core import names
from ..core.errors import CephError, DiffMismatch, QemuError
from ..core.extents import Chunk, Extent, Range, boundary_extent, plan, sample_ranges, subtract, union, windows
from ..core.faults import crashpoint, drop_extent
from ..core.kinds import PointKind
from ..store import manifest as mf
from ..store.checksums import ALGORITHM, BLOCK_SIZE, OrderedWriter
from ..store.fsutil import commit_file
from ..store.layout import layer_file, partial, sums_file
from ..transfer.pipeline import Stats, Transfer, TransferOptions, peek_small
from ..transfer.progress import Progress
from .image_config import recorded_config

logger = logging.getLogger(__name__)

# One diff call per window: each call has a fixed set-up cost, and a window's extents are held in memory.
DIFF_WINDOW = 16 << 30
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
class Base:
    """What the new point builds on: a point (incremental) or nothing (full)."""

    point: mf.Point | None
    reason: str


@dataclass(frozen=True)
class Plan:
    """Steps 1-3's decisions: the new point, what it builds on, and the manifest it will be added to."""

    manifest: mf.Manifest  # as loaded and cleaned, its journal naming the new point's files
    image_id: str
    base: Base
    files: list[Path]  # the base's layer files, oldest first (headers checked)
    point_id: str


@dataclass(frozen=True)
class Source:
    """The new point's snapshot, read through the head's handle set to it, and its empty layer."""

    snap: SnapInfo
    src: RbdImage
    layer: Path  # the ``.partial`` layer file
    first_diff: list[Extent] | None  # the first window's diff, made ahead with the snapshot (small images)


class LayerWriter:
    """Writes one point's layer and checksum file, and renames both into place."""

    def __init__(self, cluster: Cluster, image: names.ImageSpec, opts: BackupOptions, directory: Path) -> None:
        self.cluster = cluster
        self.image = image
        self.opts = opts
        self.dir = directory
        self.stats = Stats()

    def write(self, daemon: qemu.StorageDaemon, plan: Plan, source: Source) -> mf.Point:
        """Steps 4 and 5: the layer and its checksums, checked, synced and renamed; the point that names them."""
        layer = self.dir / layer_file(plan.point_id)
        sums_final = self.dir / sums_file(plan.point_id)
        sums = OrderedWriter(self.dir / partial(sums_final.name))
        try:
            stats = self._transfer(daemon, plan, source, sums)
            config = self._config(source.src)  # once the readers have stopped: they share the handle
            crashpoint("before-rename")
            qemu.check_layer(source.layer)
            sha = sums.finish()
        except BaseException:
            sums.abort()
            raise
        commit_file(sums.path, sums_final)
        commit_file(source.layer, layer)
        crashpoint("after-rename")
        base, snap = plan.base, source.snap
        return mf.Point(
            id=plan.point_id,
            file=layer.name,
            parent=base.point.id if base.point else None,
            created=datetime.now(UTC).isoformat(timespec="milliseconds"),
            size=snap.size,
            image_id=plan.image_id,
            snapshot=mf.Snapshot(snap.name, snap.id),
            kind=PointKind.INCREMENTAL if base.point else PointKind.FULL,
            stored_bytes=layer.stat().st_blocks * 512,
            data_bytes=stats.data_bytes,
            zero_bytes=stats.zero_bytes,
            checksums=mf.Checksums(sums_final.name, ALGORITHM, BLOCK_SIZE, sha),
            image_config=config,
        )

    def _config(self, src: RbdImage) -> mf.ImageConfig | None:
        """The image's settings for the point; a failure to read them loses only them, not the point."""
        try:
            settings = src.settings()
            return recorded_config(settings, self.cluster.pool_name(settings.data_pool_id), self.image.pool)
        except CephError as exc:
            logger.warning("%s: image settings not recorded: %s", self.image, exc)
            return None

    def _export(self, daemon: qemu.StorageDaemon, files: list[Path], *, small: bool) -> qemu.Export:
        """The new layer's export: O_DIRECT where the target has it, else the page cache.

        A small diff's writes go through Linux AIO, which completes them in
        qemu's own thread, where io_uring hands every write that extends the
        file to a worker thread.  A large diff keeps io_uring, whose workers
        overlap its writes.  Either way the layer's file is extended ahead of
        the writes (qemu's ``preallocate`` filter, see :func:`qemu.chain_options`).
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

    def _transfer(self, daemon: qemu.StorageDaemon, plan: Plan, source: Source, sums: OrderedWriter) -> Stats:
        """``source.src`` serves the diff, the first reader and the sample; it is set back to the
        head (by :class:`rbd2qcow2.ops.backup_point.Started`) only after every reader has stopped."""
        snap = source.snap
        changed: list[Range] = []
        with (
            Progress(str(self.image), snap.size, enabled=self.opts.progress) as bar,
            # Closed here, in this thread: a generator left to the garbage
            # collector would run its clean-up in whatever thread runs it.
            contextlib.closing(self._chunks(plan.base, source, bar.skip, changed)) as planned,
        ):
            head, rest = peek_small(planned)  # the diff decides how the layer is written
            export = self._export(daemon, [*plan.files, source.layer], small=rest is None)
            try:
                pool = ConnectionPool(export.socket, export.name, self.opts.parallel)
                try:
                    if pool.size < snap.size:
                        raise QemuError(f"layer is {pool.size} bytes, snapshot {snap.size}")
                    chunks = head if rest is None else itertools.chain(head, rest)
                    stats = self._pull(plan.base, source, pool, sums, bar, chunks)
                    if plan.base.point is not None:
                        self._check_unchanged(pool, source, changed)
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
        base: Base,
        source: Source,
        pool: ConnectionPool,
        sums: OrderedWriter,
        bar: Progress,
        chunks: Iterable[Chunk],
    ) -> Stats:
        return Transfer(
            open_reader=self._readers(source),
            sink=pool,
            sums=sums,
            size=source.snap.size,
            hide_zeros=base.point is not None,
            options=TransferOptions(
                workers=self.opts.parallel,
                progress=bar.update,
                fault=_mid_transfer_fault,
                interrupt=self.opts.interrupt,
            ),
        ).run(chunks)

    def _readers(self, source: Source) -> Callable[[], AbstractContextManager[RbdImage]]:
        """Opens a reader for each puller thread; the first gets ``source.src`` itself.

        Only when the diff is one call: a diff call of a later window then
        never runs on ``src`` while a puller reads through it.
        """
        shared = [source.src] if source.snap.size <= DIFF_WINDOW else []
        lock = threading.Lock()

        def open_reader() -> AbstractContextManager[RbdImage]:
            with lock:
                first = shared.pop() if shared else None
            if first is not None:
                return contextlib.nullcontext(first)
            return self.cluster.image(self.image, snapshot=source.snap.name, read_only=True)

        return open_reader

    def _chunks(
        self, base: Base, source: Source, skip: Callable[[int], None], changed: list[Range]
    ) -> Generator[Chunk, None, None]:
        """Planned requests, window by window (the first window's diff may be made ahead);
        ``changed`` collects the ranges they cover."""
        seen = 0
        size = source.snap.size
        for start, end in windows(size, DIFF_WINDOW):
            if start == 0 and source.first_diff is not None:
                extents = source.first_diff
            else:
                extents = diff(source.src, base, start, end - start, whole_object=self.opts.whole_object)
            kept = drop_extent(extents, seen) + boundary_extent(base.point.size if base.point else None, size)
            seen += len(extents)
            chunks = plan(kept, start=start, end=end)
            changed += union((c.offset, c.end) for c in chunks)
            skip(end - start - sum(c.length for c in chunks))
            yield from chunks

    def _check_unchanged(self, pool: ConnectionPool, source: Source, changed: list[Range]) -> None:
        """Compare a random sample of what the diff calls unchanged with the snapshot itself.

        The new layer reads those regions from its backing chain (the previous
        point); they must equal the snapshot.  A difference means librbd's
        diff cannot be trusted for this image.
        """
        unchanged = subtract([(0, source.snap.size)], union(changed))
        sample = sample_ranges(unchanged, self.opts.check_unchanged, UNCHANGED_REGION, random.Random())
        if not sample:
            return
        conn = pool.for_thread()
        for (start, end), data in zip(sample, source.src.read_many(sample), strict=True):
            if data != conn.pread(end - start, start):
                raise DiffMismatch(self.image, f"region {start}-{end} differs from the previous point")
        logger.info("%s: %d unchanged regions sampled, all equal to the snapshot", self.image, len(sample))


def diff(img: RbdImage, base: Base, start: int, length: int, *, whole_object: bool) -> list[Extent]:
    """The extents of ``img`` (set to the new snapshot) changed since the base's snapshot."""
    return img.diff(start, length, base.point.snapshot.name if base.point else None, whole_object)


def _mid_transfer_fault(seq: int) -> None:
    if seq == 2:
        crashpoint("mid-transfer")
