"""Fault tier: a full target file system (ext4 and xfs on loop devices, filled to the byte).

Promise: an operation that runs out of space fails with exit 74 (I/O) and
no traceback, every committed point still restores equal to its snapshot,
nothing half-written is left under a final name, and once space is freed
the next backup converges (incrementally).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import faultlib as fl
import pytest
from helpers import Ceph, MiB

pytestmark = [pytest.mark.faults, pytest.mark.ceph]

SIZE = 8 * MiB
# xfs needs at least 300 MiB; both leave room for qemu's preallocate filter (128 MiB ahead of the writes).
FS_SIZE = {"ext4": 300 * MiB, "xfs": 300 * MiB}
FULL_70 = "a full target makes prune/delete/verify fail with 70 and a traceback"

needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None, reason="needs root and losetup")


@pytest.fixture(params=["ext4", "xfs"])
def mounted(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    fstype = str(request.param)
    if shutil.which(f"mkfs.{fstype}") is None:
        pytest.fail(f"mkfs.{fstype} missing: run scripts/bootstrap")
    with fl.loop_fs(tmp_path / f"{fstype}.img", tmp_path / "mnt", fstype, FS_SIZE[fstype]) as mnt:
        yield mnt


def chain_on(ceph: Ceph, name: str, mnt: Path, tmp_path: Path, points: int = 3) -> fl.Oracle:
    ceph.create(name, SIZE)
    oracle = fl.Oracle(ceph, name, mnt / "target", tmp_path / "oracle")
    for i in range(points):
        with ceph.image(name) as img:
            img.write(os.urandom(MiB), 2 * i * MiB)
        digest = oracle.current()
        proc = fl.run(["backup", "--target", str(oracle.target), "--no-progress", oracle.spec], {})
        assert proc.returncode == 0, proc.stderr
        oracle.adopt(digest)
    return oracle


def outcome_of(proc: object) -> str:
    code = proc.returncode  # type: ignore[attr-defined]
    return f"exit {code}" + (" with a traceback" if "Traceback" in proc.stderr else "")  # type: ignore[attr-defined]


OPS = [
    "backup",
    "prune",
    "delete",
    "verify",
    "restore",
]


@needs_root
@pytest.mark.parametrize("operation", OPS)
def test_full_target(ceph: Ceph, image_name: str, mounted: Path, tmp_path: Path, operation: str) -> None:
    o = chain_on(ceph, image_name, mounted, tmp_path)
    fstype = "xfs" if (tmp_path / "xfs.img").exists() else "ext4"
    with ceph.image(image_name) as img:
        img.write(os.urandom(2 * MiB), MiB)
    digest = o.current()
    filler = fl.fill(mounted)
    m = o.manifest()
    target = str(o.target)
    args = {
        "backup": ["backup", "--target", target, "--no-progress", o.spec],
        "prune": ["prune", "--target", target, "--keep-last", "1"],
        "delete": ["delete", "--target", target, f"{o.spec}@{m.points[0].id}"],
        "verify": ["verify", "--target", target, "--deep", "--no-progress"],
        "restore": ["restore", "--target", target, f"{o.spec}@{m.points[-1].id}", "--to", str(mounted / "out.raw")],
    }[operation]
    before = fl.tree_hashes(o.target)
    proc = fl.run(args, {})
    problems = []
    if "Traceback" in proc.stderr:
        problems.append("traceback")
    want = 0 if operation == "verify" else 74  # verify writes nothing on a sound chain
    if proc.returncode != want:
        problems.append(f"exit {proc.returncode}, not {want}: {proc.stderr[-300:]}")
    if operation == "restore":
        if fl.tree_hashes(o.target) != before:
            problems.append("restore changed the target")
        if [p.name for p in mounted.iterdir() if p.name not in ("filler", "target", "lost+found")]:
            problems.append(f"restore left {sorted(p.name for p in mounted.iterdir())}")
    partial = sorted(p.name for p in o.directory.iterdir() if ".partial" in p.name)
    if partial:
        problems.append(f"left {partial}")
    o.adopt(digest)
    dropping = {m.points[0].id} if operation == "delete" else set(o.expected) - {m.points[-1].id}
    problems += o.problems(dropping if operation in ("prune", "delete") else set())
    # Space comes back: the next backup converges, incrementally.
    filler.unlink()
    fl.clear_dead_watchers(ceph, image_name)
    again = fl.run(["backup", "--target", target, "--no-progress", o.spec], {})
    if again.returncode != 0:
        problems.append(f"backup after freeing space exited {again.returncode}: {again.stderr[-300:]}")
    else:
        o.adopt(digest)
        latest = o.manifest().latest
        if latest is None or latest.kind != "incremental":
            problems.append("the backup after freeing space was not incremental")
    problems += o.problems(dropping if operation in ("prune", "delete") else set())
    ok: bool | str = not problems
    fl.TABLE.add(f"ENOSPC: {fstype} target full to the byte", operation, outcome_of(proc), ok)
    assert not problems, "; ".join(problems)


@needs_root
def test_small_backup_on_small_free_space(ceph: Ceph, image_name: str, tmp_path: Path) -> None:
    with fl.loop_fs(tmp_path / "small.img", tmp_path / "mnt", "ext4", 48 * MiB) as mnt:
        ceph.create(image_name, SIZE)
        with ceph.image(image_name) as img:
            img.write(os.urandom(MiB), 0)
        free = shutil.disk_usage(mnt).free
        proc = fl.run(["backup", "--target", str(mnt / "target"), "--no-progress", f"{ceph.pool}/{image_name}"], {})
        fl.TABLE.add(f"ext4 target with {free // MiB} MiB free", "backup of 1 MiB", outcome_of(proc), True)
        assert proc.returncode == 0, proc.stderr
