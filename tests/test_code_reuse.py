"""A one-time code typed twice: its holder, who gave the right password, is told the code
was used already (so they wait for the next one instead of retyping it); everything else
stays as it was: the login is refused, counted and throttled like any failed one, the
refusal is on the access log, and a wrong password or a wrong code says nothing new.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from custodes.audit import Outcome
from custodes.errors import AuthenticationFailed, CodeUsed
from custodes.policy import Action, Role
from custodes.vault import Vault
from custodes.web.app import create_app
from tests.conftest import PASSWORD, enrol, make_vault, totp_now
from tests.test_web_auth import form_token

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient


@pytest.fixture(params=["memory", "sqlite"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, request.param)
    yield v
    v.close()


def _account(vault: Vault, name: str) -> str:
    vault.admin.add_account(vault.operator, name, PASSWORD, Role.OFFICER, {"district": "*"})
    return enrol(vault, name)


def test_a_code_used_already_is_named_to_the_holder_of_the_password_and_counted(
    vault: Vault,
) -> None:
    secret = _account(vault, "t.desk")
    code = totp_now(vault, secret)
    vault.logout(vault.login("t.desk", PASSWORD, totp=code))
    with pytest.raises(CodeUsed, match="used already: wait for the next code"):
        vault.login("t.desk", PASSWORD, totp=code)
    # A wrong password with the same code, or a wrong code, says nothing new (each tried
    # once the throttle's short wait after the last failure is over).
    later = time.time()
    for password, totp in (("not the password at all", code), (PASSWORD, "000000")):
        later += 60
        vault._clock.moved = lambda at=later: at  # type: ignore[attr-defined]
        with pytest.raises(AuthenticationFailed) as refused:
            vault.login("t.desk", password, totp=totp)
        assert not isinstance(refused.value, CodeUsed)
        assert str(refused.value) == "authentication failed"
    vault._clock.moved = lambda: later + 120  # type: ignore[attr-defined]
    logins = [
        (e.outcome, e.detail.get("reason"))
        for _, e in vault._log.entries()
        if e.action == Action.LOGIN.value and e.actor == "t.desk"
    ]
    assert (Outcome.DENIED, "second_factor_used") in logins
    # The next code is accepted.
    assert vault.login("t.desk", PASSWORD, totp=totp_now(vault, secret)).username == "t.desk"


def test_the_api_and_the_login_page_say_the_code_was_used(vault: Vault) -> None:
    secret = _account(vault, "t.api")
    code = totp_now(vault, secret)
    with TestClient(create_app(vault), base_url="https://testserver") as client:
        body = {"username": "t.api", "password": PASSWORD, "totp": code}
        assert client.post("/api/v1/session", json=body).status_code == 201
        again = client.post("/api/v1/session", json=body)
        assert again.status_code == 401
        assert again.json()["error"]["code"] == "authentication_failed"
        assert "used already" in again.json()["error"]["message"]
        wrong = client.post("/api/v1/session", json={**body, "password": "wrong password!"})
        assert "used already" not in wrong.text
        form = client.get("/login")
        page = client.post(
            "/login",
            data={
                "username": "t.api",
                "password": PASSWORD,
                "totp": code,
                "form_token": form_token(form.text),
            },
            follow_redirects=False,
        )
        assert page.status_code == 401
        assert "used already: wait for the next code" in page.text
