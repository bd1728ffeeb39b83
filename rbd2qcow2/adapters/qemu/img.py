"""qemu-img runs: the one way a qemu tool is run to its end, a layer's check and a file's info."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...core.errors import LayerCorrupt, QemuError, QemuUnavailable
from ...store.qcow2 import create_layer
from .blockdev import json_filename, layer_alone

QEMU_IMG_TIMEOUT = 1800.0  # seconds for one qemu-img check, info or map (a deep chain's map is the slowest)


def run(args: Sequence[str], *, pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[str]:
    """Run a qemu tool to its end, at most :data:`QEMU_IMG_TIMEOUT` (then it is killed); any exit status.

    ``pass_fds`` are inherited by the tool, for files named ``/dev/fd/N``.
    """
    try:
        return subprocess.run(
            list(args), capture_output=True, text=True, check=False, pass_fds=tuple(pass_fds), timeout=QEMU_IMG_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise QemuError(f"{args[0]} did not finish in {QEMU_IMG_TIMEOUT:.0f} s (killed) [{' '.join(args)}]") from exc
    except OSError as exc:
        raise QemuUnavailable(f"cannot run {args[0]}: {exc.strerror}") from exc


def output(args: Sequence[str], *, what: str, pass_fds: Sequence[int] = ()) -> str:
    """What a qemu tool printed on stdout; :class:`QemuError` with its message when it fails."""
    proc = run(args, pass_fds=pass_fds)
    if proc.returncode != 0:
        raise failure(what, args, proc.returncode, proc.stderr or proc.stdout)
    return proc.stdout


def failure(what: str, args: Sequence[str], returncode: int, message: str) -> QemuError:
    """The error of a qemu tool that exited with ``returncode``, with its message and command line."""
    return QemuError(f"{what} failed (exit {returncode}): {message.strip()} [{' '.join(args)}]")


def check_layer(path: Path) -> dict[str, Any]:
    """``qemu-img check`` of one layer alone (its backing file is not opened); returns qemu's report.

    Raises :class:`LayerCorrupt` when qemu finds corruptions, or cannot open
    the layer while it opens a sound one, and :class:`QemuUnavailable` when
    qemu-img cannot run or complete the check: that says nothing of the layer.
    """
    proc = _check(path)
    if proc.returncode in (0, 2, 3):  # 3: leaked clusters only, harmless
        try:
            report: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise QemuUnavailable(f"qemu-img check {path} printed no report: {proc.stderr.strip()}") from None
        if proc.returncode == 2:
            raise LayerCorrupt(f"qemu-img check: {report.get('corruptions', 'some')} corruptions")
        return report
    # 1: not completed (qemu cannot open the layer, or an internal error); 63: no checks for the format
    if proc.returncode == 1 and _checks_a_sound_layer():
        raise LayerCorrupt(f"qemu-img check cannot open it: {proc.stderr.strip()}")
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
    raise QemuUnavailable(f"qemu-img check {path} did not complete ({how}): {proc.stderr.strip()}")


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return run(["qemu-img", "check", "--output=json", json_filename(layer_alone(path))])


def _checks_a_sound_layer() -> bool:
    """Whether qemu-img checks a new empty layer: then a layer it cannot open is damaged, and qemu is fine."""
    with tempfile.TemporaryDirectory(prefix="rbd2qcow2-check-") as tmp:
        control = Path(tmp) / "control.qcow2"
        create_layer(control, 1 << 20, None)  # written by us: no qemu needed to make it
        return _check(control).returncode == 0


def info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of one file (qemu-img info does not open backing files)."""
    out = output(["qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(path)], what="qemu-img info")
    result: dict[str, Any] = json.loads(out)
    return result
