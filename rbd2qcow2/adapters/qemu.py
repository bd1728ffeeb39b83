"""The qemu boundary: qemu-img and qemu-storage-daemon (driven over QMP).

Nothing else in rbd2qcow2 runs a qemu binary.  Every image is opened with an
explicit driver, and chains are given to qemu as explicit nested blockdev
options ending in ``"backing": null``, so qemu never follows a backing file
name written in a header.  Failures become :class:`~rbd2qcow2.core.errors.QemuError`
with the command line and qemu's own message.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..core.errors import InUse, LayerCorrupt, QemuError, QemuUnavailable
from ..core.faults import crashpoint
from ..store.qcow2 import create_layer

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

# qemu.qmp (and asyncio under it, ~15 ms) is imported on a daemon's first
# command, while the daemon boots: the commands that only run qemu-img (list,
# verify, file restores) never import it.

logger = logging.getLogger(__name__)

QMP_TIMEOUT = 30.0  # seconds for the daemon's start and for one QMP command
QEMU_IMG_TIMEOUT = 1800.0  # seconds for one qemu-img check, info or map (a deep chain's map is the slowest)
QUIT_TIMEOUT = 10.0  # seconds for the daemon to quit, then as long after SIGTERM, then SIGKILL
JOB_STALL_TIMEOUT = 300.0  # seconds a block job may go without progress
PREALLOCATE_SIZE = 128 << 20  # how far qemu's preallocate filter extends a layer file at a time (its default)
PREALLOCATE_ALIGN = 1 << 20  # the filter's prealloc-align default


def _subprocess(args: Sequence[str], *, pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[str]:
    """Run a qemu tool to its end, at most :data:`QEMU_IMG_TIMEOUT` (then it is killed)."""
    try:
        return subprocess.run(
            list(args), capture_output=True, text=True, check=False, pass_fds=tuple(pass_fds), timeout=QEMU_IMG_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise QemuError(f"{args[0]} did not finish in {QEMU_IMG_TIMEOUT:.0f} s (killed) [{' '.join(args)}]") from exc
    except OSError as exc:
        raise QemuUnavailable(f"cannot run {args[0]}: {exc.strerror}") from exc


def _run(args: Sequence[str], *, what: str) -> str:
    proc = _subprocess(args)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise QemuError(f"{what} failed (exit {proc.returncode}): {msg} [{' '.join(args)}]")
    return proc.stdout


def file_node(
    path: Path, *, direct: bool = False, read_only: bool = True, direct_aio: str = "io_uring"
) -> dict[str, Any]:
    node: dict[str, Any] = {"driver": "file", "filename": str(path)}
    if direct:
        node["aio"] = direct_aio
        node["cache"] = {"direct": True}
    if read_only:
        node["read-only"] = True
    return node


def daemon_name(path: Path, root: Path | None) -> str:
    """How a daemon whose working directory is ``root`` names ``path``: relative under it (pure)."""
    if root is not None:
        try:
            return str(path.absolute().relative_to(root))
        except ValueError:
            pass
    return str(path.absolute())


def chain_options(
    files: Sequence[Path],
    *,
    writable_top: bool = False,
    direct: bool = False,
    aio: str | None = None,
    direct_aio: str = "io_uring",
    preallocate: bool = False,
    root: Path | None = None,
) -> dict[str, Any]:
    """Nested qcow2 blockdev options for ``files`` (base first, top last).

    The base gets ``"backing": null``; each upper layer names its backing node
    explicitly, so the headers' backing names are never followed.  ``aio``
    sets how the read-only layers are read (qemu's default: a thread pool),
    ``direct_aio`` how a writable top opened with ``direct`` is written.
    ``preallocate`` puts qemu's ``preallocate`` filter over a writable top's
    file: a write past the end of the file first extends it by
    ``PREALLOCATE_SIZE`` at once, and closing the node cuts the file back to
    the end of its data.  On ext4 an O_DIRECT write that extends the file
    waits for the disk inside its submission and updates the inode each
    time; with the filter, 205 writes of 64 KiB into a new layer took
    14-16 ms of qemu's CPU instead of 21-22, and 21-24 ms instead of 38-40.

    The options are as short as they can be: qemu's QMP monitor reads its
    input one byte per system call (about 11 us of the daemon's CPU per
    byte here), so ``read-only`` is given on the top alone (qemu opens
    backing nodes read-only, and a node's file as its node), and file names
    are relative to ``root``, the daemon's working directory.
    """
    opts: dict[str, Any] | None = None
    for i, path in enumerate(files):
        top = i == len(files) - 1
        writable = top and writable_top
        file: dict[str, Any] = {"driver": "file", "filename": daemon_name(path, root)}
        if direct and writable:
            file["aio"] = direct_aio
            file["cache"] = {"direct": True}
        elif not writable and aio is not None:
            file["aio"] = aio
        if writable and preallocate:
            file = preallocate_node(file, path)
        node: dict[str, Any] = {"driver": "qcow2", "file": file, "backing": opts}
        if top and not writable:
            node["read-only"] = True
        opts = node
    if opts is None:
        raise ValueError("empty chain")
    return opts


def preallocate_node(file: dict[str, Any], path: Path) -> dict[str, Any]:
    """qemu's ``preallocate`` filter over ``file`` (of ``path``), taking at most a quarter of the free space.

    Where less than ``PREALLOCATE_SIZE`` is free, ext4 allocates what it can
    of the extension, and the checksum file and the manifest written beside
    the layer find no room; on a nearly full file system there is no filter.
    """
    node: dict[str, Any] = {"driver": "preallocate", "file": file}
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return node
    share = st.f_bavail * st.f_frsize // 4 // PREALLOCATE_ALIGN * PREALLOCATE_ALIGN
    if share >= PREALLOCATE_SIZE:
        return node
    if share < PREALLOCATE_ALIGN:
        return file
    node["prealloc-size"] = share
    return node


class CommitWay(NamedTuple):
    """How a commit's base file is opened and written."""

    aio: str | None  # "io_uring", or None for qemu's thread pool
    direct: bool  # O_DIRECT
    preallocate: bool  # qemu's preallocate filter over the file


# Best first.  With O_DIRECT the committed clusters go to the disk as they are
# written, and the read-back reads them from there
# (:func:`rbd2qcow2.ops.merge.open_for_read_back`): no page-cache pages are
# filled, which on the machine measured cost more than the I/O.  The
# preallocate filter extends the file ahead of the writes, which land past its
# end one cluster at a time (an O_DIRECT write that extends a file waits for
# the disk on ext4; 1,600 clusters: 0.114-0.117 s against 0.172-0.203 s).
# Buffered, io_uring: from qemu's thread pool, buffered writes contend for the
# file's lock (about a tenth of the job's time).  The thread pool is the last resort.
COMMIT_WAYS = (
    CommitWay("io_uring", True, True),
    CommitWay("io_uring", True, False),
    CommitWay("io_uring", False, False),
    CommitWay(None, False, False),
)


def _commit_options(
    files: Sequence[Path], base: int, top: str, base_node: str, way: CommitWay
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Blockdev options for a commit into ``files[base]``: the base node alone, then the layers above it.

    The base is the only node opened writable, with ``"backing": null``;
    the layers above it are opened read-only, the lowest of them backed by
    the base node (named ``base_node``).  The commit copies what those
    layers allocate, whole clusters, and never reads below the base
    (opening ten layers instead of two cost 10-20 ms).  A process reading a
    chain that the commit changes has the base open, so qemu's lock on it
    still refuses the commit.  The base is added on its own because qemu
    did not open a filter node inside a backing node's options.
    """
    file = file_node(files[base], read_only=False)
    if way.aio is not None:
        file["aio"] = way.aio
    if way.direct:
        file["cache"] = {"direct": True}
    if way.preallocate:
        file = preallocate_node(file, files[base])
    base_opts: dict[str, Any] = {"driver": "qcow2", "node-name": base_node, "file": file, "backing": None}
    opts: Any = base_node
    for path in files[base + 1 :]:
        opts = {"driver": "qcow2", "file": file_node(path), "backing": opts, "read-only": True}
    opts["node-name"] = top
    return base_opts, opts


def json_filename(opts: dict[str, Any]) -> str:
    return "json:" + json.dumps(opts)


def check_layer(path: Path) -> dict[str, Any]:
    """``qemu-img check`` of one layer alone (its backing file is not opened); returns qemu's report.

    Raises :class:`LayerCorrupt` when qemu finds corruptions, or cannot open
    the layer while it opens a sound one, and :class:`QemuUnavailable` when
    qemu-img cannot run or complete the check: that says nothing of the layer.
    """
    proc = _check(path)
    if proc.returncode in (0, 2, 3):  # 3: leaked clusters only, harmless
        try:
            report: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise QemuUnavailable(f"qemu-img check {path} printed no report: {proc.stderr.strip()}") from None
        if proc.returncode == 2:
            raise LayerCorrupt(f"qemu-img check: {report.get('corruptions', 'some')} corruptions")
        return report
    # 1: not completed (qemu cannot open the layer, or an internal error); 63: no checks for the format
    if proc.returncode == 1 and _checks_a_sound_layer():
        raise LayerCorrupt(f"qemu-img check cannot open it: {proc.stderr.strip()}")
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    raise QemuUnavailable(f"qemu-img check {path} did not complete ({how}): {proc.stderr.strip()}")


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    opts = {"driver": "qcow2", "file": file_node(path), "backing": None}
    return _subprocess(["qemu-img", "check", "--output=json", json_filename(opts)])


def _checks_a_sound_layer() -> bool:
    """Whether qemu-img checks a new empty layer: then a layer it cannot open is damaged, and qemu is fine."""
    with tempfile.TemporaryDirectory(prefix="rbd2qcow2-check-") as tmp:
        control = Path(tmp) / "control.qcow2"
        create_layer(control, 1 << 20, None)  # written by us: no qemu needed to make it
        return _check(control).returncode == 0


def info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of one file (qemu-img info does not open backing files)."""
    out = _run(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)], what="qemu-img info")
    result: dict[str, Any] = json.loads(out)
    return result


@dataclass(frozen=True)
class MapExtent:
    """One extent of ``qemu-img map``: which layer serves it (depth 0 = top)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool


def map_chain(files: Sequence[Path]) -> list[MapExtent]:
    """The allocation map of a chain's top (base first), by layer depth."""
    out = _run(
        ["qemu-img", "map", "--output=json", json_filename(chain_options(files))],
        what="qemu-img map",
    )
    return [
        MapExtent(int(e["start"]), int(e["length"]), int(e["depth"]), bool(e["present"]), bool(e["zero"]))
        for e in json.loads(out)
    ]


class HostExtent(NamedTuple):
    """One extent of ``qemu-img map`` with where its bytes live.

    ``offset`` is the host offset of the raw, uncompressed data in the file
    of the layer at ``depth`` (0 = top); ``None`` where qemu names none
    (compressed clusters, zeros, holes).  A tuple: maps of deep chains have
    tens of thousands of extents.
    """

    start: int
    length: int
    depth: int
    zero: bool
    data: bool
    offset: int | None


def map_host(files: Sequence[Path], *, pass_fds: Sequence[int] = ()) -> list[HostExtent]:
    """The allocation map of a chain's top (base first), with host offsets.

    ``pass_fds`` are inherited by qemu-img, for files named ``/dev/fd/N``.
    """
    return _run_map(chain_options(files), pass_fds)


def map_own(path: Path) -> list[HostExtent]:
    """What the qcow2 layer ``path`` itself allocates (data and zero clusters), with host offsets.

    Its backing chain is not opened (a deep chain costs ``qemu-img map`` most
    of its time); what the layer leaves to its backing files is left out of
    the list.  All extents are at depth 0.
    """
    opts = {"driver": "qcow2", "file": file_node(path), "backing": None}
    return [e for e in _run_map(opts, (), own=True) if e.depth >= 0]


def _run_map(opts: dict[str, Any], pass_fds: Sequence[int], *, own: bool = False) -> list[HostExtent]:
    proc = _subprocess(["qemu-img", "map", "--output=json", json_filename(opts)], pass_fds=pass_fds)
    if proc.returncode != 0:
        raise QemuError(f"qemu-img map failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return _host_extents(proc.stdout, own=own)


def _host_extents(text: str | bytes, *, own: bool = False) -> list[HostExtent]:
    """The extents of ``qemu-img map --output=json`` output (a JSON array of flat objects).

    With ``own`` (a layer mapped without its backing file), extents the layer
    does not allocate (``"present": false``) get depth -1.
    """
    try:
        return [
            HostExtent(
                int(e["start"]),
                int(e["length"]),
                -1 if own and not e["present"] else int(e["depth"]),
                bool(e["zero"]),
                bool(e["data"]),
                int(e["offset"]) if "offset" in e else None,
            )
            for e in json.loads(text)
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise QemuError(f"qemu-img map printed an unexpected map: {exc!r}") from exc


READ_MAP = 1 << 16  # bytes of map output parsed per read: about 500 extents, a few milliseconds


def split_map_output(buf: bytes) -> tuple[list[HostExtent], bytes]:
    """The complete extents at the start of a piece of ``qemu-img map --output=json`` output, and the rest.

    The objects are flat, so each complete one ends with the last brace so far.
    """
    end = buf.rfind(b"}") + 1
    return (_host_extents(b"[" + buf[:end].lstrip(b" \t\r\n[,") + b"]") if end else []), buf[end:]


class HostMap:
    """``qemu-img map`` of a chain's top (base first), with host offsets, running while the caller works.

    qemu prints into an unlinked temporary file, so it never waits for a
    reader; :meth:`read` returns the extents printed since the last call,
    in order.  ``pass_fds`` are inherited by qemu-img, for files named
    ``/dev/fd/N``.  :meth:`close` ends qemu-img if it still runs.
    """

    def __init__(self, files: Sequence[Path], *, pass_fds: Sequence[int] = ()) -> None:
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._pos = 0
        self._rest = b""
        self._ended = False
        self._deadline = time.monotonic() + QEMU_IMG_TIMEOUT
        args = ["qemu-img", "map", "--output=json", json_filename(chain_options(files))]
        try:
            self._proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, pass_fds=tuple(pass_fds)
            )
        except OSError as exc:
            self._out.close()
            self._err.close()
            raise QemuUnavailable(f"cannot run qemu-img: {exc.strerror}") from exc

    def read(self, *, wait: bool = False) -> list[HostExtent] | None:
        """The extents printed since the last call (maybe none); ``None`` once all have been read.

        With ``wait``, waits until qemu has printed some or has ended.
        Raises :class:`QemuError` when qemu-img fails.
        """
        while not self._ended:
            exited = self._proc.poll() is not None  # before the read: then the file holds all it printed
            data = os.pread(self._out.fileno(), READ_MAP, self._pos)
            if data:
                self._pos += len(data)
                extents = self._parse(data)
                if extents or not wait:
                    return extents
            elif exited:
                self._end()
            elif not wait:
                return []
            elif time.monotonic() > self._deadline:
                self.close()
                raise QemuError(f"qemu-img map did not finish in {QEMU_IMG_TIMEOUT:.0f} s (killed)")
            else:
                time.sleep(0.002)
        return None

    def _parse(self, data: bytes) -> list[HostExtent]:
        extents, self._rest = split_map_output(self._rest + data)
        return extents

    def _end(self) -> None:
        self._ended = True
        if self._proc.wait() != 0:
            self._err.seek(0)
            msg = self._err.read().decode(errors="replace").strip()
            if self._proc.returncode < 0:  # killed: says nothing of the chain
                raise QemuUnavailable(f"qemu-img map killed by signal {-self._proc.returncode}: {msg}")
            raise QemuError(f"qemu-img map failed (exit {self._proc.returncode}): {msg}")
        if self._rest.strip() != b"]":
            raise QemuError(f"qemu-img map printed an unexpected map: ends with {self._rest[-100:]!r}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if not self._out.closed:
            self._out.close()
            self._err.close()


def _daemon_env() -> dict[str, str]:
    """The daemon's environment: glibc keeps freed request buffers instead of unmapping them.

    qemu allocates a bounce buffer per NBD request; above glibc's mmap
    threshold every 4 MiB write cost a fresh mapping and ~1,000 page faults
    (measured: a third of the daemon's CPU time went to faults).
    """
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=67108864:glibc.malloc.trim_threshold=268435456")
    return env


DIR_PREFIX = "rbd2qcow2-qsd-"  # + the owner's pid + "-" + random: the daemon's sockets and log


def _remove_stale_dirs(tmp: Path) -> None:
    """Remove daemon directories left by processes that no longer exist (killed by SIGKILL, say).

    Only directories of this user named with a pid that is not running; a
    directory whose pid was reused by another process is left for later.
    """
    try:
        entries = list(os.scandir(tmp))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith(DIR_PREFIX):
            continue
        pid_text = name[len(DIR_PREFIX) :].partition("-")[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # SIGKILL, not SIGTERM: qemu handles SIGTERM in its main loop, which a stuck daemon never
    # runs, so it would outlive us holding its image locks; what it wrote is the commit protocol's.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class Export:
    """One NBD export of a storage daemon: connect to ``socket``, export ``name``."""

    name: str
    socket: Path
    node: str
    id: str


class StorageDaemon:
    """One ``qemu-storage-daemon``, controlled over QMP; a context manager.

    It can hold several exports at once.  The daemon is started with
    ``PR_SET_PDEATHSIG`` so it ends when this process dies, even by SIGKILL.
    """

    def __init__(self, nbd_socket: Path | None = None, root: Path | None = None) -> None:
        """``root``: the daemon's working directory, under which files are named relative to it."""
        _remove_stale_dirs(Path(tempfile.gettempdir()))
        self._root = root.absolute() if root is not None else None
        self._dir = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-"))
        os.chmod(self._dir, 0o700)
        self._qmp: QEMUMonitorProtocol | None = None
        self._listener: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._nbd_socket = nbd_socket or self._dir / "nbd.sock"
        self._ready = False
        self._failed: str | None = None  # why the daemon never came up: every later use says so
        self._count = 0
        self._expired: str | None = None  # the wait that ran out of time (the daemon was killed)
        self._lock = threading.Lock()

    def __enter__(self) -> StorageDaemon:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Spawn the daemon; it connects to our QMP socket, which :meth:`_connect` accepts on first use."""
        qmp_path = self._dir / "qmp.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(qmp_path))
            self._listener.listen(1)
        except OSError as exc:  # a socket path is at most 107 bytes: a long TMPDIR
            raise QemuUnavailable(f"cannot listen on the QMP socket {qmp_path}: {exc.strerror or exc}") from exc
        log = open(self._dir / "qsd.log", "wb")  # noqa: SIM115 - kept by the child
        with log:
            try:
                self._proc = subprocess.Popen(
                    [
                        "qemu-storage-daemon",
                        "--chardev",
                        f"socket,id=qmp0,path={qmp_path}",
                        "--monitor",
                        "chardev=qmp0",
                    ],
                    stdin=subprocess.DEVNULL,
                    cwd=self._root,
                    stdout=log,
                    stderr=log,
                    env=_daemon_env(),
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                raise QemuUnavailable(f"cannot start qemu-storage-daemon: {exc.strerror}") from exc

    def _connect(self) -> QEMUMonitorProtocol:
        """Accept the daemon's QMP connection and start its NBD server, on first use.

        :meth:`start` only spawns the process, so that the daemon boots while
        the caller does other work (connecting to Ceph).
        """
        if self._qmp is not None and self._ready:
            return self._qmp
        if self._failed is not None:
            raise self._start_failure(self._failed)
        if self._listener is None:
            raise QemuError("storage daemon not running")
        from qemu.qmp import QMPError
        from qemu.qmp.legacy import QEMUMonitorProtocol

        try:
            conn = self._accept()
            self._qmp = QEMUMonitorProtocol(conn)
            with self.bounded("the QMP greeting", QMP_TIMEOUT):
                self._qmp.connect()
        except QemuError as exc:
            self._failed = str(exc)
            raise self._start_failure(self._failed) from exc
        # qemu.qmp asserts its state when the daemon dies in the middle of the greeting: that too is a failed start.
        except (QMPError, OSError, TimeoutError, AssertionError) as exc:
            self._failed = f"qemu-storage-daemon did not connect to QMP: {exc!r} {self._log_tail()}"
            raise self._start_failure(self._failed) from exc
        finally:
            self._listener.close()
            self._listener = None
        self._ready = True
        self.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(self._nbd_socket)}})
        return self._qmp

    def _start_failure(self, message: str) -> QemuError:
        """A daemon that exited by itself before it spoke cannot run here (69); one killed by a
        signal, or still running, failed like any I/O (74)."""
        code = self._proc.poll() if self._proc is not None else None
        return QemuUnavailable(message) if code is not None and code >= 0 else QemuError(message)

    def _accept(self) -> socket.socket:
        """The daemon's connection to our QMP socket; fails at once if the daemon exits first."""
        assert self._listener is not None and self._proc is not None
        self._listener.settimeout(0.05)
        deadline = time.monotonic() + QMP_TIMEOUT
        while True:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                if self._proc.poll() is not None:
                    raise QemuUnavailable(
                        f"qemu-storage-daemon exited with status {self._proc.returncode}: {self._log_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise
                continue
            conn.settimeout(None)
            return conn

    def _log_tail(self) -> str:
        try:
            return (self._dir / "qsd.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @contextlib.contextmanager
    def bounded(self, what: str, seconds: float) -> Iterator[None]:
        """Run the body (a wait on the daemon) for at most ``seconds``; then kill the daemon.

        A daemon that stops answering (its main loop stuck) is killed, so the
        body's wait ends with an error (its connections close); that error
        becomes :class:`QemuError` naming ``what`` and the daemon's log.
        """
        if self._expired is not None:  # killed already: nothing to wait for
            yield
            return
        timer = threading.Timer(seconds, self._expire, (f"{what} did not finish in {seconds:.0f} s",))
        timer.daemon = True
        timer.start()
        try:
            yield
        except Exception as exc:
            if self._expired is not None:
                self.kill()  # reaped before the caller goes on
                raise QemuError(f"{self._expired}; qemu-storage-daemon killed. {self._log_tail()}") from exc
            raise
        finally:
            timer.cancel()
        if self._expired is not None:
            self.kill()
            raise QemuError(f"{self._expired}; qemu-storage-daemon killed. {self._log_tail()}")

    def _expire(self, why: str) -> None:
        with self._lock:
            if self._expired is None:
                self._expired = why
        logger.error("qemu-storage-daemon: %s; killing it", why)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the daemon now (a caller that gives up, a wait that ran out): its clients' requests fail at once."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(QUIT_TIMEOUT)

    def cmd(self, command: str, **args: Any) -> Any:
        from qemu.qmp import QMPError

        if self._expired is not None:
            raise QemuError(f"{self._expired}; qemu-storage-daemon was killed")
        qmp = self._connect()
        try:
            with self.bounded(f"QMP {command}", QMP_TIMEOUT):
                reply = qmp.cmd_raw(command, args or None)
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"QMP {command} failed: {exc!r} {self._log_tail()}") from exc
        if "error" in reply:
            raise QemuError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def export_chain(
        self,
        files: Sequence[Path],
        *,
        writable: bool,
        direct: bool = False,
        name: str | None = None,
        aio: str | None = None,
        direct_aio: str = "io_uring",
        preallocate: bool = False,
    ) -> Export:
        """Open a chain (base first) and export its top over NBD (options: :func:`chain_options`)."""
        self._count += 1
        node = f"n{self._count}"
        opts = chain_options(
            files,
            writable_top=writable,
            direct=direct,
            aio=aio,
            direct_aio=direct_aio,
            preallocate=preallocate,
            root=self._root,
        )
        opts["node-name"] = node
        self.cmd("blockdev-add", **opts)
        export_id = f"e{self._count}"
        # Without a name the export is named after its node: fewer bytes for the monitor to read.
        args: dict[str, Any] = {"type": "nbd", "id": export_id, "node-name": node}
        if name is not None:
            args["name"] = name
        if writable:
            args["writable"] = True
        try:
            self.cmd("block-export-add", **args)
        except QemuError:
            self.cmd("blockdev-del", **{"node-name": node})
            raise
        return Export(name=name or node, socket=self._nbd_socket, node=node, id=export_id)

    def export_for_reading(self, files: Sequence[Path]) -> Export:
        """A read-only export of a chain that is read whole (a restore): io_uring where qemu has it.

        With a thread pool qemu spends about a third more CPU on the same reads.
        """
        try:
            return self.export_chain(files, writable=False, aio="io_uring")
        except QemuError as exc:
            if "io_uring" not in str(exc):
                raise
            logger.info("io_uring not available (%s); reading with a thread pool", exc)
            return self.export_chain(files, writable=False)

    def commit(self, files: Sequence[Path], base: int, progress: Callable[[int], None] | None = None) -> None:
        """Write the layers above ``files[base]`` into it (QMP ``block-commit``), then close the chain.

        ``files[base]`` is the only node opened writable; the layers above it
        stay read-only and unchanged, and those below it are not opened.  qemu copies what the layers
        above the base allocate (zero clusters as zeros) and takes its image
        locks: the commit fails cleanly while any other process has a file of
        the chain open (:class:`~rbd2qcow2.core.errors.InUse`, raised before
        anything is written).  Returns once the job concluded and the nodes
        are closed (qemu flushes the base on close).
        """
        self._count += 1
        top = f"c{self._count}"
        base_node = f"{top}-base"
        if base >= len(files) - 1:
            raise ValueError("nothing to commit")
        for i, way in enumerate(COMMIT_WAYS):
            base_opts, top_opts = _commit_options(files, base, top, base_node, way)
            try:
                self._start_or_locked("blockdev-add", files, **base_opts)
                break
            except QemuError as exc:
                if isinstance(exc, InUse) or not self.alive or i == len(COMMIT_WAYS) - 1:
                    raise
                logger.info("cannot open the commit's base with %s (%s)", way, exc)
        try:
            self._start_or_locked("blockdev-add", files, **top_opts)
            try:
                job = f"{top}-job"
                self._start_or_locked(
                    "block-commit",
                    files,
                    **{"job-id": job, "device": top, "base-node": base_node, "auto-dismiss": False},
                )
                crashpoint("prune-during-commit")
                self._wait_job(job, progress)
            finally:
                self.cmd("blockdev-del", **{"node-name": top})
        finally:
            # Closing the base flushes it (and the filter cuts the file back to the end of its data).
            self.cmd("blockdev-del", **{"node-name": base_node})

    def _start_or_locked(self, command: str, files: Sequence[Path], **args: Any) -> None:
        """A command before a job writes anything: qemu's lock conflicts become :class:`InUse`."""
        try:
            self.cmd(command, **args)
        except QemuError as exc:
            # qemu: 'Failed to get "write" lock' (and 'Is another process using the image?').
            if "Failed to get" in str(exc) and "lock" in str(exc):
                names = ", ".join(p.name for p in files)
                raise InUse(f"another process has a file of the chain open ({names}): {exc}") from exc
            raise

    def _wait_job(self, job: str, progress: Callable[[int], None] | None) -> None:
        """Until the job concluded; a job without progress for :data:`JOB_STALL_TIMEOUT` is given up (daemon killed)."""
        done = 0
        moved = time.monotonic()
        while True:
            found = [j for j in self.cmd("query-jobs") if j.get("id") == job]
            if not found:
                raise QemuError(f"block job {job} vanished")
            status = found[0]
            current = int(status.get("current-progress", 0))
            if current > done:
                if progress is not None:
                    progress(current - done)
                done = current
                moved = time.monotonic()
            elif time.monotonic() - moved > JOB_STALL_TIMEOUT:
                self._expire(f"block job {job} made no progress in {JOB_STALL_TIMEOUT:.0f} s")
                raise QemuError(f"block job {job} made no progress in {JOB_STALL_TIMEOUT:.0f} s; daemon killed")
            if status["status"] == "ready":
                self.cmd("job-complete", id=job)
            elif status["status"] == "concluded":
                self.cmd("job-dismiss", id=job)
                if "error" in status:
                    raise QemuError(f"block job {job} failed: {status['error']}")
                return
            if not self.alive:
                raise QemuError(f"qemu-storage-daemon died during block job {job}: {self._log_tail()}")
            self._next_event(0.25)

    def _next_event(self, timeout: float) -> None:
        """Wait until qemu sends an event (a job changed state) or ``timeout`` passes."""
        import asyncio

        qmp = self._connect()
        with (
            self.bounded("waiting for a QMP event", timeout + QMP_TIMEOUT),
            contextlib.suppress(asyncio.TimeoutError, TimeoutError),
        ):
            qmp.pull_event(wait=timeout)

    def remove_export(self, export: Export) -> None:
        """Close an export and its nodes; waits until qemu has let go of the files."""
        self._delete_export(export.id)
        self._wait_export_deleted(export.id)
        self.cmd("blockdev-del", **{"node-name": export.node})

    def _delete_export(self, name: str) -> None:
        """``block-export-del``, waiting for our clients' disconnects to reach qemu.

        Callers flush and close their connections first; a client that is
        still connected after the grace period is cut off (mode ``hard``).
        """
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self.cmd("block-export-del", id=name)
                return
            except QemuError as exc:
                if "in use" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    logger.warning("export %s still has clients; disconnecting them", name)
                    self.cmd("block-export-del", id=name, mode="hard")
                    return
            time.sleep(0.01)

    def _wait_export_deleted(self, name: str) -> None:
        """Until qemu has deleted export ``name``: its ``BLOCK_EXPORT_DELETED`` event, or
        (no event within a quarter second) ``query-block-exports`` without it.

        Waiting for the event spares a command, which qemu's monitor reads a
        byte at a time, and consumes the events as they come: the client
        keeps every event it is not asked for, one per image of a run.
        """
        from qemu.qmp import QMPError

        qmp = self._connect()
        deadline = time.monotonic() + QMP_TIMEOUT
        ask_at = time.monotonic() + 0.25
        while time.monotonic() < deadline:
            try:
                with self.bounded(f"waiting for export {name} to close", QMP_TIMEOUT):
                    event = qmp.pull_event(wait=0.05)
            except TimeoutError:
                event = None
            except (QMPError, OSError) as exc:
                raise QemuError(f"waiting for export {name} to close: {exc!r} {self._log_tail()}") from exc
            if event is not None:
                if event.get("event") == "BLOCK_EXPORT_DELETED" and event.get("data", {}).get("id") == name:
                    return
            elif time.monotonic() >= ask_at:
                if not any(e.get("id") == name for e in self.cmd("query-block-exports")):
                    return
                ask_at = time.monotonic() + 0.25
        raise QemuError(f"export {name} was not deleted in time")

    def close(self) -> None:
        """Quit the daemon (QMP ``quit``, then SIGTERM, then SIGKILL), each wait bounded, and clean up."""
        if self._proc is not None and self._proc.poll() is None:
            if self._ready and self._expired is None:
                with contextlib.suppress(QemuError):
                    self.cmd("quit")
            else:
                self._proc.terminate()
            try:
                self._proc.wait(QUIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                logger.warning("qemu-storage-daemon did not quit in %.0f s; terminating it", QUIT_TIMEOUT)
                self._proc.terminate()
                try:
                    self._proc.wait(QUIT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
        if self._qmp is not None:
            with contextlib.suppress(Exception), self.bounded("closing the QMP connection", QMP_TIMEOUT):
                self._qmp.close()
            self._qmp = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid


@contextlib.contextmanager
def storage_daemon(nbd_socket: Path | None = None, root: Path | None = None) -> Iterator[StorageDaemon]:
    with StorageDaemon(nbd_socket, root) as daemon:
        yield daemon
