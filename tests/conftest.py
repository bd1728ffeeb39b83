"""Fixtures: one throwaway Ceph cluster per test session, a temp pool per session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import faultlib
from cephcluster import CephCluster
from helpers import Ceph
from libvirtd import libvirt_daemon as libvirt_daemon  # registered once: the session's private libvirtd

CEPH_BINARIES = ("ceph-mon", "ceph-osd", "ceph", "rbd")


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    missing = [b for b in CEPH_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.fail(f"Ceph binaries missing ({', '.join(missing)}): run scripts/bootstrap")
    base = Path(tempfile.mkdtemp(prefix="r2q-ceph-"))  # short: admin socket paths are limited
    cluster = CephCluster(base / "c", osd_size_gib=24)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph(ceph_cluster: CephCluster) -> Iterator[Ceph]:
    pool = f"test-{uuid.uuid4().hex[:8]}"
    ceph_cluster.create_pool(pool)
    with Ceph(ceph_cluster.conf, pool) as handle:
        yield handle


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target"
    return path


@pytest.fixture
def image_name(request: pytest.FixtureRequest) -> str:
    """A unique image name per test."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}".replace("[", "-").replace("]", "")


@pytest.fixture(autouse=True)
def _ceph_conf_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "ceph_cluster" in request.fixturenames or "ceph" in request.fixturenames:
        cluster: CephCluster = request.getfixturevalue("ceph_cluster")
        monkeypatch.setenv("CEPH_CONF", str(cluster.conf))
    os.environ.pop("RBD2QCOW2_CRASH_AT", None)


@pytest.fixture(scope="session")
def fault_table() -> faultlib.Table:
    """The fault tier's outcome table: fault x operation x outcome, printed at the end."""
    return faultlib.TABLE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    table = faultlib.TABLE
    if not table.rows:
        return
    terminalreporter.section(f"fault table (seed {table.seed}, replay with {faultlib.SEED_ENV}={table.seed})")
    for line in table.lines():
        terminalreporter.write_line(line)
    out = os.environ.get(faultlib.TABLE_ENV)
    if out:
        Path(out).write_text(f"Seed {table.seed}.\n\n" + table.markdown())
        terminalreporter.write_line(f"written to {out}")
