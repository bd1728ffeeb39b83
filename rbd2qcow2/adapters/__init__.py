"""The boundaries to foreign code: Ceph (rados/rbd), NBD (libnbd), qemu binaries and QMP."""
