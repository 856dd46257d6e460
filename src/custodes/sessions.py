"""Logging in and staying logged in: sessions, login throttling, API tokens and passkey
ceremonies, kept in storage.

Every process serving a vault reads the same sessions and failure counts, so a logout,
a password change or a lockout in one of them holds in all of them at once, and a
restart keeps officials logged in (within the timeouts). Storage holds only a hash of
each bearer token; the CSRF token of a session is derived from it with a vault key, so
it is never stored at all. A session token carries a tag, under a vault key, over its
stored row (account, role, issue time, end, client), and an API token's stored row
carries one too: a row a database writer planted or edited opens nothing and is logged
as tampering. This module authenticates; what a session may then do is
decided by custodes.policy inside the vault's access function.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes import passkeys
from custodes.accounts import (
    BUDGET,
    Account,
    AccountBook,
    Enrolment,
    Passkey,
    RowTampered,
    TotpCheck,
)
from custodes.audit import AccessEntry, AccessLog, Outcome
from custodes.crypto import KeyMaterial
from custodes.crypto.row_mac import RowKind, RowMacs
from custodes.errors import (
    AuthenticationFailed,
    CodeUsed,
    ConfigurationError,
    LoginThrottled,
    SessionLimit,
)
from custodes.policy import API_SCOPES, Action, Role
from custodes.policy.budgets import sessions_for
from custodes.role_budgets import RoleBudgets
from custodes.storage.base import AccountRow, AccountStore, LoginCounts, MetaStore, SessionRow

Clock = Callable[[], float]
Random = Callable[[int], bytes]  # n bytes from a cryptographically secure source

IDLE_TIMEOUT = 30 * 60.0
ABSOLUTE_TIMEOUT = 8 * 3600.0
# last_seen is written at most this often: a write per request would cost every read a
# commit, and the idle timeout needs no finer grain than this.
TOUCH_EVERY = 60.0
FREE_FAILURES = 3  # failed logins before backoff starts
# A one-time code is accepted for three 30-second steps; its use-once mark outlives them.
TOTP_KEEP = 4 * 30.0
# What the holder of the right password is told of a code used already.
CODE_USED = (
    "that one-time code was used already: wait for the next code in your app, then log in with it"
)
MAX_BACKOFF = 15 * 60.0

_CSRF_INFO = b"custodes session csrf v1"
# A session token: 16 random bytes, then 16 bytes of the tag over its stored row.
_SESSION_RANDOM = 16
_SESSION_TAG = 16


@dataclass(frozen=True, slots=True)
class Session:
    """Proof of a successful login. Only the vault that issued it accepts it."""

    token: str
    username: str
    role: Role
    issued_at: float
    client: str | None = None  # the network address the session was opened from
    scope: str | None = None  # an integration's API token: what it may do (API_SCOPES)
    # The check a request made of it as it arrived: no part of what the session is.
    check: SessionCheck | None = field(default=None, compare=False, repr=False)

    def __repr__(self) -> str:  # the token is a bearer secret
        return f"Session(username={self.username!r}, role={self.role.value!r})"


# A request's check serves the access it leads to only this soon after it was made.
CHECK_SERVES_FOR = 1.0


class SessionCheck:
    """What checking a session as its request arrived read of its account, for the one
    access that request then makes: the session, its row's tag and timeouts, and the
    account were read in one query, so the access need not read them again. Taken once:
    the next access with the same Session, or one made after CHECK_SERVES_FOR seconds,
    reads them afresh."""

    __slots__ = ("_account", "_at", "_keeper")

    def __init__(self, keeper: object, account: Account | None, at: float) -> None:
        self._keeper = keeper
        self._at = at
        # One item until taken; list.pop is atomic, so two threads cannot both take it.
        self._account: list[Account | None] = [account]

    def take(self, keeper: object, now: float) -> tuple[Account | None] | None:
        """(the account as the check read it,) if this check is the keeper's own, still
        fresh and not yet taken; None if the session must be read again."""
        if keeper is not self._keeper or not 0 <= now - self._at < CHECK_SERVES_FOR:
            return None
        try:
            return (self._account.pop(),)
        except IndexError:
            return None


def token_key(token: str) -> bytes:
    """What storage keeps of a bearer token: its SHA-256, useless to present."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class SessionBook:
    """Logged-in sessions: opened at login, checked on every request, ended on logout."""

    def __init__(
        self,
        storage: AccountStore,
        material: KeyMaterial,
        ttl: float,
        random: Random,
        macs: RowMacs | None = None,
    ) -> None:
        self._storage = storage
        self._random = random
        self._macs = macs if macs is not None else RowMacs(material)
        self._ttl = min(ttl, ABSOLUTE_TIMEOUT)
        self._csrf_key = HKDF(hashes.SHA256(), 32, salt=material.vault_id, info=_CSRF_INFO).derive(
            material.index_root
        )

    def __repr__(self) -> str:
        return "SessionBook()"

    def open(self, username: str, role: Role, now: float, client: str | None) -> Session:
        # Always a fresh token: a session id planted before login is never promoted.
        raw = self._random(_SESSION_RANDOM)
        expires = now + self._ttl
        tag = self._tag(raw, username, role.value, now, expires, client)
        session = Session(_token(raw + tag), username, role, now, client)
        self._storage.put_session(
            SessionRow(token_key(session.token), username, role.value, now, expires, now, client)
        )
        return session

    def _tag(
        self,
        raw: bytes,
        username: str,
        role: str,
        issued_at: float,
        expires: float,
        client: str | None,
    ) -> bytes:
        # Everything in the row that decides access, and the token's own random part as
        # the row's identity. last_seen is left out: it moves on every minute of use, and
        # moving it forward only keeps a session its holder already has within its end.
        fields = [raw.hex(), username, role, float(issued_at), float(expires), client]
        return self._macs.tag(RowKind.SESSION, fields)[:_SESSION_TAG]

    def live(self, token: str, now: float) -> tuple[Session, AccountRow | None] | None:
        """The session a token stands for, if it has not ended, with the stored row of
        its account (None if there is none), read together; keeps it alive.
        RowTampered if its stored row is not the one the token was issued for."""
        raw = _untoken(token)
        if raw is None or len(raw) != _SESSION_RANDOM + _SESSION_TAG:
            return None  # not a session token of this version: no row is even looked up
        key = token_key(token)
        found = self._storage.get_session_account(key)
        if found is None:
            return None
        row, account = found
        random_part, tag = raw[:_SESSION_RANDOM], raw[_SESSION_RANDOM:]
        try:
            expected = self._tag(
                random_part, row.username, row.role, row.issued_at, row.expires, row.client
            )
        except (TypeError, ValueError):
            expected = b""  # a column of the wrong type: written by hand, not by us
        if not hmac.compare_digest(expected, tag):
            raise RowTampered(RowKind.SESSION.value, str(row.username)[:64])
        if now >= row.expires or now - row.last_seen > IDLE_TIMEOUT:
            self._storage.end_session(key)
            return None
        if now - row.last_seen >= TOUCH_EVERY:
            self._storage.touch_session(key, now)
        try:
            role = Role(row.role)
        except ValueError:
            return None
        return Session(token, row.username, role, row.issued_at, row.client), account

    def csrf(self, token: str) -> str:
        """The session's token for forms: a cross-site form cannot know it."""
        return hmac.new(self._csrf_key, token_key(token), hashlib.sha256).hexdigest()

    def end(self, token: str) -> bool:
        return self._storage.end_session(token_key(token))

    def end_all(self, username: str) -> int:
        return self._storage.end_sessions(username)

    def purge(self, now: float) -> int:
        return self._storage.purge_sessions(now, IDLE_TIMEOUT)


class Throttle:
    """Login attempts per key (account name or client address). After FREE_FAILURES, each
    attempt waits 2^n seconds, up to MAX_BACKOFF; a key quiet for MAX_BACKOFF is forgotten
    (the account's own lock, in its record, still counts).

    An attempt is counted when it is let in, before its password is checked, in one step
    with the decision across every server process: counted only after a failed check,
    a burst of guesses arriving together would all find the count unchanged and all reach
    the password hash. A successful login takes its count back.
    """

    def __init__(self, storage: AccountStore) -> None:
        self._storage = storage

    def admit(self, keys: Sequence[str], now: float) -> float:
        """0 if this attempt may go on (it is now counted), else the seconds to wait."""
        wait = 0.0

        def decide(counts: LoginCounts) -> bool:
            nonlocal wait
            wait = _backoff(counts, now)
            return wait <= 0

        return 0.0 if self._storage.admit_login_attempt(keys, now, decide) else wait

    def succeeded(self, keys: Sequence[str]) -> None:
        """The admitted attempt logged in: the account starts afresh, and its address
        gets back the attempt it spent (an office behind one address logs in all day)."""
        account, *clients = keys
        self._storage.clear_login_failures(account)
        for key in clients:
            self._storage.forgive_login_attempt(key)

    def clear(self, key: str) -> None:
        self._storage.clear_login_failures(key)

    def forget_quiet(self, now: float) -> int:
        return self._storage.purge_login_failures(now - MAX_BACKOFF)


def _backoff(counts: LoginCounts, now: float) -> float:
    longest = 0.0
    for count, last in counts.values():
        excess = count - FREE_FAILURES
        if excess >= 0:
            longest = max(longest, last + min(2.0 ** (excess + 1), MAX_BACKOFF) - now)
    return longest


def _token(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _untoken(token: str) -> bytes | None:
    try:
        text = token.encode("ascii")
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (UnicodeEncodeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Operator:
    """Whoever unsealed the vault's keys on the host (the keyring passphrase's holder),
    acting through host commands. Not an account, never a web session: the composition
    root hands one out with a vault it opened on the host, and a server's vault has none.
    The policy lets it ingest and administer, never read records or the log's entries."""

    username: str = "operator"
    role: Role = Role.OPERATOR
    scope: None = None
    client: None = None


# Who acts: an official's session (a login's or an integration token's) or the operator.
Principal = Session | Operator

API_TOKEN_PREFIX = "cst_"  # noqa: S105 - recognisable to secret scanners
MAX_API_TOKEN_DAYS = 365


class ApiTokens:
    """Integrations' bearer tokens: shown once, only a SHA-256 of each stored, beside a
    tag over the stored row (token hash, account, scope, issue time, expiry)."""

    def __init__(self, meta: MetaStore, random: Random, macs: RowMacs) -> None:
        self._meta = meta
        self._random = random
        self._macs = macs

    def issue(self, username: str, scope: str, *, days: int, now: float) -> str:
        if scope not in API_SCOPES:
            raise ConfigurationError(f"a scope is one of: {', '.join(API_SCOPES)}")
        if not 1 <= days <= MAX_API_TOKEN_DAYS:
            raise ConfigurationError(f"a token lives 1 to {MAX_API_TOKEN_DAYS} days")
        token = API_TOKEN_PREFIX + _token(self._random(32))
        doc: dict[str, Any] = {
            "username": username,
            "scope": scope,
            "issued": float(now),
            "expires": float(now + days * 86400),
        }
        key = _api_token_key(token)
        doc["mac"] = self._macs.tag_hex(RowKind.API_TOKEN, _token_fields(key, doc))
        self._meta.set_meta(key, orjson.dumps(doc))
        return token

    def find(self, token: str) -> dict[str, Any] | None:
        """The token's stored row, or None; RowTampered if the row fails its tag."""
        key = _api_token_key(token)
        stored = self._meta.get_meta(key)
        if not stored:
            return None
        try:
            doc = orjson.loads(stored)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            raise RowTampered(RowKind.API_TOKEN.value, "")
        tag = doc.pop("mac", None)
        try:
            fields = _token_fields(key, doc)
        except (KeyError, TypeError, ValueError):
            fields = None
        if fields is None or not self._macs.check_hex(RowKind.API_TOKEN, fields, tag):
            raise RowTampered(RowKind.API_TOKEN.value, str(doc.get("username", ""))[:64])
        return doc


def _token_fields(key: str, doc: dict[str, Any]) -> list[object]:
    return [
        key,
        str(doc["username"]),
        str(doc["scope"]),
        float(doc["issued"]),
        float(doc["expires"]),
    ]


def _api_token_key(token: str) -> str:
    return "api_token:" + hashlib.sha256(token.encode()).hexdigest()


def registration_binding(session: Session) -> bytes:
    """What a registration challenge is bound to: the session, by its stored key."""
    return hashlib.sha256(session.token.encode()).digest()


class Gatekeeper:
    """Logins (password and a second factor: a one-time code or a passkey), the sessions
    they open, integrations' tokens, and second-factor enrolment. Every login attempt and
    logout is on the access log. Authentication only: the vault's access function decides
    what a session may do, and calls the self-service ceremonies here once it has."""

    def __init__(
        self,
        *,
        store: AccountStore,
        meta: MetaStore,
        accounts: AccountBook,
        log: AccessLog,
        material: KeyMaterial,
        clock: Clock,
        random: Random,
        session_ttl: float,
    ) -> None:
        self._store = store
        self._accounts = accounts
        self._log = log
        self._clock = clock
        macs = RowMacs(material)
        self.sessions = SessionBook(store, material, session_ttl, random, macs)
        self.tokens = ApiTokens(meta, random, macs)
        # Read here for the session cap at login, and by the access function for reads.
        self.role_budgets = RoleBudgets(meta, macs)
        accounts.watch_tampering(self._log_tampered)
        self._throttle = Throttle(store)
        self._challenges = passkeys.ChallengeMint(material, random)

    def __repr__(self) -> str:
        return "Gatekeeper()"

    # -- logging in ----------------------------------------------------------------------

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
        now = self._clock()
        keys = [f"account:{username.casefold()}"] + ([f"client:{client}"] if client else [])
        wait = self._throttle.admit(keys, now)
        if wait > 0:
            self._log_login(username, "", Outcome.DENIED, now, client, reason="throttled")
            raise LoginThrottled(wait)
        try:
            account = self._accounts.authenticate(username, password)
        except AuthenticationFailed:
            self._login_failed(username, now, client, "credentials")
            raise AuthenticationFailed() from None
        if not account.mfa_enrolled:
            # Answered, counted and throttled exactly like a wrong password, so the login
            # form never confirms a password: enrolment starts from the administrator's
            # one-time code, not from here.
            self._login_failed(username, now, client, "no_mfa")
            raise AuthenticationFailed()
        if passkey is not None:
            factor_ok = self._passkey_ok(username, passkey, now)
        else:
            checked = self._accounts.check_totp(username, totp, now=now)
            if checked is TotpCheck.ACCEPTED and not self._spend(
                b"custodes totp code", f"{username.casefold()}\0{totp}", now, TOTP_KEEP
            ):
                checked = TotpCheck.USED  # another process took this very code first
            if checked is TotpCheck.USED:
                # Counted and throttled like any wrong code; only its holder, who typed
                # the right password, is told why, so that they wait for the next code
                # instead of retyping this one.
                self._login_failed(username, now, client, "second_factor_used")
                raise CodeUsed()
            factor_ok = checked is TotpCheck.ACCEPTED
        if not factor_ok:
            self._login_failed(username, now, client, "second_factor")
            raise AuthenticationFailed()
        self._throttle.succeeded(keys)
        self._throttle.forget_quiet(now)
        self._accounts.record_success(username)
        self.sessions.purge(now)
        most = sessions_for(
            account.role, account.attributes.get(BUDGET), self.role_budgets.current()
        )
        if most is not None and self._store.count_account_sessions(username) >= most:
            # The holder proved who they are: they are told why, and the refusal is logged.
            self._log_login(username, account.role, Outcome.DENIED, now, client, "sessions")
            raise SessionLimit(
                f"this account already has {most} sessions open, as many as it may: log out "
                "of one, or wait until one times out"
            )
        factor = "passkey" if passkey is not None else "totp"
        self._log_login(username, account.role, Outcome.GRANTED, now, client, factor=factor)
        return self.sessions.open(username, account.role, now, client)

    def _login_failed(self, username: str, now: float, client: str | None, reason: str) -> None:
        # The attempt was counted when it was let in.
        locked = self._accounts.record_failure(username)
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
        self._log.append(
            AccessEntry(username, role, Action.LOGIN, outcome, now, client=client, detail=detail)
        )

    def _log_tampered(self, kind: str, username: str) -> None:
        """A stored row that grants access failed its tag: on the log, by kind and the
        account it names, never a token, hash or value of the row. The name is the
        forger's text, so it is logged only if it has the form of an account name."""
        if not (
            3 <= len(username) <= 64
            and all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in username)
        ):
            username = "unknown"
        self._log.append(
            AccessEntry(
                username,
                "",
                Action.ROW_TAMPERED,
                Outcome.DENIED,
                self._clock(),
                detail={"row": kind, "account": username},
            )
        )

    def clear_failures(self, username: str) -> None:
        """Forget an account's failed logins (an administrator lifted its lock)."""
        self._throttle.clear(f"account:{username.casefold()}")

    # -- sessions ----------------------------------------------------------------------

    def session_for(self, token: str) -> Session:
        """The live session a bearer token stands for (a login's or an API token's),
        or AuthenticationFailed. Idle and absolute timeouts apply here."""
        if not isinstance(token, str) or not token:
            raise AuthenticationFailed("no valid session: log in first")
        now = self._clock()
        try:
            if token.startswith(API_TOKEN_PREFIX):
                return self._api_session(token)
            found = self.sessions.live(token, now)
            if found is None:
                raise AuthenticationFailed("the session has ended: log in again")
            session, row = found
            account = None if row is None else self._accounts.authentic(row)
        except RowTampered as forged:
            self._log_tampered(forged.kind, forged.username)
            raise AuthenticationFailed("the session has ended: log in again") from None
        return replace(session, check=SessionCheck(self, account, now))

    def lock_out(self, username: str, why: Mapping[str, Any]) -> None:
        """Lock an account and end every session it has (its API tokens die with the
        lock): what the access function does to an account that crossed a budget."""
        self._accounts.lock_out(username, why)
        self.sessions.end_all(username)

    def live(self, session: object) -> Session:
        """The session again, checked afresh: it may have ended since it was presented."""
        return self.live_with_account(session)[0]

    def live_with_account(self, session: object) -> tuple[Session, Account | None]:
        """The session, checked, and its account as read with it (None if it has none):
        the check its request made as it arrived, if that check is fresh and untaken,
        otherwise a new one. The account is not judged here (see AccessGate)."""
        if not isinstance(session, Session):
            raise AuthenticationFailed("no valid session: log in first")
        if session.check is not None and (taken := session.check.take(self, self._clock())):
            return session, taken[0]
        again = self.session_for(session.token)
        if again != session or again.check is None:
            raise AuthenticationFailed("no valid session: log in first")
        taken = again.check.take(self, self._clock())
        if taken is None:  # the clock stepped back, or another thread took it first
            return again, self._accounts.get(again.username)
        return again, taken[0]

    def csrf_token(self, session: Session) -> str:
        """The session's own token for forms: a cross-site form cannot know it."""
        return self.sessions.csrf(self.live(session).token)

    def logout(self, session: Session) -> None:
        if not isinstance(session, Session) or session.scope is not None:
            return  # an integration's token ends with its expiry or its account
        if self.sessions.end(session.token):
            self._log.append(
                AccessEntry(
                    session.username,
                    session.role.value,
                    Action.LOGOUT,
                    Outcome.GRANTED,
                    self._clock(),
                    client=session.client,
                    detail={"account": session.username},
                )
            )

    def _api_session(self, token: str) -> Session:
        # Checked against its account at every use, so that disabling or locking the
        # account stops an integration's token at once.
        doc = self.tokens.find(token)
        if doc is None:
            raise AuthenticationFailed("no valid session: log in first")
        account = self._accounts.get(str(doc["username"]))
        now = self._clock()
        if account is None or account.disabled or account.locked or now >= float(doc["expires"]):
            raise AuthenticationFailed("the session has ended: log in again")
        return Session(
            token,
            account.username,
            account.role,
            float(doc["issued"]),
            None,
            str(doc["scope"]),
            SessionCheck(self, account, now),
        )

    # -- second factors ------------------------------------------------------------------

    def enrolment(self, code: str) -> Enrolment:
        """The TOTP secret for an enrolment code, to show once as a QR code."""
        return self._accounts.enrolment(code, now=self._clock())

    def complete_enrolment(self, code: str, totp: str) -> str:
        """Confirm an enrolment with a first one-time code; the account's name. The code
        is the authority here (issued by an administrator, logged then); this is logged too."""
        now = self._clock()
        username = self._accounts.complete_enrolment(code, totp, now=now)
        self._log.append(
            AccessEntry(
                username,
                "",
                Action.MFA_ENROL,
                Outcome.GRANTED,
                now,
                detail={"account": username},
            )
        )
        return username

    def passkey_login_options(
        self, username: str, ceremony: passkeys.Ceremony, *, binding: bytes
    ) -> str:
        """Options for navigator.credentials.get at login, as JSON, bound to the account
        name and the login form's pre-session token. The same shape for every name, known
        or not, with passkeys or without: nothing is looked up."""
        challenge = self._challenges.issue(passkeys.LOGIN, username, binding, self._clock())
        return passkeys.login_options(ceremony, challenge=challenge)

    def passkey_registration_options(self, live: Session, ceremony: passkeys.Ceremony) -> str:
        """Options for navigator.credentials.create, bound to this (authorised) session."""
        challenge = self._challenges.issue(
            passkeys.REGISTER, live.username, registration_binding(live), self._clock()
        )
        return passkeys.registration_options(
            ceremony,
            username=live.username,
            user_handle=self._accounts.passkey_user_handle(live.username),
            challenge=challenge,
            existing=self._accounts.passkey_ids(live.username),
        )

    def register_passkey(
        self, live: Session, ceremony: passkeys.Ceremony, credential_json: str, label: str
    ) -> Passkey:
        """Verify a navigator.credentials.create response made for a challenge of this
        (authorised) session, and store the passkey."""
        now = self._clock()
        label = passkeys.check_label(label)
        challenge = passkeys.challenge_of(credential_json)
        nonce = self._challenges.check(
            challenge, passkeys.REGISTER, live.username, registration_binding(live), now
        )
        if not self._spend_challenge(nonce, now):
            raise passkeys.PasskeyRefused()
        new = passkeys.verify_registration(credential_json, challenge=challenge, ceremony=ceremony)
        return self._accounts.add_passkey(
            live.username, new, label=label, rp_id=ceremony.rp_id, now=now
        )

    def _passkey_ok(self, username: str, answer: passkeys.Assertion, now: float) -> bool:
        """Whether a login's passkey assertion verifies, its challenge spent here."""
        try:
            challenge = passkeys.challenge_of(answer.credential_json)
            nonce = self._challenges.check(challenge, passkeys.LOGIN, username, answer.binding, now)
        except passkeys.PasskeyRefused:
            return False
        if not self._spend_challenge(nonce, now):
            return False
        return self._accounts.use_passkey(
            username,
            answer.credential_json,
            challenge=challenge,
            ceremony=answer.ceremony,
            now=now,
        )

    def _spend_challenge(self, nonce: bytes, now: float) -> bool:
        """Mark a challenge used; whether this was its first use, in any process. The
        mark is kept twice the challenge's life, so it outlives the challenge."""
        return self._spend(
            b"custodes passkey challenge", nonce.hex(), now, 2 * passkeys.CHALLENGE_TTL
        )

    def _spend(self, label: bytes, value: str, now: float, keep: float) -> bool:
        """Mark a one-time value used in storage; True only the first time, in any process
        (the account's own last-step record is read and written by each process apart, so
        two workers racing with one code could both have accepted it)."""
        key = hashlib.sha256(label + b"\x00" + value.encode()).digest()
        return self._store.spend(key, now, keep=keep)
