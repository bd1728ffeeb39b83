"""Domain values as types: point kinds, point flags, merge methods.

Each is a :class:`enum.StrEnum` whose values are the strings the manifest
and the output have always held, so a member compares equal to its string
and serialises as it.
"""

from __future__ import annotations

import enum


class PointKind(enum.StrEnum):
    """How a point's layer was written: the whole image, or what changed since its parent."""

    FULL = "full"
    INCREMENTAL = "incremental"

    @classmethod
    def of(cls, parent: str | None) -> PointKind:
        """The kind of a layer with ``parent`` (None: a base)."""
        return cls.FULL if parent is None else cls.INCREMENTAL


class PointFlag(enum.StrEnum):
    """Flags a point may carry in the manifest."""

    DAMAGED = "damaged"  # a check found its content or structure wrong: no backup builds on it
    NO_INCREMENTAL = "no-incremental"  # the next backup is a full one
    REPAIRED = "repaired"  # rebuilt by ``repair`` from the layer files
    NO_SNAPSHOT = "no-snapshot"  # ``repair`` found no RBD snapshot for it


class MergeMethod(enum.StrEnum):
    """How a merge builds the layer that replaces its child's (see :mod:`rbd2qcow2.ops.merge`)."""

    COPY = "copy"  # a new file, copied from the child's view
    COMMIT = "commit"  # qemu commits the upper layers into the oldest dropped layer's file
