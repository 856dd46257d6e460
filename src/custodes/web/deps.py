"""How a request becomes a session, a purpose and a checked form: the web's only gateway
to the vault. Middleware identifies; these dependencies authorise nothing themselves —
every decision is the vault's.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi import Request

from custodes.errors import AuthenticationFailed, PurposeRequired
from custodes.passkeys import Ceremony
from custodes.policy import AccessPurpose
from custodes.vault import Session, Vault

SESSION_COOKIE = "custodes_session"
# Over TLS the cookie takes the __Host- prefix: browsers then insist on Secure, Path=/ and
# no Domain, so a sibling host cannot plant or overwrite it.
TLS_SESSION_COOKIE = "__Host-custodes"
CSRF_FIELD = "csrf_token"
# Threads blocked in the access log's group commit share its next fsync, so the pool must
# be wide; but every thread also contends for the storage connection and the GIL, and on
# two cores 24 served as many audited lookups as anyio's 40, with a shorter tail.
VAULT_THREADS = 24

_T = TypeVar("_T")


class NotAuthenticated(Exception):
    """No live session: pages redirect to the login page, the API answers 401."""


class CsrfRejected(Exception):
    """A state-changing request without the session's CSRF token: 403."""


def vault_of(request: Request) -> Vault:
    vault: Vault = request.app.state.vault
    return vault


def vault_threads() -> ThreadPoolExecutor:
    """A pool for one app's blocking vault calls (storage reads, the group commit)."""
    return ThreadPoolExecutor(VAULT_THREADS, thread_name_prefix="custodes-vault")


async def in_vault_thread(request: Request, call: Callable[[], _T]) -> _T:
    """Run a blocking vault call off the event loop, on the app's own pool: a plain
    executor costs the loop less per call than the generic thread pool of sync routes."""
    pool: ThreadPoolExecutor = request.app.state.vault_threads
    return await asyncio.get_running_loop().run_in_executor(pool, call)


def is_tls(request: Request) -> bool:
    """Whether this request came over HTTPS: TLS here, or a trusted proxy said so (the
    security middleware's answer); without the middleware, whether the app serves TLS."""
    https = request.scope.get("state", {}).get("https")
    if https is None:
        return bool(getattr(request.app.state, "tls", False))
    return bool(https)


def cookie_name(request: Request) -> str:
    """The session cookie's name for this app: __Host-custodes over TLS."""
    return TLS_SESSION_COOKIE if is_tls(request) else SESSION_COOKIE


def client_address(request: Request) -> str | None:
    """The peer's address as the security middleware recorded it (never a forwarded
    header, which the client could write itself)."""
    address = request.scope.get("state", {}).get("client")
    if isinstance(address, str):
        return address
    return request.client.host if request.client else None


def ceremony(request: Request) -> Ceremony:
    """Where a passkey ceremony runs, as this request reached the server: the origin the
    browser will report (scheme://host[:port]) and the host name as relying party id.
    A response made on any other origin (a look-alike site relaying the login) fails."""
    url = request.url
    return Ceremony(f"{url.scheme}://{url.netloc}", url.hostname or "")


def bearer_token(request: Request) -> str | None:
    """The token of an Authorization: Bearer header, if the request has one."""
    header = request.headers.get("authorization", "")
    return (header[7:].strip() or None) if header.lower().startswith("bearer ") else None


def session_token(request: Request) -> str | None:
    """The bearer of a session: the cookie (pages) or an Authorization header (API)."""
    return bearer_token(request) or request.cookies.get(cookie_name(request))


def require_session(request: Request) -> Session:
    """FastAPI dependency: the live session of this request, or NotAuthenticated."""
    return live_session(request, session_token(request))


def live_session(request: Request, token: str | None) -> Session:
    """The live session a token stands for, or NotAuthenticated. Reads storage: call it
    off the event loop."""
    if not token:
        raise NotAuthenticated()
    try:
        return vault_of(request).session_for(token)
    except AuthenticationFailed:
        raise NotAuthenticated() from None


def purpose_from(reason: str | None, case_ref: str | None) -> AccessPurpose:
    """A stated purpose from form or query fields; PurposeRequired (422) if unusable."""
    if reason is None:
        raise PurposeRequired("a purpose is required")
    return AccessPurpose(reason, case_ref or None)


def csrf_token(request: Request) -> str:
    """The CSRF token of the request's session, for forms (a hidden field named csrf_token)."""
    session = require_session(request)
    return vault_of(request).csrf_token(session)


async def verify_csrf(request: Request) -> None:
    """FastAPI dependency for state-changing form posts: the posted token must match."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    session = require_session(request)
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    if not isinstance(sent, str) or not hmac.compare_digest(
        sent, vault_of(request).csrf_token(session)
    ):
        raise CsrfRejected()


def new_token() -> str:
    return secrets.token_urlsafe(16)
