"""A point records the RBD settings of its image, read from the real cluster."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from cephcluster import CephCluster
from helpers import Ceph, MiB, run_cli

from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph


def rbd(ceph: Ceph, *args: str) -> None:
    subprocess.run(["rbd", "-c", str(ceph.conf), *args], check=True, capture_output=True)


def backed_up_config(ceph: Ceph, target: Path, name: str) -> mf.ImageConfig | None:
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{name}")
    assert proc.returncode == 0, proc.stderr
    m = mf.load(chain_dir(target, ImageSpec(ceph.pool, "", name)))
    assert m is not None and m.latest is not None
    return m.latest.image_config


def test_point_records_striping_data_pool_features_and_meta(
    ceph: Ceph, ceph_cluster: CephCluster, target: Path, image_name: str
) -> None:
    data_pool = f"data-{uuid.uuid4().hex[:8]}"
    ceph_cluster.create_pool(data_pool)
    spec = f"{ceph.pool}/{image_name}"
    rbd(
        ceph,
        "create",
        spec,
        "--size",
        "16M",
        "--object-size",
        "1M",
        "--stripe-unit",
        "64K",
        "--stripe-count",
        "4",
        "--image-feature",
        "layering,exclusive-lock,object-map,fast-diff",
        "--data-pool",
        data_pool,
    )
    rbd(ceph, "image-meta", "set", spec, "owner", "db é")
    rbd(ceph, "image-meta", "set", spec, "conf_rbd_cache", "false")
    with ceph.image(image_name) as img:
        img.write(b"\x07" * MiB, 3 * MiB)

    config = backed_up_config(ceph, target, image_name)
    assert config == mf.ImageConfig(
        object_size=MiB,
        stripe_unit=64 << 10,
        stripe_count=4,
        data_pool=data_pool,
        features=("layering", "striping", "exclusive-lock", "object-map", "fast-diff", "data-pool"),
        meta=(("conf_rbd_cache", "false"), ("owner", "db é")),
    )


def test_default_image_records_no_data_pool(ceph: Ceph, target: Path, image_name: str) -> None:
    ceph.create(image_name, 8 * MiB)
    config = backed_up_config(ceph, target, image_name)
    assert config == mf.ImageConfig(4 * MiB, 4 * MiB, 1, None, ("layering",), ())
