"""Security middleware: identifies the caller (its network address) and puts the security
headers on every response. It never authorises; that is the vault's, through `deps`.
"""

from __future__ import annotations

import ipaddress
import json
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


def forwarded_https(
    peer: str | None, forwarded_proto: Sequence[str], trusted: Sequence[Network]
) -> bool:
    """Whether a trusted proxy says the client's connection to it was HTTPS.

    X-Forwarded-Proto counts only from a trusted proxy's address, exactly as
    X-Forwarded-For does: from anyone else it is the client's own words. The last value
    is the nearest proxy's (a proxy that appends rather than sets puts its own last), so
    that is the one taken. RFC 7239's Forwarded is not read: one header, set by the
    proxy, leaves no question of which of two disagreeing headers wins."""
    if peer is None or not trusted or not _within(peer, trusted):
        return False
    values = [value.strip().lower() for header in forwarded_proto for value in header.split(",")]
    return bool(values) and values[-1] == "https"


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


NOT_THROUGH_PROXY = (
    b"this server answers only through its TLS proxy, over https: connect to the "
    b"address officials are given"
)


class SecurityHeaders:
    """Pure ASGI middleware, outermost in the app: it sees every response, errors too.

    It also decides whether a request arrived over HTTPS (scope state "https", read by
    `deps.is_tls`): TLS here, or a trusted proxy saying so in X-Forwarded-Proto. That one
    answer makes cookies Secure (and __Host-), sends HSTS and makes the request's own URL
    https. With `behind_tls_proxy` the server is meant to be reached only through a
    TLS-terminating proxy on this host or network: a request from anyone but a trusted
    proxy, or one the proxy says came in plain http, is refused (421) before the app sees
    it. Redirecting instead would first hand a login form, or a session cookie without
    Secure, to a connection no one protects."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tls: bool = False,
        trusted_proxies: Sequence[Network] = (),
        behind_tls_proxy: bool = False,
    ) -> None:
        if behind_tls_proxy and not trusted_proxies:
            raise ValueError("behind a TLS proxy needs the proxy named as a trusted proxy")
        self.app = app
        self._tls = tls
        self._behind_proxy = behind_tls_proxy
        self._names = {name for name, _ in (*HEADERS, HSTS)}
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
        headers = scope.get("headers", [])
        forwarded = [
            value.decode("latin-1") for name, value in headers if name == b"x-forwarded-for"
        ]
        protos = [
            value.decode("latin-1") for name, value in headers if name == b"x-forwarded-proto"
        ]
        state = scope.setdefault("state", {})
        state["client"] = real_client(peer, forwarded, self._trusted)
        proxied_https = forwarded_https(peer, protos, self._trusted)
        # Behind the proxy, TLS here too (a proxy on another host re-encrypting) does not
        # stand in for the proxy: a peer that is not a trusted proxy is refused either way.
        if self._behind_proxy and not proxied_https:
            await _refuse_plain(scope, send)
            return
        https = self._tls or proxied_https
        state["https"] = https
        if https:
            # Absolute URLs the app builds (request.url, url_for) then say https too.
            scope["scheme"] = "https"
        extra = (*HEADERS, HSTS) if https else HEADERS
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                kept = [(k, v) for k, v in message.get("headers", []) if k not in self._names]
                message["headers"] = [*kept, *extra]
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


async def _refuse_plain(scope: Scope, send: Send) -> None:
    """421 Misdirected Request: this connection is not one the server answers on. JSON
    under /api/, shaped as every API refusal is; plain text elsewhere."""
    if str(scope.get("path", "")).startswith("/api/"):
        body = json.dumps(
            {"error": {"code": "not_through_proxy", "message": NOT_THROUGH_PROXY.decode()}}
        ).encode()
        kind = b"application/json"
    else:
        body, kind = NOT_THROUGH_PROXY, b"text/plain; charset=utf-8"
    await send(
        {
            "type": "http.response.start",
            "status": 421,
            "headers": [(b"content-type", kind), *HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": body})
