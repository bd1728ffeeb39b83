"""What bench_chain.py measures with: the cluster, the image, the chain of ten points, the content checks."""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import rados
import rbd

from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchlib import GiB, KiB, MiB, first_difference, log
from cephcluster import CephCluster

OBJECT = 4 * MiB
FEATURES = "layering,exclusive-lock,object-map,fast-diff"
FILL_FRACTION = 0.75
SCATTER_WRITES = 1600
SCATTER_SIZE = 64 * KiB
INCREMENTALS = 9  # after the full backup: a chain of 10 points
WRITER_THREADS = 4
OSD_SIZE_GIB = 30
SETTLE_MAX_S = 20.0  # how long to wait for the OSD to go idle before a measured command
SETTLE_BUSY_CPU = 0.05  # OSD CPU seconds per 0.5 s above which it counts as busy
QEMU_FAST = ["-W", "-m", "16"]  # out-of-order writes, 16 coroutines, as the reference commands
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------- the cluster


@dataclass
class Bench:
    """Where the benchmark runs: cluster, pool, scratch directory, options."""

    conf: Path
    pool: str
    work: Path  # scratch: the throwaway cluster, logs, the oracle and the correctness checks' files
    out: Path  # what the timed commands write
    env: dict[str, str]
    osd_pid: int | None
    ioctx: rados.Ioctx
    runs: int
    logs: int = 0
    images: list[str] = field(default_factory=list)  # made by this run, removed at the end on --conf

    def log(self, name: str) -> Path:
        self.logs += 1
        (self.work / "logs").mkdir(exist_ok=True)
        return self.work / "logs" / f"{self.logs:03d}-{name}.log"

    def run(self, *cmd: str) -> str:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def rbd2qcow2(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "rbd2qcow2", *args]

    def image_exists(self, name: str) -> bool:
        return name in rbd.RBD().list(self.ioctx)


@contextlib.contextmanager
def bench_context(args: argparse.Namespace, work: Path, out: Path) -> Iterator[Bench]:
    """A connected :class:`Bench` on the given cluster or on a throwaway one (stopped after)."""
    cluster: CephCluster | None = None
    if args.conf is None:
        cluster = CephCluster(work / "c", osd_size_gib=OSD_SIZE_GIB)
        log(f"starting a throwaway cluster in {work / 'c'}")
        cluster.start()
        cluster.create_pool(args.pool)
        conf, env = cluster.conf, cluster.env()
    else:
        conf, env = Path(args.conf).absolute(), {**os.environ, "CEPH_CONF": str(Path(args.conf).absolute())}
    try:
        with rados.Rados(conffile=str(conf)) as client, client.open_ioctx(args.pool) as ioctx:
            osd_pid = cluster.pids.get("osd.0") if cluster else None
            yield Bench(conf, args.pool, work, out, env, osd_pid, ioctx, args.runs)
    finally:
        if cluster is not None:
            log("stopping the throwaway cluster")
            cluster.stop()


# ------------------------------------------------------------------ the workload


def create_image(bench: Bench, name: str, size: int, fraction: float, seed: int) -> None:
    """An image with the fast-diff feature set, ``fraction`` of its 4 MiB objects full of random data."""
    bench.run("rbd", "-c", str(bench.conf), "create", "--size", f"{size // MiB}M", "--image-feature", FEATURES,
              f"{bench.pool}/{name}")  # fmt: skip
    bench.images.append(name)
    objects = size // OBJECT
    chosen = random.Random(seed).sample(range(objects), round(objects * fraction))
    start = time.perf_counter()
    write_random(bench, name, [(i * OBJECT, OBJECT) for i in chosen])
    log(f"{name}: wrote {len(chosen)} of {objects} objects in {time.perf_counter() - start:.1f} s")


def scatter(bench: Bench, name: str, size: int, count: int, seed: int) -> None:
    """``count`` random 64 KiB writes at 64 KiB-aligned offsets anywhere in the image."""
    rng = random.Random(seed)
    offsets = [rng.randrange(size // SCATTER_SIZE) * SCATTER_SIZE for _ in range(count)]
    write_random(bench, name, [(offset, SCATTER_SIZE) for offset in offsets])


def write_random(bench: Bench, name: str, extents: list[tuple[int, int]]) -> None:
    """Random data into ``extents``, from a few threads sharing one image handle (one lock owner)."""
    with rbd.Image(bench.ioctx, name) as img, ThreadPoolExecutor(WRITER_THREADS) as pool:

        def write(extent: tuple[int, int]) -> None:
            img.write(os.urandom(extent[1]), extent[0])

        for _ in pool.map(write, extents):
            pass


def remove_image(bench: Bench, name: str) -> None:
    """Remove an image and its snapshots (not timed)."""
    with rbd.Image(bench.ioctx, name) as img:
        for snap in list(img.list_snaps()):
            img.remove_snap(str(snap["name"]))
    rbd.RBD().remove(bench.ioctx, name)


@dataclass
class Chain:
    """The backed-up image: its target, chain directory, points and the oracle."""

    pool: str
    image: str
    target: Path
    directory: Path
    points: list[mf.Point]  # oldest first
    oracle: Path  # `rbd export` of the newest point's snapshot
    raw: Path  # the newest point as a raw file (qemu-img convert), the input of `rbd import`

    @property
    def newest(self) -> mf.Point:
        return self.points[-1]

    def file(self, point: mf.Point) -> Path:
        return self.directory / point.file

    def ref(self, point: str) -> str:
        return f"{self.pool}/{self.image}@{point}"


def build_chain(bench: Bench, args: argparse.Namespace) -> Chain:
    """One image, a full backup and nine rounds of scattered writes + incremental backup (not timed)."""
    size, name = args.size_gib * GiB, f"chain-{args.size_gib}g-{uuid.uuid4().hex[:6]}"
    target = bench.work / "target"
    create_image(bench, name, size, FILL_FRACTION, args.seed)
    backup = bench.rbd2qcow2("backup", "--no-progress", "--target", str(target), "--conf", str(bench.conf))
    directory = chain_dir(target, ImageSpec(bench.pool, "", name))
    for cycle in range(INCREMENTALS + 1):
        if cycle > 0:
            scatter(bench, name, size, SCATTER_WRITES, args.seed + cycle)
        start = time.perf_counter()
        bench.run(*backup, f"{bench.pool}/{name}")
        m = mf.load(directory)
        assert m is not None and m.latest is not None
        point, prev = m.latest, m.points[-2] if len(m.points) > 1 else None
        expected = ("full", None) if cycle == 0 else ("incremental", prev.id if prev else None)
        if len(m.points) != cycle + 1 or (point.kind, point.parent) != expected:
            raise SystemExit(f"point {cycle + 1}: expected {expected}, got {point.kind} on {point.parent}")
        log(f"point {cycle + 1}: {point.kind} {point.id}, {point.data_bytes / MiB:.0f} MiB data, "
            f"{point.stored_bytes / MiB:.0f} MiB on disk, backup took {time.perf_counter() - start:.1f} s")  # fmt: skip
    m = mf.load(directory)
    assert m is not None and m.latest is not None
    points = m.chain_of(m.latest.id)
    oracle, raw = bench.work / "oracle.raw", bench.work / "newest.raw"
    bench.run("rbd", "-c", str(bench.conf), "export", "--no-progress",
              f"{bench.pool}/{name}@{m.latest.snapshot.name}", str(oracle))  # fmt: skip
    chain = Chain(bench.pool, name, target, directory, points, oracle, raw)
    bench.run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(chain.file(chain.newest)), str(raw))
    check_equal(raw, oracle, "the newest point (qemu-img convert)")
    os.sync()
    return chain


# ---------------------------------------------------------------- correctness


def check_equal(path: Path, oracle: Path, what: str) -> None:
    """``path`` equals the oracle byte for byte (not timed), or the bench stops."""
    differs = first_difference(path, oracle)
    if differs is not None:
        raise SystemExit(f"WRONG RESULT: {what} differs from rbd export of the newest snapshot at byte {differs}")
    log(f"checked: {what} equals rbd export of the newest point's snapshot")


def check_rbd_image(bench: Bench, name: str, oracle: Path, what: str) -> None:
    exported = bench.work / "check.raw"
    try:
        bench.run("rbd", "-c", str(bench.conf), "export", "--no-progress", f"{bench.pool}/{name}", str(exported))
        check_equal(exported, oracle, what)
    finally:
        exported.unlink(missing_ok=True)


def check_point(chain_directory: Path, point: mf.Point, oracle: Path, what: str, work: Path) -> None:
    converted = work / "check.raw"
    try:
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(chain_directory / point.file),
                        str(converted)], check=True)  # fmt: skip
        check_equal(converted, oracle, what)
    finally:
        converted.unlink(missing_ok=True)
