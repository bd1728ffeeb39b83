"""ops.access.with_chain: the one way a command opens a chain (target, lock, manifest, leftovers)."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from factories import manifest, point

from rbd2qcow2.core.errors import ChainDamaged, Locked, NotFound, TargetError
from rbd2qcow2.core.kinds import MergeMethod, PointFlag, PointKind
from rbd2qcow2.core.names import ImageSpec, point_id
from rbd2qcow2.ops.access import BACKUP, CHANGE, CHECK, READ, with_chain
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.fsutil import chain_lock
from rbd2qcow2.store.layout import LOCK, OWN_FILE, point_time, time_stamp
from rbd2qcow2.store.target import chain_dir, open_target

IMAGE = ImageSpec("rbd", "", "vm-1")
P1 = "20261122T010203Z"


def chain(target: Path, *, writing: tuple[str, ...] = ()) -> tuple[Path, mf.Manifest]:
    """A target with one chain of one point (its layer file a placeholder: nothing here reads it)."""
    tag = open_target(target, create=True)
    directory = chain_dir(target, IMAGE)
    directory.mkdir(parents=True)
    (directory / f"{P1}.qcow2").write_bytes(b"")
    m = manifest(point(P1, tag=tag), image=IMAGE, tag=tag, writing=writing)
    mf.save(directory, m)
    return directory, m


def assert_locked(directory: Path) -> None:
    with pytest.raises(Locked), chain_lock(directory, wait=False, what="test"):
        pass


def test_change_locks_loads_and_removes_what_the_journal_names(tmp_path: Path) -> None:
    leftover = "20261123T000000Z.qcow2.partial"
    directory, m = chain(tmp_path, writing=(leftover,))
    (directory / leftover).write_bytes(b"x")
    with with_chain(tmp_path, IMAGE, CHANGE) as opened:
        assert opened.directory == directory
        assert opened.manifest == dataclasses.replace(m, writing=())
        assert not (directory / leftover).exists()
        assert_locked(directory)
    assert mf.load(directory) == dataclasses.replace(m, writing=())
    with chain_lock(directory, wait=False, what="test"):  # free again
        pass


def test_change_of_an_image_without_backups_is_not_found_and_creates_nothing(tmp_path: Path) -> None:
    open_target(tmp_path, create=True)
    chain_dir(tmp_path, IMAGE).mkdir(parents=True)
    with pytest.raises(NotFound, match="no backups of rbd/vm-1"), with_chain(tmp_path, IMAGE, CHANGE):
        pass
    assert not (chain_dir(tmp_path, IMAGE) / LOCK).exists()


def test_layers_without_a_manifest_are_damage_not_absence(tmp_path: Path) -> None:
    directory, _ = chain(tmp_path)
    (directory / mf.NAME).unlink()
    for access in (CHANGE, READ):
        with pytest.raises(ChainDamaged), with_chain(tmp_path, IMAGE, access):
            pass


def test_read_takes_no_lock_and_changes_nothing(tmp_path: Path) -> None:
    leftover = "20261123T000000Z.sums.partial"
    directory, m = chain(tmp_path, writing=(leftover,))
    (directory / leftover).write_bytes(b"x")
    with with_chain(tmp_path, IMAGE, READ) as opened:
        assert opened.manifest == m
    assert (directory / leftover).exists()
    assert not (directory / LOCK).exists()
    with pytest.raises(NotFound), with_chain(tmp_path, ImageSpec("rbd", "", "other"), READ):
        pass


def test_check_holds_the_lock_and_leaves_the_journal(tmp_path: Path) -> None:
    leftover = "20261123T000000Z.qcow2.partial"
    directory, m = chain(tmp_path, writing=(leftover,))
    (directory / leftover).write_bytes(b"x")
    with with_chain(tmp_path, IMAGE, CHECK) as opened:
        assert opened.manifest == m
        assert_locked(directory)
    assert (directory / leftover).exists()


def test_backup_creates_the_target_and_the_chain_directory(tmp_path: Path) -> None:
    target = tmp_path / "new"
    with with_chain(target, IMAGE, BACKUP) as opened:
        assert opened.manifest is None
        assert opened.directory == chain_dir(target, IMAGE)
        assert opened.directory.is_dir()
        assert opened.tag == open_target(target, create=False)
        assert_locked(opened.directory)


def test_backup_refuses_a_manifest_of_another_target(tmp_path: Path) -> None:
    directory, m = chain(tmp_path)
    mf.save(directory, dataclasses.replace(m, target_tag="00000000"))
    with pytest.raises(ChainDamaged, match="another target"), with_chain(tmp_path, IMAGE, BACKUP):
        pass


def test_a_target_is_opened_not_made_except_by_a_backup(tmp_path: Path) -> None:
    for access in (CHANGE, CHECK, READ):
        with pytest.raises(TargetError, match="not an rbd2qcow2 target"), with_chain(tmp_path, IMAGE, access):
            pass


# -- the on-disk facts and the domain values ------------------------------------------


def test_point_ids_and_their_times() -> None:
    when = datetime(2026, 11, 22, 1, 2, 3, tzinfo=UTC)
    assert time_stamp(when) == P1
    assert point_id(when, {P1}) == f"{P1}-2"
    assert point_time(P1) == when
    assert point_time(f"{P1}-2") == when
    assert OWN_FILE.fullmatch(f"{P1}-2.sums.merge")
    assert not OWN_FILE.fullmatch(f"{P1}.qcow2.tmp")


def test_domain_values_are_the_strings_of_the_manifest() -> None:
    assert [str(k) for k in PointKind] == ["full", "incremental"]
    assert [str(f) for f in PointFlag] == ["damaged", "no-incremental", "repaired", "no-snapshot"]
    assert [str(m) for m in MergeMethod] == ["copy", "commit"]
    body = json.loads(mf.dumps(manifest(point(P1), image=IMAGE)))
    assert body["points"][0]["kind"] == "full"
    assert mf.loads(mf.dumps(manifest(point(P1), image=IMAGE, image_id="")), "here").points[0].kind is PointKind.FULL
