"""Fault tier: SIGKILL at random moments of every operation, each followed by the next normal run.

Each loop kills the CLI (or, a quarter of the time, its qemu-storage-daemon)
after a delay drawn from a seeded generator over the time an uncut run of
that operation takes, then checks: every point committed before the kill
restores byte for byte equal to ``rbd export`` of its snapshot, none is
flagged damaged, nothing outside the target and the destination was
written, and the next normal run succeeds (incrementally where the base
still exists).  ``RBD2QCOW2_FAULT_SEED`` replays a run; ``RBD2QCOW2_FAULT_KILLS``
changes the number of kills per operation (50).
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faultlib as fl
import pytest
import rbd
from helpers import Ceph, MiB

from rbd2qcow2.store import manifest as mf

pytestmark = [pytest.mark.faults, pytest.mark.ceph]

SIZE = 8 * MiB
EXTENT = 64 * 1024


@dataclass
class Ctx:
    ceph: Ceph
    name: str
    oracle: fl.Oracle
    box: fl.Sandbox
    target: Path
    rng: random.Random
    outcomes: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    @property
    def spec(self) -> str:
        return f"{self.ceph.pool}/{self.name}"

    def cli(self, *args: str) -> list[str]:
        return [args[0], "--target", str(self.target), *args[1:]]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return fl.run(self.cli(*args), self.box.env)

    def touch(self) -> None:
        """A few changed extents, sometimes a discard: a small incremental."""
        with self.ceph.image(self.name) as img:
            for _ in range(self.rng.randint(1, 3)):
                img.write(self.rng.randbytes(EXTENT), self.rng.randrange(0, SIZE // EXTENT) * EXTENT)
            if self.rng.random() < 0.3:
                img.discard(self.rng.randrange(0, SIZE // EXTENT) * EXTENT, EXTENT)

    def backup(self, *extra: str) -> str:
        """An uncut backup of new content; returns the new point's id."""
        self.touch()
        digest = self.oracle.current()
        proc = self.run("backup", "--no-progress", *extra, self.spec)
        assert proc.returncode == 0, proc.stderr
        new = self.oracle.adopt(digest)
        assert len(new) == 1, new
        return new[0]

    def kill(self, args: list[str], seconds: float) -> fl.Outcome:
        proc = fl.start_cli(self.cli(*args), self.box.env)
        out = fl.kill_after(proc, self.rng.uniform(0, seconds), self.rng)
        fl.clear_dead_watchers(self.ceph, self.name)
        self.outcomes[f"killed {out.killed}" if out.killed else f"finished first (exit {out.returncode})"] += 1
        if out.killed == "qemu-storage-daemon" and out.returncode not in (74, 65, 0):
            self.violations.append(f"daemon killed: CLI exited {out.returncode}: {out.stderr[-300:]}")
        if "Traceback" in out.stderr:
            self.violations.append(f"traceback after a kill: {out.stderr[-500:]}")
        if out.lingered:
            self.violations.append("a qemu-storage-daemon outlived the killed CLI")
        return out

    def check(self, when: str, dropping: frozenset[str] | set[str] = frozenset()) -> None:
        for p in self.oracle.problems(dropping) + self.box.problems():
            self.violations.append(f"{when}: {p}")

    def report(self, operation: str, kills: int) -> None:
        self.violations += self.oracle.cross_check()
        stuck = self.oracle.unrestorable_while_pending
        if stuck:
            fl.TABLE.add(
                "SIGKILL at a random moment",
                operation,
                f"a kept point could not be restored while the killed merge was pending ({stuck} checks)",
                "known defect",
            )
        outcome = ", ".join(f"{n} {what}" for what, n in sorted(self.outcomes.items()))
        ok = not self.violations
        fl.TABLE.add(f"SIGKILL at a random moment (x{kills})", operation, outcome, ok)
        assert ok, f"seed {fl.seed()}: " + "\n".join(self.violations[:20])


@pytest.fixture
def ctx(ceph: Ceph, image_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Ctx:
    ceph.create(image_name, SIZE)
    rng = fl.rng_for(request.node.name)
    with ceph.image(image_name) as img:
        img.write(rng.randbytes(SIZE // 2), 0)
    box = fl.Sandbox(tmp_path)
    box.allow("target", "oracle", "dest")
    target = tmp_path / "target"
    c = Ctx(ceph, image_name, fl.Oracle(ceph, image_name, target, tmp_path / "oracle"), box, target, rng)
    c.backup()
    print(f"fault seed {fl.seed()} (replay with {fl.SEED_ENV}={fl.seed()})")
    return c


def base_usable(c: Ctx) -> bool:
    """The newest point can be the base of an incremental: its snapshot and layer exist, not flagged."""
    m = c.oracle.manifest()
    latest = m.latest
    if latest is None or "damaged" in latest.flags or m.pending is not None:
        return latest is not None and "damaged" not in latest.flags
    return latest.snapshot.name in c.ceph.snapshots(c.name) and (c.oracle.directory / latest.file).exists()


def trim(c: Ctx, keep: int = 3) -> None:
    """Keep the chain short between faults, so each check restores only a few points."""
    m = c.oracle.manifest()
    if len(m.points) > keep:
        proc = c.run("prune", "--keep-last", str(keep))
        assert proc.returncode == 0, proc.stderr
        c.oracle.forget_missing()


def backup_loop(c: Ctx, extra: tuple[str, ...], operation: str) -> None:
    args = ["backup", "--no-progress", *extra, c.spec]
    c.touch()
    digest = c.oracle.current()
    seconds = fl.timed(c.cli(*args), c.box.env)
    c.oracle.adopt(digest)
    n = fl.kills()
    for i in range(n):
        c.touch()
        digest = c.oracle.current()
        c.kill(args, seconds)
        c.oracle.adopt(digest)  # a kill after the commit made a point of this content
        c.check(f"after kill {i}")
        incremental = not extra and base_usable(c)
        proc = c.run(*args)
        if proc.returncode != 0:
            c.violations.append(f"run after kill {i} exited {proc.returncode}: {proc.stderr[-400:]}")
            continue
        new = c.oracle.adopt(digest)
        latest = c.oracle.manifest().latest
        assert latest is not None
        if incremental and latest.kind != "incremental":
            c.violations.append(f"run after kill {i} made a {latest.kind} point although the base was usable")
        if new and c.oracle.restored(new[-1]) != digest:
            c.violations.append(f"point {new[-1]} of the run after kill {i} differs from its snapshot")
        trim(c)
    c.check("at the end")
    c.report(operation, n)


def test_kill_full_backup(ctx: Ctx) -> None:
    backup_loop(ctx, ("--full",), "backup (full)")


def test_kill_incremental_backup(ctx: Ctx) -> None:
    backup_loop(ctx, (), "backup (incremental)")


def _drop_loop(c: Ctx, operation: str, plan: Callable[[mf.Manifest], tuple[list[str], set[str]]]) -> None:
    """Kill a prune or delete; the next normal run finishes it.  ``plan`` gives the command and what it drops."""
    while len(c.oracle.manifest().points) < 5:
        c.backup()
    args, _ = plan(c.oracle.manifest())
    seconds = fl.timed(c.cli(*args), c.box.env)
    c.oracle.forget_missing()
    n = fl.kills()
    for i in range(n):
        while len(c.oracle.manifest().points) < 4:
            c.backup()
        args, dropping = plan(c.oracle.manifest())
        c.kill(args, seconds)
        c.check(f"after kill {i}", dropping)
        # The next normal run: the same command again where it can still be given, else a backup,
        # which finishes a pending merge first.
        m = c.oracle.manifest()
        if m.pending is None and dropping <= {p.id for p in m.points}:
            proc = c.run(*args)
        else:
            c.touch()
            digest = c.oracle.current()
            proc = c.run("backup", "--no-progress", c.spec)
            c.oracle.adopt(digest)
        if proc.returncode != 0:
            c.violations.append(f"run after kill {i} exited {proc.returncode}: {proc.stderr[-400:]}")
        m = c.oracle.manifest()
        if m.pending is not None:
            c.violations.append(f"a merge still pending after the run that follows kill {i}")
        c.check(f"after the run that follows kill {i}", dropping)
    c.report(operation, n)


def test_kill_prune(ctx: Ctx) -> None:
    def plan(m: mf.Manifest) -> tuple[list[str], set[str]]:
        return ["prune", "--keep-last", "3"], {p.id for p in m.points[:-3]}

    _drop_loop(ctx, "prune", plan)


def test_kill_delete(ctx: Ctx) -> None:
    def plan(m: mf.Manifest) -> tuple[list[str], set[str]]:
        # The oldest point merges by commit into its child's layer, a middle one by copy.
        victim = m.points[0] if ctx.rng.random() < 0.5 else m.points[1]
        return ["delete", f"{ctx.spec}@{victim.id}"], {victim.id}

    _drop_loop(ctx, "delete", plan)


def test_kill_restore_file(ctx: Ctx) -> None:
    c = ctx
    point = c.backup()
    dest = c.box.root / "dest"
    dest.mkdir()
    out = dest / "restored.raw"
    args = ["restore", f"{c.spec}@{point}", "--to", str(out)]
    seconds = fl.timed(c.cli(*args), c.box.env)
    n = fl.kills()
    for i in range(n):
        out.unlink(missing_ok=True)
        before = fl.tree_hashes(c.target)
        c.kill(args, seconds)
        if fl.tree_hashes(c.target) != before:
            c.violations.append(f"kill {i}: a restore changed the target")
        if out.exists() and fl.sha256_file(out) != c.oracle.expected[point]:
            c.violations.append(f"kill {i}: a partial restore under the final name")
        stray = {p.name for p in dest.iterdir()} - {out.name, f".{out.name}.partial"}
        if stray:
            c.violations.append(f"kill {i}: unexpected files in the destination: {stray}")
        proc = c.run(*args, "--force")
        if proc.returncode != 0 or fl.sha256_file(out) != c.oracle.expected[point]:
            c.violations.append(f"restore after kill {i}: exit {proc.returncode}, content wrong or missing")
        if (dest / f".{out.name}.partial").exists():
            c.violations.append(f"restore after kill {i} left its partial file")
    c.check("at the end")
    c.report("restore (file)", n)


def rbd_exists(c: Ctx, name: str) -> bool:
    return name in rbd.RBD().list(c.ceph.ioctx)


def remove_image(c: Ctx, name: str) -> None:
    """Remove the restored image; a killed run's watch on it is cleared first (Ceph refuses while it lasts)."""
    for _ in range(20):
        if not rbd_exists(c, name):
            return
        fl.clear_dead_watchers(c.ceph, name)
        try:
            rbd.RBD().remove(c.ceph.ioctx, name)
            return
        except rbd.ImageBusy:
            time.sleep(0.5)
    raise AssertionError(f"{name} stays busy")


def digest_or_none(c: Ctx, name: str) -> str | None:
    """The image's content digest; None if it is missing or cannot be opened (a half-created image)."""
    try:
        return fl.image_digest(c.ceph, name)
    except rbd.ImageNotFound:
        return None


def test_kill_restore_rbd(ctx: Ctx) -> None:
    """Killed RBD restores: an image under the final name is either absent or complete.

    A half-written image left under its name is the open defect that
    ``test_faults_ceph.py::test_killed_rbd_restore_leaves_no_image`` asserts
    against (xfail); here it is counted and shown in the table.
    """
    c = ctx
    point = c.backup()
    dst = f"{c.name}-dst"
    args = ["restore", f"{c.spec}@{point}", "--to", f"rbd:{c.ceph.pool}/{dst}"]
    seconds = fl.timed(c.cli(*args), c.box.env)
    remove_image(c, dst)
    n = fl.kills()
    half = blocked = 0
    for i in range(n):
        before = fl.tree_hashes(c.target)
        c.kill(args, seconds)
        if fl.tree_hashes(c.target) != before:
            c.violations.append(f"kill {i}: a restore changed the target")
        left = rbd_exists(c, dst)
        if left:
            fl.clear_dead_watchers(c.ceph, dst)
            half += digest_or_none(c, dst) != c.oracle.expected[point]
        proc = c.run(*args, *(["--force"] if left else []))
        got = digest_or_none(c, dst)
        if left and proc.returncode == 66 and got is None:
            # Killed while librbd created the image: listed, yet not openable, so even --force
            # finds no image.  Part of the same open defect; removed by hand, the restore must work.
            blocked += 1
            remove_image(c, dst)
            proc = c.run(*args)
            got = digest_or_none(c, dst)
        if proc.returncode != 0 or got != c.oracle.expected[point]:
            what = "missing or unopenable" if got is None else "wrong"
            c.violations.append(f"restore after kill {i}: exit {proc.returncode}, image {what}: {proc.stderr[-300:]}")
        remove_image(c, dst)
    c.check("at the end")
    if half:
        fl.TABLE.add(
            "SIGKILL at a random moment",
            "restore (RBD)",
            f"half-written image under the final name after {half} of {n} kills"
            + (f", {blocked} of them not openable, so that even --force failed (66)" if blocked else ""),
            "known defect",
        )
    c.report("restore (RBD)", n)


def test_kill_verify(ctx: Ctx) -> None:
    c = ctx
    for _ in range(2):
        c.backup()
    args = ["verify", "--deep", "--no-progress", c.spec]
    seconds = fl.timed(c.cli(*args), c.box.env)
    n = fl.kills()
    for i in range(n):
        before = fl.tree_hashes(c.target)
        c.kill(args, seconds)
        after = fl.tree_hashes(c.target)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if [k for k in changed if Path(k).name not in ("activity.log", "lock")]:  # the lock holds its owner's pid
            c.violations.append(f"kill {i}: verify changed {changed}")
        proc = c.run(*args)
        if proc.returncode != 0:
            c.violations.append(f"verify after kill {i} exited {proc.returncode}: {proc.stdout[-300:]}")
    c.check("at the end")
    c.report("verify --deep", n)


def break_dead_claims(c: Ctx) -> int:
    """Break the claims a killed run left (as its lease would after claim_ttl); returns how many."""
    base = ["rados", "-c", str(c.ceph.conf), "-p", c.ceph.pool]
    listed = subprocess.run([*base, "ls"], capture_output=True, text=True, check=True).stdout.split()
    broken = 0
    for obj in (o for o in listed if o.startswith("rbd2qcow2_claim.")):
        info = subprocess.run(
            [*base, "lock", "info", obj, "rbd2qcow2", "--format", "json"], capture_output=True, text=True
        )
        if info.returncode != 0:
            continue
        for locker in json.loads(info.stdout).get("lockers", []):
            subprocess.run(
                [*base, "lock", "break", obj, "rbd2qcow2", locker["name"], "--lock-cookie", locker["cookie"]],
                check=True,
                capture_output=True,
            )
            broken += 1
    return broken


def test_kill_run(ctx: Ctx) -> None:
    c = ctx
    conf = c.box.root / "run.toml"
    c.box.allow("run.toml")
    conf.write_text(
        f'target = "{c.target}"\njobs = 1\nparallel = 2\nclaim_ttl = 30\n'
        f'[[clusters]]\nname = "test"\nconf = "{c.ceph.conf}"\n'
        f'[[clusters.pools]]\nname = "{c.ceph.pool}"\ninclude = ["{c.name}"]\n'
        "[retention]\nkeep_last = 3\n[verify]\nstructure = true\n"
    )
    args = ["run", "--config", str(conf), "--json"]
    c.touch()
    digest = c.oracle.current()
    seconds = fl.timed(args, c.box.env)
    c.oracle.adopt(digest)
    n = fl.kills()
    claims = 0
    for i in range(n):
        c.touch()
        digest = c.oracle.current()
        ids = [p.id for p in c.oracle.manifest().points]
        proc = fl.start_cli(args, c.box.env)
        out = fl.kill_after(proc, c.rng.uniform(0, seconds), c.rng)
        fl.clear_dead_watchers(c.ceph, c.name)
        c.outcomes[f"killed {out.killed}" if out.killed else f"finished first (exit {out.returncode})"] += 1
        if out.lingered:
            c.violations.append("a qemu-storage-daemon outlived the killed CLI")
        c.oracle.adopt(digest)
        dropping = set(ids[:-2])  # keep_last 3 keeps the two newest and the run's new point
        c.check(f"after kill {i}", dropping)
        rec = fl.run(args, c.box.env)
        report = json.loads(rec.stdout) if rec.stdout else {"images": []}
        if any(im["status"] == "skipped" for im in report["images"]):
            # The killed run's claim holds until its lease ends: documented, and shown in the table.
            claims += break_dead_claims(c)
            rec = fl.run(args, c.box.env)
        if rec.returncode != 0:
            c.violations.append(f"run after kill {i} exited {rec.returncode}: {rec.stderr[-400:]}")
        c.oracle.adopt(digest)
        c.check(f"after the run that follows kill {i}", set(c.oracle.expected))
    if claims:
        c.outcomes["next run skipped the image: the dead run's claim held until broken by hand"] = claims
    c.report("run", n)
