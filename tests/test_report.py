"""The run report's exit code: the most serious failure, a cluster that could not be reached as 69."""

from __future__ import annotations

from datetime import UTC, datetime

from rbd2qcow2.cli.report import exit_code
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.ops.run import FAILED, OK, ImageReport, RunReport


def image(name: str, status: str = OK, code: int = 0) -> ImageReport:
    return ImageReport("ceph", ImageSpec("rbd", "", name), status, exit_code=code)


def test_a_run_without_failures_exits_0() -> None:
    assert exit_code(RunReport(datetime.now(UTC), [image("a"), image("b")])) == 0


def test_the_most_serious_failure_decides() -> None:
    report = RunReport(datetime.now(UTC), [image("a", FAILED, 75), image("b", FAILED, 65), image("c")])
    assert exit_code(report) == 65


def test_a_cluster_not_reached_is_unavailable() -> None:
    assert exit_code(RunReport(datetime.now(UTC), [image("a")], errors=["cluster x: down"])) == 69
    report = RunReport(datetime.now(UTC), [image("a", FAILED, 74)], errors=["cluster x: down"])
    assert exit_code(report) == 74  # an I/O error outranks an unreachable cluster
