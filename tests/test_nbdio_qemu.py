"""The NBD connection pool against a real qemu-storage-daemon export."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from rbd2qcow2.adapters import qemu
from rbd2qcow2.adapters.nbdio import Connection, ConnectionPool
from rbd2qcow2.core.errors import NbdError
from rbd2qcow2.store import qcow2

MiB = 1 << 20


def test_connections_open_per_thread_on_demand_and_every_write_lands(tmp_path: Path) -> None:
    layer = tmp_path / "layer.qcow2"
    qcow2.create_layer(layer, 16 * MiB, None)
    data = [os.urandom(MiB) for _ in range(4)]
    with qemu.storage_daemon() as daemon:
        export = daemon.export_chain([layer], writable=True)
        try:
            pool = ConnectionPool(export.socket, export.name, 3)
            assert pool.multi  # qemu-storage-daemon advertises multi-conn on writable exports
            assert len(pool.conns) == 1  # nothing opened before a thread asks
            used: list[Connection] = []

            def write(i: int) -> None:
                conn = pool.for_thread()
                used.append(conn)
                conn.pwrite(data[i], i * 2 * MiB)

            threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            pool.flush()
            assert len(pool.conns) == 3  # one per thread, never more than ``workers``
            assert len({id(c) for c in used}) == len(pool.conns)
            pool.close()
            with Connection(export.socket, export.name) as reader:
                for i in range(4):
                    assert reader.pread(MiB, i * 2 * MiB) == data[i]
        finally:
            daemon.remove_export(export)


def test_writes_keep_no_memory(tmp_path: Path) -> None:
    """What a connection writes is not kept, one by one or in flight together.

    libnbd 1.14's Python binding never frees a buffer that went through
    aio_pwrite: write_many must reuse its own.
    """
    layer = tmp_path / "layer.qcow2"
    qcow2.create_layer(layer, 512 * MiB, None)

    def rss_mib() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) // 1024

    with qemu.storage_daemon() as daemon:
        export = daemon.export_chain([layer], writable=True)
        try:
            pool = ConnectionPool(export.socket, export.name, 2)
            data = os.urandom(4 * MiB)
            before = rss_mib()
            for i in range(64):  # 256 MiB one by one
                pool.for_thread().pwrite(memoryview(bytearray(data)), i * 4 * MiB)
            for i in range(64, 128):  # 256 MiB as 64 KiB blocks in flight together
                view = memoryview(bytearray(data))
                blocks: list[tuple[int, memoryview | int]] = [
                    (i * 4 * MiB + o, view[o : o + 65536]) for o in range(0, 4 * MiB, 65536)
                ]
                pool.for_thread().write_many(blocks)
            pool.flush()
            assert rss_mib() - before < 64
            pool.close()
        finally:
            daemon.remove_export(export)


def test_write_many_lands_every_write_and_reports_a_failure_after_the_rest(tmp_path: Path) -> None:
    base, layer = tmp_path / "base.qcow2", tmp_path / "layer.qcow2"
    qcow2.create_layer(base, 8 * MiB, None)
    qcow2.create_layer(layer, 8 * MiB, base.name)
    old = os.urandom(8 * MiB)
    with qemu.storage_daemon() as daemon:
        export = daemon.export_chain([base], writable=True)
        with Connection(export.socket, export.name) as conn:
            conn.pwrite(old, 0)
            conn.flush()
        daemon.remove_export(export)
        export = daemon.export_chain([base, layer], writable=True, direct=True, direct_aio="native")
        try:
            blocks = {i * 65536: os.urandom(65536) for i in range(0, 128, 3)}
            zeros = {i * 65536 + 4 * MiB: 65536 * 2 for i in range(0, 40, 5)}
            writes: list[tuple[int, memoryview | int]] = [(o, memoryview(d)) for o, d in blocks.items()]
            writes += list(zeros.items())
            with Connection(export.socket, export.name) as conn:
                conn.write_many(writes)
                expected = bytearray(old)
                for o, d in blocks.items():
                    expected[o : o + len(d)] = d
                for o, n in zeros.items():
                    expected[o : o + n] = bytes(n)
                assert conn.pread(8 * MiB, 0) == expected
                # A request past the end fails once those sent before it completed.
                late = os.urandom(65536)
                try:
                    conn.write_many([(MiB, memoryview(late)), (8 * MiB, memoryview(late))])
                except NbdError as exc:
                    assert str(8 * MiB) in str(exc)
                else:
                    raise AssertionError("a write past the end was not reported")
                assert conn.pread(65536, MiB) == late  # the connection goes on
                conn.flush()
        finally:
            daemon.remove_export(export)


def test_preallocated_layer_grows_ahead_and_is_cut_back_on_close(tmp_path: Path) -> None:
    """With the preallocate filter the file runs ahead of the writes while the export is open
    and ends at its last cluster once it is closed; the layer reads back and checks clean."""
    layer = tmp_path / "layer.qcow2"
    qcow2.create_layer(layer, 1024 * MiB, None)
    blocks = {i * 3 * MiB: os.urandom(64 * 1024) for i in range(40)}
    with qemu.storage_daemon() as daemon:
        export = daemon.export_chain([layer], writable=True, direct=True, direct_aio="native", preallocate=True)
        try:
            with Connection(export.socket, export.name) as conn:
                conn.write_many([(offset, memoryview(data)) for offset, data in blocks.items()])
                conn.flush()
            assert layer.stat().st_size >= qemu.PREALLOCATE_SIZE
        finally:
            daemon.remove_export(export)
        report = qemu.check_layer(layer)
        assert layer.stat().st_size == report["image-end-offset"] < qemu.PREALLOCATE_SIZE
        assert not report.get("leaks") and not report.get("corruptions")
        export = daemon.export_chain([layer], writable=False)
        try:
            with Connection(export.socket, export.name) as conn:
                for offset, data in blocks.items():
                    assert conn.pread(len(data), offset) == data
        finally:
            daemon.remove_export(export)


def test_removing_exports_leaves_no_events_behind(tmp_path: Path) -> None:
    """Each removal waits for qemu's BLOCK_EXPORT_DELETED and consumes it: over a run of
    thousands of images, the QMP client keeps nothing."""
    layer = tmp_path / "layer.qcow2"
    qcow2.create_layer(layer, 16 * MiB, None)
    with qemu.storage_daemon() as daemon:
        for _ in range(20):
            export = daemon.export_chain([layer], writable=True)
            with Connection(export.socket, export.name) as conn:
                conn.pwrite(b"x" * 4096, 0)
                conn.flush()
            daemon.remove_export(export)
            assert daemon.cmd("query-block-exports") == []
        assert daemon.pending_events() == []
