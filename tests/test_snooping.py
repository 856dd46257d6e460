"""Threats 10 and 12: the curious insider and the enumerator stay under every budget; the
anomaly guard, reading the access log, scores them against their own history and their
role's, and alerts, ends sessions or locks, each act on the log and in the alert sent,
with no searched value anywhere.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from custodes.access import ANOMALY_ALERT
from custodes.alerts import Alert
from custodes.errors import AccessDenied, AuthenticationFailed
from custodes.policy import AccessPurpose, Action, Role
from custodes.records.idnumber import check_char
from custodes.vault import Session, Vault
from custodes.vault.guard import FLAGGED_KEY, STATE_KEY
from tests.conftest import PASSWORD, TOTP_SECRETS, login, make_vault, totp_now, write_jsonl

PURPOSE = AccessPurpose("check a resident's address", "C-1")
SHANGHAI = dt.timezone(dt.timedelta(hours=8))


def resident_id(district: str, birth: str, sequence: str) -> str:
    first17 = district + birth + sequence
    return first17 + check_char(first17)


def person(number: str, name: str) -> dict[str, object]:
    return {
        "type": "person",
        "name": name,
        "national_id": number,
        "gender": "male" if int(number[16]) % 2 else "female",
        "birth_date": f"{number[6:10]}-{number[10:12]}-{number[12:14]}",
    }


SHANGHAI_PEOPLE = [resident_id("310104", f"1985{m:02d}{m + 10:02d}", "123") for m in range(1, 11)]
BEIJING_PEOPLE = [resident_id("110101", f"1990{m:02d}{m + 10:02d}", "111") for m in range(1, 11)]
CELEBRITY = resident_id("110101", "19700707", "777")
GIVEN = "甲乙丙丁戊己庚辛壬癸"
RECORDS = [
    *(person(n, f"沪测{GIVEN[i]}") for i, n in enumerate(SHANGHAI_PEOPLE)),
    *(person(n, f"京测{GIVEN[i]}") for i, n in enumerate(BEIJING_PEOPLE)),
    person(CELEBRITY, "明星测"),
]


class Moment:
    """The vault's clock, set by the test to a Shanghai wall-clock time (from before the
    records are stored: the guard's days follow the log's times)."""

    def __init__(self, vault: Vault) -> None:
        self.now = dt.datetime(2026, 12, 1, 8, 0, tzinfo=SHANGHAI).timestamp()
        vault._clock.moved = lambda: self.now  # type: ignore[attr-defined]
        vault._clock.moment = self  # type: ignore[attr-defined]

    def set(self, day: int, hour: int, minute: int = 0) -> None:
        self.now = dt.datetime(2026, 12, day, hour, minute, tzinfo=SHANGHAI).timestamp()

    def tick(self, seconds: float = 20) -> None:
        self.now += seconds


@pytest.fixture(params=["memory", "sqlite"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, request.param)
    Moment(v)
    assert v.ingest(v.operator, write_jsonl(tmp_path / "people.jsonl", RECORDS)).rejected == 0
    yield v
    v.close()


@pytest.fixture
def moment(vault: Vault) -> Moment:
    found: Moment = vault._clock.moment  # type: ignore[attr-defined]
    return found


@pytest.fixture
def alerts(vault: Vault) -> list[Alert]:
    raised: list[Alert] = []
    vault._gate.send_alerts_to(raised.append)
    return raised


def search(vault: Vault, session: Session, number: str, moment: Moment) -> list[Any]:
    moment.tick()
    return vault.search(
        session, PURPOSE, record_type="person", index="national_id", values={"national_id": number}
    )


def again(vault: Vault, name: str) -> Session:
    return vault.login(name, PASSWORD, totp=totp_now(vault, TOTP_SECRETS[name]))


def guard_entries(vault: Vault) -> list[Any]:
    return [e for _, e in vault._log.entries() if e.action == Action.GUARD_ACT.value]


def stored_everywhere(vault: Vault) -> bytes:
    """Everything the guard and the log left where a thief or a reader could look."""
    parts = [orjson.dumps(e.encode().decode()) for _, e in vault._log.entries()]
    for key in (STATE_KEY, FLAGGED_KEY):
        parts.append(vault._storage.get_meta(key) or b"")
    return b"\n".join(parts)


def test_an_officer_walking_sequential_id_numbers_is_scored_and_locked(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    walker = login(vault, Role.OFFICER, "o.walker")
    walked = [resident_id("310104", "19800101", f"{n:03d}") for n in range(100, 120)]
    for number in walked:
        assert search(vault, walker, number, moment) == []  # each under every budget
    [acted] = vault.guard_round()
    assert acted.account == "o.walker"
    assert "id_probes" in acted.signals
    # Locked, its session ended: the password and a fresh code open nothing.
    with pytest.raises(AuthenticationFailed):
        search(vault, walker, walked[0], moment)
    with pytest.raises(AuthenticationFailed):
        again(vault, "o.walker")
    [entry] = guard_entries(vault)
    assert entry.actor == "o.walker" and entry.detail["guard"] == "lock"
    assert entry.detail["alert"] == ANOMALY_ALERT and entry.detail["locked"] is True
    assert "id_probes" in entry.detail["signals"]
    assert any(line.startswith("id_probes: 19 ") for line in entry.detail["explained"])
    [alert] = alerts
    assert (alert.kind, alert.severity, alert.account) == (ANOMALY_ALERT, "critical", "o.walker")
    assert alert.action == Action.GUARD_ACT.value and "id_probes" in alert.signals
    assert alert.entry == next(i for i, e in vault._log.entries() if e == entry)
    # Nothing personal was kept or sent: not one number walked, nor its 14-digit stem.
    kept = stored_everywhere(vault) + orjson.dumps(alert.document())
    assert b"19800101" not in kept
    assert all(n.encode() not in kept for n in walked)
    # The next round acts no more on what it acted on already.
    assert vault.guard_round() == []
    [locked] = [a for a in vault.admin.list_accounts(vault.operator) if a.username == "o.walker"]
    assert locked.locked


def test_an_officer_browsing_outside_their_district_at_three_in_the_morning_gets_an_alert(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    moment.set(4, 3)
    night = login(vault, Role.OFFICER, "o.night", district="110101")
    for number in SHANGHAI_PEOPLE[:5]:
        assert search(vault, night, number, moment) == []  # withheld: another district
    [acted] = vault.guard_round()
    assert set(acted.signals) == {"filtered", "off_hours"}
    [alert] = alerts
    assert alert.severity == "warning" and set(alert.signals) == {"filtered", "off_hours"}
    [entry] = guard_entries(vault)
    assert entry.detail["guard"] == "alert" and entry.detail["locked"] is False
    explained = " | ".join(entry.detail["explained"])
    assert "filtered: 5 today" in explained and "off_hours: 5 today" in explained
    # An alert only: the official works on.
    assert search(vault, night, BEIJING_PEOPLE[0], moment)


def test_a_stranger_of_a_normal_officer_with_steady_history_is_not_flagged(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    login(vault, Role.OFFICER, "o.steady", district="110101")
    for day in (1, 2, 3, 4):
        moment.set(day, 10)
        session = again(vault, "o.steady")
        for number in BEIJING_PEOPLE[day : day + 6]:
            assert search(vault, session, number, moment)
        if day < 4:
            vault.guard_round()
    assert vault.guard_round() == []
    assert not alerts and not guard_entries(vault)
    [steady] = vault.score_accounts(vault.operator)
    assert steady.account == "o.steady" and steady.points == 0 and not steady.contributions
    # Its past days are kept as counts, nothing more.
    state = orjson.loads(vault._storage.get_meta(STATE_KEY) or b"{}")["doc"]
    assert sorted(state["history"]["o.steady"]) == ["2026-12-01", "2026-12-02", "2026-12-03"]
    assert state["history"]["o.steady"]["2026-12-02"]["views"] == 6


def test_a_first_time_read_of_a_flagged_record_raises_an_alert(
    vault: Vault, moment: Moment, alerts: list[Alert]
) -> None:
    desk = login(vault, Role.SUPERVISOR, "s.desk")
    [star] = search(vault, desk, CELEBRITY, moment)
    assert vault.flag_record(vault.operator, star.record_id)
    assert not vault.flag_record(vault.operator, star.record_id)  # already
    vault.guard_round()  # a read before the flag is no first read of a flagged record
    assert not alerts
    curious = login(vault, Role.OFFICER, "o.curious")
    assert search(vault, curious, CELEBRITY, moment)
    [acted] = vault.guard_round()
    assert acted.signals == ["vip_first"] and acted.records == (star.record_id,)
    [alert] = alerts
    assert alert.severity == "warning" and list(alert.records) == [star.record_id]
    [entry] = guard_entries(vault)
    assert entry.records == (star.record_id,) and entry.actor == "o.curious"
    # A second read is no first read; another account's first read is.
    vault.record(curious, PURPOSE, star.record_id)
    vault.record(desk, PURPOSE, star.record_id)
    assert vault.guard_round() == []
    other = login(vault, Role.OFFICER, "o.other")
    vault.record(other, PURPOSE, star.record_id)
    assert [s.account for s in vault.guard_round()] == ["o.other"]
    flags = [e for _, e in vault._log.entries() if e.action == Action.GUARD_FLAG.value]
    assert [e.actor for e in flags] == ["operator", "operator"]


def test_only_the_host_operator_flags_and_officials_read_no_scores(vault: Vault) -> None:
    officer = login(vault, Role.OFFICER, "o.nosy")
    with pytest.raises(AccessDenied):
        vault.score_accounts(officer)
    with pytest.raises(AccessDenied):
        vault.flag_record(officer, "whatever")
