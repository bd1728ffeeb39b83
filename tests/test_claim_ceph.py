"""The claim on a real cluster: renewed while held, lost at once when its lock is broken."""

from __future__ import annotations

import hashlib
import time

import pytest
from helpers import Ceph

from rbd2qcow2.adapters.ceph import CephOptions, Cluster
from rbd2qcow2.core.errors import ClaimLost
from rbd2qcow2.core.names import ImageSpec

pytestmark = pytest.mark.ceph


def test_a_claim_is_renewed_while_held_and_lost_once_its_lock_is_broken(ceph: Ceph, image_name: str) -> None:
    spec = ImageSpec(ceph.pool, "", image_name)
    obj = "rbd2qcow2_claim." + hashlib.sha256(image_name.encode()).hexdigest()[:24]
    with Cluster(CephOptions(conf=str(ceph.conf))) as cluster, cluster.claim(spec, 3) as held:
        deadline = time.monotonic() + 30
        while held.renewals < 2:  # renewing a lock we hold succeeds
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held.check()
        ceph.ioctx.remove_object(obj)  # broken from outside, and nobody else holds it: not taken again
        with pytest.raises(ClaimLost, match="renewal failed"):
            while time.monotonic() < deadline:
                held.check()
                time.sleep(0.05)
    with Cluster(CephOptions(conf=str(ceph.conf))) as cluster, cluster.claim(spec, 10):
        pass  # the lost claim left nothing behind: a new one is taken
