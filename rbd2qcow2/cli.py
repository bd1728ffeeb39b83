"""Command line: argparse lives here and nowhere else."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from . import __version__
from .backup import BackupOptions, backup
from .ceph import CephOptions
from .errors import Cancelled, Error, UsageError, combined_exit_code
from .listing import format_table, list_points, row_dict
from .names import parse_spec

logger = logging.getLogger("rbd2qcow2")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


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
    p.add_argument("-v", "--verbose", action="count", default=default, help="more log output (-vv: debug)")
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
    b.add_argument("specs", nargs="+", metavar="SPEC", help="POOL, POOL/IMAGE or POOL/NAMESPACE/IMAGE")
    b.set_defaults(func=cmd_backup)

    ls = sub.add_parser("list", parents=[common], help="chains and their points, oldest first")
    ls.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("specs", nargs="*", metavar="SPEC", help="only these pools or images")
    ls.set_defaults(func=cmd_list)
    return parser


def cmd_backup(args: argparse.Namespace) -> int:
    opts = BackupOptions(
        target=args.target,
        ceph=CephOptions(
            conf=args.conf, client_id=args.client_id, keyring=args.keyring, connect_timeout=args.connect_timeout
        ),
        parallel=args.parallel,
        full=args.full,
        whole_object=args.whole_object,
        wait=args.wait,
        progress=not args.no_progress,
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
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose + 1, 2)]
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s [%(threadName)s] %(message)s",
        datefmt="%H:%M:%S",
    )
    # qemu.qmp reports the daemon's normal QMP disconnect at INFO level.
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def main(argv: Sequence[str] | None = None) -> int:
    handlers: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handlers[sig] = signal.signal(sig, _raise_cancelled)
    try:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as exc:
            print(f"{exc}\nTry 'rbd2qcow2 --help'.", file=sys.stderr)
            return exc.exit_code
        _setup_logging(args.verbose or 0, bool(args.quiet))
        code: int = args.func(args)
        return code
    except Cancelled as exc:
        logger.error("%s: stopped; committed points are intact", exc)
        return exc.exit_code
    except Error as exc:
        logger.error("%s", exc)
        return exc.exit_code
    except Exception:
        logger.exception("internal error (a bug in rbd2qcow2; please report it)")
        return os.EX_SOFTWARE
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
