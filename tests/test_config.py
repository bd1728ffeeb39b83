"""The run configuration: good files parse, bad ones name the file, key and reason."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from helpers import run_cli

from rbd2qcow2.core.errors import ConfigError
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.ops.config import load

GOOD = """
target = "/backup"
jobs = 3
parallel = 2
check_unchanged = 0.01

[[clusters]]
name = "east"
conf = "/etc/ceph/east.conf"
id = "backup"
keyring = "/etc/ceph/east.keyring"

[[clusters.pools]]
name = "rbd"
namespaces = ["", "tenant-*"]
include = ["vm-*"]
exclude = ["*-scratch"]

[retention]
keep_daily = 7
keep_within = "2d"
max_depth = 20

[verify]
deep = false
source_sample = 0.05
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rbd2qcow2.toml"
    path.write_text(text)
    return path


def test_good_config(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD))
    assert cfg.target == Path("/backup") and cfg.jobs == 3 and cfg.parallel == 2
    [cluster] = cfg.clusters
    assert (cluster.name, cluster.conf, cluster.client_id) == ("east", "/etc/ceph/east.conf", "backup")
    [pool] = cluster.pools
    assert pool.wants(ImageSpec("rbd", "", "vm-1"))
    assert pool.wants(ImageSpec("rbd", "tenant-a", "vm-2"))
    assert not pool.wants(ImageSpec("rbd", "other", "vm-2"))
    assert not pool.wants(ImageSpec("rbd", "", "vm-1-scratch"))
    assert not pool.wants(ImageSpec("rbd", "", "db-1"))
    assert cfg.retention is not None and cfg.retention.keep_daily == 7
    assert cfg.retention.keep_within == timedelta(days=2) and cfg.max_depth == 20
    assert cfg.verify.source_sample == 0.05


def test_minimal_config_defaults(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, 'target = "/b"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n'))
    assert cfg.jobs == 2 and cfg.retention is None and cfg.clusters[0].name == "cluster0"
    assert cfg.clusters[0].pools[0].wants(ImageSpec("rbd", "any-ns", "anything"))


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n', "target", "missing"),
        ('target = "relative"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n', "target", "absolute"),
        ('target = "/b"\njobz = 2\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n', "jobz", "unknown key"),
        ('target = "/b"\njobs = "two"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n', "jobs", "expected int"),
        ('target = "/b"\njobs = 0\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n', "jobs", "between"),
        ('target = "/b"\njobs = true\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n', "jobs", "boolean"),
        ('target = "/b"\n', "clusters", "missing"),
        ('target = "/b"\n[[clusters]]\nconf = "/x"\n', "clusters[0].pools", "missing"),
        ('target = "/b"\n[[clusters]]\n[[clusters.pools]]\nnam = "rbd"\n', "clusters[0].pools[0].name", "missing"),
        ('target = "/b"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\ninclude = "vm*"\n', "include", "list"),
        (
            'target = "/b"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n[retention]\nkeep_within = "3x"\n',
            "retention.keep_within",
            "bad duration",
        ),
        ('target = "/b"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n[retention]\n', "retention", "keep_"),
        (
            'target = "/b"\n[[clusters]]\n[[clusters.pools]]\nname = "rbd"\n[verify]\nsource_sample = 2\n',
            "verify.source_sample",
            "between 0 and 1",
        ),
        ("target = \n", "", "not valid TOML"),
    ],
)
def test_bad_configs(tmp_path: Path, text: str, key: str, reason: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and key in message and reason in message, message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.toml")


TWO_CLUSTERS = """
target = "/b"
[[clusters]]
name = "east"
[[clusters.pools]]
name = "rbd"
[[clusters]]
name = "west"
[[clusters.pools]]
name = "{pool}"
"""


def test_two_clusters_with_one_pool_name_are_refused(tmp_path: Path) -> None:
    """Chain directories are POOL/IMAGE: the two pools' chains would share them."""
    path = write(tmp_path, TWO_CLUSTERS.format(pool="rbd"))
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message and "'east'" in message and "'west'" in message and "'rbd'" in message, message
    proc = run_cli("run", "--config", str(path), "--check-config")
    assert proc.returncode == 78 and "'east'" in proc.stderr and "'west'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    cfg = load(write(tmp_path, TWO_CLUSTERS.format(pool="vms")))
    assert [c.pools[0].name for c in cfg.clusters] == ["rbd", "vms"]
