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
from custodes.storage.sqlite import SCHEMA_VERSION, SCHEMA_VERSION_KEY
from tests.contract.storage_contract import StorageContract, account, sealed, stored


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
    first.append_access(b"one")
    first.append_access(b"two")
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
        assert again.append_access(b"three") == 3
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
        backend.append_access(b"one")
        for suffix in ("", "-wal", "-shm"):
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
    backend = SQLiteStorage(db_path)
    try:
        with pytest.raises(AuditUnavailable):
            backend.append_access(b"who looked")
        with pytest.raises(StorageError):
            backend.write_batch([sealed(1)])
        assert backend.count_records() == 0
    finally:
        backend.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="file modes do not bind root")
def test_read_only_database_file_refuses_to_audit(db_path: Path) -> None:
    SQLiteStorage(db_path).close()
    db_path.chmod(0o400)
    backend = SQLiteStorage(db_path)
    try:
        with pytest.raises(AuditUnavailable):
            backend.append_access(b"who looked")
    finally:
        backend.close()


def test_access_log_cannot_be_rewritten_through_sql(storage: SQLiteStorage, db_path: Path) -> None:
    storage.append_access(b"who looked")
    conn = raw_connection(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE access_log SET entry = x'00'")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("DELETE FROM access_log")
    finally:
        conn.close()
    assert list(storage.iter_access()) == [(1, b"who looked")]


_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from custodes.storage import SQLiteStorage, SealedRecord

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
        print(f"acknowledged {batch} {outcome.inserted}", flush=True)
        storage.append_access(b"batch %d" % batch)
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
        assert [seq for seq, _ in backend.iter_access()] == list(range(1, batches + 1))
    finally:
        backend.close()


def test_search_spans_generations_in_id_order(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four records per generation, so that a shared token lands in several subtrees.
    monkeypatch.setattr(sqlite_backend, "_GENERATION_BITS", 2)
    backend = SQLiteStorage(db_path)
    try:
        ns = [42, 7, 99, 3, 58, 21, 11, 64, 5, 30, 77]
        for start in range(0, len(ns), 3):
            backend.write_batch(
                [sealed(n, tokens=((1, 77), (2, n))) for n in ns[start : start + 3]]
            )
        expected = [f"rec-{n:06d}" for n in sorted(ns)]
        assert backend.find(1, 77, 100) == expected
        assert backend.find(1, 77, 4) == expected[:4]
        assert backend.find(2, 99, 10) == ["rec-000099"]
        assert backend.find(2, 1000, 10) == []
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
    finally:
        backend.close()
