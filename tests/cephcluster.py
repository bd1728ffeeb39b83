"""A throwaway single-node Ceph cluster on loopback, for tests and demos.

Starts one ``ceph-mon`` and one bluestore ``ceph-osd`` (no mgr, no mds) as
foreground child processes whose whole state -- config, keyrings, mon store,
OSD data dir, sparse OSD block file, logs, admin sockets, PID file --
lives under one base directory.  cephx is on; everything binds to 127.0.0.1
on ports picked at random, so several clusters can run side by side.

Measured boot time (Ceph 16.2.15, 2 vCPUs, ext4): 4.7-4.9 s from an empty
directory to "OSD up/in and an object written to and read back from a pool"
(about 5.1 s each with two clusters booting at once); stop() takes ~0.25 s.
Most of the remaining time is ``ceph-osd --mkfs`` (~1.4 s) and OSD start-up.
Without the lowered ``paxos propose interval`` boot took ~10.6 s and every
pool create / ``rbd pool init`` 1-3 s.

No mgr runs, so mgr-backed commands (``ceph osd df``, ``ceph pg stat``,
...) hang until their timeout and ``ceph df`` shows no usage; rbd/rados I/O
and mon commands work.

In-process use::

    with CephCluster(tmp_path / "ceph") as cluster:
        cluster.create_pool("rbd")
        subprocess.run(["rbd", "-c", str(cluster.conf), "ls", "rbd"], check=True)

Command line (daemons are detached and survive the CLI exiting; their PIDs
are kept in ``DIR/cluster.json``)::

    python tests/cephcluster.py start DIR    # prints the path of ceph.conf
    python tests/cephcluster.py stop DIR

Limitations: ``base_dir`` must be on a filesystem supporting O_DIRECT (not
tmpfs on older kernels) and should have a short path: admin sockets are
disabled when their path would exceed the 107-byte UNIX socket limit.
Stdlib only; needs the ceph-mon, ceph-osd and ceph-common binaries on PATH.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self

__all__ = ["CephCluster", "CephClusterError"]

log = logging.getLogger(__name__)

MON_ID = "a"
STATE_FILE = "cluster.json"
STOP_GRACE_SECONDS = 10.0
COMMAND_TIMEOUT = 60.0
LOG_TAIL_LINES = 30
# Below the usual Linux ephemeral range (32768-60999) and the OSD port range
# (6800-7300), so a picked mon port does not race with outgoing connections.
MON_PORT_RANGE = (10000, 32000)
UNIX_SOCKET_PATH_MAX = 107
GIB = 1024**3


class CephClusterError(RuntimeError):
    """A cluster command or daemon failed; the message carries the details."""


@dataclass
class _Daemon:
    """A daemon we started: its name ("mon.a", "osd.0"), PID and binary."""

    name: str
    pid: int
    binary: str
    proc: subprocess.Popen[bytes] | None = None


class CephCluster:
    """One mon + one bluestore OSD under ``base_dir``; see the module docstring."""

    def __init__(self, base_dir: Path, *, osd_size_gib: int = 24) -> None:
        if osd_size_gib < 1:
            raise ValueError(f"osd_size_gib must be at least 1, not {osd_size_gib}")
        self.base_dir = Path(base_dir).absolute()
        self.osd_size_gib = osd_size_gib
        self.conf = self.base_dir / "ceph.conf"
        self.admin_keyring = self.base_dir / "ceph.client.admin.keyring"
        self.mon_keyring = self.base_dir / "ceph.mon.keyring"
        self.monmap = self.base_dir / "monmap"
        self.log_dir = self.base_dir / "log"
        self.run_dir = self.base_dir / "run"
        self.state_file = self.base_dir / STATE_FILE
        self.fsid = ""
        self._daemons: list[_Daemon] = []

    # ------------------------------------------------------------------ API

    def start(self, timeout: float = 90) -> None:
        """Create and boot the cluster; return once pool I/O works."""
        if self._daemons:
            raise CephClusterError(f"cluster in {self.base_dir} already started")
        started = time.monotonic()
        deadline = started + timeout
        self._prepare_dirs()
        atexit.register(self._stop_owned)
        try:
            self._write_conf()
            self._create_keyrings()
            self._start_mon(deadline)
            self._start_osd(deadline)
            self._wait_for_pool_io(deadline)
        except BaseException:
            self._stop_owned()
            raise
        log.info("ceph cluster in %s up after %.1f s", self.base_dir, time.monotonic() - started)

    def stop(self) -> None:
        """Stop the OSD, then the mon, by PID. Safe to call more than once.

        Stops the daemons this object started or, failing that, those listed
        in ``base_dir/cluster.json`` (written by a start() in any process).
        """
        self._stop(self._daemons or self._load_state())

    def detach(self) -> None:
        """Keep the daemons running after this Python process exits.

        By default start() registers an atexit hook that stops the cluster;
        the ``start`` CLI command calls this so the cluster outlives it.
        stop() still works later, from any process, via ``cluster.json``.
        """
        atexit.unregister(self._stop_owned)

    def create_pool(self, name: str, pg_num: int = 8) -> None:
        """Create a replicated size-1 pool and initialise it for RBD."""
        self.ceph("osd", "pool", "create", name, str(pg_num), str(pg_num))
        self._run(["rbd", "-c", str(self.conf), "pool", "init", name])

    def create_user(self, name: str, caps: dict[str, str]) -> Path:
        """Create cephx user ``name`` (e.g. "client.backup"); return its keyring.

        The keyring is written as ``base_dir/ceph.<name>.keyring``, which the
        generated ceph.conf also searches, so ``--id`` alone works too.
        """
        keyring = self.base_dir / f"ceph.{name}.keyring"
        cap_args = [item for kind, cap in caps.items() for item in (kind, cap)]
        self.ceph("auth", "get-or-create", name, *cap_args, "-o", str(keyring))
        keyring.chmod(0o600)
        return keyring

    def env(self) -> dict[str, str]:
        """A copy of os.environ pointing Ceph tools at this cluster.

        CEPH_CONF is set and CEPH_ARGS removed (it could name another cluster
        or user).
        """
        env = dict(os.environ)
        env["CEPH_CONF"] = str(self.conf)
        env.pop("CEPH_ARGS", None)
        return env

    def ceph(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``ceph -c conf ARGS`` as client.admin and return its stdout."""
        return self._run(["ceph", "-c", str(self.conf), *args], timeout=timeout)

    @property
    def pids(self) -> dict[str, int]:
        """PIDs of the running daemons by name, e.g. {"mon.a": 123, "osd.0": 124}."""
        return {d.name: d.pid for d in self._daemons}

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _stop_owned(self) -> None:
        """Stop only daemons started by this object (atexit, failed start)."""
        self._stop(self._daemons)

    def _stop(self, daemons: list[_Daemon]) -> None:
        for daemon in sorted(daemons, key=lambda d: not d.name.startswith("osd")):
            _terminate(daemon, self.conf)
        self._daemons = []
        if daemons:
            self._save_state()
        atexit.unregister(self._stop_owned)

    # ---------------------------------------------------------- preparation

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if self.conf.exists():
            raise CephClusterError(f"{self.conf} exists; use an empty directory")
        for sub in ("log", "run", "mon", "osd", "crash"):
            (self.base_dir / sub).mkdir(exist_ok=True)

    def _write_conf(self) -> None:
        self.fsid = str(uuid.uuid4())
        msgr2, msgr1 = _free_ports(2)
        mon_addrs = f"[v2:127.0.0.1:{msgr2},v1:127.0.0.1:{msgr1}]"
        self.conf.write_text(
            _render_conf(
                base=self.base_dir,
                fsid=self.fsid,
                mon_addrs=mon_addrs,
                block_size=self.osd_size_gib * GIB,
                admin_socket=self._admin_socket_setting(),
            )
        )
        self._run(
            ["monmaptool", "--create", "--clobber", "--fsid", self.fsid, "--addv", MON_ID, mon_addrs, str(self.monmap)]
        )

    def _admin_socket_setting(self) -> str:
        longest = self.run_dir / "ceph-osd.999.asok"
        if len(str(longest)) > UNIX_SOCKET_PATH_MAX:
            log.warning("%s is too long for admin sockets; disabling them", self.run_dir)
            return ""
        return "$run_dir/$cluster-$name.asok"

    def _create_keyrings(self) -> None:
        authtool = "ceph-authtool"
        self._run(
            [authtool, "--create-keyring", str(self.mon_keyring), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"]
        )
        self._run(
            [
                authtool,
                "--create-keyring",
                str(self.admin_keyring),
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
                "--cap",
                "mds",
                "allow *",
            ]
        )
        self._run([authtool, str(self.mon_keyring), "--import-keyring", str(self.admin_keyring)])
        self.admin_keyring.chmod(0o600)
        self.mon_keyring.chmod(0o600)

    # -------------------------------------------------------------- daemons

    def _start_mon(self, deadline: float) -> None:
        self._run(
            [
                "ceph-mon",
                "-c",
                str(self.conf),
                "--mkfs",
                "-i",
                MON_ID,
                "--monmap",
                str(self.monmap),
                "--keyring",
                str(self.mon_keyring),
            ]
        )
        self._spawn(f"mon.{MON_ID}", "ceph-mon", ["-i", MON_ID])
        self._poll(deadline, "mon quorum", self._mon_ready)

    def _mon_ready(self) -> bool:
        return self._try_ceph("--connect-timeout", "5", "mon", "stat") is not None

    def _start_osd(self, deadline: float) -> None:
        osd_uuid = str(uuid.uuid4())
        key = self._run(["ceph-authtool", "--gen-print-key"]).strip()
        secrets = self.base_dir / "osd-secrets.json"
        secrets.write_text(json.dumps({"cephx_secret": key}))
        osd_id = self.ceph("osd", "new", osd_uuid, "-i", str(secrets)).strip()
        secrets.unlink()
        data_dir = self.base_dir / "osd" / f"ceph-{osd_id}"
        data_dir.mkdir()
        self._run(
            [
                "ceph-authtool",
                "--create-keyring",
                str(data_dir / "keyring"),
                "--name",
                f"osd.{osd_id}",
                "--add-key",
                key,
            ]
        )
        self._run(
            [
                "ceph-osd",
                "-c",
                str(self.conf),
                "-i",
                osd_id,
                "--mkfs",
                "--osd-uuid",
                osd_uuid,
                "--monmap",
                str(self.monmap),
            ],
            timeout=max(COMMAND_TIMEOUT, deadline - time.monotonic()),
        )
        self._spawn(f"osd.{osd_id}", "ceph-osd", ["-i", osd_id])
        self._poll(deadline, "OSD up and in", self._osd_ready)

    def _osd_ready(self) -> bool:
        out = self._try_ceph("--connect-timeout", "5", "osd", "stat", "-f", "json")
        if out is None:
            return False
        stat = json.loads(out)
        return bool(stat.get("num_up_osds") == 1 and stat.get("num_in_osds") == 1)

    def _wait_for_pool_io(self, deadline: float) -> None:
        """Write and read back an object in a scratch pool, then drop the pool."""
        pool = "cephcluster-probe"
        payload = b"ceph cluster probe\n"
        sent, received = self.run_dir / "probe.out", self.run_dir / "probe.in"
        sent.write_bytes(payload)
        self.ceph("osd", "pool", "create", pool, "1", "1")
        remaining = max(10.0, deadline - time.monotonic())
        rados = ["rados", "-c", str(self.conf), "-p", pool, "--rados-osd-op-timeout", str(int(remaining))]
        self._run([*rados, "put", "probe", str(sent)], timeout=remaining + 5)
        self._run([*rados, "get", "probe", str(received)])
        if received.read_bytes() != payload:
            raise CephClusterError("probe object read back differs from what was written")
        sent.unlink()
        received.unlink()
        self.ceph("osd", "pool", "rm", pool, pool, "--yes-i-really-really-mean-it")

    def _spawn(self, name: str, binary: str, args: list[str]) -> None:
        cmd = [binary, "-f", "-c", str(self.conf), *args]
        log.debug("starting %s: %s", name, cmd)
        out = self.log_dir / f"{name}.stdout"
        with open(out, "ab") as stdout:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        self._daemons.append(_Daemon(name, proc.pid, binary, proc))
        self._save_state()

    def _poll(self, deadline: float, what: str, ready: Callable[[], bool]) -> None:
        delay = 0.2
        while True:
            self._check_daemons_alive(what)
            if ready():
                return
            if time.monotonic() > deadline:
                raise CephClusterError(f"timed out waiting for {what}\n{self._log_tails()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _check_daemons_alive(self, what: str) -> None:
        for daemon in self._daemons:
            if daemon.proc is not None and daemon.proc.poll() is not None:
                raise CephClusterError(
                    f"{daemon.name} exited with {daemon.proc.returncode} while waiting for {what}\n{self._log_tails()}"
                )

    def _log_tails(self) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*")):
            if path.is_file() and path.stat().st_size:
                lines = path.read_text(errors="replace").splitlines()
                tail = "\n".join(lines[-LOG_TAIL_LINES:])
                parts.append(f"--- {path.name} (last lines) ---\n{tail}")
        return "\n".join(parts) or "(no daemon logs)"

    # ---------------------------------------------------------------- state

    def _save_state(self) -> None:
        state = {
            "conf": str(self.conf),
            "fsid": self.fsid,
            "daemons": [{"name": d.name, "pid": d.pid, "binary": d.binary} for d in self._daemons],
        }
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def _load_state(self) -> list[_Daemon]:
        if not self.state_file.exists():
            return []
        state = json.loads(self.state_file.read_text())
        self.fsid = str(state.get("fsid", ""))
        return [_Daemon(str(d["name"]), int(d["pid"]), str(d["binary"])) for d in state.get("daemons", [])]

    # ------------------------------------------------------------- commands

    def _run(self, cmd: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str:
        log.debug("running %s", cmd)
        try:
            res = subprocess.run(
                list(cmd), check=False, stdin=subprocess.DEVNULL, capture_output=True, env=self.env(), timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise CephClusterError(f"{_fmt(cmd)} timed out after {timeout:.0f} s\n{self._log_tails()}") from exc
        if res.returncode != 0:
            stderr = res.stderr.decode(errors="replace").strip()
            raise CephClusterError(
                f"{_fmt(cmd)} failed with exit code {res.returncode}:\n{stderr or self._log_tails()}"
            )
        return res.stdout.decode(errors="replace")

    def _try_ceph(self, *args: str) -> str | None:
        try:
            return self.ceph(*args, timeout=15)
        except CephClusterError as exc:
            log.debug("not ready yet: %s", exc)
            return None


# ---------------------------------------------------------------- helpers


def _render_conf(*, base: Path, fsid: str, mon_addrs: str, block_size: int, admin_socket: str) -> str:
    return f"""\
# generated by cephcluster.py -- throwaway test cluster
[global]
fsid = {fsid}
mon host = {mon_addrs}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = {base}/run
crash dir = {base}/crash
admin socket = {admin_socket}
log file = {base}/log/$cluster-$name.log
mon cluster log file = {base}/log/$cluster.log
pid file = $run_dir/$cluster-$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
# every osdmap change (pool create, OSD boot, crush update) waits for one
# paxos round; the 1 s default makes up most of the boot time
paxos propose interval = 0.1

[client]
keyring = {base}/$cluster.$name.keyring
admin socket =
pid file =

[mon]
mon data = {base}/mon/$cluster-$id
keyring = $mon_data/keyring

[osd]
osd data = {base}/osd/$cluster-$id
keyring = $osd_data/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {block_size}
bluestore block path = {base}/osd/$cluster-$id.block
bluestore fsck on mkfs = false
bluestore fsck on mount = false
osd memory target = {GIB}
bluestore cache autotune = false
bluestore cache size = {256 * 1024**2}
osd crush update on start = true
osd op num shards = 1
osd op num threads per shard = 2
"""


def _free_ports(count: int) -> list[int]:
    """Pick ``count`` distinct currently-free TCP ports on 127.0.0.1."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randrange(*MON_PORT_RANGE)
        if port not in ports and _port_free(port):
            ports.append(port)
    return ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _terminate(daemon: _Daemon, conf: Path) -> None:
    """SIGTERM, wait up to STOP_GRACE_SECONDS, then SIGKILL -- only if the PID
    still belongs to our daemon (same binary, same ceph.conf)."""
    if daemon.proc is None and not _is_ours(daemon, conf):
        log.debug("%s (pid %d) is not running (or the PID is no longer ours)", daemon.name, daemon.pid)
        return
    log.debug("stopping %s (pid %d)", daemon.name, daemon.pid)
    if not _signal(daemon, signal.SIGTERM):
        return
    if _wait_gone(daemon, STOP_GRACE_SECONDS):
        return
    log.warning("%s (pid %d) ignored SIGTERM; sending SIGKILL", daemon.name, daemon.pid)
    _signal(daemon, signal.SIGKILL)
    if not _wait_gone(daemon, STOP_GRACE_SECONDS):
        raise CephClusterError(f"{daemon.name} (pid {daemon.pid}) survived SIGKILL")


def _signal(daemon: _Daemon, sig: int) -> bool:
    if daemon.proc is not None:
        if daemon.proc.poll() is not None:
            return False
        daemon.proc.send_signal(sig)
        return True
    try:
        os.kill(daemon.pid, sig)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(daemon: _Daemon, timeout: float) -> bool:
    if daemon.proc is not None:
        try:
            daemon.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    deadline = time.monotonic() + timeout
    while _pid_alive(daemon.pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _is_ours(daemon: _Daemon, conf: Path) -> bool:
    """True if ``daemon.pid`` is a live process running our binary and conf."""
    if not _pid_alive(daemon.pid):
        return False
    try:
        raw = Path(f"/proc/{daemon.pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return bool(argv) and Path(argv[0]).name == daemon.binary and str(conf) in argv


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _fmt(cmd: Sequence[str]) -> str:
    return " ".join(cmd)


# -------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop a throwaway single-node Ceph cluster.")
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("dir", type=Path, help="cluster directory")
    parser.add_argument("--osd-size-gib", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=90)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr
    )
    cluster = CephCluster(args.dir, osd_size_gib=args.osd_size_gib)
    try:
        if args.action == "start":
            cluster.start(timeout=args.timeout)
            cluster.detach()
            print(cluster.conf)
        else:
            cluster.stop()
    except CephClusterError as exc:
        print(f"cephcluster: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
