"""qemu's preallocate filter on a target with little room: it leaves room beside the layer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import loopfs
import pytest

from rbd2qcow2.adapters import qemu
from rbd2qcow2.adapters.nbdio import Connection
from rbd2qcow2.store import qcow2

MiB = 1 << 20


class Statvfs:
    def __init__(self, free: int) -> None:
        self.f_bavail = free // 4096
        self.f_frsize = 4096


@pytest.mark.parametrize(
    ("free", "expected"),
    [
        (1 << 40, {"driver": "preallocate", "file": {"x": 1}}),  # qemu's default: 128 MiB at a time
        (100 * MiB, {"driver": "preallocate", "file": {"x": 1}, "prealloc-size": 25 * MiB}),
        (4 * MiB + 4096, {"driver": "preallocate", "file": {"x": 1}, "prealloc-size": MiB}),
        (3 * MiB, {"x": 1}),  # nearly full: no filter
    ],
)
def test_preallocation_takes_a_quarter_of_the_free_space(
    monkeypatch: pytest.MonkeyPatch, free: int, expected: dict[str, Any]
) -> None:
    monkeypatch.setattr(os, "statvfs", lambda _path: Statvfs(free))
    assert qemu.preallocate_node({"x": 1}, Path("/t/a.qcow2")) == expected


def test_a_layer_being_written_leaves_room_for_its_checksums(tmp_path: Path) -> None:
    """On ext4 with less free than the filter's 128 MiB, the extension took all there was."""
    with loopfs.mounted("ext4", tmp_path) as mnt:
        layer = mnt / "layer.qcow2"
        qcow2.create_layer(layer, 16 * MiB, None)
        with qemu.storage_daemon() as daemon:
            export = daemon.export_chain([layer], writable=True, preallocate=True)
            try:
                with Connection(export.socket, export.name) as conn:
                    conn.pwrite(b"\x5a" * MiB, 0)
                    conn.flush()
                    (mnt / "beside.sums").write_bytes(bytes(4 * MiB))
            finally:
                daemon.remove_export(export)
        assert layer.stat().st_size < 4 * MiB  # cut back to its data when closed
