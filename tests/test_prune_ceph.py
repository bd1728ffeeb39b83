"""Prune and delete on real chains: every kept point stays byte-identical."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import Ceph, MiB, Workload, assert_same_content, qcow2_to_raw, run_cli

from rbd2qcow2.adapters import qemu
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.ops import merge
from rbd2qcow2.ops.prune import delete_point
from rbd2qcow2.store import fsutil
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph

PRUNE_CRASH_POINTS = ("prune-after-build", "prune-after-journal", "prune-after-rename", "prune-after-commit")


def build(ceph: Ceph, target: Path, name: str, tmp: Path, cycles: int = 6) -> dict[str, Path]:
    """A chain with writes, discards, zeros hiding older data, shrink then grow; expected content per point."""
    ceph.create(name, 24 * MiB)
    work = Workload(seed=7)
    sizes = {2: 12 * MiB + 65536 * 3, 3: 28 * MiB}
    expected: dict[str, Path] = {}
    with ceph.image(name) as img:
        img.write(work.data(24 * MiB), 0)  # the full base holds data everywhere
    for cycle in range(cycles):
        with ceph.image(name) as img:
            if cycle in sizes:
                img.resize(sizes[cycle], allow_shrink=True)
            work.run(img, ops=8, lo=MiB)  # the first MiB keeps the full base's data to the end
            if cycle == 4:
                img.write_zeroes(MiB, 4 * MiB)  # zeros that must keep hiding older data
        proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{name}")
        assert proc.returncode == 0, proc.stderr
        pid = proc.stdout.strip().rsplit("@", 1)[1]
        m = manifest(target, ceph, name)
        expected[pid] = ceph.export(name, m.point(pid).snapshot.name, tmp / f"exp-{pid}")
    return expected


def manifest(target: Path, ceph: Ceph, name: str) -> mf.Manifest:
    m = mf.load(chain_dir(target, ImageSpec(ceph.pool, "", name)))
    assert m is not None
    return m


def assert_points(target: Path, ceph: Ceph, name: str, expected: dict[str, Path], tmp: Path) -> mf.Manifest:
    """Every point in the manifest reads as its snapshot did; the chain is clean."""
    m = manifest(target, ceph, name)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", name))
    for p in m.points:
        raw = qcow2_to_raw(directory / p.file, tmp / "actual.raw")
        assert_same_content(raw, expected[p.id])
        raw.unlink()
        check = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(directory / p.file)], capture_output=True)
        assert check.returncode == 0, check.stdout
    named = {p.file for p in m.points} | {f"{p.id}.sums" for p in m.points}
    assert {f.name for f in directory.iterdir()} - {"lock", "manifest.json", "latest", "activity.log"} == named
    assert os.readlink(directory / "latest") == m.points[-1].file
    assert m.pending is None
    return m


def test_prune_keep_last_merges_and_keeps_content(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    expected = build(ceph, target, image_name, tmp_path)
    ids = sorted(expected)
    dry = run_cli("prune", "--target", str(target), "--keep-last", "2", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)["images"][0]
    assert [pid for pid, d in plan["points"].items() if d["keep"]] == ids[-2:]
    assert plan["actions"] == [{"action": "merge", "drop": ids[:-2], "into": ids[-2]}]
    assert [p.id for p in manifest(target, ceph, image_name).points] == ids  # dry run changed nothing
    proc = run_cli("prune", "--target", str(target), "--keep-last", "2")
    assert proc.returncode == 0, proc.stderr
    m = assert_points(target, ceph, image_name, expected, tmp_path)
    assert [p.id for p in m.points] == ids[-2:]
    assert m.points[0].parent is None and m.points[0].kind == "full"
    # A backup after a prune continues the chain incrementally.
    with ceph.image(image_name) as img:
        Workload(seed=99).run(img, ops=4)
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}")
    assert proc.returncode == 0, proc.stderr
    m = manifest(target, ceph, image_name)
    assert m.points[-1].kind == "incremental" and m.points[-1].parent == ids[-1]


def test_delete_middle_points(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    expected = build(ceph, target, image_name, tmp_path)
    ids = sorted(expected)
    for victim in (ids[2], ids[3], ids[0]):  # the one after the shrink, its neighbour, then the full base
        proc = run_cli("delete", "--target", str(target), f"{ceph.pool}/{image_name}@{victim}")
        assert proc.returncode == 0, proc.stderr
        m = assert_points(target, ceph, image_name, expected, tmp_path)
        assert victim not in [p.id for p in m.points]
    assert [p.id for p in m.points] == [ids[1], ids[4], ids[5]]
    assert m.points[0].kind == "full"


@pytest.mark.parametrize("where", PRUNE_CRASH_POINTS)
def test_kill9_during_prune(ceph: Ceph, target: Path, image_name: str, tmp_path: Path, where: str) -> None:
    expected = build(ceph, target, image_name, tmp_path, cycles=4)
    ids = sorted(expected)
    proc = run_cli("prune", "--target", str(target), "--keep-last", "2", env={"RBD2QCOW2_CRASH_AT": where})
    assert proc.returncode == -9, proc.stderr
    # Before any recovery, every point the manifest names still reads right, or
    # the manifest has the merge pending (finished by the next run).
    proc = run_cli("prune", "--target", str(target), "--keep-last", "2")
    assert proc.returncode == 0, proc.stderr
    m = assert_points(target, ceph, image_name, expected, tmp_path)
    assert [p.id for p in m.points] == ids[-2:]


@pytest.mark.parametrize("where", ("prune-during-commit", *PRUNE_CRASH_POINTS))
def test_kill9_during_commit_merge(ceph: Ceph, target: Path, image_name: str, tmp_path: Path, where: str) -> None:
    """Deleting the full base merges by commit (same size as its child): kill -9 at each step, then finish."""
    expected = build(ceph, target, image_name, tmp_path, cycles=3)
    ids = sorted(expected)
    ref = f"{ceph.pool}/{image_name}@{ids[0]}"
    proc = run_cli("delete", "--target", str(target), ref, env={"RBD2QCOW2_CRASH_AT": where})
    assert proc.returncode == -9, proc.stderr
    m = manifest(target, ceph, image_name)
    if where != "prune-after-commit":
        assert m.pending is not None and m.pending.method == "commit"
    # The kept child reads right even before the merge is finished.
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    wait_unlocked(directory / m.point(ids[1]).file)  # the killed run's daemon exits on its own
    if m.pending is not None:
        raw = qcow2_to_raw(directory / m.point(ids[1]).file, tmp_path / "child.raw")
        assert_same_content(raw, expected[ids[1]])
        raw.unlink()
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}")  # finishes it first
    assert proc.returncode == 0, proc.stderr
    new = manifest(target, ceph, image_name).points[-1]
    expected[new.id] = ceph.export(image_name, new.snapshot.name, tmp_path / "exp-new")
    m = assert_points(target, ceph, image_name, expected, tmp_path)
    assert [p.id for p in m.points][:2] == [ids[1], ids[2]] and m.points[0].kind == "full"
    for p in m.points:  # nothing left past an image's end by the killed commit
        layer = directory / p.file
        assert layer.stat().st_size <= qemu.check_layer(layer)["image-end-offset"], p.file


def test_commit_merge_fsyncs_the_merged_layer_before_its_rename(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The merge fsyncs the committed base, and only then renames it over the child."""
    expected = build(ceph, target, image_name, tmp_path, cycles=3)
    ids = sorted(expected)
    m = manifest(target, ceph, image_name)
    merged, child = m.point(ids[0]).file, m.point(ids[1]).file
    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace = fsutil.fsync_file, os.replace

    def fsync_file(path: Path) -> None:
        real_fsync(path)
        events.append(("fsync", Path(path).name, ""))

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(merge, "fsync_file", fsync_file)
    monkeypatch.setattr(os, "replace", replace)
    assert delete_point(target, f"{ceph.pool}/{image_name}@{ids[0]}") == f"{ceph.pool}/{image_name}@{ids[0]}"
    assert events.index(("fsync", merged, "")) < events.index(("replace", merged, child))
    m = assert_points(target, ceph, image_name, expected, tmp_path)
    assert [p.id for p in m.points] == ids[1:]


def wait_unlocked(layer: Path) -> None:
    """Wait until no process holds qemu's lock on the chain of ``layer``."""
    deadline = time.monotonic() + 20
    while subprocess.run(["qemu-img", "info", "--backing-chain", str(layer)], capture_output=True).returncode:
        assert time.monotonic() < deadline, "the chain is still locked"
        time.sleep(0.1)


def test_max_depth(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    expected = build(ceph, target, image_name, tmp_path, cycles=5)
    proc = run_cli("prune", "--target", str(target), "--max-depth", "3", "--keep-last", "10")
    assert proc.returncode == 0, proc.stderr
    m = assert_points(target, ceph, image_name, expected, tmp_path)
    assert len(m.points) == 3 and len(m.chain_of(m.points[-1].id)) == 3


def test_prune_usage(ceph: Ceph, target: Path, tmp_path: Path) -> None:
    ceph.create("usage-img", 4 * MiB)
    assert run_cli("backup", "--target", str(target), f"{ceph.pool}/usage-img").returncode == 0
    assert run_cli("prune", "--target", str(target)).returncode == 64
    assert run_cli("prune", "--target", str(target), "--keep-within", "3x").returncode == 64
    assert run_cli("delete", "--target", str(target), f"{ceph.pool}/usage-img@19990101T000000Z").returncode == 66


@contextlib.contextmanager
def reader_of(layer: Path, tmp: Path) -> Iterator[None]:
    """Another process reading a point's chain, as a VM booted from an overlay of it would."""
    sock = tmp / "reader.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), str(layer)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        yield
    finally:
        proc.terminate()
        proc.wait()
        wait_unlocked(layer)


def test_commit_merge_refused_while_the_chain_is_in_use(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path
) -> None:
    expected = build(ceph, target, image_name, tmp_path, cycles=3)
    ids = sorted(expected)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    ref = f"{ceph.pool}/{image_name}@{ids[0]}"
    with reader_of(directory / f"{ids[1]}.qcow2", tmp_path):
        proc = run_cli("delete", "--target", str(target), ref)
        assert proc.returncode == 75, proc.stderr
        assert "open" in proc.stderr
        # Nothing happened: no merge pending, every point still there and right.
        m = assert_points(target, ceph, image_name, expected, tmp_path)
        assert [p.id for p in m.points] == ids
        # A merge left pending by a killed prune cannot be finished while the chain is in use ...
    proc = run_cli("delete", "--target", str(target), ref, env={"RBD2QCOW2_CRASH_AT": "prune-after-journal"})
    assert proc.returncode == -9
    wait_unlocked(directory / f"{ids[1]}.qcow2")
    with reader_of(directory / f"{ids[1]}.qcow2", tmp_path):
        # ... but backups go on, building on points that read right, and keep it pending.
        with ceph.image(image_name) as img:
            Workload(seed=5).run(img, ops=4)
        proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{image_name}")
        assert proc.returncode == 0, proc.stderr
        assert "stays pending" in proc.stderr
        new = manifest(target, ceph, image_name).points[-1]
        assert manifest(target, ceph, image_name).pending is not None
    expected[new.id] = ceph.export(image_name, new.snapshot.name, tmp_path / "exp-new")
    proc = run_cli("prune", "--target", str(target), "--keep-last", "10")  # finishes the merge
    assert proc.returncode == 0, proc.stderr
    m = assert_points(target, ceph, image_name, expected, tmp_path)
    assert [p.id for p in m.points] == [*ids[1:], new.id]


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_hard_linked_layer_is_never_written_by_a_merge(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path
) -> None:
    """The full base also lives in a hard-linked rotation of the target: deleting it merges by copy."""
    expected = build(ceph, target, image_name, tmp_path, cycles=3)
    ids = sorted(expected)
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    rotation = tmp_path / "rotation"
    rotation.mkdir()
    linked = rotation / manifest(target, ceph, image_name).point(ids[0]).file
    os.link(directory / linked.name, linked)
    before = sha256(linked)
    proc = run_cli("delete", "--target", str(target), f"{ceph.pool}/{image_name}@{ids[0]}")
    assert proc.returncode == 0, proc.stderr
    assert sha256(linked) == before and linked.stat().st_nlink == 1
    m = assert_points(target, ceph, image_name, expected, tmp_path)
    assert [p.id for p in m.points] == ids[1:] and m.points[0].kind == "full"


def test_a_pending_commit_whose_base_got_linked_is_finished_by_copy(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path
) -> None:
    """Killed with a commit merge journaled; the base is hard-linked before the next run finishes it."""
    expected = build(ceph, target, image_name, tmp_path, cycles=3)
    ids = sorted(expected)
    ref = f"{ceph.pool}/{image_name}@{ids[0]}"
    proc = run_cli("delete", "--target", str(target), ref, env={"RBD2QCOW2_CRASH_AT": "prune-after-journal"})
    assert proc.returncode == -9, proc.stderr
    m = manifest(target, ceph, image_name)
    assert m.pending is not None and m.pending.method == "commit"
    directory = chain_dir(target, ImageSpec(ceph.pool, "", image_name))
    rotation = tmp_path / "rotation"
    rotation.mkdir()
    linked = rotation / m.point(ids[0]).file
    os.link(directory / linked.name, linked)
    before = sha256(linked)
    proc = run_cli("prune", "--target", str(target), "--keep-last", "100")  # finishes the merge first
    assert proc.returncode == 0, proc.stderr
    assert sha256(linked) == before
    assert "hard links" in proc.stderr, proc.stderr
    m = assert_points(target, ceph, image_name, expected, tmp_path)
    assert [p.id for p in m.points] == ids[1:] and m.points[0].kind == "full"
