"""``verify``: structure, content (``--deep``) and source (``--source``) checks.

Verify never changes a chain file.  A point whose content or source check
fails is flagged ``damaged`` in the manifest (rewritten atomically under the
chain lock, when the lock is free), so that no backup builds on it.

Expected content comes from the block checksums recorded while writing: a
point's expected digest of block ``i`` is the record of the newest layer of
its chain that wrote block ``i``, or the digest of zeros if none did.  A
layer smaller than its parent cuts off its parent's blocks beyond its size;
every layer whose size differs from its parent's records the block at the
boundary, so the map stays exact across shrinks and grows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import manifest as mf
from . import names, qemu
from .activity import LATEST
from .chain import orphan_files
from .checksums import BLOCK_SIZE, file_sha256, read_records, unpack_records, zero_digest
from .errors import Error, Locked
from .extents import Chunk, Kind, sample_ranges
from .fsutil import chain_lock
from .nbdio import Connection
from .pipeline import Transfer
from .progress import Progress
from .qcow2 import check_header, read_header
from .refs import parse_ref, select
from .restore import allocated_chunks
from .target import iter_chains, open_target

if TYPE_CHECKING:
    from .ceph import CephOptions, Cluster

logger = logging.getLogger(__name__)
SOURCE_REGION = 1 << 20


@dataclass(frozen=True)
class Problem:
    """One thing found wrong: where (image, point, file, byte range) and what."""

    image: str
    what: str
    point: str | None = None
    file: str | None = None
    region: tuple[int, int] | None = None

    def __str__(self) -> str:
        where = self.image + (f"@{self.point}" if self.point else "")
        extra = (f" in {self.file}" if self.file else "") + (
            f" at bytes {self.region[0]}-{self.region[1]}" if self.region else ""
        )
        return f"{where}: {self.what}{extra}"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class VerifyOptions:
    target: Path
    deep: bool = False
    source: bool = False
    sample: float = 1.0  # fraction of the image compared with the RBD snapshot by --source
    structure: bool = True
    # qemu-img check every layer (verify), or only the checked points' own layers (after a backup)
    check_all_layers: bool = True
    parallel: int = 4
    progress: bool = False
    ceph: CephOptions | None = None


@dataclass
class Report:
    problems: list[Problem] = dataclasses.field(default_factory=list)
    points_checked: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


# -- selection ----------------------------------------------------------------------


def _wanted(args: Sequence[str]) -> tuple[list[names.Selector], dict[names.ImageSpec, list[str]]]:
    """SPECs select chains; POINTs (with '@') select chains and their points."""
    selectors: list[names.Selector] = []
    points: dict[names.ImageSpec, list[str]] = {}
    for arg in args:
        if "@" in arg:
            ref = parse_ref(arg)
            points.setdefault(ref.image, []).append(arg)
            selectors.append(names.Selector(ref.image.pool, ref.image.namespace, ref.image.name))
        else:
            selectors.append(names.parse_spec(arg))
    return selectors, points


def verify(args: Sequence[str], opts: VerifyOptions) -> Report:
    open_target(opts.target, create=False)
    selectors, point_args = _wanted(args)
    report = Report()
    cluster = _cluster(opts) if opts.source else None
    try:
        with qemu.storage_daemon() as daemon:
            for directory, item in iter_chains(opts.target):
                if isinstance(item, Error):
                    report.problems.append(Problem(str(directory), f"manifest: {item}", file=mf.NAME))
                    continue
                if selectors and not any(s.matches(item.image) for s in selectors):
                    continue
                refs = point_args.get(item.image)
                ids = [select(item, parse_ref(r)).id for r in refs] if refs else [p.id for p in item.points]
                ChainVerifier(directory, item, daemon, opts, report, cluster).run(ids)
    finally:
        if cluster is not None:
            cluster.close()
    return report


def _cluster(opts: VerifyOptions) -> Cluster:
    from .ceph import CephOptions, Cluster

    return Cluster(opts.ceph or CephOptions())


# -- one chain ------------------------------------------------------------------------


class ChainVerifier:
    def __init__(
        self,
        directory: Path,
        m: mf.Manifest,
        daemon: qemu.StorageDaemon,
        opts: VerifyOptions,
        report: Report,
        cluster: Cluster | None,
    ) -> None:
        self.dir = directory
        self.m = m
        self.daemon = daemon
        self.opts = opts
        self.report = report
        self.cluster = cluster
        self.image = str(m.image)

    def problem(self, what: str, **kw: Any) -> None:
        p = Problem(self.image, what, **kw)
        logger.error("%s", p)
        self.report.problems.append(p)

    def run(self, point_ids: list[str]) -> None:
        broken = (
            self.structure(None if self.opts.check_all_layers else set(point_ids)) if self.opts.structure else set()
        )
        damaged: set[str] = set()
        for pid in point_ids:
            self.report.points_checked += 1
            chain = [p.id for p in self.m.chain_of(pid)]
            if broken & set(chain):
                damaged.add(pid)
                continue  # its files are unsafe to open; already reported
            before = len(self.report.problems)
            if self.opts.deep:
                self.deep(pid)
            if self.opts.source:
                self.source(pid)
            if len(self.report.problems) > before:
                damaged.add(pid)
        self._flag(damaged)

    # -- structure --
    def structure(self, layers: set[str] | None = None) -> set[str]:
        """Headers, qemu-img check, checksum files, orphans, modes; returns points with bad files.

        ``layers`` limits ``qemu-img check`` to those points' files (headers and
        checksum files of every point are still checked).
        """
        broken: set[str] = set()
        if self.m.pending is not None:
            self.problem("an interrupted prune is pending (the next prune or backup finishes it)")
        self._modes()
        try:
            with chain_lock(self.dir, wait=False, what=self.image):
                orphans = orphan_files(self.dir, self.m)
        except Locked:
            logger.info("%s: a backup or prune is running; its files are not checked as orphans", self.image)
            orphans = []
        for name in orphans:
            self.problem("file not named by the manifest", file=name)
        for p in self.m.points:
            if not self._layer_ok(p, deep=layers is None or p.id in layers) or not self._sums_ok(p):
                broken.add(p.id)
        return broken

    def _modes(self) -> None:
        for path in [self.dir, *self.dir.iterdir()]:
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                if path.name != LATEST or os.readlink(path) != (self.m.latest.file if self.m.latest else None):
                    self.problem("unexpected symbolic link", file=path.name)
            elif stat.S_IMODE(mode) & 0o077:
                self.problem(f"readable or writable by others (mode {stat.S_IMODE(mode):o})", file=path.name)

    def _layer_ok(self, p: mf.Point, *, deep: bool) -> bool:
        parent = self.m.point(p.parent).file if p.parent else None
        path = self.dir / p.file
        try:
            check_header(read_header(path), where=str(path), expected_backing=parent, size=p.size)
            if deep:
                qemu.check_layer(path)
        except Error as exc:
            self.problem(str(exc), point=p.id, file=p.file)
            return False
        return True

    def _sums_ok(self, p: mf.Point) -> bool:
        if p.checksums is None:
            return True
        path = self.dir / p.checksums.file
        try:
            actual = file_sha256(path)
        except OSError as exc:
            self.problem(f"checksum file unreadable: {exc.strerror}", point=p.id, file=p.checksums.file)
            return False
        if actual != p.checksums.sha256:
            self.problem("checksum file does not match the manifest", point=p.id, file=p.checksums.file)
            return False
        return True

    # -- content --
    def expected(self, pid: str) -> tuple[dict[int, bytes], dict[int, str]]:
        """Expected digest per block of a point, and the layer file that recorded it."""
        digests: dict[int, bytes] = {}
        owner: dict[int, str] = {}
        for layer in self.m.chain_of(pid):
            limit = -(-layer.size // BLOCK_SIZE)
            for index in [i for i in digests if i >= limit]:
                del digests[index], owner[index]
            if layer.checksums is None:
                continue
            for index, digest in read_records(self.dir / layer.checksums.file):
                digests[index] = digest
                owner[index] = layer.file
        return digests, owner

    def deep(self, pid: str) -> None:
        point = self.m.point(pid)
        files = [self.dir / p.file for p in self.m.chain_of(pid)]
        digests, owner = self.expected(pid)
        export = self.daemon.export_chain(files, writable=False)
        try:
            with Connection(export.socket, export.name) as mapper:
                chunks = list(allocated_chunks(mapper, point.size))
            self._compare(point, chunks, lambda: Connection(export.socket, export.name), digests, owner, "content")
        finally:
            self.daemon.remove_export(export)

    def source(self, pid: str) -> None:
        point = self.m.point(pid)
        assert self.cluster is not None
        try:
            with self.cluster.image(self.m.image, read_only=True) as img:
                snap = img.snapshot(point.snapshot.name)
        except Error as exc:
            self.problem(f"cannot open the image for --source: {exc}", point=pid)
            return
        if snap is None or snap.id != point.snapshot.id:
            logger.info("%s@%s: its RBD snapshot is gone; --source skipped", self.image, pid)
            return
        regions = sample_ranges([(0, point.size)], self.opts.sample, SOURCE_REGION, random.Random())
        chunks = [Chunk(s, e - s, Kind.READ) for start, end in regions for s, e in _split(start, end)]
        digests, owner = self.expected(pid)
        cluster, spec = self.cluster, self.m.image
        self._compare(
            point,
            chunks,
            lambda: cluster.image(spec, snapshot=point.snapshot.name, read_only=True),
            digests,
            owner,
            "snapshot",
        )

    def _compare(
        self,
        point: mf.Point,
        chunks: list[Chunk],
        open_reader: Callable[[], contextlib.AbstractContextManager[Any]],
        digests: dict[int, bytes],
        owner: dict[int, str],
        what: str,
    ) -> None:
        checker = _Checker(digests, point.size)
        with Progress(
            f"verify {self.image}@{point.id}", sum(c.length for c in chunks), enabled=self.opts.progress
        ) as bar:
            stats = Transfer(
                open_reader=open_reader,
                sink=_NullSink(),
                sums=checker,
                size=point.size,
                workers=self.opts.parallel,
                hide_zeros=False,
                progress=bar.update,
            ).run(chunks)
        self.report.bytes_read += stats.read_bytes
        for start, end in _block_runs(sorted(checker.bad)):
            files = sorted({owner.get(i, "(no layer: zeros expected)") for i in range(start, end)})
            region = (start * BLOCK_SIZE, min(end * BLOCK_SIZE, point.size))
            self.problem(
                f"{what} differs from the recorded checksums", point=point.id, file=", ".join(files), region=region
            )

    def _flag(self, damaged: set[str]) -> None:
        if not damaged:
            return
        try:
            with chain_lock(self.dir, wait=False, what=self.image):
                m = mf.load(self.dir)
                if m is None:
                    return
                points = tuple(
                    dataclasses.replace(p, flags=(*p.flags, "damaged"))
                    if p.id in damaged and "damaged" not in p.flags
                    else p
                    for p in m.points
                )
                mf.save(self.dir, dataclasses.replace(m, points=points))
        except (Locked, Error) as exc:
            logger.warning("%s: could not flag damaged points in the manifest: %s", self.image, exc)


class _NullSink:
    """Verification reads only."""

    def for_thread(self) -> _NullSink:
        return self

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        pass

    def zero(self, length: int, offset: int) -> None:
        pass


class _Checker:
    """A record sink that compares every block digest with the expected one."""

    def __init__(self, digests: dict[int, bytes], size: int) -> None:
        self._digests = digests
        self._size = size
        self.bad: set[int] = set()
        self._lock = threading.Lock()

    def add(self, seq: int, records: bytes) -> None:
        for index, digest in unpack_records(records):
            length = min(BLOCK_SIZE, self._size - index * BLOCK_SIZE)
            if digest != self._digests.get(index, zero_digest(length)):
                with self._lock:
                    self.bad.add(index)


def _split(start: int, end: int, step: int = 4 << 20) -> Iterator[tuple[int, int]]:
    for off in range(start, end, step):
        yield off, min(off + step, end)


def _block_runs(blocks: list[int]) -> Iterator[tuple[int, int]]:
    run: list[int] = []
    for b in blocks:
        if run and b != run[-1] + 1:
            yield run[0], run[-1] + 1
            run = []
        run.append(b)
    if run:
        yield run[0], run[-1] + 1


__all__ = ["ChainVerifier", "Problem", "Report", "VerifyOptions", "verify"]
