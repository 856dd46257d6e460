"""The safe API: log in, search, read masked records, reveal a field, ingest.

Every read of personal data passes through one access function, `Vault._access`: it
checks the session, the purpose and the role, runs the read in memory, writes the
access-log entry durably, and only then returns. If the entry cannot be written, the
read fails and nothing is returned.

Sessions and failed-login counts live in storage (custodes.sessions), so several server
processes can serve one vault and a logout or lockout in one holds in all.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from custodes import passkeys
from custodes.accounts import Account, AccountBook, Enrolment, Passkey, SecretBox
from custodes.audit import AccessEntry, AccessLog, Outcome
from custodes.codec import RecordCodec, Values, role_of_link
from custodes.crypto import KeyMaterial
from custodes.errors import (
    AccessDenied,
    AuthenticationFailed,
    ConfigurationError,
    CustodesError,
    InvalidQuery,
    LoginThrottled,
    MfaEnrolmentRequired,
    RecordNotFound,
    SchemaError,
)
from custodes.policy import (
    PROTECTED_REPORTER,
    REPORTER,
    AccessPurpose,
    Action,
    RecordFacts,
    Role,
    assigned_cases,
    authorise,
    district_of_case_no,
    district_of_national_id,
    is_minor,
    may_see,
    sees_reporters,
)
from custodes.records import index_parts, is_han, mask_value, query_parts
from custodes.schema import IndexSpec, RecordType, Schema
from custodes.sessions import (
    ABSOLUTE_TIMEOUT,
    IDLE_TIMEOUT,
    Session,
    SessionBook,
    Throttle,
)
from custodes.storage.base import Storage, StoredRecord

if TYPE_CHECKING:
    from custodes.ingest import IngestReport

T = TypeVar("T")

MAX_RESULTS = 100
SYSTEM_ACTOR = "operator"  # the holder of the keyring passphrase, acting on the host

__all__ = ["ABSOLUTE_TIMEOUT", "IDLE_TIMEOUT", "LinkView", "RecordView", "Session", "Vault"]

API_TOKEN_PREFIX = "cst_"  # noqa: S105 - recognisable to secret scanners
MAX_API_TOKEN_DAYS = 365

# What an integration's token may do: a scope names the largest action it allows.
API_SCOPES: dict[str, frozenset[Action]] = {
    "search": frozenset({Action.SEARCH}),
    "read": frozenset({Action.SEARCH, Action.READ}),
    "reveal": frozenset({Action.SEARCH, Action.READ, Action.REVEAL}),
    "audit": frozenset({Action.LOG_READ, Action.SUBJECT_REPORT}),
}

# Reads whose log entry counts the records withheld by the record-level rules.
_RECORD_READS = frozenset({Action.SEARCH, Action.READ})

# Access-log tags for account events (subject:object:action, like custodes.policy.Action).
LOGOUT = "account:session:logout"
PASSWORD_CHANGE = "account:password:change"  # noqa: S105 - a log tag
ACCOUNT_DISABLE = "account:account:disable"
ACCOUNT_ENABLE = "account:account:enable"
ACCOUNT_UNLOCK = "account:account:unlock"
MFA_ENROL_ISSUE = "account:mfa:issue"
MFA_ENROL = "account:mfa:enrol"
API_TOKEN_ISSUE = "account:token:issue"  # noqa: S105 - a log tag
CASE_ASSIGN = "account:case:assign"
CASE_UNASSIGN = "account:case:unassign"
PASSKEY_REGISTER = "account:passkey:register"


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


class _OutOfReach(RecordNotFound):
    """A record that exists but lies outside the official's reach. Logged as a refusal,
    then raised to the caller as a plain RecordNotFound: the two must look alike."""


@dataclass(slots=True)
class _Reach:
    """One access's view of the record-level rules: who asks, for what, and what has
    been withheld from them so far (a count for the log, never shown)."""

    role: Role
    district: object
    cases: frozenset[str]
    purpose: AccessPurpose
    today: dt.date
    withheld: int = 0
    districts: dict[str, str | None] = field(default_factory=dict)  # person id -> district

    def allows(self, facts: RecordFacts) -> bool:
        return may_see(self.role, self.district, self.cases, self.purpose, facts)

    @property
    def sees_reporters(self) -> bool:
        return sees_reporters(self.role)


class Vault:
    def __init__(
        self,
        *,
        schema: Schema,
        storage: Storage,
        codec: RecordCodec,
        material: KeyMaterial,
        token_bits: Mapping[int, int],
        access_log: AccessLog,
        accounts: AccountBook,
        directory: Path | None = None,
        schema_text: str = "",
        session_ttl: float = 8 * 3600,
    ) -> None:
        self.schema = schema
        self.schema_text = schema_text
        self.storage = storage
        self.codec = codec
        self.access_log = access_log
        self.accounts = accounts
        self.directory = directory
        self._material = material
        self._token_bits = dict(token_bits)
        self.sessions = SessionBook(storage, material, session_ttl)
        self._throttle = Throttle(storage)
        self._challenges = passkeys.ChallengeMint(material)
        accounts.bind_secrets(SecretBox(material))

    # -- sessions -----------------------------------------------------------------

    def login(
        self,
        username: str,
        password: str,
        *,
        totp: str | None = None,
        passkey: passkeys.Assertion | None = None,
        client: str | None = None,
    ) -> Session:
        """A new session, for the right password and a second factor: an unused one-time
        code (TOTP), or instead a verified assertion by one of the account's passkeys.

        Throttled per account name and per client address before anything is checked;
        a wrong password, a wrong code or passkey, an unknown, disabled or locked account
        all fail with the same AuthenticationFailed.
        """
        now = self.access_log.clock()
        keys = [f"account:{username.casefold()}"] + ([f"client:{client}"] if client else [])
        wait = self._throttle.wait(keys, now)
        if wait > 0:
            self._log_login(username, "", Outcome.DENIED, now, client, reason="throttled")
            raise LoginThrottled(wait)
        try:
            account = self.accounts.authenticate(username, password)
        except AuthenticationFailed:
            self._login_failed(username, keys, now, client, "credentials")
            raise AuthenticationFailed() from None
        if not account.mfa_enrolled:
            self._log_login(username, account.role, Outcome.DENIED, now, client, "no_mfa")
            raise MfaEnrolmentRequired()
        if passkey is not None:
            factor_ok = self._passkey_ok(username, passkey, now)
        else:
            factor_ok = self.accounts.verify_totp(username, totp, now=now)
        if not factor_ok:
            self._login_failed(username, keys, now, client, "second_factor")
            raise AuthenticationFailed()
        self._throttle.clear(keys[0])
        self._throttle.forget_quiet(now)
        self.accounts.record_success(username)
        factor = "passkey" if passkey is not None else "totp"
        self._log_login(username, account.role, Outcome.GRANTED, now, client, factor=factor)
        self.sessions.purge(now)
        return self.sessions.open(username, account.role, now, client)

    def _login_failed(
        self, username: str, keys: Sequence[str], now: float, client: str | None, reason: str
    ) -> None:
        self._throttle.fail(keys, now)
        locked = self.accounts.record_failure(username)
        self._log_login(username, "", Outcome.DENIED, now, client, reason, locked=locked)

    def _log_login(
        self,
        username: str,
        role: str,
        outcome: Outcome,
        now: float,
        client: str | None,
        reason: str | None = None,
        *,
        locked: bool = False,
        factor: str | None = None,
    ) -> None:
        detail: dict[str, Any] = {}
        if reason:
            detail["reason"] = reason
        if locked:
            detail["account_locked"] = True
        if factor:
            detail["factor"] = factor
        self.access_log.append(
            AccessEntry(username, role, Action.LOGIN, outcome, now, client=client, detail=detail)
        )

    def session_for(self, token: str) -> Session:
        """The live session a bearer token stands for (a login's or an API token's),
        or AuthenticationFailed. Idle and absolute timeouts apply here."""
        if not isinstance(token, str) or not token:
            raise AuthenticationFailed("no valid session: log in first")
        if token.startswith(API_TOKEN_PREFIX):
            return self._api_session(token)
        session = self.sessions.live(token, self.access_log.clock())
        if session is None:
            raise AuthenticationFailed("the session has ended: log in again")
        return session

    def csrf_token(self, session: Session) -> str:
        """The session's own token for forms: a cross-site form cannot know it."""
        return self.sessions.csrf(self._live(session).token)

    def logout(self, session: Session) -> None:
        if not isinstance(session, Session) or session.scope is not None:
            return  # an integration's token ends with its expiry or its account
        if self.sessions.end(session.token):
            self._account_event(LOGOUT, session.username, by=session.username)

    def logout_everywhere(self, username: str) -> int:
        """End every session of an account; how many there were."""
        return self.sessions.end_all(username)

    def _live(self, session: Session) -> Session:
        """The session again, checked afresh: it may have ended since it was presented."""
        if not isinstance(session, Session):
            raise AuthenticationFailed("no valid session: log in first")
        if self.session_for(session.token) != session:
            raise AuthenticationFailed("no valid session: log in first")
        return session

    def _api_session(self, token: str) -> Session:
        # Checked against its account at every use, so that disabling or locking the
        # account stops an integration's token at once.
        stored = self.storage.get_meta(_api_token_key(token))
        if not stored:
            raise AuthenticationFailed("no valid session: log in first")
        doc = orjson.loads(stored)
        now = self.access_log.clock()
        account = self.accounts.get(str(doc["username"]))
        if account is None or account.disabled or account.locked or now >= float(doc["expires"]):
            raise AuthenticationFailed("the session has ended: log in again")
        return Session(
            token, account.username, account.role, float(doc["issued"]), None, str(doc["scope"])
        )

    # -- passkeys (WebAuthn) ------------------------------------------------------------

    def passkey_login_options(
        self, username: str, ceremony: passkeys.Ceremony, *, binding: bytes
    ) -> str:
        """Options for navigator.credentials.get at login, as JSON, bound to the account
        name and the login form's pre-session token. The same shape for every name, known
        or not, with passkeys or without: nothing is looked up."""
        challenge = self._challenges.issue(
            passkeys.LOGIN, username, binding, self.access_log.clock()
        )
        return passkeys.login_options(ceremony, challenge=challenge)

    def passkey_registration_options(self, session: Session, ceremony: passkeys.Ceremony) -> str:
        """Options for navigator.credentials.create, as JSON, bound to this session."""
        live = self._live(session)
        if live.scope is not None:
            raise AccessDenied("an integration's token registers no passkey")
        challenge = self._challenges.issue(
            passkeys.REGISTER, live.username, _binding(live), self.access_log.clock()
        )
        return passkeys.registration_options(
            ceremony,
            username=live.username,
            user_handle=self.accounts.passkey_user_handle(live.username),
            challenge=challenge,
            existing=self.accounts.passkey_ids(live.username),
        )

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
        live = self._live(session)
        if live.scope is not None:
            raise AccessDenied("an integration's token registers no passkey")
        now = self.access_log.clock()
        label = passkeys.check_label(label)
        challenge = passkeys.challenge_of(credential_json)
        nonce = self._challenges.check(
            challenge, passkeys.REGISTER, live.username, _binding(live), now
        )
        if not self._spend_challenge(nonce, now):
            raise passkeys.PasskeyRefused()
        new = passkeys.verify_registration(credential_json, challenge=challenge, ceremony=ceremony)
        added = self.accounts.add_passkey(
            live.username, new, label=label, rp_id=ceremony.rp_id, now=now
        )
        self._account_event(
            PASSKEY_REGISTER, live.username, by=live.username, passkey=added.ref, rp_id=added.rp_id
        )
        return added

    def list_passkeys(self, session: Session) -> tuple[Passkey, ...]:
        """The passkeys of the session's own account."""
        return self.accounts.list_passkeys(self._live(session).username)

    def _passkey_ok(self, username: str, answer: passkeys.Assertion, now: float) -> bool:
        """Whether a login's passkey assertion verifies, its challenge spent here."""
        try:
            challenge = passkeys.challenge_of(answer.credential_json)
            nonce = self._challenges.check(challenge, passkeys.LOGIN, username, answer.binding, now)
        except passkeys.PasskeyRefused:
            return False
        if not self._spend_challenge(nonce, now):
            return False
        return self.accounts.use_passkey(
            username,
            answer.credential_json,
            challenge=challenge,
            ceremony=answer.ceremony,
            now=now,
        )

    def _spend_challenge(self, nonce: bytes, now: float) -> bool:
        """Mark a challenge used; whether this was its first use, in any process. The
        mark is kept twice the challenge's life, so it outlives the challenge."""
        key = hashlib.sha256(b"custodes passkey challenge\x00" + nonce).digest()
        return self.storage.spend(key, now, keep=2 * passkeys.CHALLENGE_TTL)

    # -- the second factor, passwords, account state -------------------------------------

    def issue_enrolment(self, username: str, *, by: str = SYSTEM_ACTOR) -> str:
        """A one-time code (24 h) with which the account's holder enrols a second factor."""
        code = self.accounts.issue_enrolment(username, now=self.access_log.clock())
        self._account_event(MFA_ENROL_ISSUE, username, by=by)
        return code

    def enrolment(self, code: str) -> Enrolment:
        """The TOTP secret for an enrolment code, to show once as a QR code."""
        return self.accounts.enrolment(code, now=self.access_log.clock())

    def complete_enrolment(self, code: str, totp: str) -> str:
        """Confirm an enrolment with a first one-time code; the account's name."""
        username = self.accounts.complete_enrolment(code, totp, now=self.access_log.clock())
        self._account_event(MFA_ENROL, username, by=username)
        return username

    def change_password(self, username: str, password: str, *, by: str = SYSTEM_ACTOR) -> None:
        """Set a new password and end every session of the account."""
        self.accounts.set_password(username, password)
        self.logout_everywhere(username)
        self._account_event(PASSWORD_CHANGE, username, by=by)

    def disable_account(self, username: str, *, by: str = SYSTEM_ACTOR) -> None:
        """Disable an account: every session and API token of it stops working at once."""
        self.accounts.set_disabled(username, True)
        self.logout_everywhere(username)
        self._account_event(ACCOUNT_DISABLE, username, by=by)

    def enable_account(self, username: str, *, by: str = SYSTEM_ACTOR) -> None:
        self.accounts.set_disabled(username, False)
        self._account_event(ACCOUNT_ENABLE, username, by=by)

    def unlock_account(self, username: str, *, by: str = SYSTEM_ACTOR) -> None:
        """Lift a lock left by repeated failed logins."""
        self.accounts.unlock(username)
        self._throttle.clear(f"account:{username.casefold()}")
        self._account_event(ACCOUNT_UNLOCK, username, by=by)

    def issue_api_token(
        self, username: str, scope: str, *, days: int, by: str = SYSTEM_ACTOR
    ) -> str:
        """A bearer token for an integration, shown once; only its SHA-256 is stored."""
        if scope not in API_SCOPES:
            raise ConfigurationError(f"a scope is one of: {', '.join(API_SCOPES)}")
        if not 1 <= days <= MAX_API_TOKEN_DAYS:
            raise ConfigurationError(f"a token lives 1 to {MAX_API_TOKEN_DAYS} days")
        account = self.accounts.get(username)
        if account is None:
            raise RecordNotFound("no account with that name")
        token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.access_log.clock()
        doc = {"username": username, "scope": scope, "issued": now, "expires": now + days * 86400}
        self.storage.set_meta(_api_token_key(token), orjson.dumps(doc))
        self._account_event(API_TOKEN_ISSUE, username, by=by, scope=scope, days=days)
        return token

    def _account_event(self, action: str, username: str, *, by: str, **detail: Any) -> None:
        self.access_log.append(
            AccessEntry(
                by,
                Role.ADMIN.value if by == SYSTEM_ACTOR else "",
                action,
                Outcome.GRANTED,
                self.access_log.clock(),
                detail={"account": username, **detail},
            )
        )

    # -- the single access function --------------------------------------------------

    def _access(
        self,
        session: Session,
        purpose: AccessPurpose,
        action: Action,
        run: Callable[[_Reach], tuple[T, Sequence[str]]],
        *,
        record_type: str | None = None,
        detail: dict[str, Any] | None = None,
        private: dict[str, Any] | None = None,
        target: str | None = None,
    ) -> T:
        """Decide, read, log durably, then return. Nothing leaves before the entry exists.

        `private` (such as the values searched for) is sealed beside the entry, so that
        a subject's report can show it while the log itself names no one.
        """
        live = self._live(session)
        holder = self._holder(live)
        if not isinstance(purpose, AccessPurpose):
            raise AccessDenied("a stated purpose is required to read personal data")
        scope_denied = _outside_scope(live, action)

        # A refused or failed attempt on one record names it, so that it reaches that
        # person's subject report; it returned nothing, so its count stays 0.
        attempted = (target,) if target else ()

        def entry(outcome: Outcome, records: Sequence[str] = (), **extra: Any) -> AccessEntry:
            return AccessEntry(
                actor=live.username,
                role=live.role.value,
                action=action.value,
                outcome=outcome,
                time=self.access_log.clock(),
                purpose=purpose.reason,
                case_ref=purpose.case_ref,
                record_type=record_type,
                records=tuple(records) if outcome is Outcome.GRANTED else attempted,
                result_count=len(records),
                client=live.client,
                detail={**(detail or {}), **extra},
            )

        log = self.access_log.append
        try:
            if scope_denied:
                raise AccessDenied(scope_denied)
            authorise(live.role, action)
        except AccessDenied:
            log(entry(Outcome.DENIED), private=private)
            raise
        reach = self._reach(live, purpose, holder)
        try:
            result, touched = run(reach)
        except _OutOfReach:
            log(entry(Outcome.DENIED, reason="out_of_reach"), private=private)
            raise RecordNotFound("no such record") from None
        except AccessDenied:
            log(entry(Outcome.DENIED), private=private)
            raise
        except CustodesError as exc:
            log(entry(Outcome.ERROR, error=type(exc).__name__), private=private)
            raise
        withheld = {"filtered": reach.withheld} if action in _RECORD_READS else {}
        log(entry(Outcome.GRANTED, touched, **withheld), private=private)
        return result

    def _holder(self, live: Session) -> Account:
        """The session's account, read at every access: a changed district or case
        assignment holds at once, and a session that outlived its account (a restored
        database, a fault) opens nothing."""
        account = self.accounts.get(live.username)
        if account is None or account.disabled:
            if live.scope is None:
                self.sessions.end(live.token)
            raise AuthenticationFailed("the session has ended: log in again")
        return account

    def _reach(self, live: Session, purpose: AccessPurpose, account: Account) -> _Reach:
        attributes = account.attributes
        today = dt.datetime.fromtimestamp(self.access_log.clock(), dt.UTC).date()
        return _Reach(
            live.role,
            attributes.get("district"),
            assigned_cases(attributes.get("cases")),
            purpose,
            today,
        )

    # -- reads ------------------------------------------------------------------------

    def search(
        self,
        session: Session,
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
        detail = {"index": spec.name}

        def run(reach: _Reach) -> tuple[list[RecordView], list[str]]:
            try:
                parts = query_parts(rt, spec, values)
            except SchemaError as exc:
                raise InvalidQuery(str(exc)) from None
            token = self.codec.token(spec, parts)
            # Tokens are truncated on purpose, so a bucket may hold other records: read a
            # few more than asked and keep only true matches, decided after decryption.
            candidates = self.storage.find(spec.index_id, token, limit * 4 + 16)
            views: list[RecordView] = []
            touched: list[str] = []
            probe = {c.field for c in spec.components}
            for stored in self._load(candidates):
                # Only the indexed fields decide a match: a bucket's other records are
                # dropped after decrypting those alone, and only a match is opened whole
                # (every field authenticated, as any record shown must be).
                if not self._matches(
                    rt, spec, parts, stored.record_id, self.codec.open(stored, probe)
                ):
                    continue
                opened = self.codec.open(stored)
                # Out of reach is as good as absent: neither shown nor counted, only
                # tallied for the log.
                if self._as_hidden_reporter(rt, spec, parts, opened, reach) or not reach.allows(
                    self._facts(rt, opened, reach)
                ):
                    reach.withheld += 1
                    continue
                views.append(self._view(rt, stored.record_id, opened, reach))
                touched.append(stored.record_id)
                if len(views) >= limit:
                    break
            return views, touched

        return self._access(
            session,
            purpose,
            Action.SEARCH,
            run,
            record_type=record_type,
            detail=detail,
            private={"values": dict(values)},
        )

    def record(self, session: Session, purpose: AccessPurpose, record_id: str) -> RecordView:
        """One record, masked, with the records it links to and that link to it."""

        def run(reach: _Reach) -> tuple[RecordView, list[str]]:
            stored = self._one(record_id)
            rt = self.schema.types[stored.record_type]
            opened = self.codec.open(stored)
            if not reach.allows(self._facts(rt, opened, reach)):
                raise _OutOfReach("no such record")
            view = self._view(rt, record_id, opened, reach)
            touched = [record_id]
            for link in self._links(rt, stored.record_id, opened, reach):
                view.links.append(link)
                if link.record_id:
                    touched.append(link.record_id)
            return view, touched

        return self._access(
            session,
            purpose,
            Action.READ,
            run,
            record_type=self._type_of(record_id),
            detail={"target": record_id},
            target=record_id,
        )

    def reveal(
        self, session: Session, purpose: AccessPurpose, record_id: str, field_name: str
    ) -> str | None:
        """One field of one record in the clear, or None if the record lacks it."""
        live = self._live(session)

        def run(reach: _Reach) -> tuple[str | None, list[str]]:
            stored = self._one(record_id)
            rt = self.schema.types[stored.record_type]
            # Reach first: a record out of reach must fail exactly as a missing one does,
            # whatever field was asked for.
            opened = self.codec.open(stored, _fact_fields(rt))
            if not reach.allows(self._facts(rt, opened, reach)):
                raise _OutOfReach("no such record")
            spec = rt.fields.get(field_name)
            if spec is None:
                raise InvalidQuery(
                    f"record type {stored.record_type!r} has no field {field_name!r}"
                )
            # Clearance depends on the field, known only once the record's type is.
            authorise(live.role, Action.REVEAL, field=spec)
            if field_name not in opened:
                opened = self.codec.open(stored, (field_name,))
            value = opened.get(field_name)
            if spec.kind == "person_links" and value is not None and not reach.sees_reporters:
                value = _without_reporters(value)
            return (None if value is None else _plain(value)), [record_id]

        return self._access(
            session,
            purpose,
            Action.REVEAL,
            run,
            record_type=self._type_of(record_id),
            detail={"target": record_id, "field": field_name},
            target=record_id,
        )

    # -- record-level facts -------------------------------------------------------------

    def _facts(self, rt: RecordType, values: Values, reach: _Reach) -> RecordFacts:
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

    def _person_facts(self, record_id: str, reach: _Reach) -> RecordFacts:
        """The district and minority of a stored person, opening only what decides them."""
        stored = self.storage.get_records([record_id]).get(record_id)
        if stored is None:
            return RecordFacts(None)
        rt = self.schema.types[stored.record_type]
        if not any(spec.kind == "national_id" for spec in rt.fields.values()):
            return RecordFacts(None)
        facts = self._facts(rt, self.codec.open(stored, _fact_fields(rt)), reach)
        reach.districts[record_id] = facts.district
        return facts

    def _person_district(self, record_id: str, reach: _Reach) -> str | None:
        if record_id in reach.districts:
            return reach.districts[record_id]
        district: str | None = None
        stored = self.storage.get_records([record_id]).get(record_id)
        if stored is not None:
            rt = self.schema.types[stored.record_type]
            names = [s.name for s in rt.fields.values() if s.kind == "national_id"]
            if names:
                district = district_of_national_id(self.codec.open(stored, names).get(names[0]))
        reach.districts[record_id] = district
        return district

    def _as_hidden_reporter(
        self,
        rt: RecordType,
        spec: IndexSpec,
        parts: tuple[str, ...],
        values: Values,
        reach: _Reach,
    ) -> bool:
        """Whether a record matched a link search only as naming the person its reporter,
        which an official below investigator may not learn."""
        if reach.sees_reporters:
            return False
        link = rt.fields[spec.components[0].field]
        if link.ref is None or link.kind != "person_links":
            return False
        target = self.codec.record_id(link.ref, parts)
        return role_of_link(link, values.get(link.name), target) == REPORTER

    # -- helpers ----------------------------------------------------------------------

    def _type(self, name: str) -> RecordType:
        try:
            return self.schema.record_type(name)
        except SchemaError as exc:
            raise InvalidQuery(str(exc)) from None

    def _index(self, rt: RecordType, name: str, values: Mapping[str, str]) -> IndexSpec:
        try:
            spec = rt.index(name)
        except SchemaError as exc:
            raise InvalidQuery(str(exc)) from None
        missing = [f for f in spec.field_names if not values.get(f)]
        if missing:
            raise InvalidQuery(f"index {name!r} needs a value for {', '.join(missing)}")
        extra = set(values) - set(spec.field_names)
        if extra:
            raise InvalidQuery(f"index {name!r} does not use {', '.join(sorted(extra))}")
        # A name typed in Latin letters is looked up in the pinyin twin of a name index.
        for comp in spec.components:
            named = comp.transform == "" and rt.fields[comp.field].kind == "name"
            if named and not is_han(values[comp.field]):
                twin = _pinyin_twin(rt, spec)
                if twin is None:
                    raise InvalidQuery(f"index {name!r} needs the name in Han characters")
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
            target = self.codec.record_id(link.ref, parts)
            return role_of_link(link, opened.get(link.name), target) is not None
        return parts in index_parts(rt, spec, opened)

    def _type_of(self, record_id: str) -> str | None:
        found = self.storage.get_records([record_id]).get(record_id)
        return found.record_type if found else None

    def _one(self, record_id: str) -> StoredRecord:
        stored = self.storage.get_records([record_id]).get(record_id)
        if stored is None:
            raise RecordNotFound("no such record")
        return stored

    def _load(self, record_ids: Sequence[str]) -> list[StoredRecord]:
        found = self.storage.get_records(record_ids)
        return [found[r] for r in record_ids if r in found]

    def _view(self, rt: RecordType, record_id: str, values: Values, reach: _Reach) -> RecordView:
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
        self, rt: RecordType, record_id: str, values: Values, reach: _Reach
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
        found = self.storage.get_records([rid for rid, _, _ in outgoing])
        for rid, ref_type, role in outgoing:
            target = found.get(rid)
            if target is None or target.record_type != ref_type:
                continue
            if role == REPORTER and not reach.sees_reporters:
                # That a case has a reporter is no secret; who it is, is.
                links.append(LinkView("", ref_type, role, PROTECTED_REPORTER))
                continue
            target_rt = self.schema.types[ref_type]
            opened = self.codec.open(target)
            if not reach.allows(self._facts(target_rt, opened, reach)):
                reach.withheld += 1
                continue
            links.append(LinkView(rid, ref_type, role, self._label(target_rt, opened)))
        # Incoming: records that name this one, found through their link indexes.
        if len(rt.source_key) == 1 and rt.source_key[0] in values:
            source_value = str(values[rt.source_key[0]])
            for other_rt, index, token in self.codec.link_tokens(rt.name, source_value):
                link_field = other_rt.fields[index.components[0].field]
                for stored in self._load(self.storage.find(index.index_id, token, MAX_RESULTS)):
                    opened = self.codec.open(stored)
                    role = role_of_link(link_field, opened.get(link_field.name), record_id)
                    if role is None:
                        continue
                    # A person's page must not tell an officer that they reported a crime.
                    hidden = role == REPORTER and not reach.sees_reporters
                    if hidden or not reach.allows(self._facts(other_rt, opened, reach)):
                        reach.withheld += 1
                        continue
                    label = self._label(other_rt, opened)
                    links.append(LinkView(stored.record_id, other_rt.name, role, label))
        return links

    # -- the access log, for auditors -----------------------------------------------

    def require(self, session: Session, purpose: AccessPurpose, action: Action) -> Session:
        """Check that a live session may perform an action that writes its own log entry
        (such as a subject report); a refusal is logged here. Returns the live session."""
        live = self._live(session)
        self._holder(live)
        try:
            scope_denied = _outside_scope(live, action)
            if scope_denied:
                raise AccessDenied(scope_denied)
            authorise(live.role, action)
        except AccessDenied:
            self.access_log.append(
                AccessEntry(
                    live.username,
                    live.role.value,
                    action.value,
                    Outcome.DENIED,
                    self.access_log.clock(),
                    purpose=purpose.reason,
                    case_ref=purpose.case_ref,
                    client=live.client,
                )
            )
            raise
        return live

    def read_log(
        self,
        session: Session,
        purpose: AccessPurpose,
        *,
        actor: str | None = None,
        action: str | None = None,
        since: float | None = None,
        until: float | None = None,
        purpose_contains: str | None = None,
    ) -> Iterator[tuple[int, AccessEntry]]:
        """Stream access-log entries matching the filters. Auditors only; the query is
        itself logged, durably, before the first entry is returned."""
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
        self._access(
            session, purpose, Action.LOG_READ, lambda _: (None, []), detail={"filters": filters}
        )
        needle = purpose_contains.casefold() if purpose_contains else None

        def matching() -> Iterator[tuple[int, AccessEntry]]:
            for index, entry in self.access_log.entries():
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

        return matching()

    # -- administration -------------------------------------------------------------

    def add_account(
        self,
        username: str,
        password: str,
        role: Role,
        attributes: dict[str, Any] | None = None,
        *,
        by: str = SYSTEM_ACTOR,
    ) -> Account:
        account = self.accounts.add(username, password, role, attributes)
        self.access_log.append(
            AccessEntry(
                by,
                Role.ADMIN.value if by == SYSTEM_ACTOR else "",
                Action.ACCOUNT_ADD,
                Outcome.GRANTED,
                self.access_log.clock(),
                detail={"account": username, "account_role": role.value},
            )
        )
        return account

    def assign_case(self, username: str, case_no: str, *, by: str = SYSTEM_ACTOR) -> str:
        """Assign a case to an account: with the case as the stated purpose, its records
        open to the account wherever they live. Logged; returns the canonical number.
        Holds from the account's next access, in every session it has."""
        case = self.accounts.assign_case(username, case_no)
        self._account_event(CASE_ASSIGN, username, by=by, case=case)
        return case

    def unassign_case(self, username: str, case_no: str, *, by: str = SYSTEM_ACTOR) -> str:
        """Take a case from an account; from its next access the case opens nothing."""
        case = self.accounts.unassign_case(username, case_no)
        self._account_event(CASE_UNASSIGN, username, by=by, case=case)
        return case

    def count(self, record_type: str | None = None) -> int:
        return self.storage.count_records(record_type)

    def ingest(self, source: Path | str, **options: Any) -> IngestReport:
        """Ingest a file; see custodes.ingest.run_ingest for the options."""
        from custodes.ingest import run_ingest

        started = time.time()
        report = run_ingest(self, source, **options)
        self.access_log.append(
            AccessEntry(
                SYSTEM_ACTOR,
                Role.ADMIN.value,
                Action.INGEST,
                Outcome.GRANTED,
                started,
                detail={
                    "accepted": report.accepted,
                    "already_present": report.already_present,
                    "rejected": report.rejected,
                },
            )
        )
        return report

    @property
    def key_material(self) -> KeyMaterial:
        return self._material

    @property
    def token_bits(self) -> dict[int, int]:
        return dict(self._token_bits)

    def close(self) -> None:
        self.storage.close()


def _outside_scope(session: Session, action: Action) -> str | None:
    """Why an API token's scope forbids the action, or None if it allows it."""
    if session.scope is None or action in API_SCOPES.get(session.scope, frozenset()):
        return None
    return f"this API token's scope ({session.scope}) does not allow {action.value}"


def _binding(session: Session) -> bytes:
    """What a registration challenge is bound to: the session, by its stored key."""
    return hashlib.sha256(session.token.encode()).digest()


def _api_token_key(token: str) -> str:
    return "api_token:" + hashlib.sha256(token.encode()).hexdigest()


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
