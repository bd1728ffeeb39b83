"""``repair``: a chain's manifest rebuilt from its layer files (and the RBD snapshots).

The first tests build chains by hand in ``tmp_path`` and run ``repair
--offline`` in a subprocess; the ``ceph`` ones lose the manifest of a real
backup chain, repair it, and check that it restores byte for byte what
``rbd export`` gave, verifies, and takes the next incremental.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from helpers import Ceph, MiB, Workload, assert_same_content, run_cli

from rbd2qcow2.core.names import ImageSpec, snapshot_name
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.checksums import ZERO_DIGEST, digest, write_records
from rbd2qcow2.store.qcow2 import create_layer
from rbd2qcow2.store.target import chain_dir, open_target

P1, P2, P3, P4 = "20260101T000000Z", "20260102T000000Z", "20260103T000000Z", "20260103T000000Z-2"
IMAGE = ImageSpec("rbd", "", "vm")
SIZE = 4 * MiB


def hashes(directory: Path) -> dict[str, str]:
    """Every file's SHA-256 but the lock's (it holds the pid of its last holder)."""
    files = (p for p in sorted(directory.iterdir()) if p.is_file() and p.name != "lock")
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def make_chain(target: Path, *layers: tuple[str, str | None]) -> Path:
    """Layers (id, parent id) with checksum files, as a backup leaves them, and no manifest."""
    open_target(target, create=True)
    directory = chain_dir(target, IMAGE)
    directory.mkdir(parents=True)
    for pid, parent in layers:
        create_layer(directory / f"{pid}.qcow2", SIZE, f"{parent}.qcow2" if parent else None)
        records = [(0, digest(bytes([1]) * 65536)), (3, ZERO_DIGEST)]
        write_records(directory / f"{pid}.sums", iter(records))
    return directory


def repair(target: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("repair", "--target", str(target), "--offline", *extra, str(IMAGE))  # type: ignore[no-any-return]


def test_offline_repair_rebuilds_what_the_files_prove(tmp_path: Path) -> None:
    target = tmp_path / "t"
    directory = make_chain(target, (P1, None), (P2, P1), (P3, P2), (P4, None))
    before = hashes(directory)
    proc = repair(target)
    assert proc.returncode == 0, proc.stderr
    m = mf.load(directory)
    assert m is not None
    assert [(p.id, p.parent, p.kind) for p in m.points] == [
        (P1, None, "full"),
        (P2, P1, "incremental"),
        (P3, P2, "incremental"),
        (P4, None, "full"),
    ]
    for p in m.points:
        assert p.size == SIZE and p.file == f"{p.id}.qcow2"
        assert p.checksums is not None and p.checksums.file == f"{p.id}.sums"
        assert p.checksums.sha256 == hashlib.sha256((directory / p.checksums.file).read_bytes()).hexdigest()
        assert (p.data_bytes, p.zero_bytes) == (65536, 65536)
        assert p.snapshot == mf.Snapshot(snapshot_name(m.target_tag, p.id), 0)
        assert "repaired" in p.flags and "no-snapshot" in p.flags
    assert "no-incremental" in m.points[-1].flags  # its snapshot is not proven: the next backup is full
    assert m.points[0].created.startswith("2026-01-01T00:00:00")
    for p in m.points:
        assert f"{IMAGE}@{p.id}" in proc.stdout
    assert {k: v for k, v in hashes(directory).items() if k in before} == before  # no file touched
    assert os.readlink(directory / "latest") == f"{P4}.qcow2"


def test_damaged_headers_are_left_out_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "t"
    directory = make_chain(target, (P1, None), (P2, P1), (P3, P2))
    with open(directory / f"{P2}.qcow2", "r+b") as fh:
        fh.write(b"QFIX")  # not a qcow2 file any more
    (directory / f"{P4}.qcow2.partial").write_bytes(b"half")
    before = hashes(directory)
    proc = repair(target)
    assert proc.returncode == 0, proc.stderr
    m = mf.load(directory)
    assert m is not None and [p.id for p in m.points] == [P1]
    assert f"left out {P2}.qcow2: damaged header" in proc.stdout
    assert f"left out {P3}.qcow2: its backing file {P2}.qcow2" in proc.stdout
    assert f"left out {P4}.qcow2.partial" in proc.stdout
    assert {k: v for k, v in hashes(directory).items() if k in before} == before


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        pytest.param([(P1, None), (P2, P1), (P3, P1)], "both name", id="two children of one layer"),
        pytest.param([(P1, None), (P2, "../other/20260101T000000Z")], "not a layer of this directory", id="dot-dot"),
        pytest.param([(P2, None), (P1, P2)], "older than its backing file", id="parent newer than child"),
    ],
)
def test_inconsistent_chain_is_refused(tmp_path: Path, layers: list[tuple[str, str | None]], message: str) -> None:
    target = tmp_path / "t"
    directory = make_chain(target, *layers)
    before = hashes(directory)
    proc = repair(target)
    assert proc.returncode == 65, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (directory / mf.NAME).exists()
    assert hashes(directory) == before


def test_absolute_backing_name_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "t"
    directory = make_chain(target, (P1, None))
    create_layer(directory / f"{P2}.qcow2", SIZE, str(directory / f"{P1}.qcow2"))
    proc = repair(target)
    assert proc.returncode == 65, proc.stderr
    assert "not a layer of this directory" in proc.stderr
    assert not (directory / mf.NAME).exists()


def test_a_valid_manifest_is_replaced_only_with_force(tmp_path: Path) -> None:
    target = tmp_path / "t"
    directory = make_chain(target, (P1, None), (P2, P1))
    assert repair(target).returncode == 0
    first = (directory / mf.NAME).read_bytes()
    proc = repair(target)
    assert proc.returncode == 64, proc.stderr
    assert "--force" in proc.stderr
    assert (directory / mf.NAME).read_bytes() == first
    proc = repair(target, "--force")
    assert proc.returncode == 0, proc.stderr
    [kept] = [p for p in directory.iterdir() if p.name.startswith(f"{mf.NAME}.damaged-")]
    assert kept.read_bytes() == first
    assert kept.name in proc.stdout


def test_a_damaged_manifest_is_kept_aside(tmp_path: Path) -> None:
    target = tmp_path / "t"
    directory = make_chain(target, (P1, None))
    (directory / mf.NAME).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    proc = repair(target)
    assert proc.returncode == 0, proc.stderr
    [kept] = [p for p in directory.iterdir() if p.name.startswith(f"{mf.NAME}.damaged-")]
    assert kept.read_bytes().startswith(b"[[[")
    m = mf.load(directory)
    assert m is not None and [p.id for p in m.points] == [P1]


def test_repair_needs_one_image(tmp_path: Path) -> None:
    target = tmp_path / "t"
    make_chain(target, (P1, None))
    proc = run_cli("repair", "--target", str(target), "--offline", "rbd")
    assert proc.returncode == 64, proc.stderr
    proc = run_cli("repair", "--target", str(target), "--offline", "rbd/other")
    assert proc.returncode == 66, proc.stderr


# -- against the cluster ------------------------------------------------------------------


def _spec(ceph: Ceph, name: str) -> str:
    return f"{ceph.pool}/{name}"


def _backup(target: Path, ceph: Ceph, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli("backup", "--target", str(target), "--no-progress", *extra, _spec(ceph, name))  # type: ignore[no-any-return]


def _chain(target: Path, ceph: Ceph, name: str) -> Path:
    return chain_dir(target, ImageSpec(ceph.pool, "", name))


def _history(ceph: Ceph, target: Path, name: str, tmp: Path, backups: int) -> dict[str, Path]:
    """``backups`` backups with changes between them; each point's ``rbd export`` (taken while it exists)."""
    ceph.create(name, 24 * MiB)
    work = Workload(7)
    expected = {}
    for _ in range(backups):
        with ceph.image(name) as img:
            work.run(img, ops=8)
        proc = _backup(target, ceph, name)
        assert proc.returncode == 0, proc.stderr
        m = mf.load(_chain(target, ceph, name))
        assert m is not None and m.latest is not None
        expected[m.latest.id] = ceph.export(name, m.latest.snapshot.name, tmp / f"{m.latest.id}.raw")
    return expected


def _restore(target: Path, ceph: Ceph, name: str, pid: str, out: Path) -> Path:
    proc = run_cli("restore", "--target", str(target), f"{_spec(ceph, name)}@{pid}", "--to", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.ceph
def test_missing_manifest_never_wipes_the_chain(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    _history(ceph, target, image_name, tmp_path, backups=2)
    directory = _chain(target, ceph, image_name)
    (directory / mf.NAME).unlink()
    (directory / "20200101T000000Z.qcow2.partial").write_bytes(b"left by someone")
    before = hashes(directory)
    snaps = ceph.snapshots(image_name)
    with ceph.image(image_name) as img:
        img.write(b"new data" * 1000, 0)
    proc = _backup(target, ceph, image_name)
    assert proc.returncode == 65, proc.stderr
    assert "rbd2qcow2 repair" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""
    for args in (
        ["prune", "--target", str(target), "--keep-last", "1"],
        ["verify", "--target", str(target), "--deep"],
        ["delete", "--target", str(target), f"{_spec(ceph, image_name)}@latest"],
        ["restore", "--target", str(target), f"{_spec(ceph, image_name)}@latest", "--to", str(tmp_path / "x.raw")],
    ):
        proc = run_cli(*args, timeout=120)
        assert proc.returncode == 65, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert hashes(directory) == before
    assert not (directory / mf.NAME).exists()
    assert ceph.snapshots(image_name) == snaps


@pytest.mark.ceph
def test_repair_restores_verifies_and_continues_incrementally(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path
) -> None:
    expected = _history(ceph, target, image_name, tmp_path, backups=3)
    directory = _chain(target, ceph, image_name)
    original = mf.load(directory)
    assert original is not None
    (directory / mf.NAME).unlink()
    proc = run_cli("repair", "--target", str(target), _spec(ceph, image_name))
    assert proc.returncode == 0, proc.stderr
    m = mf.load(directory)
    assert m is not None
    assert [(p.id, p.parent, p.kind, p.size) for p in m.points] == [
        (p.id, p.parent, p.kind, p.size) for p in original.points
    ]
    assert m.image_id == original.image_id
    latest = m.points[-1]
    assert latest.snapshot == original.points[-1].snapshot  # its snapshot still exists: name and id matched
    assert latest.image_id == original.image_id and latest.flags == ("repaired",)
    # The snapshot's time: taken after the point's id was chosen, before the point was committed.
    taken = datetime.fromisoformat(latest.created)
    assert datetime.strptime(latest.id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) <= taken
    assert taken <= datetime.fromisoformat(original.points[-1].created)
    assert [p.checksums for p in m.points] == [p.checksums for p in original.points]
    for p in m.points[:-1]:  # their snapshots were removed after the next backup
        assert "no-snapshot" in p.flags and "no-incremental" not in p.flags
    for pid, raw in expected.items():
        assert_same_content(_restore(target, ceph, image_name, pid, tmp_path / f"{pid}.restored"), raw)
    proc = run_cli("verify", "--target", str(target), "--deep", _spec(ceph, image_name))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with ceph.image(image_name) as img:
        Workload(8).run(img, ops=6)
    proc = _backup(target, ceph, image_name)
    assert proc.returncode == 0, proc.stderr
    assert "incremental backup" in proc.stderr
    m = mf.load(directory)
    assert m is not None and m.latest is not None and m.latest.kind == "incremental"
    assert m.latest.parent == latest.id
    raw = ceph.export(image_name, m.latest.snapshot.name, tmp_path / "next.raw")
    assert_same_content(_restore(target, ceph, image_name, m.latest.id, tmp_path / "next.restored"), raw)


@pytest.mark.ceph
def test_offline_repair_then_a_full_backup(ceph: Ceph, target: Path, image_name: str, tmp_path: Path) -> None:
    expected = _history(ceph, target, image_name, tmp_path, backups=2)
    directory = _chain(target, ceph, image_name)
    (directory / mf.NAME).unlink()
    proc = run_cli("repair", "--target", str(target), "--offline", _spec(ceph, image_name))
    assert proc.returncode == 0, proc.stderr
    for pid, raw in expected.items():
        assert_same_content(_restore(target, ceph, image_name, pid, tmp_path / f"{pid}.restored"), raw)
    proc = _backup(target, ceph, image_name)
    assert proc.returncode == 0, proc.stderr
    m = mf.load(directory)
    assert m is not None and m.latest is not None and m.latest.kind == "full"
    assert len(m.points) == 3


def _plant(directory: Path, **checksums: object) -> None:
    body = json.loads((directory / mf.NAME).read_bytes())
    body["points"][0]["checksums"].update(checksums)
    body.pop("sha256")
    body["sha256"] = hashlib.sha256(mf.canonical(body)).hexdigest()
    (directory / mf.NAME).write_text(json.dumps(body))


@pytest.mark.ceph
@pytest.mark.parametrize("planted", ["/dev/zero", "../x", "fifo"])
def test_planted_checksum_paths_end_quickly_with_65(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, planted: str
) -> None:
    _history(ceph, target, image_name, tmp_path, backups=2)
    directory = _chain(target, ceph, image_name)
    m = mf.load(directory)
    assert m is not None
    if planted == "fifo":  # the manifest is right, the file in its place is a FIFO
        sums = directory / f"{m.points[0].id}.sums"
        sums.unlink()
        os.mkfifo(sums, 0o600)
    else:
        (tmp_path / "x").write_bytes(b"x")
        _plant(directory, file=planted)
    for args in (
        ["verify", "--target", str(target), "--deep"],
        ["prune", "--target", str(target), "--keep-last", "1"],
    ):
        proc = run_cli(*args, timeout=120)  # a hang is a failure, not a wait
        assert proc.returncode == 65, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr


# -- the journal across a kill ----------------------------------------------------------


@pytest.mark.ceph
@pytest.mark.parametrize("where", ["after-journal", "mid-transfer", "after-rename"])
def test_kill9_in_a_first_backup_is_cleaned_up_by_the_journal(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, where: str
) -> None:
    """Even the first backup leaves a manifest (no points, a journal); what nothing names is left alone."""
    from rbd2qcow2.core.faults import CRASH_ENV

    ceph.create(image_name, 24 * MiB)
    with ceph.image(image_name) as img:
        Workload(3).run(img, ops=8)
    directory = _chain(target, ceph, image_name)
    proc = run_cli("backup", "--target", str(target), _spec(ceph, image_name), env={CRASH_ENV: where})
    assert proc.returncode == -9, proc.stderr
    m = mf.load(directory)
    assert m is not None and m.points == () and len(m.writing) == 4
    stranger = directory / "20200101T000000Z.qcow2"
    stranger.write_bytes(b"a layer put back by hand")
    proc = _backup(target, ceph, image_name)
    assert proc.returncode == 0, proc.stderr
    assert "20200101T000000Z.qcow2 is not named by the manifest; left in place" in proc.stderr
    assert stranger.read_bytes() == b"a layer put back by hand"
    m = mf.load(directory)
    assert m is not None and m.writing == () and [p.kind for p in m.points] == ["full"]
    files = {p.name for p in directory.iterdir()} - {"lock", "latest", "activity.log", mf.NAME}
    assert files == {m.points[0].file, f"{m.points[0].id}.sums", stranger.name}
    raw = ceph.export(image_name, m.points[0].snapshot.name, tmp_path / "expected.raw")
    assert_same_content(_restore(target, ceph, image_name, m.points[0].id, tmp_path / "restored.raw"), raw)
    assert ceph.snapshots(image_name) == [m.points[0].snapshot.name]
