"""An access log in a database of its own (`init --log-database`): every entry lands there
and none in the records' database, the pair runs the whole storage contract, and the two
are bound to each other, so that a vault never opens with no log of its own or with
another vault's.

Threat model rows 16 (an access not on the log did not happen) and 21 (the database is
lost): whoever holds the records' database cannot reach the log, and a log that is not
this vault's is refused rather than read from."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import orjson
import psycopg
import pytest

from custodes.backup.postgres import PgBackRest, backup_postgres
from custodes.bootstrap import create_vault, grant_database_role, open_vault
from custodes.doctor import Deployment, Finding, Severity, examine
from custodes.errors import ConfigurationError
from custodes.settings import ENV_LOG_DATABASE, VaultLayout, database_url_as
from custodes.storage import PostgresStorage, Storage
from custodes.storage.log_apart import open_log_apart
from custodes.synth import write_jsonl
from custodes.vault import Vault
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login
from tests.contract.storage_contract import StorageContract
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    PgCluster,
    pg_cluster_fixture,
    postgres_dsn_fixture,
    postgres_server_fixture,
    with_schema,
)

pytestmark = pytest.mark.postgres


class TestLogApart(StorageContract):
    @pytest.fixture
    def make_storage(self, postgres_dsn: Callable[[], str]) -> Callable[[], Storage]:
        return lambda: open_log_apart(
            PostgresStorage(postgres_dsn()), PostgresStorage(postgres_dsn(), partitions=1)
        )


def rows(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,)
    return int(count)


def made_vault(
    tmp_path: Path, records: str, log: str | None, *, app_role: str | None = None
) -> Path:
    """A vault on `records` with its log in `log` (None: beside the records), closed."""
    directory = tmp_path / "vault"
    create_vault(
        directory,
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=records,
        log_database=log,
        app_role=app_role,
    ).close()
    return directory


def opened(directory: Path) -> Vault:
    return open_vault(directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)


def audit_verify(directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    return subprocess.run(
        [sys.executable, "-m", "custodes", "audit", "verify", "--vault", str(directory)],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
        check=False,
    )


def test_every_search_is_logged_in_the_log_database_and_none_in_the_records(
    tmp_path: Path, postgres_dsn: Callable[[], str]
) -> None:
    records, log = postgres_dsn(), postgres_dsn()
    directory = made_vault(tmp_path, records, log)
    assert VaultLayout(directory).read().log_database == log
    source = tmp_path / "people.jsonl"
    with source.open("wb") as f:
        write_jsonl(f, 40, seed=3)
    people = [
        doc
        for doc in map(orjson.loads, source.read_bytes().splitlines())
        if doc["type"] == "person"
    ]
    vault = opened(directory)
    try:
        assert vault.ingest(vault.operator, source).accepted > 0
        session = login(vault)
        for person in people[:5]:
            found = vault.search(
                session,
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": str(person["national_id"])},
            )
            assert len(found) == 1
    finally:
        vault.close()
    # Every entry (the ingest's, the account's, the five searches') is the log database's.
    assert rows(log, "log_entries") >= 7 and rows(records, "log_entries") == 0
    assert rows(records, "checkpoints") == 0
    assert rows(records, "records") > 0 and rows(log, "records") == 0
    # The key-less verifier finds the log where the vault's settings say it is.
    verified = audit_verify(directory)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_a_vault_whose_log_is_apart_never_opens_without_it_or_with_another(
    tmp_path: Path, postgres_dsn: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    records, log = postgres_dsn(), postgres_dsn()
    directory = made_vault(tmp_path, records, log)
    # The log database named for this run as the records' own: it would answer with an
    # empty log.
    monkeypatch.setenv(ENV_LOG_DATABASE, records)
    with pytest.raises(ConfigurationError, match="database of its own"):
        opened(directory)
    # Another vault's log database.
    other = made_vault(tmp_path / "other", postgres_dsn(), postgres_dsn())
    monkeypatch.setenv(ENV_LOG_DATABASE, VaultLayout(other).read().log_database or "")
    with pytest.raises(ConfigurationError, match="another vault"):
        opened(directory)
    # An empty database, never bound: not this vault's log either.
    monkeypatch.setenv(ENV_LOG_DATABASE, postgres_dsn())
    with pytest.raises(ConfigurationError, match="no access log of this vault"):
        opened(directory)
    monkeypatch.delenv(ENV_LOG_DATABASE)
    opened(directory).close()
    # The key-less verifier refuses likewise.
    refused = audit_verify(directory, **{ENV_LOG_DATABASE: records})
    assert refused.returncode != 0


def test_a_log_is_not_moved_out_of_the_records_database_once_it_holds_entries(
    tmp_path: Path, postgres_dsn: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    records = postgres_dsn()
    directory = made_vault(tmp_path, records, None)
    vault = opened(directory)
    try:
        login(vault)  # an account added: an entry on the log, in the records' database
    finally:
        vault.close()
    assert rows(records, "log_entries") > 0
    monkeypatch.setenv(ENV_LOG_DATABASE, postgres_dsn())
    with pytest.raises(ConfigurationError, match="not moved"):
        opened(directory)


def test_a_log_database_holding_a_vault_is_refused_at_creation(
    tmp_path: Path, postgres_dsn: Callable[[], str]
) -> None:
    taken = postgres_dsn()
    made_vault(tmp_path / "first", taken, postgres_dsn())
    with pytest.raises(ConfigurationError, match="not empty"):
        made_vault(tmp_path / "second", postgres_dsn(), taken)
    assert not (tmp_path / "second" / "vault" / "vault.toml").exists()


def test_a_backup_of_a_vault_whose_log_is_apart_is_refused_not_made_half(
    tmp_path: Path, postgres_dsn: Callable[[], str]
) -> None:
    records = postgres_dsn()
    directory = made_vault(tmp_path, records, postgres_dsn())
    vault = opened(directory)
    try:
        with pytest.raises(ConfigurationError, match="database of its own"):
            backup_postgres(
                vault,
                tmp_path / "backup",
                signer=cast(Any, None),
                database=records,
                pgbackrest=PgBackRest.from_text("custodes", "false"),
            )
    finally:
        vault.close()
    assert not (tmp_path / "backup").exists()


def owned_schemas(cluster: PgCluster) -> tuple[str, str]:
    """The owner's URLs of two schemas of a cluster, the records' and the log's, owned by
    a plain role; the server's role `vault_app` exists and holds nothing yet."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("CREATE ROLE vault_owner LOGIN NOSUPERUSER")
        admin.execute("CREATE ROLE vault_app LOGIN NOSUPERUSER")
        admin.execute("CREATE SCHEMA vault AUTHORIZATION vault_owner")
        admin.execute("CREATE SCHEMA vault_log AUTHORIZATION vault_owner")
    return (
        with_schema(cluster.dsn(user="vault_owner"), "vault"),
        with_schema(cluster.dsn(user="vault_owner"), "vault_log"),
    )


def test_the_servers_role_is_granted_in_both_databases_and_runs_a_search_there(
    tmp_path: Path, pg_cluster: Callable[..., PgCluster]
) -> None:
    cluster = pg_cluster()
    records, log = owned_schemas(cluster)
    directory = made_vault(tmp_path, records, log, app_role="vault_app")
    recorded = VaultLayout(directory).read()
    # Neither URL the vault keeps is the owner's.
    assert recorded.database == database_url_as(records, "vault_app")
    assert recorded.log_database == database_url_as(log, "vault_app")
    vault = opened(directory)
    try:
        session = login(vault)
        vault.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": "11010519491231002X"},
        )
    finally:
        vault.close()
    admin_log = with_schema(cluster.dsn(), "vault_log")
    assert rows(admin_log, "log_entries") >= 2
    assert rows(with_schema(cluster.dsn(), "vault"), "log_entries") == 0
    # Granting again after an upgrade: the log's schema too, named by its owner's URL.
    granted = grant_database_role(directory, owner_database=log, app_role="vault_app")
    assert granted.log


def test_doctor_finds_the_servers_role_granted_too_much_in_the_log_database(
    tmp_path: Path, pg_cluster: Callable[..., PgCluster]
) -> None:
    # The log's database is where a server role able to rewrite history does harm: the
    # same checks as the records' database, each finding naming which database it is.
    cluster = pg_cluster()
    records, log = owned_schemas(cluster)
    directory = made_vault(tmp_path, records, log, app_role="vault_app")

    def database_findings() -> list[Finding]:
        return [
            f
            for f in examine(Deployment(directory, listeners=list))
            if f.check.startswith("database:")
        ]

    assert database_findings() == []
    with psycopg.connect(log, autocommit=True) as owner:
        owner.execute("GRANT DELETE ON log_entries TO vault_app")
    (found,) = database_findings()
    assert (found.check, found.severity) == ("database:grants-too-wide", Severity.HIGH)
    assert "access log database" in found.message and "on log_entries" in found.message
    assert "LOG_OWNER_URL" in found.fix
    # Granting again with the log schema owner's URL takes back what it should not hold.
    grant_database_role(directory, owner_database=log, app_role="vault_app")
    assert database_findings() == []
    # A log database that cannot be reached is a finding of its own, not a crash.
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute("ALTER ROLE vault_app NOLOGIN")
    found_now = {(f.check, "access log" in f.message) for f in database_findings()}
    assert ("database:unreachable", True) in found_now
