"""One refusal table for the dashboard and the API: a probe learns the same from either
surface (the same status, one stable code), and neither ever repeats what was sent.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Annotated, Any

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from custodes.errors import (
    AccessDenied,
    AuditUnavailable,
    AuthenticationFailed,
    BudgetExceeded,
    InvalidAssignment,
    InvalidQuery,
    LoginThrottled,
    LogMoved,
    PurposeRequired,
    RecordNotFound,
    SessionLimit,
    TamperDetected,
    WeakPassword,
)
from custodes.vault import Vault
from custodes.web import api, deps, refusals
from custodes.web.app import create_app
from tests.conftest import make_vault

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

# The example number of the national standard: the shape of a real ID, nobody's own.
SENTINEL = "11010519491231002X"


# Every row of the table, and the subclasses and fallbacks that answer through a row, with
# the API code callers rely on: a changed code breaks them.
CASES: dict[str, tuple[BaseException, str]] = {
    "no-session": (deps.NotAuthenticated(), "not_authenticated"),
    "csrf": (deps.CsrfRejected(), "csrf_rejected"),
    "throttled": (LoginThrottled(30), "login_throttled"),
    "auth-failed": (AuthenticationFailed(), "authentication_failed"),
    "no-purpose": (PurposeRequired("a purpose is required"), "purpose_required"),
    "bad-query": (InvalidQuery("choose what to search by"), "invalid_query"),
    "bad-assignment": (InvalidAssignment("that case is already assigned"), "invalid_query"),
    "denied": (AccessDenied("only an auditor reads the access log"), "access_denied"),
    "budget": (BudgetExceeded("this account's budget is spent"), "budget_exceeded"),
    "sessions": (SessionLimit("this account has its sessions open"), "session_limit"),
    "not-found": (RecordNotFound("no such record"), "record_not_found"),
    "log-down": (AuditUnavailable("the access log is closed"), "audit_unavailable"),
    "log-moved": (LogMoved("the access log kept moving"), "audit_unavailable"),
    "tampered": (
        TamperDetected("the export request failed its integrity check"),
        "integrity_failed",
    ),
    "malformed": (
        RequestValidationError(
            [{"type": "missing", "loc": ("query", "reason"), "msg": "Field required"}]
        ),
        "invalid_request",
    ),
    "unlisted": (WeakPassword("a password needs 12 characters or more"), "weak_password"),
    "no-route": (StarletteHTTPException(404), "not_found"),
    "wrong-method": (StarletteHTTPException(405), "method_not_allowed"),
    "unparsable": (StarletteHTTPException(400), "bad_request"),
}


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    values: dict[str, Annotated[str, Field(max_length=8)]]


def _add_probes(app: FastAPI) -> None:
    """Routes that raise on demand, as a page and under the API's prefix."""

    def raise_case(name: str) -> None:
        raise CASES[name][0]

    def raise_unexpected() -> None:
        raise RuntimeError(f"a bug that knows {SENTINEL}")

    def refuse_with_fixed_words(national_id: str) -> None:
        raise InvalidQuery("no index answers that: choose another")

    def raise_validation_with_input() -> None:
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("body", "values", SENTINEL),
                    "msg": "Extra inputs are not permitted",
                    "input": SENTINEL,
                }
            ]
        )

    def raise_http_with_detail() -> None:
        raise StarletteHTTPException(400, detail=f"could not parse {SENTINEL}")

    def typed(n: int) -> None:
        return None

    def body(probe: Probe) -> None:
        return None

    for prefix in ("", api.PREFIX):
        app.add_api_route(prefix + "/refusal/{name}", raise_case)
        app.add_api_route(prefix + "/unexpected", raise_unexpected)
        app.add_api_route(prefix + "/fixed-words", refuse_with_fixed_words)
        app.add_api_route(prefix + "/validation-input", raise_validation_with_input)
        app.add_api_route(prefix + "/http-detail", raise_http_with_detail)
        app.add_api_route(prefix + "/typed", typed)
        app.add_api_route(prefix + "/body", body, methods=["POST"])


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    v = make_vault(tmp_path_factory.mktemp("errors"), "memory")
    yield v
    v.close()


@pytest.fixture(scope="module")
def client(vault: Vault) -> Iterator[TestClient]:
    app = create_app(vault)
    _add_probes(app)
    with TestClient(app) as c:
        yield c


def _api_error(response: Any) -> dict[str, str]:
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    return dict(body["error"])


def test_pages_and_api_answer_every_refusal_with_the_same_status(client: TestClient) -> None:
    # A row without a case here would be a status nobody checks.
    assert set(refusals.REFUSALS) <= {type(exc) for exc, _ in CASES.values()}
    for name, (exc, code) in CASES.items():
        row = refusals.refusal_for(exc)
        assert row.code == code, name
        page = client.get(f"/refusal/{name}", follow_redirects=False)
        answer = client.get(f"{api.PREFIX}/refusal/{name}")
        assert answer.status_code == row.status, name
        assert _api_error(answer)["code"] == code, name
        if row.to_login:
            # A browser without a live session is sent to log in, not shown a 401.
            assert page.status_code == 303 and page.headers["location"] == "/login", name
        else:
            assert page.status_code == answer.status_code, name
            assert page.headers["content-type"].startswith("text/html"), name
        if row.status == 401:
            assert answer.headers["www-authenticate"] == "Bearer"
        if row.status == 429:
            assert answer.headers["retry-after"] == page.headers["retry-after"] == "30"
    # The most specific class wins over its base.
    assert refusals.refusal_for(PurposeRequired("x")).status == 422
    assert refusals.refusal_for(AccessDenied("x")).status == 403


def test_an_unexpected_failure_is_a_500_on_both_sides(client: TestClient) -> None:
    # The security middleware answers it before any handler: plain text, saying nothing.
    for url in ("/unexpected", f"{api.PREFIX}/unexpected"):
        response = client.get(url)
        assert response.status_code == 500 and SENTINEL not in response.text
    assert refusals.refusal_for(RuntimeError()) == refusals.INTERNAL_ERROR
    internal = api.api_error(RuntimeError(SENTINEL))
    assert internal.status_code == 500
    assert b'"internal_error"' in internal.body and SENTINEL.encode() not in internal.body


def test_no_refusal_repeats_a_value(client: TestClient) -> None:
    # A refusal from the vault says its own fixed words, whatever the request carried.
    page = client.get("/fixed-words", params={"national_id": SENTINEL})
    answer = client.get(f"{api.PREFIX}/fixed-words", params={"national_id": SENTINEL})
    assert page.status_code == answer.status_code == 422
    assert _api_error(answer)["message"] == "no index answers that: choose another"
    assert "no index answers that" in page.text
    # Validation errors: pydantic's own (a value of the wrong type, an unknown key holding a
    # value, an over-long value), one built by hand with the input in it, and a parse
    # failure whose detail quotes the body.
    probes: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/typed", {"params": {"n": SENTINEL}}),
        ("POST", "/body", {"json": {"values": {SENTINEL: SENTINEL}, SENTINEL: SENTINEL}}),
        ("POST", "/body", {"json": {"values": {"national_id": SENTINEL}}}),
        ("GET", "/validation-input", {}),
        ("GET", "/http-detail", {}),
    ]
    for method, path, sent in probes:
        page = client.request(method, path, **sent)
        answer = client.request(method, api.PREFIX + path, **sent)
        assert page.status_code == answer.status_code, path
        assert page.status_code in (400, 422), path
        message = _api_error(answer)["message"]
        assert SENTINEL not in page.text and SENTINEL not in answer.text, path
        assert SENTINEL[:6] not in message, path
    typed = client.get(f"{api.PREFIX}/typed", params={"n": SENTINEL})
    assert _api_error(typed)["message"].startswith("query.n: ")
