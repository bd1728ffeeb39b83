"""Test factories: manifest points and manifests, chains saved on disk, processes held at a stall point.

Pure and fast to import (no Ceph bindings), so that unit tests can use them.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any

from rbd2qcow2.core.faults import STALL_ENV, STALL_FILE_ENV, STALL_SECONDS_ENV
from rbd2qcow2.core.kinds import PointKind
from rbd2qcow2.core.names import ImageSpec, chain_relpath, snapshot_name
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.fsutil import make_dirs
from rbd2qcow2.store.layout import BLOCK_SIZE

TAG = "0123abcd"  # a target's tag
IMAGE = ImageSpec("rbd", "", "vm")
IMAGE_ID = "imgid"
STALL_WAIT = 60.0  # seconds a process gets to reach its stall point


def sums(point_id: str) -> mf.Checksums:
    """The record of ``point_id``'s checksum file (its digest a placeholder: nothing here reads the file)."""
    return mf.Checksums(f"{point_id}.sums", "xxh3-128", BLOCK_SIZE, "ab" * 32)


def point(
    point_id: str,
    parent: str | None = None,
    *,
    tag: str = TAG,
    snap_id: int = 7,
    with_sums: bool = False,
    **fields: Any,
) -> mf.Point:
    """A point taken from snapshot ``snap_id``: full without ``parent``, else incremental; with a checksum
    file record if ``with_sums``; ``fields`` override."""
    made = mf.Point(
        id=point_id,
        file=f"{point_id}.qcow2",
        parent=parent,
        created="2026-01-01T00:00:00+00:00",
        size=1 << 20,
        image_id=IMAGE_ID,
        snapshot=mf.Snapshot(snapshot_name(tag, point_id), snap_id),
        kind=PointKind.of(parent),
        stored_bytes=1000,
        data_bytes=2000,
        zero_bytes=3000,
        checksums=sums(point_id) if with_sums else None,
    )
    return dataclasses.replace(made, **fields)


def chain(*point_ids: str, **fields: Any) -> list[mf.Point]:
    """Points each on the one before, the first full; ``fields`` as for :func:`point`."""
    return [point(p, point_ids[i - 1] if i else None, **fields) for i, p in enumerate(point_ids)]


def manifest(
    *points: mf.Point,
    image: ImageSpec = IMAGE,
    image_id: str = IMAGE_ID,
    tag: str = TAG,
    pending: mf.PendingMerge | None = None,
    writing: tuple[str, ...] = (),
) -> mf.Manifest:
    return mf.Manifest(image, image_id, tag, tuple(points), pending, writing)


def save_chain(root: Path, m: mf.Manifest) -> Path:
    """The manifest saved in its chain directory under target ``root`` (made if missing); the directory."""
    directory = make_dirs(root, chain_relpath(m.image))
    mf.save(directory, m)
    return directory


def stall_env(point_name: str, stall: Path, seconds: float | None = None) -> dict[str, str]:
    """Environment that holds the CLI at fault point ``point_name``: it creates ``stall`` and sleeps there."""
    env = {STALL_ENV: point_name, STALL_FILE_ENV: str(stall)}
    if seconds is not None:
        env[STALL_SECONDS_ENV] = str(seconds)
    return env


def wait_stalled(proc: subprocess.Popen[Any], stall: Path, timeout: float = STALL_WAIT) -> bool:
    """Whether ``proc`` reached its stall point (``stall`` exists) while running, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not stall.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
