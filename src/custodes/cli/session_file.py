"""The session an official's client keeps between commands: what 'custodes login' stores so
that search, show and reveal need neither the password again nor any keyring.

One small JSON file (server, token, username, role, ca_cert) in the user's configuration
directory, owner-only, replaced atomically so that a crash never leaves half a token.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from custodes import settings
from custodes.errors import AuthenticationFailed

__all__ = ["LOGIN_HINT", "NOT_LOGGED_IN", "NotLoggedIn", "StoredSession", "forget", "load", "save"]

LOGIN_HINT = "run 'custodes login --server URL'"
NOT_LOGGED_IN = f"not logged in: {LOGIN_HINT}"


class NotLoggedIn(AuthenticationFailed):
    """No stored session, or the server no longer honours it: log in again."""

    def __init__(self, message: str = NOT_LOGGED_IN) -> None:
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class StoredSession:
    server: str  # the base address, e.g. https://vault.example:8443
    token: str = field(repr=False)  # a bearer secret: kept out of reprs and tracebacks
    username: str
    role: str
    ca_cert: str | None = None  # the certificate to trust for this server, if not public

    def as_json(self) -> dict[str, str]:
        doc = {
            "server": self.server,
            "token": self.token,
            "username": self.username,
            "role": self.role,
        }
        if self.ca_cert is not None:
            doc["ca_cert"] = self.ca_cert
        return doc


def load(path: Path | None = None) -> StoredSession:
    """The stored session, or NotLoggedIn at once: nothing is contacted without one."""
    where = path or settings.session_file_path()
    try:
        doc = orjson.loads(where.read_bytes())
    except FileNotFoundError:
        raise NotLoggedIn() from None
    except (OSError, orjson.JSONDecodeError):
        raise NotLoggedIn(f"the stored session is unreadable: {LOGIN_HINT}") from None
    text = ("server", "token", "username", "role")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in text):
        raise NotLoggedIn(f"the stored session is unreadable: {LOGIN_HINT}")
    ca_cert = doc.get("ca_cert")
    return StoredSession(
        doc["server"],
        doc["token"],
        doc["username"],
        doc["role"],
        ca_cert if isinstance(ca_cert, str) else None,
    )


def save(session: StoredSession, path: Path | None = None) -> Path:
    """Store the session owner-only (0600, in a 0700 directory), through a temporary file
    in the same directory and a rename: readers see the old file or the new one, never a
    part, and never a moment with looser permissions."""
    chosen = path or settings.env(settings.ENV_SESSION_FILE)
    where = Path(chosen) if chosen else settings.session_file_path()
    where.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if chosen is None:
        # custodes' own configuration directory (keyrings may live there too), which
        # another program may have created open to all; a directory named by the caller
        # is left as its owner set it.
        os.chmod(where.parent, 0o700)
    fd, temporary = tempfile.mkstemp(dir=where.parent, prefix=".session-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)  # mkstemp's mode already; said again, as the token depends on it
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps(session.as_json()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, where)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return where


def forget(token: str, path: Path | None = None) -> None:
    """Delete the stored session if it still holds this token: a login made meanwhile, by
    another command of the same official, stays."""
    where = path or settings.session_file_path()
    try:
        current = load(where)
    except NotLoggedIn:
        current = None
    if current is None or current.token == token:
        with contextlib.suppress(FileNotFoundError):
            where.unlink()
