"""Benchmark ``rbd2qcow2 run`` on a pool of many small images against ``rbd export-diff`` of each in turn.

The issue's target: a pool of 40 images of 256 MiB with 5 % changed in each;
an incremental ``run`` with ``jobs = 4`` takes at most 1.0x (aim: 0.5x) the
time of ``rbd export-diff`` run for each image one after another.  It also
measures the per-image fixed costs (connect, snapshot, qemu, checks) that
dominate small images, and attributes them with an instrumented run.  See
``bench/README.md`` for what it measures and ``docs/benchmarks.md`` for the latest figures.

    flock /tmp/r2q-bench.lock .venv/bin/python bench/bench_pool.py
        [--images 40] [--size-mib 256] [--jobs 4] [--rounds 3] [--job-variants 1,2,8] [--no-profile] [--keep]

The script takes an exclusive ``flock`` on ``/tmp/r2q-bench.lock`` itself
(or uses the one inherited from ``flock(1)``), so that only one benchmark
measures on the machine at a time.  It starts a throwaway one-OSD cluster and
stops it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from benchlib import GNU_TIME, KiB, MiB, bench_lock, compile_package, log, median
from poollib import (
    CHANGE_FRACTION,
    FILL_FRACTION,
    REPO,
    TARGET,
    Bench,
    Measurement,
    bench_context,
    change,
    check_content,
    check_summary,
    create_images,
    qemu_img_costs,
    remove_snap_all,
    snap_all,
    startup_costs,
)
from poolprofile import breakdown, profile_child

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
