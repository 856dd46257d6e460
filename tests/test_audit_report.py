"""Threat 17: a data subject or an ombudsman asks who looked at a person, and why.

The report must be complete (every access to the person's records, nothing else),
itself on the log, and come with a bundle that verifies offline with the log's key.
Runs on the in-memory and the SQLite backend alike.
"""

from __future__ import annotations

import base64
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from custodes.audit import AccessEntry, Outcome
from custodes.audit.checkpoint import NoteSigner, NoteVerifier
from custodes.audit.report import (
    BundleInvalid,
    ReportedAccess,
    SubjectReport,
    as_json,
    render_text,
    verify_bundle,
)
from custodes.errors import RecordNotFound, TamperDetected
from custodes.policy import AccessPurpose, Action, Role
from custodes.storage.memory import MemoryStorage
from custodes.vault import Session, Vault
from tests.conftest import login, make_vault, read_records

FRAUD = AccessPurpose("benefit fraud enquiry", "C-2024/17")
SUMMONS = AccessPurpose("address check for a summons", "S-88")
OMBUDSMAN = "ombudsman.li"
SUBJECT_REQUEST = AccessPurpose("subject access request")


@dataclass
class Scene:
    """A person looked at by two officials, directly and through a case and a delivery."""

    vault: Vault
    person: dict[str, object]
    subject: str
    cases: list[str]
    deliveries: list[str]
    unrelated: str
    touching: dict[int, tuple[str, AccessPurpose]]  # log index -> (official, purpose)
    searches: set[int]  # indexes of searches, which carry private details
    ombudsman: Session  # an auditor, who answers the subject's request


def _naming(records: list[dict[str, object]], kind: str, nid: object) -> list[dict[str, object]]:
    """The cases or deliveries in the population file that name a national id."""
    if kind == "case":
        return [
            r
            for r in records
            if r["type"] == "case" and any(p["national_id"] == nid for p in r["persons"])  # type: ignore[attr-defined]
        ]
    return [r for r in records if r["type"] == "delivery" and r.get("recipient") == nid]


@pytest.fixture
def scene(vault: Vault, population_file: Path) -> Scene:
    assert vault.ingest(vault.operator, population_file).rejected == 0
    records = read_records(population_file)
    people = [r for r in records if r["type"] == "person"]
    person = next(
        p
        for p in people
        if p.get("phone")
        and _naming(records, "case", p["national_id"])
        and _naming(records, "delivery", p["national_id"])
    )
    nid = person["national_id"]
    # Someone who shares no case or delivery with the subject, so no access to them
    # can touch the subject's records.
    other = next(
        p
        for p in people
        if not _naming(records, "case", p["national_id"])
        and not _naming(records, "delivery", p["national_id"])
    )
    codec = vault._codec
    subject = codec.record_id("person", [str(nid)])
    unrelated = codec.record_id("person", [str(other["national_id"])])
    cases = [codec.record_id("case", [str(c["case_no"])]) for c in _naming(records, "case", nid)]
    deliveries = [
        codec.record_id("delivery", [str(d["waybill_no"])])
        for d in _naming(records, "delivery", nid)
    ]
    alice = login(vault, Role.INVESTIGATOR, "alice.investigator")
    bob = login(vault, Role.OFFICER, "bob.officer")
    touching: dict[int, tuple[str, AccessPurpose]] = {}
    searches: set[int] = set()

    def touched(who: str, purpose: AccessPurpose, *, search: bool = False) -> None:
        index = vault._log.size - 1
        touching[index] = (who, purpose)
        if search:
            searches.add(index)

    vault.search(
        alice, FRAUD, record_type="person", index="national_id", values={"national_id": str(nid)}
    )
    touched("alice.investigator", FRAUD, search=True)
    vault.search(
        bob, SUMMONS, record_type="person", index="phone", values={"phone": str(person["phone"])}
    )
    touched("bob.officer", SUMMONS, search=True)
    vault.reveal(alice, FRAUD, subject, "address")
    touched("alice.investigator", FRAUD)
    vault.record(bob, SUMMONS, cases[0])  # the case names the subject among its persons
    touched("bob.officer", SUMMONS)
    vault.search(
        alice, FRAUD, record_type="delivery", index="linked_person", values={"recipient": str(nid)}
    )
    touched("alice.investigator", FRAUD, search=True)

    vault.search(
        alice,
        FRAUD,
        record_type="person",
        index="national_id",
        values={"national_id": str(other["national_id"])},
    )
    vault.record(bob, SUMMONS, unrelated)
    vault.reveal(bob, SUMMONS, unrelated, "phone")
    ombudsman = login(vault, Role.AUDITOR, OMBUDSMAN)
    return Scene(
        vault, person, subject, cases, deliveries, unrelated, touching, searches, ombudsman
    )


@pytest.fixture
def report(scene: Scene) -> SubjectReport:
    return scene.vault.subject_report(scene.ombudsman, SUBJECT_REQUEST, scene.subject)


def _flip(data: bytes, position: int) -> bytes:
    return data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1 :]


def _retype(data: bytes, position: int) -> bytes:
    """Another base64 character in place of one: still well-formed, no longer the same.
    (Flipping a bit could leave a character outside the alphabet, which a bundle refuses
    before any hash is checked.)"""
    replacement = b"B" if data[position : position + 1] == b"A" else b"A"
    return data[:position] + replacement + data[position + 1 :]


def _line_span(bundle: bytes, prefix: bytes) -> tuple[int, int]:
    start = bundle.index(b"\n" + prefix) + 1
    return start, bundle.index(b"\n", start)


# -- the report is complete, and holds nothing else ----------------------------------


def test_subject_records_are_the_person_and_every_case_and_delivery_naming_them(
    scene: Scene,
) -> None:
    report = scene.vault.subject_report(scene.ombudsman, SUBJECT_REQUEST, scene.subject)
    found = [report.subject, *report.linked]
    assert found[0] == scene.subject
    assert sorted(found[1:]) == sorted(scene.cases + scene.deliveries)
    assert scene.unrelated not in found


def test_subject_sees_every_official_who_read_their_record(
    scene: Scene, report: SubjectReport
) -> None:
    expected = sorted([*scene.touching, report.report_index])
    assert [a.index for a in report.accesses] == expected
    assert {a.actor for a in report.accesses} == {"alice.investigator", "bob.officer", OMBUDSMAN}


def test_access_to_an_unrelated_person_is_not_in_the_report(
    scene: Scene, report: SubjectReport
) -> None:
    unrelated = {i for i, _ in scene.vault._log.entries_for([scene.unrelated])}
    assert len(unrelated) == 3
    assert unrelated.isdisjoint(a.index for a in report.accesses)


def test_report_says_why_each_official_looked_and_for_which_case(
    scene: Scene, report: SubjectReport
) -> None:
    for access in report.accesses:
        if access.index == report.report_index:
            continue
        who, purpose = scene.touching[access.index]
        assert (access.actor, access.purpose, access.case_ref) == (
            who,
            purpose.reason,
            purpose.case_ref,
        )
        assert access.outcome is Outcome.GRANTED
        assert access.time.endswith("Z")


def test_report_names_which_of_the_subjects_records_each_access_touched(
    scene: Scene, report: SubjectReport
) -> None:
    by_action = {a.action: a.records for a in report.accesses if a.actor == "bob.officer"}
    assert by_action["record:masked:read"] == (scene.subject, scene.cases[0])
    delivery_search = next(a for a in report.accesses if a.records == tuple(scene.deliveries))
    assert delivery_search.actor == "alice.investigator"


def test_the_report_names_the_fields_searched_but_never_their_values(
    scene: Scene, report: SubjectReport
) -> None:
    searched = {a.index: a.searched_by for a in report.accesses if a.searched_by}
    assert set(searched) == scene.searches
    assert {("national_id",), ("phone",), ("recipient",)} == set(searched.values())
    text = render_text(report)
    assert "searched by: national_id" in text and "searched by: phone" in text
    shown = text + orjson.dumps(as_json(report)).decode() + report.bundle().decode()
    for value in (scene.person["national_id"], scene.person["phone"]):
        assert str(value) not in shown
    # The values stay sealed in the log, for whoever may one day need them.
    [first, *_] = sorted(scene.searches)
    assert scene.vault._log.private_details(first) is not None


def test_the_report_itself_is_on_the_log(scene: Scene, report: SubjectReport) -> None:
    logged = AccessEntry.decode(scene.vault._log.raw_entry(report.report_index))
    assert (logged.actor, logged.action, logged.records) == (
        OMBUDSMAN,
        Action.SUBJECT_REPORT,
        (scene.subject,),
    )
    assert report.accesses[-1].index == report.report_index
    other = login(scene.vault, Role.AUDITOR, "ombudsman.wu")
    again = scene.vault.subject_report(other, SUBJECT_REQUEST, scene.subject)
    assert report.report_index in {a.index for a in again.accesses}
    assert again.report_index > report.report_index


def test_report_on_an_unknown_record_is_refused_and_still_logged(vault: Vault) -> None:
    auditor = login(vault, Role.AUDITOR, OMBUDSMAN)
    with pytest.raises(RecordNotFound):
        vault.subject_report(auditor, SUBJECT_REQUEST, "no-such-record-id")
    [(_, entry)] = vault._log.entries_for(["no-such-record-id"])
    assert (entry.action, entry.outcome) == (Action.SUBJECT_REPORT, Outcome.ERROR)


# -- the bundle verifies offline, and only untouched ---------------------------------


def test_bundle_verifies_offline_with_only_the_logs_public_key(
    scene: Scene, report: SubjectReport
) -> None:
    verified = verify_bundle(report.bundle(), scene.vault._log.verifier_key)
    assert verified.subject == scene.subject
    assert verified.origin == scene.vault._log.origin
    assert [i for i, _ in verified.entries] == [a.index for a in report.accesses]
    stored = dict(scene.vault._log.entries_for([scene.subject, *verified.linked]))
    assert all(stored[i] == entry for i, entry in verified.entries)
    # The report issued a checkpoint covering its own entry, the newest it lists.
    assert verified.checkpoint.size > report.report_index


def test_bundle_carries_no_personal_value(scene: Scene, report: SubjectReport) -> None:
    bundle = report.bundle()
    leaves = b"".join(a.leaf for a in report.accesses)
    for field in ("national_id", "phone", "address", "name"):
        value = str(scene.person[field]).encode()
        assert value not in bundle and value not in leaves


def test_editing_any_byte_of_the_bundle_is_detected(scene: Scene, report: SubjectReport) -> None:
    bundle = report.bundle()
    key = scene.vault._log.verifier_key
    # Linked ids are the vault's statement, not proven by the log: an edit there only
    # narrows or widens which genuine entries may be listed, so it is left out here.
    positions = set(range(len(bundle)))
    offset = 0
    for line in bundle.split(b"\n"):
        if line.startswith(b"linked "):
            positions -= set(range(offset, offset + len(line)))
        offset += len(line) + 1
    assert len(bundle) // 2 < len(positions) < len(bundle)
    for position in sorted(positions):
        with pytest.raises(BundleInvalid):
            verify_bundle(_flip(bundle, position), key)


def test_an_edited_entry_is_named(scene: Scene, report: SubjectReport) -> None:
    bundle = report.bundle()
    target = report.accesses[1].index
    start, end = _line_span(bundle, f"entry {target} ".encode())
    with pytest.raises(BundleInvalid, match=f"entry {target}: .*does not match the root") as err:
        verify_bundle(_retype(bundle, (start + end) // 2), scene.vault._log.verifier_key)
    assert err.value.index == target


def test_an_edited_proof_hash_is_named(scene: Scene, report: SubjectReport) -> None:
    bundle = report.bundle()
    target = report.accesses[0].index
    start, _ = _line_span(bundle, f"entry {target} ".encode())
    proof_start = bundle.index(b"\nproof ", start) + len(b"\nproof ")
    with pytest.raises(BundleInvalid, match=f"entry {target}: "):
        verify_bundle(_flip(bundle, proof_start + 3), scene.vault._log.verifier_key)


def test_a_forged_checkpoint_root_is_refused(scene: Scene, report: SubjectReport) -> None:
    bundle = report.bundle()
    root = base64.b64encode(report.checkpoint.root)
    forged = bundle.replace(root, base64.b64encode(bytes(32)), 1)
    with pytest.raises(BundleInvalid, match="checkpoint does not carry a valid signature"):
        verify_bundle(forged, scene.vault._log.verifier_key)


def test_a_forged_checkpoint_signature_is_refused(scene: Scene, report: SubjectReport) -> None:
    bundle = report.bundle()
    signature_line = bundle.index("\n\u2014 ".encode())
    with pytest.raises(BundleInvalid, match="checkpoint does not carry a valid signature"):
        verify_bundle(_retype(bundle, signature_line + 60), scene.vault._log.verifier_key)


def test_bundle_checked_with_another_logs_key_is_refused(
    tmp_path: Path, scene: Scene, report: SubjectReport
) -> None:
    other = make_vault(tmp_path / "other", "memory")
    try:
        with pytest.raises(BundleInvalid, match="checkpoint"):
            verify_bundle(report.bundle(), other._log.verifier_key)
    finally:
        other.close()
    # A key that claims this log's name but is not its key is no better.
    impostor = NoteSigner(scene.vault._log.origin, Ed25519PrivateKey.generate())
    assert NoteVerifier.from_key_string(impostor.verifier_key).name == report.origin
    with pytest.raises(BundleInvalid, match="checkpoint"):
        verify_bundle(report.bundle(), impostor.verifier_key)


def test_a_genuine_entry_about_someone_else_cannot_be_slipped_in(
    scene: Scene, report: SubjectReport
) -> None:
    log = scene.vault._log
    [first, *_] = log.entries_for([scene.unrelated])
    index = first[0]
    stranger = ReportedAccess(
        index=index,
        time="",
        actor="",
        role="",
        action="",
        outcome=Outcome.GRANTED,
        purpose=None,
        case_ref=None,
        records=(),
        private=None,
        leaf=log.raw_entry(index),
        proof=tuple(log.inclusion_proof(index, report.checkpoint.size)),
    )
    padded = replace(
        report, accesses=tuple(sorted((*report.accesses, stranger), key=lambda a: a.index))
    )
    with pytest.raises(BundleInvalid, match=f"entry {index}: does not name the subject"):
        verify_bundle(padded.bundle(), log.verifier_key)


def test_bundle_proves_inclusion_not_completeness_so_a_dropped_entry_goes_unnoticed(
    scene: Scene, report: SubjectReport
) -> None:
    # Anyone holding the bundle can drop an entry and the rest still verify: the bundle
    # proves each listed access happened. That none is missing comes from the vault
    # reading the report from the signed tree and holding the subject index against it,
    # as the completeness tests show.
    bundle = report.bundle()
    dropped = report.accesses[0].index
    start, end = _line_span(bundle, f"entry {dropped} ".encode())
    end = bundle.index(b"\n", end + 1)  # the proof line after it
    verified = verify_bundle(bundle[:start] + bundle[end + 1 :], scene.vault._log.verifier_key)
    assert [i for i, _ in verified.entries] == [a.index for a in report.accesses[1:]]


def test_a_bundle_cut_off_between_entries_is_refused(scene: Scene, report: SubjectReport) -> None:
    bundle = report.bundle()
    assert bundle.endswith(b"\nend\n")
    with pytest.raises(BundleInvalid, match="truncated"):
        verify_bundle(bundle[: -len(b"end\n")], scene.vault._log.verifier_key)
    with pytest.raises(BundleInvalid, match="after the end line"):
        verify_bundle(bundle + b"entry 0 AA==\n", scene.vault._log.verifier_key)


def test_bundle_errors_are_tamper_errors_and_carry_no_data(
    scene: Scene, report: SubjectReport
) -> None:
    bundle = report.bundle()
    target = report.accesses[0].index
    _, end = _line_span(bundle, f"entry {target} ".encode())
    with pytest.raises(TamperDetected) as err:
        verify_bundle(_flip(bundle, end - 5), scene.vault._log.verifier_key)
    assert scene.subject not in str(err.value)
    assert str(scene.person["national_id"]) not in str(err.value)


# -- for people and for machines ------------------------------------------------------


def test_text_report_lists_when_who_role_action_purpose_case_and_outcome(
    report: SubjectReport, scene: Scene
) -> None:
    text = render_text(report)
    header = next(line for line in text.splitlines() if line.startswith("when"))
    assert header.split() == ["when", "who", "role", "action", "purpose", "case", "outcome"]
    for who, purpose in scene.touching.values():
        assert who in text and purpose.reason in text and str(purpose.case_ref) in text
    assert "searched by: national_id" in text
    assert str(scene.person["national_id"]) not in text


def test_json_report_round_trips_and_matches_the_bundle(
    scene: Scene, report: SubjectReport
) -> None:
    doc = orjson.loads(orjson.dumps(as_json(report)))
    assert doc["subject"] == scene.subject
    assert [a["index"] for a in doc["accesses"]] == [a.index for a in report.accesses]
    assert doc["checkpoint"]["size"] == report.checkpoint.size
    first = doc["accesses"][0]
    assert base64.b64decode(first["leaf"]) == report.accesses[0].leaf
    assert (first["purpose"], first["case"]) == (FRAUD.reason, FRAUD.case_ref)


# -- the subject index is checked against the signed tree, not trusted ------------------


def _rewrite_subject_index(
    vault: Vault, *, drop: list[tuple[bytes, int]], add: list[tuple[bytes, int]]
) -> None:
    """What a database writer does to the log's subject index, on either backend: rows
    deleted or planted, the entries and the signed tree untouched."""
    storage = vault._storage
    if isinstance(storage, MemoryStorage):
        for commitment, index in drop:
            storage._log_subjects[commitment].remove(index)
        for commitment, index in add:
            storage._log_subjects.setdefault(commitment, []).append(index)
            storage._log_subjects[commitment].sort()
        return
    assert vault.directory is not None
    db = sqlite3.connect(vault.directory / "vault.db-log")
    try:
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'log_subjects'"
        ).fetchall():
            db.execute(f'DROP TRIGGER "{name}"')
        db.executemany("DELETE FROM log_subjects WHERE commitment = ? AND idx = ?", drop)
        db.executemany("INSERT INTO log_subjects(commitment, idx) VALUES (?, ?)", add)
        db.commit()
    finally:
        db.close()


def _rows_of(scene: Scene, record_id: str) -> list[tuple[bytes, int]]:
    log = scene.vault._log
    commitment = log._keys.commitment(record_id)
    return [(commitment, i) for i in scene.vault._storage.log_subject_entries(commitment)]


def _refused_without_values(scene: Scene, position: int) -> None:
    with pytest.raises(TamperDetected, match=f"entry {position}") as caught:
        scene.vault.subject_report(scene.ombudsman, SUBJECT_REQUEST, scene.subject)
    message = str(caught.value)
    for value in (scene.person["national_id"], scene.person["name"], scene.person["phone"]):
        assert str(value) not in message


@pytest.mark.parametrize("rows", ["one", "all"])
def test_a_subject_report_with_an_index_row_deleted_is_refused_not_short(
    scene: Scene, rows: str
) -> None:
    """One DELETE once emptied a person's report of an official's searches and reveals.
    The report is read from the signed tree and held against the index: refused, never
    handed out short."""
    first_search = min(scene.searches)
    if rows == "one":
        drop = [row for row in _rows_of(scene, scene.subject) if row[1] == first_search]
    else:
        records = [scene.subject, *scene.cases, *scene.deliveries]
        drop = [row for r in records for row in _rows_of(scene, r)]
    assert drop
    _rewrite_subject_index(scene.vault, drop=drop, add=[])
    _refused_without_values(scene, min(i for _, i in drop))


def test_an_added_or_repointed_subject_row_is_refused_in_the_report(scene: Scene) -> None:
    """An unrelated access planted in the person's report, or one of theirs moved onto
    it, is refused alike: every row is held against the entry it names."""
    log = scene.vault._log
    stranger = max(i for i, _ in log.entries_for([scene.unrelated]))
    moved = min(scene.searches)
    commitment = log._keys.commitment(scene.subject)
    _rewrite_subject_index(scene.vault, drop=[(commitment, moved)], add=[(commitment, stranger)])
    _refused_without_values(scene, moved)
    # The entry moved back: the planted row alone is enough.
    _rewrite_subject_index(scene.vault, drop=[], add=[(commitment, moved)])
    _refused_without_values(scene, stranger)
