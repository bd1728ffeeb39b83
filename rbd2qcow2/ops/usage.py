"""``du``: bytes stored per point, image, pool and in total, and what removing a point would free.

Stored bytes are what the files take on disk (``st_blocks * 512``), not their
apparent sizes: a point is its layer file and its ``.sums`` file, an image is
its points and its manifest.  Files of ours that the manifest does not name
(a backup in progress, the leftovers of an interrupted run, the new layer of
a pending merge) are counted apart as ``other_bytes``.

Removing a point that has a child merges its data into the child (see
:mod:`rbd2qcow2.ops.merge`): what that frees is the point's stored bytes minus
the data that moves into the child, i.e. the data of the point that the
child does not overwrite.  That is estimated without reading any data, from
the allocation map of the point under its child (``qemu-img map``; depth 0 =
the child, depth 1 = the point): the extents served by depth 1 that hold
data.  Only the two layers are opened, because what the child's view gets
from depth 1 does not depend on the layers below the point.  Removing the
newest point of a chain frees all its stored bytes.

Nothing is locked or written: the numbers are a snapshot of a target that
other runs may be changing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import qemu
from ..core.errors import ChainDamaged, DataError, Error, combined_exit_code
from ..core.names import ImageSpec, Selector, sums_file
from ..core.units import human_size
from ..store import manifest as mf
from ..store.chain import checked_chain, orphan_files
from ..store.target import iter_chains, open_target

logger = logging.getLogger(__name__)


# -- pure ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PointUsage:
    id: str
    depth: int  # layers from the base to this point, inclusive
    size: int  # virtual size
    layer_bytes: int
    sums_bytes: int
    freed_if_removed: int | None  # None: unknown (damaged chain, pending merge, qemu failed)

    @property
    def stored_bytes(self) -> int:
        return self.layer_bytes + self.sums_bytes


@dataclass(frozen=True)
class ImageUsage:
    image: ImageSpec
    points: tuple[PointUsage, ...]
    manifest_bytes: int
    other_bytes: int = 0  # files of ours the manifest does not name
    pending_merge: bool = False

    @property
    def stored_bytes(self) -> int:
        return sum(p.stored_bytes for p in self.points) + self.manifest_bytes

    @property
    def virtual_size(self) -> int:
        """The newest point's virtual size (0 without points)."""
        return self.points[-1].size if self.points else 0

    @property
    def depth(self) -> int:
        """The newest point's chain depth (0 without points)."""
        return self.points[-1].depth if self.points else 0


@dataclass(frozen=True)
class PoolUsage:
    pool: str
    images: int
    points: int
    stored_bytes: int
    other_bytes: int


@dataclass
class Usage:
    images: list[ImageUsage] = field(default_factory=list)
    problems: list[Error] = field(default_factory=list)  # damaged chains and failures; the images are still counted

    @property
    def pools(self) -> dict[str, PoolUsage]:
        return pool_totals(self.images)

    @property
    def total_bytes(self) -> int:
        return sum(i.stored_bytes for i in self.images)

    @property
    def other_bytes(self) -> int:
        return sum(i.other_bytes for i in self.images)

    @property
    def damaged(self) -> list[Error]:
        return [p for p in self.problems if isinstance(p, DataError)]

    @property
    def errors(self) -> list[Error]:
        return [p for p in self.problems if not isinstance(p, DataError)]

    @property
    def exit_code(self) -> int:
        """65 if anything is damaged, else the most serious failure's code, else 0."""
        return combined_exit_code([p.exit_code for p in self.problems])


def moved_bytes(view: Iterable[qemu.MapExtent]) -> int:
    """Data bytes of depth 1 (the removed point) that the view of depth 0 (its child) reads."""
    return sum(e.length for e in view if e.depth == 1 and e.present and not e.zero)


def freed_estimate(stored: int, child_view: Iterable[qemu.MapExtent] | None) -> int:
    """What removing a point frees: all of it without a child, else what does not move into the child."""
    if child_view is None:
        return stored
    return max(0, stored - moved_bytes(child_view))


def pool_totals(images: Iterable[ImageUsage]) -> dict[str, PoolUsage]:
    """Per pool (namespaces included), sorted by pool name."""
    acc: dict[str, list[int]] = {}
    for i in images:
        a = acc.setdefault(i.image.pool, [0, 0, 0, 0])
        a[0] += 1
        a[1] += len(i.points)
        a[2] += i.stored_bytes
        a[3] += i.other_bytes
    return {pool: PoolUsage(pool, *acc[pool]) for pool in sorted(acc)}


def point_dict(p: PointUsage) -> dict[str, Any]:
    return {
        "id": p.id,
        "depth": p.depth,
        "virtual_size": p.size,
        "stored_bytes": p.stored_bytes,
        "layer_bytes": p.layer_bytes,
        "sums_bytes": p.sums_bytes,
        "freed_if_removed": p.freed_if_removed,
    }


def usage_dict(u: Usage) -> dict[str, Any]:
    """The ``--json`` report."""
    return {
        "images": [
            {
                "image": str(i.image),
                "pool": i.image.pool,
                "namespace": i.image.namespace,
                "name": i.image.name,
                "points": [point_dict(p) for p in i.points],
                "depth": i.depth,
                "virtual_size": i.virtual_size,
                "manifest_bytes": i.manifest_bytes,
                "stored_bytes": i.stored_bytes,
                "other_bytes": i.other_bytes,
                "pending_merge": i.pending_merge,
            }
            for i in u.images
        ],
        "pools": {
            name: {"images": p.images, "points": p.points, "stored_bytes": p.stored_bytes, "other_bytes": p.other_bytes}
            for name, p in u.pools.items()
        },
        "total_bytes": u.total_bytes,
        "other_bytes": u.other_bytes,
        "damaged": [str(d) for d in u.damaged],
        "errors": [str(e) for e in u.errors],
    }


def _columns(lines: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(col.ljust(w) for col, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def format_table(u: Usage, *, points: bool = False) -> str:
    """Images (and with ``points`` their points), then per pool and in total."""
    header = ["IMAGE", "POINTS", "DEPTH", "SIZE", "STORED"] + (["FREED IF REMOVED"] if points else [])
    rows: list[list[str]] = [header]
    for i in u.images:
        note = " [pending merge]" if i.pending_merge else ""
        other = f" (+{human_size(i.other_bytes)} other)" if i.other_bytes else ""
        rows.append(
            [str(i.image) + note, str(len(i.points)), str(i.depth), human_size(i.virtual_size)]
            + [human_size(i.stored_bytes) + other]
            + ([""] if points else [])
        )
        if points:
            for p in i.points:
                freed = "?" if p.freed_if_removed is None else human_size(p.freed_if_removed)
                rows.append([f"  @{p.id}", "", str(p.depth), human_size(p.size), human_size(p.stored_bytes), freed])
    totals: list[list[str]] = [["POOL", "IMAGES", "POINTS", "STORED"]]
    for pool in u.pools.values():
        other = f" (+{human_size(pool.other_bytes)} other)" if pool.other_bytes else ""
        totals.append([pool.pool, str(pool.images), str(pool.points), human_size(pool.stored_bytes) + other])
    other = f" (+{human_size(u.other_bytes)} other)" if u.other_bytes else ""
    n_points = sum(len(i.points) for i in u.images)
    totals.append(["TOTAL", str(len(u.images)), str(n_points), human_size(u.total_bytes) + other])
    return "\n".join([*_columns(rows), "", *_columns(totals)])


# -- reading the target ---------------------------------------------------------------


def allocated(path: Path) -> int:
    """Bytes ``path`` takes on disk (0 if it is missing); links are not followed."""
    try:
        return os.lstat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _depths(m: mf.Manifest) -> dict[str, int]:
    depth: dict[str, int] = {}
    for p in m.points:  # a parent always comes before its children (checked on load)
        depth[p.id] = 1 if p.parent is None else depth[p.parent] + 1
    return depth


def _freed(directory: Path, m: mf.Manifest, stored: dict[str, int], problems: list[Error]) -> dict[str, int | None]:
    """The freed estimate of every point; None for the points of chains that could not be checked or mapped."""
    freed: dict[str, int | None] = {}
    for top in (p for p in m.points if not m.children(p.id)):
        chain = m.chain_of(top.id)
        freed[top.id] = stored[top.id]
        if len(chain) < 2:
            continue
        try:
            files = checked_chain(directory, m, top.id)
            for i, point in enumerate(chain[:-1]):
                freed[point.id] = freed_estimate(stored[point.id], qemu.map_chain(files[i : i + 2]))
        except Error as exc:
            problems.append(exc)
    return freed


def image_usage(directory: Path, m: mf.Manifest, problems: list[Error]) -> ImageUsage:
    """One chain directory's usage; damage and failures go to ``problems``."""
    layer = {p.id: allocated(directory / p.file) for p in m.points}
    sums = {p.id: allocated(directory / sums_file(p.id)) for p in m.points}
    stored = {pid: layer[pid] + sums[pid] for pid in layer}
    if m.pending is not None:
        # Until the next prune or backup finishes it, the child's file may already be the merged layer.
        logger.warning("%s: an interrupted prune is pending; freed estimates left out", m.image)
        freed: dict[str, int | None] = {}
    else:
        freed = _freed(directory, m, stored, problems)
    depth = _depths(m)
    points = tuple(PointUsage(p.id, depth[p.id], p.size, layer[p.id], sums[p.id], freed.get(p.id)) for p in m.points)
    other = sum(allocated(directory / name) for name in orphan_files(directory, m))
    return ImageUsage(m.image, points, allocated(directory / mf.NAME), other, m.pending is not None)


def disk_usage(target: Path, selectors: Sequence[Selector]) -> Usage:
    """Usage of every selected chain under the target; problems are collected, not raised or logged."""
    open_target(target, create=False)
    usage = Usage()
    for directory, item in iter_chains(target):
        if isinstance(item, ChainDamaged):
            usage.problems.append(item)
            continue
        if selectors and not any(s.matches(item.image) for s in selectors):
            continue
        try:
            usage.images.append(image_usage(directory, item, usage.problems))
        except OSError as exc:
            usage.problems.append(Error(f"{item.image}: cannot read {directory}: {exc.strerror}"))
    return usage
