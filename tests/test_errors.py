"""Pure tests of the exception tree: messages, exit codes, the combined exit code."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from rbd2qcow2.core import errors
from rbd2qcow2.core.errors import (
    SEVERITY,
    Cancelled,
    CephError,
    CephUnavailable,
    ChainDamaged,
    ConfigError,
    DataError,
    Error,
    Locked,
    NbdError,
    NotFound,
    QemuError,
    TargetError,
    UsageError,
    combined_exit_code,
)

# -- messages --------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (Error("something failed"), "something failed"),
        (UsageError("bad spec"), "bad spec"),
        (DataError("bad data"), "bad data"),
        (
            ChainDamaged("/t/rbd/vm", "manifest checksum mismatch"),
            "chain /t/rbd/vm is damaged: manifest checksum mismatch",
        ),
        (NotFound("rbd/vm: not found"), "rbd/vm: not found"),
        (CephUnavailable("timed out"), "Ceph cluster unavailable: timed out"),
        (CephError("diff failed"), "Ceph: diff failed"),
        (QemuError("check failed"), "qemu: check failed"),
        (NbdError("EIO"), "NBD: EIO"),
        (TargetError("/t is not a directory"), "target: /t is not a directory"),
        (Locked("rbd/vm"), "rbd/vm is locked by another rbd2qcow2 run"),
        (ConfigError("unknown key x"), "configuration: unknown key x"),
    ],
)
def test_messages_from_docstring_templates(exc: Error, message: str) -> None:
    assert str(exc) == message


def test_non_string_arguments() -> None:
    assert str(CephError(42)) == "Ceph: 42"
    assert str(ChainDamaged("/x", ValueError("boom"))) == "chain /x is damaged: boom"


def test_braces_in_arguments_are_not_templates() -> None:
    assert str(Error("{0} {}")) == "{0} {}"
    assert str(ChainDamaged("{x}", "{0}")) == "chain {x} is damaged: {0}"
    assert str(NotFound("pool/{name}")) == "pool/{name}"


def test_too_few_arguments_fall_back_to_joined_args() -> None:
    assert str(ChainDamaged("only one")) == "only one"


def test_extra_arguments_are_ignored_by_the_template() -> None:
    assert str(CephError("a", "b")) == "Ceph: a"


def test_args_are_kept() -> None:
    exc = ChainDamaged("/t", "why")
    assert exc.args == ("/t", "why")
    with pytest.raises(DataError):
        raise exc


# -- exit codes ------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (Error, 1),
        (UsageError, 64),
        (DataError, 65),
        (ChainDamaged, 65),
        (errors.DiffMismatch, 65),
        (NotFound, 66),
        (CephUnavailable, 69),
        (CephError, 74),
        (QemuError, 74),
        (errors.QemuUnavailable, 69),
        (errors.LayerCorrupt, 65),
        (NbdError, 74),
        (TargetError, 73),
        (Locked, 75),
        (errors.InUse, 75),
        (errors.Claimed, 75),
        (errors.StorageError, 74),
        (errors.TargetFull, 74),
        (ConfigError, 78),
    ],
)
def test_exit_codes(cls: type[Error], code: int) -> None:
    assert cls.exit_code == code
    assert cls("x", "y").exit_code == code
    assert issubclass(cls, Error) and issubclass(cls, Exception)


def test_exit_codes_are_sysexits() -> None:
    assert UsageError.exit_code == os.EX_USAGE
    assert DataError.exit_code == os.EX_DATAERR
    assert NotFound.exit_code == os.EX_NOINPUT
    assert CephUnavailable.exit_code == os.EX_UNAVAILABLE
    assert CephError.exit_code == os.EX_IOERR
    assert TargetError.exit_code == os.EX_CANTCREAT
    assert Locked.exit_code == os.EX_TEMPFAIL
    assert ConfigError.exit_code == os.EX_CONFIG


def test_every_error_class_has_a_severity() -> None:
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Error)]
    assert len(classes) == 20
    for cls in classes:
        assert cls.exit_code in SEVERITY, cls
        assert cls.__doc__ and "{}" in cls.__doc__, cls


@pytest.mark.parametrize(
    ("code", "cls", "text"),
    [
        (errno.ENOSPC, errors.TargetFull, "target file system full: /t/x: No space left on device"),
        (errno.EDQUOT, errors.TargetFull, "target file system full: /t/x: Disk quota exceeded"),
        (errno.EIO, errors.StorageError, "target I/O error: /t/x: Input/output error"),
        (errno.EROFS, errors.StorageError, "target I/O error: /t/x: Read-only file system"),
    ],
)
def test_storage_error_of_an_os_error(code: int, cls: type[Error], text: str) -> None:
    err = errors.storage_error(OSError(code, os.strerror(code), "/t/x"))
    assert type(err) is cls and err.exit_code == 74 and str(err) == text
    # A write names no file: the caller does.
    assert str(errors.storage_error(OSError(code, os.strerror(code)), "/t/x")) == text
    assert code in errors.STORAGE_ERRNOS


def test_chain_damaged_is_a_data_error() -> None:
    assert issubclass(ChainDamaged, DataError)


# -- Cancelled -------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "code", "name"),
    [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM"), (signal.SIGHUP, 129, "SIGHUP")],
)
def test_cancelled(signum: int, code: int, name: str) -> None:
    exc = Cancelled(signum)
    assert exc.signum == signum
    assert exc.exit_code == code == 128 + signum
    assert str(exc) == f"cancelled by {name}"


def test_cancelled_is_not_an_exception() -> None:
    assert issubclass(Cancelled, BaseException)
    assert not issubclass(Cancelled, Exception)
    assert not issubclass(Cancelled, Error)
    with pytest.raises(Cancelled):
        try:
            raise Cancelled(signal.SIGTERM)
        except Exception:
            pytest.fail("except Exception swallowed Cancelled")


# -- combined_exit_code ----------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([], 0),
        ([0], 0),
        ([0, 0, 0], 0),
        ([1], 1),
        ([0, 74, 0], 74),
        ([64, 65], 65),
        ([1, 64], 64),
        ([75, 74], 74),
        ([66, 78], 78),
        ([73, 69], 69),
        ([74, 69], 74),
        ([65, 74, 69, 73, 78, 66, 75, 64, 1], 65),
        ([1, 75, 64], 75),
        ([66, 75], 66),
        ([200], 200),
        ([3, 200], 200),
    ],
)
def test_combined_exit_code(codes: list[int], expected: int) -> None:
    assert combined_exit_code(codes) == expected
    assert combined_exit_code(list(reversed(codes))) == expected


def test_severity_order() -> None:
    assert SEVERITY == (
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
    for i, worse in enumerate(SEVERITY):
        for better in SEVERITY[i + 1 :]:
            assert combined_exit_code([better, worse, 0]) == worse


def test_a_qemu_error_of_a_full_disk_is_target_full() -> None:
    from rbd2qcow2.core.errors import NbdError, QemuError
    from rbd2qcow2.ops.prune import as_target_full

    full = as_target_full(NbdError("write of 65536 bytes at 0 failed: nbd_pwrite: No space left on device"))
    assert isinstance(full, errors.TargetFull) and str(full).startswith("target file system full: NBD: write")
    assert isinstance(as_target_full(QemuError("commit: Disk quota exceeded")), errors.TargetFull)
    other = QemuError("Could not open 'x': Permission denied")
    assert as_target_full(other) is other


# -- one mapping from any exception to its error and exit code ---------------------------


def test_as_error_keeps_a_project_error() -> None:
    err = NotFound("pool/x")
    assert errors.as_error(err) is err and errors.as_error(err, target_io=True) is err


def test_as_error_of_an_os_error() -> None:
    full = errors.as_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/t/x"))
    assert isinstance(full, errors.TargetFull) and full.exit_code == 74
    # An errno that is no file-system failure is a bug, unless the caller only touched the target.
    denied = OSError(errno.EACCES, os.strerror(errno.EACCES), "/t/x")
    assert isinstance(errors.as_error(denied), errors.InternalError)
    on_target = errors.as_error(denied, target_io=True)
    assert type(on_target) is errors.StorageError and on_target.exit_code == 74
    assert str(on_target) == "target I/O error: /t/x: Permission denied"


def test_as_error_of_anything_else_is_an_internal_error() -> None:
    bug = errors.as_error(KeyError("k"))
    assert isinstance(bug, errors.InternalError) and not isinstance(bug, Error)
    assert bug.exit_code == os.EX_SOFTWARE == 70
    assert str(bug) == "internal error: KeyError('k')"
