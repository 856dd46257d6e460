"""Least privilege in PostgreSQL: a server connects as a role that can append history and
read it, but never rewrite, remove, truncate or drop it, nor change the schema; only the
schema's owner migrates, and the owner's powers are never the server's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import pytest

from custodes.errors import ConfigurationError
from custodes.storage import PostgresStorage
from custodes.storage.base import AlertRow, LoginCounts
from custodes.storage.postgres import SCHEMA_VERSION, grant_app_role
from tests.contract.accounts_contract import account, session_key, session_row
from tests.contract.log_contract import SUBJECT_A, entry, log_batch, node_hash
from tests.contract.records_contract import sealed, stored
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    PgCluster,
    pg_cluster_fixture,
    with_schema,
)

pytestmark = pytest.mark.postgres

OWNER = "vault_owner"
APP = "vault_app"
SCHEMA = "vault"

# Every table whose rows are history, with a column to try to rewrite. checkpoints' note
# is left out on purpose: a later note for a size replaces the stored one (cosignatures).
HISTORY = {
    "records": "record_type",
    "data_keys": "wrapped",
    "tokens": "seq",
    "log_entries": "entry",
    "log_nodes": "hash",
    "log_subjects": "idx",
    "log_details": "blob",
    "log_head": "one",
    "checkpoints": "size",
}


@dataclass(frozen=True)
class Deployment:
    """One cluster with a schema owned by OWNER, and APP, a plain login role."""

    admin: str  # the cluster's superuser, for the test's own look at the schema
    owner: str
    app: str


@pytest.fixture
def deployment(pg_cluster: Callable[..., PgCluster]) -> Deployment:
    cluster = pg_cluster()
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {OWNER} LOGIN NOSUPERUSER")
        admin.execute(f"CREATE ROLE {APP} LOGIN NOSUPERUSER")
        admin.execute(f"CREATE SCHEMA {SCHEMA} AUTHORIZATION {OWNER}")
    return Deployment(
        admin=with_schema(cluster.dsn(), SCHEMA),
        owner=with_schema(cluster.dsn(user=OWNER), SCHEMA),
        app=with_schema(cluster.dsn(user=APP), SCHEMA),
    )


def tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = %s ORDER BY 1",
            (SCHEMA,),
        ).fetchall()
    return [str(name) for (name,) in rows]


def fill(storage: PostgresStorage) -> None:
    """A little of everything history holds."""
    storage.write_batch([sealed(n) for n in range(5)])
    storage.log_append(log_batch(0, 3, subjects=((SUBJECT_A, 1),), details=((1, b"sealed"),)))
    storage.put_checkpoint(3, b"note 3")


def test_the_server_runs_its_whole_flow_as_the_least_privileged_role(
    deployment: Deployment,
) -> None:
    grant_app_role(deployment.owner, APP)
    storage = PostgresStorage(deployment.app, privileges="app")
    try:
        # Records: a batch written, read back, searched, paged; a batch again adds nothing.
        batch = [sealed(n) for n in range(10)]
        assert storage.write_batch(batch).inserted == 10
        assert storage.write_batch(batch[:3]).already_present == 3
        assert storage.get_records([r.record_id for r in batch]) == {
            r.record_id: stored(r) for r in batch
        }
        assert storage.find(1, 1003, 5) == ["rec-000003"]
        assert storage.count_records() == 10
        assert [rid for _, rid, _ in storage.record_tokens(0, 100)] == [r.record_id for r in batch]

        # The access log: appended to, read, and checkpointed; a checkpoint replaced.
        storage.log_append(log_batch(0, 3, subjects=((SUBJECT_A, 1),), details=((1, b"d1"),)))
        storage.log_append(log_batch(3, 2))
        assert list(storage.log_entries()) == [(i, entry(i)) for i in range(5)]
        assert storage.log_node(2, 0) == node_hash(2, 0)
        assert storage.log_subject_entries(SUBJECT_A) == [1]
        assert list(storage.log_subject_rows()) == [(1, SUBJECT_A)]
        assert storage.log_detail(1) == b"d1"
        storage.put_checkpoint(5, b"note 5")
        storage.put_checkpoint(5, b"note 5 cosigned")
        assert storage.checkpoints() == [(5, b"note 5 cosigned")]

        # Metadata, stored and replaced.
        storage.set_meta("log_verifier_key", b"first")
        storage.set_meta("log_verifier_key", b"second")
        assert storage.get_meta("log_verifier_key") == b"second"

        # Accounts: added, changed, swapped by compare-and-swap, listed.
        storage.add_account(account())
        changed = account(role="supervisor")
        storage.update_account(changed)
        assert storage.replace_account(changed, account(disabled=True))
        assert storage.get_account("inspector.ode") == account(disabled=True)
        assert storage.list_accounts() == [account(disabled=True)]

        # Sessions: issued, touched, ended one by one, by account, and purged.
        storage.put_session(session_row(b"a"))
        storage.put_session(session_row(b"b"))
        storage.put_session(session_row(b"c", username="auditor.li", expires=2.0))
        storage.touch_session(session_key(b"a"), 5.0)
        assert storage.get_session(session_key(b"a")) == session_row(b"a", last_seen=5.0)
        assert storage.end_session(session_key(b"a"))
        assert storage.purge_sessions(now=3.0, idle=100.0) == 1
        assert storage.count_sessions() == 1
        assert [s.key for s in storage.list_sessions()] == [session_key(b"b")]
        assert storage.end_sessions("inspector.ode") == 1

        # Login throttling: counted under a lock, forgiven, cleared, purged.
        def admit_all(counts: LoginCounts) -> bool:
            return True

        assert storage.admit_login_attempt(["user:x", "addr:y"], 10.0, admit_all)
        assert storage.admit_login_attempt(["user:x"], 11.0, admit_all)
        assert storage.login_failures(["user:x", "addr:y"]) == {
            "user:x": (2, 11.0),
            "addr:y": (1, 10.0),
        }
        storage.forgive_login_attempt("user:x")
        storage.clear_login_failures("addr:y")
        assert storage.login_failures(["user:x", "addr:y"]) == {"user:x": (1, 11.0)}
        assert storage.purge_login_failures(before=12.0) == 1
        assert storage.login_failures(["user:x"]) == {}

        # One-time marks: spent once; an expired one is removed by the next spend.
        assert storage.spend(session_key(b"code 1"), now=100.0, keep=30.0)
        assert not storage.spend(session_key(b"code 1"), now=110.0, keep=30.0)
        assert storage.spend(session_key(b"code 2"), now=200.0, keep=30.0)
        assert storage.spend(session_key(b"code 1"), now=200.0, keep=30.0)

        # Usage: counters charged; distinct subjects noted, moved on to a later window,
        # and the earlier window's others forgotten.
        assert storage.charge_usage("inspector.ode", [("views/60", 60, 2)]) == [2]
        assert storage.note_subjects("inspector.ode", "subjects/86400", 0, ["r1", "r2"]) == 2
        assert storage.note_subjects("inspector.ode", "subjects/86400", 86400, ["r1"]) == 1

        # Alerts: raised, stepped on by compare-and-swap, listed.
        raised = AlertRow("alert-1", 1.0, b"{}")
        assert storage.put_alert(raised)
        assert storage.replace_alert(raised, AlertRow("alert-1", 1.0, b'{"s":1}'))
        assert [a.alert_id for a in storage.list_alerts(5)] == ["alert-1"]
    finally:
        storage.close()


def test_the_servers_own_credentials_cannot_delete_update_truncate_or_drop_history(
    deployment: Deployment,
) -> None:
    grant_app_role(deployment.owner, APP)
    storage = PostgresStorage(deployment.app, privileges="app")
    try:
        fill(storage)
        statements = [
            statement
            for table, column in HISTORY.items()
            for statement in (
                f"DELETE FROM {table}",
                f"UPDATE {table} SET {column} = {column}",
                f"TRUNCATE {table}",
                f"TRUNCATE {table} CASCADE",
                f"DROP TABLE {table}",
                f"DROP TABLE {table} CASCADE",
                f"ALTER TABLE {table} RENAME TO {table}_old",
                f"ALTER TABLE {table} OWNER TO {APP}",
                f"ALTER TABLE {table} DISABLE TRIGGER ALL",
            )
        ] + [
            # Erasing sealed details is the owner's act, not the server's.
            "UPDATE log_details SET blob = NULL",
            "INSERT INTO log_entries(idx, entry) VALUES (0, '\\x00')"
            " ON CONFLICT(idx) DO UPDATE SET entry = excluded.entry",
            "INSERT INTO records(record_id, seq, record_type, payload)"
            " VALUES ('rec-000000', 1, 't', '\\x00')"
            " ON CONFLICT(record_id) DO UPDATE SET payload = excluded.payload",
            "ALTER TABLE log_entries DISABLE TRIGGER log_entries_no_change",
            "DROP TRIGGER log_entries_no_change ON log_entries",
            "CREATE OR REPLACE FUNCTION log_refuse_change() RETURNS trigger"
            " LANGUAGE plpgsql AS $$ BEGIN RETURN OLD; END $$",
            "DROP FUNCTION log_refuse_change() CASCADE",
            f"CREATE TABLE {SCHEMA}.planted(a int)",
            f"CREATE FUNCTION {SCHEMA}.planted() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            f"CREATE VIEW {SCHEMA}.log_view AS SELECT 1",
            f"DROP SCHEMA {SCHEMA} CASCADE",
            f"ALTER SCHEMA {SCHEMA} RENAME TO moved",
            "SELECT setval('record_seq', 1)",
            "ALTER SEQUENCE record_seq RESTART",
            "DELETE FROM meta",
            "UPDATE meta SET key = 'renamed'",
            f"SET ROLE {OWNER}",
            f"GRANT {OWNER} TO {APP}",
        ]
        with psycopg.connect(deployment.app, autocommit=True) as attacker:
            for statement in statements:
                with pytest.raises(
                    (psycopg.errors.InsufficientPrivilege, psycopg.errors.RaiseException)
                ) as refused:
                    attacker.execute(statement.encode())
                if isinstance(refused.value, psycopg.errors.RaiseException):
                    # Only the append-only triggers may be what stopped it.
                    assert "append-only" in str(refused.value), statement
                assert attacker.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

        # Nothing moved: every table there, every row as it was, and the log still grows.
        assert "planted" not in tables(deployment.admin)
        assert set(HISTORY) <= set(tables(deployment.admin))
        assert storage.get_records(["rec-000000"]) == {"rec-000000": stored(sealed(0))}
        assert storage.count_records() == 5
        assert list(storage.log_entries()) == [(i, entry(i)) for i in range(3)]
        assert storage.log_subject_entries(SUBJECT_A) == [1]
        assert storage.log_detail(1) == b"sealed"
        assert storage.checkpoints() == [(3, b"note 3")]
        storage.log_append(log_batch(3, 1))
        assert storage.log_size() == 4
        assert storage.write_batch([sealed(5)]).inserted == 1
    finally:
        storage.close()


def test_the_servers_role_cannot_migrate_an_unmigrated_schema(deployment: Deployment) -> None:
    # The owner let the server's role into the schema, but never ran the migration.
    with psycopg.connect(deployment.owner, autocommit=True) as owner:
        owner.execute(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {APP}")
    with pytest.raises(ConfigurationError, match="run the migration as the schema's owner"):
        PostgresStorage(deployment.app, privileges="app")
    assert tables(deployment.admin) == []

    # Migrated by the owner, but never granted: refused as plainly, still without DDL.
    PostgresStorage(deployment.owner).close()
    with pytest.raises(ConfigurationError, match="not been granted"):
        PostgresStorage(deployment.app, privileges="app")

    grant_app_role(deployment.owner, APP)
    PostgresStorage(deployment.app, privileges="app").close()
    with psycopg.connect(deployment.admin, autocommit=True) as admin:
        (version,) = admin.execute(
            "SELECT convert_from(value, 'UTF8') FROM meta WHERE key = 'storage.schema_version'"
        ).fetchone() or (None,)
    assert version == str(SCHEMA_VERSION)


def test_the_owners_credentials_are_refused_where_the_servers_are_expected(
    deployment: Deployment,
) -> None:
    # A server configured for least privilege but handed the owner's DSN would hold the
    # power to rewrite history: it refuses to run with it.
    grant_app_role(deployment.owner, APP)
    with pytest.raises(ConfigurationError, match="could change or remove history"):
        PostgresStorage(deployment.owner, privileges="app")
    with pytest.raises(ConfigurationError, match="could change or remove history"):
        PostgresStorage(deployment.admin, privileges="app")


@pytest.mark.parametrize(
    "attributes",
    ["SUPERUSER", "CREATEROLE", f"IN ROLE {OWNER}"],
)
def test_a_server_role_that_could_become_the_owner_is_refused_its_grants(
    deployment: Deployment, attributes: str
) -> None:
    with psycopg.connect(deployment.admin, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE strong_app LOGIN {attributes}")
    with pytest.raises(ConfigurationError, match="plain role of its own"):
        grant_app_role(deployment.owner, "strong_app")
    with pytest.raises(ConfigurationError, match="plain role of its own"):
        grant_app_role(deployment.owner, OWNER)
    with pytest.raises(ConfigurationError, match="does not exist"):
        grant_app_role(deployment.owner, "nobody_here")


def test_granting_again_after_a_wider_grant_leaves_only_what_the_server_needs(
    deployment: Deployment,
) -> None:
    grant_app_role(deployment.owner, APP)
    # A careless operator widens the server's rights by hand; granting again takes them back.
    with psycopg.connect(deployment.owner, autocommit=True) as owner:
        owner.execute(f"GRANT ALL ON ALL TABLES IN SCHEMA {SCHEMA} TO {APP}")
        owner.execute(f"GRANT CREATE ON SCHEMA {SCHEMA} TO {APP}")
    with pytest.raises(ConfigurationError, match="could change or remove history"):
        PostgresStorage(deployment.app, privileges="app")
    grant_app_role(deployment.owner, APP)
    storage = PostgresStorage(deployment.app, privileges="app")
    try:
        fill(storage)
        with (
            psycopg.connect(deployment.app, autocommit=True) as attacker,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            attacker.execute("DELETE FROM records")
        assert storage.count_records() == 5
    finally:
        storage.close()
