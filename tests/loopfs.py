"""Small real file systems on loop devices, and filling them to the last byte (needs root)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

MiB = 1 << 20
# mkfs.xfs refuses file systems under 300 MiB.
SIZES = {"ext4": 64 * MiB, "xfs": 300 * MiB}
MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"]}


def usable(fstype: str) -> str | None:
    """Why a loop-mounted ``fstype`` cannot be made here, or None."""
    if os.geteuid() != 0:
        return "loop mounts need root"
    for tool in ("losetup", "mount", "umount", MKFS[fstype][0]):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/bootstrap installs it)"
    return None


def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc.stdout.strip()


@contextlib.contextmanager
def mounted(fstype: str, where: Path) -> Iterator[Path]:
    """A fresh ``fstype`` file system mounted on ``where/mnt``; unmounted and detached after."""
    if (why := usable(fstype)) is not None:
        pytest.skip(why)
    image = where / f"{fstype}.img"
    mnt = where / "mnt"
    mnt.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(SIZES[fstype])
    _run(*MKFS[fstype], str(image))
    device = _run("losetup", "-f", "--show", str(image))
    try:
        _run("mount", device, str(mnt))
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
    finally:
        subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
        image.unlink(missing_ok=True)


def fill(mnt: Path) -> None:
    """Fill the file system to the last byte: a preallocated filler, then writes until ENOSPC.

    XFS hands back speculative preallocation when a file is closed, so the
    writes repeat (in new files) until a single byte finds no room.
    """
    filler = mnt / "filler"
    st = os.statvfs(mnt)
    room = st.f_bfree * st.f_frsize - 4 * MiB
    if room > 0:
        _run("fallocate", "-l", str(room), str(filler))
    for n in range(20):
        wrote = False
        try:
            fh = open(mnt / f"filler-{n}", "wb", buffering=0)  # noqa: SIM115
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return  # no room for one more file (XFS: for its inode)
        with fh:
            for chunk in (MiB, 64 << 10, 4096, 512, 1):
                while True:
                    try:
                        fh.write(bytes(chunk))
                        wrote = True
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        os.sync()
        if not wrote:
            return
    raise AssertionError(f"{mnt} does not fill up")


def assert_full(mnt: Path) -> None:
    """Not one more byte fits into a new file."""
    probe = mnt / "probe"
    try:
        with open(probe, "wb", buffering=0) as fh:
            fh.write(b"x")
            os.fsync(fh.fileno())
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    else:
        raise AssertionError(f"{mnt} is not full")
    finally:
        probe.unlink(missing_ok=True)


def free_bytes(mnt: Path) -> int:
    os.sync()
    st = os.statvfs(mnt)
    return st.f_bfree * st.f_frsize
