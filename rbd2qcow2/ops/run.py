"""``run --config``: back up, prune and verify every selected image of every cluster.

Images run in parallel, ``jobs`` at a time; each job thread has its own
qemu-storage-daemon, and each image gets ``parallel`` reader threads, so the
run never has more than ``jobs * (parallel + parallel // 2 + 1)`` data
threads.  Before touching an image, a job claims it through Ceph (a RADOS
lock with a lease, see :meth:`rbd2qcow2.adapters.ceph.Cluster.claim`), so several
hosts can run the same configuration against one pool: an image that is
claimed elsewhere, or that got a point after this run started, is left to
the other run.  A failure of one image is recorded and the others go on.

``prep-N`` threads do the first steps of each image (claim, open, chain lock,
snapshot) at most ``PREP_AHEAD * jobs`` images ahead of the job threads; see
:mod:`rbd2qcow2.ops.run_jobs`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from ..adapters import qemu
from ..adapters.ceph import CephOptions, Claim, Cluster, RbdImage
from ..core.errors import Cancelled, Claimed, DataError, Error, InternalError, as_error
from ..core.names import ImageSpec
from ..core.retention import Policy
from ..store import manifest as mf
from ..store.activity import record
from ..store.target import chain_dir, iter_chains, open_target
from .backup import BackupOptions, Prepared, SnapshotJanitor, prepare
from .config import SKIP_META, ClusterConfig, RunConfig
from .prune import PruneOptions, prune_chain
from .run_jobs import Jobs, Limits, Stop, run_jobs
from .verify import ChainVerifier, Report, VerifyOptions

logger = logging.getLogger(__name__)

OK, FAILED, SKIPPED, DELETED = "ok", "failed", "skipped", "deleted"
STOP_GRACE = 120.0  # seconds the images in progress get to clean up after SIGINT/SIGTERM/SIGHUP
# Images prepared (claimed, snapshot taken) ahead of the job threads, per job: a job that finishes
# small images quickly still finds its next one ready, while few snapshots wait uncommitted.
PREP_AHEAD = 2
DAEMON_RESTARTS = 3  # per job thread and run: a daemon that keeps dying is not started forever


@dataclass
class ImageReport:
    """What happened to one image in this run."""

    cluster: str
    image: ImageSpec
    status: str = OK
    point: str | None = None
    kind: str | None = None
    reason: str = ""
    error: str | None = None
    exit_code: int = 0
    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    last_success: str | None = None  # ISO time of the newest point, whatever this run did

    def as_dict(self) -> dict[str, object]:
        return {
            "cluster": self.cluster,
            "pool": self.image.pool,
            "namespace": self.image.namespace,
            "image": self.image.name,
            "status": self.status,
            "point": self.point,
            "kind": self.kind,
            "reason": self.reason,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "last_success": self.last_success,
        }


@dataclass
class RunReport:
    started: datetime
    images: list[ImageReport] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # failures outside any image (a cluster down)

    @property
    def ok(self) -> bool:
        return not self.errors and all(i.status != FAILED for i in self.images)


@dataclass(frozen=True)
class _Work:
    cluster: ClusterConfig
    handle: Cluster
    image: ImageSpec


def run(cfg: RunConfig) -> RunReport:
    """The whole nightly job for one configuration."""
    started = datetime.now(UTC)
    t0 = time.monotonic()
    report = RunReport(started)
    tag = open_target(cfg.target, create=True)
    handles: list[Cluster] = []
    try:
        work: list[_Work] = []
        for cc in cfg.clusters:
            handle = _connect(cc, report)
            if handle is None:
                continue
            handles.append(handle)
            images = _select(handle, cc, report)
            work += [_Work(cc, handle, image) for image in images]
            report.images += _deleted(cfg, cc, images)
        report.images += _run_jobs(cfg, tag, work, started)
    finally:
        for h in handles:
            h.close()
    report.images.sort(key=lambda r: (r.cluster, r.image))
    report.seconds = time.monotonic() - t0
    return report


def _connect(cc: ClusterConfig, report: RunReport) -> Cluster | None:
    try:
        return Cluster(CephOptions(conf=cc.conf, client_id=cc.client_id, keyring=cc.keyring))
    except Error as exc:
        logger.error("cluster %s: %s", cc.name, exc)
        report.errors.append(f"cluster {cc.name}: {exc}")
        return None


def _select(handle: Cluster, cc: ClusterConfig, report: RunReport) -> list[ImageSpec]:
    found: list[ImageSpec] = []
    for pool in cc.pools:
        try:
            images = handle.list_images(pool.name, None)
        except Error as exc:
            logger.error("cluster %s pool %s: %s", cc.name, pool.name, exc)
            report.errors.append(f"cluster {cc.name} pool {pool.name}: {exc}")
            continue
        found += [i for i in images if pool.wants(i)]
    return list(dict.fromkeys(found))


def _deleted(cfg: RunConfig, cc: ClusterConfig, present: list[ImageSpec]) -> list[ImageReport]:
    """Chains of configured pools whose image is gone from Ceph: kept, and reported."""
    if not cfg.target.is_dir():
        return []
    alive = set(present)
    reports = []
    for _directory, m in iter_chains(cfg.target):
        if isinstance(m, Error) or m.image in alive:
            continue
        if any(p.name == m.image.pool and p.wants(m.image) for p in cc.pools):
            latest = m.latest.created if m.latest else None
            reports.append(
                ImageReport(
                    cc.name, m.image, DELETED, reason="image no longer in Ceph; chain kept", last_success=latest
                )
            )
    return reports


@dataclass
class _Ready:
    """An image prepared ahead of its job: claimed, open, its chain locked, its snapshot taken."""

    work: _Work
    report: ImageReport
    prep_seconds: float
    claim: ExitStack  # the claim: released last
    held: Claim  # says whether the claim still holds
    head: ExitStack  # the image handle: handed to the janitor after the commit
    img: RbdImage
    prepared: Prepared

    def close(self) -> None:
        """Give up the image: undo its snapshot, unlock the chain, close the handle, release the claim."""
        with self.claim, self.head, self.prepared:
            pass


def _run_jobs(cfg: RunConfig, tag: str, work: list[_Work], started: datetime) -> list[ImageReport]:
    """Prepare images ahead of the jobs (see :mod:`rbd2qcow2.ops.run_jobs`), and back them up
    ``jobs`` at a time."""
    stop = Stop()
    # Old snapshots are removed while the jobs go on to their next image.
    janitor = SnapshotJanitor(workers=max(2, cfg.jobs))
    jobs: Jobs[_Work, _Ready, Daemons, ImageReport] = Jobs(
        prepare=functools.partial(_prepare, cfg, tag, started=started, stop=stop),
        prepared=_Ready,
        finish=lambda r, daemons: _finish(cfg, r, daemons.current(), stop, janitor),
        give_up=_Ready.close,
        job_context=lambda: Daemons(cfg.target),
        on_cancel=lambda: janitor.close(skip_pending=True),
    )
    try:
        return run_jobs(jobs, work, Limits(cfg.jobs, PREP_AHEAD * cfg.jobs, STOP_GRACE), stop)
    finally:
        janitor.close()


class Daemons:
    """A job thread's qemu-storage-daemon, started again (``DAEMON_RESTARTS`` times at most) when it died.

    A daemon killed under an image (the OOM killer, a qemu crash) fails that
    image; the images after it get a new daemon instead of the dead one's errors.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._stack = ExitStack()
        self.daemon: qemu.StorageDaemon | None = None  # the latest one started, alive or not
        self.restarts = 0

    def __enter__(self) -> Daemons:
        self._start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        # Named relative to the target (short names, see qemu.chain_options).
        self.daemon = self._stack.enter_context(qemu.storage_daemon(root=self._root))

    def current(self) -> qemu.StorageDaemon:
        """The daemon for the next image: a new one if the last one died and restarts are left."""
        assert self.daemon is not None
        if self.daemon.alive:
            return self.daemon
        if self.restarts >= DAEMON_RESTARTS:
            if self.restarts == DAEMON_RESTARTS:
                self.restarts += 1  # said once
                logger.error("qemu-storage-daemon died %d times; not started again in this job", self.restarts)
            return self.daemon  # the image fails with the dead daemon's error
        self.restarts += 1
        logger.warning(
            "qemu-storage-daemon (pid %s) died; starting a new one (%d of at most %d in this job)",
            self.daemon.pid,
            self.restarts,
            DAEMON_RESTARTS,
        )
        self._stack.close()
        self._stack = ExitStack()
        try:
            self._start()
        except Error as exc:  # the image fails with the closed daemon's error, and is undone
            logger.error("could not start a new qemu-storage-daemon: %s", exc)
        return self.daemon


def _prepare(cfg: RunConfig, tag: str, w: _Work, started: datetime, stop: Stop) -> _Ready | ImageReport:
    """Claim the image, and unless it is done elsewhere or skipped, lock its chain and snapshot it."""
    report = ImageReport(w.cluster.name, w.image)
    t0 = time.monotonic()
    try:
        with ExitStack() as claim, ExitStack() as head:  # handed on in the _Ready, or closed here
            stop.check()
            held = claim.enter_context(w.handle.claim(w.image, cfg.claim_ttl))
            img = _to_back_up(cfg, w, started, report, head)
            if img is not None:
                opts = BackupOptions(
                    target=cfg.target,
                    parallel=cfg.parallel,
                    whole_object=cfg.whole_object,
                    check_unchanged=cfg.check_unchanged,
                    wait=True,
                    interrupt=functools.partial(_check, stop, held),
                )
                prepared = prepare(w.handle, tag, w.image, opts, img)
                waited = time.monotonic() - t0
                return _Ready(w, report, waited, claim.pop_all(), held, head.pop_all(), img, prepared)
    except Claimed as exc:
        report.status, report.reason = SKIPPED, str(exc)
    except Cancelled:
        raise
    except BaseException as exc:
        _failed(cfg, w, report, exc)
    return _done(cfg, w, report, t0)


def _to_back_up(cfg: RunConfig, w: _Work, started: datetime, report: ImageReport, head: ExitStack) -> RbdImage | None:
    """The image's head, opened into ``head``; None (and why in ``report``) for an image to skip."""
    done_elsewhere = _point_since(chain_dir(cfg.target, w.image), started)
    if done_elsewhere is not None:
        report.status, report.point = SKIPPED, done_elsewhere
        report.reason = "backed up by another run since this one started"
        return None
    # One open of the image head: the skip flag is read through the handle the backup
    # uses, which then goes to the janitor, to remove the snapshot the previous point needed.
    img = head.enter_context(w.handle.image(w.image))
    if (img.metadata(SKIP_META) or "").strip().lower() in ("true", "yes", "1"):
        report.status, report.reason = SKIPPED, f"image-meta {SKIP_META} is set"
        return None
    return img


def _check(stop: Stop, held: Claim) -> None:
    """The backup's interrupt hook: a signal, or a claim that no longer holds, stops the image."""
    stop.check()
    held.check()


def _finish(cfg: RunConfig, r: _Ready, daemon: qemu.StorageDaemon, stop: Stop, janitor: SnapshotJanitor) -> ImageReport:
    """Back up, prune and verify an image that :func:`_prepare` made ready."""
    w, report = r.work, r.report
    t0 = time.monotonic() - r.prep_seconds  # the time it waited for a job does not count
    try:
        with r.claim:
            with r.head:
                with r.prepared:
                    stop.check()
                    done = r.prepared.finish(daemon)
                janitor.submit(w.image, r.img, done.old_snapshots, r.head.pop_all())
            point = done.point
            report.point, report.kind, report.reason = point.id, point.kind, done.reason
            report.bytes_read, report.bytes_written = done.read_bytes, point.data_bytes + point.zero_bytes
            report.last_success = point.created
            r.held.check()  # the chain is not pruned under a claim another host may hold by now
            _prune_verify(cfg, w, daemon, point.id)
    except Cancelled:
        raise
    except BaseException as exc:
        _failed(cfg, w, report, exc)
    return _done(cfg, w, report, t0)


def _failed(cfg: RunConfig, w: _Work, report: ImageReport, exc: BaseException) -> None:
    """Record why an image failed; anything but an ordinary exception goes on up."""
    if not isinstance(exc, Exception):
        raise exc
    # Any OSError here is the target's file system: disk full, I/O error.
    err = as_error(exc, target_io=True)
    report.status, report.error, report.exit_code = FAILED, str(err), err.exit_code
    if isinstance(err, InternalError):  # a bug must not stop the other images
        logger.error("%s: internal error", w.image, exc_info=exc)
    else:
        logger.error("%s: %s", w.image, err)
    if isinstance(exc, Error):
        record(chain_dir(cfg.target, w.image), f"run failed: {exc}")


def _done(cfg: RunConfig, w: _Work, report: ImageReport, t0: float) -> ImageReport:
    report.seconds = time.monotonic() - t0
    report.last_success = report.last_success or _last_success(cfg.target, w.image)
    return report


def _prune_verify(cfg: RunConfig, w: _Work, daemon: qemu.StorageDaemon, point_id: str) -> None:
    directory = chain_dir(cfg.target, w.image)
    if cfg.retention is not None or cfg.max_depth is not None:
        prune_opts = PruneOptions(
            target=cfg.target,
            policy=cfg.retention or Policy(),
            max_depth=cfg.max_depth,
            parallel=cfg.parallel,
            wait=True,
        )
        plan = prune_chain(directory, w.image, prune_opts)
        if plan.error is not None:
            raise plan.error
    if cfg.verify.structure or cfg.verify.deep or cfg.verify.source_sample > 0:
        _verify(cfg, w, directory, daemon, point_id)


def _verify(cfg: RunConfig, w: _Work, directory: Path, daemon: qemu.StorageDaemon, point_id: str) -> None:
    opts = VerifyOptions(
        target=cfg.target,
        deep=cfg.verify.deep,
        source=cfg.verify.source_sample > 0,
        sample=cfg.verify.source_sample,
        parallel=cfg.parallel,
        structure=cfg.verify.structure,
        check_layers=False,  # the backup (and a prune) checked the layers they wrote; older ones when written
        wait=True,  # like the backup and the prune before it: a manual verify or prune holding the chain is waited for
    )
    result = Report()
    m = mf.load(directory)
    if m is None:
        return
    ChainVerifier(directory, m, daemon, opts, result, w.handle if opts.source else None).run([point_id])
    if not result.ok:
        raise DataError("; ".join(str(p) for p in result.problems))
    record(directory, f"verify {point_id} ok")


def _point_since(directory: Path, started: datetime) -> str | None:
    try:
        m = mf.load(directory)
    except Error:
        return None
    if m is None or m.latest is None:
        return None
    created = datetime.fromisoformat(m.latest.created)
    return m.latest.id if created >= started else None


def _last_success(target: Path, image: ImageSpec) -> str | None:
    try:
        m = mf.load(chain_dir(target, image))
    except Error:
        return None
    return m.latest.created if m is not None and m.latest is not None else None


def iter_failed(report: RunReport) -> Iterator[ImageReport]:
    return (i for i in report.images if i.status == FAILED)
