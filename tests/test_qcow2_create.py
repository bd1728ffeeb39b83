"""create_layer: a new empty layer, byte for byte what qemu-img create writes, and usable by qemu."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from rbd2qcow2.core.errors import StorageError, TargetError
from rbd2qcow2.store import qcow2

KiB, MiB, GiB, TiB, PiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50


def qemu_img_create(path: Path, size: int, backing: str | None) -> bytes:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=65536"]
    if backing is not None:
        args += ["-u", "-b", backing, "-F", "qcow2"]
    subprocess.run([*args, str(path), str(size)], check=True, capture_output=True)
    return path.read_bytes()


SIZES = [0, 1, 511, 512, 1000, 16 * MiB, 256 * MiB, 512 * MiB + 1, 2 * GiB + 512, 5 * TiB, 2 * PiB]
BACKINGS = [None, "20261122T010203Z.qcow2", "a name with spaces ü.qcow2", "-leading", "/an/absolute/path", "x" * 1023]


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("backing", BACKINGS, ids=lambda b: "none" if b is None else b[:12])
def test_a_new_layer_is_what_qemu_img_create_writes(tmp_path: Path, size: int, backing: str | None) -> None:
    ours = tmp_path / "ours.qcow2"
    qcow2.create_layer(ours, size, backing)
    assert ours.read_bytes() == qemu_img_create(tmp_path / "qemu.qcow2", size, backing)
    assert stat.S_IMODE(ours.stat().st_mode) == 0o600


def test_qemu_reads_writes_and_checks_a_new_layer(tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qcow2.create_layer(base, 8 * MiB, None)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 8M", str(base)], check=True, capture_output=True)
    qcow2.create_layer(top, 8 * MiB, base.name)
    io = ["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 64k", "-c", "write -z 2M 64k", str(top)]
    subprocess.run(io, check=True, capture_output=True)
    check = subprocess.run(["qemu-img", "check", "--output=json", str(top)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["check-errors"] == 0 and report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0
    raw = tmp_path / "raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(top), str(raw)], check=True)
    data = raw.read_bytes()
    assert data == b"\x11" * MiB + b"\x22" * (64 * KiB) + b"\x11" * (MiB - 64 * KiB) + bytes(64 * KiB) + b"\x11" * (
        6 * MiB - 64 * KiB
    )
    h = qcow2.read_header(top)
    assert (h.version, h.size, h.backing_file, h.backing_format) == (3, 8 * MiB, "base.qcow2", "qcow2")


def test_an_existing_file_is_replaced_or_kept(tmp_path: Path) -> None:
    path = tmp_path / "layer.qcow2"
    path.write_bytes(b"old" * 100_000)
    qcow2.create_layer(path, MiB, None)
    assert path.read_bytes()[:4] == qcow2.MAGIC and path.stat().st_size == 3 * 64 * KiB + 8
    with pytest.raises(TargetError, match="exists"):
        qcow2.create_layer(path, MiB, None, replace=False)


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "layer.qcow2").symlink_to(victim)
    with pytest.raises(StorageError):
        qcow2.create_layer(tmp_path / "layer.qcow2", MiB, None)
    assert victim.read_bytes() == b"keep"


@pytest.mark.parametrize(
    ("size", "backing", "message"),
    [(2 * PiB + 512, None, "more than a qcow2 image can hold"), (MiB, "y" * 1024, "qcow2 allows 1023")],
)
def test_what_qemu_refuses_is_refused(tmp_path: Path, size: int, backing: str | None, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        qcow2.create_layer(tmp_path / "layer.qcow2", size, backing)
    assert not (tmp_path / "layer.qcow2").exists()
    with pytest.raises(subprocess.CalledProcessError):
        qemu_img_create(tmp_path / "qemu.qcow2", size, backing)
