"""Roles, purposes and the authorisation decision for each kind of access.

Separation of duties is built in: administrators manage accounts and auditors read the
access log, but neither can read a personal record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from custodes.errors import AccessDenied, PurposeRequired
from custodes.schema import FieldSpec, Sensitivity


class Role(StrEnum):
    OFFICER = "officer"
    INVESTIGATOR = "investigator"
    SUPERVISOR = "supervisor"
    AUDITOR = "auditor"
    ADMIN = "admin"


class Action(StrEnum):
    """Access-log action tags, shaped subject:object:action."""

    SEARCH = "record:index:search"
    READ = "record:masked:read"
    REVEAL = "record:field:reveal"
    INGEST = "vault:records:ingest"
    LOGIN = "account:session:login"
    LOG_READ = "audit:log:read"
    SUBJECT_REPORT = "audit:subject:report"
    ACCOUNT_ADD = "account:account:add"


# The most sensitive field class each role may reveal. Masked views are open to every
# role that may read records at all; revealing is where clearance matters.
_CLEARANCE: dict[Role, Sensitivity | None] = {
    Role.OFFICER: Sensitivity.IDENTIFYING,
    Role.INVESTIGATOR: Sensitivity.SENSITIVE,
    Role.SUPERVISOR: Sensitivity.RESTRICTED,
    Role.AUDITOR: None,
    Role.ADMIN: None,
}

_BREAKS = re.compile("[\r\n\t\x00]")  # a reason is logged as one line
_CASE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9/_.-]{0,63}")


def clearance_of(role: Role) -> Sensitivity | None:
    """The highest sensitivity a role may reveal, or None for roles that read no records."""
    return _CLEARANCE[role]


@dataclass(frozen=True, slots=True)
class AccessPurpose:
    """Why an official is looking: a stated reason and, optionally, the case it serves.

    The reason goes on the access log verbatim, so it must be short, single-line text.
    """

    reason: str
    case_ref: str | None = None

    def __post_init__(self) -> None:
        reason = self.reason.strip() if isinstance(self.reason, str) else ""
        if len(reason) < 3:
            raise PurposeRequired("a purpose of at least 3 characters is required")
        if len(reason) > 200 or _BREAKS.search(reason):
            raise PurposeRequired("a purpose must be one line of at most 200 characters")
        object.__setattr__(self, "reason", reason)
        if self.case_ref is not None:
            case_ref = self.case_ref.strip()
            if not _CASE_REF.fullmatch(case_ref):
                raise PurposeRequired(
                    "a case reference is 1-64 letters, digits or / _ . - characters"
                )
            object.__setattr__(self, "case_ref", case_ref)


def authorise(role: Role, action: Action, *, field: FieldSpec | None = None) -> None:
    """Raise AccessDenied unless role may perform action (on field, for a reveal)."""
    if action in (Action.SEARCH, Action.READ, Action.REVEAL):
        clearance = _CLEARANCE[role]
        if clearance is None:
            raise AccessDenied(f"the {role.value} role cannot read personal records")
        # A reveal is decided twice: by role before the record is read, by field after.
        if action is Action.REVEAL and field is not None and field.sensitivity > clearance:
            raise AccessDenied(
                f"the {role.value} role may not reveal {field.sensitivity.name.lower()} "
                f"fields such as {field.name!r}"
            )
        return
    if action in (Action.LOG_READ, Action.SUBJECT_REPORT) and role is not Role.AUDITOR:
        raise AccessDenied("only an auditor reads the access log")
    if action is Action.ACCOUNT_ADD and role is not Role.ADMIN:
        raise AccessDenied("only an administrator can add accounts")
