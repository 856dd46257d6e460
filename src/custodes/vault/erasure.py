"""Erasure and retention, owned by the vault's door: every step passes the one access
function and is logged.

A record is erased on two people's word: a supervisor or an auditor asks (stating why),
a supervisor or an administrator who is not the asker approves, and the approval erases:
the statement goes on the erasure ledger (custodes.audit.erasures, beside the log's key),
then the entry on the access log, then storage deletes the record's data key, payload
and tokens. Retention rules in the schema erase expired records the same way, on the
host or from a server's timer. Every opening of a vault re-applies the ledger, so a
database put back from an older copy never serves an erased record.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from custodes.access import AccessGate, Done, Grant
from custodes.audit.erasures import Erasure, ErasureLedger
from custodes.codec import RecordCodec
from custodes.crypto import KeyMaterial
from custodes.crypto.row_mac import RowKind, RowMacs
from custodes.errors import (
    AccessDenied,
    CustodesError,
    DatabaseRefused,
    InvalidQuery,
    RecordNotFound,
    SelfApproval,
    TamperDetected,
)
from custodes.policy import AccessPurpose, Action, Role
from custodes.schema import Schema
from custodes.sessions import Clock, Operator, Principal, Random
from custodes.storage.base import Storage

logger = logging.getLogger("custodes.vault")

_PREFIX = "erasure/"
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_CHUNK = 500
_DAY = 86400.0
# Who may be told where an erasure request stands, besides its asker and approver.
_OVERSEERS = frozenset({Role.SUPERVISOR, Role.ADMIN})


class ErasureState(StrEnum):
    REQUESTED = "requested"
    ERASED = "erased"


@dataclass(frozen=True, slots=True)
class ErasureRequest:
    request_id: str
    requester: str
    record_id: str
    reason: str
    case_ref: str | None
    requested_at: float
    state: ErasureState = ErasureState.REQUESTED
    approver: str | None = None
    erased_at: float | None = None

    def fields(self) -> list[object]:
        return [
            self.request_id,
            self.requester,
            self.record_id,
            self.reason,
            self.case_ref,
            float(self.requested_at),
            self.state.value,
            self.approver,
            None if self.erased_at is None else float(self.erased_at),
        ]


@dataclass(frozen=True, slots=True)
class ErasureStatus:
    """What an official may be told of an erasure request: ids, names, times; no value."""

    request_id: str
    state: str
    requester: str
    approver: str | None
    record_id: str
    reason: str
    case_ref: str | None
    requested_at: float
    erased_at: float | None


@dataclass(frozen=True, slots=True)
class RetentionReport:
    """One retention pass: records read, and erased per record type."""

    scanned: int
    erased: dict[str, int]


class _Requests:
    """Erasure requests in the metadata store, each tagged (crypto.row_mac): a database
    writer without the keyring can neither approve one nor name another record in it."""

    def __init__(self, storage: Storage, macs: RowMacs) -> None:
        self._meta = storage
        self._macs = macs

    def put(self, request: ErasureRequest) -> None:
        fields = request.fields()
        tag = self._macs.tag_hex(RowKind.ERASURE_REQUEST, fields)
        self._meta.set_meta(_PREFIX + request.request_id, orjson.dumps([fields, tag]))

    def get(self, request_id: str) -> ErasureRequest | None:
        stored = self._meta.get_meta(_PREFIX + request_id)
        if stored is None:
            return None
        try:
            fields, tag = orjson.loads(stored)
            if not isinstance(fields, list) or not self._macs.check_hex(
                RowKind.ERASURE_REQUEST, fields, tag
            ):
                raise ValueError
            rid, requester, record_id, reason, case_ref, at, state, approver, erased = fields
            request = ErasureRequest(
                request_id=str(rid),
                requester=str(requester),
                record_id=str(record_id),
                reason=str(reason),
                case_ref=None if case_ref is None else str(case_ref),
                requested_at=float(at),
                state=ErasureState(state),
                approver=None if approver is None else str(approver),
                erased_at=None if erased is None else float(erased),
            )
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise TamperDetected("the erasure request failed its integrity check") from None
        if request.request_id != request_id:
            raise TamperDetected("the erasure request failed its integrity check")
        return request


class Erasures:
    def __init__(
        self,
        *,
        gate: AccessGate,
        storage: Storage,
        codec: RecordCodec,
        schema: Schema,
        ledger: ErasureLedger,
        material: KeyMaterial,
        clock: Clock,
        random: Random,
        housekeeper: Operator,
    ) -> None:
        self._gate = gate
        self._storage = storage
        self._codec = codec
        self._schema = schema
        self._ledger = ledger
        self._clock = clock
        self._random = random
        self._requests = _Requests(storage, RowMacs(material))
        # The vault's own hand for what the ledger or a retention rule already decided:
        # never handed out, so no request can act as it.
        self._housekeeper = housekeeper

    def __repr__(self) -> str:
        return "Erasures()"

    # -- the two people ---------------------------------------------------------------

    def request(self, session: Principal, purpose: AccessPurpose, record_id: str) -> str:
        """Ask for a record's erasure; the request's id. Nothing is erased until a second
        official approves. Logged naming the record."""
        record_id = _checked_record(record_id)

        def run(grant: Grant) -> Done[str]:
            # Already on the ledger is gone, whatever storage still holds.
            if record_id in self._ledger.current() or not self._storage.get_records([record_id]):
                raise RecordNotFound("no such record")
            request_id = self._random(16).hex()
            self._requests.put(
                ErasureRequest(
                    request_id=request_id,
                    requester=grant.username,
                    record_id=record_id,
                    reason=purpose.reason,
                    case_ref=purpose.case_ref,
                    requested_at=self._clock(),
                )
            )
            return Done(request_id, detail={"erasure": request_id})

        return self._gate.access(
            session, Action.ERASE_REQUEST, run, purpose=purpose, target=record_id
        )

    def approve(self, session: Principal, request_id: str) -> ErasureStatus:
        """A second official's approval, which erases. Refused (and logged) to the asker
        (SelfApproval), to any role but a supervisor or an administrator, and for a
        request already carried out."""
        request_id = _checked_request(request_id)
        try:
            held = self._requests.get(request_id)
        except CustodesError:
            held = None
        purpose = (
            AccessPurpose(held.reason, held.case_ref)
            if held is not None
            else AccessPurpose("record erasure", request_id)
        )

        def run(grant: Grant) -> Done[ErasureRequest]:
            request = self._stored(request_id)
            if grant.username == request.requester:
                raise SelfApproval("an erasure cannot be approved by the official who asked for it")
            if request.state is not ErasureState.REQUESTED:
                raise AccessDenied("this erasure request is not awaiting approval")
            return Done(request, detail={"erasure": request_id, "requester": request.requester})

        request = self._gate.access(
            session,
            Action.ERASE_APPROVE,
            run,
            purpose=purpose,
            target=held.record_id if held is not None else None,
        )
        now = self._clock()
        try:
            self._erase(session, [request.record_id], f"request {request_id}", now)
        except DatabaseRefused:
            # On the ledger, so read by no one from now on, in every process; the bytes
            # go when the owner's credentials apply the ledger (reapply, doctor).
            logger.warning(
                "an erased record is still stored: this database role may not delete it; "
                "apply the ledger with the schema owner's credentials (custodes retention run)"
            )
        done = dataclasses.replace(
            request,
            state=ErasureState.ERASED,
            approver=self._gate.check(session).username,
            erased_at=now,
        )
        self._requests.put(done)
        return _status(done)

    def status(self, session: Principal, request_id: str) -> ErasureStatus:
        """Where a request stands, for its asker, its approver, supervisors and
        administrators."""
        live = self._gate.check(session)
        request = self._stored(_checked_request(request_id))
        if live.username not in (request.requester, request.approver) and (
            live.role not in _OVERSEERS
        ):
            raise RecordNotFound("no such erasure request")
        return _status(request)

    # -- the ledger -------------------------------------------------------------------

    def erased(self, record_id: str) -> Erasure | None:
        """The ledger's statement erasing this record, if any."""
        return self._ledger.erased_ids().get(record_id)

    def ledgered(self) -> frozenset[str]:
        """Every record id the ledger names."""
        return frozenset(self._ledger.erased_ids())

    def reapply(self) -> int:
        """Erase every record the ledger names that storage still holds (a database put
        back from a copy older than an erasure); how many. Each on the log. Raises
        ErasureLedgerBroken on a ledger whose chain or signature fails."""
        erased = self._ledger.erased_ids()
        ids = list(erased)
        present: list[str] = []
        for start in range(0, len(ids), _CHUNK):
            present.extend(self._storage.get_records(ids[start : start + _CHUNK]))
        if not present:
            return 0
        try:
            return self._write(self._housekeeper, present, "ledger", {"reapplied": True})
        except DatabaseRefused:
            # PostgreSQL's least-privileged server role deletes no record (threat 5). The
            # records are never read all the same (RecordReader skips what the ledger
            # names); their bytes wait for the owner, and doctor says so.
            logger.warning(
                "%d erased records are still stored: this database role may not delete "
                "them; apply the ledger with the schema owner's credentials on the host "
                "(custodes retention run)",
                len(present),
            )
            return 0

    # -- retention --------------------------------------------------------------------

    def retention_round(
        self, principal: Principal | None = None, *, stop: threading.Event | None = None
    ) -> RetentionReport:
        """Erase every record past its type's retention (schema), a batch at a time, each
        batch on the ledger and the log. Reads go on meanwhile: each batch is one short
        write, and the records are opened outside it. The host operator's, or the
        vault's own from a server's timer (principal None)."""
        who = principal if principal is not None else self._housekeeper
        if principal is not None:
            self._gate.access(who, Action.RETENTION_RUN, lambda _: Done(None))
        now = self._clock()
        rules = {
            self._codec.type_tag(rt.name): rt
            for rt in self._schema.types.values()
            if rt.retention is not None
        }
        scanned = 0
        erased: dict[str, int] = {}
        after = 0
        while page := self._storage.records_page(after, _CHUNK):
            if stop is not None and stop.is_set():
                break
            after = page[-1][0]
            scanned += len(page)
            # Already on the ledger (a role that may not delete them, a pass cut short):
            # read by no one and erased at the owner's next opening, never ledgered twice.
            ledgered = self._ledger.current()
            expired: dict[str, list[str]] = {}
            for _, stored in page:
                rt = rules.get(stored.record_type)
                if rt is None or rt.retention is None or stored.record_id in ledgered:
                    continue
                value = self._codec.open(stored, (rt.retention.field,)).get(rt.retention.field)
                if value is None or not _expired(str(value), rt.retention.days, now):
                    continue
                expired.setdefault(rt.name, []).append(stored.record_id)
            for type_name, ids in expired.items():
                try:
                    done = self._erase(who, ids, f"retention {type_name}", now)
                except DatabaseRefused:
                    logger.warning(
                        "%d expired records are on the erasure ledger but still stored: this "
                        "database role may not delete them; apply the ledger with the schema "
                        "owner's credentials (custodes retention run)",
                        len(ids),
                    )
                    done = 0
                erased[type_name] = erased.get(type_name, 0) + done
        return RetentionReport(scanned, erased)

    # -- the one way a record is erased -----------------------------------------------

    def _erase(self, principal: Principal, ids: Sequence[str], reason: str, now: float) -> int:
        """On the ledger first (durable, signed), then the log's entry, then storage: an
        interruption anywhere leaves the record on the ledger, and the next opening of the
        vault finishes the erasure."""
        self._ledger.append(ids, at=now, reason=reason)
        return self._write(principal, ids, reason.split(" ", 1)[0], {"reason": reason})

    def _write(
        self, principal: Principal, ids: Sequence[str], kind: str, detail: dict[str, Any]
    ) -> int:
        def write(_: Grant) -> Done[int]:
            count = self._storage.erase_records(ids)
            return Done(count, tuple(ids), detail={"erased": count})

        return self._gate.access_write(
            principal, Action.ERASE, ids, write, detail={"kind": kind, **detail}
        )

    def _stored(self, request_id: str) -> ErasureRequest:
        request = self._requests.get(request_id)
        if request is None:
            raise RecordNotFound("no such erasure request")
        return request


def _expired(value: str, days: int, now: float) -> bool:
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        return False  # not a date: kept, and left to `audit verify --records`
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return (today - day).days > days


def _checked_request(request_id: str) -> str:
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise InvalidQuery("an erasure request id is 32 hexadecimal digits")
    return request_id


def _checked_record(record_id: str) -> str:
    if not isinstance(record_id, str) or not _RECORD_ID.fullmatch(record_id):
        raise InvalidQuery("not a record id")
    return record_id


def _status(request: ErasureRequest) -> ErasureStatus:
    return ErasureStatus(
        request_id=request.request_id,
        state=request.state.value,
        requester=request.requester,
        approver=request.approver,
        record_id=request.record_id,
        reason=request.reason,
        case_ref=request.case_ref,
        requested_at=request.requested_at,
        erased_at=request.erased_at,
    )
