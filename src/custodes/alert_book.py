"""The vault's own record of its alerts, for the watchers to act on.

Every alert the access function raises (custodes.access) is stored here once its entry is
on the access log, before it is sent anywhere (custodes.alerts): the dashboard's alerts
page lists them, and a supervisor or an auditor acknowledges one (someone is looking) and
resolves it (dealt with), each step itself on the access log. A row is tagged under a key
of the vault's (custodes.crypto.row_mac): a database writer who marks an alert resolved,
or edits what it names, leaves a row that shows as tampered, never as dealt with. One who
deletes a row deletes no alert from the access log, where the refusal that raised it
stays, signed.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from custodes.alerts import Alert
from custodes.crypto.row_mac import RowKind, RowMacs
from custodes.errors import AccessDenied, RecordNotFound, StorageError
from custodes.storage.base import AlertRow, AlertStore

# A step that lost a race to another watcher's reads the row again, this many times.
_ATTEMPTS = 8


class AlertState(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


# Which step leads from which state: acknowledging is optional, resolving final.
_NEXT: dict[AlertState, frozenset[AlertState]] = {
    AlertState.OPEN: frozenset({AlertState.ACKNOWLEDGED, AlertState.RESOLVED}),
    AlertState.ACKNOWLEDGED: frozenset({AlertState.RESOLVED}),
    AlertState.RESOLVED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class AlertStep:
    """One watcher's step on an alert, and where it is on the access log."""

    state: AlertState
    by: str
    time: float
    entry: int


@dataclass(frozen=True, slots=True)
class RecordedAlert:
    """An alert as the vault holds it. `tampered`: the row fails its tag, so what it says
    (its state above all) is not to be believed; the access log holds the truth."""

    alert: Alert
    state: AlertState
    steps: tuple[AlertStep, ...]
    tampered: bool = False

    @property
    def id(self) -> str:
        return self.alert.id


class AlertBook:
    """Alerts stored, listed and stepped through, each row authenticated."""

    def __init__(self, store: AlertStore, macs: RowMacs) -> None:
        self._store = store
        self._macs = macs

    def __repr__(self) -> str:
        return "AlertBook()"

    def record(self, alert: Alert) -> None:
        """Store a newly raised alert, open; one raised already is left as it is."""
        self._store.put_alert(self._row(alert, AlertState.OPEN, ()))

    def recent(self, limit: int) -> list[RecordedAlert]:
        return [self._read(row) for row in self._store.list_alerts(limit)]

    def get(self, alert_id: str) -> RecordedAlert:
        row = self._store.get_alert(alert_id)
        if row is None:
            raise RecordNotFound("no such alert")
        return self._read(row)

    def check_step(self, alert_id: str, state: AlertState) -> RecordedAlert:
        """The alert, if `state` may follow its own; else AccessDenied saying why (a
        tampered row is stepped on by no one: its truth is on the access log)."""
        found = self.get(alert_id)
        if found.tampered:
            raise AccessDenied(
                "this alert's stored row fails its seal: it was changed outside custodes; "
                "read its entry on the access log"
            )
        if state not in _NEXT[found.state]:
            raise AccessDenied(f"this alert is {found.state.value} already")
        return found

    def step(self, alert_id: str, state: AlertState, *, by: str, time: float, entry: int) -> None:
        """Move an alert on to `state`, by the watcher `by`, whose step is the access-log
        entry `entry`. Compared and swapped: two watchers at once never both win, and
        the second is told the state the first left."""
        for _ in range(_ATTEMPTS):
            row = self._store.get_alert(alert_id)
            if row is None:
                raise RecordNotFound("no such alert")
            found = self._read(row)
            if found.tampered or state not in _NEXT[found.state]:
                self.check_step(alert_id, state)  # raises with the reason
            steps = (*found.steps, AlertStep(state, by, time, entry))
            if self._store.replace_alert(row, self._row(found.alert, state, steps)):
                return
        raise StorageError("the alert changed under every attempt to step it; try again")

    # -- rows ---------------------------------------------------------------------

    def _fields(
        self, alert: Alert, state: AlertState, steps: tuple[AlertStep, ...]
    ) -> list[object]:
        return [
            alert.id,
            alert.time,
            alert.kind,
            alert.severity,
            alert.account,
            alert.action,
            list(alert.signals),
            alert.entry,
            list(alert.records),
            state.value,
            [[s.state.value, s.by, s.time, s.entry] for s in steps],
        ]

    def _row(self, alert: Alert, state: AlertState, steps: tuple[AlertStep, ...]) -> AlertRow:
        fields = self._fields(alert, state, steps)
        body = orjson.dumps(
            {"fields": fields, "tag": self._macs.tag_hex(RowKind.ALERT, fields)},
            option=orjson.OPT_SORT_KEYS,
        )
        return AlertRow(alert.id, alert.time, body)

    def _read(self, row: AlertRow) -> RecordedAlert:
        try:
            doc = orjson.loads(row.body)
            fields: list[Any] = doc["fields"]
            (
                alert_id,
                raised,
                kind,
                severity,
                account,
                action,
                signals,
                entry,
                records,
                state,
                steps,
            ) = fields
            alert = Alert(
                str(kind),
                str(severity),
                str(account),
                str(action),
                tuple(str(s) for s in signals),
                int(entry),
                tuple(str(r) for r in records),
                time=float(raised),
                id=str(alert_id),
            )
            recorded = RecordedAlert(
                alert,
                AlertState(state),
                tuple(AlertStep(AlertState(s), str(b), float(t), int(e)) for s, b, t, e in steps),
            )
            sound = (
                self._macs.check_hex(RowKind.ALERT, fields, doc.get("tag"))
                and alert_id == row.alert_id
                and float(raised) == row.raised_at
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return _unreadable(row)
        return recorded if sound else _tampered(recorded)


def _tampered(found: RecordedAlert) -> RecordedAlert:
    return RecordedAlert(found.alert, found.state, found.steps, tampered=True)


def _unreadable(row: AlertRow) -> RecordedAlert:
    """A row that is not an alert at all: shown by its id and time, as tampered."""
    alert = Alert("(unreadable)", "critical", "", "", (), -1, time=row.raised_at, id=row.alert_id)
    return RecordedAlert(alert, AlertState.OPEN, (), tampered=True)
