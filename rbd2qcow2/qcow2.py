"""Pure checks of qcow2 headers, done before qemu opens a file we did not just write.

A qcow2 header can name any host file as its backing file or external data
file, so a planted or damaged chain file could make qemu read (or, for a
data file, write) outside the chain.  :func:`check_header` accepts a file only
if its header is exactly what the manifest expects: qcow2 version 3, no
encryption, no external data file, not marked corrupt, and a backing file
that is either absent or the expected sibling name with format ``qcow2``.
Only the header is parsed here; data is always read through qemu.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ChainDamaged

MAGIC = b"QFI\xfb"
HEADER_READ = 65536
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_DATA_FILE = 0x44415441
EXT_ENCRYPTION = 0x0537BE77
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ChainDamaged(str(path), f"cannot open: {exc.strerror}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ChainDamaged(str(path), "not a regular file")
        raw = os.pread(fd, HEADER_READ, 0)
    finally:
        os.close(fd)
    return parse_header(raw, str(path))
