"""A connected cluster: pools, namespaces, images by name, stray names and claims."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import rados
import rbd

from ...core.errors import CephError, CephUnavailable
from ...core.names import ImageSpec
from .calls import wrap
from .claim import Claim, hold
from .image import FEATURE_NAMES, NewImage, RbdImage

CONNECT_TIMEOUT = 30
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


def decode_string(data: bytes) -> str:
    """A string in Ceph's encoding: little-endian u32 length, then the bytes."""
    if len(data) < 4 or int.from_bytes(data[:4], "little") != len(data) - 4:
        raise CephError(f"not an encoded string: {data[:40]!r}")
    return data[4:].decode("ascii", "replace")


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
        ioctx = wrap(f"pool {pool!r}", lambda: self._rados.open_ioctx(pool))
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
                names = wrap(f"listing {pool}/{ns}", lambda: rbd.RBD().list(ioctx))
            found += [ImageSpec(pool, ns, n) for n in names]
        return sorted(found)

    @staticmethod
    def _namespaces(ioctx: Any, pool: str) -> list[str]:
        return list(wrap(f"namespaces of {pool}", lambda: rbd.RBD().namespace_list(ioctx)))

    @contextlib.contextmanager
    def image(self, spec: ImageSpec, snapshot: str | None = None, read_only: bool = False) -> Iterator[RbdImage]:
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            img = wrap(f"image {spec}", lambda: rbd.Image(ioctx, spec.name, snapshot=snapshot, read_only=read_only))
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
                wrap(f"option {key}", functools.partial(self._rados.conf_set, key, value))
            yield
        finally:
            for key, value in saved.items():
                with contextlib.suppress(rados.Error):
                    self._rados.conf_set(key, value)

    def pool_name(self, pool_id: int) -> str:
        return str(wrap(f"pool id {pool_id}", lambda: self._rados.pool_reverse_lookup(pool_id)))

    def exists(self, spec: ImageSpec) -> bool:
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            names = wrap(f"listing {spec.pool}", lambda: rbd.RBD().list(ioctx))
        return spec.name in names

    def pools(self) -> set[str]:
        return set(wrap("listing pools", self._rados.list_pools))

    def create_image(self, spec: ImageSpec, size: int, layout: NewImage | None = None) -> None:
        """A new image; the cluster's defaults for what ``layout`` leaves unset (all without it)."""
        layout = layout or NewImage()
        bits = None if layout.features is None else sum(FEATURE_NAMES[f] for f in set(layout.features))
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            wrap(
                f"create image {spec}",
                lambda: rbd.RBD().create(
                    ioctx,
                    spec.name,
                    size,
                    order=layout.order,
                    old_format=False,
                    features=bits,
                    stripe_unit=layout.stripe_unit,
                    stripe_count=layout.stripe_count,
                    data_pool=layout.data_pool,
                ),
            )

    def rename_image(self, src: ImageSpec, dest: ImageSpec) -> None:
        """Rename an image within its pool and namespace."""
        if (src.pool, src.namespace) != (dest.pool, dest.namespace):
            raise ValueError("an image is renamed within its pool and namespace")
        with self.ioctx(src.pool, src.namespace) as ioctx:
            wrap(f"rename image {src} to {dest.name}", lambda: rbd.RBD().rename(ioctx, src.name, dest.name))

    def remove_image(self, spec: ImageSpec) -> None:
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            wrap(f"remove image {spec}", lambda: rbd.RBD().remove(ioctx, spec.name))

    def stray_name(self, spec: ImageSpec) -> StrayName | None:
        """The id object ``rbd_id.<name>`` of a name that is in no directory, if there is one.

        librbd writes a name's id object before the directory entry, when it
        creates an image and when it renames one; killed between the two, it
        leaves the object, and refuses the name from then on ("already exists").
        """
        obj = f"rbd_id.{spec.name}"
        with self.ioctx(spec.pool, spec.namespace) as ioctx:
            if spec.name in wrap(f"listing {spec.pool}", lambda: rbd.RBD().list(ioctx)):
                return None
            try:
                data = ioctx.read(obj)
                _, mtime = ioctx.stat(obj)
            except rados.ObjectNotFound:
                return None
            except rados.Error as exc:
                raise CephError(f"{spec}: reading {obj}: {exc}") from exc
            image_id = decode_string(data)
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
            wrap(f"remove rbd_id.{spec.name}", lambda: ioctx.remove_object(f"rbd_id.{spec.name}"))

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
        with self.ioctx(spec.pool, spec.namespace) as ioctx, hold(ioctx, spec, ttl) as claim:
            yield claim
