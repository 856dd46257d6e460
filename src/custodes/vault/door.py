"""The vault: the only door to personal records and to the access log.

Every operation that reads personal data or the log, or changes an account or the log,
is a method here (or of `vault.admin`, the account administration it owns) and passes
the one access function, `AccessGate.access` (custodes.access): the principal checked
afresh, one decision by custodes.policy, the operation run in memory, its access-log
entry durable, and only then the answer. Storage, the codec, the log and the accounts
are private to it; logins and sessions are custodes.sessions', reached through here.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from custodes import passkeys
from custodes.access import AccessGate, Done, Grant, OutOfReach
from custodes.accounts import BUDGET, AccountBook, Enrolment, Passkey
from custodes.administration import Administration
from custodes.alert_book import AlertBook, AlertState, RecordedAlert
from custodes.alerts import Dispatcher
from custodes.audit import AccessEntry, AccessLog, Outcome, sequencer
from custodes.audit.checkpoint import LogLoss
from custodes.audit.erasures import ErasureLedger
from custodes.audit.report import (
    ReportedAccess,
    SubjectReport,
    check_inclusion,
    iso_time,
    open_checkpoint,
)
from custodes.audit.sequencer import SequencerAddress, SequencerClient
from custodes.audit.verify import OutsideCheckpoint, VerifyReport, verify_log
from custodes.audit.witness import Witnessed, WitnessPusher, witness_checkpoint
from custodes.backup.manifest import BackupMade, BackupSource
from custodes.canaries import CanaryList, canary_people
from custodes.codec import RecordCodec
from custodes.crypto import KeyMaterial
from custodes.crypto.row_mac import RowMacs
from custodes.errors import (
    AccessDenied,
    AuthenticationFailed,
    ConfigurationError,
    ErasureLedgerBroken,
    InvalidQuery,
    RecordNotFound,
    SchemaError,
    TamperDetected,
)
from custodes.freetext import HiddenCharacter, one_line
from custodes.ingest import IngestReport, IngestTarget, run_ingest
from custodes.key_watch import GRACE_SECONDS, KeyWatch
from custodes.policy import (
    AccessPurpose,
    Action,
    authorise,
)
from custodes.policy.anomaly import GuardSettings, Score, Verdict
from custodes.policy.budgets import budget_for
from custodes.records import query_orders, query_parts
from custodes.schema import Schema
from custodes.sessions import (
    Clock,
    Gatekeeper,
    Operator,
    Principal,
    Random,
    Session,
)
from custodes.storage.base import SealedRecord, Storage, StoredRecord
from custodes.vault.erasure import Erasures
from custodes.vault.exports import Exports
from custodes.vault.guard import AnomalyGuard, flagged_records, store_flagged
from custodes.vault.integrity import IndexAudit, IndexCheck
from custodes.vault.reading import MAX_RESULTS, RecordReader, fact_fields, plain, without_reporters
from custodes.vault.rotation import (
    CURSOR_KEY,
    MAX_PASSES,
    STARTED_KEY,
    RotationState,
    Sweeper,
    behind,
    old_index_ids,
)
from custodes.vault.rotation import (
    PAGE as ROTATION_PAGE,
)
from custodes.vault.views import LogExtract, RecordView

# The operational log: counts and kinds of failure, never a value.
logger = logging.getLogger("custodes.vault")


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
        erasure_ledger: ErasureLedger,
        session_ttl: float = 8 * 3600,
        guard_settings: GuardSettings | None = None,
        key_watch: KeyWatch | None = None,
    ) -> None:
        self.schema = schema  # public: field names, masks and labels are no secret
        self.directory = directory
        self._schema_text = schema_text
        self._storage = storage
        self._codec = codec
        self._reader = RecordReader(schema, storage, codec, erasure_ledger.current)
        self._material = material
        self._token_bits = dict(token_bits)
        self._log = access_log
        self._accounts = accounts
        self._clock = clock
        self._operator = operator
        self._stop_signing: list[threading.Event] = []
        self._sequencer: SequencerClient | None = None
        self._dispatcher: Dispatcher | None = None
        self._guard_settings = guard_settings or GuardSettings()
        self._guard: AnomalyGuard | None = None
        self._guard_thread: threading.Thread | None = None
        self._retention_thread: threading.Thread | None = None
        self._macs = RowMacs(material)
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
        self._alert_book = AlertBook(storage, RowMacs(material))
        self._canaries = CanaryList(storage, material)
        housekeeper = Operator(username="vault")
        self._gate = AccessGate(
            keeper=self._keeper,
            accounts=accounts,
            log=access_log,
            clock=clock,
            operator=operator,
            case_scope=self._reader.case_scope,
            usage=storage,
            alert_book=self._alert_book,
            canaries=self._canaries,
            keys=None if key_watch is None else key_watch.check,
            housekeeper=housekeeper,
        )
        self._key_watch = key_watch
        if key_watch is not None:
            key_watch.on_change(self._adopt_keys)
        self.admin = Administration(
            gate=self._gate,
            accounts=accounts,
            keeper=self._keeper,
            clock=clock,
            case_exists=lambda case_no: bool(self._reader.case_scope(case_no)),
        )
        # Bulk exports (two people, sealed to a recipient, fingerprinted) and leak tracing.
        self.exports = Exports(
            gate=self._gate,
            storage=storage,
            codec=codec,
            reader=self._reader,
            log=access_log,
            schema=schema,
            material=material,
            clock=clock,
            random=random,
        )
        # Erasure on two people's word, retention, and the ledger that outlives restores.
        self.erasures = Erasures(
            gate=self._gate,
            storage=storage,
            codec=codec,
            schema=schema,
            ledger=erasure_ledger,
            material=material,
            clock=clock,
            random=random,
            housekeeper=housekeeper,
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

    def keep_signing(self, every: float = 60.0, *, witnesses: Sequence[str] = ()) -> None:
        """Sign the access log on a timer, idle or not, until the vault closes: what a
        server does, so that no entry waits long for a signature. Each new signed
        checkpoint also goes to every witness in `witnesses` (their addresses) within
        about a round, with its cosignature stored beside it; a push is no official's
        access and puts nothing on the log, which would otherwise never stop growing."""
        pusher = WitnessPusher(witnesses, self._witness, every=every) if witnesses else None
        on_signed = pusher.signed if pusher is not None else None
        self._stop_signing.append(self._log.keep_signing(every, on_signed))
        if pusher is not None:
            self._stop_signing.append(pusher.start())

    def sequence_log_through(self, address: SequencerAddress) -> None:
        """Have the log sequencer at `address` append this process's access-log entries
        (custodes.audit.sequencer): a server worker's setting when several share the log."""
        self._sequencer = SequencerClient(address)
        self._log.sequence_through(self._sequencer)

    def run_log_sequencer(self, listener: socket.socket, secret: bytes) -> threading.Event:
        """Append, on this vault's log, the entries the server's workers hand over on
        `listener`, until the event returned is set: the sequencer process's work."""
        stop = threading.Event()
        self._stop_signing.append(stop)
        threading.Thread(
            target=sequencer.serve,
            args=(listener, secret, self._log.append_encoded_many, stop),
            name="custodes-log-sequencer",
            daemon=True,
        ).start()
        return stop

    def send_alerts(self, dispatcher: Dispatcher) -> None:
        """Send every alert raised from now on to the dispatcher's destinations (a
        webhook, syslog), once its refusal is on the access log; closed with the vault."""
        self._dispatcher = dispatcher
        self._gate.send_alerts_to(dispatcher.raise_alert)

    # -- the anomaly guard (custodes.vault.guard, custodes.policy.anomaly) ----------------

    def _new_guard(self) -> AnomalyGuard:
        return AnomalyGuard(
            log=self._log,
            meta=self._storage,
            accounts=self._accounts,
            macs=self._macs,
            settings=self._guard_settings,
        )

    def guard_round(self) -> list[Score]:
        """One round of the guard: read the log since its last round, score every official
        active today, and act on each score above a threshold it has not yet acted on today
        (AccessGate.act_on_anomaly: logged, alerted); the scores acted on. What a server's
        guard thread runs (keep_guarding); it opens no record and adds nothing to a read."""
        if self._guard is None:
            self._guard = self._new_guard()
        guard = self._guard
        guard.catch_up(keep=True)
        acted = []
        for finding in guard.findings(self._clock()):
            found = finding.score
            verdict = finding.verdict
            if verdict > Verdict.ALERT and self._unmetered(found.account):
                # An administrator lifted every limit of this account's views (a
                # measurement, a drill: work no person does by hand, on the log): the
                # guard tells, but does not stop what was allowed on purpose.
                verdict = Verdict.ALERT
            self._gate.act_on_anomaly(
                found.account,
                found.role,
                verdict=verdict.name.lower(),
                called_for=finding.verdict.name.lower(),
                severity=verdict.severity,
                score=found.points,
                signals=found.signals,
                explained=found.explained(),
                records=found.records,
                end_sessions=verdict >= Verdict.STEP_UP,
                lock=verdict is Verdict.LOCK,
            )
            guard.acted(finding)
            acted.append(found)
        return acted

    def _unmetered(self, username: str) -> bool:
        """Whether the account's own budget lifts every limit of its views."""
        account = self._accounts.get(username)
        if account is None:
            return False
        try:
            budget = budget_for(account.role, account.attributes.get(BUDGET))
        except ConfigurationError:  # a budget that no read would pass either
            return False
        return budget is not None and not any(
            name.startswith("views_") for name, *_ in budget.limits()
        )

    def keep_guarding(self, every: float = 10.0) -> None:
        """Run a guard round every `every` seconds until the vault closes: one process of
        a server does (its single worker, or the log sequencer beside several)."""
        stop = threading.Event()
        self._stop_signing.append(stop)

        def run() -> None:
            while not stop.wait(every):
                try:
                    self.guard_round()
                except Exception as exc:  # the next round tries again
                    logger.error("the anomaly guard's round failed (%s)", type(exc).__name__)

        thread = threading.Thread(target=run, name="custodes-guard", daemon=True)
        thread.start()
        # Closing waits for a round under way: it must not find its storage closed.
        self._guard_thread = thread

    def keep_retaining(self, every: float = 3600.0) -> None:
        """Run the schema's retention rules every `every` seconds until the vault closes:
        one process of a server does, beside its guard. Each expired batch is one short
        write, so reads go on meanwhile."""
        stop = threading.Event()
        self._stop_signing.append(stop)

        def run() -> None:
            while not stop.wait(every):
                try:
                    self.erasures.retention_round(stop=stop)
                except Exception as exc:  # the next pass tries again
                    logger.error("the retention pass failed (%s)", type(exc).__name__)

        thread = threading.Thread(target=run, name="custodes-retention", daemon=True)
        thread.start()
        self._retention_thread = thread

    def score_accounts(self, principal: Principal) -> list[Score]:
        """Every official active today, scored with its explanation, highest first; read
        from the log afresh, acting on none (`custodes guard score`). Logged, with counts."""

        def run(_: Grant) -> Done[list[Score]]:
            guard = self._new_guard()
            guard.catch_up(keep=False)
            scores = guard.scores(self._clock())
            above = sum(1 for s in scores if s.verdict is not Verdict.NONE)
            return Done(scores, detail={"accounts": len(scores), "above_alert": above})

        return self._gate.access(principal, Action.GUARD_SCORE, run)

    def flag_record(self, operator: Principal, record_id: str) -> bool:
        """Flag a record for the guard (a public figure's, say): any account's first read of
        it raises an alert. Whether it was not flagged already. Logged, naming the record."""

        def run(_: Grant) -> Done[bool]:
            if not self._storage.get_records([record_id]):
                raise RecordNotFound("no such record")
            flagged = flagged_records(self._storage, self._macs)
            if record_id in flagged:
                return Done(False, detail={"flagged": len(flagged)})
            flagged[record_id] = self._log.size
            store_flagged(self._storage, self._macs, flagged)
            return Done(True, detail={"flagged": len(flagged)})

        return self._gate.access(operator, Action.GUARD_FLAG, run, target=record_id)

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close()
        for stop in self._stop_signing:
            stop.set()
        if self._guard_thread is not None:
            self._guard_thread.join(30)
        if self._retention_thread is not None:
            self._retention_thread.join(30)
        if self._sequencer is not None:
            self._log.sequence_through(None)
            self._sequencer.close()
        try:
            self._gate.close()
        finally:
            try:
                self._storage.close()
            finally:
                # A token session of this vault's, if its KEKs are in one.
                self._codec.close()

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
        offset: int = 0,
    ) -> list[RecordView]:
        """Records whose indexed fields equal the given values, masked: at most `limit`,
        after the first `offset` (a later page of the same search). A page beyond the
        account's paging limits is refused, and logged; none goes beyond MAX_RESULTS."""
        rt = self._reader.type(record_type)
        spec = self._reader.index(rt, index, values)
        limit = max(1, limit)
        if offset < 0 or offset + limit > MAX_RESULTS:
            raise InvalidQuery(f"a search shows at most {MAX_RESULTS} records in all")
        wanted = offset + limit

        def run(grant: Grant) -> Done[list[RecordView]]:
            reach = grant.reach
            try:
                # A name in pinyin is tried in both orders, within this one logged search.
                orders = query_orders(rt, spec, values)
            except SchemaError as exc:
                raise InvalidQuery(str(exc)) from None
            # Tokens are truncated on purpose, so a bucket may hold other records: read a
            # few more than asked and keep only true matches, decided after decryption.
            candidates = [
                (parts, stored)
                for parts in orders
                for stored in self._reader.bucket(self._codec.probe(spec, parts), wanted * 4 + 16)
            ]
            views: list[RecordView] = []
            touched: list[str] = []
            probe = {c.field for c in spec.components}
            seen: set[str] = set()
            for parts, stored in candidates:
                if stored.record_id in seen:
                    continue  # in the buckets of both orders
                seen.add(stored.record_id)
                # Only the indexed fields decide a match: a bucket's other records are
                # dropped after decrypting those alone, and only a match is opened whole
                # (every field authenticated, as any record shown must be).
                if not self._reader.matches(
                    rt, spec, parts, stored.record_id, self._codec.open(stored, probe)
                ):
                    continue
                opened = self._codec.open(stored)
                # Out of reach is as good as absent: neither shown nor counted, only
                # tallied for the log.
                # A hidden reporter is dropped before its facts are read (they may cost a
                # read of the person a case names first).
                if self._reader.as_hidden_reporter(
                    rt, spec, parts, opened, reach
                ) or not reach.allows(self._reader.facts(rt, opened, reach), stored.record_id):
                    reach.withheld += 1
                    continue
                views.append(self._reader.view(rt, stored.record_id, opened, reach))
                touched.append(stored.record_id)
                if len(views) >= wanted:
                    break
            # The earlier pages' records were opened to count them, not shown: only this
            # page is returned, and only it is logged as returned.
            return Done(views[offset:], touched[offset:])

        return self._gate.access(
            session,
            Action.SEARCH,
            run,
            purpose=purpose,
            record_type=record_type,
            detail={"index": spec.name, **({"offset": offset} if offset else {})},
            private={"values": dict(values)},
            page=(offset, limit),
        )

    def record(self, session: Principal, purpose: AccessPurpose, record_id: str) -> RecordView:
        """One record, masked, with the records it links to and that link to it."""

        def run(grant: Grant) -> Done[RecordView]:
            reach = grant.reach
            stored = self._reader.one(record_id)
            rt = self._codec.type_of(stored)
            opened = self._codec.open(stored)
            if not reach.allows(self._reader.facts(rt, opened, reach), record_id):
                raise OutOfReach(rt.name)
            view = self._reader.view(rt, record_id, opened, reach)
            touched = [record_id]
            for link in self._reader.links(rt, stored.record_id, opened, reach):
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
            stored = self._reader.one(record_id)
            rt = self._codec.type_of(stored)
            # Reach first: a record out of reach must fail exactly as a missing one does,
            # whatever field was asked for.
            opened = self._codec.open(stored, fact_fields(rt))
            if not reach.allows(self._reader.facts(rt, opened, reach), record_id):
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
                value = without_reporters(value)
            shown = None if value is None else plain(value)
            return Done(shown, [record_id], record_type=rt.name)

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
            erased = self._erasures_on_the_log()
            return Done(report, detail={"entries": report.entries, "erased": erased})

        return self._gate.access(session, Action.LOG_VERIFY, run, purpose=purpose)

    def _erasures_on_the_log(self) -> int:
        """Hold the erasure ledger against the log: every record an erasure entry names
        (sealed beside it; the ledger is written first) must be on the ledger, or the
        ledger was cut or put back from an older copy of itself, which its own chain
        cannot show. How many records the log says were erased."""
        named: set[str] = set()
        for index, entry in self._log.entries():
            if entry.action == Action.ERASE.value and entry.outcome == Outcome.GRANTED:
                details = self._log.private_details(index) or {}
                named.update(str(r) for r in details.get("records", ()))
        missing = named - self.erasures.ledgered()
        if missing:
            raise ErasureLedgerBroken(
                f"the erasure ledger lacks {len(missing)} records the access log says were "
                "erased: it was cut, or put back from an older copy of itself"
            )
        return len(named)

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
            if self.erasures.erased(record_id) is not None:
                # Erased: the record's source key went with it, so the records that named
                # the person cannot be found; the report says it was erased.
                return Done([record_id], (record_id,))
            records = [record_id, *self._reader.incoming_links(record_id)]
            return Done(records, (record_id,))

        records, index = self._gate.access_then(
            session,
            Action.SUBJECT_REPORT,
            run,
            purpose=purpose,
            target=record_id,
        )
        return self._report(record_id, records, index)

    def subject_lookup(
        self, session: Principal, purpose: AccessPurpose, national_id: str
    ) -> str | None:
        """The record id of the person whose resident ID number this is, or None: how an
        auditor starts a subject access request from the number a citizen brings. Only
        the id is returned; the record is opened for its ID number alone, and the lookup
        is logged (naming the person, the number sealed beside the entry). Auditors only."""
        rt = self._reader.type("person")
        spec = self._reader.index(rt, "national_id", {"national_id": national_id})

        def run(_: Grant) -> Done[str | None]:
            try:
                parts = query_parts(rt, spec, {"national_id": national_id})
            except SchemaError as exc:
                raise InvalidQuery(str(exc)) from None
            found = self._reader.first_match(rt, spec, parts)
            return Done(found, (found,) if found is not None else ())

        return self._gate.access(
            session,
            Action.SUBJECT_LOOKUP,
            run,
            purpose=purpose,
            record_type=rt.name,
            private={"values": {"national_id": national_id}},
        )

    def _report(self, subject: str, records: list[str], report_index: int) -> SubjectReport:
        log = self._log
        latest = log.latest_checkpoint()
        note = latest[1] if latest is not None and latest[0] > report_index else log.checkpoint()
        # Check what is about to be handed out: a report the log cannot prove is not given.
        checkpoint = open_checkpoint(note, log.verifier_key)
        # Read from the signed tree and held against the subject index, not taken from the
        # index: a row deleted there must refuse the report, never shorten it.
        found = log.proven_entries_for(records, checkpoint)
        # Every proof's nodes in one read: a person read a thousand times is one query.
        proofs = log.inclusion_proofs([index for index, _ in found], checkpoint.size)
        accesses = []
        for (index, entry), path in zip(found, proofs, strict=True):
            leaf = log.raw_entry(index)
            if AccessEntry.decode(leaf) != entry:
                raise TamperDetected(f"the access log's entry {index} changed while being read")
            proof = tuple(path)
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
        erasure = self.erasures.erased(subject)
        return SubjectReport(
            origin=log.origin,
            subject=subject,
            linked=tuple(records[1:]),
            checkpoint_note=note,
            checkpoint=checkpoint,
            accesses=tuple(accesses),
            report_index=report_index,
            erased_at=None if erasure is None else iso_time(erasure.at),
            erased_for=None if erasure is None else erasure.reason,
        )

    # -- key rotation, on the host ---------------------------------------------------------

    def _adopt_keys(self, material: KeyMaterial) -> None:
        """A rotated keyring's versions, read by this process's KeyWatch."""
        self._material = material
        self._codec.rekey(material)

    def note_key_step(self, operator: Principal, step: str, **counts: int) -> None:
        """Put a step taken on the vault's keys outside this object (the keyring resealed
        under new shares) on the access log, durably, before it is taken. Host operator
        only."""
        self._gate.access_write(
            operator, Action.KEYS_ROTATE, (), lambda _: Done(None), detail={"step": step, **counts}
        )

    def key_state(self, operator: Principal) -> RotationState:
        """Where the vault's keys stand: current versions, old ones still live, and the
        rows under them (a count by the database). Host operator only; logged."""

        def run(_: Grant) -> Done[RotationState]:
            state = behind(self._material, self._storage.key_census())
            return Done(state, detail={"step": "status", **state.counts()})

        return self._gate.access(operator, Action.KEYS_ROTATE, run)

    def rotate_keys(
        self,
        operator: Principal,
        *,
        data: bool = False,
        index: bool = False,
        resume: bool = False,
        progress: Callable[[int, int], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        page: int = ROTATION_PAGE,
    ) -> RotationState:
        """Rotate the vault's keys online (see custodes.vault.rotation): a new KEK, with
        `data` new data keys for every record, with `index` a new blind-index key; or,
        with `resume`, finish a rotation that stopped. Searches and reads go on
        meanwhile. Host operator only; each step is on the access log. Returns the state
        at the end, which is finished."""
        watch = self._key_watch
        if watch is None:
            raise ConfigurationError("this vault was opened without its keyring file")
        who = self._gate.check(operator)
        authorise(who.role, Action.KEYS_ROTATE, scope=who.scope)
        keyring = watch.keyring()
        state = behind(keyring.material, self._storage.key_census())

        def step(name: str, **counts: int) -> None:
            self._gate.access_write(
                operator,
                Action.KEYS_ROTATE,
                (),
                lambda _: Done(None),
                detail={"step": name, **counts},
            )

        start = 0
        if resume:
            if state.finished:
                return state
            raw = self._storage.get_meta(CURSOR_KEY)
            start = int(raw) if raw and raw.isdigit() else 0
            step("resume", **state.counts())
        else:
            if state.old_keks or state.old_token_versions:
                raise ConfigurationError(
                    "an earlier rotation is unfinished: finish it with 'custodes keys rotate "
                    "--resume'"
                )
            step("start", data=int(data), index=int(index))
            self._storage.set_meta(STARTED_KEY, b"1")
            keyring.rotate(watch.secret, data=data, index=index)
            watch.refresh()
            sleep(GRACE_SECONDS)
        total = self._storage.count_records()
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        sweeper = Sweeper(self.schema, self._storage, self._codec, advance, max(1, page))
        for _ in range(MAX_PASSES):
            state = behind(self._material, self._storage.key_census())
            if state.behind_kek or state.behind_data or state.old_tokens:
                step("pass", start=start, **state.counts())
                done = 0
                swept = sweeper.sweep(reindex=state.old_tokens > 0, start=start)
                start = 0
                step("swept", **swept.counts())
                state = behind(self._material, self._storage.key_census())
            old_ids = old_index_ids(self.schema, state.old_token_versions)
            if state.old_token_versions and state.old_tokens:
                dropped = self._storage.drop_tokens(old_ids)
                step("tokens-dropped", tokens=dropped)
            # Whatever a process not yet in step wrote under an old version, it wrote
            # before this grace ends; a census after it is the last word.
            sleep(GRACE_SECONDS)
            state = behind(self._material, self._storage.key_census())
            if not (state.behind_kek or state.behind_data or state.old_tokens):
                break
        else:
            raise ConfigurationError(
                "records are still under old keys after repeated passes (some do not open: "
                "run 'custodes audit verify-records'); the old keys are kept"
            )
        if state.old_keks or state.old_token_versions:
            step(
                "retired",
                keks=len(state.old_keks),
                index_versions=len(state.old_token_versions),
            )
            keyring.retire(
                watch.secret, keks=state.old_keks, token_versions=state.old_token_versions
            )
            watch.refresh()
        self._storage.set_meta(STARTED_KEY, b"")
        return behind(self._material, self._storage.key_census())

    def verify_records(self, principal: Principal) -> IndexCheck:
        """Re-derive every stored record's blind-index tokens with the vault's keys and hold
        them against the token rows a search reads; counts only, never a value or a token.
        A row deleted or repointed hides a record from search; nothing else would notice.
        Auditors and the host operator; logged with its counts."""

        def run(_: Grant) -> Done[IndexCheck]:
            result = IndexAudit(self.schema, self._storage, self._codec).run()
            return Done(result, detail=result.counts())

        return self._gate.access(principal, Action.RECORDS_VERIFY, run)

    # -- alerts, for the watchers -------------------------------------------------------

    def alerts(self, session: Principal, *, limit: int = 100) -> list[RecordedAlert]:
        """The latest alerts raised on officials' use of the vault, newest first, with
        how far each has been dealt with. Supervisors and auditors; logged."""
        limit = max(1, min(limit, 1000))

        def run(_: Grant) -> Done[list[RecordedAlert]]:
            found = self._alert_book.recent(limit)
            return Done(found, detail={"shown": len(found)})

        return self._gate.access(session, Action.ALERT_LIST, run)

    def alert(self, session: Principal, alert_id: str) -> RecordedAlert:
        """One alert, as the vault holds it (RecordNotFound if none). Logged."""

        def run(_: Grant) -> Done[RecordedAlert]:
            return Done(self._alert_book.get(alert_id), detail={"alert_id": alert_id})

        return self._gate.access(session, Action.ALERT_LIST, run)

    def acknowledge_alert(self, session: Principal, alert_id: str) -> None:
        """Say that someone is looking into an alert; logged, then kept with the alert."""
        self._step_alert(session, alert_id, AlertState.ACKNOWLEDGED, Action.ALERT_ACKNOWLEDGE)

    def resolve_alert(self, session: Principal, alert_id: str) -> None:
        """Close an alert as dealt with; logged, then kept with the alert."""
        self._step_alert(session, alert_id, AlertState.RESOLVED, Action.ALERT_RESOLVE)

    def _step_alert(
        self, session: Principal, alert_id: str, state: AlertState, action: Action
    ) -> None:
        def run(grant: Grant) -> Done[None]:
            found = self._alert_book.check_step(alert_id, state)
            if found.alert.account == grant.username:
                # The watched do not close their own file.
                raise AccessDenied("an alert about your own account is handled by someone else")
            return Done(None, detail={"alert_id": found.id, "kind": found.alert.kind})

        _, index = self._gate.access_then(session, action, run)
        who = self._gate.check(session)
        self._alert_book.step(alert_id, state, by=who.username, time=self._clock(), entry=index)

    # -- canary records (custodes.canaries) ------------------------------------------------

    def plant_canaries(self, operator: Principal, count: int, *, seed: int | None = None) -> int:
        """Store `count` synthetic people as canary records, sealed and indexed exactly as
        real people are, none sharing an indexed value with any stored record, and add
        them to the sealed list the access function watches. Host operator only; the
        batch is logged like an ingest batch (counted, its ids sealed beside the entry).
        How many canaries the vault holds now."""
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 10_000:
            raise InvalidQuery("plant between 1 and 10,000 canary records at a time")
        who = self._gate.check(operator)
        try:
            authorise(who.role, Action.CANARY_PLANT, scope=who.scope)
        except AccessDenied:
            # Refused before a record is opened to draw them, and logged as refused.
            self._gate.access_write(operator, Action.CANARY_PLANT, (), lambda _: Done(0))
            raise
        drawn = canary_people(
            self.schema,
            self._codec,
            count,
            seed=secrets.randbits(63) if seed is None else seed,
            taken=self._values_stored,
        )
        ids = [record.record_id for record in drawn]

        def write(_: Grant) -> Done[int]:
            held = self._canaries.add(ids)
            outcome = self._storage.write_batch(drawn)
            if outcome.inserted != len(drawn):
                raise ConfigurationError(
                    "another writer stored records under the canaries' ids meanwhile; plant again"
                )
            return Done(held, ids)

        return self._gate.access_write(
            operator, Action.CANARY_PLANT, ids, write, detail={"count": len(ids)}
        )

    def _values_stored(self, record_type: str, index: str, values: Mapping[str, str]) -> bool:
        """Whether any stored record carries these values in this index (opened in memory
        within the operator's planting; no value leaves)."""
        rt = self._reader.type(record_type)
        spec = rt.indexes[index]
        return self._reader.first_match(rt, spec, query_parts(rt, spec, values)) is not None

    # -- the host operator's work: ingest, checkpoints, witnesses ----------------------------

    def ingest(self, operator: Principal, source: Path | str, **options: Any) -> IngestReport:
        """Ingest a file; see custodes.ingest.run_ingest for the options.

        Each batch is written under an entry of its own (vault:records:store), durable
        before the batch is written, counting its records, with their ids sealed beside it
        and a digest of them in the leaf (AccessGate.access_write); a batch that fails is
        logged again, as an error. The run is logged with its counts once it has run (a failure
        too, with its kind)."""

        def write_batch(records: Sequence[SealedRecord]) -> frozenset[str]:
            def write(_: Grant) -> Done[frozenset[str]]:
                # The workers seal under the keys they were started with; a rotation
                # finished since may have destroyed those (the access function has read
                # the keyring afresh just now). Refused whole, and an ingest run again
                # skips what is stored.
                if not self._codec.current_enough(records):
                    raise ConfigurationError(
                        "the vault's keys were rotated while this ingest ran: run it again "
                        "(records already stored are skipped)"
                    )
                outcome = self._storage.write_batch(records)
                if outcome.inserted == len(records):
                    stored = frozenset(r.record_id for r in records)
                    return Done(stored, tuple(stored))
                # Another writer stored some of these ids since the pipeline looked: what
                # is stored under each is this batch's only if it holds these very bytes
                # (every record is sealed under a random key of its own).
                held = self._storage.get_records([r.record_id for r in records])
                stored = frozenset(
                    r.record_id
                    for r in records
                    if (copy := held.get(r.record_id)) is not None and copy.payload == r.payload
                )
                return Done(stored, tuple(stored), detail={"reason": "stored by another writer"})

            ids = [r.record_id for r in records]
            return self._gate.access_write(operator, Action.INGEST_BATCH, ids, write)

        target = IngestTarget(
            self.schema,
            self._schema_text,
            self._material,
            self._token_bits,
            self._compare_stored,
            write_batch,
        )

        def run(_: Grant) -> Done[IngestReport]:
            report = run_ingest(target, source, **options)
            counts = {
                "accepted": report.accepted,
                "already_present": report.already_present,
                "rejected": report.rejected,
                "conflicting": report.conflicting,
            }
            return Done(report, detail=counts)

        return self._gate.access(operator, Action.INGEST, run)

    def _compare_stored(self, records: Sequence[SealedRecord]) -> list[tuple[str, ...] | None]:
        """For each record, in order: None if its id is not stored, else the names of the
        fields in which the stored record differs from it, in the schema's order (none:
        the same record). Opened only within an authorised ingest, and only records of
        the ids it brings; no value leaves this method."""
        held = self._storage.get_records([r.record_id for r in records])
        differing: list[tuple[str, ...] | None] = []
        for record in records:
            stored = held.get(record.record_id)
            if stored is None or stored.payload == record.payload:
                differing.append(None if stored is None else ())  # absent, or these bytes
                continue
            new = StoredRecord(
                record.record_id,
                record.record_type,
                record.payload,
                record.kek_version,
                record.wrapped_key,
            )
            before, after = self._codec.open(stored), self._codec.open(new)
            names = [*self._codec.type_of(new).fields, *self._codec.type_of(stored).fields]
            differing.append(
                tuple(name for name in dict.fromkeys(names) if before.get(name) != after.get(name))
            )
        return differing

    def record_log_loss(self, operator: Principal, loss: LogLoss) -> None:
        """Put the host operator's acknowledged loss of signed entries on the log itself,
        then sign a checkpoint over it (custodes.bootstrap.acknowledge_log_loss)."""
        detail = {
            "signed_size": loss.signed.size,
            "resumed_size": loss.resumed.size,
            "reason": loss.reason,
        }
        self._gate.access(
            operator, Action.LOG_LOSS_ACKNOWLEDGE, lambda _: Done(None), detail=detail
        )
        self._log.checkpoint()

    def record_unseal(self, operator: Principal, officers: Sequence[str]) -> None:
        """Put on the log who unsealed a server's keys (officers' names and share numbers,
        never a share): the log cannot be written while the keys are sealed."""
        self._gate.access(
            operator, Action.UNSEAL, lambda _: Done(None), detail={"officers": list(officers)}
        )

    def checkpoint(self, operator: Principal) -> bytes:
        """Sign a checkpoint of the log as it is now; the signed note."""
        return self._gate.access(
            operator, Action.LOG_CHECKPOINT, lambda _: Done(self._log.checkpoint())
        )

    def publish_checkpoint(self, operator: Principal, url: str) -> int:
        """Send the latest checkpoint to a witness and store its cosignature beside it;
        the size cosigned."""

        def run(_: Grant) -> Done[int]:
            answer = self._witness(url, self._log.checkpoint())
            if answer.note is None:
                raise ConfigurationError(
                    f"the witness already holds a checkpoint of size {answer.size:,}, larger "
                    "than the one just signed; run again, and if it persists, check that the "
                    "witness is this vault's"
                )
            return Done(answer.size, detail={"size": answer.size})

        return self._gate.access(operator, Action.WITNESS_PUBLISH, run, detail={"witness": url})

    def _witness(
        self, url: str, note: bytes, held: int = 0, beside: bytes | None = None
    ) -> Witnessed:
        """Have a witness cosign a signed checkpoint, proving consistency from the size it
        holds, and store the cosigned note beside the checkpoint: the one way for both the
        operator's `publish_checkpoint` and a server's pusher (which logs no entry)."""
        answer = witness_checkpoint(
            url, note, self._log.consistency_proof, held=held, beside=beside
        )
        if answer.note is not None:
            self._storage.put_checkpoint(answer.size, answer.note)
        return answer

    # -- backups (custodes.backup copies; the door gates and logs) ---------------------------

    def backup(self, operator: Principal, make: Callable[[BackupSource], BackupMade]) -> BackupMade:
        """Back the vault up, as its host operator: a checkpoint is signed first, so that
        the copy holds it, then `make` (a custodes.backup adapter) copies the files and
        seals the manifest with the keys handed to it. Logged with the backup's id and
        counts (a failure with its kind)."""

        def run(_: Grant) -> Done[BackupMade]:
            if self.directory is None:
                raise ConfigurationError("a vault held in memory has no files to back up")
            source = BackupSource(
                directory=self.directory,
                material=self._material,
                checkpoint=self._log.checkpoint(),
                verifier_key=self._log.verifier_key,
                type_tags={name: self._codec.type_tag(name) for name in self.schema.types},
                created=self._clock(),
            )
            made = make(source)
            return Done(made, detail=made.logged())

        return self._gate.access(operator, Action.BACKUP_CREATE, run)

    def record_restore(self, operator: Principal, detail: Mapping[str, Any]) -> None:
        """Put a restore from a backup on the restored vault's own log (the backup's id,
        counts and checkpoint: the entries after it are not in the backup), then sign a
        checkpoint over it (custodes.backup). Opening the restored vault applied the
        erasure ledger again (each record it erased on the log as `vault:records:erase`);
        the restore's entry counts the records the ledger names."""
        self.erasures.reapply()
        self._gate.access(
            operator,
            Action.BACKUP_RESTORE,
            lambda _: Done(None),
            detail={**detail, "erased_on_ledger": len(self.erasures.ledgered())},
        )
        self._log.checkpoint()


def _filter_text(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return one_line(value)
    except HiddenCharacter as exc:
        raise InvalidQuery(f"the filter {name} {exc}") from None
