"""Every fact of the on-disk format, in one place.

The names and numbers a chain directory is made of: point ids, the file
names of layers and checksums (and of the files under construction), the
manifest and the lock, and the 64 KiB block.  The pure core defines the few
it needs itself (:mod:`rbd2qcow2.core.names`, :mod:`rbd2qcow2.core.extents`);
they are re-exported here, so that the rest of the package reads them from
the store.
"""

from __future__ import annotations

import re

from ..core.extents import BLOCK_SIZE
from ..core.names import (
    LAYER_SUFFIX,
    MERGE_SUFFIX,
    PARTIAL_SUFFIX,
    POINT_ID_FORMAT,
    POINT_ID_PATTERN,
    SUMS_SUFFIX,
    TMP_SUFFIX,
    hidden_tmp,
    is_point_id,
    layer_file,
    merging,
    partial,
    point_time,
    sums_file,
    time_stamp,
)

MANIFEST = "manifest.json"
LOCK = "lock"
# The names of the files a chain holds and a run may leave: layers, checksums, and their
# files under construction (``.partial`` of a backup, ``.merge`` of a merge).
OWN_FILE = re.compile(
    rf"{POINT_ID_PATTERN}({re.escape(LAYER_SUFFIX)}|{re.escape(SUMS_SUFFIX)})"
    rf"({re.escape(PARTIAL_SUFFIX)}|{re.escape(MERGE_SUFFIX)})?"
)
MANIFEST_TMP = hidden_tmp(MANIFEST)  # left by a save that was interrupted (see fsutil.atomic_write)

__all__ = [
    "BLOCK_SIZE",
    "LAYER_SUFFIX",
    "LOCK",
    "MANIFEST",
    "MANIFEST_TMP",
    "MERGE_SUFFIX",
    "OWN_FILE",
    "PARTIAL_SUFFIX",
    "POINT_ID_FORMAT",
    "POINT_ID_PATTERN",
    "SUMS_SUFFIX",
    "TMP_SUFFIX",
    "hidden_tmp",
    "is_point_id",
    "layer_file",
    "merging",
    "partial",
    "point_time",
    "sums_file",
    "time_stamp",
]
