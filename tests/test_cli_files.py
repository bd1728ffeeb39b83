"""The CLI without Ceph: exit codes of commands that only read the target, a closed stdout,
and what reaches ``main`` from the file system."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from factories import manifest, point, save_chain
from helpers import REPO, run_cli

from rbd2qcow2.cli import main as cli
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store.target import open_target

IMAGE = ImageSpec("rbd", "", "vm1")


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """A target with one image of 400 points in chains of 10 (its files are not needed to list it)."""
    root = tmp_path / "target"
    tag = open_target(root, create=True)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = [(start + timedelta(hours=i)).strftime("%Y%m%dT%H%M%SZ") for i in range(400)]
    points = [point(p, ids[i - 1] if i % 10 else None, tag=tag) for i, p in enumerate(ids)]
    save_chain(root, manifest(*points, image=IMAGE, tag=tag))
    return root


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_delete_without_backups_is_not_found_and_creates_nothing(target: Path) -> None:
    (target / "rbd" / "ghost").mkdir()  # a chain directory without a manifest
    before = tree(target)
    for ref in ("rbd/nothing@latest", "rbd/ghost@latest", "other/vm1@latest"):
        proc = run_cli("delete", "--target", str(target), ref)
        assert proc.returncode == 66, proc.stderr
        assert f"no backups of {ref.split('@')[0]}" in proc.stderr and "Traceback" not in proc.stderr
    assert tree(target) == before


def test_verify_of_an_image_without_a_chain_is_not_found(target: Path) -> None:
    for spec in ("rbd/nothing", "rbd/nothing@latest", "other/vm1"):
        proc = run_cli("verify", "--target", str(target), spec)
        assert proc.returncode == 66, proc.stderr
        assert f"no backups of {spec.split('@')[0]}" in proc.stderr
    proc = run_cli("verify", "--target", str(target), "other")  # a pool: nothing there to check
    assert proc.returncode == 0 and "0 points checked" in proc.stdout, proc.stderr


def test_list_into_a_closed_pipe_ends_quietly(target: Path) -> None:
    """``list --json | head -c 10``: the output is larger than a pipe holds, so the write fails."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbd2qcow2", "list", "--json", "--target", str(target)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10) == b'{\n "points'
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err  # as if ended by SIGPIPE
    assert err == ""


@pytest.mark.parametrize(
    ("code", "exit_code", "message"),
    [
        (errno.ENOSPC, 74, "target file system full: /t/x: No space left on device"),
        (errno.EDQUOT, 74, "target file system full: /t/x: Disk quota exceeded"),
        (errno.EIO, 74, "target I/O error: /t/x: Input/output error"),
        (errno.EROFS, 74, "target I/O error: /t/x: Read-only file system"),
        (errno.EACCES, 70, "internal error"),
    ],
)
def test_an_os_error_that_reaches_main(
    target: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    code: int,
    exit_code: int,
    message: str,
) -> None:
    def fail(*_args: object) -> None:
        raise OSError(code, os.strerror(code), "/t/x")

    monkeypatch.setattr(cli, "list_points", fail)
    with caplog.at_level(logging.ERROR, logger="rbd2qcow2"):
        assert cli.main(["list", "--target", str(target)]) == exit_code
    assert message in caplog.text
