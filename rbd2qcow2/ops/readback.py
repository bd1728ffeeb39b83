"""Reading back a merge's blocks, through the new chain, against the checksums it recorded.

Every block a merge wrote lies in the merged layer: its L2 tables (or
``qemu-img map``) say where each of its clusters lies in which file.  Blocks
stored as data are read from the files directly, in runs of blocks that lie
one after another, and hashed; blocks stored as zero clusters must have been
recorded as zeros; anything else (a block the layer leaves to its backing
files, a compressed cluster, a block split between extents) is read through
a qemu NBD export of the whole chain.  Any difference abandons the merge
(:class:`DataError`).
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import qemu
from ..core.errors import DataError
from ..core.threads import Background
from ..store.checksums import block_records, digest, unpack_records, zero_digest
from ..store.fsutil import open_regular
from ..store.layout import BLOCK_SIZE
from ..store.qcow2 import host_clusters

if TYPE_CHECKING:
    from ..adapters.nbdio import Connection

logger = logging.getLogger(__name__)
VERIFY_READ = 4 << 20  # bytes of one read of stored blocks, and of one NBD read


@dataclass
class ReadBack:
    """How to read back a merge's blocks: from layer files where qemu names a host offset (pure plan)."""

    host: list[tuple[int, int, list[tuple[int, bytes]]]] = field(default_factory=list)  # layer, offset, records
    zeros: list[tuple[int, bytes]] = field(default_factory=list)  # blocks qemu reports as zeros
    qemu: list[tuple[int, bytes]] = field(default_factory=list)  # anything else: read through qemu


def plan_read_back(
    extents: Sequence[qemu.HostExtent], records: Iterable[tuple[int, bytes]], size: int, layers: int
) -> ReadBack:
    """Where each recorded block lies in the chain of ``layers`` files, by qemu's map (sorted by start).

    The blocks found in layer files are grouped in the order they lie in
    the files: a run is blocks stored one after another, whatever their
    virtual offsets (a commit appends the clusters it allocates), read with
    one request of at most ``VERIFY_READ`` bytes.
    """
    plan = ReadBack()
    found: list[tuple[int, int, int, bytes]] = []  # layer, host offset, index, digest
    i = 0
    for index, dig in records:
        start = index * BLOCK_SIZE
        end = min(start + BLOCK_SIZE, size)
        while i < len(extents) and extents[i].start + extents[i].length <= start:
            i += 1
        e = extents[i] if i < len(extents) else None
        if e is None or not (e.start <= start and end <= e.start + e.length):
            plan.qemu.append((index, dig))  # split between extents or left out of the map
        elif e.zero:
            plan.zeros.append((index, dig))
        elif e.data and e.offset is not None and 0 <= e.depth < layers:
            found.append((layers - 1 - e.depth, e.offset + start - e.start, index, dig))
        else:
            plan.qemu.append((index, dig))
    found.sort()
    for layer, offset, index, dig in found:
        last = plan.host[-1] if plan.host else None
        if (
            last is not None
            and last[0] == layer
            and last[1] + len(last[2]) * BLOCK_SIZE == offset
            and len(last[2]) * BLOCK_SIZE < VERIFY_READ
        ):
            last[2].append((index, dig))
        else:
            plan.host.append((layer, offset, [(index, dig)]))
    return plan


def read_back(daemon: qemu.StorageDaemon, files: list[Path], records: Iterable[tuple[int, bytes]], size: int) -> None:
    """Read back every block the merge wrote, through the new chain, against its checksum.

    Every block the merge wrote lies in the merged layer, the top of
    ``files``: its L2 tables (or qemu) say where each of its clusters lies;
    blocks it holds as data are hashed from the file, blocks it holds as zero
    clusters must have been recorded as zeros, and anything else (a block the
    layer leaves to its backing files, a compressed cluster, a block split
    between extents) is read through a qemu NBD export of the whole chain.
    """
    plan = plan_read_back(own_extents(files[-1]), records, size, len(files))
    for index, dig in plan.zeros:
        if dig != zero_digest(min(BLOCK_SIZE, size - index * BLOCK_SIZE)):
            raise DataError(f"merged layer reads zeros at offset {index * BLOCK_SIZE}; merge abandoned")
    fds: dict[int, int] = {}
    direct = all(offset % DIRECT_ALIGN == 0 for _, offset, _ in plan.host)
    try:
        for layer, _, _ in plan.host:
            if layer not in fds:
                fds[layer] = open_for_read_back(files[layer], direct=direct)
        lanes = [
            Background(functools.partial(_read_runs, fds, plan.host[k::VERIFY_THREADS], size), f"read-back-{k}")
            for k in range(VERIFY_THREADS)
        ]
        if (error := settle(lanes)) is not None:
            raise error
    finally:  # after every lane has finished: none reads a descriptor closed here
        for fd in fds.values():
            os.close(fd)
    if plan.qemu:
        _verify_nbd(daemon, files, plan.qemu, size)


VERIFY_THREADS = 2  # the reads and the hashing of one thread overlap the other's


def settle(lanes: Sequence[Background[Any]]) -> BaseException | None:
    """Wait for every lane; the first one's failure (in order), if any failed."""
    first: BaseException | None = None
    for lane in lanes:
        try:
            lane.result()
        except BaseException as exc:  # every lane is waited for before any failure is raised
            first = first or exc
    return first


DIRECT_ALIGN = 4096  # offsets and lengths of O_DIRECT reads: a multiple of any disk's logical block


def open_for_read_back(path: Path, *, direct: bool) -> int:
    """A descriptor that reads ``path`` with O_DIRECT where its file system allows it, else through the cache.

    O_DIRECT reads what the disk holds, not a cached copy, and fills no
    page-cache pages with data that is read once: filling them costs more
    CPU than the reads themselves.
    """
    if direct:
        try:
            return open_regular(path, os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # tmpfs before Linux 6.6, some FUSE file systems
                raise
    return open_regular(path)


def _read_runs(fds: dict[int, int], runs: list[tuple[int, int, list[tuple[int, bytes]]]], size: int) -> None:
    """Read runs of stored blocks (layer, host offset, blocks) and check each block.

    Lengths are rounded up to ``DIRECT_ALIGN`` into a page-aligned buffer
    (what O_DIRECT asks); only the blocks' own bytes are checked.
    """
    # Freed by the garbage collector, not closed here: closing it while an error's
    # traceback still holds a view of it would replace that error with a BufferError.
    whole = memoryview(mmap.mmap(-1, VERIFY_READ))
    for layer, offset, run in runs:
        tail = min(BLOCK_SIZE, size - run[-1][0] * BLOCK_SIZE)
        length = (len(run) - 1) * BLOCK_SIZE + tail
        rounded = min(-(-length // DIRECT_ALIGN) * DIRECT_ALIGN, VERIFY_READ)
        if os.preadv(fds[layer], [whole[:rounded]], offset) < length:
            raise DataError(
                f"merged layer is shorter than qemu maps it near offset {run[0][0] * BLOCK_SIZE}; merge abandoned"
            )
        _check_run(whole[:length], run, size)


def own_extents(path: Path) -> list[qemu.HostExtent]:
    """Where the layer ``path`` keeps its own clusters: from its L2 tables, else by ``qemu-img map``.

    The tables are read directly because that is much cheaper than starting
    ``qemu-img``; the map remains for layers whose tables this module cannot read.
    """
    runs = host_clusters(path)
    if runs is None:
        logger.info("%s: cluster map read by qemu-img map", path.name)
        return qemu.map_own(path)
    return [qemu.HostExtent(start, length, 0, zero, not zero, host) for start, length, zero, host in runs]


def _check_run(data: memoryview, run: list[tuple[int, bytes]], size: int) -> None:
    """Blocks stored one after another in ``data``: block k at ``k * BLOCK_SIZE``."""
    for pos, (index, dig) in zip(range(0, len(run) * BLOCK_SIZE, BLOCK_SIZE), run, strict=True):
        if digest(data[pos : pos + min(BLOCK_SIZE, size - index * BLOCK_SIZE)]) != dig:
            raise DataError(
                f"merged layer does not read back as written at offset {index * BLOCK_SIZE}; merge abandoned"
            )


def _verify_nbd(daemon: qemu.StorageDaemon, files: list[Path], records: Iterable[tuple[int, bytes]], size: int) -> None:
    from ..adapters.nbdio import Connection

    export = daemon.export_chain(files, writable=False)
    try:
        with Connection(export.socket, export.name) as conn:
            run: list[tuple[int, bytes]] = []
            for index, digest in records:
                if run and (index != run[-1][0] + 1 or len(run) * BLOCK_SIZE >= VERIFY_READ):
                    _verify_run(conn, run, size)
                    run = []
                run.append((index, digest))
            if run:
                _verify_run(conn, run, size)
    finally:
        daemon.remove_export(export)


def _verify_run(conn: Connection, run: list[tuple[int, bytes]], size: int) -> None:
    offset = run[0][0] * BLOCK_SIZE
    length = min(len(run) * BLOCK_SIZE, size - offset)
    records, _ = block_records(offset, conn.pread(length, offset))
    if unpack_records(records) != run:
        raise DataError(f"merged layer does not read back as written near offset {offset}; merge abandoned")
