"""Pure resolution of point references: ``POOL/IMAGE@POINT``.

``POINT`` is a point id as ``backup`` prints it (``20261122T010203Z``),
``latest``, or a prefix of an id written as a date or time
(``2026-11-22``, ``2026-11-22T01``, ``20261122``): the prefix must select
exactly one point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core.errors import NotFound, UsageError
from ..core.names import ImageSpec, parse_spec
from . import manifest as mf

_DATE_CHARS = re.compile(r"[0-9T:Z-]+")


@dataclass(frozen=True)
class PointRef:
    image: ImageSpec
    selector: str

    def __str__(self) -> str:
        return f"{self.image}@{self.selector}"


def parse_ref(text: str) -> PointRef:
    if "@" not in text:
        raise UsageError(f"point {text!r}: expected POOL/IMAGE@POINT (POINT: an id, 'latest' or a date)")
    spec, selector = text.rsplit("@", 1)
    sel = parse_spec(spec)
    if sel.name is None:
        raise UsageError(f"point {text!r}: name an image, POOL/IMAGE@POINT")
    if not selector:
        raise UsageError(f"point {text!r}: empty point after '@'")
    return PointRef(ImageSpec(sel.pool, sel.namespace or "", sel.name), selector)


def select(m: mf.Manifest, ref: PointRef) -> mf.Point:
    """The one point of ``m`` that ``ref`` names; never one that an unfinished merge is rewriting."""
    point = _select(m, ref)
    pm = m.pending
    if pm is not None and pm.method == "commit" and point.id in pm.drop:
        raise NotFound(
            f"point {ref.image}@{point.id} is being merged away by an unfinished prune "
            "(the next prune or backup of the image finishes it)"
        )
    return point


def _select(m: mf.Manifest, ref: PointRef) -> mf.Point:
    if not m.points:
        raise NotFound(f"{ref.image} has no points")
    if ref.selector == "latest":
        latest = m.latest
        assert latest is not None
        return latest
    exact = [p for p in m.points if p.id == ref.selector]
    if exact:
        return exact[0]
    if not _DATE_CHARS.fullmatch(ref.selector):
        raise NotFound(f"no point {ref}")
    prefix = ref.selector.replace("-", "").replace(":", "")
    found = [p for p in m.points if p.id.startswith(prefix)]
    if not found:
        raise NotFound(f"no point {ref}")
    if len(found) > 1:
        ids = ", ".join(p.id for p in found)
        raise UsageError(f"{ref} is ambiguous: {ids}")
    return found[0]
