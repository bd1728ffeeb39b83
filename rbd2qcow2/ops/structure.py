"""The structural checks of ``verify``: the chain directory, the layers' headers, checksum files, ``qemu-img check``.

Each check returns what it found as :class:`Problem` values or texts; the
verifier (:mod:`rbd2qcow2.ops.verify`) reports them and decides the flags.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import qemu
from ..core.errors import ChainDamaged, Error, LayerCorrupt
from ..core.threads import Later, in_parallel
from ..store import manifest as mf
from ..store.activity import LATEST
from ..store.chain import orphan_files
from ..store.checksums import MISMATCH, SumsMismatch, check_sums_file
from ..store.layout import LOCK
from ..store.qcow2 import check_header, read_header

# Per point: what is wrong with its layer's header, and with its checksum file (None: nothing).
FileProblems = dict[str, tuple[str | None, str | None]]


@dataclass(frozen=True)
class Problem:
    """One thing found wrong: where (image, point, file, byte range) and what."""

    image: str
    what: str
    point: str | None = None
    file: str | None = None
    region: tuple[int, int] | None = None

    def __str__(self) -> str:
        return self.image + (f"@{self.point}" if self.point else "") + f": {self.detail}"

    @property
    def detail(self) -> str:
        """What, in which file and where, without the image."""
        where = f" at bytes {self.region[0]}-{self.region[1]}" if self.region else ""
        return self.what + (f" in {self.file}" if self.file else "") + where

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def directory_problems(directory: Path, m: mf.Manifest) -> Iterator[Problem]:
    """Links, modes and owners in the chain directory, then files the manifest does not name."""
    image = str(m.image)
    owner = directory.lstat().st_uid  # whoever else owns a file of the chain can rewrite it
    for path in [directory, *directory.iterdir()]:
        try:
            st = path.lstat()
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        except FileNotFoundError:  # removed since the listing (a temporary file): nothing to check
            continue
        if stat.S_ISLNK(st.st_mode):
            if path.name != LATEST or target != (m.latest.file if m.latest else None):
                yield Problem(image, "unexpected symbolic link", file=path.name)
            continue
        if stat.S_IMODE(st.st_mode) & 0o077:
            yield Problem(image, f"readable or writable by others (mode {stat.S_IMODE(st.st_mode):o})", file=path.name)
        if st.st_uid != owner and path.name != LOCK:  # the lock holds nothing a point depends on
            yield Problem(image, f"owned by uid {st.st_uid}, not the chain directory's (uid {owner})", file=path.name)
    for name in orphan_files(directory, m):
        yield Problem(image, "file not named by the manifest", file=name)


def file_problems(directory: Path, m: mf.Manifest) -> FileProblems:
    """Each point's header and checksum file problem."""
    return {p.id: (header_problem(directory, m, p), sums_problem(directory, p)) for p in m.points}


def header_problem(directory: Path, m: mf.Manifest, p: mf.Point) -> str | None:
    parent = m.point(p.parent).file if p.parent else None
    path = directory / p.file
    try:
        check_header(read_header(path), where=str(path), expected_backing=parent, size=p.size)
    except Error as exc:
        return str(exc)
    return None


def sums_problem(directory: Path, p: mf.Point) -> str | None:
    if p.checksums is None:
        return None
    try:
        check_sums_file(directory / p.checksums.file, p.checksums.sha256)
    except SumsMismatch:
        return MISMATCH
    except OSError as exc:
        return f"checksum file unreadable: {exc.strerror}"
    except ChainDamaged as exc:  # a link, a FIFO or a device where the file should be
        return f"checksum file unreadable: {exc.args[-1]}"
    return None


def layer_checks(directory: Path, points: list[mf.Point], parallel: int) -> Later[dict[str, Error | None]]:
    """``qemu-img check`` of the layers of ``points``, in parallel, once started."""

    def check(p: mf.Point) -> Error | None:
        try:
            qemu.check_layer(directory / p.file)
        except LayerCorrupt as exc:  # any other error is qemu's, not the layer's: it ends the check
            return exc
        return None

    def check_all() -> dict[str, Error | None]:
        errors = in_parallel(check, points, parallel, "check")
        return {p.id: error for p, error in zip(points, errors, strict=True)}

    return Later(check_all, "checks")


def structure_problems(m: mf.Manifest, files: FileProblems, checks: dict[str, Error | None]) -> Iterator[Problem]:
    """The points' file problems, in order: header or ``qemu-img check`` first, else the checksum file."""
    for p in m.points:
        header, sums = files[p.id]
        if (what := header or message(checks.get(p.id))) is not None:
            yield Problem(str(m.image), what, point=p.id, file=p.file)
        elif sums is not None:
            assert p.checksums is not None
            yield Problem(str(m.image), sums, point=p.id, file=p.checksums.file)


def message(exc: BaseException | None) -> str | None:
    """What an error says, for a problem's text (an OSError: its strerror)."""
    if exc is None:
        return None
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
