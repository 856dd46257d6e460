"""Least privilege in the database, as the operator sets it up: `custodes init --app-role`
and `custodes database grant` give the server a role of its own and record only its URL;
the server opens with that role's rights alone; `custodes doctor` names a server role that
is the owner or was granted too much; and a refusal by the database fails closed, on the
access log as an alert."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg
import pytest
from psycopg import sql

from custodes.access import DATABASE_REFUSED
from custodes.audit import AccessEntry, Outcome
from custodes.bootstrap import (
    assemble_vault,
    create_vault,
    for_server,
    stored_verifier_key,
    unlock_vault,
    verify_log_files,
)
from custodes.doctor import Deployment, examine
from custodes.errors import AuditUnavailable, ConfigurationError, DatabaseRefused
from custodes.settings import VaultLayout, database_user
from custodes.storage import PostgresStorage
from custodes.storage.postgres import SCHEMA_VERSION, SCHEMA_VERSION_KEY
from custodes.synth import write_jsonl
from custodes.web.pages import entry_row
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, free_port
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    postgres_server_fixture,
    with_schema,
)

pytestmark = pytest.mark.postgres


@dataclass(frozen=True)
class Roles:
    """A schema of its own on the test server, owned by a plain login role, and a second
    plain login role for the vault's server. Roles are the cluster's, so their names are
    the test's own and both are dropped afterwards."""

    admin: str  # the server's superuser, for the test's own look and its sabotage
    owner: str  # the schema owner's DSN: what an operator gives init and database grant
    owner_role: str
    app_role: str
    schema: str


@pytest.fixture
def roles(postgres_server: str) -> Iterator[Roles]:
    tag = secrets.token_hex(5)
    owner, app, schema = f"custodes_owner_{tag}", f"custodes_app_{tag}", f"custodes_t_{tag}"
    admin = psycopg.connect(postgres_server, autocommit=True)
    try:
        for role in (owner, app):
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        admin.execute(
            sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                sql.Identifier(schema), sql.Identifier(owner)
            )
        )
        yield Roles(
            admin=with_schema(postgres_server, schema),
            owner=with_schema(psycopg.conninfo.make_conninfo(postgres_server, user=owner), schema),
            owner_role=owner,
            app_role=app,
            schema=schema,
        )
    finally:
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        for role in (app, owner):
            admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
        admin.close()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a host command: the passphrase and where the keys go, all in
    the test's directory."""
    return {
        "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE,
        "CUSTODES_KEYRING": str(tmp_path / "keys" / "vault.keyring"),
        "CUSTODES_LOG_KEY": str(tmp_path / "keys" / "log.key"),
    }


def custodes(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "custodes", *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
        check=False,
    )


def doctor_cli(env: dict[str, str], vault_dir: Path) -> tuple[int, dict[str, list[str]]]:
    """`custodes doctor --json`: its exit code and its database findings' messages."""
    done = custodes(env, "doctor", "--vault", str(vault_dir), "--json")
    assert "Traceback" not in done.stderr, done.stderr
    found: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        doc = orjson.loads(line)
        if doc["check"].startswith("database:"):
            found.setdefault(doc["check"], []).append(f"{doc['severity']}: {doc['message']}")
    return done.returncode, found


def findings(vault_dir: Path) -> dict[str, list[str]]:
    """The database findings of doctor's checks, run in this process: check -> messages."""
    found: dict[str, list[str]] = {}
    for finding in examine(Deployment(vault_dir, listeners=list)):
        if finding.check.startswith("database:"):
            found.setdefault(finding.check, []).append(f"{finding.severity}: {finding.message}")
    return found


def grant(env: dict[str, str], roles: Roles, vault_dir: Path, owner: str | None = None) -> str:
    """`custodes database grant` of the server's role as the owner: its error output."""
    done = custodes(
        env,
        "database",
        "grant",
        "--owner-database",
        owner or roles.owner,
        "--app-role",
        roles.app_role,
        "--vault",
        str(vault_dir),
    )
    return "" if done.returncode == 0 else done.stderr or "failed"


def init(env: dict[str, str], vault_dir: Path, database: str, *more: str) -> None:
    done = custodes(env, "init", str(vault_dir), "--database", database, *more)
    assert done.returncode == 0, done.stderr


def quick_vault(tmp_path: Path, roles: Roles, *, app_role: str | None) -> Path:
    """A vault made as the owner in this process (cheap key costs), as init makes one."""
    create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=roles.owner,
        app_role=app_role,
    ).close()
    return tmp_path / "vault"


def as_owner(roles: Roles, statement: str) -> None:
    with psycopg.connect(roles.owner, autocommit=True) as owner:
        owner.execute(statement.encode())


def entries(storage: object) -> list[AccessEntry]:
    assert isinstance(storage, PostgresStorage)
    return [AccessEntry.decode(raw) for _, raw in storage.log_entries()]


# -- init and the server's opening ----------------------------------------------------------


def test_init_with_an_app_role_records_only_the_servers_role_and_the_server_cannot_rewrite_history(
    tmp_path: Path, roles: Roles, env: dict[str, str]
) -> None:
    vault_dir = tmp_path / "vault"
    init(env, vault_dir, roles.owner, "--app-role", roles.app_role)

    # The settings name the server's role; the owner appears nowhere in them.
    recorded = VaultLayout(vault_dir).read()
    assert recorded.database is not None
    assert database_user(recorded.database) == roles.app_role
    assert recorded.app_role == roles.app_role
    assert roles.owner_role not in VaultLayout(vault_dir).vault_file.read_text()

    # The server opens the vault as it would (for_server, then each worker's assemble): with
    # the application's privileges, through connections that cannot touch history.
    unlocked = for_server(unlock_vault(vault_dir, passphrase=PASSPHRASE))
    vault = assemble_vault(unlocked)
    try:
        storage = vault._storage
        assert isinstance(storage, PostgresStorage)
        assert storage.privileges == "app"
        with storage._pool.connection() as conn:
            assert conn.execute("SELECT current_user").fetchone() == (roles.app_role,)
            for statement in (
                "DELETE FROM log_entries",
                "UPDATE records SET payload = payload",
                "TRUNCATE checkpoints",
                "DROP TABLE log_entries",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement.encode())
    finally:
        vault.close()

    # Host commands open the recorded role's way too, and work with it: an ingest, the
    # key-less verification an auditor runs.
    source = tmp_path / "people.jsonl"
    with source.open("wb") as f:
        write_jsonl(f, 20, seed=5)
    host = assemble_vault(unlock_vault(vault_dir, passphrase=PASSPHRASE), host=True)
    try:
        assert host.ingest(host.operator, source, workers=1).accepted > 0
        host.checkpoint(host.operator)
    finally:
        host.close()
    log_key = stored_verifier_key(vault_dir)
    assert log_key is not None
    assert verify_log_files(vault_dir, log_key=log_key).checkpoints > 0
    assert findings(vault_dir) == {}


def test_init_with_a_role_that_could_become_the_owner_leaves_nothing_behind(
    tmp_path: Path, roles: Roles
) -> None:
    for role in (roles.owner_role, "custodes_no_such_role"):
        with pytest.raises(ConfigurationError):
            quick_vault(tmp_path, roles, app_role=role)
        assert not (tmp_path / "vault").exists()
        assert not (tmp_path / "keys").exists()


def test_a_settings_file_edited_to_name_the_owner_stops_the_server_and_doctor_names_it(
    tmp_path: Path, roles: Roles, env: dict[str, str]
) -> None:
    vault_dir = quick_vault(tmp_path, roles, app_role=roles.app_role)
    # An intruder on the host points the server at the owner's role (a password file that
    # holds the owner's would let it connect); the vault still records its app role.
    VaultLayout(vault_dir).record_database(roles.owner, roles.app_role)

    served = custodes(env, "serve", "--vault", str(vault_dir), "--port", str(free_port()))
    assert served.returncode != 0
    assert "could change or remove history" in served.stderr

    found = findings(vault_dir)
    assert list(found) == ["database:owner-role"]
    (message,) = found["database:owner-role"]
    assert message.startswith("high:")
    assert roles.owner_role in message and "settings were changed" in message


def test_a_vault_made_as_the_owner_warns_at_serve_and_is_moved_to_its_own_role_by_database_grant(
    tmp_path: Path, roles: Roles, env: dict[str, str]
) -> None:
    vault_dir = quick_vault(tmp_path, roles, app_role=None)
    assert VaultLayout(vault_dir).read().app_role is None

    code, found = doctor_cli(env, vault_dir)
    assert code == 1 and list(found) == ["database:owner-role"]
    assert "owns the vault's schema" in found["database:owner-role"][0]

    # The server runs as the owner, and says so at its start.
    full = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    port = str(free_port())
    server = subprocess.Popen(
        [sys.executable, "-m", "custodes", "serve", "--vault", str(vault_dir), "--port", port],
        env={**full, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert "serving on" in server.stdout.readline()
    finally:
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=60)
    assert "connects to PostgreSQL as the owner of the vault's schema" in stderr
    assert "custodes database grant" in stderr

    assert grant(env, roles, vault_dir) == ""
    recorded = VaultLayout(vault_dir).read()
    assert recorded.database is not None
    assert database_user(recorded.database) == roles.app_role
    assert recorded.app_role == roles.app_role
    assert roles.owner_role not in VaultLayout(vault_dir).vault_file.read_text()
    assert findings(vault_dir) == {}

    vault = assemble_vault(for_server(unlock_vault(vault_dir, passphrase=PASSPHRASE)))
    try:
        storage = vault._storage
        assert isinstance(storage, PostgresStorage)
        assert storage.privileges == "app"
    finally:
        vault.close()


def test_database_grant_refuses_an_owner_url_naming_another_vaults_schema(
    tmp_path: Path, roles: Roles, env: dict[str, str], postgres_server: str
) -> None:
    vault_dir = quick_vault(tmp_path, roles, app_role=None)
    # Another vault of the same owner, in a schema of its own.
    elsewhere = f"{roles.schema}_b"
    admin = psycopg.connect(postgres_server, autocommit=True)
    try:
        admin.execute(
            sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                sql.Identifier(elsewhere), sql.Identifier(roles.owner_role)
            )
        )
        owner_elsewhere = with_schema(
            psycopg.conninfo.make_conninfo(postgres_server, user=roles.owner_role), elsewhere
        )
        create_vault(
            tmp_path / "other",
            passphrase=PASSPHRASE,
            keyring_path=tmp_path / "other-keys" / "vault.keyring",
            log_key_path=tmp_path / "other-keys" / "log.key",
            kdf=FAST_KDF,
            hash_cost=FAST_HASH,
            database=owner_elsewhere,
        ).close()
        assert "holds another vault" in grant(env, roles, vault_dir, owner_elsewhere)
        (granted,) = admin.execute(
            "SELECT has_schema_privilege(%s, %s, 'USAGE')", (roles.app_role, elsewhere)
        ).fetchone() or (None,)
        assert granted is False
        assert VaultLayout(vault_dir).read().app_role is None
    finally:
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(elsewhere)))
        admin.close()


# -- doctor ---------------------------------------------------------------------------------


def test_doctor_finds_a_server_role_granted_more_than_it_needs_until_granted_again(
    tmp_path: Path, roles: Roles, env: dict[str, str]
) -> None:
    vault_dir = quick_vault(tmp_path, roles, app_role=roles.app_role)
    assert findings(vault_dir) == {}
    # A careless hand widens the server's rights.
    as_owner(roles, f"GRANT DELETE ON log_entries TO {roles.app_role}")
    as_owner(roles, f"GRANT TRUNCATE ON records TO {roles.app_role}")

    found = findings(vault_dir)
    assert list(found) == ["database:grants-too-wide"]
    (message,) = found["database:grants-too-wide"]
    assert message.startswith("high:")
    assert "on log_entries" in message and "on records" in message

    as_owner(roles, f"GRANT CREATE ON SCHEMA {roles.schema} TO {roles.app_role}")
    assert "CREATE on the schema" in findings(vault_dir)["database:grants-too-wide"][0]

    assert grant(env, roles, vault_dir) == ""
    assert findings(vault_dir) == {}


def test_doctor_finds_a_schema_at_another_version_and_the_server_refuses_it(
    tmp_path: Path, roles: Roles
) -> None:
    vault_dir = quick_vault(tmp_path, roles, app_role=roles.app_role)
    recorded = VaultLayout(vault_dir).read()
    assert recorded.database is not None

    def stamp(version: int) -> None:
        as_owner(
            roles,
            f"UPDATE meta SET value = convert_to('{version}', 'UTF8')"
            f" WHERE key = '{SCHEMA_VERSION_KEY}'",
        )

    stamp(SCHEMA_VERSION - 1)
    with pytest.raises(ConfigurationError, match="custodes database grant"):
        PostgresStorage(recorded.database, privileges="app")
    found = findings(vault_dir)
    assert list(found) == ["database:schema-version"]
    assert f"version {SCHEMA_VERSION - 1}" in found["database:schema-version"][0]

    stamp(SCHEMA_VERSION + 1)
    assert "newer than this software" in findings(vault_dir)["database:schema-version"][0]
    stamp(SCHEMA_VERSION)
    assert findings(vault_dir) == {}


def test_doctor_reports_an_unreachable_database_without_failing(tmp_path: Path) -> None:
    layout = VaultLayout(tmp_path / "vault")
    layout.directory.mkdir(mode=0o700)
    nowhere = f"host=127.0.0.1 port={free_port()} user=nobody dbname=vault connect_timeout=2"
    layout.write(secrets.token_bytes(16), tmp_path / "k", tmp_path / "l", nowhere)
    found = [f for f in examine(Deployment(layout.directory)) if f.check.startswith("database:")]
    assert [(f.check, f.severity.value) for f in found] == [("database:unreachable", "high")]


# -- refused attempts -----------------------------------------------------------------------


def test_a_privilege_taken_from_the_servers_role_fails_closed_with_an_alert_on_the_log(
    tmp_path: Path, roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    vault_dir = quick_vault(tmp_path, roles, app_role=roles.app_role)
    source = tmp_path / "people.jsonl"
    with source.open("wb") as f:
        write_jsonl(f, 10, seed=7)
    values = [
        str(doc["national_id"])
        for doc in map(orjson.loads, source.read_bytes().splitlines())
        if "national_id" in doc
    ]
    # The grants change under the server: it may no longer store records.
    as_owner(roles, f"REVOKE INSERT ON records FROM {roles.app_role}")

    vault = assemble_vault(
        unlock_vault(vault_dir, passphrase=PASSPHRASE), host=True, hash_cost=FAST_HASH
    )
    try:
        with (
            caplog.at_level(logging.ERROR, logger="custodes"),
            pytest.raises(DatabaseRefused) as refused,
        ):
            vault.ingest(vault.operator, source, workers=1)
        assert "table records" in str(refused.value)
        assert vault._storage.count_records() == 0

        # On the access log: the batch's entry again, as an error carrying the alert; the
        # dashboard's alerts page shows it.
        logged = entries(vault._storage)
        alerts = [(i, e) for i, e in enumerate(logged) if e.detail.get("alert") == DATABASE_REFUSED]
        # The batch's entry, logged again as an error, and the ingest run's own.
        assert [e.action for _, e in alerts] == ["vault:records:store", "vault:records:ingest"]
        assert all(e.outcome is Outcome.ERROR for _, e in alerts)
        assert entry_row(*alerts[0])["alert"] == DATABASE_REFUSED
    finally:
        vault.close()

    # Logged at ERROR where the database refused, and where the vault raised the alert;
    # naming the table and the action, never a value.
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert {r.name for r in errors} >= {"custodes.storage", "custodes.access"}
    text = "\n".join(r.getMessage() for r in errors) + str(refused.value)
    assert "records" in text and DATABASE_REFUSED in text
    assert not any(value in text for value in values)


def test_a_refused_append_to_the_access_log_refuses_the_access_and_is_logged(
    tmp_path: Path, roles: Roles, caplog: pytest.LogCaptureFixture
) -> None:
    vault_dir = quick_vault(tmp_path, roles, app_role=roles.app_role)
    vault = assemble_vault(
        unlock_vault(vault_dir, passphrase=PASSPHRASE), host=True, hash_cost=FAST_HASH
    )
    try:
        before = vault._storage.log_size()
        as_owner(roles, f"REVOKE INSERT ON log_entries FROM {roles.app_role}")
        with (
            caplog.at_level(logging.ERROR, logger="custodes"),
            pytest.raises(AuditUnavailable),
        ):
            vault.checkpoint(vault.operator)
        assert vault._storage.log_size() == before
    finally:
        vault.close()
    refusals = [r.getMessage() for r in caplog.records if r.name == "custodes.storage"]
    assert any("table log_entries" in message for message in refusals)
