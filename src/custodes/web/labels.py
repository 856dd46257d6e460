"""What the dashboard calls each logged action, for a person reading the log: the log
itself keeps its stable tags (`record:field:reveal`), shown beside the words."""

from __future__ import annotations

from collections.abc import Mapping

from custodes.policy import Action

ACTION_LABELS: Mapping[Action, str] = {
    Action.SEARCH: "Search",
    Action.READ: "Open record",
    Action.REVEAL: "Reveal field",
    Action.INGEST: "Ingest file",
    Action.INGEST_BATCH: "Store records",
    Action.LOGIN: "Log in",
    Action.LOGOUT: "Log out",
    Action.LOG_READ: "Read access log",
    Action.LOG_VERIFY: "Verify access log",
    Action.RECORDS_VERIFY: "Verify search index",
    Action.LOG_CHECKPOINT: "Sign checkpoint",
    Action.WITNESS_PUBLISH: "Send to witness",
    Action.LOG_LOSS_ACKNOWLEDGE: "Acknowledge log loss",
    Action.SUBJECT_REPORT: "Subject report",
    Action.SUBJECT_LOOKUP: "Find subject by ID number",
    Action.ACCOUNT_ADD: "Add account",
    Action.ACCOUNT_LIST: "List accounts",
    Action.ACCOUNT_DISABLE: "Disable account",
    Action.ACCOUNT_ENABLE: "Enable account",
    Action.ACCOUNT_UNLOCK: "Unlock account",
    Action.ACCOUNT_BUDGET: "Set account budget",
    Action.ROLE_BUDGET: "Set role budget",
    Action.PASSWORD_CHANGE: "Change password",
    Action.MFA_ENROL_ISSUE: "Issue enrolment code",
    Action.MFA_ENROL: "Enrol second factor",
    Action.API_TOKEN_ISSUE: "Issue API token",
    Action.ACCOUNT_DISTRICT: "Set account district",
    Action.CASE_ASSIGN: "Assign case",
    Action.CASE_UNASSIGN: "Unassign case",
    Action.PASSKEY_REGISTER: "Register passkey",
    Action.ROW_TAMPERED: "Tampered row found",
    Action.BACKUP_CREATE: "Back up",
    Action.BACKUP_RESTORE: "Restore",
    Action.UNSEAL: "Unseal keys",
    Action.KEYS_ROTATE: "Rotate keys",
    Action.EXPORT_REQUEST: "Ask for export",
    Action.EXPORT_APPROVE: "Approve export",
    Action.EXPORT_CREATE: "Produce export",
    Action.LEAK_TRACE: "Trace leak",
    Action.ALERT_LIST: "List alerts",
    Action.ALERT_ACKNOWLEDGE: "Acknowledge alert",
    Action.ALERT_RESOLVE: "Resolve alert",
    Action.CANARY_PLANT: "Plant canaries",
    Action.GUARD_ACT: "Guard acts on account",
    Action.GUARD_SCORE: "Score accounts",
    Action.GUARD_FLAG: "Flag record",
    Action.ERASE_REQUEST: "Ask for erasure",
    Action.ERASE_APPROVE: "Approve erasure",
    Action.ERASE: "Erase records",
    Action.RETENTION_RUN: "Run retention",
}


def action_label(tag: str) -> str:
    """The words for a logged action tag; an unknown tag (from a later version, or
    written around the checks) is shown as itself."""
    try:
        return ACTION_LABELS.get(Action(tag), tag)
    except ValueError:
        return tag
