"""PostgresStorage runs the full storage contract, and keeps the promises of a server
that several processes share: an access log no SQL through the application's connection
can rewrite, acknowledged writes that outlive a crash of the server, appenders of several
processes that lose no entry, and errors that never repeat a stored value."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from custodes.audit import AccessEntry, AccessLog, AuditKeys, Outcome
from custodes.audit.checkpoint import create_log_key, open_log_key
from custodes.audit.verify import verify_log
from custodes.crypto import KeyMaterial
from custodes.errors import AuditUnavailable, ConfigurationError, StorageError
from custodes.storage import PostgresStorage, Storage
from custodes.storage.postgres import (
    LOG_FRONTIER_SQL,
    LOG_NODES_SQL,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
)
from tests.conftest import FAST_KDF, PASSPHRASE
from tests.contract.accounts_contract import account
from tests.contract.log_contract import SUBJECT_A, entry, log_batch, node_hash
from tests.contract.records_contract import sealed, stored
from tests.contract.storage_contract import StorageContract
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    PgCluster,
    pg_cluster_fixture,
    postgres_dsn_fixture,
    postgres_server_fixture,
)

pytestmark = pytest.mark.postgres

SECRET = "SECRET-VALUE-7f3a"


class TestPostgres(StorageContract):
    @pytest.fixture
    def make_storage(self, postgres_dsn: Callable[[], str]) -> Callable[[], Storage]:
        return lambda: PostgresStorage(postgres_dsn())


@pytest.fixture
def dsn(postgres_dsn: Callable[[], str]) -> str:
    return postgres_dsn()


@pytest.fixture
def storage(dsn: str) -> Iterator[PostgresStorage]:
    backend = PostgresStorage(dsn)
    yield backend
    backend.close()


def execute(dsn: str, statement: str, params: tuple[Any, ...] = ()) -> None:
    """One statement through a plain connection with the application's own DSN: what
    an attacker who holds the application's credentials can send."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement.encode(), params)


# -- the access log is append-only ------------------------------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE log_entries SET entry = '\\x00'",
        "UPDATE log_entries SET idx = idx + 10",
        "DELETE FROM log_entries",
        "TRUNCATE log_entries",
        "INSERT INTO log_entries(idx, entry) VALUES (0, '\\x00')"
        " ON CONFLICT(idx) DO UPDATE SET entry = excluded.entry",
        "UPDATE log_nodes SET hash = '\\x00'",
        "DELETE FROM log_nodes WHERE level = 0",
        "TRUNCATE log_nodes",
        "UPDATE log_subjects SET idx = 1",
        "DELETE FROM log_subjects",
        "TRUNCATE log_subjects",
        "UPDATE log_details SET blob = '\\x00'",
        "UPDATE log_details SET idx = 1",
        "DELETE FROM log_details",
        "TRUNCATE log_details",
        "DELETE FROM log_head",
        "TRUNCATE log_head",
        "TRUNCATE log_entries, log_nodes, log_subjects, log_details, log_head",
    ],
)
def test_access_log_cannot_be_rewritten_through_sql(
    storage: PostgresStorage, dsn: str, statement: str
) -> None:
    storage.log_append(log_batch(0, 2, subjects=((SUBJECT_A, 0),), details=((0, b"sealed"),)))
    with pytest.raises(psycopg.errors.RaiseException, match=r"append-only|only be erased"):
        execute(dsn, statement)
    assert list(storage.log_entries()) == [(0, entry(0)), (1, entry(1))]
    assert [storage.log_node(0, 0), storage.log_node(1, 0)] == [node_hash(0, 0), node_hash(1, 0)]
    assert storage.log_subject_entries(SUBJECT_A) == [0]
    assert storage.log_detail(0) == b"sealed"
    storage.log_append(log_batch(2, 1))
    assert storage.log_size() == 3


def test_sealed_details_can_be_erased(storage: PostgresStorage, dsn: str) -> None:
    # The one change the log allows: a subject's sealed details set to NULL (erasure).
    storage.log_append(log_batch(0, 2, details=((0, b"sealed 0"), (1, b"sealed 1"))))
    execute(dsn, "UPDATE log_details SET blob = NULL WHERE idx = 0")
    assert storage.log_detail(0) is None
    assert storage.log_detail(1) == b"sealed 1"


# -- durability -------------------------------------------------------------------------


def test_acknowledged_log_append_and_batch_survive_a_crash_of_the_server(
    pg_cluster: Callable[..., PgCluster],
) -> None:
    # The cluster's own default acknowledges a commit before its WAL is on disk, and
    # flushes that WAL only every 10 s: only the storage's own synchronous_commit makes
    # what it acknowledged outlive the crash below.
    cluster = pg_cluster({"synchronous_commit": "off", "wal_writer_delay": "10s"})
    batch = [sealed(n) for n in range(300)]
    first = PostgresStorage(cluster.dsn())
    try:
        assert first.write_batch(batch).inserted == 300
        first.log_append(log_batch(0, 3, subjects=((SUBJECT_A, 2),), details=((1, b"sealed"),)))
        first.put_checkpoint(3, b"note 3")
        cluster.crash()
    finally:
        first.close()
    cluster.start()

    again = PostgresStorage(cluster.dsn())
    try:
        assert again.count_records() == 300
        assert again.get_records([r.record_id for r in batch]) == {
            r.record_id: stored(r) for r in batch
        }
        assert again.find(1, 1299, 5) == ["rec-000299"]
        assert list(again.log_entries()) == [(i, entry(i)) for i in range(3)]
        assert again.log_node(1, 0) == node_hash(1, 0)
        assert again.log_subject_entries(SUBJECT_A) == [2]
        assert again.log_detail(1) == b"sealed"
        assert again.checkpoints() == [(3, b"note 3")]
        again.log_append(log_batch(3, 1))
        assert again.log_size() == 4
    finally:
        again.close()


def test_a_restart_of_the_server_costs_no_request_on_a_dropped_connection(
    pg_cluster: Callable[..., PgCluster],
) -> None:
    cluster = pg_cluster()
    storage = PostgresStorage(cluster.dsn(), min_size=3, max_size=3)
    try:
        # Three connections open and pooled, all of them dropped by the restart.
        storage.log_append(log_batch(0, 1))
        assert storage.write_batch([sealed(n) for n in range(3)]).inserted == 3
        cluster.stop()
        cluster.start()
        # A read runs again on a fresh connection; so does a write that failed at its
        # BEGIN, before anything of it was sent.
        assert storage.count_records() == 3
        storage.log_append(log_batch(1, 1))
        storage.set_meta("after", b"restart")
        assert storage.log_size() == 2
        assert storage.get_meta("after") == b"restart"
    finally:
        storage.close()


def test_data_survives_close_and_reopen(dsn: str) -> None:
    first = PostgresStorage(dsn)
    first.write_batch([sealed(n) for n in range(20)])
    first.set_meta("vault.id", b"v1")
    first.add_account(account())
    first.log_append(log_batch(0, 2))
    first.close()
    again = PostgresStorage(dsn)
    try:
        assert again.count_records() == 20
        assert again.get_meta("vault.id") == b"v1"
        assert again.get_account("inspector.ode") == account()
        assert again.log_size() == 2
        with pytest.raises(AuditUnavailable, match="moved"):
            again.log_append(log_batch(0, 1))
    finally:
        again.close()


# -- several processes ------------------------------------------------------------------


def _access(n: int) -> AccessEntry:
    return AccessEntry(
        actor="t.investigator",
        role="investigator",
        action="person:record:read",
        outcome=Outcome.GRANTED,
        time=1_700_000_000.0 + n,
        purpose=f"shared log test {n}",
        records=(f"rec-{n % 5}",),
        result_count=1,
    )


def test_two_processes_appending_to_one_log_at_once_lose_no_entry(dsn: str, tmp_path: Path) -> None:
    key = tmp_path / "keys" / "log.key"
    create_log_key(key, origin="custodes.test/pg", passphrase=PASSPHRASE, kdf=FAST_KDF)
    keys = AuditKeys(KeyMaterial(os.urandom(16), 1, {1: os.urandom(32)}, os.urandom(32)))
    # Two storages with pools of their own, and a log each: two server processes.
    stores = [PostgresStorage(dsn), PostgresStorage(dsn)]
    try:
        logs = [
            AccessLog(
                s,
                keys,
                open_log_key(key, passphrase=PASSPHRASE),
                origin="custodes.test/pg",
                checkpoint_every=25,
            )
            for s in stores
        ]
        # The second log still believes the log empty: its append meets LogMoved,
        # reloads the tree and lands after the first's.
        assert logs[0].append(_access(0)) == 0
        assert logs[1].append(_access(1)) == 1

        threads, per_thread = 4, 15
        start = threading.Barrier(threads * 2)
        acknowledged = [(0, _access(0).purpose), (1, _access(1).purpose)]
        refused: list[str] = []
        failures: list[BaseException] = []

        def appender(log: AccessLog, t: int) -> None:
            start.wait()
            for j in range(per_thread):
                access = _access(100 + t * per_thread + j)
                try:
                    acknowledged.append((log.append(access), access.purpose))
                except AuditUnavailable as exc:
                    # Fail-closed: a log that kept losing the race refuses the access.
                    if "kept moving" not in str(exc.__cause__):
                        failures.append(exc)
                    refused.append(access.purpose)
                except BaseException as exc:  # reported by the main thread
                    failures.append(exc)

        workers = [
            threading.Thread(target=appender, args=(log, n * threads + t))
            for n, log in enumerate(logs)
            for t in range(threads)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert failures == []
        # Every acknowledged entry at the index it was acknowledged at, nothing refused
        # stored, nothing twice, no gap; and most appends got through.
        stored = [(index, e.purpose) for index, e in logs[0].entries()]
        assert stored == sorted(acknowledged)
        assert [index for index, _ in stored] == list(range(len(stored)))
        assert not set(refused) & {purpose for _, purpose in stored}
        total = len(acknowledged)
        assert total >= 2 + threads * per_thread
        report = verify_log(stores[1], logs[0].verifier_key, origin="custodes.test/pg")
        assert report.entries == total
    finally:
        for s in stores:
            s.close()


def test_a_password_guesser_cannot_spread_attempts_over_processes(dsn: str) -> None:
    stores = [PostgresStorage(dsn, max_size=4), PostgresStorage(dsn, max_size=4)]
    admitted: list[bool] = []

    def below_three(counts: Any) -> bool:
        return all(n < 3 for n, _ in counts.values())

    def attempt(store: PostgresStorage) -> None:
        admitted.append(store.admit_login_attempt(["account:ode"], 5.0, below_three))

    try:
        workers = [threading.Thread(target=attempt, args=(stores[n % 2],)) for n in range(30)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert sorted(admitted) == [False] * 27 + [True] * 3
        assert stores[1].login_failures(["account:ode"]) == {"account:ode": (3, 5.0)}
    finally:
        for s in stores:
            s.close()


def test_two_processes_opening_a_new_schema_at_once_migrate_it_once(dsn: str) -> None:
    opened: list[PostgresStorage] = []
    failures: list[BaseException] = []

    def open_it() -> None:
        try:
            opened.append(PostgresStorage(dsn))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    workers = [threading.Thread(target=open_it) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    try:
        assert failures == []
        assert opened[0].get_meta(SCHEMA_VERSION_KEY) == str(SCHEMA_VERSION).encode()
    finally:
        for s in opened:
            s.close()


def _use_after_fork(storage: PostgresStorage, results: Any) -> None:
    try:
        storage.count_records()
        results.put("served")
    except StorageError as exc:
        results.put(f"refused: {exc}")
    try:
        storage.log_append(log_batch(1, 1))
        results.put("appended")
    except AuditUnavailable:
        results.put("refused")
    storage.close()


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_storage_is_not_used_across_a_fork(storage: PostgresStorage) -> None:
    # A forked worker shares its parent's sockets: were it to use the parent's pool, the
    # two would interleave messages on one connection. It must open its own.
    storage.log_append(log_batch(0, 1))
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_use_after_fork, args=(storage, results))
    child.start()
    outcomes = [results.get(timeout=30), results.get(timeout=30)]
    child.join(timeout=30)
    assert outcomes[0].startswith("refused: ") and "another process" in outcomes[0]
    assert outcomes[1] == "refused"
    # The parent's pool is untouched by the child, closing included.
    assert storage.log_size() == 1
    storage.log_append(log_batch(1, 1))
    assert storage.log_size() == 2


# -- opening ----------------------------------------------------------------------------


def test_schema_version_is_recorded(storage: PostgresStorage) -> None:
    assert storage.get_meta(SCHEMA_VERSION_KEY) == str(SCHEMA_VERSION).encode()


def test_newer_schema_is_refused(dsn: str) -> None:
    PostgresStorage(dsn).close()
    execute(
        dsn,
        "UPDATE meta SET value = %s WHERE key = %s",
        (str(SCHEMA_VERSION + 1).encode(), SCHEMA_VERSION_KEY),
    )
    with pytest.raises(ConfigurationError, match="version"):
        PostgresStorage(dsn)


def test_a_schema_holding_another_meta_table_is_refused(dsn: str) -> None:
    execute(dsn, "CREATE TABLE meta(key text PRIMARY KEY, value bytea)")
    with pytest.raises(ConfigurationError, match="not a custodes vault"):
        PostgresStorage(dsn)


def test_a_search_path_naming_no_schema_is_refused(dsn: str) -> None:
    missing = psycopg.conninfo.make_conninfo(dsn, options="-csearch_path=custodes_absent")
    with pytest.raises(ConfigurationError, match="no existing schema"):
        PostgresStorage(missing)


def test_an_unreachable_server_is_refused() -> None:
    with pytest.raises(StorageError, match="cannot connect"):
        PostgresStorage("host=127.0.0.1 port=1 user=postgres dbname=postgres", connect_timeout=2)


# -- errors -----------------------------------------------------------------------------


def _told(error: BaseException) -> str:
    """Everything a log line of the error would show, its chained causes included."""
    return "".join(traceback.format_exception(error))


def test_an_error_message_never_carries_a_stored_value(storage: PostgresStorage, dsn: str) -> None:
    # A wrapped key left behind for an id with no record (a tampered or half-restored
    # database): storing that record fails on the key's primary key, whose DETAIL line
    # in PostgreSQL's own message quotes the id.
    execute(
        dsn,
        "INSERT INTO data_keys(record_id, kek_version, wrapped) VALUES (%s, 1, %s)",
        (SECRET, SECRET.encode()),
    )
    record = sealed(1)._replace(record_id=SECRET, payload=SECRET.encode())
    with pytest.raises(StorageError) as refused:
        storage.write_batch([sealed(2), record])
    assert SECRET not in _told(refused.value)
    assert "UniqueViolation" in str(refused.value)
    assert storage.count_records() == 0

    # A subject row planted where the next append puts one: its DETAIL quotes the
    # commitment.
    commitment = SECRET.encode().ljust(32, b"!")
    execute(dsn, "INSERT INTO log_subjects(commitment, idx) VALUES (%s, 0)", (commitment,))
    with pytest.raises(AuditUnavailable) as failed:
        storage.log_append(log_batch(0, 1, subjects=((commitment, 0),)))
    told = _told(failed.value)
    assert SECRET not in told and commitment.hex() not in told
    assert storage.log_size() == 0


def _node_probes(plan: dict[str, Any]) -> tuple[int, list[str]]:
    """How many times the executor probed log_nodes, and every other way it read it."""
    probes, other = 0, []
    if plan.get("Relation Name") == "log_nodes" and plan.get("Actual Loops", 0) > 0:
        if plan["Node Type"] in ("Index Scan", "Index Only Scan"):
            probes += int(plan["Actual Loops"])
        else:
            other.append(str(plan["Node Type"]))
    for child in plan.get("Plans", []):
        more, others = _node_probes(child)
        probes, other = probes + more, other + others
    return probes, other


def test_an_append_and_a_proof_probe_the_logs_nodes_and_never_scan_them_all(
    storage: PostgresStorage, dsn: str
) -> None:
    # Statistics gathered on a tree of a page, then the tree grown far past them: what
    # the log does with every access. Planned as the storage plans them (unprepared, for
    # the table as it is), an append's frontier and a proof's nodes are one probe of the
    # primary key per position asked, never a scan of every node. A plan prepared while
    # the tree was small is kept, and scans them all (the last assertion).
    storage.log_append(log_batch(0, 40))
    execute(dsn, "ANALYZE log_nodes")
    prepared = psycopg.connect(dsn, autocommit=True)
    prepared.execute("SET plan_cache_mode = force_generic_plan")
    prepared.execute("PREPARE frontier(bigint) AS " + LOG_FRONTIER_SQL.replace("%(known)s", "$1"))
    prepared.execute("EXECUTE frontier(30)")  # its plan made now, and kept
    storage.log_append(log_batch(40, 4000))
    positions = [(0, 5), (0, 4039), (3, 17), (11, 0), (60, 1)]  # the last one absent
    levels = "{" + ",".join(str(lv) for lv, _ in positions) + "}"
    indexes = "{" + ",".join(str(i) for _, i in positions) + "}"

    def plan(conn: psycopg.Connection[Any], statement: str, params: Any) -> dict[str, Any]:
        (raw,) = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params, prepare=False
        ).fetchone() or (None,)
        return dict((raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"])

    with psycopg.connect(dsn, autocommit=True) as conn:
        frontier = plan(conn, LOG_FRONTIER_SQL, {"known": 4030})
        nodes = plan(conn, LOG_NODES_SQL, (levels, indexes))
    with prepared:
        generic = plan(prepared, "EXECUTE frontier(4030)", ())
    # A probe for each distinct peak of the two trees (the stored one and the caller's).
    peaks = {(lv, (n >> lv) - 1) for n in (4040, 4030) for lv in range(63) if n >> lv & 1}
    assert _node_probes(frontier) == (len(peaks), [])
    assert _node_probes(nodes) == (len(positions), [])
    assert storage.log_nodes(positions) == {
        (lv, i): node_hash(lv, i) for lv, i in positions if (lv, i) != (60, 1)
    }
    assert _node_probes(generic)[1] == ["Seq Scan"]
