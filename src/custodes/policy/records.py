"""Record-level rules: which records an official may see at all, whatever the field.

An official reaches the records of their district (a division-code prefix) or of a case
they are assigned to; minors' records need a higher clearance; reporters of crimes are
named only to investigators and above. Pure: the vault supplies the facts it decrypted.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

from custodes.policy.decisions import AccessPurpose, Role, clearance_of
from custodes.records.idnumber import PROVINCE_CODES, birth_date_of
from custodes.schema import Sensitivity

NATIONAL = "*"  # the district attribute of units that serve the whole country
ADULT_AGE = 18
REPORTER = "reporter"
PROTECTED_REPORTER = "[protected reporter]"

# Province (2 digits), city (4) or county (6): the levels of GB/T 2260 division codes.
_DISTRICT = re.compile(r"[0-9]{2}(?:[0-9]{2}){0,2}")
# Synthetic case numbers: "A", the 6-digit division that opened the case, year, sequence.
_CASE_NO = re.compile(r"A([0-9]{6})(?:18|19|20|21)[0-9]{2}[0-9]+")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True, slots=True)
class RecordFacts:
    """What the record-level rules need to know of a record, derived after decryption.

    `district` is a 6-digit division code, or None when the record names none: then only
    national units and officials assigned to the stated case reach it.
    """

    district: str | None
    is_minor: bool = False


def district_prefix(attribute: object) -> str | None:
    """An account's district attribute as a prefix to match, or None if it is unusable.

    An unusable attribute (missing, misspelt, a name instead of a code) reaches nothing:
    a typo must not widen an official's view.
    """
    if attribute == NATIONAL:
        return NATIONAL
    if isinstance(attribute, str) and _DISTRICT.fullmatch(attribute):
        return attribute
    return None


def assigned_cases(attribute: object) -> frozenset[str]:
    """The case references an account is assigned to (its `cases` attribute)."""
    if not isinstance(attribute, list | tuple | set | frozenset):
        return frozenset()
    return frozenset(c.strip().upper() for c in attribute if isinstance(c, str) and c.strip())


def district_of_national_id(number: object) -> str | None:
    """The division code a resident ID number was issued under (its first 6 digits)."""
    if not isinstance(number, str) or len(number) < 6:
        return None
    code = number[:6]
    return code if code.isascii() and code.isdigit() and code[:2] in PROVINCE_CODES else None


def district_of_case_no(case_no: object) -> str | None:
    """The division that opened a case, when its number follows the `A<code><year><seq>`
    shape; None otherwise (the case's people then decide)."""
    if not isinstance(case_no, str):
        return None
    match = _CASE_NO.fullmatch(case_no)
    if match is None or match.group(1)[:2] not in PROVINCE_CODES:
        return None
    return match.group(1)


def is_minor(birth_date: object, national_id: object, today: dt.date) -> bool:
    """Whether a person is under 18 on `today`, from the birth date or, failing that,
    the one encoded in the ID number. A person whose age cannot be told is not a minor."""
    born: dt.date | None = None
    if isinstance(birth_date, str) and _DATE.fullmatch(birth_date):
        try:
            born = dt.date.fromisoformat(birth_date)
        except ValueError:
            born = None
    if born is None and isinstance(national_id, str) and len(national_id) == 18:
        try:
            born = birth_date_of(national_id)
        except ValueError:
            born = None
    if born is None:
        return False
    had_birthday = (today.month, today.day) >= (born.month, born.day)
    return today.year - born.year - (0 if had_birthday else 1) < ADULT_AGE


def _names_nothing(_case: str) -> bool:
    return False


def may_see(
    role: Role,
    account_district: object,
    account_cases: Collection[str],
    purpose: AccessPurpose,
    record: RecordFacts,
    *,
    names_record: Callable[[str], bool] = _names_nothing,
) -> bool:
    """Whether an official may read (and so reveal from) a record at all.

    `account_district` is the account's raw attribute; `account_cases` the references
    of the cases it is assigned to; `names_record(case)` whether that stored case names
    this record (is it, links the person, or is about one of its people). A refusal is to
    be reported as "no such record".
    """
    clearance = clearance_of(role)
    if clearance is None:
        return False
    if record.is_minor and clearance < Sensitivity.SENSITIVE:
        return False
    prefix = district_prefix(account_district)
    if prefix == NATIONAL:
        return True
    if prefix is not None and record.district is not None and record.district.startswith(prefix):
        return True
    # A case the official is assigned to opens the records it names wherever they live,
    # and nothing else; the case reference is on every log entry, so the exception is
    # accountable.
    case = purpose.case_ref.upper() if purpose.case_ref else None
    if case is None or case not in {c.upper() for c in account_cases}:
        return False
    return names_record(case)


def sees_reporters(role: Role) -> bool:
    """Whether a role may learn who reported a crime: investigators and above."""
    clearance = clearance_of(role)
    return clearance is not None and clearance >= Sensitivity.SENSITIVE
