"""Fault tier, component level: EIO from the target under qemu, through qemu's ``blkdebug`` driver.

The daemon opens our files itself, so the CLI has no place to put a
blkdebug node; here the layer is exported as the backup exports it
(:func:`rbd2qcow2.adapters.qemu.chain_options`) with a blkdebug node between qcow2
and the file, and the writer (:mod:`rbd2qcow2.adapters.nbdio`) must see the error:
a write or flush that failed on the target is never reported as done.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faultlib as fl
import pytest

from rbd2qcow2.adapters import qemu
from rbd2qcow2.adapters.nbdio import Connection
from rbd2qcow2.core.errors import NbdError
from rbd2qcow2.store import qcow2

pytestmark = pytest.mark.faults

MiB = 1 << 20


def export_with_blkdebug(daemon: qemu.StorageDaemon, layer: Path, config: Path) -> qemu.Export:
    opts: dict[str, Any] = qemu.chain_options([layer], writable_top=True)
    opts["file"] = {"driver": "blkdebug", "config": str(config), "image": opts["file"]}
    opts["node-name"] = "faulty"
    daemon.cmd("blockdev-add", **opts)
    daemon.cmd("block-export-add", type="nbd", id="e-faulty", **{"node-name": "faulty"}, writable=True)
    return qemu.Export(name="faulty", socket=daemon.nbd_socket, node="faulty", id="e-faulty")


@pytest.mark.parametrize("event", ["write_aio", "flush_to_disk", "l2_update"])
def test_eio_on_the_target_reaches_the_writer(tmp_path: Path, event: str) -> None:
    layer = tmp_path / "layer.qcow2"
    qcow2.create_layer(layer, 16 * MiB, None)
    config = tmp_path / "blkdebug.conf"
    config.write_text(f'[inject-error]\nevent = "{event}"\nerrno = "5"\nonce = "on"\n')
    data = os.urandom(MiB)
    failed = ""
    with qemu.storage_daemon() as daemon:
        export = export_with_blkdebug(daemon, layer, config)
        try:
            with Connection(export.socket, export.name) as conn:
                try:
                    conn.pwrite(data, 0)
                    conn.pwrite(data, 4 * MiB)
                    conn.flush()
                except NbdError as exc:
                    failed = str(exc)
        finally:
            daemon.remove_export(export)
    fl.TABLE.add(
        f"EIO (blkdebug) on {event}", "write through qemu-storage-daemon", failed[:60] or "not reported", bool(failed)
    )
    assert failed, f"an EIO on {event} was never reported to the writer"
