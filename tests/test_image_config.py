"""What a point records of its image's RBD settings, and how the manifest keeps it."""

from __future__ import annotations

import json

from factories import manifest
from factories import point as make_point

from rbd2qcow2.adapters.ceph import ImageSettings, NewImage
from rbd2qcow2.ops.image_config import Creation, ImageFlags, creation, recorded_config
from rbd2qcow2.store import manifest as mf

P1, P2 = "20240301T000000Z", "20240302T000000Z"
CONFIG = mf.ImageConfig(
    object_size=1 << 20,
    stripe_unit=64 << 10,
    stripe_count=4,
    data_pool="ec-data",
    features=("layering", "striping", "exclusive-lock"),
    meta=(("conf_rbd_cache", "false"), ("owner", "db é")),
)


def settings(data_pool_id: int = 3, meta: tuple[tuple[str, str], ...] = ()) -> ImageSettings:
    return ImageSettings(4 << 20, 4 << 20, 1, data_pool_id, ("layering", "deep-flatten"), meta)


def test_config_round_trips_through_the_manifest() -> None:
    m = manifest(make_point(P1, image_config=CONFIG), make_point(P2, P1))
    loaded = mf.loads(mf.dumps(m), "here")
    assert loaded == m
    assert loaded.points[0].image_config == CONFIG
    assert loaded.points[1].image_config is None


def test_meta_is_a_json_object_and_features_a_list() -> None:
    body = json.loads(mf.dumps(manifest(make_point(P1, image_config=CONFIG))))
    recorded = body["points"][0]["image_config"]
    assert recorded["meta"] == {"conf_rbd_cache": "false", "owner": "db é"}
    assert recorded["features"] == ["layering", "striping", "exclusive-lock"]
    assert recorded["data_pool"] == "ec-data"


def test_point_without_config_is_written_as_before() -> None:
    """A manifest whose points have no settings is byte for byte what older versions wrote and read."""
    body = json.loads(mf.dumps(manifest(make_point(P1, with_sums=True))))
    assert "image_config" not in body["points"][0]
    assert body["version"] == mf.VERSION == 1


def test_manifest_without_the_field_loads() -> None:
    m = manifest(make_point(P1, with_sums=True))
    data = mf.dumps(m)
    assert b"image_config" not in data
    assert mf.loads(data, "here").points[0].image_config is None


def test_own_pool_as_data_pool_is_recorded_as_none() -> None:
    assert recorded_config(settings(), "rbd", "rbd").data_pool is None
    assert recorded_config(settings(), "ec-data", "rbd").data_pool == "ec-data"


def test_recorded_config_keeps_the_settings_and_sorts_the_meta() -> None:
    got = recorded_config(settings(meta=(("b", "2"), ("a", "1"))), "rbd", "rbd")
    assert got == mf.ImageConfig(4 << 20, 4 << 20, 1, None, ("layering", "deep-flatten"), (("a", "1"), ("b", "2")))


# -- what a restore creates ---------------------------------------------------


def test_without_record_or_flags_the_cluster_decides() -> None:
    made = creation(None, ImageFlags(), {"rbd"})
    assert made == Creation(NewImage(), (), ())


def test_recorded_settings_are_applied() -> None:
    made = creation(CONFIG, ImageFlags(), {"rbd", "ec-data"})
    assert made.layout == NewImage(20, ("layering", "exclusive-lock", "striping"), 64 << 10, 4, "ec-data")
    assert made.meta == CONFIG.meta
    assert made.warnings == ()


def test_flags_override_the_record() -> None:
    flags = ImageFlags(
        object_size=4 << 20, stripe_unit=4 << 20, stripe_count=1, features=("layering",), data_pool="other"
    )
    made = creation(CONFIG, flags, {"rbd", "ec-data", "other"})
    assert made.layout == NewImage(22, ("layering",), None, None, "other")
    assert made.warnings == ()


def test_no_image_meta() -> None:
    assert creation(CONFIG, ImageFlags(image_meta=False), {"ec-data"}).meta == ()


def test_missing_data_pool_warns_and_keeps_the_rest() -> None:
    made = creation(CONFIG, ImageFlags(), {"rbd"})
    assert made.layout == NewImage(20, ("layering", "exclusive-lock", "striping"), 64 << 10, 4, None)
    assert len(made.warnings) == 1 and "ec-data" in made.warnings[0]


def test_impossible_object_size_and_unknown_feature_warn() -> None:
    made = creation(None, ImageFlags(object_size=3 << 20, features=("layering", "warp-drive")), set())
    assert made.layout == NewImage(None, ("layering",), None, None, None)
    assert [w.split()[0] for w in made.warnings] == ["object", "unknown"]


def test_implied_features_are_not_asked_for() -> None:
    recorded = mf.ImageConfig(4 << 20, 4 << 20, 1, None, ("layering", "striping", "data-pool", "operations"))
    assert creation(recorded, ImageFlags(), set()).layout == NewImage(22, ("layering",), None, None, None)


def test_new_object_size_of_an_unstriped_image_stays_unstriped() -> None:
    recorded = mf.ImageConfig(4 << 20, 4 << 20, 1, None, ("layering",))
    assert creation(recorded, ImageFlags(object_size=1 << 20), set()).layout == NewImage(20, ("layering",))
