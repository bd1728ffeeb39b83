"""Per-chain activity log (``activity.log``, rotated) and the ``latest`` link."""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

LOG = "activity.log"
LATEST = "latest"
logger = logging.getLogger(__name__)
MAX_BYTES = 256 << 10
KEEP = 3


def record(directory: Path, text: str) -> None:
    """Append one line to the chain's activity log; rotate it past :data:`MAX_BYTES`.

    Best effort: a full disk or a vanished directory never fails a backup.
    """
    with contextlib.suppress(OSError):
        path = directory / LOG
        if path.exists() and path.stat().st_size > MAX_BYTES:
            for i in range(KEEP - 1, 0, -1):
                older = directory / f"{LOG}.{i}"
                if older.exists():
                    os.replace(older, directory / f"{LOG}.{i + 1}")
            os.replace(path, directory / f"{LOG}.1")
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        line = f"{stamp} {' '.join(text.split())}\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def point_latest(directory: Path, layer_file: str | None) -> None:
    """Make ``latest`` a relative link to the newest point's file (atomically), or remove it.

    A convenience for people: where the link cannot be made (a full disk),
    it is removed rather than left pointing at an older or deleted point.
    """
    link = directory / LATEST
    tmp = directory / f".{LATEST}.tmp"
    if layer_file is not None:
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(layer_file, tmp)
            os.replace(tmp, link)
            return
        except OSError as exc:
            logger.warning("%s: link %s not made: %s", directory, LATEST, exc.strerror)
    for stale in (tmp, link):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
