"""``du``: the pure accounting and freed estimate, and the command on real qcow2 chains (no Ceph)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from factories import manifest, point, sums

from rbd2qcow2.adapters.qemu import MapExtent
from rbd2qcow2.core.errors import ChainDamaged, QemuError
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.ops import usage
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir, open_target

MiB = 1 << 20
P1, P2, P3 = "20260101T000000Z", "20260102T000000Z", "20260103T000000Z"


# -- pure -----------------------------------------------------------------------------


def test_moved_bytes_counts_only_data_served_by_depth_1() -> None:
    view = [
        MapExtent(0, MiB, 0, True, False),  # the child's own data
        MapExtent(MiB, MiB, 1, True, False),  # the point's data, not overwritten: moves
        MapExtent(2 * MiB, MiB, 1, True, True),  # the point's zero clusters: no data moves
        MapExtent(3 * MiB, MiB, 2, True, False),  # the point's parent: stays
        MapExtent(4 * MiB, MiB, 1, False, True),  # unallocated everywhere
        MapExtent(5 * MiB, 4096, 1, True, False),
    ]
    assert usage.moved_bytes(view) == MiB + 4096
    assert usage.moved_bytes([]) == 0


def test_freed_estimate() -> None:
    moved = [MapExtent(0, MiB, 1, True, False)]
    assert usage.freed_estimate(5 * MiB, None) == 5 * MiB  # no child: all of it
    assert usage.freed_estimate(5 * MiB, []) == 5 * MiB  # the child overwrites everything
    assert usage.freed_estimate(5 * MiB, moved) == 4 * MiB
    assert usage.freed_estimate(MiB // 2, moved) == 0  # never below zero


def _point(
    pid: str, depth: int, layer: int, sums: int = 0, freed: int | None = 0, size: int = 8 * MiB
) -> usage.PointUsage:
    return usage.PointUsage(pid, depth, size, layer, sums, freed)


def _sample() -> usage.Usage:
    a = usage.ImageUsage(
        ImageSpec("rbd", "", "a"),
        (_point(P1, 1, 1000, 10, 400), _point(P2, 2, 2000, 20, 2020, size=16 * MiB)),
        manifest_bytes=4096,
    )
    b = usage.ImageUsage(ImageSpec("rbd", "ns", "b"), (_point(P1, 1, 300, freed=None),), 4096, other_bytes=777)
    c = usage.ImageUsage(ImageSpec("other", "", "c"), (), 4096)
    return usage.Usage([a, b, c])


def test_aggregation() -> None:
    u = _sample()
    a, b, c = u.images
    assert a.stored_bytes == 1010 + 2020 + 4096
    assert (a.virtual_size, a.depth) == (16 * MiB, 2)  # the newest point's
    assert (c.virtual_size, c.depth, c.stored_bytes) == (0, 0, 4096)
    assert u.pools == {
        "other": usage.PoolUsage("other", 1, 0, 4096, 0),
        "rbd": usage.PoolUsage("rbd", 2, 3, a.stored_bytes + b.stored_bytes, 777),
    }
    assert list(u.pools) == ["other", "rbd"]
    assert u.total_bytes == a.stored_bytes + b.stored_bytes + c.stored_bytes
    assert u.other_bytes == 777  # counted apart, not in total_bytes
    assert u.exit_code == 0


def test_exit_code_damage_first() -> None:
    u = _sample()
    u.problems.append(QemuError("map failed"))
    assert u.exit_code == 74
    u.problems.append(ChainDamaged("/t/rbd/a", "bad header"))
    assert u.exit_code == 65
    d = usage.usage_dict(u)
    assert d["damaged"] == ["chain /t/rbd/a is damaged: bad header"]
    assert d["errors"] == ["qemu: map failed"]


def test_usage_dict_and_table() -> None:
    u = _sample()
    d = usage.usage_dict(u)
    json.dumps(d)
    img = d["images"][1]
    assert (img["image"], img["pool"], img["namespace"], img["name"]) == ("rbd/ns/b", "rbd", "ns", "b")
    assert img["points"] == [
        {
            "id": P1,
            "depth": 1,
            "virtual_size": 8 * MiB,
            "stored_bytes": 300,
            "layer_bytes": 300,
            "sums_bytes": 0,
            "freed_if_removed": None,
        }
    ]
    assert d["pools"]["rbd"] == {"images": 2, "points": 3, "stored_bytes": 7126 + 4396, "other_bytes": 777}
    assert d["total_bytes"] == 7126 + 4396 + 4096
    table = usage.format_table(u)
    assert "rbd/ns/b" in table and P1 not in table and "FREED" not in table
    assert table.splitlines()[-1].split()[:3] == ["TOTAL", "3", "3"]
    detailed = usage.format_table(u, points=True)
    assert f"  @{P2}" in detailed and "FREED IF REMOVED" in detailed
    assert detailed.splitlines()[5].split()[-1] == "?"  # b's point: unknown


# -- on real chains -------------------------------------------------------------------


def _qemu(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def _layer(path: Path, backing: str | None, writes: list[tuple[int, int, int]], size: int = 4 * MiB) -> None:
    """A qcow2 layer over ``backing`` (a sibling's name) with ``(pattern, offset, length)`` writes."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1"]
    if backing is not None:
        cmd += ["-u", "-b", backing, "-F", "qcow2"]
    _qemu(*cmd, str(path), str(size))
    for pattern, offset, length in writes:
        _qemu("qemu-io", "-c", f"write -P {pattern} {offset} {length}", str(path))


def _chain(root: Path, image: ImageSpec, layers: list[tuple[str, str | None, list[tuple[int, int, int]]]]) -> Path:
    """Layers ``(id, backing file name or None, writes)``, oldest first, and their manifest."""
    directory = chain_dir(root, image)
    directory.mkdir(parents=True)
    points = []
    parent: str | None = None
    for pid, backing, writes in layers:
        _layer(directory / f"{pid}.qcow2", backing, writes)
        points.append(point(pid, parent, size=4 * MiB))
        parent = pid
    mf.save(directory, manifest(*points, image=image))
    return directory


def _du(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rbd2qcow2", "du", "--target", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _disk(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


@pytest.fixture
def target(tmp_path: Path) -> Path:
    root = tmp_path / "target"
    open_target(root, create=True)
    # rbd/vm1: P1 holds [0, 1M) and [2M, 3M); P2 overwrites [0, 1M); P3 overwrites all of P2.
    vm1 = _chain(
        root,
        ImageSpec("rbd", "", "vm1"),
        [
            (P1, None, [(1, 0, MiB), (2, 2 * MiB, MiB)]),
            (P2, f"{P1}.qcow2", [(3, 0, MiB)]),
            (P3, f"{P2}.qcow2", [(4, 0, MiB)]),
        ],
    )
    (vm1 / f"{P2}.sums").write_bytes(b"s" * 5000)
    _chain(root, ImageSpec("rbd", "ns", "vm2"), [(P1, None, [(5, 0, 2 * MiB)])])
    # other/vm3: P2's header names a file that is not its parent's.
    _chain(root, ImageSpec("other", "", "vm3"), [(P1, None, [(6, 0, MiB)]), (P2, "wrong.qcow2", [])])
    return root


def _images(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i["image"]: i for i in report["images"]}


def _points(image: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in image["points"]}


def test_du_on_real_chains(target: Path) -> None:
    proc = _du(target, "--json")
    assert proc.returncode == 65, proc.stderr
    report = json.loads(proc.stdout)
    images = _images(report)
    assert sorted(images) == ["other/vm3", "rbd/ns/vm2", "rbd/vm1"]

    # Stored bytes are the files' allocated bytes, summed per point, image, pool and in total.
    on_disk: dict[str, int] = {}
    for name, img in images.items():
        directory = chain_dir(target, ImageSpec(img["pool"], img["namespace"], img["name"]))
        for pid, p in _points(img).items():
            layer = _disk(directory / f"{pid}.qcow2")
            sums = directory / f"{pid}.sums"
            assert p["layer_bytes"] == layer
            assert p["stored_bytes"] == layer + (_disk(sums) if sums.exists() else 0)
        assert img["manifest_bytes"] == _disk(directory / mf.NAME)
        on_disk[name] = sum(_disk(f) for f in directory.iterdir() if f.is_file())
        assert img["stored_bytes"] == on_disk[name], name
        assert img["other_bytes"] == 0
    assert (
        _points(images["rbd/vm1"])[P2]["sums_bytes"]
        == _disk(chain_dir(target, ImageSpec("rbd", "", "vm1")) / f"{P2}.sums")
        > 0
    )
    assert report["pools"] == {
        "other": {"images": 1, "points": 2, "stored_bytes": on_disk["other/vm3"], "other_bytes": 0},
        "rbd": {"images": 2, "points": 4, "stored_bytes": on_disk["rbd/vm1"] + on_disk["rbd/ns/vm2"], "other_bytes": 0},
    }
    assert report["total_bytes"] == sum(on_disk.values())

    vm1 = images["rbd/vm1"]
    assert (vm1["virtual_size"], vm1["depth"]) == (4 * MiB, 3)
    pts = _points(vm1)
    assert [p["depth"] for p in vm1["points"]] == [1, 2, 3]
    # P1: its [2M, 3M) is not overwritten by P2 and would move into it; the rest (and the metadata) is freed.
    assert pts[P1]["stored_bytes"] - pts[P1]["freed_if_removed"] == MiB
    assert pts[P1]["freed_if_removed"] >= MiB  # its overwritten [0, 1M)
    # P2: P3 overwrites all of it, so removing it frees everything, its checksums included.
    assert pts[P2]["freed_if_removed"] == pts[P2]["stored_bytes"] > MiB
    # P3: the newest, no child.
    assert pts[P3]["freed_if_removed"] == pts[P3]["stored_bytes"]
    vm2 = images["rbd/ns/vm2"]
    assert vm2["points"][0]["freed_if_removed"] == vm2["points"][0]["stored_bytes"] >= 2 * MiB

    # The damaged chain is reported, and still counted without estimates that need its headers.
    assert len(report["damaged"]) == 1
    assert "wrong.qcow2" in report["damaged"][0] and f"{P2}.qcow2" in report["damaged"][0]
    assert report["errors"] == []
    vm3 = _points(images["other/vm3"])
    assert vm3[P1]["freed_if_removed"] is None
    assert vm3[P2]["freed_if_removed"] == vm3[P2]["stored_bytes"]
    assert "wrong.qcow2" in proc.stderr


def test_du_selects_and_prints_a_table(target: Path) -> None:
    proc = _du(target, "--json", "rbd")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert sorted(_images(report)) == ["rbd/ns/vm2", "rbd/vm1"]
    assert list(report["pools"]) == ["rbd"] and report["damaged"] == []

    proc = _du(target, "--points", "rbd/vm1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "POINTS", "DEPTH", "SIZE", "STORED", "FREED", "IF", "REMOVED"]
    assert lines[1].split()[:4] == ["rbd/vm1", "3", "3", "4.0"]
    assert [line.split()[0] for line in lines[2:5]] == [f"@{P1}", f"@{P2}", f"@{P3}"]
    assert lines[-1].split()[:3] == ["TOTAL", "1", "3"]
    assert "rbd/ns/vm2" not in proc.stdout

    proc = _du(target, "rbd/ns/vm2")
    assert proc.returncode == 0 and "@" not in proc.stdout and "rbd/ns/vm2" in proc.stdout


def test_du_counts_unnamed_files_apart(target: Path) -> None:
    directory = chain_dir(target, ImageSpec("rbd", "ns", "vm2"))
    leftover = directory / "20260105T000000Z.qcow2.partial"
    leftover.write_bytes(b"x" * 100_000)
    report = json.loads(_du(target, "--json", "rbd/ns/vm2").stdout)
    assert report["images"][0]["other_bytes"] == report["other_bytes"] == _disk(leftover)
    assert report["total_bytes"] == report["images"][0]["stored_bytes"]


def test_du_pending_merge_leaves_estimates_out(target: Path) -> None:
    directory = chain_dir(target, ImageSpec("rbd", "", "vm1"))
    m = mf.load(directory)
    assert m is not None
    pending = mf.PendingMerge(P3, (P2,), sums(P3), 0, 0, 0)
    mf.save(directory, manifest(*m.points, image=m.image, image_id=m.image_id, tag=m.target_tag, pending=pending))
    proc = _du(target, "--json", "rbd/vm1")
    assert proc.returncode == 0, proc.stderr
    img = json.loads(proc.stdout)["images"][0]
    assert img["pending_merge"] is True
    assert [p["freed_if_removed"] for p in img["points"]] == [None, None, None]
    assert "pending" in proc.stderr


def test_du_not_a_target(tmp_path: Path) -> None:
    proc = _du(tmp_path)
    assert proc.returncode == 73
    assert "not an rbd2qcow2 target" in proc.stderr
