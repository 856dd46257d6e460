"""Who may do what: roles, stated purposes, record-level rules, and the one authorisation
rule every access goes through.

Pure rules and the data they read, no I/O. The vault applies them, once, inside its single
access function, whichever adapter (CLI, dashboard, API) the request came through.
"""

from custodes.policy.decisions import (
    ACCOUNT_ROLES,
    API_SCOPES,
    CASE_REQUIRED,
    PERMISSIONS,
    PURPOSE_REQUIRED,
    AccessPurpose,
    Action,
    Role,
    authorise,
    case_required,
    check_account_change,
    clearance_of,
    reads_records,
)
from custodes.policy.records import (
    NATIONAL,
    PROTECTED_REPORTER,
    REPORTER,
    RecordFacts,
    assigned_cases,
    district_of_case_no,
    district_of_national_id,
    district_prefix,
    is_minor,
    may_see,
    sees_reporters,
)

__all__ = [
    "ACCOUNT_ROLES",
    "API_SCOPES",
    "CASE_REQUIRED",
    "NATIONAL",
    "PERMISSIONS",
    "PROTECTED_REPORTER",
    "PURPOSE_REQUIRED",
    "REPORTER",
    "AccessPurpose",
    "Action",
    "RecordFacts",
    "Role",
    "assigned_cases",
    "authorise",
    "case_required",
    "check_account_change",
    "clearance_of",
    "district_of_case_no",
    "district_of_national_id",
    "district_prefix",
    "is_minor",
    "may_see",
    "reads_records",
    "sees_reporters",
]
