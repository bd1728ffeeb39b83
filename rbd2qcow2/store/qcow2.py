"""qcow2 metadata: new empty layers, and pure checks of headers before qemu opens a file.

:func:`create_layer` writes a new empty layer itself, byte for byte what
``qemu-img create -f qcow2 -o compat=1.1,cluster_size=64k [-u -b NAME -F
qcow2]`` writes (a test compares the two): a header cluster, a refcount
table and one refcount block, and an L1 table of zeros: a few small
writes, where qemu-img would cost a process start per layer.

A qcow2 header can name any host file as its backing file or external data
file, so a planted or damaged chain file could make qemu read (or, for a
data file, write) outside the chain.  :func:`check_header` accepts a file only
if its header is exactly what the manifest expects: qcow2 version 3, no
encryption, no external data file, not marked corrupt, and a backing file
that is either absent or the expected sibling name with format ``qcow2``.

Beyond headers, only :func:`host_clusters` reads qcow2 metadata: where a
layer this process has just written keeps its clusters, for the merge's
read-back (which hashes them against the recorded checksums, while
``qemu-img check`` checks the same layer).  Anything it does not expect
makes it give up, and the caller asks ``qemu-img map`` instead.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ChainDamaged, StorageError, TargetError, storage_error
from .layout import BLOCK_SIZE

MAGIC = b"QFI\xfb"
HEADER_READ = 65536
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
EXT_ENCRYPTION = 0x0537BE77
EXT_FEATURE_NAMES = 0x6803F857
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_EXTENDED_L2 = 1 << 4
INCOMPAT_KNOWN = 0b11111  # dirty, corrupt, data file, compression type, extended L2

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 28 more bytes


@dataclass(frozen=True)
class Header:
    version: int
    size: int
    cluster_bits: int
    backing_file: str | None
    backing_format: str | None
    crypt_method: int
    incompatible: int
    has_data_file: bool
    has_encryption: bool


def parse_header(raw: bytes, where: str = "qcow2") -> Header:
    """Parse the fixed header and the header extensions of a qcow2 file."""
    if len(raw) < _V2.size or raw[:4] != MAGIC:
        raise ChainDamaged(where, "not a qcow2 file")
    (_, version, backing_off, backing_len, cluster_bits, size, crypt, *_rest) = _V2.unpack_from(raw)
    incompatible, header_len = 0, _V2.size
    if version >= 3:
        if len(raw) < _V2.size + _V3.size:
            raise ChainDamaged(where, "truncated qcow2 header")
        incompatible, _compat, _autoclear, _refcount_order, header_len = _V3.unpack_from(raw, _V2.size)
    if not 9 <= cluster_bits <= 21:
        raise ChainDamaged(where, f"implausible cluster size 2^{cluster_bits}")
    backing = None
    if backing_off:
        if backing_len > 1023 or backing_off + backing_len > len(raw):
            raise ChainDamaged(where, "backing file name out of bounds")
        backing = raw[backing_off : backing_off + backing_len].decode("utf-8", "surrogateescape")
    exts = _extensions(raw, header_len, where)
    fmt = exts.get(EXT_BACKING_FORMAT)
    return Header(
        version=version,
        size=size,
        cluster_bits=cluster_bits,
        backing_file=backing,
        backing_format=None if fmt is None else fmt.decode("ascii", "replace"),
        crypt_method=crypt,
        incompatible=incompatible,
        has_data_file=EXT_DATA_FILE in exts or bool(incompatible & INCOMPAT_DATA_FILE),
        has_encryption=EXT_ENCRYPTION in exts or crypt != 0,
    )


def _extensions(raw: bytes, offset: int, where: str) -> dict[int, bytes]:
    exts: dict[int, bytes] = {}
    while True:
        if offset + 8 > len(raw):
            raise ChainDamaged(where, "header extensions run past the header")
        kind, length = struct.unpack_from(">II", raw, offset)
        if kind == EXT_END:
            return exts
        offset += 8
        if offset + length > len(raw):
            raise ChainDamaged(where, "header extension out of bounds")
        exts[kind] = raw[offset : offset + length]
        offset += (length + 7) & ~7


def check_header(h: Header, *, where: str, expected_backing: str | None, size: int) -> None:
    """Refuse a header that is not exactly what the manifest leads us to expect."""
    problems = []
    if h.version != 3:
        problems.append(f"qcow2 version {h.version} (3 expected)")
    if h.has_data_file:
        problems.append("names an external data file")
    if h.has_encryption:
        problems.append("is encrypted")
    if h.incompatible & INCOMPAT_CORRUPT:
        problems.append("is marked corrupt")
    if h.incompatible & ~INCOMPAT_KNOWN:
        problems.append(f"unknown incompatible features {h.incompatible:#x}")
    if h.backing_file != expected_backing:
        problems.append(f"backing file {h.backing_file!r}, expected {expected_backing!r}")
    if expected_backing is not None and h.backing_format != "qcow2":
        problems.append(f"backing format {h.backing_format!r}, expected 'qcow2'")
    if h.size != -(-size // 512) * 512:  # qemu rounds virtual sizes up to 512 bytes
        problems.append(f"virtual size {h.size}, the manifest says {size}")
    if problems:
        raise ChainDamaged(where, "; ".join(problems))


def read_header(path: Path) -> Header:
    """Read and parse the header of ``path``; refuses links and non-regular files."""
    try:
        # O_NONBLOCK: a FIFO in the layer's place must not block the open (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ChainDamaged(str(path), f"cannot open: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ChainDamaged(str(path), "not a regular file")
        raw = os.pread(fd, HEADER_READ, 0)
    finally:
        os.close(fd)
    return parse_header(raw, str(path))


_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55: an L1 entry's L2 table, an L2 entry's cluster
_L1_RESERVED = 0x7F00_0000_0000_01FF
_L2_RESERVED = 0x3F00_0000_0000_01FE  # of a standard (uncompressed) cluster's entry
_L2_COMPRESSED = 1 << 62
_L2_ZERO = 1


# -- new layers -----------------------------------------------------------------------

CLUSTER = BLOCK_SIZE  # every layer's cluster is one checksum block
CLUSTER_BITS = CLUSTER.bit_length() - 1
MAX_BACKING_NAME = 1023  # bytes; qemu refuses longer names
MAX_L1_BYTES = 32 << 20  # qemu's QCOW_MAX_L1_SIZE: a virtual size of at most 2 PiB
REFCOUNT_ORDER = 4  # 16-bit refcounts
HEADER_LENGTH = 112  # the version 3 header with its compression type byte, padded
# The feature name table qemu writes into every new image (type, bit, name).
FEATURE_NAMES = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)
_REFTABLE = CLUSTER  # cluster 1
_REFBLOCK = 2 * CLUSTER  # cluster 2
_L1 = 3 * CLUSTER  # cluster 3 on


def empty_layer(size: int, backing: str | None) -> tuple[list[tuple[int, bytes]], int]:
    """The non-zero parts of a new empty layer and its file length (pure).

    ``size`` is rounded up to 512 bytes, as qemu does.  The L1 table holds
    one entry per 512 MiB of virtual size and starts at cluster 3; the
    refcount block gives clusters 0-2 and the L1 table's clusters a
    refcount of one.  ``backing`` (format qcow2) is written unchecked.
    """
    size = -(-size // 512) * 512
    l1_size = -(-size // (CLUSTER * (CLUSTER // 8)))
    if l1_size * 8 > MAX_L1_BYTES:
        raise StorageError(f"a virtual size of {size} bytes is more than a qcow2 image can hold")
    name = b"" if backing is None else backing.encode("utf-8", "surrogateescape")
    if len(name) > MAX_BACKING_NAME:
        raise StorageError(f"backing file name of {len(name)} bytes; qcow2 allows {MAX_BACKING_NAME}")
    exts = b""
    if backing is not None:
        exts += _extension(EXT_BACKING_FORMAT, b"qcow2")
    table = b"".join(struct.pack(">BB46s", kind, bit, text.encode()) for kind, bit, text in FEATURE_NAMES)
    exts += _extension(EXT_FEATURE_NAMES, table) + struct.pack(">II", EXT_END, 0)
    name_offset = HEADER_LENGTH + len(exts) if backing is not None else 0
    header = _V2.pack(
        MAGIC, 3, name_offset, len(name), CLUSTER_BITS, size, 0, l1_size, _L1 if l1_size else 0, _REFTABLE, 1, 0, 0
    ) + _V3.pack(0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH)
    header = header.ljust(HEADER_LENGTH, b"\0") + exts + name
    l1_clusters = -(-l1_size * 8 // CLUSTER)
    refcounts = struct.pack(f">{3 + l1_clusters}H", *([1] * (3 + l1_clusters)))
    return [(0, header), (_REFTABLE, struct.pack(">Q", _REFBLOCK)), (_REFBLOCK, refcounts)], _L1 + l1_size * 8


def _extension(kind: int, data: bytes) -> bytes:
    return struct.pack(">II", kind, len(data)) + data.ljust((len(data) + 7) & ~7, b"\0")


def create_layer(path: Path, size: int, backing: str | None, *, replace: bool = True) -> None:
    """Write a new empty qcow2 layer at ``path``, mode 0600.

    ``backing`` is a name relative to the layer's directory, or an absolute
    path for an overlay outside the chain.  An existing file is replaced, or
    with ``replace=False`` left alone (:class:`TargetError`).  Not synced:
    the caller fsyncs the layer once it holds its data.
    """
    parts, length = empty_layer(size, backing)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if replace else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError as exc:
        raise TargetError(f"{path} exists") from exc
    except OSError as exc:
        raise storage_error(exc, path) from exc
    try:
        os.fchmod(fd, 0o600)
        for offset, data in parts:
            if os.pwrite(fd, data, offset) != len(data):
                raise StorageError(f"{path}: short write")
        os.ftruncate(fd, length)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    finally:
        os.close(fd)


def host_clusters(path: Path) -> list[tuple[int, int, bool, int | None]] | None:
    """What the layer ``path`` itself allocates, from its L1 and L2 tables; None if unsure.

    Runs of ``(virtual offset, length, reads as zero, host offset)`` in
    virtual order; the host offset is None for zero and compressed clusters,
    and consecutive clusters stored one after another form one run.
    Clusters the layer leaves to its backing file are left out.  None (ask
    qemu) for anything but a plain version-3 layer with tables inside the
    file: extended L2 entries, an external data file, a reserved bit set,
    or an offset out of bounds or unaligned.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return _host_clusters(fd, str(path))
    finally:
        os.close(fd)


def _host_clusters(fd: int, where: str) -> list[tuple[int, int, bool, int | None]] | None:
    file_size = os.fstat(fd).st_size
    raw = os.pread(fd, HEADER_READ, 0)
    try:
        h = parse_header(raw, where)
    except ChainDamaged:
        return None
    if h.version != 3 or h.has_data_file or h.incompatible & (INCOMPAT_EXTENDED_L2 | INCOMPAT_CORRUPT):
        return None
    cluster = 1 << h.cluster_bits
    per_l2 = cluster // 8
    l1_size, l1_offset = struct.unpack_from(">IQ", raw, 36)
    clusters = -(-h.size // cluster)
    if l1_size * per_l2 < clusters or l1_offset % cluster or l1_offset + l1_size * 8 > file_size:
        return None
    l1 = struct.unpack(f">{l1_size}Q", os.pread(fd, l1_size * 8, l1_offset))
    # Plain data clusters, the usual entry, take the first branch of the loop; a run
    # is (start, length, zero, host) kept in locals until the next one begins.
    runs: list[tuple[int, int, bool, int | None]] = []
    r_start = r_len = 0
    r_zero, r_host = False, None
    data_limit = file_size - cluster  # a data cluster must lie wholly inside the file
    for i, l1_entry in enumerate(l1[: -(-clusters // per_l2)]):
        l2_offset = l1_entry & _OFFSET_MASK
        if l1_entry & _L1_RESERVED or (l2_offset and l2_offset + cluster > file_size):
            return None
        if not l2_offset:
            continue
        first = i * per_l2
        for j, entry in enumerate(struct.unpack(f">{per_l2}Q", os.pread(fd, cluster, l2_offset))):
            if not entry:
                continue
            start = (first + j) * cluster
            if start >= h.size:
                return None  # an entry past the virtual size
            if entry & _L2_COMPRESSED:
                zero, host = False, None
            else:
                if entry & _L2_RESERVED:
                    return None
                zero = bool(entry & _L2_ZERO)
                host = None if zero else entry & _OFFSET_MASK
                if host is not None and (not host or host % cluster or host > data_limit):
                    return None
            if r_len and r_start + r_len == start and r_zero == zero:
                if host is not None and r_host is not None and host == r_host + r_len:
                    r_len += cluster
                    continue
                if zero:
                    r_len += cluster
                    continue
            if r_len:
                runs.append((r_start, r_len, r_zero, r_host))
            r_start, r_len, r_zero, r_host = start, cluster, zero, host
    if r_len:
        runs.append((r_start, min(r_len, h.size - r_start), r_zero, r_host))
    return runs
