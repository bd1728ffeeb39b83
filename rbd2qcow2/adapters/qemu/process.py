"""The qemu-storage-daemon process: its directory, its start, and its end, each wait bounded."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from ...core.errors import QemuUnavailable

logger = logging.getLogger(__name__)

QUIT_TIMEOUT = 10.0  # seconds for the daemon to quit, then as long after SIGTERM, then SIGKILL
DIR_PREFIX = "rbd2qcow2-qsd-"  # + the owner's pid + "-" + random: the daemon's sockets and log


def remove_stale_dirs(tmp: Path) -> None:
    """Remove daemon directories left by processes that no longer exist (killed by SIGKILL, say).

    Only directories of this user named with a pid that is not running; a
    directory whose pid was reused by another process is left for later.
    """
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith(DIR_PREFIX):
            continue
        pid_text = name[len(DIR_PREFIX) :].partition("-")[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def daemon_env() -> dict[str, str]:
    """The daemon's environment: glibc keeps freed request buffers instead of unmapping them.

    qemu allocates a bounce buffer per NBD request; above glibc's mmap
    threshold every 4 MiB write would cost a fresh mapping and a page fault
    per page of it.
    """
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456")
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # SIGKILL, not SIGTERM: qemu handles SIGTERM in its main loop, which a stuck daemon never
    # runs, so it would outlive us holding its image locks; what it wrote is the commit protocol's.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(qmp_path: Path, cwd: Path | None, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a daemon that connects to the QMP socket ``qmp_path`` and dies with this process."""
    log = open(log_path, "wb")  # noqa: SIM115 - kept by the child
    with log:
        try:
            return subprocess.Popen(
                ["qemu-storage-daemon", "--chardev", f"socket,id=qmp0,path={qmp_path}", "--monitor", "chardev=qmp0"],
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                stdout=log,
                stderr=log,
                env=daemon_env(),
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise QemuUnavailable(f"cannot start qemu-storage-daemon: {exc.strerror}") from exc


def kill(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL the daemon if it runs, and reap it (bounded)."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(QUIT_TIMEOUT)


def end(proc: subprocess.Popen[bytes], ask_to_quit: Callable[[], None] | None) -> None:
    """End a running daemon: ``ask_to_quit`` (QMP ``quit``) or else SIGTERM, then SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    if ask_to_quit is not None:
        ask_to_quit()
    else:
        proc.terminate()
    try:
        proc.wait(QUIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.warning("qemu-storage-daemon did not quit in %.0f s; terminating it", QUIT_TIMEOUT)
        proc.terminate()
        try:
            proc.wait(QUIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
