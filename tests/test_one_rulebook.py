"""One rulebook: the CLI, the dashboard and the API cannot decide differently.

Every access rule lives in custodes.policy and is applied once, inside the vault. The same
matrix of (role, action, record, purpose, case) runs through the vault itself, the JSON
API, the dashboard's pages and the official's CLI (a client of a running server), and
every adapter must reach the vault's own decision: granted (with the same records),
refused, not found, or purpose required. A test of the test plants a rule in one adapter
and requires the matrix to catch it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from custodes.cli import cli
from custodes.cli.session_file import StoredSession, save
from custodes.errors import AccessDenied, PurposeRequired, RecordNotFound
from custodes.policy import AccessPurpose, Role
from custodes.policy.budgets import NO_LIMITS
from custodes.vault import Session, Vault
from custodes.web import deps
from custodes.web.app import create_app
from tests.conftest import login, make_vault, serving, write_jsonl
from tests.test_district_access import (
    BEIJING_ADULT,
    CASE_NO,
    RECORDS,
    SHANGHAI_ADULT,
    SHANGHAI_CHILD,
)

with warnings.catch_warnings():
    # Starlette's test client now asks for httpx2; httpx drives it just the same.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

REASON = "matrix of decisions"
WITH_CASE = "C-7"
# Officials of Shanghai (and a national supervisor), so that districts and minors decide
# some reads; an auditor and an administrator, who read no records.
ACCOUNTS: dict[Role, str] = {
    Role.OFFICER: "3101",
    Role.INVESTIGATOR: "3101",
    Role.SUPERVISOR: "*",
    Role.AUDITOR: "*",
    Role.ADMIN: "*",
}

GRANTED, REFUSED, ABSENT, PURPOSE = "granted", "refused", "absent", "purpose"


@dataclass(frozen=True)
class Ask:
    """One access to try: what, on which record, for which field."""

    action: str  # search, read, reveal, log, subject
    target: str = ""  # a national ID (search) or a record id
    field: str = ""


@dataclass
class World:
    vault: Vault
    sessions: dict[Role, Session]
    asks: list[Ask]
    server: str
    home: Path


Decision = tuple[str, tuple[str, ...]]
Adapter = Callable[[World, Role, Ask, str | None], Decision]


# -- the adapters, each asked the same question ------------------------------------------


def through_vault(world: World, role: Role, ask: Ask, case: str | None) -> Decision:
    vault, session = world.vault, world.sessions[role]
    try:
        purpose = AccessPurpose(REASON, case)
        if ask.action == "search":
            values = {"national_id": ask.target}
            found = vault.search(
                session, purpose, record_type="person", index="national_id", values=values
            )
            return GRANTED, tuple(sorted(v.record_id for v in found))
        if ask.action == "read":
            return GRANTED, (vault.record(session, purpose, ask.target).record_id,)
        if ask.action == "reveal":
            vault.reveal(session, purpose, ask.target, ask.field)
            return GRANTED, (ask.target,)
        if ask.action == "log":
            list(vault.read_log(session, purpose))
            return GRANTED, ()
        vault.subject_report(session, purpose, ask.target)
        return GRANTED, (ask.target,)
    except PurposeRequired:
        return PURPOSE, ()
    except AccessDenied:
        return REFUSED, ()
    except RecordNotFound:
        return ABSENT, ()


def _status(status: int, body: str) -> str:
    if status == 403:
        return REFUSED
    if status == 404:
        return ABSENT
    if status == 422:
        return PURPOSE
    raise AssertionError(f"unexpected status {status}: {body[:200]}")


def through_api(world: World, role: Role, ask: Ask, case: str | None) -> Decision:
    with TestClient(create_app(world.vault)) as client:
        return _api(client, world.sessions[role], ask, case)


def _api(client: TestClient, session: Session, ask: Ask, case: str | None) -> Decision:
    headers = {"Authorization": f"Bearer {session.token}"}
    purpose: dict[str, Any] = {"purpose": REASON, **({"case_ref": case} if case else {})}
    if ask.action == "search":
        body = {
            "record_type": "person",
            "index": "national_id",
            "values": {"national_id": ask.target},
            **purpose,
        }
        answer = client.post("/api/v1/search", json=body, headers=headers)
    elif ask.action == "read":
        answer = client.get(f"/api/v1/records/{ask.target}", params=purpose, headers=headers)
    elif ask.action == "reveal":
        body = {"field": ask.field, **purpose}
        answer = client.post(f"/api/v1/records/{ask.target}/reveal", json=body, headers=headers)
    elif ask.action == "log":
        answer = client.get("/api/v1/audit/log", params=purpose, headers=headers)
    else:
        answer = client.get(f"/api/v1/audit/subject/{ask.target}", params=purpose, headers=headers)
    if answer.status_code != 200:
        if answer.status_code == 422:
            assert answer.json()["error"]["code"] == "purpose_required", answer.text
        return _status(answer.status_code, answer.text), ()
    if ask.action == "search":
        return GRANTED, tuple(sorted(r["record_id"] for r in answer.json()["results"]))
    if ask.action == "log":
        return GRANTED, ()
    return GRANTED, (ask.target,)


_RECORD_LINK = re.compile(r'href="/records/([A-Za-z0-9_-]+)\?')


def through_pages(world: World, role: Role, ask: Ask, case: str | None) -> Decision:
    session = world.sessions[role]
    with TestClient(create_app(world.vault), follow_redirects=False) as browser:
        browser.cookies.set(deps.SESSION_COOKIE, session.token)
        csrf = world.vault.csrf_token(session)
        purpose = {"reason": REASON, "case_ref": case or ""}
        if ask.action == "search":
            form = {"csrf_token": csrf, "by": "national_id", "national_id": ask.target, **purpose}
            page = browser.post("/search", data=form)
        elif ask.action == "read":
            page = browser.get(f"/records/{ask.target}", params=purpose)
        elif ask.action == "reveal":
            form = {"csrf_token": csrf, **purpose}
            page = browser.post(f"/records/{ask.target}/reveal/{ask.field}", data=form)
        elif ask.action == "log":
            page = browser.get("/audit/log", params=purpose)
        else:
            page = browser.get(f"/audit/subject/{ask.target}", params=purpose)
    if page.status_code != 200:
        return _status(page.status_code, page.text), ()
    if ask.action == "search":
        return GRANTED, tuple(sorted(set(_RECORD_LINK.findall(page.text))))
    if ask.action == "log":
        return GRANTED, ()
    return GRANTED, (ask.target,)


def through_cli(world: World, role: Role, ask: Ask, case: str | None) -> Decision:
    session = world.sessions[role]
    session_file = world.home / f"{role.value}.session.json"
    if not session_file.exists():
        stored = StoredSession(world.server, session.token, session.username, role.value)
        save(stored, session_file)
    purpose = ["--purpose", REASON, *(["--case", case] if case else [])]
    if ask.action == "search":
        args = ["search", "--national-id", ask.target, *purpose, "--json"]
    elif ask.action == "read":
        args = ["show", ask.target, *purpose, "--json"]
    elif ask.action == "reveal":
        args = ["reveal", ask.target, ask.field, *purpose, "--json"]
    elif ask.action == "log":
        args = ["audit", "log", *purpose, "--json"]
    else:
        args = ["audit", "subject", ask.target, *purpose, "--json"]
    env = {"CUSTODES_SESSION_FILE": str(session_file), "CUSTODES_KEYRING_PASSPHRASE": None}
    result = CliRunner().invoke(cli, args, env=env)
    if result.exit_code != 0:
        if isinstance(result.exception, PurposeRequired):
            return PURPOSE, ()
        if isinstance(result.exception, AccessDenied):
            return REFUSED, ()
        if isinstance(result.exception, RecordNotFound):
            return ABSENT, ()
        raise AssertionError(f"{args[0]} failed otherwise: {result.exception!r}")
    if ask.action == "search":
        return GRANTED, tuple(sorted(r["record_id"] for r in orjson.loads(result.stdout)))
    if ask.action == "log":
        return GRANTED, ()
    return GRANTED, (ask.target,)


ADAPTERS: dict[str, Adapter] = {"api": through_api, "pages": through_pages, "cli": through_cli}


def disagreements(world: World, adapters: dict[str, Adapter]) -> list[str]:
    """Every (role, ask, case) where an adapter's decision is not the vault's own."""
    found = []
    for role in ACCOUNTS:
        for ask in world.asks:
            for case in (WITH_CASE, None):
                expected = through_vault(world, role, ask, case)
                for name, adapter in adapters.items():
                    got = adapter(world, role, ask, case)
                    if got != expected:
                        found.append(f"{name}: {role.value} {ask} case={case}: {got} != {expected}")
    return found


# -- the world they are asked about ------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("rulebook")
    vault = make_vault(tmp, "sqlite")
    assert vault.ingest(vault.operator, write_jsonl(tmp / "records.jsonl", RECORDS)).rejected == 0
    sessions = {
        # The matrix asks each adapter every case: far more reads than any budget allows,
        # and budgets are not what it holds the adapters to.
        role: login(vault, role, f"m.{role.value}", district=district, budget=NO_LIMITS)
        for role, district in ACCOUNTS.items()
    }
    supervisor = sessions[Role.SUPERVISOR]
    ids = {}
    for number in (SHANGHAI_ADULT, SHANGHAI_CHILD, BEIJING_ADULT):
        [found] = vault.search(
            supervisor,
            AccessPurpose(REASON, WITH_CASE),
            record_type="person",
            index="national_id",
            values={"national_id": number},
        )
        ids[number] = found.record_id
    [case] = vault.search(
        supervisor,
        AccessPurpose(REASON, WITH_CASE),
        record_type="case",
        index="case_no",
        values={"case_no": CASE_NO},
    )
    asks = [
        Ask("search", SHANGHAI_ADULT),
        Ask("search", BEIJING_ADULT),
        Ask("read", ids[SHANGHAI_ADULT]),
        Ask("read", ids[BEIJING_ADULT]),
        Ask("read", ids[SHANGHAI_CHILD]),
        Ask("read", case.record_id),
        Ask("read", "no-such-record"),
        Ask("reveal", ids[SHANGHAI_ADULT], "phone"),
        Ask("reveal", ids[SHANGHAI_ADULT], "gender"),
        Ask("reveal", case.record_id, "narrative"),
        Ask("reveal", ids[BEIJING_ADULT], "phone"),
        Ask("log"),
        Ask("subject", ids[SHANGHAI_ADULT]),
    ]
    try:
        with serving(vault) as url:
            yield World(vault, sessions, asks, url, tmp)
    finally:
        vault.close()


def test_cli_dashboard_and_api_reach_the_vaults_own_decision_for_every_case(
    world: World,
) -> None:
    # The matrix covers every kind of decision, so agreement is not agreement on nothing.
    decisions = {
        through_vault(world, role, ask, case)[0]
        for role in ACCOUNTS
        for ask in world.asks
        for case in (WITH_CASE, None)
    }
    assert decisions == {GRANTED, REFUSED, ABSENT, PURPOSE}
    assert disagreements(world, ADAPTERS) == []


def test_the_matrix_catches_a_rule_planted_in_one_adapter(world: World) -> None:
    """An adapter that decides on its own (here: officers may not reveal through the API,
    a rule the policy does not have) must show up as a disagreement."""

    def stricter_api(world: World, role: Role, ask: Ask, case: str | None) -> Decision:
        app = create_app(world.vault)

        @app.middleware("http")
        async def planted(request: Any, call_next: Any) -> Any:
            from fastapi.responses import JSONResponse

            token = request.headers.get("authorization", "")[7:]
            if request.url.path.endswith("/reveal") and token == world.sessions[Role.OFFICER].token:
                body = {"error": {"code": "access_denied", "message": "not through the API"}}
                return JSONResponse(body, status_code=403)
            return await call_next(request)

        with TestClient(app) as client:
            return _api(client, world.sessions[role], ask, case)

    found = disagreements(world, {"api": stricter_api})
    assert found, "a rule planted in the API went unnoticed"
    assert all(line.startswith("api: officer Ask(action='reveal'") for line in found)
