"""Threat 8: an official of one district opens another district's record by its id.

Records outside an official's reach behave as if they did not exist, on every backend
and through the dashboard and the API alike; minors and reporters of crimes need more
than an officer's clearance. Only a case assigned to an official, by an administrator and
on the access log, opens another district's records, and only while it stays assigned.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

with warnings.catch_warnings():
    # Starlette's test client suggests a renamed httpx; the one installed works the same.
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

from custodes.audit import AccessEntry, Outcome
from custodes.errors import InvalidAssignment, RecordNotFound
from custodes.policy import PROTECTED_REPORTER, AccessPurpose, Action, Role
from custodes.records.idnumber import check_char
from custodes.vault import Session, Vault
from custodes.web import deps
from custodes.web.app import create_app
from tests.conftest import PASSWORD, login, make_vault, write_jsonl

ROUTINE = AccessPurpose("check a resident's address", "C-1")
CASE_NO = "A3101042025000017"
ON_CASE = AccessPurpose("interview the victim of a robbery", CASE_NO)


def resident_id(district: str, birth: str, sequence: str) -> str:
    first17 = district + birth + sequence
    return first17 + check_char(first17)


SHANGHAI_ADULT = resident_id("310104", "19880512", "123")
SHANGHAI_REPORTER = resident_id("310104", "19750203", "456")
SHANGHAI_CHILD = resident_id("310104", "20150709", "782")
BEIJING_ADULT = resident_id("110101", "19900101", "111")


def person(number: str, name: str, phone: str) -> dict[str, object]:
    born = number[6:10] + "-" + number[10:12] + "-" + number[12:14]
    return {
        "type": "person",
        "name": name,
        "national_id": number,
        "phone": phone,
        "gender": "male" if int(number[16]) % 2 else "female",
        "birth_date": born,
        "address": "测试市测试区测试路1号",
    }


RECORDS: list[dict[str, object]] = [
    person(SHANGHAI_ADULT, "周测甲", "13912340001"),
    person(SHANGHAI_REPORTER, "吴测乙", "13912340002"),
    person(SHANGHAI_CHILD, "郑测丙", "13912340003"),
    person(BEIJING_ADULT, "王测丁", "13912340004"),
    {
        "type": "case",
        "case_no": CASE_NO,
        "opened_on": "2025-06-01",
        "category": "抢劫",
        "narrative": "2025年6月1日，周测甲在测试路被抢走挎包，吴测乙报案。",
        "persons": [
            {"national_id": SHANGHAI_ADULT, "role": "victim"},
            {"national_id": SHANGHAI_REPORTER, "role": "reporter"},
        ],
    },
]


@pytest.fixture
def districts(vault: Vault, tmp_path: Path) -> Vault:
    report = vault.ingest(vault.operator, write_jsonl(tmp_path / "districts.jsonl", RECORDS))
    assert report.rejected == 0 and report.accepted == len(RECORDS)
    return vault


def record_id(vault: Vault, number: str) -> str:
    national = login(vault, Role.SUPERVISOR, "s.national")
    [found] = vault.search(
        national, ROUTINE, record_type="person", index="national_id", values={"national_id": number}
    )
    vault.logout(national)
    return found.record_id


def case_id(vault: Vault) -> str:
    national = login(vault, Role.SUPERVISOR, "s.cases")
    [found] = vault.search(
        national, ROUTINE, record_type="case", index="case_no", values={"case_no": CASE_NO}
    )
    return found.record_id


def beijing_officer(vault: Vault, cases: list[str] | None = None) -> Session:
    return login(vault, Role.OFFICER, "o.beijing", district="110101", cases=cases)


def failed_attempts(vault: Vault, since: int) -> list[str]:
    """The actions of the failed attempts logged since an index (listings of accounts
    aside), each naming the account and the kind of error, never the value refused."""
    failed = []
    for _, entry in vault._log.entries(since):
        if entry.action == Action.ACCOUNT_LIST:
            continue
        assert entry.outcome is Outcome.ERROR and set(entry.detail) == {"account", "error"}
        failed.append(entry.action)
    return failed


def last_entry(vault: Vault, *, besides: str | None = None) -> AccessEntry:
    """The newest entry on the log (other than `besides`, such as the account listing a
    page shows after a change)."""
    return [e for _, e in vault._log.entries() if e.action != besides][-1]


def test_official_of_another_district_gets_404_by_record_id(districts: Vault) -> None:
    target = record_id(districts, SHANGHAI_ADULT)
    officer = beijing_officer(districts)
    with pytest.raises(RecordNotFound) as raised:
        districts.record(officer, ROUTINE, target)
    # Word for word what a record that does not exist gives.
    with pytest.raises(RecordNotFound) as missing:
        districts.record(officer, ROUTINE, "0" * 26)
    assert type(raised.value) is type(missing.value) and str(raised.value) == str(missing.value)
    with pytest.raises(RecordNotFound):
        districts.reveal(officer, ROUTINE, target, "phone")
    with pytest.raises(RecordNotFound):
        districts.reveal(officer, ROUTINE, target, "no_such_field")
    entry = last_entry(districts)
    assert entry.action == Action.REVEAL and entry.outcome is Outcome.DENIED
    assert entry.records == (target,) and entry.result_count == 0
    assert entry.detail["reason"] == "out_of_reach"


def test_the_refused_attempt_is_logged_as_denied_naming_the_target(districts: Vault) -> None:
    target = record_id(districts, SHANGHAI_ADULT)
    officer = beijing_officer(districts)
    with pytest.raises(RecordNotFound):
        districts.record(officer, ROUTINE, target)
    entry = last_entry(districts)
    assert (entry.actor, entry.action, entry.outcome) == ("o.beijing", Action.READ, Outcome.DENIED)
    assert entry.records == (target,) and entry.detail["target"] == target
    assert entry.purpose == ROUTINE.reason and entry.case_ref == ROUTINE.case_ref


def test_official_reads_their_own_districts_records(districts: Vault) -> None:
    own = record_id(districts, BEIJING_ADULT)
    officer = beijing_officer(districts)
    assert districts.record(officer, ROUTINE, own).record_id == own
    assert districts.reveal(officer, ROUTINE, own, "national_id") == BEIJING_ADULT


def test_a_city_prefix_reaches_every_county_of_the_city(districts: Vault) -> None:
    target = record_id(districts, SHANGHAI_ADULT)
    city = login(districts, Role.INVESTIGATOR, "i.shanghai", district="3101")
    assert districts.record(city, ROUTINE, target).record_id == target
    other_city = login(districts, Role.INVESTIGATOR, "i.minhang", district="3102")
    with pytest.raises(RecordNotFound):
        districts.record(other_city, ROUTINE, target)


def test_an_assigned_case_opens_records_of_another_district(districts: Vault) -> None:
    target = record_id(districts, SHANGHAI_ADULT)
    officer = beijing_officer(districts, cases=[CASE_NO])
    view = districts.record(officer, ON_CASE, target)
    assert view.record_id == target
    assert districts.reveal(officer, ON_CASE, target, "phone") == "13912340001"
    # Naming any other case does not.
    with pytest.raises(RecordNotFound):
        districts.record(officer, ROUTINE, target)


GUANGZHOU_ADULT = resident_id("440104", "19820304", "135")
BEYOND_THE_CASE: list[dict[str, object]] = [
    person(GUANGZHOU_ADULT, "冯测戊", "13912340005"),
    {
        "type": "delivery",
        "waybill_no": "SF0000000017",
        "recipient_name": "周测甲",
        "phone": "13912340001",
        "address": "测试市测试区测试路1号",
        "recipient": SHANGHAI_ADULT,
    },
    {
        "type": "delivery",
        "waybill_no": "SF0000000018",
        "recipient_name": "冯测戊",
        "phone": "13912340005",
        "address": "测试市测试区测试路5号",
        "recipient": GUANGZHOU_ADULT,
    },
]


def test_an_assigned_case_opens_no_record_the_case_does_not_name(
    districts: Vault, tmp_path: Path
) -> None:
    beyond = districts.ingest(
        districts.operator, write_jsonl(tmp_path / "beyond.jsonl", BEYOND_THE_CASE)
    )
    assert beyond.rejected == 0
    case = case_id(districts)
    named = [
        find_one(districts, "person", "national_id", {"national_id": n})
        for n in (SHANGHAI_ADULT, SHANGHAI_REPORTER)
    ]
    stranger = find_one(districts, "person", "national_id", {"national_id": GUANGZHOU_ADULT})
    to_victim = find_one(districts, "delivery", "phone", {"phone": "13912340001"})
    to_stranger = find_one(districts, "delivery", "phone", {"phone": "13912340005"})
    officer = beijing_officer(districts, cases=[CASE_NO])
    # What the case names opens: the case, its people, a delivery to one of them.
    for opened in (case, *named, to_victim):
        assert districts.record(officer, ON_CASE, opened).record_id == opened
    # Anyone else, anywhere, stays as absent as before, the case stated or not.
    for closed in (stranger, to_stranger):
        with pytest.raises(RecordNotFound):
            districts.record(officer, ON_CASE, closed)
        with pytest.raises(RecordNotFound):
            districts.reveal(officer, ON_CASE, closed, "phone")
        refused = last_entry(districts)
        assert refused.outcome is Outcome.DENIED and refused.records == (closed,)
    found = districts.search(
        officer,
        ON_CASE,
        record_type="person",
        index="national_id",
        values={"national_id": GUANGZHOU_ADULT},
    )
    assert found == [] and last_entry(districts).detail["filtered"] == 1


def test_assigning_a_case_that_is_not_stored_is_refused(districts: Vault) -> None:
    beijing_officer(districts)
    unknown = "A4401042025000099"  # well formed, but no case carries it
    with pytest.raises(InvalidAssignment, match="no case with that number") as refused:
        districts.admin.assign_case(districts.operator, "o.beijing", unknown)
    assert unknown not in str(refused.value)
    assert "cases" not in districts._accounts.get("o.beijing").attributes  # type: ignore[union-attr]
    assert districts.admin.assign_case(districts.operator, "o.beijing", CASE_NO) == CASE_NO


def test_a_search_from_another_district_returns_nothing(districts: Vault) -> None:
    officer = beijing_officer(districts)
    found = districts.search(
        officer,
        ROUTINE,
        record_type="person",
        index="national_id",
        values={"national_id": SHANGHAI_ADULT},
    )
    assert found == []
    entry = last_entry(districts)
    assert entry.outcome is Outcome.GRANTED and entry.records == () and entry.result_count == 0
    assert entry.detail["filtered"] == 1
    by_case = districts.search(
        officer, ROUTINE, record_type="case", index="case_no", values={"case_no": CASE_NO}
    )
    assert by_case == []


def test_a_minors_record_is_hidden_from_officers_but_not_investigators(districts: Vault) -> None:
    child = record_id(districts, SHANGHAI_CHILD)
    officer = login(districts, Role.OFFICER, "o.shanghai", district="310104", cases=[CASE_NO])
    for purpose in (ROUTINE, ON_CASE):
        with pytest.raises(RecordNotFound):
            districts.record(officer, purpose, child)
    assert not districts.search(
        officer,
        ROUTINE,
        record_type="person",
        index="national_id",
        values={"national_id": SHANGHAI_CHILD},
    )
    investigator = login(districts, Role.INVESTIGATOR, "i.shanghai", district="310104")
    assert districts.record(investigator, ROUTINE, child).record_id == child
    assert districts.reveal(investigator, ROUTINE, child, "name") == "郑测丙"


def test_a_cases_reporter_is_a_placeholder_for_officers(districts: Vault) -> None:
    case = case_id(districts)
    reporter = record_id(districts, SHANGHAI_REPORTER)
    officer = login(districts, Role.OFFICER, "o.shanghai", district="310104")
    view = districts.record(officer, ROUTINE, case)
    roles = {link.role: link for link in view.links}
    assert roles["reporter"].label == PROTECTED_REPORTER and roles["reporter"].record_id == ""
    assert reporter not in str(view.as_dict())
    assert reporter not in last_entry(districts).records
    # Nor does the reporter's own page, or a search by their link, tell an officer.
    own = districts.record(officer, ROUTINE, reporter)
    assert case not in {link.record_id for link in own.links}
    assert not districts.search(
        officer,
        ROUTINE,
        record_type="case",
        index="linked_person",
        values={"persons": SHANGHAI_REPORTER},
    )
    investigator = login(districts, Role.INVESTIGATOR, "i.shanghai", district="310104")
    shown = districts.record(investigator, ROUTINE, case)
    assert reporter in {link.record_id for link in shown.links}


# -- assigning cases -------------------------------------------------------------------


def test_another_districts_case_opens_only_while_it_is_assigned(districts: Vault) -> None:
    case = case_id(districts)
    victim = record_id(districts, SHANGHAI_ADULT)
    officer = beijing_officer(districts)
    with pytest.raises(RecordNotFound):
        districts.record(officer, ON_CASE, case)
    refused = last_entry(districts)
    assert (refused.action, refused.outcome) == (Action.READ, Outcome.DENIED)
    assert refused.records == (case,) and refused.detail["reason"] == "out_of_reach"

    # Typed in lower case with spaces, stored in canonical form.
    assert (
        districts.admin.assign_case(districts.operator, "o.beijing", f" {CASE_NO.lower()} ")
        == CASE_NO
    )
    assigned = last_entry(districts)
    assert (assigned.actor, assigned.action, assigned.outcome) == (
        "operator",
        Action.CASE_ASSIGN,
        Outcome.GRANTED,
    )
    assert assigned.detail == {"account": "o.beijing", "case": CASE_NO}
    # The session already open sees the case, and the people it names, at once.
    view = districts.record(officer, ON_CASE, case)
    assert view.record_id == case and victim in {link.record_id for link in view.links}
    assert districts.record(officer, ON_CASE, victim).record_id == victim
    # A purpose naming any other case still reaches nothing.
    with pytest.raises(RecordNotFound):
        districts.record(officer, ROUTINE, case)

    administrator = login(districts, Role.ADMIN, "a.admin")
    assert districts.admin.unassign_case(administrator, "o.beijing", CASE_NO) == CASE_NO
    taken = last_entry(districts)
    assert (taken.actor, taken.action) == ("a.admin", Action.CASE_UNASSIGN)
    assert taken.detail == {"account": "o.beijing", "case": CASE_NO}
    for target in (case, victim):
        with pytest.raises(RecordNotFound):
            districts.record(officer, ON_CASE, target)
        entry = last_entry(districts)
        assert entry.outcome is Outcome.DENIED and entry.records == (target,)
    assert "cases" not in districts._accounts.get("o.beijing").attributes  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    ["A31", "A3101042025/17", "A3101042025_017", "案3101042025000017", "A" * 33, "", "   "],
)
def test_a_malformed_case_number_is_refused_without_repeating_it(
    districts: Vault, bad: str
) -> None:
    beijing_officer(districts)
    before = districts._log.size
    for change in (districts.admin.assign_case, districts.admin.unassign_case):
        with pytest.raises(InvalidAssignment) as refused:
            change(districts.operator, "o.beijing", bad)
        assert "case number" in str(refused.value)
        assert bad.strip() == "" or bad not in str(refused.value)
    # Nothing changed; each attempt is on the log as failed, naming the account only.
    assert failed_attempts(districts, before) == [Action.CASE_ASSIGN, Action.CASE_UNASSIGN]
    assert "cases" not in districts._accounts.get("o.beijing").attributes  # type: ignore[union-attr]


def test_assignments_that_change_nothing_are_refused_plainly(districts: Vault) -> None:
    beijing_officer(districts, cases=[CASE_NO])
    login(districts, Role.ADMIN, "a.admin")
    login(districts, Role.AUDITOR, "u.audit")
    refusals = [
        (
            lambda: districts.admin.assign_case(districts.operator, "o.beijing", CASE_NO),
            "already assigned",
        ),
        (
            lambda: districts.admin.unassign_case(
                districts.operator, "o.beijing", "A1101012025000001"
            ),
            "not assigned",
        ),
        (
            lambda: districts.admin.assign_case(districts.operator, "a.admin", CASE_NO),
            "reads no records",
        ),
        (
            lambda: districts.admin.assign_case(districts.operator, "u.audit", CASE_NO),
            "reads no records",
        ),
    ]
    before = districts._log.size
    for change, reason in refusals:
        with pytest.raises(InvalidAssignment, match=reason) as refused:
            change()
        assert CASE_NO not in str(refused.value)
    with pytest.raises(RecordNotFound):
        districts.admin.assign_case(districts.operator, "nobody", CASE_NO)
    assert failed_attempts(districts, before) == [
        Action.CASE_ASSIGN,
        Action.CASE_UNASSIGN,
        Action.CASE_ASSIGN,
        Action.CASE_ASSIGN,
        Action.CASE_ASSIGN,
    ]
    # Nor can an account be created with a malformed case, or a case it cannot use.
    with pytest.raises(InvalidAssignment):
        districts.admin.add_account(
            districts.operator, "o.bad", PASSWORD, Role.OFFICER, {"cases": ["A/1"]}
        )
    with pytest.raises(InvalidAssignment):
        districts.admin.add_account(
            districts.operator, "a.bad", PASSWORD, Role.ADMIN, {"cases": [CASE_NO]}
        )


def test_assigning_a_case_keeps_the_accounts_second_factor_and_lock(districts: Vault) -> None:
    officer = beijing_officer(districts)
    districts.admin.assign_case(districts.operator, "o.beijing", CASE_NO)
    account = districts._accounts.get("o.beijing")
    assert account is not None and account.mfa_enrolled and not account.locked
    assert account.attributes == {"district": "110101", "cases": [CASE_NO]}
    assert districts.record(officer, ON_CASE, case_id(districts)).record_type == "case"


# -- minors named by a case, or sent a delivery -----------------------------------------

CHILD_CASE_NO = "A3101042025000042"
CHILD_PHONE = "13912340003"
CHILD_NAME = "郑测丙"
CHILD_RECORDS: list[dict[str, object]] = [
    {
        "type": "case",
        "case_no": CHILD_CASE_NO,
        "opened_on": "2025-07-01",
        "category": "走失",
        "narrative": "2025年7月1日，郑测丙走失，自行报案。",
        "persons": [
            {"national_id": SHANGHAI_CHILD, "role": "victim"},
            {"national_id": SHANGHAI_CHILD, "role": "reporter"},
            {"national_id": SHANGHAI_ADULT, "role": "witness"},
        ],
    },
    {
        "type": "delivery",
        "waybill_no": "SF0000000042",
        "recipient_name": CHILD_NAME,
        "phone": CHILD_PHONE,
        "address": "测试市测试区测试路1号",
        "delivered_on": "2025-07-02",
        "recipient": SHANGHAI_CHILD,
    },
]
ON_CHILD_CASE = AccessPurpose("find a missing child", CHILD_CASE_NO)


@pytest.fixture
def with_child(districts: Vault, tmp_path: Path) -> Vault:
    report = districts.ingest(
        districts.operator, write_jsonl(tmp_path / "child.jsonl", CHILD_RECORDS)
    )
    assert report.rejected == 0 and report.accepted == len(CHILD_RECORDS)
    return districts


_FINDERS = itertools.count()


def find_one(vault: Vault, record_type: str, index: str, values: dict[str, str]) -> str:
    """The id of the one record found, by a national supervisor of its own each time."""
    national = login(vault, Role.SUPERVISOR, f"s.finder{next(_FINDERS)}")
    [found] = vault.search(national, ROUTINE, record_type=record_type, index=index, values=values)
    vault.logout(national)
    return found.record_id


def child_case_id(vault: Vault) -> str:
    return find_one(vault, "case", "case_no", {"case_no": CHILD_CASE_NO})


def without_any_part_of(text: str, name: str) -> bool:
    """Neither the name nor its mask nor any of its characters (a mask keeps the first)."""
    return not any(ch in text for ch in name)


def test_an_officer_opening_a_case_that_names_a_minor_sees_no_part_of_the_minors_name(
    with_child: Vault,
) -> None:
    case = child_case_id(with_child)
    child = find_one(with_child, "person", "national_id", {"national_id": SHANGHAI_CHILD})
    witness = find_one(with_child, "person", "national_id", {"national_id": SHANGHAI_ADULT})
    officer = login(with_child, Role.OFFICER, "o.shanghai", district="310104")
    for purpose in (ROUTINE, ON_CHILD_CASE):
        view = with_child.record(officer, purpose, case)
        shown = str(view.as_dict())
        assert without_any_part_of(shown, CHILD_NAME)
        assert SHANGHAI_CHILD not in shown and SHANGHAI_CHILD[-4:] not in shown
        labels = {link.role: link for link in view.links}
        # The adult witness is labelled; the child is no link to open, under any role.
        assert labels["witness"].record_id == witness and labels["witness"].label == "周**"
        assert child not in {link.record_id for link in view.links}
        assert "victim" not in labels
        # That the case has a reporter is no secret: who it is, is, child or adult.
        assert labels["reporter"].label == PROTECTED_REPORTER
        assert labels["reporter"].record_id == ""
        entry = last_entry(with_child)
        assert child not in entry.records and entry.detail["filtered"] >= 1
    # An investigator, cleared for minors, sees the child named (masked) as both.
    investigator = login(with_child, Role.INVESTIGATOR, "i.shanghai", district="310104")
    shown = with_child.record(investigator, ROUTINE, case)
    named = {(link.role, link.label) for link in shown.links if link.record_id == child}
    assert named == {("victim", "郑**"), ("reporter", "郑**")}


def test_a_delivery_to_a_minor_is_hidden_from_officers_like_the_minors_record(
    with_child: Vault,
) -> None:
    delivery = find_one(with_child, "delivery", "phone", {"phone": CHILD_PHONE})
    officer = login(with_child, Role.OFFICER, "o.shanghai", district="310104")
    found = with_child.search(
        officer, ROUTINE, record_type="delivery", index="phone", values={"phone": CHILD_PHONE}
    )
    assert found == [] and last_entry(with_child).detail["filtered"] == 1
    with pytest.raises(RecordNotFound):
        with_child.record(officer, ROUTINE, delivery)
    with pytest.raises(RecordNotFound):
        with_child.reveal(officer, ROUTINE, delivery, "recipient_name")
    entry = last_entry(with_child)
    assert entry.outcome is Outcome.DENIED and entry.detail["reason"] == "out_of_reach"
    investigator = login(with_child, Role.INVESTIGATOR, "i.shanghai", district="310104")
    view = with_child.record(investigator, ROUTINE, delivery)
    assert view.fields["recipient_name"] == "郑**"


# -- through the dashboard and the API ------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Vault, TestClient]]:
    vault = make_vault(tmp_path, "memory")
    assert (
        vault.ingest(vault.operator, write_jsonl(tmp_path / "districts.jsonl", RECORDS)).rejected
        == 0
    )
    client = TestClient(create_app(vault), base_url="https://testserver", follow_redirects=False)
    yield vault, client
    client.close()
    vault.close()


def test_official_of_another_district_gets_404_on_the_record_page(
    site: tuple[Vault, TestClient],
) -> None:
    vault, client = site
    target = record_id(vault, SHANGHAI_ADULT)
    client.cookies.set(deps.SESSION_COOKIE, beijing_officer(vault).token)
    query = {"reason": ROUTINE.reason, "case_ref": ROUTINE.case_ref}
    response = client.get(f"/records/{target}", params=query)
    assert response.status_code == 404
    assert "周" not in response.text and SHANGHAI_ADULT[:4] + "*" not in response.text
    entry = last_entry(vault)
    assert entry.outcome is Outcome.DENIED and entry.records == (target,)
    assert client.get(f"/records/{'0' * 26}", params=query).text == response.text


def test_official_of_another_district_gets_404_from_the_api(
    site: tuple[Vault, TestClient],
) -> None:
    vault, client = site
    target = record_id(vault, SHANGHAI_ADULT)
    headers = {"Authorization": f"Bearer {beijing_officer(vault).token}"}
    query = {"purpose": ROUTINE.reason, "case_ref": ROUTINE.case_ref}
    response = client.get(f"/api/v1/records/{target}", headers=headers, params=query)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "record_not_found"
    assert "周" not in response.text and SHANGHAI_ADULT[-4:] not in response.text
    entry = last_entry(vault)
    assert entry.outcome is Outcome.DENIED and entry.records == (target,)
    missing = client.get(f"/api/v1/records/{'0' * 26}", headers=headers, params=query)
    assert missing.status_code == 404 and missing.json() == response.json()


def test_the_case_page_shows_an_officer_a_placeholder_for_the_reporter(
    site: tuple[Vault, TestClient],
) -> None:
    vault, client = site
    case = case_id(vault)
    reporter = record_id(vault, SHANGHAI_REPORTER)
    client.cookies.set(
        deps.SESSION_COOKIE, login(vault, Role.OFFICER, "o.shanghai", district="310104").token
    )
    query = {"reason": ROUTINE.reason, "case_ref": ROUTINE.case_ref}
    page = client.get(f"/records/{case}", params=query)
    assert page.status_code == 200
    assert PROTECTED_REPORTER in page.text and reporter not in page.text and "吴" not in page.text


def as_user(client: TestClient, session: Session) -> TestClient:
    """Another browser on the same app, signed in as the session's account."""
    browser = TestClient(client.app, base_url="https://testserver", follow_redirects=False)
    browser.cookies.set(deps.SESSION_COOKIE, session.token)
    return browser


def test_admin_assigns_a_case_on_the_accounts_page_and_it_opens_only_while_assigned(
    site: tuple[Vault, TestClient],
) -> None:
    vault, client = site
    case = case_id(vault)
    officer_session = beijing_officer(vault)
    admin_session = login(vault, Role.ADMIN, "a.admin")
    officer, admin = as_user(client, officer_session), as_user(client, admin_session)
    query = {"reason": ON_CASE.reason, "case_ref": CASE_NO}
    assert officer.get(f"/records/{case}", params=query).status_code == 404
    assert last_entry(vault).outcome is Outcome.DENIED

    form = {"csrf_token": vault.csrf_token(admin_session), "case_no": CASE_NO.lower()}
    page = admin.post("/admin/accounts/o.beijing/assign", data=form)
    assert page.status_code == 200 and "assigned the case" in page.text
    assert CASE_NO in page.text  # the number, listed under the account to unassign it
    # Nothing of what the case holds: no name, no ID number, no category.
    for secret in ("周", "吴", "抢劫", SHANGHAI_ADULT[6:14], SHANGHAI_ADULT[-4:]):
        assert secret not in page.text
    entry = last_entry(vault, besides=Action.ACCOUNT_LIST)
    assert (entry.actor, entry.action) == ("a.admin", Action.CASE_ASSIGN)
    assert entry.detail == {"account": "o.beijing", "case": CASE_NO}

    opened = officer.get(f"/records/{case}", params=query)
    assert opened.status_code == 200 and "周*" in opened.text

    page = admin.post("/admin/accounts/o.beijing/unassign", data=form)
    assert page.status_code == 200 and "no longer assigned the case" in page.text
    assert last_entry(vault, besides=Action.ACCOUNT_LIST).action == Action.CASE_UNASSIGN
    assert officer.get(f"/records/{case}", params=query).status_code == 404
    officer.close()
    admin.close()


def test_only_an_administrator_assigns_cases_and_never_without_the_csrf_token(
    site: tuple[Vault, TestClient],
) -> None:
    vault, client = site
    officer_session = beijing_officer(vault)
    admin_session = login(vault, Role.ADMIN, "a.admin")
    supervisor_session = login(vault, Role.SUPERVISOR, "s.national")
    # An official cannot assign a case to themselves, or to anyone, with a valid token.
    for session in (officer_session, supervisor_session):
        browser = as_user(client, session)
        form = {"csrf_token": vault.csrf_token(session), "case_no": CASE_NO}
        response = browser.post("/admin/accounts/o.beijing/assign", data=form)
        assert response.status_code == 403
        refused = last_entry(vault)
        assert (refused.actor, refused.outcome) == (session.username, Outcome.DENIED)
        browser.close()
    # Nor can a cross-site form, though it rides on the administrator's session.
    admin = as_user(client, admin_session)
    before = vault._log.size
    for token in (None, "not-the-token", vault.csrf_token(officer_session)):
        form = {"case_no": CASE_NO} if token is None else {"csrf_token": token, "case_no": CASE_NO}
        assert admin.post("/admin/accounts/o.beijing/assign", data=form).status_code == 403
    assert vault._log.size == before
    assert "cases" not in vault._accounts.get("o.beijing").attributes  # type: ignore[union-attr]
    admin.close()


def test_a_malformed_case_number_on_the_accounts_page_is_a_clear_422(
    site: tuple[Vault, TestClient],
) -> None:
    vault, client = site
    beijing_officer(vault)
    admin_session = login(vault, Role.ADMIN, "a.admin")
    admin = as_user(client, admin_session)
    bad = "A31<b>x</b>"
    before = vault._log.size
    form = {"csrf_token": vault.csrf_token(admin_session), "case_no": bad}
    page = admin.post("/admin/accounts/o.beijing/assign", data=form)
    assert page.status_code == 422
    assert "a case number must be 4 to 32 letters, digits or hyphens" in page.text
    assert bad not in page.text and "&lt;b&gt;x" not in page.text
    assert failed_attempts(vault, before) == [Action.CASE_ASSIGN]
    assert "cases" not in vault._accounts.get("o.beijing").attributes  # type: ignore[union-attr]
    admin.close()


def test_the_case_page_shows_an_officer_no_part_of_a_minors_name(
    site: tuple[Vault, TestClient], tmp_path: Path
) -> None:
    vault, client = site
    assert (
        vault.ingest(vault.operator, write_jsonl(tmp_path / "child.jsonl", CHILD_RECORDS)).rejected
        == 0
    )
    case = find_one(vault, "case", "case_no", {"case_no": CHILD_CASE_NO})
    child = find_one(vault, "person", "national_id", {"national_id": SHANGHAI_CHILD})
    officer = as_user(client, login(vault, Role.OFFICER, "o.shanghai", district="310104"))
    query = {"reason": ON_CHILD_CASE.reason, "case_ref": CHILD_CASE_NO}
    page = officer.get(f"/records/{case}", params=query)
    assert page.status_code == 200
    assert without_any_part_of(page.text, CHILD_NAME)
    assert child not in page.text and SHANGHAI_CHILD[-4:] not in page.text
    assert PROTECTED_REPORTER in page.text and "周*" in page.text  # the adult witness
    officer.close()
