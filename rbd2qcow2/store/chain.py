"""A point's chain of layer files, checked before qemu opens any of them."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..core.errors import Error
from . import manifest as mf
from .layout import MANIFEST_TMP, merging, sums_file
from .qcow2 import check_header, read_header

logger = logging.getLogger(__name__)

TMP = MANIFEST_TMP


def checked_chain(directory: Path, manifest: mf.Manifest, point_id: str) -> list[Path]:
    """The layer files of a point, base first, each header checked against the manifest.

    Every file must be a regular file in ``directory`` (no links), and its
    header must name exactly the parent's file as backing (the base: none),
    with no external data file; see :func:`rbd2qcow2.store.qcow2.check_header`.
    """
    files = []
    for point in manifest.chain_of(point_id):
        path = directory / point.file
        parent = manifest.point(point.parent).file if point.parent else None
        check_header(read_header(path), where=str(path), expected_backing=parent, size=point.size)
        files.append(path)
    return files


def as_read(directory: Path, manifest: mf.Manifest) -> mf.Manifest:
    """The manifest as a reader that takes no lock must see the chain.

    A merge killed after its merged layer was renamed over the child's file
    leaves that child naming its new parent while the manifest still lists
    the dropped points: readers then see the merge's outcome, which the next
    backup, prune or verify commits.  Before the rename every kept point
    reads as the manifest says (see :mod:`rbd2qcow2.ops.merge`).
    """
    pm = manifest.pending
    if pm is None:
        return manifest
    first = manifest.point(pm.drop[0])
    parent = manifest.point(first.parent).file if first.parent else None
    try:
        renamed = read_header(directory / manifest.point(pm.child).file).backing_file == parent
    except Error:
        return manifest  # the checks of the chain report it
    return manifest.finish_merge() if renamed else manifest


def orphan_files(directory: Path, manifest: mf.Manifest) -> list[str]:
    """Files of ours (by their name's shape) that the manifest does not name as part of the chain."""
    named = _named(manifest)
    return sorted(name for name in mf.own_files(directory) if name not in named) + _tmp(directory)


def _named(manifest: mf.Manifest) -> set[str]:
    named = {p.file for p in manifest.points} | {sums_file(p.id) for p in manifest.points}
    if manifest.pending is not None:  # the files of a merge still to be finished
        child = manifest.point(manifest.pending.child)
        named |= {merging(child.file), merging(sums_file(child.id))}
    return named


def _tmp(directory: Path) -> list[str]:
    return [TMP] if (directory / TMP).is_file() and not (directory / TMP).is_symlink() else []


def remove_orphan_files(directory: Path, manifest: mf.Manifest) -> mf.Manifest:
    """Remove what an interrupted run left; returns the manifest with its journal cleared.

    Call with the chain locked.  Only files the manifest's journal
    (``writing``) names, and the manifest's own temporary file, are removed:
    a file of our name shape that nothing names is reported and left, since
    nothing proves that this tool wrote it (a copy put back by hand, a
    layer whose manifest entry was lost).  The journal is cleared on disk
    once its files are gone.
    """
    named = _named(manifest)
    for name in orphan_files(directory, manifest):
        if name in manifest.writing or name == TMP:
            logger.warning("%s: removing %s left by an interrupted run", manifest.image, name)
            (directory / name).unlink(missing_ok=True)
        else:
            logger.warning("%s: %s is not named by the manifest; left in place", manifest.image, name)
    # A journaled file that a point or the pending merge names is the chain's: never removed.
    kept = tuple(n for n in manifest.writing if n in named)
    if kept != manifest.writing:
        manifest = dataclasses.replace(manifest, writing=kept)
        mf.save(directory, manifest)
    return manifest
