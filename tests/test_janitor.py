"""The snapshot janitor: background removal of snapshots no point needs (a fake image, no Ceph)."""

from __future__ import annotations

import logging
import threading
from contextlib import ExitStack
from typing import cast

import pytest

from rbd2qcow2.adapters.ceph import RbdImage
from rbd2qcow2.core.errors import CephError, NotFound
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.ops.backup import SnapshotJanitor, remove_snapshots

IMAGE = ImageSpec("rbd", "", "vm")


class FakeImage:
    def __init__(self, snapshots: list[str], fail: dict[str, Exception] | None = None) -> None:
        self.snapshots = set(snapshots)
        self.fail = fail or {}
        self.closed = False
        self.release = threading.Event()
        self.release.set()

    def remove_snapshot(self, name: str) -> None:
        self.release.wait(5)
        if name in self.fail:
            raise self.fail[name]
        if name not in self.snapshots:
            raise NotFound(f"snapshot {name}")
        self.snapshots.remove(name)

    def close(self) -> None:
        self.closed = True


def owned(img: FakeImage) -> ExitStack:
    stack = ExitStack()
    stack.callback(img.close)
    return stack


def test_removes_in_the_background_then_closes_the_image() -> None:
    imgs = [FakeImage(["old", "keep"]) for _ in range(5)]
    with SnapshotJanitor(workers=2) as janitor:
        for img in imgs:
            janitor.submit(IMAGE, cast(RbdImage, img), ["old"], owned(img))
    assert all(img.snapshots == {"keep"} and img.closed for img in imgs)


def test_a_snapshot_already_gone_is_fine_and_a_failure_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    img = FakeImage(["b", "c"], fail={"b": CephError("rbd/vm: remove snapshot b: busy")})
    with caplog.at_level(logging.WARNING):
        remove_snapshots(IMAGE, cast(RbdImage, img), ["a", "b", "c"])
    assert img.snapshots == {"b"}  # a: gone already; b: failed and stays; c: removed after the failure
    assert [r.getMessage() for r in caplog.records] == [
        "rbd/vm: old snapshot b not removed: Ceph: rbd/vm: remove snapshot b: busy (the next run removes it)"
    ]


def test_after_an_exception_pending_removals_are_skipped_but_every_image_is_closed() -> None:
    first = FakeImage(["old"])
    first.release.clear()  # the first removal blocks until released
    rest = [FakeImage(["old"]) for _ in range(3)]

    class Stop(Exception):
        pass

    with pytest.raises(Stop), SnapshotJanitor(workers=1) as janitor:
        janitor.submit(IMAGE, cast(RbdImage, first), ["old"], owned(first))
        for img in rest:
            janitor.submit(IMAGE, cast(RbdImage, img), ["old"], owned(img))
        threading.Timer(0.2, first.release.set).start()
        raise Stop
    assert first.snapshots == set()  # the removal in progress completed
    assert all(img.snapshots == {"old"} for img in rest)  # the pending ones were skipped
    assert first.closed and all(img.closed for img in rest)


def test_an_unexpected_exception_in_the_background_is_logged_and_the_image_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    img = FakeImage(["old"], fail={"old": RuntimeError("a bug")})
    with caplog.at_level(logging.ERROR), SnapshotJanitor() as janitor:
        janitor.submit(IMAGE, cast(RbdImage, img), ["old"], owned(img))
    assert img.closed
    assert "rbd/vm: removing old snapshots failed" in caplog.text and "a bug" in caplog.text
