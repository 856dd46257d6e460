"""The budgets' pure rules: which counters a read charges, and which limits it crosses."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from custodes.errors import ConfigurationError
from custodes.policy import Role
from custodes.policy.budgets import (
    DAY,
    HOUR,
    MINUTE,
    Budget,
    Counter,
    budget_for,
    charge_for,
    crossed,
    window_start,
)

NOON = 1_767_225_600.0 + 12 * HOUR  # 2026-01-01 12:00 UTC


def test_roles_that_read_no_records_have_no_budget_and_readers_have_every_limit() -> None:
    assert budget_for(Role.AUDITOR) is None and budget_for(Role.ADMIN) is None
    for role in (Role.OFFICER, Role.INVESTIGATOR, Role.SUPERVISOR):
        budget = budget_for(role)
        assert budget is not None and len(budget.limits()) == 6


def test_an_accounts_own_limits_replace_its_roles_and_are_checked() -> None:
    budget = budget_for(Role.OFFICER, {"views_per_hour": 5, "misses_per_day": None})
    assert budget is not None
    assert budget.views_per_hour == 5 and budget.misses_per_day is None
    with pytest.raises(ConfigurationError, match="views_per_year"):
        budget_for(Role.OFFICER, {"views_per_year": 5})
    for bad in (-1, 1.5, True, "10", 10**9):
        with pytest.raises(ConfigurationError, match="views_per_hour"):
            budget_for(Role.OFFICER, {"views_per_hour": bad})


def test_a_read_charges_its_views_and_a_search_that_found_nothing_charges_a_miss() -> None:
    budget = Budget(views_per_minute=3, views_per_day=10, misses_per_hour=2)
    shown = charge_for(budget, NOON + 75, views=2, missed=False)
    assert shown.items == (
        (Counter.VIEWS, MINUTE, int(NOON) + 60, 2),
        (Counter.VIEWS, DAY, int(NOON) - 12 * HOUR, 2),
    )
    assert shown.keys == [("views/60", int(NOON) + 60), ("views/86400", int(NOON) - 12 * HOUR)]
    missed = charge_for(budget, NOON, views=0, missed=True)
    assert missed.items == ((Counter.MISSES, HOUR, int(NOON), 1),)


def test_a_read_names_its_subjects_once_for_the_distinct_subjects_counter() -> None:
    budget = Budget(views_per_day=10, subjects_per_day=4)
    charge = charge_for(budget, NOON, views=3, missed=False, subjects=["r1", "r2", "r1"])
    assert charge.items == (
        (Counter.SUBJECTS, DAY, int(NOON) - 12 * HOUR, 2),
        (Counter.VIEWS, DAY, int(NOON) - 12 * HOUR, 3),
    )
    assert charge.subjects == ("r1", "r2") and charge.distinct == "subjects/86400"
    assert charge_for(budget, NOON, views=0, missed=True).distinct is None


def test_a_charge_crosses_a_limit_only_beyond_it() -> None:
    budget = Budget(views_per_minute=3, views_per_day=10)
    charge = charge_for(budget, NOON, views=1, missed=False)
    assert crossed(budget, charge, [3, 3]) == []
    assert crossed(budget, charge, [4, 4]) == ["views_per_minute"]
    assert crossed(budget, charge, [4, 11]) == ["views_per_minute", "views_per_day"]
    # A limit of zero: nothing at all.
    assert crossed(
        Budget(views_per_hour=0),
        charge_for(Budget(views_per_hour=0), NOON, views=1, missed=False),
        [1],
    ) == ["views_per_hour"]


@given(st.floats(min_value=0, max_value=4e9), st.sampled_from([MINUTE, HOUR, DAY]))
def test_every_moment_falls_in_the_window_that_starts_at_its_start(now: float, window: int) -> None:
    start = window_start(now, window)
    assert start <= now < start + window and start % window == 0
