"""Threat 13 from the dashboard: an investigator asks for a bulk export, a supervisor who
did not ask approves it, the asker downloads it once, sealed to its recipient; the asker
cannot approve their own, nobody else can download it, and every form checks its CSRF
token. The pages show what is asked and why, never a record's value.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from custodes.audit import Outcome
from custodes.export.envelope import keygen, open_sealed, private_key
from custodes.policy import Action, Role
from custodes.vault import Vault
from custodes.web import deps
from custodes.web.app import create_app
from tests.conftest import login, make_vault, read_records

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

FORM = {
    "record_type": "person",
    "purpose_class": "statistics",
    "district": "",
    "reason": "census of marital status by county",
    "case_ref": "STAT-2026",
}


@pytest.fixture
def vault(tmp_path: Path, population_file: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, "memory")
    assert v.ingest(v.operator, population_file).rejected == 0
    yield v
    v.close()


def _browser(vault: Vault, role: Role, name: str) -> tuple[TestClient, str]:
    session = login(vault, role, name)
    client = TestClient(create_app(vault), base_url="https://testserver", follow_redirects=False)
    client.cookies.set(deps.SESSION_COOKIE, session.token)
    return client, vault.csrf_token(session)


def test_an_export_is_asked_approved_and_downloaded_once_from_the_dashboard(
    vault: Vault, population_file: Path
) -> None:
    private_pem, public_pem, _ = keygen()
    asker, asker_csrf = _browser(vault, Role.INVESTIGATOR, "w.asker")
    second, second_csrf = _browser(vault, Role.SUPERVISOR, "w.second")
    page = asker.get("/exports")
    assert page.status_code == 200 and "statistics" in page.text
    # Without the form's token, nothing is asked.
    assert (
        asker.post("/exports", data={**FORM, "recipient": public_pem.decode()}).status_code == 403
    )
    asked = asker.post(
        "/exports", data={**FORM, "recipient": public_pem.decode(), "csrf_token": asker_csrf}
    )
    assert asked.status_code == 200, asked.text
    [(_, entry)] = [
        (i, e) for i, e in vault._log.entries() if e.action == Action.EXPORT_REQUEST.value
    ]
    export_id = entry.detail["export"]
    assert export_id in asked.text and "census of marital status" in asked.text
    # The asker sees no approve button, and approving their own is refused and logged.
    assert "Approve this export" not in asked.text
    own = asker.post(f"/exports/{export_id}/approve", data={"csrf_token": asker_csrf})
    assert own.status_code in (403, 409)
    # The supervisor opens it by its id, sees what is asked and why, and approves.
    shown = second.get("/exports/lookup", params={"export_id": export_id})
    assert shown.status_code == 200
    assert "Approve this export" in shown.text and "STAT-2026" in shown.text
    approved = second.post(f"/exports/{export_id}/approve", data={"csrf_token": second_csrf})
    assert approved.status_code == 200 and "Approved" in approved.text
    # Only the asker downloads it, once; it opens only with the recipient's key.
    assert second.post(
        f"/exports/{export_id}/produce", data={"csrf_token": second_csrf}
    ).status_code in (403, 404)
    made = asker.post(f"/exports/{export_id}/produce", data={"csrf_token": asker_csrf})
    assert made.status_code == 200
    assert made.headers["content-type"] == "application/octet-stream"
    assert "attachment" in made.headers["content-disposition"]
    rows = [
        orjson.loads(line)
        for line in open_sealed(private_key(private_pem), made.content).splitlines()
    ]
    assert rows
    again = asker.post(f"/exports/{export_id}/produce", data={"csrf_token": asker_csrf})
    assert again.status_code == 403
    outcomes = [
        (e.actor, e.action, e.outcome)
        for _, e in vault._log.entries()
        if e.action.startswith("export:bulk:")
    ]
    assert ("w.asker", Action.EXPORT_APPROVE.value, Outcome.DENIED) in outcomes
    assert ("w.second", Action.EXPORT_APPROVE.value, Outcome.GRANTED) in outcomes
    assert ("w.asker", Action.EXPORT_CREATE.value, Outcome.GRANTED) in outcomes
    # No page of the flow showed a person's value.
    people = [r for r in read_records(population_file) if r["type"] == "person"][:50]
    for text in (page.text, asked.text, shown.text, approved.text):
        for person in people:
            assert str(person["national_id"]) not in text and str(person["name"]) not in text


def test_the_export_pages_are_for_those_who_may_ask(vault: Vault) -> None:
    officer, _ = _browser(vault, Role.OFFICER, "w.officer")
    auditor, _ = _browser(vault, Role.AUDITOR, "w.auditor")
    assert officer.get("/exports").status_code == 403
    assert auditor.get("/exports").status_code == 403
    supervisor, _ = _browser(vault, Role.SUPERVISOR, "w.super")
    assert supervisor.get("/exports/lookup", params={"export_id": "nothex"}).status_code == 422
    assert supervisor.get(f"/exports/{'0' * 32}").status_code == 404
