"""The Ceph boundary: every call into the ``rados`` and ``rbd`` bindings.

Everything else in rbd2qcow2 sees :class:`Cluster` and :class:`RbdImage`,
and the project's own exceptions (``raise ... from exc``).

- :mod:`.calls`: the bindings' exceptions turned into the project's;
- :mod:`.cluster`: a connected cluster: pools, namespaces, images by name, stray names;
- :mod:`.claim`: the lease-renewed RADOS lock that says which host backs up an image;
- :mod:`.image`: an open image: snapshots, diffs, metadata, reads and writes;
- :mod:`.writes`: writes with several requests in flight.
"""

from .claim import CLAIM_LOCK, LAPSE_MARGIN, RENEW_FRACTION, Claim, Lease
from .cluster import BULK_WRITE_OPTIONS, CONNECT_TIMEOUT, CephOptions, Cluster, StrayName
from .image import FEATURE_NAMES, ImageSettings, NewImage, RbdImage, SnapInfo
from .writes import AsyncWrites

__all__ = [
    "BULK_WRITE_OPTIONS",
    "CLAIM_LOCK",
    "CONNECT_TIMEOUT",
    "FEATURE_NAMES",
    "LAPSE_MARGIN",
    "RENEW_FRACTION",
    "AsyncWrites",
    "CephOptions",
    "Claim",
    "ImageSettings",
    "Cluster",
    "Lease",
    "NewImage",
    "RbdImage",
    "SnapInfo",
    "StrayName",
]
