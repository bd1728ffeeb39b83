"""The instrumented runs of bench_pool.py: rbd2qcow2's steps timed per thread, and where its CPU went."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import TICKS, proc_stat
from poollib import Measurement

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
    ("ops.access", "chain_lock", "chain lock", "cm"),
    ("ops.access", "recover", "recover", "call"),
    ("ops.access", "remove_orphan_files", "clean orphans", "call"),
    ("ops.backup_point", "ImageBackup._clean_snapshots", "clean snapshots", "call"),
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
    ("ops.structure", "sums_problem", "checksum file sha256", "call"),
    ("ops.structure", "directory_problems", "file modes", "call"),
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
