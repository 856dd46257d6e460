"""Bulk exports: two people, sealed to one recipient, nothing beyond the purpose class.

Runs on the in-memory and the SQLite backend alike.
"""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest

from custodes.audit import Outcome
from custodes.errors import AccessDenied, InvalidQuery, TamperDetected
from custodes.export.envelope import keygen, open_sealed, private_key
from custodes.export.requests import ExportState
from custodes.policy import AccessPurpose, Action, Role
from custodes.vault import Session, Vault
from tests.conftest import login

PURPOSE = AccessPurpose("census of marital status by county", "STAT-2026")


@pytest.fixture
def loaded(vault: Vault, population_file: Path) -> Vault:
    report = vault.ingest(vault.operator, population_file)
    assert report.rejected == 0
    return vault


@pytest.fixture
def recipient() -> tuple[bytes, str]:
    private_pem, _public_pem, public_b64 = keygen()
    return private_pem, public_b64


def _officials(vault: Vault) -> tuple[Session, Session]:
    asker = login(vault, Role.INVESTIGATOR, "an.investigator")
    second = login(vault, Role.SUPERVISOR, "a.supervisor")
    return asker, second


def _entries(vault: Vault, action: Action) -> list[tuple[int, object]]:
    return [(i, e) for i, e in vault._log.entries() if e.action == action.value]


def _rows(blob: bytes, private_pem: bytes) -> list[dict[str, str]]:
    plain = open_sealed(private_key(private_pem), blob)
    return [orjson.loads(line) for line in plain.splitlines()]


def test_an_unapproved_export_is_refused_and_logged(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker, _ = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    with pytest.raises(AccessDenied, match="not been approved"):
        loaded.exports.produce(asker, export_id)
    [(_, entry)] = _entries(loaded, Action.EXPORT_CREATE)
    assert entry.outcome is Outcome.DENIED and entry.detail["export"] == export_id


def test_self_approval_is_refused_and_logged(loaded: Vault, recipient: tuple[bytes, str]) -> None:
    supervisor = login(loaded, Role.SUPERVISOR, "a.supervisor")
    export_id = loaded.exports.request(
        supervisor,
        PURPOSE,
        record_type="person",
        purpose_class="statistics",
        recipient=recipient[1],
    )
    with pytest.raises(AccessDenied, match="approved by the official who asked"):
        loaded.exports.approve(supervisor, export_id)
    [(_, entry)] = _entries(loaded, Action.EXPORT_APPROVE)
    assert entry.outcome is Outcome.DENIED and entry.actor == "a.supervisor"
    assert loaded.exports.status(supervisor, export_id).state == ExportState.REQUESTED


def test_only_a_supervisor_approves_and_an_officer_cannot_ask(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker = login(loaded, Role.INVESTIGATOR, "an.investigator")
    colleague = login(loaded, Role.INVESTIGATOR, "another.investigator")
    officer = login(loaded, Role.OFFICER, "an.officer")
    with pytest.raises(AccessDenied):
        loaded.exports.request(
            officer,
            PURPOSE,
            record_type="person",
            purpose_class="statistics",
            recipient=recipient[1],
        )
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    with pytest.raises(AccessDenied):
        loaded.exports.approve(colleague, export_id)
    outcomes = [e.outcome for _, e in _entries(loaded, Action.EXPORT_REQUEST)]
    assert outcomes == [Outcome.DENIED, Outcome.GRANTED]


def test_an_approved_export_opens_only_with_the_recipients_key_and_holds_only_its_class(
    loaded: Vault, recipient: tuple[bytes, str], people: list[dict[str, object]]
) -> None:
    asker, second = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    assert loaded.exports.approve(second, export_id).state == ExportState.APPROVED
    made = loaded.exports.produce(asker, export_id)
    rows = _rows(made.sealed, recipient[0])
    assert len(rows) == made.rows == len(people) + 3  # every person, and 3 canaries
    allowed = set(loaded.schema.export_rules("statistics", "person"))
    assert set().union(*rows) <= allowed
    assert {"name", "phone", "ethnicity"}.isdisjoint(set().union(*rows))
    sealed = made.sealed.decode("latin-1")
    text = "\n".join(orjson.dumps(r).decode() for r in rows)
    for person in people[:50]:
        for name in ("name", "national_id", "phone"):
            if name in person:
                assert str(person[name]) not in text and str(person[name]) not in sealed
    assert all(len(r["birth_date"]) == 4 for r in rows if "birth_date" in r)

    other_key, _, _ = keygen()
    with pytest.raises(TamperDetected):
        _rows(made.sealed, other_key)
    flipped = bytearray(made.sealed)
    flipped[-1] ^= 1
    with pytest.raises(TamperDetected):
        _rows(bytes(flipped), recipient[0])


def test_every_step_is_on_the_log_and_its_public_detail_names_no_one(
    loaded: Vault, recipient: tuple[bytes, str], people: list[dict[str, object]]
) -> None:
    asker, second = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="research", recipient=recipient[1]
    )
    loaded.exports.approve(second, export_id)
    made = loaded.exports.produce(asker, export_id)
    steps = [
        (e.action, e.actor, e.outcome, e.purpose, e.case_ref)
        for _, e in loaded._log.entries()
        if e.action.startswith("export:")
    ]
    assert steps == [
        (Action.EXPORT_REQUEST, "an.investigator", Outcome.GRANTED, PURPOSE.reason, "STAT-2026"),
        (Action.EXPORT_APPROVE, "a.supervisor", Outcome.GRANTED, PURPOSE.reason, "STAT-2026"),
        (Action.EXPORT_CREATE, "an.investigator", Outcome.GRANTED, PURPOSE.reason, "STAT-2026"),
    ]
    [(index, created)] = _entries(loaded, Action.EXPORT_CREATE)
    assert created.detail["export"] == export_id and created.detail["rows"] == made.rows
    assert created.detail["recipient"] == made.recipient and created.detail["class"] == "research"
    assert created.records == ()
    sealed = loaded._log.private_details(index)
    assert sealed is not None and len(sealed["records"]) == len(people)
    assert len(sealed["canaries"]) == len(sealed["canary_ids"]) == 3
    leaf = created.encode()
    for person in people:
        assert str(person["national_id"]).encode() not in leaf
    with pytest.raises(AccessDenied, match="produced already"):
        loaded.exports.produce(asker, export_id)


def test_a_forged_approval_written_straight_into_storage_is_refused(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker, _ = _officials(loaded)
    export_id = loaded.exports.request(
        asker, PURPOSE, record_type="person", purpose_class="statistics", recipient=recipient[1]
    )
    storage = loaded._storage
    key = f"export/{export_id}"
    fields, tag = orjson.loads(storage.get_meta(key) or b"")
    fields[10], fields[11] = "approved", "a.supervisor"  # state and approver
    storage.set_meta(key, orjson.dumps([fields, tag]))
    with pytest.raises(TamperDetected):
        loaded.exports.produce(asker, export_id)
    # A row with a tag of its own making is refused alike.
    storage.set_meta(key, orjson.dumps([fields, "00" * 32]))
    with pytest.raises(TamperDetected):
        loaded.exports.produce(asker, export_id)
    refused = [e for _, e in _entries(loaded, Action.EXPORT_CREATE)]
    assert [e.outcome for e in refused] == [Outcome.ERROR, Outcome.ERROR]
    assert {e.detail["error"] for e in refused} == {"TamperDetected"}


def test_an_export_is_limited_to_its_district_and_named_records(
    loaded: Vault, recipient: tuple[bytes, str], people: list[dict[str, object]]
) -> None:
    asker, second = _officials(loaded)
    district = str(people[0]["national_id"])[:2]
    export_id = loaded.exports.request(
        asker,
        PURPOSE,
        record_type="person",
        purpose_class="statistics",
        recipient=recipient[1],
        district=district,
    )
    loaded.exports.approve(second, export_id)
    rows = _rows(loaded.exports.produce(asker, export_id).sealed, recipient[0])
    expected = sum(1 for p in people if str(p["national_id"]).startswith(district))
    assert len(rows) == expected + 3


def test_bad_requests_are_refused_without_repeating_the_input(
    loaded: Vault, recipient: tuple[bytes, str]
) -> None:
    asker, _ = _officials(loaded)
    with pytest.raises(InvalidQuery) as unknown:
        loaded.exports.request(
            asker, PURPOSE, record_type="person", purpose_class="王小明", recipient=recipient[1]
        )
    assert "王小明" not in str(unknown.value)
    with pytest.raises(InvalidQuery) as bad_id:
        loaded.exports.request(
            asker,
            PURPOSE,
            record_type="person",
            purpose_class="statistics",
            recipient=recipient[1],
            record_ids=["王小明 11010119900307003X"],
        )
    assert "王小明" not in str(bad_id.value)
    with pytest.raises(Exception, match="32 bytes"):
        loaded.exports.request(
            asker,
            PURPOSE,
            record_type="person",
            purpose_class="statistics",
            recipient=base64.b64encode(b"short").decode(),
        )
