"""Reads from streaming replicas: records and tokens are read from a replica within the lag
bound, never written there; a replica that lags beyond the bound serves no read, and one
that catches up serves again. Counted where the reads land: each replica's own
pg_stat_statements, and its server log for any statement it refused."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import psycopg
import pytest

from custodes.bootstrap import create_vault, open_vault
from custodes.doctor import Deployment, examine
from custodes.policy.budgets import NO_LIMITS
from custodes.settings import VaultLayout
from custodes.storage import PostgresStorage, SealedRecord
from custodes.synth import write_jsonl
from custodes.vault import Vault
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login
from tests.postgres import (  # noqa: F401 - a fixture, by name
    PgCluster,
    _free_port,
    pg_cluster_fixture,
)
from tests.replication import replay_lsn, replica_of

STATEMENTS = {"shared_preload_libraries": "pg_stat_statements"}
# How long a test waits for replication or the watch to move before it fails: never a
# figure asserted on, only a bound on a hung test.
PATIENCE = 30.0


@pytest.fixture(name="primary")
def primary_fixture(pg_cluster: Callable[..., PgCluster]) -> PgCluster:
    primary = pg_cluster(STATEMENTS)
    with psycopg.connect(primary.dsn(), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
    return primary


@pytest.fixture(name="replica")
def replica_fixture(primary: PgCluster) -> Iterator[PgCluster]:
    with replica_of(primary) as replica:
        yield replica


def statements_on(cluster: PgCluster) -> list[tuple[str, int]]:
    """Every statement the cluster ran to completion (normalised) and how many times."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT query, calls FROM pg_stat_statements").fetchall()
    return [(str(query), int(calls)) for query, calls in rows]


def token_reads(cluster: PgCluster) -> int:
    """How many reads of the token index the cluster served."""
    return sum(calls for query, calls in statements_on(cluster) if "FROM tokens" in query)


def people(tmp_path: Path, count: int, seed: int) -> tuple[Path, list[str]]:
    source = tmp_path / f"people-{seed}.jsonl"
    with source.open("wb") as f:
        write_jsonl(f, count, seed=seed)
    ids = [
        str(doc["national_id"])
        for doc in map(orjson.loads, source.read_bytes().splitlines())
        if doc.get("type", "person") == "person" and "national_id" in doc
    ]
    return source, ids


def made_vault(tmp_path: Path, primary: PgCluster, replica: PgCluster, max_lag: float) -> Path:
    directory = tmp_path / "vault"
    vault = create_vault(
        directory,
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=primary.dsn(),
        replicas=[replica.dsn()],
        replica_max_lag=max_lag,
    )
    vault.close()
    recorded = VaultLayout(directory).read()
    assert recorded.replicas == (replica.dsn(),) and recorded.replica_max_lag == max_lag
    return directory


def opened(directory: Path) -> Vault:
    return open_vault(directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)


def search(vault: Vault, session: object, national_id: str) -> int:
    return len(
        vault.search(
            session,  # type: ignore[arg-type]
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": national_id},
        )
    )


def served_after_a_search(
    vault: Vault, session: object, national_id: str, replica: PgCluster
) -> int:
    """Search once; how many token reads the replica has served by then."""
    search(vault, session, national_id)
    return token_reads(replica)


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {PATIENCE:g} s")
        time.sleep(0.05)


def test_searches_read_from_the_replica_and_nothing_is_written_there(
    tmp_path: Path, primary: PgCluster, replica: PgCluster
) -> None:
    directory = made_vault(tmp_path, primary, replica, max_lag=5.0)
    source, ids = people(tmp_path, 60, seed=31)
    vault = opened(directory)
    try:
        assert vault.ingest(vault.operator, source, workers=1).rejected == 0
        session = login(vault, budget=NO_LIMITS)
        # The ingest fenced this process's reads to the primary until the replica has
        # replayed past it; then searches go to the replica.
        until(lambda: served_after_a_search(vault, session, ids[0], replica) > 0, "a replica read")
        before = token_reads(replica)
        for national_id in ids[:20]:
            assert search(vault, session, national_id) == 1
        served = token_reads(replica) - before
    finally:
        vault.close()
    assert served >= 20
    # No statement that writes ran on the replica, and none was refused there: it was
    # never sent one (a standby refuses a write with "read-only transaction").
    ran = [query for query, _ in statements_on(replica)]
    assert ran and all(query.lstrip().upper().startswith("SELECT") for query in ran), ran
    assert "read-only transaction" not in replica.log_file.read_text(errors="replace")


def test_a_replica_lagging_beyond_the_bound_serves_no_read_until_it_catches_up(
    tmp_path: Path, primary: PgCluster, replica: PgCluster
) -> None:
    directory = made_vault(tmp_path, primary, replica, max_lag=0.5)
    first, first_ids = people(tmp_path, 30, seed=41)
    later, later_ids = people(tmp_path, 30, seed=43)
    reader = opened(directory)
    try:
        assert reader.ingest(reader.operator, first, workers=1).rejected == 0
        session = login(reader, budget=NO_LIMITS)
        until(
            lambda: served_after_a_search(reader, session, first_ids[0], replica) > 0,
            "a replica read",
        )

        with psycopg.connect(replica.dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_wal_replay_pause()")
            # Another process writes new people on the primary; the replica has not
            # replayed them, and falls behind the bound as time passes.
            writer = opened(directory)
            try:
                assert writer.ingest(writer.operator, later, workers=1).rejected == 0
            finally:
                writer.close()

            def passed_over() -> bool:
                seen = token_reads(replica)
                search(reader, session, first_ids[1])
                return token_reads(replica) == seen

            until(passed_over, "the primary taking the reads of a lagging replica")
            held = token_reads(replica)
            # Every newly written person is found: read from the primary, none from the
            # replica that does not hold them yet.
            for national_id in later_ids[:10]:
                assert search(reader, session, national_id) == 1
            assert token_reads(replica) == held

            admin.execute("SELECT pg_wal_replay_resume()")
        until(
            lambda: served_after_a_search(reader, session, later_ids[0], replica) > held,
            "the replica serving again once caught up",
        )
    finally:
        reader.close()


def sealed(n: int) -> SealedRecord:
    return SealedRecord(
        record_id=f"rec-{n:06d}",
        record_type="person",
        payload=b"sealed:" + n.to_bytes(4, "big") * 8,
        kek_version=1,
        wrapped_key=b"wrapped:" + n.to_bytes(4, "big"),
        tokens=((1, 1000 + n),),
    )


def test_a_read_right_after_a_write_is_the_primarys_and_the_storage_counts_both(
    primary: PgCluster, replica: PgCluster
) -> None:
    storage = PostgresStorage(primary.dsn(), replicas=[replica.dsn()], replica_max_lag=5.0)
    try:
        storage.write_batch([sealed(1)])
        until(lambda: bool(storage.find(1, 1001, 5)) and storage.read_routing().replica > 0, "")
        for n in range(2, 12):
            storage.write_batch([sealed(n)])
            # This process wrote it a moment ago: the replica may not hold it yet, so the
            # read goes to the primary, and finds it.
            before = storage.read_routing()
            assert [r.record_id for r in storage.find_records(1, 1000 + n, 5)] == [f"rec-{n:06d}"]
            after = storage.read_routing()
            assert (after.primary, after.replica) == (before.primary + 1, before.replica)
    finally:
        storage.close()


def test_a_replica_that_is_down_leaves_every_read_to_the_primary(
    primary: PgCluster, replica: PgCluster
) -> None:
    storage = PostgresStorage(primary.dsn(), replicas=[replica.dsn()], replica_max_lag=5.0)
    try:
        storage.write_batch([sealed(1)])
        until(lambda: bool(storage.find(1, 1001, 5)) and storage.read_routing().replica > 0, "")
        replica.stop()
        for _ in range(20):
            assert storage.find(1, 1001, 5) == ["rec-000001"]
        # Reads the stopped replica failed went to the primary at once; once the watch
        # saw it gone, none was tried there.
        routed = storage.read_routing()
        for _ in range(20):
            assert storage.find(1, 1001, 5) == ["rec-000001"]
        assert storage.read_routing().replica == routed.replica
    finally:
        storage.close()


def test_a_standby_of_another_cluster_is_never_read_from(
    primary: PgCluster, replica: PgCluster, pg_cluster: Callable[..., PgCluster]
) -> None:
    # Another vault's cluster, its standby holding another record under the same token:
    # a wrong replica URL must not answer this vault's reads with it.
    other = pg_cluster()
    elsewhere = PostgresStorage(other.dsn())
    try:
        elsewhere.write_batch([sealed(1)._replace(record_id="rec-elsewhere")])
    finally:
        elsewhere.close()
    # Its WAL well ahead of this vault's: by positions alone, it would look caught up.
    with psycopg.connect(other.dsn(), autocommit=True) as conn:
        for n in range(4):
            conn.execute(f"CREATE TABLE wal_{n}()")
            conn.execute("SELECT pg_switch_wal()")
    with replica_of(other) as foreign:
        until(lambda: replay_lsn(foreign) > 0, "the foreign standby replaying")
        storage = PostgresStorage(
            primary.dsn(), replicas=[foreign.dsn(), replica.dsn()], replica_max_lag=5.0
        )
        try:
            storage.write_batch([sealed(1)])
            # The watch has looked at both once the right replica serves.
            until(lambda: bool(storage.find(1, 1001, 5)) and storage.read_routing().replica > 0, "")
            for _ in range(40):
                assert storage.find(1, 1001, 5) == ["rec-000001"]
        finally:
            storage.close()


def test_doctor_names_a_replica_that_is_down_a_primary_or_of_another_cluster(
    tmp_path: Path,
    primary: PgCluster,
    replica: PgCluster,
    pg_cluster: Callable[..., PgCluster],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = made_vault(tmp_path, primary, replica, max_lag=1.0)
    assert not [f for f in examine(Deployment(vault_dir=directory)) if "replica" in f.check]
    other = pg_cluster()
    with replica_of(other) as foreign:
        down = psycopg.conninfo.make_conninfo(replica.dsn(), port=_free_port())
        monkeypatch.setenv(
            "CUSTODES_REPLICAS", "; ".join([replica.dsn(), primary.dsn(), foreign.dsn(), down])
        )
        found = {
            f.check: f.message
            for f in examine(Deployment(vault_dir=directory))
            if "replica" in f.check
        }
    assert found.keys() == {
        "database:replica-not-standby",
        "database:replica-foreign",
        "database:replica-unreachable",
    }
    assert found["database:replica-not-standby"].startswith("replica 2 ")
    assert found["database:replica-foreign"].startswith("replica 3 ")
    assert found["database:replica-unreachable"].startswith("replica 4 ")
    # A finding names the replica by its place, never its connection string.
    assert not any("127.0.0.1" in message for message in found.values())
