"""A target whose file system is full to the last byte, on real ext4 and XFS loop mounts.

``verify`` still checks it, and ``prune`` and ``delete`` still free space
(deletions commit with the room of the target's reserve file); what cannot
be done ends with exit 74 and "target file system full", never with a
traceback, and leaves every chain as it was.  The oracle is content: each
point restores as ``rbd export`` of its snapshot read at backup time.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import loopfs
import pytest
from helpers import Ceph, MiB, Workload, assert_same_content, run_cli

from rbd2qcow2.core.names import ImageSpec, sums_file
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph
BOOKKEEPING = {"lock", mf.NAME, "latest"}
RESERVE = ".rbd2qcow2-reserve"


@pytest.fixture(params=["ext4", "xfs"])
def mnt(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with loopfs.mounted(request.param, tmp_path) as where:
        yield where


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    proc: subprocess.CompletedProcess[str] = run_cli(*args, "--no-progress")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def backups(
    ceph: Ceph, target: Path, name: str, tmp: Path, fulls: tuple[bool, ...] = (False, False, True, False)
) -> dict[str, Path]:
    """Backups (``--full`` where ``fulls`` says, by default two chains of two points); each point's content."""
    ceph.create(name, 8 * MiB)
    work = Workload(seed=11)
    expected: dict[str, Path] = {}
    for full in fulls:
        with ceph.image(name) as img:
            work.run(img, ops=6)
        proc = cli("backup", "--target", str(target), *(["--full"] if full else []), f"{ceph.pool}/{name}")
        assert proc.returncode == 0, proc.stderr
        pid = proc.stdout.strip().rsplit("@", 1)[1]
        expected[pid] = ceph.export(name, manifest(target, ceph, name).point(pid).snapshot.name, tmp / pid)
    return expected


def manifest(target: Path, ceph: Ceph, name: str) -> mf.Manifest:
    m = mf.load(chain_dir(target, ImageSpec(ceph.pool, "", name)))
    assert m is not None
    return m


def assert_clean(target: Path, ceph: Ceph, name: str, expected: dict[str, Path], tmp: Path) -> list[str]:
    """Only the manifest's files are in the chain directory, and every point restores as it should."""
    m = manifest(target, ceph, name)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", name))
    named = {p.file for p in m.points} | {sums_file(p.id) for p in m.points}
    present = {e.name for e in directory.iterdir() if not e.name.startswith("activity.log")}
    assert present - BOOKKEEPING == named
    assert m.pending is None
    for p in m.points:
        out = tmp / f"restored-{p.id}"
        proc = cli("restore", "--target", str(target), f"{ceph.pool}/{name}@{p.id}", "--to", str(out))
        assert proc.returncode == 0, proc.stderr
        assert_same_content(out, expected[p.id])
        out.unlink()
    return [p.id for p in m.points]


def test_a_full_target_is_verified_and_freed(ceph: Ceph, mnt: Path, image_name: str, tmp_path: Path) -> None:
    target = mnt / "target"
    expected = backups(ceph, target, image_name, tmp_path)
    p1, p2, p3, p4 = sorted(expected)
    spec = f"{ceph.pool}/{image_name}"
    loopfs.fill(mnt)
    loopfs.assert_full(mnt)

    # A backup has no room for its layer: refused, nothing left behind, in Ceph neither.
    snapshots = ceph.snapshots(image_name)
    proc = cli("backup", "--target", str(target), spec)
    assert proc.returncode == 74, proc.stderr
    assert "target file system full" in proc.stderr and proc.stdout == "", proc.stderr
    assert ceph.snapshots(image_name) == snapshots
    assert assert_clean(target, ceph, image_name, expected, tmp_path) == [p1, p2, p3, p4]

    for args in (["verify"], ["verify", "--deep"]):
        proc = cli(*args, "--target", str(target))
        assert proc.returncode == 0, proc.stderr
        assert "4 points checked, 0 problems" in proc.stdout
    assert (target / RESERVE).is_file()  # made by the first backup

    # Merging p3 into p4 needs room the target does not have: refused, nothing changed.
    proc = cli("delete", "--target", str(target), f"{spec}@{p3}")
    assert proc.returncode == 74, proc.stderr
    assert "target file system full" in proc.stderr
    assert assert_clean(target, ceph, image_name, expected, tmp_path) == [p1, p2, p3, p4]

    # Dropping the old chain needs no room but the manifest's: it is freed.
    before = loopfs.free_bytes(mnt)
    dropped = sum(manifest(target, ceph, image_name).point(p).stored_bytes for p in (p1, p2))
    proc = cli("prune", "--target", str(target), "--keep-last", "2")
    assert proc.returncode == 0, proc.stderr
    assert "reserve" in proc.stderr
    assert assert_clean(target, ceph, image_name, expected, tmp_path) == [p3, p4]
    reserve = (target / RESERVE).stat().st_blocks * 512  # made again from the room freed
    assert loopfs.free_bytes(mnt) + reserve >= before + dropped

    # Full again: deleting the newest point frees its layer.
    loopfs.fill(mnt)
    proc = cli("delete", "--target", str(target), f"{spec}@{p4}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{spec}@{p4}"
    assert assert_clean(target, ceph, image_name, expected, tmp_path) == [p3]
    proc = cli("verify", "--target", str(target))
    assert proc.returncode == 0, proc.stderr


def test_a_full_target_without_lock_files(ceph: Ceph, mnt: Path, image_name: str, tmp_path: Path) -> None:
    """As after a copy of the target that left out the lock files: XFS has no room for a new one."""
    target = mnt / "target"
    expected = backups(ceph, target, image_name, tmp_path, (False, False))
    p1, p2 = sorted(expected)
    (chain_dir(target, ImageSpec(ceph.pool, "", image_name)) / "lock").unlink()
    loopfs.fill(mnt)
    proc = cli("verify", "--target", str(target))
    assert proc.returncode == 0, proc.stderr
    assert "2 points checked, 0 problems" in proc.stdout
    proc = cli("delete", "--target", str(target), f"{ceph.pool}/{image_name}@{p2}")
    assert proc.returncode == 0, proc.stderr
    assert assert_clean(target, ceph, image_name, expected, tmp_path) == [p1]
    assert (target / RESERVE).stat().st_blocks * 512 >= 8 * MiB  # made again from the room freed
