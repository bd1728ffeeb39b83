"""A qemu-storage-daemon and its QMP monitor: commands, events, and a bound on every wait.

qemu.qmp (and asyncio under it) is imported on a daemon's first command,
while the daemon boots: the commands that only run qemu-img (list, verify,
file restores) never pay for importing it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from ...core.errors import InUse, QemuError, QemuUnavailable
from . import process

if TYPE_CHECKING:
    from qemu.qmp.legacy import QEMUMonitorProtocol

logger = logging.getLogger(__name__)

QMP_TIMEOUT = 30.0  # seconds for the daemon's start and for one QMP command


class QmpSession:
    """One ``qemu-storage-daemon``, controlled over QMP; a context manager.

    The daemon is started with ``PR_SET_PDEATHSIG`` so it ends when this
    process dies, even by SIGKILL.
    """

    def __init__(self, nbd_socket: Path | None = None, root: Path | None = None) -> None:
        """``root``: the daemon's working directory, under which files are named relative to it."""
        process.remove_stale_dirs(Path(tempfile.gettempdir()))
        self._root = root.absolute() if root is not None else None
        # The daemon's own directory (its sockets and log), named with its owner's pid; removed at close.
        self.directory = Path(tempfile.mkdtemp(prefix=f"{process.DIR_PREFIX}{os.getpid()}-"))
        os.chmod(self.directory, 0o700)
        self._qmp: QEMUMonitorProtocol | None = None
        self._listener: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._nbd_socket = nbd_socket or self.directory / "nbd.sock"
        self._ready = False
        self._failed: str | None = None  # why the daemon never came up: every later use says so
        self._expired: str | None = None  # the wait that ran out of time (the daemon was killed)
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def nbd_socket(self) -> Path:
        """Where the daemon's NBD server listens."""
        return self._nbd_socket

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Spawn the daemon; it connects to our QMP socket, which :meth:`_connect` accepts on first use."""
        qmp_path = self.directory / "qmp.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(qmp_path))
            self._listener.listen(1)
        except OSError as exc:  # a socket path is at most 107 bytes: a long TMPDIR
            raise QemuUnavailable(f"cannot listen on the QMP socket {qmp_path}: {exc.strerror or exc}") from exc
        self._proc = process.spawn(qmp_path, self._root, self.directory / "qsd.log")

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
            self._failed = f"qemu-storage-daemon did not connect to QMP: {exc!r} {self.log_tail()}"
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
                        f"qemu-storage-daemon exited with status {self._proc.returncode}: {self.log_tail()}"
                    ) from None
                if time.monotonic() > deadline:
                    raise
                continue
            conn.settimeout(None)
            return conn

    def log_tail(self) -> str:
        """The end of the daemon's own log (its stdout and stderr), for error messages."""
        try:
            return (self.directory / "qsd.log").read_text(errors="replace")[-2000:]
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
        timer = threading.Timer(seconds, self.expire, (f"{what} did not finish in {seconds:.0f} s",))
        timer.daemon = True
        timer.start()
        try:
            yield
        except Exception as exc:
            if self._expired is not None:
                self.kill()  # reaped before the caller goes on
                raise QemuError(f"{self._expired}; qemu-storage-daemon killed. {self.log_tail()}") from exc
            raise
        finally:
            timer.cancel()
        if self._expired is not None:
            self.kill()
            raise QemuError(f"{self._expired}; qemu-storage-daemon killed. {self.log_tail()}")

    def expire(self, why: str) -> None:
        """Give the daemon up (a wait on it ran out of time): kill it; every later command fails with ``why``."""
        with self._lock:
            if self._expired is None:
                self._expired = why
        logger.error("qemu-storage-daemon: %s; killing it", why)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the daemon now (a caller that gives up, a wait that ran out): its clients' requests fail at once."""
        process.kill(self._proc)

    def cmd(self, command: str, **args: Any) -> Any:
        """One QMP command and its return value; :class:`QemuError` with qemu's message when it fails."""
        from qemu.qmp import QMPError

        if self._expired is not None:
            raise QemuError(f"{self._expired}; qemu-storage-daemon was killed")
        qmp = self._connect()
        try:
            with self.bounded(f"QMP {command}", QMP_TIMEOUT):
                reply = qmp.cmd_raw(command, args or None)
        except (QMPError, OSError, EOFError) as exc:
            raise QemuError(f"QMP {command} failed: {exc!r} {self.log_tail()}") from exc
        if "error" in reply:
            raise QemuError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def cmd_or_in_use(self, command: str, files: Sequence[Path], **args: Any) -> None:
        """A command before a job writes anything: qemu's lock conflicts on ``files`` become :class:`InUse`."""
        try:
            self.cmd(command, **args)
        except QemuError as exc:
            # qemu: 'Failed to get "write" lock' (and 'Is another process using the image?').
            if "Failed to get" in str(exc) and "lock" in str(exc):
                names = ", ".join(p.name for p in files)
                raise InUse(f"another process has a file of the chain open ({names}): {exc}") from exc
            raise

    def next_event(self, timeout: float) -> None:
        """Wait until qemu sends an event (a job changed state) or ``timeout`` passes."""
        import asyncio

        qmp = self._connect()
        with (
            self.bounded("waiting for a QMP event", timeout + QMP_TIMEOUT),
            contextlib.suppress(asyncio.TimeoutError, TimeoutError),
        ):
            qmp.pull_event(wait=timeout)

    def pull_event(self, what: str, wait: float) -> dict[str, Any] | None:
        """The next event qemu sends within ``wait`` seconds (it is consumed), or None; ``what`` names the wait."""
        from qemu.qmp import QMPError

        qmp = self._connect()
        try:
            with self.bounded(what, QMP_TIMEOUT):
                event: dict[str, Any] | None = qmp.pull_event(wait=wait)
                return event
        except TimeoutError:
            return None
        except (QMPError, OSError) as exc:
            raise QemuError(f"{what}: {exc!r} {self.log_tail()}") from exc

    def pending_events(self) -> list[dict[str, Any]]:
        """The events qemu sent that no wait has consumed (they are kept until then)."""
        return list(self._connect().get_events(wait=False))

    def close(self) -> None:
        """Quit the daemon (QMP ``quit``, then SIGTERM, then SIGKILL), each wait bounded, and clean up."""
        if self._proc is not None:
            process.end(self._proc, self._quit if self._ready and self._expired is None else None)
        if self._qmp is not None:
            with contextlib.suppress(Exception), self.bounded("closing the QMP connection", QMP_TIMEOUT):
                self._qmp.close()
            self._qmp = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _quit(self) -> None:
        with contextlib.suppress(QemuError):
            self.cmd("quit")
