"""SQLiteStorage: the single-file durable backend, on the standard sqlite3 module.

Owns the database file, its schema and migrations, and the one connection through
which every read and write goes. Holds only ciphertext, wrapped keys, keyed tokens
and non-personal metadata.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from custodes.errors import (
    AuditUnavailable,
    ConfigurationError,
    LogMoved,
    RecordNotFound,
    StorageError,
)
from custodes.storage.base import (
    AccountRow,
    AlertRow,
    BatchOutcome,
    KeyCensus,
    LogAppend,
    LoginCounts,
    Rebuild,
    Rekeyed,
    SealedRecord,
    SessionRow,
    StoredRecord,
    checked_charges,
    checked_subjects,
)
from custodes.storage.memory import (
    LOG_PAGE,
    CheckedLogAppend,
    account_from_row,
    census_of,
    checked_alert,
    checked_checkpoint,
    checked_log_append,
    checked_record,
    checked_rekeyed,
    checked_session,
    checked_spend,
    stored_record_from_row,
)

_T = TypeVar("_T")

SCHEMA_VERSION_KEY = "storage.schema_version"

# Tokens live in two b-trees of one key, (index, token, seq): a fresh one that takes
# every write, and a folded one that holds the rest. Blind tokens are random, so once a
# tree outgrows a batch every token inserted dirties a page of its own, and each commit
# writes all of them. The fresh tree's pages are written by every batch (about half its
# size, on average, per batch of b rows), and each fold writes the folded tree's M rows
# once for the F rows it moves: per row, F / 2b against M / F, least when the fresh tree
# folds at F = sqrt(2 b M) rows (_FOLD_FLOOR at least). At 10^6 records of 4.7 tokens
# in batches of 2,000 that is about 300,000 rows, a sixteenth of the folded tree; the
# cost per record then grows as the square root of the population, where the
# generations of version 8 wrote a constant amount but probed once per 2**16 records.
# A fold merges in key order, _FOLD_STEP rows with each later write (token_fold keeps
# how far it got), so that each page of the folded tree is written about once per fold
# and no write holds the writer's lock (which the access log's appends wait on) for a
# whole fold. A row is moved in one transaction, so it is always in exactly one tree, and
# a search probes each tree once: two probes whatever the population. Part of the file
# format (version 9; version 8 keyed tokens by generation first).
#
# Measured at 10^6 records of 4.7 tokens, batches of 2,000, bench/storage.py, one run
# after the other on a loaded 2-core machine: generations 47.3 us and 9,423 bytes written
# a record (last 100,000: 55.1 us), lookup (find_records) 63.9 us; these two trees 59.8
# us and 11,408 bytes (last 100,000: 76.1 us), lookup 30.5 us, the file 9% larger
# (folding at a quarter instead: 13,140 bytes). One tree keyed (index, token, seq), raw
# SQLite: about 40 KiB a record and four times the time, once the tree outgrew the batch.
_FOLD_FLOOR = 1 << 16  # rows: a small vault's tokens stay in the fresh tree alone
_FOLD_STEP = 1 << 16  # rows moved by each write while a fold runs (about 0.4 s)
_TOKEN_TREES = ("tokens", "tokens_fresh")

# Each step takes the schema from version i to i + 1; a later migration is appended
# here and runs, inside one write transaction, on the next open of an older file.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta(key TEXT PRIMARY KEY, value BLOB);
    -- A rowid table, not WITHOUT ROWID: rows of several hundred bytes under random ids
    -- would split a clustered b-tree on nearly every insert. Here rows are appended and
    -- only the narrow id index takes random inserts (about twice the ingest rate).
    CREATE TABLE records(
        seq INTEGER PRIMARY KEY,
        record_id TEXT NOT NULL UNIQUE,
        record_type TEXT NOT NULL,
        payload BLOB NOT NULL
    );
    -- Apart from records so that deleting one row crypto-shreds its record.
    CREATE TABLE data_keys(
        record_id TEXT PRIMARY KEY,
        kek_version INTEGER NOT NULL,
        wrapped BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE tokens(
        index_id INTEGER,
        token INTEGER,
        record_id TEXT,
        PRIMARY KEY(index_id, token, record_id)
    ) WITHOUT ROWID;
    CREATE TABLE accounts(
        username TEXT PRIMARY KEY,
        role TEXT,
        password_hash TEXT,
        attributes BLOB,
        created_at REAL,
        disabled INTEGER
    );
    CREATE TABLE access_log(seq INTEGER PRIMARY KEY, entry BLOB NOT NULL);
    -- Not a defence against someone holding the file, who can drop the triggers (the
    -- signed Merkle checkpoints catch that); it stops a stray or injected statement
    -- through this connection from rewriting history.
    CREATE TRIGGER access_log_no_update BEFORE UPDATE ON access_log
    BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
    CREATE TRIGGER access_log_no_delete BEFORE DELETE ON access_log
    BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
    """,
    # Version 2: keys and tokens name their record by its integer seq instead of its
    # text id, and tokens are grouped by generation (2**16 records: the 16 below), so
    # that an ingest batch dirties a bounded set of pages instead of one page per token.
    # Version 9 replaced the generations (see _FOLD_FLOOR).
    """
    CREATE TABLE data_keys_2(
        seq INTEGER PRIMARY KEY,
        kek_version INTEGER NOT NULL,
        wrapped BLOB NOT NULL
    );
    INSERT INTO data_keys_2(seq, kek_version, wrapped)
        SELECT r.seq, k.kek_version, k.wrapped
        FROM data_keys AS k JOIN records AS r ON r.record_id = k.record_id
        ORDER BY r.seq;
    DROP TABLE data_keys;
    ALTER TABLE data_keys_2 RENAME TO data_keys;
    CREATE TABLE tokens_2(
        generation INTEGER,
        index_id INTEGER,
        token INTEGER,
        seq INTEGER,
        PRIMARY KEY(generation, index_id, token, seq)
    ) WITHOUT ROWID;
    INSERT INTO tokens_2(generation, index_id, token, seq)
        SELECT r.seq >> 16, t.index_id, t.token, r.seq
        FROM tokens AS t JOIN records AS r ON r.record_id = t.record_id
        ORDER BY 1, 2, 3, 4;
    DROP TABLE tokens;
    ALTER TABLE tokens_2 RENAME TO tokens;
    """,
    # Version 3: the access log becomes a Merkle tree (custodes.audit): entries, the
    # hashes of completed subtrees, subject references, sealed details and signed
    # checkpoints. The flat log of version 1 was never hashed into a tree and cannot be
    # converted, so a file whose old log holds entries is refused (the CHECK below fails
    # and the whole migration rolls back) rather than lose its audit history.
    #
    # The triggers are not a defence against someone holding the file, who can drop
    # them (the signed checkpoints catch that); they stop a stray or injected statement
    # from rewriting history. The BEFORE INSERT ones close INSERT OR REPLACE, which
    # deletes the old row without firing a DELETE trigger.
    """
    CREATE TABLE old_access_log(
        entries INTEGER CONSTRAINT old_access_log_holds_entries CHECK (entries = 0)
    );
    INSERT INTO old_access_log(entries) SELECT count(*) FROM access_log;
    DROP TABLE old_access_log;
    DROP TABLE access_log;
    CREATE TABLE log_entries(idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
    CREATE TABLE log_nodes(
        level INTEGER,
        idx INTEGER,
        hash BLOB NOT NULL,
        PRIMARY KEY(level, idx)
    ) WITHOUT ROWID;
    CREATE TABLE log_subjects(
        commitment BLOB,
        idx INTEGER,
        PRIMARY KEY(commitment, idx)
    ) WITHOUT ROWID;
    CREATE TABLE log_details(idx INTEGER PRIMARY KEY, blob BLOB);
    CREATE TABLE checkpoints(size INTEGER PRIMARY KEY, note BLOB NOT NULL);
    CREATE TRIGGER log_entries_no_update BEFORE UPDATE ON log_entries
    BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
    CREATE TRIGGER log_entries_no_delete BEFORE DELETE ON log_entries
    BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
    CREATE TRIGGER log_entries_no_replace BEFORE INSERT ON log_entries
    WHEN EXISTS (SELECT 1 FROM log_entries WHERE idx = NEW.idx)
    BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
    CREATE TRIGGER log_nodes_no_update BEFORE UPDATE ON log_nodes
    BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
    CREATE TRIGGER log_nodes_no_delete BEFORE DELETE ON log_nodes
    BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
    CREATE TRIGGER log_nodes_no_replace BEFORE INSERT ON log_nodes
    WHEN EXISTS (SELECT 1 FROM log_nodes WHERE level = NEW.level AND idx = NEW.idx)
    BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
    CREATE TRIGGER log_details_erase_only BEFORE UPDATE ON log_details
    WHEN NEW.blob IS NOT NULL OR NEW.idx IS NOT OLD.idx
    BEGIN SELECT RAISE(ABORT, 'sealed details can only be erased'); END;
    CREATE TRIGGER log_details_no_delete BEFORE DELETE ON log_details
    BEGIN SELECT RAISE(ABORT, 'sealed details can only be erased'); END;
    CREATE TRIGGER log_details_no_replace BEFORE INSERT ON log_details
    WHEN EXISTS (SELECT 1 FROM log_details WHERE idx = NEW.idx)
    BEGIN SELECT RAISE(ABORT, 'sealed details can only be erased'); END;
    """,
    # 4: sessions and login failures, so that every server process of a vault shares them.
    """
    CREATE TABLE sessions(
        key BLOB PRIMARY KEY,
        username TEXT NOT NULL,
        role TEXT NOT NULL,
        issued_at REAL NOT NULL,
        expires REAL NOT NULL,
        last_seen REAL NOT NULL,
        client TEXT
    ) WITHOUT ROWID;
    CREATE INDEX sessions_by_account ON sessions(username);
    CREATE TABLE login_failures(
        key TEXT PRIMARY KEY,
        failures INTEGER NOT NULL,
        last_failure REAL NOT NULL
    ) WITHOUT ROWID;
    """,
)
# 6: one-time marks (spend): a value such as a passkey challenge is accepted once, by
# whichever process sees it first.
_SPENT_SCHEMA = "CREATE TABLE spent(key BLOB PRIMARY KEY, until REAL NOT NULL) WITHOUT ROWID"

# 5: the access log moves to a file of its own (see _move_log). A server commits to
# the log with every read, and SQLite drops a connection's whole page cache for a file
# whenever another connection has written to that file: with the log beside the records,
# every search would start cold. The records' file now changes only when records,
# accounts or sessions do.
# 7: the subject index gets the append-only triggers of the other log tables (a row
# deleted there once emptied a person's subject report), and an index by entry, so that
# the verifier can hold the rows against the entries in one ordered pass.
_LOG_SUBJECT_GUARDS = """
CREATE TRIGGER IF NOT EXISTS log.log_subjects_no_update BEFORE UPDATE ON log_subjects
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log.log_subjects_no_delete BEFORE DELETE ON log_subjects
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log.log_subjects_no_replace BEFORE INSERT ON log_subjects
WHEN EXISTS (SELECT 1 FROM log_subjects WHERE commitment = NEW.commitment AND idx = NEW.idx)
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE INDEX IF NOT EXISTS log.log_subjects_by_entry ON log_subjects(idx, commitment);
"""

# 8: the alerts raised on officials' use of the vault (custodes.alerts), in the records'
# file: they are few, and each is written once and acted on a couple of times.
_ALERTS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS alerts("
    "alert_id TEXT PRIMARY KEY, raised_at REAL NOT NULL, body BLOB NOT NULL)",
    "CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts(raised_at, alert_id)",
)

# 9: tokens in a folded and a fresh tree of one key (see _FOLD_FLOOR), each with an
# index by seq (a page of records, an erasure, find their tokens by it; seqs only grow,
# so it is appended to). The generation-keyed rows of version 8 are copied into the
# folded tree in key order, all in one transaction.
_SCHEMA_9_FOLDED = """
CREATE TABLE tokens_9(
    index_id INTEGER,
    token INTEGER,
    seq INTEGER,
    PRIMARY KEY(index_id, token, seq)
) WITHOUT ROWID;
INSERT INTO tokens_9(index_id, token, seq)
    SELECT index_id, token, seq FROM tokens ORDER BY 1, 2, 3;
DROP TABLE tokens;
ALTER TABLE tokens_9 RENAME TO tokens;
CREATE INDEX tokens_by_seq ON tokens(seq);
CREATE TABLE tokens_fresh(
    index_id INTEGER,
    token INTEGER,
    seq INTEGER,
    PRIMARY KEY(index_id, token, seq)
) WITHOUT ROWID;
CREATE INDEX tokens_fresh_by_seq ON tokens_fresh(seq);
CREATE TABLE token_trees(tree TEXT PRIMARY KEY, rows INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO token_trees(tree, rows) SELECT 'tokens', count(*) FROM tokens;
INSERT INTO token_trees(tree, rows) VALUES ('tokens_fresh', 0);
CREATE TABLE token_fold(
    one INTEGER PRIMARY KEY CHECK (one = 1),
    index_id INTEGER,
    token INTEGER,
    seq INTEGER
);
"""

SCHEMA_VERSION = len(_MIGRATIONS) + 5

_LOG_TABLES = ("log_entries", "log_nodes", "log_subjects", "log_details", "checkpoints")
# The log's own file, attached to every connection as schema "log": the same tables and
# append-only triggers that migration 3 created in the main file.
_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS log.log_entries(idx INTEGER PRIMARY KEY, entry BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log.log_nodes(
    level INTEGER,
    idx INTEGER,
    hash BLOB NOT NULL,
    PRIMARY KEY(level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log.log_subjects(
    commitment BLOB,
    idx INTEGER,
    PRIMARY KEY(commitment, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log.log_details(idx INTEGER PRIMARY KEY, blob BLOB);
CREATE TABLE IF NOT EXISTS log.checkpoints(size INTEGER PRIMARY KEY, note BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS log.log_entries_no_update BEFORE UPDATE ON log_entries
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log.log_entries_no_delete BEFORE DELETE ON log_entries
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log.log_entries_no_replace BEFORE INSERT ON log_entries
WHEN EXISTS (SELECT 1 FROM log_entries WHERE idx = NEW.idx)
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log.log_nodes_no_update BEFORE UPDATE ON log_nodes
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log.log_nodes_no_delete BEFORE DELETE ON log_nodes
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log.log_nodes_no_replace BEFORE INSERT ON log_nodes
WHEN EXISTS (SELECT 1 FROM log_nodes WHERE level = NEW.level AND idx = NEW.idx)
BEGIN SELECT RAISE(ABORT, 'the access log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS log.log_details_erase_only BEFORE UPDATE ON log_details
WHEN NEW.blob IS NOT NULL OR NEW.idx IS NOT OLD.idx
BEGIN SELECT RAISE(ABORT, 'sealed details can only be erased'); END;
CREATE TRIGGER IF NOT EXISTS log.log_details_no_delete BEFORE DELETE ON log_details
BEGIN SELECT RAISE(ABORT, 'sealed details can only be erased'); END;
CREATE TRIGGER IF NOT EXISTS log.log_details_no_replace BEFORE INSERT ON log_details
WHEN EXISTS (SELECT 1 FROM log_details WHERE idx = NEW.idx)
BEGIN SELECT RAISE(ABORT, 'sealed details can only be erased'); END;
"""

# SQLite's default limit on bound parameters is 999 on older builds; stay well below.
_IN_CHUNK = 500
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# The log's file, on every connection that attaches it: synchronous and secure_delete
# are set per schema, and an acknowledged access-log entry must survive power loss.
_LOG_PRAGMAS = (
    # Smaller pages than the records': a commit dirties one page in each of the log's
    # tables (and one per subject, at random), so every byte of page written per entry
    # is WAL written per audited read.
    "PRAGMA log.page_size=4096",
    "PRAGMA log.journal_mode=WAL",
    "PRAGMA log.synchronous=FULL",
    "PRAGMA log.secure_delete=ON",
    "PRAGMA log.cache_size=-65536",
)

# The usage counters' file (SQLiteStorage._usage_connection): one row per account and
# counter, updated in place.
_USAGE_SCHEMA = (
    "PRAGMA journal_mode=WAL",
    # A commit is not synced; the WAL is synced only at a checkpoint (NORMAL), and a
    # process that dies loses nothing it committed.
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA temp_store=MEMORY",
    "CREATE TABLE IF NOT EXISTS usage("
    " account TEXT NOT NULL, counter TEXT NOT NULL,"
    " window_start INTEGER NOT NULL, total INTEGER NOT NULL,"
    " PRIMARY KEY(account, counter)) WITHOUT ROWID",
    # The distinct subjects an account was shown, per counter, in the current window.
    "CREATE TABLE IF NOT EXISTS usage_subjects("
    " account TEXT NOT NULL, counter TEXT NOT NULL, subject TEXT NOT NULL,"
    " window_start INTEGER NOT NULL,"
    " PRIMARY KEY(account, counter, subject)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS usage_subjects_by_window"
    " ON usage_subjects(account, counter, window_start)",
)
# At most this many subjects a statement, well within SQLite's bound on parameters.
_SUBJECTS_PER_STATEMENT = 1000
# The subjects not noted yet in this window (the earlier windows' notes are deleted first).
_NOTE_SUBJECTS = (
    "INSERT INTO usage_subjects(account, counter, subject, window_start) VALUES {rows}"
    " ON CONFLICT DO NOTHING RETURNING subject"
)
# A later window starts the counter again; an earlier one adds to the stored window.
_CHARGE_USAGE = (
    "INSERT INTO usage(account, counter, window_start, total) VALUES {rows}"
    " ON CONFLICT(account, counter) DO UPDATE SET"
    " total = CASE WHEN usage.window_start >= excluded.window_start"
    " THEN usage.total + excluded.total ELSE excluded.total END,"
    " window_start = max(usage.window_start, excluded.window_start)"
    " RETURNING counter, total"
)

_PRAGMAS = (
    # First, so that a process opening the file while another is switching it to WAL
    # (several server workers opening a new vault at once) waits rather than fails.
    "PRAGMA busy_timeout=10000",
    # Only takes effect on a new, empty file, so it comes before WAL mode is set. Pages
    # of 8 KiB measured fastest for ingest: fewer, shallower pages for the appended
    # records and fewer commits' worth of page headers than 4 KiB; 16 KiB was no better.
    "PRAGMA page_size=8192",
    # An acknowledged batch or access-log entry must survive power loss: WAL with
    # synchronous=FULL syncs the log on every commit.
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    # Sorts and temporary indexes could hold tokens or ciphertext; keep them off disk.
    "PRAGMA temp_store=MEMORY",
    # Freed pages are zeroed, so a deleted wrapped key does not linger in the file and
    # crypto-shredding really destroys it.
    "PRAGMA secure_delete=ON",
    # Up to 256 MiB of page cache, allocated as used: the record-id index takes random
    # inserts during ingest (about 60 MiB per million records) and must stay cached.
    "PRAGMA cache_size=-262144",
    # Checkpoint after 256 MiB of WAL rather than 4 MiB: an index page dirtied by many
    # commits is then copied back into the file once, not once per commit. Every commit
    # is still synced to the WAL, so durability is unchanged.
    "PRAGMA wal_autocheckpoint=32768",
    "PRAGMA mmap_size=0",
)

# The reading connection: the same cache and temp-store rules, and no writes at all.
_READER_PRAGMAS = (
    "PRAGMA temp_store=MEMORY",
    "PRAGMA busy_timeout=10000",
    "PRAGMA cache_size=-262144",
    "PRAGMA mmap_size=0",
    "PRAGMA query_only=ON",
)

_Row = tuple[int, str, str, bytes]
_KeyRow = tuple[int, int, bytes]
_TokenRow = tuple[int, int, int]  # index_id, token, seq
# A validated record awaiting its seq: type, payload, KEK version, wrapped key, tokens.
_Prepared = tuple[str, bytes, int, bytes, frozenset[tuple[int, int]]]


class SQLiteStorage:
    """A vault database in one SQLite file (plus its WAL while open).

    Two connections, each behind a lock of its own: one writes (every transaction
    BEGIN IMMEDIATE, behind the cross-process writer lock), the other only reads. WAL
    lets the reader run beside the writer, so a search never waits behind an
    access-log commit and its fsync.
    """

    def __init__(self, path: Path) -> None:
        self._path = Path(path)
        self._lock = threading.Lock()  # the writing connection's
        self._read_lock = threading.Lock()
        self._closed = False
        _create_private_file(self._path)
        self._log_path = log_path(self._path)
        _create_private_file(self._log_path)
        self._writer = _WriterLock(self._path.with_name(self._path.name + "-writer"))
        self._log_checkpointer: _LogCheckpointer | None = None
        self._usage_lock = threading.Lock()
        self._usage: sqlite3.Connection | None = None
        try:
            # isolation_level=None: no implicit transactions; every one is explicit here.
            self._conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the database: {exc}") from exc
        try:
            for pragma in _PRAGMAS:
                self._conn.execute(pragma).fetchall()
            self._attach_log(self._conn)
            for schema in ("main", "log"):
                mode = self._conn.execute(f"PRAGMA {schema}.journal_mode").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ConfigurationError("the database cannot be put in WAL mode")
            self._migrate()
            self._reader = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False
            )
        except BaseException as exc:
            self._conn.close()
            self._writer.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open the database: {exc}") from exc
            raise
        try:
            for pragma in _READER_PRAGMAS:
                self._reader.execute(pragma).fetchall()
            self._attach_log(self._reader)
        except BaseException as exc:
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open the database: {exc}") from exc
            raise

    # -- metadata -----------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        if not isinstance(key, str) or not isinstance(value, bytes):
            raise StorageError("meta key must be str and value bytes")
        self._write(
            lambda c: c.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            ),
            "metadata was not stored",
        )

    # -- records ------------------------------------------------------------------

    def write_batch(self, records: Sequence[SealedRecord]) -> BatchOutcome:
        prepared = _prepare_batch(records)

        def apply(conn: sqlite3.Connection) -> int:
            ids = list(prepared)
            present: set[str] = set()
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                query = _in_list("SELECT record_id FROM records WHERE record_id IN", len(chunk))
                present.update(rid for (rid,) in conn.execute(query, chunk))
            # Inserting in key order fills each b-tree page in one visit; it cuts the
            # pages written per batch and more than pays for the sort.
            new_ids = sorted(rid for rid in ids if rid not in present)
            # Numbered here rather than by SQLite so that keys and tokens can name their
            # record before it is inserted; the write lock is held, so max + 1 is free.
            (last,) = conn.execute("SELECT max(seq) FROM records").fetchone()
            rows: list[_Row] = []
            keys: list[_KeyRow] = []
            tokens: list[_TokenRow] = []
            for seq, rid in enumerate(new_ids, (last or 0) + 1):
                record_type, payload, kek_version, wrapped, pairs = prepared[rid]
                rows.append((seq, rid, record_type, payload))
                keys.append((seq, kek_version, wrapped))
                tokens.extend((index_id, token, seq) for index_id, token in pairs)
            conn.executemany(
                "INSERT INTO records(seq, record_id, record_type, payload) VALUES (?, ?, ?, ?)",
                rows,
            )
            conn.executemany(
                "INSERT INTO data_keys(seq, kek_version, wrapped) VALUES (?, ?, ?)", keys
            )
            _add_tokens(conn, tokens, _ADD_NEW_TOKENS)
            return len(rows)

        if not prepared:
            return BatchOutcome(inserted=0, already_present=len(records))
        inserted = self._write(apply, "the batch was not stored")
        return BatchOutcome(inserted=inserted, already_present=len(records) - inserted)

    def get_records(self, record_ids: Sequence[str]) -> dict[str, StoredRecord]:
        ids = list(dict.fromkeys(record_ids))

        def fetch(conn: sqlite3.Connection) -> dict[str, StoredRecord]:
            found: dict[str, StoredRecord] = {}
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                query = _in_list(
                    "SELECT r.record_id, r.record_type, r.payload, k.kek_version, k.wrapped"
                    " FROM records AS r JOIN data_keys AS k ON k.seq = r.seq"
                    " WHERE r.record_id IN",
                    len(chunk),
                )
                for row in conn.execute(query, chunk):
                    found[row[0]] = stored_record_from_row(row)
            return found

        if not ids:
            return {}
        # One read transaction, so every chunk sees the same snapshot.
        return self._run(fetch, snapshot=len(ids) > _IN_CHUNK)

    def find(self, index_id: int, token: int, limit: int) -> list[str]:
        if limit <= 0:
            return []

        def search(conn: sqlite3.Connection) -> list[str]:
            rows = _find_rows(conn, "r.record_id", "", index_id, token, limit)
            return [rid for (rid,) in rows]

        return self._run(search, snapshot=True)

    def find_records(self, index_id: int, token: int, limit: int) -> list[StoredRecord]:
        if limit <= 0:
            return []

        def search(conn: sqlite3.Connection) -> list[StoredRecord]:
            rows = _find_rows(
                conn,
                "r.record_id, r.record_type, r.payload, k.kek_version, k.wrapped",
                "JOIN data_keys AS k ON k.seq = r.seq",
                index_id,
                token,
                limit,
            )
            return [stored_record_from_row(row) for row in rows]

        return self._run(search, snapshot=True)

    def count_records(self, record_type: str | None = None) -> int:
        if record_type is None:
            row = self._one("SELECT count(*) FROM records")
        else:
            row = self._one("SELECT count(*) FROM records WHERE record_type = ?", (record_type,))
        return int(row[0])

    def record_tokens(
        self, after: int, limit: int
    ) -> list[tuple[int, str, tuple[tuple[int, int], ...]]]:
        if limit <= 0:
            return []

        def page(conn: sqlite3.Connection) -> list[tuple[int, str, tuple[tuple[int, int], ...]]]:
            rows = conn.execute(
                "SELECT seq, record_id FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                (max(after, 0), limit),
            ).fetchall()
            if not rows:
                return []
            # The page's range of seqs in each tree's index by seq, rather than a lookup
            # per record.
            first, last = int(rows[0][0]), int(rows[-1][0])
            held: dict[int, set[tuple[int, int]]] = {int(seq): set() for seq, _ in rows}
            for index_id, token, seq in conn.execute(
                "SELECT index_id, token, seq FROM tokens WHERE seq >= ?1 AND seq <= ?2"
                " UNION ALL SELECT index_id, token, seq FROM tokens_fresh"
                " WHERE seq >= ?1 AND seq <= ?2",
                (first, last),
            ):
                pairs = held.get(int(seq))
                if pairs is not None:
                    pairs.add((int(index_id), int(token)))
            return [(int(seq), str(rid), tuple(sorted(held[int(seq)]))) for seq, rid in rows]

        return self._run(page, snapshot=True)

    def records_page(self, after: int, limit: int) -> list[tuple[int, StoredRecord]]:
        if limit <= 0:
            return []
        rows = self._rows(
            "SELECT r.seq, r.record_id, r.record_type, r.payload, k.kek_version, k.wrapped"
            " FROM records AS r JOIN data_keys AS k ON k.seq = r.seq"
            " WHERE r.seq > ? ORDER BY r.seq LIMIT ?",
            (max(after, 0), limit),
        )
        return [(int(row[0]), stored_record_from_row(row[1:])) for row in rows]

    def rekey_records(self, changes: Sequence[Rekeyed]) -> int:
        checked = checked_rekeyed(changes)

        def apply(conn: sqlite3.Connection) -> int:
            applied = 0
            tokens: list[_TokenRow] = []
            for change in checked:
                row = conn.execute(
                    "SELECT r.seq, k.wrapped FROM records AS r JOIN data_keys AS k"
                    " ON k.seq = r.seq WHERE r.record_id = ?",
                    (change.record_id,),
                ).fetchone()
                if row is None or bytes(row[1]) != change.expected_wrapped:
                    continue
                seq = int(row[0])
                conn.execute(
                    "UPDATE data_keys SET kek_version = ?, wrapped = ? WHERE seq = ?",
                    (change.kek_version, change.wrapped_key, seq),
                )
                if change.payload is not None:
                    conn.execute(
                        "UPDATE records SET payload = ? WHERE seq = ?", (change.payload, seq)
                    )
                tokens.extend((i, t, seq) for i, t in change.tokens)
                applied += 1
            _add_tokens(conn, tokens, _ADD_TOKENS)
            return applied

        if not checked:
            return 0
        return self._write(apply, "the rotated keys were not stored")

    def drop_tokens(self, index_ids: Collection[int]) -> int:
        ids = sorted({i for i in index_ids if _fits_int64(i)})

        def drop(conn: sqlite3.Connection) -> int:
            dropped = 0
            # By index: a range of each tree's key, never a scan.
            for tree in _TOKEN_TREES:
                for index_id in ids:
                    gone = conn.execute(
                        f"DELETE FROM {tree} WHERE index_id = ?",  # noqa: S608 - fixed names
                        (index_id,),
                    ).rowcount
                    _count_rows(conn, tree, -gone)
                    dropped += gone
            return dropped

        if not ids:
            return 0
        return self._write(drop, "the retired tokens were not deleted")

    def key_census(self) -> KeyCensus:
        def count(conn: sqlite3.Connection) -> KeyCensus:
            keks = conn.execute(
                "SELECT kek_version, count(*) FROM data_keys GROUP BY kek_version"
            ).fetchall()
            generations = [
                (int(byte or "0", 16), n)
                for byte, n in conn.execute(
                    "SELECT hex(substr(payload, 2, 1)), count(*) FROM records GROUP BY 1"
                )
            ]
            tokens = conn.execute(
                "SELECT index_id, count(*) FROM (SELECT index_id FROM tokens"
                " UNION ALL SELECT index_id FROM tokens_fresh) GROUP BY index_id"
            ).fetchall()
            return census_of(keks, generations, tokens)

        return self._run(count, snapshot=True)

    def erase_records(self, record_ids: Sequence[str]) -> int:
        ids = list(dict.fromkeys(record_ids))

        def erase(conn: sqlite3.Connection) -> int:
            # secure_delete is on for this file (see _PRAGMAS): the freed cells and pages
            # are overwritten with zeros, in the file and in the WAL frames written now.
            found: list[tuple[int, str]] = []
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                query = _in_list(
                    "SELECT seq, record_id FROM records WHERE record_id IN", len(chunk)
                )
                found.extend((int(seq), str(rid)) for seq, rid in conn.execute(query, chunk))
            for seq, _ in found:
                for tree in _TOKEN_TREES:
                    gone = conn.execute(
                        f"DELETE FROM {tree} WHERE seq = ?",  # noqa: S608 - fixed names
                        (seq,),
                    ).rowcount
                    _count_rows(conn, tree, -gone)
                conn.execute("DELETE FROM data_keys WHERE seq = ?", (seq,))
                conn.execute("DELETE FROM records WHERE seq = ?", (seq,))
            return len(found)

        if not ids:
            return 0
        erased = self._write(erase, "the records were not erased")
        if erased:
            # The WAL may still hold the pages as they were before the erasure (frames of
            # the ingest that wrote them): copied back and cut to nothing, so that no
            # earlier frame survives in the WAL file.
            self._truncate_wal()
        return erased

    def _truncate_wal(self) -> None:
        with self._lock:
            if self._closed:
                raise StorageError("storage is closed")
            self._writer.acquire()
            try:
                self._conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"the erased records were not checkpointed: {exc}") from exc
            finally:
                self._writer.release()

    # -- accounts -----------------------------------------------------------------

    def add_account(self, account: AccountRow) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            taken = conn.execute(
                "SELECT 1 FROM accounts WHERE username = ?", (account.username,)
            ).fetchone()
            if taken is not None:
                raise ConfigurationError("an account with that username already exists")
            conn.execute(
                "INSERT INTO accounts(username, role, password_hash, attributes, created_at,"
                " disabled) VALUES (?, ?, ?, ?, ?, ?)",
                _account_params(account),
            )

        self._write(insert, "the account was not stored")

    def update_account(self, account: AccountRow) -> None:
        def update(conn: sqlite3.Connection) -> None:
            username, *rest = _account_params(account)
            cur = conn.execute(
                "UPDATE accounts SET role = ?, password_hash = ?, attributes = ?,"
                " created_at = ?, disabled = ? WHERE username = ?",
                (*rest, username),
            )
            if cur.rowcount == 0:
                raise RecordNotFound("no account with that username")

        self._write(update, "the account was not stored")

    def replace_account(self, expected: AccountRow, account: AccountRow) -> bool:
        if account.username != expected.username:
            raise ConfigurationError("an account is replaced only by a row of the same name")
        want = _account_params(expected)

        def swap(conn: sqlite3.Connection) -> bool:
            # Compared in one BEGIN IMMEDIATE transaction, behind the cross-process
            # writer lock: no other process can write between the read and the update.
            stored = conn.execute(
                "SELECT username, role, password_hash, attributes, created_at, disabled"
                " FROM accounts WHERE username = ?",
                (expected.username,),
            ).fetchone()
            if stored is None or _account_params(account_from_row(stored)) != want:
                return False
            username, *rest = _account_params(account)
            conn.execute(
                "UPDATE accounts SET role = ?, password_hash = ?, attributes = ?,"
                " created_at = ?, disabled = ? WHERE username = ?",
                (*rest, username),
            )
            return True

        return self._write(swap, "the account was not stored")

    def get_account(self, username: str) -> AccountRow | None:
        row = self._one(
            "SELECT username, role, password_hash, attributes, created_at, disabled"
            " FROM accounts WHERE username = ?",
            (username,),
        )
        return None if row is None else account_from_row(row)

    def list_accounts(self) -> list[AccountRow]:
        return self._run(
            lambda c: [
                account_from_row(row)
                for row in c.execute(
                    "SELECT username, role, password_hash, attributes, created_at, disabled"
                    " FROM accounts ORDER BY username"
                )
            ]
        )

    # -- sessions and login throttling ------------------------------------------------

    def put_session(self, session: SessionRow) -> None:
        row = checked_session(session)

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError:
                raise ConfigurationError("a session with that key already exists") from None

        self._write(insert, "the session was not stored")

    def get_session(self, key: bytes) -> SessionRow | None:
        row = self._one(
            "SELECT key, username, role, issued_at, expires, last_seen, client"
            " FROM sessions WHERE key = ?",
            (key,),
        )
        return None if row is None else SessionRow(bytes(row[0]), *row[1:])

    def count_account_sessions(self, username: str) -> int:
        row = self._one("SELECT count(*) FROM sessions WHERE username = ?", (username,))
        return int(row[0])

    def get_session_account(self, key: bytes) -> tuple[SessionRow, AccountRow | None] | None:
        row = self._one(
            "SELECT s.key, s.username, s.role, s.issued_at, s.expires, s.last_seen, s.client,"
            " a.username, a.role, a.password_hash, a.attributes, a.created_at, a.disabled"
            " FROM sessions s LEFT JOIN accounts a ON a.username = s.username WHERE s.key = ?",
            (key,),
        )
        if row is None:
            return None
        session = SessionRow(bytes(row[0]), *row[1:7])
        return session, None if row[7] is None else account_from_row(row[7:])

    def touch_session(self, key: bytes, last_seen: float) -> None:
        self._write(
            lambda c: c.execute(
                "UPDATE sessions SET last_seen = ? WHERE key = ? AND last_seen < ?",
                (last_seen, key, last_seen),
            ),
            "the session was not updated",
        )

    def end_session(self, key: bytes) -> bool:
        return bool(
            self._write(
                lambda c: c.execute("DELETE FROM sessions WHERE key = ?", (key,)).rowcount,
                "the session was not ended",
            )
        )

    def end_sessions(self, username: str) -> int:
        return int(
            self._write(
                lambda c: (
                    c.execute("DELETE FROM sessions WHERE username = ?", (username,)).rowcount
                ),
                "the sessions were not ended",
            )
        )

    def purge_sessions(self, now: float, idle: float) -> int:
        return int(
            self._write(
                lambda c: (
                    c.execute(
                        "DELETE FROM sessions WHERE expires <= ? OR last_seen < ?",
                        (now, now - idle),
                    ).rowcount
                ),
                "stale sessions were not purged",
            )
        )

    def count_sessions(self) -> int:
        return int(self._one("SELECT count(*) FROM sessions")[0])

    def list_sessions(self) -> list[SessionRow]:
        rows = self._run(
            lambda c: c.execute(
                "SELECT key, username, role, issued_at, expires, last_seen, client"
                " FROM sessions ORDER BY username, key"
            ).fetchall()
        )
        return [SessionRow(bytes(row[0]), *row[1:]) for row in rows]

    def login_failures(self, keys: Sequence[str]) -> dict[str, tuple[int, float]]:
        wanted = list(dict.fromkeys(keys))[:_IN_CHUNK]
        return self._run(lambda c: _login_counts(c, wanted))

    def admit_login_attempt(
        self, keys: Sequence[str], now: float, admit: Callable[[LoginCounts], bool]
    ) -> bool:
        wanted = list(dict.fromkeys(keys))[:_IN_CHUNK]

        def count(conn: sqlite3.Connection) -> bool:
            # One BEGIN IMMEDIATE transaction behind the cross-process writer lock: the
            # counts admit() sees are the ones this attempt adds to, in every process.
            if not admit(_login_counts(conn, wanted)):
                return False
            conn.executemany(
                "INSERT INTO login_failures(key, failures, last_failure) VALUES (?, 1, ?)"
                " ON CONFLICT(key) DO UPDATE SET failures = failures + 1,"
                " last_failure = excluded.last_failure",
                [(key, now) for key in wanted],
            )
            return True

        return bool(self._write(count, "the login attempt was not counted"))

    def forgive_login_attempt(self, key: str) -> None:
        def forgive(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE login_failures SET failures = failures - 1 WHERE key = ?", (key,))
            conn.execute("DELETE FROM login_failures WHERE key = ? AND failures <= 0", (key,))

        self._write(forgive, "the login attempt was not forgiven")

    def clear_login_failures(self, key: str) -> None:
        self._write(
            lambda c: c.execute("DELETE FROM login_failures WHERE key = ?", (key,)),
            "the failed logins were not cleared",
        )

    def purge_login_failures(self, before: float) -> int:
        return int(
            self._write(
                lambda c: (
                    c.execute(
                        "DELETE FROM login_failures WHERE last_failure < ?", (before,)
                    ).rowcount
                ),
                "old failed logins were not purged",
            )
        )

    def spend(self, key: bytes, now: float, keep: float) -> bool:
        key = checked_spend(key, now, keep)

        def mark(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM spent WHERE until <= ?", (now,))
            inserted = conn.execute(
                "INSERT INTO spent(key, until) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                (key, now + keep),
            ).rowcount
            return bool(inserted)

        return self._write(mark, "the one-time mark was not stored")

    # -- access log ---------------------------------------------------------------

    def log_append(self, batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        # Every failure, whatever its cause, must refuse the access being recorded.
        checked = checked_log_append(batch)
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the access log is closed")
            conn = self._conn
            try:
                self._writer.acquire()
                conn.execute("BEGIN IMMEDIATE")
            except (sqlite3.Error, OSError) as exc:
                self._writer.release()
                raise AuditUnavailable(f"the access log cannot be written: {exc}") from exc
            try:
                # Read under the write lock: another process with the same file may
                # have appended since this batch was built. rebuild takes up its entries
                # through the reading connection, which WAL lets read past this lock.
                stored = _stored_log_size(conn)
                if checked.first_index != stored:
                    if rebuild is None:
                        raise LogMoved("the access log moved: another writer appended")
                    # The nodes are left to rebuild to read: in this process, the
                    # reading connection costs no round trip.
                    checked = checked_log_append(rebuild(stored, {}))
                    if checked.first_index != stored:
                        raise LogMoved("the access log moved: another writer appended")
                _insert_log_batch(conn, checked)
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    # sqlite3 messages name the failure, never a bound value.
                    raise AuditUnavailable(
                        f"the access log did not record the batch: {exc}"
                    ) from exc
                raise
            finally:
                self._writer.release()
            if self._log_checkpointer is None:
                self._log_checkpointer = _LogCheckpointer(self._log_path)
                self._log_checkpointer.start()

    def log_size(self) -> int:
        # Read, not cached: other processes may share this file and append to its log.
        return self._run(_stored_log_size)

    def log_entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        # Not a generator itself: the end of an open range is the size at the call, not
        # at the first next(), and a closed backend is refused at once.
        stop = self._run(_stored_log_size) if end is None else min(end, _INT64_MAX)
        return self._stream_entries(max(start, 0), stop)

    def _stream_entries(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        # Page by index and yield outside the lock: a slow reader (a verifier streaming
        # the whole log) must not hold up the writer, and may append while it reads.
        while start < stop:
            page = self._entry_page(start, stop)
            for index, entry in page:
                yield index, bytes(entry)
            if len(page) < LOG_PAGE:
                return
            start = page[-1][0] + 1

    def _entry_page(self, start: int, stop: int) -> list[Any]:
        return self._run(
            lambda c: c.execute(
                "SELECT idx, entry FROM log_entries WHERE idx >= ? AND idx < ?"
                " ORDER BY idx LIMIT ?",
                (start, stop, LOG_PAGE),
            ).fetchall()
        )

    def log_node(self, level: int, index: int) -> bytes | None:
        if not _fits_int64(level, index):
            return None
        row = self._one("SELECT hash FROM log_nodes WHERE level = ? AND idx = ?", (level, index))
        return None if row is None else bytes(row[0])

    def log_nodes(self, positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        by_level: dict[int, list[int]] = {}
        for level, index in sorted(
            {(lv, i) for lv, i in positions if 0 <= lv <= 62 and 0 <= i <= _INT64_MAX}
        ):
            by_level.setdefault(level, []).append(index)

        # One query a level (and a few hundred indexes), each planned as seeks of the
        # primary key: `level = ? AND idx IN (...)`. A row-value IN list of (level, idx)
        # pairs is not planned as seeks (it scanned the whole table), and a query a node
        # costs a statement's run in Python for each: the proofs for a page of entries
        # want thousands.
        def fetch(conn: sqlite3.Connection) -> dict[tuple[int, int], bytes]:
            found: dict[tuple[int, int], bytes] = {}
            for level, indexes in by_level.items():
                for start in range(0, len(indexes), _IN_CHUNK):
                    chunk = indexes[start : start + _IN_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    for index, digest in conn.execute(
                        f"SELECT idx, hash FROM log_nodes WHERE level = ? AND idx IN ({marks})",  # noqa: S608
                        (level, *chunk),
                    ):
                        found[level, int(index)] = bytes(digest)
            return found

        return self._run(fetch)

    def log_subject_entries(self, commitment: bytes) -> list[int]:
        return self._run(
            lambda c: [
                int(index)
                for (index,) in c.execute(
                    "SELECT idx FROM log_subjects WHERE commitment = ? ORDER BY idx",
                    (commitment,),
                )
            ]
        )

    def log_subject_rows(
        self, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        stop = _INT64_MAX if end is None else min(end, _INT64_MAX)
        return self._stream_subject_rows(max(start, 0), stop)

    def _stream_subject_rows(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        # Paged by (index, commitment) through the index by entry, yielding outside the
        # lock, like the entries themselves.
        after: tuple[int, bytes] | None = None
        while True:
            if after is None:
                sql = (
                    "SELECT idx, commitment FROM log_subjects WHERE idx >= ? AND idx < ?"
                    " ORDER BY idx, commitment LIMIT ?"
                )
                params: tuple[object, ...] = (start, stop, LOG_PAGE)
            else:
                sql = (
                    "SELECT idx, commitment FROM log_subjects"
                    " WHERE (idx, commitment) > (?, ?) AND idx < ?"
                    " ORDER BY idx, commitment LIMIT ?"
                )
                params = (after[0], after[1], stop, LOG_PAGE)
            page = self._rows(sql, params)
            for index, commitment in page:
                yield int(index), _blob(commitment)
            if len(page) < LOG_PAGE:
                return
            after = (int(page[-1][0]), page[-1][1])

    def _rows(self, sql: str, params: tuple[object, ...]) -> list[Any]:
        return self._run(lambda c: c.execute(sql, params).fetchall())

    def log_detail(self, index: int) -> bytes | None:
        if not _fits_int64(index):
            return None
        row = self._one("SELECT blob FROM log_details WHERE idx = ?", (index,))
        return None if row is None or row[0] is None else bytes(row[0])

    def log_detail_range(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        start, end = max(start, 0), min(end, 2**63 - 1)
        while start < end:
            page: list[tuple[int, bytes]] = self._run(
                functools.partial(_detail_page, start=start, end=end)
            )
            for index, blob in page:
                yield int(index), bytes(blob)
            if len(page) < LOG_PAGE:
                return
            start = int(page[-1][0]) + 1

    def put_checkpoint(self, size: int, note: bytes) -> None:
        checked_checkpoint(size, note)
        # An upsert, not INSERT OR REPLACE: the row is updated in place, never deleted.
        self._write(
            lambda c: c.execute(
                "INSERT INTO checkpoints(size, note) VALUES (?, ?)"
                " ON CONFLICT(size) DO UPDATE SET note = excluded.note",
                (size, note),
            ),
            "the checkpoint was not stored",
        )

    def checkpoints(self) -> list[tuple[int, bytes]]:
        return self._run(
            lambda c: [
                (int(size), bytes(note))
                for size, note in c.execute("SELECT size, note FROM checkpoints ORDER BY size")
            ]
        )

    # -- usage --------------------------------------------------------------------

    def charge_usage(self, account: str, charges: Sequence[tuple[str, int, int]]) -> list[int]:
        checked = checked_charges(charges)
        if not checked:
            return []
        with self._usage_lock:
            if self._closed:
                raise StorageError("usage was not charged: storage is closed")
            conn = self._usage_connection()
            # One statement, its own transaction.
            statement = _CHARGE_USAGE.format(rows=", ".join(["(?, ?, ?, ?)"] * len(checked)))
            params = [value for charge in checked for value in (account, *charge)]
            try:
                rows = conn.execute(statement, params).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"usage was not charged: {exc}") from exc
            totals = {str(counter): int(total) for counter, total in rows}
            return [totals[counter] for counter, _, _ in checked]

    def note_subjects(self, account: str, counter: str, start: int, subjects: Sequence[str]) -> int:
        checked = checked_subjects(start, subjects)
        with self._usage_lock:
            if self._closed:
                raise StorageError("usage was not charged: storage is closed")
            conn = self._usage_connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute(
                        "DELETE FROM usage_subjects"
                        " WHERE account = ? AND counter = ? AND window_start < ?",
                        (account, counter, start),
                    )
                    new = 0
                    for first in range(0, len(checked), _SUBJECTS_PER_STATEMENT):
                        part = checked[first : first + _SUBJECTS_PER_STATEMENT]
                        statement = _NOTE_SUBJECTS.format(
                            rows=", ".join(["(?, ?, ?, ?)"] * len(part))
                        )
                        params = [v for subject in part for v in (account, counter, subject, start)]
                        new += len(conn.execute(statement, params).fetchall())
                    [(_, total)] = conn.execute(
                        _CHARGE_USAGE.format(rows="(?, ?, ?, ?)"), (account, counter, start, new)
                    ).fetchall()
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StorageError(f"usage was not charged: {exc}") from exc
            return int(total)

    def _usage_connection(self) -> sqlite3.Connection:
        """The counters' own file, opened at the first charge. Apart from the records'
        file, whose every write would empty each reader's page cache for it, and synced
        less: in WAL mode with synchronous=NORMAL a commit survives the process, and a
        crash of the machine loses at most the last moments' charges."""
        if self._usage is None:
            path = usage_path(self._path)
            _create_private_file(path)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            try:
                for statement in _USAGE_SCHEMA:
                    conn.execute(statement).fetchall()
            except BaseException:
                conn.close()
                raise
            self._usage = conn
        return self._usage

    # -- alerts -------------------------------------------------------------------

    def put_alert(self, row: AlertRow) -> bool:
        alert_id, raised_at, body = checked_alert(row)
        return self._write(
            lambda c: (
                c.execute(
                    "INSERT INTO alerts(alert_id, raised_at, body) VALUES (?, ?, ?)"
                    " ON CONFLICT(alert_id) DO NOTHING",
                    (alert_id, raised_at, body),
                ).rowcount
                == 1
            ),
            "the alert was not stored",
        )

    def replace_alert(self, expected: AlertRow, row: AlertRow) -> bool:
        alert_id, raised_at, body = checked_alert(row)
        _, was_raised, was = checked_alert(expected)
        if alert_id != expected.alert_id:
            raise StorageError("an alert is replaced only by a row of the same id")
        return self._write(
            lambda c: (
                c.execute(
                    "UPDATE alerts SET raised_at = ?, body = ?"
                    " WHERE alert_id = ? AND raised_at = ? AND body = ?",
                    (raised_at, body, alert_id, was_raised, was),
                ).rowcount
                == 1
            ),
            "the alert was not stored",
        )

    def get_alert(self, alert_id: str) -> AlertRow | None:
        row = self._one(
            "SELECT alert_id, raised_at, body FROM alerts WHERE alert_id = ?", (alert_id,)
        )
        return None if row is None else AlertRow(str(row[0]), float(row[1]), bytes(row[2]))

    def list_alerts(self, limit: int) -> list[AlertRow]:
        rows = self._run(
            lambda c: c.execute(
                "SELECT alert_id, raised_at, body FROM alerts"
                " ORDER BY raised_at DESC, alert_id DESC LIMIT ?",
                (max(int(limit), 0),),
            ).fetchall()
        )
        return [AlertRow(str(a), float(t), bytes(b)) for a, t, b in rows]

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        with self._lock, self._read_lock, self._usage_lock:
            if self._closed:
                return
            self._closed = True
            if self._usage is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._usage.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                self._usage.close()
            if self._log_checkpointer is not None:
                self._log_checkpointer.stop()
            with contextlib.suppress(AttributeError):  # opening failed before the reader
                self._reader.close()
            try:
                # Fold each WAL back into its file and truncate it, so that at rest the
                # vault is its two database files.
                self._conn.execute("PRAGMA main.wal_checkpoint(TRUNCATE)").fetchall()
                self._conn.execute("PRAGMA log.wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error:
                # The WAL is itself durable; a checkpoint that cannot run now (another
                # reader, a read-only file) will run on a later open.
                pass
            finally:
                self._conn.close()
                self._writer.close()

    # -- internals ----------------------------------------------------------------

    def _migrate(self) -> None:
        conn = self._conn
        if _schema_version(conn) == SCHEMA_VERSION:
            return
        with self._writer.held():
            self._migrate_locked(conn)

    def _migrate_locked(self, conn: sqlite3.Connection) -> None:
        # Read again under the write lock: another process may have migrated since.
        version = _schema_version(conn)
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the database schema is version {version}; this software knows only"
                f" up to {SCHEMA_VERSION}"
            )
        if version < len(_MIGRATIONS):
            _in_transaction(conn, lambda: _run_scripts(conn, version))
        if version < len(_MIGRATIONS) + 1:
            _move_log(conn)
        if version < len(_MIGRATIONS) + 2:

            def add_spent() -> None:
                conn.execute(_SPENT_SCHEMA)
                _set_version(conn, len(_MIGRATIONS) + 2)

            _in_transaction(conn, add_spent)
        if version < len(_MIGRATIONS) + 3:

            def guard_subjects() -> None:
                # IF NOT EXISTS throughout: the log's file commits apart from the main
                # one, so an interrupted step may find its triggers made already.
                for statement in _split_script(_LOG_SUBJECT_GUARDS):
                    conn.execute(statement)
                _set_version(conn, len(_MIGRATIONS) + 3)

            _in_transaction(conn, guard_subjects)
        if version < len(_MIGRATIONS) + 4:

            def add_alerts() -> None:
                for statement in _ALERTS_SCHEMA:
                    conn.execute(statement)
                _set_version(conn, len(_MIGRATIONS) + 4)

            _in_transaction(conn, add_alerts)
        if version < len(_MIGRATIONS) + 5:

            def fold_tokens() -> None:
                # Only the generation-keyed layout is converted: a file whose tokens are
                # in two trees already (its version set back by hand) keeps them.
                folded = conn.execute(
                    "SELECT 1 FROM main.sqlite_schema WHERE type = 'table'"
                    " AND name = 'tokens_fresh'"
                ).fetchone()
                if folded is None:
                    for statement in _split_script(_SCHEMA_9_FOLDED):
                        conn.execute(statement)
                _set_version(conn, len(_MIGRATIONS) + 5)

            _in_transaction(conn, fold_tokens)

    def _attach_log(self, conn: sqlite3.Connection) -> None:
        conn.execute("ATTACH DATABASE ? AS log", (str(self._log_path),))
        for pragma in _LOG_PRAGMAS:
            conn.execute(pragma).fetchall()

    def _run(self, action: Callable[[sqlite3.Connection], _T], *, snapshot: bool = False) -> _T:
        """Run a read on the reading connection (snapshot: in one read transaction)."""
        with self._read_lock:
            if self._closed:
                raise StorageError("storage is closed")
            reader = self._reader
            try:
                if not snapshot:
                    return action(reader)
                reader.execute("BEGIN")
                try:
                    return action(reader)
                finally:
                    reader.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"database read failed: {exc}") from exc

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        """The first row of a query, or None."""
        return self._run(lambda c: c.execute(sql, params).fetchone())

    def _write(self, action: Callable[[sqlite3.Connection], _T], failure: str) -> _T:
        """Run action in one BEGIN IMMEDIATE transaction; on any error, roll back."""
        with self._lock:
            if self._closed:
                raise StorageError(f"{failure}: storage is closed")
            conn = self._conn
            try:
                self._writer.acquire()
                conn.execute("BEGIN IMMEDIATE")
            except (sqlite3.Error, OSError) as exc:
                self._writer.release()
                raise StorageError(f"{failure}: {exc}") from exc
            try:
                result = action(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                _rollback(conn)
                if isinstance(exc, sqlite3.Error):
                    # sqlite3 messages name the failure, never a bound value.
                    raise StorageError(f"{failure}: {exc}") from exc
                raise
            finally:
                self._writer.release()
            return result


class _LogCheckpointer(threading.Thread):
    """Copies the access log's WAL back into its file every second, beside the writers.

    Left to the committing connection, a checkpoint runs inside some appender's commit
    once the WAL holds 32,768 pages: at a thousand audited reads a second that is a few
    hundred MB every few seconds, copied while every appender of the process waits. A
    PASSIVE checkpoint on a connection of its own takes no write lock, so commits go on
    while it copies, and the WAL stays small enough to be reused from its start.
    """

    INTERVAL = 1.0

    def __init__(self, log_file: Path) -> None:
        super().__init__(name="custodes-log-checkpoint", daemon=True)
        self._log_file = log_file
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self._log_file, isolation_level=None, check_same_thread=False)
        except sqlite3.Error:
            return  # the writer's own automatic checkpoints still run
        try:
            conn.execute("PRAGMA synchronous=FULL").fetchall()
            conn.execute("PRAGMA busy_timeout=1000").fetchall()
            while not self._stopping.wait(self.INTERVAL):
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join()


class _WriterLock:
    """An flock on a file beside the database, held around every write transaction.

    SQLite waits for a write lock held by another process by sleeping and polling (1, 2,
    5, 10 ms and longer), so server processes sharing a vault would sleep past each
    other's short commits; the kernel hands a released flock to its next waiter at once.
    Taken only under the storage's own thread lock: an flock does not exclude threads
    sharing its descriptor.
    """

    def __init__(self, path: Path) -> None:
        self._held = False
        try:
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open the writer lock file: {exc.strerror}") from None

    def acquire(self) -> None:
        if self._fd is None:
            raise OSError("the writer lock is closed")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._held = True

    def release(self) -> None:
        if self._held and self._fd is not None:
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        if self._fd is not None:
            self.release()
            os.close(self._fd)
            self._fd = None


def _create_private_file(path: Path) -> None:
    """Create the database file owner-only before SQLite opens it; the WAL and shared
    memory files take their mode from it."""
    if not path.parent.is_dir():
        raise ConfigurationError("the database directory does not exist")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise StorageError(f"cannot create the database file: {exc.strerror}") from exc
    os.close(fd)


def _schema_version(conn: sqlite3.Connection) -> int:
    has_meta = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if has_meta is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (SCHEMA_VERSION_KEY,)).fetchone()
    if row is None:
        raise ConfigurationError("the database has no schema version: not a custodes vault")
    try:
        return int(bytes(row[0]).decode("ascii"))
    except (TypeError, ValueError):
        raise ConfigurationError("the database schema version is unreadable") from None


def _stored_log_size(conn: sqlite3.Connection) -> int:
    # Indexes run from 0 without gaps (log_append checks first_index, the triggers
    # refuse deletes), so the size is the last index + 1: one seek, not a count.
    (last,) = conn.execute("SELECT max(idx) FROM log_entries").fetchone()
    return 0 if last is None else int(last) + 1


def _blob(value: Any) -> bytes:
    # A row written by hand may hold text where a blob belongs: it is then simply a
    # commitment that matches nothing, for the verifier to report.
    return value.encode() if isinstance(value, str) else bytes(value)


def _fits_int64(*values: int) -> bool:
    return all(_INT64_MIN <= value <= _INT64_MAX for value in values)


def log_path(database: Path) -> Path:
    """The access log's file beside a vault database."""
    return database.with_name(database.name + "-log")


def usage_path(database: Path) -> Path:
    """The file of the officials' usage counters beside a vault database."""
    return database.with_name(database.name + "-usage")


def _in_transaction(conn: sqlite3.Connection, action: Callable[[], object]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        action()
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _set_version(conn: sqlite3.Connection, version: int) -> None:
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (?, ?)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (SCHEMA_VERSION_KEY, str(version).encode("ascii")),
    )


def _detail_page(conn: sqlite3.Connection, *, start: int, end: int) -> list[tuple[int, bytes]]:
    rows = conn.execute(
        "SELECT idx, blob FROM log_details WHERE idx >= ? AND idx < ?"
        " AND blob IS NOT NULL ORDER BY idx LIMIT ?",
        (start, end, LOG_PAGE),
    ).fetchall()
    return [(int(index), bytes(blob)) for index, blob in rows]


def _run_scripts(conn: sqlite3.Connection, version: int) -> None:
    for script in _MIGRATIONS[version:]:
        for statement in _split_script(script):
            conn.execute(statement)
    _set_version(conn, len(_MIGRATIONS))


def _move_log(conn: sqlite3.Connection) -> None:
    """Migration 5: the access log's tables move from the main file to the log's own.

    Two transactions, because a transaction over two WAL files is atomic in each file,
    not across them: first the log's file gets its tables and a copy of every row (all
    or nothing), then the main file drops its tables. Interrupted between the two, the
    next open finds the copy made and only drops; no entry is lost or doubled.
    """

    def copy() -> None:
        for statement in _split_script(_LOG_SCHEMA):
            conn.execute(statement)
        copied = conn.execute("SELECT 1 FROM log.log_entries LIMIT 1").fetchone() is not None
        if copied or not _has_table(conn, "main", "log_entries"):
            return
        for table in _LOG_TABLES:
            conn.execute(f"INSERT INTO log.{table} SELECT * FROM main.{table}")  # noqa: S608 - fixed names

    def drop() -> None:
        for table in _LOG_TABLES:
            conn.execute(f"DROP TABLE IF EXISTS main.{table}")
        _set_version(conn, len(_MIGRATIONS) + 1)

    _in_transaction(conn, copy)
    _in_transaction(conn, drop)


def _has_table(conn: sqlite3.Connection, schema: str, name: str) -> bool:
    row = conn.execute(
        f"SELECT 1 FROM {schema}.sqlite_master WHERE type = 'table' AND name = ?",  # noqa: S608 - fixed names
        (name,),
    ).fetchone()
    return row is not None


def _split_script(script: str) -> list[str]:
    """Statements of a migration script; executescript would commit on its own."""
    statements: list[str] = []
    pending = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if pending.strip():
        raise ConfigurationError("a schema migration ends with an incomplete statement")
    return statements


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite rolls back by itself after some errors (a full disk, an I/O error); there
    # is then no transaction left to end.
    with contextlib.suppress(sqlite3.Error):
        conn.execute("ROLLBACK")


def _in_list(head: str, count: int) -> str:
    """A query ending in a list of count placeholders; only placeholders are spliced in."""
    return f"{head} ({','.join('?' * count)})"


# The seqs of a token: one probe of each token tree, whatever the population (UNION, not
# UNION ALL: a row is never in both, but a seq counted twice would repeat a record).
_BUCKET_SEQS = (
    "SELECT seq FROM tokens WHERE index_id = ?1 AND token = ?2"
    " UNION SELECT seq FROM tokens_fresh WHERE index_id = ?1 AND token = ?2"
)


def _find_rows(
    conn: sqlite3.Connection, columns: str, join: str, index_id: int, token: int, limit: int
) -> list[Any]:
    """The records of a token, by id: the token's seqs (_BUCKET_SEQS), then each record by
    its seq (CROSS JOIN keeps the seqs the outer loop). Only the caller's fixed column list
    and join are spliced in."""
    if not _fits_int64(index_id, token):
        return []  # no stored token is outside SQLite's integers
    query = (
        f"SELECT {columns} FROM ({_BUCKET_SEQS}) AS t"  # noqa: S608 - fixed names
        f" CROSS JOIN records AS r {join}"
        " WHERE r.seq = t.seq ORDER BY r.record_id LIMIT ?3"
    )
    return conn.execute(query, (index_id, token, limit)).fetchall()


# Tokens of new records: their seqs are new, so no row can be in the folded tree yet.
_ADD_NEW_TOKENS = "INSERT OR IGNORE INTO tokens_fresh(index_id, token, seq) VALUES (?1, ?2, ?3)"
# Tokens of stored records (a rotation): a row the folded tree holds already is left there.
_ADD_TOKENS = (
    "INSERT OR IGNORE INTO tokens_fresh(index_id, token, seq) SELECT ?1, ?2, ?3"
    " WHERE NOT EXISTS (SELECT 1 FROM tokens WHERE index_id = ?1 AND token = ?2 AND seq = ?3)"
)


def _add_tokens(conn: sqlite3.Connection, rows: list[_TokenRow], statement: str) -> None:
    """Insert token rows into the fresh tree (in key order, so each page is filled in one
    visit; OR IGNORE: a record may carry the same pair twice), then take the fold a step
    further (see _FOLD_FLOOR), in this transaction."""
    rows.sort()
    added = conn.executemany(statement, rows).rowcount
    _count_rows(conn, "tokens_fresh", added)
    _fold_step(conn, len(rows))


def _fold_step(conn: sqlite3.Connection, batch: int) -> None:
    """Move the next _FOLD_STEP rows of the fresh tree past the fold's cursor into the
    folded tree, starting a fold if the fresh tree has grown to its share. Rows written
    behind the cursor meanwhile wait for the next fold."""
    cursor = conn.execute("SELECT index_id, token, seq FROM token_fold").fetchone()
    if cursor is None:
        counts = dict(conn.execute("SELECT tree, rows FROM token_trees").fetchall())
        fresh, folded = int(counts.get("tokens_fresh", 0)), int(counts.get("tokens", 0))
        if fresh < max(_FOLD_FLOOR, math.isqrt(2 * max(batch, 1) * folded)):
            return
        conn.execute("INSERT INTO token_fold(one) VALUES (1)")
        cursor = (None, None, None)
    # The step's last row: the _FOLD_STEP-th past the cursor in the trees' key order (never
    # by a seq index: each stretch of the folded tree is visited once per fold), or the
    # fresh tree's last row. Rows are moved by SQLite alone, never through Python.
    after = "" if cursor[0] is None else "WHERE (index_id, token, seq) > (?1, ?2, ?3)"
    start = () if cursor[0] is None else tuple(cursor)
    last = conn.execute(
        f"SELECT index_id, token, seq FROM tokens_fresh {after}"  # noqa: S608 - fixed text
        f" ORDER BY index_id, token, seq LIMIT 1 OFFSET {_FOLD_STEP - 1}",
        start,
    ).fetchone()
    done = last is None
    if done:
        last = conn.execute(
            "SELECT index_id, token, seq FROM tokens_fresh"
            " ORDER BY index_id DESC, token DESC, seq DESC LIMIT 1"
        ).fetchone()
    if last is not None and (cursor[0] is None or tuple(last) > tuple(cursor)):
        span = (
            "(index_id, token, seq) <= (?4, ?5, ?6)"
            if cursor[0] is None
            else "(index_id, token, seq) > (?1, ?2, ?3) AND (index_id, token, seq) <= (?4, ?5, ?6)"
        )
        bounds = (*(start or (0, 0, 0)), *last)
        move = (
            "INSERT OR IGNORE INTO tokens(index_id, token, seq) SELECT index_id, token, seq"  # noqa: S608 - fixed text
            f" FROM tokens_fresh WHERE {span} ORDER BY index_id, token, seq"
        )
        moved = conn.execute(move, bounds).rowcount
        gone = conn.execute(
            f"DELETE FROM tokens_fresh WHERE {span}",  # noqa: S608 - fixed text
            bounds,
        ).rowcount
        _count_rows(conn, "tokens", moved)
        _count_rows(conn, "tokens_fresh", -gone)
    if done:
        conn.execute("DELETE FROM token_fold")
    else:
        conn.execute("UPDATE token_fold SET index_id = ?, token = ?, seq = ?", tuple(last))


def _count_rows(conn: sqlite3.Connection, tree: str, change: int) -> None:
    # Counts that only decide when to fold: kept beside the rows, in their transaction.
    if change:
        conn.execute(
            "UPDATE token_trees SET rows = max(rows + ?, 0) WHERE tree = ?", (change, tree)
        )


def _prepare_batch(records: Sequence[SealedRecord]) -> dict[str, _Prepared]:
    """Validate the whole batch and key it by record id, dropping repeated ids (the
    first wins). Raises StorageError naming the position and field, never a value."""
    prepared: dict[str, _Prepared] = {}
    for position, record in enumerate(records):
        stored, pairs = checked_record(position, record)
        if stored.record_id not in prepared:
            prepared[stored.record_id] = (
                stored.record_type,
                stored.payload,
                stored.kek_version,
                stored.wrapped_key,
                pairs,  # in any order: the batch's tokens are sorted together
            )
    return prepared


def _login_counts(conn: sqlite3.Connection, keys: list[str]) -> dict[str, tuple[int, float]]:
    if not keys:
        return {}
    marks = ", ".join("?" * len(keys))
    rows = conn.execute(
        f"SELECT key, failures, last_failure FROM login_failures WHERE key IN ({marks})",  # noqa: S608 - placeholders only
        keys,
    ).fetchall()
    return {str(key): (int(n), float(last)) for key, n, last in rows}


def _account_params(account: AccountRow) -> tuple[str, str, str, bytes, float, int]:
    return (
        account.username,
        account.role,
        account.password_hash,
        bytes(account.attributes),
        float(account.created_at),
        1 if account.disabled else 0,
    )


def _insert_log_batch(conn: sqlite3.Connection, checked: CheckedLogAppend) -> None:
    first = checked.first_index
    size = first + len(checked.entries)
    entries = list(zip(range(first, size), checked.entries, strict=True))
    # Sorted so that each b-tree page is filled in one visit; subjects most of all, since
    # commitments are random and each would otherwise dirty a page of its own.
    nodes = sorted((level, index, digest) for (level, index), digest in checked.nodes.items())
    _insert_rows(conn, "INSERT INTO log_entries(idx, entry)", 2, entries)
    # Not OR IGNORE: a node stored twice means the caller's tree is wrong.
    _insert_rows(conn, "INSERT INTO log_nodes(level, idx, hash)", 3, nodes)
    _insert_rows(conn, "INSERT INTO log_subjects(commitment, idx)", 2, sorted(checked.subjects))
    _insert_rows(conn, "INSERT INTO log_details(idx, blob)", 2, sorted(checked.details))


# Rows an INSERT of the log's: 3,000 parameters at most, far below SQLite's bound.
_ROWS_PER_INSERT = 1000


def _insert_rows(
    conn: sqlite3.Connection, insert: str, width: int, rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert rows a statement of many VALUES at a time, not a statement run a row: each
    run lets go of the interpreter's lock and waits to take it back, and the appenders of
    a busy log hold it meanwhile, so that a batch's thousands of rows cost as many waits
    (executemany runs the statement once a row). Half the time of executemany alone."""
    row = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        conn.execute(
            f"{insert} VALUES {','.join([row] * len(chunk))}",
            [value for values in chunk for value in values],
        )
