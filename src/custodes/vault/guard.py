"""The anomaly guard: reads the access log from where it last stopped, feeds each
official's reads to the pure score (custodes.policy.anomaly) and says whom to act on.

The log is the source: no lookup does any work for the guard, and whatever the guard
keeps is a cache of the log. What it keeps (in the vault's MetaStore, tagged with a key
the database does not hold) is per-account day totals of past days, the flagged records
each account has opened, and what it has done today: counts and keyed record ids, never
a value. A search's sealed details (the ID number searched for) are opened in memory to
spot a walk of ID numbers and dropped; a day not yet over is rebuilt from the log after
a restart, from the first entry of that day.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from custodes.accounts import AccountBook
from custodes.audit import AccessEntry, AccessLog, Outcome
from custodes.crypto.row_mac import RowKind, RowMacs
from custodes.errors import TamperDetected
from custodes.policy import Action
from custodes.policy.anomaly import (
    DayActivity,
    GuardSettings,
    Observation,
    Score,
    Verdict,
    kept_history,
    merge_totals,
    most_urgent,
    observe,
    score,
)
from custodes.storage.base import MetaStore

log = logging.getLogger("custodes.guard")

STATE_KEY = "guard:state"
FLAGGED_KEY = "guard:flagged"
# The reads the guard scores; every other entry moves its cursor on and nothing else.
_READS = frozenset({Action.SEARCH.value, Action.READ.value, Action.REVEAL.value})
# The index whose searched value is an ID number, the one a walk steps through.
_ID_INDEX = "national_id"


@dataclass(slots=True)
class _Kept:
    """What survives a restart: counts and keyed ids only."""

    through: int = 0  # every entry before it is in `history`; the day after, in memory
    day: str | None = None  # the day whose entries from `through` on are held in memory
    history: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)
    vip_seen: dict[str, list[str]] = field(default_factory=dict)
    acted: dict[str, list[Any]] = field(default_factory=dict)  # account -> [day, verdict]

    def document(self) -> dict[str, Any]:
        return {
            "through": self.through,
            "day": self.day,
            "history": self.history,
            "roles": self.roles,
            "vip_seen": self.vip_seen,
            "acted": self.acted,
        }


def _tagged(macs: RowMacs, name: str, document: Mapping[str, Any]) -> bytes:
    tag = macs.tag_hex(RowKind.GUARD, [name, dict(document)])
    return orjson.dumps({"doc": document, "tag": tag}, option=orjson.OPT_SORT_KEYS)


def _untagged(macs: RowMacs, name: str, stored: bytes | None) -> dict[str, Any] | None:
    """The stored document, or None if there is none; TamperDetected if its tag fails."""
    if stored is None:
        return None
    try:
        wrapped = orjson.loads(stored)
        document = wrapped["doc"]
        tag = wrapped["tag"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise TamperDetected(f"the guard's stored {name} is not one it wrote") from None
    if not isinstance(document, dict) or tag != macs.tag_hex(RowKind.GUARD, [name, document]):
        raise TamperDetected(f"the guard's stored {name} is not one it wrote")
    return document


def flagged_records(meta: MetaStore, macs: RowMacs) -> dict[str, int]:
    """The flagged (VIP) record ids, each with the log's size when it was flagged (reads
    before that are no first reads of a flagged record), checked against their tag."""
    document = _untagged(macs, "flagged", meta.get_meta(FLAGGED_KEY))
    records = (document or {}).get("records", {})
    return {str(r): int(at) for r, at in records.items()} if isinstance(records, dict) else {}


def store_flagged(meta: MetaStore, macs: RowMacs, records: Mapping[str, int]) -> None:
    meta.set_meta(FLAGGED_KEY, _tagged(macs, "flagged", {"records": dict(records)}))


@dataclass(frozen=True, slots=True)
class Finding:
    """A score that calls for an action the guard has not yet taken today."""

    score: Score
    verdict: Verdict


class AnomalyGuard:
    """Scores every official from the access log; one per process that acts (a server's
    log sequencer, or its single worker), or made afresh to report (the host command)."""

    def __init__(
        self,
        *,
        log: AccessLog,
        meta: MetaStore,
        accounts: AccountBook,
        macs: RowMacs,
        settings: GuardSettings,
    ) -> None:
        self._log = log
        self._meta = meta
        self._accounts = accounts
        self._macs = macs
        self.settings = settings
        self._lock = threading.Lock()
        self._kept = self._load()
        self._cursor = self._kept.through
        self._today: dict[str, DayActivity] = {}
        self._vip_today: dict[str, set[str]] = {}

    def __repr__(self) -> str:
        return "AnomalyGuard()"

    def _load(self) -> _Kept:
        try:
            document = _untagged(self._macs, "state", self._meta.get_meta(STATE_KEY))
        except TamperDetected:
            # The state is only a cache of the log: read the log again.
            log.error("the guard's stored state failed its tag; rebuilding it from the log")
            document = None
        if document is None:
            return _Kept(through=self._first_kept_entry())
        return _Kept(
            through=int(document.get("through", 0)),
            day=document.get("day"),
            history=document.get("history", {}),
            roles=document.get("roles", {}),
            vip_seen=document.get("vip_seen", {}),
            acted=document.get("acted", {}),
        )

    def _first_kept_entry(self) -> int:
        """Where a guard with nothing kept starts reading: the first entry of the days it
        keeps, found by halving (entries are appended in time order, give or take the
        moments between processes), so that a long log is not read from its start."""
        since = self._log.clock() - (self.settings.history_days + 1) * 86_400
        low, high = 0, self._log.size
        while low < high:
            middle = (low + high) // 2
            if AccessEntry.decode(self._log.raw_entry(middle)).time < since:
                low = middle + 1
            else:
                high = middle
        return low

    def _save(self) -> None:
        self._meta.set_meta(STATE_KEY, _tagged(self._macs, "state", self._kept.document()))

    def _flagged(self) -> dict[str, int]:
        try:
            return flagged_records(self._meta, self._macs)
        except TamperDetected:
            log.error("the stored list of flagged records failed its tag; none is watched")
            return {}

    def catch_up(self, *, keep: bool) -> int:
        """Read every entry since the cursor; with `keep`, store the days that ended. How
        many entries were read."""
        with self._lock:
            flagged = self._flagged()
            read = 0
            end = self._log.size
            # The sealed details of the same entries, a page a query beside them (not a
            # query an entry): only those of ID-number searches are opened.
            details = self._log.sealed_details(self._cursor, end)
            held = next(details, None)
            for index, entry in self._log.entries(self._cursor, end):
                while held is not None and held[0] < index:
                    held = next(details, None)
                sealed = held[1] if held is not None and held[0] == index else None
                self._take(index, entry, flagged, sealed, keep=keep)
                self._cursor = index + 1
                read += 1
            return read

    def _take(
        self,
        index: int,
        entry: AccessEntry,
        flagged: Mapping[str, int],
        sealed: bytes | None,
        *,
        keep: bool,
    ) -> None:
        day = self.settings.day_of(entry.time)
        kept = self._kept
        if kept.day is None:
            kept.day = day
        elif day > kept.day:
            self._end_day(day, index, keep=keep)
        if entry.action not in _READS:
            return
        withheld = entry.detail.get("filtered", 0)
        records: tuple[str, ...]
        if entry.outcome == Outcome.DENIED and entry.detail.get("reason") == "out_of_reach":
            # A record opened by id outside the official's reach: withheld, like one
            # a search leaves out.
            withheld, records = 1, ()
        elif entry.outcome == Outcome.GRANTED:
            records = entry.records
        else:
            return
        kept.roles[entry.actor] = entry.role
        searched = None
        search = entry.action == Action.SEARCH.value
        if search and entry.detail.get("index") == _ID_INDEX and sealed is not None:
            # In memory only, compared with the account's last few and dropped.
            values = self._log.open_details(sealed).get("values", {})
            found = values.get(_ID_INDEX) if isinstance(values, dict) else None
            searched = found if isinstance(found, str) else None
        seen = set(kept.vip_seen.get(entry.actor, ())) | self._vip_today.get(entry.actor, set())
        watched = [r for r in dict.fromkeys(records) if r in flagged and r not in seen]
        # A read from before the flag makes the record known to the account, not first.
        first = [r for r in watched if index >= flagged[r]]
        self._vip_today.setdefault(entry.actor, set()).update(watched)
        activity = self._today.setdefault(entry.actor, DayActivity(kept.day or day))
        observe(
            activity,
            Observation(
                entry.actor,
                entry.role,
                entry.time,
                records=tuple(records),
                filtered=int(withheld) if isinstance(withheld, int) else 0,
                search=search,
                searched_id=searched,
            ),
            self.settings,
            first,
        )

    def _end_day(self, day: str, index: int, *, keep: bool) -> None:
        """Fold the day held in memory into the kept history: a new day began at entry
        `index`."""
        kept = self._kept
        for account, activity in self._today.items():
            days = kept.history.setdefault(account, {})
            merge_totals(days.setdefault(activity.day, {}), activity.totals())
            kept.history[account] = kept_history(days, day, self.settings)
        for account, first in self._vip_today.items():
            kept.vip_seen[account] = sorted({*kept.vip_seen.get(account, ()), *first})
        self._today.clear()
        self._vip_today.clear()
        kept.acted = {a: done for a, done in kept.acted.items() if done[0] >= day}
        kept.day = day
        kept.through = index
        if keep:
            self._save()

    def scores(self, now: float) -> list[Score]:
        """Every official active today, scored, highest first."""
        with self._lock:
            today = self.settings.day_of(now)
            kept = self._kept
            return most_urgent(
                score(
                    account,
                    kept.roles.get(account, ""),
                    activity,
                    kept.history,
                    kept.roles,
                    self.settings,
                )
                for account, activity in self._today.items()
                if activity.day == today
            )

    def findings(self, now: float) -> list[Finding]:
        """The scores that call for more than the guard has done today about the account."""
        found = []
        for one in self.scores(now):
            done = self._kept.acted.get(one.account)
            already = Verdict(done[1]) if done and done[0] == one.day else Verdict.NONE
            if one.verdict > already:
                found.append(Finding(one, one.verdict))
        return found

    def acted(self, finding: Finding) -> None:
        """Remember, across restarts, that the finding was acted on."""
        with self._lock:
            self._kept.acted[finding.score.account] = [finding.score.day, int(finding.verdict)]
            self._save()
