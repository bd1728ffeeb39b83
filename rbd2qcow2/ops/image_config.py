"""An image's RBD settings: what a point records of them, and how a restore re-creates them.

The decisions are pure (:func:`recorded_config`, :func:`creation`);
:func:`create_image` applies them to a cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..adapters.ceph import FEATURE_NAMES, Cluster, ImageSettings, NewImage
from ..core.errors import CephError
from ..core.names import ImageSpec
from ..store import manifest as mf

logger = logging.getLogger(__name__)

# Features librbd sets itself (from the layout, or for its own state): never asked for by name.
IMPLIED_FEATURES = frozenset({"striping", "data-pool", "operations", "migrating", "non-primary"})


@dataclass(frozen=True)
class ImageFlags:
    """A restore's overrides of the recorded settings; None: as recorded."""

    object_size: int | None = None
    stripe_unit: int | None = None
    stripe_count: int | None = None
    features: tuple[str, ...] | None = None
    data_pool: str | None = None
    image_meta: bool = True


@dataclass(frozen=True)
class Creation:
    """How to create a restored image, its image-meta, and what of the settings cannot be honoured."""

    layout: NewImage
    meta: tuple[tuple[str, str], ...]
    warnings: tuple[str, ...]


def recorded_config(settings: ImageSettings, data_pool: str, own_pool: str) -> mf.ImageConfig:
    """What a point records of ``settings``; ``data_pool`` is the name of ``settings.data_pool_id``.

    librbd names the image's own pool as its data pool where there is no
    separate one: that is recorded as none, so a restore into another pool
    keeps the data beside the image.
    """
    return mf.ImageConfig(
        object_size=settings.object_size,
        stripe_unit=settings.stripe_unit,
        stripe_count=settings.stripe_count,
        data_pool=None if data_pool == own_pool else data_pool,
        features=settings.features,
        meta=tuple(sorted(settings.meta)),
    )


def creation(recorded: mf.ImageConfig | None, flags: ImageFlags, pools: set[str]) -> Creation:
    """The recorded settings with the flags over them, less what ``pools`` (the destination's) cannot take."""
    warnings: list[str] = []
    object_size = flags.object_size or (recorded.object_size if recorded else None)
    order = None
    if object_size is not None:
        if object_size & (object_size - 1) or object_size < 4096:
            warnings.append(f"object size {object_size} is not a power of two of at least 4096: the default is used")
        else:
            order = object_size.bit_length() - 1
    striped = recorded is not None and (recorded.stripe_unit, recorded.stripe_count) != (recorded.object_size, 1)
    # A record without striping leaves the stripe to follow a new --object-size.
    unit = flags.stripe_unit or (recorded.stripe_unit if recorded and striped else None)
    count = flags.stripe_count or (recorded.stripe_count if recorded and striped else None)
    if unit is not None and count is not None and unit == object_size and count == 1:
        unit = count = None  # no striping: librbd's default
    data_pool = flags.data_pool or (recorded.data_pool if recorded else None)
    if data_pool is not None and data_pool not in pools:
        warnings.append(f"data pool {data_pool!r} does not exist here: the data goes into the image's pool")
        data_pool = None
    wanted = flags.features if flags.features is not None else (recorded.features if recorded else None)
    features = None
    if wanted is not None:
        unknown = [f for f in wanted if f not in FEATURE_NAMES]
        if unknown:
            warnings.append(f"unknown image features left out: {', '.join(unknown)}")
        features = tuple(f for f in wanted if f in FEATURE_NAMES and f not in IMPLIED_FEATURES)
        if unit is not None or count is not None:
            features = (*features, "striping")  # librbd refuses a stripe layout without it
    meta = recorded.meta if recorded and flags.image_meta else ()
    return Creation(NewImage(order, features, unit, count, data_pool), meta, tuple(warnings))


def create_image(
    cluster: Cluster, spec: ImageSpec, size: int, recorded: mf.ImageConfig | None, flags: ImageFlags
) -> None:
    """``spec`` created with the recorded settings and the flags; what the cluster refuses is warned about."""
    made = creation(recorded, flags, cluster.pools())
    for warning in made.warnings:
        logger.warning("%s: %s", spec, warning)
    try:
        cluster.create_image(spec, size, made.layout)
    except CephError as exc:
        if made.layout.features is None:
            raise
        # An older cluster, or one that does not take a feature: the rest of the layout still holds.
        logger.warning(
            "%s: image features %s refused (%s): the cluster's default features are used",
            spec,
            ",".join(made.layout.features),
            exc,
        )
        cluster.create_image(
            spec,
            size,
            NewImage(made.layout.order, None, made.layout.stripe_unit, made.layout.stripe_count, made.layout.data_pool),
        )
    if made.meta:
        try:
            with cluster.image(spec) as img:
                for key, value in made.meta:
                    img.set_metadata(key, value)
        except CephError as exc:
            logger.warning("%s: image-meta not restored: %s", spec, exc)
