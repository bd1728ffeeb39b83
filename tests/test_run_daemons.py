"""A run's job thread gets a new qemu-storage-daemon when its daemon died, a bounded number of times."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from rbd2qcow2.core.errors import QemuError
from rbd2qcow2.ops import run as nightly


def kill(daemon_pid: int | None) -> None:
    assert daemon_pid is not None
    os.kill(daemon_pid, signal.SIGKILL)


def wait_dead(daemons: nightly.Daemons) -> None:
    deadline = time.monotonic() + 10
    while daemons.daemon is not None and daemons.daemon.alive:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_dead_daemon_is_replaced_at_most_daemon_restarts_times(tmp_path: Path) -> None:
    with nightly.Daemons(tmp_path) as daemons:
        first = daemons.current()
        assert daemons.current() is first  # alive: kept
        first.cmd("query-version")
        seen = {first.pid}
        for n in range(1, nightly.DAEMON_RESTARTS + 1):
            kill(daemons.current().pid)
            wait_dead(daemons)
            new = daemons.current()
            assert new.alive and new.pid not in seen and daemons.restarts == n
            new.cmd("query-version")  # a working daemon, not only a process
            seen.add(new.pid)
        kill(daemons.current().pid)
        wait_dead(daemons)
        last = daemons.current()
        assert not last.alive and last.pid in seen  # no more restarts: the job's images fail with its errors
        with pytest.raises(QemuError):
            last.cmd("query-version")
