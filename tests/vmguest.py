"""The test guest for VM tests: bootguest's kernel and busybox, plus the qemu guest agent.

The guest mounts two ext4 disks (``/dev/vda``, ``/dev/vdb``) and writes a
counter to the file ``counter`` on both, forever: ``n`` to the first, ``n`` to
the second, ``sync``, next ``n``. At any instant the first disk's counter is
the second's or one more, so a point in which the two disks disagree by more
shows disks snapshotted at different instants. The disks have no journal, so
what ``sync`` wrote is the file's content on disk and the host reads it with
``debugfs`` from a plain copy of the image.

Debian's ``qemu-ga`` (from the host's qemu-guest-agent package) and the
libraries ``ldd`` lists are put into the initramfs; the guest finds its
virtio-serial port by name. The kernel command line chooses the agent:
``vmguest.agent=run`` (a working agent), ``hang`` (started, then stopped with
SIGSTOP once it holds the port open: libvirt sees an agent that never
answers) or ``none`` (never started). The serial console goes to a file; the
guest prints ``VMGUEST-READY`` there once its writer runs.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from bootguest import ROOT_MODULES, BootGuestError, _run, build_guest
from libvirtd import CephAccess

VMGUEST_VERSION = 1
MODULES = (*ROOT_MODULES[:2], "virtio_console", *ROOT_MODULES[2:])
AGENT = "/usr/sbin/qemu-ga"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
READY = "VMGUEST-READY"
ERROR = "VMGUEST-ERROR:"
COUNTER_FILE = "counter"
AGENT_MODES = ("run", "hang", "none")

_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /run /mnt/a /mnt/b
fail() {
    echo "@ERROR@ $*"
    dmesg | tail -n 30
    poweroff -f
}
wait_for() {
    n=0
    while ! [ $1 $2 ]; do
        n=$((n + 1))
        [ "$n" -gt 200 ] && fail "no $2"
        usleep 100000
    done
}
@INSMODS@
wait_for -b /dev/vda
wait_for -b /dev/vdb
mount -t ext4 /dev/vda /mnt/a || fail "mount /dev/vda"
mount -t ext4 /dev/vdb /mnt/b || fail "mount /dev/vdb"
agent=run
for arg in $(cat /proc/cmdline); do
    case "$arg" in vmguest.agent=*) agent="${arg#vmguest.agent=}" ;; esac
done
if [ "$agent" != none ]; then
    port=""
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = "@CHANNEL@" ] && port="/dev/${p##*/}"
    done
    [ -n "$port" ] || fail "no virtio port @CHANNEL@"
    wait_for -c "$port"
    /bin/qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid &
    ga=$!
    if [ "$agent" = hang ]; then
        n=0
        until ls -l /proc/$ga/fd 2>/dev/null | grep -q vport; do
            n=$((n + 1))
            [ "$n" -gt 200 ] && fail "qemu-ga did not open $port"
            usleep 100000
        done
        kill -STOP $ga
    fi
fi
echo "@READY@ agent=$agent"
n=0
while true; do
    n=$((n + 1))
    echo $n > /mnt/a/@COUNTER@
    echo $n > /mnt/b/@COUNTER@
    sync
    usleep 100000
done
"""


def _init_script(modules: Sequence[str]) -> str:
    insmods = "\n".join(f'insmod /modules/{m}.ko || fail "insmod {m}"' for m in modules)
    text = _INIT
    for key, value in {
        "@INSMODS@": insmods,
        "@ERROR@": ERROR,
        "@READY@": READY,
        "@CHANNEL@": AGENT_CHANNEL,
        "@COUNTER@": COUNTER_FILE,
    }.items():
        text = text.replace(key, value)
    return text


def _agent_files() -> list[tuple[str, int, bytes]]:
    """qemu-ga as bin/qemu-ga and every library ``ldd`` lists, at the same paths (the loader's too)."""
    if not Path(AGENT).exists():
        raise BootGuestError(f"{AGENT} is missing (Debian package qemu-guest-agent): run scripts/bootstrap")
    files = [("bin/qemu-ga", 0o100755, Path(AGENT).read_bytes())]
    for line in _run(["ldd", AGENT]).splitlines():
        found = re.search(r"(/\S+) \(0x", line)
        if found:
            lib = Path(found.group(1))
            files.append((str(lib).lstrip("/"), 0o100755, lib.resolve().read_bytes()))
    return files


def ensure_vm_guest(cache_dir: Path) -> tuple[Path, Path]:
    """The VM guest's kernel and initramfs, built once into ``cache_dir`` and reused afterwards."""
    return build_guest(cache_dir / f"vmguest-v{VMGUEST_VERSION}", MODULES, _init_script, _agent_files)


# --- disks -------------------------------------------------------------------------------------


def make_disk(path: Path, size_mib: int = 32) -> None:
    """An empty ext4 file system without a journal (so the host reads synced files from the image)."""
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    _run(["mkfs.ext4", "-F", "-q", "-O", "^has_journal", "-E", "lazy_itable_init=0", str(path)])


def read_counter(image: Path) -> int | None:
    """The guest's counter in a copy of one of its disks (None before the guest wrote one)."""
    proc = subprocess.run(
        ["debugfs", "-R", f"cat /{COUNTER_FILE}", str(image)], capture_output=True, text=True, check=False
    )
    value = proc.stdout.strip()
    return int(value) if value.isdigit() else None


# --- domain XML -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RbdDisk:
    target: str  # vda, vdb
    pool: str
    image: str
    namespace: str = ""


def _disk_xml(disk: RbdDisk, ceph: CephAccess) -> str:
    name = "/".join(p for p in (disk.pool, disk.namespace, disk.image) if p)
    return f"""
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <auth username={quoteattr(ceph.user)}><secret type='ceph' uuid='{ceph.secret_uuid}'/></auth>
      <source protocol='rbd' name={quoteattr(name)}><host name='{ceph.mon_host}' port='{ceph.mon_port}'/></source>
      <target dev='{disk.target}' bus='virtio'/>
    </disk>"""


def domain_xml(
    name: str,
    kernel: Path,
    initrd: Path,
    disks: Sequence[RbdDisk],
    ceph: CephAccess,
    console: Path,
    *,
    agent: str = "run",
    uuid: str | None = None,
    extra_os: str = "",
) -> str:
    """A TCG domain booting the guest with RBD ``disks`` and a guest agent channel.

    ``console``: the file the serial console is written to. ``extra_os``: more
    ``<os>`` elements (a firmware ``<loader>`` and ``<nvram>``).
    """
    if agent not in AGENT_MODES:
        raise ValueError(f"agent must be one of {AGENT_MODES}")
    disk_xml = "".join(_disk_xml(d, ceph) for d in disks)
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid or uuidlib.uuid4()}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet vmguest.agent={agent}</cmdline>{extra_os}
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{disk_xml}
    <controller type='virtio-serial'/>
    <channel type='unix'><target type='virtio' name='{AGENT_CHANNEL}'/></channel>
    <serial type='file'><source path={quoteattr(str(console))}/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def wait_ready(console: Path, timeout: float = 180) -> str:
    """The console line with READY; BootGuestError with the console's tail on error or timeout."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = console.read_text(errors="replace") if console.exists() else ""
        for line in text.splitlines():
            if line.startswith(READY):
                return line
            if line.startswith(ERROR):
                break
        else:
            time.sleep(0.5)
            continue
        break
    tail = "\n".join(text.splitlines()[-30:])
    raise BootGuestError(f"the guest did not print {READY} within {timeout:.0f} s; console tail:\n{tail}")
