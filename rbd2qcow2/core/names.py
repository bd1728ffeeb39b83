"""Pure naming rules: image specs, chain directories, point ids, snapshot names.

Directory names must be safe for any RBD name: spaces, unicode, a leading
``-`` or ``.``, ``/``-free but otherwise arbitrary bytes.  The encoding keeps
``[A-Za-z0-9_.-]`` and percent-escapes every other UTF-8 byte (``%`` included),
so it is injective: two different names never share a directory.  A leading
``-`` or ``.`` is escaped too, so no name becomes an option or a dot file.
Encoded names longer than :data:`MAX_COMPONENT` are cut and given a hash
suffix, which keeps them unique.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import UsageError

MAX_COMPONENT = 200
NAMESPACE_MARK = "@"  # never produced by encode(), so "@ns" cannot collide
SNAP_PREFIX = "rbd2qcow2"
_SAFE = re.compile(rb"[A-Za-z0-9_.-]")
# A point id: the UTC time its snapshot was taken, and "-N" when that second was taken already.
POINT_ID_FORMAT = "%Y%m%dT%H%M%SZ"
POINT_ID_PATTERN = r"[0-9]{8}T[0-9]{6}Z(-[0-9]+)?"
# The files of a chain: a point's layer and its checksums, and the names a file has while a
# backup writes it (``.partial``) or a merge builds it (``.merge``); ``.tmp``: an atomic write's.
LAYER_SUFFIX = ".qcow2"
SUMS_SUFFIX = ".sums"
PARTIAL_SUFFIX = ".partial"
MERGE_SUFFIX = ".merge"
TMP_SUFFIX = ".tmp"
_POINT_RE = re.compile(POINT_ID_PATTERN)
_TAG_RE = re.compile(r"[0-9a-f]{8}")


@dataclass(frozen=True, order=True)
class ImageSpec:
    """One RBD image: pool, namespace ("" for the default) and name."""

    pool: str
    namespace: str
    name: str

    def __str__(self) -> str:
        if self.namespace:
            return f"{self.pool}/{self.namespace}/{self.name}"
        return f"{self.pool}/{self.name}"


@dataclass(frozen=True)
class Selector:
    """What a SPEC argument selects: a whole pool (name None) or one image."""

    pool: str
    namespace: str | None
    name: str | None

    def matches(self, image: ImageSpec) -> bool:
        if image.pool != self.pool:
            return False
        if self.namespace is not None and image.namespace != self.namespace:
            return False
        return self.name is None or image.name == self.name


def _check_part(part: str, what: str, spec: str) -> str:
    if not part:
        raise UsageError(f"empty {what} in {spec!r}")
    if "\0" in part or "@" in part:
        raise UsageError(f"invalid character in {what} of {spec!r}")
    return part


def parse_spec(spec: str) -> Selector:
    """``POOL``, ``POOL/IMAGE`` or ``POOL/NAMESPACE/IMAGE``."""
    parts = spec.split("/")
    if len(parts) == 1:
        return Selector(_check_part(parts[0], "pool", spec), None, None)
    if len(parts) == 2:
        pool, name = parts
        return Selector(_check_part(pool, "pool", spec), "", _check_part(name, "image", spec))
    if len(parts) == 3:
        pool, ns, name = parts
        return Selector(
            _check_part(pool, "pool", spec),
            _check_part(ns, "namespace", spec),
            _check_part(name, "image", spec),
        )
    raise UsageError(f"invalid image spec {spec!r}: expected POOL, POOL/IMAGE or POOL/NS/IMAGE")


def encode(name: str) -> str:
    """An injective, file-system-safe encoding of an RBD name (see module doc)."""
    raw = name.encode("utf-8", "surrogatepass")
    out = []
    for i, byte in enumerate(raw):
        char = bytes([byte])
        leading = i == 0 and char in (b"-", b".")
        out.append(char.decode() if _SAFE.match(char) and not leading else f"%{byte:02X}")
    encoded = "".join(out) or "%"
    if len(encoded) > MAX_COMPONENT:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        encoded = f"{encoded[: MAX_COMPONENT - 18]}~{digest}"
    return encoded


def chain_relpath(image: ImageSpec) -> tuple[str, ...]:
    """The chain directory of an image, relative to the target, as components."""
    if image.namespace:
        return (encode(image.pool), NAMESPACE_MARK + encode(image.namespace), encode(image.name))
    return (encode(image.pool), encode(image.name))


def point_id(when: datetime, taken: set[str]) -> str:
    """A sortable point id from a UTC time, unique among ``taken``."""
    base = time_stamp(when)
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def is_point_id(text: str) -> bool:
    return bool(_POINT_RE.fullmatch(text))


def point_time(point: str) -> datetime:
    """The UTC time a point id names (its ``-N`` suffix ignored)."""
    return datetime.strptime(point[:16], POINT_ID_FORMAT).replace(tzinfo=UTC)


def time_stamp(when: datetime) -> str:
    """``when`` (UTC) written as a point id writes its time."""
    return when.astimezone(UTC).strftime(POINT_ID_FORMAT)


def layer_file(point: str) -> str:
    return f"{point}{LAYER_SUFFIX}"


def sums_file(point: str) -> str:
    return f"{point}{SUMS_SUFFIX}"


def partial(name: str) -> str:
    return f"{name}{PARTIAL_SUFFIX}"


def merging(name: str) -> str:
    """The name ``name`` has while a merge builds it."""
    return f"{name}{MERGE_SUFFIX}"


def hidden_tmp(name: str) -> str:
    """The hidden temporary file an atomic write of ``name`` goes through."""
    return f".{name}{TMP_SUFFIX}"


def snapshot_name(target_tag: str, point: str) -> str:
    """The RBD snapshot a point is taken from: prefix, the target's tag, the point."""
    return f"{SNAP_PREFIX}.{target_tag}.{point}"


def is_own_snapshot(snap_name: str, target_tag: str) -> bool:
    """True for snapshots this target created (never a user's or another target's)."""
    prefix = f"{SNAP_PREFIX}.{target_tag}."
    return snap_name.startswith(prefix) and is_point_id(snap_name[len(prefix) :])


def is_target_tag(text: str) -> bool:
    return bool(_TAG_RE.fullmatch(text))
