"""What bench_pool.py measures with: the throwaway cluster and its images, one timed operation, the checks."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import GNU_TIME, GiB, KiB, MiB, TreeSampler, cpu_of, first_difference, log, machine

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
