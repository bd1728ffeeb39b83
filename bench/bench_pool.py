"""Benchmark ``rbd2qcow2 run`` on a pool of many small images against ``rbd export-diff`` of each in turn.

The issue's target: a pool of 40 images of 256 MiB with 5 % changed in each;
an incremental ``run`` with ``jobs = 4`` takes at most 1.0x (aim: 0.5x) the
time of ``rbd export-diff`` run for each image one after another.  It also
measures the per-image fixed costs (connect, snapshot, qemu, checks) that
dominate small images, and attributes them with an instrumented run.  See
``bench/README.md`` for the design and the last measured numbers.

    flock /tmp/r2q-bench.lock .venv/bin/python bench/bench_pool.py
        [--images 40] [--size-mib 256] [--jobs 4] [--rounds 3] [--job-variants 1,2,8] [--no-profile] [--keep]

The script takes an exclusive ``flock`` on ``/tmp/r2q-bench.lock`` itself
(or uses the one inherited from ``flock(1)``), so that only one benchmark
measures on the machine at a time.  It starts a throwaway one-OSD cluster and
stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import (
    GNU_TIME,
    TICKS,
    GiB,
    KiB,
    MiB,
    TreeSampler,
    bench_lock,
    compile_package,
    cpu_of,
    first_difference,
    log,
    machine,
    median,
    proc_stat,
)

OBJECT = 4 * MiB
FEATURES = "layering,exclusive-lock,object-map,fast-diff"
FILL_FRACTION = 0.5  # of each image's 4 MiB objects, written with random data
CHANGE_FRACTION = 0.05  # of each image's size, per round
CHANGE_WRITE = 64 * KiB
WRITER_THREADS = 4
OSD_SIZE_GIB = 20
POOL = "bench"
TARGET = (1.0, 0.5)  # incremental run / sequential export-diff: required, aim
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Measurement:
    """One timed operation (one process, or a loop of processes one after another)."""

    wall: float
    cpu: float  # user + system of the processes and their reaped children
    maxrss_kib: int | None  # GNU time %M: the largest single process (ours only)
    tree_rss_kib: int  # sampled peak of the summed RSS of the process tree
    osd_cpu: float | None
    others_cpu: float  # CPU seconds other processes used on the machine meanwhile
    summary: dict[str, Any] | None = None  # `run --json` output (ours)
    out_bytes: int = 0  # what export-diff wrote (native)
    depth: int = 0  # points per chain after the run (ours)


def measure(
    cmds: Sequence[Sequence[str]], env: dict[str, str], log_path: Path, osd_pid: int | None, *, ours: bool
) -> Measurement:
    """Run ``cmds`` one after another; wall time around all of them, rusage by wait4.

    Ours (one command) runs under GNU time for its peak RSS: a child of this
    process would report at least this process's own RSS (librados), because
    Linux carries the pre-exec high-water mark into the child's ru_maxrss.
    Its stdout (the ``--json`` summary) is kept apart from its stderr.
    """
    osd_before, busy_before = cpu_of(osd_pid), machine()["busy"]
    rss_file = log_path.with_suffix(".rss")
    json_file = log_path.with_suffix(".json")
    launcher = [GNU_TIME, "-f", "%M", "-o", str(rss_file)] if ours and GNU_TIME else []
    cpu, tree_kib = 0.0, 0
    with open(log_path, "wb") as err, open(json_file, "wb") as out:
        start = time.perf_counter()
        for cmd in cmds:
            proc = subprocess.Popen(
                [*launcher, *cmd], stdin=subprocess.DEVNULL, stdout=out if ours else err, stderr=err, env=env
            )
            sampler = TreeSampler(proc.pid, skip_root=bool(launcher), threads=False) if ours else None
            if sampler:
                sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            if sampler:
                sampler.stop()
                tree_kib = max(tree_kib, sampler.peak_rss_kib)
            cpu += usage.ru_utime + usage.ru_stime
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"{' '.join(cmd)} exited {code}:\n{tail}")
        wall = time.perf_counter() - start
    osd_after, busy_after = cpu_of(osd_pid), machine()["busy"]
    osd = None if osd_before is None or osd_after is None else osd_after - osd_before
    return Measurement(
        wall=wall,
        cpu=cpu,
        maxrss_kib=int(rss_file.read_text().split()[-1]) if launcher else None,
        tree_rss_kib=tree_kib,
        osd_cpu=osd,
        others_cpu=max(0.0, busy_after - busy_before - cpu - (osd or 0.0)),
        summary=json.loads(json_file.read_text()) if ours else None,
    )


# ------------------------------------------------------------------ the bench


@dataclass
class Bench:
    """The throwaway cluster, the images and where everything is written."""

    args: argparse.Namespace
    conf: Path
    env: dict[str, str]
    osd_pid: int | None
    ioctx: Any  # rados.Ioctx
    work: Path
    target: Path
    images: list[str]
    size: int
    prev: str = ""  # the latest round snapshot (user snapshot, on every image)
    rounds: int = 0
    depth: int = 0  # points per chain
    logs: int = 0
    snapshot_s: list[float] = field(default_factory=list)  # creating one user snapshot, in this process

    def log_path(self, name: str) -> Path:
        self.logs += 1
        (self.work / "logs").mkdir(exist_ok=True)
        return self.work / "logs" / f"{self.logs:03d}-{name}.log"

    def run(self, *cmd: str) -> None:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")

    def config(self, jobs: int, *, structure: bool = True) -> Path:
        """The ``run --config`` file: target, jobs, one cluster with its conf, one pool."""
        path = self.work / f"run-jobs{jobs}{'' if structure else '-nostructure'}.toml"
        text = f"target = {json.dumps(str(self.target))}\njobs = {jobs}\n\n"
        text += f'[[clusters]]\nname = "bench"\nconf = {json.dumps(str(self.conf))}\n\n'
        text += f'[[clusters.pools]]\nname = "{POOL}"\n'
        if not structure:
            text += "\n[verify]\nstructure = false\n"
        path.write_text(text)
        return path

    def ours(self, config: Path) -> list[str]:
        return [sys.executable, "-m", "rbd2qcow2", "run", "--config", str(config), "--json"]

    def export_diffs(self, from_snap: str | None, snap: str) -> list[list[str]]:
        cmds = []
        for name in self.images:
            cmd = ["rbd", "-c", str(self.conf), "export-diff", "--no-progress"]
            cmd += ["--from-snap", from_snap] if from_snap else []
            cmds.append([*cmd, f"{POOL}/{name}@{snap}", str(self.work / "diffs" / f"{name}.diff")])
        return cmds

    def timed(self, label: str, cmds: Sequence[Sequence[str]], *, ours: bool) -> Measurement:
        """One measured operation; then, not timed, its outputs are dropped and dirty pages synced."""
        (self.work / "diffs").mkdir(exist_ok=True)
        waited = settle(self.osd_pid)
        m = measure(cmds, self.env, self.log_path(label), self.osd_pid, ours=ours)
        m.out_bytes = sum(f.stat().st_size for f in (self.work / "diffs").iterdir())
        shutil.rmtree(self.work / "diffs")
        os.sync()
        if ours:
            self.depth += 1
            m.depth = self.depth
        rss = f", {m.maxrss_kib / KiB:.0f} MiB" if m.maxrss_kib else ""
        log(f"  {label}: {m.wall:.2f} s, {m.cpu:.2f} s CPU{rss} (waited {waited:.1f} s for a quiet OSD before)")
        return m


def settle(osd_pid: int | None, quiet: float = 0.1, limit: float = 30.0) -> float:
    """Wait (not timed) until the OSD uses less than ``quiet`` of a CPU over half a second.

    Removing the previous round's snapshots leaves the OSD trimming them in
    the background; without this, that work lands in whatever is measured next.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        before = cpu_of(osd_pid)
        time.sleep(0.5)
        after = cpu_of(osd_pid)
        if before is None or after is None or (after - before) / 0.5 < quiet:
            break
    return time.perf_counter() - start


@contextlib.contextmanager
def bench_context(args: argparse.Namespace) -> Iterator[Bench]:
    """A throwaway cluster with the pool, connected; stopped (and removed unless --keep) after."""
    import rados

    sys.path.insert(0, str(REPO / "tests"))
    from cephcluster import CephCluster

    work = Path(tempfile.mkdtemp(prefix="r2q-p-"))
    cluster = CephCluster(work / "c", osd_size_gib=OSD_SIZE_GIB)
    try:
        log(f"starting a throwaway cluster in {work / 'c'}")
        cluster.start()
        cluster.create_pool(POOL)
        with rados.Rados(conffile=str(cluster.conf)) as client, client.open_ioctx(POOL) as ioctx:
            yield Bench(
                args=args,
                conf=cluster.conf,
                env=cluster.env(),
                osd_pid=cluster.pids.get("osd.0"),
                ioctx=ioctx,
                work=work,
                target=work / "target",
                images=[f"img{i:03d}" for i in range(args.images)],
                size=args.size_mib * MiB,
            )
    finally:
        cluster.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------ the workload


def create_images(b: Bench) -> None:
    """The images, each with ``FILL_FRACTION`` of its 4 MiB objects full of random data."""
    start = time.perf_counter()
    for name in b.images:
        b.run("rbd", "-c", str(b.conf), "create", "--size", f"{b.size // MiB}M", "--image-feature", FEATURES,
              f"{POOL}/{name}")  # fmt: skip
    rng = random.Random(b.args.seed)
    objects = b.size // OBJECT
    extents = {name: [(i * OBJECT, OBJECT) for i in rng.sample(range(objects), round(objects * FILL_FRACTION))]
               for name in b.images}  # fmt: skip
    write_random(b, extents)
    total = sum(length for e in extents.values() for _, length in e)
    log(f"created {len(b.images)} images, wrote {total / GiB:.1f} GiB in {time.perf_counter() - start:.1f} s")


def change(b: Bench, seed: int) -> None:
    """5 % of every image: 64 KiB writes at distinct random 64 KiB-aligned offsets."""
    rng = random.Random(seed)
    slots = b.size // CHANGE_WRITE
    count = round(b.size * CHANGE_FRACTION / CHANGE_WRITE)
    write_random(b, {name: [(s * CHANGE_WRITE, CHANGE_WRITE) for s in rng.sample(range(slots), count)]
                     for name in b.images})  # fmt: skip


def write_random(b: Bench, extents: dict[str, list[tuple[int, int]]]) -> None:
    """Random data into the extents of every image, from a few threads; the handles are closed after."""
    import rbd

    handles = {name: rbd.Image(b.ioctx, name) for name in extents}
    try:
        with ThreadPoolExecutor(WRITER_THREADS) as pool:

            def write(item: tuple[str, int, int]) -> None:
                handles[item[0]].write(os.urandom(item[2]), item[1])

            work = [(name, offset, length) for name, e in extents.items() for offset, length in e]
            random.Random(0).shuffle(work)
            for _ in pool.map(write, work):
                pass
    finally:
        for img in handles.values():
            img.close()


def snap_all(b: Bench, snap: str) -> None:
    import rbd

    for name in b.images:
        with rbd.Image(b.ioctx, name) as img:
            start = time.perf_counter()
            img.create_snap(snap)
            b.snapshot_s.append(time.perf_counter() - start)


def remove_snap_all(b: Bench, snap: str) -> None:
    import rbd

    for name in b.images:
        with rbd.Image(b.ioctx, name) as img:
            img.remove_snap(snap)


def check_summary(m: Measurement, b: Bench, kind: str) -> None:
    s = m.summary or {}
    bad = [i for i in s.get("images", []) if i.get("status") != "ok" or i.get("kind") != kind]
    if not s.get("ok") or len(s.get("images", [])) != len(b.images) or bad:
        raise SystemExit(f"run did not make {len(b.images)} {kind} points: {json.dumps(bad or s)[:2000]}")


# ------------------------------------------------------------------ the phases


@dataclass
class Row:
    label: str
    ours: list[Measurement] = field(default_factory=list)
    native: list[Measurement] = field(default_factory=list)
    target: bool = False


def first_run(b: Bench) -> Row:
    """The first ``run``: full backups of every image (ours first), then ``export-diff`` of all of it."""
    snap_all(b, "r0")
    b.prev = "r0"
    log("first run: full backups")
    row = Row("first run, full backups")
    m = b.timed("run-full", [b.ours(b.config(b.args.jobs))], ours=True)
    check_summary(m, b, "full")
    row.ours.append(m)
    row.native.append(b.timed("export-diff-full", b.export_diffs(None, "r0"), ours=False))
    return row


def do_round(b: Bench, row: Row | None, *, changed: bool, jobs: int, structure: bool = True, native: bool = True,
             runner: Callable[[Bench, Path], Measurement] | None = None) -> Measurement:  # fmt: skip
    """One round: the change (or none), round snapshot ``rN`` on every image, then both tools, alternating.

    ``rbd export-diff --from-snap r(N-1) @rN`` and ``rbd2qcow2 run`` diff the
    same change: the run snapshots the heads, which equal ``rN``, and diffs
    from its previous point's snapshot, whose content equals ``r(N-1)``.
    ``row`` None: a warm-up, not kept.
    """
    b.rounds += 1
    n = b.rounds
    if changed:
        start = time.perf_counter()
        change(b, b.args.seed * 1000 + n)
        log(f"round {n}: 5 % change written in {time.perf_counter() - start:.1f} s")
    snap = f"r{n}"
    snap_all(b, snap)
    config = b.config(jobs, structure=structure)
    ours_first = n % 2 == 0
    ours_m: Measurement | None = None
    for is_ours in (ours_first, not ours_first):
        if is_ours:
            ours_m = runner(b, config) if runner else b.timed(f"run-jobs{jobs}", [b.ours(config)], ours=True)
            check_summary(ours_m, b, "incremental")
            if row is not None:
                row.ours.append(ours_m)
        elif native:
            m = b.timed("export-diff", b.export_diffs(b.prev, snap), ours=False)
            if row is not None:
                row.native.append(m)
    remove_snap_all(b, b.prev)
    b.prev = snap
    assert ours_m is not None
    return ours_m


# ------------------------------------------------------------------ attribution


def profiled(b: Bench, config: Path) -> Measurement:
    """``run`` in a child that times rbd2qcow2's steps per thread (see :func:`profile_child`)."""
    out = b.work / f"profile-{b.logs + 1}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-child", str(config), str(out)]
    m = b.timed("run-profiled", [cmd], ours=True)
    (m.summary or {})["profile"] = json.loads(out.read_text())
    return m


# (module, attribute, label, kind): kind "call" times each call, "cm" times a context manager's enter and exit.
PROBES: list[tuple[str, str, str, str]] = [
    ("ops.config", "load", "load config", "call"),
    ("ops.run", "open_target", "open target", "call"),
    ("adapters.ceph", "Cluster.__init__", "connect", "call"),
    ("adapters.ceph", "Cluster.list_images", "list images", "call"),
    ("adapters.ceph", "Cluster.close", "disconnect", "call"),
    ("ops.run", "_deleted", "scan for deleted images", "call"),
    ("ops.run", "_run_jobs", "jobs", "call"),
    ("adapters.qemu", "storage_daemon", "qemu-storage-daemon", "cm"),
    ("ops.run", "_prepare", "prepare image", "call"),
    ("ops.run", "_finish", "image", "call"),
    ("adapters.ceph", "Cluster.claim", "claim", "cm"),
    ("ops.run", "_point_since", "backed up elsewhere?", "call"),
    ("ops.run", "_prune_verify", "prune+verify", "call"),
    ("ops.run", "_last_success", "last success", "call"),
    ("adapters.ceph", "Cluster.image", "rbd open", "cm"),
    ("adapters.ceph", "RbdImage.metadata", "image-meta get", "call"),
    ("adapters.ceph", "RbdImage.id", "image id", "call"),
    ("adapters.ceph", "RbdImage.snapshots", "list snapshots", "call"),
    ("adapters.ceph", "RbdImage.create_snapshot", "snapshot create", "call"),
    ("adapters.ceph", "RbdImage.remove_snapshot", "snapshot remove", "call"),
    ("adapters.ceph", "RbdImage.diff", "diff_iterate", "call"),
    ("adapters.ceph", "RbdImage.read_many", "rbd read", "call"),
    ("ops.backup_point", "ImageBackup.__init__", "make dirs", "call"),
    ("ops.backup_point", "ImageBackup.start", "backup start", "call"),
    ("ops.backup_point", "ImageBackup.finish", "backup finish", "call"),
    ("ops.backup_point", "chain_lock", "chain lock", "cm"),
    ("ops.backup_point", "recover", "recover", "call"),
    ("ops.backup_point", "ImageBackup._clean_orphans", "clean orphans", "call"),
    ("ops.backup_point", "choose_base", "choose base", "call"),
    ("ops.backup_point", "ImageBackup._base_chain", "check base chain", "call"),
    ("ops.backup_layer", "LayerWriter.write", "write point", "call"),
    ("ops.backup_layer", "LayerWriter._transfer", "transfer", "call"),
    ("ops.backup_layer", "LayerWriter._check_unchanged", "sample unchanged", "call"),
    ("ops.backup", "remove_snapshots", "remove old snapshots", "call"),
    ("ops.backup_layer", "commit_file", "rename into place", "call"),
    ("ops.backup_point", "point_latest", "latest link", "call"),
    ("ops.backup_point", "record", "activity log", "call"),
    ("ops.run", "record", "activity log", "call"),
    ("store.manifest", "load", "manifest load", "call"),
    ("store.manifest", "save", "manifest save", "call"),
    ("store.fsutil", "fsync_file", "fsync", "call"),
    ("store.fsutil", "fsync_dir", "fsync dir", "call"),
    ("store.qcow2", "create_layer", "create layer", "call"),
    ("adapters.qemu", "check_layer", "qemu-img check", "call"),
    ("adapters.qemu", "StorageDaemon.export_chain", "NBD export add", "call"),
    ("adapters.qemu", "StorageDaemon.remove_export", "NBD export remove", "call"),
    ("adapters.nbdio", "ConnectionPool.__init__", "NBD connect", "call"),
    ("adapters.nbdio", "ConnectionPool.flush", "NBD flush", "call"),
    ("adapters.nbdio", "ConnectionPool.close", "NBD disconnect", "call"),
    ("transfer.pipeline", "Transfer.run", "pull data", "call"),
    ("store.checksums", "OrderedWriter.finish", "checksum file finish", "call"),
    ("ops.run", "_verify", "verify", "call"),
    ("ops.verify", "ChainVerifier._structure", "structure", "call"),
    ("ops.verify", "ChainVerifier._sums_problem", "checksum file sha256", "call"),
    ("ops.verify", "ChainVerifier._modes", "file modes", "call"),
]


class Profile:
    """Wall seconds and calls per call path, ``thread kind/label/label...``, over all threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[str, list[float]] = {}
        self.local = threading.local()

    def stack(self) -> list[str]:
        if not hasattr(self.local, "stack"):
            name = threading.current_thread().name
            kind = name.split("-")[0] if name.startswith(("job-", "prep-")) else "other"
            kind = "main" if name == "MainThread" else kind
            self.local.stack = [kind]
        stack: list[str] = self.local.stack
        return stack

    def timed(self, label: str, func: Callable[[], Any]) -> Any:
        stack = self.stack()
        stack.append(label)
        start = time.perf_counter()
        try:
            return func()
        finally:
            self.add("/".join(stack), time.perf_counter() - start)
            stack.pop()

    def add(self, path: str, seconds: float) -> None:
        with self.lock:
            entry = self.data.setdefault(path, [0.0, 0])
            entry[0] += seconds
            entry[1] += 1


class _TimedCM:
    def __init__(self, prof: Profile, label: str, cm: Any) -> None:
        self.prof, self.label, self.cm = prof, label, cm

    def __enter__(self) -> Any:
        return self.prof.timed(f"{self.label} (enter)", self.cm.__enter__)

    def __exit__(self, *exc: Any) -> Any:
        return self.prof.timed(f"{self.label} (exit)", lambda: self.cm.__exit__(*exc))


def _probe(prof: Profile, func: Callable[..., Any], label: str, kind: str) -> Callable[..., Any]:
    if kind == "cm":

        @functools.wraps(func)
        def cm(*args: Any, **kwargs: Any) -> _TimedCM:
            return _TimedCM(prof, label, func(*args, **kwargs))

        return cm

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        return prof.timed(label, lambda: func(*args, **kwargs))

    return call


def profile_child(config: str, out: str) -> int:
    """``rbd2qcow2 run --config CONFIG --json`` with its steps timed; the timings go to ``out``.

    Every function in :data:`PROBES` is replaced (in the module that calls it)
    by a wrapper that adds its wall time to the current thread's call path.
    """
    import importlib

    start = time.perf_counter()
    from rbd2qcow2.adapters import ceph
    from rbd2qcow2.cli import main as cli
    from rbd2qcow2.cli import report  # noqa: F401 - what `run` imports: timed as "imports"
    from rbd2qcow2.ops import run as nightly  # noqa: F401 - what `run` imports: timed as "imports"

    prof = Profile()
    prof.add("main/imports", time.perf_counter() - start)
    missing = []
    for module_name, attr, label, kind in PROBES:
        module = importlib.import_module(f"rbd2qcow2.{module_name}")
        owner_name, _, name = attr.rpartition(".")
        owner = getattr(module, owner_name) if owner_name else module
        func = getattr(owner, name, None)
        if func is None:
            missing.append(f"{module_name}.{attr}")
            continue
        setattr(owner, name, _probe(prof, func, label, kind))
    threads: dict[str, float] = {}
    close = ceph.Cluster.close

    def close_after_counting(self: Any) -> None:
        # librados' threads end with the connection: take their CPU time just before.
        threads.update(_thread_cpu())
        close(self)

    setattr(ceph.Cluster, "close", close_after_counting)  # noqa: B010 - a method replaced on purpose
    code = int(prof.timed("cli.main", lambda: cli.main(["run", "--config", config, "--json"])))
    prof.add("main/total in process", time.perf_counter() - start)
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {"self": me.ru_utime + me.ru_stime, "children": children.ru_utime + children.ru_stime}
    Path(out).write_text(json.dumps({"data": prof.data, "missing": missing, "cpu": cpu, "threads": threads}))
    return code


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads, summed by thread name (digits dropped)."""
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            comm, fields = proc_stat(task / "stat")
            name = "python (main thread)" if int(task.name) == os.getpid() else comm.rstrip("0123456789-")
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICKS
    return out


def breakdown(label: str, m: Measurement) -> list[str]:
    """The timed steps of a profiled run: process-wide ones, then per image (mean), as a tree."""
    prof = (m.summary or {})["profile"]
    data: dict[str, list[float]] = prof["data"]
    images = int(data.get("job/image", [0, 0])[1]) or 1
    in_process = data.get("main/total in process", [0.0])[0]
    lines = [f"{label}: wall {m.wall:.2f} s ({m.wall / images:.3f} s per image), depth {m.depth} points per chain"]
    startup = m.wall - in_process
    lines.append(f"  process: {startup:.2f} s interpreter start-up and exit (outside the timed code)")
    order = ["imports", "cli.main/load config", "cli.main/open target", "cli.main/connect", "cli.main/list images",
             "cli.main/scan for deleted images", "cli.main/jobs", "cli.main/disconnect"]  # fmt: skip
    for key in order:
        seconds, calls = data.get(f"main/{key}", [0.0, 0])
        if calls:
            lines.append(f"  process: {seconds:6.3f} s  {key.removeprefix('cli.main/')}")
    main_total = data.get("main/cli.main", [0.0])[0]
    accounted = sum(data.get(f"main/{k}", [0.0])[0] for k in order if k.startswith("cli.main/"))
    lines.append(f"  process: {main_total - accounted:6.3f} s  rest of cli.main (argument parsing, summary)")
    for key in ("qemu-storage-daemon (enter)", "qemu-storage-daemon (exit)"):
        seconds, calls = data.get(f"job/{key}", [0.0, 0])
        if calls:
            lines.append(f"  per job:  {seconds / calls:6.3f} s  {key} ({int(calls)} jobs)")
    cpu, threads = prof["cpu"], prof["threads"]
    qemu_img = sum(v[1] for k, v in data.items() if k.endswith("/qemu-img check"))
    jobs = int(data.get("job/qemu-storage-daemon (enter)", [0, 0])[1])
    ceph_threads = sum(v for k, v in threads.items() if not k.startswith("python"))
    lines.append(
        f"  CPU: {m.cpu:.2f} s in all; the rbd2qcow2 process {cpu['self']:.2f} s, of which librados/librbd "
        f"threads {ceph_threads:.2f} s, the rest Python threads; its children {cpu['children']:.2f} s "
        f"({qemu_img / images:.0f} qemu-img runs per image, {jobs} qemu-storage-daemon)"
    )
    busiest = sorted(threads.items(), key=lambda kv: -kv[1])[:5]
    lines.append("  CPU of live threads at the end: " + ", ".join(f"{k} {v:.2f} s" for k, v in busiest))
    total = data.get("job/image", [0.0])[0]
    lines.append(f"  per image (mean of {images}, summed over the job threads: {total:.2f} s):")
    lines += _tree(data, "job/image", images, indent=4)
    if "prep/prepare image" in data:
        ahead = data["prep/prepare image"][0]
        lines.append(f"  per image, ahead in the prep threads (summed over them: {ahead:.2f} s):")
        lines += _tree(data, "prep/prepare image", images, indent=4)
    others = sorted((k, v) for k, v in data.items() if k.startswith("other/") and k.count("/") == 1)
    if others:
        parts = [f"{k[6:]} {v[1] / images:.1f} calls {v[0] / images * 1000:.1f} ms" for k, v in others]
        lines.append(f"  per image in other threads (readers, janitor; beside the above): {'; '.join(parts)}")
    if prof.get("missing"):
        lines.append(f"  (probes not found: {', '.join(prof['missing'])})")
    return lines


def _tree(data: dict[str, list[float]], path: str, images: int, indent: int) -> list[str]:
    seconds, calls = data[path]
    name = path.rsplit("/", 1)[-1]
    out = [f"{' ' * indent}{seconds / images * 1000:7.1f} ms  {name}" + (
        f"  ({calls / images:.1f} calls)" if calls != images else "")]  # fmt: skip
    children = sorted((p for p in data if p.startswith(path + "/") and "/" not in p[len(path) + 1 :]),
                      key=lambda p: -data[p][0])  # fmt: skip
    inner = sum(data[p][0] for p in children)
    for child in children:
        if data[child][0] / images >= 0.0005:
            out += _tree(data, child, images, indent + 2)
    if children and (seconds - inner) / images >= 0.001:
        out.append(f"{' ' * (indent + 2)}{(seconds - inner) / images * 1000:7.1f} ms  (rest)")
    return out


# ------------------------------------------------------------------ correctness


def check_content(b: Bench, name: str) -> None:
    """``qemu-img convert`` of the image's latest point equals ``rbd export`` of the last round snapshot."""
    from rbd2qcow2.core.names import ImageSpec
    from rbd2qcow2.store import manifest as mf
    from rbd2qcow2.store.target import chain_dir

    directory = chain_dir(b.target, ImageSpec(POOL, "", name))
    manifest = mf.load(directory)
    if manifest is None or manifest.latest is None:
        raise SystemExit(f"no point for {name}")
    ours_raw, expected_raw = b.work / "ours.raw", b.work / "expected.raw"
    try:
        b.run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(directory / manifest.latest.file), str(ours_raw))
        b.run("rbd", "-c", str(b.conf), "export", "--no-progress", f"{POOL}/{name}@{b.prev}", str(expected_raw))
        differs = first_difference(ours_raw, expected_raw)
    finally:
        for path in (ours_raw, expected_raw):
            path.unlink(missing_ok=True)
    if differs is not None:
        raise SystemExit(f"WRONG RESULT: {name} point {manifest.latest.id} differs from @{b.prev} at byte {differs}")
    log(f"checked: {name} point {manifest.latest.id} equals rbd export of @{b.prev}")


def startup_costs(b: Bench) -> list[str]:
    """Wall time of an empty interpreter and of ``run --check-config`` (median of 5 each)."""
    config = b.config(b.args.jobs)
    out = []
    for label, cmd in (("python -c pass", [sys.executable, "-c", "pass"]),
                       ("rbd2qcow2 run --check-config", [*b.ours(config)[:-1], "--check-config"]),
                       ("rbd --version", ["rbd", "--version"])):  # fmt: skip
        walls = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run(cmd, env=b.env, capture_output=True, check=True)
            walls.append(time.perf_counter() - start)
        out.append(f"{label} {statistics.median(walls):.3f} s")
    return out


def qemu_img_costs(b: Bench) -> str:
    """Wall and CPU of creating one layer (in-process) and one ``qemu-img check`` of a layer, as rbd2qcow2 runs them."""
    from rbd2qcow2.adapters import qemu
    from rbd2qcow2.core.names import ImageSpec
    from rbd2qcow2.store import manifest as mf
    from rbd2qcow2.store import qcow2
    from rbd2qcow2.store.target import chain_dir

    directory = chain_dir(b.target, ImageSpec(POOL, "", b.images[0]))
    manifest = mf.load(directory)
    assert manifest is not None and manifest.latest is not None
    backing = manifest.latest.file
    layer, scratch = directory / backing, b.work / "scratch.qcow2"
    out = []
    create, check = lambda: qcow2.create_layer(scratch, b.size, backing), lambda: qemu.check_layer(layer)
    for label, func, who in (("create layer", create, resource.RUSAGE_SELF),
                             ("qemu-img check", check, resource.RUSAGE_CHILDREN)):  # fmt: skip
        walls, cpus = [], []
        for _ in range(10):
            before, start = resource.getrusage(who), time.perf_counter()
            func()
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(who)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            scratch.unlink(missing_ok=True)
        wall, cpu = statistics.median(walls) * 1000, statistics.median(cpus) * 1000
        out.append(f"{label} {wall:.1f} ms ({cpu:.1f} ms CPU)")
    return "; ".join(out) + " (median of 10, as rbd2qcow2 runs them)"


# ------------------------------------------------------------------ the report


def per_image(runs: list[Measurement]) -> list[float]:
    return [float(i["seconds"]) for m in runs for i in (m.summary or {}).get("images", [])]


def report(rows: list[Row]) -> str:
    lines = [
        f"{'operation':<40} {'ours s':>7} {'native s':>9} {'ratio':>6}  {'target (aim)':<13} "
        f"{'RSS MiB':>7} {'tree MiB':>8} {'CPU s ours/native':>17}  {'per image s min/med/max':>23} {'depth':>6}"
    ]
    for row in rows:
        o = median([m.wall for m in row.ours])
        n = median([m.wall for m in row.native])
        ratio = o / n if row.native else float("nan")
        goal = f"<={TARGET[0]}x ({TARGET[1]}x)" if row.target else "-"
        verdict = ("met" if ratio <= TARGET[0] else "MISSED") if row.target else ""
        rss = max(m.maxrss_kib or 0 for m in row.ours) / KiB
        tree = max(m.tree_rss_kib for m in row.ours) / KiB
        cpu = f"{median([m.cpu for m in row.ours]):.1f} / " + (
            f"{median([m.cpu for m in row.native]):.1f}" if row.native else "-")  # fmt: skip
        secs = per_image(row.ours)
        img = f"{min(secs):.2f} / {median(secs):.2f} / {max(secs):.2f}"
        depths = sorted({m.depth for m in row.ours})
        depth = f"{depths[0]}" + (f"-{depths[-1]}" if len(depths) > 1 else "")
        native = f"{n:9.2f}" if row.native else f"{'-':>9}"
        ratio_s = f"{ratio:6.2f}" if row.native else f"{'-':>6}"
        lines.append(
            f"{row.label:<40} {o:7.2f} {native} {ratio_s}  {goal:<13} {rss:7.0f} {tree:8.0f} {cpu:>17}  "
            f"{img:>23} {depth:>6}  {verdict}".rstrip()
        )
    return "\n".join(lines)


def run_lines(rows: list[Row], images: int, snapshot_s: float) -> list[str]:
    out = []
    for row in rows:
        ours = ", ".join(f"{m.wall:.2f}" for m in row.ours)
        native = ", ".join(f"{m.wall:.2f}" for m in row.native) or "-"
        others = median([m.others_cpu / m.wall / (os.cpu_count() or 1) for m in row.ours + row.native])
        osd = median([m.osd_cpu for m in row.ours if m.osd_cpu is not None])
        native_osd = [m.osd_cpu for m in row.native if m.osd_cpu is not None]
        osd_text = f"{osd:.1f} s" + (f", during native {median(native_osd):.1f} s" if native_osd else "")
        out.append(f"{row.label}: ours {ours} s; native {native} s; OSD CPU during ours {osd_text}; "
                   f"other processes {others:.0%} of the CPUs")  # fmt: skip
        last = (row.ours[-1].summary or {}).get("images", [])
        read = median([i["bytes_read"] / MiB for i in last])
        written = median([i["bytes_written"] / MiB for i in last])
        line = f"  per image (median): ours read {read:.1f} MiB, wrote {written:.1f} MiB"
        if row.native:
            line += f"; export-diff wrote {row.native[-1].out_bytes / images / MiB:.1f} MiB"
            with_snaps = median([m.wall for m in row.native]) + images * snapshot_s
            ratio = median([m.wall for m in row.ours]) / with_snaps
            line += f"; native + creating its {images} snapshots {with_snaps:.2f} s -> ratio {ratio:.2f}"
        out.append(line)
    return out


# ------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--images", type=int, default=40, help="images in the pool (default 40)")
    p.add_argument("--size-mib", type=int, default=256, help="size of each image (default 256)")
    p.add_argument("--jobs", type=int, default=4, help="jobs of the measured runs (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per row after 1 warm-up (default 3)")
    p.add_argument("--job-variants", default="1,2,8", help="other jobs values, one 5 %% round each (default 1,2,8)")
    p.add_argument("--no-profile", action="store_true", help="skip the instrumented runs (fixed-cost breakdown)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the write pattern")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--profile-child", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.images, args.size_mib, args.jobs, args.rounds) < 1 or args.size_mib % 4:
        p.error("--images, --size-mib, --jobs and --rounds must be at least 1, --size-mib a multiple of 4")
    args.variants = [int(v) for v in args.job_variants.split(",") if v.strip() and int(v) != args.jobs]
    return args


def run_bench(b: Bench) -> str:
    args = b.args
    create_images(b)
    rows = [first_run(b)]
    log("warm-up round")
    do_round(b, None, changed=True, jobs=args.jobs)
    main_row = Row(f"incremental, 5 % changed, jobs={args.jobs}", target=True)
    idle_row = Row(f"incremental, nothing changed, jobs={args.jobs}")
    for i in range(args.rounds):
        log(f"5 % round {i + 1}")
        do_round(b, main_row, changed=True, jobs=args.jobs)
    for i in range(args.rounds):
        log(f"no-change round {i + 1}")
        do_round(b, idle_row, changed=False, jobs=args.jobs)
    rows += [main_row, idle_row]
    for jobs in args.variants:
        log(f"5 % round with jobs={jobs}")
        rows.append(Row(f"incremental, 5 % changed, jobs={jobs}"))
        do_round(b, rows[-1], changed=True, jobs=jobs)
    log(f"5 % round with jobs={args.jobs} and [verify] structure = false")
    rows.append(Row(f"  same, jobs={args.jobs}, no structure verify"))
    do_round(b, rows[-1], changed=True, jobs=args.jobs, structure=False)
    profiles: list[str] = []
    if not args.no_profile:
        for label, changed, jobs in (("jobs=1, nothing changed", False, 1), ("jobs=1, 5 % changed", True, 1),
                                     (f"jobs={args.jobs}, 5 % changed", True, args.jobs)):  # fmt: skip
            log(f"instrumented run, {label}")
            m = do_round(b, None, changed=changed, jobs=jobs, native=False, runner=profiled)
            profiles += [*breakdown(f"instrumented run, {label}", m), ""]
    startup = [*startup_costs(b), qemu_img_costs(b)]
    log("verify --deep")
    verify_cmd = [sys.executable, "-m", "rbd2qcow2", "verify", "--target", str(b.target), "--deep", "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(verify_cmd, env=b.env, capture_output=True, text=True, check=False)
    verify_s = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"verify --deep exited {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    for name in (b.images[0], b.images[-1]):
        check_content(b, name)
    snap = median(b.snapshot_s)
    lines = [report(rows), "", *run_lines(rows, len(b.images), snap), ""]
    lines.append(f"creating one RBD snapshot (librbd, in the bench process): median {snap * 1000:.0f} ms "
                 f"over {len(b.snapshot_s)}")  # fmt: skip
    lines.append("start-up (median of 5): " + "; ".join(startup))
    lines.append(f"verify --target T --deep: exit 0 in {verify_s:.1f} s ({proc.stdout.strip().splitlines()[-1]}); "
                 f"content of {b.images[0]} and {b.images[-1]} equals rbd export")  # fmt: skip
    if profiles:
        lines += ["", *profiles]
    return "\n".join(lines).rstrip()


def revision() -> str:
    """The checkout's ``git describe``: the package under test may be edited while the bench runs."""
    proc = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                          text=True, check=False)  # fmt: skip
    return proc.stdout.strip() or "?"


def header(args: argparse.Namespace, rev_before: str) -> str:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rev_after = revision()
    rev = rev_before if rev_after == rev_before else f"{rev_before} -> {rev_after} (CHANGED during the run)"
    return (
        f"rbd2qcow2 pool benchmark, {date}, {rev}: {os.cpu_count()} CPUs; {args.images} images of "
        f"{args.size_mib} MiB ({FILL_FRACTION:.0%} written), {CHANGE_FRACTION:.0%} changed per round; "
        f"medians of {args.rounds} rounds after 1 warm-up; native = rbd export-diff of each image in turn"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile_child:
        return profile_child(*args.profile_child)
    compile_package(REPO)
    if GNU_TIME is None:
        log("GNU time not found (Debian package 'time'): no peak RSS")
    with bench_lock(), bench_context(args) as bench:
        rev = revision()
        table = run_bench(bench)
    print(f"{header(args, rev)}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
