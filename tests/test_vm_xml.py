"""core/vm: a domain's disks and NVRAM from its XML, the XML rewritten for a restore, hostile XML refused."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from rbd2qcow2.core.errors import DataError, UsageError
from rbd2qcow2.core.vm import RbdSource, RestoredImage, domain_of, for_restore

UUID = "8f0c5c1e-3f6b-4a53-9d0e-5b0c6a1f2e34"
NEW_UUID = "1b2c3d4e-0000-4000-8000-000000000001"

DOMAIN = f"""<domain type='kvm'>
  <name>db1</name>
  <uuid>{UUID}</uuid>
  <sysinfo type='smbios'><system><entry name='uuid'>{UUID}</entry></system></sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/db1_VARS.fd</nvram>
  </os>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='libvirt'><secret type='ceph' uuid='0a1b2c3d-1111-4222-8333-444455556666'/></auth>
      <source protocol='rbd' name='vms/db1-root'>
        <host name='10.0.0.1' port='6789'/><host name='10.0.0.2'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='rbd' name='vms/tenant-a/db1-log'>
        <auth username='tenant'><secret type='ceph' usage='client.tenant secret'/></auth>
        <snapshot name='pinned'/>
      </source>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/scratch.qcow2'/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='network' device='disk'>
      <source protocol='iscsi' name='iqn.2024-01.org.example:store/1'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>
  </devices>
</domain>"""


def test_disks_are_read_in_order_rbd_or_what_they_are_instead() -> None:
    domain = domain_of(DOMAIN)
    assert (domain.name, domain.uuid) == ("db1", UUID)
    assert domain.nvram == "/var/lib/libvirt/qemu/nvram/db1_VARS.fd"
    assert [d.target for d in domain.disks] == ["vda", "vdb", "vdc", "sda", "vdd"]
    assert [d.target for d in domain.rbd_disks] == ["vda", "vdb"]
    root, log = domain.rbd_disks
    assert root.rbd == RbdSource(
        "vms", "", "db1-root", ("10.0.0.1:6789", "10.0.0.2"), "libvirt", "0a1b2c3d-1111-4222-8333-444455556666"
    )
    assert log.rbd == RbdSource("vms", "tenant-a", "db1-log", (), "tenant", None, "client.tenant secret")
    assert (root.rbd.spec, log.rbd.spec) == ("vms/db1-root", "vms/tenant-a/db1-log")
    other = {d.target: (d.kind, d.device, d.source, d.readonly) for d in domain.other_disks}
    assert other == {
        "vdc": ("file", "disk", "/var/lib/libvirt/images/scratch.qcow2", False),
        "sda": ("file", "cdrom", "", True),
        "vdd": ("network", "disk", "iscsi:iqn.2024-01.org.example:store/1", False),
    }


def test_a_domain_without_nvram_has_none() -> None:
    xml = f"<domain><name>a</name><uuid>{UUID}</uuid><os><type>hvm</type></os><devices/></domain>"
    domain = domain_of(xml)
    assert domain.nvram is None and domain.disks == ()


@pytest.mark.parametrize(
    "xml",
    [
        # an internal entity: expat would expand it (a billion laughs in bigger form)
        f'<!DOCTYPE domain [<!ENTITY a "aaaa">]><domain><name>&a;</name><uuid>{UUID}</uuid></domain>',
        f'<!DOCTYPE domain SYSTEM "http://example.org/x.dtd"><domain><name>a</name><uuid>{UUID}</uuid></domain>',
        f"<?xml version='1.0'?>\n<!doctype domain><domain><name>a</name><uuid>{UUID}</uuid></domain>",
        "<domain><name>a</name>",  # not well-formed
        f"<network><name>a</name><uuid>{UUID}</uuid></network>",  # not a domain
        "<domain><name>a</name></domain>",  # no uuid
    ],
)
def test_hostile_or_broken_xml_is_refused(xml: str) -> None:
    with pytest.raises(DataError):
        domain_of(xml)


@pytest.mark.parametrize("name", ["vms", "vms/", "/img", "a/b/c/d"])
def test_an_rbd_source_name_must_be_pool_and_image(name: str) -> None:
    xml = DOMAIN.replace("vms/db1-root", name)
    with pytest.raises(DataError, match="vda"):
        domain_of(xml)


def test_a_disk_target_named_twice_is_refused() -> None:
    with pytest.raises(DataError, match="vdb"):
        domain_of(DOMAIN.replace("dev='vdc'", "dev='vdb'"))


def test_restore_gives_a_new_identity_and_points_at_the_restored_images() -> None:
    images = {"vda": RestoredImage("restore", "db1-root-r"), "vdb": RestoredImage("restore", "db1-log-r", "ns")}
    text = for_restore(DOMAIN, name="db1-restored", uuid=NEW_UUID, images=images, nvram="/srv/nvram/db1r.fd")
    domain = domain_of(text)
    assert (domain.name, domain.uuid, domain.nvram) == ("db1-restored", NEW_UUID, "/srv/nvram/db1r.fd")
    assert [d.rbd.spec for d in domain.rbd_disks if d.rbd] == ["restore/db1-root-r", "restore/ns/db1-log-r"]
    # the cluster's hosts and the secret stay; the original's pinned snapshot does not
    assert domain.rbd_disks[0].rbd == RbdSource(
        "restore", "", "db1-root-r", ("10.0.0.1:6789", "10.0.0.2"), "libvirt", "0a1b2c3d-1111-4222-8333-444455556666"
    )
    root = ET.fromstring(text)
    assert root.find("devices/disk/source/snapshot") is None
    assert root.findtext("sysinfo/system/entry[@name='uuid']") == NEW_UUID
    assert root.find("devices/interface/mac") is None
    assert [d.target for d in domain.other_disks] == ["vdc", "sda", "vdd"]


def test_restore_without_an_nvram_path_leaves_libvirt_to_choose_one() -> None:
    images = {"vda": RestoredImage("p", "a"), "vdb": RestoredImage("p", "b")}
    text = for_restore(DOMAIN, name="n", uuid=NEW_UUID, images=images, keep_macs=True)
    assert domain_of(text).nvram is None
    assert ET.fromstring(text).find("os/nvram") is not None  # the template stays
    assert ET.fromstring(text).find("devices/interface/mac") is not None


def test_an_rbd_disk_without_a_restored_image_is_refused_or_dropped() -> None:
    images = {"vda": RestoredImage("p", "a")}
    with pytest.raises(UsageError, match="vdb"):
        for_restore(DOMAIN, name="n", uuid=NEW_UUID, images=images)
    text = for_restore(DOMAIN, name="n", uuid=NEW_UUID, images=images, drop_unmapped=True)
    assert [d.target for d in domain_of(text).rbd_disks] == ["vda"]


def test_a_restored_image_for_a_disk_that_is_not_rbd_is_refused() -> None:
    images = {"vda": RestoredImage("p", "a"), "vdb": RestoredImage("p", "b"), "vdc": RestoredImage("p", "c")}
    with pytest.raises(UsageError, match="vdc"):
        for_restore(DOMAIN, name="n", uuid=NEW_UUID, images=images)
