"""An open RBD image: snapshots, diffs, metadata, reads and writes."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import rados
import rbd

from ...core.errors import CephError
from ...core.extents import Extent
from .calls import wrap
from .writes import AsyncWrites

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapInfo:
    """One snapshot of an image: librbd's id, its name, the image's size then."""

    id: int
    name: str
    size: int


@dataclass(frozen=True)
class ImageSettings:
    """An image's layout and options as librbd reports them."""

    object_size: int
    stripe_unit: int
    stripe_count: int
    data_pool_id: int  # the image's own pool where it has no separate data pool
    features: tuple[str, ...]  # ``rbd create --image-feature`` names
    meta: tuple[tuple[str, str], ...]  # image-meta key/values, sorted by key


@dataclass(frozen=True)
class NewImage:
    """How to lay out a new image; None: the cluster's default."""

    order: int | None = None  # objects of 2**order bytes
    features: tuple[str, ...] | None = None  # names of FEATURE_NAMES
    stripe_unit: int | None = None
    stripe_count: int | None = None
    data_pool: str | None = None


# librbd's feature bits by the names ``rbd`` shows and takes.
FEATURE_NAMES = {
    "layering": rbd.RBD_FEATURE_LAYERING,
    "striping": rbd.RBD_FEATURE_STRIPINGV2,
    "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
    "object-map": rbd.RBD_FEATURE_OBJECT_MAP,
    "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
    "deep-flatten": rbd.RBD_FEATURE_DEEP_FLATTEN,
    "journaling": rbd.RBD_FEATURE_JOURNALING,
    "data-pool": rbd.RBD_FEATURE_DATA_POOL,
    "operations": rbd.RBD_FEATURE_OPERATIONS,
    "migrating": rbd.RBD_FEATURE_MIGRATING,
    "non-primary": rbd.RBD_FEATURE_NON_PRIMARY,
}


class RbdImage:
    """An open ``rbd.Image``."""

    def __init__(self, img: Any, label: str) -> None:
        self._img = img
        self.label = label

    def id(self) -> str:
        return str(wrap(self.label, self._img.id))

    def size(self) -> int:
        return int(wrap(self.label, self._img.size))

    def snapshots(self) -> list[SnapInfo]:
        snaps = wrap(self.label, lambda: list(self._img.list_snaps()))
        return [SnapInfo(int(s["id"]), str(s["name"]), int(s["size"])) for s in snaps]

    def snapshot_time(self, snap_id: int) -> datetime:
        """When a snapshot was taken (UTC)."""
        when: datetime = wrap(self.label, lambda: self._img.get_snap_timestamp(snap_id))
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)

    def snapshot(self, name: str) -> SnapInfo | None:
        return next((s for s in self.snapshots() if s.name == name), None)

    def create_snapshot(self, name: str) -> SnapInfo:
        wrap(f"{self.label}: create snapshot {name}", lambda: self._img.create_snap(name))
        snap = self.snapshot(name)
        if snap is None:
            raise CephError(f"{self.label}: snapshot {name} vanished after creation")
        return snap

    def remove_snapshot(self, name: str) -> None:
        wrap(f"{self.label}: remove snapshot {name}", lambda: self._img.remove_snap(name))

    @contextlib.contextmanager
    def at_snapshot(self, name: str) -> Iterator[RbdImage]:
        """This handle reading snapshot ``name`` (``rbd_snap_set``) until the block ends, then the head again.

        Where the head is open already, this saves a second image open and
        close, each a round trip to the OSDs and a header read.  The
        handle must not be used for anything else meanwhile.
        """
        wrap(f"{self.label}: set snapshot {name}", lambda: self._img.set_snap(name))
        done = False
        try:
            yield RbdImage(self._img, f"{self.label}@{name}")
            done = True
        finally:
            try:
                wrap(f"{self.label}: back to the head", lambda: self._img.set_snap(None))
            except CephError as exc:
                if done:
                    raise
                logger.error("%s", exc)  # the error that ended the block goes on

    def diff(self, offset: int, length: int, from_snapshot: str | None, whole_object: bool) -> list[Extent]:
        """Extents changed in ``[offset, offset+length)`` since ``from_snapshot``."""
        out: list[Extent] = []

        def collect(off: int, ln: int, exists: bool) -> int:
            out.append(Extent(int(off), int(ln), bool(exists)))
            return 0

        wrap(
            f"{self.label}: diff",
            lambda: self._img.diff_iterate(
                offset, length, from_snapshot, collect, include_parent=True, whole_object=whole_object
            ),
        )
        return out

    def metadata(self, key: str) -> str | None:
        """An image-meta value (``rbd image-meta get``), or None."""
        try:
            return str(self._img.metadata_get(key))
        except KeyError:
            return None
        except (rbd.Error, rados.Error) as exc:
            if isinstance(exc, rbd.ObjectNotFound):
                return None
            raise CephError(f"{self.label}: image-meta {key}: {exc}") from exc

    def set_metadata(self, key: str, value: str) -> None:
        wrap(f"{self.label}: image-meta set {key}", lambda: self._img.metadata_set(key, value))

    def resize(self, size: int) -> None:
        wrap(f"{self.label}: resize to {size}", lambda: self._img.resize(size, allow_shrink=True))

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Writer protocol of the pipeline (``Image.write`` takes only bytes)."""
        buf = data if isinstance(data, bytes) else bytes(data)
        written = wrap(f"{self.label}: write {len(buf)} at {offset}", lambda: self._img.write(buf, offset))
        if written != len(buf):
            raise CephError(f"{self.label}: short write at {offset}: {written} of {len(buf)} bytes")

    def zero(self, length: int, offset: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros."""
        wrap(f"{self.label}: write zeroes {length} at {offset}", lambda: self._img.write_zeroes(offset, length))

    def flush(self) -> None:
        """Wait until every completed write is on the OSDs (librbd's cache flushed)."""
        wrap(f"{self.label}: flush", self._img.flush)

    def settings(self) -> ImageSettings:
        """Object size, striping, data pool, features and image-meta (the meta is the head's: not snapshotted)."""
        img = self._img
        bits = int(wrap(self.label, img.features))
        meta = wrap(f"{self.label}: image-meta", lambda: sorted((str(k), str(v)) for k, v in img.metadata_list()))
        return ImageSettings(
            object_size=int(wrap(self.label, img.stat)["obj_size"]),
            stripe_unit=int(wrap(self.label, img.stripe_unit)),
            stripe_count=int(wrap(self.label, img.stripe_count)),
            data_pool_id=int(wrap(self.label, img.data_pool_id)),
            features=tuple(name for name, bit in FEATURE_NAMES.items() if bits & bit),
            meta=tuple(meta),
        )

    def object_size(self) -> int:
        return int(wrap(self.label, self._img.stat)["obj_size"])

    def async_writes(self, depth: int, max_bytes: int, timeout: float = 300.0) -> AsyncWrites:
        """A writer that keeps up to ``depth`` writes and ``max_bytes`` in flight on this handle."""
        return AsyncWrites(self._img, self.label, depth, max_bytes, timeout)

    def read_many(self, ranges: list[tuple[int, int]], timeout: float = 60.0) -> list[bytes]:
        """Read several ``(start, end)`` ranges with all requests in flight at once.

        The callbacks (librbd's threads, with the GIL) only count; the last
        one wakes the caller, once for the batch rather than once per read.
        """
        results: list[bytes | None] = [None] * len(ranges)
        errors: list[int | str] = []
        if not ranges:
            return []
        pending = [len(ranges)]
        count = threading.Lock()
        done = threading.Event()

        def finish(i: int) -> Callable[[Any, Any], None]:
            def cb(completion: Any, data: Any) -> None:
                ret = completion.get_return_value()
                start, end = ranges[i]
                if ret < 0:
                    errors.append(ret)
                elif data is None or len(data) != end - start:
                    errors.append(f"short read at {start}")
                else:
                    results[i] = bytes(data)
                with count:
                    pending[0] -= 1
                    last = pending[0] == 0
                if last:
                    done.set()

            return cb

        sent = 0
        try:
            for i, (start, end) in enumerate(ranges):
                wrap(
                    f"{self.label}: read at {start}",
                    functools.partial(self._img.aio_read, start, end - start, finish(i)),
                )
                sent += 1
        finally:
            if sent < len(ranges):  # the requests sent still complete: wait for them, not for the rest
                with count:
                    pending[0] -= len(ranges) - sent
                    if pending[0] == 0:
                        done.set()
                done.wait(timeout)
        if not done.wait(timeout):
            raise CephError(f"{self.label}: read timed out after {timeout} s")
        if errors or any(r is None for r in results):
            raise CephError(f"{self.label}: read failed ({errors[0] if errors else 'no data'})")
        return [r for r in results if r is not None]

    def read(self, offset: int, length: int) -> bytes:
        data = wrap(f"{self.label}: read {length} at {offset}", lambda: self._img.read(offset, length))
        if len(data) != length:
            raise CephError(f"{self.label}: short read at {offset}: {len(data)} of {length} bytes")
        return bytes(data)
