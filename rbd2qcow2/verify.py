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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import manifest as mf
from . import names, qemu
from .activity import LATEST
from .background import Later, in_parallel
from .chain import orphan_files
from .checksums import BLOCK_SIZE, file_sha256, read_records
from .deepcheck import Checker, MappedChain, NullSink, check_point
from .errors import ChainDamaged, Error, Locked
from .extents import Chunk, Kind, sample_ranges
from .fsutil import chain_lock
from .progress import Progress
from .qcow2 import check_header, read_header
from .refs import parse_ref, select
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
    # qemu-img check every layer (verify), or none: after a backup, which checked the layer it
    # wrote before renaming it into place, as a prune checks a merged layer and older layers were
    # checked when they were written
    check_layers: bool = True
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
        with _DaemonOnDemand() as daemon:
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


class _DaemonOnDemand(qemu.StorageDaemon):
    """A storage daemon started on first use: deep checks need one only for blocks qemu maps without an offset."""

    def __enter__(self) -> _DaemonOnDemand:
        return self

    def cmd(self, command: str, **args: Any) -> Any:
        if self.pid is None:
            self.start()
        return super().cmd(command, **args)


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
        self._ahead: dict[str, _Ahead] = {}

    def problem(self, what: str, **kw: Any) -> None:
        self._emit([Problem(self.image, what, **kw)])

    def _emit(self, problems: list[Problem]) -> None:
        for p in problems:
            logger.error("%s", p)
        self.report.problems += problems

    def run(self, point_ids: list[str]) -> None:
        try:
            self._run(point_ids)
        finally:
            for ahead in self._ahead.values():
                ahead.close()
            self._ahead.clear()

    def _run(self, point_ids: list[str]) -> None:
        """Structure, then each point's content and source.

        qemu-img check of the layers runs in the background; meanwhile the
        first point whose files are safe to open (headers and checksum files
        good) is deep-checked, and its problems are held back until the
        structure's are known (and dropped if its chain turns out broken,
        as a broken chain's content is not checked).
        """
        held: dict[str, list[Problem]] = {}
        broken: set[str] = set()
        if self.opts.structure:
            files = self._files()
            unsafe = {pid for pid, found in files.items() if any(found)}
            checks = self._checks(unsafe, None if self.opts.check_layers else set())
            if self.opts.deep:
                first = self._look_ahead(point_ids, unsafe)
                if first is not None:
                    held[first] = self.deep(first, on_mapped=checks.start)
            broken = self._structure(files, checks.result())
        damaged: set[str] = set()
        for i, pid in enumerate(point_ids):
            self.report.points_checked += 1
            if broken & {p.id for p in self.m.chain_of(pid)}:
                damaged.add(pid)
                continue  # its files are unsafe to open; already reported
            before = len(self.report.problems)
            if self.opts.deep:
                self._emit(held.pop(pid) if pid in held else self._deep_next(point_ids[i:], broken))
            if self.opts.source:
                self.source(pid)
            if len(self.report.problems) > before:
                damaged.add(pid)
        self._flag(damaged)

    def _deep_next(self, point_ids: Sequence[str], broken: set[str]) -> list[Problem]:
        """Deep-check the first of ``point_ids`` while qemu maps the next one to check."""
        pid = self._look_ahead(point_ids, broken)
        self._look_ahead(point_ids[1:], broken)
        assert pid == point_ids[0]
        return self.deep(pid)

    # -- structure --
    def _files(self) -> dict[str, tuple[str | None, str | None]]:
        """Reports what is wrong with the directory; returns each point's header and checksum file problem."""
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
        return {p.id: (self._header_problem(p), self._sums_problem(p)) for p in self.m.points}

    def _checks(self, unsafe: set[str], layers: set[str] | None) -> Later[dict[str, Error | None]]:
        """``qemu-img check`` of the layers (of ``layers``) whose files are safe, in parallel, once started."""
        checked = [p for p in self.m.points if p.id not in unsafe and (layers is None or p.id in layers)]

        def check(p: mf.Point) -> Error | None:
            try:
                qemu.check_layer(self.dir / p.file)
            except Error as exc:
                return exc
            return None

        def check_all() -> dict[str, Error | None]:
            errors = in_parallel(check, checked, self.opts.parallel, "check")
            return {p.id: error for p, error in zip(checked, errors, strict=True)}

        return Later(check_all, "checks")

    def _structure(self, files: dict[str, tuple[str | None, str | None]], checks: dict[str, Error | None]) -> set[str]:
        """Reports the points' file problems, in order; returns the points with one."""
        broken: set[str] = set()
        for p in self.m.points:
            header, sums = files[p.id]
            if (what := header or _message(checks.get(p.id))) is not None:
                self.problem(what, point=p.id, file=p.file)
            elif sums is not None:
                assert p.checksums is not None
                self.problem(sums, point=p.id, file=p.checksums.file)
            else:
                continue
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

    def _header_problem(self, p: mf.Point) -> str | None:
        parent = self.m.point(p.parent).file if p.parent else None
        path = self.dir / p.file
        try:
            check_header(read_header(path), where=str(path), expected_backing=parent, size=p.size)
        except Error as exc:
            return str(exc)
        return None

    def _sums_problem(self, p: mf.Point) -> str | None:
        if p.checksums is None:
            return None
        try:
            actual = file_sha256(self.dir / p.checksums.file)
        except OSError as exc:
            return f"checksum file unreadable: {exc.strerror}"
        except ChainDamaged as exc:  # a link, a FIFO or a device where the file should be
            return f"checksum file unreadable: {exc.args[-1]}"
        if actual != p.checksums.sha256:
            return "checksum file does not match the manifest"
        return None

    # -- content --
    def expected(self, pid: str) -> dict[int, bytes]:
        """Expected digest per block of a point (the blocks that some layer of its chain recorded)."""
        digests: dict[int, bytes] = {}
        size = 0
        for layer in self.m.chain_of(pid):
            if layer.size < size:
                limit = -(-layer.size // BLOCK_SIZE)
                for index in [i for i in digests if i >= limit]:
                    del digests[index]
            size = layer.size
            if layer.checksums is not None:
                digests.update(read_records(self.dir / layer.checksums.file))
        return digests

    def owners(self, pid: str, blocks: set[int]) -> dict[int, str]:
        """The layer file that recorded the expected digest of each of ``blocks``."""
        owner: dict[int, str] = {}
        for layer in self.m.chain_of(pid):
            limit = -(-layer.size // BLOCK_SIZE)
            for index in [i for i in owner if i >= limit]:
                del owner[index]
            if layer.checksums is not None:
                owner.update((i, layer.file) for i, _ in read_records(self.dir / layer.checksums.file) if i in blocks)
        return owner

    def _look_ahead(self, point_ids: Sequence[str], broken: set[str]) -> str | None:
        """Have qemu map the next point to deep-check while this process works, and load its checksums."""
        pid = next((p for p in point_ids if not broken & {q.id for q in self.m.chain_of(p)}), None)
        if pid is not None and pid not in self._ahead:
            self._ahead[pid] = self._prepare(pid)
        return pid

    def _prepare(self, pid: str) -> _Ahead:
        try:
            chain: MappedChain | BaseException = MappedChain([self.dir / p.file for p in self.m.chain_of(pid)])
        except (OSError, Error) as exc:
            chain = exc
        try:
            return _Ahead(chain, self.expected(pid))
        except (OSError, Error) as exc:
            return _Ahead(chain, exc)

    def deep(self, pid: str, on_mapped: Callable[[], None] = lambda: None) -> list[Problem]:
        """The point's content problems (not reported yet); ``on_mapped`` is called once qemu has mapped it."""
        point = self.m.point(pid)
        ahead = self._ahead.pop(pid, None) or self._prepare(pid)
        try:
            if isinstance(ahead.expected, BaseException):
                return [Problem(self.image, f"cannot read the checksums: {_message(ahead.expected)}", point=pid)]
            checker = Checker(ahead.expected, point.size)
            with Progress(f"verify {self.image}@{pid}", point.size, enabled=self.opts.progress) as bar:
                if isinstance(ahead.chain, BaseException):
                    raise ahead.chain
                self.report.bytes_read += check_point(
                    ahead.chain,
                    point.size,
                    checker,
                    self.daemon,
                    workers=self.opts.parallel,
                    progress=bar.update,
                    on_mapped=on_mapped,
                )
        except (OSError, Error) as exc:  # qemu cannot map or read the chain: damage, too
            return [Problem(self.image, f"cannot read the chain: {_message(exc)}", point=pid, file=point.file)]
        finally:
            ahead.close()
            on_mapped()
        return self._differ(point, checker.bad, "content")

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
        digests = self.expected(pid)
        cluster, spec = self.cluster, self.m.image
        self._compare(
            point,
            chunks,
            lambda: cluster.image(spec, snapshot=point.snapshot.name, read_only=True),
            digests,
            "snapshot",
        )

    def _compare(
        self,
        point: mf.Point,
        chunks: list[Chunk],
        open_reader: Callable[[], contextlib.AbstractContextManager[Any]],
        digests: dict[int, bytes],
        what: str,
    ) -> None:
        from .pipeline import Transfer  # here: a deep check rarely needs it, and it costs start-up time

        checker = Checker(digests, point.size)
        with Progress(
            f"verify {self.image}@{point.id}", sum(c.length for c in chunks), enabled=self.opts.progress
        ) as bar:
            stats = Transfer(
                open_reader=open_reader,
                sink=NullSink(),
                sums=checker,
                size=point.size,
                workers=self.opts.parallel,
                hide_zeros=False,
                progress=bar.update,
            ).run(chunks)
        self.report.bytes_read += stats.read_bytes
        self._emit(self._differ(point, checker.bad, what))

    def _differ(self, point: mf.Point, bad: set[int], what: str) -> list[Problem]:
        """A problem per run of differing blocks, naming the layers that recorded them."""
        owner = self.owners(point.id, bad) if bad else {}
        problems = []
        for start, end in _block_runs(sorted(bad)):
            files = sorted({owner.get(i, "(no layer: zeros expected)") for i in range(start, end)})
            region = (start * BLOCK_SIZE, min(end * BLOCK_SIZE, point.size))
            what_ = f"{what} differs from the recorded checksums"
            problems.append(Problem(self.image, what_, point=point.id, file=", ".join(files), region=region))
        return problems

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


@dataclass
class _Ahead:
    """A point prepared for the deep check: its chain being mapped and its expected digests (or why not)."""

    chain: MappedChain | BaseException
    expected: dict[int, bytes] | BaseException

    def close(self) -> None:
        if isinstance(self.chain, MappedChain):
            self.chain.close()


def _message(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)


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
