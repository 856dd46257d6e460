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

__all__ = ["AccessPurpose", "Action", "Role", "authorise", "clearance_of"]
