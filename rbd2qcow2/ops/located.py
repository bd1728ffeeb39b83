"""A point found for reading (restore, overlay, serving): its checked chain, and what its data must be.

Finding the point checks the chain's headers against the manifest before
qemu opens a file (:func:`rbd2qcow2.store.chain.checked_chain`); a chain
handed out whole must also pass :func:`check_structure`; a copy of the
point is checked block by block against :func:`block_check`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..adapters import qemu
from ..core.errors import ChainDamaged, Error, LayerCorrupt
from ..core.kinds import PointFlag
from ..core.threads import in_parallel
from ..store import manifest as mf
from ..store.chain import checked_chain
from ..store.checksums import MISMATCH, SumsMismatch, chain_digests, check_sums_file
from ..store.refs import parse_ref, select
from ..transfer.copier import BlockCheck
from .access import READ, with_chain

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Located:
    """A point and its checked chain of files, base first."""

    ref: str
    point: mf.Point
    files: list[Path]
    directory: Path
    manifest: mf.Manifest


def locate(target: Path, ref_text: str) -> Located:
    """Find the point ``POOL/IMAGE@POINT`` and check its chain's headers."""
    ref = parse_ref(ref_text)
    with with_chain(target, ref.image, READ) as chain:
        m, directory = chain.manifest, chain.directory
    assert m is not None
    point = select(m, ref)
    flagged = [p.id for p in m.chain_of(point.id) if PointFlag.DAMAGED in p.flags]
    if flagged:
        logger.warning(
            "%s@%s: points of its chain failed verification (%s); the data may not be what was backed up",
            ref.image,
            point.id,
            ", ".join(flagged),
        )
    files = checked_chain(directory, m, point.id)
    return Located(f"{ref.image}@{point.id}", point, files, directory, m)


def checked_sums(loc: Located, layer: mf.Point) -> Path:
    """A layer's checksum file, checked against the manifest; any fault is the point's damage."""
    assert layer.checksums is not None
    path = loc.directory / layer.checksums.file
    try:
        check_sums_file(path, layer.checksums.sha256)
    except SumsMismatch as exc:
        raise ChainDamaged(loc.ref, f"{layer.checksums.file}: {MISMATCH}") from exc
    except OSError as exc:
        raise ChainDamaged(loc.ref, f"{layer.checksums.file}: cannot read: {exc.strerror or exc}") from exc
    return path


def check_structure(loc: Located, *, parallel: int = 4) -> None:
    """What a chain handed out whole must pass: ``qemu-img check`` of every layer, and checksum files
    as the manifest recorded them.  Headers were checked by :func:`locate`."""
    for p in loc.manifest.chain_of(loc.point.id):
        if p.checksums is not None:
            checked_sums(loc, p)

    def check(path: Path) -> Error | None:
        try:
            qemu.check_layer(path)
        except Error as exc:
            return exc
        return None

    for path, error in zip(loc.files, in_parallel(check, loc.files, parallel, "check"), strict=True):
        if error is not None:
            if not isinstance(error, LayerCorrupt):  # qemu could not run the check: nothing known of the layer
                raise error
            raise ChainDamaged(loc.ref, f"{path.name}: {error}") from error


def expected_digests(loc: Located) -> dict[int, bytes] | None:
    """The expected digest of every block some layer of the chain recorded; None when a layer
    recorded none (older manifests), as the point then cannot be checked.

    A point's block is the record of the newest layer of its chain that
    recorded it (a layer smaller than its parent cuts off its parent's
    blocks beyond its size), or zeros; see :meth:`verify.ChainVerifier.expected`.
    """
    chain = loc.manifest.chain_of(loc.point.id)
    if any(p.checksums is None for p in chain):
        return None
    layers: list[tuple[Path | None, int]] = [(checked_sums(loc, layer), layer.size) for layer in chain]
    try:
        return chain_digests(layers)
    except OSError as exc:
        raise ChainDamaged(loc.ref, f"a checksum file cannot be read: {exc.strerror or exc}") from exc


def block_check(loc: Located) -> BlockCheck | None:
    digests = expected_digests(loc)
    if digests is None:
        logger.warning("%s: a layer of its chain has no checksums; the restored data is not checked", loc.ref)
        return None
    return BlockCheck(loc.ref, digests, loc.point.size)


__all__ = ["Located", "block_check", "check_structure", "checked_sums", "expected_digests", "locate"]
