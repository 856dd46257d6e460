"""Record-level rules, decided without I/O: districts by division-code prefix, assigned
cases, minors, reporters."""

from __future__ import annotations

import datetime as dt

import pytest

from custodes.policy import (
    AccessPurpose,
    RecordFacts,
    Role,
    assigned_cases,
    district_of_case_no,
    district_of_national_id,
    district_prefix,
    is_minor,
    may_see,
    sees_reporters,
)

ROUTINE = AccessPurpose("routine check of a resident", "C-7")
ON_CASE = AccessPurpose("interview a witness", "A3101042026000017")
TODAY = dt.date(2026, 11, 28)

SHANGHAI = RecordFacts("310104")
BEIJING = RecordFacts("110101")
NOWHERE = RecordFacts(None)
SHANGHAI_MINOR = RecordFacts("310104", is_minor=True)


@pytest.mark.parametrize(
    ("role", "district", "cases", "purpose", "record", "allowed"),
    [
        # An officer reaches their own county, nothing beyond it.
        (Role.OFFICER, "110101", [], ROUTINE, BEIJING, True),
        (Role.OFFICER, "110101", [], ROUTINE, SHANGHAI, False),
        (Role.OFFICER, "110102", [], ROUTINE, BEIJING, False),
        # ... unless the stated case is one the officer is assigned to.
        (Role.OFFICER, "110101", ["A3101042026000017"], ON_CASE, SHANGHAI, True),
        (Role.OFFICER, "110101", ["a3101042026000017"], ON_CASE, SHANGHAI, True),
        (Role.OFFICER, "110101", ["A3101042026000099"], ON_CASE, SHANGHAI, False),
        (Role.OFFICER, "110101", [], ON_CASE, SHANGHAI, False),
        # Prefixes: a city, a province, the whole country.
        (Role.INVESTIGATOR, "3101", [], ROUTINE, SHANGHAI, True),
        (Role.INVESTIGATOR, "3102", [], ROUTINE, SHANGHAI, False),
        (Role.SUPERVISOR, "31", [], ROUTINE, SHANGHAI, True),
        (Role.SUPERVISOR, "11", [], ROUTINE, SHANGHAI, False),
        (Role.OFFICER, "*", [], ROUTINE, SHANGHAI, True),
        # A record that names no district: national units and assigned cases only.
        (Role.OFFICER, "31", [], ROUTINE, NOWHERE, False),
        (Role.OFFICER, "*", [], ROUTINE, NOWHERE, True),
        (Role.OFFICER, "31", ["A3101042026000017"], ON_CASE, NOWHERE, True),
        # An unusable district attribute reaches nothing: a typo never widens a view.
        (Role.SUPERVISOR, "test", [], ROUTINE, SHANGHAI, False),
        (Role.SUPERVISOR, "", [], ROUTINE, SHANGHAI, False),
        (Role.SUPERVISOR, None, [], ROUTINE, SHANGHAI, False),
        (Role.SUPERVISOR, "3", [], ROUTINE, SHANGHAI, False),
        (Role.SUPERVISOR, "31010", [], ROUTINE, SHANGHAI, False),
        (Role.SUPERVISOR, "3101040", [], ROUTINE, SHANGHAI, False),
        (Role.SUPERVISOR, "**", [], ROUTINE, SHANGHAI, False),
        (Role.SUPERVISOR, 310104, [], ROUTINE, SHANGHAI, False),
        # Minors need investigator clearance, whatever the district or case.
        (Role.OFFICER, "310104", [], ROUTINE, SHANGHAI_MINOR, False),
        (Role.OFFICER, "*", [], ROUTINE, SHANGHAI_MINOR, False),
        (Role.OFFICER, "110101", ["A3101042026000017"], ON_CASE, SHANGHAI_MINOR, False),
        (Role.INVESTIGATOR, "310104", [], ROUTINE, SHANGHAI_MINOR, True),
        (Role.SUPERVISOR, "*", [], ROUTINE, SHANGHAI_MINOR, True),
        (Role.INVESTIGATOR, "110101", [], ROUTINE, SHANGHAI_MINOR, False),
        # Auditors and administrators read no records at all.
        (Role.AUDITOR, "*", [], ROUTINE, SHANGHAI, False),
        (Role.ADMIN, "*", [], ROUTINE, SHANGHAI, False),
    ],
)
def test_who_may_see_a_record(
    role: Role,
    district: object,
    cases: list[str],
    purpose: AccessPurpose,
    record: RecordFacts,
    allowed: bool,
) -> None:
    # Every record of the table is one the case A3101042026000017 names.
    def names_record(case: str) -> bool:
        return case == "A3101042026000017"

    decided = may_see(
        role, district, assigned_cases(cases), purpose, record, names_record=names_record
    )
    assert decided is allowed


def test_an_assigned_case_opens_only_the_records_it_names() -> None:
    cases = assigned_cases(["A3101042026000017"])

    def named(_case: str) -> bool:
        return True

    def not_named(_case: str) -> bool:
        return False

    assert may_see(Role.OFFICER, "110101", cases, ON_CASE, SHANGHAI, names_record=named)
    assert not may_see(Role.OFFICER, "110101", cases, ON_CASE, SHANGHAI, names_record=not_named)
    # The rule is asked only for a case that is both stated and assigned.
    asked: list[str] = []

    def record_asked(case: str) -> bool:
        asked.append(case)
        return True

    assert not may_see(Role.OFFICER, "110101", cases, ROUTINE, SHANGHAI, names_record=record_asked)
    assert asked == []


def test_a_purpose_without_a_case_opens_no_assigned_case() -> None:
    purpose = AccessPurpose("routine check of a resident")
    assert not may_see(Role.OFFICER, "110101", frozenset({"C-7"}), purpose, SHANGHAI)


@pytest.mark.parametrize(
    ("attribute", "prefix"),
    [
        ("*", "*"),
        ("31", "31"),
        ("3101", "3101"),
        ("310104", "310104"),
        ("test", None),
        ("", None),
        (None, None),
        ("3", None),
        ("31010", None),
        ("٣١", None),  # digits, but not ASCII ones
        (["31"], None),
    ],
)
def test_district_attribute_becomes_a_prefix_or_nothing(attribute: object, prefix: str) -> None:
    assert district_prefix(attribute) == prefix


def test_assigned_cases_ignore_anything_but_a_list_of_references() -> None:
    assert assigned_cases(["C-1", " c-2 ", 3, ""]) == frozenset({"C-1", "C-2"})
    assert assigned_cases("C-1") == frozenset()
    assert assigned_cases(None) == frozenset()


@pytest.mark.parametrize(
    ("number", "district"),
    [
        ("310104199001011234", "310104"),
        ("11010120100101123X", "110101"),
        ("990101199001011234", None),
        ("3101", None),
        (None, None),
        ("31A104199001011234", None),
    ],
)
def test_a_persons_district_is_the_division_code_of_their_id(
    number: object, district: str | None
) -> None:
    assert district_of_national_id(number) == district


@pytest.mark.parametrize(
    ("case_no", "district"),
    [
        ("A3101042026000017", "310104"),
        ("A1101012009000001", "110101"),
        ("B3101042026000017", None),  # not the synthetic shape: its people decide
        ("A31010420", None),
        ("A9901012026000001", None),  # no such province
        ("2026-SH-00417", None),
        (None, None),
    ],
)
def test_a_cases_district_comes_from_its_number_when_it_has_the_shape(
    case_no: object, district: str | None
) -> None:
    assert district_of_case_no(case_no) == district


@pytest.mark.parametrize(
    ("birth_date", "number", "minor"),
    [
        ("2008-11-29", None, True),  # 18 tomorrow
        ("2008-11-28", None, False),  # 18 today
        ("1990-01-01", None, False),
        (None, "310104201501011234", True),  # from the ID's encoded birth date
        (None, "310104199001011234", False),
        ("1990-01-01", "310104201501011234", False),  # the recorded date comes first
        ("not a date", "310104201501011234", True),
        (None, None, False),
    ],
)
def test_minors_are_under_eighteen_on_the_vault_clocks_date(
    birth_date: object, number: object, minor: bool
) -> None:
    assert is_minor(birth_date, number, TODAY) is minor


@pytest.mark.parametrize(
    ("role", "sees"),
    [
        (Role.OFFICER, False),
        (Role.INVESTIGATOR, True),
        (Role.SUPERVISOR, True),
        (Role.AUDITOR, False),
        (Role.ADMIN, False),
    ],
)
def test_only_investigators_and_above_learn_who_reported_a_crime(role: Role, sees: bool) -> None:
    assert sees_reporters(role) is sees
