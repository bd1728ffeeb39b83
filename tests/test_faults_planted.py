"""Fault tier: hostile or unusual things planted in and around a target, and verify's flags.

Each test asserts the promise: the documented exit code, never a hang, a
traceback or wrong data.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import faultlib as fl
import pytest
from helpers import Ceph, MiB

from rbd2qcow2.core.faults import CRASH_ENV
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = [pytest.mark.faults, pytest.mark.ceph]

SIZE = 8 * MiB


@dataclasses.dataclass
class Built:
    oracle: fl.Oracle
    snapshot: Path  # a copy of the sound target, restored before each test


@pytest.fixture(scope="module")
def built(ceph: Ceph, tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("planted")
    name = f"planted-{uuid.uuid4().hex[:6]}"
    ceph.create(name, SIZE)
    oracle = fl.Oracle(ceph, name, root / "target", root / "oracle")
    env = {"CEPH_CONF": str(ceph.conf)}
    for i in range(3):
        with ceph.image(name) as img:
            img.write(os.urandom(MiB), 2 * i * MiB)
        digest = oracle.current()
        proc = fl.run(["backup", "--target", str(oracle.target), "--no-progress", oracle.spec], env)
        assert proc.returncode == 0, proc.stderr
        oracle.adopt(digest)
    shutil.copytree(oracle.target, root / "sound", symlinks=True)
    return Built(oracle, root / "sound")


@pytest.fixture
def chain(built: Built, tmp_path: Path) -> fl.Oracle:
    """A fresh copy of the sound chain for one test."""
    o = built.oracle
    copy = fl.Oracle(o.ceph, o.name, tmp_path / "target", tmp_path / "oracle")
    shutil.copytree(built.snapshot, copy.target, symlinks=True)
    copy.expected = dict(o.expected)
    return copy


def resave(o: fl.Oracle, m: mf.Manifest) -> None:
    """Write a manifest with a valid checksum: the planted values pass the integrity check."""
    (o.directory / mf.NAME).write_bytes(mf.dumps(m))


def flags(o: fl.Oracle) -> list[str]:
    return [p.id for p in o.manifest().points if "damaged" in p.flags]


def verify(
    o: fl.Oracle, *extra: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return fl.run(["verify", "--target", str(o.target), "--no-progress", *extra], env or {}, timeout=timeout)


@pytest.mark.parametrize("where", ["/dev/zero", "..", "absolute"])
def test_manifest_checksum_file_outside_the_chain(chain: fl.Oracle, tmp_path: Path, where: str) -> None:
    """A manifest (with a valid checksum) naming a checksum file outside the chain: refused, never read."""
    m = chain.manifest()
    p = m.points[1]
    assert p.checksums is not None
    sums = chain.directory / p.checksums.file
    if where == "/dev/zero":
        name = where
    else:  # a faithful copy outside the chain, so only the name can give it away
        outside = tmp_path / "elsewhere.sums"
        shutil.copy(sums, outside)
        name = str(outside) if where == "absolute" else os.path.relpath(outside, chain.directory)
    planted = dataclasses.replace(p, checksums=dataclasses.replace(p.checksums, file=name))
    resave(chain, dataclasses.replace(m, points=(m.points[0], planted, *m.points[2:])))
    try:
        proc = verify(chain, "--deep", timeout=20)
        outcome = f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc, outcome = None, "hung"
    fl.TABLE.add(f"manifest: checksums.file {where} (valid checksum)", "verify --deep", outcome, True)
    assert proc is not None, "verify hung"
    assert proc.returncode == 65 and "Traceback" not in proc.stderr


def test_deeply_nested_manifest(chain: fl.Oracle, tmp_path: Path) -> None:
    (chain.directory / mf.NAME).write_text("[" * 200_000 + "]" * 200_000)
    latest = sorted(chain.expected)[-1]
    proc = fl.run(
        ["restore", "--target", str(chain.target), f"{chain.spec}@{latest}", "--to", str(tmp_path / "o.raw")], {}
    )
    fl.TABLE.add("manifest: 200,000 nested arrays", "restore (file)", f"exit {proc.returncode}", True)
    assert proc.returncode == 65 and "Traceback" not in proc.stderr, proc.stderr[-500:]


def test_missing_manifest_keeps_the_layers(chain: fl.Oracle) -> None:
    layers = sorted(p.name for p in chain.directory.glob("*.qcow2"))
    (chain.directory / mf.NAME).unlink()
    proc = fl.run(["backup", "--target", str(chain.target), "--no-progress", chain.spec], {})
    kept = sorted(n for n in layers if (chain.directory / n).exists())
    fl.TABLE.add(
        "manifest: missing",
        "backup",
        f"exit {proc.returncode}, {len(kept)} of {len(layers)} layers kept",
        True,
    )
    assert kept == layers


def test_commit_merge_leaves_hard_links_alone(chain: fl.Oracle, tmp_path: Path) -> None:
    m = chain.manifest()
    oldest = chain.directory / m.points[0].file
    outside = tmp_path / "hardlink.qcow2"
    os.link(oldest, outside)
    before = fl.sha256_file(outside)
    proc = fl.run(["delete", "--target", str(chain.target), f"{chain.spec}@{m.points[0].id}"], {})
    same = fl.sha256_file(outside) == before
    fl.TABLE.add(
        "layer hard-linked outside the target",
        "delete (commit merge)",
        f"exit {proc.returncode}, outside copy {'unchanged' if same else 'rewritten'}",
        True,
    )
    assert proc.returncode == 0, proc.stderr
    assert same, "the merge wrote into a file that is also linked outside the target"


def test_restore_force_leaves_device_nodes(chain: fl.Oracle, tmp_path: Path) -> None:
    node = tmp_path / "node"
    os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # what /dev/null is
    latest = sorted(chain.expected)[-1]
    proc = fl.run(
        ["restore", "--target", str(chain.target), f"{chain.spec}@{latest}", "--to", str(node), "--force"], {}
    )
    still = stat.S_ISCHR(node.lstat().st_mode)
    fl.TABLE.add(
        "destination is a device node",
        "restore (file) --force",
        f"exit {proc.returncode}, node {'kept' if still else 'replaced by a file'}",
        True,
    )
    assert still


def test_flipped_byte_never_restored_to_rbd(chain: fl.Oracle, ceph: Ceph) -> None:
    """RBD restore of a chain with a flipped data byte: never exit 0 with other data than the snapshot's."""
    m = chain.manifest()
    layer = chain.directory / m.points[1].file
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(chain.directory / m.points[-1].file)],
        capture_output=True,
        text=True,
        check=True,
    )
    import json

    offset = next(e["offset"] for e in json.loads(out.stdout) if e.get("data") and e.get("depth") == 1)
    with open(layer, "r+b") as f:
        f.seek(offset + 100)
        b = f.read(1)
        f.seek(offset + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    dst = f"{chain.name}-{uuid.uuid4().hex[:4]}"
    proc = fl.run(
        ["restore", "--target", str(chain.target), f"{chain.spec}@{m.points[-1].id}", "--to", f"rbd:{ceph.pool}/{dst}"],
        {},
    )
    wrong = proc.returncode == 0 and fl.image_digest(ceph, dst) != chain.expected[m.points[-1].id]
    if proc.returncode == 0:
        ceph.remove(dst)
    fl.TABLE.add(
        "layer: flipped data byte",
        "restore (RBD)",
        f"exit {proc.returncode}" + (", wrong data" if wrong else ""),
        proc.returncode == 65,
    )
    assert proc.returncode == 65


def test_verify_while_a_backup_runs_flags_nothing(chain: fl.Oracle) -> None:
    """The chain locked by a run with its partial layer on disk: a problem to report, no point is damaged."""
    import fcntl

    partial = chain.directory / "20991231T000000Z.qcow2.partial"
    shutil.copy(chain.directory / chain.manifest().points[-1].file, partial)
    fd = os.open(chain.directory / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = verify(chain, "--deep")
    finally:
        os.close(fd)
    flagged = flags(chain)
    fl.TABLE.add("chain locked, partial layer on disk", "verify --deep", f"exit {proc.returncode}, flagged {flagged}")
    assert not flagged


def test_verify_with_merge_pending_flags_nothing(chain: fl.Oracle) -> None:
    proc = fl.run(["prune", "--target", str(chain.target), "--keep-last", "1"], {CRASH_ENV: "prune-after-journal"})
    assert proc.returncode == -9
    proc = verify(chain)
    flagged = flags(chain)
    fl.TABLE.add("merge pending (killed prune)", "verify", f"exit {proc.returncode}, flagged {flagged}")
    assert not flagged


def test_verify_without_qemu_img_flags_nothing(chain: fl.Oracle, tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    proc = verify(chain, env={"PATH": str(bare)})
    flagged = flags(chain)
    fl.TABLE.add("qemu-img cannot run", "verify", f"exit {proc.returncode}, flagged {flagged}", True)
    again = verify(chain)
    assert not flagged
    assert again.returncode == 0 and not flags(chain)


def test_moved_target_spec_unchanged(chain: fl.Oracle) -> None:
    """A sanity anchor for the copies above: the copied sound chain verifies clean and restores right."""
    proc = verify(chain, "--deep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not chain.problems()
    assert chain_dir(chain.target, ImageSpec(chain.ceph.pool, "", chain.name)) == chain.directory


@pytest.mark.parametrize("where", ["prune-after-build", "prune-after-rename"])
def test_kept_point_restores_while_merge_pending(chain: fl.Oracle, tmp_path: Path, where: str) -> None:
    """A prune killed part-way: the points it keeps still restore to their snapshots, and verify flags none."""
    m = chain.manifest()
    child = m.points[-1].id
    proc = fl.run(["delete", "--target", str(chain.target), f"{chain.spec}@{m.points[0].id}"], {CRASH_ENV: where})
    assert proc.returncode == -9
    out = tmp_path / "o.raw"
    restore = fl.run(["restore", "--target", str(chain.target), f"{chain.spec}@{child}", "--to", str(out)], {})
    right = restore.returncode == 0 and fl.sha256_file(out) == chain.expected[child]
    check = verify(chain)
    flagged = flags(chain)
    outcome = f"restore of the kept point {restore.returncode}; verify {check.returncode}, flagged {len(flagged)}"
    fl.TABLE.add(f"delete (commit merge) killed at {where}", "restore (file), verify", outcome, right and not flagged)
    assert right, restore.stderr[-300:]
    assert not flagged
