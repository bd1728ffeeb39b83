"""What rbd2qcow2 asks of a qemu-storage-daemon: NBD exports of chains, and commits."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...core.errors import InUse, QemuError
from ...core.faults import crashpoint
from . import session
from .blockdev import COMMIT_WAYS, chain_options, commit_options
from .jobs import wait_job

logger = logging.getLogger(__name__)

EXPORT_GRACE = 5.0  # seconds for an export's clients to disconnect before they are cut off
EVENT_POLL = 0.25  # seconds to wait for an event before asking qemu


@dataclass(frozen=True)
class Export:
    """One NBD export of a storage daemon: connect to ``socket``, export ``name``."""

    name: str
    socket: Path
    node: str
    id: str


class StorageDaemon(session.QmpSession):
    """One ``qemu-storage-daemon`` (see :class:`~.session.QmpSession`); it can hold several exports at once."""

    def __init__(self, nbd_socket: Path | None = None, root: Path | None = None) -> None:
        super().__init__(nbd_socket, root)
        self._count = 0

    def _name(self, prefix: str) -> str:
        """A new node, export or job name: short, since qemu's monitor reads its input a byte at a time."""
        self._count += 1
        return f"{prefix}{self._count}"

    def export_chain(
        self,
        files: Sequence[Path],
        *,
        writable: bool,
        direct: bool = False,
        name: str | None = None,
        aio: str | None = None,
        direct_aio: str = "io_uring",
        preallocate: bool = False,
    ) -> Export:
        """Open a chain (base first) and export its top over NBD (options: :func:`.blockdev.chain_options`)."""
        node = self._name("n")
        export_id = f"e{node[1:]}"
        opts = chain_options(
            files,
            writable_top=writable,
            direct=direct,
            aio=aio,
            direct_aio=direct_aio,
            preallocate=preallocate,
            root=self._root,
        )
        opts["node-name"] = node
        self.cmd("blockdev-add", **opts)
        # Without a name the export is named after its node: fewer bytes for the monitor to read.
        args: dict[str, Any] = {"type": "nbd", "id": export_id, "node-name": node}
        if name is not None:
            args["name"] = name
        if writable:
            args["writable"] = True
        try:
            self.cmd("block-export-add", **args)
        except QemuError:
            self.cmd("blockdev-del", **{"node-name": node})
            raise
        return Export(name=name or node, socket=self._nbd_socket, node=node, id=export_id)

    def export_for_reading(self, files: Sequence[Path]) -> Export:
        """A read-only export of a chain that is read whole (a restore): io_uring where qemu has it.

        With a thread pool qemu hands every read to a worker thread, which costs it more CPU.
        """
        try:
            return self.export_chain(files, writable=False, aio="io_uring")
        except QemuError as exc:
            if "io_uring" not in str(exc):
                raise
            logger.info("io_uring not available (%s); reading with a thread pool", exc)
            return self.export_chain(files, writable=False)

    def commit(self, files: Sequence[Path], base: int, progress: Callable[[int], None] | None = None) -> None:
        """Write the layers above ``files[base]`` into it (QMP ``block-commit``), then close the chain.

        ``files[base]`` is the only node opened writable; the layers above it
        stay read-only and unchanged, and those below it are not opened.  qemu copies what the layers
        above the base allocate (zero clusters as zeros) and takes its image
        locks: the commit fails cleanly while any other process has a file of
        the chain open (:class:`~rbd2qcow2.core.errors.InUse`, raised before
        anything is written).  Returns once the job concluded and the nodes
        are closed (qemu flushes the base on close).
        """
        top = self._name("c")
        base_node = f"{top}-base"
        if base >= len(files) - 1:
            raise ValueError("nothing to commit")
        top_opts = self._add_commit_base(files, base, top, base_node)
        try:
            self.cmd_or_in_use("blockdev-add", files, **top_opts)
            try:
                job = f"{top}-job"
                args = {"job-id": job, "device": top, "base-node": base_node, "auto-dismiss": False}
                self.cmd_or_in_use("block-commit", files, **args)
                crashpoint("prune-during-commit")
                wait_job(self, job, progress)
            finally:
                self.cmd("blockdev-del", **{"node-name": top})
        finally:
            # Closing the base flushes it (and the filter cuts the file back to the end of its data).
            self.cmd("blockdev-del", **{"node-name": base_node})

    def _add_commit_base(self, files: Sequence[Path], base: int, top: str, base_node: str) -> dict[str, Any]:
        """Open the commit's base the best way qemu accepts (:data:`.blockdev.COMMIT_WAYS`); the top's options."""
        for i, way in enumerate(COMMIT_WAYS):
            base_opts, top_opts = commit_options(files, base, top, base_node, way)
            try:
                self.cmd_or_in_use("blockdev-add", files, **base_opts)
                return top_opts
            except QemuError as exc:
                if isinstance(exc, InUse) or not self.alive or i == len(COMMIT_WAYS) - 1:
                    raise
                logger.info("cannot open the commit's base with %s (%s)", way, exc)
        raise AssertionError("unreachable: the last way raises")

    def remove_export(self, export: Export) -> None:
        """Close an export and its nodes; waits until qemu has let go of the files."""
        self._delete_export(export.id)
        self._wait_export_deleted(export.id)
        self.cmd("blockdev-del", **{"node-name": export.node})

    def _delete_export(self, name: str) -> None:
        """``block-export-del``, waiting for our clients' disconnects to reach qemu.

        Callers flush and close their connections first; a client that is
        still connected after the grace period is cut off (mode ``hard``).
        """
        deadline = time.monotonic() + EXPORT_GRACE
        while True:
            try:
                self.cmd("block-export-del", id=name)
                return
            except QemuError as exc:
                if "in use" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    logger.warning("export %s still has clients; disconnecting them", name)
                    self.cmd("block-export-del", id=name, mode="hard")
                    return
            time.sleep(0.01)

    def _wait_export_deleted(self, name: str) -> None:
        """Until qemu has deleted export ``name``: its ``BLOCK_EXPORT_DELETED`` event, or
        (no event within :data:`EVENT_POLL`) ``query-block-exports`` without it.

        Waiting for the event spares a command, which qemu's monitor reads a
        byte at a time, and consumes the events as they come: the client
        keeps every event it is not asked for, one per image of a run.
        """
        deadline = time.monotonic() + session.QMP_TIMEOUT
        ask_at = time.monotonic() + EVENT_POLL
        while time.monotonic() < deadline:
            event = self.pull_event(f"waiting for export {name} to close", 0.05)
            if event is not None:
                if event.get("event") == "BLOCK_EXPORT_DELETED" and event.get("data", {}).get("id") == name:
                    return
            elif time.monotonic() >= ask_at:
                if not any(e.get("id") == name for e in self.cmd("query-block-exports")):
                    return
                ask_at = time.monotonic() + EVENT_POLL
        raise QemuError(f"export {name} was not deleted in time")


@contextlib.contextmanager
def storage_daemon(nbd_socket: Path | None = None, root: Path | None = None) -> Iterator[StorageDaemon]:
    with StorageDaemon(nbd_socket, root) as daemon:
        yield daemon
