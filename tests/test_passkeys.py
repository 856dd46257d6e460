"""Threats 6 and 7 with passkeys: a WebAuthn passkey may replace the one-time code at
login, never the password; its challenges are bound, one-time and short-lived; a cloned
authenticator, a look-alike origin and a password alone are refused; options say nothing
about the account; failures count like a wrong code."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from custodes.accounts import LOCK_AFTER_FAILURES
from custodes.audit import Outcome
from custodes.errors import AuthenticationFailed, LoginThrottled
from custodes.passkeys import CHALLENGE_TTL, Assertion, Ceremony, PasskeyRefused
from custodes.policy import Action, Role
from custodes.vault import Session, Vault
from custodes.web import deps
from custodes.web.app import create_app
from tests.conftest import PASSWORD, enrol, login, make_vault, totp_now
from tests.soft_authenticator import SoftAuthenticator
from tests.test_accounts import Clock

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

SITE = Ceremony("https://custodes.example", "custodes.example")
LOOK_ALIKE = Ceremony("https://custodes-example.net", "custodes-example.net")
FORM = b"the login form's pre-session token"


@pytest.fixture
def clocked(vault: Vault) -> tuple[Vault, Clock]:
    clock = Clock()
    vault._clock.moved = clock  # type: ignore[attr-defined]
    return vault, clock


def with_passkey(vault: Vault, name: str = "t.officer") -> tuple[Session, SoftAuthenticator]:
    """An enrolled account, logged in with its code, that registers a passkey. The tests
    log it in again and again, beyond an officer's two sessions: it has no such cap."""
    session = login(vault, Role.OFFICER, name, budget={"sessions": None})
    device = SoftAuthenticator()
    options = vault.passkey_registration_options(session, SITE)
    vault.register_passkey(session, SITE, device.create(options, SITE.origin), label="laptop")
    return session, device


def passkey_login(
    vault: Vault,
    device: SoftAuthenticator,
    name: str = "t.officer",
    *,
    options_for: str | None = None,
    where: Ceremony = SITE,
    binding: bytes = FORM,
    sign_count: int | None = None,
) -> Session:
    options = vault.passkey_login_options(options_for or name, where, binding=binding)
    answer = device.get(options, where.origin, sign_count=sign_count)
    return vault.login(name, PASSWORD, passkey=Assertion(answer, SITE, FORM))


def test_password_and_passkey_open_a_session_and_the_code_still_works(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, _ = clocked
    _, device = with_passkey(vault)
    session = passkey_login(vault, device)
    assert session.username == "t.officer"
    vault.login("t.officer", PASSWORD, totp=totp_now(vault, _secret(vault)))
    granted = [
        e.detail.get("factor")
        for _, e in vault._log.entries()
        if e.action == Action.LOGIN and e.outcome is Outcome.GRANTED
    ]
    assert granted[-2:] == ["passkey", "totp"]


def test_stolen_password_alone_is_never_enough_for_an_account_with_passkeys(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, _ = clocked
    _, device = with_passkey(vault)
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD)
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD, passkey=Assertion("", SITE, FORM))
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD, passkey=Assertion("{}", SITE, FORM))
    # A passkey never stands in for the password.
    options = vault.passkey_login_options("t.officer", SITE, binding=FORM)
    answer = Assertion(device.get(options, SITE.origin), SITE, FORM)
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", "not the password at all 42", passkey=answer)


def test_replayed_passkey_assertion_is_refused(clocked: tuple[Vault, Clock]) -> None:
    vault, _ = clocked
    _, device = with_passkey(vault)
    # An authenticator without a counter (a synced passkey): only the challenge stops it.
    device.counts = False
    options = vault.passkey_login_options("t.officer", SITE, binding=FORM)
    answer = Assertion(device.get(options, SITE.origin), SITE, FORM)
    vault.login("t.officer", PASSWORD, passkey=answer)
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD, passkey=answer)


def test_replayed_registration_is_refused(clocked: tuple[Vault, Clock]) -> None:
    vault, _ = clocked
    session = login(vault, Role.OFFICER, "t.officer")
    device = SoftAuthenticator()
    options = vault.passkey_registration_options(session, SITE)
    created = device.create(options, SITE.origin)
    vault.register_passkey(session, SITE, created)
    with pytest.raises(PasskeyRefused):
        vault.register_passkey(session, SITE, created)
    # Another creation answering the same, spent challenge is refused as well.
    with pytest.raises(PasskeyRefused):
        vault.register_passkey(session, SITE, SoftAuthenticator().create(options, SITE.origin))
    assert len(vault.list_passkeys(session)) == 1


def test_a_challenge_issued_for_another_account_is_refused(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, _ = clocked
    _, device = with_passkey(vault)
    with pytest.raises(AuthenticationFailed):
        passkey_login(vault, device, options_for="t.someone-else")
    # Nor does a challenge bound to another login form (another browser) count.
    with pytest.raises(AuthenticationFailed):
        passkey_login(vault, device, binding=b"another browser's form token")
    passkey_login(vault, device)


def test_a_registration_challenge_of_another_session_is_refused(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, _ = clocked
    victim = login(vault, Role.OFFICER, "t.victim")
    attacker = login(vault, Role.OFFICER, "t.attacker")
    device = SoftAuthenticator()
    options = vault.passkey_registration_options(attacker, SITE)
    with pytest.raises(PasskeyRefused):
        vault.register_passkey(victim, SITE, device.create(options, SITE.origin))
    # Nor one issued to an earlier session of the same account.
    again = vault.login("t.attacker", PASSWORD, totp=totp_now(vault, _secret(vault, "t.attacker")))
    with pytest.raises(PasskeyRefused):
        vault.register_passkey(again, SITE, device.create(options, SITE.origin))
    assert vault.list_passkeys(victim) == () and vault.list_passkeys(again) == ()


def test_an_expired_challenge_is_refused(clocked: tuple[Vault, Clock]) -> None:
    vault, clock = clocked
    _, device = with_passkey(vault)
    options = vault.passkey_login_options("t.officer", SITE, binding=FORM)
    clock.now += CHALLENGE_TTL + 1
    with pytest.raises(AuthenticationFailed):
        vault.login(
            "t.officer", PASSWORD, passkey=Assertion(device.get(options, SITE.origin), SITE, FORM)
        )
    session = login(vault, Role.OFFICER, "t.late")
    options = vault.passkey_registration_options(session, SITE)
    clock.now += CHALLENGE_TTL + 1
    with pytest.raises(PasskeyRefused, match="expired"):
        vault.register_passkey(session, SITE, SoftAuthenticator().create(options, SITE.origin))


def test_a_sign_count_going_backwards_is_refused_as_a_cloned_authenticator(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, _ = clocked
    _, device = with_passkey(vault)
    passkey_login(vault, device, sign_count=41)
    # The clone signs with the same key but its own, older count; an equal one fails too.
    for count in (7, 41):
        with pytest.raises(AuthenticationFailed):
            passkey_login(vault, device, sign_count=count)
    passkey_login(vault, device, sign_count=42)


def test_an_assertion_made_on_a_look_alike_origin_is_refused(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, _ = clocked
    _, device = with_passkey(vault)
    # A relaying phishing page: the browser reports its own origin in the client data.
    options = vault.passkey_login_options("t.officer", SITE, binding=FORM)
    cred = device.credentials[0]
    answer = device.get(options, LOOK_ALIKE.origin, credential=cred)
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD, passkey=Assertion(answer, SITE, FORM))
    # And a registration made on another origin is refused too.
    session = login(vault, Role.OFFICER, "t.phished")
    options = vault.passkey_registration_options(session, SITE)
    with pytest.raises(PasskeyRefused):
        vault.register_passkey(
            session, SITE, SoftAuthenticator().create(options, LOOK_ALIKE.origin)
        )


def test_a_passkey_without_user_verification_is_refused(clocked: tuple[Vault, Clock]) -> None:
    vault, _ = clocked
    _, device = with_passkey(vault)
    device.user_verified = False
    with pytest.raises(AuthenticationFailed):
        passkey_login(vault, device)
    session = login(vault, Role.OFFICER, "t.unverified")
    options = vault.passkey_registration_options(session, SITE)
    with pytest.raises(PasskeyRefused):
        vault.register_passkey(
            session, SITE, SoftAuthenticator(user_verified=False).create(options, SITE.origin)
        )


def test_another_accounts_passkey_opens_nothing(clocked: tuple[Vault, Clock]) -> None:
    vault, _ = clocked
    _, device = with_passkey(vault, "t.owner")
    login(vault, Role.OFFICER, "t.other")
    with pytest.raises(AuthenticationFailed):
        passkey_login(vault, device, "t.other")


def test_passkey_options_say_nothing_about_the_account(clocked: tuple[Vault, Clock]) -> None:
    vault, _ = clocked
    with_passkey(vault, "t.with")
    login(vault, Role.OFFICER, "t.without")

    def shape(name: str) -> dict[str, object]:
        doc = orjson.loads(vault.passkey_login_options(name, SITE, binding=FORM))
        assert len(doc.pop("challenge")) == len(
            orjson.loads(vault.passkey_login_options("x", SITE, binding=FORM))["challenge"]
        )
        return dict(doc)

    assert shape("t.with") == shape("t.without") == shape("t.nobody")
    assert shape("t.with")["allowCredentials"] == []


def test_wrong_passkeys_are_throttled_and_lock_the_account_like_wrong_codes(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, clock = clocked
    _, device = with_passkey(vault)
    stranger = SoftAuthenticator()
    stranger.create(
        vault.passkey_registration_options(login(vault, Role.OFFICER, "t.stranger"), SITE),
        SITE.origin,
    )
    for attempt in range(LOCK_AFTER_FAILURES):
        with pytest.raises(AuthenticationFailed) as failed:
            passkey_login(vault, stranger, "t.officer")
        assert not isinstance(failed.value, LoginThrottled)
        if attempt >= 3:
            with pytest.raises(LoginThrottled):
                passkey_login(vault, device)
        clock.now += 901
    with pytest.raises(AuthenticationFailed):
        passkey_login(vault, device)
    assert vault._accounts.get("t.officer").locked  # type: ignore[union-attr]
    entries = [
        e for _, e in vault._log.entries() if e.action == Action.LOGIN and e.actor == "t.officer"
    ]
    denied = [e for e in entries if e.outcome is Outcome.DENIED]
    assert {e.detail.get("reason") for e in denied} >= {"second_factor", "throttled"}
    assert any(e.detail.get("account_locked") for e in denied)


def test_registration_is_logged_and_nothing_secret_is_stored_or_logged(
    clocked: tuple[Vault, Clock],
) -> None:
    vault, _ = clocked
    session = login(vault, Role.OFFICER, "t.officer")
    device = SoftAuthenticator()
    options = vault.passkey_registration_options(session, SITE)
    created = device.create(options, SITE.origin)
    added = vault.register_passkey(session, SITE, created, label="work laptop")
    assert [p.label for p in vault.list_passkeys(session)] == ["work laptop"]
    login_options = vault.passkey_login_options("t.officer", SITE, binding=FORM)
    vault.login(
        "t.officer", PASSWORD, passkey=Assertion(device.get(login_options, SITE.origin), SITE, FORM)
    )
    events = [e for _, e in vault._log.entries() if e.action == Action.PASSKEY_REGISTER]
    assert len(events) == 1
    assert events[0].actor == "t.officer" and events[0].detail["passkey"] == added.ref
    log_text = b"".join(e.encode() for _, e in vault._log.entries())
    challenges = [orjson.loads(options)["challenge"], orjson.loads(login_options)["challenge"]]
    for secret in [*challenges, "work laptop", PASSWORD]:
        assert secret.encode() not in log_text
    # The account keeps the public key and counters, no private material: there is none.
    row = vault._storage.get_account("t.officer")
    assert row is not None
    stored = orjson.loads(row.attributes)["security"]["passkeys"][0]
    assert set(stored) == {
        "id",
        "public_key",
        "sign_count",
        "created",
        "label",
        "rp_id",
        "last_used",
    }
    # The account as the rest of the system sees it holds no security state at all.
    assert "security" not in vault._accounts.get("t.officer").attributes  # type: ignore[union-attr]


def test_refusals_name_no_challenge_or_credential(clocked: tuple[Vault, Clock]) -> None:
    vault, _ = clocked
    session = login(vault, Role.OFFICER, "t.officer")
    options = vault.passkey_registration_options(session, SITE)
    created = SoftAuthenticator().create(options, LOOK_ALIKE.origin)
    with pytest.raises(PasskeyRefused) as refused:
        vault.register_passkey(session, SITE, created)
    challenge = orjson.loads(options)["challenge"]
    credential_id = orjson.loads(created)["id"]
    for text in (str(refused.value), repr(refused.value)):
        assert challenge not in text and credential_id not in text
        assert LOOK_ALIKE.origin not in text
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


def _secret(vault: Vault, name: str = "t.officer") -> str:
    from tests.conftest import TOTP_SECRETS

    return TOTP_SECRETS[name]


# -- over the web ------------------------------------------------------------------------


@pytest.fixture
def web_vault(tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, "memory")
    yield v
    v.close()


def _field(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert found, f"no {name} on the page"
    return found[1]


def test_passkey_registration_and_login_over_the_web(web_vault: Vault) -> None:
    origin = "http://testserver"
    web_vault.admin.add_account(
        web_vault.operator, "t.officer", PASSWORD, Role.OFFICER, {"district": "*"}
    )
    secret = enrol(web_vault, "t.officer")
    device = SoftAuthenticator()
    with TestClient(create_app(web_vault)) as client:
        page = client.get("/login")
        client.post(
            "/login",
            data={
                "username": "t.officer",
                "password": PASSWORD,
                "totp": totp_now(web_vault, secret),
                "form_token": _field(page.text, "form_token"),
            },
            follow_redirects=False,
        )
        page = client.get("/account/passkeys")
        assert page.status_code == 200 and "No passkey yet" in page.text
        csrf = _field(page.text, "csrf_token")
        # Without the session's CSRF token a cross-site page gets no options, adds nothing.
        assert client.post("/account/passkeys/options", data={}).status_code == 403
        options = client.post("/account/passkeys/options", data={"csrf_token": csrf})
        assert options.headers["content-type"] == "application/json"
        assert orjson.loads(options.text)["rp"]["id"] == "testserver"
        created = device.create(options.text, origin)
        forged = client.post("/account/passkeys", data={"credential": created, "label": "x"})
        assert forged.status_code == 403
        added = client.post(
            "/account/passkeys", data={"credential": created, "label": "desk", "csrf_token": csrf}
        )
        assert added.status_code == 200 and "Passkey “desk” added" in added.text
        again = client.post(
            "/account/passkeys", data={"credential": created, "label": "x", "csrf_token": csrf}
        )
        assert again.status_code == 400 and "not accepted" in again.text
        client.cookies.clear()

        page = client.get("/login")
        token = _field(page.text, "form_token")
        unknown = client.post("/login/passkey", data={"username": "t.nobody", "form_token": token})
        known = client.post("/login/passkey", data={"username": "t.officer", "form_token": token})
        assert unknown.status_code == known.status_code == 200
        assert client.post("/login/passkey", data={"username": "t.officer"}).status_code == 403
        form = {"username": "t.officer", "password": PASSWORD, "form_token": token}
        answer = device.get(known.text, origin)
        alone = client.post("/login", data=form, follow_redirects=False)
        assert alone.status_code == 401
        page = client.get("/login")
        token = _field(page.text, "form_token")
        # The answer was bound to the earlier form: this one refuses it.
        stale = client.post(
            "/login", data={**form, "form_token": token, "passkey": answer}, follow_redirects=False
        )
        assert stale.status_code == 401
        token = _field(stale.text, "form_token")
        options = client.post("/login/passkey", data={"username": "t.officer", "form_token": token})
        answer = device.get(options.text, origin)
        done = client.post(
            "/login", data={**form, "form_token": token, "passkey": answer}, follow_redirects=False
        )
        assert done.status_code == 303 and client.cookies.get(deps.SESSION_COOKIE)
        assert "desk" in client.get("/account/passkeys").text
