"""Opening a chain for a command: the target, the chain lock, the manifest, a pending merge.

Every command that reads or changes a chain starts the same way (as borg's
``with_repository``): open the target, take the chain's lock, load its
manifest (a damaged one raises :class:`ChainDamaged`), and finish a merge an
interrupted run left pending, since until then the chain reads wrong.  How
much of that a command needs is an :class:`Access`; the presets below are
the commands':

* :data:`BACKUP` creates the target and the chain directory, takes the lock,
  and refuses a manifest of another target; a merge that cannot run now
  (another process holds a file of the chain) stays pending;
* :data:`CHANGE` (prune, delete) may take the room of the target's reserve
  on a full file system, and removes what an interrupted run left;
* :data:`CHECK` (verify) changes nothing but flags: on a full target where
  no lock file can be made, it checks without the lock;
* :data:`READ` (restore, overlays, serving) takes no lock and sees a
  pending merge as it reads (:func:`rbd2qcow2.store.chain.as_read`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..adapters import qemu
from ..core.errors import ChainDamaged, Locked, NotFound, StorageError, TargetFull
from ..core.names import ImageSpec, chain_relpath
from ..store import manifest as mf
from ..store.chain import as_read, remove_orphan_files
from ..store.fsutil import chain_lock, keep_reserve, make_dirs, release_reserve
from ..store.layout import LOCK
from ..store.target import chain_dir, open_target
from .journal import recover

logger = logging.getLogger(__name__)


class Lock(enum.Enum):
    """How a command holds the chain lock."""

    NONE = "none"  # a reader: nothing it does changes the chain
    HELD = "held"  # the lock, or the command fails (Locked, or the file system's error)
    IF_ROOM = "if-room"  # the lock, but none on a full target where its file cannot be made


@dataclass(frozen=True)
class Access:
    """What a command needs of a chain before it starts (see the module docstring)."""

    lock: Lock = Lock.HELD
    create: bool = False  # make the target and the chain directory (a backup)
    existing: bool = False  # a chain without a manifest is NotFound
    reserve: bool = False  # the target's reserve may be released (lock file, dropping manifest)
    recover: bool = True  # finish a pending merge (a reader sees it as it reads instead)
    clean: bool = True  # remove the files the manifest's journal names
    pending_may_stay: bool = False  # a merge that cannot run now (Locked) is left pending
    own_tag: bool = False  # a manifest of another target is damage


BACKUP = Access(create=True, pending_may_stay=True, own_tag=True)
CHANGE = Access(existing=True, reserve=True)
CHECK = Access(lock=Lock.IF_ROOM, clean=False)
READ = Access(lock=Lock.NONE, existing=True, clean=False)


@dataclass(frozen=True)
class Opened:
    """A chain as :func:`with_chain` opened it; ``manifest`` is None for a chain with no points yet."""

    target: Path
    tag: str
    image: ImageSpec
    directory: Path
    manifest: mf.Manifest | None


@contextlib.contextmanager
def with_chain(
    target: Path,
    image: ImageSpec,
    access: Access,
    *,
    wait: bool = False,
    daemon: qemu.StorageDaemon | None = None,
) -> Iterator[Opened]:
    """Open the target and the chain of ``image`` as ``access`` says; the lock is held for the block.

    ``wait``: for a chain locked by another run, instead of failing.
    ``daemon``: the storage daemon a pending merge may use (else one of its own).
    """
    tag = open_target(target, create=access.create)
    directory = make_dirs(target, chain_relpath(image)) if access.create else chain_dir(target, image)
    missing = NotFound(f"no backups of {image} in {target}")
    # Before the lock, which would create a file there; layers without a manifest are damage (65), not absence.
    if access.existing and access.lock is not Lock.NONE and _load(directory) is None:
        raise missing
    session = chain_session(
        directory, str(image), access, wait=wait, target=target, tag=tag if access.own_tag else None, daemon=daemon
    )
    with session as m:
        if m is None and access.existing:
            raise missing
        yield Opened(target, tag, image, directory, m)


@contextlib.contextmanager
def chain_session(
    directory: Path,
    what: str,
    access: Access,
    *,
    wait: bool = False,
    target: Path | None = None,
    tag: str | None = None,
    daemon: qemu.StorageDaemon | None = None,
) -> Iterator[mf.Manifest | None]:
    """The lock, manifest and recovery of one chain of a target already opened (``target``: its root).

    For commands that go through many chains of one target; see :func:`with_chain`.
    ``tag``: the target's, which the manifest must carry.
    """
    reserve = target if access.reserve else None
    with _locked(directory, what, access.lock, wait=wait, reserve=reserve):
        m = _load(directory)
        if m is not None:
            m = _prepared(directory, m, access, reserve=reserve, tag=tag, daemon=daemon)
        yield m


def _load(directory: Path) -> mf.Manifest | None:
    return mf.load(directory) if directory.is_dir() else None


def _prepared(
    directory: Path,
    m: mf.Manifest,
    access: Access,
    *,
    reserve: Path | None,
    tag: str | None,
    daemon: qemu.StorageDaemon | None,
) -> mf.Manifest:
    """The manifest once a pending merge is finished (a reader: as it reads) and the leftovers removed."""
    if access.lock is Lock.NONE:
        return as_read(directory, m)
    if access.recover:
        m = _recovered(directory, m, access, reserve=reserve, daemon=daemon)
    if tag is not None and m.target_tag != tag:
        raise ChainDamaged(str(directory), "manifest belongs to another target")
    return remove_orphan_files(directory, m) if access.clean else m


def _recovered(
    directory: Path, m: mf.Manifest, access: Access, *, reserve: Path | None, daemon: qemu.StorageDaemon | None
) -> mf.Manifest:
    try:
        return recover(directory, m, daemon, target=reserve)
    except Locked as exc:
        if not access.pending_may_stay:
            raise
        # The points a backup builds on read right while a commit merge is pending.
        logger.warning("%s: the interrupted merge stays pending: %s", m.image, exc)
        return m


@contextlib.contextmanager
def _locked(directory: Path, what: str, lock: Lock, *, wait: bool, reserve: Path | None) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if lock is Lock.HELD and reserve is not None:
            _lock_in_reserve(stack, directory, reserve, wait=wait, what=what)
        elif lock is Lock.HELD:
            stack.enter_context(chain_lock(directory, wait=wait, what=what))
        elif lock is Lock.IF_ROOM:
            _lock_if_room(stack, directory, wait=wait, what=what)
        yield


def _lock_in_reserve(stack: contextlib.ExitStack, directory: Path, target: Path, *, wait: bool, what: str) -> None:
    """The chain's lock; a lock file that a full file system has no room for is made in the reserve's."""
    try:
        stack.enter_context(chain_lock(directory, wait=wait, what=what))
    except TargetFull:
        if not release_reserve(target):
            raise
        stack.callback(keep_reserve, target)  # again once the chain is unlocked, where there is room
        stack.enter_context(chain_lock(directory, wait=wait, what=what))


def _lock_if_room(stack: contextlib.ExitStack, directory: Path, *, wait: bool, what: str) -> None:
    """The chain lock; on a full target whose lock file cannot be made, none.

    A lock file that cannot be created cannot be held by anyone else either,
    and verify writes nothing but flags, which a full target refuses anyway.
    """
    try:
        stack.enter_context(chain_lock(directory, wait=wait, what=what))
    except StorageError as exc:
        if (directory / LOCK).exists():
            raise
        logger.warning("%s: verified without the chain lock: %s", what, exc)
