"""Test helpers: RBD workloads, the content oracle, running the CLI."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rados
import rbd

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
FEATURE_SETS = {
    "layering": rbd.RBD_FEATURE_LAYERING,
    "fast-diff": (
        rbd.RBD_FEATURE_LAYERING
        | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
        | rbd.RBD_FEATURE_OBJECT_MAP
        | rbd.RBD_FEATURE_FAST_DIFF
    ),
}


class Ceph:
    """A connection to the test cluster and its session pool."""

    def __init__(self, conf: Path, pool: str) -> None:
        self.conf = conf
        self.pool = pool
        self.rados = rados.Rados(conffile=str(conf))
        self.rados.connect()
        self.ioctx = self.rados.open_ioctx(pool)

    def __enter__(self) -> Ceph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.ioctx.close()
        self.rados.shutdown()

    def create(self, name: str, size: int, features: str = "layering") -> None:
        rbd.RBD().create(self.ioctx, name, size, old_format=False, features=FEATURE_SETS[features])

    def image(self, name: str, snapshot: str | None = None) -> rbd.Image:
        return rbd.Image(self.ioctx, name, snapshot=snapshot)

    def remove(self, name: str) -> None:
        with self.image(name) as img:
            for s in list(img.list_snaps()):
                img.remove_snap(s["name"])
        rbd.RBD().remove(self.ioctx, name)

    def snapshots(self, name: str) -> list[str]:
        with self.image(name) as img:
            return [str(s["name"]) for s in img.list_snaps()]

    def export(self, name: str, snapshot: str, out: Path) -> Path:
        """The oracle: ``rbd export`` of a snapshot."""
        subprocess.run(
            ["rbd", "-c", str(self.conf), "export", "--no-progress", f"{self.pool}/{name}@{snapshot}", str(out)],
            check=True,
            capture_output=True,
        )
        return out


@dataclass
class Workload:
    """Random writes, discards, zero-writes and resizes, reproducible by seed."""

    seed: int
    block: int = 64 * 1024

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def data(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def run(self, img: rbd.Image, ops: int = 20, lo: int = 0) -> None:
        """``ops`` random operations on ``[lo, size)``."""
        size = img.size()
        for _ in range(ops):
            kind = self.rng.choice(["write", "write", "write", "small", "discard", "zero"])
            length = self.rng.choice([4096, 65536, 300_000, 1 * MiB, 5 * MiB])
            length = min(length, size - lo)
            offset = self.rng.randrange(lo, max(lo + 1, size - length))
            if kind == "write":
                img.write(self.data(length), offset)
            elif kind == "small":
                img.write(self.data(512), self.rng.randrange(lo, size - 512))
            elif kind == "discard":
                img.discard(offset, length)
            else:
                img.write_zeroes(offset, length)


def run_cli(*args: str, env: dict[str, str] | None = None, check: bool = False, timeout: float = 600) -> Any:
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "rbd2qcow2", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"rbd2qcow2 {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def qcow2_to_raw(layer: Path, out: Path) -> Path:
    """What a user runs anywhere: qemu-img convert of a point (its chain follows)."""
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(layer), str(out)], check=True)
    return out


def assert_same_content(actual: Path, expected: Path) -> None:
    """Byte-for-byte comparison; names the first differing offset."""
    a_size, e_size = actual.stat().st_size, expected.stat().st_size
    assert a_size == e_size, f"{actual} is {a_size} bytes, expected {e_size}"
    with open(actual, "rb") as fa, open(expected, "rb") as fe:
        offset = 0
        while True:
            a, e = fa.read(MiB), fe.read(MiB)
            if a != e:
                for i, (x, y) in enumerate(zip(a, e, strict=False)):
                    if x != y:
                        raise AssertionError(f"{actual} differs from {expected} at byte {offset + i}")
                raise AssertionError(f"{actual} differs from {expected} near {offset}")
            if not a:
                return
            offset += len(a)
