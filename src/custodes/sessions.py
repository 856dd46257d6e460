"""Sessions and login throttling, kept in storage.

Every process serving a vault reads the same sessions and failure counts, so a logout,
a password change or a lockout in one of them holds in all of them at once, and a
restart keeps officials logged in (within the timeouts). Storage holds only a hash of
each bearer token; the CSRF token of a session is derived from it with a vault key, so
it is never stored at all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.crypto import KeyMaterial
from custodes.policy import Role
from custodes.storage.base import SessionRow, Storage

IDLE_TIMEOUT = 30 * 60.0
ABSOLUTE_TIMEOUT = 8 * 3600.0
# last_seen is written at most this often: a write per request would cost every read a
# commit, and the idle timeout needs no finer grain than this.
TOUCH_EVERY = 60.0
FREE_FAILURES = 3  # failed logins before backoff starts
MAX_BACKOFF = 15 * 60.0

_CSRF_INFO = b"custodes session csrf v1"


@dataclass(frozen=True, slots=True)
class Session:
    """Proof of a successful login. Only the vault that issued it accepts it."""

    token: str
    username: str
    role: Role
    issued_at: float
    client: str | None = None  # the network address the session was opened from
    scope: str | None = None  # an integration's API token: what it may do (API_SCOPES)

    def __repr__(self) -> str:  # the token is a bearer secret
        return f"Session(username={self.username!r}, role={self.role.value!r})"


def token_key(token: str) -> bytes:
    """What storage keeps of a bearer token: its SHA-256, useless to present."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class SessionBook:
    """Logged-in sessions: opened at login, checked on every request, ended on logout."""

    def __init__(self, storage: Storage, material: KeyMaterial, ttl: float) -> None:
        self._storage = storage
        self._ttl = min(ttl, ABSOLUTE_TIMEOUT)
        self._csrf_key = HKDF(hashes.SHA256(), 32, salt=material.vault_id, info=_CSRF_INFO).derive(
            material.index_root
        )

    def __repr__(self) -> str:
        return "SessionBook()"

    def open(self, username: str, role: Role, now: float, client: str | None) -> Session:
        # Always a fresh token: a session id planted before login is never promoted.
        session = Session(secrets.token_urlsafe(16), username, role, now, client)
        self._storage.put_session(
            SessionRow(
                token_key(session.token), username, role.value, now, now + self._ttl, now, client
            )
        )
        return session

    def live(self, token: str, now: float) -> Session | None:
        """The session a token stands for, if it has not ended; keeps it alive."""
        key = token_key(token)
        row = self._storage.get_session(key)
        if row is None:
            return None
        if now >= row.expires or now - row.last_seen > IDLE_TIMEOUT:
            self._storage.end_session(key)
            return None
        if now - row.last_seen >= TOUCH_EVERY:
            self._storage.touch_session(key, now)
        try:
            role = Role(row.role)
        except ValueError:
            return None
        return Session(token, row.username, role, row.issued_at, row.client)

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
    """Failed logins per key (account name or client address). After FREE_FAILURES, each
    attempt waits 2^n seconds, up to MAX_BACKOFF; a key quiet for MAX_BACKOFF is forgotten
    (the account's own lock, in its record, still counts)."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def wait(self, keys: Sequence[str], now: float) -> float:
        longest = 0.0
        for count, last in self._storage.login_failures(keys).values():
            excess = count - FREE_FAILURES
            if excess >= 0:
                longest = max(longest, last + min(2.0 ** (excess + 1), MAX_BACKOFF) - now)
        return longest

    def fail(self, keys: Sequence[str], now: float) -> None:
        for key in keys:
            self._storage.record_login_failure(key, now)

    def clear(self, key: str) -> None:
        self._storage.clear_login_failures(key)

    def forget_quiet(self, now: float) -> int:
        return self._storage.purge_login_failures(now - MAX_BACKOFF)
