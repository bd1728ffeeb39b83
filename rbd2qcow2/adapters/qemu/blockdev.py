"""Blockdev options: how qemu is told to open a layer, a chain, or a commit's nodes (pure but for ``statvfs``).

Every node names its driver, and a chain ends in ``"backing": null``, so qemu
never follows a backing file name written in a header.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

PREALLOCATE_SIZE = 128 << 20  # how far qemu's preallocate filter extends a layer file at a time (its default)
PREALLOCATE_ALIGN = 1 << 20  # the filter's prealloc-align default


def file_node(
    filename: Path | str, *, aio: str | None = None, direct: bool = False, read_only: bool = False
) -> dict[str, Any]:
    """A ``file`` node: ``aio`` ("io_uring", or None for qemu's thread pool), O_DIRECT with ``direct``."""
    node: dict[str, Any] = {"driver": "file", "filename": str(filename)}
    if aio is not None:
        node["aio"] = aio
    if direct:
        node["cache"] = {"direct": True}
    if read_only:
        node["read-only"] = True
    return node


def layer_alone(path: Path) -> dict[str, Any]:
    """One qcow2 layer opened read-only without its backing file (a check, or a map of what it allocates)."""
    return {"driver": "qcow2", "file": file_node(path, read_only=True), "backing": None}


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
    time, which the filter spares all but one write in ``PREALLOCATE_SIZE``.

    The options are as short as they can be: qemu's QMP monitor reads its
    input one byte per system call, so every byte costs the daemon CPU.
    ``read-only`` is given on the top alone (qemu opens backing nodes
    read-only, and a node's file as its node), and file names are relative
    to ``root``, the daemon's working directory.
    """
    opts: dict[str, Any] | None = None
    for i, path in enumerate(files):
        top = i == len(files) - 1
        writable = top and writable_top
        if writable:
            file = file_node(daemon_name(path, root), aio=direct_aio if direct else None, direct=direct)
            if preallocate:
                file = preallocate_node(file, path)
        else:
            file = file_node(daemon_name(path, root), aio=aio)
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
# filled, which would cost more than the I/O.  The preallocate filter extends
# the file ahead of the writes, which land past its end one cluster at a time
# (an O_DIRECT write that extends a file waits for the disk on ext4).
# Buffered, io_uring: from qemu's thread pool, buffered writes contend for the
# file's lock.  The thread pool is the last resort.
COMMIT_WAYS = (
    CommitWay("io_uring", True, True),
    CommitWay("io_uring", True, False),
    CommitWay("io_uring", False, False),
    CommitWay(None, False, False),
)


def commit_options(
    files: Sequence[Path], base: int, top: str, base_node: str, way: CommitWay
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Blockdev options for a commit into ``files[base]``: the base node alone, then the layers above it.

    The base is the only node opened writable, with ``"backing": null``;
    the layers above it are opened read-only, the lowest of them backed by
    the base node (named ``base_node``).  The commit copies what those
    layers allocate, whole clusters, and never reads below the base, so the
    layers below it are not opened at all.  A process reading a chain that
    the commit changes has the base open, so qemu's lock on it still refuses
    the commit.  The base is added on its own because qemu did not open a
    filter node inside a backing node's options.
    """
    file = file_node(files[base], aio=way.aio, direct=way.direct)
    if way.preallocate:
        file = preallocate_node(file, files[base])
    base_opts: dict[str, Any] = {"driver": "qcow2", "node-name": base_node, "file": file, "backing": None}
    opts: Any = base_node
    for path in files[base + 1 :]:
        opts = {"driver": "qcow2", "file": file_node(path, read_only=True), "backing": opts, "read-only": True}
    opts["node-name"] = top
    return base_opts, opts


def json_filename(opts: dict[str, Any]) -> str:
    """A ``json:`` pseudo file name: how qemu-img is given explicit blockdev options."""
    return "json:" + json.dumps(opts)
