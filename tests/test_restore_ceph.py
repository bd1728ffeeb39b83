"""Restores of every point to RBD, raw and flat qcow2; overlays; serving; hostile chains."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import nbd
import pytest
from cephcluster import CephCluster
from factories import stall_env, wait_stalled
from helpers import REPO, Ceph, MiB, Workload, assert_same_content, run_cli

from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph


def build_chain(ceph: Ceph, target: Path, name: str, tmp: Path, cycles: int = 4) -> list[tuple[str, Path]]:
    """A chain with writes, discards, zero-writes, a shrink and a grow; each point with its rbd export."""
    ceph.create(name, 32 * MiB)
    work = Workload(seed=11)
    points = []
    sizes = [None, 20 * MiB + 4096, 40 * MiB, None, None, None]
    for cycle in range(cycles):
        with ceph.image(name) as img:
            new_size = sizes[cycle]
            if new_size is not None:
                img.resize(new_size, allow_shrink=True)
            work.run(img, ops=10)
        proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{name}")
        assert proc.returncode == 0, proc.stderr
        ref = proc.stdout.strip()
        m = mf.load(chain_dir(target, ImageSpec(ceph.pool, "", name)))
        assert m is not None and m.latest is not None
        points.append((ref, ceph.export(name, m.latest.snapshot.name, tmp / f"expected-{cycle}")))
    return points


def rbd_export_head(ceph: Ceph, name: str, out: Path) -> Path:
    subprocess.run(
        ["rbd", "-c", str(ceph.conf), "export", "--no-progress", f"{ceph.pool}/{name}", str(out)],
        check=True,
        capture_output=True,
    )
    return out


def restore(target: Path, ref: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return run_cli("restore", "--target", str(target), ref, "--no-progress", *args, timeout=timeout)  # type: ignore[no-any-return]


def test_every_point_restores_everywhere(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    points = build_chain(ceph, target, image_name, tmp_path)
    for i, (ref, expected) in enumerate(points):
        raw, flat = tmp_path / f"p{i}.raw", tmp_path / f"p{i}.qcow2"
        assert restore(target, ref, "--to", str(raw)).returncode == 0
        assert_same_content(raw, expected)
        assert restore(target, ref, "--to", str(flat), "--format", "qcow2").returncode == 0
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", str(flat)], capture_output=True, text=True, check=True
        )
        assert "backing-filename" not in info.stdout
        flat_raw = tmp_path / f"p{i}.flat.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(flat), str(flat_raw)], check=True)
        os.truncate(flat_raw, expected.stat().st_size)
        assert_same_content(flat_raw, expected)
        new = f"{image_name}-r{i}"
        proc = restore(target, ref, "--to", f"rbd:{ceph.pool}/{new}")
        assert proc.returncode == 0, proc.stderr
        assert_same_content(rbd_export_head(ceph, new, tmp_path / f"r{i}.raw"), expected)
        for f in (raw, flat, flat_raw, tmp_path / f"r{i}.raw"):
            f.unlink()
    assert restore(target, points[0][0].split("@")[0] + "@latest", "--to", str(tmp_path / "l.raw")).returncode == 0
    assert_same_content(tmp_path / "l.raw", points[-1][1])


def test_force_overwrites_without_leaving_old_data(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    ceph.create(image_name, 16 * MiB)
    with ceph.image(image_name) as img:
        img.write(b"\x01" * (4 * MiB), 0)  # the rest stays unallocated: zeros
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}")
    ref = proc.stdout.strip()
    expected = rbd_export_head(ceph, image_name, tmp_path / "expected")
    victim = f"{image_name}-victim"
    ceph.create(victim, 24 * MiB)
    with ceph.image(victim) as img:
        img.write(os.urandom(24 * MiB), 0)
    refused = restore(target, ref, "--to", f"rbd:{ceph.pool}/{victim}")
    assert refused.returncode == 73, refused.stderr
    assert "--force" in refused.stderr
    proc = restore(target, ref, "--to", f"rbd:{ceph.pool}/{victim}", "--force")
    assert proc.returncode == 0, proc.stderr
    assert_same_content(rbd_export_head(ceph, victim, tmp_path / "victim"), expected)


def test_errors(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    ceph.create(image_name, 8 * MiB)
    ref = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").stdout.strip()
    image = ref.split("@")[0]
    assert restore(target, f"{image}@20000101T000000Z", "--to", str(tmp_path / "x")).returncode == 66
    assert restore(target, f"{ceph.pool}/nothing@latest", "--to", str(tmp_path / "x")).returncode == 66
    assert restore(target, "no-at-sign", "--to", str(tmp_path / "x")).returncode == 64
    (tmp_path / "exists").write_bytes(b"keep")
    proc = restore(target, ref, "--to", str(tmp_path / "exists"))
    assert proc.returncode == 73 and (tmp_path / "exists").read_bytes() == b"keep"
    assert restore(target, ref, "--to", str(tmp_path / "y"), "--format", "vmdk").returncode == 64
    assert restore(target, ref, "--to", f"rbd:{ceph.pool}/x", "--format", "raw").returncode == 64
    day = ref.split("@")[1][:8]
    assert restore(target, f"{image}@{day[:4]}-{day[4:6]}-{day[6:]}", "--to", str(tmp_path / "d")).returncode == 0


def _plant(directory: Path, point: mf.Point, *create_args: str) -> None:
    layer = directory / point.file
    os.chmod(layer, 0o600)
    layer.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *create_args, str(layer), str(point.size)], check=True)


@pytest.mark.parametrize(
    "planted",
    [
        ["-u", "-b", "/etc/passwd", "-F", "raw"],
        ["-o", "data_file=/etc/hostname,data_file_raw=on"],
        ["-u", "-b", "../../../etc/passwd", "-F", "qcow2"],
    ],
    ids=["backing-host-file", "external-data-file", "relative-escape"],
)
def test_hostile_chain_file_refused(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, planted: list[str]
) -> None:
    ceph.create(image_name, 8 * MiB)
    for _ in range(2):
        assert run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").returncode == 0
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    m = mf.load(directory)
    assert m is not None
    victim = m.points[-1] if planted[0] == "-u" else m.points[0]
    if planted[0] == "-o":
        shutil.copy("/etc/hostname", tmp_path / "hostname-before")
    _plant(directory, victim, *planted)
    for args in (["--to", str(tmp_path / "out.raw")], ["--to", str(tmp_path / "o.qcow2"), "--format", "qcow2"]):
        proc = restore(target, f"{ceph.pool}/{image_name}@latest", *args)
        assert proc.returncode == 65, proc.stderr
        assert victim.file in proc.stderr and "Traceback" not in proc.stderr
        assert not Path(args[1]).exists()
    proc = run_cli("overlay", "--target", str(target), f"{ceph.pool}/{image_name}@latest", str(tmp_path / "ov.qcow2"))
    assert proc.returncode == 65 and not (tmp_path / "ov.qcow2").exists()


def test_sigterm_mid_restore_removes_created_image(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    ceph.create(image_name, 64 * MiB)
    with ceph.image(image_name) as img:
        img.write(os.urandom(32 * MiB), 0)
    ref = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").stdout.strip()
    stall = tmp_path / "stall"
    new = f"{image_name}-new"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbd2qcow2", "restore", "-t", str(target), ref, "--to", f"rbd:{ceph.pool}/{new}"],
        cwd=REPO,
        env=dict(os.environ, **stall_env("mid-restore", stall)),
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_stalled(proc, stall)
    import rbd

    # the restore writes a temporary image; the name itself never holds a half-written one
    assert (
        [i for i in rbd.RBD().list(ceph.ioctx) if i.startswith(new)]
        == [i for i in rbd.RBD().list(ceph.ioctx) if i.startswith(f"{new}.rbd2qcow2-restoring-")]
        != []
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert not [i for i in rbd.RBD().list(ceph.ioctx) if i.startswith(new)]


def test_overlay_boots_without_touching_chain(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    points = build_chain(ceph, target, image_name, tmp_path, cycles=2)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.glob("*.qcow2")}
    ref, expected = points[0]
    overlay = tmp_path / "vm" / "disk.qcow2"
    overlay.parent.mkdir()
    proc = run_cli("overlay", "--target", str(target), ref, str(overlay))
    assert proc.returncode == 0, proc.stderr
    raw = tmp_path / "overlay.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(overlay), str(raw)], check=True)
    assert_same_content(raw, expected)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 1M", str(overlay)], check=True, capture_output=True
    )
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.glob("*.qcow2")}
    assert after == before
    assert run_cli("overlay", "--target", str(target), ref, str(overlay)).returncode == 73


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGHUP])
def test_serve_exports_point_read_only(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, stop: signal.Signals
) -> None:
    points = build_chain(ceph, target, image_name, tmp_path, cycles=2)
    ref, expected = points[0]
    sockdir = Path(tempfile.mkdtemp(prefix="r2q-srv-"))
    socket = sockdir / "private" / "nbd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbd2qcow2", "serve", "--target", str(target), ref, "--socket", str(socket)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        assert uri.startswith("nbd+unix:///") and str(socket) in uri
        assert oct(socket.parent.stat().st_mode & 0o777) == "0o700"
        h = nbd.NBD()
        h.connect_uri(uri)  # type: ignore[attr-defined]
        assert h.is_read_only()  # type: ignore[attr-defined]
        size = expected.stat().st_size
        data = b"".join(h.pread(min(4 * MiB, size - off), off) for off in range(0, size, 4 * MiB))
        assert data == expected.read_bytes()
        h.shutdown()
        del h
        proc.send_signal(stop)
        proc.wait(30)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        assert not socket.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(sockdir, ignore_errors=True)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    proc2 = run_cli("serve", "--target", str(target), ref, "--socket", str(open_dir / "s.sock"))
    assert proc2.returncode == 64 and "private" in proc2.stderr


@pytest.mark.slow
def test_offline_restore_after_cluster_is_gone(tmp_path: Path) -> None:
    """The chain directory moved elsewhere and the cluster stopped: file restores still work."""
    base = Path(tempfile.mkdtemp(prefix="r2q-off-"))
    cluster = CephCluster(base / "c", osd_size_gib=4)
    cluster.start()
    try:
        pool = f"off-{uuid.uuid4().hex[:6]}"
        cluster.create_pool(pool)
        with Ceph(cluster.conf, pool) as ceph:
            env_conf = os.environ.get("CEPH_CONF")
            os.environ["CEPH_CONF"] = str(cluster.conf)
            try:
                points = build_chain(ceph, tmp_path / "target", "vm", tmp_path, cycles=3)
            finally:
                if env_conf is not None:
                    os.environ["CEPH_CONF"] = env_conf
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    moved = tmp_path / "dr-site" / "copy"
    shutil.copytree(tmp_path / "target", moved.parent / "staging")
    shutil.rmtree(tmp_path / "target")
    (moved.parent / "staging").rename(moved)
    env = {"CEPH_CONF": "/nonexistent/ceph.conf"}
    for i, (ref, expected) in enumerate(points):
        out = tmp_path / f"o{i}.raw"
        proc = run_cli("restore", "--target", str(moved), ref, "--to", str(out), env=env)
        assert proc.returncode == 0, proc.stderr
        assert_same_content(out, expected)
        flat = tmp_path / f"o{i}.qcow2"
        proc = run_cli("restore", "--target", str(moved), ref, "--to", str(flat), "-f", "qcow2", env=env)
        assert proc.returncode == 0, proc.stderr
        out.unlink()
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(flat), str(out)], check=True)
        os.truncate(out, expected.stat().st_size)
        assert_same_content(out, expected)
