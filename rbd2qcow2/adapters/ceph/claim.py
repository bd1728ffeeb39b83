"""Claims: a RADOS lock with a lease that says "this host backs up that image now", renewed while held."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import rados

from ...core.errors import CephError, Claimed, ClaimLost
from ...core.names import ImageSpec
from ...core.threads import Crew

logger = logging.getLogger(__name__)

CLAIM_LOCK = "rbd2qcow2"
LOCK_FLAG_MUST_RENEW = 2  # LIBRADOS_LOCK_FLAG_MUST_RENEW: renew only a lock still held
RENEW_FRACTION = 1 / 3  # renew every third of the lease (at most half of it, to leave room for a retry)
# Work on an image stops once the last renewal is this old (as a fraction of the lease): the
# rest is the margin for the work to stop before another host may take the image.
LAPSE_MARGIN = 0.8


@contextlib.contextmanager
def hold(ioctx: Any, spec: ImageSpec, ttl: int) -> Iterator[Claim]:
    """The claim on ``spec``, in the pool and namespace of ``ioctx`` (see :meth:`.cluster.Cluster.claim`)."""
    obj = "rbd2qcow2_claim." + hashlib.sha256(spec.name.encode()).hexdigest()[:24]
    cookie = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    taken = time.monotonic()  # the lease runs from before the request, at the latest
    try:
        ioctx.lock_exclusive(obj, CLAIM_LOCK, cookie, desc=str(spec), duration=ttl)
    except rados.ObjectBusy as exc:
        raise Claimed(str(spec)) from exc
    except rados.Error as exc:
        raise CephError(f"claim on {spec}: {exc}") from exc
    claim = Claim(str(spec), Lease(ttl, taken))
    renewer = Crew()
    renewer.start(lambda: _renew(ioctx, obj, cookie, claim, renewer.stopping), "claim")
    try:
        yield claim
    finally:
        renewer.stop()
        with contextlib.suppress(rados.Error):
            ioctx.unlock(obj, CLAIM_LOCK, cookie)


@dataclass
class Lease:
    """The timing of a claim's lease (pure): when it was last taken or renewed, and whether a renewal failed.

    Times are ``time.monotonic()`` values taken before each request was
    sent, so the lease is never thought to run longer than it does.
    """

    ttl: float
    renewed: float
    failure: str | None = None

    def interval(self) -> float:
        """Seconds between renewals: several tries fit in the part of the lease work may use."""
        return self.ttl * RENEW_FRACTION

    def lost(self, now: float) -> str | None:
        """Why the claim can no longer be relied on at ``now``, or None while it holds."""
        if self.failure is not None:
            return f"renewal failed: {self.failure}"
        age = now - self.renewed
        if age > self.ttl * LAPSE_MARGIN:
            return f"not renewed for {age:.0f} s of a {self.ttl:.0f} s lease"
        return None


class Claim:
    """A claim held by :meth:`Cluster.claim`; its renewer thread updates the lease."""

    def __init__(self, label: str, lease: Lease) -> None:
        self.label = label
        self._lease = lease
        self._lock = threading.Lock()
        self.renewals = 0

    def renewed(self, at: float) -> None:
        with self._lock:
            if self._lease.failure is None:
                self._lease.renewed = max(self._lease.renewed, at)
                self.renewals += 1

    def failed(self, why: str) -> None:
        with self._lock:
            if self._lease.failure is None:
                self._lease.failure = why

    @property
    def interval(self) -> float:
        return self._lease.interval()

    @property
    def ttl(self) -> int:
        return int(self._lease.ttl)

    def check(self) -> None:
        """Raise :class:`ClaimLost` once the lease may lapse: work on the image must stop."""
        with self._lock:
            why = self._lease.lost(time.monotonic())
        if why is not None:
            raise ClaimLost(self.label, why)


def _renew(ioctx: Any, obj: str, cookie: str, claim: Claim, stop: threading.Event) -> None:
    """Renew until ``stop``; the first failure ends the claim (another host may hold the lock by now)."""
    while not stop.wait(claim.interval):
        sent = time.monotonic()
        try:
            # MUST_RENEW: a lock that was broken or expired meanwhile is not silently taken again.
            ioctx.lock_exclusive(
                obj, CLAIM_LOCK, cookie, desc=claim.label, duration=claim.ttl, flags=LOCK_FLAG_MUST_RENEW
            )
        except rados.Error as exc:
            logger.error("%s: could not renew the claim: %s; the image's work stops", claim.label, exc)
            claim.failed(str(exc))
            return
        claim.renewed(sent)
