"""Merging a run of layers into their child, as a new file.

Dropping points ``L1..Lk`` (consecutive, oldest first) whose child is ``B``
means building a new layer ``N`` for ``B`` whose backing file is ``L1``'s
parent ``A`` (or none): ``N`` over ``A`` must read exactly like ``B`` over
``Lk..L1`` over ``A``.  The files of kept points are never written:

1. ``qemu-img map`` of ``B``'s chain says which layer serves each extent;
   everything served by ``B`` or a dropped layer is copied (data as data,
   zeros as WRITE_ZEROES), and so are the regions that read as zeros in
   ``B``'s view where ``A`` has data (a dropped layer that was shorter than
   ``A`` hides it).  The cost is the size of the merged layers' data, not
   of the image.
2. The copy goes through the same parallel pipeline as a backup (NBD read
   from a read-only export of ``B``'s chain, NBD write into ``N``), which
   records a checksum per written block.
3. ``N`` is checked (``qemu-img check``) and read back through its new
   chain; every written block must match the checksum taken from ``B``'s
   view, or the merge is abandoned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from . import manifest as mf
from . import names, qemu
from .chain import checked_chain
from .checksums import ALGORITHM, BLOCK_SIZE, OrderedWriter, block_records, read_records, unpack_records
from .errors import DataError
from .extents import Chunk, Extent, boundary_extent, plan
from .nbdio import Connection, ConnectionPool
from .pipeline import Stats, Transfer
from .progress import Progress

logger = logging.getLogger(__name__)
MERGE_SUFFIX = ".merge"
VERIFY_READ = 4 << 20


def merge_extents(view: Sequence[qemu.MapExtent], dropped: int, base: Sequence[qemu.MapExtent] | None) -> list[Extent]:
    """What the merged layer must hold (pure).

    ``view`` is the map of the child's chain (depth 0 = child, 1..``dropped``
    = the dropped layers); ``base`` the map of the new parent's chain, or
    None when the merged layer becomes a full base.
    """
    out: list[Extent] = []
    for e in view:
        if e.present and e.depth <= dropped:
            out.append(Extent(e.start, e.length, not e.zero))
        elif not e.present and base is not None:
            out += _masked(e, base)
    return out


def _masked(hole: qemu.MapExtent, base: Sequence[qemu.MapExtent]) -> list[Extent]:
    """Zero extents where ``hole`` (zeros in the child's view) overlaps data of the new parent."""
    end = hole.start + hole.length
    found = []
    for b in base:
        lo, hi = max(hole.start, b.start), min(end, b.start + b.length)
        if lo < hi and b.present and not b.zero:
            found.append(Extent(lo, hi - lo, False))
    return found


def merge_files(directory: Path, child: mf.Point) -> tuple[Path, Path]:
    """Where the merged layer and its checksums are built."""
    return (
        directory / (child.file + MERGE_SUFFIX),
        directory / (names.sums_file(child.id) + MERGE_SUFFIX),
    )


def build(
    directory: Path,
    m: mf.Manifest,
    drop: Sequence[str],
    child_id: str,
    daemon: qemu.StorageDaemon,
    *,
    parallel: int,
    progress: bool,
) -> mf.PendingMerge:
    """Build and verify the merged layer of ``child_id`` without ``drop``; return the journal entry."""
    child = m.point(child_id)
    first = m.point(drop[0])
    view_files = checked_chain(directory, m, child_id)
    parent_files = view_files[: -(len(drop) + 1)]
    parent = m.point(first.parent) if first.parent else None
    extents = merge_extents(
        qemu.map_chain(view_files), len(drop), qemu.map_chain(parent_files) if parent_files else None
    ) + boundary_extent(parent.size if parent else None, child.size)
    chunks = plan(extents, start=0, end=child.size)
    layer, sums_path = merge_files(directory, child)
    for stale in (layer, sums_path):
        stale.unlink(missing_ok=True)
    qemu.create_layer(layer, child.size, parent.file if parent else None)
    sums = OrderedWriter(sums_path)
    try:
        stats = _copy(daemon, view_files, [*parent_files, layer], chunks, sums, child, parallel, progress, parent)
        qemu.check_layer(layer)
        sha = sums.finish()
    except BaseException:
        sums.abort()
        layer.unlink(missing_ok=True)
        sums_path.unlink(missing_ok=True)
        raise
    _verify(daemon, [*parent_files, layer], sums_path, child.size)
    return mf.PendingMerge(
        child=child.id,
        drop=tuple(drop),
        checksums=mf.Checksums(names.sums_file(child.id), ALGORITHM, BLOCK_SIZE, sha),
        stored_bytes=layer.stat().st_blocks * 512,
        data_bytes=stats.data_bytes,
        zero_bytes=stats.zero_bytes,
    )


def _copy(
    daemon: qemu.StorageDaemon,
    view_files: list[Path],
    new_files: list[Path],
    chunks: list[Chunk],
    sums: OrderedWriter,
    child: mf.Point,
    parallel: int,
    progress: bool,
    parent: mf.Point | None,
) -> Stats:
    view = daemon.export_chain(view_files, writable=False)
    try:
        new = daemon.export_chain(new_files, writable=True)
        try:
            pool = ConnectionPool(new.socket, new.name, parallel)
            try:
                with Progress(f"merge into {child.id}", sum(c.length for c in chunks), enabled=progress) as bar:
                    stats = Transfer(
                        open_reader=lambda: Connection(view.socket, view.name),
                        sink=pool,
                        sums=sums,
                        size=child.size,
                        workers=parallel,
                        hide_zeros=parent is not None,
                        progress=bar.update,
                    ).run(chunks)
                pool.flush()
            finally:
                pool.close()
        finally:
            daemon.remove_export(new)
    finally:
        daemon.remove_export(view)
    return stats


def _verify(daemon: qemu.StorageDaemon, files: list[Path], sums_path: Path, size: int) -> None:
    """Read back every block the merge wrote, through the new chain, against its checksum."""
    export = daemon.export_chain(files, writable=False)
    try:
        with Connection(export.socket, export.name) as conn:
            run: list[tuple[int, bytes]] = []
            for index, digest in read_records(sums_path):
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
