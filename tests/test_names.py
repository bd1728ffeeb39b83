"""Pure tests of the naming rules: encoding, specs, chain paths, point ids, snapshot names."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rbd2qcow2.core.errors import UsageError
from rbd2qcow2.core.names import (
    MAX_COMPONENT,
    NAMESPACE_MARK,
    SNAP_PREFIX,
    ImageSpec,
    Selector,
    chain_relpath,
    encode,
    is_own_snapshot,
    is_point_id,
    is_target_tag,
    layer_file,
    parse_spec,
    partial,
    point_id,
    snapshot_name,
    sums_file,
)

SAFE_OUTPUT = re.compile(r"[A-Za-z0-9_.%~-]+")
NAME_MAX = 255  # Linux file name limit

# Text biased towards the interesting characters, plus arbitrary unicode and long names.
tricky = st.text(alphabet=st.sampled_from("%-._ ~/@aZ09é\u00a0\u4e2d\U0001f600\n\t\\"), max_size=30)
names = st.one_of(
    st.text(),
    tricky,
    st.text(min_size=150, max_size=400),
    st.text(alphabet="ab%-", min_size=190, max_size=260),
)


# -- encode ----------------------------------------------------------------


@given(names)
def test_encode_output_is_safe(name: str) -> None:
    out = encode(name)
    assert out
    assert SAFE_OUTPUT.fullmatch(out), out
    assert "/" not in out
    assert not out.startswith(("-", "."))
    assert len(out) <= MAX_COMPONENT
    assert NAMESPACE_MARK not in out


@given(names, names)
def test_encode_is_injective(a: str, b: str) -> None:
    assume(a != b)
    assert encode(a) != encode(b)


@given(st.text(min_size=1, max_size=50), st.text(min_size=1, max_size=50))
def test_encode_is_injective_on_close_pairs(prefix: str, suffix: str) -> None:
    """Names differing only by where a split falls or by an escape-looking part."""
    assert encode(prefix + suffix) != encode(prefix + "%" + suffix)
    assert encode(prefix) != encode(prefix + suffix)


@given(st.text(alphabet="abc", min_size=MAX_COMPONENT, max_size=MAX_COMPONENT + 50), st.sampled_from("xyz"))
def test_long_names_differing_at_the_end_stay_distinct(common: str, last: str) -> None:
    a, b = common + "a" * 300 + last, common + "a" * 300 + "w"
    assert encode(a) != encode(b)
    assert len(encode(a)) <= MAX_COMPONENT
    assert "~" in encode(a)


@given(st.text(alphabet=st.characters(codec="ascii"), min_size=1, max_size=30))
def test_encode_is_decodable(name: str) -> None:
    """Short encodings are reversible: percent-decoding gives the name back."""
    out = encode(name)
    decoded = re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), out.encode())
    assert decoded.decode() == name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vm-disk_1.img", "vm-disk_1.img"),
        ("", "%"),
        ("-rf", "%2Drf"),
        (".hidden", "%2Ehidden"),
        ("..", "%2E."),
        ("a b", "a%20b"),
        ("100%", "100%25"),
        ("a~b", "a%7Eb"),
        ("a/b", "a%2Fb"),
        ("@ns", "%40ns"),
        ("é", "%C3%A9"),
        ("x-.", "x-."),
    ],
)
def test_encode_table(name: str, expected: str) -> None:
    assert encode(name) == expected


def test_encode_long_name_gets_hash_suffix() -> None:
    out = encode("a" * 500)
    assert len(out) <= MAX_COMPONENT
    assert re.fullmatch(r"a+~[0-9a-f]{16}", out)
    assert encode("a" * MAX_COMPONENT) == "a" * MAX_COMPONENT  # exactly at the limit: unchanged
    assert "~" in encode("a" * (MAX_COMPONENT + 1))


def test_encode_long_names_with_same_prefix_differ() -> None:
    assert encode("x" * 400 + "1") != encode("x" * 400 + "2")
    # escapes push a name over the limit although it has few characters
    assert len(encode("\u4e2d" * 70)) <= MAX_COMPONENT
    assert encode("\u4e2d" * 70) != encode("\u4e2d" * 71)


# -- parse_spec ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("rbd", Selector("rbd", None, None)),
        ("rbd/vm1", Selector("rbd", "", "vm1")),
        ("rbd/ns/vm1", Selector("rbd", "ns", "vm1")),
        ("my pool/a b", Selector("my pool", "", "a b")),
        ("p/-x", Selector("p", "", "-x")),
        ("p/é/ü", Selector("p", "é", "ü")),
    ],
)
def test_parse_spec(spec: str, expected: Selector) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty pool"),
        ("/img", "empty pool"),
        ("rbd/", "empty image"),
        ("rbd//img", "empty namespace"),
        ("rbd/ns/", "empty image"),
        ("/ns/img", "empty pool"),
        ("a/b/c/d", "expected POOL"),
        ("a/b/c/", "expected POOL"),
        ("//", "empty"),
        ("rbd/img@snap", "invalid character"),
        ("rbd/ns@x/img", "invalid character"),
        ("rb\0d", "invalid character"),
    ],
)
def test_parse_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_spec(spec)


def test_selector_matches() -> None:
    default = ImageSpec("p", "", "img")
    in_ns = ImageSpec("p", "ns", "img")
    assert parse_spec("p").matches(default)
    assert parse_spec("p").matches(in_ns)
    assert not parse_spec("q").matches(default)
    assert parse_spec("p/img").matches(default)
    assert not parse_spec("p/img").matches(in_ns)
    assert parse_spec("p/ns/img").matches(in_ns)
    assert not parse_spec("p/ns/img").matches(default)
    assert not parse_spec("p/ns/other").matches(in_ns)


def test_image_spec_str() -> None:
    assert str(ImageSpec("p", "", "i")) == "p/i"
    assert str(ImageSpec("p", "n", "i")) == "p/n/i"


# -- chain_relpath ---------------------------------------------------------

specs = st.builds(ImageSpec, pool=names, namespace=st.one_of(st.just(""), names), name=names)


@given(specs, specs)
def test_chain_relpath_injective(a: ImageSpec, b: ImageSpec) -> None:
    assume(a != b)
    pa, pb = chain_relpath(a), chain_relpath(b)
    assert pa != pb
    # no chain directory lies inside another one
    assert pa[: len(pb)] != pb
    assert pb[: len(pa)] != pa


@given(specs)
def test_chain_relpath_components_are_safe(image: ImageSpec) -> None:
    for part in chain_relpath(image):
        assert part and part not in (".", "..")
        assert "/" not in part and "\0" not in part
        assert not part.startswith(("-", "."))
        assert len(part.encode()) <= NAME_MAX


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (ImageSpec("p", "", "x"), ImageSpec("p", "x", "x")),
        (ImageSpec("p", "", "@x"), ImageSpec("p", "x", "y")),
        (ImageSpec("p", "", "%40x"), ImageSpec("p", "x", "y")),
        (ImageSpec("p", "", "x"), ImageSpec("p", "", "X")),
        (ImageSpec("p", "a", "b"), ImageSpec("p", "", "a/b")),
    ],
)
def test_chain_relpath_default_namespace_vs_namespace(a: ImageSpec, b: ImageSpec) -> None:
    pa, pb = chain_relpath(a), chain_relpath(b)
    assert pa != pb
    assert pa[: len(pb)] != pb and pb[: len(pa)] != pa


def test_chain_relpath_shapes() -> None:
    assert chain_relpath(ImageSpec("p", "", "i")) == ("p", "i")
    assert chain_relpath(ImageSpec("p", "n", "i")) == ("p", "@n", "i")
    assert chain_relpath(ImageSpec(".p", "-n", "i i")) == ("%2Ep", "@%2Dn", "i%20i")


# -- point ids, files, snapshots -------------------------------------------

WHEN = datetime(2024, 3, 5, 7, 8, 9, 123456, tzinfo=UTC)


def test_point_id_format() -> None:
    assert point_id(WHEN, set()) == "20240305T070809Z"
    assert is_point_id(point_id(WHEN, set()))


def test_point_id_converts_to_utc() -> None:
    local = WHEN.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert point_id(local, set()) == "20240305T070809Z"


def test_point_id_uniqueness_suffixes() -> None:
    taken: set[str] = set()
    ids = []
    for _ in range(12):
        new = point_id(WHEN, taken)
        assert new not in taken
        taken.add(new)
        ids.append(new)
    assert ids[:4] == ["20240305T070809Z", "20240305T070809Z-2", "20240305T070809Z-3", "20240305T070809Z-4"]
    assert all(is_point_id(i) for i in ids)
    assert len(set(ids)) == 12


def test_point_id_ignores_unrelated_taken_ids() -> None:
    assert point_id(WHEN, {"20240305T070808Z", "20240305T070809Z-2"}) == "20240305T070809Z"


@given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)))
def test_point_ids_sort_like_times(when: datetime) -> None:
    later = when + timedelta(seconds=1)
    assert point_id(when, set()) < point_id(later, set())


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("20240305T070809Z", True),
        ("20240305T070809Z-2", True),
        ("20240305T070809Z-123", True),
        ("20240305T070809", False),
        ("20240305T070809Z-", False),
        ("20240305T070809Z-x", False),
        ("2024030T070809Z", False),
        ("x20240305T070809Z", False),
        ("20240305T070809Z.qcow2", False),
        ("", False),
    ],
)
def test_is_point_id(text: str, ok: bool) -> None:
    assert is_point_id(text) is ok


def test_file_names() -> None:
    assert layer_file("20240305T070809Z") == "20240305T070809Z.qcow2"
    assert sums_file("20240305T070809Z") == "20240305T070809Z.sums"
    assert partial("20240305T070809Z.qcow2") == "20240305T070809Z.qcow2.partial"


TAG = "0123abcd"


def test_snapshot_name_round_trip() -> None:
    name = snapshot_name(TAG, "20240305T070809Z-2")
    assert name == f"{SNAP_PREFIX}.{TAG}.20240305T070809Z-2"
    assert is_own_snapshot(name, TAG)


@given(st.datetimes(min_value=datetime(1970, 1, 1), timezones=st.just(UTC)), st.sets(st.text(max_size=20), max_size=3))
def test_own_snapshots_are_recognised(when: datetime, taken: set[str]) -> None:
    assert is_own_snapshot(snapshot_name(TAG, point_id(when, taken)), TAG)


@pytest.mark.parametrize(
    "snap",
    [
        pytest.param("rbd2qcow2.other", id="user snapshot with our prefix"),
        pytest.param("rbd2qcow2.0123abcd", id="tag only"),
        pytest.param("rbd2qcow2.0123abcd.", id="empty point"),
        pytest.param("rbd2qcow2.0123abcd.mine", id="not a point id"),
        pytest.param("rbd2qcow2.0123abcd.20240305T070809Z.old", id="point id followed by more"),
        pytest.param("rbd2qcow2.ffffffff.20240305T070809Z", id="another target's tag"),
        pytest.param("rbd2qcow2.0123ABCD.20240305T070809Z", id="tag in other case"),
        pytest.param("rbd2qcow2.0123abcd0.20240305T070809Z", id="longer tag"),
        pytest.param("RBD2QCOW2.0123abcd.20240305T070809Z", id="prefix in other case"),
        pytest.param("xrbd2qcow2.0123abcd.20240305T070809Z", id="prefix not at start"),
        pytest.param("rbd2qcow2-0123abcd-20240305T070809Z", id="other separators"),
        pytest.param("daily", id="unrelated"),
        pytest.param("rbd2qcow2.0123abcd.20240305T070809Z\n", id="trailing newline"),
        pytest.param(
            "rbd2qcow2.0123abcd.\u0662\u0660\u0662\u0664\u0660\u0663\u0660\u0665T070809Z", id="non-ASCII digits"
        ),
    ],
)
def test_foreign_snapshots_are_not_ours(snap: str) -> None:
    assert not is_own_snapshot(snap, TAG)


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("0123abcd", True),
        ("ffffffff", True),
        ("0123ABCD", False),
        ("0123abc", False),
        ("0123abcde", False),
        ("0123abcg", False),
        ("", False),
        ("0123abcd\n", False),
    ],
)
def test_is_target_tag(text: str, ok: bool) -> None:
    assert is_target_tag(text) is ok
