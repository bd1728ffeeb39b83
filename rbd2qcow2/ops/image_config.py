"""An image's RBD settings: what a point records of them (pure)."""

from __future__ import annotations

from ..adapters.ceph import ImageSettings
from ..store import manifest as mf


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
