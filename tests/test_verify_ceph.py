"""verify: every kind of damage is found and named; the chain files are never changed."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, Ceph, MiB, Workload, assert_same_content, run_cli

from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

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


# -- only damage flags a point; a flag says why and clears -----------------------------------


def manifest_bytes(directory: Path) -> bytes:
    return (directory / mf.NAME).read_bytes()


def path_without_qemu_img(tmp_path: Path, how: str) -> str:
    """A PATH where qemu-img is missing, or a script that fails as a broken install does."""
    bin_dir = tmp_path / f"bin-{how}"
    bin_dir.mkdir()
    if how == "failing":
        script = bin_dir / "qemu-img"
        script.write_text("#!/bin/sh\necho 'qemu-img: error while loading shared libraries' >&2\nexit 1\n")
        script.chmod(0o755)
        return f"{bin_dir}:{os.environ['PATH']}"
    return str(bin_dir)


@pytest.mark.parametrize("how", ["missing", "failing"])
@pytest.mark.parametrize("deep", [False, True], ids=["structure", "deep"])
def test_qemu_img_unavailable_flags_nothing(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, how: str, deep: bool
) -> None:
    directory = build(ceph, target, image_name, cycles=2)
    before = manifest_bytes(directory)
    env = {"PATH": path_without_qemu_img(tmp_path, how)}
    proc = run_cli("verify", "--target", str(target), "--json", *(["--deep"] if deep else []), env=env)
    assert proc.returncode == 69, proc.stderr
    assert "Traceback" not in proc.stderr and "qemu-img" in proc.stderr
    report = json.loads(proc.stdout)
    assert not report["ok"] and not report["problems"] and report["not_verified"], report
    assert manifest_bytes(directory) == before
    code, report = verify(target, "--deep")
    assert code == 0, report


def test_a_locked_chain_is_not_verified(ceph: Ceph, target: Path, image_name: str) -> None:
    directory = build(ceph, target, image_name, cycles=2)
    before = manifest_bytes(directory)
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running backup or prune holds it
        code, report = verify(target, "--deep")
        assert code == 75, report
        assert not report["problems"] and report["not_verified"][0]["exit_code"] == 75
        assert manifest_bytes(directory) == before
        waiting = subprocess.Popen(
            [sys.executable, "-m", "rbd2qcow2", "verify", "--target", str(target), "--wait", "--deep"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)  # still waiting for the lock
    finally:
        os.close(fd)
    _, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert manifest_bytes(directory) == before


def wait_unlocked(layer: Path) -> None:
    """Wait until no process holds qemu's lock on the chain of ``layer`` (a killed run's daemon exits on its own)."""
    deadline = time.monotonic() + 20
    while subprocess.run(["qemu-img", "info", "--backing-chain", str(layer)], capture_output=True).returncode:
        assert time.monotonic() < deadline, "the chain is still locked"
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["copy", "commit"])
def test_verify_finishes_an_interrupted_merge(ceph: Ceph, target: Path, image_name: str, how: str) -> None:
    directory = build(ceph, target, image_name, cycles=4)
    m = mf.load(directory)
    assert m is not None
    ids = [p.id for p in m.points]
    if how == "copy":  # the points differ in size: a new layer is built beside the child
        args = ["prune", "--target", str(target), "--keep-last", "2"]
        kept = ids[-2:]
    else:  # after the grow, a point of its child's size: qemu commits the child into it, in place
        args = ["delete", "--target", str(target), f"{ceph.pool}/{image_name}@{ids[2]}"]
        kept = [*ids[:2], ids[3]]
    proc = run_cli(*args, env={"RBD2QCOW2_CRASH_AT": "prune-after-journal"})
    assert proc.returncode == -9, proc.stderr
    pending = mf.load(directory)
    assert pending is not None and pending.pending is not None and pending.pending.method == how
    wait_unlocked(directory / pending.point(ids[-1]).file)
    code, report = verify(target, "--deep")
    assert code == 0, report
    assert report["points_checked"] == len(kept)
    done = mf.load(directory)
    assert done is not None and done.pending is None
    assert [p.id for p in done.points] == kept
    assert all(not p.flags for p in done.points)
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}", "-v")
    assert proc.returncode == 0 and "incremental backup" in proc.stderr, proc.stderr


def test_a_damage_flag_says_why_and_clears(ceph: Ceph, target: Path, image_name: str) -> None:
    directory = build(ceph, target, image_name, cycles=4)
    m = mf.load(directory)
    assert m is not None
    victim = m.points[-1]  # the base of the next backup
    offset = data_offset(directory / victim.file)
    flip(directory / victim.file, offset)
    code, report = verify(target, "--deep")
    assert code == 65, report
    flagged = mf.load(directory)
    assert flagged is not None
    assert [p.id for p in flagged.points if p.flags] == [victim.id]
    (why,) = flagged.latest.reasons(mf.DAMAGED) if flagged.latest else []
    assert why.check == "deep" and victim.file in why.reason and "differs" in why.reason, why
    assert re.search(r"at bytes \d+-\d+", why.reason) and why.time.startswith("20"), why
    listing = json.loads(run_cli("list", "--target", str(target), "--json").stdout)
    reasons = {row["id"]: row["flag_reasons"] for row in listing["points"]}
    assert reasons[victim.id] == [{"flag": "damaged", "check": "deep", "reason": why.reason, "time": why.time}]
    table = run_cli("list", "--target", str(target)).stdout
    assert f"{victim.id} damaged: deep check, {why.time}: {why.reason}" in table, table
    # A structure check does not clear what the deep check found.
    code, report = verify(target)
    assert code == 0, report
    still = mf.load(directory)
    assert still is not None and still.latest is not None and mf.DAMAGED in still.latest.flags
    flip(directory / victim.file, offset)  # restored
    proc = run_cli("verify", "--target", str(target), "--deep")
    assert proc.returncode == 0, proc.stderr
    assert "damaged flag is cleared" in proc.stderr and f"CLEARED {ceph.pool}/{image_name}@{victim.id}" in proc.stdout
    cleared = mf.load(directory)
    assert cleared is not None and all(not p.flags and not p.flag_reasons for p in cleared.points)
    with ceph.image(image_name) as img:
        Workload(seed=9).run(img, ops=4)
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}", "-v")
    assert proc.returncode == 0, proc.stderr
    after = mf.load(directory)
    assert after is not None and after.latest is not None
    assert after.latest.kind == "incremental" and after.latest.parent == m.points[-1].id, proc.stderr
