"""A point records the RBD settings of its image; a restore into RBD re-creates them, flags over them."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from cephcluster import CephCluster
from helpers import Ceph, MiB, assert_same_content, run_cli

from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

pytestmark = pytest.mark.ceph


def rbd(ceph: Ceph, *args: str) -> None:
    subprocess.run(["rbd", "-c", str(ceph.conf), *args], check=True, capture_output=True)


def backed_up_point(ceph: Ceph, target: Path, name: str) -> tuple[str, mf.Point]:
    proc = run_cli("backup", "--target", str(target), f"{ceph.pool}/{name}")
    assert proc.returncode == 0, proc.stderr
    m = mf.load(chain_dir(target, ImageSpec(ceph.pool, "", name)))
    assert m is not None and m.latest is not None
    return str(proc.stdout.strip()), m.latest


def backed_up_config(ceph: Ceph, target: Path, name: str) -> mf.ImageConfig | None:
    return backed_up_point(ceph, target, name)[1].image_config


def striped_image(ceph: Ceph, ceph_cluster: CephCluster, name: str) -> str:
    """A 16 MiB image with 1 MiB objects striped 64 KiB over 4, data in a pool of its own, two image-meta keys."""
    data_pool = f"data-{uuid.uuid4().hex[:8]}"
    ceph_cluster.create_pool(data_pool)
    spec = f"{ceph.pool}/{name}"
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
    with ceph.image(name) as img:
        img.write(bytes(range(256)) * 4096, 3 * MiB)
        img.write(b"\x07" * MiB, 9 * MiB + 4096)
    return data_pool


def restore(target: Path, ref: str, dest: str, *flags: str) -> str:
    proc = run_cli("restore", "--target", str(target), ref, "--no-progress", "--to", dest, *flags)
    assert proc.returncode == 0, proc.stderr
    return str(proc.stderr)


def test_point_records_striping_data_pool_features_and_meta(
    ceph: Ceph, ceph_cluster: CephCluster, target: Path, image_name: str
) -> None:
    data_pool = striped_image(ceph, ceph_cluster, image_name)
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


def test_restore_recreates_the_settings_and_the_data(
    ceph: Ceph, ceph_cluster: CephCluster, target: Path, image_name: str, tmp_path: Path
) -> None:
    striped_image(ceph, ceph_cluster, image_name)
    ref, point = backed_up_point(ceph, target, image_name)
    expected = ceph.export(image_name, point.snapshot.name, tmp_path / "expected.raw")
    new = f"{image_name}-r"
    restore(target, ref, f"rbd:{ceph.pool}/{new}")
    assert backed_up_config(ceph, tmp_path / "probe", new) == point.image_config
    assert_same_content(ceph.export(new, ceph.snapshots(new)[-1], tmp_path / "restored.raw"), expected)


def test_flags_override_and_a_missing_data_pool_warns(
    ceph: Ceph, ceph_cluster: CephCluster, target: Path, image_name: str, tmp_path: Path
) -> None:
    striped_image(ceph, ceph_cluster, image_name)
    ref, point = backed_up_point(ceph, target, image_name)
    expected = ceph.export(image_name, point.snapshot.name, tmp_path / "expected.raw")
    new = f"{image_name}-f"
    flags = ("--object-size", "2M", "--stripe-unit", "2M", "--stripe-count", "1", "--image-feature", "layering")
    err = restore(target, ref, f"rbd:{ceph.pool}/{new}", *flags, "--data-pool", "no-such-pool", "--no-image-meta")
    assert "no-such-pool" in err and "does not exist" in err
    assert backed_up_config(ceph, tmp_path / "probe", new) == mf.ImageConfig(
        2 * MiB, 2 * MiB, 1, None, ("layering",), ()
    )
    assert_same_content(ceph.export(new, ceph.snapshots(new)[-1], tmp_path / "restored.raw"), expected)


def test_refused_features_warn_and_the_layout_stays(
    ceph: Ceph, ceph_cluster: CephCluster, target: Path, image_name: str, tmp_path: Path
) -> None:
    """librbd refuses journaling without exclusive-lock: the cluster's default features, the rest as recorded."""
    striped_image(ceph, ceph_cluster, image_name)
    ref, point = backed_up_point(ceph, target, image_name)
    expected = ceph.export(image_name, point.snapshot.name, tmp_path / "expected.raw")
    new = f"{image_name}-j"
    err = restore(target, ref, f"rbd:{ceph.pool}/{new}", "--image-feature", "layering,journaling")
    assert "refused" in err
    got = backed_up_config(ceph, tmp_path / "probe", new)
    assert point.image_config is not None and got is not None
    assert (got.object_size, got.stripe_unit, got.stripe_count) == (MiB, 64 << 10, 4)
    assert (got.data_pool, got.meta) == (point.image_config.data_pool, point.image_config.meta)
    assert "journaling" not in got.features
    assert_same_content(ceph.export(new, ceph.snapshots(new)[-1], tmp_path / "restored.raw"), expected)
