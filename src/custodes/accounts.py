"""Officials' accounts: argon2id password hashes, weak-password refusal, the second factor
(TOTP seeds sealed at rest), one-time enrolment codes, lockout after repeated failures, and
the cases each official is assigned to.

A password is never stored or logged; an unknown account, a wrong password, a disabled and
a locked account fail the same way and take about the same time. Every stored account row
carries a tag under a vault key over all of its fields (role, password hash, district,
cases, second factors, lock and disabled state): a row a database writer made or edited
is never honoured, and the tampering is reported.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import cache, wraps
from importlib import resources
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zxcvbn import zxcvbn

from custodes import passkeys
from custodes.crypto import KeyMaterial
from custodes.crypto.row_mac import RowKind, RowMacs
from custodes.errors import (
    AuthenticationFailed,
    ConfigurationError,
    InvalidAssignment,
    RecordNotFound,
    StorageError,
    TamperDetected,
    WeakPassword,
)
from custodes.policy import ACCOUNT_ROLES, Role, district_prefix, reads_records
from custodes.policy.budgets import checked_budget
from custodes.records.normalise import Refusal
from custodes.records.normalise import case_no as canonical_case_no
from custodes.storage.base import AccountRow, AccountStore

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024
# zxcvbn's estimate is costly on very long inputs; its verdict is settled well before this.
_ZXCVBN_PREFIX = 100

LOCK_AFTER_FAILURES = 10
# Password checks one process runs at once: each holds the hash's memory while it runs.
HASHES_AT_ONCE = max(2, os.cpu_count() or 2)
ENROLMENT_TTL = 24 * 3600.0
TOTP_STEP = 30
# Security state lives in the account's attributes under this key and is never shown.
_SECURITY = "security"
# The cases an account is assigned to: their records open to it wherever they live, when
# the case is the stated purpose (custodes.policy.records.may_see).
CASES = "cases"
# An account's own budget limits, where its administrator set any (policy.budgets).
BUDGET = "budget"
MAX_ASSIGNED_CASES = 200
# The row's tag (custodes.crypto.row_mac) rides in its attributes, so that the storage
# shape stays as it is; it is never an attribute one can set or see.
_ROW_MAC = "row_mac"

# `list` is a method name inside AccountBook.
_Rows = list[AccountRow]

# Told of every stored row found forged or edited: (row kind, account name).
TamperWatcher = Callable[[str, str], None]


_P = ParamSpec("_P")
_R = TypeVar("_R")
# How often one change of an account is tried again after losing a race for its row.
_RACE_RETRIES = 64


class _Raced(Exception):
    """The stored row changed between this change's read and its write."""


def _one_change(
    method: Callable[Concatenate[AccountBook, _P], _R],
) -> Callable[Concatenate[AccountBook, _P], _R]:
    """Run a read-modify-write of an account as one change: the write lands only on the
    row that was read (a compare-and-swap in storage, across every server process), and
    a change that lost the race reads again and is made again. Without it two failed
    logins on two servers at once count as one, and one TOTP code can pass twice."""

    @wraps(method)
    def run(book: AccountBook, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        for _ in range(_RACE_RETRIES):
            # Within a process, one change at a time: the retries are for other processes.
            with book._lock:
                try:
                    return method(book, *args, **kwargs)
                except _Raced:
                    continue
        raise StorageError("an account kept changing under this change; try again")

    return run


class RowTampered(AuthenticationFailed):
    """A stored row that grants access failed its tag: honoured as no row at all. Carries
    the row's kind and the account it names (never a secret) for the access log."""

    def __init__(self, kind: str, username: str) -> None:
        super().__init__()
        self.kind = kind
        self.username = username


@dataclass(frozen=True, slots=True)
class HashCost:
    """argon2id cost. The floor is OWASP's minimum; the default is above it."""

    time_cost: int = 3
    memory_kib: int = 65_536
    parallelism: int = 1

    def __post_init__(self) -> None:
        if self.time_cost < 2 or self.memory_kib < 19_456:
            raise ConfigurationError("argon2id cost below the floor (t>=2, m>=19 MiB)")


@cache
def _common_passwords() -> frozenset[str]:
    text = resources.files("custodes").joinpath("data/common_passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip().casefold() for line in text.splitlines() if line and not line.startswith("#")
    )


def check_password_strength(password: str, *, username: str = "", what: str = "password") -> None:
    """Raise WeakPassword, with a reason that never repeats the password, unless strong.
    `what` names the secret in the reason (a passphrase sealing keys meets the same bar)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"a {what} needs at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"a {what} may have at most {MAX_PASSWORD_LENGTH} characters")
    folded = password.casefold()
    if folded in _common_passwords():
        raise WeakPassword(f"that {what} is on the list of commonly used passwords")
    if username and username.casefold() in folded:
        raise WeakPassword(f"a {what} must not contain the account name")
    verdict = zxcvbn(password[:_ZXCVBN_PREFIX], user_inputs=[username] if username else [])
    if verdict["score"] < 3:
        raise WeakPassword(f"that {what} is too easy to guess; use a longer passphrase")


class SecretBox:
    """AES-256-GCM for small account secrets (TOTP seeds), under a key derived with HKDF
    from the vault's index root, bound to the vault and the account by associated data."""

    def __init__(self, material: KeyMaterial) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=material.vault_id,
            info=b"custodes/account-secrets/v1",
        ).derive(material.index_root)
        self._aead = AESGCM(key)
        self._vault_id = material.vault_id

    def __repr__(self) -> str:
        return "SecretBox(<hidden>)"

    def _aad(self, username: str, purpose: str) -> bytes:
        return b"\x00".join((self._vault_id, username.encode(), purpose.encode()))

    def seal(self, secret: str, *, username: str, purpose: str) -> str:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, secret.encode(), self._aad(username, purpose))
        return base64.b64encode(nonce + sealed).decode()

    def open(self, sealed: str, *, username: str, purpose: str) -> str:
        try:
            raw = base64.b64decode(sealed)
            plain = self._aead.decrypt(raw[:12], raw[12:], self._aad(username, purpose))
        except (InvalidTag, ValueError):
            raise TamperDetected() from None
        return plain.decode()


class TotpCheck(Enum):
    """What a one-time code turned out to be."""

    ACCEPTED = "accepted"
    WRONG = "wrong"
    USED = "used"  # right for these moments, but used already


@dataclass(frozen=True, slots=True)
class Account:
    """An account as the rest of the system sees it: no hash, no secret."""

    username: str
    role: Role
    attributes: dict[str, Any]
    disabled: bool
    mfa_enrolled: bool = False
    locked: bool = False
    # The budget limits a read crossed when the account was locked for it; empty if it
    # was not (policy.budgets).
    crossed: tuple[str, ...] = ()
    # The alert its reads raised when the account was locked for them (a canary read,
    # an anomaly), if any.
    locked_by: str | None = None
    # The anomaly guard's signals when it locked the account (custodes.vault.guard); empty
    # if it did not.
    anomaly: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Passkey:
    """A registered passkey as its holder sees it: nothing secret is ever stored."""

    ref: str  # a short hash of the credential id
    label: str
    created: float
    last_used: float | None
    rp_id: str


@dataclass(frozen=True, slots=True)
class Enrolment:
    """What an official needs to add the account to an authenticator app."""

    username: str
    secret: str  # base32; shown once, to the holder of the enrolment code

    def __repr__(self) -> str:
        return f"Enrolment(username={self.username!r})"

    @property
    def uri(self) -> str:
        return pyotp.TOTP(self.secret, interval=TOTP_STEP).provisioning_uri(
            name=self.username, issuer_name="custodes"
        )


class AccountBook:
    """Accounts over a storage backend."""

    def __init__(
        self,
        storage: AccountStore,
        cost: HashCost = HashCost(),
        *,
        random: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._random = random
        self._clock = clock
        self._hasher = PasswordHasher(
            time_cost=cost.time_cost, memory_cost=cost.memory_kib, parallelism=cost.parallelism
        )
        # Verified against when the account is unknown, so that unknown and known
        # usernames cost the same.
        self._decoy_hash = self._hasher.hash("decoy password that matches nothing")
        self._box: SecretBox | None = None
        # Without them (doctor, which reads no keys) rows are listed unchecked and none
        # can be written.
        self._macs: RowMacs | None = None
        self._watcher: TamperWatcher | None = None
        # Read-modify-write of an account's security state (failures, last TOTP step).
        self._lock = threading.RLock()
        self._hashing = threading.BoundedSemaphore(HASHES_AT_ONCE)

    def bind_secrets(self, box: SecretBox, macs: RowMacs) -> None:
        """Give the book the keys that seal second-factor secrets and tag account rows
        (the composition root does this)."""
        self._box = box
        self._macs = macs

    def watch_tampering(self, watcher: TamperWatcher) -> None:
        """Tell `watcher` of every account row found forged or edited (to log it)."""
        self._watcher = watcher

    def add(
        self,
        username: str,
        password: str,
        role: Role,
        attributes: dict[str, Any] | None = None,
    ) -> Account:
        _check_username(username)
        if role not in ACCOUNT_ROLES:
            raise ConfigurationError(f"no account can have the {role.value} role")
        check_password_strength(password, username=username)
        public = dict(attributes or {})
        for reserved in (_SECURITY, _ROW_MAC):
            if reserved in public:
                raise ConfigurationError(f"{reserved!r} is not an account attribute one can set")
        if CASES in public:
            public[CASES] = _case_list(role, public[CASES])
        if BUDGET in public:
            if not isinstance(public[BUDGET], dict):
                raise ConfigurationError("an account's budget is a table of limits")
            public[BUDGET] = checked_budget(public[BUDGET])
        row = AccountRow(
            username=username,
            role=role.value,
            password_hash=self._hasher.hash(password),
            attributes=orjson.dumps(public),
            created_at=self._clock(),
            disabled=False,
        )
        self._storage.add_account(self._stamped(row))
        return _account(row)

    def authenticate(self, username: str, password: str) -> Account:
        """The account, if the password is right and it is neither disabled nor locked."""
        # A forged or edited row is no row: its password hash may be the forger's own.
        row = self._fetch(username)
        candidate = row.password_hash if row is not None else self._decoy_hash
        try:
            # Each check takes the hash's memory (64 MiB by default): a burst of logins
            # waits its turn rather than taking the server's memory, and the searches of
            # everyone else with it.
            with self._hashing:
                self._hasher.verify(candidate, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            raise AuthenticationFailed() from None
        if row is None or row.disabled or _security(row).get("locked"):
            raise AuthenticationFailed()
        if self._hasher.check_needs_rehash(row.password_hash):
            # Done next time if another change to the account got in first.
            with contextlib.suppress(_Raced):
                self._put(row, password_hash=self._hasher.hash(password))
        return _account(row)

    def get(self, username: str) -> Account | None:
        """The account, or None if there is none or its stored row failed its tag."""
        row = self._fetch(username)
        return None if row is None else _account(row)

    def authentic(self, row: AccountRow) -> Account | None:
        """The account of a row read elsewhere (with a session, say), or None if the row
        failed its tag (reported)."""
        checked = self._fetch(row.username, row)
        return None if checked is None else _account(checked)

    def list(self) -> list[Account]:
        """Every account whose stored row is authentic; forged or edited rows are left
        out (and reported)."""
        return [_account(row) for row in self._authentic(self._storage.list_accounts())]

    # -- failures and lockout ----------------------------------------------------------

    @_one_change
    def record_failure(self, username: str) -> bool:
        """Count a failed login; lock the account at the limit. Whether it is now locked."""
        # A forged row was reported by the login that failed on it.
        row = self._fetch(username, report=False)
        if row is None:
            return False
        state = _security(row)
        state["failures"] = int(state.get("failures", 0)) + 1
        if state["failures"] >= LOCK_AFTER_FAILURES:
            state["locked"] = True
        self._save(row, state)
        return bool(state.get("locked"))

    @_one_change
    def record_success(self, username: str) -> None:
        row = self._fetch(username)
        if row is not None and _security(row).get("failures"):
            state = _security(row)
            state["failures"] = 0
            self._save(row, state)

    @_one_change
    def set_district(self, username: str, district: str | None) -> None:
        """Move an account to another division (a code prefix, or * for a national unit),
        or with None take its district away: it then reads no records but its cases'."""
        if district is not None and district_prefix(district) is None:
            raise ConfigurationError("a district is * or a division code of 2, 4 or 6 digits")
        row = self._require(username)
        attributes = _attributes(row)
        if district is None:
            attributes.pop("district", None)
        else:
            attributes["district"] = district
        self._put(row, attributes=orjson.dumps(attributes))

    @_one_change
    def set_budget(self, username: str, limits: Mapping[str, int | None] | None) -> None:
        """Give an account limits of its own (custodes.policy.budgets), over any it has
        already; None: none of its own, its role's budget again."""
        row = self._require(username)
        attributes = _attributes(row)
        if limits is None:
            attributes.pop(BUDGET, None)
        else:
            own = attributes.get(BUDGET)
            attributes[BUDGET] = {
                **checked_budget(own if isinstance(own, dict) else {}),
                **checked_budget(limits),
            }
        self._put(row, attributes=orjson.dumps(attributes))

    @_one_change
    def lock_out(self, username: str, why: Mapping[str, Any]) -> None:
        """Lock an account for what its reads did (a budget crossed, with where that is on
        the access log): no login, no API token, until an administrator unlocks it."""
        row = self._fetch(username)
        if row is None:
            return
        state = _security(row)
        state["locked"] = True
        state["held"] = dict(why)
        self._save(row, state)

    @_one_change
    def unlock(self, username: str) -> None:
        row = self._require(username)
        state = _security(row)
        state.pop("locked", None)
        state.pop("held", None)
        state["failures"] = 0
        self._save(row, state)

    @_one_change
    def set_disabled(self, username: str, disabled: bool) -> None:
        row = self._require(username)
        self._put(row, disabled=disabled)

    @_one_change
    def set_password(self, username: str, password: str) -> None:
        check_password_strength(password, username=username)
        row = self._require(username)
        self._put(row, password_hash=self._hasher.hash(password))

    # -- assigned cases ----------------------------------------------------------------

    @_one_change
    def assign_case(
        self, username: str, case_no: str, *, exists: Callable[[str], bool] | None = None
    ) -> str:
        """Assign a case to an account; returns the case number in canonical form.

        With `exists`, a number no stored case carries is refused (the vault passes it:
        an administrator learns that much, and nothing of what the case holds).
        """
        case = _case_number(case_no)
        row = self._require(username)
        _check_takes_cases(Role(row.role))
        if exists is not None and not exists(case):
            raise InvalidAssignment("no case with that number is stored in this vault")
        attributes = _attributes(row)
        cases = _stored_cases(attributes.get(CASES))
        if case in cases:
            raise InvalidAssignment("that case is already assigned to this account")
        if len(cases) >= MAX_ASSIGNED_CASES:
            raise InvalidAssignment(
                f"an account has at most {MAX_ASSIGNED_CASES} cases: unassign closed ones"
            )
        attributes[CASES] = [*cases, case]
        self._put(row, attributes=orjson.dumps(attributes))
        return case

    @_one_change
    def unassign_case(self, username: str, case_no: str) -> str:
        """Take a case from an account; returns the case number in canonical form."""
        case = _case_number(case_no)
        row = self._require(username)
        attributes = _attributes(row)
        stored = _stored_cases(attributes.get(CASES))
        if case not in stored:
            raise InvalidAssignment("that case is not assigned to this account")
        cases = [c for c in stored if c != case]
        if cases:
            attributes[CASES] = cases
        else:
            attributes.pop(CASES, None)
        self._put(row, attributes=orjson.dumps(attributes))
        return case

    # -- the second factor -------------------------------------------------------------

    @_one_change
    def issue_enrolment(self, username: str, *, now: float) -> str:
        """A one-time enrolment code for the account, valid 24 h; only its hash is kept.
        A factor already enrolled keeps working until the new one is confirmed."""
        code = base64.urlsafe_b64encode(self._random(20)).rstrip(b"=").decode()
        row = self._require(username)
        state = _security(row)
        state["enrolment"] = {"hash": _digest(code), "expires": now + ENROLMENT_TTL}
        state.pop("pending", None)
        self._save(row, state)
        return code

    @_one_change
    def enrolment(self, code: str, *, now: float) -> Enrolment:
        """The secret to enrol for this code (the same one until confirmed)."""
        box = self._secret_box()
        row = self._by_enrolment(code, now)
        state = _security(row)
        sealed = state.get("pending")
        if isinstance(sealed, str):
            secret = box.open(sealed, username=row.username, purpose="totp")
        else:
            secret = base64.b32encode(self._random(20)).decode()
            state["pending"] = box.seal(secret, username=row.username, purpose="totp")
            self._save(row, state)
        return Enrolment(row.username, secret)

    @_one_change
    def complete_enrolment(self, code: str, totp: str, *, now: float) -> str:
        """Confirm the enrolment with a first valid one-time code; the account's name."""
        box = self._secret_box()
        row = self._by_enrolment(code, now)
        state = _security(row)
        sealed = state.get("pending")
        if not isinstance(sealed, str):
            raise AuthenticationFailed("open the enrolment page first to get the secret")
        secret = box.open(sealed, username=row.username, purpose="totp")
        step = _matching_step(secret, totp, now, after=-1)
        if step is None:
            raise AuthenticationFailed(
                "that one-time code is not valid: check the device's clock and try again"
            )
        state["totp"] = {"secret": sealed, "last_step": step}
        state.pop("pending", None)
        state.pop("enrolment", None)
        self._save(row, state)
        return row.username

    @_one_change
    def verify_totp(self, username: str, totp: str | None, *, now: float) -> bool:
        """Whether totp is a valid, unused code for the account; if so it is used up."""
        return self.check_totp(username, totp, now=now) is TotpCheck.ACCEPTED

    def check_totp(self, username: str, totp: str | None, *, now: float) -> TotpCheck:
        """A code checked: accepted (and used up), wrong, or right for these moments but
        used already (this code, or a later one: a replay, or a second login within the
        same half-minute)."""
        if not totp:
            return TotpCheck.WRONG
        box = self._secret_box()
        row = self._fetch(username)
        if row is None:
            return TotpCheck.WRONG
        state = _security(row)
        factor = state.get("totp")
        if not isinstance(factor, dict):
            return TotpCheck.WRONG
        secret = box.open(str(factor["secret"]), username=username, purpose="totp")
        step = _matching_step(secret, totp, now, after=int(factor["last_step"]))
        if step is None:
            if _matching_step(secret, totp, now, after=-1) is not None:
                return TotpCheck.USED
            return TotpCheck.WRONG
        # Remembering the step refuses a replay of this code, or of any earlier one.
        factor["last_step"] = step
        self._save(row, state)
        return TotpCheck.ACCEPTED

    # -- passkeys (WebAuthn), a second factor beside the TOTP -----------------------------

    @_one_change
    def passkey_user_handle(self, username: str) -> bytes:
        """The account's random WebAuthn user handle (made at first use; not secret, and
        unlike the name it says nothing about the official)."""
        row = self._require(username)
        state = _security(row)
        handle = state.get("passkey_user")
        if isinstance(handle, str):
            return passkeys.unb64url(handle)
        raw = self._random(32)
        state["passkey_user"] = passkeys.b64url(raw)
        self._save(row, state)
        return raw

    def list_passkeys(self, username: str) -> tuple[Passkey, ...]:
        row = self._fetch(username)
        if row is None:
            return ()
        return tuple(
            Passkey(
                passkeys.credential_ref(passkeys.unb64url(str(c["id"]))),
                str(c.get("label", "")),
                float(c["created"]),
                None if c.get("last_used") is None else float(c["last_used"]),
                str(c.get("rp_id", "")),
            )
            for c in _stored_passkeys(_security(row))
        )

    def passkey_ids(self, username: str) -> tuple[bytes, ...]:
        row = self._fetch(username)
        if row is None:
            return ()
        return tuple(passkeys.unb64url(str(c["id"])) for c in _stored_passkeys(_security(row)))

    @_one_change
    def add_passkey(
        self, username: str, new: passkeys.NewPasskey, *, label: str, rp_id: str, now: float
    ) -> Passkey:
        """Store a verified passkey: credential id, public key, sign count, time, label."""
        label = passkeys.check_label(label)
        row = self._require(username)
        state = _security(row)
        stored = _stored_passkeys(state)
        if len(stored) >= passkeys.MAX_PASSKEYS:
            raise passkeys.PasskeyRefused(
                f"an account has at most {passkeys.MAX_PASSKEYS} passkeys"
            )
        wanted = passkeys.b64url(new.credential_id)
        if any(hmac.compare_digest(str(c["id"]), wanted) for c in stored):
            raise passkeys.PasskeyRefused("that passkey is already registered")
        stored.append(
            {
                "id": wanted,
                "public_key": passkeys.b64url(new.public_key),
                "sign_count": new.sign_count,
                "created": now,
                "label": label,
                "rp_id": rp_id,
                "last_used": None,
            }
        )
        state["passkeys"] = stored
        self._save(row, state)
        return Passkey(passkeys.credential_ref(new.credential_id), label, now, None, rp_id)

    @_one_change
    def use_passkey(
        self,
        username: str,
        credential_json: str,
        *,
        challenge: bytes,
        ceremony: passkeys.Ceremony,
        now: float,
    ) -> bool:
        """Whether the response is a valid assertion by one of the account's passkeys for
        this challenge; if so its sign count moves forward. Never raises for a bad one."""
        row = self._fetch(username)
        if row is None:
            return False
        state = _security(row)
        stored = _stored_passkeys(state)
        try:
            wanted = passkeys.b64url(passkeys.credential_id_of(credential_json))
        except passkeys.PasskeyRefused:
            return False
        found = None
        for credential in stored:
            if hmac.compare_digest(str(credential["id"]), wanted):
                found = credential
        # A passkey registered for another host name is not one of this site's.
        if found is None or str(found.get("rp_id", "")) != ceremony.rp_id:
            return False
        try:
            found["sign_count"] = passkeys.verify_assertion(
                credential_json,
                challenge=challenge,
                ceremony=ceremony,
                public_key=passkeys.unb64url(str(found["public_key"])),
                sign_count=int(found["sign_count"]),
            )
        except passkeys.PasskeyRefused:
            return False
        found["last_used"] = now
        state["passkeys"] = stored
        self._save(row, state)
        return True

    # -- plumbing ----------------------------------------------------------------------

    def _secret_box(self) -> SecretBox:
        if self._box is None:
            raise ConfigurationError("second-factor secrets need the vault's keys")
        return self._box

    def _require(self, username: str) -> AccountRow:
        stored = self._storage.get_account(username)
        if stored is None:
            raise RecordNotFound("no account with that name")
        row = self._fetch(username, stored)
        if row is None:
            raise TamperDetected(
                f"the stored account {username!r} failed its integrity check and is not "
                "honoured: see docs/security.md (threat 18) before changing it"
            )
        return row

    def _fetch(
        self, username: str, stored: AccountRow | None = None, *, report: bool = True
    ) -> AccountRow | None:
        """The stored row of an account if it is authentic; None if there is none or it
        failed its tag (reported, unless the caller has just reported it)."""
        row = stored if stored is not None else self._storage.get_account(username)
        if row is None:
            return None
        found = self._authentic([row], report=report)
        return found[0] if found else None

    def _authentic(self, rows: _Rows, *, report: bool = True) -> _Rows:
        if self._macs is None:
            return rows  # doctor's key-less listing: nothing it reads is trusted
        good: _Rows = []
        for row in rows:
            attributes = _attributes(row)
            stored = attributes.pop(_ROW_MAC, None)
            try:
                fields = _row_fields(row, attributes)
            except (TypeError, ValueError):
                fields = None  # a column of the wrong type: written by hand, not by us
            if fields is not None and self._macs.check_hex(RowKind.ACCOUNT, fields, stored):
                good.append(row)
            elif report and self._watcher is not None:
                self._watcher(RowKind.ACCOUNT.value, row.username)
        return good

    def _stamped(self, row: AccountRow) -> AccountRow:
        """The row with a fresh tag over all its fields, ready to store."""
        if self._macs is None:
            raise ConfigurationError("accounts are written only with the vault's keys")
        attributes = _attributes(row)
        attributes.pop(_ROW_MAC, None)
        tag = self._macs.tag_hex(RowKind.ACCOUNT, _row_fields(row, attributes))
        return row._replace(attributes=orjson.dumps({**attributes, _ROW_MAC: tag}))

    def _put(self, was: AccountRow, **changes: Any) -> None:
        """Store `was` with `changes`, freshly tagged, if the stored row is still `was`;
        _Raced if another writer (in this process or another) changed it meanwhile."""
        if not self._storage.replace_account(was, self._stamped(was._replace(**changes))):
            raise _Raced()

    @_one_change
    def seal_unsealed(self) -> builtins.list[str]:
        """Tag every account row that carries no tag at all (a vault made before rows
        were tagged); the names sealed. For the host operator's one-time upgrade only:
        whatever those rows say is blessed, so they must be checked first."""
        sealed: builtins.list[str] = []
        for row in self._storage.list_accounts():
            if _ROW_MAC not in _attributes(row):
                self._put(row)
                sealed.append(row.username)
        return sealed

    def _by_enrolment(self, code: str, now: float) -> AccountRow:
        wanted = _digest(code)
        # Forged rows are skipped unreported: each login form would log them again.
        for row in self._authentic(self._storage.list_accounts(), report=False):
            pending = _security(row).get("enrolment")
            if isinstance(pending, dict) and hmac.compare_digest(str(pending["hash"]), wanted):
                if now <= float(pending["expires"]) and not row.disabled:
                    return row
                break
        raise AuthenticationFailed(
            "this enrolment code is unknown, used or expired: ask an administrator for a new "
            "one ('custodes account enrol NAME')"
        )

    def _save(self, row: AccountRow, state: dict[str, Any]) -> None:
        attributes = _attributes(row)
        attributes[_SECURITY] = state
        self._put(row, attributes=orjson.dumps(attributes))


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def _matching_step(secret: str, code: str, now: float, *, after: int) -> int | None:
    """The time step (now ±1) whose code this is, if later than `after`."""
    code = code.strip().replace(" ", "")
    if not (code.isascii() and code.isdigit() and len(code) == 6):
        return None
    totp = pyotp.TOTP(secret, interval=TOTP_STEP)
    current = int(now // TOTP_STEP)
    found = None
    # Every candidate is compared, so the time taken does not say which step matched.
    for step in (current - 1, current, current + 1):
        if hmac.compare_digest(totp.at(step * TOTP_STEP), code) and step > after:
            found = step
    return found


def _stored_passkeys(state: dict[str, Any]) -> list[dict[str, Any]]:
    found = state.get("passkeys")
    if not isinstance(found, list):
        return []
    return [dict(c) for c in found if isinstance(c, dict) and isinstance(c.get("id"), str)]


def _row_fields(row: AccountRow, attributes: dict[str, Any]) -> list[object]:
    """What an account row's tag covers: every field, the row's name included, so that a
    row copied under another name, or any field changed, fails."""
    return [
        row.username,
        row.role,
        row.password_hash,
        attributes,
        float(row.created_at),
        bool(row.disabled),
    ]


def _attributes(row: AccountRow) -> dict[str, Any]:
    """Every attribute of a stored account, its security state included (to write back).
    Bytes that are not a JSON object read as none, and so fail the row's tag."""
    try:
        attributes = orjson.loads(row.attributes) if row.attributes else {}
    except orjson.JSONDecodeError:
        return {}
    return attributes if isinstance(attributes, dict) else {}


def _case_number(raw: object) -> str:
    """A case number in canonical form, or InvalidAssignment without the value."""
    if not isinstance(raw, str):
        raise InvalidAssignment("a case number is text")
    try:
        return canonical_case_no(raw)
    except Refusal as exc:
        raise InvalidAssignment(f"a case number {exc}") from None


def _stored_cases(attribute: object) -> list[str]:
    """The case numbers already stored on an account, in order, each once."""
    if not isinstance(attribute, list):
        return []
    cases: list[str] = []
    for case in attribute:
        if isinstance(case, str) and case.strip().upper() not in cases:
            cases.append(case.strip().upper())
    return cases


def _case_list(role: Role, attribute: object) -> list[str]:
    """A list of case numbers to store on an account of `role`, each checked."""
    if not isinstance(attribute, list | tuple):
        raise InvalidAssignment("an account's cases are a list of case numbers")
    cases: list[str] = []
    for raw in attribute:
        case = _case_number(raw)
        if case not in cases:
            cases.append(case)
    if cases:
        _check_takes_cases(role)
    if len(cases) > MAX_ASSIGNED_CASES:
        raise InvalidAssignment(f"an account has at most {MAX_ASSIGNED_CASES} cases")
    return cases


def _check_takes_cases(role: Role) -> None:
    """Cases open records; a role that reads none (admin, auditor) takes none."""
    if not reads_records(role):
        raise InvalidAssignment(f"the {role.value} role reads no records, so takes no cases")


def _security(row: AccountRow) -> dict[str, Any]:
    attributes = _attributes(row)
    state = attributes.get(_SECURITY)
    return dict(state) if isinstance(state, dict) else {}


def _account(row: AccountRow) -> Account:
    attributes = _attributes(row)
    state = attributes.pop(_SECURITY, None) or {}
    attributes.pop(_ROW_MAC, None)
    if not isinstance(state, dict):
        state = {}
    return Account(
        username=row.username,
        role=Role(row.role),
        attributes=attributes,
        disabled=row.disabled,
        mfa_enrolled=isinstance(state.get("totp"), dict),
        locked=bool(state.get("locked")),
        crossed=_crossed(state.get("held")),
        locked_by=_locked_by(state.get("held")),
        anomaly=_anomaly(state.get("held")),
    )


def _locked_by(held: object) -> str | None:
    alert = held.get("alert") if isinstance(held, dict) else None
    return alert if isinstance(alert, str) else None


def _anomaly(held: object) -> tuple[str, ...]:
    """The anomaly guard's signals, if it was the guard that locked the account."""
    if not isinstance(held, dict) or held.get("alert") != "guard:anomaly":
        return ()
    signals = held.get("signals")
    return tuple(str(s) for s in signals) if isinstance(signals, list) else ()


def _crossed(held: object) -> tuple[str, ...]:
    limits = held.get("limits") if isinstance(held, dict) else None
    return tuple(str(name) for name in limits) if isinstance(limits, list) else ()


def _check_username(username: str) -> None:
    if not (3 <= len(username) <= 64) or not all(
        ch.isascii() and (ch.isalnum() or ch in "._-") for ch in username
    ):
        raise ConfigurationError("an account name is 3-64 ASCII letters, digits, '.', '_' or '-'")
