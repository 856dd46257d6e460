"""The JSON API under /api/v1: the dashboard's rules for programs, in one JSON error shape.

This module parses, calls the vault and shapes the answer; every decision and every read
is the vault's. Lists have hard caps and opaque cursors.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request, Response, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.models import HTTPBearer as HTTPBearerModel
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security.base import SecurityBase
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from custodes.alert_book import RecordedAlert
from custodes.audit.entry import AccessEntry
from custodes.audit.report import SubjectReport, as_json
from custodes.errors import InvalidQuery, RecordNotFound
from custodes.vault import MAX_RESULTS, RecordView, Session
from custodes.web import deps, refusals

PREFIX = "/api/v1"
LOG_PAGE_MAX = 200
LOG_PAGE_DEFAULT = 50

router = APIRouter(prefix=PREFIX, tags=["api"])

_M = TypeVar("_M", bound=BaseModel)


# -- the one error shape ----------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, machine-readable, e.g. record_not_found.")
    message: str = Field(description="For people; names fields and limits, never a value.")


class ErrorBody(BaseModel):
    """Every error the API returns, whatever the status."""

    error: ErrorDetail


def error_response(
    status: int, code: str, message: str, *, retry_after: int | None = None
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=code, message=message))
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def api_error(exc: BaseException) -> JSONResponse:
    """The API's answer to an exception raised while serving an /api/v1 request: the row
    of the one refusal table that the dashboard's pages answer from too."""
    row = refusals.refusal_for(exc)
    message = refusals.message_for(exc, row)
    return error_response(row.status, row.code, message, retry_after=refusals.retry_after(exc))


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "The body is not valid JSON.",
        401: "No live session (missing, expired, revoked or logged out).",
        403: "The account's role or clearance does not allow this; the refusal is logged.",
        404: "No such record, or not one this account may know exists.",
        422: "The request is malformed, or lacks a purpose or case reference.",
        429: "Too many failed logins from this name or address; see Retry-After.",
        503: "The access log could not record the access, so nothing was returned.",
    }.items()
}


def _errors(*statuses: int, json_route: bool = True) -> dict[int | str, dict[str, Any]]:
    if json_route:
        return {s: _ERRORS[s] for s in statuses}
    # A route whose success is not JSON still fails in JSON; FastAPI would otherwise
    # document its errors in the success's media type.
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {
        s: {
            "description": _ERRORS[s]["description"],
            "content": {"application/json": {"schema": ref}},
        }
        for s in statuses
    }


# -- sessions -------------------------------------------------------------------------


class _SessionScheme(SecurityBase):
    """The bearer scheme as the OpenAPI document shows it, and the dependency that turns
    the request's token into its live session: one dependency, not a scheme and a
    session, since every API request solves it.

    The lookup reads the session's row from storage (and may touch it), so it runs on
    the app's vault pool: on the event loop, a database round trip would stall every
    request of the process behind it (it halved a PostgreSQL-backed server's lookups),
    and FastAPI's generic pool for sync dependencies costs more a call.
    """

    def __init__(self) -> None:
        self.model = HTTPBearerModel(description="POST /api/v1/session")
        self.scheme_name = "session"

    async def __call__(self, request: Request) -> Session:
        # From the Authorization header only: the API checks no CSRF token, so a cookie a
        # browser adds on its own must never open it.
        token = deps.bearer_token(request)
        if not token:
            raise deps.NotAuthenticated()
        return await deps.in_vault_thread(
            request, functools.partial(deps.live_session, request, token)
        )


_session = _SessionScheme()
Authenticated = Annotated[Session, Security(_session)]


async def _no_store(response: Response) -> None:
    response.headers["Cache-Control"] = "no-store"


NoStore = Depends(_no_store)


class SessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    totp: str | None = Field(
        default=None, pattern=r"^[0-9]{6,8}$", description="The current one-time code."
    )


class SessionCreated(BaseModel):
    token: str = Field(description="Send as 'Authorization: Bearer <token>'.")
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the scheme, not a secret
    username: str
    role: str


class Me(BaseModel):
    username: str
    role: str


@router.post(
    "/session",
    response_model=SessionCreated,
    status_code=201,
    dependencies=[NoStore],
    responses=_errors(400, 401, 422, 429),
    summary="Open a session with a password and a one-time code",
)
def open_session(body: SessionRequest, request: Request) -> SessionCreated:
    vault = deps.vault_of(request)
    session = vault.login(
        body.username, body.password, totp=body.totp, client=deps.client_address(request)
    )
    return SessionCreated(token=session.token, username=session.username, role=session.role.value)


@router.delete(
    "/session",
    status_code=204,
    dependencies=[NoStore],
    responses=_errors(401),
    summary="End this session; its token stops working at once",
)
def close_session(session: Authenticated, request: Request) -> Response:
    deps.vault_of(request).logout(session)
    return Response(status_code=204)


@router.get("/me", response_model=Me, dependencies=[NoStore], responses=_errors(401))
async def me(session: Authenticated) -> Me:
    return Me(username=session.username, role=session.role.value)


# -- records ------------------------------------------------------------------------


_REASON = {"min_length": 3, "max_length": 200, "description": "Why; logged verbatim."}
_CASE = {
    "min_length": 1,
    "max_length": 64,
    "pattern": r"^[A-Za-z0-9][A-Za-z0-9/_.-]{0,63}$",
    "description": "The case or inquiry this access serves.",
}
Reason = Annotated[str, Field(**_REASON)]
# Optional in the request: whether an action needs a case is the policy's decision,
# taken inside the vault, so that the API, the dashboard and the CLI cannot differ.
CaseRef = Annotated[str | None, Field(**_CASE)]
ReasonQuery = Annotated[str, Query(**_REASON)]
OptionalCaseQuery = Annotated[str | None, Query(**_CASE)]
RecordId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]


class Link(BaseModel):
    record_id: str
    type: str
    role: str = Field(description="suspect, victim, reporter, recipient, ...")
    label: str = Field(description="A masked name or a case number.")


class RecordOut(BaseModel):
    record_id: str
    type: str
    fields: dict[str, str] = Field(description="Every field masked per the schema.")
    links: list[Link] = Field(default_factory=list)


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    record_type: str = Field(min_length=1, max_length=64, examples=["person"])
    index: str = Field(min_length=1, max_length=64, examples=["national_id"])
    values: dict[str, Annotated[str, Field(max_length=256)]] = Field(
        max_length=8, description="The index's fields and the values to look for."
    )
    purpose: Reason
    case_ref: CaseRef = None
    limit: int = Field(default=20, ge=1, le=MAX_RESULTS)
    cursor: str | None = Field(default=None, max_length=64)


class SearchResults(BaseModel):
    results: list[RecordOut]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null at end.")


class RevealRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(min_length=1, max_length=64)
    purpose: Reason
    case_ref: CaseRef = None


class Revealed(BaseModel):
    record_id: str
    field: str
    value: str | None = Field(description="The field in the clear; null if the record lacks it.")


def _record_out(view: RecordView) -> RecordOut:
    return RecordOut(
        record_id=view.record_id,
        type=view.record_type,
        fields=view.fields,
        links=[
            Link(record_id=ln.record_id, type=ln.record_type, role=ln.role, label=ln.label)
            for ln in view.links
        ],
    )


def _json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI requestBody of a route that validates its body itself; the model's
    schema is added to the document's components by openapi_document."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"required": True, "content": {"application/json": {"schema": ref}}}


_SELF_VALIDATED: tuple[type[BaseModel], ...] = (SearchRequest,)


async def _validated_body(request: Request, model: type[_M]) -> _M:
    """The request's JSON body as `model`, or the API's one 422 (naming fields, never
    values: the same errors FastAPI would give for a declared body). Only a JSON body is
    read: a text/plain one is what a cross-site form can send without asking first."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise StarletteHTTPException(415)
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in errors]
        ) from None


@router.post(
    "/search",
    response_model=SearchResults,
    responses=_errors(400, 401, 403, 422, 503),
    summary="Find records by an index, masked; a purpose and a case are required",
    openapi_extra={"requestBody": _json_request_body(SearchRequest)},
)
async def search(session: Authenticated, request: Request) -> Response:
    # The busiest route: it leaves out only work that checks nothing. The body is
    # validated by pydantic straight from its bytes (FastAPI's generic body handling
    # parses, then validates again, at about 45 µs a request); the vault call runs on the
    # app's vault pool; the answer is encoded once, here, rather than checked again
    # against SearchResults, which still documents it.
    body = await _validated_body(request, SearchRequest)
    purpose = deps.purpose_from(body.purpose, body.case_ref)
    offset = _decode_cursor(body.cursor, "s") if body.cursor else 0
    if offset >= MAX_RESULTS:
        raise InvalidQuery(f"a search returns at most {MAX_RESULTS} results in all")
    # A later page is the same search again from the start, of which the vault returns
    # (and logs) only the page; the account's paging limits are the vault's to hold.
    size = min(body.limit, MAX_RESULTS - offset)
    page = await deps.in_vault_thread(
        request,
        functools.partial(
            deps.vault_of(request).search,
            session,
            purpose,
            record_type=body.record_type,
            index=body.index,
            values=body.values,
            limit=size,
            offset=offset,
        ),
    )
    wanted = offset + size
    more = len(page) == size and wanted < MAX_RESULTS
    results = {
        "results": [_record_json(v) for v in page],
        "next_cursor": _encode_cursor("s", wanted) if more else None,
    }
    return Response(orjson.dumps(results), media_type="application/json")


def _record_json(view: RecordView) -> dict[str, Any]:
    """RecordOut's JSON, without building the model."""
    return {
        "record_id": view.record_id,
        "type": view.record_type,
        "fields": view.fields,
        "links": [
            {"record_id": ln.record_id, "type": ln.record_type, "role": ln.role, "label": ln.label}
            for ln in view.links
        ],
    }


@router.get(
    "/records/{record_id}",
    response_model=RecordOut,
    dependencies=[NoStore],
    responses=_errors(401, 403, 404, 422, 503),
    summary="One record, masked, with the records it links to",
)
def record(
    record_id: RecordId,
    purpose: ReasonQuery,
    session: Authenticated,
    request: Request,
    case_ref: OptionalCaseQuery = None,
) -> RecordOut:
    stated = deps.purpose_from(purpose, case_ref)
    return _record_out(deps.vault_of(request).record(session, stated, record_id))


@router.post(
    "/records/{record_id}/reveal",
    response_model=Revealed,
    dependencies=[NoStore],
    responses=_errors(400, 401, 403, 404, 422, 503),
    summary="One field in the clear; the purpose and case go on the access log",
)
def reveal(
    record_id: RecordId, body: RevealRequest, session: Authenticated, request: Request
) -> Revealed:
    stated = deps.purpose_from(body.purpose, body.case_ref)
    value = deps.vault_of(request).reveal(session, stated, record_id, body.field)
    return Revealed(record_id=record_id, field=body.field, value=value)


# -- the access log, for auditors ----------------------------------------------------


class LogEntry(BaseModel):
    index: int
    time: str = Field(description="ISO 8601, UTC.")
    actor: str
    role: str
    action: str
    outcome: str
    purpose: str | None
    case_ref: str | None
    record_type: str | None
    records: list[str]
    result_count: int
    client: str | None
    detail: dict[str, Any]


class LogPage(BaseModel):
    entries: list[LogEntry]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null at end.")


class ReportCheckpoint(BaseModel):
    size: int
    root: str = Field(description="Base64.")
    note: str = Field(description="The signed checkpoint note, verbatim.")


class ReportedAccessOut(BaseModel):
    index: int
    time: str
    actor: str
    role: str
    action: str
    outcome: str
    purpose: str | None
    case: str | None
    records: list[str]
    searched_by: list[str] = Field(
        description="The fields a search looked up by; their values stay sealed in the log."
    )
    leaf: str = Field(description="The exact leaf bytes, base64.")
    proof: list[str] = Field(description="Inclusion proof against the checkpoint, base64.")


class ReportErasure(BaseModel):
    at: str = Field(description="When the record was erased.")
    for_: str = Field(
        alias="for",
        description='Why: "request <erasure request id>" or "retention <record type>".',
    )

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class SubjectReportOut(BaseModel):
    format: str
    origin: str
    subject: str
    linked: list[str]
    report_index: int
    erased: ReportErasure | None = Field(
        default=None, description="Set if the record was erased; its past accesses stay."
    )
    checkpoint: ReportCheckpoint
    accesses: list[ReportedAccessOut]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _timestamp(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _log_entry(index: int, entry: AccessEntry) -> LogEntry:
    return LogEntry(
        index=index,
        time=_iso(entry.time),
        actor=entry.actor,
        role=entry.role,
        action=entry.action,
        outcome=entry.outcome.value,
        purpose=entry.purpose,
        case_ref=entry.case_ref,
        record_type=entry.record_type,
        records=list(entry.records),
        result_count=entry.result_count,
        client=entry.client,
        detail=entry.detail,
    )


@router.get(
    "/audit/log",
    response_model=LogPage,
    dependencies=[NoStore],
    responses=_errors(401, 403, 422, 503),
    summary="Access-log entries, filtered and paginated; auditors only, and logged",
)
def audit_log(
    session: Authenticated,
    request: Request,
    purpose: ReasonQuery,
    case_ref: OptionalCaseQuery = None,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    action: Annotated[str | None, Query(max_length=64, examples=["record:field"])] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601; UTC if no zone.")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive.")] = None,
    purpose_contains: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=LOG_PAGE_MAX)] = LOG_PAGE_DEFAULT,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> LogPage:
    after = _decode_cursor(cursor, "l") if cursor else -1
    stated = deps.purpose_from(purpose, case_ref)
    entries = deps.vault_of(request).read_log(
        session,
        stated,
        actor=actor,
        action=action,
        since=_timestamp(since),
        until=_timestamp(until),
        purpose_contains=purpose_contains,
    )
    page: list[LogEntry] = []
    more = False
    for index, entry in entries:
        if index <= after:
            continue
        if len(page) == limit:
            more = True
            break
        page.append(_log_entry(index, entry))
    return LogPage(
        entries=page,
        next_cursor=_encode_cursor("l", page[-1].index) if more and page else None,
    )


# -- alerts, for the watchers -------------------------------------------------------

AlertId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class AlertStepOut(BaseModel):
    state: str
    by: str
    time: str
    entry: int = Field(description="The step's own entry on the access log.")


class AlertOut(BaseModel):
    id: str
    kind: str = Field(examples=["guard:budget", "guard:canary"])
    severity: str
    time: str
    account: str
    action: str
    signals: list[str]
    entry: int = Field(description="The access-log entry that raised the alert.")
    records: list[str] = Field(description="The records involved, by keyed id.")
    state: str = Field(description="open, acknowledged or resolved")
    steps: list[AlertStepOut]
    tampered: bool = Field(description="The stored row fails its seal: believe the log.")


class AlertList(BaseModel):
    alerts: list[AlertOut]


def _alert_out(found: RecordedAlert) -> AlertOut:
    alert = found.alert
    return AlertOut(
        id=alert.id,
        kind=alert.kind,
        severity=alert.severity,
        time=_iso(alert.time),
        account=alert.account,
        action=alert.action,
        signals=list(alert.signals),
        entry=alert.entry,
        records=list(alert.records),
        state=found.state.value,
        steps=[
            AlertStepOut(state=s.state.value, by=s.by, time=_iso(s.time), entry=s.entry)
            for s in found.steps
        ],
        tampered=found.tampered,
    )


@router.get(
    "/alerts",
    response_model=AlertList,
    dependencies=[NoStore],
    responses=_errors(401, 403, 422, 503),
    summary="The latest alerts, newest first; supervisors and auditors, and logged",
)
def list_alerts(
    session: Authenticated,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AlertList:
    found = deps.vault_of(request).alerts(session, limit=limit)
    return AlertList(alerts=[_alert_out(a) for a in found])


@router.post(
    "/alerts/{alert_id}/{step}",
    response_model=AlertOut,
    dependencies=[NoStore],
    responses=_errors(401, 403, 404, 422, 503),
    summary="Acknowledge or resolve an alert; supervisors and auditors, each step logged",
)
def step_alert(
    alert_id: AlertId,
    step: Literal["acknowledge", "resolve"],
    session: Authenticated,
    request: Request,
) -> AlertOut:
    vault = deps.vault_of(request)
    if step == "acknowledge":
        vault.acknowledge_alert(session, alert_id)
    else:
        vault.resolve_alert(session, alert_id)
    return _alert_out(vault.alert(session, alert_id))


def _subject_report(
    request: Request, session: Session, record_id: str, purpose: str, case: str | None
) -> SubjectReport:
    stated = deps.purpose_from(purpose, case)
    return deps.vault_of(request).subject_report(session, stated, record_id)


class SubjectLookupIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    national_id: str = Field(min_length=1, max_length=32, description="The resident ID number.")
    purpose: Reason  # stated by the auditor, never assumed
    case_ref: CaseRef = None


class SubjectFound(BaseModel):
    record_id: str = Field(description="The person's record id, for GET /audit/subject/{id}.")


@router.post(
    "/audit/subject/lookup",
    response_model=SubjectFound,
    dependencies=[NoStore],
    responses=_errors(400, 401, 403, 404, 422, 503),
    summary="The record id of a subject, from the ID number a citizen brings; auditors only",
)
def audit_subject_lookup(
    body: SubjectLookupIn, session: Authenticated, request: Request
) -> SubjectFound:
    # In the body, not the query string: an ID number must not reach a proxy's access log.
    stated = deps.purpose_from(body.purpose, body.case_ref)
    found = deps.vault_of(request).subject_lookup(session, stated, body.national_id)
    if found is None:
        raise RecordNotFound("no person with that ID number is stored")
    return SubjectFound(record_id=found)


@router.get(
    "/audit/subject/{record_id}",
    response_model=SubjectReportOut,
    dependencies=[NoStore],
    responses=_errors(401, 403, 404, 422, 503),
    summary="Every access to one person's records, with inclusion proofs; auditors only",
)
def audit_subject(
    record_id: RecordId,
    session: Authenticated,
    request: Request,
    purpose: ReasonQuery,
    case_ref: OptionalCaseQuery = None,
) -> SubjectReportOut:
    report = _subject_report(request, session, record_id, purpose, case_ref)
    return SubjectReportOut.model_validate(as_json(report))


@router.get(
    "/audit/subject/{record_id}/bundle",
    response_class=PlainTextResponse,
    dependencies=[NoStore],
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "The bundle; verifies offline with only the log's public key.",
        },
        **_errors(401, 403, 404, 422, 503, json_route=False),
    },
    summary="The subject report as an offline-verifiable bundle; auditors only",
)
def audit_subject_bundle(
    record_id: RecordId,
    session: Authenticated,
    request: Request,
    purpose: ReasonQuery,
    case_ref: OptionalCaseQuery = None,
) -> PlainTextResponse:
    report = _subject_report(request, session, record_id, purpose, case_ref)
    return PlainTextResponse(report.bundle().decode("utf-8"), headers={"Cache-Control": "no-store"})


# -- bulk exports: asked for, approved by a second official, produced once ------------

ExportId = Annotated[str, Path(min_length=32, max_length=32, pattern=r"^[0-9a-f]{32}$")]


class ExportRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    record_type: str = Field(min_length=1, max_length=64, examples=["person"])
    purpose_class: str = Field(
        min_length=1,
        max_length=64,
        description="An export class of the schema.",
        examples=["statistics"],
    )
    recipient: str = Field(
        min_length=1,
        max_length=1024,
        description="The recipient's X25519 public key: base64 of its 32 bytes, or PEM.",
    )
    district: str | None = Field(default=None, pattern=r"^[0-9]{2}([0-9]{2}){0,2}$")
    record_ids: list[Annotated[str, Field(max_length=128)]] | None = Field(
        default=None, max_length=100_000
    )
    purpose: Reason
    case_ref: CaseRef = None


class ExportStatusOut(BaseModel):
    export_id: str
    state: str = Field(description="requested, approved or produced")
    requester: str
    approver: str | None
    record_type: str
    purpose_class: str
    recipient: str = Field(description="The recipient key's fingerprint.")
    purpose: str = Field(description="Why the asker wants it, as stated.")
    case_ref: str | None
    district: str | None = Field(description="The division code the scope is limited to.")
    named_records: int | None = Field(description="How many record ids the scope names.")
    requested_at: str


def _export_out(status: Any) -> ExportStatusOut:
    return ExportStatusOut(
        export_id=status.export_id,
        state=status.state,
        requester=status.requester,
        approver=status.approver,
        record_type=status.record_type,
        purpose_class=status.purpose_class,
        recipient=status.recipient,
        purpose=status.reason,
        case_ref=status.case_ref,
        district=status.district,
        named_records=status.named_records,
        requested_at=_iso(status.requested_at),
    )


@router.post(
    "/exports",
    response_model=ExportStatusOut,
    status_code=201,
    dependencies=[NoStore],
    responses=_errors(400, 401, 403, 422, 503),
    summary="Ask for a bulk export; a second official (a supervisor) must approve it",
)
def export_request(
    body: ExportRequestIn, session: Authenticated, request: Request
) -> ExportStatusOut:
    stated = deps.purpose_from(body.purpose, body.case_ref)
    vault = deps.vault_of(request)
    export_id = vault.exports.request(
        session,
        stated,
        record_type=body.record_type,
        purpose_class=body.purpose_class,
        recipient=body.recipient,
        district=body.district,
        record_ids=body.record_ids,
    )
    return _export_out(vault.exports.status(session, export_id))


@router.get(
    "/exports/{export_id}",
    response_model=ExportStatusOut,
    dependencies=[NoStore],
    responses=_errors(401, 404, 422),
    summary="Where an export request stands",
)
def export_status(export_id: ExportId, session: Authenticated, request: Request) -> ExportStatusOut:
    return _export_out(deps.vault_of(request).exports.status(session, export_id))


@router.post(
    "/exports/{export_id}/approve",
    response_model=ExportStatusOut,
    dependencies=[NoStore],
    responses=_errors(401, 403, 404, 422, 503),
    summary="Approve another official's export request; supervisors only",
)
def export_approve(
    export_id: ExportId, session: Authenticated, request: Request
) -> ExportStatusOut:
    return _export_out(deps.vault_of(request).exports.approve(session, export_id))


@router.post(
    "/exports/{export_id}/produce",
    response_class=Response,
    dependencies=[NoStore],
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            "description": "The export, sealed to its recipient's key; produced once.",
        },
        **_errors(401, 403, 404, 422, 503, json_route=False),
    },
    summary="Produce an approved export, once, by its asker: sealed to the recipient",
)
def export_produce(export_id: ExportId, session: Authenticated, request: Request) -> Response:
    made = deps.vault_of(request).exports.produce(session, export_id)
    return Response(
        made.sealed,
        media_type="application/octet-stream",
        headers={
            "Cache-Control": "no-store",
            "Content-Disposition": f'attachment; filename="{made.export_id}.export"',
            "X-Export-Rows": str(made.rows),
        },
    )


# -- erasure: asked for by one official, approved (and carried out) by a second -------

ErasureId = Annotated[str, Path(min_length=32, max_length=32, pattern=r"^[0-9a-f]{32}$")]


class ErasureRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    record_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    purpose: Reason
    case_ref: CaseRef = None


class ErasureStatusOut(BaseModel):
    request_id: str
    state: str = Field(description="requested or erased")
    requester: str
    approver: str | None
    record_id: str
    purpose: str = Field(description="Why the asker wants it, as stated.")
    case_ref: str | None
    requested_at: str
    erased_at: str | None


def _erasure_out(status: Any) -> ErasureStatusOut:
    return ErasureStatusOut(
        request_id=status.request_id,
        state=status.state,
        requester=status.requester,
        approver=status.approver,
        record_id=status.record_id,
        purpose=status.reason,
        case_ref=status.case_ref,
        requested_at=_iso(status.requested_at),
        erased_at=None if status.erased_at is None else _iso(status.erased_at),
    )


@router.post(
    "/erasures",
    response_model=ErasureStatusOut,
    status_code=201,
    dependencies=[NoStore],
    responses=_errors(400, 401, 403, 404, 422, 503),
    summary="Ask for a record's erasure; a second official must approve it",
)
def erasure_request(
    body: ErasureRequestIn, session: Authenticated, request: Request
) -> ErasureStatusOut:
    stated = deps.purpose_from(body.purpose, body.case_ref)
    vault = deps.vault_of(request)
    request_id = vault.erasures.request(session, stated, body.record_id)
    return _erasure_out(vault.erasures.status(session, request_id))


@router.get(
    "/erasures/{request_id}",
    response_model=ErasureStatusOut,
    dependencies=[NoStore],
    responses=_errors(401, 404, 422),
    summary="Where an erasure request stands",
)
def erasure_status(
    request_id: ErasureId, session: Authenticated, request: Request
) -> ErasureStatusOut:
    return _erasure_out(deps.vault_of(request).erasures.status(session, request_id))


@router.post(
    "/erasures/{request_id}/approve",
    response_model=ErasureStatusOut,
    dependencies=[NoStore],
    responses=_errors(401, 403, 404, 422, 503),
    summary="Approve another official's erasure request, which erases the record",
)
def erasure_approve(
    request_id: ErasureId, session: Authenticated, request: Request
) -> ErasureStatusOut:
    return _erasure_out(deps.vault_of(request).erasures.approve(session, request_id))


# -- the OpenAPI document, for callers with a session ---------------------------------


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of the /api/v1 routes only, built once per app."""
    cached: dict[str, Any] | None = getattr(app.state, "api_openapi", None)
    if cached is None:
        cached = get_openapi(
            title="custodes API",
            version="1",
            description="Every read needs a session, a purpose and a case reference, and "
            "is on the access log before it is answered. Every error has the shape "
            '{"error": {"code": ..., "message": ...}}.',
            routes=router.routes,
        )
        schemas = cached.setdefault("components", {}).setdefault("schemas", {})
        for model in _SELF_VALIDATED:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.state.api_openapi = cached
    return cached


@router.get(
    "/openapi.json",
    include_in_schema=False,
    dependencies=[Security(_session)],
)
def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse(jsonable_encoder(openapi_document(request.app)))


# -- cursors ----------------------------------------------------------------------


def _encode_cursor(kind: str, position: int) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, kind: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidQuery("the cursor is not one this API issued") from None
    found = re.fullmatch(rf"{kind}:(0|[1-9][0-9]{{0,11}})", raw)
    if found is None:
        raise InvalidQuery("the cursor is not one this API issued")
    return int(found.group(1))
