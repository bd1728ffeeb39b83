"""The deep check on real qcow2 chains made with qemu-img and qemu-io (no Ceph).

Expected digests come from ``qemu-img convert`` of the chain; every kind of
damage to a data cluster, a compressed cluster or an L2 table must show as a
differing block or as a problem, never as a clean result or a traceback, and
the chain files are never changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from factories import manifest as made_manifest
from factories import point

from rbd2qcow2.adapters import qemu
from rbd2qcow2.core.errors import Error
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.ops.verify import ChainVerifier, DaemonOnDemand, Report, VerifyOptions
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.checksums import BLOCK_SIZE, OrderedWriter, block_records, digest
from rbd2qcow2.transfer import deepcheck, hashworker
from rbd2qcow2.transfer.deepcheck import Checker, MappedChain, check_point, plan_reads

B = BLOCK_SIZE
KiB, MiB = 1 << 10, 1 << 20
SIZES = [MiB + 4 * KiB, 2 * MiB, 2 * MiB]  # the base is shorter than its child, by a part of a block
IDS = ["20260101T000000Z", "20260102T000000Z", "20260103T000000Z"]
WRITES = [
    ["write -P 0x11 0 768k", "write -P 0x12 1020k 8k"],
    ["write -P 0x21 256k 128k", "write -z 512k 64k", "write -P 0x22 1536k 64k"],
    ["write -c -P 0x31 64k 64k", "write -P 0x32 1792k 128k"],  # -c: a compressed cluster
]
COMPRESSED = 1  # the block of the compressed cluster
TOP_DATA = 1792 * KiB // B  # a block of data of the top layer


def layer(path: Path, size: int, backing: Path | None, *writes: str) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=1.1,cluster_size=65536,compression_type=zlib"]
    if backing is not None:
        args += ["-u", "-b", backing.name, "-F", "qcow2"]
    subprocess.run([*args, str(path), str(size)], check=True)
    for w in writes:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", w, str(path)], check=True, capture_output=True)
    os.chmod(path, 0o600)


@pytest.fixture(scope="module")
def daemon() -> Iterator[qemu.StorageDaemon]:
    with qemu.storage_daemon() as d:
        yield d


@pytest.fixture(params=[False, True], ids=["alone", "helper"])
def helper(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Hash in this process alone, or share the blocks with the helper process."""
    if request.param:
        monkeypatch.setattr(deepcheck, "WORKER_MIN", 0)
    return bool(request.param)


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    """Three layers: data in each, zero clusters, a compressed cluster, a block split by the base's end."""
    directory = tmp_path / "chain"
    directory.mkdir(mode=0o700)
    files = [directory / f"{pid}.qcow2" for pid in IDS]
    for i, path in enumerate(files):
        layer(path, SIZES[i], files[i - 1] if i else None, *WRITES[i])
    return files


def flat(files: list[Path]) -> bytes:
    out = files[-1].parent.parent / "flat.raw"
    src = qemu.json_filename(qemu.chain_options(files))
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, str(out)], check=True)
    return out.read_bytes()


def expected(files: list[Path]) -> dict[int, bytes]:
    raw = flat(files)
    return {i // B: digest(raw[i : i + B]) for i in range(0, len(raw), B)}


def check(files: list[Path], digests: dict[int, bytes], daemon: qemu.StorageDaemon) -> tuple[set[int], int]:
    """The blocks that differ, and the bytes read."""
    checker = Checker(digests, SIZES[-1])
    chain = MappedChain(files)
    try:
        read = check_point(chain, SIZES[-1], checker, daemon)
    finally:
        chain.close()
    return checker.bad, read


def sha(files: list[Path]) -> list[str]:
    return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x01]))


def data_offset(files: list[Path], depth: int) -> tuple[int, int]:
    """A block of the top that a layer's data cluster serves, and the cluster's host offset."""
    extent = next(e for e in qemu.map_host(files) if e.depth == depth and e.data and e.offset is not None)
    assert extent.offset is not None
    return extent.start // B, extent.offset


def l2_entry(path: Path, cluster: int) -> tuple[int, int]:
    """File offset and value of the L2 entry of a cluster (in the first L2 table)."""
    with open(path, "rb") as fh:
        header = fh.read(48)
        (l1,) = struct.unpack(">Q", header[40:48])
        fh.seek(l1)
        (l2,) = struct.unpack(">Q", fh.read(8))
        table = (l2 & 0x00FFFFFFFFFFFE00) + 8 * cluster
        fh.seek(table)
        (value,) = struct.unpack(">Q", fh.read(8))
    assert value & 0x00FFFFFFFFFFFE00, "no cluster there"
    return table, value


def shift_l2_entry(path: Path, cluster: int, shift: int) -> None:
    entry, value = l2_entry(path, cluster)
    with open(path, "r+b") as fh:
        fh.seek(entry)
        fh.write(struct.pack(">Q", value + shift))


def compressed_offset(path: Path, cluster: int) -> int:
    """Host offset of a compressed cluster (64 KiB clusters: 54 offset bits)."""
    _, value = l2_entry(path, cluster)
    assert value & (1 << 62), hex(value)
    return value & ((1 << 54) - 1)


# -- the check of one point ------------------------------------------------------------------


def test_clean_chain(chain: list[Path], daemon: qemu.StorageDaemon, helper: bool) -> None:
    plan = plan_reads(qemu.map_host(chain), SIZES[-1], len(chain))
    assert {r.layer for r in plan.host} == {0, 1, 2} and plan.zeros
    assert plan.qemu == [(COMPRESSED, COMPRESSED + 1), (16, 17)]  # the compressed block, the split block
    before = sha(chain)
    bad, read = check(chain, expected(chain), daemon)
    assert bad == set()
    assert read == sum(r.length for r in plan.host) + 2 * B
    assert sha(chain) == before


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_flipped_byte_in_a_data_cluster_of_any_layer(
    chain: list[Path], daemon: qemu.StorageDaemon, helper: bool, depth: int
) -> None:
    digests = expected(chain)
    block, offset = data_offset(chain, depth)
    flip(chain[len(chain) - 1 - depth], offset + 1000)
    assert check(chain, digests, daemon)[0] == {block}


def test_a_failed_helper_is_no_damage(
    chain: list[Path], daemon: qemu.StorageDaemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The share of a helper that fails is hashed by the verify process itself."""
    monkeypatch.setattr(deepcheck, "WORKER_MIN", 0)
    monkeypatch.setattr(hashworker, "__file__", str(chain[0].parent / "missing.py"))
    digests = expected(chain)
    block, offset = data_offset(chain, 2)
    assert check(chain, digests, daemon)[0] == set()
    assert "the hashing helper failed" in caplog.text
    flip(chain[0], offset + 1000)
    assert check(chain, digests, daemon)[0] == {block}


def test_flipped_byte_in_a_compressed_cluster(chain: list[Path], daemon: qemu.StorageDaemon) -> None:
    digests = expected(chain)
    flip(chain[2], compressed_offset(chain[2], COMPRESSED) + 3)  # the deflate stream is ~17 bytes long
    try:
        bad, _ = check(chain, digests, daemon)
    except Error:
        return  # qemu could not inflate it (it cuts the NBD client off): damage too
    assert bad == {COMPRESSED}


@pytest.mark.parametrize("shift", [512, B])
def test_damaged_l2_entry(chain: list[Path], daemon: qemu.StorageDaemon, shift: int) -> None:
    """An unaligned data offset makes qemu fail; another cluster's offset makes the block differ."""
    digests = expected(chain)
    shift_l2_entry(chain[1], 1536 * KiB // B, shift)
    if shift % B:
        with pytest.raises(Error):
            check(chain, digests, daemon)
    else:
        assert 1536 * KiB // B in check(chain, digests, daemon)[0]


def test_unreadable_chain(chain: list[Path]) -> None:
    chain[0].unlink()
    with pytest.raises(OSError):
        MappedChain(chain)


def test_the_streamed_map_is_qemus_map(chain: list[Path]) -> None:
    streamed: list[qemu.HostExtent] = []
    host_map = qemu.HostMap(chain)
    try:
        while (extents := host_map.read(wait=True)) is not None:
            streamed += extents
    finally:
        host_map.close()
    assert streamed == qemu.map_host(chain)


# -- verify of a chain directory ------------------------------------------------------------


def recorded(files: list[Path], i: int) -> set[int]:
    """The blocks layer ``i`` writes (as a backup records them: each block it holds, and the size boundary)."""
    alone = [e for e in qemu.map_chain([files[i]]) if e.present]
    blocks = {b for e in alone for b in range(e.start // B, -(-(e.start + e.length) // B))}
    if i and SIZES[i] != SIZES[i - 1]:
        blocks.add(min(SIZES[i], SIZES[i - 1]) // B)
    return blocks if i else set(range(-(-SIZES[0] // B)))


def manifest(files: list[Path]) -> mf.Manifest:
    """A manifest for the chain, with a checksum file per layer recording the blocks it wrote."""
    points = []
    for i, path in enumerate(files):
        raw = flat(files[: i + 1])
        writer = OrderedWriter(path.with_suffix(".sums"))
        writer.add(0, b"".join(block_records(b * B, raw[b * B : (b + 1) * B])[0] for b in sorted(recorded(files, i))))
        sums = mf.Checksums(path.with_suffix(".sums").name, "xxh3-128", B, writer.finish())
        parent = IDS[i - 1] if i else None
        stored = path.stat().st_size
        points.append(
            point(
                IDS[i],
                parent,
                file=path.name,
                size=SIZES[i],
                image_id="abc",
                snap_id=i + 1,
                checksums=sums,
                stored_bytes=stored,
                data_bytes=0,
                zero_bytes=0,
            )
        )
    m = made_manifest(*points, image=ImageSpec("pool", "", "img"), image_id="abc", tag="t")
    mf.save(files[0].parent, m)
    return m


def verify(
    files: list[Path],
    daemon: qemu.StorageDaemon,
    *,
    structure: bool = True,
    ids: list[str] = IDS,
    deep: bool = True,
    check_layers: bool = True,
) -> Report:
    directory = files[0].parent
    report = Report()
    m = mf.load(directory)
    assert m is not None
    opts = VerifyOptions(target=directory.parent, deep=deep, structure=structure, check_layers=check_layers)
    ChainVerifier(directory, m, daemon, opts, report, None).run(ids)
    return report


def test_verify_clean_chain(chain: list[Path], daemon: qemu.StorageDaemon, helper: bool) -> None:
    manifest(chain)
    before = sha(chain)
    report = verify(chain, daemon)
    assert report.ok, report.problems
    assert report.points_checked == 3 and report.bytes_read > 0
    assert sha(chain) == before


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_verify_names_the_layer_and_the_bytes(
    chain: list[Path], daemon: qemu.StorageDaemon, helper: bool, depth: int
) -> None:
    manifest(chain)
    block, offset = data_offset(chain, depth)
    victim = chain[len(chain) - 1 - depth]
    flip(victim, offset + 1000)
    report = verify(chain, daemon)
    top = [p for p in report.problems if p.point == IDS[-1]]
    assert [(p.file, p.region) for p in top] == [(victim.name, (block * B, (block + 1) * B))], report.problems
    flagged = mf.load(chain[0].parent)
    assert flagged is not None and "damaged" in flagged.point(IDS[-1]).flags


def test_verify_reports_what_qemu_cannot_read(chain: list[Path], daemon: qemu.StorageDaemon) -> None:
    """A damaged L2 table: qemu-img check finds it; without the structure check, the deep check does."""
    manifest(chain)
    shift_l2_entry(chain[1], 1536 * KiB // B, 512)
    before = sha(chain)
    report = verify(chain, daemon)
    assert {(p.point, p.file) for p in report.problems} == {(IDS[1], chain[1].name)}, report.problems
    report = verify(chain, daemon, structure=False)
    assert {p.point for p in report.problems} == {IDS[1], IDS[2]}
    assert all("cannot read the chain" in p.what and p.region is None for p in report.problems), report.problems
    assert sha(chain) == before


def test_verify_compressed_cluster(chain: list[Path], daemon: qemu.StorageDaemon) -> None:
    manifest(chain)
    flip(chain[2], compressed_offset(chain[2], COMPRESSED) + 3)
    report = verify(chain, daemon)
    assert [(p.point, p.file) for p in report.problems] == [(IDS[2], chain[2].name)], report.problems


def test_the_daemon_starts_only_when_qemu_must_read(chain: list[Path]) -> None:
    """Deep checks need qemu-storage-daemon only for blocks without a host offset (the base alone has none)."""
    manifest(chain)
    with DaemonOnDemand() as daemon:
        report = verify(chain[:1], daemon, ids=IDS[:1])
        assert report.ok and daemon.pid is None
        report = verify(chain, daemon)
        assert report.ok and daemon.pid is not None


# -- flags: only damage, with its reason; cleared when found sound ----------------------------


def refcount_entry(path: Path) -> int:
    """File offset of the refcount of cluster 0 (the header's)."""
    with open(path, "rb") as fh:
        fh.seek(48)
        (table,) = struct.unpack(">Q", fh.read(8))
        fh.seek(table)
        (block,) = struct.unpack(">Q", fh.read(8))
    return int(block)


def test_a_structure_flag_says_why_and_clears(chain: list[Path], daemon: qemu.StorageDaemon) -> None:
    manifest(chain)
    entry = refcount_entry(chain[1])
    good = chain[1].read_bytes()[entry : entry + 2]
    with open(chain[1], "r+b") as fh:  # cluster 0 referenced but counted free: qemu-img check exit 2
        fh.seek(entry)
        fh.write(b"\0\0")
    report = verify(chain, daemon)
    assert {(p.point, p.file) for p in report.problems} == {(IDS[1], chain[1].name)}, report.problems
    flagged = mf.load(chain[0].parent)
    assert flagged is not None and not flagged.point(IDS[0]).flags
    for pid in IDS[1:]:  # the layer's point and the one above it
        (why,) = flagged.point(pid).reasons(mf.DAMAGED)
        assert why.check == "structure" and "qemu-img check: 1 corruptions" in why.reason, why
        assert chain[1].name in why.reason
    with open(chain[1], "r+b") as fh:
        fh.seek(entry)
        fh.write(good)
    report = verify(chain, daemon)
    assert report.ok and report.cleared == [f"pool/img@{pid}" for pid in IDS[1:]], report
    cleared = mf.load(chain[0].parent)
    assert cleared is not None and all(not p.flags and not p.flag_reasons for p in cleared.points)


def test_a_flag_of_an_older_version_clears_once_structure_and_content_pass(
    chain: list[Path], daemon: qemu.StorageDaemon
) -> None:
    m = manifest(chain)
    old = dataclasses.replace(m.points[2], flags=(mf.DAMAGED,))
    mf.save(chain[0].parent, dataclasses.replace(m, points=(*m.points[:2], old)))
    assert verify(chain, daemon, deep=False).ok
    kept = mf.load(chain[0].parent)
    assert kept is not None and kept.point(IDS[2]).flags == (mf.DAMAGED,)
    report = verify(chain, daemon)
    assert report.ok and report.cleared == [f"pool/img@{IDS[2]}"]


CHURN = """
import os, sys
directory = sys.argv[1]
while True:
    names = [os.path.join(directory, f"churn-{i}") for i in range(64)]
    for name in names:
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o600))
    for name in names:
        os.unlink(name)
"""


def test_files_that_vanish_during_the_check_are_skipped(chain: list[Path], daemon: qemu.StorageDaemon) -> None:
    """Another process creates and removes files in the chain directory while verify lists it."""
    manifest(chain)
    churn = subprocess.Popen([sys.executable, "-c", CHURN, str(chain[0].parent)])
    try:
        while not any(p.name.startswith("churn-") for p in chain[0].parent.iterdir()):
            assert churn.poll() is None
        for _ in range(300):
            report = verify(chain, daemon, deep=False, check_layers=False)
            assert report.ok, report.problems
    finally:
        churn.kill()
        churn.wait()
