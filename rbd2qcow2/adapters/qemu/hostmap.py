"""Allocation maps (``qemu-img map``): which layer serves each extent, and where its bytes live."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ...core.errors import QemuError, QemuUnavailable
from . import img
from .blockdev import chain_options, json_filename, layer_alone

READ_MAP = 1 << 16  # bytes of map output parsed per read: a few hundred extents, parsed while qemu-img goes on


@dataclass(frozen=True)
class MapExtent:
    """One extent of ``qemu-img map``: which layer serves it (depth 0 = top)."""

    start: int
    length: int
    depth: int
    present: bool
    zero: bool


def map_chain(files: Sequence[Path]) -> list[MapExtent]:
    """The allocation map of a chain's top (base first), by layer depth."""
    out = img.output(["qemu-img", "map", "--output=json", json_filename(chain_options(files))], what="qemu-img map")
    return [
        MapExtent(int(e["start"]), int(e["length"]), int(e["depth"]), bool(e["present"]), bool(e["zero"]))
        for e in json.loads(out)
    ]


class HostExtent(NamedTuple):
    """One extent of ``qemu-img map`` with where its bytes live.

    ``offset`` is the host offset of the raw, uncompressed data in the file
    of the layer at ``depth`` (0 = top); ``None`` where qemu names none
    (compressed clusters, zeros, holes).  A tuple: maps of deep chains have
    tens of thousands of extents.
    """

    start: int
    length: int
    depth: int
    zero: bool
    data: bool
    offset: int | None


def map_host(files: Sequence[Path], *, pass_fds: Sequence[int] = ()) -> list[HostExtent]:
    """The allocation map of a chain's top (base first), with host offsets.

    ``pass_fds`` are inherited by qemu-img, for files named ``/dev/fd/N``.
    """
    args = ["qemu-img", "map", "--output=json", json_filename(chain_options(files))]
    return host_extents(img.output(args, what="qemu-img map", pass_fds=pass_fds))


def map_own(path: Path) -> list[HostExtent]:
    """What the qcow2 layer ``path`` itself allocates (data and zero clusters), with host offsets.

    Its backing chain is not opened (a deep chain costs ``qemu-img map`` most
    of its time); what the layer leaves to its backing files is left out of
    the list.  All extents are at depth 0.
    """
    out = img.output(["qemu-img", "map", "--output=json", json_filename(layer_alone(path))], what="qemu-img map")
    return [e for e in host_extents(out, own=True) if e.depth >= 0]


def host_extents(text: str | bytes, *, own: bool = False) -> list[HostExtent]:
    """The extents of ``qemu-img map --output=json`` output (a JSON array of flat objects).

    With ``own`` (a layer mapped without its backing file), extents the layer
    does not allocate (``"present": false``) get depth -1.
    """
    try:
        return [
            HostExtent(
                int(e["start"]),
                int(e["length"]),
                -1 if own and not e["present"] else int(e["depth"]),
                bool(e["zero"]),
                bool(e["data"]),
                int(e["offset"]) if "offset" in e else None,
            )
            for e in json.loads(text)
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise QemuError(f"qemu-img map printed an unexpected map: {exc!r}") from exc


def split_map_output(buf: bytes) -> tuple[list[HostExtent], bytes]:
    """The complete extents at the start of a piece of ``qemu-img map --output=json`` output, and the rest.

    The objects are flat, so each complete one ends with the last brace so far.
    """
    end = buf.rfind(b"}") + 1
    return (host_extents(b"[" + buf[:end].lstrip(b" \t\r\n[,") + b"]") if end else []), buf[end:]


class HostMap:
    """``qemu-img map`` of a chain's top (base first), with host offsets, running while the caller works.

    qemu prints into an unlinked temporary file, so it never waits for a
    reader; :meth:`read` returns the extents printed since the last call,
    in order.  ``pass_fds`` are inherited by qemu-img, for files named
    ``/dev/fd/N``.  :meth:`close` ends qemu-img if it still runs.
    """

    def __init__(self, files: Sequence[Path], *, pass_fds: Sequence[int] = ()) -> None:
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self._pos = 0
        self._rest = b""
        self._ended = False
        self._deadline = time.monotonic() + img.QEMU_IMG_TIMEOUT
        self._args = ["qemu-img", "map", "--output=json", json_filename(chain_options(files))]
        try:
            self._proc = subprocess.Popen(
                self._args, stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, pass_fds=tuple(pass_fds)
            )
        except OSError as exc:
            self._out.close()
            self._err.close()
            raise QemuUnavailable(f"cannot run qemu-img: {exc.strerror}") from exc

    def read(self, *, wait: bool = False) -> list[HostExtent] | None:
        """The extents printed since the last call (maybe none); ``None`` once all have been read.

        With ``wait``, waits until qemu has printed some or has ended.
        Raises :class:`QemuError` when qemu-img fails.
        """
        while not self._ended:
            exited = self._proc.poll() is not None  # before the read: then the file holds all it printed
            data = os.pread(self._out.fileno(), READ_MAP, self._pos)
            if data:
                self._pos += len(data)
                extents = self._parse(data)
                if extents or not wait:
                    return extents
            elif exited:
                self._end()
            elif not wait:
                return []
            elif time.monotonic() > self._deadline:
                self.close()
                raise QemuError(f"qemu-img map did not finish in {img.QEMU_IMG_TIMEOUT:.0f} s (killed)")
            else:
                time.sleep(0.002)
        return None

    def _parse(self, data: bytes) -> list[HostExtent]:
        extents, self._rest = split_map_output(self._rest + data)
        return extents

    def _end(self) -> None:
        self._ended = True
        if self._proc.wait() != 0:
            self._err.seek(0)
            msg = self._err.read().decode(errors="replace").strip()
            if self._proc.returncode < 0:  # killed: says nothing of the chain
                raise QemuUnavailable(f"qemu-img map killed by signal {-self._proc.returncode}: {msg}")
            raise img.failure("qemu-img map", self._args, self._proc.returncode, msg)
        if self._rest.strip() != b"]":
            raise QemuError(f"qemu-img map printed an unexpected map: ends with {self._rest[-100:]!r}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if not self._out.closed:
            self._out.close()
            self._err.close()
