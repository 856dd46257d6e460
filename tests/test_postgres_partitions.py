"""The big PostgreSQL tables are hash-partitioned: a search reads one partition of the
tokens, the server's role reaches partitions only through their parent, and a vault made
before the tables were partitioned still opens, works, and is named by doctor."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from custodes.bootstrap import create_vault
from custodes.doctor import Deployment, examine
from custodes.errors import ConfigurationError
from custodes.storage import PostgresStorage
from custodes.storage.base import Rekeyed
from custodes.storage.postgres import (
    _MIGRATIONS,
    DEFAULT_PARTITIONS,
    FIND_RECORDS_SQL,
    FIND_SQL,
    GET_RECORDS_SQL,
    SCHEMA_VERSION_KEY,
    role_standing,
)
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE
from tests.contract.records_contract import NAME_INDEX, sealed, stored
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    postgres_dsn_fixture,
    postgres_server_fixture,
)
from tests.test_cli_client import run

pytestmark = pytest.mark.postgres


@pytest.fixture
def dsn(postgres_dsn: Callable[[], str]) -> str:
    return postgres_dsn()


@pytest.fixture
def storage(dsn: str) -> Iterator[PostgresStorage]:
    backend = PostgresStorage(dsn)
    yield backend
    backend.close()


def partitions_of(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT p.relname::text, count(*) FROM pg_inherits AS i"
            " JOIN pg_class AS p ON p.oid = i.inhparent"
            " WHERE p.relnamespace = current_schema()::regnamespace AND p.relkind = 'p'"
            " GROUP BY 1"
        ).fetchall()
    return {str(name): int(n) for name, n in rows}


def executed_scans(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """(node type, relation) of every scan the executor ran, pruned ones left out."""
    found: list[tuple[str, str]] = []
    if "Relation Name" in plan and plan.get("Actual Loops", 0) > 0:
        found.append((str(plan["Node Type"]), str(plan["Relation Name"])))
    for child in plan.get("Plans", []):
        found.extend(executed_scans(child))
    return found


def test_the_big_tables_are_hash_partitioned_by_default(storage: PostgresStorage, dsn: str) -> None:
    assert partitions_of(dsn) == {
        "records": DEFAULT_PARTITIONS,
        "data_keys": DEFAULT_PARTITIONS,
        "tokens": DEFAULT_PARTITIONS,
    }
    standing = role_standing(dsn)
    assert standing.partitions == DEFAULT_PARTITIONS and not standing.unpartitioned


def test_the_partition_count_is_chosen_at_creation_and_kept(dsn: str) -> None:
    PostgresStorage(dsn, partitions=4).close()
    # A later open asking for another count changes nothing: the schema holds its own.
    again = PostgresStorage(dsn, partitions=64)
    try:
        assert partitions_of(dsn) == {"records": 4, "data_keys": 4, "tokens": 4}
        assert again.write_batch([sealed(n) for n in range(40)]).inserted == 40
        assert again.find(NAME_INDEX, 1007, 5) == ["rec-000007"]
    finally:
        again.close()
    for wrong in (0, -1, 1025):
        with pytest.raises(ConfigurationError):
            PostgresStorage(dsn, partitions=wrong)


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
@pytest.mark.parametrize("query", [FIND_SQL, FIND_RECORDS_SQL], ids=["find", "find_records"])
def test_a_token_lookup_scans_exactly_one_partition_of_the_tokens(
    storage: PostgresStorage, dsn: str, plan_mode: str, query: str
) -> None:
    # Two hundred records, their tokens spread over every partition; the searched token
    # carries three records.
    batch = [sealed(n) for n in range(200)]
    batch += [sealed(n, tokens=((NAME_INDEX, 424242),)) for n in range(200, 203)]
    assert storage.write_batch(batch).inserted == 203
    assert len(storage.find(NAME_INDEX, 424242, 10)) == 3

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('plan_cache_mode', %s, false)", (plan_mode,))
        # The storage's own statement, prepared and run as the server runs it: under a
        # generic plan the partition is pruned at execution, not at planning.
        conn.execute(
            "PREPARE lookup(bigint, bigint, bigint) AS "
            + query.replace("%s", "$1", 1).replace("%s", "$2", 1).replace("%s", "$3", 1)
        )
        (raw,) = conn.execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE lookup(424242, {NAME_INDEX}, 10)"
        ).fetchone() or (None,)
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    tokens = [(node, rel) for node, rel in executed_scans(plan) if rel.startswith("tokens")]
    assert len(tokens) == 1, tokens
    node, relation = tokens[0]
    assert relation.startswith("tokens_p")
    # One probe of that partition's primary key, not a scan of its rows.
    assert node in ("Index Scan", "Index Only Scan"), node
    if query == FIND_RECORDS_SQL:
        # Each record found and its data key: one probe of its own partition, never a
        # join over every partition (which tables of any size may get, their statistics
        # not yet gathered).
        assert probes(plan, "records_p") == 3 and probes(plan, "data_keys_p") == 3


def probes(plan: dict[str, Any], prefix: str) -> int:
    """How many times the executor ran a scan of a partition named `prefix`..."""
    own = 0
    if str(plan.get("Relation Name", "")).startswith(prefix):
        own = int(plan.get("Actual Loops", 0))
    return own + sum(probes(child, prefix) for child in plan.get("Plans", []))


@pytest.mark.parametrize("plan_mode", ["force_custom_plan", "force_generic_plan"])
def test_reading_a_batch_of_ids_probes_each_id_in_its_own_partition_only(
    storage: PostgresStorage, dsn: str, plan_mode: str
) -> None:
    # An ingest holds each batch of thousands of ids against what is stored. Asked as
    # `record_id = ANY(ids)`, every partition was probed with every id: 16 probes an id.
    assert storage.write_batch([sealed(n) for n in range(60)]).inserted == 60
    ids = [f"rec-{n:06d}" for n in range(0, 60, 2)] + [f"absent-{n}" for n in range(10)]
    assert set(storage.get_records(ids)) == {f"rec-{n:06d}" for n in range(0, 60, 2)}

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT set_config('plan_cache_mode', %s, false)", (plan_mode,))
        conn.execute("PREPARE batch(text[]) AS " + GET_RECORDS_SQL.replace("%s", "$1"))
        # The ids are letters, digits and dashes: an array literal needs no quoting.
        literal = "{" + ",".join(ids) + "}"
        (raw,) = conn.execute(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE batch('{literal}')"
        ).fetchone() or (None,)
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    # One probe of one records partition an id asked, one of a data_keys partition an id
    # found: not one of every partition.
    assert probes(plan, "records_p") == len(ids)
    assert probes(plan, "data_keys_p") == 30


def test_the_servers_role_cannot_reach_a_partition_around_its_parent(
    postgres_server: str, dsn: str
) -> None:
    from custodes.storage.postgres import grant_app_role

    schema = str(psycopg.conninfo.conninfo_to_dict(dsn)["options"]).split("=", 1)[1]
    role = f"custodes_part_{schema[-12:]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
    try:
        grant_app_role(dsn, role)
        app = psycopg.conninfo.make_conninfo(dsn, user=role)
        storage = PostgresStorage(app, privileges="app")
        try:
            assert storage.write_batch([sealed(n) for n in range(20)]).inserted == 20
            assert storage.find_records(NAME_INDEX, 1003, 5) == [stored(sealed(3))]
        finally:
            storage.close()
        with psycopg.connect(app, autocommit=True) as attacker:
            for statement in (
                "SELECT count(*) FROM tokens_p000",
                "SELECT count(*) FROM records_p001",
                "INSERT INTO data_keys_p002(record_id, kek_version, wrapped)"
                " VALUES ('x', 1, '\\x00')",
                "DELETE FROM tokens_p003",
                "UPDATE data_keys_p004 SET wrapped = wrapped",
                "TRUNCATE records_p005",
                "ALTER TABLE tokens DETACH PARTITION tokens_p006",
                "DROP TABLE tokens_p007",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    attacker.execute(statement.encode())
        assert role_standing(app).rewrites == ()
        # A careless grant on a single partition is held against the role as on its table.
        with psycopg.connect(dsn, autocommit=True) as owner:
            owner.execute(f"GRANT DELETE ON tokens_p003 TO {role}")
        assert role_standing(app).rewrites == ("tokens_p003",)
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def previous_version_vault(dsn: str, count: int) -> None:
    """A schema as the version before partitioning left it: migrations 1 to 4, holding
    `count` records written with that version's statements."""
    with psycopg.connect(dsn, autocommit=True) as conn, conn.transaction():
        for script in _MIGRATIONS[:4]:
            conn.execute(script.encode())
        conn.execute("INSERT INTO meta(key, value) VALUES (%s, %s)", (SCHEMA_VERSION_KEY, b"4"))
        for n in range(count):
            record = sealed(n)
            (seq,) = conn.execute("SELECT nextval('record_seq')").fetchone() or (0,)
            conn.execute(
                "INSERT INTO records(record_id, seq, record_type, payload) VALUES (%s, %s, %s, %s)",
                (record.record_id, seq, record.record_type, record.payload),
            )
            conn.execute(
                "INSERT INTO data_keys(record_id, kek_version, wrapped) VALUES (%s, %s, %s)",
                (record.record_id, record.kek_version, record.wrapped_key),
            )
            for index_id, token in record.tokens:
                conn.execute(
                    "INSERT INTO tokens(token, index_id, record_id, seq) VALUES (%s, %s, %s, %s)",
                    (token, index_id, record.record_id, seq),
                )


def test_a_vault_of_the_previous_unpartitioned_layout_opens_and_works(dsn: str) -> None:
    previous_version_vault(dsn, 10)
    storage = PostgresStorage(dsn)
    try:
        # Migrated to this version, its tables left as they were, and said so.
        assert partitions_of(dsn) == {}
        standing = role_standing(dsn)
        assert standing.version == standing.expected_version
        assert standing.unpartitioned and standing.partitions is None

        assert storage.find(NAME_INDEX, 1004, 5) == ["rec-000004"]
        assert storage.find_records(NAME_INDEX, 1004, 5) == [stored(sealed(4))]
        assert storage.write_batch([sealed(n) for n in range(5, 15)]).inserted == 5
        assert storage.find(NAME_INDEX, 1012, 5) == ["rec-000012"]
        assert [rid for _, rid, _ in storage.record_tokens(0, 100)] == [
            f"rec-{n:06d}" for n in range(15)
        ]
        assert len(storage.records_page(0, 100)) == 15
        assert storage.erase_records(["rec-000004"]) == 1
        assert storage.find(NAME_INDEX, 1004, 5) == []
        census = storage.key_census()
        assert sum(census.kek_versions.values()) == 14
        # A rotation: a record rewrapped and given a token under a new index version,
        # then the old version's tokens retired.
        record = sealed(5)
        assert (
            storage.rekey_records(
                [Rekeyed(record.record_id, record.wrapped_key, 2, b"rewrapped", None, ((9, 5005),))]
            )
            == 1
        )
        assert storage.find_records(9, 5005, 5) == [
            stored(record)._replace(kek_version=2, wrapped_key=b"rewrapped")
        ]
        assert storage.drop_tokens([NAME_INDEX]) == 14
        assert storage.find(NAME_INDEX, 1012, 5) == []
        assert storage.key_census().token_index_ids[9] == 1
    finally:
        storage.close()


def test_doctor_says_a_vault_of_the_previous_layout_is_unpartitioned(
    tmp_path: Path, dsn: str
) -> None:
    previous_version_vault(dsn, 3)
    create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=dsn,
    ).close()
    found = [
        f
        for f in examine(Deployment(tmp_path / "vault", listeners=list))
        if f.check.startswith("database:")
    ]
    unpartitioned = [f for f in found if f.check == "database:unpartitioned"]
    assert len(unpartitioned) == 1 and unpartitioned[0].severity == "low"
    assert "plain tables" in unpartitioned[0].message


def test_doctor_says_nothing_of_partitions_for_a_vault_made_now(tmp_path: Path, dsn: str) -> None:
    create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=dsn,
    ).close()
    checks = {f.check for f in examine(Deployment(tmp_path / "vault", listeners=list))}
    assert "database:unpartitioned" not in checks


def test_a_vault_is_made_with_the_partition_count_it_is_given(tmp_path: Path, dsn: str) -> None:
    create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=dsn,
        partitions=4,
    ).close()
    assert partitions_of(dsn) == {"records": 4, "data_keys": 4, "tokens": 4}


def test_partitions_without_a_database_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="PostgreSQL"):
        create_vault(
            tmp_path / "vault",
            passphrase=PASSPHRASE,
            keyring_path=tmp_path / "keys" / "vault.keyring",
            log_key_path=tmp_path / "keys" / "log.key",
            kdf=FAST_KDF,
            hash_cost=FAST_HASH,
            partitions=4,
        )
    done = run(
        "init",
        str(tmp_path / "other"),
        "--partitions",
        "4",
        env={"CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE},
    )
    assert done.returncode == 2 and "--partitions goes with --database" in done.stderr
