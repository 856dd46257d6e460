"""A server that starts sealed, for a keyring sealed M-of-N: it answers only its seal
status and officers' shares until M distinct shares open the keyring, then serves; SIGUSR1
drops the keys and seals it again. The whole key is rebuilt in memory only, never written.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from custodes.bootstrap import UnlockedVault, unlock_vault
from custodes.crypto.key_shares import KeyShare, parse_share
from custodes.crypto.keyring import ShareMode
from custodes.errors import CustodesError

__all__ = ["SEAL_STATUS", "UNSEAL", "SealedServer"]

log = logging.getLogger("custodes.unseal")

SEAL_STATUS = "/api/v1/sys/seal-status"
UNSEAL = "/api/v1/sys/unseal"
# Wrong shares (malformed, another vault's, repeated, or a combination the seal refuses)
# allowed per minute: enough for officers' typing mistakes, far too few to guess with.
WRONG_SHARES_PER_MINUTE = 5
MAX_BODY = 16 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
OpenApp = Callable[[UnlockedVault, list[str]], tuple[App, Callable[[], None]]]


class SealedServer:
    """The ASGI app of a shares-mode server: the gate in front of the vault's own app.

    `open_app(unlocked, officers)` builds the vault's app once the keys are open and
    returns it with the function that closes its vault (called on sealing again)."""

    def __init__(
        self,
        directory: Path,
        *,
        vault_id: bytes,
        mode: ShareMode,
        open_app: OpenApp,
        keyring_path: Path | None = None,
        database: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._directory = directory
        self._vault_id = vault_id
        self._mode = mode
        self._open_app = open_app
        self._keyring_path = keyring_path
        self._database = database
        self._clock = clock
        self._shares: dict[int, KeyShare] = {}
        self._wrong: collections.deque[float] = collections.deque()
        self._app: App | None = None
        self._close: Callable[[], None] | None = None
        self._lock = asyncio.Lock()

    @property
    def sealed(self) -> bool:
        return self._app is None

    def status(self) -> dict[str, Any]:
        return {
            "sealed": self.sealed,
            "threshold": self._mode.threshold,
            "parts": self._mode.parts,
            "progress": len(self._shares),
        }

    def seal(self) -> None:
        """Drop the vault's app and its keys, and forget any shares given so far."""
        close, self._app, self._close = self._close, None, None
        self._shares.clear()
        if close is not None:
            close()
            log.warning(
                "sealed: the keys are dropped; %d shares open the vault again", self._mode.threshold
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            if self._app is not None:
                await self._app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == SEAL_STATUS and method == "GET":
            await _json(send, 200, self.status())
        elif path == UNSEAL and method == "POST":
            body = await _body(receive)
            async with self._lock:
                status, doc = await asyncio.to_thread(self.unseal, body)
            await _json(send, status, doc)
        elif self._app is None:
            await _json(send, 503, {"error": "sealed", **self.status()})
        else:
            await self._app(scope, receive, send)

    def unseal(self, body: bytes | None) -> tuple[int, dict[str, Any]]:
        """Take one officer's share; with the threshold reached, open the keyring."""
        if self._app is not None:
            return 200, self.status()
        now = self._clock()
        while self._wrong and self._wrong[0] <= now - 60:
            self._wrong.popleft()
        if len(self._wrong) >= WRONG_SHARES_PER_MINUTE:
            log.warning("unseal: a share refused unread, too many wrong shares this minute")
            return 429, {"error": "too many wrong shares; wait a minute", **self.status()}
        try:
            doc = json.loads(body or b"")
            text = doc["share"]
            if not isinstance(text, str):
                raise TypeError
            share = parse_share(text.encode("utf-8"))
        except (ValueError, KeyError, TypeError, CustodesError):
            return self._refuse(now, "a malformed share", "not a key share")
        if share.vault_id != self._vault_id or share.mode != self._mode:
            return self._refuse(
                now, f"share {share.number} of another vault", "another vault's share"
            )
        if share.number in self._shares:
            return self._refuse(
                now,
                f"share {share.number} ({share.officer}) given again",
                "that share was already given",
                status=409,
            )
        self._shares[share.number] = share
        log.warning(
            "unseal: share %d of officer %s taken (%d of %d)",
            share.number,
            share.officer,
            len(self._shares),
            self._mode.threshold,
        )
        if len(self._shares) < self._mode.threshold:
            return 200, self.status()
        shares = list(self._shares.values())
        self._shares.clear()
        try:
            unlocked = unlock_vault(
                self._directory,
                shares=shares,
                keyring_path=self._keyring_path,
                database=self._database,
            )
        except CustodesError:
            return self._refuse(
                now,
                "the shares given do not open the keyring; progress reset",
                "the shares do not open the keyring: a share is wrong; start again",
            )
        officers = [f"{s.officer} (share {s.number})" for s in shares]
        try:
            self._app, self._close = self._open_app(unlocked, officers)
        except Exception as exc:  # the vault did not open: stay sealed, say why in the log
            log.error("unseal: the keys opened but the vault did not: %s", type(exc).__name__)
            return 500, {"error": "the vault did not open; see the server's log", **self.status()}
        log.warning("unsealed by %s", ", ".join(officers))
        return 200, self.status()

    def _refuse(
        self, now: float, logged: str, said: str, *, status: int = 400
    ) -> tuple[int, dict[str, Any]]:
        self._wrong.append(now)
        log.warning("unseal: refused %s", logged)
        return status, {"error": said, **self.status()}

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.seal)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.seal()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _json(send: Send, status: int, doc: dict[str, Any]) -> None:
    body = json.dumps(doc).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
