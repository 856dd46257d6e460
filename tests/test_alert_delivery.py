"""Threat 11: an alert reaches the people who watch, outside the vault: a webhook (signed,
retried with backoff) and syslog (RFC 5424, over UDP and TCP), each tried here against a
real listener started by the test, with no personal value in what arrives, and never
holding up the read that raised it.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from custodes.alerts import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Alert,
    Dispatcher,
    Syslog,
    Webhook,
    signature,
)
from custodes.errors import BudgetExceeded, ConfigurationError
from custodes.policy import AccessPurpose, Role
from custodes.records.idnumber import check_char
from custodes.vault import Vault
from tests.conftest import login, make_vault, read_records

SECRET = b"a webhook secret the receiver holds"
PURPOSE = AccessPurpose("checking a reported burglary", "C-2026-17")


@pytest.fixture
def vault(tmp_path: Path, population_file: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, "memory")
    assert v.ingest(v.operator, population_file).rejected == 0
    yield v
    v.close()


def _walk_until_locked(vault: Vault, name: str) -> list[str]:
    """An account allowed two misses an hour walks ID numbers until it is locked; the
    numbers it typed."""
    session = login(vault, Role.INVESTIGATOR, name, budget={"misses_per_hour": 2})
    typed = []
    with pytest.raises(BudgetExceeded):
        for serial in range(100, 110):
            body = f"11010519800101{serial:03d}"
            typed.append(body + check_char(body))
            vault.search(
                session,
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": typed[-1]},
            )
    return typed


def _personal_values(population_file: Path) -> list[str]:
    return [
        str(p[k])
        for p in read_records(population_file)[:50]
        for k in ("national_id", "phone", "name")
        if p.get(k)
    ]


class _Receiver(http.server.BaseHTTPRequestHandler):
    answers: list[int]
    received: list[tuple[dict[str, str], bytes]]
    arrived: threading.Event

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = self.answers.pop(0) if self.answers else 204
        self.send_response(status)
        self.end_headers()
        if status < 300:
            self.received.append((dict(self.headers), body))
            self.arrived.set()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[type[_Receiver]]:
    handler = type(
        "Receiver",
        (_Receiver,),
        {"answers": [500, 503], "received": [], "arrived": threading.Event()},
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


def test_a_budget_alert_reaches_a_webhook_signed_after_retries_with_no_personal_value(
    vault: Vault, receiver: type[_Receiver], population_file: Path
) -> None:
    waits: list[float] = []
    vault.send_alerts(
        Dispatcher([Webhook(receiver.url, SECRET)], sleep=waits.append)  # type: ignore[attr-defined]
    )
    typed = _walk_until_locked(vault, "t.walker")
    assert receiver.arrived.wait(10), "the alert never arrived"
    [(headers, body)] = receiver.received
    # Refused twice (500, 503), it was tried again after a wait that doubled.
    assert waits == [0.5, 1.0]
    stamp = headers[TIMESTAMP_HEADER]
    assert headers[SIGNATURE_HEADER] == "sha256=" + signature(SECRET, stamp, body)
    assert headers[SIGNATURE_HEADER] != "sha256=" + signature(
        b"another secret entirely", stamp, body
    )
    alert = orjson.loads(body)
    assert alert["kind"] == "guard:budget" and alert["severity"] == "high"
    assert alert["account"] == "t.walker" and alert["signals"] == ["misses_per_hour"]
    assert alert["action"] == "record:index:search"
    [(index, entry)] = [
        (i, e) for i, e in vault._log.entries() if e.detail.get("alert") == "guard:budget"
    ]
    assert alert["entry"] == index and entry.actor == "t.walker"
    text = body.decode()
    for value in [*typed, *_personal_values(population_file)]:
        assert value not in text


def test_a_webhook_beyond_this_host_must_be_https_and_its_secret_long_enough() -> None:
    with pytest.raises(ConfigurationError, match="https"):
        Webhook("http://alerts.example.org/hook", SECRET)
    with pytest.raises(ConfigurationError, match="16 bytes"):
        Webhook("https://alerts.example.org/hook", b"short")


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_budget_alert_reaches_syslog_as_rfc5424_with_no_personal_value(
    vault: Vault, population_file: Path, transport: str
) -> None:
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(10)
        port = listener.getsockname()[1]
        if transport == "tcp":
            listener.listen(1)
        vault.send_alerts(Dispatcher([Syslog(f"{transport}://127.0.0.1:{port}")]))
        typed = _walk_until_locked(vault, "t.syslog")
        if transport == "udp":
            message = listener.recv(65536)
        else:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                message = b""
                while not message.endswith(b"\n"):
                    message += conn.recv(65536)
    text = message.decode()
    # <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG; PRI = auth (4) * 8 +
    # error (3) for an alert of high severity.
    head, document = text.split(" - ", 1)
    pri_version, timestamp, _host, app, procid, msgid = head.split(" ")
    assert pri_version == "<35>1" and timestamp.endswith("Z")
    assert (app, msgid) == ("custodes", "guard:budget") and procid.isdigit()
    alert = orjson.loads(document)
    assert alert["account"] == "t.syslog" and alert["signals"] == ["misses_per_hour"]
    for value in [*typed, *_personal_values(population_file)]:
        assert value not in text


class _Stuck:
    """A destination that takes an alert and does not return until told to."""

    name = "stuck"

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()

    def deliver(self, alert: Alert) -> None:
        self.holding.set()
        self.release.wait(30)


def test_a_destination_that_hangs_never_holds_up_a_read(vault: Vault) -> None:
    stuck = _Stuck()
    vault.send_alerts(Dispatcher([stuck]))
    _walk_until_locked(vault, "t.first")
    assert stuck.holding.wait(10)
    # The destination still holds the first alert; the next account's reads, and the
    # refusal that raises its alert, are answered all the same.
    _walk_until_locked(vault, "t.second")
    assert not stuck.release.is_set()
    stuck.release.set()


def test_serve_refuses_an_alert_destination_it_cannot_use_before_asking_for_any_key() -> None:
    from click.testing import CliRunner

    from custodes.cli import cli

    runner = CliRunner()
    no_secret = runner.invoke(
        cli, ["serve", "--alert-webhook", "http://127.0.0.1:9/alerts"], env={}
    )
    assert no_secret.exit_code == 2 and "CUSTODES_ALERT_WEBHOOK_SECRET" in no_secret.output
    for option, value in (
        ("--alert-syslog", "ftp://127.0.0.1:514"),
        ("--alert-webhook", "http://alerts.example.org/"),
    ):
        refused = runner.invoke(
            cli,
            ["serve", option, value],
            env={"CUSTODES_ALERT_WEBHOOK_SECRET": SECRET.decode()},
        )
        assert refused.exit_code == 2, refused.output
