"""Pure parts of the qemu adapter: node options, the run-and-error helper, block job status and waits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rbd2qcow2.adapters import qemu
from rbd2qcow2.adapters.qemu import img, jobs
from rbd2qcow2.core.errors import QemuError, QemuUnavailable


def test_a_file_node_names_only_what_is_asked() -> None:
    assert qemu.file_node(Path("a.qcow2")) == {"driver": "file", "filename": "a.qcow2"}
    assert qemu.file_node("a.qcow2", aio="io_uring", direct=True, read_only=True) == {
        "driver": "file",
        "filename": "a.qcow2",
        "aio": "io_uring",
        "cache": {"direct": True},
        "read-only": True,
    }


def test_a_layer_alone_is_read_only_without_backing() -> None:
    assert qemu.layer_alone(Path("/t/a.qcow2")) == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/t/a.qcow2", "read-only": True},
        "backing": None,
    }


def test_a_writable_top_opened_direct_is_written_with_direct_aio_and_no_read_only() -> None:
    opts = qemu.chain_options([Path("/t/a.qcow2")], writable_top=True, direct=True, direct_aio="native")
    assert opts == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "/t/a.qcow2", "aio": "native", "cache": {"direct": True}},
        "backing": None,
    }


def test_a_failing_tool_is_a_qemu_error_with_its_message_and_command_line() -> None:
    args = ["sh", "-c", "echo broken >&2; exit 3"]
    with pytest.raises(QemuError, match=r"sh failed \(exit 3\): broken \[sh -c echo broken"):
        img.output(args, what="sh")
    assert img.output(["sh", "-c", "echo fine"], what="sh") == "fine\n"


def test_a_tool_that_cannot_run_is_unavailable() -> None:
    with pytest.raises(QemuUnavailable, match="cannot run /nonexistent/qemu-img"):
        img.run(["/nonexistent/qemu-img", "info"])


def test_a_job_status_reads_qemus_fields() -> None:
    status = jobs.JobStatus.from_qmp({"id": "c1-job", "status": "ready", "current-progress": 5, "total-progress": 9})
    assert status == jobs.JobStatus("c1-job", "ready", 5, None)
    assert status.ready and not status.concluded
    failed = jobs.JobStatus.from_qmp({"id": "j", "status": "concluded", "error": "No space left on device"})
    assert failed.concluded and failed.progress == 0 and failed.error == "No space left on device"


class FakeDaemon:
    """Answers ``query-jobs`` from a script of job states, one per look."""

    def __init__(self, states: list[dict[str, Any]]) -> None:
        self.states = states
        self.sent: list[str] = []
        self.alive = True
        self.expired: str | None = None

    def cmd(self, command: str, **args: Any) -> Any:
        self.sent.append(command)
        if command == "query-jobs":
            return [self.states.pop(0)] if self.states else []
        return {}

    def expire(self, why: str) -> None:
        self.expired = why

    def log_tail(self) -> str:
        return "log"

    def next_event(self, timeout: float) -> None:
        pass


def test_a_job_is_completed_when_ready_and_dismissed_once_concluded_with_its_progress_told() -> None:
    daemon = FakeDaemon(
        [
            {"id": "j", "status": "running", "current-progress": 3},
            {"id": "j", "status": "ready", "current-progress": 10},
            {"id": "j", "status": "concluded", "current-progress": 10},
        ]
    )
    told: list[int] = []
    jobs.wait_job(daemon, "j", told.append)
    assert told == [3, 7]
    assert [c for c in daemon.sent if c != "query-jobs"] == ["job-complete", "job-dismiss"]


def test_a_failed_job_is_dismissed_and_raised() -> None:
    daemon = FakeDaemon([{"id": "j", "status": "concluded", "error": "Input/output error"}])
    with pytest.raises(QemuError, match="block job j failed: Input/output error"):
        jobs.wait_job(daemon, "j", None)
    assert daemon.sent[-1] == "job-dismiss"


def test_a_vanished_job_and_a_dead_daemon_are_errors() -> None:
    with pytest.raises(QemuError, match="block job j vanished"):
        jobs.wait_job(FakeDaemon([]), "j", None)
    dead = FakeDaemon([{"id": "j", "status": "running"}])
    dead.alive = False
    with pytest.raises(QemuError, match="died during block job j: log"):
        jobs.wait_job(dead, "j", None)


def test_a_job_without_progress_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "JOB_STALL_TIMEOUT", 0.0)
    daemon = FakeDaemon([{"id": "j", "status": "running"}] * 3)
    with pytest.raises(QemuError, match="made no progress"):
        jobs.wait_job(daemon, "j", None)
    assert daemon.expired is not None and "made no progress" in daemon.expired
