"""host_clusters: a layer's own clusters from its L2 tables, checked against qemu-img map (real qcow2 files)."""

from __future__ import annotations

import contextlib
import struct
import subprocess
from pathlib import Path

import pytest

from rbd2qcow2.adapters import qemu
from rbd2qcow2.core.errors import QemuError
from rbd2qcow2.ops.readback import own_extents
from rbd2qcow2.store import qcow2
from rbd2qcow2.store.qcow2 import host_clusters

KiB, MiB = 1 << 10, 1 << 20
CLUSTER = 64 * KiB


def io(path: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def per_cluster(extents: list[qemu.HostExtent], size: int) -> dict[int, tuple[bool, bool, int | None]]:
    """Cluster index -> (zero, data, host offset of the cluster) for what the layer itself allocates."""
    out = {}
    for e in extents:
        for pos in range(e.start, e.start + e.length, CLUSTER):
            host = None if e.offset is None or e.zero else e.offset + pos - e.start
            out[pos // CLUSTER] = (e.zero, e.data and not e.zero, host if e.data else None)
    assert max(out, default=0) * CLUSTER < size
    return out


def ours(path: Path, size: int) -> dict[int, tuple[bool, bool, int | None]]:
    runs = host_clusters(path)
    assert runs is not None
    return per_cluster([qemu.HostExtent(s, n, 0, z, not z, h) for s, n, z, h in runs], size)


@pytest.fixture
def layer(tmp_path: Path) -> tuple[Path, int]:
    """A layer over a base: data, zero clusters (over data and over nothing), a compressed cluster, holes."""
    size = 20 * MiB + 12 * KiB  # the last cluster is partial
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qcow2.create_layer(base, size, None)
    io(base, f"write -P 0x11 0 {size}")
    qcow2.create_layer(top, size, base.name)
    io(
        top,
        "write -P 0x22 0 1M",  # consecutive data clusters
        "write -P 0x23 3M 64k",
        "write -z 4M 192k",  # zero clusters, no host offset
        "write -P 0x24 8M 128k",
        "write -z 8M 64k",  # a zero cluster that had data: qemu keeps or drops its offset
        "write -c -P 0x25 12M 64k",  # compressed
        f"write -P 0x26 {20 * MiB} {12 * KiB}",  # the partial last cluster
    )
    return top, size


def test_the_tables_say_what_qemu_img_map_says(layer: tuple[Path, int]) -> None:
    top, size = layer
    theirs = per_cluster(qemu.map_own(top), size)
    assert ours(top, size) == theirs
    kinds = {v[:2] for v in theirs.values()}
    assert {(False, True), (True, False)} <= kinds  # data and zeros were both there to compare
    assert theirs[12 * MiB // CLUSTER] == (False, True, None)  # compressed: data, no plain host offset


def test_own_extents_of_a_plain_layer_come_from_the_tables(
    layer: tuple[Path, int], caplog: pytest.LogCaptureFixture
) -> None:
    top, size = layer
    with caplog.at_level("INFO"):
        extents = own_extents(top)
    assert "qemu-img map" not in caplog.text
    assert per_cluster(extents, size) == per_cluster(qemu.map_own(top), size)


def _l1_offset(path: Path) -> int:
    with path.open("rb") as f:
        f.seek(40)
        return int(struct.unpack(">Q", f.read(8))[0])


@pytest.mark.parametrize(
    "damage",
    ["l2 out of bounds", "l2 reserved bit", "data out of bounds", "extended l2", "not qcow2"],
)
def test_anything_unexpected_gives_up_and_own_extents_asks_qemu(layer: tuple[Path, int], damage: str) -> None:
    top, _size = layer
    raw = bytearray(top.read_bytes())
    l1 = _l1_offset(top)
    (l2_entry,) = struct.unpack_from(">Q", raw, l1)
    l2 = l2_entry & 0x00FF_FFFF_FFFF_FE00
    (first,) = struct.unpack_from(">Q", raw, l2)
    if damage == "l2 out of bounds":
        struct.pack_into(">Q", raw, l1, (l2_entry & ~0x00FF_FFFF_FFFF_FE00) | (1 << 40))
    elif damage == "l2 reserved bit":
        struct.pack_into(">Q", raw, l2, first | 0x2)
    elif damage == "data out of bounds":
        struct.pack_into(">Q", raw, l2, (first & ~0x00FF_FFFF_FFFF_FE00) | (1 << 40))
    elif damage == "extended l2":
        (incompat,) = struct.unpack_from(">Q", raw, 72)
        struct.pack_into(">Q", raw, 72, incompat | 1 << 4)
    else:
        raw[:4] = b"XXXX"
    top.write_bytes(bytes(raw))
    assert host_clusters(top) is None
    if damage != "not qcow2":
        # qemu is asked instead (and, for a damaged layer, fails or maps what it finds; never our guess).
        with contextlib.suppress(QemuError):
            own_extents(top)


def test_a_missing_file_gives_up(tmp_path: Path) -> None:
    assert host_clusters(tmp_path / "nope.qcow2") is None
