"""Pure rules for libvirt domains: what a domain's XML says about its disks, and its XML for a restore.

A domain's disks are read from its (inactive) XML: RBD network disks name
their pool, namespace and image, the cephx user and the libvirt secret that
holds its key; every other disk is kept with its type and source, so that a
point can list it as not backed up. A source name ``POOL/NAMESPACE/IMAGE`` is
read as rbd itself writes one; upstream libvirt (9.0 included) passes no
namespace to qemu but ``NAMESPACE/IMAGE`` as the image name, which librbd
does not open, so such a domain only runs on a libvirt patched for namespaces. XML comes from libvirt or from a point on
the target, which an attacker may have written: a document type declaration
(and with it every entity, which expat would expand) is refused.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import DataError, UsageError

# Anything that declares a document type or entities is refused before expat sees it.
_DTD_RE = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class RbdSource:
    """Where an RBD network disk's image is, and how libvirt authenticates to its cluster."""

    pool: str
    namespace: str  # "" for the pool's default namespace
    image: str
    hosts: tuple[str, ...] = ()  # "HOST" or "HOST:PORT" of the monitors, as the XML gives them
    user: str | None = None  # cephx user without "client."
    secret_uuid: str | None = None
    secret_usage: str | None = None  # a secret may be named by usage instead of uuid

    @property
    def spec(self) -> str:
        """``POOL/IMAGE`` or ``POOL/NAMESPACE/IMAGE``, as rbd2qcow2 names images."""
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)


@dataclass(frozen=True)
class Disk:
    """One ``<disk>`` of a domain: an RBD image (``rbd``), or what it is instead (``source``)."""

    target: str  # the guest's device name: vda, sdb, ...
    device: str  # disk, cdrom, floppy, lun
    kind: str  # the disk's type: network, file, block, volume, dir, nvme, vhostuser
    rbd: RbdSource | None
    source: str  # for a disk that is not RBD: its file, device, volume or protocol and name ("" if empty)
    readonly: bool = False


@dataclass(frozen=True)
class Domain:
    """What a point records of a libvirt domain."""

    name: str
    uuid: str
    disks: tuple[Disk, ...]
    nvram: str | None  # the NVRAM file's path on the libvirt host, if the domain has one

    @property
    def rbd_disks(self) -> tuple[Disk, ...]:
        return tuple(d for d in self.disks if d.rbd is not None)

    @property
    def other_disks(self) -> tuple[Disk, ...]:
        """Disks that are not RBD images: never backed up, listed as such."""
        return tuple(d for d in self.disks if d.rbd is None)


def parse_xml(text: str) -> ET.Element:
    """The root element of a domain XML; DataError if it is not well-formed or declares a DTD."""
    if _DTD_RE.search(text):
        raise DataError("domain XML with a document type or entity declaration is refused")
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DataError(f"domain XML is not well-formed: {exc}") from exc
    if root.tag != "domain":
        raise DataError(f"not a libvirt domain XML (root element <{root.tag}>)")
    return root


def _text(root: ET.Element, path: str) -> str:
    node = root.find(path)
    value = (node.text or "").strip() if node is not None else ""
    if not value:
        raise DataError(f"domain XML without <{path}>")
    return value


def _rbd_source(disk: ET.Element, source: ET.Element, target: str) -> RbdSource:
    name = source.get("name", "")
    parts = name.split("/")
    if len(parts) == 2:
        pool, namespace, image = parts[0], "", parts[1]
    elif len(parts) == 3:
        pool, namespace, image = parts
    else:
        raise DataError(f"disk {target}: rbd source name {name!r} is not POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    if not pool or not image:
        raise DataError(f"disk {target}: rbd source name {name!r} lacks a pool or image")
    hosts = tuple(
        f"{h.get('name')}:{h.get('port')}" if h.get("port") else str(h.get("name"))
        for h in source.findall("host")
        if h.get("name")
    )
    # libvirt accepts <auth> under <disk> (older form) or under <source>.
    auth = source.find("auth")
    if auth is None:
        auth = disk.find("auth")
    user = secret_uuid = secret_usage = None
    if auth is not None:
        user = auth.get("username")
        secret = auth.find("secret")
        if secret is not None:
            secret_uuid, secret_usage = secret.get("uuid"), secret.get("usage")
    return RbdSource(pool, namespace, image, hosts, user, secret_uuid, secret_usage)


def _other_source(kind: str, source: ET.Element | None) -> str:
    if source is None:
        return ""
    if kind == "network":
        return f"{source.get('protocol', '?')}:{source.get('name', '')}"
    if kind == "volume":
        return f"{source.get('pool', '')}/{source.get('volume', '')}"
    for attr in ("file", "dev", "dir", "path"):
        if source.get(attr):
            return str(source.get(attr))
    return ""


def _disk(node: ET.Element) -> Disk:
    target_node = node.find("target")
    target = target_node.get("dev", "") if target_node is not None else ""
    if not target:
        raise DataError("domain XML has a disk without <target dev=...>")
    kind, device = node.get("type", "file"), node.get("device", "disk")
    source = node.find("source")
    readonly = node.find("readonly") is not None
    if kind == "network" and source is not None and source.get("protocol") == "rbd":
        return Disk(target, device, kind, _rbd_source(node, source, target), "", readonly)
    return Disk(target, device, kind, None, _other_source(kind, source), readonly)


def domain_of(text: str) -> Domain:
    """The domain an XML describes: name, uuid, disks in XML order, NVRAM path."""
    root = parse_xml(text)
    disks = tuple(_disk(d) for d in root.findall("devices/disk"))
    targets = [d.target for d in disks]
    duplicate = sorted({t for t in targets if targets.count(t) > 1})
    if duplicate:
        raise DataError(f"domain XML names disk target(s) {', '.join(duplicate)} more than once")
    nvram = root.find("os/nvram")
    nvram_path = (nvram.text or "").strip() if nvram is not None else ""
    return Domain(_text(root, "name"), _text(root, "uuid"), disks, nvram_path or None)


# --- restore -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoredImage:
    """The RBD image a restored disk points at."""

    pool: str
    image: str
    namespace: str = ""

    @property
    def source_name(self) -> str:
        """The ``name`` of libvirt's rbd ``<source>``."""
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)


def for_restore(
    text: str,
    *,
    name: str,
    uuid: str,
    images: Mapping[str, RestoredImage],
    nvram: str | None = None,
    drop_unmapped: bool = False,
    keep_macs: bool = False,
) -> str:
    """A saved domain XML rewritten to define a restored VM beside the original.

    ``images`` maps disk targets to their restored images. An RBD disk without
    one would share the original's image: refused, or removed with
    ``drop_unmapped``. The NVRAM path becomes ``nvram``, or is left for libvirt
    to choose from the new name. MAC addresses are removed (libvirt makes new
    ones) unless ``keep_macs``, so the copy does not clash on the network.
    """
    root = parse_xml(text)
    old_uuid = _text(root, "uuid")
    _set_text(root, "name", name)
    _set_text(root, "uuid", uuid)
    for entry in root.findall("sysinfo/system/entry[@name='uuid']"):
        if (entry.text or "").strip().lower() == old_uuid.lower():
            entry.text = uuid  # libvirt refuses a sysinfo uuid that differs from the domain's
    _retarget_disks(root, images, drop_unmapped)
    os_node = root.find("os")
    nvram_node = os_node.find("nvram") if os_node is not None else None
    if nvram_node is not None:
        nvram_node.text = nvram
    if not keep_macs:
        for interface in root.findall("devices/interface"):
            for mac in interface.findall("mac"):
                interface.remove(mac)
    return ET.tostring(root, encoding="unicode")


def _set_text(root: ET.Element, tag: str, value: str) -> None:
    node = root.find(tag)
    if node is None:
        node = ET.SubElement(root, tag)
    node.text = value


def _retarget_disks(root: ET.Element, images: Mapping[str, RestoredImage], drop_unmapped: bool) -> None:
    devices = root.find("devices")
    nodes = devices.findall("disk") if devices is not None else []
    disks = [(node, _disk(node)) for node in nodes]
    unknown = sorted(set(images) - {d.target for _, d in disks if d.rbd is not None})
    if unknown:
        raise UsageError(f"the domain has no RBD disk {', '.join(unknown)}")
    for node, disk in disks:
        if disk.rbd is None:
            continue
        if disk.target not in images:
            if not drop_unmapped:
                raise UsageError(f"disk {disk.target} ({disk.rbd.spec}) has no restored image")
            assert devices is not None
            devices.remove(node)
            continue
        source = node.find("source")
        assert source is not None
        source.set("name", images[disk.target].source_name)
        for snapshot in source.findall("snapshot"):
            source.remove(snapshot)


__all__ = ["Disk", "Domain", "RbdSource", "RestoredImage", "domain_of", "for_restore", "parse_xml"]
