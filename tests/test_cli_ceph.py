"""End-to-end: the CLI in subprocesses against the throwaway cluster.

Exit codes, locking, signals, kill -9 at named points of the commit sequence,
moved chains, re-created images, deleted snapshots and hostile names.  The
oracle is always content: ``qemu-img convert`` of a point against
``rbd export`` of its snapshot.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import stall_env, wait_stalled
from helpers import REPO, Ceph, MiB, Workload, assert_same_content, qcow2_to_raw, run_cli

from rbd2qcow2.core.faults import CRASH_ENV, POINTS
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph


def make_image(ceph: Ceph, name: str, size: int = 24 * MiB, seed: int = 1) -> Workload:
    ceph.create(name, size)
    work = Workload(seed)
    with ceph.image(name) as img:
        work.run(img, ops=12)
    return work


def change(ceph: Ceph, name: str, work: Workload) -> None:
    with ceph.image(name) as img:
        work.run(img, ops=6)


def backup(target: Path, spec: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("backup", "--target", str(target), "--no-progress", *extra, spec, env=env)  # type: ignore[no-any-return]


def manifest_of(target: Path, ceph: Ceph, name: str) -> mf.Manifest:
    m = mf.load(chain_dir(target, ImageSpec(ceph.pool, "", name)))
    assert m is not None
    return m


def expect_point(ceph: Ceph, target: Path, name: str, point: mf.Point, expected: Path, tmp: Path) -> None:
    layer = chain_dir(target, ImageSpec(ceph.pool, "", name)) / point.file
    assert_same_content(qcow2_to_raw(layer, tmp / "actual.raw"), expected)
    (tmp / "actual.raw").unlink()


def backup_checked(ceph: Ceph, target: Path, name: str, tmp: Path, *extra: str) -> tuple[mf.Point, Path]:
    """A successful CLI backup; returns the point and an rbd export of its snapshot."""
    proc = backup(target, f"{ceph.pool}/{name}", *extra)
    assert proc.returncode == 0, proc.stderr
    point = manifest_of(target, ceph, name).latest
    assert point is not None
    assert proc.stdout.strip() == f"{ceph.pool}/{name}@{point.id}"
    expected = ceph.export(name, point.snapshot.name, tmp / f"{point.id}.expected")
    return point, expected


def layer_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name not in ("lock", mf.NAME, "latest", "activity.log")}


# -- exit codes -----------------------------------------------------------------


def test_usage_errors_exit_64(tmp_path: Path) -> None:
    for args in (["backup"], ["backup", "--target", str(tmp_path)], ["frobnicate"], ["backup", "-t", "x", "a/b/c/d"]):
        proc = run_cli(*args)
        assert proc.returncode == 64, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_parallel_must_be_positive(tmp_path: Path) -> None:
    proc = run_cli("backup", "--target", str(tmp_path), "--parallel", "0", "p/i")
    assert proc.returncode == 64
    assert "at least 1" in proc.stderr


def test_unreachable_cluster_exit_69(tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text("[global]\nmon host = 127.0.0.1:9\nauth client required = none\n")
    proc = run_cli("backup", "--target", str(tmp_path / "t"), "--conf", str(conf), "--connect-timeout", "3", "p/i")
    assert proc.returncode == 69, proc.stderr
    assert "unavailable" in proc.stderr and "Traceback" not in proc.stderr


def test_missing_image_fails_but_others_succeed(ceph: Ceph, target: Path, image_name: str) -> None:
    make_image(ceph, image_name)
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/no-such-image", f"{ceph.pool}/{image_name}")
    assert proc.returncode == 66, proc.stderr
    assert proc.stdout.startswith(f"{ceph.pool}/{image_name}@")
    assert "no-such-image" in proc.stderr


def test_unknown_pool_exit_66(ceph: Ceph, target: Path) -> None:
    proc = run_cli("backup", "--target", str(target), "no-such-pool")
    assert proc.returncode == 66, proc.stderr


# -- locking --------------------------------------------------------------------


def test_locked_chain_exit_75_and_wait(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    make_image(ceph, image_name)
    backup_checked(ceph, target, image_name, tmp_path)
    lock = chain_dir(target, ImageSpec(ceph.pool, "", image_name)) / "lock"
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        proc = backup(target, f"{ceph.pool}/{image_name}")
        assert proc.returncode == 75, proc.stderr
        assert "locked" in proc.stderr
        waiting = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rbd2qcow2",
                "backup",
                "--wait",
                "--target",
                str(target),
                f"{ceph.pool}/{image_name}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert waiting.poll() is None
    finally:
        os.close(fd)
    _out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert len(manifest_of(target, ceph, image_name).points) == 2


def test_two_concurrent_runs(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    """Two runs at once on one chain: one backs up, the other is refused; nothing breaks."""
    make_image(ceph, image_name, size=64 * MiB)
    backup_checked(ceph, target, image_name, tmp_path)
    args = [sys.executable, "-m", "rbd2qcow2", "backup", "--target", str(target), f"{ceph.pool}/{image_name}"]
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    codes = sorted(p.wait(120) for p in procs)
    assert codes in ([0, 0], [0, 75]), codes
    m = manifest_of(target, ceph, image_name)
    assert len(m.points) == 1 + codes.count(0)
    latest = m.latest
    assert latest is not None
    expected = ceph.export(image_name, latest.snapshot.name, tmp_path / "e")
    expect_point(ceph, target, image_name, latest, expected, tmp_path)


# -- signals and kill -9 --------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_signal_mid_transfer_cleans_up(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, signum: int, code: int
) -> None:
    """SIGTERM to the process; SIGHUP (an ssh session that dropped) to its whole process group."""
    work = make_image(ceph, image_name)
    first, expected = backup_checked(ceph, target, image_name, tmp_path)
    change(ceph, image_name, work)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    stall = tmp_path / "stalled"
    env = dict(os.environ, **stall_env("before-rename", stall))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbd2qcow2", "backup", "--target", str(target), f"{ceph.pool}/{image_name}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert wait_stalled(proc, stall), proc.stderr.read() if proc.stderr else ""
    assert any(n.endswith(".partial") for n in os.listdir(directory))
    if signum == signal.SIGHUP:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert out == ""
    assert layer_files(directory) == {first.file, f"{first.id}.sums"}
    assert ceph.snapshots(image_name) == [first.snapshot.name]
    expect_point(ceph, target, image_name, first, expected, tmp_path)
    point, expected2 = backup_checked(ceph, target, image_name, tmp_path)
    assert point.kind == "incremental"
    expect_point(ceph, target, image_name, point, expected2, tmp_path)


@pytest.mark.parametrize("where", POINTS)
def test_kill9_then_next_run_succeeds(ceph: Ceph, target: Path, image_name: str, tmp_path: Path, where: str) -> None:
    work = make_image(ceph, image_name, size=32 * MiB)
    first, expected_first = backup_checked(ceph, target, image_name, tmp_path)
    change(ceph, image_name, work)
    proc = backup(target, f"{ceph.pool}/{image_name}", env={CRASH_ENV: where})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Every committed point is intact, whatever the crash left behind.
    m = manifest_of(target, ceph, image_name)
    assert m.points[0] == first
    expect_point(ceph, target, image_name, first, expected_first, tmp_path)
    committed = where == "after-commit"
    assert len(m.points) == (2 if committed else 1)
    # The next run cleans up and succeeds, incrementally.
    change(ceph, image_name, work)
    point, expected = backup_checked(ceph, target, image_name, tmp_path)
    assert point.kind == "incremental"
    assert point.parent == m.points[-1].id
    expect_point(ceph, target, image_name, point, expected, tmp_path)
    expect_point(ceph, target, image_name, first, expected_first, tmp_path)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    final = manifest_of(target, ceph, image_name)
    assert layer_files(directory) == {p.file for p in final.points} | {f"{p.id}.sums" for p in final.points}
    assert ceph.snapshots(image_name) == [point.snapshot.name]


# -- chain safety ---------------------------------------------------------------


def test_moved_chain_still_restores_and_continues(ceph: Ceph, tmp_path: Path, image_name: str) -> None:
    target = tmp_path / "a"
    work = make_image(ceph, image_name)
    p1, e1 = backup_checked(ceph, target, image_name, tmp_path)
    change(ceph, image_name, work)
    p2, e2 = backup_checked(ceph, target, image_name, tmp_path)
    moved = tmp_path / "elsewhere" / "b"
    moved.parent.mkdir()
    shutil.move(target, moved)
    expect_point(ceph, moved, image_name, p1, e1, tmp_path)
    expect_point(ceph, moved, image_name, p2, e2, tmp_path)
    change(ceph, image_name, work)
    p3, e3 = backup_checked(ceph, moved, image_name, tmp_path)
    assert p3.kind == "incremental" and p3.parent == p2.id
    expect_point(ceph, moved, image_name, p3, e3, tmp_path)


def test_recreated_image_starts_new_chain(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    make_image(ceph, image_name, seed=5)
    p1, e1 = backup_checked(ceph, target, image_name, tmp_path)
    ceph.remove(image_name)
    make_image(ceph, image_name, seed=6)
    proc = backup(target, f"{ceph.pool}/{image_name}", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "re-created" in proc.stderr
    m = manifest_of(target, ceph, image_name)
    p2 = m.points[-1]
    assert p2.kind == "full" and p2.parent is None and p2.image_id != p1.image_id
    expect_point(ceph, target, image_name, p1, e1, tmp_path)
    expect_point(ceph, target, image_name, p2, ceph.export(image_name, p2.snapshot.name, tmp_path / "e2"), tmp_path)


def test_deleted_base_snapshot_starts_new_chain(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    work = make_image(ceph, image_name)
    p1, _ = backup_checked(ceph, target, image_name, tmp_path)
    with ceph.image(image_name) as img:
        img.remove_snap(p1.snapshot.name)
    change(ceph, image_name, work)
    proc = backup(target, f"{ceph.pool}/{image_name}", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "gone" in proc.stderr
    p2 = manifest_of(target, ceph, image_name).points[-1]
    assert p2.kind == "full"
    expect_point(ceph, target, image_name, p2, ceph.export(image_name, p2.snapshot.name, tmp_path / "e"), tmp_path)


def test_user_snapshots_are_never_removed(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    work = make_image(ceph, image_name)
    with ceph.image(image_name) as img:
        img.create_snap("rbd2qcow2.user")
        img.create_snap("mine")
    backup_checked(ceph, target, image_name, tmp_path)
    change(ceph, image_name, work)
    p2, _ = backup_checked(ceph, target, image_name, tmp_path)
    assert sorted(ceph.snapshots(image_name)) == sorted(["rbd2qcow2.user", "mine", p2.snapshot.name])


HOSTILE = [" lead space", "-dash", ".dot", "a b", "a_b", "a%20b", "ünïcode ✓", "x" * 250 + "1", "x" * 250 + "2"]


def test_hostile_names(ceph_cluster: object, ceph: Ceph, tmp_path: Path) -> None:
    """Names that naive escaping would mangle or collide: each its own chain, right content."""
    import uuid

    from rbd2qcow2.core.names import encode

    pool = f"hostile-{uuid.uuid4().hex[:6]}"
    ceph_cluster.create_pool(pool)  # type: ignore[attr-defined]
    other = Ceph(ceph.conf, pool)
    target = tmp_path / "t"
    for i, name in enumerate(HOSTILE):
        make_image(other, name, size=8 * MiB, seed=i)
    proc = run_cli("backup", "--target", str(target), pool)
    assert proc.returncode == 0, proc.stderr
    refs = proc.stdout.splitlines()
    assert {r.rsplit("@", 1)[0] for r in refs} == {f"{pool}/{n}" for n in HOSTILE}
    dirs = {encode(n) for n in HOSTILE}
    assert len(dirs) == len(HOSTILE)
    assert {p.name for p in (target / pool).iterdir()} == dirs
    for i, name in enumerate(HOSTILE):
        m = mf.load(chain_dir(target, ImageSpec(pool, "", name)))
        assert m is not None and m.image.name == name
        point = m.points[0]
        expected = other.export(name, point.snapshot.name, tmp_path / f"e{i}")
        expect_point(other, target, name, point, expected, tmp_path)
    other.__exit__()


def test_permissions_and_list(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    work = make_image(ceph, image_name)
    backup_checked(ceph, target, image_name, tmp_path)
    change(ceph, image_name, work)
    backup_checked(ceph, target, image_name, tmp_path)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    for path in [directory, *directory.iterdir()]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))
    proc = run_cli("list", "--target", str(target), "--json", f"{ceph.pool}/{image_name}")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["points"]
    assert [r["kind"] for r in rows] == ["full", "incremental"]
    assert [r["depth"] for r in rows] == [1, 2]
    assert all(r["virtual_size"] == 24 * MiB and r["stored_bytes"] > 0 for r in rows)
    text = run_cli("list", "--target", str(target), f"{ceph.pool}/{image_name}").stdout
    assert "incremental" in text and image_name in text


def test_namespace_and_restricted_client(ceph_cluster: object, ceph: Ceph, tmp_path: Path) -> None:
    """A namespaced image, backed up as a client with only `profile rbd` caps."""
    import rbd

    target = tmp_path / "t"
    ns = "tenant 1"
    rbd.RBD().namespace_create(ceph.ioctx, ns)  # type: ignore[attr-defined]
    keyring = ceph_cluster.create_user(  # type: ignore[attr-defined]
        "client.r2qtest", {"mon": "profile rbd", "osd": f"profile rbd pool={ceph.pool}"}
    )
    ceph.ioctx.set_namespace(ns)
    try:
        make_image(ceph, "vm")
        args = ["--id", "r2qtest", "--keyring", str(keyring)]
        proc = run_cli("backup", "--target", str(target), *args, f"{ceph.pool}/{ns}/vm")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith(f"{ceph.pool}/{ns}/vm@")
        m = mf.load(chain_dir(target, ImageSpec(ceph.pool, ns, "vm")))
        assert m is not None and m.image == ImageSpec(ceph.pool, ns, "vm")
        point = m.points[0]
        expected = tmp_path / "e"
        subprocess.run(
            [
                "rbd",
                "-c",
                str(ceph.conf),
                "export",
                "--no-progress",
                f"{ceph.pool}/{ns}/vm@{point.snapshot.name}",
                str(expected),
            ],
            check=True,
            capture_output=True,
        )
        layer = chain_dir(target, ImageSpec(ceph.pool, ns, "vm")) / point.file
        assert_same_content(qcow2_to_raw(layer, tmp_path / "a.raw"), expected)
        # A whole-pool SPEC finds namespaced images too.
        proc = run_cli("backup", "--target", str(target), *args, ceph.pool)
        assert f"{ceph.pool}/{ns}/vm@" in proc.stdout
    finally:
        ceph.ioctx.set_namespace("")


def test_clone_backs_up_parent_data(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    """A layered clone: the full backup includes the parent's data, incrementals the clone's writes."""
    import rbd

    parent = f"{image_name}-parent"
    work = make_image(ceph, parent, size=16 * MiB)
    with ceph.image(parent) as img:
        img.create_snap("base")
        img.protect_snap("base")  # type: ignore[attr-defined]
    rbd.RBD().clone(ceph.ioctx, parent, "base", ceph.ioctx, image_name, features=1)  # type: ignore[attr-defined]
    p1, e1 = backup_checked(ceph, target, image_name, tmp_path)
    expect_point(ceph, target, image_name, p1, e1, tmp_path)
    change(ceph, image_name, work)
    p2, e2 = backup_checked(ceph, target, image_name, tmp_path)
    assert p2.kind == "incremental"
    expect_point(ceph, target, image_name, p2, e2, tmp_path)
