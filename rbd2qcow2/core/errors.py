"""The exception tree of rbd2qcow2.

Every error a user can meet derives from :class:`Error`; its docstring is the
message template and its ``exit_code`` the process exit status (sysexits)::

    BaseException
     +-- Cancelled                 SIGINT/SIGTERM/SIGHUP (exit 130/143/129)
     +-- Exception
          +-- Error                generic failure (exit 1)
          |    +-- UsageError      bad arguments or names (64)
          |    +-- DataError       a chain, manifest or layer is damaged (65)
          |    |    +-- ChainDamaged
          |    |    +-- DiffMismatch  an "unchanged" region differs from the snapshot
          |    +-- NotFound        image, point or snapshot not found (66)
          |    +-- CephUnavailable cluster unreachable or refused us (69)
          |    +-- CephError       a Ceph call failed (74)
          |    +-- QemuError       qemu-img or qemu-storage-daemon failed (74)
          |    |    +-- QemuUnavailable  qemu cannot run or start at all (69)
          |    |    +-- LayerCorrupt     qemu-img check finds a layer corrupt (65)
          |    +-- NbdError        an NBD request failed (74)
          |    +-- StorageError    the target's file system failed (I/O error, read-only) (74)
          |    |    +-- TargetFull  no space left, or the quota is used up
          |    +-- TargetError     the target directory cannot be used (73)
          |    +-- Locked          another run holds the chain lock (75)
          |    |    +-- InUse       another process has a file of the chain open
          |    +-- Claimed         another host holds the image's RADOS claim (75)
          |    +-- ClaimLost       this run's claim lapsed or was taken while it worked (75)
          |    +-- ConfigError     configuration is wrong (78)
          +-- InternalError        any other exception: a bug (70)

``Cancelled`` derives from ``BaseException`` so that no ``except Exception``
can swallow a Ctrl-C, a SIGTERM or a SIGHUP.  :func:`as_error` turns any
exception into one of these, so an exit code comes only from a class.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Literal, overload


class Error(Exception):
    """{}"""

    exit_code = 1

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.args = args

    def __str__(self) -> str:
        doc = (type(self).__doc__ or "{}").strip()
        try:
            return doc.format(*self.args)
        except (IndexError, KeyError):
            return " ".join(str(a) for a in self.args) or doc


class UsageError(Error):
    """{}"""

    exit_code = os.EX_USAGE


class DataError(Error):
    """{}"""

    exit_code = os.EX_DATAERR


class ChainDamaged(DataError):
    """chain {} is damaged: {}"""


class DiffMismatch(DataError):
    """{}: librbd's diff missed changes ({}); nothing committed, the next backup is a full one"""


class NotFound(Error):
    """{}"""

    exit_code = os.EX_NOINPUT


class CephUnavailable(Error):
    """Ceph cluster unavailable: {}"""

    exit_code = os.EX_UNAVAILABLE


class CephError(Error):
    """Ceph: {}"""

    exit_code = os.EX_IOERR


class QemuError(Error):
    """qemu: {}"""

    exit_code = os.EX_IOERR


class QemuUnavailable(QemuError):
    """qemu: {}"""

    exit_code = os.EX_UNAVAILABLE


class LayerCorrupt(QemuError):
    """{}"""

    exit_code = os.EX_DATAERR  # qemu found the layer damaged: data, not a failing tool


class NbdError(Error):
    """NBD: {}"""

    exit_code = os.EX_IOERR


class StorageError(Error):
    """target I/O error: {}"""

    exit_code = os.EX_IOERR


class TargetFull(StorageError):
    """target file system full: {}"""


# What an OSError from the target's file system means for the user: exit 74, not a bug.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
STORAGE_ERRNOS = FULL_ERRNOS | {errno.EIO, errno.EROFS}


def storage_error(exc: OSError, where: object = None) -> StorageError:
    """The project's error for an OSError of the target's file system (``where``: the file, if
    the OSError does not name it)."""
    name = exc.filename if exc.filename is not None else where
    what = f"{name}: {exc.strerror or exc}" if name is not None else str(exc.strerror or exc)
    return TargetFull(what) if exc.errno in FULL_ERRNOS else StorageError(what)


class TargetError(Error):
    """target: {}"""

    exit_code = os.EX_CANTCREAT


class Locked(Error):
    """{} is locked by another rbd2qcow2 run"""

    exit_code = os.EX_TEMPFAIL


class InUse(Locked):
    """{}"""


class Claimed(Error):
    """{} is being backed up by another host"""

    exit_code = os.EX_TEMPFAIL


class ClaimLost(Error):
    """claim on {} lost ({}): work on the image stopped"""

    exit_code = os.EX_TEMPFAIL


class ConfigError(Error):
    """configuration: {}"""

    exit_code = os.EX_CONFIG


class InternalError(Exception):
    """An exception that no :class:`Error` describes: a bug in rbd2qcow2, not something a user can fix."""

    exit_code = os.EX_SOFTWARE

    def __init__(self, cause: Exception) -> None:
        super().__init__(cause)
        self.cause = cause

    def __str__(self) -> str:
        return f"internal error: {self.cause!r}"


@overload
def as_error(exc: Error | OSError, *, target_io: Literal[True]) -> Error: ...
@overload
def as_error(exc: Exception, *, target_io: bool = False) -> Error | InternalError: ...
def as_error(exc: Exception, *, target_io: bool = False) -> Error | InternalError:
    """The project's error for ``exc``, which carries its exit code.

    An :class:`Error` is itself; an OSError is the target's file system failing
    (:func:`storage_error`) when its errno says so, or always with ``target_io``
    (the caller only touches the target's files); anything else is a bug
    (:class:`InternalError`).
    """
    if isinstance(exc, Error):
        return exc
    if isinstance(exc, OSError) and (target_io or exc.errno in STORAGE_ERRNOS):
        return storage_error(exc)
    return InternalError(exc)


class Cancelled(BaseException):
    """Cancelled by a signal; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"cancelled by {signal.Signals(self.signum).name}"


# When several images fail differently, the most serious kind decides the exit
# code: damaged data first, then what an operator must act on.
SEVERITY = (
    os.EX_DATAERR,
    os.EX_IOERR,
    os.EX_UNAVAILABLE,
    os.EX_CANTCREAT,
    os.EX_CONFIG,
    os.EX_NOINPUT,
    os.EX_TEMPFAIL,
    os.EX_USAGE,
    1,
)


def combined_exit_code(codes: list[int]) -> int:
    """The exit code of a run whose images ended with ``codes`` (0 = success)."""
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    for code in SEVERITY:
        if code in failed:
            return code
    return max(failed)
