"""The vault: the only door to personal records and to the access log.

Every operation that reads personal data or the log, or changes an account or the log,
is a method here (or of `vault.admin`, the account administration it owns) and passes
the one access function, `AccessGate.access` (custodes.access): the principal checked
afresh, one decision by custodes.policy, the operation run in memory, its access-log
entry durable, and only then the answer. Storage, the codec, the log and the accounts
are private to it; logins and sessions are custodes.sessions', reached through here.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from custodes import passkeys
from custodes.access import AccessGate, Done, Grant, OutOfReach, Reach
from custodes.accounts import AccountBook, Enrolment, Passkey
from custodes.administration import Administration
from custodes.audit import AccessEntry, AccessLog
from custodes.audit.report import (
    ReportedAccess,
    SubjectReport,
    check_inclusion,
    iso_time,
    open_checkpoint,
)
from custodes.audit.verify import OutsideCheckpoint, VerifyReport, verify_log
from custodes.audit.witness import Conflict, submit_checkpoint
from custodes.codec import RecordCodec, Values, role_of_link
from custodes.crypto import KeyMaterial
from custodes.errors import (
    AuthenticationFailed,
    ConfigurationError,
    InvalidQuery,
    RecordNotFound,
    SchemaError,
    TamperDetected,
)
from custodes.freetext import HiddenCharacter, one_line
from custodes.ingest import IngestReport, IngestTarget, run_ingest
from custodes.policy import (
    PROTECTED_REPORTER,
    REPORTER,
    AccessPurpose,
    Action,
    RecordFacts,
    authorise,
    district_of_case_no,
    district_of_national_id,
    is_minor,
)
from custodes.records import CanonicalRecord, index_parts, is_han, mask_value, query_parts
from custodes.schema import IndexSpec, RecordType, Schema
from custodes.sessions import (
    ABSOLUTE_TIMEOUT,
    IDLE_TIMEOUT,
    Clock,
    Gatekeeper,
    Operator,
    Principal,
    Random,
    Session,
)
from custodes.storage.base import Storage, StoredRecord

MAX_RESULTS = 100
# Records per page of the search-index check: a durable backend reads tokens by
# generation, so a larger page reads each generation's tokens fewer times.
_CHECK_PAGE = 4096
# Incoming links are looked up in pages of this size, growing until a page comes back
# short, so that a person named in many records is never cut off at a fixed limit.
_FIRST_PAGE = 256
# The link kind of a record about one person (a delivery to them), as opposed to one that
# names several (a case).
_ABOUT = frozenset({"person_ref"})

__all__ = [
    "ABSOLUTE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_RESULTS",
    "IndexCheck",
    "LinkView",
    "LogExtract",
    "Operator",
    "RecordView",
    "Session",
    "Vault",
]


@dataclass(frozen=True, slots=True)
class LinkView:
    record_id: str
    record_type: str
    role: str  # suspect / victim / ... for case links; "recipient" for deliveries
    label: str  # a masked name or a case number, enough to tell links apart


@dataclass(frozen=True, slots=True)
class RecordView:
    """A record as an official first sees it: every field masked."""

    record_id: str
    record_type: str
    fields: dict[str, str]
    links: list[LinkView] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "type": self.record_type,
            "fields": self.fields,
            "links": [
                {
                    "record_id": ln.record_id,
                    "type": ln.record_type,
                    "role": ln.role,
                    "label": ln.label,
                }
                for ln in self.links
            ],
        }


@dataclass(frozen=True, slots=True)
class LogExtract:
    """Access-log entries matching an auditor's filters, streamed, with the log's state
    when the reading was logged: its size and the largest size a signed checkpoint covers."""

    entries: Iterator[tuple[int, AccessEntry]]
    size: int
    signed: int

    def __iter__(self) -> Iterator[tuple[int, AccessEntry]]:
        return self.entries


@dataclass(frozen=True, slots=True)
class IndexCheck:
    """What `Vault.verify_records` found: counts, never a value, a token or a record id."""

    records: int  # records read
    tokens: int  # token rows re-derived from them
    missing: int  # rows a record should have and the index lacks: it is hidden from a search
    extra: int  # rows the index holds for a record that it should not
    repointed: int  # rows missing from one record and found on another
    unreadable: int  # records that do not open: tampered, so no token can be re-derived
    # Records linking to a record not stored: that link's index is left out for them, its
    # token being made from the linked record's value.
    partial: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.unreadable)

    def counts(self) -> dict[str, int]:
        return {
            "records": self.records,
            "tokens": self.tokens,
            "missing": self.missing,
            "extra": self.extra,
            "repointed": self.repointed,
            "unreadable": self.unreadable,
            "partial": self.partial,
        }


@dataclass
class _IndexTally:
    records: int = 0
    tokens: int = 0
    unreadable: int = 0
    partial: int = 0
    missing: Counter[tuple[int, int]] = field(default_factory=Counter)
    extra: Counter[tuple[int, int]] = field(default_factory=Counter)

    def record(
        self,
        expected: tuple[frozenset[tuple[int, int]], frozenset[int]] | None,
        held: Sequence[tuple[int, int]],
    ) -> None:
        self.records += 1
        if expected is None:
            self.unreadable += 1
            return
        tokens, skipped = expected
        self.partial += bool(skipped)
        self.tokens += len(tokens)
        stored = {pair for pair in held if pair[0] not in skipped}
        self.missing.update(tokens - stored)
        self.extra.update(stored - tokens)

    def result(self) -> IndexCheck:
        return IndexCheck(
            records=self.records,
            tokens=self.tokens,
            missing=sum(self.missing.values()),
            extra=sum(self.extra.values()),
            repointed=sum((self.missing & self.extra).values()),
            unreadable=self.unreadable,
            partial=self.partial,
        )


class Vault:
    def __init__(
        self,
        *,
        schema: Schema,
        schema_text: str,
        storage: Storage,
        codec: RecordCodec,
        material: KeyMaterial,
        token_bits: Mapping[int, int],
        access_log: AccessLog,
        accounts: AccountBook,
        clock: Clock,
        random: Random,
        operator: Operator | None = None,
        directory: Path | None = None,
        session_ttl: float = 8 * 3600,
    ) -> None:
        self.schema = schema  # public: field names, masks and labels are no secret
        self.directory = directory
        self._schema_text = schema_text
        self._storage = storage
        self._codec = codec
        self._material = material
        self._token_bits = dict(token_bits)
        self._log = access_log
        self._accounts = accounts
        self._clock = clock
        self._operator = operator
        self._stop_signing: list[threading.Event] = []
        self._keeper = Gatekeeper(
            store=storage,
            meta=storage,
            accounts=accounts,
            log=access_log,
            material=material,
            clock=clock,
            random=random,
            session_ttl=session_ttl,
        )
        self._gate = AccessGate(
            keeper=self._keeper,
            accounts=accounts,
            log=access_log,
            clock=clock,
            operator=operator,
            case_scope=self._case_scope,
        )
        self.admin = Administration(
            gate=self._gate,
            accounts=accounts,
            keeper=self._keeper,
            clock=clock,
            case_exists=lambda case_no: bool(self._case_scope(case_no)),
        )

    def __repr__(self) -> str:
        return f"Vault(origin={self._log.origin!r})"

    @property
    def operator(self) -> Operator:
        """The host operator this vault was opened with (by the composition root, with the
        keyring passphrase, on the host). A server's vault has none."""
        if self._operator is None:
            raise AuthenticationFailed("the host operator acts only on the host")
        return self._operator

    @property
    def log_verifier_key(self) -> str:
        """The access log's public key, as published for auditors and witnesses."""
        return self._log.verifier_key

    @property
    def log_origin(self) -> str:
        return self._log.origin

    def keep_signing(self, every: float = 60.0) -> None:
        """Sign the access log on a timer, idle or not, until the vault closes: what a
        server does, so that no entry waits long for a signature (and a witness)."""
        self._stop_signing.append(self._log.keep_signing(every))

    def close(self) -> None:
        for stop in self._stop_signing:
            stop.set()
        self._storage.close()

    # -- logging in (custodes.sessions) -------------------------------------------------

    def login(
        self,
        username: str,
        password: str,
        *,
        totp: str | None = None,
        passkey: passkeys.Assertion | None = None,
        client: str | None = None,
    ) -> Session:
        """A new session for a password and a second factor; see Gatekeeper.login."""
        return self._keeper.login(username, password, totp=totp, passkey=passkey, client=client)

    def session_for(self, token: str) -> Session:
        """The live session a bearer token stands for, or AuthenticationFailed."""
        return self._keeper.session_for(token)

    def csrf_token(self, session: Session) -> str:
        return self._keeper.csrf_token(session)

    def logout(self, session: Session) -> None:
        self._keeper.logout(session)

    def enrolment(self, code: str) -> Enrolment:
        """The TOTP secret for an enrolment code, to show once as a QR code."""
        return self._keeper.enrolment(code)

    def complete_enrolment(self, code: str, totp: str) -> str:
        """Confirm an enrolment with a first one-time code; the account's name."""
        return self._keeper.complete_enrolment(code, totp)

    def passkey_login_options(
        self, username: str, ceremony: passkeys.Ceremony, *, binding: bytes
    ) -> str:
        return self._keeper.passkey_login_options(username, ceremony, binding=binding)

    def passkey_registration_options(self, session: Session, ceremony: passkeys.Ceremony) -> str:
        """Options for navigator.credentials.create, bound to this session. Authorised
        like the registration itself, so an integration's token gets none."""
        live = self._gate.check(session)
        authorise(live.role, Action.PASSKEY_REGISTER, scope=live.scope)
        assert isinstance(live, Session)  # the policy gives the operator no passkeys
        return self._keeper.passkey_registration_options(live, ceremony)

    def register_passkey(
        self,
        session: Session,
        ceremony: passkeys.Ceremony,
        credential_json: str,
        *,
        label: str = "",
    ) -> Passkey:
        """Verify a navigator.credentials.create response made for a challenge of this
        session and store the passkey; logged as account:passkey:register."""

        def run(grant: Grant) -> Done[Passkey]:
            assert isinstance(grant.principal, Session)
            added = self._keeper.register_passkey(grant.principal, ceremony, credential_json, label)
            return Done(added, detail={"passkey": added.ref, "rp_id": added.rp_id})

        detail = {"account": session.username} if isinstance(session, Session) else {}
        return self._gate.access(session, Action.PASSKEY_REGISTER, run, detail=detail)

    def list_passkeys(self, session: Session) -> tuple[Passkey, ...]:
        """The passkeys of the session's own account."""
        live = self._gate.check(session)
        return self._accounts.list_passkeys(live.username)

    # -- reads of personal records ----------------------------------------------------

    def search(
        self,
        session: Principal,
        purpose: AccessPurpose,
        *,
        record_type: str,
        index: str,
        values: Mapping[str, str],
        limit: int = 20,
    ) -> list[RecordView]:
        """Records whose indexed fields equal the given values, masked."""
        rt = self._type(record_type)
        spec = self._index(rt, index, values)
        limit = max(1, min(limit, MAX_RESULTS))

        def run(grant: Grant) -> Done[list[RecordView]]:
            reach = grant.reach
            try:
                parts = query_parts(rt, spec, values)
            except SchemaError as exc:
                raise InvalidQuery(str(exc)) from None
            token = self._codec.token(spec, parts)
            # Tokens are truncated on purpose, so a bucket may hold other records: read a
            # few more than asked and keep only true matches, decided after decryption.
            candidates = self._storage.find(spec.index_id, token, limit * 4 + 16)
            views: list[RecordView] = []
            touched: list[str] = []
            probe = {c.field for c in spec.components}
            for stored in self._load(candidates):
                # Only the indexed fields decide a match: a bucket's other records are
                # dropped after decrypting those alone, and only a match is opened whole
                # (every field authenticated, as any record shown must be).
                if not self._matches(
                    rt, spec, parts, stored.record_id, self._codec.open(stored, probe)
                ):
                    continue
                opened = self._codec.open(stored)
                # Out of reach is as good as absent: neither shown nor counted, only
                # tallied for the log.
                if self._as_hidden_reporter(rt, spec, parts, opened, reach) or not reach.allows(
                    self._facts(rt, opened, reach), stored.record_id
                ):
                    reach.withheld += 1
                    continue
                views.append(self._view(rt, stored.record_id, opened, reach))
                touched.append(stored.record_id)
                if len(views) >= limit:
                    break
            return Done(views, touched)

        return self._gate.access(
            session,
            Action.SEARCH,
            run,
            purpose=purpose,
            record_type=record_type,
            detail={"index": spec.name},
            private={"values": dict(values)},
        )

    def record(self, session: Principal, purpose: AccessPurpose, record_id: str) -> RecordView:
        """One record, masked, with the records it links to and that link to it."""

        def run(grant: Grant) -> Done[RecordView]:
            reach = grant.reach
            stored = self._one(record_id)
            rt = self._codec.type_of(stored)
            opened = self._codec.open(stored)
            if not reach.allows(self._facts(rt, opened, reach), record_id):
                raise OutOfReach(rt.name)
            view = self._view(rt, record_id, opened, reach)
            touched = [record_id]
            for link in self._links(rt, stored.record_id, opened, reach):
                view.links.append(link)
                if link.record_id:
                    touched.append(link.record_id)
            return Done(view, touched, record_type=rt.name)

        return self._gate.access(
            session,
            Action.READ,
            run,
            purpose=purpose,
            detail={"target": record_id},
            target=record_id,
        )

    def reveal(
        self, session: Principal, purpose: AccessPurpose, record_id: str, field_name: str
    ) -> str | None:
        """One field of one record in the clear, or None if the record lacks it."""

        def run(grant: Grant) -> Done[str | None]:
            reach = grant.reach
            stored = self._one(record_id)
            rt = self._codec.type_of(stored)
            # Reach first: a record out of reach must fail exactly as a missing one does,
            # whatever field was asked for.
            opened = self._codec.open(stored, _fact_fields(rt))
            if not reach.allows(self._facts(rt, opened, reach), record_id):
                raise OutOfReach(rt.name)
            spec = rt.fields.get(field_name)
            if spec is None:
                known = ", ".join(rt.fields)
                raise InvalidQuery(f"record type {rt.name!r} has no such field (known: {known})")
            # Clearance depends on the field, known only once the record's type is.
            authorise(
                grant.role, Action.REVEAL, scope=grant.principal.scope, purpose=purpose, field=spec
            )
            if field_name not in opened:
                opened = self._codec.open(stored, (field_name,))
            value = opened.get(field_name)
            if spec.kind == "person_links" and value is not None and not reach.sees_reporters:
                value = _without_reporters(value)
            plain = None if value is None else _plain(value)
            return Done(plain, [record_id], record_type=rt.name)

        return self._gate.access(
            session,
            Action.REVEAL,
            run,
            purpose=purpose,
            # The field as the schema names it: a name typed where a field belongs is input
            # like a value, and stays off the log.
            detail={"target": record_id, "field": self._field_name(field_name)},
            target=record_id,
        )

    def _field_name(self, name: str) -> str:
        known = any(name in rt.fields for rt in self.schema.types.values())
        return name if known else "(not a field of the schema)"

    def count(self, record_type: str | None = None) -> int:
        """How many records are stored: a number, no personal data."""
        tag = None if record_type is None else self._codec.type_tag(record_type)
        return self._storage.count_records(tag)

    # -- the access log, for auditors --------------------------------------------------

    def read_log(
        self,
        session: Principal,
        purpose: AccessPurpose,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
        purpose_contains: str | None = None,
    ) -> LogExtract:
        """Stream access-log entries matching the filters. Auditors only; the query is
        itself logged, durably, before the first entry is returned. Text filters are
        normalised like the purposes they match, and refused if they hide a character:
        they are logged with the reading."""
        actor, action, purpose_contains = (
            _filter_text(name, value)
            for name, value in (
                ("actor", actor),
                ("action", action),
                ("purpose_contains", purpose_contains),
            )
        )
        filters = {
            k: v
            for k, v in {
                "actor": actor,
                "action": action,
                "since": since,
                "until": until,
                "purpose_contains": purpose_contains,
            }.items()
            if v is not None
        }
        self._gate.access(
            session,
            Action.LOG_READ,
            lambda _: Done(None),
            purpose=purpose,
            detail={"filters": filters},
        )
        needle = purpose_contains.casefold() if purpose_contains else None

        def matching() -> Iterator[tuple[int, AccessEntry]]:
            for index, entry in self._log.entries():
                if actor is not None and entry.actor != actor:
                    continue
                if action is not None and not entry.action.startswith(action):
                    continue
                if since is not None and entry.time < since:
                    continue
                if until is not None and entry.time >= until:
                    continue
                if needle is not None and needle not in (entry.purpose or "").casefold():
                    continue
                yield index, entry

        latest = self._log.latest_checkpoint()
        return LogExtract(matching(), self._log.size, latest[0] if latest else 0)

    def verify_log(
        self,
        session: Principal,
        purpose: AccessPurpose | None = None,
        *,
        outside: Sequence[OutsideCheckpoint] = (),
    ) -> VerifyReport:
        """Recompute the log from its entries and check every stored (and outside) signed
        checkpoint against it; LogTampered names the first bad position. Logged."""

        def run(_: Grant) -> Done[VerifyReport]:
            report = verify_log(
                self._storage, self._log.verifier_key, origin=self._log.origin, outside=outside
            )
            return Done(report, detail={"entries": report.entries})

        return self._gate.access(session, Action.LOG_VERIFY, run, purpose=purpose)

    def subject_report(
        self, session: Principal, purpose: AccessPurpose, record_id: str
    ) -> SubjectReport:
        """Every access to a person's records (theirs, and every record naming them) in
        log order, each proven in a signed checkpoint. Auditors only.

        The request is logged first (naming the person), then the report is read from the
        log: the report's own entry is in it, so the subject sees who asked. Raises
        TamperDetected if the log cannot prove an entry it holds, or that it holds every
        one (the subject index disagrees with the signed entries): never a short report.
        """

        def run(_: Grant) -> Done[list[str]]:
            records = [record_id, *self._incoming_links(record_id)]
            return Done(records, (record_id,))

        records, index = self._gate.access_then(
            session,
            Action.SUBJECT_REPORT,
            run,
            purpose=purpose,
            target=record_id,
        )
        return self._report(record_id, records, index)

    def _incoming_links(self, record_id: str, *, kinds: frozenset[str] | None = None) -> list[str]:
        """Every record that names a person (cases, deliveries), opening link fields only;
        with `kinds`, only those whose link field is of one of these kinds."""
        stored = self._storage.get_records([record_id]).get(record_id)
        if stored is None:
            # Without the record its source key is unknown, so the records naming it cannot
            # be found: refuse rather than hand out a report that looks complete and is not.
            raise RecordNotFound("no such record")
        rt = self._codec.type_of(stored)
        if len(rt.source_key) != 1:
            return []  # links refer to single-field source keys only
        key_field = rt.source_key[0]
        value = self._codec.open(stored, (key_field,)).get(key_field)
        if value is None:
            return []
        found: dict[str, None] = {}  # ordered and free of repeats
        for other_rt, index, token in self._codec.link_tokens(rt.name, str(value)):
            link_field = other_rt.fields[index.components[0].field]
            if kinds is not None and link_field.kind not in kinds:
                continue
            for candidate in self._find_all(index.index_id, token):
                # Tokens are truncated, so a bucket may hold records naming someone else:
                # only the decrypted link field decides.
                opened = self._codec.open(candidate, (link_field.name,))
                if role_of_link(link_field, opened.get(link_field.name), record_id) is not None:
                    found[candidate.record_id] = None
        return list(found)

    def _find_all(self, index_id: int, token: int) -> list[StoredRecord]:
        limit = _FIRST_PAGE
        while True:
            ids = self._storage.find(index_id, token, limit)
            if len(ids) < limit:
                break
            limit *= 4
        return self._load(ids)

    def _report(self, subject: str, records: list[str], report_index: int) -> SubjectReport:
        log = self._log
        latest = log.latest_checkpoint()
        note = latest[1] if latest is not None and latest[0] > report_index else log.checkpoint()
        # Check what is about to be handed out: a report the log cannot prove is not given.
        checkpoint = open_checkpoint(note, log.verifier_key)
        # Read from the signed tree and held against the subject index, not taken from the
        # index: a row deleted there must refuse the report, never shorten it.
        found = log.proven_entries_for(records, checkpoint)
        accesses = []
        for index, entry in found:
            leaf = log.raw_entry(index)
            if AccessEntry.decode(leaf) != entry:
                raise TamperDetected(f"the access log's entry {index} changed while being read")
            proof = tuple(log.inclusion_proof(index, checkpoint.size))
            check_inclusion(leaf, index, proof, checkpoint)
            accesses.append(
                ReportedAccess(
                    index=index,
                    time=iso_time(entry.time),
                    actor=entry.actor,
                    role=entry.role,
                    action=entry.action,
                    outcome=entry.outcome,
                    purpose=entry.purpose,
                    case_ref=entry.case_ref,
                    records=tuple(r for r in records if r in entry.records),
                    private=log.private_details(index),
                    leaf=leaf,
                    proof=proof,
                )
            )
        return SubjectReport(
            origin=log.origin,
            subject=subject,
            linked=tuple(records[1:]),
            checkpoint_note=note,
            checkpoint=checkpoint,
            accesses=tuple(accesses),
            report_index=report_index,
        )

    def verify_records(self, principal: Principal) -> IndexCheck:
        """Re-derive every stored record's blind-index tokens with the vault's keys and hold
        them against the token rows a search reads; counts only, never a value or a token.
        A row deleted or repointed hides a record from search; nothing else would notice.
        Auditors and the host operator; logged with its counts."""

        def run(_: Grant) -> Done[IndexCheck]:
            check = _IndexTally()
            after = 0
            while page := self._storage.record_tokens(after, _CHECK_PAGE):
                after = page[-1][0]
                stored = self._storage.get_records([row[1] for row in page])
                names = self._linked_source_keys(stored.values())
                for _position, rid, held in page:
                    record = stored.get(rid)
                    expected = None if record is None else self._expected_tokens(record, names)
                    check.record(expected, held)
            result = check.result()
            return Done(result, detail=result.counts())

        return self._gate.access(principal, Action.RECORDS_VERIFY, run)

    def _linked_source_keys(self, records: Iterable[StoredRecord]) -> dict[str, str]:
        """The source-key value of every record the given ones link to (a link is stored
        as the keyed id, the token is made from the value): record id -> value."""
        wanted: dict[str, RecordType] = {}
        for stored in records:
            try:
                rt = self._codec.type_of(stored)
                links = [f for f in rt.fields.values() if f.ref is not None]
                if not links:
                    continue
                opened = self._codec.open(stored, [f.name for f in links])
            except TamperDetected:
                continue
            for spec in links:
                value = opened.get(spec.name)
                ref = self.schema.types.get(spec.ref or "")
                if value is None or ref is None or len(ref.source_key) != 1:
                    continue
                ids = [value] if spec.kind == "person_ref" else [r for r, _ in value]  # type: ignore[attr-defined]
                for rid in ids:
                    wanted[str(rid)] = ref
        found: dict[str, str] = {}
        for rid, target in self._storage.get_records(list(wanted)).items():
            key_field = wanted[rid].source_key[0]
            try:
                if self._codec.type_of(target).name != wanted[rid].name:
                    continue
                value = self._codec.open(target, (key_field,)).get(key_field)
            except TamperDetected:
                continue
            if value is not None:
                found[rid] = str(value)
        return found

    def _expected_tokens(
        self, stored: StoredRecord, linked: Mapping[str, str]
    ) -> tuple[frozenset[tuple[int, int]], frozenset[int]] | None:
        """The tokens ingest wrote for a stored record and the indexes left out (a link to
        a record not stored), or None if the record does not open."""
        try:
            rt = self._codec.type_of(stored)
            values = self._codec.open(stored)
        except TamperDetected:
            return None
        canonical: dict[str, object] = dict(values)
        unresolved: set[str] = set()
        for spec in rt.fields.values():
            value = values.get(spec.name)
            if spec.ref is None or value is None:
                continue
            links = [(value, "")] if spec.kind == "person_ref" else list(value)  # type: ignore[call-overload]
            ids = [str(r) for r, _ in links]
            if any(r not in linked for r in ids):
                unresolved.add(spec.name)
                del canonical[spec.name]
            elif spec.kind == "person_ref":
                canonical[spec.name] = linked[ids[0]]
            else:
                roles = [role for _, role in links]
                canonical[spec.name] = tuple(zip((linked[r] for r in ids), roles, strict=True))
        skipped = frozenset(
            ix.index_id
            for ix in rt.indexes.values()
            if any(c.field in unresolved for c in ix.components)
        )
        # Sealed afresh only for its tokens: the same code that wrote them at ingest, decoys
        # included, so the check cannot drift from what ingest does.
        sealed = self._codec.seal(CanonicalRecord(rt.name, canonical, 0))
        if sealed.record_id != stored.record_id:
            return None
        return frozenset(t for t in sealed.tokens if t[0] not in skipped), skipped

    # -- the host operator's work: ingest, checkpoints, witnesses ----------------------------

    def ingest(self, operator: Principal, source: Path | str, **options: Any) -> IngestReport:
        """Ingest a file; see custodes.ingest.run_ingest for the options. Logged with its
        counts once it has run (a failure is logged too, with its kind)."""
        target = IngestTarget(
            self.schema,
            self._schema_text,
            self._material,
            self._token_bits,
            self._storage.write_batch,
        )

        def run(_: Grant) -> Done[IngestReport]:
            report = run_ingest(target, source, **options)
            counts = {
                "accepted": report.accepted,
                "already_present": report.already_present,
                "rejected": report.rejected,
            }
            return Done(report, detail=counts)

        return self._gate.access(operator, Action.INGEST, run)

    def checkpoint(self, operator: Principal) -> bytes:
        """Sign a checkpoint of the log as it is now; the signed note."""
        return self._gate.access(
            operator, Action.LOG_CHECKPOINT, lambda _: Done(self._log.checkpoint())
        )

    def publish_checkpoint(self, operator: Principal, url: str) -> int:
        """Send the latest checkpoint to a witness and store its cosignature beside it;
        the size cosigned."""

        def run(_: Grant) -> Done[int]:
            log = self._log
            note = log.checkpoint()
            size = log.size
            old_size = 0
            for _attempt in range(2):
                proof = log.consistency_proof(old_size, size) if 0 < old_size < size else []
                try:
                    lines = submit_checkpoint(url, note, old_size, proof)
                    break
                except Conflict as conflict:
                    # The witness says which size it holds; prove consistency from there.
                    old_size = conflict.size
            else:
                raise ConfigurationError("the witness keeps changing its size; try again")
            cosigned = (
                note
                + "".join(line if line.endswith("\n") else line + "\n" for line in lines).encode()
            )
            self._storage.put_checkpoint(size, cosigned)
            return Done(size, detail={"size": size})

        return self._gate.access(operator, Action.WITNESS_PUBLISH, run, detail={"witness": url})

    # -- what an assigned case opens ---------------------------------------------------

    def _case_scope(self, case_no: str) -> frozenset[str]:
        """The records a case names: the case itself, every person it links (reporters
        too), and the records about one of those people (a delivery to them). What an
        assignment to the case opens, and nothing else; empty if no such case is stored."""
        scope: set[str] = set()
        for case_id, rt, opened in self._cases_numbered(case_no):
            scope.add(case_id)
            for person_id in _linked_people(rt, opened):
                scope.add(person_id)
                # Another case naming the person is not this case's; a record about them
                # alone (a delivery) is.
                try:
                    scope.update(self._incoming_links(person_id, kinds=_ABOUT))
                except RecordNotFound:
                    continue
        return frozenset(scope)

    def _cases_numbered(self, case_no: str) -> Iterator[tuple[str, RecordType, Values]]:
        """The stored records whose case-number field equals `case_no`, opened."""
        for rt in self.schema.types.values():
            for spec in rt.indexes.values():
                if len(spec.components) != 1 or rt.fields[spec.field_names[0]].kind != "case_no":
                    continue
                try:
                    parts = query_parts(rt, spec, {spec.field_names[0]: case_no})
                except SchemaError:
                    continue
                token = self._codec.token(spec, parts)
                for stored in self._load(self._storage.find(spec.index_id, token, MAX_RESULTS)):
                    opened = self._codec.open(stored)
                    if self._matches(rt, spec, parts, stored.record_id, opened):
                        yield stored.record_id, rt, opened

    # -- record-level facts -------------------------------------------------------------

    def _facts(self, rt: RecordType, values: Values, reach: Reach) -> RecordFacts:
        """The district (and, for people, minority) of a decrypted record."""
        for spec in rt.fields.values():
            if spec.kind == "national_id":
                number = values.get(spec.name)
                return RecordFacts(
                    district_of_national_id(number),
                    is_minor(values.get("birth_date"), number, reach.today),
                )
        for spec in rt.fields.values():
            if spec.kind == "case_no":
                district = district_of_case_no(values.get(spec.name))
                if district is not None:
                    return RecordFacts(district)
        for spec in rt.fields.values():
            value = values.get(spec.name)
            if spec.kind == "person_links" and value:
                first = value[0][0]  # type: ignore[index]
                return RecordFacts(self._person_district(str(first), reach))
            if spec.kind == "person_ref" and value:
                # A record about one person (a delivery to them: their name, phone and
                # address) is theirs, and a minor's needs the clearance theirs does.
                return self._person_facts(str(value), reach)
        return RecordFacts(None)

    def _person_facts(self, record_id: str, reach: Reach) -> RecordFacts:
        """The district and minority of a stored person, opening only what decides them."""
        stored = self._storage.get_records([record_id]).get(record_id)
        if stored is None:
            return RecordFacts(None)
        rt = self._codec.type_of(stored)
        if not any(spec.kind == "national_id" for spec in rt.fields.values()):
            return RecordFacts(None)
        facts = self._facts(rt, self._codec.open(stored, _fact_fields(rt)), reach)
        reach.districts[record_id] = facts.district
        return facts

    def _person_district(self, record_id: str, reach: Reach) -> str | None:
        if record_id in reach.districts:
            return reach.districts[record_id]
        district: str | None = None
        stored = self._storage.get_records([record_id]).get(record_id)
        if stored is not None:
            rt = self._codec.type_of(stored)
            names = [s.name for s in rt.fields.values() if s.kind == "national_id"]
            if names:
                district = district_of_national_id(self._codec.open(stored, names).get(names[0]))
        reach.districts[record_id] = district
        return district

    def _as_hidden_reporter(
        self,
        rt: RecordType,
        spec: IndexSpec,
        parts: tuple[str, ...],
        values: Values,
        reach: Reach,
    ) -> bool:
        """Whether a record matched a link search only as naming the person its reporter,
        which an official below investigator may not learn."""
        if reach.sees_reporters:
            return False
        link = rt.fields[spec.components[0].field]
        if link.ref is None or link.kind != "person_links":
            return False
        target = self._codec.record_id(link.ref, parts)
        return role_of_link(link, values.get(link.name), target) == REPORTER

    # -- helpers ----------------------------------------------------------------------

    # A search is refused in the schema's words only: what a caller sends as a type, an
    # index or a key is input like a value (a person's name makes a fine JSON key), and
    # comes back in no error, on no terminal, in no log.

    def _type(self, name: str) -> RecordType:
        rt = self.schema.types.get(name)
        if rt is None:
            known = ", ".join(sorted(self.schema.types))
            raise InvalidQuery(f"unknown record type (known: {known})")
        return rt

    def _index(self, rt: RecordType, name: str, values: Mapping[str, str]) -> IndexSpec:
        spec = rt.indexes.get(name)
        if spec is None:
            known = ", ".join(sorted(rt.indexes))
            raise InvalidQuery(f"record type {rt.name!r} has no such index (known: {known})")
        if not set(values) <= set(spec.field_names):
            fields = ", ".join(spec.field_names)
            raise InvalidQuery(f"index {spec.name!r} searches only by: {fields}")
        missing = [f for f in spec.field_names if not values.get(f)]
        if missing:
            raise InvalidQuery(f"index {spec.name!r} needs a value for {', '.join(missing)}")
        # A name typed in Latin letters is looked up in the pinyin twin of a name index.
        for comp in spec.components:
            named = comp.transform == "" and rt.fields[comp.field].kind == "name"
            if named and not is_han(values[comp.field]):
                twin = _pinyin_twin(rt, spec)
                if twin is None:
                    raise InvalidQuery(f"index {spec.name!r} needs the name in Han characters")
                return twin
        return spec

    def _matches(
        self,
        rt: RecordType,
        spec: IndexSpec,
        parts: tuple[str, ...],
        record_id: str,
        opened: Values,
    ) -> bool:
        """Whether a decrypted candidate truly carries the searched values."""
        link = rt.fields[spec.components[0].field]
        if link.ref is not None:
            # Links are stored as the target's record id, not its source key.
            target = self._codec.record_id(link.ref, parts)
            return role_of_link(link, opened.get(link.name), target) is not None
        return parts in index_parts(rt, spec, opened)

    def _one(self, record_id: str) -> StoredRecord:
        stored = self._storage.get_records([record_id]).get(record_id)
        if stored is None:
            raise RecordNotFound("no such record")
        return stored

    def _load(self, record_ids: Sequence[str]) -> list[StoredRecord]:
        found = self._storage.get_records(record_ids)
        return [found[r] for r in record_ids if r in found]

    def _view(self, rt: RecordType, record_id: str, values: Values, reach: Reach) -> RecordView:
        masked: dict[str, str] = {}
        for name, spec in rt.fields.items():
            if name not in values:
                continue
            value = values[name]
            if spec.kind == "person_links" and not reach.sees_reporters:
                value = _without_reporters(value)
            masked[name] = mask_value(spec, value)
        return RecordView(record_id, rt.name, masked)

    def _label(self, rt: RecordType, values: Values) -> str:
        for spec in rt.fields.values():
            if spec.kind in ("name", "case_no") and spec.name in values:
                return mask_value(spec, values[spec.name])
        return mask_value(rt.fields[rt.source_key[0]], values.get(rt.source_key[0], ""))

    def _links(
        self, rt: RecordType, record_id: str, values: Values, reach: Reach
    ) -> list[LinkView]:
        """The records this one names and those that name it, as far as the official may
        see them: links out of reach are left out, reporters hidden below investigator."""
        links: list[LinkView] = []
        # Outgoing: the people a case or a delivery names.
        outgoing: list[tuple[str, str, str]] = []
        for spec in rt.fields.values():
            if spec.kind == "person_links" and spec.name in values:
                for rid, role in values[spec.name]:  # type: ignore[attr-defined]
                    outgoing.append((str(rid), str(spec.ref), str(role)))
            elif spec.kind == "person_ref" and spec.name in values:
                outgoing.append((str(values[spec.name]), str(spec.ref), spec.name))
        found = self._storage.get_records([rid for rid, _, _ in outgoing])
        for rid, ref_type, role in outgoing:
            target = found.get(rid)
            if target is None or self._codec.type_of(target).name != ref_type:
                continue
            if role == REPORTER and not reach.sees_reporters:
                # That a case has a reporter is no secret; who it is, is.
                links.append(LinkView("", ref_type, role, PROTECTED_REPORTER))
                continue
            target_rt = self.schema.types[ref_type]
            opened = self._codec.open(target)
            if not reach.allows(self._facts(target_rt, opened, reach), rid):
                reach.withheld += 1
                continue
            links.append(LinkView(rid, ref_type, role, self._label(target_rt, opened)))
        # Incoming: records that name this one, found through their link indexes.
        if len(rt.source_key) == 1 and rt.source_key[0] in values:
            source_value = str(values[rt.source_key[0]])
            for other_rt, index, token in self._codec.link_tokens(rt.name, source_value):
                link_field = other_rt.fields[index.components[0].field]
                for stored in self._load(self._storage.find(index.index_id, token, MAX_RESULTS)):
                    opened = self._codec.open(stored)
                    role = role_of_link(link_field, opened.get(link_field.name), record_id)
                    if role is None:
                        continue
                    # A person's page must not tell an officer that they reported a crime.
                    hidden = role == REPORTER and not reach.sees_reporters
                    facts = self._facts(other_rt, opened, reach)
                    if hidden or not reach.allows(facts, stored.record_id):
                        reach.withheld += 1
                        continue
                    label = self._label(other_rt, opened)
                    links.append(LinkView(stored.record_id, other_rt.name, role, label))
        return links


def _linked_people(rt: RecordType, values: Values) -> list[str]:
    """The record ids of the people a record's person-links fields name."""
    return [
        str(person_id)
        for spec in rt.fields.values()
        if spec.kind == "person_links"
        for person_id, _role in values.get(spec.name) or ()  # type: ignore[attr-defined]
    ]


def _filter_text(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return one_line(value)
    except HiddenCharacter as exc:
        raise InvalidQuery(f"the filter {name} {exc}") from None


def _pinyin_twin(rt: RecordType, spec: IndexSpec) -> IndexSpec | None:
    wanted = tuple(
        (c.field, "pinyin" if rt.fields[c.field].kind == "name" else c.transform)
        for c in spec.components
    )
    for other in rt.indexes.values():
        if tuple((c.field, c.transform) for c in other.components) == wanted:
            return other
    return None


def _fact_fields(rt: RecordType) -> tuple[str, ...]:
    """The fields the record-level rules read (see Vault._facts)."""
    kinds = ("national_id", "case_no", "person_links", "person_ref")
    return tuple(
        name for name, spec in rt.fields.items() if spec.kind in kinds or name == "birth_date"
    )


def _without_reporters(value: object) -> object:
    """A person-links value without its reporters (their record ids included)."""
    if not isinstance(value, tuple):
        return value
    return tuple(link for link in value if link[1] != REPORTER)


def _plain(value: object) -> str:
    if isinstance(value, tuple):
        return "; ".join(f"{role}:{rid}" for rid, role in value)
    return str(value)
