"""Pure tests of the manifest: schema round trip, self-checksum, consistency, atomic save."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from factories import TAG, manifest
from factories import point as make_point
from hypothesis import given, settings
from hypothesis import strategies as st

from rbd2qcow2.core.errors import ChainDamaged, DataError
from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf

P1, P2, P3, P4 = "20240301T000000Z", "20240302T000000Z", "20240303T000000Z", "20240303T000000Z-2"


def sample(image: ImageSpec | None = None) -> mf.Manifest:
    return manifest(
        make_point(P1, with_sums=True),
        make_point(P2, P1, flags=("damaged",)),
        make_point(P3, with_sums=True),
        make_point(P4, P3, flags=("a", "b"), with_sums=True),
        image=image or ImageSpec("rbd", "ns", "vm disk é"),
        image_id="abc123",
    )


def resign(body: dict[str, Any]) -> bytes:
    """Serialise a hand-edited body with a valid checksum (as dumps() would)."""
    body = dict(body)
    body.pop("sha256", None)
    body["sha256"] = hashlib.sha256(mf.canonical(body)).hexdigest()
    return json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False).encode()


# -- round trip ------------------------------------------------------------


def test_round_trip() -> None:
    m = sample()
    assert mf.loads(mf.dumps(m), "here") == m


def test_round_trip_empty() -> None:
    m = mf.Manifest(ImageSpec("p", "", "i"), "id", TAG)
    assert mf.loads(mf.dumps(m), "here") == m


def test_dumps_is_canonical_json_with_checksum() -> None:
    data = mf.dumps(sample())
    body = json.loads(data)
    assert body["format"] == mf.FORMAT
    assert body["version"] == mf.VERSION
    assert body["namespace"] == "ns"
    assert body["points"][1]["flags"] == ["damaged"]
    assert body["points"][1]["checksums"] is None
    assert len(body.pop("sha256")) == 64
    assert data.endswith(b"\n")
    assert mf.dumps(sample()) == data  # deterministic


image_names = st.text(min_size=1, max_size=30)


@given(
    st.builds(ImageSpec, pool=image_names, namespace=st.one_of(st.just(""), image_names), name=image_names),
    st.text(max_size=20),
    st.lists(st.text(max_size=8), max_size=3),
    st.integers(0, 1 << 62),
)
@settings(max_examples=50)
def test_round_trip_any_names(image: ImageSpec, image_id: str, flags: list[str], size: int) -> None:
    point = dataclasses.replace(make_point(P1, image_id=image_id, with_sums=True), flags=tuple(flags), size=size)
    m = mf.Manifest(image, image_id, TAG, (point,))
    assert mf.loads(mf.dumps(m), "here") == m


# -- damage ----------------------------------------------------------------

DATA = mf.dumps(sample())


@given(st.integers(0, len(DATA) - 1), st.integers(1, 255))
@settings(max_examples=400)
def test_flipped_byte_is_damage(pos: int, xor: int) -> None:
    """A changed byte is reported as ChainDamaged, unless it left the content equal (whitespace)."""
    data = bytearray(DATA)
    data[pos] ^= xor
    try:
        loaded = mf.loads(bytes(data), "chain")
    except ChainDamaged:
        return
    assert loaded == sample(), f"byte {pos} changed to {data[pos]!r} and went unnoticed"


def test_every_single_byte_flip_is_caught() -> None:
    """Exhaustive: flip the low bit of every byte; whitespace may survive, nothing else may."""
    for pos in range(len(DATA)):
        data = bytearray(DATA)
        data[pos] ^= 1
        try:
            loaded = mf.loads(bytes(data), "chain")
        except ChainDamaged as exc:
            assert str(exc).startswith("chain chain is damaged: ")
            continue
        assert loaded == sample(), pos


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(DATA[: len(DATA) // 2], id="truncated"),
        pytest.param(b"\xff\xfe" + DATA, id="not utf-8"),
        pytest.param(b"[]", id="a list"),
        pytest.param(b'"text"', id="a string"),
        pytest.param(b"42", id="a number"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{}", id="no checksum"),
        pytest.param(b'{"sha256": "0"}', id="wrong checksum"),
        pytest.param(resign({}), id="valid checksum, no fields"),
        pytest.param(resign({**json.loads(DATA), "points": {"a": 1}}), id="points not a list"),
        pytest.param(resign({**json.loads(DATA), "points": [1]}), id="point not an object"),
        pytest.param(resign({**json.loads(DATA), "points": [{"id": P1}]}), id="point fields missing"),
    ],
)
def test_garbage_is_damage(data: bytes) -> None:
    with pytest.raises(ChainDamaged):
        mf.loads(data, "chain")


def edited(**changes: Any) -> bytes:
    body = json.loads(DATA)
    body.update(changes)
    return resign(body)


def edited_point(index: int, **changes: Any) -> bytes:
    body = json.loads(DATA)
    body["points"][index].update(changes)
    return resign(body)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(edited(format="other-tool"), "unknown manifest format", id="unknown format"),
        pytest.param(edited(version=2), "unknown manifest format", id="unknown version"),
        pytest.param(edited(version="1"), "unknown manifest format", id="version as a string"),
        pytest.param(edited_point(1, parent="20240101T000000Z"), "unknown parent", id="parent missing"),
        pytest.param(edited_point(0, parent=P2), "unknown parent", id="parent later in the list"),
        pytest.param(edited_point(1, parent=P2), "unknown parent", id="parent is itself"),
        pytest.param(edited_point(1, id=P1, file=f"{P1}.qcow2", parent=None), "duplicate", id="duplicate point"),
        pytest.param(edited_point(0, id="latest", file="latest.qcow2"), "bad point id", id="bad point id"),
        pytest.param(edited_point(0, file="../x.qcow2"), "bad point id", id="file not matching the id"),
        pytest.param(edited_point(0, checksums={"file": "x"}), "unreadable", id="checksums fields missing"),
        pytest.param(edited_point(0, snapshot={"name": "s", "id": "x"}), "unreadable", id="snapshot id not int"),
        pytest.param(edited_point(0, size=float("nan")), "unreadable", id="size NaN"),
        pytest.param(edited_point(0, size=float("inf")), "unreadable", id="size Infinity"),
    ],
)
def test_inconsistent_manifest_is_damage(data: bytes, message: str) -> None:
    with pytest.raises(ChainDamaged, match=message):
        mf.loads(data, "chain")


def test_damage_is_a_data_error_with_location() -> None:
    with pytest.raises(ChainDamaged) as info:
        mf.loads(DATA.replace(b"abc123", b"abc124", 1), "/target/rbd/vm")
    assert isinstance(info.value, DataError)
    assert info.value.exit_code == os.EX_DATAERR
    assert str(info.value) == "chain /target/rbd/vm is damaged: manifest checksum mismatch"


# -- queries ---------------------------------------------------------------


def test_chain_of() -> None:
    m = sample()
    assert [p.id for p in m.chain_of(P1)] == [P1]
    assert [p.id for p in m.chain_of(P2)] == [P1, P2]
    assert [p.id for p in m.chain_of(P4)] == [P3, P4]


def test_chain_of_long_chain() -> None:
    ids = [f"2024030{i}T000000Z" for i in range(1, 10)]
    points = tuple(make_point(pid, ids[i - 1] if i else None, with_sums=True) for i, pid in enumerate(ids))
    m = mf.Manifest(ImageSpec("p", "", "i"), "abc123", TAG, points)
    assert [p.id for p in m.chain_of(ids[-1])] == ids
    assert [p.id for p in m.chain_of(ids[3])] == ids[:4]


def test_chain_of_unknown_point() -> None:
    with pytest.raises(KeyError):
        sample().chain_of("20990101T000000Z")


def test_point_latest_and_is_full() -> None:
    m = sample()
    assert m.point(P2).parent == P1
    assert m.latest is not None and m.latest.id == P4
    assert m.point(P1).is_full and not m.point(P2).is_full
    assert mf.Manifest(ImageSpec("p", "", "i"), "x", TAG).latest is None
    with pytest.raises(KeyError):
        m.point("nope")


def test_with_point() -> None:
    m = mf.Manifest(ImageSpec("p", "", "i"), "old", TAG)
    m2 = m.with_point(make_point(P1, with_sums=True), "new")
    assert m.points == () and m.image_id == "old"
    assert m2.points == (make_point(P1, with_sums=True),) and m2.image_id == "new"


# -- load / save -----------------------------------------------------------


def test_load_missing_is_none(tmp_path: Path) -> None:
    assert mf.load(tmp_path) is None


def test_save_load(tmp_path: Path) -> None:
    mf.save(tmp_path, sample())
    assert mf.load(tmp_path) == sample()
    assert (tmp_path / mf.NAME).read_bytes() == DATA


def test_save_mode_is_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        (tmp_path / mf.NAME).write_bytes(b"old")
        os.chmod(tmp_path / mf.NAME, 0o644)
        mf.save(tmp_path, sample())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / mf.NAME).stat().st_mode) == 0o600


def test_save_writes_temp_then_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / mf.NAME
    mf.save(tmp_path, sample())
    old_inode = target.stat().st_ino
    calls: list[tuple[str, str, bytes]] = []
    real_replace = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append((os.fspath(src), os.fspath(dst), Path(src).read_bytes()))
        assert target.read_bytes() == DATA  # the old manifest is intact until the replace
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    new = sample().with_point(make_point("20240304T000000Z", P4, with_sums=True), "abc123")
    mf.save(tmp_path, new)
    assert len(calls) == 1
    src, dst, content = calls[0]
    assert Path(src).parent == tmp_path and Path(src).name != mf.NAME
    assert Path(dst) == target
    assert content == mf.dumps(new)
    assert target.stat().st_ino != old_inode
    assert not Path(src).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [mf.NAME]


def test_save_crash_before_replace_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mf.save(tmp_path, sample())

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        mf.save(tmp_path, sample().with_point(make_point("20240304T000000Z", with_sums=True), "x"))
    assert mf.load(tmp_path) == sample()


def test_load_damaged_file(tmp_path: Path) -> None:
    (tmp_path / mf.NAME).write_bytes(DATA.replace(b'"rbd"', b'"rbe"'))
    with pytest.raises(ChainDamaged, match=re.escape(str(tmp_path))):
        mf.load(tmp_path)


# -- flags and why they were set ------------------------------------------------


def test_a_flag_keeps_its_reasons_through_a_round_trip() -> None:
    deep = mf.Flag(mf.DAMAGED, "deep", "content differs at bytes 0-65536 in x.qcow2", "2026-12-07T01:02:03+00:00")
    point = make_point(P1, with_sums=True).flagged(deep)
    m = dataclasses.replace(sample(), points=(point,))
    loaded = mf.loads(mf.dumps(m), "here")
    assert loaded == m
    assert loaded.points[0].flags == (mf.DAMAGED,) and loaded.points[0].reasons(mf.DAMAGED) == [deep]


def test_a_flag_of_an_older_version_loads_with_an_unknown_reason() -> None:
    body = json.loads(mf.dumps(sample()))
    for p in body["points"]:
        del p["flag_reasons"]  # as an older version wrote it
    m = mf.loads(resign(body), "here")
    assert m.point(P2).reasons(mf.DAMAGED) == [mf.Flag(mf.DAMAGED, "", mf.UNKNOWN_REASON, "")]
    assert m.point(P1).reasons(mf.DAMAGED) == []


def test_a_flag_goes_with_its_last_reason() -> None:
    deep = mf.Flag(mf.DAMAGED, "deep", "content differs", "t1")
    structure = mf.Flag(mf.DAMAGED, "structure", "qemu-img check: 2 corruptions", "t2")
    point = make_point(P1, flags=("no-incremental",), with_sums=True).flagged(deep).flagged(structure)
    assert point.flags == ("no-incremental", mf.DAMAGED)
    again = point.flagged(dataclasses.replace(deep, reason="content differs elsewhere", time="t3"))
    assert again.reasons(mf.DAMAGED) == [structure, mf.Flag(mf.DAMAGED, "deep", "content differs elsewhere", "t3")]
    assert point.cleared(mf.DAMAGED, {"source"}) == point
    partly = point.cleared(mf.DAMAGED, {"deep"})
    assert partly.flags == point.flags and partly.reasons(mf.DAMAGED) == [structure]
    gone = partly.cleared(mf.DAMAGED, {"structure", "deep"})
    assert gone.flags == ("no-incremental",) and gone.flag_reasons == ()
    old = make_point(P1, flags=(mf.DAMAGED,), with_sums=True)
    assert old.cleared(mf.DAMAGED, {"structure", "deep"}) == old  # who set it is unknown
    assert old.cleared(mf.DAMAGED, {"structure", "deep", ""}).flags == ()


# -- paths read from a manifest -----------------------------------------------


def _sums(name: object) -> dict[str, Any]:
    return {"file": name, "algorithm": "xxh3-128", "block_size": 65536, "sha256": "ab" * 32}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("/dev/zero", id="absolute device"),
        pytest.param("../x", id="dot-dot"),
        pytest.param(f"../{P1}.sums", id="dot-dot with the right name"),
        pytest.param(f"{P2}.sums", id="another point's file"),
        pytest.param(f"{P1}.qcow2", id="the layer file"),
        pytest.param(f"sub/{P1}.sums", id="in a subdirectory"),
    ],
)
def test_checksum_file_must_be_the_points_own(name: str) -> None:
    with pytest.raises(ChainDamaged, match="checksum file"):
        mf.loads(edited_point(0, checksums=_sums(name)), "chain")


@pytest.mark.parametrize("name", ["/dev/zero", "../x", f"{P3}.sums", f"{P4}.sums.merge"])
def test_pending_checksum_file_must_be_the_childs(name: str) -> None:
    body = json.loads(DATA)
    body["pending"] = {
        "child": P4,
        "drop": [P3],
        "checksums": _sums(name),
        "stored_bytes": 0,
        "data_bytes": 0,
        "zero_bytes": 0,
        "method": "commit",
    }
    with pytest.raises(ChainDamaged, match="checksum file"):
        mf.loads(resign(body), "chain")
    body["pending"]["checksums"] = _sums(f"{P4}.sums")
    assert mf.loads(resign(body), "chain").pending is not None


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deeply_nested_json_is_damage(depth: int) -> None:
    with pytest.raises(ChainDamaged, match="unreadable"):
        mf.loads(b"[" * depth + b"]" * depth, "chain")
    with pytest.raises(ChainDamaged, match="unreadable"):
        mf.loads(b'{"sha256": "0", "points": ' + b"[" * depth + b"]" * depth + b"}", "chain")


# -- the journal ----------------------------------------------------------------


def test_journal_round_trip_and_optional() -> None:
    m = dataclasses.replace(sample(), writing=("20240304T000000Z.qcow2.partial", "20240304T000000Z.sums"))
    assert mf.loads(mf.dumps(m), "here") == m
    assert "writing" not in json.loads(mf.dumps(sample()))  # an empty journal is not written
    assert json.loads(mf.dumps(m))["version"] == mf.VERSION == 1  # older versions read it and ignore it


@pytest.mark.parametrize(
    "writing",
    [["../x"], ["/etc/passwd"], [mf.NAME], ["lock"], [f"{P1}.qcow2/x"], "x", [1], {"a": 1}],
)
def test_journal_names_only_chain_files(writing: object) -> None:
    with pytest.raises(ChainDamaged):
        mf.loads(edited(writing=writing), "chain")


def test_missing_manifest_with_layers_is_damage(tmp_path: Path) -> None:
    assert mf.load(tmp_path) is None  # nothing here: a new chain
    (tmp_path / "lock").touch()
    (tmp_path / ".manifest.json.tmp").touch()
    assert mf.load(tmp_path) is None
    (tmp_path / f"{P1}.sums").touch()
    with pytest.raises(ChainDamaged, match="rbd2qcow2 repair") as info:
        mf.load(tmp_path)
    assert info.value.exit_code == 65
    assert f"{P1}.sums" in str(info.value)


# -- clean-up by the journal; files opened for reading ---------------------------


def test_clean_up_removes_only_what_the_journal_names(tmp_path: Path) -> None:
    from rbd2qcow2.store.chain import remove_orphan_files

    new, stray = "20240305T000000Z", "20240306T000000Z"
    journal = (f"{new}.qcow2.partial", f"{new}.sums.partial", f"{new}.qcow2", f"{new}.sums")
    m = dataclasses.replace(sample(), writing=journal)
    mf.save(tmp_path, m)
    kept = [f"{p.id}.qcow2" for p in m.points] + [f"{P1}.sums", f"{stray}.qcow2", f"{stray}.sums.partial"]
    for name in [*kept, f"{new}.qcow2.partial", f"{new}.sums", ".manifest.json.tmp"]:
        (tmp_path / name).write_bytes(name.encode())
    hashes = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in kept}
    cleaned = remove_orphan_files(tmp_path, m)
    assert cleaned.writing == () and mf.load(tmp_path) == cleaned
    left = {p.name for p in tmp_path.iterdir()} - {mf.NAME}
    assert left == set(kept)  # the unnamed files of our shape stay, untouched
    assert {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in kept} == hashes


def test_clean_up_never_removes_a_named_file(tmp_path: Path) -> None:
    from rbd2qcow2.store.chain import remove_orphan_files

    m = dataclasses.replace(sample(), writing=(f"{P1}.qcow2", f"{P1}.sums"))  # a journal naming committed files
    mf.save(tmp_path, m)
    for name in m.writing:
        (tmp_path / name).write_bytes(b"data")
    remove_orphan_files(tmp_path, m)
    assert all((tmp_path / name).read_bytes() == b"data" for name in m.writing)


@pytest.fixture
def alarm() -> Any:
    """Turns a hang into a failure: a FIFO opened for reading blocks until a writer comes."""
    import signal

    def hung(*_: object) -> None:
        raise TimeoutError("blocked on a FIFO or device")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "directory"])
def test_chain_files_are_opened_only_as_regular_files(tmp_path: Path, kind: str, alarm: None) -> None:
    from rbd2qcow2.ops import readback
    from rbd2qcow2.store.checksums import file_sha256, read_records
    from rbd2qcow2.store.qcow2 import read_header
    from rbd2qcow2.transfer.deepcheck import MappedChain

    path = tmp_path / f"{P1}.sums"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    opens: list[Callable[[], object]] = [
        lambda: file_sha256(path),
        lambda: list(read_records(path)),
        lambda: read_header(path),
        lambda: os.close(readback.open_for_read_back(path, direct=True)),
        lambda: MappedChain([path]).close(),
    ]
    for open_it in opens:
        with pytest.raises(ChainDamaged):
            open_it()


@pytest.mark.parametrize("kind", ["fifo", "link", "directory"])
def test_manifest_itself_is_read_only_as_a_regular_file(tmp_path: Path, kind: str, alarm: None) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mf.save(elsewhere, sample())  # a valid manifest, reached only through a link
    path = tmp_path / mf.NAME
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(elsewhere / mf.NAME)
    with pytest.raises(ChainDamaged, match="regular file"):
        mf.load(tmp_path)
