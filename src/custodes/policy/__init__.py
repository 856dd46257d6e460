"""Who may do what: roles, stated purposes, and the decisions the access function asks for.

Pure rules, no I/O. Every read of personal data is decided here and recorded by the
vault's single access function, whether it is granted or denied.
"""

from custodes.policy.decisions import (
    AccessPurpose,
    Action,
    Role,
    authorise,
    clearance_of,
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
    "NATIONAL",
    "PROTECTED_REPORTER",
    "REPORTER",
    "AccessPurpose",
    "Action",
    "RecordFacts",
    "Role",
    "assigned_cases",
    "authorise",
    "clearance_of",
    "district_of_case_no",
    "district_of_national_id",
    "district_prefix",
    "is_minor",
    "may_see",
    "sees_reporters",
]
