"""Every wait on qemu has a bound: a daemon that stops answering is killed and the wait fails (QemuError)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbd2qcow2.adapters import qemu
from rbd2qcow2.adapters.qemu import process, session
from rbd2qcow2.core.errors import QemuError
from rbd2qcow2.core.extents import Chunk, Kind
from rbd2qcow2.transfer.copier import Copier


@pytest.fixture
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where the daemon's code reads them.
    monkeypatch.setattr(session, "QMP_TIMEOUT", 1.0)
    monkeypatch.setattr(process, "QUIT_TIMEOUT", 1.0)


def test_a_command_to_a_stuck_daemon_fails_and_kills_it(short_waits: None) -> None:
    with qemu.storage_daemon() as daemon:
        assert daemon.cmd("query-block-exports") == []
        assert daemon.pid is not None
        os.kill(daemon.pid, signal.SIGSTOP)
        with pytest.raises(QemuError, match="did not finish in 1 s"):
            daemon.cmd("query-block-exports")
        assert not daemon.alive
        with pytest.raises(QemuError):
            daemon.cmd("query-block-exports")


def test_closing_a_stuck_daemon_is_bounded(short_waits: None) -> None:
    daemon = qemu.StorageDaemon()
    daemon.start()
    try:
        daemon.cmd("query-block-exports")
        assert daemon.pid is not None
        os.kill(daemon.pid, signal.SIGSTOP)
    finally:
        daemon.close()
    assert not daemon.alive


def test_export_removal_from_a_stuck_daemon_fails(short_waits: None, tmp_path: Path) -> None:
    layer = tmp_path / "l.qcow2"
    from rbd2qcow2.store import qcow2

    qcow2.create_layer(layer, 1 << 20, None)
    with qemu.storage_daemon() as daemon:
        export = daemon.export_chain([layer], writable=False)
        assert daemon.pid is not None
        os.kill(daemon.pid, signal.SIGSTOP)
        with pytest.raises(QemuError):
            daemon.remove_export(export)
        assert not daemon.alive


class _Stuck:
    """A reader whose reads never return until released (a daemon that stopped answering)."""

    def __init__(self) -> None:
        self.released = threading.Event()

    @contextlib.contextmanager
    def open(self) -> Iterator[_Stuck]:
        yield self

    def read_buffer(self, offset: int, length: int) -> bytes:
        if not self.released.wait(30):
            raise AssertionError("never released")
        raise OSError("connection closed")


class _Writes:
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise AssertionError("nothing to write")

    def zero(self, length: int, offset: int) -> None:
        pass

    def wait(self) -> None:
        pass


def test_copier_gives_up_on_a_stall_and_aborts() -> None:
    reader = _Stuck()
    copier = Copier(
        reader.open,
        _Writes(),
        readers=2,
        overwrite=False,
        progress=lambda n: None,
        abort=reader.released.set,
        stall_timeout=0.5,
    )
    with pytest.raises(QemuError, match="no data copied"):
        copier.run([Chunk(0, 65536, Kind.READ), Chunk(65536, 65536, Kind.READ)])
    assert reader.released.is_set()
