"""Anomaly scores: each official's day so far held against their own past days and their
role's, signal by signal, with every point of the score explained.

Budgets (custodes.policy.budgets) stop volume; a curious insider looking up a celebrity,
an ex-partner or a neighbour in another district stays far below any budget. What gives
them away is change: more people than they usually look at, records outside their
district, work at 03:00, searches that find nothing, ID numbers walked one after another,
a flagged record opened for the first time. Pure: observations in, explained scores and
the action each calls for out; the vault's guard feeds it from the access log.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from zoneinfo import ZoneInfo

from custodes.errors import ConfigurationError


class Signal(StrEnum):
    """What a score is made of; the names an explanation and an alert use."""

    VIEWS = "views"  # records shown today
    BURST = "views_hour"  # records shown in the busiest hour today
    SUBJECTS = "subjects"  # distinct records shown today
    FILTERED = "filtered"  # records withheld today as outside the official's reach
    OFF_HOURS = "off_hours"  # reads outside working hours today
    MISSES = "miss_ratio"  # searches that found nothing, of all searches today
    PROBES = "id_probes"  # searched ID numbers stepping from one another
    VIP = "vip_first"  # flagged records this account opened for the first time


class Verdict(IntEnum):
    """What a score calls for, in rising order."""

    NONE = 0
    ALERT = 1  # a warning to whoever watches
    STEP_UP = 2  # the account's sessions ended: it logs in again, with its second factor
    LOCK = 3  # locked until an administrator unlocks it

    @property
    def severity(self) -> str:
        return {Verdict.ALERT: "warning", Verdict.STEP_UP: "high", Verdict.LOCK: "critical"}.get(
            self, "info"
        )


# What a day of each counted signal looks like for a role with no history to go by:
# a busy desk, not a quiet one, so that a new account is not flagged for working.
_ROLE_DAY: Mapping[str, Mapping[Signal, float]] = {
    "officer": {Signal.VIEWS: 80, Signal.SUBJECTS: 60, Signal.FILTERED: 2, Signal.OFF_HOURS: 2},
    "investigator": {
        Signal.VIEWS: 200,
        Signal.SUBJECTS: 150,
        Signal.FILTERED: 4,
        Signal.OFF_HOURS: 4,
    },
    "supervisor": {
        Signal.VIEWS: 200,
        Signal.SUBJECTS: 150,
        Signal.FILTERED: 4,
        Signal.OFF_HOURS: 4,
    },
}
_ANY_ROLE_DAY = _ROLE_DAY["officer"]
_COUNTED = (Signal.VIEWS, Signal.SUBJECTS, Signal.FILTERED, Signal.OFF_HOURS)
# The share of a usual day's views that a busy hour of it holds: a desk's work comes in
# waves, so an hour of a quarter of the day is ordinary, and a burst is held against that.
_BUSY_HOUR_SHARE = 0.25
# Points per doubling over the baseline, for the counted signals.
_WEIGHTS: Mapping[Signal, float] = {
    Signal.VIEWS: 1.5,
    Signal.SUBJECTS: 1.5,
    Signal.FILTERED: 1.5,
    Signal.OFF_HOURS: 1.5,
}


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """Where scores turn into actions, and what counts as working hours."""

    alert_at: float = 3.0
    step_up_at: float = 6.0
    lock_at: float = 9.0
    work_starts: int = 7  # hour of the day, local
    work_ends: int = 20
    timezone: str = "Asia/Shanghai"
    history_days: int = 14  # past days kept per account
    min_history_days: int = 3  # fewer: the role's baseline stands in for the account's own
    min_peers: int = 3  # fewer accounts of a role with history: the role's defaults
    min_searches: int = 10  # a miss ratio over fewer searches says nothing
    max_points: float = 10.0  # what one signal may add at most

    def __post_init__(self) -> None:
        if not 0 < self.alert_at <= self.step_up_at <= self.lock_at:
            raise ConfigurationError("guard thresholds rise: 0 < alert <= step_up <= lock")
        if not 0 <= self.work_starts < self.work_ends <= 24:
            raise ConfigurationError("working hours run from a start to a later end, 0-24")
        try:
            ZoneInfo(self.timezone)
        except (KeyError, ValueError):
            raise ConfigurationError("the guard's time zone is not a known zone") from None

    def verdict(self, score: float) -> Verdict:
        if score >= self.lock_at:
            return Verdict.LOCK
        if score >= self.step_up_at:
            return Verdict.STEP_UP
        if score >= self.alert_at:
            return Verdict.ALERT
        return Verdict.NONE

    def local(self, moment: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(moment, ZoneInfo(self.timezone))

    def day_of(self, moment: float) -> str:
        """The local date a moment falls on: the unit of an account's history."""
        return self.local(moment).date().isoformat()

    def off_hours(self, moment: float) -> bool:
        hour = self.local(moment).hour
        return not self.work_starts <= hour < self.work_ends


@dataclass(frozen=True, slots=True)
class Observation:
    """One access-log entry as the guard sees it: an official's read, no value but the ID
    number searched for, which is held only in memory and never kept."""

    account: str
    role: str
    time: float
    records: tuple[str, ...] = ()
    filtered: int = 0
    search: bool = False
    searched_id: str | None = None  # the national ID a search asked for, if it asked one


@dataclass(slots=True)
class DayActivity:
    """An account's activity on one local day. `subjects`, `recent_ids` and `vip_first`
    live in memory; `totals` is what a day leaves in the account's history."""

    day: str
    views: int = 0
    filtered: int = 0
    off_hours: int = 0
    searches: int = 0
    misses: int = 0
    probes: int = 0
    subjects: set[str] = field(default_factory=set)
    hours: dict[int, int] = field(default_factory=dict)  # local hour -> records shown
    recent_ids: list[str] = field(default_factory=list)
    vip_first: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, float]:
        return {
            Signal.VIEWS.value: self.views,
            Signal.SUBJECTS.value: len(self.subjects),
            Signal.FILTERED.value: self.filtered,
            Signal.OFF_HOURS.value: self.off_hours,
            "searches": self.searches,
            "misses": self.misses,
        }


# How many searched numbers back a probe is looked for; a walk steps from its last few.
_RECENT_IDS = 8
# How far apart two sequence codes may be and still count as a step of a walk (a walker
# skips the ones of the other sex, and the odd number that fails its check).
_SEQUENCE_STEP = 3


def probe_step(earlier: str, later: str) -> bool:
    """Whether `later` steps from `earlier` as an enumerator would: the same 14-digit
    division code and birth date, and either a sequence code a few apart or the same
    sequence with another check character. Numbers are compared, never kept."""
    if len(earlier) != 18 or len(later) != 18 or earlier == later:
        return False
    if earlier[:14] != later[:14] or not (earlier[14:17] + later[14:17]).isdigit():
        return False
    if earlier[:17] == later[:17]:
        return True  # the check character walked
    return 0 < abs(int(earlier[14:17]) - int(later[14:17])) <= _SEQUENCE_STEP


def observe(
    day: DayActivity, seen: Observation, settings: GuardSettings, vip_first: Sequence[str] = ()
) -> None:
    """Add one entry to its account's day. `vip_first`: the flagged records among its
    records that this account had never opened before (the caller keeps who saw what)."""
    shown = len(seen.records)
    day.views += shown
    if shown:
        hour = settings.local(seen.time).hour
        day.hours[hour] = day.hours.get(hour, 0) + shown
    day.subjects.update(seen.records)
    day.filtered += seen.filtered
    if settings.off_hours(seen.time):
        day.off_hours += 1
    if seen.search:
        day.searches += 1
        if not shown:
            day.misses += 1
    if seen.searched_id is not None:
        number = seen.searched_id.upper()
        if any(probe_step(before, number) for before in day.recent_ids):
            day.probes += 1
        day.recent_ids = [*day.recent_ids[-(_RECENT_IDS - 1) :], number]
    day.vip_first.extend(vip_first)


@dataclass(frozen=True, slots=True)
class Contribution:
    """One signal's part of a score, with the sentence that explains it."""

    signal: Signal
    points: float
    explanation: str


@dataclass(frozen=True, slots=True)
class Score:
    """An account's score today: the sum of its contributions, and what it calls for."""

    account: str
    role: str
    day: str
    points: float
    verdict: Verdict
    contributions: tuple[Contribution, ...]
    records: tuple[str, ...] = ()  # flagged records opened for the first time

    @property
    def signals(self) -> list[str]:
        return [c.signal.value for c in self.contributions]

    def explained(self) -> list[str]:
        return [c.explanation for c in self.contributions]


def robust_median(values: Sequence[float]) -> tuple[float, float]:
    """Median and scaled MAD (an estimate of the spread a standard deviation would give
    for normal data), both unmoved by a few wild days."""
    if not values:
        return 0.0, 0.0
    middle = statistics.median(values)
    mad = statistics.median(abs(v - middle) for v in values)
    return float(middle), 1.4826 * float(mad)


@dataclass(frozen=True, slots=True)
class Baseline:
    """What a signal's day usually is for this account (if it has history enough) and
    for its role."""

    own: float | None
    own_spread: float
    role: float
    role_from_peers: bool


def baselines(
    account: str,
    role: str,
    history: Mapping[str, Mapping[str, Mapping[str, float]]],
    roles: Mapping[str, str],
    settings: GuardSettings,
) -> dict[str, Baseline]:
    """Per signal (and the miss ratio), the account's own baseline and its role's: the
    median of its past days, and the median of its role peers' medians (or the role's
    defaults, with few peers). `history`: account -> day -> totals, past days only."""

    def own_days(name: str) -> list[Mapping[str, float]]:
        days = history.get(name, {})
        return [days[d] for d in sorted(days)[-settings.history_days :]]

    def ratio(totals: Mapping[str, float]) -> float | None:
        searches = totals.get("searches", 0)
        return totals.get("misses", 0) / searches if searches >= settings.min_searches else None

    defaults = _ROLE_DAY.get(role, _ANY_ROLE_DAY)
    peers = [
        name
        for name, peer_role in roles.items()
        if peer_role == role
        and name != account
        and len(own_days(name)) >= settings.min_history_days
    ]
    mine = own_days(account)
    found: dict[str, Baseline] = {}
    for signal in (*_COUNTED, Signal.MISSES):
        if signal is Signal.MISSES:
            pick = ratio
            default = 0.1
        else:
            key = signal.value

            def pick(totals: Mapping[str, float], key: str = key) -> float | None:
                return float(totals.get(key, 0))

            default = defaults[signal]
        own_values = [v for v in map(pick, mine) if v is not None]
        own: float | None = None
        spread = 0.0
        if len(own_values) >= settings.min_history_days:
            own, spread = robust_median(own_values)
        peer_medians = []
        for name in peers:
            values = [v for v in map(pick, own_days(name)) if v is not None]
            if values:
                peer_medians.append(robust_median(values)[0])
        from_peers = len(peer_medians) >= settings.min_peers
        role_value = robust_median(peer_medians)[0] if from_peers else default
        found[signal.value] = Baseline(own, spread, role_value, from_peers)
    return found


def _times(value: float, base: float) -> str:
    return f"{value / base:.1f}×"


def score(
    account: str,
    role: str,
    today: DayActivity,
    history: Mapping[str, Mapping[str, Mapping[str, float]]],
    roles: Mapping[str, str],
    settings: GuardSettings = GuardSettings(),
) -> Score:
    """The account's score for its day so far, each contribution explained."""
    base = baselines(account, role, history, roles, settings)
    floors = _ROLE_DAY.get(role, _ANY_ROLE_DAY)
    totals = today.totals()
    parts: list[Contribution] = []
    cap = settings.max_points
    for signal in _COUNTED:
        value = totals[signal.value]
        b = base[signal.value]
        # Held against the higher of the two: busy for this account but ordinary for its
        # role, or the reverse, is not yet strange. A role's floor keeps a quiet history
        # (two views a day) from turning an ordinary day into an alarm.
        usual = max(b.own if b.own is not None else 0.0, b.role, floors[signal] / 4)
        tolerance = usual + 3 * b.own_spread
        if value <= tolerance or value < 2 * usual:
            continue
        points = min(cap, _WEIGHTS[signal] * math.log2(value / usual))
        if b.own is None:
            own_text = "no history of its own"
        elif b.own == 0:
            own_text = "none on its own usual day"
        else:
            own_text = f"{_times(value, b.own)} own baseline ({b.own:g}/day)"
        kind = "median" if b.role_from_peers else "default"
        role_text = f"{_times(value, b.role)} role {kind}" if b.role else f"role {kind} 0"
        parts.append(
            Contribution(
                signal,
                round(points, 1),
                f"{signal.value}: {value:g} today, {own_text}, {role_text} → +{points:.1f}",
            )
        )
    if today.hours:
        hour, value = max(today.hours.items(), key=lambda item: (item[1], -item[0]))
        b = base[Signal.VIEWS.value]
        day_usual = max(b.own if b.own is not None else 0.0, b.role, floors[Signal.VIEWS] / 4)
        usual = day_usual * _BUSY_HOUR_SHARE
        if value >= 2 * usual:
            points = min(cap, _WEIGHTS[Signal.VIEWS] * math.log2(value / usual))
            parts.append(
                Contribution(
                    Signal.BURST,
                    round(points, 1),
                    f"{Signal.BURST.value}: {value:g} between {hour:02d}:00 and "
                    f"{hour + 1:02d}:00, {value / usual:.1f}× a busy hour of its usual day "
                    f"({usual:g}) → +{points:.1f}",
                )
            )
    searches, misses = totals["searches"], totals["misses"]
    if searches >= settings.min_searches:
        b = base[Signal.MISSES.value]
        usual = max(b.own if b.own is not None else 0.0, b.role)
        observed = misses / searches
        if observed > max(2 * usual, 0.5):
            points = min(cap, 3.0 * (observed - usual) / max(1.0 - usual, 0.1))
            own_text = f"own baseline {b.own:.2f}" if b.own is not None else "no history of its own"
            parts.append(
                Contribution(
                    Signal.MISSES,
                    round(points, 1),
                    f"{Signal.MISSES.value}: {misses:g} of {searches:g} searches found "
                    f"nothing today ({observed:.2f}), {own_text}, role {b.role:.2f} → "
                    f"+{points:.1f}",
                )
            )
    if today.probes >= 3:
        # No official needs the person born the same day in the same county with the
        # next sequence number: a walk is suspicious whatever the history.
        points = min(cap, 1.0 + today.probes / 2)
        parts.append(
            Contribution(
                Signal.PROBES,
                round(points, 1),
                f"{Signal.PROBES.value}: {today.probes} searched ID numbers stepped from one "
                f"just searched (same division and birth date) → +{points:.1f}",
            )
        )
    if today.vip_first:
        points = min(cap, 3.0 * len(today.vip_first))
        parts.append(
            Contribution(
                Signal.VIP,
                round(points, 1),
                f"{Signal.VIP.value}: {len(today.vip_first)} flagged record(s) opened by this "
                f"account for the first time → +{points:.1f}",
            )
        )
    total = round(sum(p.points for p in parts), 1)
    return Score(
        account,
        role,
        today.day,
        total,
        settings.verdict(total),
        tuple(sorted(parts, key=lambda p: -p.points)),
        tuple(dict.fromkeys(today.vip_first)),
    )


def kept_history(
    days: Mapping[str, Mapping[str, float]], today: str, settings: GuardSettings
) -> dict[str, dict[str, float]]:
    """An account's past days as kept: the newest `history_days`, today left out."""
    past = sorted(d for d in days if d < today)[-settings.history_days :]
    return {d: dict(days[d]) for d in past}


def merge_totals(into: dict[str, float], more: Mapping[str, float]) -> None:
    """Add a day's totals to what is kept for the same day (distinct subjects add up: a
    day split by a restart counts the people seen on both sides twice, never fewer)."""
    for key, value in more.items():
        into[key] = into.get(key, 0) + value


def most_urgent(scores: Iterable[Score]) -> list[Score]:
    """Scores by points, highest first."""
    return sorted(scores, key=lambda s: (-s.points, s.account))
