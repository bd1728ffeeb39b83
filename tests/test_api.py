"""The package as a library: names, lazy Ceph imports."""

from __future__ import annotations

import subprocess
import sys


def test_backup_is_the_function_even_after_submodule_imports() -> None:
    import rbd2qcow2.ops.backup
    import rbd2qcow2.ops.prune
    import rbd2qcow2.ops.restore

    assert callable(rbd2qcow2.backup)
    assert rbd2qcow2.backup is rbd2qcow2.ops.backup.backup
    assert rbd2qcow2.BackupOptions is rbd2qcow2.ops.backup.BackupOptions


def test_file_restores_do_not_load_ceph_bindings() -> None:
    code = (
        "import sys, rbd2qcow2.cli.main, rbd2qcow2.ops.restore; print('rados' in sys.modules or 'rbd' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
