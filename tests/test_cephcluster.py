"""Smoke test for the throwaway Ceph cluster helper (tests/cephcluster.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cephcluster import CephCluster
else:
    try:
        from cephcluster import CephCluster
    except ImportError:  # tests/ imported as a package
        from tests.cephcluster import CephCluster

rados = pytest.importorskip("rados")
rbd = pytest.importorskip("rbd")

pytestmark = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("ceph-mon", "ceph-osd", "ceph", "rbd")),
    reason="Ceph daemons/tools not installed",
)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_cluster_lifecycle(tmp_path: Path) -> None:
    cluster = CephCluster(tmp_path / "ceph", osd_size_gib=2)
    with cluster:
        pids = list(cluster.pids.values())
        assert len(pids) == 2
        cluster.create_pool("pool")
        data = os.urandom(1 << 20)
        with rados.Rados(conffile=str(cluster.conf)) as conn, conn.open_ioctx("pool") as ioctx:
            rbd.RBD().create(ioctx, "img", 16 << 20)
            with rbd.Image(ioctx, "img") as image:
                image.write(data, 4096)
                assert image.read(4096, len(data)) == data

        keyring = cluster.create_user("client.backup", {"mon": "profile rbd", "osd": "profile rbd"})
        with (
            rados.Rados(conffile=str(cluster.conf), name="client.backup", conf={"keyring": str(keyring)}) as conn,
            conn.open_ioctx("pool") as ioctx,
        ):
            assert rbd.RBD().list(ioctx) == ["img"]

    assert cluster.pids == {}
    assert all(_pid_gone(pid) for pid in pids)
    cluster.stop()  # idempotent
