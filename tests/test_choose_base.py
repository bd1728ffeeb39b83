"""Table tests of :func:`choose_base`: incremental from the latest point, or a new full chain."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from factories import IMAGE_ID, manifest, point

from rbd2qcow2.adapters.ceph import SnapInfo
from rbd2qcow2.ops.backup import Base, choose_base
from rbd2qcow2.store import manifest as mf

GiB = 1 << 30
P1, P2 = "20240301T000000Z", "20240302T000000Z"


def snaps_of(*points: mf.Point) -> list[SnapInfo]:
    return [SnapInfo(p.snapshot.id, p.snapshot.name, p.size) for p in points]


CHAIN = (point(P1, size=GiB, snap_id=10), point(P2, P1, size=GiB, snap_id=11))
LATEST = CHAIN[-1]
USER_SNAPS = [SnapInfo(3, "daily", 1 << 30), SnapInfo(4, "rbd2qcow2.other", 1 << 30)]


@dataclasses.dataclass
class Case:
    manifest: mf.Manifest
    snapshots: list[SnapInfo]
    image_id: str = IMAGE_ID
    full: bool = False
    files: tuple[str, ...] = tuple(p.file for p in CHAIN)  # layer files present in the directory
    setup: Callable[[Path], None] | None = None


CASES: list[tuple[str, Case, str | None, str]] = [
    # id, case, expected base point id (None = full), expected words in the reason
    ("incremental", Case(manifest(*CHAIN), snaps_of(*CHAIN)), P2, f"changes since {P2}"),
    ("incremental among user snapshots", Case(manifest(*CHAIN), [*USER_SNAPS, *snaps_of(LATEST)]), P2, "changes"),
    ("incremental from a lone full point", Case(manifest(CHAIN[0]), snaps_of(CHAIN[0])), P1, f"changes since {P1}"),
    ("--full", Case(manifest(*CHAIN), snaps_of(*CHAIN), full=True), None, "full backup requested"),
    ("--full and no points", Case(manifest(), [], full=True, files=()), None, "full backup requested"),
    ("no points", Case(manifest(), snaps_of(*CHAIN), files=()), None, "first backup"),
    (
        "image re-created",
        Case(manifest(*CHAIN), snaps_of(*CHAIN), image_id="99999999"),
        None,
        f"re-created (id 99999999, chain has {IMAGE_ID})",
    ),
    (
        "latest flagged damaged",
        Case(manifest(CHAIN[0], dataclasses.replace(LATEST, flags=("damaged",))), snaps_of(*CHAIN)),
        None,
        f"point {P2} failed verification",
    ),
    (
        "damaged among other flags",
        Case(manifest(CHAIN[0], dataclasses.replace(LATEST, flags=("x", "damaged"))), snaps_of(*CHAIN)),
        None,
        "failed verification",
    ),
    (
        "other flags do not matter",
        Case(manifest(CHAIN[0], dataclasses.replace(LATEST, flags=("verified",))), snaps_of(*CHAIN)),
        P2,
        "changes",
    ),
    (
        "only an older point damaged",
        Case(manifest(dataclasses.replace(CHAIN[0], flags=("damaged",)), LATEST), snaps_of(*CHAIN)),
        P2,
        "changes",
    ),
    (
        "snapshot gone",
        Case(manifest(*CHAIN), [*USER_SNAPS, *snaps_of(CHAIN[0])]),
        None,
        f"snapshot {LATEST.snapshot.name} of the last point is gone",
    ),
    ("no snapshots at all", Case(manifest(*CHAIN), []), None, "is gone"),
    (
        "snapshot re-created with another id",
        Case(manifest(*CHAIN), [SnapInfo(99, LATEST.snapshot.name, 1 << 30)]),
        None,
        f"has id 99, manifest says {LATEST.snapshot.id}",
    ),
    (
        "another snapshot has the recorded id",
        Case(manifest(*CHAIN), [SnapInfo(LATEST.snapshot.id, "daily", 1 << 30)]),
        None,
        "is gone",
    ),
    (
        "layer file missing",
        Case(manifest(*CHAIN), snaps_of(*CHAIN), files=(CHAIN[0].file,)),
        None,
        f"layer {LATEST.file} is missing",
    ),
    (
        "layer is a directory",
        Case(manifest(*CHAIN), snaps_of(*CHAIN), files=(CHAIN[0].file,), setup=lambda d: (d / LATEST.file).mkdir()),
        None,
        "is missing",
    ),
    (
        "only a partial layer",
        Case(
            manifest(*CHAIN),
            snaps_of(*CHAIN),
            files=(CHAIN[0].file, f"{LATEST.file}.partial"),
        ),
        None,
        "is missing",
    ),
    (
        # the image-id check comes before the snapshot checks
        "re-created and snapshot gone",
        Case(manifest(*CHAIN), [], image_id="99999999"),
        None,
        "re-created",
    ),
    (
        # --full wins over everything
        "--full and damaged",
        Case(manifest(CHAIN[0], dataclasses.replace(LATEST, flags=("damaged",))), [], full=True),
        None,
        "full backup requested",
    ),
]


@pytest.mark.parametrize(("case", "expected", "reason"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_choose_base(tmp_path: Path, case: Case, expected: str | None, reason: str) -> None:
    for name in case.files:
        (tmp_path / name).write_bytes(b"layer")
    if case.setup is not None:
        case.setup(tmp_path)
    base = choose_base(case.manifest, case.snapshots, case.image_id, full=case.full, directory=tmp_path)
    assert isinstance(base, Base)
    assert (base.point.id if base.point else None) == expected
    assert reason in base.reason
    if expected is None:
        assert base.point is None
        if not case.full and case.manifest.points:
            assert base.reason.endswith("new chain")
    else:
        assert base.point == case.manifest.point(expected)


def test_choose_base_is_pure(tmp_path: Path) -> None:
    """Same inputs, same answer; the manifest and the directory are left alone."""
    (tmp_path / LATEST.file).write_bytes(b"layer")
    m = manifest(*CHAIN)
    before = sorted(p.name for p in tmp_path.iterdir())
    first = choose_base(m, snaps_of(*CHAIN), IMAGE_ID, full=False, directory=tmp_path)
    second = choose_base(m, snaps_of(*CHAIN), IMAGE_ID, full=False, directory=tmp_path)
    assert first == second
    assert m == manifest(*CHAIN)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_choose_base_uses_the_latest_point_only(tmp_path: Path) -> None:
    """An older point with an intact snapshot is no base when the latest's snapshot is gone."""
    for p in CHAIN:
        (tmp_path / p.file).write_bytes(b"layer")
    base = choose_base(manifest(*CHAIN), snaps_of(CHAIN[0]), IMAGE_ID, full=False, directory=tmp_path)
    assert base.point is None
