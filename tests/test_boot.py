"""A real boot: back up a bootable disk twice and boot qemu from an overlay of each point.

The guest (tests/bootguest.py) reads the file ``marker`` from the ext4 filesystem on its
virtio disk and prints it; each point must boot and print the marker it was backed up with,
and booting must leave the chain's files untouched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import bootguest
import pytest
from helpers import Ceph, MiB, run_cli

from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = [pytest.mark.ceph, pytest.mark.slow]

SIZE_MIB = 32
PIECE = 4 * MiB
TOOLS = ("qemu-system-x86_64", "qemu-img", "mkfs.ext4", "apt-get", "apt-cache", "dpkg-deb")
CACHE_ENV = "RBD2QCOW2_CACHE"


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The guest's kernel and initramfs, cached in $RBD2QCOW2_CACHE if set, else for this session."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/bootstrap")
    cache = os.environ.get(CACHE_ENV)
    return bootguest.ensure_kernel(Path(cache) if cache else tmp_path_factory.mktemp("bootguest"))


def write_changes(ceph: Ceph, name: str, disk: Path, previous: Path | None) -> int:
    """Write the 4 MiB pieces of ``disk`` that differ from ``previous`` (zeros if None); how many."""
    data = disk.read_bytes()
    before = previous.read_bytes() if previous is not None else bytes(len(data))
    changed = [o for o in range(0, len(data), PIECE) if data[o : o + PIECE] != before[o : o + PIECE]]
    with ceph.image(name) as img:
        for offset in changed:
            img.write(data[offset : offset + PIECE], offset)
    return len(changed)


def backup(target: Path, ceph: Ceph, name: str) -> str:
    proc = run_cli("backup", "--target", str(target), "--no-progress", f"{ceph.pool}/{name}", check=True)
    stdout: str = proc.stdout
    spec, _, point = stdout.strip().rpartition("@")
    assert spec == f"{ceph.pool}/{name}", stdout
    return point


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_boot_each_point(ceph: Ceph, target: Path, image_name: str, tmp_path: Path, guest: tuple[Path, Path]) -> None:
    kernel, initrd = guest
    ceph.create(image_name, SIZE_MIB * MiB)
    points: list[tuple[str, str]] = []
    previous: Path | None = None
    for marker in ("one", "two"):
        disk = tmp_path / f"{marker}.raw"
        bootguest.make_disk(disk, marker, SIZE_MIB)
        written = write_changes(ceph, image_name, disk, previous)
        if previous is not None:
            # Only the marker's block changed: the second point is a thin layer, and booting
            # it reads the rest of the filesystem through its backing file.
            assert 0 < written < SIZE_MIB * MiB // PIECE
        points.append((backup(target, ceph, image_name), marker))
        previous = disk

    chain = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    manifest = mf.load(chain)
    assert manifest is not None
    assert [(p.id, p.parent) for p in manifest.points] == [(points[0][0], None), (points[1][0], points[0][0])]
    files = {p.id: p.file for p in manifest.points}
    before = digests(chain)

    for point, marker in points:
        overlay = tmp_path / f"overlay-{point}.qcow2"
        layer = chain / files[point]
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(layer.resolve()), str(overlay)],
            check=True,
        )
        output = bootguest.boot(kernel, initrd, overlay)
        assert bootguest.marker_of(output) == marker, output

    assert digests(chain) == before
