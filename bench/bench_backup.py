"""Benchmark ``rbd2qcow2 backup`` against the native tools, side by side.

Full backup: ``rbd2qcow2 backup --full`` against ``qemu-img convert`` of the
same content.  Incremental backup: ``rbd2qcow2 backup`` against
``rbd export-diff`` of the same change set.  Every command is measured as a
whole process (wall time, CPU time and peak RSS of the child); see
``bench/README.md`` for what it measures and ``docs/benchmarks.md`` for the latest figures.

    flock /tmp/r2q-bench.lock .venv/bin/python bench/bench_backup.py [--size-gib 2] [--runs 3] [--memory-8g] [--keep]

The script also takes that lock itself, for its whole run, so that only one
benchmark measures at a time however it is started.

Without ``--conf`` a throwaway one-OSD cluster is started (and stopped at the
end); with ``--conf CONF --pool POOL`` the images are made in that pool and
removed at the end.  The results are checked once (not timed) against
``rbd export`` before anything is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import rados
import rbd

from rbd2qcow2.core.names import ImageSpec
from rbd2qcow2.store import manifest as mf
from rbd2qcow2.store.target import chain_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchlib import (
    GNU_TIME,
    GiB,
    KiB,
    Measurement,
    MiB,
    bench_lock,
    compile_package,
    filesystem_type,
    first_difference,
    fmt_runs,
    log,
    max_mib,
    measure,
    median,
    others,
)
from cephcluster import CephCluster

OBJECT = 4 * MiB
FEATURES = "layering,exclusive-lock,object-map,fast-diff"
SCATTER_WRITES = 1600
SCATTER_SIZE = 64 * KiB
FILL_FRACTION = 0.75
FILL_FRACTION_8G = 0.25
WRITER_THREADS = 4
OSD_SIZE_GIB = 30
TARGETS: dict[str, tuple[float, float] | None] = {"full": (1.0, 0.6), "incremental": (1.5, 1.0), "overhead": None}
MEMORY_LIMIT_MIB = 200


# ------------------------------------------------------------------- the cluster


@dataclass
class Bench:
    """Where the benchmark runs: cluster, pool, scratch directory, options."""

    conf: Path
    pool: str
    work: Path  # scratch: the throwaway cluster, logs, the correctness check's raw files
    out: Path  # what the timed commands write: targets, qemu-img's qcow2, export-diff's file
    env: dict[str, str]
    osd_pid: int | None
    ioctx: rados.Ioctx
    parallel: int | None
    runs: int
    qemu_cache: str | None = None  # qemu-img convert -t (the output's cache mode)
    logs: int = 0

    def log(self, name: str) -> Path:
        self.logs += 1
        (self.work / "logs").mkdir(exist_ok=True)
        return self.work / "logs" / f"{self.logs:03d}-{name}.log"

    def run(self, *cmd: str) -> None:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")

    @contextlib.contextmanager
    def image(self, name: str) -> Iterator[rbd.Image]:
        with rbd.Image(self.ioctx, name) as img:
            yield img

    def chain(self, target: Path, name: str) -> Path:
        return chain_dir(target, ImageSpec(self.pool, "", name))

    def latest_point(self, target: Path, name: str) -> mf.Point:
        manifest = mf.load(self.chain(target, name))
        if manifest is None or manifest.latest is None:
            raise SystemExit(f"no point in {target}")
        return manifest.latest


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
            yield Bench(conf, args.pool, work, out, env, osd_pid, ioctx, args.parallel, args.runs, args.qemu_img_cache)
    finally:
        if cluster is not None:
            cluster.stop()


# ------------------------------------------------------------------ the workload


def create_image(bench: Bench, name: str, size: int, fraction: float, seed: int) -> None:
    """An image with the fast-diff feature set, ``fraction`` of its 4 MiB objects full of random data."""
    bench.run("rbd", "-c", str(bench.conf), "create", "--size", f"{size // MiB}M", "--image-feature", FEATURES,
              f"{bench.pool}/{name}")  # fmt: skip
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
    with bench.image(name) as img, ThreadPoolExecutor(WRITER_THREADS) as pool:

        def write(extent: tuple[int, int]) -> None:
            img.write(os.urandom(extent[1]), extent[0])

        for _ in pool.map(write, extents):
            pass


def create_snap(bench: Bench, name: str, snap: str) -> None:
    with bench.image(name) as img:
        img.create_snap(snap)


def remove_snap(bench: Bench, name: str, snap: str) -> None:
    with bench.image(name) as img:
        img.remove_snap(snap)


def remove_image(bench: Bench, name: str) -> None:
    with bench.image(name) as img:
        for snap in list(img.list_snaps()):
            img.remove_snap(str(snap["name"]))
    rbd.RBD().remove(bench.ioctx, name)


# ------------------------------------------------------------------ the commands


def ours(bench: Bench, target: Path, name: str, *, full: bool) -> list[str]:
    cmd = [sys.executable, "-m", "rbd2qcow2", "backup", "--no-progress", "--target", str(target)]
    cmd += ["--conf", str(bench.conf), *(["--full"] if full else [])]
    cmd += ["--parallel", str(bench.parallel)] if bench.parallel else []
    return [*cmd, f"{bench.pool}/{name}"]


def qemu_convert(bench: Bench, name: str, snap: str, out: Path) -> list[str]:
    source = f"rbd:{bench.pool}/{name}@{snap}:conf={bench.conf}"
    cache = ["-t", bench.qemu_cache] if bench.qemu_cache else []
    return ["qemu-img", "convert", "-W", "-m", "16", *cache, "-f", "raw", "-O", "qcow2", source, str(out)]


def export_diff(bench: Bench, name: str, from_snap: str, snap: str, out: Path) -> list[str]:
    cmd = ["rbd", "-c", str(bench.conf), "export-diff", "--no-progress", "--from-snap", from_snap]
    return [*cmd, f"{bench.pool}/{name}@{snap}", str(out)]


@dataclass
class Pair:
    """The measured runs of one operation, ours and the native tool's."""

    ours: list[Measurement] = field(default_factory=list)
    native: list[Measurement] = field(default_factory=list)
    snapshot_s: list[float] = field(default_factory=list)  # `create_snap` of the incremental rounds


def timed(bench: Bench, label: str, cmd: Sequence[str], after: Callable[[], None] = lambda: None) -> Measurement:
    """One measured command; ``after`` (not timed) cleans up, then dirty pages are synced (not timed)."""
    m = measure(cmd, bench.env, bench.log(label), bench.osd_pid)
    after()
    os.sync()
    log(f"  {label}: {m.wall:.2f} s, {m.cpu:.2f} s CPU, {m.maxrss_kib / KiB:.0f} MiB")
    return m


def discard_target(bench: Bench, target: Path, name: str) -> None:
    """Remove a full run's target and the RBD snapshot it made."""
    remove_snap(bench, name, bench.latest_point(target, name).snapshot.name)
    shutil.rmtree(target)


def alternate(bench: Bench, pair: Pair, run: int, ours_cmd: list[str], native: tuple[str, list[str], Path]) -> None:
    """Ours and the native command, ours first in even runs; run 0 (the warm-up) is not kept."""
    label, native_cmd, native_out = native
    first_ours = run % 2 == 0
    for is_ours in (first_ours, not first_ours):
        m = timed(bench, "rbd2qcow2", ours_cmd) if is_ours else timed(bench, label, native_cmd, native_out.unlink)
        if run > 0:
            (pair.ours if is_ours else pair.native).append(m)


def bench_full(bench: Bench, name: str, snap: str) -> tuple[Pair, Path]:
    """Alternating ``rbd2qcow2 backup --full`` and ``qemu-img convert``; run 0 is the warm-up.

    Every run of ours gets a fresh target; the previous one and its RBD
    snapshot are removed first.  Returns the measurements and the target of
    the last run of ours (kept: it is the base of the incremental runs).
    """
    pair, target = Pair(), bench.out / "full-0"
    native_out = bench.out / "native.qcow2"
    for run in range(bench.runs + 1):
        log(f"full backup, {'warm-up' if run == 0 else f'run {run}'}")
        if run > 0:
            discard_target(bench, target, name)
        target = bench.out / f"full-{run}"
        native = ("qemu-img-convert", qemu_convert(bench, name, snap, native_out), native_out)
        alternate(bench, pair, run, ours(bench, target, name, full=True), native)
    return pair, target


def bench_incremental(
    bench: Bench, name: str, size: int, base_snap: str, target: Path, writes: int, seed: int
) -> tuple[Pair, str]:
    """Rounds of ``writes`` new scattered writes, each backed up by both tools; round 0 is the warm-up.

    ``base_snap`` is a snapshot of ours whose content equals the latest point
    of ``target`` (no writes in between).  Per round: the writes, snapshot
    ``round-W-N``, then in alternating order ``rbd export-diff --from-snap
    <previous round's snapshot> @round-W-N`` and ``rbd2qcow2 backup`` (which
    snapshots the head, equal to ``round-W-N``, and diffs from its previous
    point's snapshot, equal to the previous round's snapshot).  Returns the
    measurements and the last round's snapshot.
    """
    pair, prev = Pair(), base_snap
    diff_out = bench.out / "native.diff"
    for run in range(bench.runs + 1):
        log(f"incremental backup, {'warm-up' if run == 0 else f'run {run}'}")
        scatter(bench, name, size, writes, seed + run)
        snap = f"round-{writes}-{run}"
        start = time.perf_counter()
        create_snap(bench, name, snap)
        pair.snapshot_s.append(time.perf_counter() - start)
        parent = bench.latest_point(target, name).id
        native = ("export-diff", export_diff(bench, name, prev, snap, diff_out), diff_out)
        alternate(bench, pair, run, ours(bench, target, name, full=False), native)
        point = bench.latest_point(target, name)
        if point.kind != "incremental" or point.parent != parent:
            raise SystemExit(f"expected an incremental point on {parent}, got {point.kind} on {point.parent}")
        remove_snap(bench, name, prev)
        prev = snap
    return pair, prev


# ---------------------------------------------------------------- correctness


def verify(bench: Bench, target: Path, name: str, snap: str) -> None:
    """``qemu-img convert`` of the latest point equals ``rbd export`` of ``snap`` (not timed)."""
    point = bench.latest_point(target, name)
    ours_raw, expected_raw = bench.work / "ours.raw", bench.work / "expected.raw"
    layer = bench.chain(target, name) / point.file
    try:
        bench.run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(layer), str(ours_raw))
        bench.run("rbd", "-c", str(bench.conf), "export", "--no-progress", f"{bench.pool}/{name}@{snap}",
                  str(expected_raw))  # fmt: skip
        differs = first_difference(ours_raw, expected_raw)
    finally:
        for path in (ours_raw, expected_raw):
            path.unlink(missing_ok=True)
    if differs is not None:
        raise SystemExit(f"WRONG RESULT: {point.kind} point {point.id} differs from {name}@{snap} at byte {differs}")
    log(f"checked: {point.kind} point {point.id} equals rbd export of {name}@{snap}")


# -------------------------------------------------------------------- the report


def report(rows: list[tuple[str, Pair, str]], memory: dict[str, list[Measurement]]) -> str:
    """The result table, the targets, the per-run numbers and where the CPU went."""
    lines = [
        f"{'operation':<34} {'ours s':>8} {'native s':>9} {'ratio':>6}  {'target (aim)':<13} "
        f"{'RSS MiB ours/native':>20} {'ours tree RSS':>13} {'CPU s ours/native':>18}"
    ]
    for label, pair, kind in rows:
        o, n = median([m.wall for m in pair.ours]), median([m.wall for m in pair.native])
        target, ratio = TARGETS[kind], o / n
        rss = f"{max_mib(pair.ours):.0f} / {max_mib(pair.native):.0f}"
        cpu = f"{median([m.cpu for m in pair.ours]):.1f} / {median([m.cpu for m in pair.native]):.1f}"
        goal = f"<={target[0]}x ({target[1]}x)" if target else "-"
        verdict = "" if target is None else "met" if ratio <= target[0] else "MISSED"
        lines.append(
            f"{label:<34} {o:>8.2f} {n:>9.2f} {ratio:>6.2f}  {goal:<13} {rss:>20} "
            f"{max_mib(pair.ours, tree=True):>10.0f} MiB {cpu:>18}  {verdict}"
        )
    lines += memory_lines(memory)
    lines += ["", load_line(rows), ""]
    for label, pair, _ in rows:
        lines.append(f"{label}: ours {fmt_runs(pair.ours)}; native {fmt_runs(pair.native)}")
        lines += cpu_lines("  ours", pair.ours[-1]) + cpu_lines("  native", pair.native[-1])
        if pair.snapshot_s:
            snap = median(pair.snapshot_s)
            lines.append(f"  creating one RBD snapshot (part of ours, not of export-diff): {snap:.2f} s")
    return "\n".join(lines)


def memory_lines(memory: dict[str, list[Measurement]]) -> list[str]:
    """Peak RSS per image size; the target: at most 200 MiB at 8 GiB, and no more than at 2 GiB.

    Peak RSS varies by some 10 % from run to run at the same size, so "no
    more" means: the 8 GiB median is not above the largest 2 GiB peak.
    """
    out = ["", f"peak RSS of `rbd2qcow2 backup --full` (target <= {MEMORY_LIMIT_MIB} MiB at 8 GiB, 8 GiB <= 2 GiB):"]
    for label, runs in memory.items():
        peaks = ", ".join(f"{m.maxrss_kib / KiB:.0f}" for m in runs)
        tree = max_mib(runs, tree=True)
        out.append(f"  {label:<20} median {median_mib(runs):4.0f} MiB (runs {peaks}; tree up to {tree:.0f} MiB)")
    if len(memory) == 2:
        small, big = memory.values()
        met = max_mib(big) <= MEMORY_LIMIT_MIB and median_mib(big) <= max_mib(small)
        verdict = f"8 GiB median {median_mib(big):.0f} MiB, max {max_mib(big):.0f}; 2 GiB max {max_mib(small):.0f}"
        out.append(f"  -> {'met' if met else 'MISSED'} ({verdict})")
    return out


def median_mib(runs: list[Measurement]) -> float:
    return median([m.maxrss_kib / KiB for m in runs])


def cpu_lines(label: str, m: Measurement) -> list[str]:
    """The busiest threads of one run (sampled every 0.1 s) and the OSD's CPU meanwhile."""
    top = sorted(m.threads.items(), key=lambda kv: -kv[1])[:6]
    osd = f", OSD {m.osd_cpu:.1f} s" if m.osd_cpu is not None else ""
    busiest = ", ".join(f"{name} {cpu:.1f}" for name, cpu in top if cpu >= 0.05) or "-"
    machine = f"machine busy {m.machine['busy']:.1f} s, others {others(m):.1f} s, steal {m.machine['steal']:.1f} s"
    lines = [f"{label} (last run) CPU {m.cpu:.1f} s in {m.wall:.1f} s{osd}; {machine}; threads: {busiest}"]
    return lines + ([f"    {m.disk_text()}"] if m.disk else [])


def load_line(rows: list[tuple[str, Pair, str]]) -> str:
    runs = [m for _, pair, _ in rows for m in pair.ours + pair.native]
    share = median([others(m) / (m.wall * (os.cpu_count() or 1)) for m in runs])
    return f"other processes used {share:.0%} of the machine's CPUs during the measured runs (median)"


# ---------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-gib", type=int, default=2, help="image size (default 2)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per tool after one warm-up (default 3)")
    p.add_argument("--memory-8g", action="store_true", help="also compare the peak RSS of a full backup of 8 GiB")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (and images on --conf)")
    p.add_argument("--conf", help="use this cluster instead of a throwaway one (the pool must exist)")
    p.add_argument("--pool", default="bench", help="pool (default: bench, created on the throwaway cluster)")
    p.add_argument("--out-dir", help="where the timed commands write (default: the scratch directory)")
    p.add_argument("--parallel", type=int, help="passed to rbd2qcow2 backup --parallel")
    p.add_argument("--seed", type=int, default=1, help="random seed of the write pattern")
    p.add_argument(
        "--qemu-img-cache",
        choices=("writeback", "none"),
        help="qemu-img convert -t: 'none' writes the output with O_DIRECT, as rbd2qcow2 does (default: qemu-img's)",
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.size_gib < 1:
        p.error("--runs and --size-gib must be at least 1")
    return args


def run_bench(bench: Bench, args: argparse.Namespace, images: list[str]) -> str:
    size, tag = args.size_gib * GiB, uuid.uuid4().hex[:6]
    name = f"bench-{args.size_gib}g-{tag}"
    images.append(name)
    create_image(bench, name, size, FILL_FRACTION, args.seed)
    create_snap(bench, name, "A")  # so that B's objects have clones, as on an image with snapshot history
    scatter(bench, name, size, SCATTER_WRITES, args.seed + 1000)
    create_snap(bench, name, "B")
    full, target = bench_full(bench, name, "B")
    verify(bench, target, name, "B")
    remove_snap(bench, name, "A")
    incremental, last = bench_incremental(bench, name, size, "B", target, SCATTER_WRITES, args.seed + 2000)
    verify(bench, target, name, last)
    unchanged, _ = bench_incremental(bench, name, size, last, target, 0, args.seed)
    memory = {f"{args.size_gib} GiB, {FILL_FRACTION:.0%} written": full.ours}
    if args.memory_8g:
        big = memory_runs(bench, f"bench-8g-{tag}", images, args.seed + 3000)
        memory[f"8 GiB, {FILL_FRACTION_8G:.0%} written"] = big
    rows = [
        (f"full, {args.size_gib} GiB ({FILL_FRACTION:.0%} written)", full, "full"),
        (f"incremental ({SCATTER_WRITES} x 64 KiB)", incremental, "incremental"),
        ("incremental, nothing changed", unchanged, "overhead"),
    ]
    return report(rows, memory)


def memory_runs(bench: Bench, name: str, images: list[str], seed: int) -> list[Measurement]:
    """``--runs`` full backups of an 8 GiB image with a quarter of its objects written, for their peak RSS."""
    images.append(name)
    create_image(bench, name, 8 * GiB, FILL_FRACTION_8G, seed)
    runs = []
    for run in range(bench.runs):
        log(f"full backup of 8 GiB, run {run + 1}")
        target = bench.out / f"full-8g-{run}"
        runs.append(timed(bench, "rbd2qcow2", ours(bench, target, name, full=True)))
        discard_target(bench, target, name)
    return runs


def header(args: argparse.Namespace, fs_type: str) -> str:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parallel = f", --parallel {args.parallel}" if args.parallel else ""
    return (
        f"rbd2qcow2 benchmark, {date}: {os.cpu_count()} CPUs, outputs on {fs_type}{parallel}, "
        f"medians of {args.runs} run{'s' if args.runs > 1 else ''} after 1 warm-up"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    compile_package(Path(__file__).resolve().parent.parent)
    if GNU_TIME is None:
        log("GNU time not found (Debian package 'time'): peak RSS will include this process's own RSS")
    work = Path(tempfile.mkdtemp(prefix="r2q-bench-"))
    out = Path(tempfile.mkdtemp(prefix="r2q-bench-out-", dir=args.out_dir)) if args.out_dir else work / "out"
    out.mkdir(exist_ok=True)
    images: list[str] = []
    table, fs_type = "", filesystem_type(out)
    try:
        with bench_lock(), bench_context(args, work, out) as bench:
            try:
                table = run_bench(bench, args, images)
            finally:
                if args.conf is not None and not args.keep:
                    for name in images:
                        remove_image(bench, name)
    finally:
        for path in [work] if out.is_relative_to(work) else [work, out]:
            if args.keep:
                log(f"kept {path}")
            else:
                shutil.rmtree(path, ignore_errors=True)
    print(f"{header(args, fs_type)}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
