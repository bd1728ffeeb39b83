"""rbd2qcow2: incremental backups of Ceph RBD images into chains of qcow2 files.

Library use::

    from pathlib import Path
    import rbd2qcow2

    results = rbd2qcow2.backup(["rbd/vm1"], rbd2qcow2.BackupOptions(target=Path("/backup")))
    for r in results:
        print(r.point_ref or r.error)
"""

__version__ = "0.1.0"

from .backup import BackupOptions, BackupResult, backup
from .ceph import CephOptions
from .errors import Cancelled, Error

__all__ = ["BackupOptions", "BackupResult", "Cancelled", "CephOptions", "Error", "__version__", "backup"]
