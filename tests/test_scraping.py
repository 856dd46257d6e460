"""Threat 11 (a stolen or corrupt account walks out with the population): budgets of record
views and of misses, enforced in the vault's single access function, stop a scraper and
an ID-number enumerator early, lock the account, raise an alert, and leave every record
that was returned on the access log.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from custodes.audit import Outcome
from custodes.errors import (
    AccessDenied,
    AuthenticationFailed,
    BudgetExceeded,
    ConfigurationError,
    SessionLimit,
)
from custodes.policy import AccessPurpose, Action, Role
from custodes.policy.budgets import (
    DAY,
    DEFAULT_BUDGETS,
    DEFAULT_SESSIONS,
    MINUTE,
    NO_LIMITS,
    window_start,
)
from custodes.records.idnumber import check_char
from custodes.vault import Vault
from custodes.web.app import create_app
from tests.conftest import (
    PASSWORD,
    TOTP_SECRETS,
    enrol,
    login,
    make_vault,
    read_records,
    totp_code,
    totp_now,
)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

PURPOSE = AccessPurpose("checking a reported burglary", "C-2026-17")
OFFICER = DEFAULT_BUDGETS[Role.OFFICER]
INVESTIGATOR = DEFAULT_BUDGETS[Role.INVESTIGATOR]  # sees minors too: every search finds one
SCRIPTED = 100_000


class _Time:
    """The vault's clock held still a second into a minute, moved only by the test: a
    budget's windows must not turn over while a test counts within one."""

    def __init__(self, vault: Vault) -> None:
        self.now = float(window_start(time.time(), MINUTE) + 1)
        vault._clock.moved = lambda: self.now  # type: ignore[attr-defined]

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["memory", "sqlite"])
def vault(request: pytest.FixtureRequest, tmp_path: Path, population_file: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, request.param)
    assert v.ingest(v.operator, population_file).rejected == 0
    yield v
    v.close()


@pytest.fixture
def clock(vault: Vault) -> _Time:
    return _Time(vault)


def _national_ids(population_file: Path) -> list[str]:
    return [str(p["national_id"]) for p in read_records(population_file) if "national_id" in p]


def _entries(vault: Vault) -> list[Any]:
    return [entry for _, entry in vault._log.entries()]


def test_a_scraper_with_a_valid_officer_account_gets_its_budget_and_no_more_then_is_locked(
    vault: Vault, population_file: Path, clock: _Time
) -> None:
    assert OFFICER.views_per_minute is not None
    vault.admin.add_account(vault.operator, "scraper", PASSWORD, Role.OFFICER, {"district": "*"})
    enrol(vault, "scraper")
    people = _national_ids(population_file)
    returned: list[str] = []
    answers: dict[int, int] = {}
    refused_in_a_row = 0
    with TestClient(create_app(vault)) as client:
        code = totp_code(TOTP_SECRETS["scraper"], vault._clock())
        opened = client.post(
            "/api/v1/session", json={"username": "scraper", "password": PASSWORD, "totp": code}
        )
        assert opened.status_code == 201, opened.text
        auth = {"Authorization": f"Bearer {opened.json()['token']}"}
        # The script would go on through the population; once every answer is a refusal
        # it is only asking a locked account's ended session, and the rest are the same.
        for n in range(SCRIPTED):
            answer = client.post(
                "/api/v1/search",
                headers=auth,
                json={
                    "record_type": "person",
                    "index": "national_id",
                    "values": {"national_id": people[n % len(people)]},
                    "purpose": PURPOSE.reason,
                    "case_ref": PURPOSE.case_ref,
                },
            )
            answers[answer.status_code] = answers.get(answer.status_code, 0) + 1
            if answer.status_code == 200:
                returned += [r["record_id"] for r in answer.json()["results"]]
                refused_in_a_row = 0
                continue
            refused_in_a_row += 1
            if refused_in_a_row == 200:
                break
        assert set(answers) == {200, 403, 401}, answers
        assert answers[403] == 1  # the read that crossed the limit, and nothing of it
        assert len(returned) <= OFFICER.views_per_minute
        # Locked: the session is gone, and the password and a fresh code open nothing.
        again = client.post(
            "/api/v1/session",
            json={
                "username": "scraper",
                "password": PASSWORD,
                "totp": totp_code(TOTP_SECRETS["scraper"], vault._clock()),
            },
        )
        assert again.status_code == 401
    entries = _entries(vault)
    granted = [
        e
        for e in entries
        if e.actor == "scraper"
        and e.action == Action.SEARCH.value
        and e.outcome == Outcome.GRANTED.value
    ]
    assert sorted(r for e in granted for r in e.records) == sorted(returned)
    [alert] = [
        e
        for e in entries
        if e.actor == "scraper"
        and e.action == Action.SEARCH.value
        and e.outcome == Outcome.DENIED.value
    ]
    assert alert.detail["alert"] == "guard:budget"
    assert alert.detail["limits"] == ["views_per_minute"]
    assert alert.detail["locked"] is True
    assert vault.admin.list_accounts(vault.operator)  # the administrator sees it locked:
    [account] = [a for a in vault.admin.list_accounts(vault.operator) if a.username == "scraper"]
    assert account.locked


def test_the_budget_holds_across_windows_and_only_an_administrator_lifts_the_lock(
    vault: Vault, population_file: Path, clock: _Time
) -> None:
    assert INVESTIGATOR.views_per_minute is not None
    session = login(vault, Role.INVESTIGATOR, "t.desk")
    people = _national_ids(population_file)
    per_minute = INVESTIGATOR.views_per_minute
    shown = sum(len(_search(vault, session, nid)) for nid in people[:per_minute])
    assert shown == per_minute
    clock.advance(MINUTE)
    assert len(_search(vault, session, people[0])) == 1  # a new minute, a new budget
    with pytest.raises(BudgetExceeded):
        for nid in people[1 : per_minute + 1]:
            _search(vault, session, nid)
    with pytest.raises(AuthenticationFailed):
        _search(vault, session, people[0])
    with pytest.raises(AuthenticationFailed):
        vault.login("t.desk", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.desk"]))
    vault.admin.unlock_account(vault.operator, "t.desk")
    clock.advance(MINUTE)
    again = vault.login("t.desk", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.desk"]))
    assert len(_search(vault, again, people[0])) == 1


def test_an_account_whose_own_budget_is_lifted_is_not_stopped_and_a_bad_one_is_refused(
    vault: Vault, population_file: Path, clock: _Time
) -> None:
    session = login(vault, Role.INVESTIGATOR, "t.batch", budget=NO_LIMITS)
    people = _national_ids(population_file)
    assert INVESTIGATOR.views_per_minute is not None
    for nid in people[: INVESTIGATOR.views_per_minute + 5]:
        assert len(_search(vault, session, nid)) == 1
    with pytest.raises(ConfigurationError, match="views_per_minute"):
        vault.admin.add_account(
            vault.operator,
            "t.odd",
            PASSWORD,
            Role.OFFICER,
            {"district": "*", "budget": {"views_per_minute": -1}},
        )


def _search(vault: Vault, session: Any, nid: str) -> list[Any]:
    return vault.search(
        session, PURPOSE, record_type="person", index="national_id", values={"national_id": nid}
    )


def test_an_account_shown_many_different_people_is_stopped_at_its_distinct_subjects(
    vault: Vault, population_file: Path, clock: _Time
) -> None:
    """Looking one person up again and again is a clerk's day; a new person every time,
    within every views limit, is a walk through the population."""
    own = {**NO_LIMITS, "subjects_per_day": 5}
    session = login(vault, Role.INVESTIGATOR, "t.browser", budget=own)
    people = _national_ids(population_file)
    for _ in range(40):
        assert len(_search(vault, session, people[0])) == 1  # one subject, forty views
    for nid in people[1:5]:
        assert len(_search(vault, session, nid)) == 1
    with pytest.raises(BudgetExceeded):
        _search(vault, session, people[5])
    [refused] = [
        e for e in _entries(vault) if e.actor == "t.browser" and e.outcome == Outcome.DENIED.value
    ]
    assert refused.detail["limits"] == ["subjects_per_day"]
    # A new day, a new count: after an administrator's unlock, the same people again.
    vault.admin.unlock_account(vault.operator, "t.browser")
    clock.advance(DAY)
    again = vault.login("t.browser", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.browser"]))
    for nid in people[:5]:
        assert len(_search(vault, again, nid)) == 1


def _walked_ids(start: int, count: int) -> Iterator[str]:
    """Valid-checksum resident ID numbers in one district, one birth date, serials walked
    in order: what an enumerator types."""
    for serial in range(start, start + count):
        body = f"11010519800101{serial:03d}"
        yield body + check_char(body)


def test_walking_valid_checksum_id_numbers_is_blocked_after_the_burst_of_misses(
    vault: Vault, clock: _Time
) -> None:
    assert OFFICER.misses_per_hour is not None
    session = login(vault, Role.OFFICER, "t.walker")
    missed = 0
    with pytest.raises(BudgetExceeded):
        for nid in _walked_ids(500, 1000):
            assert _search(vault, session, nid) == []
            missed += 1
    assert missed == OFFICER.misses_per_hour
    with pytest.raises(AuthenticationFailed):
        _search(vault, session, next(_walked_ids(999, 1)))
    [refusal] = [
        e
        for e in _entries(vault)
        if e.actor == "t.walker"
        and e.action == Action.SEARCH.value
        and e.outcome == Outcome.DENIED.value
    ]
    assert refusal.detail["limits"] == ["misses_per_hour"]
    assert refusal.detail["alert"] == "guard:budget"


def test_an_accounts_own_budget_set_by_an_administrator_holds_at_its_next_read(
    vault: Vault, population_file: Path, clock: _Time
) -> None:
    session = login(vault, Role.INVESTIGATOR, "t.narrow")
    people = _national_ids(population_file)
    assert len(_search(vault, session, people[0])) == 1
    vault.admin.set_budget(vault.operator, "t.narrow", {"views_per_hour": 2})
    assert len(_search(vault, session, people[1])) == 1
    with pytest.raises(BudgetExceeded):
        _search(vault, session, people[2])
    with pytest.raises(AccessDenied):  # administrators set budgets; readers do not
        vault.admin.set_budget(login(vault, Role.SUPERVISOR, "t.boss"), "t.narrow", None)


def test_a_stolen_password_cannot_open_sessions_beside_the_officials_own(
    vault: Vault, clock: _Time
) -> None:
    first = login(vault, Role.OFFICER, "t.counter")  # officers may have two open
    assert DEFAULT_SESSIONS[Role.OFFICER] == 2

    def again() -> Any:
        clock.advance(30)  # a new one-time code
        return vault.login("t.counter", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.counter"]))

    second = again()
    with pytest.raises(SessionLimit, match="2 sessions open"):
        again()
    refused = [
        e
        for _, e in vault._log.entries()
        if e.actor == "t.counter" and e.action == Action.LOGIN.value
    ]
    assert [(e.outcome, e.detail.get("reason")) for e in refused][-1] == (
        Outcome.DENIED.value,
        "sessions",
    )
    vault.logout(first)
    third = again()
    assert {second.token, third.token} and second.token != third.token
    vault.admin.set_budget(vault.operator, "t.counter", {"sessions": 3})
    again()
