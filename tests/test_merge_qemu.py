"""The commit merge at the qemu level: real qcow2 files and a real qemu-storage-daemon, no Ceph."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbd2qcow2.adapters import qemu
from rbd2qcow2.adapters.nbdio import Connection
from rbd2qcow2.core.errors import DataError, InUse, QemuError
from rbd2qcow2.ops import merge, readback
from rbd2qcow2.ops.readback import read_back
from rbd2qcow2.store import qcow2
from rbd2qcow2.store.checksums import BLOCK_SIZE, block_records, unpack_records

MiB = 1 << 20
SIZE = 16 * MiB


def io(path: Path, *commands: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, capture_output=True)


def raw(path: Path) -> bytes:
    out = path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out)], check=True)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    """A (data everywhere) <- L1 (some data) <- B (data, zeros hiding L1 and A)."""
    a, l1, b = (tmp_path / n for n in ("a.qcow2", "l1.qcow2", "b.qcow2"))
    qcow2.create_layer(a, SIZE, None)
    io(a, f"write -P 0x11 0 {SIZE}")
    qcow2.create_layer(l1, SIZE, a.name)
    io(l1, "write -P 0x22 0 1M", "write -P 0x23 8M 1M")
    qcow2.create_layer(b, SIZE, l1.name)
    io(b, "write -z 0 512k", "write -P 0x33 4M 1M", "write -z 8M 64k", "write -z 12M 64k")
    return [a, l1, b]


def has_o_direct(path: Path) -> bool:
    """Whether the file system of ``path`` (a file) opens it with O_DIRECT."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.fixture
def daemon() -> Iterator[qemu.StorageDaemon]:
    with qemu.storage_daemon() as d:
        yield d


def records_of(data: bytes, blocks: list[int]) -> list[tuple[int, bytes]]:
    out = []
    for i in blocks:
        recs, _ = block_records(i * BLOCK_SIZE, data[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE])
        out += unpack_records(recs)
    return out


def test_commit_makes_the_base_read_like_the_top_and_leaves_the_top_alone(
    chain: list[Path], daemon: qemu.StorageDaemon
) -> None:
    _, l1, b = chain
    expected = raw(b)
    top_bytes = hashlib.sha256(b.read_bytes()).hexdigest()
    seen: list[int] = []
    daemon.commit(chain, 1, seen.append)
    assert hashlib.sha256(b.read_bytes()).hexdigest() == top_bytes
    assert raw(l1) == expected  # l1 over a now reads as b did
    assert sum(seen) > 0
    qemu.check_layer(l1)
    # Zero clusters of the top became zeros in the base, not holes onto a.
    assert expected[:BLOCK_SIZE] == bytes(BLOCK_SIZE) and expected[12 * MiB : 12 * MiB + BLOCK_SIZE] == bytes(
        BLOCK_SIZE
    )


def test_read_back_accepts_the_commit_and_catches_a_wrong_block(chain: list[Path], daemon: qemu.StorageDaemon) -> None:
    a, l1, b = chain
    expected = raw(b)
    daemon.commit(chain, 1)
    blocks = [0, 1, 64, 65, 128, 192]  # zeros over data, data, zeros, zeros
    records = records_of(expected, blocks)
    read_back(daemon, [a, l1], records, SIZE)
    wrong = [(i, d if i != 65 else b"\0" * 16) for i, d in records]
    with pytest.raises(DataError, match=str(65 * BLOCK_SIZE)):
        read_back(daemon, [a, l1], wrong, SIZE)
    not_zero = [(i, d if i != 0 else records[2][1]) for i, d in records]
    with pytest.raises(DataError, match="offset 0"):
        read_back(daemon, [a, l1], not_zero, SIZE)


def test_commit_writes_its_base_with_o_direct_where_the_file_system_has_it(
    chain: list[Path], daemon: qemu.StorageDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[dict[str, object]] = []
    real_cmd = daemon.cmd

    def cmd(command: str, **args: object) -> object:
        if command == "blockdev-add":
            sent.append(args)
        return real_cmd(command, **args)

    monkeypatch.setattr(daemon, "cmd", cmd)
    expected = raw(chain[2])
    size = chain[1].stat().st_size
    daemon.commit(chain, 1)
    assert raw(chain[1]) == expected
    base, top = sent[-2:]
    assert top["backing"] == base["node-name"]
    if has_o_direct(chain[1]):
        assert base["file"] == {  # the first way
            "driver": "preallocate",
            "file": {"driver": "file", "filename": str(chain[1]), "aio": "io_uring", "cache": {"direct": True}},
        }
    # The preallocate filter extends the file 128 MiB at a time and cuts it back when the base closes.
    assert size < chain[1].stat().st_size < size + 16 * MiB
    assert qemu.check_layer(chain[1])["check-errors"] == 0


def test_commit_without_o_direct_falls_back_to_the_page_cache(
    chain: list[Path], daemon: qemu.StorageDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a file system refuses O_DIRECT (tmpfs before Linux 6.6), the base is written through the cache."""
    sent: list[dict[str, object]] = []
    real_cmd = daemon.cmd

    def cmd(command: str, **args: object) -> object:
        if command == "blockdev-add":
            sent.append(args)
            if '"cache": {"direct": true}' in json.dumps(args):
                raise QemuError("Could not open 'l1.qcow2': Invalid argument")
        return real_cmd(command, **args)

    monkeypatch.setattr(daemon, "cmd", cmd)
    expected = raw(chain[2])
    daemon.commit(chain, 1)
    assert raw(chain[1]) == expected
    # Two refused ways (O_DIRECT with and without the filter), the buffered base, the layers above.
    assert len(sent) == 4 and sent[2]["file"] == {"driver": "file", "filename": str(chain[1]), "aio": "io_uring"}
    assert qemu.check_layer(chain[1])["check-errors"] == 0
    assert [n["node-name"] for n in daemon.cmd("query-named-block-nodes")] == []


def test_what_a_killed_commit_preallocated_is_cut_before_the_next_one(chain: list[Path]) -> None:
    """A commit killed with the preallocate filter open leaves up to 128 MiB past the image's end;
    the next attempt's filter would keep it.  It is cut first, and the content stays."""
    a, l1, b = chain
    expected = raw(b)
    with qemu.storage_daemon() as d:
        export = d.export_chain([a, l1], writable=True, preallocate=True)
        with Connection(export.socket, export.name) as conn:  # the commit's first cluster: b's data
            conn.pwrite(expected[4 * MiB : 4 * MiB + BLOCK_SIZE], 4 * MiB)
            conn.flush()
        assert l1.stat().st_size > 100 * MiB
        assert d.alive
        d.kill()  # as a crash would, with the filter open
        assert not d.alive
    end = qemu.check_layer(l1)["image-end-offset"]
    assert l1.stat().st_size > end + 100 * MiB  # left behind
    merge.cut_to_image_end(l1)
    assert l1.stat().st_size == end
    with qemu.storage_daemon() as d:
        d.commit(chain, 1)
    assert raw(l1) == expected
    assert l1.stat().st_size <= qemu.check_layer(l1)["image-end-offset"]
    merge.cut_to_image_end(l1)  # nothing to cut: unchanged
    assert raw(l1) == expected


def test_read_back_opens_with_o_direct_or_falls_back_on_einval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(8192))
    fd = readback.open_for_read_back(path, direct=True)
    try:
        assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) == has_o_direct(path)
        buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT asks
        assert os.preadv(fd, [buf], 4096) == 4096 and buf[:] == bytes(4096)
    finally:
        os.close(fd)
    fd = readback.open_for_read_back(path, direct=False)
    try:
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    real_open = os.open

    def no_direct(p: object, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", no_direct)
    fd = readback.open_for_read_back(path, direct=True)
    try:
        assert os.pread(fd, 100, 0) == bytes(100)  # buffered: any length
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        readback.open_for_read_back(tmp_path / "missing", direct=True)


def test_commit_refused_while_another_process_reads_the_chain(
    chain: list[Path], daemon: qemu.StorageDaemon, tmp_path: Path
) -> None:
    l1 = chain[1]
    sock = tmp_path / "nbd.sock"
    reader = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), str(l1)])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        before = hashlib.sha256(l1.read_bytes()).hexdigest()
        with pytest.raises(InUse, match="another process has a file of the chain open"):
            daemon.commit(chain, 1)
        assert hashlib.sha256(l1.read_bytes()).hexdigest() == before
    finally:
        reader.terminate()
        reader.wait()


def test_commit_of_a_damaged_layer_is_a_qemu_error_not_in_use(
    chain: list[Path], daemon: qemu.StorageDaemon, tmp_path: Path
) -> None:
    """Only qemu's lock conflicts mean "in use" (every blockdev-add error says "blockdev")."""
    broken = tmp_path / "broken.qcow2"
    broken.write_bytes(b"not a qcow2 file" * 4096)
    with pytest.raises(QemuError) as caught:
        daemon.commit([broken, chain[-1]], 0)
    assert not isinstance(caught.value, InUse)


def test_read_back_reads_blocks_the_merged_layer_leaves_to_its_backing(
    chain: list[Path], daemon: qemu.StorageDaemon
) -> None:
    # The read-back maps the merged layer alone; a recorded block it does not
    # hold (block 32 lies only in a) is read through the whole chain instead,
    # so it passes when the chain reads as recorded and fails when it does not.
    a, l1, b = chain
    expected = raw(b)
    daemon.commit(chain, 1)
    own = qemu.map_own(l1)
    assert all(e.depth == 0 for e in own)
    assert not any(e.start <= 32 * BLOCK_SIZE < e.start + e.length for e in own)
    records = records_of(expected, [32, 64])
    read_back(daemon, [a, l1], records, SIZE)
    other = records_of(bytes([0x22]) * SIZE, [32])
    with pytest.raises(DataError, match=str(32 * BLOCK_SIZE)):
        read_back(daemon, [a, l1], [*other, records[1]], SIZE)


def test_read_back_of_blocks_stored_out_of_virtual_order_with_a_short_last_block(
    tmp_path: Path, daemon: qemu.StorageDaemon
) -> None:
    size = MiB + 512  # the last block holds 512 bytes
    layer = tmp_path / "odd.qcow2"
    qcow2.create_layer(layer, size, None)
    io(layer, f"write -P 0x44 {MiB} 512", "write -P 0x55 0 64k", "write -P 0x66 128k 64k")  # stored in this order
    data = raw(layer)
    assert len(data) == size
    records = records_of(data, [0, 2]) + unpack_records(block_records(16 * BLOCK_SIZE, data[16 * BLOCK_SIZE :])[0])
    read_back(daemon, [layer], sorted(records), size)
    wrong = [(i, d if i != 16 else records[0][1]) for i, d in sorted(records)]
    with pytest.raises(DataError, match=str(16 * BLOCK_SIZE)):
        read_back(daemon, [layer], wrong, size)


def test_commit_opens_only_the_base_writable() -> None:
    files = [Path("a.qcow2"), Path("b.qcow2"), Path("c.qcow2")]
    base, top = qemu.commit_options(files, 1, "top", "base", qemu.CommitWay("io_uring", True, True))
    # The base alone, writable, without backing node, through the preallocate filter with O_DIRECT.
    assert base == {
        "driver": "qcow2",
        "node-name": "base",
        "file": {
            "driver": "preallocate",
            "file": {"driver": "file", "filename": "b.qcow2", "aio": "io_uring", "cache": {"direct": True}},
        },
        "backing": None,
    }
    # Above it, read-only, the layers to commit; below it nothing is opened.
    assert top == {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": "c.qcow2", "read-only": True},
        "backing": "base",
        "read-only": True,
        "node-name": "top",
    }
    plain, _ = qemu.commit_options(files, 1, "top", "base", qemu.CommitWay(None, False, False))
    assert plain["file"] == {"driver": "file", "filename": "b.qcow2"}
    _, two = qemu.commit_options([*files, Path("d.qcow2")], 1, "top", "base", qemu.COMMIT_WAYS[0])
    assert two["backing"]["backing"] == "base" and two["backing"]["read-only"] is True


def test_chain_options_set_aio_on_read_only_layers_only() -> None:
    files = [Path("a.qcow2"), Path("b.qcow2")]
    top = qemu.chain_options(files, writable_top=True, direct=True, aio="io_uring", root=Path.cwd())
    assert top["file"] == {"driver": "file", "filename": "b.qcow2", "aio": "io_uring", "cache": {"direct": True}}
    assert top["backing"]["file"]["aio"] == "io_uring"
    plain = qemu.chain_options(files)
    assert "aio" not in plain["file"] and "aio" not in plain["backing"]["file"]


def test_chain_options_are_short() -> None:
    """``read-only`` on a read-only top alone (qemu opens backing nodes and files read-only by
    itself), names relative to the daemon's directory, the preallocate filter with its defaults."""
    root = Path("/srv/target")
    files = [root / "pool" / "img" / f"{i}.qcow2" for i in range(3)]
    ro = qemu.chain_options(files, root=root)
    rw = qemu.chain_options(files, writable_top=True, preallocate=True, root=root)
    assert ro["read-only"] is True and "read-only" not in rw
    assert rw["file"] == {"driver": "preallocate", "file": {"driver": "file", "filename": "pool/img/2.qcow2"}}
    for opts in (ro["backing"], rw["backing"]):
        assert "read-only" not in opts and "read-only" not in opts["file"]
        assert opts["file"]["filename"] == "pool/img/1.qcow2" and opts["backing"]["backing"] is None


def test_daemon_names_are_relative_under_its_root_only() -> None:
    root = Path("/srv/target")
    assert qemu.daemon_name(root / "p" / "a b" / "x.qcow2", root) == "p/a b/x.qcow2"
    assert qemu.daemon_name(Path("/srv/other/x.qcow2"), root) == "/srv/other/x.qcow2"
    assert qemu.daemon_name(Path("/srv/target-2/x.qcow2"), root) == "/srv/target-2/x.qcow2"
    assert qemu.daemon_name(Path("/srv/x.qcow2"), None) == "/srv/x.qcow2"
    assert qemu.daemon_name(Path("rel.qcow2"), None) == str(Path.cwd() / "rel.qcow2")


def test_backing_layers_open_read_only(tmp_path: Path) -> None:
    """What the short options leave to qemu: every node but a writable top is read-only."""
    files = []
    for i in range(3):
        files.append(tmp_path / f"l{i}.qcow2")
        qcow2.create_layer(files[-1], 1 << 30, files[-2].name if i else None)
    with qemu.storage_daemon(root=tmp_path) as daemon:
        for writable in (True, False):
            export = daemon.export_chain(files, writable=writable, preallocate=writable)
            try:
                nodes = daemon.cmd("query-named-block-nodes")
                rw = sorted(n["drv"] for n in nodes if not n["ro"])
                assert rw == (["file", "preallocate", "qcow2"] if writable else [])
                assert len(nodes) == 6 + writable
            finally:
                daemon.remove_export(export)


def test_export_for_reading_reads_the_chain(chain: list[Path], daemon: qemu.StorageDaemon) -> None:
    from rbd2qcow2.adapters.nbdio import Connection

    expected = raw(chain[-1])
    export = daemon.export_for_reading(chain)
    try:
        with Connection(export.socket, export.name) as conn:
            assert bytes(conn.read_buffer(0, SIZE)) == expected
    finally:
        daemon.remove_export(export)


def test_daemon_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{qemu.DIR_PREFIX}{dead.pid}-abc"
    alive = tmp_path / f"{qemu.DIR_PREFIX}{os.getppid()}-abc"
    other = tmp_path / "rbd2qcow2-qsd-notapid"
    plain = tmp_path / f"{qemu.DIR_PREFIX}{dead.pid}-file"
    for d in (stale, alive, other):
        d.mkdir()
        (d / "qsd.log").write_text("")
    plain.write_text("")
    qemu.remove_stale_dirs(tmp_path)
    assert not stale.exists()
    assert alive.exists() and other.exists() and plain.exists()


def test_a_daemon_names_its_directory_with_its_owner(daemon: qemu.StorageDaemon) -> None:
    assert daemon.directory.name.startswith(f"{qemu.DIR_PREFIX}{os.getpid()}-")


def test_a_daemon_that_exits_before_connecting_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A qemu-storage-daemon that cannot start (here: an unknown option) must be
    # reported with its own message when first used, not after the QMP timeout.
    real_popen = subprocess.Popen

    def popen(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return real_popen([*args, "--no-such-option"], **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(subprocess, "Popen", popen)
    start = time.monotonic()
    with qemu.storage_daemon() as d, pytest.raises(QemuError, match="exited with status"):
        d.cmd("query-version")
    assert time.monotonic() - start < qemu.QMP_TIMEOUT / 2
    assert not d.alive


def test_a_daemon_accepts_commands_after_a_late_first_use(daemon: qemu.StorageDaemon) -> None:
    # The daemon boots while the caller works: the first command may come late.
    time.sleep(0.3)
    assert "qemu" in daemon.cmd("query-version")


def test_a_temporary_directory_too_long_for_a_socket_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    with pytest.raises(QemuError, match="cannot listen on the QMP socket"), qemu.storage_daemon():
        pass
    assert not [p for p in deep.iterdir() if p.name.startswith(qemu.DIR_PREFIX)]  # nothing left behind
