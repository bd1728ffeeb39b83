"""The manifest of one image's chain directory: schema, load, atomic save.

``manifest.json`` is the single commit point of every operation on a chain.
Its journal (``writing``) names the files a run is about to create before it
creates them; the next run removes only those (see :mod:`rbd2qcow2.store.chain`),
so a file the manifest does not name is never removed on a guess.  It
carries a SHA-256 of its own canonical content, so a flipped byte is
reported as damage instead of being trusted.

A directory that holds layer files but no manifest is damaged
(:func:`load` says so) until ``rbd2qcow2 repair`` rebuilds the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import ChainDamaged
from ..core.kinds import MergeMethod, PointFlag, PointKind
from ..core.names import ImageSpec
from .fsutil import atomic_write, open_regular
from .layout import MANIFEST, OWN_FILE, is_point_id, layer_file, sums_file

FORMAT = "rbd2qcow2-manifest"
VERSION = 1
NAME = MANIFEST
REPAIR_HINT = "rebuild it from the layer files with 'rbd2qcow2 repair'"


@dataclass(frozen=True)
class Snapshot:
    name: str
    id: int


@dataclass(frozen=True)
class Checksums:
    """Where a point's per-block checksums live and how they were made."""

    file: str
    algorithm: str
    block_size: int
    sha256: str  # of the checksum file itself


@dataclass(frozen=True)
class ImageConfig:
    """The RBD settings of the image a point was taken of, to re-create it on restore.

    Points written before these were recorded have none (``None``).
    """

    object_size: int
    stripe_unit: int
    stripe_count: int
    data_pool: str | None  # None: the data lives in the image's own pool
    features: tuple[str, ...]  # names as ``rbd create --image-feature`` takes them
    meta: tuple[tuple[str, str], ...] = ()  # image-meta key/values, sorted by key


DAMAGED = PointFlag.DAMAGED
UNKNOWN_REASON = "unknown (recorded by an older version)"


@dataclass(frozen=True)
class Flag:
    """Why a point carries a flag: which check set it (``structure``, ``deep``, ``source``...), what it found, when.

    A flag stays as long as one of its reasons does; a later run of the
    same check that finds the point sound removes that check's reason.
    """

    name: str
    check: str  # "": unknown (a flag recorded without its reason)
    reason: str
    time: str  # ISO 8601, UTC; "" when unknown


@dataclass(frozen=True)
class Point:
    id: str
    file: str
    parent: str | None
    created: str  # ISO 8601, UTC
    size: int  # virtual size in bytes = the snapshot's size
    image_id: str
    snapshot: Snapshot
    kind: PointKind
    stored_bytes: int  # size of the layer file on disk
    data_bytes: int  # bytes written as data into this layer
    zero_bytes: int  # bytes written as zeros into this layer
    checksums: Checksums | None = None
    flags: tuple[str, ...] = ()
    flag_reasons: tuple[Flag, ...] = ()
    image_config: ImageConfig | None = None

    @property
    def is_full(self) -> bool:
        return self.parent is None

    def reasons(self, name: str) -> list[Flag]:
        """Why the point carries flag ``name``: none if it does not."""
        if name not in self.flags:
            return []
        return [f for f in self.flag_reasons if f.name == name] or [Flag(name, "", UNKNOWN_REASON, "")]

    def flagged(self, flag: Flag) -> Point:
        """The point with ``flag`` set; it replaces an earlier reason of the same check (pure)."""
        others = tuple(f for f in self.flag_reasons if (f.name, f.check) != (flag.name, flag.check))
        names = self.flags if flag.name in self.flags else (*self.flags, flag.name)
        return dataclasses.replace(self, flags=names, flag_reasons=(*others, flag))

    def cleared(self, name: str, checks: set[str]) -> Point:
        """The point without the reasons for ``name`` that ``checks`` set; the flag goes with its last reason (pure)."""
        if any(f.check not in checks for f in self.reasons(name)):  # another check's reason stays
            kept = tuple(f for f in self.flag_reasons if f.name != name or f.check not in checks)
            return dataclasses.replace(self, flag_reasons=kept)
        others = tuple(f for f in self.flag_reasons if f.name != name)
        return dataclasses.replace(self, flags=tuple(f for f in self.flags if f != name), flag_reasons=others)


@dataclass(frozen=True)
class PendingMerge:
    """A merge that is under way: finished forward by the next run that takes the lock.

    ``drop`` (consecutive points, oldest first) are merged into ``child``.
    Method ``copy``: the new layer is built and verified as
    ``<child>.qcow2.merge`` (and ``<child>.sums.merge``) before this entry is
    recorded, then renamed over the child's files.  Method ``commit``: the
    entry is recorded with ``<child>.sums.merge`` written, before qemu
    commits the upper layers into the oldest dropped layer's file, which is
    then renamed over the child's (see :mod:`rbd2qcow2.ops.merge`).
    """

    child: str
    drop: tuple[str, ...]
    checksums: Checksums
    stored_bytes: int
    data_bytes: int
    zero_bytes: int
    method: MergeMethod = MergeMethod.COPY


@dataclass(frozen=True)
class Manifest:
    image: ImageSpec
    image_id: str
    target_tag: str
    points: tuple[Point, ...] = field(default=())
    pending: PendingMerge | None = None
    # The journal: files a run is creating (saved before it creates them, cleared at its commit).
    # Optional in the file, so manifests without it stay valid and older versions still read it.
    writing: tuple[str, ...] = ()

    def point(self, point_id: str) -> Point:
        for p in self.points:
            if p.id == point_id:
                return p
        raise KeyError(point_id)

    @property
    def latest(self) -> Point | None:
        return self.points[-1] if self.points else None

    def chain_of(self, point_id: str) -> list[Point]:
        """The point and its ancestors, base first."""
        chain: list[Point] = []
        current: str | None = point_id
        while current is not None:
            p = self.point(current)
            chain.append(p)
            current = p.parent
        return chain[::-1]

    def with_point(self, point: Point, image_id: str) -> Manifest:
        return dataclasses.replace(self, points=(*self.points, point), image_id=image_id)

    def children(self, point_id: str) -> list[Point]:
        return [p for p in self.points if p.parent == point_id]

    def without(self, point_id: str) -> Manifest:
        """Drop a point that no other point depends on."""
        if self.children(point_id):
            raise ValueError(f"point {point_id} has dependents")
        return dataclasses.replace(self, points=tuple(p for p in self.points if p.id != point_id))

    def finish_merge(self) -> Manifest:
        """The manifest once the pending merge is in place (pure)."""
        pm = self.pending
        if pm is None:
            return self
        first = self.point(pm.drop[0])
        points = []
        for p in self.points:
            if p.id in pm.drop:
                continue
            if p.id == pm.child:
                p = dataclasses.replace(
                    p,
                    parent=first.parent,
                    kind=PointKind.of(first.parent),
                    checksums=pm.checksums,
                    stored_bytes=pm.stored_bytes,
                    data_bytes=pm.data_bytes,
                    zero_bytes=pm.zero_bytes,
                )
            points.append(p)
        return dataclasses.replace(self, points=tuple(points), pending=None)


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes the manifest's own SHA-256 is taken of: ``body`` as compact JSON with sorted keys."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def to_dict(m: Manifest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "pool": m.image.pool,
        "namespace": m.image.namespace,
        "image": m.image.name,
        "image_id": m.image_id,
        "target_tag": m.target_tag,
        "points": [dataclasses.asdict(p) for p in m.points],
        "pending": None if m.pending is None else dataclasses.asdict(m.pending),
    }
    if m.writing:
        body["writing"] = list(m.writing)
    for p in body["points"]:
        p["flags"] = list(p["flags"])
        if p["image_config"] is None:  # absent, as in manifests written before it existed
            del p["image_config"]
        else:
            p["image_config"]["features"] = list(p["image_config"]["features"])
            p["image_config"]["meta"] = dict(p["image_config"]["meta"])
    return body


def dumps(m: Manifest) -> bytes:
    body = to_dict(m)
    body["sha256"] = hashlib.sha256(canonical(body)).hexdigest()
    return json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False).encode() + b"\n"


def _image_config(raw: dict[str, Any] | None) -> ImageConfig | None:
    if raw is None:
        return None
    pool = raw["data_pool"]
    return ImageConfig(
        object_size=int(raw["object_size"]),
        stripe_unit=int(raw["stripe_unit"]),
        stripe_count=int(raw["stripe_count"]),
        data_pool=None if pool is None else str(pool),
        features=tuple(str(f) for f in raw["features"]),
        meta=tuple(sorted((str(k), str(v)) for k, v in dict(raw.get("meta", {})).items())),
    )


def _point(raw: dict[str, Any]) -> Point:
    sums = raw.get("checksums")
    return Point(
        id=str(raw["id"]),
        file=str(raw["file"]),
        parent=None if raw["parent"] is None else str(raw["parent"]),
        created=str(raw["created"]),
        size=int(raw["size"]),
        image_id=str(raw["image_id"]),
        snapshot=Snapshot(str(raw["snapshot"]["name"]), int(raw["snapshot"]["id"])),
        kind=PointKind(str(raw["kind"])),
        stored_bytes=int(raw["stored_bytes"]),
        data_bytes=int(raw["data_bytes"]),
        zero_bytes=int(raw["zero_bytes"]),
        checksums=None if sums is None else Checksums(**sums),
        flags=tuple(str(f) for f in raw.get("flags", ())),
        flag_reasons=tuple(
            Flag(str(f["name"]), str(f["check"]), str(f["reason"]), str(f["time"])) for f in raw.get("flag_reasons", ())
        ),
        image_config=_image_config(raw.get("image_config")),
    )


def _pending(raw: dict[str, Any] | None, where: str) -> PendingMerge | None:
    if raw is None:
        return None
    method = str(raw.get("method", MergeMethod.COPY))
    if method not in {m.value for m in MergeMethod}:
        raise ChainDamaged(where, f"pending merge has unknown method {method!r}")
    return PendingMerge(
        child=str(raw["child"]),
        drop=tuple(str(d) for d in raw["drop"]),
        checksums=Checksums(**raw["checksums"]),
        stored_bytes=int(raw["stored_bytes"]),
        data_bytes=int(raw["data_bytes"]),
        zero_bytes=int(raw["zero_bytes"]),
        method=MergeMethod(method),
    )


def _names(raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(n, str) for n in raw):
        raise TypeError("writing is not a list of file names")
    return tuple(raw)


def loads(data: bytes, where: str) -> Manifest:
    try:
        body = json.loads(data)
        digest = body.pop("sha256")
        if hashlib.sha256(canonical(body)).hexdigest() != digest:
            raise ChainDamaged(where, "manifest checksum mismatch")
        if body["format"] != FORMAT or body["version"] != VERSION:
            raise ChainDamaged(where, f"unknown manifest format {body['format']!r} v{body['version']}")
        m = Manifest(
            image=ImageSpec(str(body["pool"]), str(body["namespace"]), str(body["image"])),
            image_id=str(body["image_id"]),
            target_tag=str(body["target_tag"]),
            points=tuple(_point(p) for p in body["points"]),
            pending=_pending(body.get("pending"), where),
            writing=_names(body.get("writing", [])),
        )
    except ChainDamaged:
        raise
    except RecursionError as exc:  # a deeply nested document, not a manifest
        raise ChainDamaged(where, "unreadable manifest: nested too deeply") from exc
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise ChainDamaged(where, f"unreadable manifest: {exc!r}") from exc
    _check_consistency(m, where)
    return m


def _check_consistency(m: Manifest, where: str) -> None:
    seen: set[str] = set()
    for p in m.points:
        if not is_point_id(p.id) or p.file != layer_file(p.id):
            raise ChainDamaged(where, f"bad point id or file name {p.id!r}/{p.file!r}")
        if p.parent is not None and p.parent not in seen:
            raise ChainDamaged(where, f"point {p.id} has unknown parent {p.parent}")
        if p.id in seen:
            raise ChainDamaged(where, f"duplicate point {p.id}")
        if p.checksums is not None and p.checksums.file != sums_file(p.id):
            raise ChainDamaged(where, f"point {p.id} names checksum file {p.checksums.file!r}")
        seen.add(p.id)
    for name in m.writing:
        if not OWN_FILE.fullmatch(name):
            raise ChainDamaged(where, f"journal names {name!r}, not a file of a chain")
    pm = m.pending
    if pm is not None:
        ids = [*pm.drop, pm.child]
        if pm.checksums.file != sums_file(pm.child):
            raise ChainDamaged(where, f"pending merge names checksum file {pm.checksums.file!r}")
        if not pm.drop or any(i not in seen for i in ids):
            raise ChainDamaged(where, f"pending merge names unknown points {ids}")
        parents = [m.point(i).parent for i in ids[1:]]
        if parents != ids[:-1]:
            raise ChainDamaged(where, f"pending merge of {ids} is not a run of consecutive layers")


def load(directory: Path) -> Manifest | None:
    """The chain's manifest; None for a directory that holds no chain (no manifest, no layers).

    Layer or checksum files without a manifest are a damaged chain
    (:class:`ChainDamaged`): nothing may treat them as leftovers.
    """
    path = directory / NAME
    try:
        with os.fdopen(open_regular(path), "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        stray = own_files(directory)
        if stray:
            shown = ", ".join(stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")
            why = f"{NAME} is missing but the directory holds {shown}; {REPAIR_HINT}"
            raise ChainDamaged(str(directory), why) from None
        return None
    return loads(data, str(directory))


def own_files(directory: Path) -> list[str]:
    """The files of a chain's name shapes in ``directory`` (regular files only), sorted."""
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.name for e in entries if OWN_FILE.fullmatch(e.name) and e.is_file(follow_symlinks=False))


def save(directory: Path, m: Manifest) -> None:
    atomic_write(directory / NAME, dumps(m))
