"""The nightly run: many images, two hosts at once, failures that stay local, reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from factories import stall_env, wait_stalled
from helpers import REPO, Ceph, MiB, assert_same_content, qcow2_to_raw, run_cli

from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph


@pytest.fixture
def pool(ceph_cluster: object, ceph: Ceph) -> Ceph:
    name = f"run-{uuid.uuid4().hex[:6]}"
    ceph_cluster.create_pool(name)  # type: ignore[attr-defined]
    return Ceph(ceph.conf, name)


def config(tmp_path: Path, pool: Ceph, extra: str = "", jobs: int = 2) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(
        f'target = "{tmp_path / "target"}"\njobs = {jobs}\nparallel = 2\nclaim_ttl = 30\n'
        f'[[clusters]]\nname = "test"\nconf = "{pool.conf}"\n'
        f'[[clusters.pools]]\nname = "{pool.pool}"\n{extra}'
    )
    return path


def make_images(pool: Ceph, names: list[str]) -> None:
    for i, name in enumerate(names):
        pool.create(name, 4 * MiB)
        with pool.image(name) as img:
            img.write(bytes([i % 250 + 1]) * 65536, (i % 60) * 65536)


def test_two_concurrent_runs_back_up_each_image_once(pool: Ceph, tmp_path: Path) -> None:
    names = [f"vm-{i:02d}" for i in range(22)]
    make_images(pool, names)
    cfg = config(tmp_path, pool, jobs=2)
    cmd = [sys.executable, "-m", "rbd2qcow2", "run", "--config", str(cfg), "--json"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    reports = [json.loads(out) for out, _ in outs]
    done = [i["image"] for r in reports for i in r["images"] if i["status"] == "ok"]
    assert sorted(done) == names  # every image exactly once, across both runs
    for r in reports:
        assert {i["image"] for i in r["images"]} == set(names)
        assert all(i["status"] in ("ok", "skipped") for i in r["images"])
    target = tmp_path / "target"
    for name in names:
        m = mf.load(chain_dir(target, ImageSpec(pool.pool, "", name)))
        assert m is not None and len(m.points) == 1, name
    # A second round, again on two hosts at once: each image gets an incremental point,
    # and the snapshot of its first point is removed (by the run that made the new one,
    # in the background), leaving exactly the snapshot of the latest point.
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "not removed" not in err, err
    for name in names:
        m = mf.load(chain_dir(target, ImageSpec(pool.pool, "", name)))
        assert m is not None and len(m.points) == 2 and m.latest is not None, name
        assert [s for s in pool.snapshots(name) if s.startswith("rbd2qcow2.")] == [m.latest.snapshot.name], name
    proc = run_cli("verify", "--target", str(target), "--deep")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_one_failing_image_does_not_stop_the_others(pool: Ceph, tmp_path: Path) -> None:
    make_images(pool, ["good-1", "bad", "good-2"])
    with pool.image("bad") as img:
        img.create_snap("users-own")  # with a limit of one snapshot, ours cannot be made
    subprocess.run(
        ["rbd", "-c", str(pool.conf), "snap", "limit", "set", "--limit", "1", f"{pool.pool}/bad"], check=True
    )
    metrics = tmp_path / "rbd2qcow2.prom"
    proc = run_cli("run", "--config", str(config(tmp_path, pool)), "--json", "--metrics", str(metrics))
    assert proc.returncode == 74, proc.stderr
    report = json.loads(proc.stdout)
    status = {i["image"]: i["status"] for i in report["images"]}
    assert status == {"good-1": "ok", "bad": "failed", "good-2": "ok"}
    assert not report["ok"] and report["totals"] == {"ok": 2, "failed": 1}
    bad = next(i for i in report["images"] if i["image"] == "bad")
    assert bad["error"] and "snapshot" in bad["error"]
    text = metrics.read_text()
    assert (
        f'rbd2qcow2_image_status{{cluster="test",pool="{pool.pool}",namespace="",image="bad",status="failed"}} 1'
        in text
    )
    assert 'rbd2qcow2_run_images{status="failed"} 1' in text and "rbd2qcow2_run_success 0" in text
    assert oct(os.stat(metrics).st_mode & 0o777) == "0o644"
    assert "FAILED" in proc.stderr and "bad" in proc.stderr


def test_skip_meta_deleted_images_retention_and_second_run(pool: Ceph, tmp_path: Path) -> None:
    make_images(pool, ["keep", "skip-me", "doomed"])
    subprocess.run(
        ["rbd", "-c", str(pool.conf), "image-meta", "set", f"{pool.pool}/skip-me", "rbd2qcow2.skip", "true"],
        check=True,
    )
    cfg = config(
        tmp_path, pool, extra='exclude = ["nothing"]\n[retention]\nkeep_last = 2\n[verify]\nsource_sample = 1.0\n'
    )
    first = json.loads(run_cli("run", "--config", str(cfg), "--json").stdout)
    assert {i["image"]: i["status"] for i in first["images"]} == {"keep": "ok", "skip-me": "skipped", "doomed": "ok"}
    pool.remove("doomed")
    for _ in range(2):
        proc = run_cli("run", "--config", str(cfg), "--json")
        assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout)
    status = {i["image"]: i["status"] for i in last["images"]}
    assert status == {"keep": "ok", "skip-me": "skipped", "doomed": "deleted"}
    target = tmp_path / "target"
    m = mf.load(chain_dir(target, ImageSpec(pool.pool, "", "keep")))
    assert m is not None and len(m.points) == 2  # three backups, keep_last = 2
    doomed = mf.load(chain_dir(target, ImageSpec(pool.pool, "", "doomed")))
    assert doomed is not None and len(doomed.points) == 1  # never pruned away
    directory = chain_dir(target, ImageSpec(pool.pool, "", "keep"))
    assert os.readlink(directory / "latest") == m.points[-1].file
    log = (directory / "activity.log").read_text()
    assert "backup" in log and "prune merged" in log and "verify" in log


def test_bad_config_touches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'target = "{tmp_path / "t"}"\njobs = "many"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n')
    proc = run_cli("run", "--config", str(path))
    assert proc.returncode == 78
    assert str(path) in proc.stderr and "jobs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()
    good = tmp_path / "good.toml"
    good.write_text(f'target = "{tmp_path / "t"}"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n')
    proc = run_cli("run", "--config", str(good), "--check-config")
    assert proc.returncode == 0 and not (tmp_path / "t").exists()


def test_sigterm_during_run_cleans_up_the_images_in_progress(pool: Ceph, tmp_path: Path) -> None:
    """Two images stall mid-transfer, two more wait prepared (snapshot taken); SIGTERM undoes all four."""
    import signal
    import time

    names = ["big-1", "big-2", "big-3", "big-4"]
    for name in names:
        pool.create(name, 32 * MiB)
        with pool.image(name) as img:
            img.write(os.urandom(24 * MiB), 0)
    cfg = config(tmp_path, pool, jobs=2)
    stall = tmp_path / "stalled"
    env = dict(os.environ, **stall_env("mid-transfer", stall, 5))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbd2qcow2", "run", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    assert wait_stalled(proc, stall)
    # The jobs took the first two; the other two get their snapshots while they wait for a job.
    while not all(any(s.startswith("rbd2qcow2.") for s in pool.snapshots(n)) for n in names):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    target = tmp_path / "target"
    for name in names:
        directory = chain_dir(target, ImageSpec(pool.pool, "", name))
        leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".partial")] if directory.exists() else []
        assert leftovers == [], f"{leftovers}\n{err}"
        assert [s for s in pool.snapshots(name) if s.startswith("rbd2qcow2.")] == [], err
    # Claims were released: the next run backs up both images at once.
    proc2 = run_cli("run", "--config", str(cfg), "--json")
    assert proc2.returncode == 0, proc2.stderr
    assert {i["image"]: i["status"] for i in json.loads(proc2.stdout)["images"]} == {n: "ok" for n in names}


def test_a_daemon_that_cannot_start_fails_every_image_and_leaves_nothing(pool: Ceph, tmp_path: Path) -> None:
    """Every image fails in its job, after the prep threads made its snapshot and layer: all are undone."""
    names = [f"img-{i}" for i in range(6)]
    make_images(pool, names)
    fake = tmp_path / "bin"
    fake.mkdir()
    daemon = fake / "qemu-storage-daemon"
    daemon.write_text("#!/bin/sh\necho 'qemu-storage-daemon: simulated failure' >&2\nexit 1\n")
    daemon.chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    proc = run_cli("run", "--config", str(config(tmp_path, pool)), env=env, timeout=120)
    assert proc.returncode not in (0, 130, 143), proc.stderr
    assert "Traceback" not in proc.stderr and "simulated failure" in proc.stderr, proc.stderr
    assert "direct I/O" not in proc.stderr, proc.stderr  # a dead daemon is not a file system without O_DIRECT
    for name in names:
        assert [s for s in pool.snapshots(name) if s.startswith("rbd2qcow2.")] == [], proc.stderr
        directory = chain_dir(tmp_path / "target", ImageSpec(pool.pool, "", name))
        if directory.exists():
            assert [p.name for p in directory.iterdir() if p.name.endswith(".partial")] == []
    # Nothing is left claimed or locked: with the real daemon, the next run backs up every image.
    proc = run_cli("run", "--config", str(config(tmp_path, pool)), "--json")
    assert proc.returncode == 0, proc.stderr
    assert {i["image"]: i["status"] for i in json.loads(proc.stdout)["images"]} == {n: "ok" for n in names}


def stalled_run(cfg: Path, stall: Path, seconds: int) -> subprocess.Popen[str]:
    """A ``run --json`` whose images stall mid-transfer; returns once the first one stalls."""
    env = dict(os.environ, **stall_env("mid-transfer", stall, seconds))
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbd2qcow2", "run", "--config", str(cfg), "--json"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_stalled(proc, stall), proc.communicate()
    return proc


def storage_daemons(pid: int) -> list[int]:
    """The qemu-storage-daemon children of process ``pid`` (any of its threads may have started one)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in children.read_text().split():
            try:
                argv0 = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
            except FileNotFoundError:
                continue
            if argv0.endswith(b"qemu-storage-daemon"):
                found.append(int(child))
    return found


def assert_clean_chain(pool: Ceph, target: Path, name: str) -> None:
    """No point, no leftover file, no snapshot of ours: what a failed first backup must leave."""
    directory = chain_dir(target, ImageSpec(pool.pool, "", name))
    m = mf.load(directory) if directory.exists() else None
    assert m is None or m.points == ()
    if directory.exists():
        left = [p.name for p in directory.iterdir() if p.name.endswith((".partial", ".qcow2", ".sums"))]
        assert left == [], left
    assert [s for s in pool.snapshots(name) if s.startswith("rbd2qcow2.")] == []


def assert_restores(pool: Ceph, target: Path, name: str, tmp_path: Path) -> None:
    """The image's one point reads byte for byte as ``rbd export`` of its snapshot."""
    directory = chain_dir(target, ImageSpec(pool.pool, "", name))
    m = mf.load(directory)
    assert m is not None and len(m.points) == 1 and m.latest is not None, name
    assert [s for s in pool.snapshots(name) if s.startswith("rbd2qcow2.")] == [m.latest.snapshot.name]
    expected = pool.export(name, m.latest.snapshot.name, tmp_path / f"{name}.expected")
    actual = qcow2_to_raw(directory / m.latest.file, tmp_path / f"{name}.raw")
    assert_same_content(actual, expected)


def test_a_killed_storage_daemon_fails_only_the_image_it_was_writing(pool: Ceph, tmp_path: Path) -> None:
    """SIGKILL of the job's qemu-storage-daemon mid-image: that image fails (74), the run starts a new
    daemon, and the images after it are backed up."""
    import signal

    names = ["img-a", "img-b", "img-c"]
    for name in names:
        pool.create(name, 32 * MiB)
        with pool.image(name) as img:
            img.write(os.urandom(24 * MiB), 0)
    cfg = config(tmp_path, pool, jobs=1)
    proc = stalled_run(cfg, tmp_path / "stalled", seconds=3)
    daemons = storage_daemons(proc.pid)
    assert len(daemons) == 1, daemons
    os.kill(daemons[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 74, err
    assert "Traceback" not in err and "starting a new one" in err, err
    report = {i["image"]: i for i in json.loads(out)["images"]}
    failed = [n for n in names if report[n]["status"] == "failed"]
    assert len(failed) == 1, report  # the run's exit code (74) is that image's
    assert all(report[n]["status"] == "ok" for n in names if n not in failed), report
    target = tmp_path / "target"
    assert_clean_chain(pool, target, failed[0])
    for name in names:
        if name not in failed:
            assert_restores(pool, target, name, tmp_path)


def test_a_claim_lost_mid_backup_stops_the_image_and_commits_nothing(pool: Ceph, tmp_path: Path) -> None:
    """Another holder takes the claim while the backup stalls: the renewal fails, the image fails (75),
    its partial point is undone, and the other holder's lock is left alone."""
    import hashlib

    import rados

    pool.create("claimed", 32 * MiB)
    with pool.image("claimed") as img:
        img.write(os.urandom(24 * MiB), 0)
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'target = "{tmp_path / "target"}"\njobs = 1\nparallel = 2\nclaim_ttl = 10\n'
        f'[[clusters]]\nname = "test"\nconf = "{pool.conf}"\n'
        f'[[clusters.pools]]\nname = "{pool.pool}"\n'
    )
    obj = "rbd2qcow2_claim." + hashlib.sha256(b"claimed").hexdigest()[:24]
    # Longer than the lease: the image goes on only after its claim could have lapsed.
    proc = stalled_run(cfg, tmp_path / "stalled", seconds=12)
    pool.ioctx.remove_object(obj)  # the run's lock goes with its object
    pool.ioctx.lock_exclusive(obj, "rbd2qcow2", "other-host", desc="other", duration=120)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "could not renew the claim" in err, err
    (image,) = json.loads(out)["images"]
    assert image["status"] == "failed" and "claim" in image["error"], image
    assert image["point"] is None
    assert_clean_chain(pool, tmp_path / "target", "claimed")
    with pytest.raises(rados.ObjectBusy):  # the other holder still has it
        pool.ioctx.lock_exclusive(obj, "rbd2qcow2", "third", duration=10)
    pool.ioctx.unlock(obj, "rbd2qcow2", "other-host")
    proc2 = run_cli("run", "--config", str(cfg), "--json")
    assert proc2.returncode == 0, proc2.stderr
    assert_restores(pool, tmp_path / "target", "claimed", tmp_path)
