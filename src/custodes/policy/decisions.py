"""Roles, actions, purposes and the one authorisation rule every access goes through.

Who may do what is data (PERMISSIONS, API_SCOPES, CASE_REQUIRED, the clearance table);
`authorise` reads it and raises. Separation of duties is built in: administrators manage
accounts and auditors read the access log, but neither can read a personal record; the
host operator (whoever unseals the keys on the host) ingests and administers, and reads
neither records nor the log's entries.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from custodes.errors import AccessDenied, PurposeRequired
from custodes.freetext import HiddenCharacter, one_line
from custodes.schema import FieldSpec, Sensitivity


class Role(StrEnum):
    OFFICER = "officer"
    INVESTIGATOR = "investigator"
    SUPERVISOR = "supervisor"
    AUDITOR = "auditor"
    ADMIN = "admin"
    # Not an account's role: the holder of the keyring passphrase, acting on the host.
    OPERATOR = "operator"


# Roles an official's account may have; the operator is never an account.
ACCOUNT_ROLES: tuple[Role, ...] = tuple(r for r in Role if r is not Role.OPERATOR)


class Action(StrEnum):
    """Access-log action tags, shaped subject:object:action."""

    SEARCH = "record:index:search"
    READ = "record:masked:read"
    REVEAL = "record:field:reveal"
    INGEST = "vault:records:ingest"
    # One batch of an ingest written to storage, its entry naming each record it stores.
    INGEST_BATCH = "vault:records:store"
    LOGIN = "account:session:login"
    LOGOUT = "account:session:logout"
    LOG_READ = "audit:log:read"
    LOG_VERIFY = "audit:log:verify"
    # Re-derive every record's blind-index tokens and hold them against the stored rows.
    RECORDS_VERIFY = "audit:index:verify"
    LOG_CHECKPOINT = "audit:checkpoint:sign"
    WITNESS_PUBLISH = "audit:checkpoint:witness"
    # The host operator accepts that the log lost entries its signer had signed.
    LOG_LOSS_ACKNOWLEDGE = "audit:log:acknowledge-loss"
    # Officers' shares opened a keyring sealed M-of-N in a server that started sealed.
    UNSEAL = "vault:keys:unseal"
    # A key rotation's steps: started, a pass over the records, old tokens dropped, old
    # keys destroyed; each step one entry.
    KEYS_ROTATE = "vault:keys:rotate"
    SUBJECT_REPORT = "audit:subject:report"
    # The record id of the person a subject access request names, from their ID number:
    # the one field an auditor may look up, and only the id comes back.
    SUBJECT_LOOKUP = "audit:subject:lookup"
    ACCOUNT_ADD = "account:account:add"
    ACCOUNT_LIST = "account:account:list"
    ACCOUNT_DISABLE = "account:account:disable"
    ACCOUNT_ENABLE = "account:account:enable"
    ACCOUNT_UNLOCK = "account:account:unlock"
    # An account's own budget limits set, or put back to its role's (policy.budgets).
    ACCOUNT_BUDGET = "account:budget:set"
    # A role's own budget limits in this vault set, or put back to the defaults.
    ROLE_BUDGET = "account:budget:role"
    PASSWORD_CHANGE = "account:password:change"  # noqa: S105 - a log tag
    MFA_ENROL_ISSUE = "account:mfa:issue"
    MFA_ENROL = "account:mfa:enrol"
    API_TOKEN_ISSUE = "account:token:issue"  # noqa: S105 - a log tag
    # An account moved to another division (its district), or its district taken away.
    ACCOUNT_DISTRICT = "account:district:set"
    CASE_ASSIGN = "account:case:assign"
    CASE_UNASSIGN = "account:case:unassign"
    PASSKEY_REGISTER = "account:passkey:register"
    # A stored row that grants access (account, session, API token) failed its tag.
    ROW_TAMPERED = "vault:row:tampered"
    # A signed, encrypted copy of the vault and its sealed keys (custodes.backup).
    BACKUP_CREATE = "vault:backup:create"
    # A vault, or its lost key files, put back from a backup: on the restored log.
    BACKUP_RESTORE = "vault:backup:restore"
    # A bulk export: asked for by one official, approved by a second, produced by the
    # first, encrypted to its recipient and fingerprinted (custodes.export).
    EXPORT_REQUEST = "export:bulk:request"
    EXPORT_APPROVE = "export:bulk:approve"
    EXPORT_CREATE = "export:bulk:create"
    # A leaked sample matched against the vault and the log: which export or account.
    LEAK_TRACE = "audit:leak:trace"
    # Alerts on officials' use of the vault (custodes.alerts): listed, then acknowledged
    # (someone is looking) and resolved (dealt with), each step by a watcher.
    ALERT_LIST = "guard:alert:list"
    ALERT_ACKNOWLEDGE = "guard:alert:acknowledge"
    ALERT_RESOLVE = "guard:alert:resolve"
    # Synthetic people stored like real ones, whose every read trips an alarm.
    CANARY_PLANT = "guard:canary:plant"
    # The anomaly guard acted on an account: an alert, its sessions ended, or a lock.
    GUARD_ACT = "guard:account:act"
    # Every official's anomaly score, with its explanation, read on the host.
    GUARD_SCORE = "guard:account:score"
    # A record flagged for the guard: the first read of it by any account raises an alert.
    GUARD_FLAG = "guard:record:flag"
    # Erasure: one official asks for a record to be erased, a second (never the asker)
    # approves, and the vault destroys its data key, payload and tokens, on the erasure
    # ledger and here. Retention erases expired records the same way, on the host.
    ERASE_REQUEST = "record:erasure:request"
    ERASE_APPROVE = "record:erasure:approve"
    ERASE = "vault:records:erase"
    RETENTION_RUN = "vault:retention:run"


# The most sensitive field class each role may reveal. Masked views are open to every
# role that may read records at all; revealing is where clearance matters.
_CLEARANCE: dict[Role, Sensitivity | None] = {
    Role.OFFICER: Sensitivity.IDENTIFYING,
    Role.INVESTIGATOR: Sensitivity.SENSITIVE,
    Role.SUPERVISOR: Sensitivity.RESTRICTED,
    Role.AUDITOR: None,
    Role.ADMIN: None,
    Role.OPERATOR: None,
}

_READERS = frozenset({Role.OFFICER, Role.INVESTIGATOR, Role.SUPERVISOR})
_ADMINISTRATORS = frozenset({Role.ADMIN, Role.OPERATOR})
_OFFICIALS = frozenset(ACCOUNT_ROLES)
_WATCHERS = frozenset({Role.SUPERVISOR, Role.AUDITOR})

# Who may perform each action. An action missing here is refused to everyone.
PERMISSIONS: Mapping[Action, frozenset[Role]] = {
    Action.SEARCH: _READERS,
    Action.READ: _READERS,
    Action.REVEAL: _READERS,
    Action.LOG_READ: frozenset({Role.AUDITOR}),
    Action.SUBJECT_REPORT: frozenset({Role.AUDITOR}),
    Action.SUBJECT_LOOKUP: frozenset({Role.AUDITOR}),
    Action.LOG_VERIFY: frozenset({Role.AUDITOR, Role.OPERATOR}),
    # Opens every record in memory but hands out counts only, like verifying the log.
    Action.RECORDS_VERIFY: frozenset({Role.AUDITOR, Role.OPERATOR}),
    Action.LOG_CHECKPOINT: frozenset({Role.OPERATOR}),
    Action.WITNESS_PUBLISH: frozenset({Role.OPERATOR}),
    Action.LOG_LOSS_ACKNOWLEDGE: frozenset({Role.OPERATOR}),
    Action.UNSEAL: frozenset({Role.OPERATOR}),
    Action.KEYS_ROTATE: frozenset({Role.OPERATOR}),
    Action.BACKUP_CREATE: frozenset({Role.OPERATOR}),
    Action.BACKUP_RESTORE: frozenset({Role.OPERATOR}),
    Action.INGEST: frozenset({Role.OPERATOR}),
    # Counts and explanations, no entry and no value: like verifying the log.
    Action.GUARD_SCORE: frozenset({Role.AUDITOR, Role.OPERATOR}),
    Action.GUARD_FLAG: frozenset({Role.OPERATOR}),
    Action.INGEST_BATCH: frozenset({Role.OPERATOR}),
    Action.ACCOUNT_ADD: _ADMINISTRATORS,
    Action.ACCOUNT_LIST: _ADMINISTRATORS,
    Action.ACCOUNT_DISABLE: _ADMINISTRATORS,
    Action.ACCOUNT_ENABLE: _ADMINISTRATORS,
    Action.ACCOUNT_UNLOCK: _ADMINISTRATORS,
    Action.ACCOUNT_BUDGET: _ADMINISTRATORS,
    Action.ROLE_BUDGET: _ADMINISTRATORS,
    Action.PASSWORD_CHANGE: _ADMINISTRATORS,
    Action.MFA_ENROL_ISSUE: _ADMINISTRATORS,
    Action.API_TOKEN_ISSUE: _ADMINISTRATORS,
    Action.ACCOUNT_DISTRICT: _ADMINISTRATORS,
    Action.CASE_ASSIGN: _ADMINISTRATORS,
    Action.CASE_UNASSIGN: _ADMINISTRATORS,
    # Self-service: an official on their own account, from a session of their own.
    Action.PASSKEY_REGISTER: _OFFICIALS,
    # Two people: one asks, a supervisor who is not the asker approves, and only the
    # asker produces (checked against the stored request by the vault).
    Action.EXPORT_REQUEST: frozenset({Role.INVESTIGATOR, Role.SUPERVISOR}),
    Action.EXPORT_APPROVE: frozenset({Role.SUPERVISOR}),
    Action.EXPORT_CREATE: frozenset({Role.INVESTIGATOR, Role.SUPERVISOR}),
    # Opens records and the log's sealed details in memory; reports ids and names only.
    Action.LEAK_TRACE: frozenset({Role.OPERATOR}),
    # The watchers: a supervisor answers for the officials of a unit, an auditor for all.
    Action.ALERT_LIST: _WATCHERS,
    Action.ALERT_ACKNOWLEDGE: _WATCHERS,
    Action.ALERT_RESOLVE: _WATCHERS,
    # Planted on the host, with the keyring: no official learns which records are canaries.
    Action.CANARY_PLANT: frozenset({Role.OPERATOR}),
    # Two people, neither of whom reads the record: a supervisor or an auditor asks, a
    # supervisor or an administrator who is not the asker approves (checked against the
    # stored request by the vault), and the approval erases. The host operator erases
    # only what the ledger or a retention rule already decided.
    Action.ERASE_REQUEST: _WATCHERS,
    Action.ERASE_APPROVE: frozenset({Role.SUPERVISOR, Role.ADMIN}),
    Action.ERASE: frozenset({Role.SUPERVISOR, Role.ADMIN, Role.OPERATOR}),
    Action.RETENTION_RUN: frozenset({Role.OPERATOR}),
}

# Reads of personal records must name the case they serve as well as a reason: the case
# reference is what an assignment is checked against and what an auditor follows up.
CASE_REQUIRED: frozenset[Action] = frozenset(
    {
        Action.SEARCH,
        Action.READ,
        Action.REVEAL,
        Action.EXPORT_REQUEST,
        Action.EXPORT_APPROVE,
        Action.EXPORT_CREATE,
    }
)
# Actions that must state why: every read of records or of the access log.
PURPOSE_REQUIRED: frozenset[Action] = CASE_REQUIRED | {
    Action.LOG_READ,
    Action.SUBJECT_REPORT,
    Action.SUBJECT_LOOKUP,
    Action.ERASE_REQUEST,
}

# What an integration's API token may do: a scope names the actions it allows.
API_SCOPES: Mapping[str, frozenset[Action]] = {
    "search": frozenset({Action.SEARCH}),
    "read": frozenset({Action.SEARCH, Action.READ}),
    "reveal": frozenset({Action.SEARCH, Action.READ, Action.REVEAL}),
    "audit": frozenset({Action.LOG_READ, Action.SUBJECT_REPORT, Action.SUBJECT_LOOKUP}),
}

_REFUSALS: Mapping[Action, str] = {
    Action.SEARCH: "the {role} role cannot read personal records",
    Action.READ: "the {role} role cannot read personal records",
    Action.REVEAL: "the {role} role cannot read personal records",
    Action.LOG_READ: "only an auditor reads the access log",
    Action.SUBJECT_REPORT: "only an auditor reads the access log",
    Action.SUBJECT_LOOKUP: "only an auditor looks a subject up for their report",
    Action.LOG_VERIFY: "only an auditor or the host operator verifies the access log",
    Action.RECORDS_VERIFY: "only an auditor or the host operator verifies the search index",
    Action.LOG_CHECKPOINT: "only the host operator signs checkpoints",
    Action.WITNESS_PUBLISH: "only the host operator sends checkpoints to witnesses",
    Action.LOG_LOSS_ACKNOWLEDGE: "only the host operator acknowledges a loss of the log",
    Action.UNSEAL: "only the officers' shares unseal the vault",
    Action.KEYS_ROTATE: "only the host operator rotates the vault's keys",
    Action.BACKUP_CREATE: "only the host operator backs the vault up",
    Action.BACKUP_RESTORE: "only the host operator restores the vault",
    Action.INGEST: "only the host operator ingests records",
    Action.INGEST_BATCH: "only the host operator stores records",
    Action.PASSKEY_REGISTER: "the host operator has no passkeys",
    Action.EXPORT_REQUEST: "only an investigator or a supervisor asks for a bulk export",
    Action.EXPORT_APPROVE: "only a supervisor approves a bulk export",
    Action.EXPORT_CREATE: "only an investigator or a supervisor produces a bulk export",
    Action.LEAK_TRACE: "only the host operator traces a leak",
    Action.ALERT_LIST: "only a supervisor or an auditor handles alerts",
    Action.ALERT_ACKNOWLEDGE: "only a supervisor or an auditor handles alerts",
    Action.ALERT_RESOLVE: "only a supervisor or an auditor handles alerts",
    Action.CANARY_PLANT: "only the host operator plants canary records",
    Action.GUARD_SCORE: "only an auditor or the host operator reads the guard's scores",
    Action.GUARD_FLAG: "only the host operator flags records for the guard",
    Action.GUARD_ACT: "only the vault's own guard acts on an account",
    Action.ERASE_REQUEST: "only a supervisor or an auditor asks for a record's erasure",
    Action.ERASE_APPROVE: "only a supervisor or an administrator approves an erasure",
    Action.ERASE: "only an approved erasure or a retention rule erases records",
    Action.RETENTION_RUN: "only the host operator runs the retention rules",
}
_ADMIN_REFUSAL = "only an administrator manages accounts"

_BREAKS = re.compile("[\r\n\t\x00]")  # a reason is logged as one line
_CASE_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9/_.-]{0,63}")


def clearance_of(role: Role) -> Sensitivity | None:
    """The highest sensitivity a role may reveal, or None for roles that read no records."""
    return _CLEARANCE[role]


def reads_records(role: Role) -> bool:
    """Whether a role may read personal records at all (and so be assigned cases)."""
    return role in PERMISSIONS[Action.READ]


def case_required(action: Action) -> bool:
    """Whether an action must name the case it serves (forms ask for one up front)."""
    return action in CASE_REQUIRED


@dataclass(frozen=True, slots=True)
class AccessPurpose:
    """Why an official is looking: a stated reason and, optionally, the case it serves.

    The reason goes on the access log verbatim and is read back by auditors, so it must be
    short, single-line text that shows as what it holds: normalised (NFKC), and refused if
    it holds a control, formatting (zero-width, bidi), private-use or unassigned character.
    """

    reason: str
    case_ref: str | None = None

    def __post_init__(self) -> None:
        raw = self.reason if isinstance(self.reason, str) else ""
        if _BREAKS.search(raw):
            raise PurposeRequired("a purpose must be one line of at most 200 characters")
        try:
            reason = one_line(raw)
        except HiddenCharacter as exc:
            raise PurposeRequired(f"a purpose {exc}") from None
        if len(reason) < 3:
            raise PurposeRequired("a purpose of at least 3 characters is required")
        if len(reason) > 200:
            raise PurposeRequired("a purpose must be one line of at most 200 characters")
        object.__setattr__(self, "reason", reason)
        if self.case_ref is not None:
            try:
                case_ref = one_line(self.case_ref) if isinstance(self.case_ref, str) else ""
            except HiddenCharacter:
                case_ref = ""
            if not _CASE_REF.fullmatch(case_ref):
                raise PurposeRequired(
                    "a case reference is 1-64 letters, digits or / _ . - characters"
                )
            object.__setattr__(self, "case_ref", case_ref)


def authorise(
    role: Role,
    action: Action,
    *,
    scope: str | None = None,
    purpose: AccessPurpose | None = None,
    field: FieldSpec | None = None,
) -> None:
    """Raise AccessDenied unless `role` may perform `action` now.

    `scope` is an integration token's scope (None for a login session), `purpose` what the
    official stated, `field` the field a reveal names once its record's type is known (a
    reveal is decided twice: by role before the record is read, by field after).
    PurposeRequired, a kind of AccessDenied, says what the statement lacks.
    """
    if role not in PERMISSIONS.get(action, frozenset()):
        raise AccessDenied(_REFUSALS.get(action, _ADMIN_REFUSAL).format(role=role.value))
    if scope is not None and action not in API_SCOPES.get(scope, frozenset()):
        raise AccessDenied(f"this API token's scope ({scope}) does not allow {action.value}")
    if action in PURPOSE_REQUIRED and not isinstance(purpose, AccessPurpose):
        raise PurposeRequired("a stated purpose is required to read personal data")
    if action in CASE_REQUIRED and (purpose is None or purpose.case_ref is None):
        raise PurposeRequired("a case reference is required: name the case this work serves")
    clearance = _CLEARANCE[role]
    if field is not None and action is Action.REVEAL and field.sensitivity > (clearance or 0):
        raise AccessDenied(
            f"the {role.value} role may not reveal {field.sensitivity.name.lower()} "
            f"fields such as {field.name!r}"
        )


def check_account_change(actor: str, target: str, action: Action) -> None:
    """Refuse the account changes no administrator may make, whatever their role."""
    if action is Action.ACCOUNT_DISABLE and actor == target:
        raise AccessDenied("you cannot disable your own account")
