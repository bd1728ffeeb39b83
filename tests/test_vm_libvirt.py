"""adapters/libvirt against a real, private libvirtd: domains on RBD disks of the test cluster, under TCG.

The guest (tests/vmguest.py) writes a counter to both of its disks without
end; the host reads the counter from copies of the RBD images. Frozen, the
counter on disk stands still and both disks agree; thawed, it moves again.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest
import vmguest
from cephcluster import CephCluster
from helpers import Ceph, MiB
from libvirtd import CephAccess, PrivateLibvirtd, define_ceph_secret

from rbd2qcow2.adapters import libvirt as lv
from rbd2qcow2.core.errors import Cancelled, NotFound
from rbd2qcow2.core.vm import domain_of, for_restore

pytestmark = [pytest.mark.vm, pytest.mark.slow]

CACHE_ENV = "RBD2QCOW2_CACHE"
DISK_MIB = 32
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
MOVE_TIMEOUT = 60.0  # seconds for the guest's counter to reach the disk again (TCG on a busy host)


@pytest.fixture(scope="session")
def guest_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The VM guest's kernel and initramfs, cached in $RBD2QCOW2_CACHE if set, else for this session."""
    cache = os.environ.get(CACHE_ENV)
    return vmguest.ensure_vm_guest(Path(cache) if cache else tmp_path_factory.mktemp("vmguest"))


@pytest.fixture(scope="session")
def conn(libvirt_daemon: PrivateLibvirtd) -> Iterator[libvirt.virConnect]:
    connection = lv.connect(libvirt_daemon.uri)
    yield connection
    connection.close()


@pytest.fixture(scope="session")
def ceph_access(conn: libvirt.virConnect, ceph_cluster: CephCluster) -> CephAccess:
    return define_ceph_secret(conn, ceph_cluster.conf, ceph_cluster.admin_keyring)


def _rbd_disks(ceph: Ceph, image_name: str, tmp_path: Path) -> list[vmguest.RbdDisk]:
    disks = []
    for target in ("vda", "vdb"):
        name = f"{image_name}-{target}"
        raw = tmp_path / f"{target}.raw"
        vmguest.make_disk(raw, DISK_MIB)
        ceph.create(name, DISK_MIB * MiB)
        with ceph.image(name) as img:
            img.write(raw.read_bytes(), 0)
        raw.unlink()
        disks.append(vmguest.RbdDisk(target, ceph.pool, name))
    return disks


@pytest.fixture
def make_vm(
    conn: libvirt.virConnect,
    ceph: Ceph,
    ceph_access: CephAccess,
    guest_files: tuple[Path, Path],
    image_name: str,
    tmp_path: Path,
) -> Iterator[Callable[..., libvirt.virDomain]]:
    """Define (and unless ``start=False`` boot) the two-disk guest; everything is removed afterwards."""
    made: list[tuple[libvirt.virDomain, list[vmguest.RbdDisk]]] = []

    def make(agent: str = "run", start: bool = True) -> libvirt.virDomain:
        disks = _rbd_disks(ceph, f"{image_name}-{len(made)}", tmp_path)
        name = f"r2q-{uuid.uuid4().hex[:8]}"
        xml = vmguest.domain_xml(name, *guest_files, disks, ceph_access, tmp_path / f"{name}.console", agent=agent)
        dom = lv.define(conn, xml)
        made.append((dom, disks))
        if start:
            dom.create()
            vmguest.wait_ready(tmp_path / f"{name}.console")
        return dom

    yield make
    for dom, disks in made:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        for disk in disks:
            ceph.remove(disk.image)


def counters(ceph: Ceph, dom: libvirt.virDomain, tmp_path: Path) -> tuple[int | None, int | None]:
    """The guest's counter as it is on each of its two disks now."""
    found = []
    for disk in domain_of(lv.inactive_xml(dom)).rbd_disks:
        assert disk.rbd is not None
        copy = tmp_path / f"{disk.target}.copy"
        with ceph.image(disk.rbd.image) as img:
            copy.write_bytes(img.read(0, img.size()))
        found.append(vmguest.read_counter(copy))
    return found[0], found[1]


def wait_moving(ceph: Ceph, dom: libvirt.virDomain, tmp_path: Path) -> int:
    """Wait until the first disk's counter changes; its new value."""
    first, _ = counters(ceph, dom, tmp_path)
    deadline = time.monotonic() + MOVE_TIMEOUT
    while time.monotonic() < deadline:
        now, _ = counters(ceph, dom, tmp_path)
        if now is not None and now != first:
            return now
        time.sleep(0.5)
    raise AssertionError(f"the guest's counter stayed at {first} for {MOVE_TIMEOUT:.0f} s")


def test_private_libvirtd_starts_and_stops(tmp_path: Path, guest_files: tuple[Path, Path]) -> None:
    daemon = PrivateLibvirtd(tmp_path / "d")
    daemon.start()
    try:
        conn = lv.connect(daemon.uri)
        xml = vmguest.domain_xml("r2q-alone", *guest_files, [], _no_ceph(), tmp_path / "console")
        dom = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
        assert lv.state(dom) == "paused"
        qemu_pids = [int(p.read_text()) for p in (daemon.base / "run" / "qemu").glob("*.pid")]
        assert qemu_pids
        conn.close()
        pid = daemon.proc.pid if daemon.proc else -1
    finally:
        daemon.stop()
    for gone in (pid, *qemu_pids):
        assert not _alive(gone), f"pid {gone} still runs after stop()"
    with pytest.raises(lv.LibvirtUnavailable):
        lv.connect(daemon.uri)


def _no_ceph() -> CephAccess:
    return CephAccess(user="admin", secret_uuid=str(uuid.uuid4()), mon_host="127.0.0.1", mon_port=1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.ceph
def test_freeze_stops_the_guests_writes_and_thaw_lets_them_go_on(
    make_vm: Callable[..., libvirt.virDomain], ceph: Ceph, tmp_path: Path
) -> None:
    dom = make_vm()
    assert lv.state(dom) == "running"
    wait_moving(ceph, dom, tmp_path)
    with lv.quiesced(dom, timeout=20) as quiesce:
        assert quiesce.how == "frozen" and quiesce.warning is None
        assert quiesce.frozen >= 2  # both disks' file systems
        first = counters(ceph, dom, tmp_path)
        time.sleep(2)  # the guest writes every 0.1 s when it can
        assert counters(ceph, dom, tmp_path) == first
        a, b = first
        assert a is not None and b is not None and a - b in (0, 1), first
    assert lv.state(dom) == "running"
    moved = wait_moving(ceph, dom, tmp_path)
    assert moved > a
    # A SIGTERM becomes Cancelled in the main thread; the guest is thawed all the same.
    with pytest.raises(Cancelled), lv.quiesced(dom, timeout=20) as quiesce:
        assert quiesce.how == "frozen"
        raise Cancelled(signal.SIGTERM)
    assert wait_moving(ceph, dom, tmp_path) > moved


@pytest.mark.ceph
# libvirt 9's words for an agent that holds its port but never answers, and for one that never opened it.
@pytest.mark.parametrize(("agent", "why"), [("hang", "not available"), ("none", "not connected")])
def test_without_a_working_agent_the_guest_is_paused_instead(
    make_vm: Callable[..., libvirt.virDomain], ceph: Ceph, tmp_path: Path, agent: str, why: str
) -> None:
    dom = make_vm(agent=agent)
    with lv.quiesced(dom, timeout=2) as quiesce:
        assert quiesce.how == "paused" and quiesce.consistent
        assert quiesce.warning is not None and why in quiesce.warning and "crash-consistent" in quiesce.warning
        assert lv.state(dom) == "paused"
        first = counters(ceph, dom, tmp_path)
        time.sleep(1)
        assert counters(ceph, dom, tmp_path) == first
    assert lv.state(dom) == "running"
    wait_moving(ceph, dom, tmp_path)


@pytest.mark.ceph
def test_a_stopped_domain_is_left_alone_and_its_disks_are_found(
    make_vm: Callable[..., libvirt.virDomain], ceph: Ceph
) -> None:
    dom = make_vm(start=False)
    assert lv.state(dom) == "shut off"
    with lv.quiesced(dom, timeout=2) as quiesce:
        assert quiesce.how == "none" and quiesce.warning is None
    assert lv.state(dom) == "shut off"
    domain = domain_of(lv.inactive_xml(dom))
    assert [d.target for d in domain.rbd_disks] == ["vda", "vdb"]
    for disk in domain.rbd_disks:
        assert disk.rbd is not None and disk.rbd.pool == ceph.pool and disk.rbd.user == "admin"
        assert disk.rbd.secret_uuid
    assert domain.nvram is None
    assert lv.nvram_bytes(dom) is None


def test_missing_domain_is_not_found(conn: libvirt.virConnect) -> None:
    with pytest.raises(NotFound):
        lv.lookup(conn, "r2q-no-such-domain")


@pytest.mark.skipif(not OVMF_VARS.exists(), reason="Debian package ovmf is missing: run scripts/bootstrap")
def test_nvram_is_read_and_a_restored_definition_gets_its_own(
    conn: libvirt.virConnect, libvirt_daemon: PrivateLibvirtd, guest_files: tuple[Path, Path], tmp_path: Path
) -> None:
    firmware = f"\n    <loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>\n    <nvram template='{OVMF_VARS}'/>"
    xml = vmguest.domain_xml("r2q-uefi", *guest_files, [], _no_ceph(), tmp_path / "console", extra_os=firmware)
    dom = lv.define(conn, xml)
    try:
        nvram = domain_of(lv.inactive_xml(dom)).nvram
        assert nvram is not None and "r2q-uefi" in nvram
        # libvirt copies the template when the domain first starts; paused, no firmware runs.
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        dom.destroy()
        host_root = Path(f"/proc/{libvirt_daemon.proc.pid if libvirt_daemon.proc else 0}/root")
        assert lv.nvram_bytes(dom, host_root) == OVMF_VARS.read_bytes()
        copy = for_restore(lv.inactive_xml(dom), name="r2q-uefi-copy", uuid=str(uuid.uuid4()), images={})
        restored = lv.define(conn, copy)
        try:
            assert domain_of(lv.inactive_xml(restored)).nvram not in (None, nvram)
        finally:
            lv.undefine(restored)
    finally:
        lv.undefine(dom)
    assert not libvirt_daemon.host_path(nvram).exists()
