"""The command line's parser: every command and option (argparse lives here and in :mod:`.main` only)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from .. import __version__
from ..core.errors import UsageError
from ..core.retention import parse_duration


class Parser(argparse.ArgumentParser):
    """Usage errors raised as :class:`UsageError`, so that their exit code comes from the class."""

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


def _bytes(text: str) -> int:
    """A size as ``rbd create`` takes one: bytes, or with a K, M or G suffix (powers of 1024)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (bytes, or with K, M, G)")
    return int(digits) * scale


def _add_image_settings(r: argparse.ArgumentParser) -> None:
    """Overrides of the RBD settings a restore into RBD takes from the point (named as ``rbd create``'s)."""
    r.add_argument("--object-size", type=_bytes, metavar="SIZE", help="object size of the new image (4M, 1M...)")
    r.add_argument("--stripe-unit", type=_bytes, metavar="SIZE", help="stripe unit of the new image")
    r.add_argument("--stripe-count", type=_positive, metavar="N", help="stripe count of the new image")
    r.add_argument(
        "--image-feature",
        action="append",
        metavar="FEATURES",
        help="features of the new image, comma separated or repeated (instead of the recorded ones)",
    )
    r.add_argument("--data-pool", metavar="POOL", help="data pool of the new image")
    r.add_argument("--no-image-meta", action="store_true", help="do not copy the recorded image-meta key/values")


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
    parser = Parser(prog="rbd2qcow2", description="Incremental backups of Ceph RBD images into qcow2 chains.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_logging(parser, None)
    # The same options after the command name; SUPPRESS keeps the top-level value when absent.
    common = Parser(add_help=False)
    _add_logging(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    # In the order of the help text.
    for add in (
        _add_backup_command,
        _add_restore_commands,
        _add_prune_commands,
        _add_run_command,
        _add_verify_command,
        _add_list_command,
        _add_usage_command,
        _add_repair_command,
    ):
        add(sub, common)
    return parser


def _add_backup_command(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
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


def _add_run_command(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    n = sub.add_parser("run", parents=[common], help="the nightly job: back up, prune, verify per a config file")
    n.add_argument("--config", "-C", required=True, type=Path, help="TOML configuration (see docs/operations.md)")
    n.add_argument("--json", action="store_true", help="the run summary as JSON on stdout")
    n.add_argument("--metrics", type=Path, metavar="FILE", help="write a Prometheus textfile (node_exporter)")
    n.add_argument("--check-config", action="store_true", help="only check the configuration")


def _add_verify_command(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
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


def _add_list_command(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    ls = sub.add_parser("list", parents=[common], help="chains and their points, oldest first")
    ls.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("specs", nargs="*", metavar="SPEC", help="only these pools or images")


def _add_repair_command(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    r = sub.add_parser("repair", parents=[common], help="rebuild a chain's manifest from its layer files")
    r.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    r.add_argument("--offline", action="store_true", help="do not ask the cluster for the snapshots")
    r.add_argument("--force", action="store_true", help="rebuild even a valid manifest (it is kept aside)")
    r.add_argument("--wait", action="store_true", help="wait for a locked chain")
    _add_ceph(r)
    r.add_argument("spec", metavar="SPEC", help="POOL/IMAGE or POOL/NAMESPACE/IMAGE")


def _add_usage_command(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    du = sub.add_parser("du", parents=[common], help="bytes stored per image, per pool and in total")
    du.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    du.add_argument("--json", action="store_true", help="machine-readable output (always with every point)")
    du.add_argument("--points", action="store_true", help="also every point: stored, and freed if removed")
    du.add_argument("specs", nargs="*", metavar="SPEC", help="only these pools or images")


def _add_restore_commands(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
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
    _add_image_settings(r)
    _add_ceph(r)

    o = sub.add_parser("overlay", parents=[common], help="a writable qcow2 overlay of a point, to boot a VM")
    o.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    o.add_argument("point", metavar="POINT", help="POOL/IMAGE@POINT")
    o.add_argument("new", metavar="NEW.qcow2", type=Path, help="the overlay to create")

    s = sub.add_parser("serve", parents=[common], help="a read-only NBD export of a point on a Unix socket")
    s.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    s.add_argument("point", metavar="POINT", help="POOL/IMAGE@POINT")
    s.add_argument("--socket", required=True, type=Path, help="socket path, in a private directory")


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_prune_commands(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
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

    d = sub.add_parser("delete", parents=[common], help="remove one point; later points keep their content")
    d.add_argument("--target", "-t", required=True, type=Path, help="backup target directory")
    d.add_argument("point", metavar="POINT", help="POOL/IMAGE@POINT")
    d.add_argument("--wait", action="store_true", help="wait for a locked chain")
    d.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
