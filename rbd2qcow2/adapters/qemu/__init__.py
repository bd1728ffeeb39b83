"""The qemu boundary: qemu-img and qemu-storage-daemon (driven over QMP).

Nothing else in rbd2qcow2 runs a qemu binary.  Every image is opened with an
explicit driver, and chains are given to qemu as explicit nested blockdev
options ending in ``"backing": null``, so qemu never follows a backing file
name written in a header.  Failures become :class:`~rbd2qcow2.core.errors.QemuError`
with the command line and qemu's own message.

- :mod:`.blockdev`: the blockdev options of layers, chains and commits (pure);
- :mod:`.img`: qemu-img runs (check, info) through one run-and-error helper;
- :mod:`.hostmap`: allocation maps (``qemu-img map``), whole or read while qemu-img runs;
- :mod:`.process`: the daemon's process, directory and end;
- :mod:`.session`: the daemon's QMP monitor, every wait on it bounded;
- :mod:`.jobs`: block jobs, their status as a type;
- :mod:`.daemon`: NBD exports of chains, and commits.
"""

from .blockdev import (
    COMMIT_WAYS,
    PREALLOCATE_ALIGN,
    PREALLOCATE_SIZE,
    CommitWay,
    chain_options,
    commit_options,
    daemon_name,
    file_node,
    json_filename,
    layer_alone,
    preallocate_node,
)
from .daemon import Export, StorageDaemon, storage_daemon
from .hostmap import HostExtent, HostMap, MapExtent, host_extents, map_chain, map_host, map_own, split_map_output
from .img import QEMU_IMG_TIMEOUT, check_layer, info
from .jobs import JOB_STALL_TIMEOUT, JobStatus
from .process import DIR_PREFIX, QUIT_TIMEOUT, remove_stale_dirs
from .session import QMP_TIMEOUT, QmpSession

__all__ = [
    "COMMIT_WAYS",
    "DIR_PREFIX",
    "JOB_STALL_TIMEOUT",
    "PREALLOCATE_ALIGN",
    "PREALLOCATE_SIZE",
    "QEMU_IMG_TIMEOUT",
    "QMP_TIMEOUT",
    "QUIT_TIMEOUT",
    "CommitWay",
    "Export",
    "HostExtent",
    "HostMap",
    "JobStatus",
    "MapExtent",
    "QmpSession",
    "StorageDaemon",
    "chain_options",
    "check_layer",
    "commit_options",
    "daemon_name",
    "file_node",
    "host_extents",
    "info",
    "json_filename",
    "layer_alone",
    "map_chain",
    "map_host",
    "map_own",
    "preallocate_node",
    "remove_stale_dirs",
    "split_map_output",
    "storage_daemon",
]
