"""The dashboard's pages: search, person and case pages, reveals, the auditor's views and the
administrator's account list. Pages only present what the vault decides; every read of
personal data or of the access log goes through a vault method that logs it first.
"""

from __future__ import annotations

import itertools
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from custodes.alert_book import AlertState, RecordedAlert
from custodes.audit import AccessEntry, Outcome
from custodes.audit.report import BundleInvalid, verify_bundle
from custodes.audit.verify import LogTampered
from custodes.errors import (
    AccessDenied,
    ErasureLedgerBroken,
    InvalidAssignment,
    InvalidQuery,
    PurposeRequired,
)
from custodes.freetext import escape_hidden
from custodes.policy import (
    ACCOUNT_ROLES,
    AccessPurpose,
    Action,
    Role,
    assigned_cases,
    case_required,
    clearance_of,
    reads_records,
)
from custodes.schema import REFERENCE_KINDS, FieldSpec, RecordType, Sensitivity
from custodes.vault import LinkView, LogExtract, RecordView, Session, Vault
from custodes.vault.exports import ExportStatus
from custodes.web import deps
from custodes.web.labels import action_label
from custodes.web.templating import render

router = APIRouter(include_in_schema=False)

Me = Annotated[Session, Depends(deps.require_session)]
Csrf = Depends(deps.verify_csrf)
OptionalText = Annotated[str | None, Query()]
FormText = Annotated[str | None, Form()]

LOG_PAGE_SIZE = 50
LOG_MAX_PAGE_SIZE = 200
# Pages deeper than this are refused: narrow the filters instead of paging through millions.
LOG_MAX_PAGE = 200
ALERTS_SHOWN = 200
# Times on the pages are in the zone the officials work in, UTC beside them: the log
# itself keeps seconds since the epoch.
LOCAL_ZONE_NAME = "Asia/Shanghai"
LOCAL_ZONE = ZoneInfo(LOCAL_ZONE_NAME)
ALERTS_PURPOSE = AccessPurpose("review of refused and failed accesses")

# What each role is for, in the words shown on the home page.
ROLE_DUTIES: dict[Role, str] = {
    Role.OFFICER: (
        "search for people and cases and open their records; reveal identifying fields "
        "(name, ID number, phone, address) when a task needs them"
    ),
    Role.INVESTIGATOR: (
        "search and open records and reveal fields up to sensitive ones, such as ethnicity"
    ),
    Role.SUPERVISOR: "search and open records and reveal every field, case narratives included",
    Role.AUDITOR: (
        "read the access log, check its signed checkpoints and answer subject access "
        "requests; auditors never open personal records"
    ),
    Role.ADMIN: "manage officials' accounts; administrators never see personal records",
}

FIELD_LABELS = {
    "national_id": "National ID",
    "birth_date": "Date of birth",
    "birth_place": "Place of birth",
    "marital_status": "Marital status",
    "case_no": "Case number",
    "opened_on": "Opened on",
    "waybill_no": "Waybill number",
    "recipient_name": "Recipient's name",
    "delivered_on": "Delivered on",
}

TYPE_LABELS = {"person": "Person", "case": "Case", "delivery": "Delivery"}


@dataclass(frozen=True, slots=True)
class SearchKind:
    """One way to look someone or something up: a record type, an index and its inputs."""

    key: str
    label: str
    record_type: str
    index: str
    fields: tuple[str, ...]


SEARCH_KINDS = (
    SearchKind("national_id", "National ID number", "person", "national_id", ("national_id",)),
    SearchKind("phone", "Phone number", "person", "phone", ("phone",)),
    SearchKind(
        "name_birth", "Name and date of birth", "person", "name_birth", ("name", "birth_date")
    ),
    SearchKind("case_no", "Case number", "case", "case_no", ("case_no",)),
)
_KINDS = {k.key: k for k in SEARCH_KINDS}


@dataclass(frozen=True, slots=True)
class FieldRow:
    name: str
    label: str
    value: str
    sensitivity: str
    revealable: bool
    above_clearance: bool


def label_of(field_name: str) -> str:
    return FIELD_LABELS.get(field_name, field_name.replace("_", " ").capitalize())


def purpose_query(purpose: AccessPurpose) -> str:
    """The purpose carried from page to page, as a query string."""
    return urlencode({"reason": purpose.reason, "case_ref": purpose.case_ref or ""})


def stated_purpose(reason: str | None, case_ref: str | None) -> AccessPurpose:
    """A purpose from form fields. Whether the action also needs a case is the policy's
    to decide, inside the vault: the page only collects what was typed."""
    return deps.purpose_from((reason or "").strip() or None, (case_ref or "").strip() or None)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def field_rows(rt: RecordType, view: RecordView, role: Role) -> list[FieldRow]:
    clearance = clearance_of(role)
    rows = []
    for spec in rt.fields.values():
        if spec.kind in REFERENCE_KINDS:
            continue  # links are listed by themselves, as records to open
        masked = view.fields.get(spec.name)
        rows.append(
            FieldRow(
                name=spec.name,
                label=label_of(spec.name),
                value="not recorded" if masked is None else masked,
                sensitivity=spec.sensitivity.name.lower(),
                revealable=masked is not None and _may_reveal(spec, clearance),
                above_clearance=clearance is None or spec.sensitivity > clearance,
            )
        )
    return rows


def _may_reveal(spec: FieldSpec, clearance: Sensitivity | None) -> bool:
    # A field shown unmasked needs no reveal; one above the role's clearance gets none.
    return spec.mask != "none" and clearance is not None and spec.sensitivity <= clearance


def summary(view: RecordView, rt: RecordType, limit: int = 4) -> list[tuple[str, str]]:
    """A few masked fields that tell one result from another."""
    shown = [
        (label_of(name), value)
        for name, value in view.fields.items()
        if name in rt.fields and rt.fields[name].kind not in REFERENCE_KINDS
    ]
    return shown[:limit]


def group_links(links: Iterable[LinkView]) -> dict[str, list[LinkView]]:
    groups: dict[str, list[LinkView]] = {}
    for link in links:
        groups.setdefault(link.record_type, []).append(link)
    return groups


# -- home and search --------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def home(request: Request, me: Me) -> Response:
    return render(
        request,
        "home.html",
        duty=ROLE_DUTIES[me.role],
        reads_records=reads_records(me.role),
        kinds=SEARCH_KINDS,
        form={},
    )


@router.get("/search", response_class=HTMLResponse)
def search_form(
    request: Request, me: Me, reason: OptionalText = None, case_ref: OptionalText = None
) -> Response:
    form = {"reason": reason or "", "case_ref": case_ref or "", "by": "national_id"}
    return render(request, "search.html", kinds=SEARCH_KINDS, form=form, results=None)


@router.post("/search", response_class=HTMLResponse, dependencies=[Csrf])
async def search(request: Request, me: Me) -> Response:
    posted = await request.form()
    form = {k: v.strip() for k, v in posted.items() if isinstance(v, str) and k != "csrf_token"}
    kind = _KINDS.get(form.get("by", ""))
    template = "_results.html" if is_htmx(request) else "search.html"
    context: dict[str, Any] = {"kinds": SEARCH_KINDS, "form": form, "results": None}
    try:
        purpose = stated_purpose(form.get("reason"), form.get("case_ref"))
        if kind is None:
            raise InvalidQuery("choose what to search by")
        values = {f: form.get(f, "") for f in kind.fields}
        missing = [label_of(f) for f, v in values.items() if not v]
        if missing:
            raise InvalidQuery(f"fill in: {', '.join(missing)}")
        views = deps.vault_of(request).search(
            me, purpose, record_type=kind.record_type, index=kind.index, values=values
        )
    except (PurposeRequired, InvalidQuery) as exc:
        # Said beside the form, with what was typed kept, rather than on a bare error page.
        return render(request, template, status_code=422, error=str(exc), **context)
    rt = deps.vault_of(request).schema.types[kind.record_type]
    results = [
        {"view": v, "summary": summary(v, rt), "type_label": TYPE_LABELS.get(v.record_type, "")}
        for v in views
    ]
    return render(
        request,
        template,
        **{**context, "results": results},
        query=purpose_query(purpose),
        purpose=purpose,
    )


# -- records ----------------------------------------------------------------------------


@router.get("/records/{record_id}", response_class=HTMLResponse)
def record_page(
    request: Request,
    record_id: str,
    me: Me,
    reason: OptionalText = None,
    case_ref: OptionalText = None,
) -> Response:
    vault = deps.vault_of(request)
    try:
        purpose = stated_purpose(reason, case_ref)
        view = vault.record(me, purpose, record_id)
    except PurposeRequired as exc:
        return render(
            request,
            "purpose.html",
            status_code=422,
            error=str(exc) if reason or case_ref else None,
            action=f"/records/{record_id}",
            reason=reason or "",
            case_ref=case_ref or "",
            case_required=case_required(Action.READ),
            heading="Why are you opening this record?",
        )
    rt = vault.schema.types[view.record_type]
    return render(
        request,
        "record.html",
        view=view,
        type_label=TYPE_LABELS.get(view.record_type, view.record_type),
        description=rt.description,
        rows=field_rows(rt, view, me.role),
        links=group_links(view.links),
        purpose=purpose,
        query=purpose_query(purpose),
    )


@router.post(
    "/records/{record_id}/reveal/{field_name}", response_class=HTMLResponse, dependencies=[Csrf]
)
def reveal(
    request: Request,
    record_id: str,
    field_name: str,
    me: Me,
    reason: FormText = None,
    case_ref: FormText = None,
) -> Response:
    template = "_revealed.html" if is_htmx(request) else "revealed.html"
    context: dict[str, Any] = {
        "record_id": record_id,
        "field": field_name,
        "label": label_of(field_name),
    }
    try:
        purpose = stated_purpose(reason, case_ref)
        value = deps.vault_of(request).reveal(me, purpose, record_id, field_name)
    except PurposeRequired as exc:
        return render(request, template, status_code=422, error=str(exc), **context)
    except AccessDenied as exc:
        return render(request, template, status_code=403, error=str(exc), **context)
    except InvalidQuery as exc:
        return render(request, template, status_code=422, error=str(exc), **context)
    return render(
        request,
        template,
        value=value,
        purpose=purpose,
        query=purpose_query(purpose),
        **context,
    )


# -- auditors ---------------------------------------------------------------------------


@router.get("/audit/subject/{record_id}", response_class=HTMLResponse)
def subject_report(
    request: Request,
    record_id: str,
    me: Me,
    reason: OptionalText = None,
    case_ref: OptionalText = None,
) -> Response:
    vault = deps.vault_of(request)
    try:
        purpose = stated_purpose(reason, case_ref)
        report = vault.subject_report(me, purpose, record_id)
    except PurposeRequired as exc:
        return render(
            request,
            "purpose.html",
            status_code=422,
            error=str(exc) if reason else None,
            action=f"/audit/subject/{record_id}",
            reason=reason or "",
            case_ref=case_ref or "",
            case_required=case_required(Action.SUBJECT_REPORT),
            heading="Why do you need this subject access report?",
        )
    try:
        verify_bundle(report.bundle(), vault.log_verifier_key)
        bundle_ok: str | None = None
    except BundleInvalid as exc:
        bundle_ok = str(exc)
    # The values an official searched for are personal data: the report page leaves them out.
    rows = [
        {
            "index": a.index,
            "time": a.time.replace("T", " ").removesuffix("Z"),
            "actor": shown(a.actor),
            "role": shown(a.role) or "-",
            "action": shown(a.action),
            "field": shown(AccessEntry.decode(a.leaf).detail.get("field")),
            "purpose": shown(a.purpose) or "-",
            "case": shown(a.case_ref) or "-",
            "outcome": a.outcome.value,
            "this_report": a.index == report.report_index,
        }
        for a in report.accesses
    ]
    return render(
        request,
        "subject.html",
        report=report,
        rows=rows,
        bundle_error=bundle_ok,
        verifier_key=vault.log_verifier_key,
        query=purpose_query(purpose),
        purpose=purpose,
    )


@router.get("/audit/subject/{record_id}/bundle")
def subject_bundle(
    request: Request,
    record_id: str,
    me: Me,
    reason: OptionalText = None,
    case_ref: OptionalText = None,
) -> Response:
    purpose = stated_purpose(reason, case_ref)
    report = deps.vault_of(request).subject_report(me, purpose, record_id)
    name = f"subject-report-{record_id[:16]}.txt"
    return Response(
        report.bundle(),
        media_type="text/plain; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


def _day(text: str | None, *, end: bool = False) -> float | None:
    """A UTC calendar day from a date input; the end of a range includes its last day."""
    if not text:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise InvalidQuery("dates are written YYYY-MM-DD") from None
    moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
    if end:
        moment += timedelta(days=1)
    return moment.timestamp()


def shown(text: object) -> str:
    """Text from the log as a page shows it: HTML escaping is the template's, but a bidi
    override or a zero-width character would still reorder or hide what an auditor reads,
    so every such character is spelt out (`\u202e`)."""
    return escape_hidden(text) if isinstance(text, str) else ""


def local_time(moment: float) -> tuple[str, str]:
    """A logged time as the page shows it: in the vault's own zone (LOCAL_ZONE), and in
    UTC for the tooltip and for comparing with other logs."""
    local = datetime.fromtimestamp(moment, tz=LOCAL_ZONE).strftime("%Y-%m-%d %H:%M:%S")
    utc = datetime.fromtimestamp(moment, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return local, utc


def entry_row(index: int, entry: AccessEntry) -> dict[str, Any]:
    local, utc = local_time(entry.time)
    return {
        "index": index,
        "time": local,
        "time_utc": utc,
        "actor": shown(entry.actor),
        "role": shown(entry.role) or "-",
        "action": shown(entry.action),
        "action_label": shown(action_label(entry.action)),
        "purpose": shown(entry.purpose),
        "case": shown(entry.case_ref),
        "outcome": entry.outcome.value,
        "records": entry.records,
        "count": entry.result_count,
        "field": shown(entry.detail.get("field")) if isinstance(entry.detail, dict) else None,
        # How a login was made: "totp" or "passkey".
        "factor": entry.detail.get("factor") if isinstance(entry.detail, dict) else None,
        # The alert a failed access raised (e.g. "database:refused"): fixed text, escaped.
        "alert": shown(entry.detail.get("alert")) if isinstance(entry.detail, dict) else None,
    }


def checkpoint_status(found: LogExtract) -> dict[str, Any]:
    return {"size": found.size, "signed": found.signed, "behind": found.size - found.signed}


@router.get("/audit/log", response_class=HTMLResponse)
def audit_log(
    request: Request,
    me: Me,
    reason: OptionalText = None,
    case_ref: OptionalText = None,
    actor: OptionalText = None,
    action: OptionalText = None,
    since: OptionalText = None,
    until: OptionalText = None,
    purpose_contains: OptionalText = None,
    page: Annotated[int, Query(ge=1, le=LOG_MAX_PAGE)] = 1,
    size: Annotated[int, Query(ge=1, le=LOG_MAX_PAGE_SIZE)] = LOG_PAGE_SIZE,
) -> Response:
    filters = {
        "reason": reason or "",
        "case_ref": case_ref or "",
        "actor": actor or "",
        "action": action or "",
        "since": since or "",
        "until": until or "",
        "purpose_contains": purpose_contains or "",
    }
    context: dict[str, Any] = {
        "filters": filters,
        "actions": [(a.value, action_label(a.value)) for a in Action],
        "zone": LOCAL_ZONE_NAME,
        "rows": None,
        "page": page,
        "size": size,
    }
    if not reason:
        return render(request, "audit_log.html", **context)
    vault = deps.vault_of(request)
    try:
        purpose = stated_purpose(reason, case_ref)
        found = vault.read_log(
            me,
            purpose,
            actor=actor or None,
            action=action or None,
            since=_day(since),
            until=_day(until, end=True),
            purpose_contains=purpose_contains or None,
        )
    except (PurposeRequired, InvalidQuery) as exc:
        return render(request, "audit_log.html", status_code=422, error=str(exc), **context)
    start = (page - 1) * size
    window = list(itertools.islice(found, start, start + size + 1))
    rows = [entry_row(i, e) for i, e in window[:size]]
    base = {k: v for k, v in filters.items() if v}
    return render(
        request,
        "audit_log.html",
        **{**context, "rows": rows},
        status=checkpoint_status(found),
        prev_href=f"/audit/log?{urlencode({**base, 'page': page - 1, 'size': size})}"
        if page > 1
        else None,
        next_href=f"/audit/log?{urlencode({**base, 'page': page + 1, 'size': size})}"
        if len(window) > size and page < LOG_MAX_PAGE
        else None,
    )


@router.post("/audit/log/verify", response_class=HTMLResponse, dependencies=[Csrf])
def audit_verify(
    request: Request, me: Me, reason: FormText = None, case_ref: FormText = None
) -> Response:
    vault = deps.vault_of(request)
    purpose = stated_purpose(reason, case_ref)
    try:
        result = vault.verify_log(me, purpose)
        error = None
    except (LogTampered, ErasureLedgerBroken) as exc:
        result, error = None, str(exc)
    template = "_verified.html" if is_htmx(request) else "verified.html"
    return render(request, template, result=result, error=error)


_ALERT_VERBS = {"acknowledge": "Acknowledge", "resolve": "Resolve"}


def alert_row(found: RecordedAlert) -> dict[str, Any]:
    """An alert as the page shows it: names, signals and keyed ids, never a value."""
    alert = found.alert

    def when(moment: float) -> str:
        return local_time(moment)[0]

    state = found.state
    verbs = {
        AlertState.OPEN: list(_ALERT_VERBS.items()),
        AlertState.ACKNOWLEDGED: [("resolve", _ALERT_VERBS["resolve"])],
        AlertState.RESOLVED: [],
    }[state]
    return {
        "id": shown(alert.id),
        "time": when(alert.time),
        "time_utc": local_time(alert.time)[1],
        "severity": shown(alert.severity),
        "kind": shown(alert.kind),
        "action": shown(alert.action),
        "account": shown(alert.account),
        "signals": ", ".join(shown(s) for s in alert.signals),
        "entry": alert.entry,
        "records": ", ".join(shown(r) for r in alert.records[:5])
        + (f" and {len(alert.records) - 5} more" if len(alert.records) > 5 else ""),
        "state": state.value,
        "steps": [f"{s.state.value} by {shown(s.by)}, {when(s.time)}" for s in found.steps],
        "tampered": found.tampered,
        "verbs": verbs,
    }


def render_alerts(request: Request, me: Session, status_code: int = 200, **extra: Any) -> Response:
    vault = deps.vault_of(request)
    found = vault.alerts(me, limit=ALERTS_SHOWN)
    rows = None
    if me.role is Role.AUDITOR:
        # Auditors also see every refusal and failure from the log, alerts or not.
        refused = (Outcome.DENIED, Outcome.ERROR)
        entries = vault.read_log(me, ALERTS_PURPOSE)
        latest = deque(
            (entry_row(i, e) for i, e in entries if e.outcome in refused), maxlen=ALERTS_SHOWN
        )
        rows = list(reversed(latest))
    return render(
        request,
        "alerts.html",
        status_code=status_code,
        alerts=[alert_row(a) for a in found],
        rows=rows,
        zone=LOCAL_ZONE_NAME,
        shown=ALERTS_SHOWN,
        **extra,
    )


@router.get("/alerts", response_class=HTMLResponse)
def alerts(request: Request, me: Me) -> Response:
    return render_alerts(request, me)


@router.post("/alerts/{alert_id}/{verb}", response_class=HTMLResponse, dependencies=[Csrf])
def alert_step(request: Request, alert_id: str, verb: str, me: Me) -> Response:
    vault = deps.vault_of(request)
    if verb not in _ALERT_VERBS:
        raise InvalidQuery("a step on an alert is 'acknowledge' or 'resolve'")
    step = vault.acknowledge_alert if verb == "acknowledge" else vault.resolve_alert
    try:
        step(me, alert_id)
    except AccessDenied as exc:
        return render_alerts(request, me, status_code=409, error=f"Not done: {exc}.")
    return render_alerts(request, me, done=f"Alert {verb}d; the step is on the access log.")


# -- bulk exports: asked for, approved by a second official, produced once ------------

_EXPORT_ID = re.compile(r"[0-9a-f]{32}")


def export_row(status: ExportStatus) -> dict[str, Any]:
    """A request as the page shows it: what is asked, why and by whom; never a value."""
    scope = f"in district {status.district}" if status.district else "all the asker may see"
    if status.named_records is not None:
        scope = f"{status.named_records} named records"
    return {
        "export_id": status.export_id,
        "state": status.state,
        "requester": shown(status.requester),
        "approver": shown(status.approver) if status.approver else None,
        "record_type": shown(status.record_type),
        "purpose_class": shown(status.purpose_class),
        "recipient": shown(status.recipient),
        "reason": shown(status.reason),
        "case_ref": shown(status.case_ref) if status.case_ref else None,
        "scope": scope,
        "requested": datetime.fromtimestamp(status.requested_at, tz=UTC).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
    }


def render_exports(request: Request, me: Session, status_code: int = 200, **extra: Any) -> Response:
    vault = deps.vault_of(request)
    # Only the officials who may ask see the form; the vault decides all the same.
    if me.role not in (Role.INVESTIGATOR, Role.SUPERVISOR):
        raise AccessDenied("only an investigator or a supervisor works with bulk exports")
    classes = sorted(vault.schema.exports)
    types = sorted({t for c in classes for t in vault.schema.exports[c]})
    return render(
        request,
        "exports.html",
        status_code=status_code,
        classes=classes,
        record_types=types,
        **extra,
    )


@router.get("/exports", response_class=HTMLResponse)
def exports_page(request: Request, me: Me) -> Response:
    return render_exports(request, me)


@router.post("/exports", response_class=HTMLResponse, dependencies=[Csrf])
def export_request(
    request: Request,
    me: Me,
    record_type: FormText = None,
    purpose_class: FormText = None,
    district: FormText = None,
    recipient: FormText = None,
    reason: FormText = None,
    case_ref: FormText = None,
) -> Response:
    vault = deps.vault_of(request)
    try:
        purpose = stated_purpose(reason, case_ref)
        export_id = vault.exports.request(
            me,
            purpose,
            record_type=record_type or "",
            purpose_class=purpose_class or "",
            recipient=(recipient or "").strip(),
            district=(district or "").strip() or None,
        )
    except (InvalidQuery, PurposeRequired) as exc:
        return render_exports(request, me, status_code=422, error=f"Not asked: {exc}.")
    status = export_row(vault.exports.status(me, export_id))
    done = (
        "Asked. Give this id to a supervisor, who approves it here or with "
        "'custodes export approve'."
    )
    return render_exports(request, me, status=status, done=done)


@router.get("/exports/lookup", response_class=HTMLResponse)
def export_lookup(request: Request, me: Me, export_id: OptionalText = None) -> Response:
    wanted = (export_id or "").strip().lower()
    if not _EXPORT_ID.fullmatch(wanted):
        return render_exports(
            request, me, status_code=422, error="An export id is 32 hexadecimal characters."
        )
    return export_page(request, wanted, me)


@router.get("/exports/{export_id}", response_class=HTMLResponse)
def export_page(request: Request, export_id: str, me: Me) -> Response:
    status = deps.vault_of(request).exports.status(me, export_id)
    return render_exports(request, me, status=export_row(status))


@router.post("/exports/{export_id}/approve", response_class=HTMLResponse, dependencies=[Csrf])
def export_approve(request: Request, export_id: str, me: Me) -> Response:
    vault = deps.vault_of(request)
    try:
        status = vault.exports.approve(me, export_id)
    except AccessDenied as exc:
        if isinstance(exc, PurposeRequired):
            raise
        current = export_row(vault.exports.status(me, export_id))
        return render_exports(
            request, me, status_code=409, status=current, error=f"Not approved: {exc}."
        )
    done = "Approved: its asker may now produce it, once. Your approval is on the access log."
    return render_exports(request, me, status=export_row(status), done=done)


@router.post("/exports/{export_id}/produce", dependencies=[Csrf])
def export_produce(request: Request, export_id: str, me: Me) -> Response:
    made = deps.vault_of(request).exports.produce(me, export_id)
    return Response(
        made.sealed,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="export-{made.export_id}.custodes"',
            "Cache-Control": "no-store",
        },
    )


# -- administrators ---------------------------------------------------------------------


ACCOUNT_ACTIONS = ("disable", "enable", "unlock", "enrol", "assign", "unassign")


def account_rows(vault: Vault, me: Session) -> list[dict[str, Any]]:
    # The case numbers an administrator assigned, and nothing of what the cases hold.
    return [
        {
            "username": a.username,
            "role": a.role.value,
            "district": str(a.attributes.get("district", "")),
            "cases": sorted(assigned_cases(a.attributes.get("cases"))),
            "takes_cases": reads_records(a.role),
            "mfa": a.mfa_enrolled,
            "locked": a.locked,
            "disabled": a.disabled,
        }
        for a in vault.admin.list_accounts(me)
    ]


@router.get("/admin/accounts", response_class=HTMLResponse)
def accounts(request: Request, me: Me) -> Response:
    vault = deps.vault_of(request)
    roles = [r.value for r in ACCOUNT_ROLES]
    return render(request, "accounts.html", rows=account_rows(vault, me), roles=roles)


@router.post("/admin/accounts/{username}/{verb}", response_class=HTMLResponse, dependencies=[Csrf])
def account_action(
    request: Request, username: str, verb: str, me: Me, case_no: FormText = None
) -> Response:
    vault = deps.vault_of(request)
    admin = vault.admin
    roles = [r.value for r in ACCOUNT_ROLES]
    if verb not in ACCOUNT_ACTIONS:
        raise InvalidQuery(f"an account action is one of: {', '.join(ACCOUNT_ACTIONS)}")
    code = None
    if verb in ("assign", "unassign"):
        change = admin.assign_case if verb == "assign" else admin.unassign_case
        try:
            change(me, username, case_no or "")
        except InvalidAssignment as exc:
            # Said beside the forms; the number typed is not repeated.
            return render(
                request,
                "accounts.html",
                status_code=422,
                rows=account_rows(vault, me),
                roles=roles,
                error=f"Account {username}: {exc}.",
            )
    elif verb == "disable":
        admin.disable_account(me, username)
    elif verb == "enable":
        admin.enable_account(me, username)
    elif verb == "unlock":
        admin.unlock_account(me, username)
    else:
        code = admin.issue_enrolment(me, username)
    done = {
        "disable": "disabled; every session it had has ended",
        "enable": "enabled",
        "unlock": "unlocked",
        "enrol": "given a new enrolment code",
        "assign": "assigned the case",
        "unassign": "no longer assigned the case",
    }[verb]
    return render(
        request,
        "accounts.html",
        rows=account_rows(vault, me),
        roles=roles,
        done=f"Account {username} {done}.",
        enrol_code=code,
        enrol_for=username,
    )
