"""The target directory: its identity tag and the chain directories in it."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import FULL_ERRNOS, ChainDamaged, TargetError, storage_error
from ..core.names import ImageSpec, chain_relpath, is_target_tag
from . import manifest as mf
from .fsutil import DIR_MODE, create_once, keep_reserve
from .layout import LAYER_SUFFIX, OWN_FILE

TAG_FILE = ".rbd2qcow2-target"


def open_target(root: Path, *, create: bool) -> str:
    """The target's tag (8 hex digits), made on first use when ``create``.

    The tag is part of every snapshot name this target creates, so two
    targets backing up the same image never remove each other's snapshots.
    ``create`` also makes the target's reserve file (:func:`fsutil.keep_reserve`).
    """
    if create:
        try:
            os.makedirs(root, DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise TargetError(f"cannot create {root}: {exc.strerror}") from exc
    if not root.is_dir():
        raise TargetError(f"{root} is not a directory")
    path = root / TAG_FILE
    try:
        tag = _read_tag(path)
    except FileNotFoundError:
        if not create:
            raise TargetError(f"{root} is not an rbd2qcow2 target (no {TAG_FILE})") from None
        # Two first runs at once must agree on one tag: whoever links first wins.
        try:
            create_once(path, json.dumps({"format": "rbd2qcow2-target", "tag": secrets.token_hex(4)}).encode() + b"\n")
            tag = _read_tag(path)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise storage_error(exc, path) from exc
            raise TargetError(f"cannot create {path}: {exc.strerror}") from exc
    if not isinstance(tag, str) or not is_target_tag(tag):
        raise TargetError(f"{path} holds an invalid tag")
    if create:
        keep_reserve(root)
    return tag


def _read_tag(path: Path) -> object:
    """The tag in ``path``; FileNotFoundError passes through, any other fault is a TargetError."""
    try:
        return json.loads(path.read_text())["tag"]
    except FileNotFoundError:
        raise
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise TargetError(f"{path} is unreadable: {exc}") from exc


def chain_dir(root: Path, image: ImageSpec) -> Path:
    return root.joinpath(*chain_relpath(image))


def iter_chains(root: Path) -> Iterator[tuple[Path, mf.Manifest | ChainDamaged]]:
    """Every chain directory under the target with its manifest (or its damage).

    A directory with layer files but no manifest is a chain too, reported
    as damaged (see :func:`rbd2qcow2.store.manifest.load`).
    """
    dirs = {path.parent for path in root.rglob(mf.NAME) if path.is_file() and not path.is_symlink()}
    dirs |= {path.parent for path in root.rglob(f"*{LAYER_SUFFIX}") if OWN_FILE.fullmatch(path.name)}
    for directory in sorted(dirs):
        try:
            m = mf.load(directory)
        except ChainDamaged as exc:
            yield directory, exc
            continue
        if m is not None:
            yield directory, m
