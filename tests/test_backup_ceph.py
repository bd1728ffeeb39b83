"""Backups against the real throwaway cluster; the oracle is ``rbd export``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import Ceph, MiB, Workload, assert_same_content, qcow2_to_raw

import rbd2qcow2
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph


def do_backup(ceph: Ceph, target: Path, name: str, **kw: object) -> rbd2qcow2.BackupResult:
    opts = rbd2qcow2.BackupOptions(target=target, ceph=rbd2qcow2.CephOptions(conf=str(ceph.conf)), **kw)  # type: ignore[arg-type]
    [result] = rbd2qcow2.backup([f"{ceph.pool}/{name}"], opts)
    assert result.error is None, result.error
    assert result.point is not None
    return result


def chain_of(ceph: Ceph, target: Path, name: str) -> Path:
    return chain_dir(target, ImageSpec(ceph.pool, "", name))


def backup_and_export(ceph: Ceph, target: Path, name: str, tmp: Path, **kw: object) -> tuple[mf.Point, Path]:
    """Back up, then ``rbd export`` the new point's snapshot while it exists."""
    result = do_backup(ceph, target, name, **kw)
    assert result.point is not None
    expected = ceph.export(name, result.point.snapshot.name, tmp / f"{result.point.id}.expected")
    return result.point, expected


def assert_point(ceph: Ceph, target: Path, name: str, point: mf.Point, expected: Path, tmp: Path) -> None:
    actual = qcow2_to_raw(chain_of(ceph, target, name) / point.file, tmp / f"{point.id}.raw")
    assert_same_content(actual, expected)
    actual.unlink()


def test_large_and_small_diffs_match_rbd_export(
    ceph: Ceph, target: Path, image_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A diff with more than READER_WORTH to read goes through threads and io_uring, a small one
    through the calling thread and Linux AIO: both write exactly the snapshot.  This image is
    "large" for the diff made ahead too: its diff is made in the job, as for images above 1 GiB."""
    from rbd2qcow2.adapters import qemu
    from rbd2qcow2.ops import backup_point as engine
    from rbd2qcow2.transfer.pipeline import READER_WORTH

    monkeypatch.setattr(engine, "AHEAD_DIFF_MAX", 64 * MiB)

    used: list[str] = []
    export_chain = qemu.StorageDaemon.export_chain

    def recording(self: qemu.StorageDaemon, files: list[Path], **kw: object) -> qemu.Export:
        used.append(str(kw.get("direct_aio")) if kw.get("direct") else "page cache")
        assert kw.get("preallocate") is True
        return export_chain(self, files, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(qemu.StorageDaemon, "export_chain", recording)
    size = READER_WORTH * 3
    ceph.create(image_name, size, "fast-diff")
    work = Workload(seed=7)
    history = []
    # (where, bytes) of whole writes, then 64 KiB writes every 3 MiB: 64 MiB, 2 MiB and 40 MiB to read
    for start, length, scattered in ((0, READER_WORTH * 2, 0), (0, 0, 32), (24 * MiB, READER_WORTH + 8 * MiB, 8)):
        with ceph.image(image_name) as img:
            if length:
                img.write(work.data(length), start)
            for i in range(scattered):
                img.write(work.data(64 * 1024), (5 + 3 * i) * MiB % (size - 64 * 1024))
        history.append(backup_and_export(ceph, target, image_name, tmp_path))
    assert used == ["io_uring", "native", "io_uring"]
    for point, expected in history:
        assert_point(ceph, target, image_name, point, expected, tmp_path)
        # The preallocate filter extended each layer ahead of its writes and cut it back on close.
        layer = chain_of(ceph, target, image_name) / point.file
        assert layer.stat().st_size == qemu.check_layer(layer)["image-end-offset"]


@pytest.mark.parametrize("features", ["layering", "fast-diff"])
def test_cycles_match_rbd_export(ceph: Ceph, target: Path, image_name: str, tmp_path: Path, features: str) -> None:
    """Cycles of writes, discards, zero-writes, shrinks and grows: every point = rbd export."""
    ceph.create(image_name, 48 * MiB, features)
    work = Workload(seed=len(features))
    with ceph.image(image_name) as img:
        work.run(img, ops=30)
    first, expected = backup_and_export(ceph, target, image_name, tmp_path)
    assert first.kind == "full"
    history = [(first, expected)]
    for new_size in (64 * MiB, 40 * MiB + 12345 * 512, 80 * MiB, None, None):
        with ceph.image(image_name) as img:
            if new_size is not None:
                img.resize(new_size, allow_shrink=True)
            work.run(img, ops=15)
        point, expected = backup_and_export(ceph, target, image_name, tmp_path)
        assert point.kind == "incremental"
        assert point.size == (new_size or history[-1][0].size)
        history.append((point, expected))
    # Every point still holds its own snapshot's content once later layers exist.
    for point, expected in history:
        assert_point(ceph, target, image_name, point, expected, tmp_path)
    m = mf.load(chain_of(ceph, target, image_name))
    assert m is not None and [p.id for p in m.points] == [p.id for p, _ in history]
    assert ceph.snapshots(image_name) == [history[-1][0].snapshot.name]
