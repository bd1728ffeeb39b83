"""Fault tier: process faults at named points: the qemu-storage-daemon killed under the CLI, signals.

The CLI's own SIGKILL at each named point is tested in test_cli_ceph.py and
test_prune_ceph.py; here the daemon that writes our files dies instead, at
each named point where one runs, and the CLI must fail cleanly (exit 74, no
traceback), keep every committed point and let the next run converge.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import faultlib as fl
import pytest
from factories import stall_env, wait_stalled
from helpers import Ceph, MiB

from rbd2qcow2.core.faults import CRASH_ENV

pytestmark = [pytest.mark.faults, pytest.mark.ceph]

SIZE = 8 * MiB


def stalled(args: list[str], env: dict[str, str], point: str, stall: Path) -> subprocess.Popen[bytes] | None:
    """The CLI stopped at ``point`` for a few seconds; None if it finished without reaching it."""
    stall.unlink(missing_ok=True)
    proc = fl.start_cli(args, {**env, **stall_env(point, stall, 2)})
    if not wait_stalled(proc, stall):
        proc.communicate()
        return None
    return proc


def scatter(ceph: Ceph, name: str) -> None:
    """Changes in several separate extents, so that the transfer reaches its third chunk (mid-transfer)."""
    with ceph.image(name) as img:
        for off in (MiB, 3 * MiB, 5 * MiB, 7 * MiB):
            img.write(os.urandom(256 * 1024), off)


def kill_daemon(proc: subprocess.Popen[bytes]) -> bool:
    daemons = [pid for pid, comm in fl.group_members(proc.pid) if comm.startswith("qemu-storage")]
    for pid in daemons:
        os.kill(pid, signal.SIGKILL)
    return bool(daemons)


@pytest.fixture
def chain(ceph: Ceph, image_name: str, tmp_path: Path) -> fl.Oracle:
    ceph.create(image_name, SIZE)
    oracle = fl.Oracle(ceph, image_name, tmp_path / "target", tmp_path / "oracle")
    for i in range(3):
        with ceph.image(image_name) as img:
            img.write(os.urandom(MiB), i * 2 * MiB)
        digest = oracle.current()
        proc = fl.run(["backup", "--target", str(oracle.target), "--no-progress", oracle.spec], {})
        assert proc.returncode == 0, proc.stderr
        oracle.adopt(digest)
    return oracle


CASES = [
    ("backup", "after-snapshot"),
    ("backup", "mid-transfer"),
    ("backup", "before-rename"),
    ("prune", "prune-after-journal"),
    ("prune", "prune-during-commit"),
    ("prune", "prune-after-build"),
    ("restore", "mid-restore"),
]


@pytest.mark.parametrize(("operation", "point"), CASES)
def test_daemon_killed_at_named_point(chain: fl.Oracle, ceph: Ceph, tmp_path: Path, operation: str, point: str) -> None:
    box = fl.Sandbox(tmp_path)
    box.allow("target", "oracle", "stall")
    target = str(chain.target)
    scatter(ceph, chain.name)
    digest = chain.current()
    latest = chain.manifest().points[-1].id
    dst = f"{chain.name}-dst"
    args = {
        "backup": ["backup", "--target", target, "--no-progress", chain.spec],
        "prune": ["prune", "--target", target, "--keep-last", "1"],
        "restore": ["restore", "--target", target, f"{chain.spec}@{latest}", "--to", f"rbd:{ceph.pool}/{dst}"],
    }[operation]
    proc = stalled(args, box.env, point, tmp_path / "stall")
    assert proc is not None, f"{point} not reached"
    killed = kill_daemon(proc)
    _out, err = proc.communicate(timeout=120)
    fl.wait_group_gone(proc.pid)
    stderr = err.decode(errors="replace")
    problems = []
    if "Traceback" in stderr:
        problems.append("traceback")
    if killed and proc.returncode not in (0, 74):
        problems.append(f"exit {proc.returncode}, not 74")
    chain.adopt(digest)
    dropping = set(chain.expected) - {latest} if operation == "prune" else set()
    problems += chain.problems(dropping) + box.problems()
    if operation == "restore" and killed and dst in list_images(ceph):
        problems.append("a failed RBD restore left its image")
    # The next normal run converges.
    fl.clear_dead_watchers(ceph, chain.name)
    again = fl.run(args, box.env)
    if again.returncode != 0:
        problems.append(f"next run exited {again.returncode}: {again.stderr[-300:]}")
    chain.adopt(digest)
    problems += chain.problems(dropping) + box.problems()
    if operation == "restore" and dst in list_images(ceph):
        if fl.image_digest(ceph, dst) != chain.expected[latest]:
            problems.append("the restored image differs from the snapshot")
        ceph.remove(dst)
    where = "" if killed else " (no daemon running there)"
    outcome = f"exit {proc.returncode}{where}; next run {again.returncode}"
    fl.TABLE.add(f"qemu-storage-daemon SIGKILL at {point}", operation, outcome, not problems)
    assert not problems, "; ".join(problems)


def list_images(ceph: Ceph) -> list[str]:
    import rbd

    return [str(n) for n in rbd.RBD().list(ceph.ioctx)]


def test_killed_rbd_restore_leaves_no_image(chain: fl.Oracle, ceph: Ceph, tmp_path: Path) -> None:
    latest = chain.manifest().points[-1].id
    dst = f"{chain.name}-dst"
    args = ["restore", "--target", str(chain.target), f"{chain.spec}@{latest}", "--to", f"rbd:{ceph.pool}/{dst}"]
    proc = fl.run(args, {CRASH_ENV: "mid-restore"})
    left = dst in list_images(ceph)
    fl.TABLE.add(
        "rbd2qcow2 SIGKILL at mid-restore",
        "restore (RBD)",
        f"exit {proc.returncode}; image {'left under its name' if left else 'absent'}",
        True,
    )
    assert proc.returncode == -signal.SIGKILL
    assert not left, "a killed RBD restore left a half-written image under its final name"


def test_sighup_cleans_up_like_sigterm(chain: fl.Oracle, ceph: Ceph, tmp_path: Path) -> None:
    with ceph.image(chain.name) as img:
        img.write(os.urandom(MiB), 5 * MiB)
    before = set(ceph.snapshots(chain.name))
    args = ["backup", "--target", str(chain.target), "--no-progress", chain.spec]
    proc = stalled(args, {}, "before-rename", tmp_path / "stall")
    assert proc is not None
    proc.send_signal(signal.SIGHUP)
    proc.communicate(timeout=60)
    fl.wait_group_gone(proc.pid)
    left = sorted(p.name for p in chain.directory.iterdir() if p.name.endswith(".partial"))
    fl.TABLE.add("SIGHUP at before-rename", "backup", f"exit {proc.returncode}, left {left}", True)
    assert proc.returncode == 129, proc.returncode
    assert not left
    assert set(ceph.snapshots(chain.name)) == before


def test_dead_daemon_fails_only_its_image(ceph: Ceph, image_name: str, tmp_path: Path) -> None:
    names = [f"{image_name}-{i}" for i in range(3)]
    for name in names:
        ceph.create(name, 16 * MiB)
        with ceph.image(name) as img:  # four objects: a full backup reads them as four extents
            for off in range(0, 16 * MiB, 4 * MiB):
                img.write(os.urandom(65536), off)
    conf = tmp_path / "run.toml"
    conf.write_text(
        f'target = "{tmp_path / "target"}"\njobs = 1\nparallel = 2\nclaim_ttl = 30\n'
        f'[[clusters]]\nname = "test"\nconf = "{ceph.conf}"\n'
        f'[[clusters.pools]]\nname = "{ceph.pool}"\ninclude = ["{image_name}-*"]\n'
    )
    proc = stalled(["run", "--config", str(conf), "--json"], {}, "mid-transfer", tmp_path / "stall")
    assert proc is not None
    assert kill_daemon(proc)
    out, _err = proc.communicate(timeout=300)
    statuses = {i["image"]: i["status"] for i in json.loads(out)["images"]}
    failed = sorted(n for n, s in statuses.items() if s == "failed")
    fl.TABLE.add("qemu-storage-daemon SIGKILL at mid-transfer", "run (3 images)", f"failed: {failed}", True)
    assert len(failed) == 1, statuses
