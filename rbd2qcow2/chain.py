"""A point's chain of layer files, checked before qemu opens any of them."""

from __future__ import annotations

from pathlib import Path

from . import manifest as mf
from .qcow2 import check_header, read_header


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
        check_header(read_header(path), where=str(path), expected_backing=parent, min_size=point.size)
        files.append(path)
    return files
