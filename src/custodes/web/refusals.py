"""The one table of refusals: for each error, the HTTP status, the API's stable code and the
words a person reads. The dashboard's pages and the JSON API both answer from it, so they
cannot drift apart; it imports neither of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from custodes.errors import (
    AccessDenied,
    AuditUnavailable,
    AuthenticationFailed,
    BudgetExceeded,
    CustodesError,
    InvalidQuery,
    LoginThrottled,
    PurposeRequired,
    RecordNotFound,
    SessionLimit,
    TamperDetected,
)
from custodes.web import deps


@dataclass(frozen=True, slots=True)
class Refusal:
    """How every surface answers one kind of error."""

    status: int
    code: str
    title: str
    # Said when the error has no words of its own, and on pages always when fixed_on_pages.
    message: str
    fixed_on_pages: bool = False
    # A page sends the browser to the login form instead of showing an error.
    to_login: bool = False


NOT_FOUND = "Nothing here, or nothing this account may see."

# Looked up along the error's MRO, so the most specific class wins: PurposeRequired is an
# AccessDenied but a 422, LoginThrottled an AuthenticationFailed but a 429 with a wait.
REFUSALS: dict[type[BaseException], Refusal] = {
    deps.NotAuthenticated: Refusal(
        401,
        "not_authenticated",
        "Log in",
        "authentication required: open a session with POST /api/v1/session",
        to_login=True,
    ),
    deps.CsrfRejected: Refusal(
        403,
        "csrf_rejected",
        "Refused",
        "The form was stale or came from elsewhere: reload and retry.",
    ),
    LoginThrottled: Refusal(
        429, "login_throttled", "Too many attempts", "Too many failed attempts: wait and retry."
    ),
    AuthenticationFailed: Refusal(
        401, "authentication_failed", "Log in", "Authentication failed.", to_login=True
    ),
    PurposeRequired: Refusal(
        422, "purpose_required", "Check the form", "State a purpose and the case it serves."
    ),
    # Also InvalidAssignment, a subclass: a malformed or unchanged case assignment.
    InvalidQuery: Refusal(422, "invalid_query", "Check the form", "The request is malformed."),
    SessionLimit: Refusal(
        403,
        "session_limit",
        "Too many sessions",
        "This account has as many sessions open as it may: log out of one first.",
    ),
    # The account is locked, not asked to wait: no Retry-After would be true.
    BudgetExceeded: Refusal(
        403,
        "budget_exceeded",
        "Budget spent",
        "This account has been shown as many records as its budget allows; it is locked "
        "until an administrator unlocks it.",
    ),
    AccessDenied: Refusal(403, "access_denied", "Refused", "This account may not do this."),
    # A record outside the official's district is answered exactly like a missing one;
    # pages say so in the same words whichever it was.
    RecordNotFound: Refusal(404, "record_not_found", "Not found", NOT_FOUND, fixed_on_pages=True),
    AuditUnavailable: Refusal(
        503,
        "audit_unavailable",
        "Unavailable",
        "The access log cannot record this access, so it was refused.",
        fixed_on_pages=True,
    ),
    # A stored row that failed its seal (a tampered request, setting or record): the
    # access is refused and on the log; which check failed is not said.
    TamperDetected: Refusal(
        503,
        "integrity_failed",
        "Unavailable",
        "Stored data failed its integrity check, so nothing was done; the refusal is logged.",
        fixed_on_pages=True,
    ),
    RequestValidationError: Refusal(
        422,
        "invalid_request",
        "Check the form",
        "Some fields of the form are missing or malformed.",
        fixed_on_pages=True,
    ),
}

# Anything the table does not know is the server's fault, and says nothing about it.
INTERNAL_ERROR = Refusal(
    500, "internal_error", "Server error", "The server failed; nothing was returned."
)

# Routing and body-parsing failures (Starlette's HTTPException), by status. Its detail is
# never repeated: for a body that would not parse, it can quote the body.
HTTP_MESSAGES = {
    400: "The request body could not be parsed.",
    401: "Authentication required.",
    404: NOT_FOUND,
    405: "This resource does not accept that method.",
}

_TITLES = {
    400: "Refused",
    401: "Log in",
    404: "Not found",
    422: "Check the form",
    429: "Too many attempts",
    500: "Server error",
    503: "Unavailable",
}


def refusal_for(exc: BaseException) -> Refusal:
    """The row that answers `exc`: its most specific class in the table."""
    for cls in type(exc).__mro__:
        row = REFUSALS.get(cls)
        if row is not None:
            return row
        if cls is StarletteHTTPException and isinstance(exc, StarletteHTTPException):
            return _http_refusal(exc.status_code)
        if cls is CustodesError:
            return _unlisted_refusal(exc)
    return INTERNAL_ERROR


def message_for(exc: BaseException, row: Refusal, *, page: bool = False) -> str:
    """What the answer says: the error's own words (value-free by design) or the row's."""
    if not (page and row.fixed_on_pages):
        own = _own_words(exc)
        if own:
            return own
    return row.message


def retry_after(exc: BaseException) -> int | None:
    """Seconds to wait before trying again, for a Retry-After header."""
    return exc.retry_after if isinstance(exc, LoginThrottled) else None


def describe_validation(exc: RequestValidationError) -> str:
    """Where and what, never the input: pydantic's own report repeats it, and a password
    or an ID number must not echo."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(_location(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is malformed"


def _location(part: object) -> str:
    # A location can hold a key of the caller's own JSON (an unknown or over-long entry of
    # a mapping): a name is shown, anything else could be a value typed in the wrong place.
    text = str(part)
    if isinstance(part, int) or re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", text):
        return text
    return "?"


def _own_words(exc: BaseException) -> str:
    if isinstance(exc, CustodesError):
        return str(exc)
    if isinstance(exc, RequestValidationError):
        return describe_validation(exc)
    return ""


def _http_refusal(status: int) -> Refusal:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    code = re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")
    message = HTTP_MESSAGES.get(status, "This request was refused.")
    return Refusal(status, code, _TITLES.get(status, "Refused"), message)


def _unlisted_refusal(exc: BaseException) -> Refusal:
    # A refusal the table does not know yet (a new error type): the request's fault, named
    # after its class so that the code stays stable.
    status = int(getattr(exc, "http_status", 400))
    code = re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()
    return Refusal(status, code, _TITLES.get(status, "Refused"), "This request was refused.")
