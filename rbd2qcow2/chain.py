"""A point's chain of layer files, checked before qemu opens any of them."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from . import manifest as mf
from .names import sums_file
from .qcow2 import check_header, read_header

logger = logging.getLogger(__name__)

# Files an interrupted run can leave; only names of these shapes are ever removed.
_ORPHAN = re.compile(r"[0-9]{8}T[0-9]{6}Z(-[0-9]+)?\.(qcow2|sums)(\.partial|\.merge)?|\.manifest\.json\.tmp")


def checked_chain(directory: Path, manifest: mf.Manifest, point_id: str) -> list[Path]:
    """The layer files of a point, base first, each header checked against the manifest.

    Every file must be a regular file in ``directory`` (no links), and its
    header must name exactly the parent's file as backing (the base: none),
    with no external data file; see :func:`rbd2qcow2.qcow2.check_header`.
    """
    files = []
    for point in manifest.chain_of(point_id):
        path = directory / point.file
        parent = manifest.point(point.parent).file if point.parent else None
        check_header(read_header(path), where=str(path), expected_backing=parent, size=point.size)
        files.append(path)
    return files


def orphan_files(directory: Path, manifest: mf.Manifest) -> list[str]:
    """Files of ours (by their name's shape) that the manifest does not name."""
    named = {p.file for p in manifest.points} | {sums_file(p.id) for p in manifest.points}
    if manifest.pending is not None:  # the files of a merge still to be finished
        child = manifest.point(manifest.pending.child)
        named |= {f"{child.file}.merge", f"{sums_file(child.id)}.merge"}
    return sorted(
        entry.name
        for entry in os.scandir(directory)
        if _ORPHAN.fullmatch(entry.name) and entry.name not in named and entry.is_file(follow_symlinks=False)
    )


def remove_orphan_files(directory: Path, manifest: mf.Manifest) -> None:
    """Remove the files of ours that the manifest does not name (call with the chain locked)."""
    for name in orphan_files(directory, manifest):
        logger.warning("%s: removing %s left by an interrupted run", manifest.image, name)
        os.unlink(directory / name)
