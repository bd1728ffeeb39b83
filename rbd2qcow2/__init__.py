"""rbd2qcow2: incremental backups of Ceph RBD images into chains of qcow2 files.

Library use::

    from pathlib import Path
    import rbd2qcow2

    results = rbd2qcow2.backup(["rbd/vm1"], rbd2qcow2.BackupOptions(target=Path("/backup")))
    for r in results:
        print(r.point_ref or r.error)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.errors import Cancelled, Error

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .adapters.ceph import CephOptions
    from .ops.backup import BackupOptions, BackupResult, backup

# The Ceph bindings load on first use, so that restores from files work on a
# machine without them.
_LAZY = {
    "BackupOptions": "ops.backup",
    "BackupResult": "ops.backup",
    "backup": "ops.backup",
    "CephOptions": "adapters.ceph",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


__all__ = ["BackupOptions", "BackupResult", "Cancelled", "CephOptions", "Error", "__version__", "backup"]
