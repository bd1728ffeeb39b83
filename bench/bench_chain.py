"""Benchmark restore, merge and deep verify of a 10-point chain against the native tools.

One image, backed up into a chain of ten points (one full backup, then nine
rounds of scattered writes and an incremental backup each).  Then, side by
side with the native tool (alternating order, one warm-up, median of
``--runs``):

1. ``rbd2qcow2 restore --to rbd:`` of the newest point against
   ``qemu-img convert`` into RBD and against ``rbd import`` of a raw file;
2. ``rbd2qcow2 restore --to FILE`` against ``qemu-img convert -O raw``;
3. ``rbd2qcow2 delete`` of the second newest point (a merge of one layer)
   against ``qemu-img convert -O qcow2`` of that point;
4. ``rbd2qcow2 verify --deep`` of the newest point against
   ``qemu-img convert`` of it into qemu's ``null-co`` driver.

Every command is measured as a whole process (wall time, CPU time and peak
RSS); every result is checked once (not timed) against ``rbd export`` of the
newest point's snapshot.  See ``bench/README.md``.

    flock /tmp/r2q-bench.lock .venv/bin/python bench/bench_chain.py [--size-gib 2] [--runs 3] [--keep]

The script also takes that lock itself (``--lock``) for its whole run, so
that only one benchmark measures at a time however it is started.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchlib import (
    GNU_TIME,
    LOCK_PATH,
    GiB,
    KiB,
    Measurement,
    MiB,
    bench_lock,
    compile_package,
    cpu_of,
    filesystem_type,
    fmt_runs,
    log,
    max_mib,
    measure,
    median,
    others,
)
from chainlib import (
    QEMU_FAST,
    REPO,
    SETTLE_BUSY_CPU,
    SETTLE_MAX_S,
    Bench,
    Chain,
    bench_context,
    build_chain,
    check_equal,
    check_point,
    check_rbd_image,
    remove_image,
)

from rbd2qcow2.store import manifest as mf

# ------------------------------------------------------------------ running side by side


def nothing() -> None:
    pass


@dataclass
class Tool:
    """One side of a comparison: a command and its untimed preparation, check and clean-up."""

    name: str
    cmd: list[str]
    before: Callable[[], None] = nothing  # e.g. a fresh copy of the chain
    check: Callable[[], None] | None = None  # once, after the warm-up run
    after: Callable[[], None] = nothing  # e.g. remove the new image


def settle(bench: Bench) -> None:
    """Before a measured command: sync, then wait (up to 20 s) until the OSD is idle (not timed).

    Removing a restored image leaves the OSD deleting objects for a while;
    that work must not land in the next command's time.
    """
    os.sync()
    if bench.osd_pid is None:
        return
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        before = cpu_of(bench.osd_pid)
        time.sleep(0.5)
        after = cpu_of(bench.osd_pid)
        if before is None or after is None or after - before < SETTLE_BUSY_CPU:
            return
    log(f"  the OSD was still busy after {SETTLE_MAX_S:.0f} s; measuring anyway")


def series(bench: Bench, title: str, tools: list[Tool]) -> dict[str, list[Measurement]]:
    """Every tool once per run, in rotating order (ours first in run 0); run 0 is a warm-up, not kept."""
    results: dict[str, list[Measurement]] = {tool.name: [] for tool in tools}
    for run in range(bench.runs + 1):
        log(f"{title}, {'warm-up' if run == 0 else f'run {run}'}")
        shift = run % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            tool.before()
            settle(bench)
            m = measure(tool.cmd, bench.env, bench.log(tool.name.split()[0]), bench.osd_pid)
            log(f"  {tool.name}: {m.wall:.2f} s, {m.cpu:.2f} s CPU, {m.maxrss_kib / KiB:.0f} MiB")
            if run == 0 and tool.check is not None:
                tool.check()
            tool.after()
            if run > 0:
                results[tool.name].append(m)
        os.sync()
    return results


# ------------------------------------------------------------------ the four comparisons


def bench_restore_rbd(bench: Bench, chain: Chain) -> dict[str, list[Measurement]]:
    """Restore of the newest point into a new RBD image: ours, qemu-img convert, rbd import."""
    names = {"ours": f"{chain.image}-r2q", "qemu": f"{chain.image}-qemu", "import": f"{chain.image}-import"}
    for name in names.values():
        bench.images.append(name)

    def tool(key: str, label: str, cmd: list[str]) -> Tool:
        name = names[key]
        return Tool(
            label,
            cmd,
            check=lambda: check_rbd_image(bench, name, chain.oracle, f"image restored by {label}"),
            after=lambda: remove_image(bench, name),
        )

    conf, newest = str(bench.conf), str(chain.file(chain.newest))
    ours = bench.rbd2qcow2("restore", "--no-progress", "--target", str(chain.target), "--conf", conf)
    ours += [chain.ref("latest"), "--to", f"rbd:{bench.pool}/{names['ours']}"]
    qemu = ["qemu-img", "convert", *QEMU_FAST, "-f", "qcow2", "-O", "raw", newest]
    qemu += [f"rbd:{bench.pool}/{names['qemu']}:conf={conf}"]
    rbd_import = ["rbd", "-c", conf, "import", "--no-progress", str(chain.raw), f"{bench.pool}/{names['import']}"]
    tools = [tool("ours", "rbd2qcow2 restore", ours), tool("qemu", "qemu-img convert", qemu)]
    return series(bench, "restore into a new RBD image", [*tools, tool("import", "rbd import", rbd_import)])


def bench_restore_file(bench: Bench, chain: Chain) -> dict[str, list[Measurement]]:
    """Restore of the newest point into a raw file: ours against qemu-img convert, without and with fsync.

    rbd2qcow2 fsyncs the file before it renames it into place; qemu-img does
    not.  The third command, ``qemu-img convert`` then ``sync FILE`` (an
    fsync), is the like-for-like one (no target: for information).
    """
    ours_out, native_out = bench.out / "restored-r2q.raw", bench.out / "restored-qemu.raw"
    synced_out = bench.out / "restored-qemu-synced.raw"
    ours = bench.rbd2qcow2("restore", "--no-progress", "--target", str(chain.target), chain.ref("latest"))
    qemu = ["qemu-img", "convert", *QEMU_FAST, "-f", "qcow2", "-O", "raw", str(chain.file(chain.newest))]
    return series(
        bench,
        "restore into a raw file",
        [
            Tool(
                "rbd2qcow2 restore",
                [*ours, "--to", str(ours_out)],
                check=lambda: check_equal(ours_out, chain.oracle, "raw file restored by rbd2qcow2"),
                after=ours_out.unlink,
            ),
            Tool(
                "qemu-img convert",
                [*qemu, str(native_out)],
                check=lambda: check_equal(native_out, chain.oracle, "raw file written by qemu-img convert"),
                after=native_out.unlink,
            ),
            Tool(
                "qemu-img convert + fsync",
                ["sh", "-c", f'{shlex.join(qemu)} "$1" && sync "$1"', "sh", str(synced_out)],
                after=synced_out.unlink,
            ),
        ],
    )


def bench_merge(bench: Bench, chain: Chain) -> dict[str, list[Measurement]]:
    """Deleting point #9 (merged into #10) in a fresh copy of the target, against rewriting #9 with qemu-img."""
    second = chain.points[-2]
    copy = bench.out / "target-copy"
    copy_dir = copy / chain.directory.relative_to(chain.target)
    native_out = bench.out / "rewritten.qcow2"

    def fresh_copy() -> None:
        shutil.rmtree(copy, ignore_errors=True)
        bench.run("cp", "-a", str(chain.target), str(copy))
        bench.run("sync")  # a chain at rest is on disk: its copy's write-back is not ours to time

    def check() -> None:
        m = mf.load(copy_dir)
        assert m is not None and m.latest is not None
        if [p.id for p in m.points] != [p.id for p in chain.points if p.id != second.id]:
            raise SystemExit(f"WRONG RESULT: after deleting {second.id} the chain is {[p.id for p in m.points]}")
        log(f"  merged layer of {m.latest.id}: {m.latest.data_bytes / MiB:.0f} MiB data, "
            f"{m.latest.stored_bytes / MiB:.0f} MiB on disk, parent {m.latest.parent}")  # fmt: skip
        check_point(copy_dir, m.latest, chain.oracle, "the newest point after the merge", bench.work)

    return series(
        bench,
        f"merge: delete point 9 of 10 ({second.id})",
        [
            Tool(
                "rbd2qcow2 delete",
                bench.rbd2qcow2("delete", "--no-progress", "--target", str(copy), chain.ref(second.id)),
                before=fresh_copy,
                check=check,
                after=lambda: shutil.rmtree(copy),
            ),
            Tool(
                "qemu-img convert",
                ["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(chain.file(second)), str(native_out)],
                after=native_out.unlink,
            ),
        ],
    )


def bench_verify(bench: Bench, chain: Chain) -> dict[str, list[Measurement]]:
    """``verify --deep`` of the newest point against qemu-img convert of it into null-co (reads only)."""
    ours = bench.rbd2qcow2("verify", "--no-progress", "--target", str(chain.target), "--deep", chain.ref("latest"))
    qemu = ["qemu-img", "convert", "-n", *QEMU_FAST, "-f", "qcow2", str(chain.file(chain.newest))]
    qemu += ["--target-image-opts", f"driver=null-co,size={chain.newest.size}"]
    tools = [Tool("rbd2qcow2 verify", ours), Tool("qemu-img convert", qemu)]
    return series(bench, "verify --deep of the newest point", tools)


# -------------------------------------------------------------------- the report


@dataclass
class Row:
    label: str
    native: str
    ours: list[Measurement]
    theirs: list[Measurement]
    limit: float | None  # None: for information, no target
    aim: float | None


def verdict(ratio: float, limit: float | None, aim: float | None) -> str:
    if limit is None:
        return "-"
    if ratio > limit:
        return "MISSED"
    return "met, aim met" if aim is not None and ratio <= aim else "met"


def report(rows: list[Row], chain: Chain) -> str:
    lines = [
        f"{'operation':<27} {'native tool':<31} {'ours s':>7} {'native s':>8} {'ratio':>6}  {'target (aim)':<14}"
        f"{'verdict':<13} {'RSS MiB ours/nat':>16} {'CPU s ours/nat':>15}"
    ]
    for row in rows:
        o, n = median([m.wall for m in row.ours]), median([m.wall for m in row.theirs])
        ratio = o / n
        goal = "-" if row.limit is None else f"<={row.limit}x" + (f" ({row.aim}x)" if row.aim is not None else "")
        rss = f"{max_mib(row.ours):.0f} / {max_mib(row.theirs):.0f}"
        cpu = f"{median([m.cpu for m in row.ours]):.1f} / {median([m.cpu for m in row.theirs]):.1f}"
        lines.append(
            f"{row.label:<27} {row.native:<31} {o:>7.2f} {n:>8.2f} {ratio:>6.2f}  {goal:<14}"
            f"{verdict(ratio, row.limit, row.aim):<13} {rss:>16} {cpu:>15}"
        )
    lines += ["", chain_line(chain), load_line(rows), ""]
    seen: set[int] = set()
    for row in rows:
        lines.append(f"{row.label} vs {row.native}: ours {fmt_runs(row.ours)}; native {fmt_runs(row.theirs)}")
        for label, runs in (("  ours", row.ours), ("  native", row.theirs)):
            if id(runs) not in seen:  # the RBD restore's runs of ours appear in two rows
                seen.add(id(runs))
                lines += cpu_lines(label, runs[-1], max(m.tree_rss_kib for m in runs) / KiB)
    return "\n".join(lines)


def chain_line(chain: Chain) -> str:
    full, incrementals = chain.points[0], chain.points[1:]
    incr = median([p.data_bytes / MiB for p in incrementals])
    return (
        f"chain: {len(chain.points)} points of a {chain.newest.size / GiB:.0f} GiB image: "
        f"full {full.data_bytes / MiB:.0f} MiB of data, incrementals {incr:.0f} MiB each (median); "
        f"the newest point reads {chain.raw.stat().st_blocks * 512 / MiB:.0f} MiB of data"
    )


def cpu_lines(label: str, m: Measurement, tree_mib: float) -> list[str]:
    """The busiest threads of one run (sampled every 0.1 s) and the OSD's CPU meanwhile."""
    top = sorted(m.threads.items(), key=lambda kv: -kv[1])[:6]
    osd = f", OSD {m.osd_cpu:.1f} s" if m.osd_cpu is not None else ""
    busiest = ", ".join(f"{name} {cpu:.1f}" for name, cpu in top if cpu >= 0.05) or "-"
    machine = f"machine busy {m.machine['busy']:.1f} s, others {others(m):.1f} s, steal {m.machine['steal']:.1f} s"
    return [
        f"{label} (last run) CPU {m.cpu:.1f} s in {m.wall:.1f} s{osd}; {machine}; tree RSS up to {tree_mib:.0f} MiB;"
        f" threads: {busiest}",
        *([f"    {m.disk_text()}"] if m.disk else []),
    ]


def load_line(rows: list[Row]) -> str:
    runs = {id(m): m for row in rows for m in row.ours + row.theirs}.values()
    share = median([others(m) / (m.wall * (os.cpu_count() or 1)) for m in runs])
    return f"other processes used {share:.0%} of the machine's CPUs during the measured runs (median)"


# ---------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--size-gib", type=int, default=2, help="image size (default 2)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per tool after one warm-up (default 3)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory (and images on --conf)")
    p.add_argument("--conf", help="use this cluster instead of a throwaway one (the pool must exist)")
    p.add_argument("--pool", default="bench", help="pool (default: bench, created on the throwaway cluster)")
    p.add_argument("--out-dir", help="where the timed commands write (default: the scratch directory)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the write pattern")
    p.add_argument("--lock", default=LOCK_PATH, help=f"the benchmarks' lock file (default {LOCK_PATH})")
    p.add_argument(
        "--only",
        choices=("restore", "merge", "verify"),
        action="append",
        help="measure only this part (repeatable; default: all)",
    )
    args = p.parse_args(argv)
    if args.runs < 1 or args.size_gib < 1:
        p.error("--runs and --size-gib must be at least 1")
    return args


def run_bench(bench: Bench, args: argparse.Namespace) -> str:
    parts = set(args.only or ("restore", "merge", "verify"))
    chain = build_chain(bench, args)
    restore, qemu, delete = "rbd2qcow2 restore", "qemu-img convert", "rbd2qcow2 delete"
    rows = []
    if "restore" in parts:
        rbd_runs = bench_restore_rbd(bench, chain)
        file_runs = bench_restore_file(bench, chain)
        rows += [
            Row("restore -> new RBD image", "qemu-img convert -O raw rbd:", rbd_runs[restore], rbd_runs[qemu], 1, 0.7),
            Row("restore -> new RBD image", "rbd import (raw file)", rbd_runs[restore], rbd_runs["rbd import"], 1.5, 1),
            Row("restore -> raw file", "qemu-img convert -O raw", file_runs[restore], file_runs[qemu], 1.2, None),
            Row(
                "restore -> raw file",
                "qemu-img convert + fsync",
                file_runs[restore],
                file_runs[f"{qemu} + fsync"],
                None,
                None,
            ),
        ]
    if "merge" in parts:
        merge_runs = bench_merge(bench, chain)
        rows.append(
            Row(
                "merge: delete point 9/10",
                "qemu-img convert -O qcow2 #9",
                merge_runs[delete],
                merge_runs[qemu],
                0.3,
                0.1,
            )
        )
    if "verify" in parts:
        verify_runs = bench_verify(bench, chain)
        rows.append(
            Row(
                "verify --deep, newest",
                "qemu-img convert -> null-co",
                verify_runs["rbd2qcow2 verify"],
                verify_runs[qemu],
                1.0,
                None,
            )
        )
    return report(rows, chain)


def code_version() -> str:
    """The commit, and whether the package had uncommitted changes (others edit it concurrently)."""

    def git(*cmd: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--", "rbd2qcow2")
    return f"{head}{' + uncommitted changes in rbd2qcow2/' if dirty else ''}"


def header(args: argparse.Namespace, fs_type: str, version: str) -> str:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"rbd2qcow2 chain benchmark, {date}: {os.cpu_count()} CPUs, outputs on {fs_type}, code {version}, "
        f"medians of {args.runs} run{'s' if args.runs > 1 else ''} after 1 warm-up"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    compile_package(REPO)
    if GNU_TIME is None:
        log("GNU time not found (Debian package 'time'): peak RSS will include this process's own RSS")
    version = code_version()
    with bench_lock(Path(args.lock)):
        work = Path(tempfile.mkdtemp(prefix="r2q-b-"))
        out = Path(tempfile.mkdtemp(prefix="r2q-b-out-", dir=args.out_dir)) if args.out_dir else work / "out"
        out.mkdir(exist_ok=True)
        table, fs_type = "", filesystem_type(out)
        try:
            with bench_context(args, work, out) as bench:
                try:
                    table = run_bench(bench, args)
                finally:
                    if args.conf is not None and not args.keep:
                        for name in bench.images:
                            if bench.image_exists(name):
                                remove_image(bench, name)
        finally:
            for path in [work] if out.is_relative_to(work) else [work, out]:
                if args.keep:
                    log(f"kept {path}")
                else:
                    shutil.rmtree(path, ignore_errors=True)
    print(f"{header(args, fs_type, version)}\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
