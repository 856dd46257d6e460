"""SQLiteStorage runs the full storage contract, and keeps the promises of a file on
disk: durability across close, crash and reopen, owner-only files, and an access log
that refuses to pretend when it cannot write."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import custodes
from custodes.errors import AuditUnavailable, ConfigurationError, StorageError
from custodes.storage import SQLiteStorage, Storage
from custodes.storage import sqlite as sqlite_backend
from custodes.storage.sqlite import SCHEMA_VERSION, SCHEMA_VERSION_KEY, log_path
from tests.contract.accounts_contract import account
from tests.contract.log_contract import SUBJECT_A, entry, log_batch, node_hash
from tests.contract.records_contract import sealed, stored
from tests.contract.storage_contract import StorageContract


class TestSQLite(StorageContract):
    @pytest.fixture
    def make_storage(self, tmp_path: Path) -> Callable[[], Storage]:
        counter = itertools.count()
        return lambda: SQLiteStorage(tmp_path / f"vault-{next(counter)}.db")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "vault.db"


@pytest.fixture
def storage(db_path: Path) -> Iterator[SQLiteStorage]:
    backend = SQLiteStorage(db_path)
    yield backend
    backend.close()


def raw_connection(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def mark_read_only(path: Path) -> None:
    """Set the file-format write version above 2: SQLite then opens the database
    read-only, whoever the process runs as (file modes do not bind root)."""
    with path.open("r+b") as f:
        f.seek(18)
        f.write(bytes([3]))


def test_data_survives_close_and_reopen(db_path: Path) -> None:
    batch = [sealed(n) for n in range(50)]
    first = SQLiteStorage(db_path)
    first.write_batch(batch)
    first.set_meta("vault.id", b"v1")
    first.add_account(account())
    first.log_append(log_batch(0, 2, subjects=((SUBJECT_A, 1),), details=((0, b"sealed"),)))
    first.put_checkpoint(2, b"note 2")
    first.close()

    again = SQLiteStorage(db_path)
    try:
        assert again.count_records() == 50
        assert again.get_records([r.record_id for r in batch]) == {
            r.record_id: stored(r) for r in batch
        }
        assert again.find(1, 1000, 10) == ["rec-000000"]
        assert again.get_meta("vault.id") == b"v1"
        assert again.get_account("inspector.ode") == account()
        # The size is read back from the file, not counted from zero.
        assert again.log_size() == 2
        assert list(again.log_entries()) == [(0, entry(0)), (1, entry(1))]
        assert again.log_node(1, 0) == node_hash(1, 0)
        assert again.log_subject_entries(SUBJECT_A) == [1]
        assert again.log_detail(0) == b"sealed"
        assert again.checkpoints() == [(2, b"note 2")]
        with pytest.raises(AuditUnavailable, match="moved"):
            again.log_append(log_batch(0, 1))
        again.log_append(log_batch(2, 1))
        assert again.log_size() == 3
        assert again.write_batch(batch).already_present == 50
    finally:
        again.close()


def test_connection_is_durable_and_keeps_temp_data_in_memory(storage: SQLiteStorage) -> None:
    conn = storage._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    # Ingest speed, not safety: a page size chosen for new files, and checkpoints that
    # are rarer than SQLite's default of every 1,000 pages.
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 8192
    assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] > 1000


def test_wal_mode_is_recorded_in_the_file(storage: SQLiteStorage, db_path: Path) -> None:
    conn = raw_connection(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_schema_version_is_recorded(storage: SQLiteStorage) -> None:
    assert storage.get_meta(SCHEMA_VERSION_KEY) == str(SCHEMA_VERSION).encode()


def test_newer_schema_is_refused(db_path: Path) -> None:
    SQLiteStorage(db_path).close()
    conn = raw_connection(db_path)
    conn.execute(
        "UPDATE meta SET value = ? WHERE key = ?",
        (str(SCHEMA_VERSION + 1).encode(), SCHEMA_VERSION_KEY),
    )
    conn.close()
    with pytest.raises(ConfigurationError):
        SQLiteStorage(db_path)


def test_foreign_database_is_refused(db_path: Path) -> None:
    conn = raw_connection(db_path)
    conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value BLOB)")
    conn.close()
    with pytest.raises(ConfigurationError):
        SQLiteStorage(db_path)


def test_database_files_are_owner_only(db_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        backend = SQLiteStorage(db_path)
    finally:
        os.umask(old_umask)
    try:
        backend.write_batch([sealed(1)])
        backend.log_append(log_batch(0, 1))
        for suffix in ("", "-wal", "-shm", "-log", "-log-wal", "-log-shm"):
            path = db_path.with_name(db_path.name + suffix)
            assert path.exists(), suffix
            assert path.stat().st_mode & 0o777 == 0o600, suffix
    finally:
        backend.close()


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        SQLiteStorage(tmp_path / "absent" / "vault.db")
    assert not (tmp_path / "absent").exists()


def test_close_folds_the_wal_into_the_file(db_path: Path) -> None:
    backend = SQLiteStorage(db_path)
    backend.write_batch([sealed(n) for n in range(100)])
    backend.close()
    wal = db_path.with_name(db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0


def test_database_marked_read_only_refuses_to_audit(db_path: Path) -> None:
    SQLiteStorage(db_path).close()
    mark_read_only(db_path)
    mark_read_only(log_path(db_path))
    backend = SQLiteStorage(db_path)
    try:
        with pytest.raises(AuditUnavailable):
            backend.log_append(log_batch(0, 1))
        with pytest.raises(StorageError):
            backend.write_batch([sealed(1)])
        assert backend.count_records() == 0
        assert backend.log_size() == 0
        assert list(backend.log_entries()) == []
    finally:
        backend.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="file modes do not bind root")
def test_read_only_database_file_refuses_to_audit(db_path: Path) -> None:
    SQLiteStorage(db_path).close()
    log_path(db_path).chmod(0o400)
    backend = SQLiteStorage(db_path)
    try:
        with pytest.raises(AuditUnavailable):
            backend.log_append(log_batch(0, 1))
        assert backend.log_size() == 0
    finally:
        backend.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE log_entries SET entry = x'00'",
        "UPDATE log_entries SET idx = idx + 10",
        "DELETE FROM log_entries",
        "INSERT OR REPLACE INTO log_entries(idx, entry) VALUES (0, x'00')",
        "INSERT INTO log_entries(idx, entry) VALUES (0, x'00')"
        " ON CONFLICT(idx) DO UPDATE SET entry = excluded.entry",
        "UPDATE log_nodes SET hash = zeroblob(32)",
        "DELETE FROM log_nodes WHERE level = 0",
        "INSERT OR REPLACE INTO log_nodes(level, idx, hash) VALUES (0, 0, zeroblob(32))",
        "UPDATE log_details SET blob = x'00'",
        "UPDATE log_details SET idx = 1",
        "DELETE FROM log_details",
        "INSERT OR REPLACE INTO log_details(idx, blob) VALUES (0, x'00')",
    ],
)
def test_access_log_cannot_be_rewritten_through_sql(
    storage: SQLiteStorage, db_path: Path, statement: str
) -> None:
    storage.log_append(log_batch(0, 2, details=((0, b"sealed"),)))
    conn = raw_connection(log_path(db_path))
    try:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute(statement)
    finally:
        conn.close()
    assert list(storage.log_entries()) == [(0, entry(0)), (1, entry(1))]
    assert [storage.log_node(0, 0), storage.log_node(1, 0)] == [node_hash(0, 0), node_hash(1, 0)]
    assert storage.log_detail(0) == b"sealed"


def test_sealed_details_can_be_erased(storage: SQLiteStorage, db_path: Path) -> None:
    # The one change the log allows: a subject's sealed details set to NULL (erasure).
    storage.log_append(log_batch(0, 2, details=((0, b"sealed 0"), (1, b"sealed 1"))))
    conn = raw_connection(log_path(db_path))
    try:
        conn.execute("UPDATE log_details SET blob = NULL WHERE idx = 0")
    finally:
        conn.close()
    assert storage.log_detail(0) is None
    assert storage.log_detail(1) == b"sealed 1"


def test_a_second_writer_on_the_same_file_is_detected(db_path: Path) -> None:
    first = SQLiteStorage(db_path)
    second = SQLiteStorage(db_path)
    try:
        first.log_append(log_batch(0, 2))
        # second still believes the log is empty: its append must not land.
        with pytest.raises(AuditUnavailable, match="moved"):
            second.log_append(log_batch(0, 1))
        assert second.log_size() == 2
        second.log_append(log_batch(2, 1))
        assert list(first.log_entries(0, 3)) == [(i, entry(i)) for i in range(3)]
    finally:
        second.close()
        first.close()


def test_sqlite_failure_refuses_the_batch_without_data(
    storage: SQLiteStorage, db_path: Path
) -> None:
    storage.log_append(log_batch(0, 1))
    # A stray node beyond the log, as a tampered file could hold: the batch that
    # completes it must fail whole on the stored node, not overwrite it or skip it.
    conn = raw_connection(log_path(db_path))
    try:
        conn.execute("INSERT INTO log_nodes VALUES (0, 1, ?)", (b"SECRET-VALUE".ljust(32),))
    finally:
        conn.close()
    with pytest.raises(AuditUnavailable) as refused:
        storage.log_append(log_batch(1, 1, details=((1, b"sealed"),)))
    assert "SECRET-VALUE" not in str(refused.value)
    assert storage.log_size() == 1
    assert list(storage.log_entries()) == [(0, entry(0))]
    assert storage.log_detail(1) is None
    assert storage.log_node(1, 0) is None


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from custodes.storage import LogAppend, SQLiteStorage, SealedRecord

    storage = SQLiteStorage(Path(sys.argv[1]))
    for batch in range(int(sys.argv[2])):
        records = [
            SealedRecord(
                f"b{batch}-{n}", "person", os.urandom(600), 1, os.urandom(40),
                ((1, batch * 10_000 + n), (2, n)),
            )
            for n in range(1000)
        ]
        outcome = storage.write_batch(records)
        # One group commit of 100 entries per batch, leaves only: storage does not
        # check hashes, the audit layer does.
        first = batch * 100
        storage.log_append(
            LogAppend(
                first,
                [b"batch %d entry %d" % (batch, n) for n in range(100)],
                [(0, first + n, os.urandom(32)) for n in range(100)],
                [(b"subject %d" % batch, first)],
                [(first, b"sealed %d" % batch)],
            )
        )
        print(f"acknowledged {batch} {outcome.inserted}", flush=True)
    # Killed with no close, no checkpoint, no cleanup of any kind.
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_acknowledged_batches_survive_a_killed_process(db_path: Path) -> None:
    package_root = Path(custodes.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    batches = 5
    result = subprocess.run(
        [sys.executable, "-c", _WRITER, str(db_path), str(batches)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    acknowledged = [line.split() for line in result.stdout.splitlines()]
    assert acknowledged == [["acknowledged", str(b), "1000"] for b in range(batches)]

    backend = SQLiteStorage(db_path)
    try:
        assert backend.count_records() == batches * 1000
        for batch in range(batches):
            ids = [f"b{batch}-{n}" for n in range(1000)]
            assert len(backend.get_records(ids)) == 1000
            assert backend.find(1, batch * 10_000 + 999, 5) == [f"b{batch}-999"]
        assert backend.log_size() == batches * 100
        assert list(backend.log_entries()) == [
            (batch * 100 + n, b"batch %d entry %d" % (batch, n))
            for batch in range(batches)
            for n in range(100)
        ]
        for batch in range(batches):
            assert backend.log_node(0, batch * 100 + 99) is not None
            assert backend.log_subject_entries(b"subject %d" % batch) == [batch * 100]
            assert backend.log_detail(batch * 100) == b"sealed %d" % batch
    finally:
        backend.close()


def tree_rows(path: Path) -> dict[str, int]:
    conn = raw_connection(path)
    try:
        return {
            tree: conn.execute(f"SELECT count(*) FROM {tree}").fetchone()[0]
            for tree in ("tokens", "tokens_fresh")
        }
    finally:
        conn.close()


def test_search_spans_the_folded_and_the_fresh_token_trees_in_id_order(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fold at every few rows, so that a shared token lies in both trees.
    monkeypatch.setattr(sqlite_backend, "_FOLD_FLOOR", 11)
    backend = SQLiteStorage(db_path)
    try:
        ns = [42, 7, 99, 3, 58, 21, 11, 64, 5, 30, 77]
        for start in range(0, len(ns), 3):
            backend.write_batch(
                [sealed(n, tokens=((1, 77), (2, n))) for n in ns[start : start + 3]]
            )
        rows = tree_rows(db_path)
        assert rows["tokens"] > 0 and rows["tokens_fresh"] > 0
        assert rows["tokens"] + rows["tokens_fresh"] == 2 * len(ns)
        expected = [f"rec-{n:06d}" for n in sorted(ns)]
        assert backend.find(1, 77, 100) == expected
        assert backend.find(1, 77, 4) == expected[:4]
        assert backend.find(2, 99, 10) == ["rec-000099"]
        assert backend.find(2, 1000, 10) == []
        # A page of records finds its tokens in both trees; an erasure and a retired index
        # remove rows from both.
        assert {rid: pairs for _, rid, pairs in backend.record_tokens(0, 100)} == {
            f"rec-{n:06d}": ((1, 77), (2, n)) for n in ns
        }
        assert backend.erase_records(["rec-000042", "rec-000077"]) == 2
        assert backend.find(1, 77, 100) == [
            r for r in expected if r not in ("rec-000042", "rec-000077")
        ]
        assert backend.drop_tokens([1]) == len(ns) - 2
        assert backend.find(1, 77, 100) == []
        assert backend.key_census().token_index_ids == {2: len(ns) - 2}
    finally:
        backend.close()


def test_a_fold_spread_over_many_writes_never_hides_or_repeats_a_record(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fold starts at 20 fresh rows and moves 7 rows a write, so that it takes several
    # writes while new rows arrive before and behind its cursor.
    monkeypatch.setattr(sqlite_backend, "_FOLD_FLOOR", 20)
    monkeypatch.setattr(sqlite_backend, "_FOLD_STEP", 7)
    backend = SQLiteStorage(db_path)
    folding_seen = False
    try:
        written: list[int] = []
        for start in range(0, 120, 6):
            ns = list(range(start, start + 6))
            backend.write_batch([sealed(n, tokens=((1, 77), (2, n), (3, n % 5))) for n in ns])
            written.extend(ns)
            conn = raw_connection(db_path)
            try:
                folding_seen |= conn.execute("SELECT count(*) FROM token_fold").fetchone()[0] > 0
            finally:
                conn.close()
            # Every record found exactly once, wherever its rows are at this moment.
            assert backend.find(1, 77, 1000) == [f"rec-{n:06d}" for n in sorted(written)]
            for n in (written[0], written[len(written) // 2], written[-1]):
                assert backend.find(2, n, 10) == [f"rec-{n:06d}"]
            assert len(backend.find(3, 2, 1000)) == len([n for n in written if n % 5 == 2])
        assert folding_seen
        rows = tree_rows(db_path)
        assert rows["tokens"] > 0 and rows["tokens"] + rows["tokens_fresh"] == 3 * 120
        assert backend.key_census().token_index_ids == {1: 120, 2: 120, 3: 120}
    finally:
        backend.close()


def lookup_steps(path: Path, index_id: int, token: int) -> tuple[list[str], int]:
    """A search as the storage runs it, and the virtual machine instructions it took."""
    conn = raw_connection(path)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    try:
        conn.set_progress_handler(count, 1)
        rows = sqlite_backend._find_rows(conn, "r.record_id", "", index_id, token, 100)
        return [rid for (rid,) in rows], steps
    finally:
        conn.close()


def test_a_token_lookup_takes_the_same_work_at_any_population(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Folds at a small size, so that both vaults have both trees; the larger holds forty
    # times the records of the smaller, and the searched token carries three in each.
    monkeypatch.setattr(sqlite_backend, "_FOLD_FLOOR", 64)
    costs = []
    for size in (500, 20_000):
        path = tmp_path / f"vault-{size}.db"
        backend = SQLiteStorage(path)
        try:
            for start in range(0, size, 2_000):
                backend.write_batch(
                    [
                        sealed(
                            n,
                            tokens=(
                                (1, 10**6 + n),
                                (2, -1 if n in (1, size // 2, size - 1) else n),
                            ),
                        )
                        for n in range(start, min(size, start + 2_000))
                    ]
                )
            # The last records stay in the fresh tree.
            monkeypatch.setattr(sqlite_backend, "_FOLD_FLOOR", 10**9)
            backend.write_batch([sealed(n) for n in range(size, size + 5)])
            monkeypatch.setattr(sqlite_backend, "_FOLD_FLOOR", 64)
        finally:
            backend.close()
        assert min(tree_rows(path).values()) > 0
        found, steps = lookup_steps(path, 2, -1)
        assert len(found) == 3
        costs.append(steps)
    # Each tree is probed once: the same instructions however many records there are
    # (the generation layout before took a seek per 2**16 records).
    assert costs[0] == costs[1]
    conn = raw_connection(tmp_path / "vault-20000.db")
    try:
        plan = [
            str(row[3])
            for row in conn.execute(
                f"EXPLAIN QUERY PLAN {sqlite_backend._BUCKET_SEQS}",
                (2, -1),
            )
        ]
    finally:
        conn.close()
    searches = [step for step in plan if step.startswith("SEARCH")]
    assert searches == [
        "SEARCH tokens USING PRIMARY KEY (index_id=? AND token=?)",
        "SEARCH tokens_fresh USING PRIMARY KEY (index_id=? AND token=?)",
    ]


def test_a_file_of_the_generation_token_layout_is_migrated_and_searched(db_path: Path) -> None:
    backend = SQLiteStorage(db_path)
    try:
        backend.write_batch([sealed(n, tokens=((1, 77), (2, n))) for n in range(40)])
    finally:
        backend.close()
    # The file as version 8 left it: tokens keyed by generation (migration 2's table).
    conn = raw_connection(db_path)
    try:
        conn.execute("BEGIN")
        rows = conn.execute(
            "SELECT index_id, token, seq FROM tokens UNION ALL"
            " SELECT index_id, token, seq FROM tokens_fresh"
        ).fetchall()
        for name in ("tokens", "tokens_fresh", "token_trees", "token_fold"):
            conn.execute(f"DROP TABLE {name}")
        conn.execute(
            "CREATE TABLE tokens(generation INTEGER, index_id INTEGER, token INTEGER,"
            " seq INTEGER, PRIMARY KEY(generation, index_id, token, seq)) WITHOUT ROWID"
        )
        conn.executemany(
            "INSERT INTO tokens VALUES (?, ?, ?, ?)", [(s >> 16, i, t, s) for i, t, s in rows]
        )
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (b"8", SCHEMA_VERSION_KEY))
        conn.execute("COMMIT")
    finally:
        conn.close()

    backend = SQLiteStorage(db_path)
    try:
        assert backend.get_meta(SCHEMA_VERSION_KEY) == str(SCHEMA_VERSION).encode()
        assert tree_rows(db_path) == {"tokens": 80, "tokens_fresh": 0}
        assert backend.find(1, 77, 3) == ["rec-000000", "rec-000001", "rec-000002"]
        assert backend.find_records(2, 17, 5) == [stored(sealed(17))]
        assert backend.write_batch([sealed(n, tokens=((1, 77),)) for n in (40, 41)]).inserted == 2
        assert len(backend.find(1, 77, 100)) == 42
        assert backend.key_census().token_index_ids == {1: 42, 2: 40}
    finally:
        backend.close()


def test_version_1_file_is_migrated(db_path: Path) -> None:
    conn = raw_connection(db_path)
    for statement in sqlite_backend._split_script(sqlite_backend._MIGRATIONS[0]):
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES (?, ?)", (SCHEMA_VERSION_KEY, b"1"))
    old = [sealed(n) for n in (5, 1, 3)]
    for r in old:
        conn.execute(
            "INSERT INTO records(record_id, record_type, payload) VALUES (?, ?, ?)",
            (r.record_id, r.record_type, r.payload),
        )
        conn.execute(
            "INSERT INTO data_keys VALUES (?, ?, ?)", (r.record_id, r.kek_version, r.wrapped_key)
        )
        conn.executemany(
            "INSERT INTO tokens VALUES (?, ?, ?)", [(*pair, r.record_id) for pair in r.tokens]
        )
    conn.close()

    backend = SQLiteStorage(db_path)
    try:
        assert backend.get_meta(SCHEMA_VERSION_KEY) == str(SCHEMA_VERSION).encode()
        assert backend.get_records([r.record_id for r in old]) == {
            r.record_id: stored(r) for r in old
        }
        assert backend.find(2, 5 % 7, 10) == ["rec-000005"]
        assert backend.find(1, 1003, 10) == ["rec-000003"]
        assert backend.write_batch([sealed(3), sealed(9)]).inserted == 1
        assert backend.find(1, 1009, 10) == ["rec-000009"]
        assert backend.count_records() == 4
        assert table_names(log_path(db_path)) >= {"log_entries", "log_nodes", "log_details"}
        assert not {"access_log", "log_entries"} & table_names(db_path)
        backend.log_append(log_batch(0, 1))
    finally:
        backend.close()


def table_names(path: Path) -> set[str]:
    conn = raw_connection(path)
    try:
        return {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()


def version_2_file(path: Path, *, old_log_entries: int) -> None:
    conn = raw_connection(path)
    for script in sqlite_backend._MIGRATIONS[:2]:
        for statement in sqlite_backend._split_script(script):
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES (?, ?)", (SCHEMA_VERSION_KEY, b"2"))
    for n in range(old_log_entries):
        conn.execute("INSERT INTO access_log(entry) VALUES (?)", (b"old %d" % n,))
    conn.close()


def test_version_2_file_gets_the_merkle_log(db_path: Path) -> None:
    version_2_file(db_path, old_log_entries=0)
    backend = SQLiteStorage(db_path)
    try:
        assert backend.get_meta(SCHEMA_VERSION_KEY) == str(SCHEMA_VERSION).encode()
        assert backend.log_size() == 0
        backend.log_append(log_batch(0, 2))
        assert "access_log" not in table_names(db_path)
    finally:
        backend.close()


def test_migration_refuses_to_drop_old_access_log_entries(db_path: Path) -> None:
    version_2_file(db_path, old_log_entries=3)
    with pytest.raises(StorageError, match="old_access_log_holds_entries"):
        SQLiteStorage(db_path)
    # Rolled back whole: still a version 2 file with its old log.
    conn = raw_connection(db_path)
    try:
        assert conn.execute("SELECT count(*) FROM access_log").fetchone() == (3,)
        version = conn.execute("SELECT value FROM meta WHERE key = ?", (SCHEMA_VERSION_KEY,))
        assert version.fetchone() == (b"2",)
    finally:
        conn.close()
    assert "log_entries" not in table_names(db_path)


def version_4_file(path: Path, entries: int) -> None:
    """A vault file as the last release wrote it: the access log inside the main file."""
    conn = raw_connection(path)
    for script in sqlite_backend._MIGRATIONS:
        for statement in sqlite_backend._split_script(script):
            conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES (?, ?)", (SCHEMA_VERSION_KEY, b"4"))
    batch = log_batch(0, entries, subjects=((SUBJECT_A, 1),), details=((1, b"sealed"),))
    conn.executemany("INSERT INTO log_entries VALUES (?, ?)", enumerate(batch.entries))
    conn.executemany("INSERT INTO log_nodes VALUES (?, ?, ?)", batch.nodes)
    conn.executemany("INSERT INTO log_subjects VALUES (?, ?)", batch.subjects)
    conn.executemany("INSERT INTO log_details VALUES (?, ?)", batch.details)
    conn.execute("INSERT INTO checkpoints VALUES (?, ?)", (entries, b"a signed note"))
    conn.close()


def test_version_4_log_moves_to_its_own_file_whole(db_path: Path) -> None:
    version_4_file(db_path, entries=5)
    backend = SQLiteStorage(db_path)
    try:
        assert backend.get_meta(SCHEMA_VERSION_KEY) == str(SCHEMA_VERSION).encode()
        assert list(backend.log_entries()) == [(i, entry(i)) for i in range(5)]
        assert backend.log_node(0, 3) == node_hash(0, 3)
        assert backend.log_subject_entries(SUBJECT_A) == [1]
        assert backend.log_detail(1) == b"sealed"
        assert backend.checkpoints() == [(5, b"a signed note")]
        backend.log_append(log_batch(5, 1))
        assert backend.log_size() == 6
        assert backend.spend(b"m" * 32, 1.0, keep=60.0) is True  # migration 6 ran too
    finally:
        backend.close()
    assert not {"log_entries", "log_nodes", "checkpoints"} & table_names(db_path)
    assert {"log_entries", "log_nodes", "checkpoints"} <= table_names(log_path(db_path))


def test_a_log_move_interrupted_after_the_copy_loses_and_doubles_nothing(
    db_path: Path,
) -> None:
    version_4_file(db_path, entries=5)
    # The first of the migration's two transactions landed, the second did not: the
    # log's file holds the copy and the main file still holds the originals.
    conn = raw_connection(db_path)
    conn.execute("ATTACH DATABASE ? AS log", (str(log_path(db_path)),))
    for statement in sqlite_backend._split_script(sqlite_backend._LOG_SCHEMA):
        conn.execute(statement)
    for table in sqlite_backend._LOG_TABLES:
        conn.execute(f"INSERT INTO log.{table} SELECT * FROM main.{table}")
    conn.close()
    backend = SQLiteStorage(db_path)
    try:
        assert list(backend.log_entries()) == [(i, entry(i)) for i in range(5)]
        assert backend.checkpoints() == [(5, b"a signed note")]
    finally:
        backend.close()
    assert "log_entries" not in table_names(db_path)
