"""Security middleware: identifies the caller (its network address) and puts the security
headers on every response. It never authorises; that is the vault's, through `deps`.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("custodes.web")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    # Every response may carry personal data or a form token: nothing is cached anywhere.
    (b"cache-control", b"no-store"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
HSTS = (b"strict-transport-security", b"max-age=63072000; includeSubDomains")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(proxies: Iterable[str]) -> tuple[Network, ...]:
    """The operator's trusted proxies (addresses or networks), parsed; ValueError names
    the entry that is neither."""
    networks = []
    for proxy in proxies:
        try:
            networks.append(ipaddress.ip_network(proxy.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or a network: {proxy!r}") from None
    return tuple(networks)


def real_client(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str | None:
    """The client a request comes from. The transport's peer, unless the peer is one of
    the operator's trusted proxies: then the nearest address in X-Forwarded-For that is
    not a trusted proxy (each proxy appends the address it saw, so whatever lies to the
    left of the last untrusted hop is the client's own words, and ignored)."""
    if peer is None or not trusted or not _within(peer, trusted):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        if not _is_address(hop):
            return peer  # a malformed chain: the proxy is the most we know
        if not _within(hop, trusted):
            return hop
    return peer


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


class SecurityHeaders:
    """Pure ASGI middleware, outermost in the app: it sees every response, errors too."""

    def __init__(
        self, app: ASGIApp, *, tls: bool = False, trusted_proxies: Sequence[Network] = ()
    ) -> None:
        self.app = app
        self.headers = (*HEADERS, HSTS) if tls else HEADERS
        self._names = {name for name, _ in self.headers}
        self._trusted = tuple(trusted_proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        peer = client[0] if client else None
        # The transport's peer address, or behind a trusted proxy the address it saw: a
        # forwarded header from anyone else is the client's own words. Logins are
        # throttled by this address, so officials behind one proxy must not share one.
        forwarded = [
            value.decode("latin-1")
            for name, value in scope.get("headers", [])
            if name == b"x-forwarded-for"
        ]
        scope.setdefault("state", {})["client"] = real_client(peer, forwarded, self._trusted)
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                kept = [(k, v) for k, v in message.get("headers", []) if k not in self._names]
                message["headers"] = [*kept, *self.headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # An unexpected failure still gets the headers and a body that says nothing.
            log.exception("request failed")
            if started:
                raise
            await send_with_headers(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8")],
                }
            )
            await send_with_headers(
                {"type": "http.response.body", "body": b"the server failed; nothing was returned"}
            )
