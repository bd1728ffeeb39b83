"""``repair``: rebuild a chain's manifest from its layer files (and the RBD snapshots).

What a manifest holds can mostly be read back from the chain itself:

* each ``<id>.qcow2`` gives a point id (its name), a virtual size and its
  parent (the backing file name in its qcow2 header);
* each ``<id>.sums`` gives the point's checksums (their SHA-256, and how
  many blocks hold data or zeros);
* where the cluster is reachable, the RBD snapshot ``rbd2qcow2.<tag>.<id>``
  gives the snapshot id, its size, when it was taken, and the image id.

What cannot be proven is marked: every rebuilt point has the flag
``repaired``; a point whose snapshot was not found has ``no-snapshot`` (its
``created`` comes from its id, its image id is unknown), and if that is the
latest point also ``no-incremental``, so the next backup is a full one.

A chain that cannot be made consistent is refused (:class:`ChainDamaged`,
nothing written): two layers naming the same parent, a backing file outside
the directory, a parent newer than its child.  A layer whose header is
damaged is left out and reported, as is every layer above it; no file is
ever deleted.  A loadable manifest is replaced only with ``force``; the old
one is kept as ``manifest.json.damaged-<time>``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..core import names
from ..core.errors import ChainDamaged, Error, NotFound, UsageError
from ..core.kinds import PointFlag, PointKind
from ..store import manifest as mf
from ..store.activity import point_latest, record
from ..store.chain import checked_chain
from ..store.checksums import ALGORITHM, ZERO_DIGEST, file_sha256, read_records
from ..store.fsutil import chain_lock
from ..store.layout import BLOCK_SIZE, LAYER_SUFFIX, is_point_id, layer_file, point_time, sums_file, time_stamp
from ..store.qcow2 import Header, check_header, read_header
from ..store.target import chain_dir, open_target

if TYPE_CHECKING:
    from ..adapters.ceph import CephOptions, RbdImage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RepairOptions:
    target: Path
    ceph: CephOptions | None = None  # None: offline, from the files alone
    force: bool = False
    wait: bool = False


@dataclass(frozen=True)
class SnapFacts:
    """What the cluster says about one of our snapshots."""

    id: int
    size: int
    created: datetime


@dataclass(frozen=True)
class Source:
    """What the cluster says about the image: its id and our snapshots by name (None: not reached)."""

    image_id: str
    snapshots: dict[str, SnapFacts]


@dataclass
class RepairReport:
    image: names.ImageSpec
    manifest: mf.Manifest
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    kept: Path | None = None  # the replaced manifest, kept
    online: bool = False

    def lines(self) -> list[str]:
        """What was rebuilt, one line per point, then what was left out."""
        out = []
        for p in self.manifest.points:
            parent = f"on {p.parent}" if p.parent else "base"
            sums = "checksums" if p.checksums else "no checksums"
            snap = f"snapshot id {p.snapshot.id}" if PointFlag.NO_SNAPSHOT not in p.flags else "snapshot not found"
            out.append(f"{self.image}@{p.id}  {p.kind:<11}  {parent}  {sums}, {snap}  [{', '.join(p.flags)}]")
        for name, why in self.left_out:
            out.append(f"{self.image}  left out {name}: {why}")
        if self.kept is not None:
            out.append(f"{self.image}  previous manifest kept as {self.kept.name}")
        if not self.online:
            out.append(f"{self.image}  rebuilt without the cluster: snapshots not matched, the next backup is full")
        return out


@dataclass(frozen=True)
class _Layer:
    id: str
    header: Header
    parent: str | None


def repair(spec: str, opts: RepairOptions) -> RepairReport:
    """Rebuild the manifest of the chain of ``spec`` (``POOL/IMAGE`` or ``POOL/NAMESPACE/IMAGE``)."""
    sel = names.parse_spec(spec)
    if sel.name is None:
        raise UsageError(f"repair takes one image, not a pool: {spec!r}")
    image = names.ImageSpec(sel.pool, sel.namespace or "", sel.name)
    tag = open_target(opts.target, create=False)
    directory = chain_dir(opts.target, image)
    if not directory.is_dir() or directory.is_symlink():
        raise NotFound(f"no chain directory of {image} in {opts.target}")
    with chain_lock(directory, wait=opts.wait, what=str(image)):
        _refuse_loadable(directory, force=opts.force)
        source = _source(image, tag, opts.ceph)
        report = rebuild(directory, image, tag, source)
        report.online = source is not None
        report.kept = _commit(directory, report.manifest)
        latest = report.manifest.latest
        point_latest(directory, latest.file if latest else None)
        record(directory, f"repair rebuilt {len(report.manifest.points)} points, left out {len(report.left_out)} files")
    return report


def _refuse_loadable(directory: Path, *, force: bool) -> None:
    path = directory / mf.NAME
    if not path.exists() and not path.is_symlink():
        return
    try:
        mf.load(directory)
    except ChainDamaged as exc:
        logger.warning("%s", exc)
        return
    if not force:
        raise UsageError(f"{directory / mf.NAME} is a valid manifest; give --force to rebuild it anyway")


def _commit(directory: Path, m: mf.Manifest) -> Path | None:
    """Keep the old manifest (if any) under a new name, then save the rebuilt one."""
    old = directory / mf.NAME
    kept = None
    if old.exists() or old.is_symlink():
        stamp = time_stamp(datetime.now(UTC))
        kept = directory / f"{mf.NAME}.damaged-{stamp}"
        n = 1
        while kept.exists() or kept.is_symlink():
            n += 1
            kept = directory / f"{mf.NAME}.damaged-{stamp}-{n}"
        if old.is_file() and not old.is_symlink():
            os.link(old, kept)  # the old stays in place until the new replaces it
        else:
            os.rename(old, kept)  # a link or a directory in its place: moved aside
    mf.save(directory, m)
    return kept


def _source(image: names.ImageSpec, tag: str, ceph: CephOptions | None) -> Source | None:
    """The image's id and our snapshots, or None when the cluster or the image cannot be reached."""
    if ceph is None:
        return None
    try:
        from ..adapters.ceph import Cluster
    except ImportError as exc:
        logger.warning("%s: Ceph bindings not available (%s); rebuilding from the files alone", image, exc)
        return None
    try:
        with Cluster(ceph) as cluster, cluster.image(image, read_only=True) as img:
            return Source(img.id(), dict(_snapshots(img, tag)))
    except Error as exc:
        logger.warning("%s: %s; rebuilding from the files alone", image, exc)
        return None


def _snapshots(img: RbdImage, tag: str) -> Iterator[tuple[str, SnapFacts]]:
    for s in img.snapshots():
        if names.is_own_snapshot(s.name, tag):
            yield s.name, SnapFacts(s.id, s.size, img.snapshot_time(s.id))


# -- the rebuild (no writes) ------------------------------------------------------------


def rebuild(directory: Path, image: names.ImageSpec, tag: str, source: Source | None) -> RepairReport:
    """The manifest that the files of ``directory`` (and ``source``) prove; raises ChainDamaged if none can be."""
    where = str(directory)
    left: list[tuple[str, str]] = []
    layers = _layers(directory, left)
    kept = _connected(layers, left, where)
    points = [_point(directory, layers[pid], source, tag, left) for pid in sorted(kept)]
    for p in points:
        if p.parent is not None and p.parent > p.id:
            raise ChainDamaged(where, f"layer {p.file} is older than its backing file {layer_file(p.parent)}")
    if points and PointFlag.NO_SNAPSHOT in points[-1].flags:
        last = points[-1]
        points[-1] = dataclasses.replace(last, flags=(*last.flags, PointFlag.NO_INCREMENTAL))
    image_id = source.image_id if source is not None else ""
    m = mf.Manifest(image, image_id, tag, tuple(points))
    m = mf.loads(mf.dumps(m), where)  # every rule a loaded manifest must meet
    for p in m.points:
        checked_chain(directory, m, p.id)
    named = {p.file for p in m.points} | {sums_file(p.id) for p in m.points}
    reported = {name for name, _ in left}
    for name in mf.own_files(directory):
        if name not in named and name not in reported:
            left.append((name, "not a layer or checksum file of a rebuilt point"))
    return RepairReport(image, m, left)


def _layers(directory: Path, left: list[tuple[str, str]]) -> dict[str, _Layer]:
    """Every ``<id>.qcow2`` whose header reads, with the parent it names."""
    layers: dict[str, _Layer] = {}
    for name in mf.own_files(directory):
        if not name.endswith(LAYER_SUFFIX):
            continue
        pid = name.removesuffix(LAYER_SUFFIX)
        try:
            header = read_header(directory / name)
        except ChainDamaged as exc:
            left.append((name, f"damaged header: {exc.args[-1]}"))
            continue
        parent = _parent(directory, name, header)
        try:  # everything but the backing file, checked against the chain later
            check_header(header, where=name, expected_backing=header.backing_file, size=header.size)
        except ChainDamaged as exc:
            left.append((name, f"damaged header: {exc.args[-1]}"))
            continue
        layers[pid] = _Layer(pid, header, parent)
    return layers


def _parent(directory: Path, name: str, header: Header) -> str | None:
    backing = header.backing_file
    if backing is None:
        return None
    pid = backing.removesuffix(LAYER_SUFFIX)
    if not backing.endswith(LAYER_SUFFIX) or not is_point_id(pid):
        raise ChainDamaged(str(directory), f"{name} names {backing!r} as backing file, not a layer of this directory")
    return pid


def _connected(layers: dict[str, _Layer], left: list[tuple[str, str]], where: str) -> set[str]:
    """The layers that reach a base through layers that are there; refuses a fork."""
    children: dict[str, str] = {}
    for layer in sorted(layers.values(), key=lambda x: x.id):
        if layer.parent is None:
            continue
        other = children.setdefault(layer.parent, layer.id)
        if other != layer.id:
            raise ChainDamaged(
                where,
                f"{layer_file(other)} and {layer_file(layer.id)} both name {layer_file(layer.parent)} as backing file",
            )
    kept: set[str] = set()
    for pid in sorted(layers):
        trail: list[str] = []
        current: str | None = pid
        while current is not None and current in layers and current not in kept and current not in trail:
            trail.append(current)
            current = layers[current].parent
        if current is None or current in kept:
            kept.update(trail)
    for pid in sorted(set(layers) - kept):
        parent = layers[pid].parent
        missing = f"its backing file {parent}{LAYER_SUFFIX} is missing or left out"
        why = missing if parent not in layers else "a backing loop"
        left.append((layer_file(pid), why))
    return kept


def _point(directory: Path, layer: _Layer, source: Source | None, tag: str, left: list[tuple[str, str]]) -> mf.Point:
    name = layer_file(layer.id)
    snap_name = names.snapshot_name(tag, layer.id)
    facts = source.snapshots.get(snap_name) if source is not None else None
    if facts is not None and -(-facts.size // 512) * 512 != layer.header.size:
        left.append((snap_name, f"snapshot of {facts.size} bytes, the layer has {layer.header.size}: not matched"))
        facts = None
    size = facts.size if facts is not None else layer.header.size
    sums, data, zeros = _sums(directory, layer.id, size, left)
    flags = (PointFlag.REPAIRED,) if facts is not None else (PointFlag.REPAIRED, PointFlag.NO_SNAPSHOT)
    created = facts.created if facts is not None else point_time(layer.id)
    return mf.Point(
        id=layer.id,
        file=name,
        parent=layer.parent,
        created=created.replace(tzinfo=created.tzinfo or UTC).isoformat(timespec="milliseconds"),
        size=size,
        image_id=source.image_id if source is not None and facts is not None else "",
        snapshot=mf.Snapshot(snap_name, facts.id if facts is not None else 0),
        kind=PointKind.of(layer.parent),
        stored_bytes=(directory / name).lstat().st_blocks * 512,
        data_bytes=data,
        zero_bytes=zeros,
        checksums=sums,
        flags=flags,
    )


def _sums(directory: Path, pid: str, size: int, left: list[tuple[str, str]]) -> tuple[mf.Checksums | None, int, int]:
    """The point's checksum file, if it is there and reads whole; its data and zero bytes."""
    name = sums_file(pid)
    path = directory / name
    if not path.exists() and not path.is_symlink():
        return None, 0, 0
    try:
        data = zeros = 0
        for _, dig in read_records(path):
            if dig == ZERO_DIGEST:
                zeros += 1
            else:
                data += 1
        sha = file_sha256(path)
    except (ChainDamaged, OSError) as exc:
        why = exc.args[-1] if isinstance(exc, ChainDamaged) else exc.strerror
        left.append((name, f"unreadable: {why}"))
        return None, 0, 0
    return (
        mf.Checksums(name, ALGORITHM, BLOCK_SIZE, sha),
        min(data * BLOCK_SIZE, size),
        min(zeros * BLOCK_SIZE, size),
    )
