"""Bulk exports and leak tracing, owned by the vault's door: every step passes the one
access function and is logged.

An export is asked for by one official (investigator or supervisor), approved by a
supervisor who is not the asker, and produced once, by the asker: the records of its
scope that the asker may see, each redacted per the schema's export class, a few canary
rows of its own among them, sealed to the recipient's X25519 key. Its log entry names
the export, its row count, class and recipient key (public); the record ids and canaries
are sealed beside it, which is what tracing reads back.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.access import AccessGate, Done, Grant, ids_digest
from custodes.audit import AccessLog, Outcome
from custodes.codec import RecordCodec
from custodes.crypto import KeyMaterial
from custodes.crypto.row_mac import RowMacs
from custodes.errors import (
    AccessDenied,
    CustodesError,
    InvalidInput,
    InvalidQuery,
    RecordNotFound,
    SchemaError,
)
from custodes.export.canaries import canary_count, placed, synthetic_records
from custodes.export.envelope import fingerprint, public_key_bytes, seal_for
from custodes.export.pseudonymise import ExportKeys, carriers, generalise, redact, watermark_bit
from custodes.export.requests import ExportRequest, ExportRequests, ExportState
from custodes.export.trace import RebuiltExport, RebuiltRow, TraceReport, trace_leak
from custodes.policy import AccessPurpose, Action, Role
from custodes.records import query_parts
from custodes.schema import RecordType, Schema
from custodes.sessions import Clock, Principal, Random
from custodes.storage.base import Storage, StoredRecord
from custodes.vault.reading import RecordReader

T = TypeVar("T")

_EXPORT_ID = re.compile(r"[0-9a-f]{32}")
_RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DISTRICT = re.compile(r"[0-9]{2}(?:[0-9]{2}){0,2}")
_INFO = b"custodes/export/v1/"
# The most record ids a request may name; a larger scope is a district or a whole type.
MAX_SCOPE_IDS = 100_000
# The most rows one export holds: its record ids are sealed beside its log entry, and a
# trace rebuilds it in memory. A larger need is several exports, each approved.
MAX_EXPORT_ROWS = 1_000_000
_CHUNK = 500
# How long an export's use-once mark is kept: longer than any request waits.
_SPENT_FOR = 10 * 365 * 86400.0
# What the access log shows of the reads a trace holds a sample against.
_READS = frozenset({Action.SEARCH.value, Action.READ.value, Action.REVEAL.value})


@dataclass(frozen=True, slots=True)
class ProducedExport:
    export_id: str
    rows: int
    recipient: str  # the recipient key's fingerprint
    sealed: bytes  # custodes.export.envelope's file: only the recipient opens it

    def __repr__(self) -> str:
        return f"ProducedExport({self.export_id}, rows={self.rows})"


@dataclass(frozen=True, slots=True)
class ExportStatus:
    """What an official may be told of a request: what is asked, why and for whom, so
    that an approver decides on it; no record, no value."""

    export_id: str
    state: str
    requester: str
    approver: str | None
    record_type: str
    purpose_class: str
    recipient: str
    reason: str = ""
    case_ref: str | None = None
    district: str | None = None
    named_records: int | None = None  # how many record ids the scope names, if it does
    requested_at: float = 0.0


class Exports:
    def __init__(
        self,
        *,
        gate: AccessGate,
        storage: Storage,
        codec: RecordCodec,
        reader: RecordReader,
        log: AccessLog,
        schema: Schema,
        material: KeyMaterial,
        clock: Clock,
        random: Random,
    ) -> None:
        self._gate = gate
        self._storage = storage
        self._codec = codec
        self._reader = reader
        self._log = log
        self._schema = schema
        self._material = material
        self._clock = clock
        self._random = random
        self._requests = ExportRequests(storage, RowMacs(material))

    def __repr__(self) -> str:
        return "Exports()"

    # -- the two people and the one production ------------------------------------------

    def request(
        self,
        session: Principal,
        purpose: AccessPurpose,
        *,
        record_type: str,
        purpose_class: str,
        recipient: str | bytes,
        district: str | None = None,
        record_ids: Sequence[str] | None = None,
    ) -> str:
        """Ask for a bulk export; its id. Nothing is read until a second official approves
        and the asker produces it."""
        rt = self._reader.type(record_type)
        if purpose_class not in self._schema.exports:
            known = ", ".join(sorted(self._schema.exports)) or "none"
            raise InvalidQuery(f"unknown export class (known: {known})")
        try:
            self._schema.export_rules(purpose_class, rt.name)
        except SchemaError as exc:
            raise InvalidQuery(str(exc)) from None
        try:
            raw_key = public_key_bytes(recipient)
        except InvalidInput as exc:
            raise InvalidQuery(exc.reason) from None
        if district is not None and not _DISTRICT.fullmatch(district):
            raise InvalidQuery("a district is a 2, 4 or 6-digit division code")
        ids: tuple[str, ...] | None = None
        if record_ids is not None:
            if not 1 <= len(record_ids) <= MAX_SCOPE_IDS:
                raise InvalidQuery(f"a request names 1 to {MAX_SCOPE_IDS:,} record ids")
            for n, rid in enumerate(record_ids, 1):
                if not isinstance(rid, str) or not _RECORD_ID.fullmatch(rid):
                    raise InvalidQuery(f"record id number {n} is not a record id")
            ids = tuple(dict.fromkeys(record_ids))
        recipient_fp = fingerprint(raw_key)
        scope = {
            "record_type": rt.name,
            "class": purpose_class,
            "recipient": recipient_fp,
            "district": district,
            "record_ids": None if ids is None else len(ids),
        }

        def run(grant: Grant) -> Done[str]:
            export_id = self._random(16).hex()
            self._requests.put(
                ExportRequest(
                    export_id=export_id,
                    requester=grant.username,
                    record_type=rt.name,
                    purpose_class=purpose_class,
                    reason=purpose.reason,
                    case_ref=purpose.case_ref,
                    recipient=_b64(raw_key),
                    district=district,
                    record_ids=ids,
                    requested_at=self._clock(),
                )
            )
            return Done(export_id, detail={"export": export_id})

        return self._gate.access(
            session,
            Action.EXPORT_REQUEST,
            run,
            purpose=purpose,
            record_type=rt.name,
            detail=scope,
        )

    def approve(self, session: Principal, export_id: str) -> ExportStatus:
        """A second official's approval. Refused (and logged) to the asker, to anyone but a
        supervisor, and for a request not awaiting approval."""

        def run(grant: Grant) -> Done[ExportStatus]:
            request = self._stored(export_id)
            if grant.username == request.requester:
                raise AccessDenied("an export cannot be approved by the official who asked for it")
            if request.state is not ExportState.REQUESTED:
                raise AccessDenied("this export request is not awaiting approval")
            approved = request.moved_to(
                ExportState.APPROVED, approver=grant.username, approved_at=self._clock()
            )
            self._requests.put(approved)
            return Done(_status(approved), detail={"requester": request.requester})

        return self._stepped(session, Action.EXPORT_APPROVE, export_id, run)

    def status(self, session: Principal, export_id: str) -> ExportStatus:
        """Where a request stands, for the officials it concerns."""
        live = self._gate.check(session)
        request = self._stored(_checked_id(export_id))
        if live.username not in (request.requester, request.approver) and (
            live.role is not Role.SUPERVISOR
        ):
            raise RecordNotFound("no such export request")
        return _status(request)

    def produce(self, session: Principal, export_id: str) -> ProducedExport:
        """The export, sealed to its recipient: once, by its asker, after its approval."""

        named_canaries: list[str] = []
        asker: list[str] = []

        def run(grant: Grant) -> Done[ProducedExport]:
            asker.append(grant.username)
            request = self._stored(export_id)
            if grant.username != request.requester:
                raise AccessDenied("only the official who asked for an export produces it")
            if request.state is ExportState.REQUESTED:
                raise AccessDenied("this export has not been approved by a second official")
            if request.state is not ExportState.APPROVED or not self._storage.spend(
                _spent_mark(export_id), self._clock(), _SPENT_FOR
            ):
                # The use-once mark is taken by one process only: two productions racing in
                # two server processes, or an approved row put back after its export was
                # made, find it taken.
                raise AccessDenied("this export has been produced already; ask for a new one")
            rt = self._schema.record_type(request.record_type)
            rules = self._schema.export_rules(request.purpose_class, rt.name)
            keys = self.keys_of(export_id)
            rows: list[dict[str, str]] = []
            ids: list[str] = []
            for record_id, values in self._in_scope(request, rt, grant, named_canaries):
                if len(rows) == MAX_EXPORT_ROWS:
                    raise InvalidQuery(
                        f"an export holds at most {MAX_EXPORT_ROWS:,} rows: narrow its scope"
                    )
                rows.append(redact(rt, rules, values, record_id, keys))
                ids.append(record_id)
            seed = int.from_bytes(self._random(8), "big")
            canary_ids: list[str] = []
            canary_rows: list[dict[str, str]] = []
            for record in synthetic_records(rt.name, canary_count(len(rows)), seed):
                source = [str(record.get(name, "")) for name in rt.source_key]
                cid = self._codec.record_id(rt.name, source)
                canary_ids.append(cid)
                canary_rows.append(redact(rt, rules, record, cid, keys))
            out = placed(rows, canary_rows, seed ^ int.from_bytes(self._random(8), "big"))
            plaintext = b"".join(orjson.dumps(row) + b"\n" for row in out)
            raw_key = public_key_bytes(request.recipient)
            sealed = seal_for(raw_key, plaintext)
            # Spent before the answer: should the entry fail, the export is lost, not
            # repeatable.
            self._requests.put(request.moved_to(ExportState.PRODUCED, produced_at=self._clock()))
            recipient_fp = fingerprint(raw_key)
            return Done(
                ProducedExport(export_id, len(out), recipient_fp, sealed),
                detail={
                    "rows": len(out),
                    "recipient": recipient_fp,
                    "class": request.purpose_class,
                    "approver": request.approver,
                    # Records of the scope out of the asker's reach: counted, never named.
                    "filtered": grant.reach.withheld,
                    "ids_digest": ids_digest(ids),
                },
                record_type=rt.name,
                private={
                    "export": export_id,
                    "record_type": rt.name,
                    "class": request.purpose_class,
                    "records": ids,
                    "canary_ids": canary_ids,
                    "canaries": canary_rows,
                    # The keys are derived again from the keyring and the export's id.
                    "watermark": f"hkdf:{_INFO.decode()}watermark/{export_id}",
                },
            )

        made, index = self._stepped_then(session, Action.EXPORT_CREATE, export_id, run)
        if named_canaries:
            self._gate.canaries_exported(
                asker[0], Action.EXPORT_CREATE, index, tuple(named_canaries)
            )
        return made

    def keys_of(self, export_id: str) -> ExportKeys:
        """An export's own pseudonym and watermark keys, from the keyring and its id."""
        return ExportKeys(
            pseudonym=self._derive(b"pseudonym/" + export_id.encode()),
            watermark=self._derive(b"watermark/" + export_id.encode()),
        )

    def _derive(self, info: bytes) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=32, salt=self._material.vault_id, info=_INFO + info
        ).derive(self._material.index_root)

    def _stepped(
        self, session: Principal, action: Action, export_id: str, run: Callable[[Grant], Done[T]]
    ) -> T:
        return self._stepped_then(session, action, export_id, run)[0]

    def _stepped_then(
        self, session: Principal, action: Action, export_id: str, run: Callable[[Grant], Done[T]]
    ) -> tuple[T, int]:
        """Approve or produce through the access function, with the request's own purpose
        and case on the entry: a request that is missing or fails its tag is logged as the
        step's failure all the same. The answer and its entry's index."""
        export_id = _checked_id(export_id)
        try:
            request = self._requests.get(export_id)
        except CustodesError:
            request = None
        purpose = (
            AccessPurpose(request.reason, request.case_ref)
            if request is not None
            else AccessPurpose("bulk export", export_id)
        )
        return self._gate.access_then(
            session,
            action,
            run,
            purpose=purpose,
            record_type=request.record_type if request is not None else None,
            detail={"export": export_id},
        )

    def _stored(self, export_id: str) -> ExportRequest:
        request = self._requests.get(export_id)
        if request is None:
            raise RecordNotFound("no such export request")
        return request

    def _in_scope(
        self, request: ExportRequest, rt: RecordType, grant: Grant, named_canaries: list[str]
    ) -> Iterator[tuple[str, Mapping[str, object]]]:
        """The records of the request's scope that its asker may see, opened.

        Canary records (custodes.canaries) swept up by a district or a whole type are left
        out: they are no one, and no legitimate export should carry them. Named by id, they
        are exported like any record, and noted in `named_canaries` for the alarm: ids of
        people no one is looking for come from a dump of the database."""
        tag = self._codec.type_tag(rt.name)
        for batch in self._scope_batches(request):
            held = self._reader.fetch(batch)
            planted = self._gate.canaries_among(batch)
            for record_id in batch:
                stored = held.get(record_id)
                if stored is None or stored.record_type != tag:
                    continue
                if record_id in planted:
                    if request.record_ids is None:
                        continue
                    named_canaries.append(record_id)
                values = self._codec.open(stored)
                facts = self._reader.facts(rt, values, grant.reach)
                if request.district is not None and not (facts.district or "").startswith(
                    request.district
                ):
                    continue
                if not grant.reach.allows(facts, record_id):
                    grant.reach.withheld += 1
                    continue
                yield record_id, values

    def _scope_batches(self, request: ExportRequest) -> Iterator[list[str]]:
        if request.record_ids is not None:
            ids = list(request.record_ids)
            for start in range(0, len(ids), _CHUNK):
                yield ids[start : start + _CHUNK]
            return
        after = 0
        while True:
            page = self._storage.record_tokens(after, _CHUNK)
            if not page:
                return
            after = page[-1][0]
            yield [record_id for _, record_id, _ in page]

    # -- tracing a leak ------------------------------------------------------------------

    def trace(self, operator: Principal, rows: Sequence[Mapping[str, str]]) -> TraceReport:
        """Which export, or else which accounts, a leaked sample came from. The host
        operator's work: it opens records and the log's sealed details in memory and hands
        out ids, names and counts only. Logged with its verdict."""

        def run(_: Grant) -> Done[TraceReport]:
            opened: dict[str, dict[str, object]] = {}
            exports: list[RebuiltExport] = []
            histories: dict[str, set[str]] = {}
            for index, entry in self._log.entries():
                if entry.outcome is not Outcome.GRANTED:
                    continue
                if entry.action in _READS and entry.records:
                    histories.setdefault(entry.actor, set()).update(entry.records)
                elif entry.action == Action.EXPORT_CREATE.value:
                    sealed = self._log.private_details(index)
                    if sealed is not None:
                        exports.append(self._rebuilt(entry.actor, sealed, opened))
            matched = [self._matching_records(row, opened) for row in rows]
            report = trace_leak(
                rows,
                exports,
                matched,
                histories,
                known_fields=frozenset(
                    name for rt in self._schema.types.values() for name in rt.fields
                ),
            )
            detail: dict[str, Any] = {
                "rows": report.rows,
                "records_matched": report.records_matched,
                "verdict": report.verdict,
            }
            if report.export is not None:
                detail["export"] = report.export.export_id
            elif report.accounts:
                detail["account"] = report.accounts[0].account
            return Done(report, detail=detail)

        return self._gate.access(operator, Action.LEAK_TRACE, run)

    def _open(self, record_ids: Sequence[str], cache: dict[str, dict[str, object]]) -> None:
        wanted = [r for r in record_ids if r not in cache]
        for start in range(0, len(wanted), _CHUNK):
            held = self._reader.fetch(wanted[start : start + _CHUNK])
            for record_id, stored in held.items():
                cache[record_id] = self._codec.open(stored)

    def _rebuilt(
        self, requester: str, sealed: Mapping[str, Any], cache: dict[str, dict[str, object]]
    ) -> RebuiltExport:
        export_id = str(sealed["export"])
        rt = self._schema.record_type(str(sealed["record_type"]))
        purpose_class = str(sealed["class"])
        rules = self._schema.export_rules(purpose_class, rt.name)
        keys = self.keys_of(export_id)
        marked = carriers(rt, rules)
        ids = [str(r) for r in sealed.get("records", [])]
        self._open(ids, cache)
        rows = []
        for record_id in ids:
            values = cache.get(record_id)
            if values is None:
                continue  # erased since: its rows can no longer be told
            row = redact(rt, rules, values, record_id, keys)
            longer = watermark_bit(keys.watermark, record_id) == 1
            other = {
                name: generalise(rt.fields[name], str(values[name]), longer=not longer)
                for name in marked
                if values.get(name) is not None
            }
            rows.append(RebuiltRow(record_id, row, other))
        canaries = [
            {str(k): str(v) for k, v in c.items()}
            for c in sealed.get("canaries", [])
            if isinstance(c, dict)
        ]
        named = tuple(name for name, rule in rules.items() if rule == "pseudonym")
        return RebuiltExport(
            export_id, requester, rt.name, purpose_class, rows, canaries, marked, named
        )

    def _matching_records(
        self, row: Mapping[str, str], cache: dict[str, dict[str, object]]
    ) -> set[str]:
        """The records a leaked row names through the blind indexes (ID number, phone,
        name and birth date), each confirmed after decryption."""
        found: set[str] = set()
        for rt in self._schema.types.values():
            for spec in rt.indexes.values():
                names = spec.field_names
                if any(c.transform for c in spec.components) or any(
                    rt.fields[n].ref is not None for n in names
                ):
                    continue
                if not all(n in row for n in names):
                    continue
                try:
                    parts = query_parts(rt, spec, {n: row[n] for n in names})
                except CustodesError:
                    continue  # a coarsened or edited value names no one
                for stored in self._reader.bucket(self._codec.probe(spec, parts), 16):
                    if self._reader.matches(
                        rt, spec, parts, stored.record_id, _opened(self._codec, stored, cache)
                    ):
                        found.add(stored.record_id)
        return found


def _opened(
    codec: RecordCodec, stored: StoredRecord, cache: dict[str, dict[str, object]]
) -> dict[str, object]:
    values = cache.get(stored.record_id)
    if values is None:
        values = cache[stored.record_id] = codec.open(stored)
    return values


def _spent_mark(export_id: str) -> bytes:
    return hashlib.sha256(b"custodes/export/produced/" + export_id.encode()).digest()


def _checked_id(export_id: str) -> str:
    if not isinstance(export_id, str) or not _EXPORT_ID.fullmatch(export_id):
        raise InvalidQuery("an export id is 32 hexadecimal digits")
    return export_id


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _status(request: ExportRequest) -> ExportStatus:
    return ExportStatus(
        export_id=request.export_id,
        state=request.state.value,
        requester=request.requester,
        approver=request.approver,
        record_type=request.record_type,
        purpose_class=request.purpose_class,
        recipient=fingerprint(public_key_bytes(request.recipient)),
        reason=request.reason,
        case_ref=request.case_ref,
        district=request.district,
        named_records=None if request.record_ids is None else len(request.record_ids),
        requested_at=request.requested_at,
    )
