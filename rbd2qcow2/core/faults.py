"""Named fault points for crash and signal tests.

``RBD2QCOW2_CRASH_AT=<name>`` makes the process SIGKILL itself when it
reaches that point, so tests kill the real process at an exact step of the
commit sequence.  ``RBD2QCOW2_STALL_AT=<name>`` makes it create the file
``$RBD2QCOW2_STALL_FILE`` there and sleep, so a test can send a signal at
that exact step.  ``RBD2QCOW2_DROP_EXTENT=<n>`` drops the n-th extent that
librbd's diff reports (0-based, counted per run), to test that a diff that
misses a change is caught.  Unset, a fault point costs an environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

CRASH_ENV = "RBD2QCOW2_CRASH_AT"
STALL_ENV = "RBD2QCOW2_STALL_AT"
STALL_FILE_ENV = "RBD2QCOW2_STALL_FILE"
DROP_EXTENT_ENV = "RBD2QCOW2_DROP_EXTENT"
STALL_SECONDS_ENV = "RBD2QCOW2_STALL_SECONDS"
POINTS = (
    "after-journal",
    "after-snapshot",
    "mid-transfer",
    "before-rename",
    "after-rename",
    "after-commit",
)


def crashpoint(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(STALL_ENV) == name:
        Path(os.environ[STALL_FILE_ENV]).touch()
        time.sleep(float(os.environ.get(STALL_SECONDS_ENV, "60")))


def drop_extent(extents: list[T], seen: int) -> list[T]:
    """The diff fault: drop extent number ``$RBD2QCOW2_DROP_EXTENT`` (``seen`` came before)."""
    which = os.environ.get(DROP_EXTENT_ENV)
    if which is None:
        return extents
    index = int(which) - seen
    return [e for i, e in enumerate(extents) if i != index]
