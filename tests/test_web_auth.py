"""Threats 6 and 7 over the web: login with a second factor, session cookies that are
rotated at login and worthless after logout, password change, disable or expiry; CSRF."""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from custodes.errors import AccessDenied, AuthenticationFailed
from custodes.policy import Role
from custodes.vault import ABSOLUTE_TIMEOUT, IDLE_TIMEOUT, Vault
from custodes.web import deps
from custodes.web.app import create_app
from tests.conftest import PASSWORD, PURPOSE, enrol, login, make_vault, totp_now

with warnings.catch_warnings():
    # Starlette's test client now asks for httpx2; httpx drives it just the same.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient


@pytest.fixture
def web_vault(tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, "memory")
    yield v
    v.close()


@pytest.fixture
def app(web_vault: Vault) -> FastAPI:
    return create_app(web_vault)


def form_token(html: str) -> str:
    found = re.search(r'name="form_token" value="([^"]+)"', html)
    assert found, "no form token on the page"
    return found[1]


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token on the page"
    return found[1]


def add_enrolled(vault: Vault, name: str, role: Role = Role.INVESTIGATOR) -> str:
    vault.admin.add_account(vault.operator, name, PASSWORD, role, {"district": "*"})
    return enrol(vault, name)


def web_login(client: TestClient, vault: Vault, name: str, secret: str) -> str:
    """Log in through the form as a browser does; the session cookie's value."""
    page = client.get("/login")
    response = client.post(
        "/login",
        data={
            "username": name,
            "password": PASSWORD,
            "totp": totp_now(vault, secret),
            "form_token": form_token(page.text),
        },
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text
    token = client.cookies.get(deps.SESSION_COOKIE)
    assert token
    return token


def is_sent_to_login(response: object) -> bool:
    status = getattr(response, "status_code", 0)
    headers = getattr(response, "headers", {})
    return status == 303 and headers.get("location") == "/login"


def test_login_needs_password_and_one_time_code(app: FastAPI, web_vault: Vault) -> None:
    secret = add_enrolled(web_vault, "t.officer", Role.OFFICER)
    with TestClient(app) as client:
        page = client.get("/login")
        refused = client.post(
            "/login",
            data={
                "username": "t.officer",
                "password": PASSWORD,
                "form_token": form_token(page.text),
            },
            follow_redirects=False,
        )
        assert refused.status_code == 401
        assert not client.cookies.get(deps.SESSION_COOKIE)
        web_login(client, web_vault, "t.officer", secret)


def test_a_right_password_on_an_account_awaiting_enrolment_answers_like_a_wrong_one(
    app: FastAPI, web_vault: Vault
) -> None:
    web_vault.admin.add_account(web_vault.operator, "t.pending", PASSWORD, Role.OFFICER)
    answers = []
    with TestClient(app) as client:
        for password in (PASSWORD, "a wrong password 5513"):
            page = client.get("/login")
            answer = client.post(
                "/login",
                data={
                    "username": "t.pending",
                    "password": password,
                    "totp": "123456",
                    "form_token": form_token(page.text),
                },
                follow_redirects=False,
            )
            # The page carries a fresh form token each time; nothing else may differ.
            body = re.sub(r'name="form_token" value="[^"]+"', "", answer.text)
            answers.append((answer.status_code, body))
    assert answers[0] == answers[1]
    assert answers[0][0] == 401


def test_planted_session_cookie_is_replaced_at_login(app: FastAPI, web_vault: Vault) -> None:
    secret = add_enrolled(web_vault, "t.officer", Role.OFFICER)
    with TestClient(app) as client:
        first = web_login(client, web_vault, "t.officer", secret)
        second = web_login(client, web_vault, "t.officer", secret)
        assert first != second and len(second) >= 22  # 128 random bits, url-safe
        # The session held before the new login is over, not merely forgotten.
        with pytest.raises(AuthenticationFailed):
            web_vault.session_for(first)
        web_vault.session_for(second)


def test_session_cookie_flags(app: FastAPI, web_vault: Vault) -> None:
    secret = add_enrolled(web_vault, "t.officer", Role.OFFICER)
    with TestClient(app) as client:
        page = client.get("/login")
        response = client.post(
            "/login",
            data={
                "username": "t.officer",
                "password": PASSWORD,
                "totp": totp_now(web_vault, secret),
                "form_token": form_token(page.text),
            },
            follow_redirects=False,
        )
    cookie = next(
        v for k, v in response.headers.multi_items() if k == "set-cookie" and "session" in v
    )
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would not return


def test_session_cookie_over_tls_is_secure_and_host_prefixed(web_vault: Vault) -> None:
    secret = add_enrolled(web_vault, "t.officer", Role.OFFICER)
    app = create_app(web_vault, tls=True)
    with TestClient(app, base_url="https://testserver") as client:
        page = client.get("/login")
        assert "max-age" in page.headers["strict-transport-security"]
        response = client.post(
            "/login",
            data={
                "username": "t.officer",
                "password": PASSWORD,
                "totp": totp_now(web_vault, secret),
                "form_token": form_token(page.text),
            },
            follow_redirects=False,
        )
        assert response.status_code == 303
    cookie = next(
        v for k, v in response.headers.multi_items() if k == "set-cookie" and "__Host-" in v
    )
    assert cookie.startswith("__Host-custodes=")
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_cross_site_login_form_without_its_token_is_rejected(
    app: FastAPI, web_vault: Vault
) -> None:
    secret = add_enrolled(web_vault, "t.officer", Role.OFFICER)
    with TestClient(app) as client:
        response = client.post(
            "/login",
            data={
                "username": "t.officer",
                "password": PASSWORD,
                "totp": totp_now(web_vault, secret),
                "form_token": "guessed",
            },
            follow_redirects=False,
        )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers or "session" not in response.headers["set-cookie"]


def test_cross_site_post_without_csrf_token_is_rejected(app: FastAPI, web_vault: Vault) -> None:
    secret = add_enrolled(web_vault, "t.officer", Role.OFFICER)
    with TestClient(app) as client:
        token = web_login(client, web_vault, "t.officer", secret)
        for sent in ({}, {deps.CSRF_FIELD: "forged"}):
            response = client.post("/logout", data=sent, follow_redirects=False)
            assert response.status_code == 403
        web_vault.session_for(token)  # still logged in: the forged logout did nothing


def test_stolen_cookie_is_worthless_after_logout(app: FastAPI, web_vault: Vault) -> None:
    secret = add_enrolled(web_vault, "t.officer", Role.OFFICER)
    with TestClient(app) as client:
        token = web_login(client, web_vault, "t.officer", secret)
        home = client.get("/", follow_redirects=False)
        assert home.status_code == 200
        response = client.post(
            "/logout", data={deps.CSRF_FIELD: csrf_of(home.text)}, follow_redirects=False
        )
        assert is_sent_to_login(response)
    with TestClient(app) as thief:
        thief.cookies.set(deps.SESSION_COOKIE, token)
        assert is_sent_to_login(thief.get("/", follow_redirects=False))


@pytest.mark.parametrize("event", ["password change", "disable"])
def test_stolen_session_ends_everywhere_on_account_event(web_vault: Vault, event: str) -> None:
    sessions = [login(web_vault, Role.OFFICER, "t.officer")]
    secret = enrol(web_vault, "t.officer")
    sessions.append(web_vault.login("t.officer", PASSWORD, totp=totp_now(web_vault, secret)))
    if event == "disable":
        web_vault.admin.disable_account(web_vault.operator, "t.officer")
    else:
        web_vault.admin.change_password(
            web_vault.operator, "t.officer", "a new passphrase: larch river amber 42"
        )
    for session in sessions:
        with pytest.raises(AuthenticationFailed):
            web_vault.session_for(session.token)
        with pytest.raises(AuthenticationFailed):
            web_vault.record(session, PURPOSE, "any-record")


def test_idle_and_absolute_timeouts_end_a_session(web_vault: Vault) -> None:
    now = [time.time()]
    web_vault._clock.moved = lambda: now[0]  # type: ignore[attr-defined]
    idle = login(web_vault, Role.OFFICER, "t.idle")
    now[0] += IDLE_TIMEOUT + 1
    with pytest.raises(AuthenticationFailed):
        web_vault.session_for(idle.token)

    busy = login(web_vault, Role.OFFICER, "t.busy")
    started = now[0]
    while now[0] - started < ABSOLUTE_TIMEOUT - IDLE_TIMEOUT:
        now[0] += IDLE_TIMEOUT - 60  # active, never idle for long
        web_vault.session_for(busy.token)
    now[0] = started + ABSOLUTE_TIMEOUT + 1
    with pytest.raises(AuthenticationFailed):
        web_vault.session_for(busy.token)


def test_api_token_is_scoped_hashed_and_dies_with_its_account(web_vault: Vault) -> None:
    login(web_vault, Role.INVESTIGATOR, "t.integration")
    token = web_vault.admin.issue_api_token(web_vault.operator, "t.integration", "search", days=30)
    assert not any(token.encode() in (web_vault._storage.get_meta(k) or b"") for k in ["x"])
    principal = web_vault.session_for(token)
    assert principal.scope == "search" and principal.username == "t.integration"
    with pytest.raises(AccessDenied):
        web_vault.reveal(principal, PURPOSE, "any-record", "phone")
    web_vault.admin.disable_account(web_vault.operator, "t.integration")
    with pytest.raises(AuthenticationFailed):
        web_vault.session_for(token)


def test_expired_api_token_is_refused(web_vault: Vault) -> None:
    now = [time.time()]
    web_vault._clock.moved = lambda: now[0]  # type: ignore[attr-defined]
    login(web_vault, Role.INVESTIGATOR, "t.integration")
    token = web_vault.admin.issue_api_token(web_vault.operator, "t.integration", "read", days=1)
    web_vault.session_for(token)
    now[0] += 86400 + 1
    with pytest.raises(AuthenticationFailed):
        web_vault.session_for(token)


def test_enrolment_page_shows_a_qr_code_without_inline_script(
    app: FastAPI, web_vault: Vault
) -> None:
    web_vault.admin.add_account(web_vault.operator, "t.new", PASSWORD, Role.OFFICER)
    code = web_vault.admin.issue_enrolment(web_vault.operator, "t.new")
    with TestClient(app) as client:
        page = client.get("/enrol", params={"code": code})
        assert page.status_code == 200 and "<svg" in page.text and "otpauth://" in page.text
        assert "<script>" not in page.text and "style=" not in page.text
        secret = web_vault.enrolment(code).secret
        done = client.post(
            "/enrol",
            data={
                "code": code,
                "totp": totp_now(web_vault, secret),
                "form_token": form_token(page.text),
            },
        )
        assert done.status_code == 200 and "is set up" in done.text
        assert client.get("/enrol", params={"code": code}).status_code == 404


# -- behind a TLS-terminating proxy ------------------------------------------------------

PROXY = ("127.0.0.1", 41000)  # nginx on this host, relaying to custodes on loopback
STRANGER = ("198.51.100.4", 41000)
# What the browser speaks to (the proxy), so that the client returns Secure cookies.
BROWSER = "https://vault.example"


def _login_through(
    app: FastAPI, vault: Vault, peer: tuple[str, int], headers: dict[str, str]
) -> tuple[str, str | None, int]:
    """Log in from `peer` with `headers` on every request, as a browser speaking https to
    the proxy: the session cookie set, the login page's HSTS header, the login's status."""
    secret = add_enrolled(vault, "t.officer", Role.OFFICER)
    with TestClient(app, base_url=BROWSER, client=peer, headers=headers) as client:
        page = client.get("/login")
        response = client.post(
            "/login",
            data={
                "username": "t.officer",
                "password": PASSWORD,
                "totp": totp_now(vault, secret),
                "form_token": form_token(page.text),
            },
            follow_redirects=False,
        )
    cookie = next(
        (
            v
            for k, v in response.headers.multi_items()
            if k == "set-cookie" and v.startswith((deps.SESSION_COOKIE, deps.TLS_SESSION_COOKIE))
        ),
        "",
    )
    return cookie, page.headers.get("strict-transport-security"), response.status_code


def test_a_trusted_proxys_https_gives_secure_cookies_and_hsts(web_vault: Vault) -> None:
    app = create_app(web_vault, trusted_proxies=["127.0.0.1"], behind_tls_proxy=True)
    cookie, hsts, status = _login_through(
        app, web_vault, PROXY, {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.7"}
    )
    assert status == 303
    assert cookie.startswith("__Host-custodes=") and "Secure" in cookie
    assert hsts is not None and "max-age" in hsts


def test_a_forged_forwarded_proto_from_an_untrusted_peer_changes_nothing(
    web_vault: Vault,
) -> None:
    # Without --behind-tls-proxy, a peer that is not the trusted proxy is answered as
    # what it is: plain HTTP, whatever it says about itself.
    app = create_app(web_vault, trusted_proxies=["127.0.0.1"])
    cookie, hsts, status = _login_through(app, web_vault, STRANGER, {"X-Forwarded-Proto": "https"})
    assert status == 303
    assert cookie.startswith(f"{deps.SESSION_COOKIE}=") and "Secure" not in cookie
    assert hsts is None


def test_a_trusted_proxy_saying_http_gets_no_secure_cookie_and_no_hsts(web_vault: Vault) -> None:
    app = create_app(web_vault, trusted_proxies=["127.0.0.1"])
    cookie, hsts, _ = _login_through(app, web_vault, PROXY, {"X-Forwarded-Proto": "http"})
    assert cookie.startswith(f"{deps.SESSION_COOKIE}=") and "Secure" not in cookie and hsts is None


@pytest.mark.parametrize(
    ("peer", "headers"),
    [
        (STRANGER, {"X-Forwarded-Proto": "https"}),  # around the proxy, claiming https
        (PROXY, {"X-Forwarded-Proto": "http"}),  # through the proxy, over plain http
        (PROXY, {}),  # through something on this host that says nothing
        (STRANGER, {}),
    ],
)
def test_behind_a_tls_proxy_what_it_did_not_relay_over_https_is_refused(
    web_vault: Vault, peer: tuple[str, int], headers: dict[str, str]
) -> None:
    app = create_app(web_vault, trusted_proxies=["127.0.0.1"], behind_tls_proxy=True)
    secret = add_enrolled(web_vault, "t.officer", Role.OFFICER)
    with TestClient(app, base_url=BROWSER, client=peer, headers=headers) as client:
        page = client.get("/login")
        login = client.post(
            "/login",
            data={
                "username": "t.officer",
                "password": PASSWORD,
                "totp": totp_now(web_vault, secret),
            },
            follow_redirects=False,
        )
        api = client.get("/api/v1/me")
    for response in (page, login, api):
        assert response.status_code == 421
        assert "through its TLS proxy" in response.text
        assert "set-cookie" not in response.headers
        assert "form_token" not in response.text
