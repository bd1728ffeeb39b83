"""RbdImage.read_many against the real cluster: content, order, and failures that do not hang."""

from __future__ import annotations

import os
import time

import pytest
from helpers import Ceph, MiB

from rbd2qcow2.adapters.ceph import CephOptions, Cluster, RbdImage
from rbd2qcow2.core.errors import CephError
from rbd2qcow2.core.extents import Extent
from rbd2qcow2.core.names import ImageSpec

pytestmark = pytest.mark.ceph


def test_read_many_returns_every_range_in_order_and_reports_a_failure(ceph: Ceph, image_name: str) -> None:
    ceph.create(image_name, 8 * MiB)
    data = os.urandom(8 * MiB)
    with ceph.image(image_name) as img:
        img.write(data, 0)
    ranges = [(o, o + 65536) for o in range(7 * MiB, -1, -MiB // 2)] + [(100, 300), (0, 8 * MiB)]
    spec = ImageSpec(ceph.pool, "", image_name)
    with Cluster(CephOptions(conf=str(ceph.conf))) as cluster, cluster.image(spec, read_only=True) as rimg:
        assert rimg.read_many(ranges) == [data[a:b] for a, b in ranges]
        assert rimg.read_many([]) == []
        started = time.monotonic()
        with pytest.raises(CephError, match="read failed"):
            rimg.read_many([(0, 65536), (8 * MiB, 8 * MiB + 65536), (MiB, MiB + 65536)])  # one past the end
        assert time.monotonic() - started < 30
        assert rimg.read_many([(MiB, 2 * MiB)]) == [data[MiB : 2 * MiB]]  # the handle goes on


def test_at_snapshot_reads_the_snapshot_then_the_head_again(ceph: Ceph, image_name: str) -> None:
    """The head's handle set to a snapshot reads and diffs the snapshot; afterwards it is the
    head again, and snapshots can be made and removed through it."""
    ceph.create(image_name, 8 * MiB, "fast-diff")
    old, new = os.urandom(MiB), os.urandom(MiB)
    spec = ImageSpec(ceph.pool, "", image_name)
    with Cluster(CephOptions(conf=str(ceph.conf))) as cluster, cluster.image(spec) as head:
        with ceph.image(image_name) as img:
            img.write(old, 0)
        base = head.create_snapshot("base")
        with ceph.image(image_name) as img:
            img.write(new, 0)
            img.write(new, 4 * MiB)
        snap = head.create_snapshot("snap")
        with ceph.image(image_name) as img:
            img.write(old, 4 * MiB)  # after the snapshot: not seen through it
        with head.at_snapshot("snap") as src:
            assert src.read_many([(0, MiB), (4 * MiB, 5 * MiB)]) == [new, new]
            assert src.diff(0, 8 * MiB, "base", False) == [
                Extent(0, MiB, True),
                Extent(4 * MiB, MiB, True),
            ]
        assert head.read_many([(4 * MiB, 5 * MiB)]) == [old]
        head.remove_snapshot("base")
        assert [s.name for s in head.snapshots()] == ["snap"] and snap.id != base.id


class _StuckImage:
    """An ``rbd.Image`` whose handle cannot be set back to the head."""

    def set_snap(self, name: str | None) -> None:
        if name is None:
            import rbd

            raise rbd.Error("set back failed")


def test_at_snapshot_reports_a_failed_set_back_without_hiding_the_first_error() -> None:
    img = RbdImage(_StuckImage(), "pool/img")
    with pytest.raises(CephError, match="back to the head"), img.at_snapshot("s"):
        pass
    with pytest.raises(ValueError, match="the transfer failed"), img.at_snapshot("s"):
        raise ValueError("the transfer failed")
