"""Block jobs of a qemu-storage-daemon: their status as a type, and the wait until one concluded."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ...core.errors import QemuError

JOB_STALL_TIMEOUT = 300.0  # seconds a block job may go without progress
POLL = 0.25  # seconds between looks at a job when qemu sends no event


class JobHost(Protocol):
    """What a job's wait needs of its daemon (:class:`~.session.QmpSession`)."""

    @property
    def alive(self) -> bool: ...

    def cmd(self, command: str, **args: Any) -> Any: ...

    def expire(self, why: str) -> None: ...

    def log_tail(self) -> str: ...

    def next_event(self, timeout: float) -> None: ...


@dataclass(frozen=True)
class JobStatus:
    """One job of ``query-jobs``."""

    id: str
    status: str  # qemu's JobStatus: "running", "ready", "concluded", ...
    progress: int  # qemu's current-progress: bytes done so far
    error: str | None  # why a concluded job failed

    @classmethod
    def from_qmp(cls, info: dict[str, Any]) -> JobStatus:
        error = info.get("error")
        return cls(
            str(info["id"]),
            str(info["status"]),
            int(info.get("current-progress", 0)),
            None if error is None else str(error),
        )

    @property
    def ready(self) -> bool:
        """The job waits for ``job-complete`` (a commit of the active layer)."""
        return self.status == "ready"

    @property
    def concluded(self) -> bool:
        """The job ended, successfully or not, and waits to be dismissed."""
        return self.status == "concluded"


def job_status(daemon: JobHost, job: str) -> JobStatus:
    """The status of ``job``; :class:`QemuError` when qemu no longer knows it."""
    found = [j for j in daemon.cmd("query-jobs") if j.get("id") == job]
    if not found:
        raise QemuError(f"block job {job} vanished")
    return JobStatus.from_qmp(found[0])


def wait_job(daemon: JobHost, job: str, progress: Callable[[int], None] | None) -> None:
    """Until the job concluded; a job without progress for :data:`JOB_STALL_TIMEOUT` is given up (daemon killed).

    ``progress`` is told the bytes done since its last call.
    """
    done = 0
    moved = time.monotonic()
    while True:
        status = job_status(daemon, job)
        if status.progress > done:
            if progress is not None:
                progress(status.progress - done)
            done = status.progress
            moved = time.monotonic()
        elif time.monotonic() - moved > JOB_STALL_TIMEOUT:
            daemon.expire(f"block job {job} made no progress in {JOB_STALL_TIMEOUT:.0f} s")
            raise QemuError(f"block job {job} made no progress in {JOB_STALL_TIMEOUT:.0f} s; daemon killed")
        if status.ready:
            daemon.cmd("job-complete", id=job)
        elif status.concluded:
            daemon.cmd("job-dismiss", id=job)
            if status.error is not None:
                raise QemuError(f"block job {job} failed: {status.error}")
            return
        if not daemon.alive:
            raise QemuError(f"qemu-storage-daemon died during block job {job}: {daemon.log_tail()}")
        daemon.next_event(POLL)
