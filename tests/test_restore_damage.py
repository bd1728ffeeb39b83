"""Restores, overlays and serving of damaged chains: exit 65, nothing left under the destination's name."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rbd
from factories import stall_env, wait_stalled
from helpers import REPO, Ceph, MiB, assert_same_content, run_cli
from test_restore_ceph import build_chain, rbd_export_head, restore

from rbd2qcow2.core.faults import CRASH_ENV
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph
TIMEOUT = 300  # a restore that hangs fails the test instead of holding it
RESTORE = [sys.executable, "-m", "rbd2qcow2", "restore"]


def _chain(ceph: Ceph, target: Path, name: str, tmp: Path) -> tuple[list[tuple[str, Path]], Path, mf.Manifest]:
    points = build_chain(ceph, target, name, tmp)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", name))
    m = mf.load(directory)
    assert m is not None
    return points, directory, m


def _truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_data_byte(path: Path, top_files: list[Path]) -> int:
    """Flip a byte inside a data cluster of ``path`` that the layers above it do not cover; returns its guest offset."""
    covered: set[int] = set()
    for upper in top_files:
        for e in _own_map(upper):
            covered.update(range(e["start"] // 65536, (e["start"] + e["length"]) // 65536))
    for e in _own_map(path):
        if e.get("data") and "offset" in e:
            for i in range(e["length"] // 65536):
                if e["start"] // 65536 + i not in covered:
                    host = e["offset"] + i * 65536 + 1234
                    with open(path, "r+b") as fh:
                        fh.seek(host)
                        byte = fh.read(1)
                        fh.seek(host)
                        fh.write(bytes([byte[0] ^ 0x5A]))
                    return int(e["start"]) + i * 65536 + 1234
    raise AssertionError(f"no data cluster of {path} left uncovered")


def _own_map(path: Path) -> list[dict[str, int]]:
    opts = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None}
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "json:" + json.dumps(opts)], capture_output=True, text=True, check=True
    ).stdout
    return [e for e in json.loads(out) if e.get("present")]


def _rbd_images(ceph: Ceph) -> list[str]:
    return list(rbd.RBD().list(ceph.ioctx))


def _all_refuse(ceph: Ceph, target: Path, ref: str, tmp: Path, name: str, *, structural: bool) -> None:
    """Restore to raw, qcow2 and RBD (and, for structural damage, overlay and serve) exit 65, leaving nothing."""
    before = sorted(os.listdir(tmp))
    for args in (["--to", str(tmp / "out.raw")], ["--to", str(tmp / "out.qcow2"), "--format", "qcow2"]):
        proc = restore(target, ref, *args, timeout=TIMEOUT)
        assert proc.returncode == 65, proc.stderr
        assert "Traceback" not in proc.stderr
        assert sorted(os.listdir(tmp)) == before
    new = f"{name}-restored"
    proc = restore(target, ref, "--to", f"rbd:{ceph.pool}/{new}", timeout=TIMEOUT)
    assert proc.returncode == 65, proc.stderr
    assert not [i for i in _rbd_images(ceph) if i.startswith(new)]
    if structural:
        proc = run_cli("overlay", "--target", str(target), ref, str(tmp / "ov.qcow2"), timeout=TIMEOUT)
        assert proc.returncode == 65, proc.stderr
        assert not (tmp / "ov.qcow2").exists()
        sockdir = Path(tempfile.mkdtemp(prefix="r2q-dmg-"))
        try:
            proc = run_cli("serve", "--target", str(target), ref, "--socket", str(sockdir / "s.sock"), timeout=TIMEOUT)
            assert proc.returncode == 65, proc.stderr
            assert os.listdir(sockdir) == []
        finally:
            os.rmdir(sockdir)


def test_truncated_middle_layer_refused_everywhere(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    points, directory, m = _chain(ceph, target, image_name, tmp_path)
    _truncate_half(directory / m.points[2].file)
    out = tmp_path / "out"
    out.mkdir()
    _all_refuse(ceph, target, points[-1][0], out, image_name, structural=True)
    # a point below the damage is intact and restores byte for byte
    proc = restore(target, points[1][0], "--to", str(out / "p1.raw"), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert_same_content(out / "p1.raw", points[1][1])


def test_flipped_data_byte_refused(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    points, directory, m = _chain(ceph, target, image_name, tmp_path)
    layer = directory / m.points[1].file
    guest = _flip_data_byte(layer, [directory / p.file for p in m.points[2:]])
    out = tmp_path / "out"
    out.mkdir()
    _all_refuse(ceph, target, points[-1][0], out, image_name, structural=False)
    proc = restore(target, points[-1][0], "--to", str(out / "x.raw"))
    block = guest - guest % 65536
    assert f"bytes {block}-{block + 65536}" in proc.stderr and points[-1][0] in proc.stderr
    # the point below the damaged layer is intact
    assert restore(target, points[0][0], "--to", str(out / "p0.raw")).returncode == 0
    assert_same_content(out / "p0.raw", points[0][1])


def test_point_without_checksums_restores_unchecked(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    points, directory, m = _chain(ceph, target, image_name, tmp_path)
    old = dataclasses.replace(m, points=tuple(dataclasses.replace(p, checksums=None) for p in m.points))
    mf.save(directory, old)
    proc = restore(target, points[-1][0], "--to", str(tmp_path / "u.raw"))
    assert proc.returncode == 0, proc.stderr
    assert "not checked" in proc.stderr
    assert_same_content(tmp_path / "u.raw", points[-1][1])


def _small_point(ceph: Ceph, target: Path, name: str, tmp: Path) -> tuple[str, Path]:
    ceph.create(name, 8 * MiB)
    with ceph.image(name) as img:
        img.write(os.urandom(3 * MiB), MiB)
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{name}")
    assert proc.returncode == 0, proc.stderr
    ref = proc.stdout.strip()
    m = mf.load(chain_dir(target, ImageSpec(ceph.pool, "", name)))
    assert m is not None and m.latest is not None
    return ref, ceph.export(name, m.latest.snapshot.name, tmp / "expected")


@contextlib.contextmanager
def _loop_device(backing: Path, size: int) -> Iterator[Path]:
    with open(backing, "wb") as fh:
        fh.write(b"\xee" * size)  # old content that must not survive
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True, check=True)
    path = Path(dev.stdout.strip())
    try:
        yield path
    finally:
        subprocess.run(["losetup", "-d", str(path)], check=False)


def test_block_device_written_in_place(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    ref, expected = _small_point(ceph, target, image_name, tmp_path)
    size = expected.stat().st_size
    with _loop_device(tmp_path / "disk.img", size + MiB) as dev:
        refused = restore(target, ref, "--to", str(dev))
        assert refused.returncode == 73 and "--force" in refused.stderr
        proc = restore(target, ref, "--to", str(dev), "--force")
        assert proc.returncode == 0, proc.stderr
        assert stat.S_ISBLK(dev.stat().st_mode)
        with open(dev, "rb") as fh:
            data = fh.read(size)
        assert data == expected.read_bytes()
    with _loop_device(tmp_path / "small.img", size - MiB) as dev:
        proc = restore(target, ref, "--to", str(dev), "--force")
        assert proc.returncode == 73 and "too small" in proc.stderr
        assert stat.S_ISBLK(dev.stat().st_mode)


def test_special_files_refused(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    ref, _ = _small_point(ceph, target, image_name, tmp_path)
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, test in ((null, stat.S_ISCHR), (fifo, stat.S_ISFIFO)):
        proc = restore(target, ref, "--to", str(path), "--force", timeout=120)
        assert proc.returncode == 73, proc.stderr
        assert test(path.lstat().st_mode)
        assert not (tmp_path / f".{path.name}.partial").exists()


def test_relative_path_with_colon(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    ref, expected = _small_point(ceph, target, image_name, tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    for args, name in ((["--to", "a:b.raw"], "a:b.raw"), (["--to", "c:d.qcow2", "-f", "qcow2"], "c:d.qcow2")):
        proc = subprocess.run(
            [sys.executable, "-m", "rbd2qcow2", "restore", "-t", str(target), ref, "--no-progress", *args],
            cwd=work,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert proc.returncode == 0, proc.stderr
        assert (work / name).is_file()
    assert_same_content(work / "a:b.raw", expected)


def _rbd_restore_killed(ceph: Ceph, target: Path, ref: str, dest: str, *extra: str) -> None:
    proc = run_cli(
        "restore",
        "--target",
        str(target),
        ref,
        "--no-progress",
        "--to",
        f"rbd:{ceph.pool}/{dest}",
        *extra,
        env={CRASH_ENV: "mid-restore"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def test_rbd_restore_killed_leaves_no_image_under_the_name(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path
) -> None:
    ceph.create(image_name, 64 * MiB)
    with ceph.image(image_name) as img:
        img.write(os.urandom(32 * MiB), 0)
    ref = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").stdout.strip()
    expected = rbd_export_head(ceph, image_name, tmp_path / "expected")
    new = f"{image_name}-new"
    _rbd_restore_killed(ceph, target, ref, new)
    assert new not in _rbd_images(ceph)
    left = [i for i in _rbd_images(ceph) if i.startswith(new)]
    assert len(left) == 1  # the temporary image of the killed run
    _wait_unwatched(ceph, left[0])
    proc = restore(target, ref, "--to", f"rbd:{ceph.pool}/{new}")
    assert proc.returncode == 0, proc.stderr
    assert "interrupted restore" in proc.stderr
    assert [i for i in _rbd_images(ceph) if i.startswith(new)] == [new]
    assert_same_content(rbd_export_head(ceph, new, tmp_path / "new"), expected)


def _plant_stray_name(ceph: Ceph, name: str, image_id: str, mtime: int = 0) -> None:
    """What librbd leaves when killed between writing a name's id object and its directory entry."""
    data = len(image_id).to_bytes(4, "little") + image_id.encode()
    ioctx: Any = ceph.ioctx  # the object calls are not in the bindings' stubs
    if not mtime:
        ioctx.write_full(f"rbd_id.{name}", data)
    else:  # an operation's mtime is the one the object keeps
        op = ioctx.create_write_op()
        try:
            op.write_full(data)
            ioctx.operate_write_op(op, f"rbd_id.{name}", mtime=mtime)
        finally:
            op.release()
    with pytest.raises(rbd.ImageExists):  # the name is now refused by librbd itself
        rbd.RBD().create(ceph.ioctx, name, MiB)
    assert name not in _rbd_images(ceph)


def test_rbd_restore_after_a_rename_killed_half_way(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    """A restore killed inside librbd's rename leaves the name's id object; the next restore frees the name."""
    ceph.create(image_name, 16 * MiB)
    with ceph.image(image_name) as img:
        img.write(os.urandom(8 * MiB), 0)
    ref = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").stdout.strip()
    expected = rbd_export_head(ceph, image_name, tmp_path / "expected")
    new = f"{image_name}-new"
    temp = f"{new}.rbd2qcow2-restoring-0badc0de"
    ceph.create(temp, 16 * MiB)
    with ceph.image(temp) as img:
        temp_id = img.id()
    _plant_stray_name(ceph, new, temp_id)
    proc = restore(target, ref, "--to", f"rbd:{ceph.pool}/{new}")
    assert proc.returncode == 0, proc.stderr
    assert f"rbd_id.{new}" in proc.stderr and "interrupted create or rename" in proc.stderr
    assert [i for i in _rbd_images(ceph) if i.startswith(new)] == [new]
    assert_same_content(rbd_export_head(ceph, new, tmp_path / "new"), expected)


def test_rbd_restore_refuses_a_name_another_client_may_be_creating(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path
) -> None:
    ceph.create(image_name, 16 * MiB)
    ref = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").stdout.strip()
    new = f"{image_name}-new"
    _plant_stray_name(ceph, new, "1234abcd")
    proc = restore(target, ref, "--to", f"rbd:{ceph.pool}/{new}")
    assert proc.returncode == os.EX_CANTCREAT, proc.stderr
    assert f"rbd_id.{new}" in proc.stderr and "Traceback" not in proc.stderr
    assert not [i for i in _rbd_images(ceph) if i.startswith(new)]
    # written long ago and naming no image: a dead create, removed
    _plant_stray_name(ceph, new, "1234abcd", mtime=int(time.time()) - 3600)
    proc = restore(target, ref, "--to", f"rbd:{ceph.pool}/{new}")
    assert proc.returncode == 0, proc.stderr
    assert [i for i in _rbd_images(ceph) if i.startswith(new)] == [new]


def _wait_unwatched(ceph: Ceph, name: str) -> None:
    """Until the killed process's watch on the image has expired (about 30 s): until then it cannot be removed."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["rbd", "-c", str(ceph.conf), "status", "--format", "json", f"{ceph.pool}/{name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if not json.loads(out).get("watchers"):
            return
        time.sleep(1)
    raise AssertionError(f"{name} still watched")


def test_rbd_restore_force_killed_keeps_the_old_image(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path
) -> None:
    ceph.create(image_name, 64 * MiB)
    with ceph.image(image_name) as img:
        img.write(os.urandom(32 * MiB), 0)
    ref = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").stdout.strip()
    expected = rbd_export_head(ceph, image_name, tmp_path / "expected")
    victim = f"{image_name}-victim"
    ceph.create(victim, 80 * MiB)
    with ceph.image(victim) as img:
        img.write(os.urandom(80 * MiB), 0)
    old = rbd_export_head(ceph, victim, tmp_path / "old")
    _rbd_restore_killed(ceph, target, ref, victim, "--force")
    assert_same_content(rbd_export_head(ceph, victim, tmp_path / "after-kill"), old)
    left = [i for i in _rbd_images(ceph) if i.startswith(victim) and i != victim]
    assert len(left) == 1
    _wait_unwatched(ceph, left[0])
    proc = restore(target, ref, "--to", f"rbd:{ceph.pool}/{victim}", "--force")
    assert proc.returncode == 0, proc.stderr
    assert [i for i in _rbd_images(ceph) if i.startswith(victim)] == [victim]
    assert_same_content(rbd_export_head(ceph, victim, tmp_path / "victim"), expected)


def _daemon_of(pid: int) -> int:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and "qemu-storage" in (entry / "comm").read_text():
                    return int(entry.name)
    raise AssertionError(f"no qemu-storage-daemon child of {pid}")


@pytest.mark.parametrize("to", ["file", "rbd"])
def test_sigint_with_a_stuck_daemon_ends_promptly(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, to: str
) -> None:
    """qemu stops answering (SIGSTOP) mid-restore: SIGINT still ends the restore, cleans up, and kills qemu."""
    ceph.create(image_name, 64 * MiB)
    with ceph.image(image_name) as img:
        img.write(os.urandom(32 * MiB), 0)
    ref = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").stdout.strip()
    stall = tmp_path / "stall"
    dest = f"rbd:{ceph.pool}/{image_name}-new" if to == "rbd" else str(tmp_path / "out.raw")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbd2qcow2", "restore", "-t", str(target), ref, "--no-progress", "--to", dest],
        cwd=REPO,
        env=dict(os.environ, **stall_env("mid-restore", stall)),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_stalled(proc, stall)
        qsd = _daemon_of(proc.pid)
        os.kill(qsd, signal.SIGSTOP)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert not Path(f"/proc/{qsd}").exists() or "Z" in Path(f"/proc/{qsd}/stat").read_text().split()[2]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not [i for i in _rbd_images(ceph) if i.startswith(f"{image_name}-new")]
    assert not (tmp_path / "out.raw").exists() and not (tmp_path / ".out.raw.partial").exists()


def test_killed_restore_takes_a_stuck_daemon_with_it(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    """SIGKILL of a restore whose qemu stopped answering: qemu does not outlive it."""
    ceph.create(image_name, 64 * MiB)
    with ceph.image(image_name) as img:
        img.write(os.urandom(32 * MiB), 0)
    ref = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").stdout.strip()
    stall = tmp_path / "stall"
    proc = subprocess.Popen(
        [*RESTORE, "-t", str(target), ref, "--no-progress", "--to", f"rbd:{ceph.pool}/{image_name}-new"],
        cwd=REPO,
        env=dict(os.environ, **stall_env("mid-restore", stall)),
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_stalled(proc, stall)
        qsd = _daemon_of(proc.pid)
        os.kill(qsd, signal.SIGSTOP)
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{qsd}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{qsd}").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.kill(qsd, signal.SIGKILL)
