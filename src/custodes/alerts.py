"""Alerts leave the vault: to a webhook (signed, retried with backoff) and to syslog
(RFC 5424), never holding up the read that raised them.

An alert is raised where the vault refuses or fails an access for a reason someone must
look at (a budget crossed, the database refusing the vault's own role). It is on the
access log first, as the refusal's entry; what is sent here names the account, the
signals and the entry's position and the records by keyed id, never a personal value.
Delivery runs on a thread of its own per destination behind a bounded queue: a read
that raises an alert only puts it in the queue, and a destination that is down or slow
loses the oldest alerts beyond the queue (said in the operational log), never a read's
time. The access log keeps every alert whatever happens to its delivery.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import logging.handlers
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import orjson

from custodes.errors import ConfigurationError

log = logging.getLogger("custodes.alerts")

SIGNATURE_HEADER = "X-Custodes-Signature"  # "sha256=" + HMAC-SHA256(secret, timestamp "." body)
TIMESTAMP_HEADER = "X-Custodes-Timestamp"
QUEUE_SIZE = 1000
# A webhook delivery is tried this many times, waiting BACKOFF * 2^n seconds (at most
# BACKOFF_MAX) between tries.
ATTEMPTS = 6
BACKOFF = 0.5
BACKOFF_MAX = 30.0


@dataclass(frozen=True, slots=True)
class Alert:
    """What someone must look at: which account did what, by which signals."""

    kind: str  # e.g. "guard:budget", "database:refused"
    severity: str  # "critical", "high" or "warning"
    account: str
    action: str
    signals: Sequence[str]
    entry: int  # the refusal's position on the access log
    records: Sequence[str] = ()  # keyed record ids, never a value
    time: float = field(default_factory=time.time)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def document(self) -> dict[str, object]:
        return {
            "id": self.id,
            "kind": self.kind,
            "severity": self.severity,
            "time": _iso(self.time),
            "account": self.account,
            "action": self.action,
            "signals": list(self.signals),
            "entry": self.entry,
            "records": list(self.records),
        }


class Destination(Protocol):
    name: str

    def deliver(self, alert: Alert) -> None:
        """Send one alert; raise if it did not arrive (it is tried again)."""
        ...


class Webhook:
    """POSTs each alert as JSON, signed: HMAC-SHA256 under a secret the receiver holds,
    over the timestamp and the body, so that a forged or replayed alert is told apart."""

    def __init__(self, url: str, secret: bytes, *, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigurationError("an alert webhook is an http:// or https:// address")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigurationError("an alert webhook beyond this host must be https://")
        if len(secret) < 16:
            raise ConfigurationError("an alert webhook's secret is 16 bytes or more")
        self.name = f"webhook {parts.scheme}://{parts.hostname}"
        self._url = url
        self._secret = secret
        self._client = httpx.Client(timeout=timeout, follow_redirects=False)

    def deliver(self, alert: Alert) -> None:
        body = orjson.dumps(alert.document())
        stamp = str(int(time.time()))
        answer = self._client.post(
            self._url,
            content=body,
            headers={
                "Content-Type": "application/json",
                TIMESTAMP_HEADER: stamp,
                SIGNATURE_HEADER: "sha256=" + signature(self._secret, stamp, body),
            },
        )
        if not 200 <= answer.status_code < 300:
            raise OSError(f"the webhook answered {answer.status_code}")

    def close(self) -> None:
        self._client.close()


def signature(secret: bytes, stamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 a receiver recomputes: over the timestamp, a dot, the body."""
    return hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class Syslog:
    """Each alert as one RFC 5424 message, through the standard library's handler."""

    def __init__(self, address: str) -> None:
        parts = urlsplit(address)
        if parts.scheme not in ("udp", "tcp") or not parts.hostname:
            raise ConfigurationError("a syslog destination is udp://HOST:PORT or tcp://HOST:PORT")
        kind = socket.SOCK_DGRAM if parts.scheme == "udp" else socket.SOCK_STREAM
        self.name = f"syslog {parts.scheme}://{parts.hostname}"
        self._handler = logging.handlers.SysLogHandler(
            (parts.hostname, parts.port or 514),
            facility=logging.handlers.SysLogHandler.LOG_AUTH,
            socktype=kind,
        )
        # RFC 5424 frames no NUL; over TCP a message ends at its newline (RFC 6587).
        self._handler.append_nul = False
        self._handler.setFormatter(_Rfc5424(tcp=kind == socket.SOCK_STREAM))
        # The handler reports its own failures on stderr and goes on; here a message not
        # sent must raise, so that it is tried again.
        self._handler.handleError = _raise  # type: ignore[method-assign, assignment]

    def deliver(self, alert: Alert) -> None:
        record = logging.LogRecord(
            "custodes.alerts", _LEVELS.get(alert.severity, logging.WARNING), "", 0, "", (), None
        )
        record.alert = alert
        self._handler.emit(record)

    def close(self) -> None:
        self._handler.close()


_LEVELS = {"critical": logging.CRITICAL, "high": logging.ERROR, "warning": logging.WARNING}


def _raise(_record: logging.LogRecord) -> None:
    raise OSError("the syslog message was not sent")


class _Rfc5424(logging.Formatter):
    """VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG; the handler
    puts the <PRI> in front."""

    def __init__(self, *, tcp: bool) -> None:
        super().__init__()
        self._tcp = tcp
        self._host = socket.gethostname() or "-"

    def format(self, record: logging.LogRecord) -> str:
        alert: Alert = record.alert  # type: ignore[attr-defined]
        msgid = alert.kind.replace(" ", "_")[:32] or "-"
        message = (
            f"1 {_iso(alert.time)} {self._host} custodes {os.getpid()} {msgid} - "
            + orjson.dumps(alert.document()).decode()
        )
        return message + "\n" if self._tcp else message


def _iso(moment: float) -> str:
    return (
        dt.datetime.fromtimestamp(moment, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@dataclass(frozen=True, slots=True)
class AlertRoutes:
    """Where a server sends its alerts, as configured (`custodes serve --alert-webhook`,
    `--alert-syslog`); each server process builds its own Dispatcher from it."""

    webhook: str | None = None
    webhook_secret: bytes = field(default=b"", repr=False)
    syslog: str | None = None

    def destinations(self) -> list[Destination]:
        """The destinations, built (ConfigurationError for one that cannot be)."""
        found: list[Destination] = []
        if self.webhook is not None:
            found.append(Webhook(self.webhook, self.webhook_secret))
        if self.syslog is not None:
            found.append(Syslog(self.syslog))
        return found

    def check(self) -> None:
        """Refuse a destination that cannot be built, before the server starts."""
        for destination in self.destinations():
            close = getattr(destination, "close", None)
            if callable(close):
                close()


class Dispatcher:
    """Alerts to every destination, each on a thread of its own behind a bounded queue:
    `raise_alert` never waits."""

    def __init__(
        self, destinations: Sequence[Destination], *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._lanes = [_Lane(d, sleep) for d in destinations]

    def raise_alert(self, alert: Alert) -> None:
        for lane in self._lanes:
            lane.put(alert)

    def close(self, timeout: float = 5.0) -> None:
        for lane in self._lanes:
            lane.stop(timeout)


class _Lane:
    def __init__(self, destination: Destination, sleep: Callable[[float], None]) -> None:
        self._destination = destination
        self._sleep = sleep
        self._queue: queue.Queue[Alert | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(
            target=self._run, name=f"custodes-alerts ({destination.name})", daemon=True
        )
        self._thread.start()

    def put(self, alert: Alert) -> None:
        while True:
            try:
                self._queue.put_nowait(alert)
                return
            except queue.Full:
                try:
                    dropped = self._queue.get_nowait()
                except queue.Empty:
                    continue
                if dropped is not None:
                    log.error(
                        "alert %s (entry %d) was not delivered to %s: too many waiting; it is "
                        "on the access log",
                        dropped.id,
                        dropped.entry,
                        self._destination.name,
                    )

    def stop(self, timeout: float) -> None:
        self._queue.put(None)
        self._thread.join(timeout)
        close = getattr(self._destination, "close", None)
        if callable(close):
            close()

    def _run(self) -> None:
        while (alert := self._queue.get()) is not None:
            for attempt in range(ATTEMPTS):
                try:
                    self._destination.deliver(alert)
                    break
                except Exception as exc:
                    if attempt == ATTEMPTS - 1:
                        log.error(
                            "alert %s (entry %d) was not delivered to %s after %d tries "
                            "(%s); it is on the access log",
                            alert.id,
                            alert.entry,
                            self._destination.name,
                            ATTEMPTS,
                            type(exc).__name__,
                        )
                    else:
                        self._sleep(min(BACKOFF * 2**attempt, BACKOFF_MAX))
