"""RbdImage.read_many against the real cluster: content, order, and failures that do not hang."""

from __future__ import annotations

import os
import time

import pytest
from helpers import Ceph, MiB

from rbd2qcow2.ceph import CephOptions, Cluster
from rbd2qcow2.errors import CephError
from rbd2qcow2.names import ImageSpec

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
