"""What the benchmarks share: timing a process tree, reading /proc, the lock that lets one measure at a time.

Imported by ``bench_backup.py``, ``bench_chain.py`` and ``bench_pool.py``
(run as scripts, this directory is first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SAMPLE_INTERVAL = 0.1
LOCK_PATH = Path("/tmp/r2q-bench.lock")  # shared by the benchmarks of this repository: one measures at a time
GNU_TIME = shutil.which("time")  # /usr/bin/time, Debian package "time"
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // KiB
TICKS = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ /proc


def proc_stat(path: Path) -> tuple[str, list[str]]:
    """``comm`` and the fields after it (``fields[0]`` is the state) of a /proc stat file."""
    text = path.read_text()
    return text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, ``root`` first."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(proc_stat(Path(entry.path, "stat"))[1][1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def cpu_of(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far; None if there is none."""
    if pid is None:
        return None
    try:
        fields = proc_stat(Path(f"/proc/{pid}/stat"))[1]
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine() -> dict[str, float]:
    """Seconds of all CPUs since boot from /proc/stat: busy, idle, iowait and steal (by the hypervisor)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) / TICKS for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return {"busy": user + nice + system + irq + softirq, "idle": idle, "iowait": iowait, "steal": steal}


def disks() -> dict[str, float]:
    """Whole disks together, since boot (/proc/diskstats): MiB read and written, and seconds the busiest was busy.

    Partitions, loop, RAM and device-mapper devices are left out, so nothing
    is counted twice.
    """
    whole = {
        entry.name
        for entry in os.scandir("/sys/block")
        if not entry.name.startswith(("loop", "ram", "zram", "dm-", "md", "nbd"))
    }
    read = written = busy = 0.0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if len(fields) < 14 or fields[2] not in whole:
            continue
        read += int(fields[5]) * 512 / MiB
        written += int(fields[9]) * 512 / MiB
        busy = max(busy, int(fields[12]) / 1000)
    return {"read_mib": read, "written_mib": written, "busy": busy}


def disk_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after}


class TreeSampler(threading.Thread):
    """Samples the summed RSS of a process and its descendants every 0.1 s, and (``threads``) each thread's CPU."""

    def __init__(self, root: int, *, skip_root: bool, threads: bool = True) -> None:
        super().__init__(name="sampler", daemon=True)
        self.root = root
        self.skip_root = skip_root
        self.threads = threads
        self.peak_rss_kib = 0
        self._cpu: dict[tuple[int, int], tuple[str, float]] = {}
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(SAMPLE_INTERVAL)

    def stop(self) -> dict[str, float]:
        """Stop sampling; CPU seconds per ``process/thread`` (empty without ``threads``)."""
        self._stop_event.set()
        self.join()
        out: dict[str, float] = {}
        for name, cpu in self._cpu.values():
            out[name] = out.get(name, 0.0) + cpu
        return out

    def sample(self) -> None:
        rss = 0
        for pid in descendants(self.root)[1 if self.skip_root else 0 :]:
            with contextlib.suppress(OSError, ValueError, IndexError):
                rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
                if self.threads:
                    self._sample_threads(pid)
        self.peak_rss_kib = max(self.peak_rss_kib, rss)

    def _sample_threads(self, pid: int) -> None:
        proc = proc_stat(Path(f"/proc/{pid}/stat"))[0]
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                tid = int(task.name)
                comm, fields = proc_stat(task / "stat")
                name = f"{proc}/{'main' if tid == pid else comm}"
                self._cpu[(pid, tid)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)


# --------------------------------------------------------------- one process timed


@dataclass
class Measurement:
    """One process run: wall seconds, CPU seconds, peak RSS (KiB), where the CPU went."""

    wall: float
    cpu: float
    maxrss_kib: int  # ru_maxrss (through GNU time): the largest single process of the tree
    tree_rss_kib: int  # sampled peak of the summed RSS of the child and its descendants
    threads: dict[str, float] = field(default_factory=dict)  # "process/thread" -> CPU seconds (sampled)
    osd_cpu: float | None = None  # CPU seconds of the throwaway cluster's OSD meanwhile
    machine: dict[str, float] = field(default_factory=dict)  # whole machine meanwhile: busy, idle, iowait, steal
    # The disks meanwhile (the OSD's reads and writes too), then what an os.sync() right after it wrote and took.
    disk: dict[str, float] = field(default_factory=dict)  # read_mib, written_mib, busy (s)
    sync_s: float = 0.0
    sync_written_mib: float = 0.0

    def disk_text(self) -> str:
        """One line: the disks during the run, and the writeback the command left behind."""
        if not self.disk:
            return ""
        d = self.disk
        return (
            f"disk read {d['read_mib']:.0f} MiB, wrote {d['written_mib']:.0f} MiB, busy {d['busy']:.1f} s;"
            f" left to sync afterwards {self.sync_written_mib:.0f} MiB in {self.sync_s:.2f} s"
        )


def launcher(rss_file: Path) -> list[str]:
    """GNU time writing the peak RSS (``%M``) of what it runs to ``rss_file``; nothing where it is missing.

    A command spawned straight from a benchmark (librados, ~100 MiB) would
    never report less than the benchmark's own RSS: on Linux a child's
    ru_maxrss also counts the RSS of the process that forked it (the kernel
    records the pre-exec mm's high-water mark at exec).
    """
    return [GNU_TIME, "-f", "%M", "-o", str(rss_file)] if GNU_TIME else []


def measure(cmd: Sequence[str], env: dict[str, str], log_path: Path, osd_pid: int | None) -> Measurement:
    """Run ``cmd`` to completion; wall time around the whole process, rusage by wait4, peak RSS by GNU time.

    Then (not timed) ``os.sync()``, measured: what the command left in the
    page cache for the disk (qemu-img and ``rbd export-diff`` leave their
    output there; rbd2qcow2 fsyncs before it exits).
    """
    osd_before, machine_before, disk_before = cpu_of(osd_pid), machine(), disks()
    rss_file = log_path.with_suffix(".rss")
    prefix = launcher(rss_file)
    with open(log_path, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*prefix, *cmd], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env
        )
        sampler = TreeSampler(proc.pid, skip_root=bool(prefix))
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    threads = sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    osd_after, machine_after, disk_after = cpu_of(osd_pid), machine(), disks()
    sync_start = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - sync_start
    synced = disk_delta(disk_after, disks())
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return Measurement(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        maxrss_kib=int(rss_file.read_text().split()[-1]) if prefix else usage.ru_maxrss,
        tree_rss_kib=sampler.peak_rss_kib,
        threads=threads,
        osd_cpu=None if osd_before is None or osd_after is None else osd_after - osd_before,
        machine={key: machine_after[key] - machine_before[key] for key in machine_after},
        disk=disk_delta(disk_before, disk_after),
        sync_s=sync_s,
        sync_written_mib=synced["written_mib"],
    )


def first_difference(a: Path, b: Path) -> int | None:
    """Offset of the first differing byte (or of the shorter file's end), None if equal."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                diffs = (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q)
                return offset + next(diffs, min(len(x), len(y)))
            if not x:
                return None
            offset += len(x)


# ------------------------------------------------------------ one benchmark at a time


@contextlib.contextmanager
def bench_lock(path: Path = LOCK_PATH) -> Iterator[None]:
    """Hold the benchmarks' lock (flock) on ``path`` while the block runs.

    Under ``flock PATH python bench_X.py`` the lock is already held by
    flock(1), our ancestor: locking the same path through a new open file
    would wait for ever.  flock(1) passes its descriptor on (unless ``-o``),
    and flock() on that same open file returns at once; without it, a lock
    held by an ancestor process (``/proc/locks``) counts as ours.
    """
    inherited = _inherited_fd(path)
    if inherited is not None:
        fcntl.flock(inherited, fcntl.LOCK_EX)  # same open file description as flock(1)'s: never waits
        log(f"lock {path}: held by the flock(1) this runs under")
        yield  # never unlock it: that would release flock(1)'s lock
        return
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = _lock_holders(fd)
            if holders & set(_ancestors()):
                log(f"lock {path}: held by an ancestor process ({sorted(holders)}), taken as ours")
                yield
                return
            log(f"lock {path}: held by pid {', '.join(map(str, sorted(holders))) or '?'}; waiting")
            start = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log(f"lock {path}: got it after {time.monotonic() - start:.0f} s")
        else:
            log(f"lock {path}: taken")
        yield
    finally:
        os.close(fd)  # releases the lock if this open file holds it


def _inherited_fd(path: Path) -> int | None:
    want = path.stat() if path.exists() else None
    if want is None:
        return None
    for entry in os.scandir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(int(entry.name))
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                return int(entry.name)
    return None


def _lock_holders(fd: int) -> set[int]:
    """PIDs that /proc/locks shows holding a FLOCK on the file open as ``fd``."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and "->" not in fields:
            holders.add(int(fields[4]))
    return holders


def _ancestors() -> list[int]:
    pids, pid = [], os.getppid()
    while pid > 1:
        pids.append(pid)
        try:
            pid = int(proc_stat(Path(f"/proc/{pid}/stat"))[1][1])
        except (OSError, ValueError, IndexError):
            break
    return pids


# ------------------------------------------------------------------ reporting, set-up


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def max_mib(runs: list[Measurement], tree: bool = False) -> float:
    """The largest peak RSS of the runs in MiB: of one process, or (``tree``) of the sampled tree."""
    return max(m.tree_rss_kib if tree else m.maxrss_kib for m in runs) / KiB


def fmt_runs(runs: list[Measurement]) -> str:
    return ", ".join(f"{m.wall:.2f}" for m in runs) + " s"


def others(m: Measurement) -> float:
    """CPU seconds that other processes (not the command, not the OSD) used on the machine meanwhile."""
    return max(0.0, m.machine["busy"] - m.cpu - (m.osd_cpu or 0.0))


def filesystem_type(path: Path) -> str:
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False)
    return proc.stdout.strip() or "?"


def compile_package(repo: Path) -> None:
    """Byte-compile the package first, as ``pip install`` does for users.

    An editable checkout run with ``PYTHONDONTWRITEBYTECODE`` set would
    otherwise compile every module in every timed run, and time the compiler
    instead of the tool.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(repo / "rbd2qcow2")], check=True)
