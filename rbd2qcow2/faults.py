"""Named crash points for fault tests.

``RBD2QCOW2_CRASH_AT=<name>`` in the environment makes the process SIGKILL
itself when it reaches that point, so tests can kill the real process at an
exact step of the commit sequence.  Unset, a crash point costs one lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "RBD2QCOW2_CRASH_AT"
POINTS = (
    "after-snapshot",
    "mid-transfer",
    "before-rename",
    "after-rename",
    "after-commit",
)


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
