"""Pure retention policy: which points to keep, with the rules that keep them.

The semantics are borg's (``borg prune``), applied to the points of one
image, newest first:

* ``keep_within``: every point younger than this, counted from ``now``;
* ``keep_last``: the N newest points;
* ``keep_hourly`` ... ``keep_yearly``: for each of the N most recent hours
  (days, ISO weeks, months, years) that have points, the newest point of
  that period.  A period whose newest point is already kept by an earlier
  rule is passed over without being counted, and if a rule finds fewer
  periods than it may keep, it also keeps the oldest point.

Periods are UTC, like point ids.  The newest point is always kept: it is the
base of the next incremental backup and its RBD snapshot is kept in Ceph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

RULES = (
    ("hourly", "%Y-%m-%d %H"),
    ("daily", "%Y-%m-%d"),
    ("weekly", "%G-%V"),
    ("monthly", "%Y-%m"),
    ("yearly", "%Y"),
)


@dataclass(frozen=True)
class Policy:
    keep_within: timedelta | None = None
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    def counts(self) -> dict[str, int]:
        return {rule: getattr(self, f"keep_{rule}") for rule, _ in RULES}

    @property
    def empty(self) -> bool:
        return self.keep_within is None and self.keep_last == 0 and not any(self.counts().values())


@dataclass(frozen=True)
class Stamp:
    """What the policy needs of a point: its id, time, and place in the manifest.

    ``seq`` orders points as the manifest does; the point with the highest is
    the newest (the base of the next backup) even if the clock stepped back.
    """

    id: str
    time: datetime
    seq: int = 0


@dataclass(frozen=True)
class Decision:
    keep: bool
    reasons: tuple[str, ...] = field(default=())


def parse_duration(text: str) -> timedelta:
    """``30d``, ``12H``, ``2w``, ``6m`` (30-day months), ``1y`` (365 days): borg's units."""
    hours = {"H": 1, "d": 24, "w": 24 * 7, "m": 24 * 30, "y": 24 * 365}
    number = text[:-1]
    if len(text) < 2 or text[-1] not in hours or not (number.isascii() and number.isdigit()):
        raise ValueError(f"bad duration {text!r}: a number and one of H d w m y, e.g. 7d")
    try:
        return timedelta(hours=int(number) * hours[text[-1]])
    except OverflowError:
        raise ValueError(f"duration {text!r} is too long") from None


def decide(points: Sequence[Stamp], policy: Policy, now: datetime) -> dict[str, Decision]:
    """Keep or drop for every point, with the rules that keep it (pure)."""
    newest_first = sorted(points, key=lambda p: (p.time.astimezone(UTC), p.seq, p.id), reverse=True)
    kept: dict[str, list[str]] = {p.id: [] for p in points}
    if policy.keep_within is not None:
        for p in newest_first:
            if now - p.time < policy.keep_within:
                kept[p.id].append("within")
    for i, p in enumerate(newest_first[: policy.keep_last]):
        kept[p.id].append(f"last #{i + 1}")
    for rule, pattern in RULES:
        _keep_periods(newest_first, rule, pattern, policy.counts()[rule], kept)
    if points:
        latest = max(points, key=lambda p: (p.seq, p.time.astimezone(UTC), p.id))
        if not kept[latest.id]:
            kept[latest.id].append("newest (base of the next backup)")
    return {pid: Decision(bool(reasons), tuple(reasons)) for pid, reasons in kept.items()}


def _keep_periods(newest_first: Sequence[Stamp], rule: str, pattern: str, n: int, kept: dict[str, list[str]]) -> None:
    if n <= 0:
        return
    count, last_period = 0, None
    already = {pid for pid, reasons in kept.items() if reasons}
    for p in newest_first:
        period = p.time.astimezone(UTC).strftime(pattern)
        if period == last_period:
            continue
        last_period = period
        if p.id in already:
            continue
        count += 1
        kept[p.id].append(f"{rule} #{count}")
        if count == n:
            return
    oldest = newest_first[-1] if newest_first else None
    if oldest is not None and oldest.id not in already and not kept[oldest.id]:
        kept[oldest.id].append(f"{rule} (oldest)")
