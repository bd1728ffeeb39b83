"""Fault tier: Ceph faults.  The OSD stopped (SIGSTOP: a hang) or killed (SIGKILL: lost, then
restarted; bluestore keeps its data) in the middle of a pull and of an RBD restore, the snapshot
removed under a running backup, the image resized or re-created between runs, the cluster
unreachable for a whole run.

Runs last in the tier's files and always leaves the session's OSD running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import faultlib as fl
import pytest
import rbd
from cephcluster import CephCluster
from factories import stall_env, wait_stalled
from helpers import Ceph, MiB

pytestmark = [pytest.mark.faults, pytest.mark.ceph]

SIZE = 16 * MiB
HANG_SECONDS = 3.0


def osd(cluster: CephCluster) -> tuple[str, int]:
    name, pid = next((n, p) for n, p in cluster.pids.items() if n.startswith("osd.") and fl_alive(p))
    return name, pid


def fl_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def restart_osd(cluster: CephCluster, name: str) -> None:
    """Start a killed OSD again, as its service manager would, and wait until it is up."""
    cluster._daemons = [d for d in cluster._daemons if d.name != name]  # the killed one is reaped
    cluster._spawn(name, "ceph-osd", ["-i", name.split(".", 1)[1]])
    cluster._poll(time.monotonic() + 90, "OSD up and in", cluster._osd_ready)


@contextlib.contextmanager
def osd_guard(cluster: CephCluster) -> Iterator[tuple[str, int]]:
    """The OSD's name and pid; whatever the test did to it, it runs again afterwards."""
    name, pid = osd(cluster)
    try:
        yield name, pid
    finally:
        if fl_alive(pid):
            os.kill(pid, signal.SIGCONT)
        elif not any(n == name and fl_alive(p) for n, p in cluster.pids.items()):
            restart_osd(cluster, name)


def scattered_image(ceph: Ceph, name: str) -> None:
    """Data in every object, so that a transfer has several chunks (mid-transfer is the third)."""
    ceph.create(name, SIZE)
    with ceph.image(name) as img:
        for off in range(0, SIZE, 4 * MiB):
            img.write(os.urandom(256 * 1024), off)


def stalled(args: list[str], point: str, stall: Path, seconds: float = 1.0) -> subprocess.Popen[bytes]:
    stall.unlink(missing_ok=True)
    proc = fl.start_cli(args, stall_env(point, stall, seconds))
    assert wait_stalled(proc, stall), f"{point} not reached"
    return proc


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    _out, err = proc.communicate(timeout=300)
    fl.wait_group_gone(proc.pid)
    return proc.returncode, err.decode(errors="replace")


def first_chain(ceph: Ceph, name: str, tmp_path: Path) -> fl.Oracle:
    scattered_image(ceph, name)
    o = fl.Oracle(ceph, name, tmp_path / "target", tmp_path / "oracle")
    digest = o.current()
    proc = fl.run(["backup", "--target", str(o.target), "--no-progress", o.spec], {})
    assert proc.returncode == 0, proc.stderr
    o.adopt(digest)
    with ceph.image(name) as img:
        for off in range(0, SIZE, 4 * MiB):
            img.write(os.urandom(65536), off + MiB)
    return o


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_osd_fault_mid_pull(ceph_cluster: CephCluster, ceph: Ceph, image_name: str, tmp_path: Path, how: str) -> None:
    o = first_chain(ceph, image_name, tmp_path)
    digest = o.current()
    with osd_guard(ceph_cluster) as (name, pid):
        proc = stalled(["backup", "--target", str(o.target), "--no-progress", o.spec], "mid-transfer", tmp_path / "s")
        os.kill(pid, getattr(signal, how))
        time.sleep(HANG_SECONDS)
        if how == "SIGSTOP":
            os.kill(pid, signal.SIGCONT)
        else:
            restart_osd(ceph_cluster, name)
        code, err = finish(proc)
    problems = [] if code in (0, 74) and "Traceback" not in err else [f"exit {code}: {err[-300:]}"]
    o.adopt(digest)
    problems += o.problems()
    if code != 0:
        fl.clear_dead_watchers(ceph, image_name)
        again = fl.run(["backup", "--target", str(o.target), "--no-progress", o.spec], {})
        problems += [] if again.returncode == 0 else [f"next run exited {again.returncode}"]
        o.adopt(digest)
        problems += o.problems()
    what = "hung 3 s" if how == "SIGSTOP" else "killed, restarted after 3 s"
    fl.TABLE.add(f"OSD {how} ({what}) mid-pull", "backup (incremental)", f"exit {code}", not problems)
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("how", ["SIGSTOP", "SIGKILL"])
def test_osd_fault_mid_rbd_restore(
    ceph_cluster: CephCluster, ceph: Ceph, image_name: str, tmp_path: Path, how: str
) -> None:
    o = first_chain(ceph, image_name, tmp_path)
    point = o.manifest().points[-1].id
    dst = f"{image_name}-dst"
    args = ["restore", "--target", str(o.target), f"{o.spec}@{point}", "--to", f"rbd:{ceph.pool}/{dst}"]
    with osd_guard(ceph_cluster) as (name, pid):
        proc = stalled(args, "mid-restore", tmp_path / "s")
        os.kill(pid, getattr(signal, how))
        time.sleep(HANG_SECONDS)
        if how == "SIGSTOP":
            os.kill(pid, signal.SIGCONT)
        else:
            restart_osd(ceph_cluster, name)
        code, err = finish(proc)
    problems = [] if code in (0, 74) and "Traceback" not in err else [f"exit {code}: {err[-300:]}"]
    exists = dst in rbd.RBD().list(ceph.ioctx)
    if code == 0 and (not exists or fl.image_digest(ceph, dst) != o.expected[point]):
        problems.append("restore exited 0 but the image is not the point's content")
    if code != 0 and exists:
        problems.append("a failed restore left its image")
    if exists:
        ceph.remove(dst)
    what = "hung 3 s" if how == "SIGSTOP" else "killed, restarted after 3 s"
    fl.TABLE.add(f"OSD {how} ({what}) mid-restore", "restore (RBD)", f"exit {code}", not problems)
    assert not problems, "; ".join(problems)


def test_snapshot_removed_under_running_backup(ceph: Ceph, image_name: str, tmp_path: Path) -> None:
    o = first_chain(ceph, image_name, tmp_path)
    base = o.manifest().points[-1]
    digest = o.current()
    proc = stalled(["backup", "--target", str(o.target), "--no-progress", o.spec], "mid-transfer", tmp_path / "s", 2)
    new = [s for s in ceph.snapshots(image_name) if s.startswith("rbd2qcow2.") and s != base.snapshot.name]
    assert len(new) == 1, new
    with ceph.image(image_name) as img:
        img.remove_snap(new[0])
    code, err = finish(proc)
    problems = []
    if code not in (66, 74) or "Traceback" in err:
        problems.append(f"exit {code}, not 74 or 66: {err[-300:]}")
    if o.adopt(digest):
        problems.append("a point was committed from a removed snapshot")
    problems += o.problems()
    fl.clear_dead_watchers(ceph, image_name)
    again = fl.run(["backup", "--target", str(o.target), "--no-progress", o.spec], {})
    latest = None
    if again.returncode == 0:
        o.adopt(digest)
        latest = o.manifest().latest
    if latest is None or latest.kind != "incremental" or latest.parent != base.id:
        problems.append(f"next run: exit {again.returncode}, not an incremental on {base.id}")
    problems += o.problems()
    fl.TABLE.add("snapshot removed under the running backup", "backup", f"exit {code}; next run {again.returncode}",
                 not problems)  # fmt: skip
    assert not problems, "; ".join(problems)


def test_resized_and_recreated_between_runs(ceph: Ceph, image_name: str, tmp_path: Path) -> None:
    o = first_chain(ceph, image_name, tmp_path)
    kinds = []
    for step in ("grow", "shrink", "recreate", "after"):
        if step == "grow":
            with ceph.image(image_name) as img:
                img.resize(SIZE + 3 * MiB + 65536)
                img.write(os.urandom(65536), SIZE + MiB)
        elif step == "shrink":
            with ceph.image(image_name) as img:
                img.resize(SIZE // 2 + 4096, allow_shrink=True)
        elif step == "recreate":
            ceph.remove(image_name)
            scattered_image(ceph, image_name)
        else:
            with ceph.image(image_name) as img:
                img.write(os.urandom(65536), 2 * MiB)
        digest = o.current()
        proc = fl.run(["backup", "--target", str(o.target), "--no-progress", o.spec], {})
        assert proc.returncode == 0, proc.stderr
        o.adopt(digest)
        latest = o.manifest().latest
        assert latest is not None
        kinds.append(f"{step}: {latest.kind}")
    problems = o.problems() + o.cross_check()
    want = ["grow: incremental", "shrink: incremental", "recreate: full", "after: incremental"]
    if kinds != want:
        problems.append(f"kinds {kinds}")
    fl.TABLE.add("image grown, shrunk, re-created between runs", "backup", ", ".join(kinds), not problems)
    assert not problems, "; ".join(problems)


def test_cluster_unreachable_for_the_whole_run(ceph: Ceph, image_name: str, tmp_path: Path) -> None:
    o = first_chain(ceph, image_name, tmp_path)
    dead = tmp_path / "dead.conf"
    dead.write_text("[global]\nmon host = 127.0.0.1:9\nauth client required = none\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'target = "{o.target}"\njobs = 1\nclaim_ttl = 30\n[[clusters]]\nname = "dead"\nconf = "{dead}"\n'
        f'[[clusters.pools]]\nname = "{ceph.pool}"\n'
    )
    point = o.manifest().points[-1].id
    base = ["--conf", str(dead), "--connect-timeout", "3"]
    commands = {
        "backup": ["backup", "--target", str(o.target), "--no-progress", *base, o.spec],
        "restore (RBD)": ["restore", "--target", str(o.target), f"{o.spec}@{point}", "--to", "rbd:p/x", *base],
        "verify --source": ["verify", "--target", str(o.target), "--source", "--no-progress", *base],
        "run": ["run", "--config", str(cfg)],
    }
    env = {"CEPH_CONF": str(dead)}
    for operation, args in commands.items():
        before = fl.tree_hashes(o.target)
        proc = fl.run(args, env, timeout=120)
        after = fl.tree_hashes(o.target)
        changed = [k for k in set(before) | set(after) if before.get(k) != after.get(k)]
        changed = [k for k in changed if not k.endswith(("activity.log", "lock"))]
        problems = [] if proc.returncode == 69 else [f"exit {proc.returncode}, not 69"]
        problems += ["traceback"] if "Traceback" in proc.stderr else []
        problems += [f"changed {changed}"] if changed else []
        problems += [f"flagged {p.id}" for p in o.manifest().points if "damaged" in p.flags]
        fl.TABLE.add("cluster unreachable for the whole run", operation, f"exit {proc.returncode}", not problems)
        assert not problems, f"{operation}: " + "; ".join(problems)
    assert not o.problems()
