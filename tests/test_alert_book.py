"""Threat 11: the watchers see every alert and deal with it on the record.

Alerts are kept in the vault once their entry is on the access log; supervisors and
auditors list them, acknowledge and resolve them (each step logged, through the vault,
the API and the dashboard alike); the account an alert is about cannot close it; and a
database writer who marks an alert resolved, or edits what it names, leaves a row that
shows as tampered and that no one can step on.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from custodes.access import BUDGET_ALERT
from custodes.alert_book import AlertState
from custodes.errors import AccessDenied, BudgetExceeded, RecordNotFound
from custodes.policy import AccessPurpose, Action, Role
from custodes.records.idnumber import check_char
from custodes.storage import AlertRow
from custodes.vault import Session, Vault
from custodes.web.app import create_app
from tests.conftest import PASSWORD, TOTP_SECRETS, enrol, login, make_vault, totp_now
from tests.test_cli_client import (  # noqa: F401 - served is a fixture, used by name
    Served,
    run,
    served,
)

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

PURPOSE = AccessPurpose("walking numbers", "T-1")


@pytest.fixture(params=["memory", "sqlite"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, request.param)
    yield v
    v.close()


def _walk(vault: Vault, session: Session) -> None:
    """Miss until the budget of one miss an hour stops the account: an alert."""
    with pytest.raises(BudgetExceeded):
        for serial in ("001", "002"):
            body = f"11010519800101{serial}"
            vault.search(
                session,
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": body + check_char(body)},
            )


def _alerted(vault: Vault, name: str, role: Role = Role.INVESTIGATOR) -> Session:
    session = login(vault, role, name, budget={"misses_per_hour": 1})
    _walk(vault, session)
    return session


def test_an_alert_is_kept_listed_acknowledged_and_resolved_each_step_logged(vault: Vault) -> None:
    _alerted(vault, "t.walker")
    supervisor = login(vault, Role.SUPERVISOR, "t.super")
    auditor = login(vault, Role.AUDITOR, "t.audit")
    [found] = vault.alerts(supervisor)
    assert found.alert.kind == BUDGET_ALERT and found.alert.account == "t.walker"
    assert found.state is AlertState.OPEN and found.steps == () and not found.tampered
    # The alert points at its own refusal on the access log.
    entries = dict(vault._log.entries())
    assert entries[found.alert.entry].detail["alert"] == BUDGET_ALERT
    vault.acknowledge_alert(supervisor, found.id)
    vault.resolve_alert(auditor, found.id)
    done = vault.alert(auditor, found.id)
    assert done.state is AlertState.RESOLVED
    assert [(s.state, s.by) for s in done.steps] == [
        (AlertState.ACKNOWLEDGED, "t.super"),
        (AlertState.RESOLVED, "t.audit"),
    ]
    # Each step is the entry it names.
    entries = dict(vault._log.entries())
    for step, action in zip(
        done.steps, (Action.ALERT_ACKNOWLEDGE, Action.ALERT_RESOLVE), strict=True
    ):
        assert entries[step.entry].action == action.value
        assert entries[step.entry].detail["alert_id"] == found.id
    with pytest.raises(AccessDenied, match="resolved already"):
        vault.acknowledge_alert(supervisor, found.id)
    with pytest.raises(RecordNotFound):
        vault.resolve_alert(supervisor, "no-such-alert")


def test_only_the_watchers_handle_alerts_and_never_their_own(vault: Vault) -> None:
    _alerted(vault, "t.walker")
    officer = login(vault, Role.OFFICER, "t.officer")
    admin = login(vault, Role.ADMIN, "t.admin")
    for who in (officer, admin):
        with pytest.raises(AccessDenied):
            vault.alerts(who)
    # A supervisor whose own account raised the alert sees it, and cannot close it.
    _alerted(vault, "t.watched", Role.SUPERVISOR)
    vault.admin.unlock_account(vault.operator, "t.watched")
    again = login(vault, Role.SUPERVISOR, "t.watched2")
    auditor = login(vault, Role.AUDITOR, "t.audit")
    own = next(a for a in vault.alerts(auditor) if a.alert.account == "t.watched")
    back = vault.login("t.watched", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.watched"]))
    with pytest.raises(AccessDenied, match="your own account"):
        vault.resolve_alert(back, own.id)
    vault.resolve_alert(again, own.id)  # someone else may
    refused = [
        e
        for _, e in vault._log.entries()
        if e.action == Action.ALERT_RESOLVE.value and e.outcome == "denied"
    ]
    assert [e.actor for e in refused] == ["t.watched"]


def test_an_alert_row_changed_in_the_database_shows_as_tampered_and_cannot_be_closed(
    vault: Vault,
) -> None:
    _alerted(vault, "t.walker")
    auditor = login(vault, Role.AUDITOR, "t.audit")
    [found] = vault.alerts(auditor)
    row = vault._storage.get_alert(found.id)
    assert row is not None
    # A database writer marks it resolved without the vault's key.
    doc = orjson.loads(row.body)
    doc["fields"][9] = "resolved"
    vault._storage.replace_alert(row, AlertRow(row.alert_id, row.raised_at, orjson.dumps(doc)))
    [shown] = vault.alerts(auditor)
    assert shown.tampered
    with pytest.raises(AccessDenied, match="seal"):
        vault.resolve_alert(auditor, found.id)
    # Garbage in the row is shown as tampered too, never as an error page.
    vault._storage.put_alert(AlertRow("junk", row.raised_at + 1, b"not json"))
    assert [a.tampered for a in vault.alerts(auditor)] == [True, True]


def test_the_api_lists_and_steps_alerts_for_watchers_only(vault: Vault) -> None:
    _alerted(vault, "t.walker")
    supervisor = login(vault, Role.SUPERVISOR, "t.super")
    officer = login(vault, Role.OFFICER, "t.officer")
    with TestClient(create_app(vault)) as client:
        auth = {"Authorization": f"Bearer {supervisor.token}"}
        listed = client.get("/api/v1/alerts", headers=auth)
        assert listed.status_code == 200, listed.text
        [alert] = listed.json()["alerts"]
        assert alert["kind"] == BUDGET_ALERT and alert["state"] == "open"
        assert alert["signals"] == ["misses_per_hour"]
        acked = client.post(f"/api/v1/alerts/{alert['id']}/acknowledge", headers=auth)
        assert acked.status_code == 200 and acked.json()["state"] == "acknowledged"
        assert acked.json()["steps"][0]["by"] == "t.super"
        resolved = client.post(f"/api/v1/alerts/{alert['id']}/resolve", headers=auth)
        assert resolved.json()["state"] == "resolved"
        assert client.post(f"/api/v1/alerts/{alert['id']}/resolve", headers=auth).status_code == 403
        assert client.post("/api/v1/alerts/nothing/resolve", headers=auth).status_code == 404
        assert client.post(f"/api/v1/alerts/{alert['id']}/delete", headers=auth).status_code == 422
        other = {"Authorization": f"Bearer {officer.token}"}
        assert client.get("/api/v1/alerts", headers=other).status_code == 403


def test_a_supervisor_handles_alerts_from_the_official_cli_without_a_key(
    served: Served,  # noqa: F811 - the fixture
) -> None:
    served.vault.admin.add_account(
        served.vault.operator,
        "t.walker",
        PASSWORD,
        Role.INVESTIGATOR,
        {"district": "*", "budget": {"misses_per_hour": 1}},
    )
    secret = enrol(served.vault, "t.walker")
    _walk(
        served.vault, served.vault.login("t.walker", PASSWORD, totp=totp_now(served.vault, secret))
    )
    supervisor = served.official("t.super", Role.SUPERVISOR)
    assert "CUSTODES_KEYRING_PASSPHRASE" not in supervisor
    served.login(supervisor)
    listed = run("alerts", "list", "--json", env=supervisor)
    assert listed.returncode == 0, listed.stderr
    [alert] = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert alert["kind"] == BUDGET_ALERT and alert["account"] == "t.walker"
    done = run("alerts", "acknowledge", alert["id"], env=supervisor)
    assert done.returncode == 0 and "acknowledged" in done.stdout
    done = run("alerts", "resolve", alert["id"], env=supervisor)
    assert done.returncode == 0 and "resolved" in done.stdout
    again = run("alerts", "resolve", alert["id"], env=supervisor)
    assert again.returncode != 0 and "resolved already" in again.stderr
    table = run("alerts", "list", env=supervisor)
    assert "1 alerts" in table.stdout and "t.walker" in table.stdout
    officer = served.official("t.officer", Role.OFFICER)
    served.login(officer)
    assert run("alerts", "list", env=officer).returncode != 0
