"""Command line: argparse lives here and nowhere else."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from .. import __version__
from ..core.errors import STORAGE_ERRNOS, Cancelled, Error, UsageError, combined_exit_code, storage_error
from ..core.names import parse_spec
from ..core.retention import parse_duration
from ..ops.listing import format_table, list_points, row_dict

if TYPE_CHECKING:
    from ..adapters.ceph import CephOptions

# Modules that import the Ceph bindings (backup, ceph) are imported by the
# commands that need them, so file restores work on a machine without Ceph.

logger = logging.getLogger("rbd2qcow2")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {value}")
        return value

    return parse


_positive = _whole(1)
_nonnegative = _whole(0)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text}")
    return value


def _ceph_options(args: argparse.Namespace) -> CephOptions:
    from ..adapters.ceph import CephOptions

    return CephOptions(
        conf=args.conf, client_id=args.client_id, keyring=args.keyring, connect_timeout=args.connect_timeout
    )


def _add_ceph(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ceph")
    g.add_argument("--conf", "-c", help="ceph.conf (default: $CEPH_CONF or Ceph's search path)")
    g.add_argument("--id", dest="client_id", help="client id, as for the rbd command (default: admin)")
    g.add_argument("--keyring", help="keyring file")
    g.add_argument(
        "--connect-timeout",
        type=_positive,
        default=30,
        metavar="SECONDS",
        help="give up reaching the cluster after this",
    )


def _add_logging(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("-v", "--verbose", action="count", default=default, help="debug log output")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="errors only")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rbd2qcow2", description="Incremental backups of Ceph RBD images into qcow2 chains.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_logging(parser, None)
    # The same options after the command name; SUPPRESS keeps the top-level value when absent.
    common = _Parser(add_help=False)
    _add_logging(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    b = sub.add_parser("backup", parents=[common], help="take a new point of every selected image")
    b.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    _add_ceph(b)
    b.add_argument("--parallel", "-p", type=_positive, default=4, help="reader threads per image (default 4)")
    b.add_argument("--full", action="store_true", help="start a new full chain even if an incremental is possible")
    b.add_argument("--whole-object", action="store_true", help="diff in whole RADOS objects (librbd whole_object)")
    b.add_argument("--wait", action="store_true", help="wait for a chain locked by another run instead of failing")
    b.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    b.add_argument(
        "--check-unchanged",
        type=_fraction,
        default=0.002,
        metavar="FRACTION",
        help="compare this fraction of the regions the diff calls unchanged with the snapshot (default 0.002)",
    )
    b.add_argument("specs", nargs="+", metavar="SPEC", help="POOL, POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    b.set_defaults(func=cmd_backup)

    _add_restore_commands(sub, common)

    _add_prune_commands(sub, common)

    n = sub.add_parser("run", parents=[common], help="the nightly job: back up, prune, verify per a config file")
    n.add_argument("--config", "-C", required=True, type=Path, help="TOML configuration (see docs/operations.md)")
    n.add_argument("--json", action="store_true", help="the run summary as JSON on stdout")
    n.add_argument("--metrics", type=Path, metavar="FILE", help="write a Prometheus textfile (node_exporter)")
    n.add_argument("--check-config", action="store_true", help="only check the configuration")
    n.set_defaults(func=cmd_run)

    v = sub.add_parser("verify", parents=[common], help="check chains: structure, content, source")
    v.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    v.add_argument("--deep", action="store_true", help="read every point through its chain against its checksums")
    v.add_argument("--source", action="store_true", help="compare points whose RBD snapshot exists with it")
    v.add_argument("--sample", type=_fraction, default=1.0, metavar="FRACTION", help="part compared by --source")
    v.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    v.add_argument("--parallel", "-p", type=_positive, default=4, help="reader threads (default 4)")
    v.add_argument("--wait", action="store_true", help="wait for chains locked by a backup or prune instead of failing")
    v.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    _add_ceph(v)
    v.add_argument("specs", nargs="*", metavar="SPEC|POINT", help="pools, images, or POOL/IMAGE@POINT")
    v.set_defaults(func=cmd_verify)

    ls = sub.add_parser("list", parents=[common], help="chains and their points, oldest first")
    ls.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("specs", nargs="*", metavar="SPEC", help="only these pools or images")
    ls.set_defaults(func=cmd_list)

    _add_usage_command(sub, common)
    _add_repair_command(sub, common)
    return parser


def _add_repair_command(sub: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    r = sub.add_parser("repair", parents=[common], help="rebuild a chain's manifest from its layer files")
    r.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    r.add_argument("--offline", action="store_true", help="do not ask the cluster for the snapshots")
    r.add_argument("--force", action="store_true", help="rebuild even a valid manifest (it is kept aside)")
    r.add_argument("--wait", action="store_true", help="wait for a locked chain")
    _add_ceph(r)
    r.add_argument("spec", metavar="SPEC", help="POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    r.set_defaults(func=cmd_repair)


def cmd_repair(args: argparse.Namespace) -> int:
    from ..ops.repair import RepairOptions, repair

    opts = RepairOptions(
        target=args.target,
        ceph=None if args.offline else _ceph_options(args),
        force=args.force,
        wait=args.wait,
    )
    for line in repair(args.spec, opts).lines():
        print(line)
    return 0


def _add_usage_command(sub: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    du = sub.add_parser("du", parents=[common], help="bytes stored per image, per pool and in total")
    du.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    du.add_argument("--json", action="store_true", help="machine-readable output (always with every point)")
    du.add_argument("--points", action="store_true", help="also every point: stored, and freed if removed")
    du.add_argument("specs", nargs="*", metavar="SPEC", help="only these pools or images")
    du.set_defaults(func=cmd_du)


def cmd_du(args: argparse.Namespace) -> int:
    from ..ops import usage

    report = usage.disk_usage(args.target, [parse_spec(s) for s in args.specs])
    if args.json:
        print(json.dumps(usage.usage_dict(report), indent=1))
    else:
        print(usage.format_table(report, points=args.points))
    for problem in report.problems:
        logger.error("%s", problem)
    return report.exit_code


def _add_restore_commands(sub: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    r = sub.add_parser("restore", parents=[common], help="restore a point into RBD, a raw file or a flat qcow2")
    r.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    r.add_argument("point", metavar="POINT", help="POOL/IMAGE@POINT (POINT: an id, 'latest' or a date prefix)")
    r.add_argument("--to", required=True, metavar="DEST", help="rbd:POOL/IMAGE, or a file path")
    r.add_argument("--format", "-f", choices=("raw", "qcow2"), help="file format for a path (default raw)")
    r.add_argument("--force", action="store_true", help="overwrite an existing image or file")
    r.add_argument(
        "--parallel",
        "-p",
        type=_positive,
        default=4,
        help="reader threads (default 4)",
    )
    r.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    _add_ceph(r)
    r.set_defaults(func=cmd_restore)

    o = sub.add_parser("overlay", parents=[common], help="a writable qcow2 overlay of a point, to boot a VM")
    o.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    o.add_argument("point", metavar="POINT", help="POOL/IMAGE@POINT")
    o.add_argument("new", metavar="NEW.qcow2", type=Path, help="the overlay to create")
    o.set_defaults(func=cmd_overlay)

    s = sub.add_parser("serve", parents=[common], help="a read-only NBD export of a point on a Unix socket")
    s.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    s.add_argument("point", metavar="POINT", help="POOL/IMAGE@POINT")
    s.add_argument("--socket", required=True, type=Path, help="socket path, in a private directory")
    s.set_defaults(func=cmd_serve)


def cmd_restore(args: argparse.Namespace) -> int:
    from ..ops import restore

    loc = restore.locate(args.target, args.point)
    if args.to.startswith("rbd:"):
        if args.format is not None:
            raise UsageError("--format applies to file destinations only")
        from ..adapters.ceph import Cluster

        dest = restore.parse_rbd_dest(args.to)
        opts = _ceph_options(args)
        with Cluster(opts) as cluster:
            restore.restore_rbd(
                loc, dest, cluster, force=args.force, parallel=args.parallel, progress=not args.no_progress
            )
        print(f"{loc.ref} -> rbd:{dest}")
    else:
        restore.restore_file(
            loc,
            Path(args.to),
            args.format or "raw",
            force=args.force,
            parallel=args.parallel,
            progress=not args.no_progress,
        )
        print(f"{loc.ref} -> {args.to}")
    return 0


def cmd_overlay(args: argparse.Namespace) -> int:
    from ..ops import restore

    loc = restore.locate(args.target, args.point)
    restore.make_overlay(loc, args.new)
    print(args.new)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ..ops import restore

    loc = restore.locate(args.target, args.point)
    try:
        restore.serve(loc, args.socket, lambda uri: print(uri, flush=True))
    except Cancelled as exc:
        logger.info("%s: export of %s stopped", exc, loc.ref)
    return 0


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_prune_commands(sub: argparse._SubParsersAction[_Parser], common: _Parser) -> None:
    p = sub.add_parser("prune", parents=[common], help="apply a retention policy (merges layers, never in place)")
    p.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        p.add_argument(f"--keep-{rule}", type=_nonnegative, default=0, metavar="N", help=f"keep {rule} points")
    p.add_argument("--keep-within", type=_duration, metavar="DURATION", help="keep everything younger (7d, 12H, 2w...)")
    p.add_argument("--max-depth", type=_positive, metavar="N", help="merge the oldest layers of deeper chains")
    p.add_argument("--dry-run", "-n", action="store_true", help="only show what would be kept and merged, and why")
    p.add_argument("--json", action="store_true", help="machine-readable plan on stdout")
    p.add_argument("--parallel", "-p", type=_positive, default=4, help="copy threads per merge (default 4)")
    p.add_argument("--wait", action="store_true", help="wait for locked chains")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("specs", nargs="*", metavar="SPEC", help="only these pools or images")
    p.set_defaults(func=cmd_prune)

    d = sub.add_parser("delete", parents=[common], help="remove one point; later points keep their content")
    d.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    d.add_argument("point", metavar="POINT", help="POOL/IMAGE@POINT")
    d.add_argument("--wait", action="store_true", help="wait for a locked chain")
    d.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    d.set_defaults(func=cmd_delete)


def cmd_prune(args: argparse.Namespace) -> int:
    from ..core.retention import Policy
    from ..ops.prune import PruneOptions, format_plan, plan_dict, prune

    policy = Policy(
        keep_within=args.keep_within,
        keep_last=args.keep_last,
        keep_hourly=args.keep_hourly,
        keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly,
        keep_monthly=args.keep_monthly,
        keep_yearly=args.keep_yearly,
    )
    opts = PruneOptions(
        target=args.target,
        policy=policy,
        max_depth=args.max_depth,
        dry_run=args.dry_run,
        parallel=args.parallel,
        progress=not args.no_progress,
        wait=args.wait,
    )
    plans = prune(args.specs, opts)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "images": [plan_dict(p) for p in plans]}, indent=1))
    else:
        for plan in plans:
            print(format_plan(plan, dry_run=args.dry_run))
    return combined_exit_code([0 if p.error is None else p.error.exit_code for p in plans])


def cmd_run(args: argparse.Namespace) -> int:
    from ..ops import config

    cfg = config.load(args.config)
    if args.check_config:
        print(f"{args.config}: ok ({len(cfg.clusters)} clusters, target {cfg.target})")
        return 0
    from ..ops import run as nightly
    from . import report

    result = nightly.run(cfg)
    print(report.summary_text(result), file=sys.stderr)
    if args.json:
        print(report.summary_json(result))
    if args.metrics is not None:
        report.write_metrics(args.metrics, result)
    return report.exit_code(result)


def cmd_verify(args: argparse.Namespace) -> int:
    from ..ops.verify import VerifyOptions, verify

    ceph = None
    if args.source:
        ceph = _ceph_options(args)
    opts = VerifyOptions(
        target=args.target,
        deep=args.deep,
        source=args.source,
        sample=args.sample,
        parallel=args.parallel,
        progress=not args.no_progress,
        ceph=ceph,
        wait=args.wait,
    )
    report = verify(args.specs, opts)
    if args.json:
        out = {
            "ok": report.ok,
            "points_checked": report.points_checked,
            "bytes_read": report.bytes_read,
            "problems": [p.as_dict() for p in report.problems],
            "not_verified": [f.as_dict() for f in report.failures],
            "cleared": report.cleared,
        }
        print(json.dumps(out, indent=1))
    else:
        for problem in report.problems:
            print(f"DAMAGED {problem}")
        for failure in report.failures:
            print(f"NOT VERIFIED {failure.image}: {failure.error}")
        for ref in report.cleared:
            print(f"CLEARED {ref}: sound again")
        summary = f"{report.points_checked} points checked, {len(report.problems)} problems"
        print(summary + (f", {len(report.failures)} chains not verified" if report.failures else ""))
    return report.exit_code


def cmd_delete(args: argparse.Namespace) -> int:
    from ..ops.prune import delete_point

    print(delete_point(args.target, args.point, wait=args.wait, progress=not args.no_progress))
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from ..ops.backup import BackupOptions, backup

    opts = BackupOptions(
        target=args.target,
        ceph=_ceph_options(args),
        parallel=args.parallel,
        full=args.full,
        whole_object=args.whole_object,
        wait=args.wait,
        progress=not args.no_progress,
        check_unchanged=args.check_unchanged,
    )
    results = backup(args.specs, opts)
    for r in results:
        if r.point is not None:
            print(r.point_ref, flush=True)
    failed = [r for r in results if r.error is not None]
    if failed:
        logger.error("%d of %d images failed: %s", len(failed), len(results), ", ".join(str(r.image) for r in failed))
    return combined_exit_code([r.exit_code for r in results])


def cmd_list(args: argparse.Namespace) -> int:
    rows, damaged = list_points(args.target, [parse_spec(s) for s in args.specs])
    if args.json:
        out = {"points": [row_dict(r) for r in rows], "damaged": [str(d) for d in damaged]}
        print(json.dumps(out, indent=1))
    else:
        print(format_table(rows))
    for d in damaged:
        logger.error("%s", d)
    return 65 if damaged else 0


def _raise_cancelled(signum: int, _frame: FrameType | None) -> None:
    raise Cancelled(signum)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(threadName)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    # qemu.qmp reports the daemon's normal QMP disconnect at INFO level.
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)


def _limit_malloc_arenas() -> None:
    """Two malloc arenas instead of eight per core: librbd's and our threads otherwise
    each keep freed 4 MiB buffers in their own arena (measured: peak RSS 185 -> 136 MiB
    for a 2 GiB full backup, at the same speed)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX


def _stdout_gone() -> bool:
    """Whether the reader of standard output went away (``list | head``)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, 0)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_stdout() -> int:
    """What Python's documentation advises after EPIPE on stdout: the rest goes to /dev/null, so
    the flush at exit raises no second error; the exit code of a process ended by SIGPIPE."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


# SIGHUP: the terminal or ssh session went away; stop and clean up as for SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def main(argv: Sequence[str] | None = None) -> int:
    _limit_malloc_arenas()
    handlers: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {}
    for sig in STOP_SIGNALS:
        handlers[sig] = signal.signal(sig, _raise_cancelled)
    try:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as exc:
            print(f"{exc}\nTry 'rbd2qcow2 --help'.", file=sys.stderr)
            return exc.exit_code
        _setup_logging(args.verbose or 0, bool(args.quiet))
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except Cancelled as exc:
        logger.error("%s: stopped; committed points are intact", exc)
        return exc.exit_code
    except Error as exc:
        logger.error("%s", exc)
        return exc.exit_code
    except BrokenPipeError:
        if not _stdout_gone():
            logger.exception("internal error (a bug in rbd2qcow2; please report it)")
            return os.EX_SOFTWARE
        return _quiet_stdout()
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            logger.exception("internal error (a bug in rbd2qcow2; please report it)")
            return os.EX_SOFTWARE
        err = storage_error(exc)
        logger.error("%s", err)
        return err.exit_code
    except Exception:
        logger.exception("internal error (a bug in rbd2qcow2; please report it)")
        return os.EX_SOFTWARE
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
