"""The timing of a claim's lease (pure): when work on an image must stop."""

from __future__ import annotations

import pytest

from rbd2qcow2.adapters.ceph import LAPSE_MARGIN, Claim, Lease
from rbd2qcow2.core.errors import ClaimLost


def test_renewals_come_at_most_every_half_lease() -> None:
    assert Lease(300, 0.0).interval() <= 150
    assert Lease(10, 0.0).interval() <= 5


@pytest.mark.parametrize(
    ("age", "lost"),
    [(0.0, False), (100.0, False), (300 * LAPSE_MARGIN, False), (300 * LAPSE_MARGIN + 0.001, True), (301.0, True)],
)
def test_a_lease_is_lost_once_its_last_renewal_is_too_old(age: float, lost: bool) -> None:
    assert (Lease(300, 1000.0).lost(1000.0 + age) is not None) == lost


def test_the_margin_leaves_time_to_stop_before_the_lease_lapses() -> None:
    assert 0.5 < LAPSE_MARGIN < 1.0


def test_a_failed_renewal_loses_the_claim_at_once() -> None:
    lease = Lease(300, 1000.0, failure="Device or resource busy")
    assert lease.lost(1000.0) == "renewal failed: Device or resource busy"


def test_a_claim_raises_claim_lost_with_exit_75_and_a_later_renewal_does_not_revive_it() -> None:
    import time

    claim = Claim("pool/vm", Lease(300, time.monotonic()))
    claim.check()
    claim.failed("No such file or directory")
    claim.renewed(time.monotonic())
    with pytest.raises(ClaimLost) as info:
        claim.check()
    assert info.value.exit_code == 75
    assert str(info.value).startswith("claim on pool/vm lost (renewal failed: No such file or directory)")


def test_a_claim_whose_renewer_is_stuck_is_lost() -> None:
    import time

    claim = Claim("pool/vm", Lease(10, time.monotonic() - 9))
    with pytest.raises(ClaimLost, match="not renewed for 9 s of a 10 s lease"):
        claim.check()
