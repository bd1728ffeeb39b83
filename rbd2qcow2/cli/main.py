"""Command line: runs the command that :mod:`.parser` parsed; logging, signals, exit codes.

argparse stays in ``cli/``: the commands turn its namespace into typed options.
"""

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
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from ..core.errors import Cancelled, InternalError, UsageError, as_error, combined_exit_code
from ..core.names import parse_spec
from ..ops.listing import format_table, list_points, row_dict
from .parser import build_parser

if TYPE_CHECKING:
    from ..adapters.ceph import CephOptions
    from ..ops.image_config import ImageFlags

# Modules that import the Ceph bindings (backup, ceph) are imported by the
# commands that need them, so file restores work on a machine without Ceph.

logger = logging.getLogger("rbd2qcow2")


def _ceph_options(args: argparse.Namespace) -> CephOptions:
    from ..adapters.ceph import CephOptions

    return CephOptions(
        conf=args.conf, client_id=args.client_id, keyring=args.keyring, connect_timeout=args.connect_timeout
    )


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
                loc,
                dest,
                cluster,
                force=args.force,
                parallel=args.parallel,
                progress=not args.no_progress,
                flags=_image_flags(args),
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


def _image_flags(args: argparse.Namespace) -> ImageFlags:
    from ..ops.image_config import ImageFlags  # the Ceph bindings: only for a restore into RBD

    features = None
    if args.image_feature is not None:
        features = tuple(f.strip() for given in args.image_feature for f in given.split(",") if f.strip())
    return ImageFlags(
        object_size=args.object_size,
        stripe_unit=args.stripe_unit,
        stripe_count=args.stripe_count,
        features=features,
        data_pool=args.data_pool,
        image_meta=not args.no_image_meta,
    )


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
    return combined_exit_code([d.exit_code for d in damaged])


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
    each keep freed 4 MiB buffers in their own arena, which raises the peak memory
    without making anything faster."""
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
    return Cancelled(signal.SIGPIPE).exit_code


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "backup": cmd_backup,
    "restore": cmd_restore,
    "overlay": cmd_overlay,
    "serve": cmd_serve,
    "prune": cmd_prune,
    "delete": cmd_delete,
    "run": cmd_run,
    "verify": cmd_verify,
    "list": cmd_list,
    "du": cmd_du,
    "repair": cmd_repair,
}

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
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except Cancelled as exc:
        logger.error("%s: stopped; committed points are intact", exc)
        return exc.exit_code
    except Exception as exc:
        if isinstance(exc, BrokenPipeError) and _stdout_gone():
            return _quiet_stdout()
        err = as_error(exc)
        if isinstance(err, InternalError):
            logger.exception("internal error (a bug in rbd2qcow2; please report it)")
        else:
            logger.error("%s", err)
        return err.exit_code
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
