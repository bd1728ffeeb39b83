"""The shared test factories build what the code accepts: valid manifests, loadable chains, stall points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from factories import IMAGE, TAG, chain, manifest, point, save_chain, stall_env, wait_stalled

from rbd2qcow2.core.names import chain_relpath, snapshot_name
from rbd2qcow2.store import manifest as mf

A, B, C = "20260101T000000Z", "20260102T000000Z", "20260103T000000Z"


def test_a_chain_is_full_then_incremental_and_round_trips() -> None:
    points = chain(A, B, C, size=8 << 20)
    assert [(p.parent, p.kind) for p in points] == [(None, "full"), (A, "incremental"), (B, "incremental")]
    assert {p.size for p in points} == {8 << 20}
    assert points[1].snapshot.name == snapshot_name(TAG, B)
    m = manifest(*points)
    assert mf.loads(mf.dumps(m), "here") == m
    assert m.latest == points[-1]


def test_a_saved_chain_loads_from_its_directory(tmp_path: Path) -> None:
    m = manifest(point(A), point(B, A, flags=("damaged",)))
    directory = save_chain(tmp_path, m)
    assert directory == tmp_path.joinpath(*chain_relpath(IMAGE))
    assert mf.load(directory) == m


def test_wait_stalled_sees_the_stall_file_or_the_end(tmp_path: Path) -> None:
    stall = tmp_path / "stall"
    assert stall_env("mid-restore", stall, 2) == {
        "RBD2QCOW2_STALL_AT": "mid-restore",
        "RBD2QCOW2_STALL_FILE": str(stall),
        "RBD2QCOW2_STALL_SECONDS": "2",
    }
    touch = f"import pathlib, time; pathlib.Path({str(stall)!r}).touch(); time.sleep(30)"
    with subprocess.Popen([sys.executable, "-c", touch]) as proc:
        try:
            assert wait_stalled(proc, stall)
        finally:
            proc.kill()
    ended = tmp_path / "never"
    with subprocess.Popen([sys.executable, "-c", "pass"]) as proc:
        assert not wait_stalled(proc, ended)
