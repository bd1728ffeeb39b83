"""Pure tests of the retention policy (borg ``prune`` semantics), table style plus properties."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbd2qcow2.core.retention import Decision, Policy, Stamp, decide, parse_duration


def at(text: str) -> datetime:
    """``2020-12-31 10:00[:00]`` as an aware UTC datetime."""
    fmt = "%Y-%m-%d %H:%M:%S" if text.count(":") == 2 else "%Y-%m-%d %H:%M"
    return datetime.strptime(text, fmt).replace(tzinfo=UTC)


def stamp(when: datetime) -> Stamp:
    return Stamp(when.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ"), when)


def stamps_of(*times: str) -> list[Stamp]:
    return [stamp(at(t)) for t in times]


NOW = at("2030-01-01 00:00")


def kept(points: list[Stamp], policy: Policy, now: datetime = NOW) -> set[str]:
    return {pid for pid, d in decide(points, policy, now).items() if d.keep}


def ids(points: list[Stamp], *indexes: int) -> set[str]:
    """The ids of ``points`` at 1-based ``indexes`` (as borg's tests number archives)."""
    return {points[i - 1].id for i in indexes}


# -- borg's test_prune_split, transposed -----------------------------------------------

BORG_SPLIT = stamps_of(
    # years apart
    "2015-01-01 10:00:00",  # 1
    "2016-01-01 10:00:00",  # 2
    "2017-01-01 10:00:00",  # 3
    # months apart
    "2017-02-01 10:00:00",  # 4
    "2017-03-01 10:00:00",  # 5
    # days apart
    "2017-03-02 10:00:00",  # 6
    "2017-03-03 10:00:00",  # 7
    "2017-03-04 10:00:00",  # 8
    # minutes apart
    "2017-10-01 09:45:00",  # 9
    "2017-10-01 09:55:00",  # 10
    # seconds apart
    "2017-10-01 10:00:01",  # 11
    "2017-10-01 10:00:03",  # 12
    "2017-10-01 10:00:05",  # 13
)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (Policy(keep_yearly=3), (13, 2, 1)),
        (Policy(keep_monthly=3), (13, 8, 4)),
        (Policy(keep_weekly=2), (13, 8)),
        (Policy(keep_daily=3), (13, 8, 7)),
        (Policy(keep_hourly=3), (13, 10, 8)),
        (Policy(keep_last=4), (13, 12, 11, 10)),
        (Policy(keep_daily=0), (13,)),  # borg keeps nothing; here the newest always stays
    ],
)
def test_borg_prune_split_table(policy: Policy, expected: tuple[int, ...]) -> None:
    assert kept(BORG_SPLIT, policy) == ids(BORG_SPLIT, *expected)


BORG_OLDEST = stamps_of(
    "2018-01-01 10:00",  # 1: oldest backup, but not the last of its year
    "2018-12-30 10:00",  # 2: an interim backup
    "2018-12-31 10:00",  # 3: year end
    "2019-12-31 10:00",  # 4: year end
)


def test_borg_keep_oldest_when_target_not_met() -> None:
    d = decide(BORG_OLDEST, Policy(keep_yearly=3), NOW)
    assert {pid for pid, x in d.items() if x.keep} == ids(BORG_OLDEST, 1, 3, 4)
    assert d[BORG_OLDEST[0].id].reasons == ("yearly (oldest)",)
    assert d[BORG_OLDEST[2].id].reasons == ("yearly #2",)
    assert d[BORG_OLDEST[3].id].reasons == ("yearly #1",)
    assert d[BORG_OLDEST[1].id] == Decision(False, ())


def test_borg_no_oldest_when_target_met() -> None:
    assert kept(BORG_OLDEST, Policy(keep_yearly=2)) == ids(BORG_OLDEST, 3, 4)


def test_no_points() -> None:
    assert decide([], Policy(keep_daily=3, keep_last=2, keep_within=timedelta(days=1)), NOW) == {}


# -- single rules ----------------------------------------------------------------------


def test_keep_last() -> None:
    pts = stamps_of("2020-01-01 00:00", "2020-01-01 00:01", "2020-01-02 00:00", "2020-01-03 00:00")
    assert kept(pts, Policy(keep_last=1)) == ids(pts, 4)
    assert kept(pts, Policy(keep_last=2)) == ids(pts, 3, 4)
    assert kept(pts, Policy(keep_last=10)) == ids(pts, 1, 2, 3, 4)
    d = decide(pts, Policy(keep_last=2), NOW)
    assert d[pts[3].id].reasons == ("last #1",)
    assert d[pts[2].id].reasons == ("last #2",)


def test_keep_last_same_second_uses_id_order() -> None:
    when = at("2020-01-01 00:00")
    pts = [Stamp("20200101T000000Z", when), Stamp("20200101T000000Z-2", when), Stamp("20200101T000000Z-3", when)]
    assert kept(pts, Policy(keep_last=1)) == {"20200101T000000Z-3"}


def test_keep_daily_newest_of_each_day() -> None:
    pts = stamps_of(
        "2020-03-01 01:00",  # 1
        "2020-03-01 23:59",  # 2 newest of 03-01
        "2020-03-02 00:00",  # 3
        "2020-03-02 12:00",  # 4
        "2020-03-02 18:00",  # 5 newest of 03-02
        "2020-03-03 08:00",  # 6 newest of 03-03
    )
    assert kept(pts, Policy(keep_daily=2)) == ids(pts, 6, 5)
    assert kept(pts, Policy(keep_daily=3)) == ids(pts, 6, 5, 2)
    # four days asked, three found: the oldest is kept as well
    assert kept(pts, Policy(keep_daily=4)) == ids(pts, 6, 5, 2, 1)
    d = decide(pts, Policy(keep_daily=4), NOW)
    assert d[pts[0].id].reasons == ("daily (oldest)",)
    assert d[pts[4].id].reasons == ("daily #2",)


def test_keep_daily_day_boundary_is_utc_midnight() -> None:
    pts = stamps_of("2020-03-01 23:59:59", "2020-03-02 00:00:00")
    assert kept(pts, Policy(keep_daily=2)) == ids(pts, 1, 2)
    pts = stamps_of("2020-03-02 00:00:00", "2020-03-02 23:59:59")
    assert kept(pts, Policy(keep_daily=1)) == ids(pts, 2)


def test_periods_are_utc_even_for_other_timezones() -> None:
    """The module promises UTC periods: 2020-03-01 23:30 UTC is on 03-01 whatever tzinfo it carries."""
    plus2 = timezone(timedelta(hours=2))
    late = Stamp("a", datetime(2020, 3, 2, 1, 30, tzinfo=plus2))  # = 2020-03-01 23:30 UTC
    earlier = Stamp("b", datetime(2020, 3, 1, 20, 0, tzinfo=UTC))  # same UTC day, older
    newest = Stamp("c", datetime(2020, 3, 2, 10, 0, tzinfo=UTC))
    # UTC days: 03-02 -> c, 03-01 -> a (b is older on the same day). keep_daily=2
    # fills its count, so the "oldest" fallback (which would add b) does not apply.
    assert kept([late, earlier, newest], Policy(keep_daily=2), NOW) == {"a", "c"}


def test_keep_hourly() -> None:
    pts = stamps_of("2020-03-01 10:00", "2020-03-01 10:59", "2020-03-01 11:00", "2020-03-01 11:30", "2020-03-01 13:05")
    assert kept(pts, Policy(keep_hourly=2)) == ids(pts, 5, 4)
    assert kept(pts, Policy(keep_hourly=3)) == ids(pts, 5, 4, 2)


@pytest.mark.parametrize(
    ("times", "n", "expected"),
    [
        # 2020-12-28 (Mon) .. 2021-01-03 (Sun) are all ISO week 2020-W53
        (
            ["2020-12-27 12:00", "2020-12-28 12:00", "2020-12-31 12:00", "2021-01-01 12:00", "2021-01-04 12:00"],
            2,
            (5, 4),
        ),
        (
            ["2020-12-27 12:00", "2020-12-28 12:00", "2020-12-31 12:00", "2021-01-01 12:00", "2021-01-04 12:00"],
            3,
            (5, 4, 1),
        ),
        # 2021-01-03 (Sun) is still 2020-W53; 2021-01-04 (Mon) starts 2021-W01
        (["2020-12-31 12:00", "2021-01-03 23:59", "2021-01-04 00:00"], 2, (3, 2)),
        # 2024-12-30 (Mon) is ISO 2025-W01, 2024-12-29 (Sun) is 2024-W52
        (["2024-12-29 12:00", "2024-12-30 12:00", "2025-01-05 12:00"], 2, (3, 1)),
        # ISO weeks start on Monday: Sunday and the next Monday differ, Monday..Sunday do not
        (["2021-03-01 00:00", "2021-03-07 23:59"], 2, (2, 1)),  # fewer weeks than asked: oldest too
        (["2021-03-01 00:00", "2021-03-07 23:59", "2021-02-28 12:00"], 2, (2, 3)),
    ],
)
def test_keep_weekly_iso_weeks(times: list[str], n: int, expected: tuple[int, ...]) -> None:
    pts = stamps_of(*times)
    assert kept(pts, Policy(keep_weekly=n)) == ids(pts, *expected)


def test_keep_yearly_is_calendar_year_not_iso_year() -> None:
    pts = stamps_of("2020-06-01 00:00", "2020-12-31 12:00", "2021-01-01 12:00", "2021-01-04 12:00")
    assert kept(pts, Policy(keep_yearly=2)) == ids(pts, 4, 2)


def test_keep_monthly() -> None:
    pts = stamps_of(
        "2020-01-15 00:00",  # 1
        "2020-01-31 23:59:59",  # 2 newest of January
        "2020-02-01 00:00:00",  # 3
        "2020-02-29 12:00",  # 4 newest of February (leap day)
        "2020-04-01 00:00",  # 5 newest of April (March has none)
    )
    assert kept(pts, Policy(keep_monthly=1)) == ids(pts, 5)
    assert kept(pts, Policy(keep_monthly=2)) == ids(pts, 5, 4)
    assert kept(pts, Policy(keep_monthly=3)) == ids(pts, 5, 4, 2)
    assert kept(pts, Policy(keep_monthly=12)) == ids(pts, 5, 4, 2, 1)


def test_keep_yearly() -> None:
    pts = stamps_of("2018-03-01 00:00", "2018-11-01 00:00", "2019-12-31 23:59:59", "2020-01-01 00:00")
    assert kept(pts, Policy(keep_yearly=2)) == ids(pts, 4, 3)
    assert kept(pts, Policy(keep_yearly=3)) == ids(pts, 4, 3, 2)
    assert kept(pts, Policy(keep_yearly=4)) == ids(pts, 4, 3, 2, 1)


# -- combined rules --------------------------------------------------------------------


def test_period_already_kept_is_not_counted() -> None:
    """keep_daily keeps the newest of this week: keep_weekly skips this week and keeps two older ones."""
    pts = stamps_of(
        "2021-02-15 12:00",  # 1  week 07 (Mon)
        "2021-02-22 12:00",  # 2  week 08
        "2021-02-24 12:00",  # 3  week 08, newest
        "2021-03-01 12:00",  # 4  week 09
        "2021-03-02 12:00",  # 5  week 09
        "2021-03-03 12:00",  # 6  week 09, newest
    )
    d = decide(pts, Policy(keep_daily=2, keep_weekly=2), NOW)
    assert {pid for pid, x in d.items() if x.keep} == ids(pts, 6, 5, 3, 1)
    assert d[pts[5].id].reasons == ("daily #1",)
    assert d[pts[4].id].reasons == ("daily #2",)
    assert d[pts[2].id].reasons == ("weekly #1",)
    assert d[pts[0].id].reasons == ("weekly #2",)


def test_keep_last_then_daily_skips_kept_days() -> None:
    pts = stamps_of("2021-01-01 10:00", "2021-01-02 10:00", "2021-01-03 09:00", "2021-01-03 10:00")
    d = decide(pts, Policy(keep_last=2, keep_daily=2), NOW)
    # last keeps both points of 01-03; daily skips 01-03 (its newest is kept) and takes 01-02, 01-01
    assert {pid for pid, x in d.items() if x.keep} == ids(pts, 1, 2, 3, 4)
    assert d[pts[1].id].reasons == ("daily #1",)
    assert d[pts[0].id].reasons == ("daily #2",)


def test_within_then_daily_skips_kept_days() -> None:
    now = at("2021-01-10 12:00")
    pts = stamps_of("2021-01-07 10:00", "2021-01-08 10:00", "2021-01-09 13:00", "2021-01-10 11:00")
    d = decide(pts, Policy(keep_within=timedelta(days=1), keep_daily=1), now)
    assert {pid for pid, x in d.items() if x.keep} == ids(pts, 2, 3, 4)
    assert d[pts[3].id].reasons == ("within",)
    assert d[pts[2].id].reasons == ("within",)
    assert d[pts[1].id].reasons == ("daily #1",)


def test_several_reasons_for_one_point() -> None:
    pts = stamps_of("2021-01-01 10:00", "2021-01-02 10:00")
    d = decide(pts, Policy(keep_within=timedelta(days=3650), keep_last=1), NOW)
    assert d[pts[1].id].reasons == ("within", "last #1")
    assert d[pts[0].id].reasons == ("within",)


def test_oldest_fallback_not_used_when_oldest_already_kept() -> None:
    pts = stamps_of("2021-01-01 10:00", "2021-01-02 10:00")
    d = decide(pts, Policy(keep_last=2, keep_monthly=5), NOW)
    assert d[pts[0].id].reasons == ("last #2",)
    assert d[pts[1].id].reasons == ("last #1",)


def test_oldest_fallback_per_rule() -> None:
    pts = stamps_of("2020-05-01 00:00", "2020-06-01 00:00", "2021-07-01 00:00", "2021-07-02 00:00")
    d = decide(pts, Policy(keep_daily=1, keep_monthly=2, keep_yearly=5), NOW)
    # daily: 07-02; monthly: skips 2021-07 (kept), takes 2020-06 and 2020-05; yearly finds nothing new
    assert {pid for pid, x in d.items() if x.keep} == ids(pts, 4, 2, 1)
    assert d[pts[3].id].reasons == ("daily #1",)
    assert d[pts[1].id].reasons == ("monthly #1",)
    assert d[pts[0].id].reasons == ("monthly #2",)
    assert not d[pts[2].id].keep


# -- keep_within and the newest point ----------------------------------------------------


def test_keep_within_relative_to_now() -> None:
    now = at("2020-06-10 12:00")
    pts = stamps_of("2020-06-08 12:00", "2020-06-09 12:00", "2020-06-09 12:00:01", "2020-06-10 11:00")
    # strictly younger than 1 day: the point exactly one day old is not kept (borg: ts > now - within)
    assert kept(pts, Policy(keep_within=timedelta(days=1)), now) == ids(pts, 3, 4)
    assert kept(pts, Policy(keep_within=timedelta(days=2)), now) == ids(pts, 2, 3, 4)
    later = now + timedelta(days=30)
    assert kept(pts, Policy(keep_within=timedelta(days=1)), later) == ids(pts, 4)


def test_newest_always_kept() -> None:
    pts = stamps_of("2020-01-01 00:00", "2020-01-02 00:00", "2020-01-03 00:00")
    d = decide(pts, Policy(keep_within=timedelta(hours=1)), NOW)
    assert {pid for pid, x in d.items() if x.keep} == ids(pts, 3)
    assert d[pts[2].id].reasons == ("newest (base of the next backup)",)
    assert d[pts[0].id] == Decision(False, ())


def test_empty_policy_keeps_only_the_newest() -> None:
    pts = stamps_of("2020-01-01 00:00", "2020-01-02 00:00")
    assert Policy().empty
    assert not Policy(keep_within=timedelta(0)).empty
    assert not Policy(keep_yearly=1).empty
    d = decide(pts, Policy(), NOW)
    assert d == {pts[0].id: Decision(False, ()), pts[1].id: Decision(True, ("newest (base of the next backup)",))}


def test_policy_counts() -> None:
    p = Policy(keep_hourly=1, keep_daily=2, keep_weekly=3, keep_monthly=4, keep_yearly=5, keep_last=9)
    assert p.counts() == {"hourly": 1, "daily": 2, "weekly": 3, "monthly": 4, "yearly": 5}


@pytest.mark.parametrize(
    ("policy", "rule"),
    [
        (Policy(keep_last=1), "last"),
        (Policy(keep_hourly=1), "hourly"),
        (Policy(keep_daily=1), "daily"),
        (Policy(keep_weekly=1), "weekly"),
        (Policy(keep_monthly=1), "monthly"),
        (Policy(keep_yearly=1), "yearly"),
        (Policy(keep_within=timedelta(days=1)), "within"),
    ],
)
def test_reasons_name_the_rule(policy: Policy, rule: str) -> None:
    pts = [stamp(NOW - timedelta(minutes=1))]
    (d,) = decide(pts, policy, NOW).values()
    assert d.keep
    assert any(rule in r for r in d.reasons), d.reasons


# -- properties ----------------------------------------------------------------------------

BASE = at("2019-12-20 00:00")


@st.composite
def point_sets(draw: st.DrawFn) -> list[Stamp]:
    span = draw(st.sampled_from([6 * 60, 3 * 24 * 60, 70 * 24 * 60, 900 * 24 * 60]))
    minutes = draw(st.lists(st.integers(0, span), min_size=0, max_size=40, unique=True))
    return [stamp(BASE + timedelta(minutes=m)) for m in minutes]


counts = st.integers(0, 6)
policies = st.builds(
    Policy,
    keep_within=st.none() | st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=1000)),
    keep_last=counts,
    keep_hourly=counts,
    keep_daily=counts,
    keep_weekly=counts,
    keep_monthly=counts,
    keep_yearly=counts,
)
nows = st.integers(0, 1000 * 24 * 60).map(lambda m: BASE + timedelta(minutes=m))


@settings(max_examples=300, deadline=None)
@given(point_sets(), policies, nows)
def test_prop_decision_for_every_point_and_newest_kept(pts: list[Stamp], policy: Policy, now: datetime) -> None:
    d = decide(pts, policy, now)
    assert set(d) == {p.id for p in pts}
    for x in d.values():
        assert x.keep == bool(x.reasons)
    if pts:
        newest = max(pts, key=lambda p: p.time)
        assert d[newest.id].keep


@settings(max_examples=300, deadline=None)
@given(point_sets(), policies, st.integers(0, 50), nows)
def test_prop_keep_last_keeps_at_least_n(pts: list[Stamp], policy: Policy, n: int, now: datetime) -> None:
    policy = dataclasses.replace(policy, keep_last=n)
    assert len(kept(pts, policy, now)) >= min(n, len(pts))
    newest_n = {p.id for p in sorted(pts, key=lambda p: p.time, reverse=True)[:n]}
    assert newest_n <= kept(pts, policy, now)


@st.composite
def grown(draw: st.DrawFn, policy: Policy) -> Policy:
    """A policy that asks for at least as much as ``policy``."""
    more = draw(st.lists(st.integers(0, 3), min_size=6, max_size=6))
    within = policy.keep_within
    extra = draw(st.none() | st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=500)))
    if extra is not None:
        within = extra if within is None else within + extra
    return Policy(
        keep_within=within,
        keep_last=policy.keep_last + more[0],
        keep_hourly=policy.keep_hourly + more[1],
        keep_daily=policy.keep_daily + more[2],
        keep_weekly=policy.keep_weekly + more[3],
        keep_monthly=policy.keep_monthly + more[4],
        keep_yearly=policy.keep_yearly + more[5],
    )


@settings(max_examples=300, deadline=None)
@given(point_sets(), policies, nows, st.data())
def test_prop_more_rules_never_drop_a_kept_point(
    pts: list[Stamp], policy: Policy, now: datetime, data: st.DataObject
) -> None:
    bigger = data.draw(grown(policy))
    assert kept(pts, policy, now) <= kept(pts, bigger, now)


@settings(max_examples=300, deadline=None)
@given(point_sets(), policies, nows, st.data())
def test_prop_independent_of_input_order(pts: list[Stamp], policy: Policy, now: datetime, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(pts))
    assert decide(shuffled, policy, now) == decide(pts, policy, now)


@settings(max_examples=200, deadline=None)
@given(point_sets(), st.sampled_from(["hourly", "daily", "weekly", "monthly", "yearly"]), st.integers(1, 8))
def test_prop_single_rule_keeps_newest_of_each_kept_period(pts: list[Stamp], rule: str, n: int) -> None:
    """One period rule alone: kept points are newest-of-period (plus maybe the oldest), at most n+1."""
    pattern = {"hourly": "%Y-%m-%d %H", "daily": "%Y-%m-%d", "weekly": "%G-%V", "monthly": "%Y-%m", "yearly": "%Y"}
    newest_of: dict[str, Stamp] = {}
    for p in sorted(pts, key=lambda p: p.time):
        newest_of[p.time.strftime(pattern[rule])] = p
    periods = sorted(newest_of.values(), key=lambda p: p.time, reverse=True)
    expected = {p.id for p in periods[:n]}
    if pts and len(periods) < n:
        expected.add(min(pts, key=lambda p: p.time).id)
    only = {
        "hourly": Policy(keep_hourly=n),
        "daily": Policy(keep_daily=n),
        "weekly": Policy(keep_weekly=n),
        "monthly": Policy(keep_monthly=n),
        "yearly": Policy(keep_yearly=n),
    }[rule]
    assert kept(pts, only, NOW) == expected


# -- parse_duration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1H", timedelta(hours=1)),
        ("12H", timedelta(hours=12)),
        ("36H", timedelta(hours=36)),
        ("7d", timedelta(days=7)),
        ("0d", timedelta(0)),
        ("2w", timedelta(days=14)),
        ("6m", timedelta(days=180)),
        ("1y", timedelta(days=365)),
        ("10y", timedelta(days=3650)),
        ("007d", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "d", "7", "7D", "7h", "7M", "7s", "7Y", "1.5d", "-1d", "+1d", " 7d", "7d ", "7 d", "7dd", "d7", "1e3d", "x"],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["1000000000d", "99999999999y", "9" * 30 + "H"])
def test_parse_duration_out_of_range_is_a_value_error(text: str) -> None:
    """The CLI turns ValueError into a usage error; anything else escapes argparse as a traceback."""
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize("hours", [1, 25, 1000, 123457, 1_000_000])
def test_parse_duration_hours_exact(hours: int) -> None:
    assert parse_duration(f"{hours}H") == timedelta(hours=hours)
