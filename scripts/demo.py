"""The self-contained demo: a throwaway cluster, demo images, backups, a restore."""

from __future__ import annotations

import argparse
import filecmp
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from cephcluster import CephCluster  # noqa: E402

MiB = 1 << 20
IMAGES = {"web-01": 256 * MiB, "db 02 (ünïcode)": 128 * MiB, "-scratch": 64 * MiB}


def step(text: str) -> None:
    print(f"\n=== {text}", file=sys.stderr, flush=True)


def run(*args: str, env: dict[str, str], capture: bool = False) -> str:
    print("$ " + " ".join(repr(a) if " " in a else a for a in args), file=sys.stderr, flush=True)
    proc = subprocess.run(list(args), env=env, check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return proc.stdout or ""


def scribble(env: dict[str, str], pool: str, name: str, size: int, rng: random.Random, writes: int) -> None:
    """Random 1 MiB writes into an image."""
    import rados
    import rbd

    with (
        rados.Rados(conffile=env["CEPH_CONF"]) as cluster,
        cluster.open_ioctx(pool) as ioctx,
        rbd.Image(ioctx, name) as img,
    ):
        for _ in range(writes):
            img.write(rng.randbytes(MiB), rng.randrange(0, size // MiB) * MiB)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, help="where the target (and cluster) go; default: a temp dir")
    parser.add_argument("--keep-cluster", action="store_true", help="leave the cluster running at the end")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="rbd2qcow2-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    cluster = CephCluster(Path(tempfile.mkdtemp(prefix="r2q-demo-")) / "c", osd_size_gib=16)
    step("starting a throwaway Ceph cluster (one mon, one OSD, loopback only)")
    cluster.start()
    env = cluster.env()
    rbd2qcow2 = [sys.executable, "-m", "rbd2qcow2"]
    target = work / "backups"
    rng = random.Random(42)
    try:
        cluster.create_pool("demo")
        step("creating demo images with data")
        for name, size in IMAGES.items():
            run("rbd", "create", "--size", f"{size // MiB}M", f"demo/{name}", env=env)
            scribble(env, "demo", name, size, rng, writes=size // MiB // 2)
        step("full backup of the whole pool")
        run(*rbd2qcow2, "backup", "--target", str(target), "demo", env=env)
        step("changing some data, then an incremental backup")
        for name, size in IMAGES.items():
            scribble(env, "demo", name, size, rng, writes=8)
        points = run(*rbd2qcow2, "backup", "--target", str(target), "demo", env=env, capture=True).splitlines()
        print("\n".join(points))
        step("the chains")
        run(*rbd2qcow2, "list", "--target", str(target), env=env)
        step("verifying every point against the checksums recorded while writing")
        run(*rbd2qcow2, "verify", "--target", str(target), "--deep", env=env)
        step("restoring the newest point of demo/web-01, compared with rbd export of its snapshot")
        ref = next(p for p in points if p.startswith("demo/web-01@"))
        point = ref.split("@", 1)[1]
        restored, expected, plain = work / "web-01.raw", work / "web-01.expected", work / "web-01.qemu-img.raw"
        run(*rbd2qcow2, "restore", "--target", str(target), ref, "--to", str(restored), env=env)
        layer = target / "demo" / "web-01" / f"{point}.qcow2"
        run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(layer), str(plain), env=env)  # no rbd2qcow2 needed
        snap = f"demo/web-01@{_snapshot_of(target, point)}"
        run("rbd", "export", "--no-progress", snap, str(expected), env=env)
        same = filecmp.cmp(restored, expected, shallow=False) and filecmp.cmp(plain, expected, shallow=False)
        print(f"\nrestored {ref}: {'identical to' if same else 'DIFFERENT FROM'} rbd export of {snap}")
        run(*rbd2qcow2, "restore", "--target", str(target), ref, "--to", "rbd:demo/web-01-restored", env=env)
        step("usage")
        run(*rbd2qcow2, "du", "--target", str(target), env=env)
        for path in (restored, expected, plain):
            os.unlink(path)
        print(f"backups kept in {target}", file=sys.stderr)
        return 0 if same else 1
    finally:
        if args.keep_cluster:
            cluster.detach()
            print(f"cluster left running: CEPH_CONF={cluster.conf}", file=sys.stderr)
        else:
            step("stopping the cluster")
            cluster.stop()
            shutil.rmtree(cluster.base_dir.parent, ignore_errors=True)


def _snapshot_of(target: Path, point: str) -> str:
    from rbd2qcow2.store import manifest

    m = manifest.load(target / "demo" / "web-01")
    assert m is not None
    return m.point(point).snapshot.name


if __name__ == "__main__":
    sys.exit(main())
