"""The Ceph boundary: every call into the ``rados`` and ``rbd`` bindings.

Everything else in rbd2qcow2 sees :class:`Cluster` and :class:`RbdImage`,
and the project's own exceptions (``raise ... from exc``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import rados
import rbd

from ..core.errors import CephError, CephUnavailable, Claimed, ClaimLost, NotFound
from ..core.extents import Extent
from ..core.names import ImageSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")
CONNECT_TIMEOUT = 30
CLAIM_LOCK = "rbd2qcow2"
LOCK_FLAG_MUST_RENEW = 2  # LIBRADOS_LOCK_FLAG_MUST_RENEW: renew only a lock still held
RENEW_FRACTION = 1 / 3  # renew every third of the lease (at most half of it, to leave room for a retry)
# Work on an image stops once the last renewal is this old (as a fraction of the lease): the
# rest is the margin for the work to stop before another host may take the image.
LAPSE_MARGIN = 0.8
# librbd options for writing a whole image (read when an image is opened)
BULK_WRITE_OPTIONS = {"rbd_cache": "false", "rbd_disable_zero_copy_writes": "false"}


@dataclass(frozen=True)
class CephOptions:
    """How to reach a cluster; ``conf`` None means ``$CEPH_CONF`` or the default."""

    conf: str | None = None
    client_id: str | None = None
    keyring: str | None = None
    connect_timeout: int = CONNECT_TIMEOUT


@dataclass(frozen=True)
class StrayName:
    """An image name's id object that no directory entry goes with (see :meth:`Cluster.stray_name`)."""

    image_id: str  # the image it names
    age: float  # seconds since it was written
    header: bool  # that image's header object exists


def _decode_string(data: bytes) -> str:
    """A string in Ceph's encoding: little-endian u32 length, then the bytes."""
    if len(data) < 4 or int.from_bytes(data[:4], "little") != len(data) - 4:
        raise CephError(f"not an encoded string: {data[:40]!r}")
    return data[4:].decode("ascii", "replace")


@dataclass(frozen=True)
class SnapInfo:
    id: int
    name: str
    size: int


def _wrap(what: str, func: Callable[[], T]) -> T:
    try:
        return func()
    except rbd.ImageNotFound as exc:
        raise NotFound(f"{what}: not found") from exc
    except (rados.ObjectNotFound, rbd.ObjectNotFound) as exc:
        raise NotFound(f"{what}: not found ({exc})") from exc
    except (rados.Error, rbd.Error) as exc:
        raise CephError(f"{what}: {exc}") from exc


class Cluster:
    """A connected ``rados.Rados``; a context manager that shuts it down."""

    def __init__(self, opts: CephOptions) -> None:
        conffile = opts.conf if opts.conf is not None else os.environ.get("CEPH_CONF", "")
        conf: dict[str, str] = {}
        if opts.keyring:
            conf["keyring"] = opts.keyring
        try:
            self._rados = rados.Rados(conffile=conffile, rados_id=opts.client_id, conf=conf)
            self._rados.conf_set("client_mount_timeout", str(opts.connect_timeout))
            self._rados.connect(timeout=opts.connect_timeout)
        except (rados.Error, OSError) as exc:
            raise CephUnavailable(f"cannot connect (conf {conffile or 'default'!r}): {exc}") from exc

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._rados.shutdown()

    @contextlib.contextmanager
    def ioctx(self, pool: str, namespace: str = "") -> Iterator[Any]:
        ioctx = _wrap(f"pool {pool!r}", lambda: self._rados.open_ioctx(pool))
        try:
            ioctx.set_namespace(namespace)
            yield ioctx
        finally:
            ioctx.close()

    def list_images(self, pool: str, namespace: str | None) -> list[ImageSpec]:
        """Images of a pool: one namespace, or (None) the default and every namespace."""
        with self.ioctx(pool) as ioctx:
            namespaces = [namespace] if namespace is not None else ["", *self._namespaces(ioctx, pool)]
        found: list[ImageSpec] = []
        for ns in namespaces:
            with self.ioctx(pool, ns) as ioctx:
                names = _wrap(f"listing {pool}/{ns}", lambda: rbd.RBD().list(ioctx))
            found += [ImageSpec(pool, ns, n) for n in names]
        return sorted(found)

    @staticmethod
    def _namespaces(ioctx: Any, pool: str) -> list[str]:
        return list(_wrap(f"namespaces of {pool}", lambda: rbd.RBD().namespace_list(ioctx)))

    @contextlib.contextmanager
    def image(self, spec: ImageSpec, snapshot: str | None = None, read_only: bool = False) -> Iterator[RbdImage]:
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            img = _wrap(f"image {spec}", lambda: rbd.Image(ioctx, spec.name, snapshot=snapshot, read_only=read_only))
            try:
                yield RbdImage(img, f"{spec}" + (f"@{snapshot}" if snapshot else ""))
            finally:
                img.close()

    @contextlib.contextmanager
    def image_for_bulk_writes(self, spec: ImageSpec) -> Iterator[RbdImage]:
        """The image opened for writing it whole with :class:`AsyncWrites`: no librbd cache.

        While a cache is on, librbd copies every write's buffer; without it,
        an aio write is sent from the caller's buffer, which
        :class:`AsyncWrites` keeps until the write completes.  librbd reads
        the options again whenever it refreshes the image (the first write
        takes the exclusive lock and refreshes), so they are set on this
        connection for as long as the image is open, and put back after.
        """
        with self._options(BULK_WRITE_OPTIONS), self.image(spec) as img:
            yield img

    @contextlib.contextmanager
    def _options(self, options: dict[str, str]) -> Iterator[None]:
        saved = {key: str(self._rados.conf_get(key)) for key in options}
        try:
            for key, value in options.items():
                _wrap(f"option {key}", functools.partial(self._rados.conf_set, key, value))
            yield
        finally:
            for key, value in saved.items():
                with contextlib.suppress(rados.Error):
                    self._rados.conf_set(key, value)

    def exists(self, spec: ImageSpec) -> bool:
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            names = _wrap(f"listing {spec.pool}", lambda: rbd.RBD().list(ioctx))
        return spec.name in names

    def create_image(self, spec: ImageSpec, size: int) -> None:
        """A new image with the cluster's default features."""
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            _wrap(f"create image {spec}", lambda: rbd.RBD().create(ioctx, spec.name, size, old_format=False))

    def rename_image(self, src: ImageSpec, dest: ImageSpec) -> None:
        """Rename an image within its pool and namespace."""
        if (src.pool, src.namespace) != (dest.pool, dest.namespace):
            raise ValueError("an image is renamed within its pool and namespace")
        with self.ioctx(src.pool, src.namespace) as ioctx:
            _wrap(f"rename image {src} to {dest.name}", lambda: rbd.RBD().rename(ioctx, src.name, dest.name))

    def remove_image(self, spec: ImageSpec) -> None:
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            _wrap(f"remove image {spec}", lambda: rbd.RBD().remove(ioctx, spec.name))

    def stray_name(self, spec: ImageSpec) -> StrayName | None:
        """The id object ``rbd_id.<name>`` of a name that is in no directory, if there is one.

        librbd writes a name's id object before the directory entry, when it
        creates an image and when it renames one; killed between the two, it
        leaves the object, and refuses the name from then on ("already exists").
        """
        obj = f"rbd_id.{spec.name}"
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            if spec.name in _wrap(f"listing {spec.pool}", lambda: rbd.RBD().list(ioctx)):
                return None
            try:
                data = ioctx.read(obj)
                _, mtime = ioctx.stat(obj)
            except rados.ObjectNotFound:
                return None
            except rados.Error as exc:
                raise CephError(f"{spec}: reading {obj}: {exc}") from exc
            image_id = _decode_string(data)
            try:
                ioctx.stat(f"rbd_header.{image_id}")
                header = True
            except rados.ObjectNotFound:
                header = False
            except rados.Error as exc:
                raise CephError(f"{spec}: rbd_header.{image_id}: {exc}") from exc
        return StrayName(image_id, time.time() - time.mktime(mtime), header)

    def remove_stray_name(self, spec: ImageSpec) -> None:
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            _wrap(f"remove rbd_id.{spec.name}", lambda: ioctx.remove_object(f"rbd_id.{spec.name}"))

    def image_id(self, spec: ImageSpec) -> str:
        with self.image(spec, read_only=True) as img:
            return img.id()

    @contextlib.contextmanager
    def claim(self, spec: ImageSpec, ttl: int) -> Iterator[Claim]:
        """Hold a RADOS lock that says "this host backs up ``spec`` now", renewed while held.

        The lock lives on a small object of ours beside the image
        (``rbd2qcow2_claim.<hash of the name>``) with a duration of ``ttl``
        seconds, renewed every ``ttl/3``: if this host dies, the claim
        expires by itself.  Raises :class:`Claimed` when another holder has it.
        The :class:`Claim` yielded says, through :meth:`Claim.check`, whether
        the lease still holds (a renewal failed, or came too late).
        """
        obj = "rbd2qcow2_claim." + hashlib.sha256(spec.name.encode()).hexdigest()[:24]
        cookie = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            taken = time.monotonic()  # the lease runs from before the request, at the latest
            try:
                ioctx.lock_exclusive(obj, CLAIM_LOCK, cookie, desc=str(spec), duration=ttl)
            except rados.ObjectBusy as exc:
                raise Claimed(str(spec)) from exc
            except rados.Error as exc:
                raise CephError(f"claim on {spec}: {exc}") from exc
            claim = Claim(str(spec), Lease(ttl, taken))
            stop = threading.Event()
            renewer = threading.Thread(target=_renew, args=(ioctx, obj, cookie, claim, stop), name="claim", daemon=True)
            renewer.start()
            try:
                yield claim
            finally:
                stop.set()
                renewer.join()
                with contextlib.suppress(rados.Error):
                    ioctx.unlock(obj, CLAIM_LOCK, cookie)


@dataclass
class Lease:
    """The timing of a claim's lease (pure): when it was last taken or renewed, and whether a renewal failed.

    Times are ``time.monotonic()`` values taken before each request was
    sent, so the lease is never thought to run longer than it does.
    """

    ttl: float
    renewed: float
    failure: str | None = None

    def interval(self) -> float:
        """Seconds between renewals: several tries fit in the part of the lease work may use."""
        return self.ttl * RENEW_FRACTION

    def lost(self, now: float) -> str | None:
        """Why the claim can no longer be relied on at ``now``, or None while it holds."""
        if self.failure is not None:
            return f"renewal failed: {self.failure}"
        age = now - self.renewed
        if age > self.ttl * LAPSE_MARGIN:
            return f"not renewed for {age:.0f} s of a {self.ttl:.0f} s lease"
        return None


class Claim:
    """A claim held by :meth:`Cluster.claim`; its renewer thread updates the lease."""

    def __init__(self, label: str, lease: Lease) -> None:
        self.label = label
        self._lease = lease
        self._lock = threading.Lock()
        self.renewals = 0

    def renewed(self, at: float) -> None:
        with self._lock:
            if self._lease.failure is None:
                self._lease.renewed = max(self._lease.renewed, at)
                self.renewals += 1

    def failed(self, why: str) -> None:
        with self._lock:
            if self._lease.failure is None:
                self._lease.failure = why

    @property
    def interval(self) -> float:
        return self._lease.interval()

    @property
    def ttl(self) -> int:
        return int(self._lease.ttl)

    def check(self) -> None:
        """Raise :class:`ClaimLost` once the lease may lapse: work on the image must stop."""
        with self._lock:
            why = self._lease.lost(time.monotonic())
        if why is not None:
            raise ClaimLost(self.label, why)


def _renew(ioctx: Any, obj: str, cookie: str, claim: Claim, stop: threading.Event) -> None:
    """Renew until ``stop``; the first failure ends the claim (another host may hold the lock by now)."""
    while not stop.wait(claim.interval):
        sent = time.monotonic()
        try:
            # MUST_RENEW: a lock that was broken or expired meanwhile is not silently taken again.
            ioctx.lock_exclusive(
                obj, CLAIM_LOCK, cookie, desc=claim.label, duration=claim.ttl, flags=LOCK_FLAG_MUST_RENEW
            )
        except rados.Error as exc:
            logger.error("%s: could not renew the claim: %s; the image's work stops", claim.label, exc)
            claim.failed(str(exc))
            return
        claim.renewed(sent)


class RbdImage:
    """An open ``rbd.Image``."""

    def __init__(self, img: Any, label: str) -> None:
        self._img = img
        self.label = label

    def id(self) -> str:
        return str(_wrap(self.label, self._img.id))

    def size(self) -> int:
        return int(_wrap(self.label, self._img.size))

    def snapshots(self) -> list[SnapInfo]:
        snaps = _wrap(self.label, lambda: list(self._img.list_snaps()))
        return [SnapInfo(int(s["id"]), str(s["name"]), int(s["size"])) for s in snaps]

    def snapshot_time(self, snap_id: int) -> datetime:
        """When a snapshot was taken (UTC)."""
        when: datetime = _wrap(self.label, lambda: self._img.get_snap_timestamp(snap_id))
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)

    def snapshot(self, name: str) -> SnapInfo | None:
        return next((s for s in self.snapshots() if s.name == name), None)

    def create_snapshot(self, name: str) -> SnapInfo:
        _wrap(f"{self.label}: create snapshot {name}", lambda: self._img.create_snap(name))
        snap = self.snapshot(name)
        if snap is None:
            raise CephError(f"{self.label}: snapshot {name} vanished after creation")
        return snap

    def remove_snapshot(self, name: str) -> None:
        _wrap(f"{self.label}: remove snapshot {name}", lambda: self._img.remove_snap(name))

    @contextlib.contextmanager
    def at_snapshot(self, name: str) -> Iterator[RbdImage]:
        """This handle reading snapshot ``name`` (``rbd_snap_set``) until the block ends, then the head again.

        Where the head is open already, this saves a second image open and
        close: ~5 ms of our CPU and ~2 ms of the OSD's per image here.  The
        handle must not be used for anything else meanwhile.
        """
        _wrap(f"{self.label}: set snapshot {name}", lambda: self._img.set_snap(name))
        done = False
        try:
            yield RbdImage(self._img, f"{self.label}@{name}")
            done = True
        finally:
            try:
                _wrap(f"{self.label}: back to the head", lambda: self._img.set_snap(None))
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

        _wrap(
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

    def resize(self, size: int) -> None:
        _wrap(f"{self.label}: resize to {size}", lambda: self._img.resize(size, allow_shrink=True))

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        """Writer protocol of the pipeline (``Image.write`` takes only bytes)."""
        buf = data if isinstance(data, bytes) else bytes(data)
        written = _wrap(f"{self.label}: write {len(buf)} at {offset}", lambda: self._img.write(buf, offset))
        if written != len(buf):
            raise CephError(f"{self.label}: short write at {offset}: {written} of {len(buf)} bytes")

    def zero(self, length: int, offset: int) -> None:
        """Make ``[offset, offset+length)`` read as zeros."""
        _wrap(f"{self.label}: write zeroes {length} at {offset}", lambda: self._img.write_zeroes(offset, length))

    def flush(self) -> None:
        """Wait until every completed write is on the OSDs (librbd's cache flushed)."""
        _wrap(f"{self.label}: flush", self._img.flush)

    def object_size(self) -> int:
        return int(_wrap(self.label, self._img.stat)["obj_size"])

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
                _wrap(
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
        data = _wrap(f"{self.label}: read {length} at {offset}", lambda: self._img.read(offset, length))
        if len(data) != length:
            raise CephError(f"{self.label}: short read at {offset}: {len(data)} of {length} bytes")
        return bytes(data)


class AsyncWrites:
    """Writes into one open image, several in flight (``aio_write``), bounded in count and bytes.

    Any thread may submit; a submit waits while ``depth`` requests or
    ``max_bytes`` of data are in flight.  librbd runs the completion
    callbacks on its own thread with the GIL held, so they only count and
    note the first failure; that failure is raised as :class:`CephError` by
    the next submit or by :meth:`wait`.  A request's buffer stays referenced
    until librbd has completed it (librbd may send it without a copy).
    Every wait has a timeout: a write that never completes is an error, not
    a hang.
    """

    def __init__(self, img: Any, label: str, depth: int, max_bytes: int, timeout: float) -> None:
        self._img = img
        self._label = label
        self._depth = max(1, depth)
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._cond = threading.Condition(threading.Lock())
        self._in_flight = 0
        self._bytes = 0
        self._failure: str | None = None

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Writer protocol of the pipeline: queue a write (a view of part of a buffer is copied)."""
        buf = _whole_buffer(data)
        req = _Request(self, f"write {len(buf)} at {offset}", buf, len(buf))
        self._submit(req, lambda: self._img.aio_write(buf, offset, req))

    def zero(self, length: int, offset: int) -> None:
        """Queue a write-zeroes: ``[offset, offset+length)`` reads as zeros."""
        req = _Request(self, f"write zeroes {length} at {offset}", None, 0)
        self._submit(req, lambda: self._img.aio_write_zeroes(offset, length, req))

    def wait(self) -> None:
        """Wait until nothing is in flight, then raise the first failure, if any."""
        with self._cond:
            self._wait_until(lambda: self._in_flight == 0)
        self._raise_failure()

    def settle(self) -> None:
        """Wait until nothing is in flight, after a failure elsewhere; raises nothing."""
        with self._cond, contextlib.suppress(CephError):
            self._wait_until(lambda: self._in_flight == 0)

    def _submit(self, req: _Request, start: Callable[[], Any]) -> None:
        self._raise_failure()
        with self._cond:
            self._wait_until(lambda: self._in_flight == 0 or self._room_for(req.size))
            self._in_flight += 1
            self._bytes += req.size
        try:
            _wrap(f"{self._label}: {req.what}", start)
        except BaseException:
            self._completed(req, None)
            raise

    def _room_for(self, size: int) -> bool:
        return self._in_flight < self._depth and self._bytes + size <= self._max_bytes

    def _completed(self, req: _Request, failure: str | None) -> None:
        with self._cond:
            if failure is not None and self._failure is None:
                self._failure = failure
            self._in_flight -= 1
            self._bytes -= req.size
            self._cond.notify_all()

    def _wait_until(self, ready: Callable[[], bool]) -> None:
        """With the lock held."""
        if not self._cond.wait_for(ready, timeout=self._timeout):
            raise CephError(f"{self._label}: no write completed in {self._timeout:.0f} s")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise CephError(f"{self._label}: {self._failure}")


class _Request:
    """One request in flight; librbd calls it on completion.  Holds the buffer until then."""

    __slots__ = ("buf", "owner", "size", "what")

    def __init__(self, owner: AsyncWrites, what: str, buf: bytes | bytearray | None, size: int) -> None:
        self.owner, self.what, self.buf, self.size = owner, what, buf, size

    def __call__(self, completion: Any) -> None:
        ret = completion.get_return_value()
        self.owner._completed(self, f"{self.what}: {os.strerror(-ret)}" if ret < 0 else None)
        self.buf = None


def _whole_buffer(data: bytes | bytearray | memoryview) -> bytes | bytearray:
    """``data`` as bytes or bytearray, without a copy unless it is a view of part of a buffer."""
    if isinstance(data, bytes | bytearray):
        return data
    if isinstance(data.obj, bytes | bytearray) and data.nbytes == len(data.obj) and data.contiguous:
        return data.obj
    return bytes(data)
