"""The target directory's tag: made once, agreed on by concurrent first runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rbd2qcow2.core.errors import TargetError
from rbd2qcow2.store.fsutil import RESERVE, RESERVE_BYTES, keep_reserve, release_reserve
from rbd2qcow2.store.target import TAG_FILE, open_target

REPO = Path(__file__).resolve().parent.parent


def test_tag_is_made_once_and_kept(tmp_path: Path) -> None:
    root = tmp_path / "t"
    tag = open_target(root, create=True)
    assert open_target(root, create=False) == tag
    assert open_target(root, create=True) == tag
    assert sorted(p.name for p in root.iterdir()) == [RESERVE, TAG_FILE]
    assert (root / TAG_FILE).stat().st_mode & 0o077 == 0


def test_missing_tag_without_create_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="not an rbd2qcow2 target"):
        open_target(tmp_path, create=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"tag": 5}', b'{"tag": "../x"}'])
def test_damaged_tag_file_is_a_target_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / TAG_FILE).write_bytes(content)
    with pytest.raises(TargetError):
        open_target(tmp_path, create=True)
    assert (tmp_path / TAG_FILE).read_bytes() == content


def test_concurrent_first_runs_agree_on_one_tag(tmp_path: Path) -> None:
    # Many processes start together on a new target; every one must come out
    # with the same tag (a second tag would hide the first one's snapshots).
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from rbd2qcow2.store.target import open_target\n"
        "start = float(sys.argv[2])\n"
        "while time.time() < start: pass\n"
        "print(open_target(Path(sys.argv[1]), create=True))\n"
    )
    for round_ in range(5):
        root = tmp_path / f"t{round_}"
        start = time.time() + 0.5
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(root), str(start)], cwd=REPO, stdout=subprocess.PIPE, text=True
            )
            for _ in range(6)
        ]
        tags = {p.communicate(timeout=60)[0].strip() for p in procs}
        assert all(p.returncode == 0 for p in procs)
        assert tags == {json.loads((root / TAG_FILE).read_text())["tag"]}
        assert sorted(p.name for p in root.iterdir()) == [RESERVE, TAG_FILE]


def test_the_reserve_is_made_released_and_made_again(tmp_path: Path) -> None:
    open_target(tmp_path, create=True)
    reserve = tmp_path / RESERVE
    st = reserve.stat()
    assert st.st_blocks * 512 >= RESERVE_BYTES and st.st_mode & 0o077 == 0
    assert release_reserve(tmp_path) and not reserve.exists()
    assert not release_reserve(tmp_path)
    with open(reserve, "wb") as fh:  # a reserve made short on a full disk is made whole
        fh.write(b"x")
    keep_reserve(tmp_path)
    assert reserve.stat().st_blocks * 512 >= RESERVE_BYTES
    reserve.unlink()
    reserve.symlink_to(tmp_path / "elsewhere")  # not ours: left alone
    keep_reserve(tmp_path)
    assert reserve.is_symlink() and not (tmp_path / "elsewhere").exists()
