"""The anomaly score's pure core (custodes.policy.anomaly): each signal against the
account's own past days and its role's, each contribution explained by name and size,
thresholds mapped to actions, and nothing strange said of an account with little history.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from custodes.errors import ConfigurationError
from custodes.policy.anomaly import (
    DayActivity,
    GuardSettings,
    Observation,
    Signal,
    Verdict,
    observe,
    probe_step,
    robust_median,
    score,
)
from custodes.records.idnumber import check_char

SETTINGS = GuardSettings()
SHANGHAI = dt.timezone(dt.timedelta(hours=8))


def at(hour: int, minute: int = 0) -> float:
    return dt.datetime(2026, 12, 4, hour, minute, tzinfo=SHANGHAI).timestamp()


def number(prefix: str, sequence: int, check: str | None = None) -> str:
    body = f"{prefix}{sequence:03d}"
    return body + (check if check is not None else check_char(body))


def steady_history(views: int = 40, days: int = 10, **more: float) -> dict[str, dict[str, float]]:
    return {
        f"2026-11-{d:02d}": {
            "views": views + d % 3,
            "subjects": views - 5 + d % 3,
            "filtered": 0,
            "off_hours": 0,
            "searches": views,
            "misses": 3,
            **more,
        }
        for d in range(10, 10 + days)
    }


def day_of(*seen: Observation, vip: list[str] | None = None) -> DayActivity:
    day = DayActivity(SETTINGS.day_of(seen[0].time) if seen else "2026-12-04")
    for one in seen:
        observe(day, one, SETTINGS)
    if vip:
        day.vip_first.extend(vip)
    return day


def reads(
    n: int, hour: int | None = None, *, filtered: int = 0, distinct: bool = True
) -> list[Observation]:
    """`n` reads in one hour, or (no hour) spread over a working day, 09:00 to 17:00."""
    return [
        Observation(
            "a.wu",
            "officer",
            at(hour, i % 60) if hour is not None else at(9 + i % 8, i // 8 % 60),
            records=(f"r{i if distinct else 0}",),
            filtered=filtered,
            search=True,
        )
        for i in range(n)
    ]


def test_a_burst_of_views_is_explained_against_own_and_role_baselines() -> None:
    day = day_of(*reads(480, hour=10))
    result = score("a.wu", "officer", day, {"a.wu": steady_history()}, {"a.wu": "officer"})
    burst = next(c for c in result.contributions if c.signal is Signal.BURST)
    # A busy hour of its usual day (the role's 80 views a day, above its own 41) is 20.
    assert burst.explanation.startswith("views_hour: 480 between 10:00 and 11:00, 24.0× ")
    views = next(c for c in result.contributions if c.signal is Signal.VIEWS)
    assert views.explanation.startswith("views: 480 today, ")
    assert "× own baseline (" in views.explanation and "× role default" in views.explanation
    assert views.explanation.endswith(f"→ +{views.points:.1f}")
    assert Signal.SUBJECTS.value in result.signals
    assert result.verdict >= Verdict.ALERT


def test_the_role_median_of_peers_replaces_the_default_with_enough_peers() -> None:
    history = {name: steady_history(views=200) for name in ("p1", "p2", "p3")}
    history["a.wu"] = steady_history(views=40)
    roles = dict.fromkeys(history, "officer")
    result = score("a.wu", "officer", day_of(*reads(480)), history, roles)
    views = next(c for c in result.contributions if c.signal is Signal.VIEWS)
    # Twelve times this account's usual day, but every peer reads 200 a day: held
    # against that, the higher of the two.
    assert "11.7× own baseline (41/day)" in views.explanation
    assert "2.4× role median" in views.explanation
    assert views.points == pytest.approx(1.9, abs=0.1)


def test_records_withheld_as_outside_the_district_at_three_in_the_morning_are_named() -> None:
    day = day_of(*reads(5, hour=3, filtered=1))
    result = score("a.wu", "officer", day, {"a.wu": steady_history()}, {"a.wu": "officer"})
    assert {Signal.FILTERED.value, Signal.OFF_HOURS.value} <= set(result.signals)
    filtered = next(c for c in result.contributions if c.signal is Signal.FILTERED)
    assert filtered.explanation.startswith(
        "filtered: 5 today, none on its own usual day, 2.5× role default"
    )
    assert result.verdict is Verdict.ALERT


def test_working_hours_and_time_zone_are_settings() -> None:
    late = GuardSettings(work_starts=0, work_ends=24)
    day = DayActivity("2026-12-04")
    for one in reads(8, hour=3):
        observe(day, one, late)
    assert day.off_hours == 0
    assert SETTINGS.off_hours(at(6, 59)) and not SETTINGS.off_hours(at(7))
    assert SETTINGS.off_hours(at(20)) and not SETTINGS.off_hours(at(19, 59))
    with pytest.raises(ConfigurationError):
        GuardSettings(timezone="Mars/Olympus_Mons")
    with pytest.raises(ConfigurationError):
        GuardSettings(alert_at=5, step_up_at=4)


def test_a_high_miss_ratio_is_scored_against_the_usual_one() -> None:
    misses = [Observation("a.wu", "officer", at(10, i), search=True) for i in range(30)]
    result = score("a.wu", "officer", day_of(*misses), {"a.wu": steady_history()}, {})
    [miss] = [c for c in result.contributions if c.signal is Signal.MISSES]
    assert miss.explanation.startswith("miss_ratio: 30 of 30 searches found nothing today")
    assert miss.points == pytest.approx(3.0, abs=0.1)


def test_sequential_and_check_digit_walks_are_probes() -> None:
    prefix = "11010519800101"
    assert probe_step(number(prefix, 100), number(prefix, 101))
    assert probe_step(number(prefix, 100), number(prefix, 102))
    assert (
        probe_step(number(prefix, 100), number(prefix, 100, "X"))
        or check_char(f"{prefix}100") == "X"
    )
    assert not probe_step(number(prefix, 100), number(prefix, 140))
    assert not probe_step(number(prefix, 100), number("31010419800101", 101))
    assert not probe_step(number(prefix, 100), number(prefix, 100))
    walk = [
        Observation("a.wu", "officer", at(10, i), search=True, searched_id=number(prefix, 100 + i))
        for i in range(20)
    ]
    day = day_of(*walk)
    assert day.probes == 19
    result = score("a.wu", "officer", day, {"a.wu": steady_history()}, {})
    assert result.contributions[0].signal is Signal.PROBES
    assert result.contributions[0].explanation.startswith("id_probes: 19 searched ID numbers")
    assert result.verdict is Verdict.LOCK
    digits = [
        Observation("a.wu", "officer", at(11, c), search=True, searched_id=f"{prefix}100{c}")
        for c in range(10)
    ]
    assert day_of(*digits).probes == 9


def test_a_first_read_of_a_flagged_record_raises_an_alert() -> None:
    day = day_of(*reads(1), vip=["r-celebrity"])
    result = score("a.wu", "officer", day, {"a.wu": steady_history()}, {})
    assert result.signals == [Signal.VIP.value]
    assert result.verdict is Verdict.ALERT
    assert result.records == ("r-celebrity",)


def test_a_steady_official_is_not_flagged() -> None:
    day = day_of(*reads(42))
    result = score("a.wu", "officer", day, {"a.wu": steady_history()}, {"a.wu": "officer"})
    assert result.points == 0 and result.verdict is Verdict.NONE and not result.contributions


@given(
    views=st.integers(0, 80),
    history_days=st.integers(0, 2),
    past=st.integers(0, 5000),
)
def test_an_ordinary_day_with_little_history_is_never_flagged(
    views: int, history_days: int, past: int
) -> None:
    # Too few days of its own: the role's defaults stand in, and a day at or under them
    # is ordinary, whatever the few past days held.
    history = {"n.ew": dict(list(steady_history(views=past).items())[:history_days])}
    result = score("n.ew", "officer", day_of(*reads(views)), history, {"n.ew": "officer"})
    assert result.verdict is Verdict.NONE


@given(st.floats(0, 40, allow_nan=False))
def test_thresholds_map_scores_to_actions_in_rising_order(points: float) -> None:
    verdict = SETTINGS.verdict(points)
    assert verdict == (
        Verdict.LOCK
        if points >= SETTINGS.lock_at
        else Verdict.STEP_UP
        if points >= SETTINGS.step_up_at
        else Verdict.ALERT
        if points >= SETTINGS.alert_at
        else Verdict.NONE
    )


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=2, max_size=30))
def test_one_wild_day_moves_the_median_baseline_little(values: list[float]) -> None:
    middle, _ = robust_median(values)
    wild, _ = robust_median([*values, 1e9])
    assert min(values) <= middle <= max(values)
    assert wild <= max(values)


def test_scores_are_the_sum_of_their_contributions_and_capped_per_signal() -> None:
    walk = [
        Observation(
            "a.wu", "officer", at(3, i % 60), search=True, searched_id=number("11010519800101", i)
        )
        for i in range(100, 400)
    ]
    result = score("a.wu", "officer", day_of(*walk), {}, {})
    assert all(c.points <= SETTINGS.max_points for c in result.contributions)
    assert result.points == pytest.approx(sum(c.points for c in result.contributions), abs=0.2)


def test_a_burst_in_one_hour_is_seen_before_the_day_adds_up() -> None:
    early = day_of(*reads(70, hour=8))
    result = score("a.wu", "officer", early, {"a.wu": steady_history()}, {"a.wu": "officer"})
    # Under a usual day's views so far, but most of them in one hour.
    assert result.signals == [Signal.BURST.value]
    assert result.contributions[0].explanation.startswith("views_hour: 70 between 08:00 and")
    spread = score("a.wu", "officer", day_of(*reads(70)), {"a.wu": steady_history()}, {})
    assert Signal.BURST.value not in spread.signals


@given(
    st.from_regex(r"[1-6][0-9]{13}", fullmatch=True),
    st.from_regex(r"[1-6][0-9]{13}", fullmatch=True),
    st.integers(0, 999),
    st.integers(0, 999),
)
def test_a_probe_step_needs_the_same_division_and_birth_date(
    first: str, second: str, a: int, b: int
) -> None:
    one, other = number(first, a), number(second, b)
    assert probe_step(one, other) == probe_step(other, one)
    if first != second:
        assert not probe_step(one, other)
    else:
        assert probe_step(one, other) == (0 < abs(a - b) <= 3)


def test_peers_who_never_reach_outside_their_district_make_a_role_median_of_zero() -> None:
    history = {name: steady_history() for name in ("p1", "p2", "p3", "a.wu")}
    result = score(
        "a.wu", "officer", day_of(*reads(6, filtered=1)), history, dict.fromkeys(history, "officer")
    )
    [filtered] = [c for c in result.contributions if c.signal is Signal.FILTERED]
    assert "none on its own usual day, role median 0 →" in filtered.explanation
