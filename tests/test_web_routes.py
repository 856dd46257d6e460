"""Threats 1 and 7: an internet scanner or a cookie thief walks every route the app has,
pages and API, and gets refusals only, with zero bytes of anyone's personal data."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.routing import Mount, Route

from custodes.policy import Role
from custodes.vault import ABSOLUTE_TIMEOUT, Vault
from custodes.web import deps
from custodes.web.app import create_app
from custodes.web.security import CSP
from tests.conftest import PASSWORD, login, make_vault
from tests.test_web_auth import add_enrolled, csrf_of, web_login

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

# Served to anyone: the forms that let one log in or enrol, which show no record.
PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/enrol"), ("POST", "/enrol")}
REFUSED = {401, 403, 404, 405, 422, 429}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory, population_file: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path_factory.mktemp("routes"), "memory")
    assert v.ingest(v.operator, population_file).rejected == 0
    yield v
    v.close()


@pytest.fixture(scope="module")
def app(loaded: Vault) -> FastAPI:
    return create_app(loaded)


@pytest.fixture(scope="module")
def record_ids(loaded: Vault, people: list[dict[str, Any]]) -> list[str]:
    session = login(loaded, Role.SUPERVISOR, "t.routes")
    found = loaded.search(
        session,
        _purpose(),
        record_type="person",
        index="national_id",
        values={"national_id": str(people[0]["national_id"])},
    )
    loaded.logout(session)
    return [v.record_id for v in found]


def _purpose() -> Any:
    from tests.conftest import PURPOSE

    return PURPOSE


def personal_values(people: list[dict[str, Any]]) -> list[bytes]:
    values = []
    for person in people:
        for key in ("name", "national_id", "phone", "address", "birth_date"):
            value = person.get(key)
            if isinstance(value, str) and len(value) >= 2:
                values.append(value.encode())
    return values


def every_route(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route, through included routers at any depth."""
    found: list[tuple[str, str]] = []

    def visit(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                continue  # /static: the stylesheet and vendored htmx, public by design
            included = getattr(route, "original_router", None)
            if included is not None:  # FastAPI keeps an included router as one route
                context = getattr(route, "include_context", None)
                visit(list(included.routes), prefix + str(getattr(context, "prefix", "")))
            elif isinstance(route, Route):
                for method in sorted(route.methods or {"GET"}):
                    found.append((method, prefix + route.path))

    visit(list(app.routes), "")
    return found


def fill(path: str, record_id: str) -> str:
    filled = path.replace("{record_id}", record_id).replace("{field}", "phone")
    return re.sub(r"\{[^}]+\}", "phone", filled)


def plausible_body(path: str, people: list[dict[str, Any]]) -> dict[str, Any]:
    """What an attacker who knows the API would send: real-looking queries."""
    person = people[1]
    return {
        "purpose": "checking a reported burglary",
        "case_ref": "C-1",
        "reason": "checking a reported burglary",
        "national_id": person["national_id"],
        "index": "national_id",
        "values": {"national_id": person["national_id"]},
        "field": "phone",
        "username": "t.routes",
        "password": "wrong password, a guess",
        "totp": "000000",
    }


def walk(
    client: TestClient, app: FastAPI, people: list[dict[str, Any]], record_id: str
) -> list[tuple[str, str, Any]]:
    answers = []
    for method, path in every_route(app):
        url = fill(path, record_id)
        body = plausible_body(path, people)
        if method in ("GET", "HEAD", "DELETE", "OPTIONS"):
            response = client.request(
                method,
                url,
                params={"purpose": "look", "q": body["national_id"]},
                follow_redirects=False,
            )
        elif path.startswith("/api/"):
            response = client.request(method, url, json=body, follow_redirects=False)
        else:
            response = client.request(method, url, data=body, follow_redirects=False)
        answers.append((method, path, response))
    return answers


def assert_nothing_served(answers: list[tuple[str, str, Any]], secrets: list[bytes]) -> None:
    assert len(answers) > 10, "the walk found too few routes"
    for method, path, response in answers:
        where = f"{method} {path} -> {response.status_code}"
        if (method, path) in PUBLIC:
            assert response.status_code in {200, *REFUSED}, where
        else:
            to_login = response.status_code == 303 and response.headers["location"] == "/login"
            assert to_login or response.status_code in REFUSED, where
        leaked = [s for s in secrets if s in response.content]
        assert not leaked, f"{where} carried personal data"


def test_internet_scanner_gets_nothing_from_any_route(
    app: FastAPI, people: list[dict[str, Any]], record_ids: list[str]
) -> None:
    with TestClient(app) as scanner:
        answers = walk(scanner, app, people, record_ids[0])
    assert_nothing_served(answers, personal_values(people))
    paths = {p for _, p, _ in answers}
    assert "/login" in paths


def test_forged_bearer_and_cookie_get_nothing_from_any_route(
    app: FastAPI, people: list[dict[str, Any]], record_ids: list[str]
) -> None:
    with TestClient(app, headers={"Authorization": "Bearer cst_forged"}) as scanner:
        scanner.cookies.set(deps.SESSION_COOKIE, "forged-cookie-value-xyz")
        answers = walk(scanner, app, people, record_ids[0])
    assert_nothing_served(answers, personal_values(people))


def _logged_in(app: FastAPI, vault: Vault, name: str) -> tuple[TestClient, str]:
    secret = add_enrolled(vault, name, Role.SUPERVISOR)
    client = TestClient(app)
    return client, web_login(client, vault, name, secret)


@pytest.mark.parametrize("how", ["logged out", "expired", "account disabled", "password changed"])
def test_cookie_thief_gets_nothing_from_any_route_after_the_session_ends(
    app: FastAPI,
    loaded: Vault,
    people: list[dict[str, Any]],
    record_ids: list[str],
    how: str,
) -> None:
    name = f"t.victim.{how.replace(' ', '-')}"
    client, token = _logged_in(app, loaded, name)
    # The session works before it ends: the refusals below are the ending's doing.
    assert client.get("/", follow_redirects=False).status_code == 200
    try:
        if how == "logged out":
            home = client.get("/")
            client.post("/logout", data={deps.CSRF_FIELD: csrf_of(home.text)})
        elif how == "expired":
            later = time.time() + ABSOLUTE_TIMEOUT + 1
            loaded._clock.moved = lambda: later  # type: ignore[attr-defined]
        elif how == "account disabled":
            loaded.admin.disable_account(loaded.operator, name)
        else:
            loaded.admin.change_password(loaded.operator, name, PASSWORD + " and more")
        with TestClient(app) as thief:
            thief.cookies.set(deps.SESSION_COOKIE, token)
            answers = walk(thief, app, people, record_ids[0])
        with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as thief:
            answers += walk(thief, app, people, record_ids[0])
    finally:
        loaded._clock.moved = None  # type: ignore[attr-defined]
        client.close()
    assert_nothing_served(answers, personal_values(people))


def test_every_response_carries_the_security_headers(
    app: FastAPI, people: list[dict[str, Any]], record_ids: list[str]
) -> None:
    with TestClient(app) as client:
        answers = walk(client, app, people, record_ids[0])
        answers.append(("GET", "/static", client.get("/static/custodes.css")))
        answers.append(("GET", "/nowhere", client.get("/nowhere")))
    for method, path, response in answers:
        headers = response.headers
        where = f"{method} {path}"
        assert headers["content-security-policy"] == CSP, where
        assert "'unsafe-inline'" not in CSP and "default-src 'none'" in CSP
        assert headers["x-content-type-options"] == "nosniff", where
        assert headers["referrer-policy"] == "no-referrer", where
        assert headers["x-frame-options"] == "DENY", where
        assert headers["cache-control"] == "no-store", where
        assert headers["cross-origin-opener-policy"] == "same-origin", where
        assert "strict-transport-security" not in headers  # plain HTTP: HSTS means nothing
