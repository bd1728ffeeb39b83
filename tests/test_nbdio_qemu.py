"""The NBD connection pool against a real qemu-storage-daemon export."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from rbd2qcow2 import qcow2, qemu
from rbd2qcow2.nbdio import Connection, ConnectionPool

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
    """What a connection writes is not kept (libnbd 1.14's aio_pwrite keeps every buffer: not used)."""
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
            for i in range(128):  # 512 MiB
                pool.for_thread().pwrite(memoryview(bytearray(data)), i * 4 * MiB)
            pool.flush()
            assert rss_mib() - before < 64
            pool.close()
        finally:
            daemon.remove_export(export)
