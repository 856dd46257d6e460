"""Threat 11 (a stolen or corrupt account walks out with the population): canary records.

Synthetic people planted on demand, stored exactly like real ones, listed only in a
sealed list. A bulk read dumped from the store and replayed through the vault, and an
API read, that touch one each lock the reading account and raise a critical alert
(recorded in the vault, on the access log, and at a webhook within a second); a
legitimate search for a real person never returns one.
"""

from __future__ import annotations

import http.server
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from custodes.access import CANARY_ALERT
from custodes.alerts import Dispatcher, Webhook
from custodes.audit import Outcome
from custodes.canaries import CANARIES
from custodes.errors import AccessDenied, AuthenticationFailed, ConfigurationError, InvalidQuery
from custodes.policy import AccessPurpose, Action, Role
from custodes.policy.budgets import NO_LIMITS
from custodes.vault import Vault
from custodes.web.app import create_app
from tests.conftest import (
    PASSPHRASE,
    PASSWORD,
    TOTP_SECRETS,
    enrol,
    login,
    make_vault,
    read_records,
    totp_code,
)
from tests.test_cli_client import run

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

PURPOSE = AccessPurpose("checking a reported burglary", "C-2026-17")
SECRET = b"a webhook secret the receiver holds"
PLANTED = 12


@pytest.fixture(params=["memory", "sqlite"])
def vault(request: pytest.FixtureRequest, tmp_path: Path, population_file: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, request.param)
    assert v.ingest(v.operator, population_file).rejected == 0
    assert v.plant_canaries(v.operator, PLANTED) == PLANTED
    yield v
    v.close()


def _canaries(vault: Vault) -> list[str]:
    return sorted(vault._canaries.ids())


def _opened(vault: Vault, record_id: str) -> dict[str, Any]:
    """A canary's values, as only the test may open them (to search for one as an attacker
    who guessed its number would)."""
    stored = vault._storage.get_records([record_id])[record_id]
    return dict(vault._codec.open(stored))


def _search(vault: Vault, session: Any, index: str, values: dict[str, str]) -> list[str]:
    found = vault.search(session, PURPOSE, record_type="person", index=index, values=values)
    return [view.record_id for view in found]


def test_canaries_are_stored_like_people_and_listed_only_sealed(vault: Vault) -> None:
    canaries = _canaries(vault)
    assert len(canaries) == PLANTED
    stored = vault._storage.get_records(canaries)
    assert set(stored) == set(canaries)
    person_tag = vault._codec.type_tag("person")
    assert {s.record_type for s in stored.values()} == {person_tag}
    # Sealed like a person: padded to the same lengths, indexed by the same number of
    # tokens; nothing in a row marks it out.
    positions = vault._storage.record_tokens(0, 100_000)
    tokens = {rid: len(pairs) for _, rid, pairs in positions}
    people = [
        s
        for s in vault._storage.get_records([rid for rid in tokens if rid not in stored]).values()
        if s.record_type == person_tag
    ]
    assert {len(s.payload) for s in stored.values()} <= {len(p.payload) for p in people}
    assert {tokens[c] for c in canaries} <= {tokens[p.record_id] for p in people}
    # The list itself is ciphertext: no canary id, in any form, is in the stored bytes.
    sealed = vault._storage.get_meta(CANARIES)
    assert sealed is not None
    assert not any(c.encode() in sealed for c in canaries)
    assert not any(bytes.fromhex(c) in sealed for c in canaries if _is_hex(c))
    # Planted under its own entry, counted, the ids sealed beside it.
    [planted] = [e for _, e in vault._log.entries() if e.action == Action.CANARY_PLANT.value]
    assert planted.detail["count"] == PLANTED and planted.records == ()


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def test_legitimate_searches_for_real_people_never_return_a_canary(
    vault: Vault, population_file: Path
) -> None:
    session = login(vault, Role.SUPERVISOR, "t.desk", budget=NO_LIMITS)
    canaries = set(_canaries(vault))
    found: set[str] = set()
    people = [r for r in read_records(population_file) if r["type"] == "person"]
    for person in people:
        found.update(_search(vault, session, "national_id", {"national_id": person["national_id"]}))
        if person.get("phone"):
            found.update(_search(vault, session, "phone", {"phone": person["phone"]}))
        if person.get("birth_date"):
            both = {"name": person["name"], "birth_date": person["birth_date"]}
            found.update(_search(vault, session, "name_birth", both))
    assert len(found) >= len(people)
    assert not found & canaries
    # The supervisor was never locked: every search above was answered.
    assert not [a for a in vault.admin.list_accounts(vault.operator) if a.locked]


def test_a_bulk_read_dumped_from_the_store_trips_a_canary_and_locks_the_reader(
    vault: Vault,
) -> None:
    """The injection a search box cannot have: every record id, taken straight from the
    database (a full scan of the store, as an injected query would return it), replayed
    through the vault one read at a time by a valid account with no budget to stop it."""
    session = login(vault, Role.SUPERVISOR, "t.dumper", budget=NO_LIMITS)
    dumped = [rid for _, rid, _ in vault._storage.record_tokens(0, 1_000_000)]
    canaries = set(_canaries(vault))
    read: list[str] = []
    with pytest.raises(AuthenticationFailed):
        for rid in dumped:
            vault.record(session, PURPOSE, rid)
            read.append(rid)
    # Answered up to and including the first canary, as any read; refused from then on.
    assert read and read[-1] in canaries
    assert not set(read[:-1]) & canaries
    entries = [e for _, e in vault._log.entries() if e.actor == "t.dumper"]
    [tripped] = [e for e in entries if e.detail.get("alert") == CANARY_ALERT]
    assert tripped.outcome == Outcome.GRANTED.value and tripped.records[0] == read[-1]
    assert tripped.detail["locked"] is True
    [account] = [a for a in vault.admin.list_accounts(vault.operator) if a.username == "t.dumper"]
    assert account.locked
    # Recorded for the watchers, critical, naming the records by id only.
    auditor = login(vault, Role.AUDITOR, "t.auditor")
    [alert] = vault.alerts(auditor)
    assert alert.alert.kind == CANARY_ALERT and alert.alert.severity == "critical"
    assert alert.alert.account == "t.dumper" and read[-1] in alert.alert.records
    assert alert.state.value == "open" and not alert.tampered


class _Receiver(http.server.BaseHTTPRequestHandler):
    received: list[tuple[float, bytes]]
    arrived: threading.Event

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()
        self.received.append((time.monotonic(), body))
        self.arrived.set()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[type[_Receiver]]:
    handler = type("Receiver", (_Receiver,), {"received": [], "arrived": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}/alerts"  # type: ignore[attr-defined]
    yield handler
    server.shutdown()
    server.server_close()


def test_an_api_read_of_a_canary_raises_a_critical_alert_within_a_second_and_locks(
    vault: Vault, receiver: type[_Receiver]
) -> None:
    vault.send_alerts(Dispatcher([Webhook(receiver.url, SECRET)]))  # type: ignore[attr-defined]
    vault.admin.add_account(vault.operator, "walker", PASSWORD, Role.OFFICER, {"district": "*"})
    enrol(vault, "walker")
    # An adult's: an officer is not shown minors.
    canary = next(
        c for c in _canaries(vault) if str(_opened(vault, c).get("birth_date", "2020")) < "2000"
    )
    guessed = str(_opened(vault, canary)["national_id"])
    with TestClient(create_app(vault)) as client:
        opened = client.post(
            "/api/v1/session",
            json={
                "username": "walker",
                "password": PASSWORD,
                "totp": totp_code(TOTP_SECRETS["walker"], vault._clock()),
            },
        )
        auth = {"Authorization": f"Bearer {opened.json()['token']}"}
        asked = {
            "record_type": "person",
            "index": "national_id",
            "values": {"national_id": guessed},
            "purpose": PURPOSE.reason,
            "case_ref": PURPOSE.case_ref,
        }
        sent = time.monotonic()
        answer = client.post("/api/v1/search", headers=auth, json=asked)
        # Answered like any search: nothing in this answer says what was found.
        assert answer.status_code == 200
        assert [r["record_id"] for r in answer.json()["results"]] == [canary]
        assert receiver.arrived.wait(5)
        [(arrived, body)] = receiver.received
        assert arrived - sent < 1.0
        document = orjson.loads(body)
        assert document["kind"] == CANARY_ALERT and document["severity"] == "critical"
        assert document["account"] == "walker" and document["records"] == [canary]
        assert guessed not in body.decode()
        # The account is locked: the session is gone.
        assert client.post("/api/v1/search", headers=auth, json=asked).status_code == 401


def test_planting_is_the_host_operators_and_refuses_a_silly_count(vault: Vault) -> None:
    session = login(vault, Role.SUPERVISOR, "t.planter")
    with pytest.raises(AccessDenied):
        vault.plant_canaries(session, 1)
    [refused] = [
        e
        for _, e in vault._log.entries()
        if e.actor == "t.planter" and e.action == Action.CANARY_PLANT.value
    ]
    assert refused.outcome == Outcome.DENIED.value
    with pytest.raises(InvalidQuery):
        vault.plant_canaries(vault.operator, 0)
    # More are added to the same sealed list, never replacing it.
    assert vault.plant_canaries(vault.operator, 3) == PLANTED + 3


def test_a_changed_canary_list_stops_the_vault_rather_than_disarm_it(vault: Vault) -> None:
    sealed = vault._storage.get_meta(CANARIES)
    assert sealed is not None
    vault._storage.set_meta(CANARIES, sealed[:-1] + bytes([sealed[-1] ^ 1]))
    vault._canaries._read_at = None  # as a process would read it at its next refresh
    session = login(vault, Role.SUPERVISOR, "t.reader", budget=NO_LIMITS)
    person = next(
        rid
        for _, rid, _ in vault._storage.record_tokens(0, 1_000)
        if rid not in vault._canaries._ids
    )
    with pytest.raises(Exception, match="canary"):
        vault.record(session, PURPOSE, person)


def test_custodes_canary_plant_on_the_host(tmp_path: Path, population_file: Path) -> None:
    made = make_vault(tmp_path, "sqlite")
    made.close()
    env = {"CUSTODES_VAULT": str(tmp_path / "vault"), "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    assert run("ingest", str(population_file), env=env).returncode == 0
    planted = run("canary", "plant", "--count", "5", env=env)
    assert planted.returncode == 0, planted.stderr
    assert "5 canary records planted (5 in the vault)" in planted.stdout
    again = run("canary", "plant", "--count", "2", "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert orjson.loads(again.stdout) == {"planted": 2, "canaries": 7}
    refused = run("canary", "plant", "--count", "0", env=env)
    assert refused.returncode != 0 and "count" in refused.stderr


def test_no_canary_can_be_drawn_for_a_schema_without_people(tmp_path: Path) -> None:
    from custodes.canaries import canary_people
    from custodes.schema import parse_schema

    schema = parse_schema(
        'name = "t"\nversion = 1\n[types.case]\nsource_key = ["case_no"]\n'
        "[types.case.fields]\n"
        'case_no = { kind = "case_no", required = true, sensitivity = "personal", mask = "none" }\n'
    )
    with pytest.raises(ConfigurationError, match="person"):
        canary_people(schema, None, 1, seed=1, taken=lambda *_: False)  # type: ignore[arg-type]
