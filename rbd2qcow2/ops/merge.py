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
   chain (:mod:`rbd2qcow2.ops.readback`); every written block must match
   the checksum taken from ``B``'s view, or the merge is abandoned.

That is the general method (``copy``).  When ``L1..Lk`` and ``B`` all have
the same virtual size, the usual case, and ``L1``'s file has no other hard
link, a cheaper one applies (``commit``):
qemu commits ``L2..Lk`` and ``B`` into ``L1``'s file (``block-commit``),
which then reads exactly like ``B`` and is renamed over ``B``'s file.  It
writes only what the upper layers hold, not the dropped layer's data again.
``L1``'s file belongs to a dropped point, so the journal is written before
the commit starts, and an interrupted commit is simply run again (it writes
the same clusters).  ``B``'s view never changes during the commit: it reads
``L1`` only where no layer above ``L1`` has a cluster, and those are exactly
the clusters the commit does not touch.  qemu's image locks make the commit
fail, rather than run, while another process has a file of the chain open.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapters import qemu
from ..core.errors import ChainDamaged
from ..core.extents import Chunk, Extent, boundary_extent, plan
from ..core.faults import crashpoint
from ..core.kinds import MergeMethod
from ..core.threads import Background
from ..store import manifest as mf
from ..store.chain import checked_chain
from ..store.checksums import (
    ALGORITHM,
    OrderedWriter,
    check_sums_file,
    file_sha256,
    read_records,
    stacked_records,
    write_records,
)
from ..store.fsutil import fsync_file
from ..store.layout import BLOCK_SIZE, merging, sums_file
from ..store.qcow2 import create_layer, read_header
from ..transfer.progress import Progress
from .readback import read_back, settle

if TYPE_CHECKING:
    from ..transfer.pipeline import Stats

# The NBD client (libnbd) and the transfer pipeline are imported where they are
# used: a commit merge that reads back from the layer files needs neither.

logger = logging.getLogger(__name__)


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
    return directory / merging(child.file), directory / merging(sums_file(child.id))


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
    create_layer(layer, child.size, parent.file if parent else None)
    sums = OrderedWriter(sums_path)
    job = CopyJob(view_files, [*parent_files, layer], chunks, child, hide_zeros=parent is not None)
    try:
        stats = _copy(daemon, job, sums, parallel=parallel, progress=progress)
        qemu.check_layer(layer)
        sha = sums.finish()
    except BaseException:
        sums.abort()
        layer.unlink(missing_ok=True)
        sums_path.unlink(missing_ok=True)
        raise
    read_back(daemon, [*parent_files, layer], read_records(sums_path), child.size)
    return mf.PendingMerge(
        child=child.id,
        drop=tuple(drop),
        checksums=mf.Checksums(sums_file(child.id), ALGORITHM, BLOCK_SIZE, sha),
        stored_bytes=layer.stat().st_blocks * 512,
        data_bytes=stats.data_bytes,
        zero_bytes=stats.zero_bytes,
    )


@dataclass(frozen=True)
class CopyJob:
    """What a copy merge copies: the chunks of the child's view into the new chain, for ``child``."""

    view_files: list[Path]  # the child's chain, base first
    new_files: list[Path]  # the new parent's chain and the merged layer on top
    chunks: list[Chunk]
    child: mf.Point
    hide_zeros: bool  # the merged layer has a parent: zeros must be written over its data


def _copy(daemon: qemu.StorageDaemon, job: CopyJob, sums: OrderedWriter, *, parallel: int, progress: bool) -> Stats:
    from ..adapters.nbdio import Connection, ConnectionPool
    from ..transfer.pipeline import Transfer, TransferOptions

    view = daemon.export_chain(job.view_files, writable=False)
    try:
        new = daemon.export_chain(job.new_files, writable=True)
        try:
            pool = ConnectionPool(new.socket, new.name, parallel)
            try:
                total = sum(c.length for c in job.chunks)
                with Progress(f"merge into {job.child.id}", total, enabled=progress) as bar:
                    stats = Transfer(
                        open_reader=lambda: Connection(view.socket, view.name),
                        sink=pool,
                        sums=sums,
                        size=job.child.size,
                        hide_zeros=job.hide_zeros,
                        options=TransferOptions(workers=parallel, progress=bar.update),
                    ).run(job.chunks)
                pool.flush()
            finally:
                pool.close()
        finally:
            daemon.remove_export(new)
    finally:
        daemon.remove_export(view)
    return stats


# -- the commit method ------------------------------------------------------------------


def method(m: mf.Manifest, drop: Sequence[str], child_id: str, *, shared: bool = False) -> MergeMethod:
    """``commit`` when the dropped layers and the child share one size and all have checksums (pure).

    ``shared``: the file the commit would write (the oldest dropped layer's,
    see :func:`commit_base`) has other hard links; writing it would change
    their content too, so the copy method, which writes only new files, is used.
    """
    layers = [m.point(d) for d in drop] + [m.point(child_id)]
    if not shared and len({p.size for p in layers}) == 1 and all(p.checksums is not None for p in layers):
        return MergeMethod.COMMIT
    return MergeMethod.COPY


def commit_base(directory: Path, m: mf.Manifest, drop: Sequence[str]) -> Path:
    """The one file a commit merge writes: the oldest dropped layer's (qemu commits into it)."""
    return directory / m.point(drop[0]).file


def linked_elsewhere(path: Path) -> bool:
    """``path`` has other hard links (``rsync --link-dest``, ``cp -al``): writing it would write those too."""
    return os.lstat(path).st_nlink > 1


def pending_commit_is_shared(directory: Path, m: mf.Manifest, pm: mf.PendingMerge) -> bool:
    """A journaled commit merge whose base has other hard links by now, and that was not renamed yet."""
    if pm.method != MergeMethod.COMMIT or _renamed(directory, m, pm):
        return False
    base = commit_base(directory, m, pm.drop)
    return base.exists() and linked_elsewhere(base)


def _renamed(directory: Path, m: mf.Manifest, pm: mf.PendingMerge) -> bool:
    """The committed base was renamed over the child: the child's file names the new parent."""
    first = m.point(pm.drop[0])
    parent_file = m.point(first.parent).file if first.parent else None
    return read_header(directory / m.point(pm.child).file).backing_file == parent_file


def _sums_paths(directory: Path, layers: Sequence[mf.Point]) -> list[Path]:
    """The layers' checksum files, each checked against the SHA-256 the manifest recorded."""
    paths = []
    for p in layers:
        if p.checksums is None:
            raise ChainDamaged(str(directory), f"point {p.id} has no checksums")
        path = directory / p.checksums.file
        check_sums_file(path, p.checksums.sha256)
        paths.append(path)
    return paths


def merged_sums_ready(directory: Path, m: mf.Manifest, pm: mf.PendingMerge) -> bool:
    """Whether the merged layer's checksums are in place as the journal recorded them.

    A commit merge's ``.sums.merge`` is only the layers' own records
    stacked, so a missing or damaged one is written again (the same bytes);
    a copy merge's is not rebuilt: False, and the merge must be given up.
    """
    child = m.point(pm.child)
    _, merged = merge_files(directory, child)
    if _sha_matches(directory / sums_file(child.id), pm) or _sha_matches(merged, pm):
        return True
    if pm.method != MergeMethod.COMMIT:
        return False
    if merged.is_dir() and not merged.is_symlink():
        raise ChainDamaged(str(merged), "is a directory, not the merge's checksum file")
    logger.warning("%s: %s is missing or damaged; written again from the layers' checksums", m.image, merged.name)
    merged.unlink(missing_ok=True)
    layers = [m.point(d) for d in pm.drop] + [child]
    sha, _, _ = write_records(merged, stacked_records(_sums_paths(directory, layers)))
    if sha != pm.checksums.sha256:
        raise ChainDamaged(str(directory), "the merge's checksums cannot be rebuilt as journaled")
    return True


def _sha_matches(path: Path, pm: mf.PendingMerge) -> bool:
    try:
        return file_sha256(path) == pm.checksums.sha256
    except (OSError, ChainDamaged):
        return False


def journal_commit(directory: Path, m: mf.Manifest, drop: Sequence[str], child_id: str) -> mf.PendingMerge:
    """Write the merged layer's checksums beside the child's; the journal entry of a commit merge.

    The merged layer's records are the layers' records stacked: per block,
    the newest layer's record.
    """
    child = m.point(child_id)
    layers = [m.point(d) for d in drop] + [child]
    _, sums_path = merge_files(directory, child)
    sha, data, zeros = write_records(sums_path, stacked_records(_sums_paths(directory, layers)))
    return mf.PendingMerge(
        child=child.id,
        drop=tuple(drop),
        checksums=mf.Checksums(sums_file(child.id), ALGORITHM, BLOCK_SIZE, sha),
        stored_bytes=0,  # known once the merged layer is in place
        data_bytes=min(data * BLOCK_SIZE, child.size),
        zero_bytes=min(zeros * BLOCK_SIZE, child.size),
        method=MergeMethod.COMMIT,
    )


def cut_to_image_end(path: Path) -> None:
    """Cut a layer's file back to where qemu says its image ends, if it is longer.

    The commit writes through qemu's ``preallocate`` filter, which extends
    the file ahead of the writes and cuts it back when it closes.  A commit
    that was killed leaves the extension (up to 128 MiB) behind, and the
    filter of the next attempt takes the file's length for the end of its
    data, so it would stay.  What lies past the image end is referenced by
    nothing, so no view of any chain changes.  Run before a resumed commit
    only: the journal entry is written before a commit starts, so a base
    that a killed commit extended is always one of a pending merge.
    """
    end = qemu.check_layer(path).get("image-end-offset")
    size = path.stat().st_size
    if isinstance(end, int) and 0 < end < size:
        logger.info("%s: cutting %d bytes past the image's end (left by an interrupted merge)", path.name, size - end)
        os.truncate(path, end)


def commit_in_place(
    directory: Path, m: mf.Manifest, pm: mf.PendingMerge, daemon: qemu.StorageDaemon, *, progress: bool, resumed: bool
) -> None:
    """Commit a journaled merge into the oldest dropped layer and rename it over the child's file.

    Idempotent: when the child's file already names the new parent as its
    backing file, the rename happened and nothing is left to do; otherwise
    the commit runs (again) from the start.
    """
    child = m.point(pm.child)
    child_path = directory / child.file
    if _renamed(directory, m, pm):
        return
    files = checked_chain(directory, m, child.id)
    base = len(files) - len(pm.drop) - 1
    upper = [m.point(d) for d in pm.drop[1:]] + [child]
    total = sum(p.data_bytes + p.zero_bytes for p in upper)
    merged = files[base]
    if resumed:  # only a killed commit leaves the filter's extension, and its journal entry
        cut_to_image_end(merged)
    with Progress(f"merge into {child.id}", total, enabled=progress) as bar:
        daemon.commit(files, base, bar.update)
    fsync_file(merged)
    # qemu-img check of the merged layer runs while its blocks are read back; both must pass.
    checked = Background(functools.partial(qemu.check_layer, merged), "check")
    try:
        read_back(daemon, files[: base + 1], stacked_records(_sums_paths(directory, upper)), child.size)
    except BaseException:
        settle([checked])  # the read-back's failure is the one reported, once the check is over
        raise
    checked.result()
    crashpoint("prune-after-build")
    os.replace(merged, child_path)
