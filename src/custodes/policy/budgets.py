"""How much of the population an official may see: budgets of record views and of misses.

A stolen or corrupt account that may read records at all may read them one at a time
until it has the population; the seed leak took 23 TB that way, through a dashboard
nobody limited. So every record an official is shown counts against budgets per minute,
hour and day, and so does every search that found nothing (a miss): an account walking
valid-checksum ID numbers, guessing, finds mostly nothing, and is stopped after a burst
of misses no clerk at work produces.

Pure: the budgets per role (and an account's own, where its administrator set one), the
counters a read charges, and which limits the totals cross. The vault charges the
counters in its storage (shared by every server process, kept across restarts) inside
its single access function, and refuses a read whose charge crosses a limit: nothing of
it is returned, the refusal is logged with the limits crossed, an alert is raised and the
account is locked, its sessions and tokens ended, until an administrator unlocks it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

from custodes.errors import ConfigurationError
from custodes.policy.decisions import Role


class Counter(StrEnum):
    """What a read charges: records shown, the distinct records among them (a person
    looked at twice in a day is one subject), or a search that found nothing."""

    VIEWS = "views"
    SUBJECTS = "subjects"
    MISSES = "misses"


# The windows counted over, in seconds; each counter starts again at each window's start.
MINUTE, HOUR, DAY = 60, 3600, 86400


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits for one account; None: no limit of that kind."""

    views_per_minute: int | None = None
    views_per_hour: int | None = None
    views_per_day: int | None = None
    subjects_per_day: int | None = None
    misses_per_hour: int | None = None
    misses_per_day: int | None = None
    sessions: int | None = None  # open at once; checked at login, not charged
    page_size: int | None = None  # records one page of a search shows
    search_depth: int | None = None  # records a search may page through, from its first

    def limits(self) -> list[tuple[str, Counter, int, int]]:
        """(name, counter, window, limit) of every limit set."""
        found = []
        for name, counter, window in _LIMITS:
            limit = getattr(self, name)
            if limit is not None:
                found.append((name, counter, window, limit))
        return found

    def with_overrides(self, overrides: Mapping[str, Any]) -> Budget:
        """This budget with an account's own limits put in (checked: CheckedBudget)."""
        return replace(self, **checked_budget(overrides))


_LIMITS: tuple[tuple[str, Counter, int], ...] = (
    ("views_per_minute", Counter.VIEWS, MINUTE),
    ("views_per_hour", Counter.VIEWS, HOUR),
    ("views_per_day", Counter.VIEWS, DAY),
    ("subjects_per_day", Counter.SUBJECTS, DAY),
    ("misses_per_hour", Counter.MISSES, HOUR),
    ("misses_per_day", Counter.MISSES, DAY),
)
LIMIT_NAMES: tuple[str, ...] = tuple(name for name, _, _ in _LIMITS)
# What an account may be given of its own: the counters' limits, its open sessions, and
# how far its searches page.
PAGING_NAMES: tuple[str, ...] = ("page_size", "search_depth")
SETTING_NAMES: tuple[str, ...] = (*LIMIT_NAMES, "sessions", *PAGING_NAMES)
# Sessions an account of each role may have open at once: a desk and a phone, say, and
# a third for an investigator in the field. A thief holding a stolen password cannot
# open more beside the official's own.
DEFAULT_SESSIONS: Mapping[Role, int] = {
    Role.OFFICER: 2,
    Role.INVESTIGATOR: 3,
    Role.SUPERVISOR: 3,
    Role.AUDITOR: 3,
    Role.ADMIN: 3,
}
# Every limit lifted: an account's own budget for work no person does by hand (a
# measurement, a drill), set by an administrator and on the log like any account change.
NO_LIMITS: Mapping[str, None] = dict.fromkeys(SETTING_NAMES)
# Whatever an administrator sets, a limit is at most this (a day's work of a busy desk
# is a few hundred records; beyond this a "budget" stops nothing).
MAX_LIMIT = 1_000_000

# What a role may see without anyone asking for more. A desk officer answers the public
# one person at a time; an investigator works through a case's people; a supervisor
# reviews both, on the same budget. Roles that read no records (auditor, admin) have
# nothing to spend.
_CASEWORK = Budget(
    views_per_minute=60,
    views_per_hour=600,
    views_per_day=2000,
    subjects_per_day=1000,
    misses_per_hour=60,
    misses_per_day=200,
    page_size=50,
    search_depth=100,
)
DEFAULT_BUDGETS: Mapping[Role, Budget] = {
    Role.OFFICER: Budget(
        views_per_minute=30,
        views_per_hour=300,
        views_per_day=1000,
        subjects_per_day=400,
        misses_per_hour=30,
        misses_per_day=100,
        # A desk answers for the person in front of it: a name shared by more than a
        # page of people is narrowed by a birth date, not paged through.
        page_size=20,
        search_depth=40,
    ),
    Role.INVESTIGATOR: _CASEWORK,
    Role.SUPERVISOR: _CASEWORK,
}


def checked_budget(overrides: Mapping[str, Any]) -> dict[str, int | None]:
    """An account's own limits as stored or typed: known names, whole numbers from 0 to
    MAX_LIMIT, or None to lift one. ConfigurationError naming the limit, never silently
    kept otherwise."""
    known = {f.name for f in fields(Budget)}
    checked: dict[str, int | None] = {}
    for name, value in overrides.items():
        if name not in known:
            raise ConfigurationError(f"no budget limit is called {name!r}")
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LIMIT
        ):
            raise ConfigurationError(
                f"the budget limit {name} is a whole number, 0 to {MAX_LIMIT:,}"
            )
        checked[name] = value
    return checked


def sessions_for(
    role: Role,
    overrides: Mapping[str, Any] | None = None,
    roles: Mapping[str, Mapping[str, Any]] | None = None,
) -> int | None:
    """How many sessions an account of `role` may have open at once: its own setting,
    else its role's in this vault (`roles`, by role name), else the default; None: as
    many as it likes."""
    for own in (overrides, (roles or {}).get(role.value)):
        checked = checked_budget(own or {})
        if "sessions" in checked:
            return checked["sessions"]
    return DEFAULT_SESSIONS.get(role)


def budget_for(
    role: Role,
    overrides: Mapping[str, Any] | None = None,
    roles: Mapping[str, Mapping[str, Any]] | None = None,
) -> Budget | None:
    """The budget of an account of `role`: the default, with its role's limits in this
    vault put in (`roles`, by role name), then the account's own; None for a role that
    reads no records."""
    base = DEFAULT_BUDGETS.get(role)
    if base is None:
        return None
    role_own = (roles or {}).get(role.value)
    if role_own:
        base = base.with_overrides(role_own)
    return base.with_overrides(overrides) if overrides else base


@dataclass(frozen=True, slots=True)
class Charge:
    """What one read adds to its account's counters: (counter, window, window start,
    amount) for every limit the budget sets, and the records it showed, which a counter
    of distinct subjects counts (its amount is at most their number)."""

    items: tuple[tuple[Counter, int, int, int], ...]
    subjects: tuple[str, ...] = ()

    @property
    def rows(self) -> list[tuple[str, int, int]]:
        """As UsageStore.charge_usage takes them: (counter/window, window start, amount)."""
        return [(counter_key(c, w), start, amount) for c, w, start, amount in self.items]

    @property
    def keys(self) -> list[tuple[str, int]]:
        """The storage counters it adds to: (counter/window, window start)."""
        return [(key, start) for key, start, _ in self.rows]

    @property
    def distinct(self) -> str | None:
        """The storage counter of distinct subjects it adds to, if any."""
        for counter, window, _, _ in self.items:
            if counter is Counter.SUBJECTS:
                return counter_key(counter, window)
        return None


def counter_key(counter: Counter, window: int) -> str:
    return f"{counter.value}/{window}"


def charge_for(
    budget: Budget, now: float, *, views: int, missed: bool, subjects: Sequence[str] = ()
) -> Charge:
    """The charge of a read that showed `views` records (or found none: missed), the
    records shown being `subjects`."""
    windows = {(counter, window) for _, counter, window, _ in budget.limits()}
    shown = tuple(dict.fromkeys(subjects))
    amounts = {Counter.VIEWS: views, Counter.SUBJECTS: len(shown), Counter.MISSES: int(missed)}
    return Charge(
        tuple(
            (counter, window, window_start(now, window), amounts[counter])
            for counter, window in sorted(windows)
            if amounts[counter]
        ),
        shown,
    )


def paging_crossed(budget: Budget | None, offset: int, size: int) -> list[str]:
    """The paging limits a search page asking for `size` records from position `offset`
    would cross, by name: empty if within (or for a role with no budget)."""
    if budget is None:
        return []
    found = []
    if budget.page_size is not None and size > budget.page_size:
        found.append("page_size")
    if budget.search_depth is not None and offset + size > budget.search_depth:
        found.append("search_depth")
    return found


def window_start(now: float, window: int) -> int:
    """The start of the window `now` falls in: windows align on UTC multiples."""
    return int(now // window) * window


def crossed(budget: Budget, charge: Charge, totals: Sequence[int]) -> list[str]:
    """The limits that the totals after a charge cross, by name: empty if within."""
    after = {
        (counter, window): total
        for (counter, window, _, _), total in zip(charge.items, totals, strict=True)
    }
    return [
        name
        for name, counter, window, limit in budget.limits()
        if after.get((counter, window), 0) > limit
    ]
