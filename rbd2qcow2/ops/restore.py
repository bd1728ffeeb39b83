"""Restores: a point into an RBD image, a raw file, a block device or a flat qcow2; overlays; NBD serving.

Every path checks the chain's headers against the manifest before qemu
opens a file (:mod:`rbd2qcow2.ops.located`) and reads the data
through qemu, never by parsing qcow2.  Restores read the point through a
qemu NBD export of its chain and check every block they copy against the
checksums recorded when it was backed up, in the same pass: a block that
differs fails the restore (:class:`ChainDamaged`, exit 65) and nothing is
left under the destination's name.  Overlays and NBD exports hand out the
chain itself, so they first run the structural checks (:func:`check_structure`).
File restores need no Ceph at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters import qemu
from ..adapters.nbdio import Connection, ConnectionPool
from ..core.errors import ChainDamaged, Error, QemuError, StorageError, TargetError, UsageError
from ..core.faults import crashpoint
from ..core.names import ImageSpec, parse_spec
from ..core.threads import every
from ..store import qcow2
from ..store.fsutil import DIR_MODE, FILE_MODE, fsync_dir
from ..store.layout import PARTIAL_SUFFIX
from ..transfer.copier import BlockCheck, Copier, Sink, allocated_chunks
from ..transfer.progress import Progress
from .located import Located, block_check, check_structure, locate

if TYPE_CHECKING:  # ceph (rados, rbd) is imported only by the RBD paths
    from ..adapters.ceph import Cluster
    from .image_config import ImageFlags

logger = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
WRITE_DEPTH = 32  # RBD writes in flight at most (rbd import keeps 10)
WRITE_BYTES = 64 << 20  # and bytes in flight at most
FILE_CHUNK = 4 << 20  # bytes per read of a file restore
WRITEBACK_INTERVAL = 0.05
TEMP_MARK = ".rbd2qcow2-restoring-"  # an RBD restore writes <name><mark><random>, renamed at the end
STRAY_NAME_AGE = 300  # seconds: an id object without image this old is no create in progress
ASIDE_MARK = ".rbd2qcow2-replaced-"  # --force: the old image under this name until the new one is in place


def parse_rbd_dest(text: str) -> ImageSpec:
    """``rbd:POOL/IMAGE`` or ``rbd:POOL/NAMESPACE/IMAGE``."""
    sel = parse_spec(text.removeprefix("rbd:"))
    if sel.name is None:
        raise UsageError(f"--to {text!r}: expected rbd:POOL/IMAGE")
    return ImageSpec(sel.pool, sel.namespace or "", sel.name)


# -- files ------------------------------------------------------------------------


def restore_file(loc: Located, out: Path, fmt: str, *, force: bool, parallel: int = 4, progress: bool = False) -> None:
    """A sparse raw file or a flat qcow2 (no backing file) of the point, written atomically;
    or, with ``force``, the data written in place into an existing block device."""
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}")
    mode = _dest_mode(out)
    if mode is not None and not force:
        raise TargetError(f"{out} exists (use --force to replace it)")
    if mode is not None and stat.S_ISBLK(mode):
        if fmt != "raw":
            raise UsageError(f"{out} is a block device: only --format raw can be written into it")
        _restore_to_device(loc, out, parallel=parallel, progress=progress)
        return
    check = block_check(loc)
    tmp = out.with_name(f".{out.name}{PARTIAL_SUFFIX}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        if fmt == "raw":
            _write_raw(loc, tmp, check, parallel=parallel, progress=progress)
        else:
            _write_qcow2(loc, tmp, check, parallel=parallel, progress=progress)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise StorageError(f"{out}: {exc.strerror or exc}") from exc
        raise


def _dest_mode(out: Path) -> int | None:
    """The mode of what is at ``out`` (a link itself, not its target), None if nothing;
    refuses what a restore can neither replace nor write into."""
    try:
        st = out.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TargetError(f"{out}: {exc.strerror or exc}") from exc
    mode = st.st_mode
    if stat.S_ISDIR(mode):
        raise TargetError(f"{out} is a directory")
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISBLK(mode)):
        kind = "character device" if stat.S_ISCHR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
        if stat.S_ISSOCK(mode):
            kind = "socket"
        raise TargetError(f"{out} is a {kind}: a restore writes only files, block devices and RBD images")
    return mode


def _write_raw(loc: Located, tmp: Path, check: BlockCheck | None, *, parallel: int, progress: bool) -> None:
    """``tmp`` created (mode 0600, never through a link), filled from an NBD export of the chain, fsynced.

    Blocks qemu reports as zeros stay holes.  Writeback of the written pages
    is started every few milliseconds (``POSIX_FADV_DONTNEED`` starts it
    without waiting), so the final fsync has little left to wait for.
    """
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.ftruncate(fd, loc.point.size)
        with _early_writeback(fd):
            _copy_chain(loc, _CopyOptions(_FileSink(fd), check, parallel, progress))
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_to_device(loc: Located, dev: Path, *, parallel: int, progress: bool) -> None:
    """Write the point in place into a block device (opened exclusively: not while mounted), zeros included."""
    check = block_check(loc)
    try:
        fd = os.open(dev, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"{dev}: cannot open the device exclusively: {exc.strerror or exc}") from exc
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < loc.point.size:
            raise TargetError(f"{dev} holds {size} bytes, the point {loc.point.size}: too small")
        _copy_chain(loc, _CopyOptions(_FileSink(fd), check, parallel, progress, overwrite=True))
        os.fsync(fd)
    except ChainDamaged:
        logger.error("%s: the device was partly written: its content is not the point's", dev)
        raise
    except OSError as exc:
        raise StorageError(f"{dev}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _write_qcow2(loc: Located, tmp: Path, check: BlockCheck | None, *, parallel: int, progress: bool) -> None:
    """A flat qcow2 at ``tmp``, written through a writable export of its own (data only), then fsynced."""
    qcow2.create_layer(tmp, loc.point.size, None, replace=False)
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with _early_writeback(fd):  # qemu writes through the page cache: the disk works meanwhile
            _fill_qcow2(loc, tmp, check, parallel=parallel, progress=progress)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill_qcow2(loc: Located, tmp: Path, check: BlockCheck | None, *, parallel: int, progress: bool) -> None:
    with qemu.storage_daemon() as daemon:
        try:
            out = daemon.export_chain([tmp], writable=True)
            pool = ConnectionPool(out.socket, out.name, parallel)
            try:
                _copy_chain(loc, _CopyOptions(_NbdSink(pool), check, parallel, progress), daemon=daemon)
                with daemon.bounded("flushing the new qcow2", qemu.QMP_TIMEOUT * 10):
                    pool.flush()
            finally:
                pool.close()
            daemon.remove_export(out)
        except BaseException:
            daemon.kill()
            raise


class _FileSink:
    """Writes into a file or device by offset (``pwrite``; threads need no lock)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._zeros = bytes(FILE_CHUNK)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def zero(self, length: int, offset: int) -> None:
        for pos in range(offset, offset + length, FILE_CHUNK):
            self.pwrite(memoryview(self._zeros)[: min(FILE_CHUNK, offset + length - pos)], pos)

    def wait(self) -> None:
        pass


class _NbdSink:
    """Writes into an NBD export, from each thread through its connection of the pool."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._pool.for_thread().pwrite(memoryview(data), offset)

    def zero(self, length: int, offset: int) -> None:
        self._pool.for_thread().zero(length, offset)

    def wait(self) -> None:
        pass


@dataclass(frozen=True)
class _CopyOptions:
    """Where a point's content goes and how it is copied there."""

    sink: Sink
    check: BlockCheck | None  # the blocks' checksums, or None: not checked
    parallel: int  # readers of the export
    progress: bool  # show a progress bar
    overwrite: bool = False  # write the zeros too: a device's old content is not zero
    align: int = FILE_CHUNK  # the allocation map's chunks are split at multiples of this


def _copy_chain(loc: Located, opts: _CopyOptions, *, daemon: qemu.StorageDaemon | None = None) -> None:
    """Copy the point from a read-only export of its chain into ``opts.sink`` (a daemon of its own unless given)."""
    with contextlib.ExitStack() as stack:
        if daemon is None:
            daemon = stack.enter_context(qemu.storage_daemon())
        _transfer(loc, daemon, opts)


def _transfer(loc: Located, daemon: qemu.StorageDaemon, opts: _CopyOptions) -> None:
    """Read the chain through NBD by its allocation map, check, write; any failure or signal kills the
    daemon first, so that no reader stays blocked on it."""
    size, sink = loc.point.size, opts.sink
    try:
        export = daemon.export_for_reading(loc.files)
        with Progress(loc.ref, size, enabled=opts.progress) as bar, Connection(export.socket, export.name) as mapper:
            try:
                if mapper.size < size:
                    raise ChainDamaged(loc.ref, f"qemu exports {mapper.size} bytes, the point has {size}")
                copier = Copier(
                    lambda: Connection(export.socket, export.name),
                    sink,
                    readers=opts.parallel,
                    overwrite=opts.overwrite,
                    progress=bar.update,
                    check=opts.check,
                    abort=daemon.kill,
                )
                copier.run(allocated_chunks(mapper, size, opts.align))
                sink.wait()
            except BaseException:
                daemon.kill()  # before the connections close: none waits on a stuck daemon
                raise
        daemon.remove_export(export)
    except BaseException:
        daemon.kill()
        raise


@contextlib.contextmanager
def _early_writeback(fd: int) -> Iterator[None]:
    """Start writeback of ``fd``'s dirty pages every ``WRITEBACK_INTERVAL`` s while the body runs.

    ``POSIX_FADV_DONTNEED`` starts writeback of the dirty pages without
    waiting for it, and drops the pages already written: the disk works
    while the restore copies, and the final fsync finds little left to write.
    """

    def kick() -> None:
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    writeback = every(WRITEBACK_INTERVAL, kick, "writeback")
    try:
        yield
    finally:
        writeback.stop()


def make_overlay(loc: Located, new: Path) -> None:
    """A writable qcow2 overlay over the point, for booting a VM, once the chain passed the
    structural checks; the chain is not modified."""
    if new.exists() or new.is_symlink():
        raise TargetError(f"{new} exists")
    check_structure(loc)
    qcow2.create_layer(new, loc.point.size, str(loc.files[-1].resolve()), replace=False)


# -- RBD --------------------------------------------------------------------------


def restore_rbd(
    loc: Located,
    dest: ImageSpec,
    cluster: Cluster,
    *,
    force: bool,
    parallel: int,
    progress: bool,
    flags: ImageFlags | None = None,
) -> None:
    """Write the point into a new image under a temporary name, then rename it to ``dest``.

    A killed restore leaves at most the temporary image (reported and
    removed by the next restore into ``dest``).  With ``force`` an existing
    ``dest`` is not touched until the new image holds the checked data: it
    is renamed aside, the new image renamed into place, and the old one removed.
    The new image takes the point's recorded RBD settings, ``flags`` over them.
    """
    exists = cluster.exists(dest)
    if exists and not force:
        raise TargetError(f"image {dest} exists (use --force to overwrite it)")
    stale = _leftovers(cluster, dest)
    check = block_check(loc)
    temp = ImageSpec(dest.pool, dest.namespace, f"{dest.name}{TEMP_MARK}{secrets.token_hex(4)}")
    from .image_config import ImageFlags, create_image  # the Ceph bindings: only for a restore into RBD

    create_image(cluster, temp, loc.point.size, loc.point.image_config, flags or ImageFlags())
    try:
        _transfer_to_rbd(loc, temp, cluster, check, parallel=parallel, progress=progress)
        crashpoint("before-restore-rename")
        _put_in_place(cluster, temp, dest, replace=exists)
    except BaseException:
        _remove_quietly(cluster, temp)
        raise
    for spec in stale:  # a killed client's watch on them lasts about 30 s: try again
        _remove_quietly(cluster, spec, "left by an interrupted restore")


def _put_in_place(cluster: Cluster, temp: ImageSpec, dest: ImageSpec, *, replace: bool) -> None:
    if not replace:
        cluster.rename_image(temp, dest)
        return
    aside = ImageSpec(dest.pool, dest.namespace, f"{dest.name}{ASIDE_MARK}{secrets.token_hex(4)}")
    cluster.rename_image(dest, aside)
    try:
        cluster.rename_image(temp, dest)
    except BaseException:
        cluster.rename_image(aside, dest)
        raise
    try:
        cluster.remove_image(aside)
    except Error as exc:
        logger.warning("the replaced image is kept as %s: cannot remove it (%s)", aside, exc)


def _leftovers(cluster: Cluster, dest: ImageSpec) -> list[ImageSpec]:
    """Images left by killed restores into ``dest``: our temporary ones are removed, replaced ones reported.

    Returns the temporary ones that could not be removed yet.
    """
    images = cluster.list_images(dest.pool, dest.namespace)
    _free_the_name(cluster, dest, [s for s in images if s.name.startswith(dest.name + TEMP_MARK)])
    stale = []
    for spec in images:
        if spec.name.startswith(dest.name + TEMP_MARK):
            logger.warning("%s: removing %s, left by an interrupted restore", dest, spec.name)
            try:
                cluster.remove_image(spec)
            except Error as exc:
                logger.info("cannot remove %s yet (%s); trying again after the restore", spec, exc)
                stale.append(spec)
        elif spec.name.startswith(dest.name + ASIDE_MARK):
            logger.warning(
                "%s: %s holds the image an interrupted restore --force replaced; remove it once not needed",
                dest,
                spec.name,
            )
    return stale


def _free_the_name(cluster: Cluster, dest: ImageSpec, temps: list[ImageSpec]) -> None:
    """Remove the stray id object a killed rename of ours (or a dead create) left under ``dest``.

    An object that names one of our temporary images, or an image without a
    header written long enough ago, holds the name for no image; anything
    else may be another client's create in progress, and is refused.
    """
    stray = cluster.stray_name(dest)
    if stray is None:
        return
    ours = set()
    for spec in temps:
        with contextlib.suppress(Error):
            ours.add(cluster.image_id(spec))
    if stray.image_id not in ours and (stray.header or stray.age < STRAY_NAME_AGE):
        raise TargetError(
            f"image {dest} is not in the pool's directory, yet its id object rbd_id.{dest.name} exists "
            f"(image id {stray.image_id}, written {stray.age:.0f} s ago): an interrupted create or rename; "
            "remove that object once no client is creating the image"
        )
    logger.warning(
        "%s: removing rbd_id.%s (image id %s, written %.0f s ago), left by an interrupted create or rename",
        dest,
        dest.name,
        stray.image_id,
        stray.age,
    )
    cluster.remove_stray_name(dest)


def _remove_quietly(cluster: Cluster, dest: ImageSpec, what: str = "partly restored") -> None:
    try:
        cluster.remove_image(dest)
        logger.info("removed the %s image %s", what, dest)
    except Exception as exc:
        logger.error("could not remove the %s image %s (remove it by hand): %s", what, dest, exc)


def _transfer_to_rbd(
    loc: Located, dest: ImageSpec, cluster: Cluster, check: BlockCheck | None, *, parallel: int, progress: bool
) -> None:
    with qemu.storage_daemon() as daemon, cluster.image_for_bulk_writes(dest) as img:
        writes = img.async_writes(WRITE_DEPTH, WRITE_BYTES)
        try:
            _transfer(loc, daemon, _CopyOptions(writes, check, parallel, progress, align=img.object_size()))
            img.flush()
        except BaseException:
            writes.settle()  # librbd still holds requests: let them finish before the image is closed
            raise


# -- serving ----------------------------------------------------------------------


def private_socket_path(socket: Path) -> Path:
    """Check (or create) the socket's directory: it must be ours and closed to others."""
    parent = socket.parent
    if not parent.exists():
        os.makedirs(parent, DIR_MODE)
    st = parent.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UsageError(f"{parent} must be a private directory (owned by you, mode 0700) for the socket")
    if socket.exists() or socket.is_symlink():
        raise TargetError(f"{socket} exists")
    return socket


def serve(loc: Located, socket: Path, ready: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """Export the point read-only over NBD on ``socket`` until ``stop`` or a signal, once the chain
    passed the structural checks."""
    check_structure(loc)
    socket = private_socket_path(socket)
    stop = stop or threading.Event()
    try:
        with qemu.storage_daemon(nbd_socket=socket) as daemon:
            daemon.export_chain(loc.files, writable=False, name=loc.point.id)
            os.chmod(socket, 0o600)
            ready(f"nbd+unix:///{loc.point.id}?socket={socket}")
            while not stop.wait(0.5):
                if not daemon.alive:
                    raise QemuError("qemu-storage-daemon exited")
    finally:
        with contextlib.suppress(FileNotFoundError):
            socket.unlink()


__all__ = [
    "FORMATS",
    "Located",
    "check_structure",
    "locate",
    "make_overlay",
    "parse_rbd_dest",
    "restore_file",
    "restore_rbd",
    "serve",
]
