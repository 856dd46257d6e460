"""Erasure and retention: a person erased on two officials' word stays erased, also when
a backup taken before the erasure is restored; expired records are purged the same way;
the access log keeps the fact of past accesses and still verifies.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from custodes.audit.erasures import erasures_path, read_erasures
from custodes.audit.report import as_json, render_text, report_from_json
from custodes.backup.sqlite import restore_sqlite
from custodes.bootstrap import open_vault, verify_log_files
from custodes.errors import (
    AccessDenied,
    ErasureLedgerBroken,
    RecordNotFound,
    SelfApproval,
)
from custodes.policy import AccessPurpose, Action, Role
from custodes.settings import VaultLayout
from custodes.vault import Session, Vault
from tests.conftest import FAST_HASH, PASSPHRASE, PURPOSE, login, make_vault
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    pg_cluster_fixture,
    postgres_dsn_fixture,
    postgres_server_fixture,
)
from tests.test_backup import back_up, log_actions, populated, relogin, search
from tests.test_cli_client import (  # noqa: F401 - served is a fixture, used by name
    Served,
    served,
)
from tests.test_stolen_disk import personal_values, scan_bytes

ERASURE = AccessPurpose("the person's own erasure request, letter SAR-2026-17")
AUDIT = AccessPurpose("review of erasures")


def record_id_of(vault: Vault, session: Session, person: dict[str, Any]) -> str:
    found = vault.search(
        session,
        PURPOSE,
        record_type="person",
        index="national_id",
        values={"national_id": str(person["national_id"])},
    )
    assert len(found) == 1
    return found[0].record_id


def sealed_bytes(database: Path, record_id: str) -> tuple[bytes, bytes]:
    """A stored record's sealed payload and wrapped data key, as the file holds them."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        row = conn.execute(
            "SELECT r.payload, k.wrapped FROM records AS r JOIN data_keys AS k"
            " ON k.seq = r.seq WHERE r.record_id = ?",
            (record_id,),
        ).fetchone()
    assert row is not None
    return bytes(row[0]), bytes(row[1])


def byte_hits(directory: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            hits += [f"{path.name}: {len(n)} bytes" for n in needles if n in data]
    return hits


def ledger_of(vault: Vault) -> Path:
    assert vault.directory is not None
    return erasures_path(VaultLayout(vault.directory).read().log_key)


def test_a_restored_backup_does_not_bring_an_erased_person_back(tmp_path: Path) -> None:
    held = populated(tmp_path, count=300)
    vault, people = held.vault, held.people
    asker = login(vault, Role.AUDITOR, "wu.min")
    approver = login(vault, Role.SUPERVISOR, "li.jing")
    person = people[0]
    record_id = record_id_of(vault, approver, person)
    # Past accesses the log must keep: a read of the record and a search.
    vault.record(approver, PURPOSE, record_id)
    log_key = vault.log_verifier_key
    made = back_up(vault, tmp_path / "offsite" / "monday")
    payload, wrapped = sealed_bytes(held.directory / "vault.db", record_id)

    request_id = vault.erasures.request(asker, ERASURE, record_id)
    status = vault.erasures.approve(approver, request_id)
    assert (status.state, status.approver) == ("erased", "li.jing")
    assert search(vault, approver, person) == 0
    with pytest.raises(RecordNotFound):
        vault.record(approver, PURPOSE, record_id)
    ledger = ledger_of(vault)
    assert [e.records for e in read_erasures(ledger, log_key)] == [(record_id,)]
    # Gone from the live vault's files too, WAL included, while it is open.
    assert byte_hits(held.directory, [payload, wrapped]) == []
    vault.close()
    assert byte_hits(held.directory, [payload, wrapped]) == []

    restored = restore_sqlite(
        made.directory,
        tmp_path / "vault-restored",
        keys=tmp_path / "keys-restored",
        passphrase=PASSPHRASE,
        log_key=log_key,
        erasures=ledger,
    )
    # The backup holds the person; the restored vault does not, in any file: no value of
    # theirs in clear, and neither their sealed payload nor their wrapped data key.
    assert byte_hits(made.directory, [payload, wrapped])
    assert byte_hits(restored.directory, [payload, wrapped]) == []
    assert byte_hits(tmp_path / "keys-restored", [payload, wrapped]) == []
    assert scan_bytes(restored.directory, personal_values([person])) == []

    reopened = open_vault(restored.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        officer = relogin(reopened, "li.jing")
        assert search(reopened, officer, person) == 0
        with pytest.raises(RecordNotFound):
            reopened.record(officer, PURPOSE, record_id)
        assert reopened.count() == len(held.records) - 1
        # The log keeps the fact of the past accesses, and says the person was erased.
        auditor = relogin(reopened, "wu.min")
        report = reopened.subject_report(auditor, AUDIT, record_id)
        actions = [a.action for a in report.accesses]
        assert Action.READ.value in actions
        # The request was logged after the backup and is lost with the later log; the
        # ledger, kept with the keys, is what remembers the erasure.
        assert Action.ERASE_REQUEST.value not in actions
        assert report.erased_for == f"request {request_id}"
        assert report.erased_at is not None
        assert "Erased" in render_text(report)
        assert report_from_json(as_json(report)).erased_for == report.erased_for
        restores = log_actions(reopened, auditor, Action.BACKUP_RESTORE)
        assert restores[-1]["erased_on_ledger"] == 1
        reapplied = log_actions(reopened, auditor, Action.ERASE)
        assert [(e["kind"], e["outcome"], e["actor"]) for e in reapplied] == [
            ("ledger", "granted", "vault")
        ]
    finally:
        reopened.close()
    assert verify_log_files(restored.directory, log_key=log_key).entries > 0


def test_a_restore_finds_the_ledger_kept_with_the_vaults_keys(tmp_path: Path) -> None:
    held = populated(tmp_path, count=60)
    vault, people = held.vault, held.people
    asker = login(vault, Role.SUPERVISOR, "wu.min")
    approver = login(vault, Role.ADMIN, "zhao.lei")
    officer = login(vault, Role.SUPERVISOR, "li.jing")
    record_id = record_id_of(vault, officer, people[1])
    made = back_up(vault, tmp_path / "offsite" / "monday")
    vault.erasures.approve(approver, vault.erasures.request(asker, ERASURE, record_id))
    log_key = vault.log_verifier_key
    vault.close()
    # No ledger named: the one beside the vault's log key where keys are kept by default.
    restored = restore_sqlite(
        made.directory,
        tmp_path / "vault-restored",
        keys=tmp_path / "keys-restored",
        passphrase=PASSPHRASE,
        log_key=log_key,
    )
    reopened = open_vault(restored.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        assert search(reopened, relogin(reopened, "li.jing"), people[1]) == 0
    finally:
        reopened.close()


def test_an_official_cannot_approve_their_own_erasure_request(sqlite_vault: Vault) -> None:
    vault = sqlite_vault
    supervisor = login(vault, Role.SUPERVISOR, "li.jing")
    held = populated_one(vault, supervisor)
    request_id = vault.erasures.request(supervisor, ERASURE, held)
    with pytest.raises(SelfApproval):
        vault.erasures.approve(supervisor, request_id)
    assert vault.erasures.status(supervisor, request_id).state == "requested"
    auditor = login(vault, Role.AUDITOR, "wu.min")
    refused = [
        e for e in log_actions(vault, auditor, Action.ERASE_APPROVE) if e["outcome"] == "denied"
    ]
    assert [e["actor"] for e in refused] == ["li.jing"]


@pytest.mark.parametrize("role", [Role.OFFICER, Role.INVESTIGATOR, Role.AUDITOR])
def test_an_official_without_the_approvers_role_cannot_erase(
    sqlite_vault: Vault, role: Role
) -> None:
    vault = sqlite_vault
    asker = login(vault, Role.SUPERVISOR, "li.jing")
    record_id = populated_one(vault, asker)
    request_id = vault.erasures.request(asker, ERASURE, record_id)
    other = login(vault, role, "chen.hao")
    with pytest.raises(AccessDenied):
        vault.erasures.approve(other, request_id)
    assert vault.erasures.status(asker, request_id).state == "requested"
    assert vault.record(asker, PURPOSE, record_id).record_id == record_id


def test_an_officer_cannot_even_ask_for_an_erasure(sqlite_vault: Vault) -> None:
    vault = sqlite_vault
    supervisor = login(vault, Role.SUPERVISOR, "li.jing")
    record_id = populated_one(vault, supervisor)
    officer = login(vault, Role.OFFICER, "chen.hao")
    with pytest.raises(AccessDenied):
        vault.erasures.request(officer, ERASURE, record_id)


def test_a_tampered_erasure_ledger_stops_the_vault_from_serving(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, "sqlite")
    supervisor = login(vault, Role.SUPERVISOR, "li.jing")
    admin = login(vault, Role.ADMIN, "zhao.lei")
    record_id = populated_one(vault, supervisor)
    vault.erasures.approve(admin, vault.erasures.request(supervisor, ERASURE, record_id))
    directory, ledger = vault.directory, ledger_of(vault)
    assert directory is not None
    vault.close()
    original = ledger.read_bytes()

    # A statement's record id changed (to bring the person back under another name).
    doc = json.loads(original)
    other = record_id[:-1] + ("y" if record_id[-1] != "y" else "z")  # never the same id
    doc["statements"][0] = doc["statements"][0].replace(record_id, other)
    ledger.write_text(json.dumps(doc))
    with pytest.raises(ErasureLedgerBroken):
        open_vault(directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)

    # A statement dropped from the chain.
    ledger.write_bytes(original)
    reopened = open_vault(directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        second = populated_one(reopened, relogin_supervisor(reopened), index=1)
        reopened.erasures.approve(
            relogin_admin(reopened),
            reopened.erasures.request(relogin_supervisor(reopened), ERASURE, second),
        )
    finally:
        reopened.close()
    doc = json.loads(ledger.read_bytes())
    doc["statements"] = doc["statements"][1:]
    ledger.write_text(json.dumps(doc))
    with pytest.raises(ErasureLedgerBroken):
        open_vault(directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)

    # Garbage in place of the file.
    ledger.write_bytes(b"not a ledger")
    with pytest.raises(ErasureLedgerBroken):
        open_vault(directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)


def test_a_ledger_put_back_from_an_older_copy_of_itself_fails_audit_verify(
    tmp_path: Path,
) -> None:
    vault = make_vault(tmp_path, "sqlite")
    supervisor = login(vault, Role.SUPERVISOR, "li.jing")
    admin = login(vault, Role.ADMIN, "zhao.lei")
    first = populated_one(vault, supervisor)
    vault.erasures.approve(admin, vault.erasures.request(supervisor, ERASURE, first))
    ledger = ledger_of(vault)
    older = ledger.read_bytes()
    second = populated_one(vault, supervisor, index=1)
    vault.erasures.approve(admin, vault.erasures.request(supervisor, ERASURE, second))
    assert vault.verify_log(vault.operator).entries > 0
    # A valid chain, one statement short: the ledger alone cannot tell; the log can.
    ledger.write_bytes(older)
    with pytest.raises(ErasureLedgerBroken, match="lacks 1 records"):
        vault.verify_log(vault.operator)
    vault.close()


def test_retention_purges_an_expired_delivery_and_keeps_a_fresh_one(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, "sqlite")
    today = dt.date.today()
    old = (today - dt.timedelta(days=800)).isoformat()
    fresh = (today - dt.timedelta(days=30)).isoformat()
    source = tmp_path / "deliveries.jsonl"
    rows = [
        delivery("SF1000000001", old, "13800000001"),
        delivery("SF1000000002", fresh, "13800000002"),
        delivery("SF1000000003", None, "13800000003"),
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert vault.ingest(vault.operator, source).accepted == 3
    officer = login(vault, Role.SUPERVISOR, "li.jing")

    def found(phone: str) -> int:
        return len(
            vault.search(
                officer, PURPOSE, record_type="delivery", index="phone", values={"phone": phone}
            )
        )

    assert [found(r["phone"]) for r in rows] == [1, 1, 1]
    report = vault.erasures.retention_round(vault.operator)
    assert report.erased == {"delivery": 1}
    assert [found(r["phone"]) for r in rows] == [0, 1, 1]
    ledger = read_erasures(ledger_of(vault), vault.log_verifier_key)
    assert [e.reason for e in ledger] == ["retention delivery"]
    # A second pass finds nothing more.
    assert vault.erasures.retention_round(vault.operator).erased == {}
    auditor = login(vault, Role.AUDITOR, "wu.min")
    erased = log_actions(vault, auditor, Action.ERASE)
    assert [(e["kind"], e["reason"], e["outcome"]) for e in erased] == [
        ("retention", "retention delivery", "granted")
    ]
    assert vault.verify_log(auditor, AUDIT).entries > 0
    vault.close()


def delivery(waybill: str, day: str | None, phone: str) -> dict[str, Any]:
    row: dict[str, Any] = {
        "type": "delivery",
        "waybill_no": waybill,
        "recipient_name": "张三",
        "phone": phone,
        "address": "北京市朝阳区建国路1号",
    }
    if day is not None:
        row["delivered_on"] = day
    return row


def populated_one(vault: Vault, session: Session, index: int = 0) -> str:
    """Ingest a small population once; the record id of one of its people."""
    from custodes.synth import write_jsonl

    assert vault.directory is not None
    source = vault.directory.parent / "people.jsonl"
    if not source.exists():
        with source.open("wb") as f:
            write_jsonl(f, 20, seed=7)
        vault.ingest(vault.operator, source)
    people = [json.loads(line) for line in source.read_text().splitlines()]
    people = [p for p in people if p["type"] == "person"]
    return record_id_of(vault, session, people[index])


def relogin_supervisor(vault: Vault) -> Session:
    return relogin(vault, "li.jing")


def relogin_admin(vault: Vault) -> Session:
    return relogin(vault, "zhao.lei")


def test_the_api_asks_approves_and_reports_an_erasure_naming_no_value(tmp_path: Path) -> None:
    import warnings

    from custodes.web.app import create_app

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2")
        from fastapi.testclient import TestClient

    vault = make_vault(tmp_path, "sqlite")
    try:
        asker = login(vault, Role.AUDITOR, "wu.min")
        approver = login(vault, Role.SUPERVISOR, "li.jing")
        record_id = populated_one(vault, approver)
        person = next(
            p
            for p in (json.loads(x) for x in (tmp_path / "people.jsonl").read_text().splitlines())
            if p["type"] == "person"
        )
        app = create_app(vault)

        def client(session: Session) -> TestClient:
            return TestClient(
                app,
                base_url="https://testserver",
                headers={"Authorization": f"Bearer {session.token}"},
            )

        asked = client(asker).post(
            "/api/v1/erasures",
            json={"record_id": record_id, "purpose": "the person's own erasure request"},
        )
        assert asked.status_code == 201, asked.text
        request_id = asked.json()["request_id"]
        assert asked.json()["state"] == "requested"
        own = client(asker).post(f"/api/v1/erasures/{request_id}/approve")
        assert own.status_code == 403
        done = client(approver).post(f"/api/v1/erasures/{request_id}/approve")
        assert done.status_code == 200, done.text
        assert done.json()["state"] == "erased" and done.json()["approver"] == "li.jing"
        status = client(asker).get(f"/api/v1/erasures/{request_id}")
        assert status.json()["erased_at"] is not None
        answers = asked.text + own.text + done.text + status.text
        assert not any(value in answers for value in personal_values([person]))
        report = client(asker).get(
            f"/api/v1/audit/subject/{record_id}", params={"purpose": "subject access request"}
        )
        assert report.status_code == 200, report.text
        assert report.json()["erased"]["for"] == f"request {request_id}"
        # The dashboard's report page says so too.
        from custodes.web import deps

        browser = TestClient(app, base_url="https://testserver", follow_redirects=False)
        browser.cookies.set(deps.SESSION_COOKIE, asker.token)
        page = browser.get(
            f"/audit/subject/{record_id}", params={"reason": "subject access request"}
        )
        assert page.status_code == 200, page.text
        assert "Erased" in page.text and f"request {request_id}" in page.text
    finally:
        vault.close()


def test_a_postgresql_database_put_back_from_before_an_erasure_is_erased_again(
    tmp_path: Path, postgres_dsn: Callable[[], str]
) -> None:
    import psycopg

    from custodes.bootstrap import create_vault
    from tests.conftest import FAST_KDF

    database = postgres_dsn()
    vault = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=database,
    )
    try:
        asker = login(vault, Role.AUDITOR, "wu.min")
        approver = login(vault, Role.SUPERVISOR, "li.jing")
        record_id = populated_one(vault, approver)
        tables = {"records": "", "data_keys": "", "tokens": ""}
        with psycopg.connect(database, autocommit=True) as conn:
            # What an older copy of the database holds of the person.
            kept = {
                table: conn.execute(
                    f"SELECT * FROM {table} WHERE record_id = %s",
                    (record_id,),
                ).fetchall()
                for table in tables
            }
        assert all(kept.values())
        vault.erasures.approve(approver, vault.erasures.request(asker, ERASURE, record_id))
        with pytest.raises(RecordNotFound):
            vault.record(approver, PURPOSE, record_id)
    finally:
        vault.close()
    with psycopg.connect(database, autocommit=True) as conn:
        for table, rows in kept.items():
            assert not conn.execute(
                f"SELECT 1 FROM {table} WHERE record_id = %s",
                (record_id,),
            ).fetchall()
            marks = ", ".join(["%s"] * len(rows[0]))
            conn.cursor().executemany(
                f"INSERT INTO {table} VALUES ({marks})",
                rows,
            )
    reopened = open_vault(tmp_path / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        with pytest.raises(RecordNotFound):
            reopened.record(relogin(reopened, "li.jing"), PURPOSE, record_id)
        auditor = relogin(reopened, "wu.min")
        assert [e["kind"] for e in log_actions(reopened, auditor, Action.ERASE)] == [
            "request",
            "ledger",
        ]
    finally:
        reopened.close()
    with psycopg.connect(database, autocommit=True) as conn:
        for table in tables:
            assert not conn.execute(
                f"SELECT 1 FROM {table} WHERE record_id = %s",
                (record_id,),
            ).fetchall()


def test_retention_backup_and_restore_carry_the_ledger_from_the_command_line(
    tmp_path: Path,
) -> None:
    from tests.test_cli_client import run

    vault = make_vault(tmp_path, "sqlite")
    today = dt.date.today()
    source = tmp_path / "deliveries.jsonl"
    rows = [
        delivery("SF2000000001", (today - dt.timedelta(days=731 + 30)).isoformat(), "13900000001"),
        delivery("SF2000000002", today.isoformat(), "13900000002"),
    ]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert vault.ingest(vault.operator, source).accepted == 2
    directory, ledger, log_key = vault.directory, ledger_of(vault), vault.log_verifier_key
    assert directory is not None
    vault.close()
    env = {"CUSTODES_VAULT": str(directory), "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}

    done = run("retention", "run", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["erased"] == {"delivery": 1}
    assert len(read_erasures(ledger, log_key)) == 1

    backup = tmp_path / "backups" / "nightly"
    done = run("backup", "create", "--to", str(backup), env=env)
    assert done.returncode == 0, done.stderr
    assert (backup / "log.key.erasures").read_bytes() == ledger.read_bytes()
    done = run("backup", "verify", str(backup), "--log-key", log_key, env=env)
    assert done.returncode == 0, done.stderr

    done = run(
        "restore",
        str(backup),
        "--vault",
        str(tmp_path / "restored"),
        "--keys",
        str(tmp_path / "restored-keys"),
        "--log-key",
        log_key,
        "--erasures",
        str(ledger),
        env={"CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE},
    )
    assert done.returncode == 0, done.stderr
    restored_ledger = next((tmp_path / "restored-keys").glob("*.erasures"))
    assert restored_ledger.read_bytes() == ledger.read_bytes()
    for value in ("SF2000000001", "13900000001", "SF2000000002", "13900000002"):
        assert value not in done.stdout + done.stderr


def test_the_client_asks_and_a_second_official_approves_an_erasure(
    served: Served,  # noqa: F811 - the fixture
) -> None:
    from tests.test_cli_client import run, search_args

    asker = served.official("er.asker", Role.SUPERVISOR)
    approver = served.official("er.approver", Role.SUPERVISOR)
    for env in (asker, approver):
        assert run("login", "--server", served.url, env=env).returncode == 0, "login"
    person = served.people[0]
    found = run(*search_args(person, "--json"), env=approver)
    assert found.returncode == 0, found.stderr
    [record] = json.loads(found.stdout)
    record_id = record["record_id"]
    asked = run(
        "erase", "request", record_id, "--purpose", "the person's own erasure request",
        "--json", env=asker,
    )  # fmt: skip
    assert asked.returncode == 0, asked.stderr
    request_id = json.loads(asked.stdout)["request_id"]
    own = run("erase", "approve", request_id, env=asker)
    assert own.returncode == AccessDenied.exit_code and "asked for it" in own.stderr
    done = run("erase", "approve", request_id, env=approver)
    assert done.returncode == 0, done.stderr
    assert f"erasure {request_id}: erased" in done.stdout
    status = run("erase", "status", request_id, env=asker)
    assert status.returncode == 0 and "erased at" in status.stdout
    again = run(*search_args(person, "--json"), env=approver)
    assert again.returncode == 0 and json.loads(again.stdout) == []
    outputs = "".join(p.stdout + p.stderr for p in (asked, own, done, status, again))
    assert not any(value in outputs for value in personal_values([person]))


def test_a_restored_pgbackrest_backup_does_not_bring_an_erased_person_back(
    tmp_path: Path,
    pg_cluster: Callable[..., Any],
) -> None:
    import psycopg

    from custodes.backup.postgres import RestoreTarget, restore_postgres
    from tests.test_backup_postgres import OWNER, _deploy, _restored_cluster

    if shutil.which("pgbackrest") is None:
        pytest.skip("pgBackRest is not installed")
    d = _deploy(tmp_path, pg_cluster)
    # Erasure deletes rows, which only the schema's owner may (see docs/security.md).
    vault = d.open(OWNER)
    try:
        asker = login(vault, Role.AUDITOR, "wu.min")
        approver = login(vault, Role.SUPERVISOR, "li.jing")
        record_id = populated_one(vault, approver)
        vault.record(approver, PURPOSE, record_id)
        backup = d.backup(vault, tmp_path / "backup")
        request_id = vault.erasures.request(asker, ERASURE, record_id)
        vault.erasures.approve(approver, request_id)
        log_key = vault.log_verifier_key
    finally:
        vault.close()
    ledger = erasures_path(d.keys / "log.key")
    assert [e.records for e in read_erasures(ledger, log_key)] == [(record_id,)]

    with _restored_cluster(d, "restored") as (pg_data, port):
        restored = restore_postgres(
            backup,
            tmp_path / "restored-vault",
            keys=tmp_path / "restored-keys",
            passphrase=PASSPHRASE,
            database=d.url(OWNER, port=port),
            pg_data=pg_data,
            pgbackrest=d.pgbackrest,
            pg_ctl=d.pg_ctl,
            to=RestoreTarget.parse("backup"),
            erasures=ledger,
        )
        with psycopg.connect(d.url(OWNER, port=port), autocommit=True) as conn:
            for table in ("records", "data_keys", "tokens"):
                assert not conn.execute(
                    f"SELECT 1 FROM {table} WHERE record_id = %s",
                    (record_id,),
                ).fetchall()
        back = open_vault(restored.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
        try:
            with pytest.raises(RecordNotFound):
                back.record(relogin(back, "li.jing"), PURPOSE, record_id)
            auditor = relogin(back, "wu.min")
            report = back.subject_report(auditor, AUDIT, record_id)
            assert Action.READ.value in [a.action for a in report.accesses]
            assert report.erased_for == f"request {request_id}"
            assert back.verify_log(auditor, AUDIT).entries > 0
        finally:
            back.close()


def test_any_change_to_a_signed_erasure_ledger_is_caught(tmp_path: Path) -> None:
    from custodes.audit.erasures import ErasureLedger
    from tests.conftest import memory_keys

    _, signer = memory_keys(tmp_path / "one")
    ledger = ErasureLedger(signer)
    ledger.append(["rec-a", "rec-b"], at=1_700_000_000, reason="retention delivery")
    ledger.append(["rec-c"], at=1_700_000_100, reason="request " + "a" * 32)
    original = ledger.path.read_bytes()
    kept = ledger.erasures()
    assert [e.records for e in kept] == [("rec-a", "rec-b"), ("rec-c",)]
    caught = 0
    for at in range(len(original)):
        changed = bytearray(original)
        changed[at] ^= 0x01
        ledger.path.write_bytes(bytes(changed))
        try:
            assert ledger.erasures() == kept  # a change the reader cannot see is no change
        except ErasureLedgerBroken:
            caught += 1
    assert caught > len(original) * 0.9
    # Statements in another order, or one from another vault's key, are refused too.
    doc = json.loads(original)
    ledger.path.write_text(json.dumps({**doc, "statements": doc["statements"][::-1]}))
    with pytest.raises(ErasureLedgerBroken):
        ledger.erasures()
    _, other = memory_keys(tmp_path / "two")
    foreign = ErasureLedger(other)
    foreign.append(["rec-a"], at=1, reason="retention delivery")
    ledger.path.write_bytes(foreign.path.read_bytes())
    with pytest.raises(ErasureLedgerBroken):
        ledger.erasures()
    # Nothing an official typed is ever signed as a reason.
    ledger.path.write_bytes(original)
    for reason in ("request because I said so", "retention two words", "", "request " + "A" * 32):
        with pytest.raises(ValueError):
            ledger.append(["rec-d"], at=2, reason=reason)
    assert ledger.path.read_bytes() == original


def test_a_least_privileged_postgresql_server_never_serves_past_a_ledgered_erasure(
    tmp_path: Path,
    pg_cluster: Callable[..., Any],
) -> None:
    from custodes.doctor import Deployment, examine
    from tests.test_backup_postgres import OWNER, _deploy

    if shutil.which("pgbackrest") is None:
        pytest.skip("pgBackRest is not installed")
    d = _deploy(tmp_path, pg_cluster)
    vault = d.open()  # the server's own role: it may not delete a record
    other = d.open()  # another worker of the same server
    try:
        asker = login(vault, Role.AUDITOR, "wu.min")
        approver = login(vault, Role.SUPERVISOR, "li.jing")
        record_id = populated_one(vault, approver)
        reader = relogin(other, "li.jing")
        other.record(reader, PURPOSE, record_id)  # read before the erasure
        request_id = vault.erasures.request(asker, ERASURE, record_id)
        # Approved: on the ledger, so read by no one from this moment, in any worker,
        # although this role could not delete the bytes.
        vault.erasures.approve(approver, request_id)
        with pytest.raises(RecordNotFound):
            vault.record(approver, PURPOSE, record_id)
        with pytest.raises(RecordNotFound):
            other.record(reader, PURPOSE, record_id)
        assert vault._storage.get_records([record_id])  # the bytes wait for the owner
    finally:
        other.close()
        vault.close()
    # The server's role opens the vault again and still serves nothing of the person ...
    again = d.open()
    try:
        with pytest.raises(RecordNotFound):
            again.record(relogin(again, "li.jing"), PURPOSE, record_id)
    finally:
        again.close()
    # ... doctor says the bytes remain and who can remove them ...
    found = {f.check: f for f in examine(Deployment(vault_dir=d.vault_dir))}
    assert "erasures:still-stored" in found
    assert "schema owner" in found["erasures:still-stored"].fix
    # ... and the owner's credentials apply the ledger.
    owner = d.open(OWNER)
    try:
        assert not owner._storage.get_records([record_id])
    finally:
        owner.close()
    assert "erasures:still-stored" not in {
        f.check for f in examine(Deployment(vault_dir=d.vault_dir))
    }
