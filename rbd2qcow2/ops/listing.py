"""``list``: chains and their points, read from the manifests only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ChainDamaged
from ..core.names import Selector
from ..core.units import human_size
from ..store import manifest as mf
from ..store.target import iter_chains, open_target


@dataclass(frozen=True)
class PointRow:
    ref: str
    point: mf.Point
    depth: int  # layers from the base to this point, inclusive


def list_points(target: Path, selectors: list[Selector]) -> tuple[list[PointRow], list[ChainDamaged]]:
    """Points of every selected chain, oldest first; damaged manifests apart."""
    open_target(target, create=False)
    rows: list[PointRow] = []
    damaged: list[ChainDamaged] = []
    for _path, item in iter_chains(target):
        if isinstance(item, ChainDamaged):
            damaged.append(item)
            continue
        if selectors and not any(s.matches(item.image) for s in selectors):
            continue
        for p in item.points:
            rows.append(PointRow(f"{item.image}@{p.id}", p, len(item.chain_of(p.id))))
    return rows, damaged


def row_dict(row: PointRow) -> dict[str, Any]:
    p = row.point
    return {
        "point": row.ref,
        "id": p.id,
        "created": p.created,
        "kind": p.kind,
        "parent": p.parent,
        "depth": row.depth,
        "virtual_size": p.size,
        "stored_bytes": p.stored_bytes,
        "data_bytes": p.data_bytes,
        "zero_bytes": p.zero_bytes,
        "snapshot": p.snapshot.name,
        "snapshot_id": p.snapshot.id,
        "image_id": p.image_id,
        "file": p.file,
        "flags": list(p.flags),
        "flag_reasons": [
            {"flag": f.name, "check": f.check, "reason": f.reason, "time": f.time}
            for name in p.flags
            for f in p.reasons(name)
        ],
    }


def format_table(rows: list[PointRow]) -> str:
    header = ("POINT", "CREATED", "KIND", "DEPTH", "SIZE", "STORED", "SNAPSHOT")
    lines = [header]
    for r in rows:
        p = r.point
        lines.append(
            (
                r.ref + (" [" + ",".join(p.flags) + "]" if p.flags else ""),
                p.created,
                p.kind,
                str(r.depth),
                human_size(p.size),
                human_size(p.stored_bytes),
                p.snapshot.name,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(col.ljust(w) for col, w in zip(line, widths, strict=False)).rstrip() for line in lines]
    return "\n".join(table + _flag_notes(rows))


def _flag_notes(rows: list[PointRow]) -> list[str]:
    """Below the table: why each flagged point carries its flags."""
    notes = [
        f"{r.ref} {f.name}: " + (f"{f.check} check, {f.time}: " if f.check else "") + f.reason
        for r in rows
        for name in r.point.flags
        for f in r.point.reasons(name)
    ]
    return ["", *notes] if notes else []
