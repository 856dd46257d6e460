"""The single access function: no session, no purpose, no clearance, no log entry — no data.

Runs on the in-memory and the SQLite backend alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from custodes.audit import Outcome
from custodes.errors import (
    AccessDenied,
    AuditUnavailable,
    AuthenticationFailed,
    InvalidQuery,
    PurposeRequired,
    RecordNotFound,
)
from custodes.policy import AccessPurpose, Action, Role
from custodes.storage import LogAppend, MemoryStorage
from custodes.vault import Session, Vault
from tests.conftest import PASSWORD, PURPOSE, login, read_records


@pytest.fixture
def loaded(vault: Vault, population_file: Path) -> Vault:
    report = vault.ingest(vault.operator, population_file)
    assert report.rejected == 0 and report.accepted > 0
    return vault


def first_person(population_file: Path) -> dict[str, object]:
    return next(r for r in read_records(population_file) if r["type"] == "person")


def test_round_trip_search_by_every_person_index(loaded: Vault, population_file: Path) -> None:
    person = first_person(population_file)
    session = login(loaded)
    by_id = loaded.search(
        session,
        PURPOSE,
        record_type="person",
        index="national_id",
        values={"national_id": str(person["national_id"])},
    )
    assert len(by_id) == 1
    rid = by_id[0].record_id
    by_phone = loaded.search(
        session,
        PURPOSE,
        record_type="person",
        index="phone",
        values={"phone": str(person["phone"])},
    )
    assert rid in {v.record_id for v in by_phone}
    by_name = loaded.search(
        session,
        PURPOSE,
        record_type="person",
        index="name_birth",
        values={"name": str(person["name"]), "birth_date": str(person["birth_date"])},
    )
    assert rid in {v.record_id for v in by_name}
    assert loaded.reveal(session, PURPOSE, rid, "national_id") == person["national_id"]
    assert loaded.reveal(session, PURPOSE, rid, "address") == person["address"]


def test_name_in_pinyin_finds_the_han_name(loaded: Vault, population_file: Path) -> None:
    from pypinyin import lazy_pinyin

    person = first_person(population_file)
    session = login(loaded)
    latin = " ".join(lazy_pinyin(str(person["name"]))).title()
    found = loaded.search(
        session,
        PURPOSE,
        record_type="person",
        index="name_birth",
        values={"name": latin, "birth_date": str(person["birth_date"])},
    )
    assert str(person["national_id"])[:4] in {v.fields["national_id"][:4] for v in found}


def test_search_results_are_masked(loaded: Vault, population_file: Path) -> None:
    person = first_person(population_file)
    session = login(loaded)
    [view] = loaded.search(
        session,
        PURPOSE,
        record_type="person",
        index="national_id",
        values={"national_id": str(person["national_id"])},
    )
    shown = " ".join(view.fields.values())
    for field in ("national_id", "phone", "address"):
        assert str(person[field]) not in shown
    assert view.fields["national_id"].count("*") == 10


def test_case_lists_its_linked_persons_and_person_lists_its_cases(
    loaded: Vault, population_file: Path
) -> None:
    records = read_records(population_file)
    case = next(r for r in records if r["type"] == "case")
    session = login(loaded)
    [found] = loaded.search(
        session,
        PURPOSE,
        record_type="case",
        index="case_no",
        values={"case_no": str(case["case_no"])},
    )
    full = loaded.record(session, PURPOSE, found.record_id)
    linked = case["persons"]
    assert isinstance(linked, list)
    assert sorted(ln.role for ln in full.links) == sorted(p["role"] for p in linked)
    person_id = full.links[0].record_id
    person_view = loaded.record(session, PURPOSE, person_id)
    assert found.record_id in {ln.record_id for ln in person_view.links}


def test_forged_session_gets_nothing(loaded: Vault, population_file: Path) -> None:
    person = first_person(population_file)
    login(loaded)
    forged = Session("guessed-token", "t.investigator", Role.INVESTIGATOR, 0.0)
    with pytest.raises(AuthenticationFailed):
        loaded.search(
            forged,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": str(person["national_id"])},
        )


def test_session_ends_at_logout(loaded: Vault, population_file: Path) -> None:
    person = first_person(population_file)
    session = login(loaded)
    loaded.logout(session)
    with pytest.raises(AuthenticationFailed):
        loaded.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": str(person["national_id"])},
        )


def test_wrong_password_and_unknown_account_fail_alike(vault: Vault) -> None:
    login(vault)
    with pytest.raises(AuthenticationFailed) as wrong:
        vault.login("t.investigator", PASSWORD + "x")
    with pytest.raises(AuthenticationFailed) as unknown:
        vault.login("nobody.here", PASSWORD)
    assert str(wrong.value) == str(unknown.value)


def test_purpose_is_required() -> None:
    with pytest.raises(PurposeRequired):
        AccessPurpose("")
    with pytest.raises(PurposeRequired):
        AccessPurpose("two\nlines")


@pytest.mark.parametrize("role", [Role.ADMIN, Role.AUDITOR])
def test_admins_and_auditors_cannot_read_records(
    loaded: Vault, population_file: Path, role: Role
) -> None:
    person = first_person(population_file)
    session = login(loaded, role)
    with pytest.raises(AccessDenied):
        loaded.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": str(person["national_id"])},
        )
    last = list(loaded._log.entries())[-1][1]
    assert last.outcome is Outcome.DENIED and last.actor == session.username


def test_officer_cannot_reveal_a_restricted_narrative(loaded: Vault, population_file: Path) -> None:
    case = next(r for r in read_records(population_file) if r["type"] == "case")
    officer = login(loaded, Role.OFFICER)
    [found] = loaded.search(
        officer,
        PURPOSE,
        record_type="case",
        index="case_no",
        values={"case_no": str(case["case_no"])},
    )
    with pytest.raises(AccessDenied):
        loaded.reveal(officer, PURPOSE, found.record_id, "narrative")
    supervisor = login(loaded, Role.SUPERVISOR)
    assert loaded.reveal(supervisor, PURPOSE, found.record_id, "narrative") == case["narrative"]


def test_every_read_is_on_the_log_with_purpose_and_records(
    loaded: Vault, population_file: Path
) -> None:
    person = first_person(population_file)
    session = login(loaded)
    purpose = AccessPurpose("checking an address", "CASE-42")
    [view] = loaded.search(
        session,
        purpose,
        record_type="person",
        index="national_id",
        values={"national_id": str(person["national_id"])},
    )
    loaded.reveal(session, purpose, view.record_id, "phone")
    entries = [e for _, e in loaded._log.entries()]
    search, reveal = entries[-2], entries[-1]
    assert search.action == Action.SEARCH and search.records == (view.record_id,)
    assert reveal.action == Action.REVEAL and reveal.detail["field"] == "phone"
    assert reveal.purpose == "checking an address" and reveal.case_ref == "CASE-42"
    encoded = b"".join(e.encode() for e in entries)
    for field in ("name", "national_id", "phone", "address"):
        assert str(person[field]).encode() not in encoded


def test_unknown_record_and_unknown_field(loaded: Vault) -> None:
    session = login(loaded)
    with pytest.raises(RecordNotFound):
        loaded.reveal(session, PURPOSE, "a" * 24, "phone")
    with pytest.raises(InvalidQuery):
        loaded.search(session, PURPOSE, record_type="person", index="nope", values={"x": "1"})
    last = list(loaded._log.entries())[-1][1]
    assert last.outcome is Outcome.ERROR


class RefusingLog(MemoryStorage):
    """A backend whose access log refuses writes, as a full or read-only disk would."""

    refuse = False

    def log_append(
        self, batch: LogAppend, rebuild: Callable[[int], LogAppend] | None = None
    ) -> None:
        if self.refuse:
            raise AuditUnavailable("the access log refused the write")
        super().log_append(batch, rebuild)


def test_read_fails_closed_when_the_access_log_cannot_be_written(
    tmp_path: Path, population_file: Path
) -> None:
    from custodes.bootstrap import memory_vault
    from tests.conftest import FAST_HASH, memory_keys

    storage = RefusingLog()
    vault = memory_vault(*memory_keys(tmp_path), hash_cost=FAST_HASH, storage=storage)
    vault.ingest(vault.operator, population_file)
    person = first_person(population_file)
    session = login(vault)
    storage.refuse = True
    with pytest.raises(AuditUnavailable) as refused:
        vault.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": str(person["national_id"])},
        )
    assert str(person["national_id"]) not in str(refused.value)
    with pytest.raises(AuditUnavailable):
        vault.reveal(session, PURPOSE, "a" * 24, "phone")


def test_search_by_linked_person_finds_their_cases(loaded: Vault, population_file: Path) -> None:
    records = read_records(population_file)
    case = next(r for r in records if r["type"] == "case")
    linked = case["persons"]
    assert isinstance(linked, list)
    session = login(loaded)
    found = loaded.search(
        session,
        PURPOSE,
        record_type="case",
        index="linked_person",
        values={"persons": str(linked[0]["national_id"])},
    )
    assert str(case["case_no"]) in {v.fields["case_no"] for v in found}
