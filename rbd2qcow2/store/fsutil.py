"""File-system primitives: atomic replace, fsync of directories, chain locks, the target's reserve."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import FULL_ERRNOS, STORAGE_ERRNOS, ChainDamaged, Locked, TargetError, storage_error
from .layout import LOCK, TMP_SUFFIX, hidden_tmp

logger = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700
# A preallocated file at the target's root that prune and delete remove when
# the file system is full, so that the manifest dropping points can be written.
RESERVE = ".rbd2qcow2-reserve"
RESERVE_BYTES = 8 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: Path, flags: int = 0) -> int:
    """Open a chain's file for reading: never through a link, and only a regular file.

    O_NONBLOCK keeps a planted FIFO from blocking the open; a device or
    FIFO is then refused before anything reads from it.  ``flags`` are
    added (O_DIRECT, for instance).  A link or a file of another type is
    :class:`ChainDamaged`; any other failure stays the ``OSError`` it is.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ChainDamaged(str(path), "a symbolic link, not a regular file") from exc
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ChainDamaged(str(path), "not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file.

    A temporary file in the same directory, fsync, ``os.replace``, fsync of the
    directory (the pattern of borg's ``SaveFile``).  A full file system or an
    I/O error is a :class:`~rbd2qcow2.core.errors.StorageError` and leaves no
    temporary file behind.
    """
    tmp = path.with_name(hidden_tmp(path.name))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, path) from exc
        raise
    fsync_dir(path.parent)


def create_once(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; False when another process was first.

    The data goes to a temporary file of this process first and is then
    hard-linked into place: ``link`` fails when the name exists, so of several
    processes racing to create the file exactly one wins and every reader sees
    a complete file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def commit_file(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it to ``final`` and fsync the directory."""
    os.chmod(tmp, FILE_MODE)
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def make_dirs(root: Path, parts: tuple[str, ...]) -> Path:
    """Create ``root/parts...`` with private modes; refuse links on the way."""
    path = root
    for part in parts:
        path = path / part
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, DIR_MODE)
        if path.is_symlink() or not path.is_dir():
            raise TargetError(f"{path} is not a directory")
    return path


@contextlib.contextmanager
def chain_lock(directory: Path, *, wait: bool, what: str, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``directory/lock`` for the block.

    The kernel releases a flock when its holder dies, so a lock left by a
    killed process is free again at once.
    """
    path = directory / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc) from exc
        raise TargetError(f"cannot open lock file {path}: {exc.strerror}") from exc
    try:
        _acquire(fd, wait=wait, what=what, timeout=timeout)
        _note_pid(fd, path)
        yield
    finally:
        os.close(fd)


def _note_pid(fd: int, path: Path) -> None:
    """Write our pid into the lock file, for people; a full disk must not stop the prune that frees it."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        if exc.errno not in FULL_ERRNOS:
            raise storage_error(exc, path) from exc
        logger.debug("%s: pid not written: %s", path, exc.strerror)


def _acquire(fd: int, *, wait: bool, what: str, timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
        if not wait or (deadline is not None and time.monotonic() > deadline):
            raise Locked(what)
        time.sleep(0.2)


def keep_reserve(root: Path) -> None:
    """Make the target's reserve file whole where there is room; never fails."""
    path = root / RESERVE
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_blocks * 512 >= RESERVE_BYTES:
            return
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        logger.debug("%s: not created: %s", path, exc.strerror)
        return
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
    except OSError as exc:  # full: made whole by a later run; not supported: no reserve here
        logger.debug("%s: not preallocated: %s", path, exc.strerror)
    finally:
        os.close(fd)


def release_reserve(root: Path) -> bool:
    """Remove the target's reserve file to make room; False when there was none."""
    try:
        os.unlink(root / RESERVE)
    except OSError:
        return False
    logger.warning("%s: file system full: its reserve of %d MiB released", root, RESERVE_BYTES >> 20)
    return True
