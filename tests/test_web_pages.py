"""The dashboard's pages against the threat model: no purpose, no data; masked until
revealed; each role held to its duties; no inline script or style; no form post without
the session's CSRF token.
"""

from __future__ import annotations

import datetime
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import pyotp
import pytest
from fastapi import FastAPI

with warnings.catch_warnings():
    # Starlette's test client suggests a renamed httpx; the one installed works the same.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

from custodes.audit import Outcome
from custodes.audit.report import verify_bundle
from custodes.errors import BudgetExceeded
from custodes.policy import ACCOUNT_ROLES, AccessPurpose, Action, Role, is_minor
from custodes.records.idnumber import check_char
from custodes.vault import Vault
from custodes.web import deps
from custodes.web.app import create_app
from tests.conftest import PASSWORD, make_vault, read_records

REASON = "identify the victim of a reported theft"
CASE = "2026-SH-00417"
PURPOSE_QUERY = urlencode({"reason": REASON, "case_ref": CASE})


def web_app(vault: Vault) -> FastAPI:
    """The real application around a vault."""
    return create_app(vault)


def enrol(vault: Vault, username: str, role: Role, district: str = "*") -> str:
    """An account with a confirmed second factor; returns its TOTP secret.

    Enrolment uses the previous time step's code, so a login may use the current one: a
    code is never accepted twice.
    """
    vault.admin.add_account(vault.operator, username, PASSWORD, role, {"district": district})
    code = vault.admin.issue_enrolment(vault.operator, username)
    secret = vault.enrolment(code).secret
    vault.complete_enrolment(code, pyotp.TOTP(secret).at(time.time() - 30))
    return secret


@dataclass
class Site:
    vault: Vault
    app: FastAPI
    people: list[dict[str, object]]
    cases: list[dict[str, object]]
    clients: dict[Role, TestClient]

    def client(self, role: Role) -> TestClient:
        return self.clients[role]

    def csrf(self, role: Role) -> str:
        token = self.clients[role].cookies.get(deps.SESSION_COOKIE)
        assert token
        return self.vault.csrf_token(self.vault.session_for(token))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, population_file: Path) -> Iterator[Site]:
    vault = make_vault(tmp_path_factory.mktemp("web"), "memory")
    report = vault.ingest(vault.operator, population_file)
    assert report.rejected == 0
    records = read_records(population_file)
    clients: dict[Role, TestClient] = {}
    app = web_app(vault)
    for role in ACCOUNT_ROLES:
        name = f"w.{role.value}"
        secret = enrol(vault, name, role)
        session = vault.login(name, PASSWORD, totp=pyotp.TOTP(secret).now())
        client = TestClient(app, base_url="https://testserver", follow_redirects=False)
        client.cookies.set(deps.SESSION_COOKIE, session.token)
        clients[role] = client
    today = datetime.datetime.now(datetime.UTC).date()
    yield Site(
        vault,
        app,
        # Adults only: an officer may not open a minor's record at all (tested elsewhere).
        [
            r
            for r in records
            if r["type"] == "person" and not is_minor(r.get("birth_date"), r["national_id"], today)
        ],
        [r for r in records if r["type"] == "case"],
        clients,
    )
    for client in clients.values():
        client.close()
    vault.close()


def search(site: Site, role: Role, **fields: str) -> object:
    form = {"csrf_token": site.csrf(role), **fields}
    return site.client(role).post("/search", data=form)


def record_id_of(site: Site, national_id: str) -> str:
    session = site.vault.session_for(site.client(Role.SUPERVISOR).cookies[deps.SESSION_COOKIE])
    found = site.vault.search(
        session,
        AccessPurpose("test set-up: find the record id", "T-0"),
        record_type="person",
        index="national_id",
        values={"national_id": national_id},
    )
    return found[0].record_id


def case_with_people(site: Site) -> dict[str, object]:
    return next(c for c in site.cases if c.get("narrative") and c.get("persons"))


# -- search ---------------------------------------------------------------------------


def test_search_without_purpose_or_case_is_refused(site: Site) -> None:
    person = site.people[0]
    nid = str(person["national_id"])
    for missing in ({"case_ref": CASE}, {"reason": REASON}, {}):
        before = site.vault._log.size
        response = search(site, Role.INVESTIGATOR, by="national_id", national_id=nid, **missing)
        assert response.status_code == 422
        # The form keeps what was typed; nothing from the record comes back.
        assert nid[:4] + "*" not in response.text and "/records/" not in response.text
        assert str(person["name"]) not in response.text
        # Without a reason there is no purpose to ask with; without a case the vault's
        # policy refuses, and the refusal is on the log with no record in it.
        refusals = [e for _, e in site.vault._log.entries(before)]
        assert all(e.outcome is Outcome.DENIED and not e.records for e in refusals)


def test_search_results_are_masked_and_link_to_the_record(site: Site) -> None:
    person = site.people[1]
    nid = str(person["national_id"])
    response = search(
        site, Role.OFFICER, by="national_id", national_id=nid, reason=REASON, case_ref=CASE
    )
    assert response.status_code == 200
    # The search form keeps what was typed; the results show only the masked value.
    results = response.text.replace(f'value="{nid}"', "")
    assert nid not in results
    assert nid[:4] + "*" * 10 + nid[-4:] in results
    assert str(person["name"]) not in response.text
    rid = record_id_of(site, nid)
    assert f"/records/{rid}?{PURPOSE_QUERY}" in response.text.replace("&amp;", "&")


def test_search_by_name_in_pinyin_phone_and_case_number(site: Site) -> None:
    from pypinyin import lazy_pinyin

    person = site.people[2]
    latin = " ".join(lazy_pinyin(str(person["name"]))).title()
    purpose = {"reason": REASON, "case_ref": CASE}
    by_name = search(
        site,
        Role.OFFICER,
        by="name_birth",
        name=latin,
        birth_date=str(person["birth_date"]),
        **purpose,
    )
    assert by_name.status_code == 200
    rid = record_id_of(site, str(person["national_id"]))
    assert f"/records/{rid}?" in by_name.text
    if person.get("phone"):
        by_phone = search(site, Role.OFFICER, by="phone", phone=str(person["phone"]), **purpose)
        assert f"/records/{rid}?" in by_phone.text
    case = site.cases[0]
    by_case = search(site, Role.OFFICER, by="case_no", case_no=str(case["case_no"]), **purpose)
    assert by_case.status_code == 200 and "Case" in by_case.text
    assert str(case.get("narrative", "-")) not in by_case.text


def test_a_clerk_typing_the_given_name_first_finds_the_person_and_nobody_gets_a_hint(
    site: Site,
) -> None:
    from pypinyin import lazy_pinyin

    person = site.people[4]
    family, *given = lazy_pinyin(str(person["name"]))
    turned = f"{''.join(given)} {family}".title()
    purpose = {"reason": REASON, "case_ref": CASE}
    born = str(person["birth_date"])
    found = search(site, Role.OFFICER, by="name_birth", name=turned, birth_date=born, **purpose)
    rid = record_id_of(site, str(person["national_id"]))
    assert found.status_code == 200 and f"/records/{rid}?" in found.text
    nobody = search(
        site, Role.OFFICER, by="name_birth", name="王𠮷", birth_date="1900-01-01", **purpose
    )
    assert nobody.status_code == 200 and "Nothing matches" in nobody.text
    assert "𠮷, not 吉" in nobody.text and "“Na Li”" in nobody.text


def test_search_by_htmx_returns_only_the_results_fragment(site: Site) -> None:
    nid = str(site.people[3]["national_id"])
    form = {
        "csrf_token": site.csrf(Role.OFFICER),
        "by": "national_id",
        "national_id": nid,
        "reason": REASON,
        "case_ref": CASE,
    }
    response = site.client(Role.OFFICER).post("/search", data=form, headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert "<html" not in response.text and "1 result" in response.text


# -- person and case pages, reveals ------------------------------------------------------


def test_record_page_without_a_purpose_asks_for_one_and_shows_nothing(site: Site) -> None:
    person = site.people[4]
    rid = record_id_of(site, str(person["national_id"]))
    before = site.vault._log.size
    response = site.client(Role.OFFICER).get(f"/records/{rid}")
    assert response.status_code == 422
    assert str(person["national_id"])[:4] + "*" not in response.text
    assert 'name="reason"' in response.text
    assert site.vault._log.size == before


def test_person_page_is_masked_with_reveal_actions_and_links(site: Site) -> None:
    case = case_with_people(site)
    nid = str(case["persons"][0]["national_id"])  # type: ignore[index]
    person = next(p for p in site.people if p["national_id"] == nid)
    rid = record_id_of(site, nid)
    response = site.client(Role.OFFICER).get(f"/records/{rid}?{PURPOSE_QUERY}")
    assert response.status_code == 200
    page = response.text
    assert nid not in page and str(person["name"]) not in page
    assert f"/records/{rid}/reveal/national_id" in page
    # An officer's clearance stops at identifying fields: ethnicity gets no reveal button.
    assert f"/records/{rid}/reveal/ethnicity" not in page
    assert str(case["case_no"]) in page  # the linked case, by its number
    # Whoever reads records is not offered the auditors' report, which would refuse them.
    assert "/audit/subject/" not in page and "ask an auditor" in page


def test_reveal_shows_the_value_and_is_logged_with_its_purpose(site: Site) -> None:
    person = site.people[5]
    nid = str(person["national_id"])
    rid = record_id_of(site, nid)
    client = site.client(Role.INVESTIGATOR)
    form = {"csrf_token": site.csrf(Role.INVESTIGATOR), "reason": REASON, "case_ref": CASE}
    response = client.post(
        f"/records/{rid}/reveal/national_id", data=form, headers={"HX-Request": "true"}
    )
    assert response.status_code == 200
    assert nid in response.text and "<html" not in response.text
    assert response.headers.get("cache-control", "").startswith("no-store")
    _, entry = list(site.vault._log.entries())[-1]
    assert entry.action == Action.REVEAL.value
    assert entry.actor == "w.investigator"
    assert (entry.purpose, entry.case_ref) == (REASON, CASE)
    assert entry.records == (rid,) and entry.detail["field"] == "national_id"


def test_reveal_without_a_case_reference_is_refused(site: Site) -> None:
    nid = str(site.people[6]["national_id"])
    rid = record_id_of(site, nid)
    form = {"csrf_token": site.csrf(Role.INVESTIGATOR), "reason": REASON}
    response = site.client(Role.INVESTIGATOR).post(f"/records/{rid}/reveal/phone", data=form)
    assert response.status_code == 422 and nid not in response.text


def test_officer_cannot_reveal_a_case_narrative(site: Site) -> None:
    case = case_with_people(site)
    narrative = str(case["narrative"])
    cid = next(
        v.record_id
        for v in site.vault.search(
            site.vault.session_for(site.client(Role.SUPERVISOR).cookies[deps.SESSION_COOKIE]),
            AccessPurpose("test set-up: find the case", "T-0"),
            record_type="case",
            index="case_no",
            values={"case_no": str(case["case_no"])},
        )
    )
    officer = site.client(Role.OFFICER)
    page = officer.get(f"/records/{cid}?{PURPOSE_QUERY}")
    assert page.status_code == 200
    assert narrative not in page.text
    assert f"/records/{cid}/reveal/narrative" not in page.text
    form = {"csrf_token": site.csrf(Role.OFFICER), "reason": REASON, "case_ref": CASE}
    refused = officer.post(f"/records/{cid}/reveal/narrative", data=form)
    assert refused.status_code == 403 and narrative not in refused.text
    _, entry = list(site.vault._log.entries())[-1]
    assert entry.action == Action.REVEAL.value and entry.outcome.value == "denied"
    # A supervisor's clearance covers restricted fields.
    supervisor = site.client(Role.SUPERVISOR)
    assert (
        f"/records/{cid}/reveal/narrative" in supervisor.get(f"/records/{cid}?{PURPOSE_QUERY}").text
    )
    form = {"csrf_token": site.csrf(Role.SUPERVISOR), "reason": REASON, "case_ref": CASE}
    shown = supervisor.post(f"/records/{cid}/reveal/narrative", data=form)
    assert shown.status_code == 200 and narrative in shown.text


def test_unknown_record_is_404_without_data(site: Site) -> None:
    response = site.client(Role.OFFICER).get(f"/records/{'0' * 32}?{PURPOSE_QUERY}")
    assert response.status_code == 404


# -- auditors -----------------------------------------------------------------------------


def test_auditor_sees_the_reveal_in_the_subject_access_report(site: Site) -> None:
    person = site.people[7]
    nid = str(person["national_id"])
    rid = record_id_of(site, nid)
    form = {"csrf_token": site.csrf(Role.OFFICER), "reason": REASON, "case_ref": CASE}
    assert site.client(Role.OFFICER).post(f"/records/{rid}/reveal/phone", data=form).is_success
    auditor = site.client(Role.AUDITOR)
    query = urlencode({"reason": "subject access request", "case_ref": "SAR-1"})
    response = auditor.get(f"/audit/subject/{rid}?{query}")
    assert response.status_code == 200
    page = response.text
    assert Action.REVEAL.value in page and "w.officer" in page and REASON in page
    assert nid not in page and str(person.get("phone")) not in page
    assert "every entry verifies" in page
    bundle = auditor.get(f"/audit/subject/{rid}/bundle?{query}")
    assert bundle.status_code == 200
    verified = verify_bundle(bundle.content, site.vault._log.verifier_key)
    assert any(e.action == Action.REVEAL.value for _, e in verified.entries)


def test_subject_report_is_for_auditors_only(site: Site) -> None:
    rid = record_id_of(site, str(site.people[8]["national_id"]))
    query = urlencode({"reason": "subject access request"})
    for role in (Role.OFFICER, Role.SUPERVISOR, Role.ADMIN):
        assert site.client(role).get(f"/audit/subject/{rid}?{query}").status_code == 403
    for role in (Role.AUDITOR, Role.ADMIN):
        response = site.client(role).get(f"/records/{rid}?{PURPOSE_QUERY}")
        assert response.status_code == 403


def test_audit_log_filters_pages_and_verifies(site: Site) -> None:
    auditor = site.client(Role.AUDITOR)
    assert auditor.get("/audit/log").status_code == 200  # the form, nothing read yet
    query = urlencode(
        {"reason": "weekly review", "actor": "w.officer", "action": Action.SEARCH.value, "size": 2}
    )
    response = auditor.get(f"/audit/log?{query}")
    assert response.status_code == 200
    rows = re.findall(r"<tr>\s*<td>\d+</td>", response.text)
    assert 1 <= len(rows) <= 2
    assert "w.officer" in response.text and "signed checkpoint" in response.text
    assert auditor.get("/audit/log?reason=weekly+review&size=100000").status_code == 422
    form = {"csrf_token": site.csrf(Role.AUDITOR), "reason": "weekly review"}
    verified = auditor.post("/audit/log/verify", data=form, headers={"HX-Request": "true"})
    assert verified.status_code == 200 and "The log verifies" in verified.text
    assert site.client(Role.SUPERVISOR).get(f"/audit/log?{query}").status_code == 403


def _raise_budget_alert(site: Site, username: str) -> None:
    """An investigator allowed one miss an hour misses twice: locked, and an alert."""
    site.vault.admin.add_account(
        site.vault.operator,
        username,
        PASSWORD,
        Role.INVESTIGATOR,
        {"district": "*", "budget": {"misses_per_hour": 1}},
    )
    code = site.vault.admin.issue_enrolment(site.vault.operator, username)
    secret = site.vault.enrolment(code).secret
    site.vault.complete_enrolment(code, pyotp.TOTP(secret).at(time.time() - 30))
    session = site.vault.login(username, PASSWORD, totp=pyotp.TOTP(secret).now())
    with pytest.raises(BudgetExceeded):
        for serial in ("001", "002"):
            body = f"11010519800101{serial}"
            site.vault.search(
                session,
                AccessPurpose("walking numbers", "T-1"),
                record_type="person",
                index="national_id",
                values={"national_id": body + check_char(body)},
            )


def test_alerts_are_acknowledged_and_resolved_by_the_watchers_each_step_logged(
    site: Site,
) -> None:
    _raise_budget_alert(site, "w.walker")
    supervisor, auditor = site.client(Role.SUPERVISOR), site.client(Role.AUDITOR)
    page = supervisor.get("/alerts")
    assert page.status_code == 200
    assert (
        "guard:budget" in page.text and "w.walker" in page.text and "misses_per_hour" in page.text
    )
    # The supervisor sees the alerts, not the access log's refusals: that is the auditor's.
    assert "Refused and failed accesses" not in page.text
    [found] = [
        a
        for a in site.vault.alerts(site.vault.session_for(supervisor.cookies[deps.SESSION_COOKIE]))
        if a.alert.account == "w.walker"
    ]
    url = f"/alerts/{found.id}"
    acked = supervisor.post(f"{url}/acknowledge", data={"csrf_token": site.csrf(Role.SUPERVISOR)})
    assert acked.status_code == 200 and "acknowledged by w.supervisor" in acked.text
    # Without the form's token, nothing is done.
    assert auditor.post(f"{url}/resolve", data={}).status_code == 403
    resolved = auditor.post(f"{url}/resolve", data={"csrf_token": site.csrf(Role.AUDITOR)})
    assert resolved.status_code == 200 and "resolved by w.auditor" in resolved.text
    assert "Refused and failed accesses" in resolved.text and "denied" in resolved.text
    again = supervisor.post(f"{url}/resolve", data={"csrf_token": site.csrf(Role.SUPERVISOR)})
    assert again.status_code == 409 and "resolved already" in again.text
    steps = [
        (e.actor, e.action, e.detail.get("alert_id"))
        for _, e in site.vault._log.entries()
        if e.action in (Action.ALERT_ACKNOWLEDGE.value, Action.ALERT_RESOLVE.value)
        and e.outcome == "granted"
    ]
    assert steps == [
        ("w.supervisor", Action.ALERT_ACKNOWLEDGE.value, found.id),
        ("w.auditor", Action.ALERT_RESOLVE.value, found.id),
    ]
    assert site.client(Role.OFFICER).get("/alerts").status_code == 403
    assert site.client(Role.ADMIN).get("/alerts").status_code == 403


# -- administrators -----------------------------------------------------------------------


def test_admin_pages_show_accounts_and_no_personal_data(site: Site) -> None:
    admin = site.client(Role.ADMIN)
    response = admin.get("/admin/accounts")
    assert response.status_code == 200
    for role in ACCOUNT_ROLES:
        assert f"w.{role.value}" in response.text
    for person in site.people[:50]:
        assert str(person["national_id"]) not in response.text
        assert str(person["name"]) not in response.text
    nid = str(site.people[0]["national_id"])
    form = {
        "csrf_token": site.csrf(Role.ADMIN),
        "by": "national_id",
        "national_id": nid,
        "reason": REASON,
        "case_ref": CASE,
    }
    assert admin.post("/search", data=form).status_code == 403
    assert site.client(Role.OFFICER).get("/admin/accounts").status_code == 403


def test_admin_disables_and_reenables_an_account(site: Site) -> None:
    secret = enrol(site.vault, "w.temporary", Role.OFFICER)
    session = site.vault.login("w.temporary", PASSWORD, totp=pyotp.TOTP(secret).now())
    admin = site.client(Role.ADMIN)
    form = {"csrf_token": site.csrf(Role.ADMIN)}
    response = admin.post("/admin/accounts/w.temporary/disable", data=form)
    assert response.status_code == 200 and "disabled" in response.text
    with pytest.raises(Exception, match="session"):
        site.vault.session_for(session.token)
    assert admin.post("/admin/accounts/w.temporary/enable", data=form).status_code == 200
    code = admin.post("/admin/accounts/w.temporary/enrol", data=form)
    assert code.status_code == 200 and "One-time enrolment code" in code.text


# -- every page: CSP-clean HTML, CSRF on every post, nothing without a session ------------

INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)[^>]*>", re.IGNORECASE)
STYLE_ATTRIBUTE = re.compile(r"\sstyle\s*=", re.IGNORECASE)
EVENT_HANDLER = re.compile(r"\son[a-z]+\s*=", re.IGNORECASE)
STYLE_ELEMENT = re.compile(r"<style[\s>]", re.IGNORECASE)


def page_urls(site: Site) -> dict[Role, list[str]]:
    rid = record_id_of(site, str(site.people[0]["national_id"]))
    audit = urlencode({"reason": "weekly review"})
    return {
        Role.OFFICER: ["/", "/search", f"/records/{rid}?{PURPOSE_QUERY}", f"/records/{rid}"],
        Role.SUPERVISOR: ["/", f"/records/{rid}?{PURPOSE_QUERY}", "/alerts", "/exports"],
        Role.AUDITOR: [
            "/",
            "/audit/log",
            f"/audit/log?{audit}",
            "/alerts",
            f"/audit/subject/{rid}?{audit}",
            f"/audit/subject/{rid}",
        ],
        Role.ADMIN: ["/", "/admin/accounts"],
    }


def test_no_page_carries_inline_script_or_style(site: Site) -> None:
    checked = 0
    for role, urls in page_urls(site).items():
        for url in urls:
            response = site.client(role).get(url)
            assert response.status_code in (200, 422), url
            html = response.text
            assert not INLINE_SCRIPT.search(html), url
            assert not STYLE_ATTRIBUTE.search(html), url
            assert not EVENT_HANDLER.search(html), url
            assert not STYLE_ELEMENT.search(html), url
            assert "http://" not in html and "https://" not in html, url  # no CDN
            checked += 1
    assert checked >= 12


def test_posts_without_the_csrf_token_are_refused(site: Site) -> None:
    rid = record_id_of(site, str(site.people[0]["national_id"]))
    nid = str(site.people[0]["national_id"])
    posts = [
        (Role.OFFICER, "/search", {"by": "national_id", "national_id": nid}),
        (Role.OFFICER, f"/records/{rid}/reveal/national_id", {}),
        (Role.AUDITOR, "/audit/log/verify", {}),
        (Role.ADMIN, "/admin/accounts/w.officer/disable", {}),
        (Role.ADMIN, "/admin/accounts/w.officer/assign", {"case_no": CASE}),
    ]
    for role, url, data in posts:
        before = site.vault._log.size
        fields = {**data, "reason": REASON, "case_ref": CASE}
        for token in (None, "not-the-token"):
            sent = fields if token is None else {**fields, "csrf_token": token}
            response = site.client(role).post(url, data=sent)
            assert response.status_code == 403, url
            assert nid not in response.text
        assert site.vault._log.size == before, url
    officer = site.vault._accounts.get("w.officer")
    assert officer is not None and not officer.disabled and "cases" not in officer.attributes


def test_pages_without_a_session_redirect_to_login(site: Site) -> None:
    rid = record_id_of(site, str(site.people[0]["national_id"]))
    anonymous = TestClient(site.app, base_url="https://testserver", follow_redirects=False)
    for url in ["/", "/search", f"/records/{rid}?{PURPOSE_QUERY}", "/audit/log", "/alerts"]:
        response = anonymous.get(url)
        assert response.status_code in (303, 401, 403), url
        assert str(site.people[0]["national_id"])[:4] + "*" not in response.text
    anonymous.close()


def test_every_logged_action_has_words_for_the_pages() -> None:
    from custodes.web.labels import ACTION_LABELS, action_label

    assert set(ACTION_LABELS) == set(Action)
    assert action_label(Action.REVEAL.value) == "Reveal field"
    # A tag the software does not know (a later version's) is shown as itself.
    assert action_label("vault:something:new") == "vault:something:new"
