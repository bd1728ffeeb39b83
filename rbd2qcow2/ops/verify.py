"""``verify``: structure, content (``--deep``) and source (``--source``) checks.

Verify holds the chain lock while it checks a chain, so that no backup or
prune changes it meanwhile, and first finishes a merge that an interrupted
prune left pending (as a prune would; :data:`rbd2qcow2.ops.access.CHECK`);
it changes no other chain file.

Only damage flags a point: a layer whose header, checksum file or
``qemu-img check`` is wrong, or content that differs from the recorded
checksums or from the RBD snapshot.  The flag (``damaged``) records which
check set it, what it found and when, and no backup builds on the point;
a later run of the same check that finds the point sound clears it.  A tool
that cannot run, a chain locked by another run or a Ceph failure flags
nothing: the chain is reported with that error's exit code.

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..adapters import qemu
from ..core import names
from ..core.errors import Error, Locked, NotFound, QemuUnavailable, combined_exit_code
from ..core.extents import Chunk, Kind, sample_ranges
from ..core.kinds import PointFlag
from ..core.threads import Later
from ..store import manifest as mf
from ..store.checksums import chain_digests, read_records
from ..store.layout import BLOCK_SIZE
from ..store.refs import parse_ref, select
from ..store.target import chain_dir, iter_chains, open_target
from ..transfer.deepcheck import Checker, MappedChain, NullSink, check_point
from ..transfer.progress import Progress
from .access import CHECK, chain_session
from .structure import (
    FileProblems,
    Problem,
    directory_problems,
    file_problems,
    layer_checks,
    message,
    structure_problems,
)

if TYPE_CHECKING:
    from ..adapters.ceph import CephOptions, Cluster

logger = logging.getLogger(__name__)
SOURCE_REGION = 1 << 20
# The kinds of check; a flag's reason names the one that set it, and only that kind clears it.
STRUCTURE, DEEP, SOURCE = "structure", "deep", "source"


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
    wait: bool = False  # for a chain locked by another run, instead of failing


@dataclass(frozen=True)
class Failure:
    """A chain that could not be checked (a tool, the lock, Ceph): nothing flagged."""

    image: str
    error: str
    exit_code: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Report:
    problems: list[Problem] = dataclasses.field(default_factory=list)
    failures: list[Failure] = dataclasses.field(default_factory=list)
    cleared: list[str] = dataclasses.field(default_factory=list)  # points whose damaged flag was cleared
    points_checked: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.failures

    @property
    def exit_code(self) -> int:
        """65 if anything is damaged, else the most serious failure's code, else 0."""
        return combined_exit_code([os.EX_DATAERR if self.problems else 0, *(f.exit_code for f in self.failures)])


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
    chains = list(iter_chains(opts.target))
    _all_found(opts.target, args, selectors, chains)
    report = Report()
    cluster = _cluster(opts) if opts.source else None
    try:
        with DaemonOnDemand() as daemon:
            for directory, item in chains:
                if isinstance(item, Error):
                    report.problems.append(Problem(str(directory), f"manifest: {item}", file=mf.NAME))
                    continue
                if selectors and not any(s.matches(item.image) for s in selectors):
                    continue
                refs = point_args.get(item.image)
                ids = [select(item, parse_ref(r)).id for r in refs] if refs else None
                try:
                    ChainVerifier(directory, item, daemon, opts, report, cluster).run(ids)
                except Error as exc:  # not damage: the chain stays as it was
                    logger.error("%s: not verified: %s", item.image, exc)
                    report.failures.append(Failure(str(item.image), str(exc), exc.exit_code))
    finally:
        if cluster is not None:
            cluster.close()
    return report


def _all_found(
    target: Path,
    args: Sequence[str],
    selectors: Sequence[names.Selector],
    chains: Sequence[tuple[Path, mf.Manifest | Error]],
) -> None:
    """Every image named (not a whole pool) has a chain, if a damaged one."""
    for arg, sel in zip(args, selectors, strict=True):
        if sel.name is None:
            continue
        spec = names.ImageSpec(sel.pool, sel.namespace or "", sel.name)
        if not any(
            directory == chain_dir(target, spec) if isinstance(item, Error) else sel.matches(item.image)
            for directory, item in chains
        ):
            raise NotFound(f"no backups of {arg.split('@')[0]} in {target}")


class DaemonOnDemand(qemu.StorageDaemon):
    """A storage daemon started on first use: deep checks need one only for blocks qemu maps without an offset."""

    def __enter__(self) -> DaemonOnDemand:
        return self

    def cmd(self, command: str, **args: Any) -> Any:
        if self.pid is None:
            self.start()
        return super().cmd(command, **args)


def _cluster(opts: VerifyOptions) -> Cluster:
    from ..adapters.ceph import CephOptions, Cluster

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

    def run(self, point_ids: list[str] | None = None) -> None:
        """Check the points (default: all) under the chain lock; flag the damaged ones, clear the sound ones."""
        # The manifest as it is now that no backup or prune can change it, a pending merge finished.
        with chain_session(self.dir, self.image, CHECK, wait=self.opts.wait, daemon=self.daemon) as m:
            if m is None:
                return
            self.m = m
            known = {p.id for p in self.m.points}
            for pid in [p for p in point_ids or () if p not in known]:
                logger.info("%s@%s: merged away by the interrupted prune just finished", self.image, pid)
            try:
                self._run([p.id for p in self.m.points] if point_ids is None else [p for p in point_ids if p in known])
            finally:
                for ahead in self._ahead.values():
                    ahead.close()
                self._ahead.clear()

    def _run(self, point_ids: list[str]) -> None:
        """Structure, then each point's content and source; then the flags.

        qemu-img check of the layers runs in the background; meanwhile the
        first point whose files are safe to open (headers and checksum files
        good) is deep-checked, and its problems are held back until the
        structure's are known (and dropped if its chain turns out broken,
        as a broken chain's content is not checked).
        """
        held: dict[str, list[Problem]] = {}
        broken: dict[str, str] = {}
        if self.opts.structure:
            files = self._files()
            unsafe = {pid for pid, found in files.items() if any(found)}
            checks = self._checks(unsafe, None if self.opts.check_layers else set())
            if self.opts.deep:
                first = self._look_ahead(point_ids, unsafe)
                if first is not None:
                    held[first] = self.deep(first, on_mapped=checks.start)
            broken = self._structure(files, checks.result())
        found: dict[str, dict[str, str]] = {}  # point -> check -> what it found
        sound: dict[str, set[str]] = {}  # point -> the checks that found it sound
        for i, pid in enumerate(point_ids):
            self.report.points_checked += 1
            if bad := [f"{layer}: {broken[layer]}" for layer in self._layers(pid) if layer in broken]:
                found[pid] = {STRUCTURE: _summary(bad)}
                continue  # its files are unsafe to open; already reported
            results: dict[str, list[Problem] | None] = {}
            if self.opts.structure and self.opts.check_layers:
                results[STRUCTURE] = []
            if self.opts.deep:
                results[DEEP] = held.pop(pid) if pid in held else self._deep_next(point_ids[i:], set(broken))
                self._emit(results[DEEP] or [])
            if self.opts.source:
                results[SOURCE] = self.source(pid)
            found[pid] = {k: _summary([p.detail for p in v]) for k, v in results.items() if v}
            sound[pid] = {k for k, v in results.items() if v is not None and not v}
        self._settle(found, sound)

    def _layers(self, pid: str) -> list[str]:
        return [p.id for p in self.m.chain_of(pid)]

    def _deep_next(self, point_ids: Sequence[str], broken: set[str]) -> list[Problem]:
        """Deep-check the first of ``point_ids`` while qemu maps the next one to check."""
        pid = self._look_ahead(point_ids, broken)
        self._look_ahead(point_ids[1:], broken)
        assert pid == point_ids[0]
        return self.deep(pid)

    # -- structure --
    def _files(self) -> FileProblems:
        """Reports what is wrong with the directory; returns each point's header and checksum file problem."""
        for found in directory_problems(self.dir, self.m):
            self._emit([found])
        return file_problems(self.dir, self.m)

    def _checks(self, unsafe: set[str], layers: set[str] | None) -> Later[dict[str, Error | None]]:
        """``qemu-img check`` of the layers (of ``layers``) whose files are safe, in parallel, once started."""
        checked = [p for p in self.m.points if p.id not in unsafe and (layers is None or p.id in layers)]
        return layer_checks(self.dir, checked, self.opts.parallel)

    def _structure(self, files: FileProblems, checks: dict[str, Error | None]) -> dict[str, str]:
        """Reports the points' file problems, in order; returns the points with one, and what it is."""
        broken: dict[str, str] = {}
        for found in structure_problems(self.m, files, checks):
            self._emit([found])
            assert found.point is not None
            broken[found.point] = found.detail
        return broken

    # -- content --
    def expected(self, pid: str) -> dict[int, bytes]:
        """Expected digest per block of a point (the blocks that some layer of its chain recorded)."""
        return chain_digests(
            (None if p.checksums is None else self.dir / p.checksums.file, p.size) for p in self.m.chain_of(pid)
        )

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
                return [Problem(self.image, f"cannot read the checksums: {message(ahead.expected)}", point=pid)]
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
        except (QemuUnavailable, Locked):  # qemu cannot run, or another run holds the files: no damage
            raise
        except (OSError, Error) as exc:  # qemu cannot map or read the chain: damage, too
            return [Problem(self.image, f"cannot read the chain: {message(exc)}", point=pid, file=point.file)]
        finally:
            ahead.close()
            on_mapped()
        return self._differ(point, checker.bad, "content")

    def source(self, pid: str) -> list[Problem] | None:
        """The point's differences from its RBD snapshot (reported); ``None`` when not compared whole."""
        point = self.m.point(pid)
        assert self.cluster is not None
        try:
            with self.cluster.image(self.m.image, read_only=True) as img:
                snap = img.snapshot(point.snapshot.name)
        except NotFound:
            snap = None
        if snap is None or snap.id != point.snapshot.id:
            logger.info("%s@%s: its RBD snapshot is gone; --source skipped", self.image, pid)
            return None
        regions = sample_ranges([(0, point.size)], self.opts.sample, SOURCE_REGION, random.Random())
        chunks = [Chunk(s, e - s, Kind.READ) for start, end in regions for s, e in _split(start, end)]
        digests = self.expected(pid)
        cluster, spec = self.cluster, self.m.image
        problems = self._compare(
            point,
            chunks,
            lambda: cluster.image(spec, snapshot=point.snapshot.name, read_only=True),
            digests,
            "snapshot",
        )
        self._emit(problems)
        return problems if problems or self.opts.sample >= 1.0 else None  # a sample cannot say all is sound

    def _compare(
        self,
        point: mf.Point,
        chunks: list[Chunk],
        open_reader: Callable[[], contextlib.AbstractContextManager[Any]],
        digests: dict[int, bytes],
        what: str,
    ) -> list[Problem]:
        # here: a deep check rarely needs it, and it costs start-up time
        from ..transfer.pipeline import Transfer, TransferOptions

        checker = Checker(digests, point.size)
        with Progress(
            f"verify {self.image}@{point.id}", sum(c.length for c in chunks), enabled=self.opts.progress
        ) as bar:
            stats = Transfer(
                open_reader=open_reader,
                sink=NullSink(),
                sums=checker,
                size=point.size,
                hide_zeros=False,
                options=TransferOptions(workers=self.opts.parallel, progress=bar.update),
            ).run(chunks)
        self.report.bytes_read += stats.read_bytes
        return self._differ(point, checker.bad, what)

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

    def _settle(self, found: dict[str, dict[str, str]], sound: dict[str, set[str]]) -> None:
        """Flag the points a check found damaged, with why; clear the reasons of the checks that found them sound."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        points = []
        for p in self.m.points:
            q = p.cleared(PointFlag.DAMAGED, _clearing(sound.get(p.id, set())))
            if PointFlag.DAMAGED in p.flags and PointFlag.DAMAGED not in q.flags:
                logger.info("%s@%s: sound again; its damaged flag is cleared", self.image, p.id)
                self.report.cleared.append(f"{self.image}@{p.id}")
            for check, reason in found.get(p.id, {}).items():
                if not any(f.check == check and f.reason == reason for f in q.reasons(PointFlag.DAMAGED)):
                    q = q.flagged(mf.Flag(PointFlag.DAMAGED, check, reason, now))  # a reason found again keeps its time
            points.append(q)
        if tuple(points) != self.m.points:
            self.m = dataclasses.replace(self.m, points=tuple(points))
            mf.save(self.dir, self.m)


@dataclass
class _Ahead:
    """A point prepared for the deep check: its chain being mapped and its expected digests (or why not)."""

    chain: MappedChain | BaseException
    expected: dict[int, bytes] | BaseException

    def close(self) -> None:
        if isinstance(self.chain, MappedChain):
            self.chain.close()


def _summary(found: list[str]) -> str:
    return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")


def _clearing(sound: set[str]) -> set[str]:
    """The checks whose reasons ``sound`` clears: a reason of unknown origin goes once structure and content pass."""
    return sound | {""} if {STRUCTURE, DEEP} <= sound else sound


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


__all__ = ["ChainVerifier", "DaemonOnDemand", "Problem", "Report", "VerifyOptions", "verify"]
