"""The dashboard in Debian's chromium: log in with password and one-time code, search with a
purpose, reveal a field, and find that reveal in the person's subject access report.
Screenshots of every page go to test-output/screenshots/ for a person to look at.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyotp
import pytest

from custodes.errors import AccessDenied
from custodes.policy import AccessPurpose, Action, Role
from custodes.vault import Vault
from tests.conftest import PASSWORD, make_vault, read_records, serving
from tests.test_web_pages import enrol

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "screenshots"
REASON = "identify the victim of a reported theft"
CASE = "2026-SH-00417"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists() and os.environ.get("CUSTODES_REQUIRE_BROWSER") != "1",
        reason="Debian's chromium is not installed (apt-get install chromium)",
    ),
]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, population_file: Path
) -> Iterator[tuple[str, Vault, dict[str, str], list[dict[str, Any]]]]:
    vault = make_vault(tmp_path_factory.mktemp("browser"), "memory")
    assert vault.ingest(vault.operator, population_file).rejected == 0
    secrets = {
        "b.investigator": enrol(vault, "b.investigator", Role.INVESTIGATOR),
        "b.auditor": enrol(vault, "b.auditor", Role.AUDITOR),
        "b.admin": enrol(vault, "b.admin", Role.ADMIN),
    }
    records = read_records(population_file)
    named = {
        str(p["national_id"])
        for r in records
        if r["type"] == "case"
        for p in r.get("persons", [])  # type: ignore[attr-defined]
    }
    # People named in a case come first, so that the flow can open a case page too.
    people = sorted(
        (r for r in records if r["type"] == "person"),
        key=lambda r: str(r["national_id"]) not in named,
    )
    with serving(vault) as url:
        yield url, vault, secrets, people
    vault.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail("CUSTODES_REQUIRE_BROWSER=1 but /usr/bin/chromium is missing")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield chromium
        chromium.close()


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def log_in(page: Any, base: str, username: str, secret: str, name: str) -> None:
    """Through the login page: account name, password and the one-time code."""
    page.goto(f"{base}/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    # A code not used before: enrolment consumed the previous time step's.
    page.fill("input[name=totp]", pyotp.TOTP(secret).now())
    shot(page, f"{name}-login")
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert "/login" not in page.url, page.inner_text("main")


def test_search_reveal_and_see_it_in_the_subject_report(server: Any, browser: Any) -> None:
    base, vault, secrets, people = server
    person = next(p for p in people if p.get("phone"))
    nid, phone = str(person["national_id"]), str(person["phone"])

    # An investigator looks the person up, opens the record and reveals the phone number.
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    log_in(page, base, "b.investigator", secrets["b.investigator"], "investigator")
    page.goto(f"{base}/")
    assert "investigator" in page.inner_text("header")
    shot(page, "home-investigator")
    page.goto(f"{base}/search")
    page.fill("#s-reason", REASON)
    page.fill("#s-case_ref", CASE)
    page.check("#by-national_id")
    page.fill("#q-national_id", nid)
    page.click("form.search-form button[type=submit]")
    page.wait_for_selector(".result-open")
    assert nid not in page.inner_text("#results")
    shot(page, "search-results")

    page.click(".result-open")
    page.wait_for_selector("table.fields")
    assert phone not in page.inner_text("main")
    assert REASON in page.inner_text(".purpose-line")
    shot(page, "person")
    record_id = page.url.split("/records/")[1].split("?")[0]

    page.click("tr:has(#value-phone) summary")
    page.wait_for_selector("tr:has(#value-phone) form button")
    # A reveal states its own reason: the search's is not copied in.
    assert page.input_value("#r-phone-reason") == ""
    page.fill("#r-phone-reason", "call the witness back")
    shot(page, "person-reveal-form")
    page.click("tr:has(#value-phone) form button")
    page.wait_for_selector("#value-phone .revealed")
    assert page.inner_text("#value-phone .revealed") == phone
    shot(page, "person-revealed")
    page.click("text=Open case")
    page.wait_for_selector("table.fields")
    # An investigator's clearance stops below restricted fields: no reveal for the narrative.
    assert page.locator("tr:has(#value-narrative) summary").count() == 0
    assert "above your clearance" in page.inner_text("tr:has(#value-narrative)")
    shot(page, "case")
    # No script errors and no CSP refusals (a missing page before login is not one).
    assert not [e for e in errors if not e.startswith("Failed to load resource")], errors
    context.close()

    reveals = [e for _, e in vault._log.entries() if e.action == Action.REVEAL.value]
    assert reveals[-1].purpose == "call the witness back" and reveals[-1].detail["field"] == "phone"

    # An auditor opens the person's subject access report and finds the reveal.
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    log_in(page, base, "b.auditor", secrets["b.auditor"], "auditor")
    page.goto(f"{base}/")
    shot(page, "home-auditor")
    page.goto(f"{base}/audit/subject/{record_id}")
    page.fill("#reason", "subject access request from the person")
    page.fill("#case_ref", "SAR-2026-7")
    shot(page, "subject-purpose")
    page.click("main form button[type=submit]")
    page.wait_for_selector("table.log")
    report = page.inner_text("table.log")
    assert Action.REVEAL.value in report and "b.investigator" in report
    assert "call the witness back" in report
    assert phone not in page.content() and nid not in page.content()
    shot(page, "subject-report")

    page.goto(f"{base}/audit/log")
    page.fill("#l-reason", "weekly review of reveals")
    page.select_option("#f-action", Action.REVEAL.value)
    page.click("form.filters button[type=submit]")
    page.wait_for_selector("table.log")
    page.click("text=Verify the whole log now")
    page.wait_for_selector("#verify-result .alert")
    assert "The log verifies" in page.inner_text("#verify-result")
    shot(page, "audit-log")
    page.goto(f"{base}/alerts")
    shot(page, "alerts")
    context.close()

    # An administrator sees accounts, and nothing of the people in the vault.
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    log_in(page, base, "b.admin", secrets["b.admin"], "admin")
    page.goto(f"{base}/admin/accounts")
    assert "b.investigator" in page.inner_text("main")
    assert nid not in page.content() and phone not in page.content()
    shot(page, "admin-accounts")
    context.close()


def test_register_a_passkey_then_log_in_with_it(server: Any, browser: Any) -> None:
    base, vault, _, _ = server
    # WebAuthn takes a host name as relying party id, never an IP address.
    site = base.replace("127.0.0.1", "localhost")
    name = "b.passkey"
    secret = enrol(vault, name, Role.OFFICER)

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    # Chromium's virtual authenticator: a platform passkey that verifies its user.
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    authenticator = cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
                "automaticPresenceSimulation": True,
            }
        },
    )["authenticatorId"]

    # Password and one-time code, then a passkey added on the account's own page.
    log_in(page, site, name, secret, "passkey-officer")
    page.click("header nav >> text=Passkeys")
    page.wait_for_selector("#add-passkey:not([hidden])")
    assert "No passkey yet" in page.inner_text("main")
    page.fill("input[name=label]", "virtual laptop")
    shot(page, "passkeys-empty")
    page.click("#add-passkey")
    page.wait_for_selector(".alert.ok")
    assert "virtual laptop" in page.inner_text("table.passkeys")
    shot(page, "passkeys-added")
    stored = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator})
    assert len(stored["credentials"]) == 1 and stored["credentials"][0]["isResidentCredential"]

    page.click("header form.who button[type=submit]")
    page.wait_for_url(f"{site}/login")

    # Password and passkey, no code.
    page.fill("input[name=username]", name)
    page.fill("input[name=password]", PASSWORD)
    page.wait_for_selector("#use-passkey:not([hidden])")
    shot(page, "passkey-login")
    page.click("#use-passkey")
    page.wait_for_url(f"{site}/")
    assert name in page.inner_text("header")
    shot(page, "passkey-home")
    page.goto(f"{site}/account/passkeys")
    assert "never" not in page.inner_text("table.passkeys")  # last used: just now
    assert not [e for e in errors if not e.startswith("Failed to load resource")], errors
    context.close()

    logins = [e for _, e in vault._log.entries() if e.actor == name]
    assert [e.detail.get("factor") for e in logins if e.action == Action.LOGIN.value] == [
        "totp",
        "passkey",
    ]

    # An auditor finds the registration and the passkey login on the access log.
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    # An auditor of its own: the other test's auditor may have used this time step's code.
    log_in(page, base, "b.auditor2", enrol(vault, "b.auditor2", Role.AUDITOR), "auditor-passkeys")
    page.goto(f"{base}/audit/log")
    page.fill("#l-reason", "review of second factors")
    page.fill("#f-actor", name)
    page.click("form.filters button[type=submit]")
    page.wait_for_selector("table.log")
    assert "account:passkey:register" in page.inner_text("table.log")
    actions = page.locator("table.log tbody tr td:nth-child(5)").all_inner_texts()
    logins = [" ".join(a.split()) for a in actions if "login" in a]
    assert logins == [
        "Log in totp account:session:login",
        "Log in passkey account:session:login",
    ], logins
    shot(page, "audit-log-passkeys")
    context.close()


def test_a_refused_read_is_visible_on_the_access_log_at_1280_pixels_without_scrolling(
    server: Any, browser: Any
) -> None:
    base, vault, _, people = server
    officer = enrol(vault, "b.officer1280", Role.OFFICER)
    session = vault.login("b.officer1280", PASSWORD, totp=pyotp.TOTP(officer).now())
    found = vault.search(
        session,
        AccessPurpose(REASON, CASE),
        record_type="person",
        index="national_id",
        # An adult's: an officer is not shown minors.
        values={
            "national_id": next(
                str(p["national_id"]) for p in people if str(p.get("birth_date", "2020")) < "2000"
            )
        },
    )
    with pytest.raises(AccessDenied):  # above an officer's clearance: refused, logged
        vault.reveal(session, AccessPurpose(REASON, CASE), found[0].record_id, "ethnicity")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    log_in(page, base, "b.auditor1280", enrol(vault, "b.auditor1280", Role.AUDITOR), "auditor-1280")
    page.goto(f"{base}/audit/log")
    page.fill("#l-reason", "review of refused reveals")
    page.fill("#f-actor", "b.officer1280")
    page.click("form.filters button[type=submit]")
    page.wait_for_selector("table.log")
    denied = page.locator("table.log tbody tr", has_text="denied").first
    outcome = denied.locator("span.outcome")
    box = outcome.bounding_box()
    assert box is not None and outcome.inner_text() == "denied"
    # Inside the window as it opens, with no sideways scroll, at a laptop's width.
    assert box["x"] >= 0 and box["x"] + box["width"] <= 1280, box
    assert page.evaluate("window.scrollX") == 0
    # Said in words, with the stable tag beside them, and in local time with UTC on hover.
    row = " ".join(denied.inner_text().split())
    assert "Reveal field" in row and "record:field:reveal" in row
    assert "UTC" in (denied.locator("td").nth(1).get_attribute("title") or "")
    shot(page, "audit-log-1280")
    context.close()
