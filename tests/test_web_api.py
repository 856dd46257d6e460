"""Threats 1, 7, 9 and 11 over the JSON API: no session, no data; every error in one shape;
pages capped; auditors read the log and nothing else, officials read records and no log.
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from custodes.audit import Outcome
from custodes.audit.report import verify_bundle
from custodes.policy import Role
from custodes.policy.budgets import DEFAULT_BUDGETS, NO_LIMITS
from custodes.vault import Vault
from custodes.web import api, deps
from custodes.web.app import create_app
from tests.conftest import PASSWORD, TOTP_SECRETS, enrol, make_vault, read_records, totp_code

with warnings.catch_warnings():
    # Starlette's test client now asks for httpx2; httpx drives it just the same.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

PURPOSE = {"purpose": "checking a reported burglary", "case_ref": "C-2026-17"}


def build_app(vault: Vault) -> FastAPI:
    return create_app(vault)


_accounts = itertools.count()


def new_account(vault: Vault, role: Role, budget: dict[str, Any] | None = None) -> str:
    """A fresh, enrolled account: each login spends a TOTP step, and a secret has few."""
    name = f"api.{role.value}.{next(_accounts)}"
    attributes: dict[str, Any] = {"district": "*"}
    if budget is not None:
        attributes["budget"] = budget
    vault.admin.add_account(vault.operator, name, PASSWORD, role, attributes)
    enrol(vault, name)
    return name


def session_headers(client: TestClient, vault: Vault, username: str) -> dict[str, str]:
    code = totp_code(TOTP_SECRETS[username], vault._clock())
    response = client.post(
        "/api/v1/session", json={"username": username, "password": PASSWORD, "totp": code}
    )
    assert response.status_code == 201, response.text
    return {"Authorization": f"Bearer {response.json()['token']}"}


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory, population_file: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path_factory.mktemp("api"), "memory")
    assert v.ingest(v.operator, population_file).rejected == 0
    yield v
    v.close()


@pytest.fixture(scope="module")
def app(vault: Vault) -> FastAPI:
    return build_app(vault)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def headers_for(client: TestClient, vault: Vault, role: Role) -> dict[str, str]:
    """A new session of a new account of that role."""
    return session_headers(client, vault, new_account(vault, role))


def assert_error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return dict(body["error"])


def personal_values(people: list[dict[str, Any]]) -> list[str]:
    """Strings that would betray a record: ID numbers, phones, names."""
    return [str(p[k]) for p in people[:50] for k in ("national_id", "phone", "name") if p.get(k)]


def api_routes(app: FastAPI) -> list[tuple[str, str]]:
    found = []
    for route in api.router.routes:
        if isinstance(route, APIRoute):
            for method in sorted(route.methods):
                found.append((method, route.path))
    return found


def concrete(path: str, record_id: str) -> str:
    return re.sub(r"\{[^}]+\}", record_id, path)


def first_record_id(client: TestClient, headers: dict[str, str], national_id: str) -> str:
    found = client.post(
        "/api/v1/search",
        headers=headers,
        json={
            "record_type": "person",
            "index": "national_id",
            "values": {"national_id": national_id},
            **PURPOSE,
        },
    )
    assert found.status_code == 200, found.text
    return str(found.json()["results"][0]["record_id"])


# -- threat 1: nothing served without a session ---------------------------------------


@pytest.mark.parametrize("token", [None, "forged-token-0123456789", "logged-out"])
def test_every_api_route_refuses_without_a_live_session(
    app: FastAPI, client: TestClient, vault: Vault, people: list[dict[str, Any]], token: str | None
) -> None:
    headers = headers_for(client, vault, Role.INVESTIGATOR)
    record_id = first_record_id(client, headers, people[0]["national_id"])
    if token == "logged-out":
        assert client.delete("/api/v1/session", headers=headers).status_code == 204
        sent = headers
    else:
        sent = {"Authorization": f"Bearer {token}"} if token else {}
    routes = api_routes(app)
    assert ("POST", "/api/v1/search") in routes and ("GET", "/api/v1/openapi.json") in routes
    leaks = personal_values(people)
    for method, path in routes:
        if (method, path) == ("POST", "/api/v1/session"):
            continue  # the way in: it answers without a session by design
        body = {"field": "name", **PURPOSE} if method == "POST" else None
        url = concrete(path, record_id)
        response = client.request(
            method, url, headers=sent, json=body, params=PURPOSE if method == "GET" else None
        )
        assert_error(response, 401, "not_authenticated")
        assert response.headers["www-authenticate"] == "Bearer"
        assert record_id not in response.text
        assert not [v for v in leaks if v in response.text], f"{method} {path} leaked"


def test_a_cross_site_page_cannot_drive_the_api_with_the_officials_cookie(
    app: FastAPI, client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    # The API checks no CSRF token, so the cookie a browser adds on its own opens no
    # route, and a body a cross-site form can send (text/plain) is not read.
    headers = headers_for(client, vault, Role.INVESTIGATOR)
    token = headers["Authorization"].removeprefix("Bearer ")
    record_id = first_record_id(client, headers, people[0]["national_id"])
    with TestClient(app) as browser:
        browser.cookies.set(deps.SESSION_COOKIE, token)
        for method, path in api_routes(app):
            if (method, path) == ("POST", "/api/v1/session"):
                continue
            body = {"field": "name", **PURPOSE} if method == "POST" else None
            response = browser.request(
                method,
                concrete(path, record_id),
                json=body,
                params=PURPOSE if method == "GET" else None,
            )
            assert_error(response, 401, "not_authenticated")
    search = {
        "record_type": "person",
        "index": "national_id",
        "values": {"national_id": str(people[0]["national_id"])},
        **PURPOSE,
    }
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        sent = {**headers, "Content-Type": content_type}
        response = client.post("/api/v1/search", content=orjson.dumps(search), headers=sent)
        assert response.status_code == 415, content_type
        assert str(people[0]["national_id"]) not in response.text


def test_the_openapi_document_needs_a_session(client: TestClient, vault: Vault) -> None:
    assert_error(client.get("/api/v1/openapi.json"), 401)
    doc = client.get("/api/v1/openapi.json", headers=headers_for(client, vault, Role.OFFICER))
    assert doc.status_code == 200
    assert "/api/v1/search" in doc.json()["paths"]
    assert "session" in doc.json()["components"]["securitySchemes"]


@pytest.fixture
def stranger(app: FastAPI) -> Iterator[TestClient]:
    """A client from its own address, so that its failures throttle only itself."""
    with TestClient(app, client=(f"192.0.2.{next(_accounts) % 250 + 1}", 40000)) as c:
        yield c


def test_a_wrong_password_is_refused_without_echoing_it(stranger: TestClient, vault: Vault) -> None:
    client = stranger
    sent = "wrong: amber lighthouse 42"
    name = new_account(vault, Role.OFFICER)
    response = client.post("/api/v1/session", json={"username": name, "password": sent})
    assert_error(response, 401)
    assert sent not in response.text
    unknown = client.post("/api/v1/session", json={"username": "nobody.here", "password": sent})
    assert unknown.json() == response.json()


# -- the whole flow, and threat 7: a token is dead after logout ------------------------


def test_session_search_record_reveal_logout(
    client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    person = people[3]
    name = new_account(vault, Role.INVESTIGATOR)
    headers = session_headers(client, vault, name)
    me = client.get("/api/v1/me", headers=headers)
    assert me.json() == {"username": name, "role": "investigator"}

    found = client.post(
        "/api/v1/search",
        headers=headers,
        json={
            "record_type": "person",
            "index": "national_id",
            "values": {"national_id": person["national_id"]},
            "limit": 5,
            **PURPOSE,
        },
    )
    assert found.status_code == 200
    assert found.headers["cache-control"] == "no-store"
    results = found.json()["results"]
    assert len(results) == 1 and found.json()["next_cursor"] is None
    assert person["national_id"] not in found.text  # threat 9: masked
    record_id = results[0]["record_id"]

    shown = client.get(f"/api/v1/records/{record_id}", headers=headers, params=PURPOSE)
    assert shown.status_code == 200
    assert shown.json()["record_id"] == record_id and shown.json()["type"] == "person"
    assert person["national_id"] not in shown.text and person["phone"] not in shown.text

    revealed = client.post(
        f"/api/v1/records/{record_id}/reveal",
        headers=headers,
        json={"field": "national_id", **PURPOSE},
    )
    assert revealed.status_code == 200
    assert revealed.json() == {
        "record_id": record_id,
        "field": "national_id",
        "value": person["national_id"],
    }
    assert revealed.headers["cache-control"] == "no-store"

    assert client.delete("/api/v1/session", headers=headers).status_code == 204
    assert_error(client.get("/api/v1/me", headers=headers), 401)
    assert_error(
        client.post(
            f"/api/v1/records/{record_id}/reveal",
            headers=headers,
            json={"field": "national_id", **PURPOSE},
        ),
        401,
    )


def test_each_read_is_logged_with_the_client_address(
    client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    headers = headers_for(client, vault, Role.INVESTIGATOR)
    before = vault._log.size
    first_record_id(client, headers, people[5]["national_id"])
    entries = [e for _, e in vault._log.entries(before)]
    assert [e.action for e in entries][-1] == "record:index:search"
    assert entries[-1].client == "testclient"
    assert entries[-1].purpose == PURPOSE["purpose"]
    assert entries[-1].case_ref == PURPOSE["case_ref"]


# -- threats 9 and 10: a purpose and a case, or nothing ---------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"purpose": None},
        {"case_ref": None},
        {"purpose": "x"},
        {"case_ref": "no spaces allowed"},
        {"purpose": "two\nlines"},
    ],
)
def test_a_search_without_a_usable_purpose_and_case_is_refused(
    client: TestClient, vault: Vault, people: list[dict[str, Any]], change: dict[str, Any]
) -> None:
    body: dict[str, Any] = {
        "record_type": "person",
        "index": "national_id",
        "values": {"national_id": people[0]["national_id"]},
        **PURPOSE,
    }
    for key, value in change.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    headers = headers_for(client, vault, Role.INVESTIGATOR)
    response = client.post("/api/v1/search", headers=headers, json=body)
    error = assert_error(response, 422)
    assert error["code"] in {"invalid_request", "purpose_required"}
    assert people[0]["national_id"] not in response.text  # the value is never echoed


def test_a_record_read_without_a_case_is_refused(
    client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    headers = headers_for(client, vault, Role.INVESTIGATOR)
    record_id = first_record_id(client, headers, people[1]["national_id"])
    response = client.get(
        f"/api/v1/records/{record_id}", headers=headers, params={"purpose": "curiosity"}
    )
    # The policy's decision, the same through every adapter, and on the log as refused.
    assert_error(response, 422, "purpose_required")
    refused = list(vault._log.entries(vault._log.size - 1))[-1][1]
    assert (refused.action, refused.outcome) == ("record:masked:read", Outcome.DENIED)


def test_malformed_values_are_refused_by_field_never_by_value(
    client: TestClient, vault: Vault
) -> None:
    headers = headers_for(client, vault, Role.INVESTIGATOR)
    secret = "110101199001011234" * 20  # longer than any value may be
    response = client.post(
        "/api/v1/search",
        headers=headers,
        json={
            "record_type": "person",
            "index": "national_id",
            "values": {"national_id": secret},
            **PURPOSE,
        },
    )
    error = assert_error(response, 422, "invalid_request")
    assert "values" in error["message"] and secret[:18] not in response.text
    wrong_index = client.post(
        "/api/v1/search",
        headers=headers,
        json={
            "record_type": "person",
            "index": "shoe_size",
            "values": {"x": "1"},
            **PURPOSE,
        },
    )
    assert_error(wrong_index, 422, "invalid_query")


def test_an_unknown_record_is_404_in_the_error_shape(client: TestClient, vault: Vault) -> None:
    headers = headers_for(client, vault, Role.INVESTIGATOR)
    response = client.get("/api/v1/records/nosuchrecord", headers=headers, params=PURPOSE)
    assert_error(response, 404, "record_not_found")
    assert_error(client.get("/api/v1/no/such/route", headers=headers), 404)


# -- threat 11: hard caps on every page ---------------------------------------------------


def test_an_officer_pages_no_deeper_than_the_roles_paging_limits(
    client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    officer = DEFAULT_BUDGETS[Role.OFFICER]
    assert officer.page_size == 20 and officer.search_depth == 40
    name = new_account(vault, Role.OFFICER)
    headers = session_headers(client, vault, name)
    adult = next(p for p in people if str(p.get("birth_date", "2020")) < "2000")
    body = {
        "record_type": "person",
        "index": "national_id",
        "values": {"national_id": adult["national_id"]},
        **PURPOSE,
    }
    assert client.post("/api/v1/search", headers=headers, json={**body, "limit": 20}).is_success
    error = assert_error(
        client.post("/api/v1/search", headers=headers, json={**body, "limit": 21}), 403
    )
    assert "20 records a page" in error["message"]
    deep = {**body, "limit": 20, "cursor": api._encode_cursor("s", 40)}
    assert_error(client.post("/api/v1/search", headers=headers, json=deep), 403)
    refused = [
        e for _, e in vault._log.entries() if e.actor == name and e.outcome == Outcome.DENIED.value
    ]
    assert [e.detail["limits"] for e in refused] == [["page_size"], ["search_depth"]]
    # Refused before anything was read: no record is named, nothing was charged.
    assert all(e.records == () for e in refused)
    # An account of its own limits pages as they say.
    wide = session_headers(
        client, vault, new_account(vault, Role.OFFICER, {"page_size": 50, "search_depth": 100})
    )
    assert client.post("/api/v1/search", headers=wide, json={**body, "limit": 50}).is_success


def test_a_search_page_is_capped_at_one_hundred(
    client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    # Whatever an account's own paging limits, no search shows more than a hundred.
    headers = session_headers(client, vault, new_account(vault, Role.INVESTIGATOR, NO_LIMITS))
    body = {
        "record_type": "person",
        "index": "national_id",
        "values": {"national_id": people[0]["national_id"]},
        **PURPOSE,
    }
    for limit in (0, 101, 1000, 10**9):
        assert_error(
            client.post("/api/v1/search", headers=headers, json={**body, "limit": limit}), 422
        )
    assert client.post("/api/v1/search", headers=headers, json={**body, "limit": 100}).is_success
    beyond = api._encode_cursor("s", 100)
    assert_error(
        client.post("/api/v1/search", headers=headers, json={**body, "cursor": beyond}),
        422,
        "invalid_query",
    )


def test_search_pages_follow_the_cursor_without_repeats(
    client: TestClient, vault: Vault, population_file: Path
) -> None:
    deliveries = [r for r in read_records(population_file) if r["type"] == "delivery"]
    counts: dict[str, int] = {}
    for d in deliveries:
        counts[str(d["recipient"])] = counts.get(str(d["recipient"]), 0) + 1
    recipient, expected = max(counts.items(), key=lambda kv: kv[1])
    assert expected >= 2
    headers = headers_for(client, vault, Role.INVESTIGATOR)
    body: dict[str, Any] = {
        "record_type": "delivery",
        "index": "linked_person",
        "values": {"recipient": recipient},
        "limit": 1,
        **PURPOSE,
    }
    seen: list[str] = []
    for _ in range(expected + 2):
        page = client.post("/api/v1/search", headers=headers, json=body).json()
        seen += [r["record_id"] for r in page["results"]]
        if page["next_cursor"] is None:
            break
        body["cursor"] = page["next_cursor"]
    assert len(seen) == expected == len(set(seen))


def test_audit_log_pages_are_capped_and_walk_the_log_once(
    client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    officer = headers_for(client, vault, Role.INVESTIGATOR)
    for person in people[10:14]:
        first_record_id(client, officer, person["national_id"])
    auditor = headers_for(client, vault, Role.AUDITOR)
    query = {"purpose": "quarterly review of searches", "action": "record:index:search"}
    for limit in (0, api.LOG_PAGE_MAX + 1, 1000):
        assert_error(
            client.get("/api/v1/audit/log", headers=auditor, params={**query, "limit": limit}),
            422,
        )
    assert_error(
        client.get("/api/v1/audit/log", headers=auditor, params={**query, "cursor": "%%%"}),
        422,
        "invalid_query",
    )
    expected = [i for i, e in vault._log.entries() if e.action.startswith("record:index:search")]
    seen: list[int] = []
    params: dict[str, Any] = {**query, "limit": 3}
    while True:
        page = client.get("/api/v1/audit/log", headers=auditor, params=params)
        assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
        entries = page.json()["entries"]
        assert len(entries) <= 3
        seen += [e["index"] for e in entries]
        if page.json()["next_cursor"] is None:
            break
        params["cursor"] = page.json()["next_cursor"]
    assert seen == expected
    # Reading the log is itself on the log, with the auditor's stated purpose.
    last = list(vault._log.entries(vault._log.size - 1))[-1][1]
    assert last.action == "audit:log:read" and last.purpose == query["purpose"]


# -- separation of duties ----------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.INVESTIGATOR, Role.OFFICER, Role.ADMIN])
def test_only_auditors_read_the_access_log(
    client: TestClient, vault: Vault, people: list[dict[str, Any]], role: Role
) -> None:
    record_id = first_record_id(
        client, headers_for(client, vault, Role.INVESTIGATOR), people[2]["national_id"]
    )
    headers = headers_for(client, vault, role)
    reason = {"purpose": "looking at the log"}
    for path in (
        "/api/v1/audit/log",
        f"/api/v1/audit/subject/{record_id}",
        f"/api/v1/audit/subject/{record_id}/bundle",
    ):
        response = client.get(path, headers=headers, params=reason)
        assert_error(response, 403, "access_denied")
        assert record_id not in response.text


def test_auditors_read_no_records(
    client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    record_id = first_record_id(
        client, headers_for(client, vault, Role.INVESTIGATOR), people[4]["national_id"]
    )
    headers = headers_for(client, vault, Role.AUDITOR)
    search = {
        "record_type": "person",
        "index": "national_id",
        "values": {"national_id": people[4]["national_id"]},
        **PURPOSE,
    }
    responses = [
        client.post("/api/v1/search", headers=headers, json=search),
        client.get(f"/api/v1/records/{record_id}", headers=headers, params=PURPOSE),
        client.post(
            f"/api/v1/records/{record_id}/reveal",
            headers=headers,
            json={"field": "name", **PURPOSE},
        ),
    ]
    for response in responses:
        assert_error(response, 403, "access_denied")
        assert people[4]["name"] not in response.text


def test_a_subject_report_lists_the_reveal_and_its_bundle_verifies(
    client: TestClient, vault: Vault, people: list[dict[str, Any]]
) -> None:
    name = new_account(vault, Role.INVESTIGATOR)
    official = session_headers(client, vault, name)
    record_id = first_record_id(client, official, people[6]["national_id"])
    client.post(
        f"/api/v1/records/{record_id}/reveal",
        headers=official,
        json={"field": "phone", **PURPOSE},
    )
    auditor = headers_for(client, vault, Role.AUDITOR)
    params = {"purpose": "subject access request", "case_ref": "SAR-9"}
    report = client.get(f"/api/v1/audit/subject/{record_id}", headers=auditor, params=params)
    assert report.status_code == 200, report.text
    accesses = report.json()["accesses"]
    reveal = [a for a in accesses if a["action"] == "record:field:reveal"]
    assert reveal and reveal[-1]["actor"] == name
    assert reveal[-1]["purpose"] == PURPOSE["purpose"]
    bundle = client.get(f"/api/v1/audit/subject/{record_id}/bundle", headers=auditor, params=params)
    assert bundle.status_code == 200
    assert bundle.headers["content-type"].startswith("text/plain")
    verified = verify_bundle(bundle.content, vault._log.verifier_key)
    assert verified.subject == record_id


def test_every_error_documented_in_openapi_uses_the_one_shape(app: FastAPI) -> None:
    doc = api.openapi_document(app)
    ref = "#/components/schemas/ErrorBody"
    for path, operations in doc["paths"].items():
        assert path.startswith(api.PREFIX)
        for operation in operations.values():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": ref}, (path, status)
    assert orjson.dumps(doc)  # serialisable as it is served


def test_no_default_account_opens_a_session(stranger: TestClient) -> None:
    for username, password in [("admin", "admin"), ("root", "root"), ("admin", PASSWORD)]:
        response = stranger.post(
            "/api/v1/session", json={"username": username, "password": password}
        )
        assert_error(response, 401)


def test_repeated_failures_are_throttled_with_retry_after(stranger: TestClient) -> None:
    statuses = []
    for _ in range(6):
        response = stranger.post(
            "/api/v1/session", json={"username": "nobody.here", "password": "guess 1234567"}
        )
        statuses.append(response.status_code)
    assert statuses[0] == 401 and statuses[-1] == 429
    assert_error(response, 429, "login_throttled")
    assert int(response.headers["retry-after"]) >= 1
