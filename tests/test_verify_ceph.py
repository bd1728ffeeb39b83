"""verify: every kind of damage is found and named; the chain files are never changed."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from helpers import Ceph, MiB, Workload, assert_same_content, run_cli

from rbd2qcow2 import manifest as mf
from rbd2qcow2.names import ImageSpec
from rbd2qcow2.target import chain_dir

pytestmark = pytest.mark.ceph


def build(ceph: Ceph, target: Path, name: str, cycles: int = 4) -> Path:
    """A chain with writes, discards, zeros, a shrink and a grow."""
    ceph.create(name, 16 * MiB)
    work = Workload(seed=3)
    with ceph.image(name) as img:
        img.write(work.data(16 * MiB), 0)
    for cycle in range(cycles):
        with ceph.image(name) as img:
            if cycle == 1:
                img.resize(9 * MiB + 12345, allow_shrink=True)
            if cycle == 2:
                img.resize(20 * MiB)
            work.run(img, ops=6)
        proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{name}")
        assert proc.returncode == 0, proc.stderr
    return chain_dir(target, ImageSpec(ceph.pool, "", name))


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.name != "lock"}


def verify(target: Path, *args: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    proc = run_cli("verify", "--target", str(target), "--json", *args)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout) if proc.stdout else {}


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def data_offset(layer: Path) -> int:
    """The host offset of a data cluster that the layer itself holds."""
    opts = {"driver": "qcow2", "file": {"driver": "file", "filename": str(layer)}, "backing": None}
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "json:" + json.dumps(opts)], capture_output=True, text=True, check=True
    ).stdout
    extents = [e for e in json.loads(out) if e.get("data") and "offset" in e]
    assert extents, out
    return int(extents[0]["offset"]) + 1000


def test_clean_chain_verifies(ceph: Ceph, target: Path, image_name: str) -> None:
    directory = build(ceph, target, image_name)
    before = digests(directory)
    code, report = verify(target, "--deep", "--source")
    assert code == 0, report
    assert report["ok"] and report["points_checked"] == 4 and report["bytes_read"] > 0
    assert digests(directory) == before
    # Checksums are carried through merges: still clean after a prune.
    assert run_cli("prune", "--target", str(target), "--keep-last", "2").returncode == 0
    code, report = verify(target, "--deep")
    assert code == 0, report


@pytest.mark.parametrize("layer_index", [0, 1, 3])
def test_flipped_data_byte_is_found(ceph: Ceph, target: Path, image_name: str, layer_index: int) -> None:
    directory = build(ceph, target, image_name)
    m = mf.load(directory)
    assert m is not None
    victim = m.points[layer_index]
    flip(directory / victim.file, data_offset(directory / victim.file))
    code, structure = verify(target)
    assert code == 0, structure  # qemu-img check does not see a flipped data byte
    before = {k: v for k, v in digests(directory).items() if k != mf.NAME}
    code, report = verify(target, "--deep")
    assert code == 65
    files = {p["file"] for p in report["problems"]}
    assert any(victim.file in f for f in files), report
    assert all(p["region"] is not None for p in report["problems"])
    assert {k: v for k, v in digests(directory).items() if k != mf.NAME} == before
    flagged = mf.load(directory)
    assert flagged is not None and "damaged" in flagged.point(victim.id).flags
    listing = run_cli("list", "--target", str(target)).stdout
    assert "damaged" in listing


@pytest.mark.parametrize("where", ["header", "backing-name", "manifest", "checksums"])
def test_metadata_damage_is_found(ceph: Ceph, target: Path, image_name: str, where: str) -> None:
    directory = build(ceph, target, image_name, cycles=3)
    m = mf.load(directory)
    assert m is not None
    point = m.points[1]
    if where == "header":
        flip(directory / point.file, 47)  # lowest byte of the L1 table offset
    elif where == "backing-name":
        raw = (directory / point.file).read_bytes()[:4096]
        flip(directory / point.file, raw.index(m.points[0].file.encode()) + 3)
    elif where == "manifest":
        text = (directory / mf.NAME).read_bytes()
        flip(directory / mf.NAME, text.index(b'"size"') + 9)
    else:
        assert point.checksums is not None
        flip(directory / point.checksums.file, 40)
    before = digests(directory)
    code, report = verify(target, "--deep")
    assert code == 65, report
    problems = json.dumps(report["problems"])
    expected_name = {"header": point.file, "backing-name": point.file, "manifest": mf.NAME}.get(where)
    assert expected_name is None or expected_name in problems
    if where == "checksums":
        assert point.checksums is not None and point.checksums.file in problems
    after = digests(directory)
    assert {k: v for k, v in after.items() if k != mf.NAME} == {k: v for k, v in before.items() if k != mf.NAME}


def test_dropped_diff_extent_is_caught(ceph: Ceph, target: Path, image_name: str) -> None:
    """A fault between librbd and the puller: the sample check refuses to commit, verify --source finds it."""
    ceph.create(image_name, 8 * MiB)
    with ceph.image(image_name) as img:
        img.write(b"\x11" * (8 * MiB), 0)
    assert run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}").returncode == 0
    with ceph.image(image_name) as img:
        img.write(b"\x22" * MiB, 2 * MiB)
    spec = f"{ceph.pool}/{image_name}"
    proc = run_cli("backup", "-t", str(target), "--check-unchanged", "1", spec, env={"RBD2QCOW2_DROP_EXTENT": "0"})
    assert proc.returncode == 65, proc.stderr
    assert "missed changes" in proc.stderr
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    m = mf.load(directory)
    assert m is not None and len(m.points) == 1 and "no-incremental" in m.points[0].flags
    proc = run_cli("backup", "-t", str(target), "-v", spec)
    assert proc.returncode == 0 and "missed changes" in proc.stderr
    m = mf.load(directory)
    assert m is not None and m.points[-1].kind == "full"
    # Without the sample check the wrong point is committed; verify --source finds it.
    with ceph.image(image_name) as img:
        img.write(b"\x33" * MiB, 5 * MiB)
    proc = run_cli("backup", "-t", str(target), "--check-unchanged", "0", spec, env={"RBD2QCOW2_DROP_EXTENT": "0"})
    assert proc.returncode == 0, proc.stderr
    code, report = verify(target, "--source", spec)
    assert code == 65, report
    assert any(p["region"] and p["region"][0] <= 5 * MiB < p["region"][1] for p in report["problems"]), report


def test_the_oracle_notices_corruption(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_bytes(b"\0" * 100_000)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\0" * 50_000 + b"\1" + b"\0" * 49_999)
    with pytest.raises(AssertionError, match="at byte 50000"):
        assert_same_content(bad, good)
