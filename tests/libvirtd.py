"""A private libvirtd for tests: its own mount namespace, config, state and socket, stopped by PID.

Debian 12 ships the monolithic ``libvirtd`` and expects systemd and the system's
directories. Here it runs as a child in a private mount namespace (``unshare -m``)
in which private directories are bind-mounted over /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt, so nothing of the
host's libvirt is read or changed, and several of these daemons run side by side.
It listens on ``DIR/sock/libvirt-sock`` without authentication (the socket is
root's) and runs qemu as root under TCG without cgroups, namespaces or a
security driver, which a test host lacks.

Stopping destroys the daemon's VMs first (a stopped libvirtd leaves its qemu
processes running), then SIGTERMs the daemon by PID, SIGKILL after a grace time,
and kills any qemu process that is still listed in its pid files.

The first call to a fresh daemon probes qemu's capabilities (several seconds).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

# The directories the daemon would otherwise share with the host's libvirt.
PRIVATE_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
START_TIMEOUT = 60.0  # seconds until the socket answers (the daemon starts in about one)
STOP_GRACE = 10.0  # seconds after SIGTERM before SIGKILL
BINARIES = ("libvirtd", "unshare", "mount", "qemu-system-x86_64")

LIBVIRTD_CONF = """\
unix_sock_dir = "{sock}"
unix_sock_group = "root"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:{log}"
"""
# stdio_handler "file": no virtlogd; no cgroups, namespaces or security driver on a test host.
QEMU_CONF = """\
stdio_handler = "file"
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
namespaces = [ ]
cgroup_controllers = [ ]
"""


class LibvirtdError(RuntimeError):
    """The private libvirtd could not be started or stopped."""


@dataclass
class PrivateLibvirtd:
    """A libvirtd whose whole state lives under ``base``; :meth:`start`, then :meth:`stop`."""

    base: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.base / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.base / "libvirtd.log"

    def host_path(self, path: str | Path) -> Path:
        """Where a path as the daemon sees it (e.g. under /var/lib/libvirt) is on the host."""
        path = Path(path)
        for sub, private in PRIVATE_DIRS.items():
            if path.is_relative_to(private):
                return self.base / sub / path.relative_to(private)
        return path

    def start(self) -> None:
        for sub in (*PRIVATE_DIRS, "sock"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(sock=self.base / "sock", log=self.log))
        (self.base / "etc" / "qemu.conf").write_text(QEMU_CONF)
        # The mount points are the package's own directories; /run/libvirt may not exist yet.
        mkdirs = "mkdir -p " + " ".join(shlex.quote(private) for private in PRIVATE_DIRS.values())
        binds = " && ".join(
            f"mount --bind {shlex.quote(str(self.base / sub))} {shlex.quote(private)}"
            for sub, private in PRIVATE_DIRS.items()
        )
        conf, pidfile = self.base / "etc" / "libvirtd.conf", self.base / "libvirtd.pid"
        script = f"{mkdirs} && {binds} && exec libvirtd -f {shlex.quote(str(conf))} -p {shlex.quote(str(pidfile))}"
        with open(self.base / "libvirtd.stderr", "wb") as err:
            # unshare and sh exec into libvirtd: the child's PID is the daemon's.
            self.proc = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise LibvirtdError(f"libvirtd exited {self.proc.returncode}:\n{self._tail()}")
            if self.socket.exists():
                try:
                    libvirt.open(self.uri).close()
                    return
                except libvirt.libvirtError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise LibvirtdError(f"libvirtd did not answer on {self.socket} in {START_TIMEOUT:.0f} s:\n{self._tail()}")

    def _tail(self) -> str:
        out = []
        for f in (self.base / "libvirtd.stderr", self.log):
            if f.exists():
                out += f.read_text(errors="replace").splitlines()[-20:]
        return "\n".join(out)

    def connect(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)

    def stop(self) -> None:
        """Destroy the daemon's VMs, stop it by PID, then kill qemu processes it left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._destroy_domains()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_GRACE)
        self.proc = None
        self._kill_leftover_qemu()

    def _destroy_domains(self) -> None:
        try:
            conn = self.connect()
        except libvirt.libvirtError:
            return
        try:
            for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
        finally:
            conn.close()

    def _kill_leftover_qemu(self) -> None:
        for pidfile in (self.base / "run" / "qemu").glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if b"qemu-system" in cmdline and str(self.base).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)


# --- Ceph through libvirt ---------------------------------------------------------------------


@dataclass(frozen=True)
class CephAccess:
    """What a domain's rbd network disk names to reach the test cluster."""

    user: str  # the cephx user without "client.", as libvirt's <auth username=> wants it
    secret_uuid: str
    mon_host: str
    mon_port: int


def mon_v1_address(ceph_conf: Path) -> tuple[str, int]:
    """The monitor's legacy (v1) address from a ceph.conf's ``mon host`` (qemu is given host and port)."""
    text = ceph_conf.read_text()
    found = re.search(r"^mon host = .*v1:([0-9.]+):(\d+)", text, re.MULTILINE)
    if not found:
        raise LibvirtdError(f"no v1 monitor address in {ceph_conf}")
    return found.group(1), int(found.group(2))


def keyring_key(keyring: Path) -> str:
    found = re.search(r"^\s*key\s*=\s*(\S+)", keyring.read_text(), re.MULTILINE)
    if not found:
        raise LibvirtdError(f"no key in {keyring}")
    return found.group(1)


def define_ceph_secret(conn: libvirt.virConnect, ceph_conf: Path, keyring: Path, user: str = "admin") -> CephAccess:
    """A private libvirt secret holding the cephx key of ``client.<user>`` (its value cannot be read back)."""
    xml = f"<secret ephemeral='no' private='yes'><usage type='ceph'><name>client.{user} secret</name></usage></secret>"
    secret = conn.secretDefineXML(xml)
    secret.setValue(base64.b64decode(keyring_key(keyring)))
    host, port = mon_v1_address(ceph_conf)
    return CephAccess(user=user, secret_uuid=secret.UUIDString(), mon_host=host, mon_port=port)


# --- fixtures ---------------------------------------------------------------------------------
# Test modules import these names; pytest finds fixtures imported into a module.


@pytest.fixture(scope="session")
def libvirt_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateLibvirtd]:
    """One private libvirtd per test session."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run scripts/bootstrap")
    daemon = PrivateLibvirtd(tmp_path_factory.mktemp("libvirtd"))
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
