"""PostgresStorage: the server-backed durable backend, on psycopg 3 and its connection pool.

Owns the vault's tables in one PostgreSQL schema (the one the DSN's search_path names),
their versioned migrations, the privileges a server's own role is granted on them, and the
pool through which every read and write goes. Holds only ciphertext, wrapped keys, keyed
tokens and non-personal metadata.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg_pool import ConnectionPool

from custodes.errors import (
    AuditRefused,
    AuditUnavailable,
    ConfigurationError,
    DatabaseRefused,
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
    fits_int64,
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
from custodes.storage.pg_replicas import ReadRouting, ReplicaRouter

_T = TypeVar("_T")
_Connection = psycopg.Connection[tuple[Any, ...]]

log = logging.getLogger("custodes.storage")

SCHEMA_VERSION_KEY = "storage.schema_version"

# How a PostgresStorage uses its role: "owner" creates and migrates the schema at open;
# "app" (a server's least-privileged role, see grant_app_role) must find it migrated
# already, and never sends DDL.
Privileges = Literal["owner", "app"]

# Each step takes the schema from version i to i + 1, all of them at open in one
# transaction (PostgreSQL's DDL is transactional): a later migration is appended here.
#
# Every table is keyed so that it can later be hash-partitioned on its leading key
# column (record id, token, username, log index) without a key of another table: no
# foreign key crosses records, and nothing on the ingest or search path joins on a
# column another partitioning would scatter. Text keys use the "C" collation, so that
# ids and names sort by code point, as every other backend sorts them, and compare fast.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta(key text COLLATE "C" PRIMARY KEY, value bytea NOT NULL);

    -- Storage order, for paging through the records (record_tokens); numbers are drawn
    -- by each batch, so concurrent writers never wait on one another for them.
    CREATE SEQUENCE record_seq AS bigint;
    CREATE TABLE records(
        record_id text COLLATE "C" PRIMARY KEY,
        seq bigint NOT NULL,
        record_type text NOT NULL,
        payload bytea NOT NULL
    );
    -- Ciphertext does not compress: never try to.
    ALTER TABLE records ALTER COLUMN payload SET STORAGE EXTERNAL;
    CREATE INDEX records_by_seq ON records(seq);
    -- Apart from records so that deleting one row crypto-shreds its record. A deleted
    -- row's bytes stay in the table's pages until VACUUM reuses them, and in the WAL
    -- (and any archive or base backup of it) until that expires: shredding here is
    -- complete only once both have turned over.
    CREATE TABLE data_keys(
        record_id text COLLATE "C" PRIMARY KEY,
        kek_version bigint NOT NULL,
        wrapped bytea NOT NULL
    );
    -- A search is one equality on (token, index_id) and wants record ids in order: the
    -- primary key answers it alone. seq is the record's, under a BRIN index (a few
    -- bytes per range of pages, next to nothing to maintain per insert): tokens are
    -- appended in storage order, so a page of records finds its tokens in a few ranges.
    -- Ranges of 32 pages: paging through 100,000 records took 1.6 s, against 2.9 s
    -- with the default 128. Autovacuum summarises each range soon after it fills.
    CREATE TABLE tokens(
        token bigint,
        index_id bigint,
        record_id text COLLATE "C",
        seq bigint NOT NULL,
        PRIMARY KEY(token, index_id, record_id)
    );
    CREATE INDEX tokens_by_seq ON tokens USING brin(seq)
        WITH (pages_per_range = 32, autosummarize = on);

    CREATE TABLE accounts(
        username text COLLATE "C" PRIMARY KEY,
        role text NOT NULL,
        password_hash text NOT NULL,
        attributes bytea NOT NULL,
        created_at double precision NOT NULL,
        disabled boolean NOT NULL
    );
    CREATE TABLE sessions(
        key bytea PRIMARY KEY,
        username text COLLATE "C" NOT NULL,
        role text NOT NULL,
        issued_at double precision NOT NULL,
        expires double precision NOT NULL,
        last_seen double precision NOT NULL,
        client text
    );
    CREATE INDEX sessions_by_account ON sessions(username);
    CREATE TABLE login_failures(
        key text COLLATE "C" PRIMARY KEY,
        failures bigint NOT NULL,
        last_failure double precision NOT NULL
    );
    CREATE TABLE spent(key bytea PRIMARY KEY, until double precision NOT NULL);
    CREATE INDEX spent_by_until ON spent(until);

    -- The access log. log_head is its one lock row: every append locks it first, so
    -- appenders of every process queue there, and each reads the log's size only once
    -- it holds the lock.
    CREATE TABLE log_head(one boolean PRIMARY KEY CHECK (one));
    INSERT INTO log_head(one) VALUES (true);
    CREATE TABLE log_entries(idx bigint PRIMARY KEY, entry bytea NOT NULL);
    CREATE TABLE log_nodes(
        level bigint,
        idx bigint,
        hash bytea NOT NULL,
        PRIMARY KEY(level, idx)
    );
    CREATE TABLE log_subjects(
        commitment bytea,
        idx bigint,
        PRIMARY KEY(commitment, idx)
    );
    CREATE INDEX log_subjects_by_entry ON log_subjects(idx, commitment);
    CREATE TABLE log_details(idx bigint PRIMARY KEY, blob bytea);
    CREATE TABLE checkpoints(size bigint PRIMARY KEY, note bytea NOT NULL);

    -- Not a defence against the tables' owner, who can drop or disable the triggers
    -- (the signed Merkle checkpoints catch that); they stop a stray or injected
    -- statement through the application's connection from rewriting history. An
    -- INSERT ... ON CONFLICT DO UPDATE fires the UPDATE trigger, and a plain INSERT of
    -- a stored key fails on the primary key, so no insert can replace a row.
    CREATE FUNCTION log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'the access log is append-only';
    END
    $$;
    CREATE FUNCTION log_details_erase_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'UPDATE' AND NEW.blob IS NULL AND NEW.idx = OLD.idx THEN
            RETURN NEW;
        END IF;
        RAISE EXCEPTION 'sealed details can only be erased';
    END
    $$;
    CREATE TRIGGER log_head_no_change BEFORE UPDATE OR DELETE ON log_head
        FOR EACH ROW EXECUTE FUNCTION log_refuse_change();
    CREATE TRIGGER log_head_no_truncate BEFORE TRUNCATE ON log_head
        FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
    CREATE TRIGGER log_entries_no_change BEFORE UPDATE OR DELETE ON log_entries
        FOR EACH ROW EXECUTE FUNCTION log_refuse_change();
    CREATE TRIGGER log_entries_no_truncate BEFORE TRUNCATE ON log_entries
        FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
    CREATE TRIGGER log_nodes_no_change BEFORE UPDATE OR DELETE ON log_nodes
        FOR EACH ROW EXECUTE FUNCTION log_refuse_change();
    CREATE TRIGGER log_nodes_no_truncate BEFORE TRUNCATE ON log_nodes
        FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
    CREATE TRIGGER log_subjects_no_change BEFORE UPDATE OR DELETE ON log_subjects
        FOR EACH ROW EXECUTE FUNCTION log_refuse_change();
    CREATE TRIGGER log_subjects_no_truncate BEFORE TRUNCATE ON log_subjects
        FOR EACH STATEMENT EXECUTE FUNCTION log_refuse_change();
    CREATE TRIGGER log_details_erase_only BEFORE UPDATE OR DELETE ON log_details
        FOR EACH ROW EXECUTE FUNCTION log_details_erase_only();
    CREATE TRIGGER log_details_no_truncate BEFORE TRUNCATE ON log_details
        FOR EACH STATEMENT EXECUTE FUNCTION log_details_erase_only();
    """,
    # 2: the officials' usage counters (custodes.policy.budgets): one row per account and
    # counter, updated in place.
    """
    CREATE TABLE usage(
        account text COLLATE "C",
        counter text COLLATE "C",
        window_start bigint NOT NULL,
        total bigint NOT NULL,
        PRIMARY KEY(account, counter)
    );
    """,
    # 3: the alerts raised on officials' use of the vault (custodes.alerts).
    """
    CREATE TABLE alerts(
        alert_id text COLLATE "C" PRIMARY KEY,
        raised_at double precision NOT NULL,
        body bytea NOT NULL
    );
    CREATE INDEX alerts_by_time ON alerts(raised_at, alert_id);
    """,
    # 4: the distinct subjects an account was shown, per counter, in the current window.
    """
    CREATE TABLE usage_subjects(
        account text COLLATE "C",
        counter text COLLATE "C",
        subject text COLLATE "C",
        window_start bigint NOT NULL,
        PRIMARY KEY(account, counter, subject)
    );
    CREATE INDEX usage_subjects_by_window ON usage_subjects(account, counter, window_start);
    """,
)
# 5: records, data_keys and tokens hash-partitioned (see _partition_tables), written in
# Python because the partition count is the schema's own, chosen at its creation. Only a
# schema whose three tables are still empty is partitioned; one that holds records (made
# by an earlier version) keeps its plain tables, which every statement here reads and
# writes alike, and `custodes doctor` reports it (database:unpartitioned).
_PARTITIONED_VERSION = len(_MIGRATIONS) + 1
SCHEMA_VERSION = _PARTITIONED_VERSION

# The big tables are hash-partitioned so that VACUUM, an index build, a REINDEX or a
# dump works on one partition at a time: records and data_keys by record id (the same
# modulus, so a record's key lies in the partition of the same number), tokens by token,
# so that a search's equality on the token prunes to a single partition. 16 keeps a
# small vault's schema small (each partition is a table and its indexes: 48 tables here)
# while a vault of 10^7 people (10-20 GB) still has partitions of about a gigabyte. A
# population of 10^9 (about 2 TB with its tokens) wants 256, partitions of about 8 GB,
# each vacuumed or reindexed in minutes; past about a thousand, planning and the catalog
# grow for every statement that cannot prune (a page by seq visits every partition).
DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 1024
_PARTITIONED_TABLES = ("records", "data_keys", "tokens")
# A partition's name: its table's and its remainder, e.g. tokens_p007.
_PARTITION_NAME = re.compile(r"(records|data_keys|tokens)_p[0-9]{3,4}\Z")

# Taken (with the schema's name) by every open, so that two processes opening one
# schema at once migrate it once, the second after the first has committed.
_MIGRATION_LOCK_CLASS = 0x637573  # "cus"

_INT64_MAX = 2**63 - 1
# At most this many login-throttle keys per call, as the SQLite backend counts.
_MAX_LOGIN_KEYS = 500
# A transaction that lost a race (a deadlock, a serialization failure, a record id
# another writer stored first) is run again from the start, this many times in all.
_ATTEMPTS = 4
_TRANSIENT = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)

_RECORD_TYPES = ("text", "int8", "text", "bytea")
_KEY_TYPES = ("text", "int8", "bytea")
_TOKEN_TYPES = ("int8", "int8", "text", "int8")

# A later window starts the counter again; an earlier one adds to the stored window.
# Its commit is not waited for on the disk (set_config(..., true) holds for this
# statement's own transaction): the charge holds no history, the synced log does, and a
# read should not pay a second flush for its budget.
_CHARGE_USAGE = (
    "WITH unsynced AS (SELECT set_config('synchronous_commit', 'off', true))"
    " INSERT INTO usage AS u (account, counter, window_start, total)"
    " SELECT %s, c, w, n FROM unsynced,"
    " unnest(%s::text[], %s::int8[], %s::int8[]) AS t(c, w, n)"
    " ON CONFLICT (account, counter) DO UPDATE SET"
    " total = CASE WHEN u.window_start >= excluded.window_start"
    " THEN u.total + excluded.total ELSE excluded.total END,"
    " window_start = GREATEST(u.window_start, excluded.window_start)"
    " RETURNING counter, total"
)
# One statement: note the subjects not noted in this window yet (a note of an earlier
# window is moved on to this one, and counts), add how many were new to the counter,
# and forget the account's other notes of earlier windows; unsynced as _CHARGE_USAGE is.
# The delete spares the subjects being noted, so that no row is changed twice.
_NOTE_SUBJECTS = (
    "WITH unsynced AS (SELECT set_config('synchronous_commit', 'off', true)),"
    " args AS (SELECT %s::text AS a, %s::text AS c, %s::int8 AS w, %s::text[] AS ids),"
    " forgotten AS (DELETE FROM usage_subjects s USING args"
    " WHERE s.account = args.a AND s.counter = args.c AND s.window_start < args.w"
    " AND NOT (s.subject = ANY(args.ids))),"
    " noted AS (INSERT INTO usage_subjects AS n (account, counter, subject, window_start)"
    " SELECT args.a, args.c, x, args.w FROM args, unsynced, unnest(args.ids) AS x"
    " ON CONFLICT (account, counter, subject) DO UPDATE SET window_start = excluded.window_start"
    " WHERE n.window_start < excluded.window_start RETURNING 1)"
    " INSERT INTO usage AS u (account, counter, window_start, total)"
    " SELECT args.a, args.c, args.w, (SELECT count(*) FROM noted) FROM args"
    " ON CONFLICT (account, counter) DO UPDATE SET"
    " total = CASE WHEN u.window_start >= excluded.window_start"
    " THEN u.total + excluded.total ELSE excluded.total END,"
    " window_start = GREATEST(u.window_start, excluded.window_start)"
    " RETURNING total"
)
# A search: one equality on (token, index_id), which prunes tokens to the one partition
# that token hashes to (at planning, or at execution under a generic plan), then one probe
# of its primary key; each record and data key found is one probe of its own partition.
FIND_SQL = (
    "SELECT record_id FROM tokens WHERE token = %s AND index_id = %s ORDER BY record_id LIMIT %s"
)
# The token's ids first, then each id's record and data key by its primary key, LATERAL:
# written as a plain three-way join, the planner (with no statistics yet on partitions
# just filled by COPY) scanned every data_keys partition for each id, 129 ms a lookup at
# 170,000 records against 1.1 ms in this form (bench/scale.py found it at 10^6). The
# LIMIT (a primary key: it changes no answer) keeps each subquery from being flattened
# into a join, so that no estimate can turn a probe an id into a scan of partitions.
FIND_RECORDS_SQL = (
    "SELECT r.record_id, r.record_type, r.payload, k.kek_version, k.wrapped"
    " FROM (SELECT record_id FROM tokens WHERE token = %s AND index_id = %s"
    "  ORDER BY record_id LIMIT %s) AS t"
    " CROSS JOIN LATERAL (SELECT record_id, record_type, payload FROM records"
    "  WHERE records.record_id = t.record_id LIMIT 1) AS r"
    " CROSS JOIN LATERAL (SELECT kek_version, wrapped FROM data_keys"
    "  WHERE data_keys.record_id = t.record_id LIMIT 1) AS k"
    " ORDER BY t.record_id"
)
# Stored nodes of the log's tree by (level, idx), each one probe of the primary key. As a
# plain join the planner may hash-join the positions against a sequential scan of every
# node; the LIMIT (a primary key: it changes no answer) keeps the subquery a probe. Both
# this and the frontier below are run unprepared, planned at each call for the table as
# it is: a plan prepared while the tree was a page or two (and its statistics were
# gathered) scanned every node, on every append under the log's lock, long after the
# table had grown (measured: thousands of rows read an access).
LOG_NODES_SQL = (
    "SELECT w.level, w.idx, n.hash FROM unnest(%s::bigint[], %s::bigint[]) AS w(level, idx)"
    " CROSS JOIN LATERAL (SELECT hash FROM log_nodes"
    "  WHERE log_nodes.level = w.level AND log_nodes.idx = w.idx LIMIT 1) AS n"
)
# Records by id, each id one probe of its own partition (pruned at execution, per id).
# Written `record_id = ANY(ids)`, every partition holding any of the ids is probed with
# all of them: an ingest's check of a batch of 5,000 ids cost 16 times the probes on 16
# partitions, which was the larger part of the server's work per record stored. The
# LIMIT (the id is a primary key: it changes no answer) keeps each subquery from being
# flattened into a join the planner may run as a hash join over every partition, as it
# does for tables just filled, whose statistics are not yet gathered.
GET_RECORDS_SQL = (
    "SELECT w.record_id, r.record_type, r.payload, k.kek_version, k.wrapped"
    " FROM unnest(%s::text[]) AS w(record_id)"
    " CROSS JOIN LATERAL (SELECT record_type, payload FROM records"
    "  WHERE records.record_id = w.record_id LIMIT 1) AS r"
    " CROSS JOIN LATERAL (SELECT kek_version, wrapped FROM data_keys"
    "  WHERE data_keys.record_id = w.record_id LIMIT 1) AS k"
)
_PRESENT_SQL = (
    "SELECT w.record_id FROM unnest(%s::text[]) AS w(record_id)"
    " CROSS JOIN LATERAL (SELECT 1 FROM records"
    "  WHERE records.record_id = w.record_id LIMIT 1) AS r"
)
_ACCOUNT_COLUMNS = "username, role, password_hash, attributes, created_at, disabled"
_SESSION_COLUMNS = "key, username, role, issued_at, expires, last_seen, client"
_SESSION_ACCOUNT = (
    "SELECT s.key, s.username, s.role, s.issued_at, s.expires, s.last_seen, s.client,"
    " a.username, a.role, a.password_hash, a.attributes, a.created_at, a.disabled"
    " FROM sessions s LEFT JOIN accounts a ON a.username = s.username WHERE s.key = %s"
)


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _fences_replicas(method: _Method) -> _Method:
    """A write of records or tokens: once it is over (committed or not), no replica
    serves this process a read until it has replayed the primary past it, so that a read
    right after a write sees it."""

    @functools.wraps(method)
    def fenced(self: PostgresStorage, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:
            if self._replicas is not None:
                self._replicas.fence()

    return cast("_Method", fenced)


class PostgresStorage:
    """A vault in one PostgreSQL schema, reached through a pool of connections.

    The schema is the first the DSN's search_path names (by default public); it must
    exist, and it holds nothing but this vault. With privileges="owner" (the default) the
    DSN's role owns the schema and the open creates or migrates it; with "app" the role is
    one grant_app_role prepared, and the open only checks that the schema is at this
    software's version and that the role holds no more than a server needs. Every
    connection of the pool is pinned to it, commits with synchronous_commit on (a commit
    returns once its WAL is flushed), and runs in autocommit mode with explicit
    transactions.

    The pool belongs to the process that built the storage: its connections and its
    worker threads do not survive a fork, so each server worker builds its own
    PostgresStorage after forking, and this one refuses to be used from any other
    process. Reads never wait for writes, log appends included: PostgreSQL's snapshots
    let a read see the last committed state while a commit is being flushed.

    The DSN may name several hosts with target_session_attrs=read-write (a Patroni
    cluster): a connection the failover killed is dropped at its first use and the pool's
    new ones find the new primary. With `replicas`, reads of records and tokens (get,
    find, find_records, records_page) go to a replica within `replica_max_lag` seconds of
    the primary (pg_replicas.ReplicaRouter); every other read and every write stays here.
    """

    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        privileges: Privileges = "owner",
        replicas: Sequence[str] = (),
        replica_max_lag: float = 1.0,
        partitions: int = DEFAULT_PARTITIONS,
    ) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ConfigurationError("the pool needs 0 <= min_size <= max_size and max_size >= 1")
        if privileges not in ("owner", "app"):
            raise ConfigurationError("privileges must be 'owner' or 'app'")
        self._pid = os.getpid()
        self._closed = False
        self._max_size = max_size
        self.privileges: Privileges = privileges
        _check_partitions(partitions)
        self._schema = _open_schema(dsn, connect_timeout, privileges, partitions)
        self._pool: ConnectionPool[_Connection] = ConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": max(1, int(connect_timeout))},
            configure=self._configure,
            timeout=connect_timeout,
            name="custodes",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except psycopg.Error as exc:
            self._pool.close()
            raise StorageError(f"cannot open the database pool: {_cause(exc)}") from None
        # Reads of records and tokens may go to a replica within the lag bound; everything
        # else, and every write, to the primary (see ReplicaRouter).
        self._replicas: ReplicaRouter | None = None
        if replicas:
            try:
                self._replicas = ReplicaRouter(
                    dsn,
                    tuple(replicas),
                    max_lag=replica_max_lag,
                    max_size=max_size,
                    connect_timeout=connect_timeout,
                    configure=self._configure,
                )
            except BaseException:
                self._pool.close()
                raise

    def _configure(self, conn: _Connection) -> None:
        # Bound values, not SQL text: the schema's name is quoted by the server. pg_temp
        # comes last, so no temporary table can stand in for one of the vault's.
        conn.execute(
            "SELECT set_config('search_path', quote_ident(%s) || ', pg_temp', false),"
            " set_config('synchronous_commit', 'on', false)",
            (self._schema,),
        )

    # -- metadata -----------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        row = self._one("SELECT value FROM meta WHERE key = %s", (key,))
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        if not isinstance(key, str) or not isinstance(value, bytes):
            raise StorageError("meta key must be str and value bytes")
        self._write(
            lambda c: c.execute(
                "INSERT INTO meta(key, value) VALUES (%s, %s)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            ),
            "metadata was not stored",
        )

    # -- usage --------------------------------------------------------------------

    def charge_usage(self, account: str, charges: Sequence[tuple[str, int, int]]) -> list[int]:
        checked = checked_charges(charges)
        if not checked:
            return []
        counters, starts, amounts = (list(column) for column in zip(*checked, strict=True))

        def charge(conn: _Connection) -> list[int]:
            rows = conn.execute(_CHARGE_USAGE, (account, counters, starts, amounts)).fetchall()
            totals = {str(counter): int(total) for counter, total in rows}
            return [totals[counter] for counter in counters]

        # One statement, its own transaction: one round trip. Should a dropped
        # connection make it run again, the account is charged twice, never less.
        return self._run(charge, "usage was not charged", transaction=False)

    def note_subjects(self, account: str, counter: str, start: int, subjects: Sequence[str]) -> int:
        checked = checked_subjects(start, subjects)

        def note(conn: _Connection) -> int:
            row = conn.execute(_NOTE_SUBJECTS, (account, counter, start, checked)).fetchone()
            if row is None:
                raise StorageError("usage was not charged: the counter was not returned")
            return int(row[0])

        return self._run(note, "usage was not charged", transaction=False)

    # -- alerts -------------------------------------------------------------------

    def put_alert(self, row: AlertRow) -> bool:
        alert_id, raised_at, body = checked_alert(row)
        return self._write(
            lambda c: (
                c.execute(
                    "INSERT INTO alerts(alert_id, raised_at, body) VALUES (%s, %s, %s)"
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
                    "UPDATE alerts SET raised_at = %s, body = %s"
                    " WHERE alert_id = %s AND raised_at = %s AND body = %s",
                    (raised_at, body, alert_id, was_raised, was),
                ).rowcount
                == 1
            ),
            "the alert was not stored",
        )

    def get_alert(self, alert_id: str) -> AlertRow | None:
        row = self._one(
            "SELECT alert_id, raised_at, body FROM alerts WHERE alert_id = %s", (alert_id,)
        )
        return None if row is None else AlertRow(str(row[0]), float(row[1]), bytes(row[2]))

    def list_alerts(self, limit: int) -> list[AlertRow]:
        rows = self._read(
            lambda c: c.execute(
                "SELECT alert_id, raised_at, body FROM alerts"
                " ORDER BY raised_at DESC, alert_id DESC LIMIT %s",
                (max(int(limit), 0),),
            ).fetchall()
        )
        return [AlertRow(str(a), float(t), bytes(b)) for a, t, b in rows]

    # -- records ------------------------------------------------------------------

    @_fences_replicas
    def write_batch(self, records: Sequence[SealedRecord]) -> BatchOutcome:
        # Validated whole before anything is sent, so that a bad record late in the
        # batch leaves nothing behind; repeated ids are dropped (the first wins).
        prepared: dict[str, tuple[StoredRecord, frozenset[tuple[int, int]]]] = {}
        for position, record in enumerate(records):
            stored, pairs = checked_record(position, record)
            prepared.setdefault(stored.record_id, (stored, pairs))
        if not prepared:
            return BatchOutcome(inserted=0, already_present=len(records))

        # New records are copied straight into their tables with binary COPY. Copying
        # the whole batch into a temporary table and inserting from it with ON CONFLICT
        # DO NOTHING measured half as fast (100,000 records of 700 bytes, 4.7 tokens each,
        # in batches of 5,000: about 45 against 85-125 us a record), and 5-8 times slower
        # for a batch already stored. The first attempt assumes none is stored (an ingest
        # has just checked); a copy that meets a stored id fails on the primary key, rolls
        # back whole, and the batch runs again finding the present ids first.
        attempts = 0

        def apply(conn: _Connection) -> int:
            nonlocal attempts
            attempts += 1
            ids = list(prepared)
            present = (
                {str(rid) for (rid,) in conn.execute(_PRESENT_SQL, (ids,))}
                if attempts > 1
                else set()
            )
            # In key order, so that each index page is filled in one visit.
            new_ids = sorted(rid for rid in ids if rid not in present)
            if not new_ids:
                return 0
            # The records' write lock before any number is drawn: a backup locks the
            # tables against writers and then reads the sequence, and every number at or
            # below what it reads must then belong to a batch that has finished, so that
            # "seq <= the backup's bound" names exactly the records the backup holds.
            conn.execute("LOCK TABLE records IN ROW EXCLUSIVE MODE")
            seqs = sorted(
                int(seq)
                for (seq,) in conn.execute(
                    "SELECT nextval('record_seq') FROM generate_series(1, %s)", (len(new_ids),)
                )
            )
            tokens: list[tuple[int, int, str, int]] = []
            with conn.cursor() as cur:
                with cur.copy(
                    "COPY records(record_id, seq, record_type, payload) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(list(_RECORD_TYPES))
                    for seq, rid in zip(seqs, new_ids, strict=True):
                        stored, pairs = prepared[rid]
                        copy.write_row((rid, seq, stored.record_type, stored.payload))
                        tokens.extend((token, index_id, rid, seq) for index_id, token in pairs)
                with cur.copy(
                    "COPY data_keys(record_id, kek_version, wrapped) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(list(_KEY_TYPES))
                    for rid in new_ids:
                        stored, _ = prepared[rid]
                        copy.write_row((rid, stored.kek_version, stored.wrapped_key))
                tokens.sort()
                with cur.copy(
                    "COPY tokens(token, index_id, record_id, seq) FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(list(_TOKEN_TYPES))
                    for row in tokens:
                        copy.write_row(row)
            return len(new_ids)

        # A stored id (or one another writer stored between the check and the copy) fails
        # the copy on the primary key, and the batch runs again and skips it.
        inserted = self._write(
            apply, "the batch was not stored", retry_on=(pg_errors.UniqueViolation,)
        )
        return BatchOutcome(inserted=inserted, already_present=len(records) - inserted)

    def read_routing(self) -> ReadRouting:
        """How many reads of records and tokens a replica served, and the primary."""
        if self._replicas is None:
            return ReadRouting(replica=0, primary=0)
        return self._replicas.routing()

    def get_records(self, record_ids: Sequence[str]) -> dict[str, StoredRecord]:
        ids = list(dict.fromkeys(record_ids))
        if not ids:
            self._check_usable()
            return {}
        rows = self._replica_rows(GET_RECORDS_SQL, (ids,))
        return {str(row[0]): stored_record_from_row(row) for row in rows}

    def find(self, index_id: int, token: int, limit: int) -> list[str]:
        self._check_usable()
        if limit <= 0 or not fits_int64(index_id, token):
            return []
        rows = self._replica_rows(FIND_SQL, (token, index_id, min(limit, _INT64_MAX)))
        return [str(rid) for (rid,) in rows]

    def find_records(self, index_id: int, token: int, limit: int) -> list[StoredRecord]:
        self._check_usable()
        if limit <= 0 or not fits_int64(index_id, token):
            return []
        rows = self._replica_rows(FIND_RECORDS_SQL, (token, index_id, min(limit, _INT64_MAX)))
        return [stored_record_from_row(row) for row in rows]

    def count_records(self, record_type: str | None = None) -> int:
        if record_type is None:
            row = self._one("SELECT count(*) FROM records")
        else:
            row = self._one("SELECT count(*) FROM records WHERE record_type = %s", (record_type,))
        return int(row[0])

    def record_tokens(
        self, after: int, limit: int
    ) -> list[tuple[int, str, tuple[tuple[int, int], ...]]]:
        self._check_usable()
        if limit <= 0 or after >= _INT64_MAX:
            return []

        def page(conn: _Connection) -> list[tuple[int, str, tuple[tuple[int, int], ...]]]:
            rows = conn.execute(
                "SELECT seq, record_id FROM records WHERE seq > %s ORDER BY seq LIMIT %s",
                (max(after, 0), min(limit, _INT64_MAX)),
            ).fetchall()
            if not rows:
                return []
            first, last = int(rows[0][0]), int(rows[-1][0])
            held: dict[str, list[tuple[int, int]]] = {str(rid): [] for _, rid in rows}
            # The token rows themselves, found by their record's seq (the BRIN index),
            # not rebuilt from anything the records hold.
            for rid, index_id, token in conn.execute(
                "SELECT record_id, index_id, token FROM tokens WHERE seq >= %s AND seq <= %s",
                (first, last),
            ):
                pairs = held.get(str(rid))
                if pairs is not None:
                    pairs.append((int(index_id), int(token)))
            return [(int(seq), str(rid), tuple(sorted(held[str(rid)]))) for seq, rid in rows]

        return self._read(page)

    def records_page(self, after: int, limit: int) -> list[tuple[int, StoredRecord]]:
        self._check_usable()
        if limit <= 0 or after >= _INT64_MAX:
            return []
        rows = self._replica_rows(
            "SELECT r.seq, r.record_id, r.record_type, r.payload, k.kek_version, k.wrapped"
            " FROM records AS r JOIN data_keys AS k ON k.record_id = r.record_id"
            " WHERE r.seq > %s ORDER BY r.seq LIMIT %s",
            (max(after, 0), min(limit, _INT64_MAX)),
        )
        return [(int(row[0]), stored_record_from_row(row[1:])) for row in rows]

    @_fences_replicas
    def rekey_records(self, changes: Sequence[Rekeyed]) -> int:
        checked = checked_rekeyed(changes)
        if not checked:
            return 0
        self._check_owner("rotating keys rewrites stored records")

        def apply(conn: _Connection) -> int:
            by_id = {c.record_id: c for c in checked}
            held = {
                str(rid): (int(seq), bytes(wrapped))
                for rid, seq, wrapped in conn.execute(
                    "SELECT k.record_id, r.seq, k.wrapped FROM data_keys AS k"
                    " JOIN records AS r ON r.record_id = k.record_id"
                    " WHERE k.record_id = ANY(%s) FOR UPDATE OF k",
                    (list(by_id),),
                )
            }
            due = [
                c for rid, c in by_id.items() if rid in held and held[rid][1] == c.expected_wrapped
            ]
            if not due:
                return 0
            conn.execute(
                "UPDATE data_keys AS k SET kek_version = v.version, wrapped = v.wrapped"
                " FROM unnest(%s::text[], %s::bigint[], %s::bytea[]) AS v(id, version, wrapped)"
                " WHERE k.record_id = v.id",
                (
                    [c.record_id for c in due],
                    [c.kek_version for c in due],
                    [c.wrapped_key for c in due],
                ),
            )
            resealed = [c for c in due if c.payload is not None]
            if resealed:
                conn.execute(
                    "UPDATE records AS r SET payload = v.payload"
                    " FROM unnest(%s::text[], %s::bytea[]) AS v(id, payload)"
                    " WHERE r.record_id = v.id",
                    ([c.record_id for c in resealed], [c.payload for c in resealed]),
                )
            rows = [
                (token, index_id, c.record_id, held[c.record_id][0])
                for c in due
                for index_id, token in c.tokens
            ]
            if rows:
                conn.execute(
                    "INSERT INTO tokens(token, index_id, record_id, seq)"
                    " SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::text[], %s::bigint[])"
                    " ON CONFLICT DO NOTHING",
                    tuple(list(column) for column in zip(*rows, strict=True)),
                )
            return len(due)

        return self._write(apply, "the rotated keys were not stored")

    @_fences_replicas
    def drop_tokens(self, index_ids: Collection[int]) -> int:
        ids = sorted({i for i in index_ids if fits_int64(i)})
        if not ids:
            return 0
        self._check_owner("retiring index keys deletes their tokens")
        return self._write(
            lambda c: c.execute("DELETE FROM tokens WHERE index_id = ANY(%s)", (ids,)).rowcount,
            "the retired tokens were not deleted",
        )

    def key_census(self) -> KeyCensus:
        def count(conn: _Connection) -> KeyCensus:
            return census_of(
                conn.execute("SELECT kek_version, count(*) FROM data_keys GROUP BY 1").fetchall(),
                conn.execute(
                    "SELECT get_byte(payload, 1), count(*) FROM records GROUP BY 1"
                ).fetchall(),
                conn.execute("SELECT index_id, count(*) FROM tokens GROUP BY 1").fetchall(),
            )

        # One snapshot, so the three counts agree.
        return self._run(count, "database read failed", transaction=True)

    def _check_owner(self, what: str) -> None:
        if self.privileges != "owner":
            raise ConfigurationError(
                f"{what}, which the server's role may not do: run it with the schema "
                "owner's database URL (CUSTODES_DATABASE)"
            )

    @_fences_replicas
    def erase_records(self, record_ids: Sequence[str]) -> int:
        ids = [rid for rid in dict.fromkeys(record_ids) if isinstance(rid, str)]
        self._check_usable()
        if not ids:
            return 0

        def erase(conn: _Connection) -> int:
            found = conn.execute(
                "DELETE FROM records WHERE record_id = ANY(%s) RETURNING record_id, seq", (ids,)
            ).fetchall()
            if not found:
                return 0
            gone = [str(rid) for rid, _ in found]
            # The tokens by their records' seq (the BRIN index), then by id: the primary
            # key leads with the token, which an erasure does not know.
            conn.execute(
                "DELETE FROM tokens WHERE seq = ANY(%s) AND record_id = ANY(%s)",
                ([int(seq) for _, seq in found], gone),
            )
            conn.execute("DELETE FROM data_keys WHERE record_id = ANY(%s)", (gone,))
            return len(found)

        return self._write(erase, "the records were not erased")

    # -- accounts -----------------------------------------------------------------

    def add_account(self, account: AccountRow) -> None:
        def insert(conn: _Connection) -> None:
            cur = conn.execute(
                f"INSERT INTO accounts({_ACCOUNT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)"  # noqa: S608 - fixed names
                " ON CONFLICT(username) DO NOTHING",
                _account_params(account),
            )
            if cur.rowcount == 0:
                raise ConfigurationError("an account with that username already exists")

        self._write(insert, "the account was not stored")

    def update_account(self, account: AccountRow) -> None:
        def update(conn: _Connection) -> None:
            username, *rest = _account_params(account)
            cur = conn.execute(
                "UPDATE accounts SET role = %s, password_hash = %s, attributes = %s,"
                " created_at = %s, disabled = %s WHERE username = %s",
                (*rest, username),
            )
            if cur.rowcount == 0:
                raise RecordNotFound("no account with that username")

        self._write(update, "the account was not stored")

    def replace_account(self, expected: AccountRow, account: AccountRow) -> bool:
        if account.username != expected.username:
            raise ConfigurationError("an account is replaced only by a row of the same name")
        _, *want = _account_params(expected)
        username, *rest = _account_params(account)

        def swap(conn: _Connection) -> bool:
            # One statement: a concurrent update of the row makes this one wait, then
            # test its condition again on the row as the other left it.
            cur = conn.execute(
                "UPDATE accounts SET role = %s, password_hash = %s, attributes = %s,"
                " created_at = %s, disabled = %s WHERE username = %s AND role = %s"
                " AND password_hash = %s AND attributes = %s AND created_at = %s"
                " AND disabled = %s",
                (*rest, username, *want),
            )
            return cur.rowcount == 1

        return self._write(swap, "the account was not stored")

    def get_account(self, username: str) -> AccountRow | None:
        row = self._one(
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE username = %s",  # noqa: S608 - fixed names
            (username,),
        )
        return None if row is None else account_from_row(row)

    def list_accounts(self) -> list[AccountRow]:
        rows = self._rows(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts ORDER BY username")  # noqa: S608 - fixed names
        return [account_from_row(row) for row in rows]

    # -- sessions and login throttling ------------------------------------------------

    def put_session(self, session: SessionRow) -> None:
        row = checked_session(session)

        def insert(conn: _Connection) -> None:
            cur = conn.execute(
                f"INSERT INTO sessions({_SESSION_COLUMNS})"  # noqa: S608 - fixed names
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT(key) DO NOTHING",
                tuple(row),
            )
            if cur.rowcount == 0:
                raise ConfigurationError("a session with that key already exists")

        self._write(insert, "the session was not stored")

    def get_session(self, key: bytes) -> SessionRow | None:
        row = self._one(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE key = %s",  # noqa: S608 - fixed names
            (key,),
        )
        return None if row is None else _session_from_row(row)

    def count_account_sessions(self, username: str) -> int:
        row = self._one("SELECT count(*) FROM sessions WHERE username = %s", (username,))
        return int(row[0])

    def get_session_account(self, key: bytes) -> tuple[SessionRow, AccountRow | None] | None:
        row = self._one(_SESSION_ACCOUNT, (key,))
        if row is None:
            return None
        session = _session_from_row(row[:7])
        return session, None if row[7] is None else account_from_row(row[7:])

    def touch_session(self, key: bytes, last_seen: float) -> None:
        self._write(
            lambda c: c.execute(
                "UPDATE sessions SET last_seen = %s WHERE key = %s AND last_seen < %s",
                (last_seen, key, last_seen),
            ),
            "the session was not updated",
        )

    def end_session(self, key: bytes) -> bool:
        return bool(
            self._write(
                lambda c: c.execute("DELETE FROM sessions WHERE key = %s", (key,)).rowcount,
                "the session was not ended",
            )
        )

    def end_sessions(self, username: str) -> int:
        return int(
            self._write(
                lambda c: (
                    c.execute("DELETE FROM sessions WHERE username = %s", (username,)).rowcount
                ),
                "the sessions were not ended",
            )
        )

    def purge_sessions(self, now: float, idle: float) -> int:
        return int(
            self._write(
                lambda c: (
                    c.execute(
                        "DELETE FROM sessions WHERE expires <= %s OR last_seen < %s",
                        (now, now - idle),
                    ).rowcount
                ),
                "stale sessions were not purged",
            )
        )

    def count_sessions(self) -> int:
        return int(self._one("SELECT count(*) FROM sessions")[0])

    def list_sessions(self) -> list[SessionRow]:
        rows = self._rows(
            f"SELECT {_SESSION_COLUMNS} FROM sessions ORDER BY username, key"  # noqa: S608 - fixed names
        )
        return [_session_from_row(row) for row in rows]

    def login_failures(self, keys: Sequence[str]) -> dict[str, tuple[int, float]]:
        wanted = list(dict.fromkeys(keys))[:_MAX_LOGIN_KEYS]
        if not wanted:
            self._check_usable()
            return {}
        rows = self._rows(
            "SELECT key, failures, last_failure FROM login_failures"
            " WHERE key = ANY(%s) AND failures > 0",
            (wanted,),
        )
        return {str(key): (int(n), float(last)) for key, n, last in rows}

    def admit_login_attempt(
        self, keys: Sequence[str], now: float, admit: Callable[[LoginCounts], bool]
    ) -> bool:
        # Sorted, so that two attempts naming the same keys lock them in the same order.
        wanted = sorted(dict.fromkeys(keys))[:_MAX_LOGIN_KEYS]

        def count(conn: _Connection) -> bool:
            # A key never counted has no row to lock: one is made (at zero, seen by no
            # one until commit) so that every attempt on the key queues on its row.
            conn.execute(
                "INSERT INTO login_failures(key, failures, last_failure)"
                " SELECT key, 0, 0 FROM unnest(%s::text[]) AS key ORDER BY key"
                " ON CONFLICT(key) DO NOTHING",
                (wanted,),
            )
            rows = conn.execute(
                "SELECT key, failures, last_failure FROM login_failures"
                " WHERE key = ANY(%s) ORDER BY key FOR UPDATE",
                (wanted,),
            ).fetchall()
            counts = {str(key): (int(n), float(last)) for key, n, last in rows if n > 0}
            if not admit(counts):
                raise _Refused
            conn.execute(
                "UPDATE login_failures SET failures = failures + 1, last_failure = %s"
                " WHERE key = ANY(%s)",
                (now, wanted),
            )
            return True

        try:
            return self._write(count, "the login attempt was not counted")
        except _Refused:
            return False

    def forgive_login_attempt(self, key: str) -> None:
        def forgive(conn: _Connection) -> None:
            conn.execute("UPDATE login_failures SET failures = failures - 1 WHERE key = %s", (key,))
            conn.execute("DELETE FROM login_failures WHERE key = %s AND failures <= 0", (key,))

        self._write(forgive, "the login attempt was not forgiven")

    def clear_login_failures(self, key: str) -> None:
        self._write(
            lambda c: c.execute("DELETE FROM login_failures WHERE key = %s", (key,)),
            "the failed logins were not cleared",
        )

    def purge_login_failures(self, before: float) -> int:
        return int(
            self._write(
                lambda c: (
                    c.execute(
                        "DELETE FROM login_failures WHERE last_failure < %s AND failures > 0",
                        (before,),
                    ).rowcount
                ),
                "old failed logins were not purged",
            )
        )

    def spend(self, key: bytes, now: float, keep: float) -> bool:
        key = checked_spend(key, now, keep)

        def mark(conn: _Connection) -> bool:
            conn.execute("DELETE FROM spent WHERE until <= %s", (now,))
            # A racing insert of the same key makes this one wait for its commit, and
            # then do nothing: one of them is first, in every process.
            cur = conn.execute(
                "INSERT INTO spent(key, until) VALUES (%s, %s) ON CONFLICT(key) DO NOTHING",
                (key, now + keep),
            )
            return cur.rowcount == 1

        return self._write(mark, "the one-time mark was not stored")

    # -- access log ---------------------------------------------------------------

    def log_append(self, batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        # Every failure, whatever its cause, must refuse the access being recorded.
        checked = checked_log_append(batch)

        def append(conn: _Connection) -> None:
            # Every appender of every process queues on this row; the size (and the tree's
            # frontier) is read only once it is held, so no two appends can both find it
            # unchanged. Both statements go out in one round trip, and the batch with the
            # COMMIT in another: a writer holding the lock waits on no answer but these.
            head = conn.execute("SELECT one FROM log_head FOR UPDATE")
            frontier = conn.execute(LOG_FRONTIER_SQL, {"known": checked.first_index}, prepare=False)
            if head.fetchone() is None:
                raise AuditUnavailable("the access log's head row is missing")
            rows = frontier.fetchall()
            stored = int(rows[0][0])
            batch = checked
            if batch.first_index != stored:
                if rebuild is None:
                    raise LogMoved("the access log moved: another writer appended")
                nodes = {(int(lv), int(i)): bytes(h) for _, lv, i, h in rows if h is not None}
                batch = checked_log_append(rebuild(stored, nodes))
                if batch.first_index != stored:
                    raise LogMoved("the access log moved: another writer appended")
            _insert_log_batch(conn, batch)

        # Run again only if refused before anything was committed (see _run): had a
        # commit landed unseen, a second run would meet LogMoved, and the caller would
        # append the same entries again.
        self._run(
            append,
            "the access log did not record the batch",
            transaction=True,
            error=AuditUnavailable,
            pipelined=True,
        )

    def log_size(self) -> int:
        # Read, not cached: other processes share the log and append to it.
        return self._read(_stored_log_size)

    def log_entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        # Not a generator itself: the end of an open range is the size at the call, not
        # at the first next(), and a closed backend is refused at once.
        stop = self._read(_stored_log_size) if end is None else min(end, _INT64_MAX)
        return self._stream_entries(max(start, 0), stop)

    def _stream_entries(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        # A page per query, yielded with no connection held: a slow reader (a verifier
        # streaming the whole log) keeps no connection from the pool while it works.
        while start < stop:
            page = self._rows(
                "SELECT idx, entry FROM log_entries WHERE idx >= %s AND idx < %s"
                " ORDER BY idx LIMIT %s",
                (start, stop, LOG_PAGE),
            )
            for index, entry in page:
                yield int(index), bytes(entry)
            if len(page) < LOG_PAGE:
                return
            start = int(page[-1][0]) + 1

    def log_node(self, level: int, index: int) -> bytes | None:
        self._check_usable()
        if not fits_int64(level, index):
            return None
        row = self._one("SELECT hash FROM log_nodes WHERE level = %s AND idx = %s", (level, index))
        return None if row is None else bytes(row[0])

    def log_nodes(self, positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        self._check_usable()
        # Checked inline and sent as two array literals: a proof batch asks for thousands
        # of nodes, and psycopg's list dumper inspects every element of a list it is given
        # (a third of the batch's time in Python, measured).
        wanted = sorted(
            {
                (lv, i)
                for lv, i in positions
                if type(lv) is int and type(i) is int and 0 <= lv <= 63 and 0 <= i <= _INT64_MAX
            }
        )
        if not wanted:
            return {}
        levels = "{" + ",".join([str(lv) for lv, _ in wanted]) + "}"
        indexes = "{" + ",".join([str(i) for _, i in wanted]) + "}"
        rows = self._read(
            lambda c: c.execute(LOG_NODES_SQL, (levels, indexes), prepare=False).fetchall()
        )
        return {(lv, i): bytes(h) for lv, i, h in rows}

    def log_subject_entries(self, commitment: bytes) -> list[int]:
        rows = self._rows(
            "SELECT idx FROM log_subjects WHERE commitment = %s ORDER BY idx", (commitment,)
        )
        return [int(index) for (index,) in rows]

    def log_subject_rows(
        self, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        self._check_usable()
        stop = _INT64_MAX if end is None else min(end, _INT64_MAX)
        return self._stream_subject_rows(max(start, 0), stop)

    def _stream_subject_rows(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        # Paged by (index, commitment) through the index by entry, like the entries.
        after: tuple[int, bytes] | None = None
        while True:
            if after is None:
                page = self._rows(
                    "SELECT idx, commitment FROM log_subjects WHERE idx >= %s AND idx < %s"
                    " ORDER BY idx, commitment LIMIT %s",
                    (start, stop, LOG_PAGE),
                )
            else:
                page = self._rows(
                    "SELECT idx, commitment FROM log_subjects"
                    " WHERE (idx, commitment) > (%s, %s) AND idx < %s"
                    " ORDER BY idx, commitment LIMIT %s",
                    (after[0], after[1], stop, LOG_PAGE),
                )
            for index, commitment in page:
                yield int(index), bytes(commitment)
            if len(page) < LOG_PAGE:
                return
            after = (int(page[-1][0]), bytes(page[-1][1]))

    def log_detail(self, index: int) -> bytes | None:
        self._check_usable()
        if not fits_int64(index):
            return None
        row = self._one("SELECT blob FROM log_details WHERE idx = %s", (index,))
        return None if row is None or row[0] is None else bytes(row[0])

    def log_detail_range(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        self._check_usable()
        start, end = max(start, 0), min(end, _INT64_MAX)
        while start < end:
            page = self._rows(
                "SELECT idx, blob FROM log_details WHERE idx >= %s AND idx < %s"
                " AND blob IS NOT NULL ORDER BY idx LIMIT %s",
                (start, end, LOG_PAGE),
            )
            for index, blob in page:
                yield int(index), bytes(blob)
            if len(page) < LOG_PAGE:
                return
            start = int(page[-1][0]) + 1

    def put_checkpoint(self, size: int, note: bytes) -> None:
        checked_checkpoint(size, note)
        self._write(
            lambda c: c.execute(
                "INSERT INTO checkpoints(size, note) VALUES (%s, %s)"
                " ON CONFLICT(size) DO UPDATE SET note = excluded.note",
                (size, note),
            ),
            "the checkpoint was not stored",
        )

    def checkpoints(self) -> list[tuple[int, bytes]]:
        rows = self._rows("SELECT size, note FROM checkpoints ORDER BY size")
        return [(int(size), bytes(note)) for size, note in rows]

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # A forked child holds a copy of the parent's pool: closing it there would close
        # the parent's connections under it.
        if self._pid == os.getpid():
            if self._replicas is not None:
                self._replicas.close()
            self._pool.close()

    # -- internals ----------------------------------------------------------------

    def _check_usable(
        self, failure: str = "storage", error: type[StorageError | AuditUnavailable] = StorageError
    ) -> None:
        if self._closed:
            raise error(f"{failure}: storage is closed")
        if self._pid != os.getpid():
            raise error(f"{failure}: this storage was opened by another process; open one in each")

    def _read(self, action: Callable[[_Connection], _T]) -> _T:
        return self._run(action, "database read failed", transaction=False)

    def _one(self, sql: str, params: tuple[object, ...] = ()) -> Any:
        """The first row of a query, or None."""
        return self._read(lambda c: c.execute(sql, params).fetchone())

    def _rows(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        return self._read(lambda c: c.execute(sql, params).fetchall())

    def _replica_rows(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """A read of records or tokens: from a replica within the lag bound when there is
        one, else the primary's, as _rows reads."""
        if self._replicas is None:
            return self._rows(sql, params)
        self._check_usable("database read failed")
        return self._replicas.read(
            lambda c: c.execute(sql, params).fetchall(), lambda: self._rows(sql, params)
        )

    def _write(
        self,
        action: Callable[[_Connection], _T],
        failure: str,
        *,
        retry_on: tuple[type[psycopg.Error], ...] = (),
    ) -> _T:
        """Run action in one transaction; on any error, roll back."""
        return self._run(action, failure, transaction=True, retry_on=retry_on)

    def _run(
        self,
        action: Callable[[_Connection], _T],
        failure: str,
        *,
        transaction: bool,
        retry_on: tuple[type[psycopg.Error], ...] = (),
        error: type[StorageError | AuditUnavailable] = StorageError,
        pipelined: bool = False,
    ) -> _T:
        """Run action on a pooled connection (in one transaction, if asked), again from
        the start if it lost a race (a deadlock, a serialization failure, retry_on) or
        met a connection the server had dropped before anything was sent through it.
        Every psycopg error becomes `error`, named by class and SQLSTATE only; a refusal
        of this role (see _refusal) becomes DatabaseRefused (AuditRefused for `error`
        AuditUnavailable), logged at ERROR here, where every path to the database
        passes, whoever called.

        Pipelined, the transaction runs in libpq's pipeline mode: statements go out
        without waiting for one another's answers, BEGIN with the first and COMMIT with
        the last, and the action waits only where it fetches a result."""
        self._check_usable(failure, error)
        retryable: tuple[type[psycopg.Error], ...] = (*_TRANSIENT, *retry_on)
        races = stale = 0
        while True:
            conn: _Connection | None = None
            begun = False
            try:
                with self._pool.connection() as conn:
                    if not transaction:
                        return action(conn)
                    if pipelined:
                        with conn.pipeline(), conn.transaction():
                            result = action(conn)
                            # Leaving the block sends COMMIT: from here on, it may land.
                            # Before, a dropped connection had nothing committed.
                            begun = True
                        return result
                    with conn.transaction():
                        begun = True
                        return action(conn)
            except retryable as exc:
                races += 1
                if races >= _ATTEMPTS:
                    raise error(f"{failure}: {_cause(exc)}") from None
            except psycopg.OperationalError as exc:
                # A connection the server closed (it restarted, an idle timeout) fails
                # at its first use, and the pool discards it. A read runs again on
                # another; a write only if it failed at BEGIN, so that nothing it did
                # can have been committed.
                if conn is None or not conn.broken or begun or stale >= self._max_size:
                    raise error(f"{failure}: {_cause(exc)}") from None
                stale += 1
            except psycopg.Error as exc:
                refused = _refusal(exc)
                if refused is not None:
                    log.error(
                        "the database refused this role %s: %s; %s", refused, _cause(exc), failure
                    )
                    kind = AuditRefused if issubclass(error, AuditUnavailable) else DatabaseRefused
                    raise kind(
                        f"{failure}: the database refused this role {refused}: {_cause(exc)}"
                    ) from None
                raise error(f"{failure}: {_cause(exc)}") from None


class _Refused(Exception):
    """admit() said no: the transaction rolls back, taking its placeholder rows."""


def _open_schema(
    dsn: str,
    connect_timeout: float,
    privileges: Privileges = "owner",
    partitions: int = DEFAULT_PARTITIONS,
) -> str:
    """Connect once, bring the schema up to SCHEMA_VERSION (as its owner; a new schema's
    big tables in `partitions` partitions) or check that it is there already (as the
    application), and return its name."""
    conn = _connect(dsn, connect_timeout)
    try:
        with conn:
            schema = _pin_schema(conn)
            with conn.transaction():
                _lock_migrations(conn, schema)
                if privileges == "owner":
                    _migrate(conn, schema, partitions)
                else:
                    _check_app_schema(conn, schema)
            return schema
    except psycopg.Error as exc:
        raise StorageError(f"cannot open the database: {_cause(exc)}") from None


def grant_app_role(
    owner_dsn: str,
    app_role: str,
    *,
    connect_timeout: float = 10.0,
    partitions: int = DEFAULT_PARTITIONS,
) -> None:
    """As the schema's owner: migrate the schema to SCHEMA_VERSION, then grant app_role
    exactly what a server needs to run the storage Protocol, and nothing else.

    Whatever app_role held on the schema before is revoked first, so running this again
    (after an upgrade's migration) leaves the same grants. app_role must be a role of its
    own: a superuser, a role that may create roles (it could make itself a member of the
    owner) or a member of the owner's role is refused, since it would hold the owner's
    powers whatever is granted here.

    Grants are on the partitioned tables only: PostgreSQL checks a statement's privileges
    on the table it names, so the role reads and writes every partition through its
    parent and holds nothing on a partition itself."""
    _check_partitions(partitions)
    conn = _connect(owner_dsn, connect_timeout)
    try:
        with conn:
            schema = _pin_schema(conn)
            with conn.transaction():
                _lock_migrations(conn, schema)
                _migrate(conn, schema, partitions)
                _check_app_role(conn, app_role)
                names = {"schema": sql.Identifier(schema), "app": sql.Identifier(app_role)}
                for statement in _APP_GRANTS:
                    conn.execute(sql.SQL(statement).format(**names))
    except psycopg.Error as exc:
        raise StorageError(f"the application role was not granted: {_cause(exc)}") from None


# What a server's role gets, in order: first nothing at all, then each grant the storage
# Protocol needs. Tables are found through the owner's pinned search_path.
_APP_GRANTS: tuple[str, ...] = (
    "REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {app}",
    "REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {app}",
    "REVOKE ALL ON ALL FUNCTIONS IN SCHEMA {schema} FROM {app}",
    "REVOKE ALL ON SCHEMA {schema} FROM {app}",
    # USAGE, never CREATE: the server adds no table, function or trigger.
    "GRANT USAGE ON SCHEMA {schema} TO {app}",
    # Records, their data keys and tokens are written once and read; removing a data key
    # (crypto-shredding) is no part of the Protocol, so the server can neither delete nor
    # rewrite one.
    "GRANT SELECT, INSERT ON records, data_keys, tokens TO {app}",
    # nextval() draws storage order for a batch; USAGE allows it, and not setval().
    "GRANT USAGE ON SEQUENCE record_seq TO {app}",
    # The log is appended to and read. Erasing a subject's sealed details (the one change
    # the triggers allow) is the owner's act, so the server gets no UPDATE there.
    "GRANT SELECT, INSERT ON log_entries, log_nodes, log_subjects, log_details TO {app}",
    # Every append locks the head row with SELECT ... FOR UPDATE, which PostgreSQL allows
    # only to a role that may update a column of the table; the trigger refuses the
    # update itself, and there is no INSERT, DELETE or TRUNCATE.
    "GRANT SELECT, UPDATE (one) ON log_head TO {app}",
    # A later note for a stored size replaces it (cosignatures are added so); the size of
    # a checkpoint never changes and none is removed.
    "GRANT SELECT, INSERT, UPDATE (note) ON checkpoints TO {app}",
    # set_meta replaces a value (the log's verifier key, the sessions' state); keys are
    # never renamed or removed.
    "GRANT SELECT, INSERT, UPDATE (value) ON meta TO {app}",
    # Accounts are changed in place (role, password, second factors, lock, disabled),
    # never renamed and never deleted by the Protocol.
    "GRANT SELECT, INSERT, UPDATE (role, password_hash, attributes, created_at, disabled)"
    " ON accounts TO {app}",
    # Sessions: last_seen is touched; a session ends, and a stale one is purged, by
    # deleting its row.
    "GRANT SELECT, INSERT, UPDATE (last_seen), DELETE ON sessions TO {app}",
    # Login counters are raised under a row lock (FOR UPDATE, hence UPDATE), forgiven,
    # and cleared or purged by deleting.
    "GRANT SELECT, INSERT, UPDATE (failures, last_failure), DELETE ON login_failures TO {app}",
    # One-time marks are spent by inserting; expired ones are deleted by the next spend.
    "GRANT SELECT, INSERT, DELETE ON spent TO {app}",
    # Usage counters are charged in place, a row per account and counter, never deleted.
    "GRANT SELECT, INSERT, UPDATE (window_start, total) ON usage TO {app}",
    # Alerts are raised, then acknowledged and resolved in place; never deleted.
    "GRANT SELECT, INSERT, UPDATE (raised_at, body) ON alerts TO {app}",
    # A subject noted in an earlier window is moved on to the current one; the others
    # of earlier windows are forgotten.
    "GRANT SELECT, INSERT, UPDATE (window_start), DELETE ON usage_subjects TO {app}",
)

# Tables whose rows are history: a role opened as the application must hold no right to
# change or remove them beyond what _APP_GRANTS gives.
_HISTORY_TABLES = (
    "records",
    "data_keys",
    "tokens",
    "log_entries",
    "log_nodes",
    "log_subjects",
    "log_details",
    "checkpoints",
)


# The vault's own objects, the only names a refusal may repeat: the server's message names
# whatever it refused, and nothing but these is known to hold no value.
_OBJECTS = frozenset(
    {
        "meta",
        "record_seq",
        "records",
        "data_keys",
        "tokens",
        "accounts",
        "sessions",
        "login_failures",
        "spent",
        "usage",
        "alerts",
        "usage_subjects",
        "log_head",
        "log_entries",
        "log_nodes",
        "log_subjects",
        "log_details",
        "checkpoints",
    }
)
_PERMISSION_DENIED = re.compile(r"permission denied for (table|sequence|schema) (\w+)\Z")
# The texts the append-only triggers raise (migration 1). They raise SQLSTATE P0001, as any
# PL/pgSQL RAISE does; the schema holds no other function that raises, and the text is
# checked as well so that nothing else reported as P0001 passes for a refusal.
_TRIGGER_REFUSALS = frozenset(
    {"the access log is append-only", "sealed details can only be erased"}
)


def _refusal(exc: psycopg.Error) -> str | None:
    """What refused this role, if the database did: a privilege it lacks (SQLSTATE 42501)
    or an append-only trigger of the log (P0001). The object is named only when it is one
    of the vault's own; None for any other error."""
    message = exc.diag.message_primary or ""
    if isinstance(exc, pg_errors.InsufficientPrivilege):
        # Matched in the server's English; under another lc_messages the object goes unnamed.
        named = _PERMISSION_DENIED.match(message)
        if named is not None and (
            named.group(2) in _OBJECTS or _PARTITION_NAME.match(named.group(2))
        ):
            return f"a privilege on {named.group(1)} {named.group(2)}"
        return "a privilege"
    if isinstance(exc, pg_errors.RaiseException) and message in _TRIGGER_REFUSALS:
        return "a change to the access log (its append-only triggers)"
    return None


def _connect(dsn: str, connect_timeout: float) -> _Connection:
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout)))
    except psycopg.Error as exc:
        # A connection failure names the server, never a stored value; its first line
        # says what an operator must fix (refused, unknown database, authentication).
        reason = str(exc).splitlines()[0] if str(exc) else _cause(exc)
        raise StorageError(f"cannot connect to the database: {reason}") from None


def _pin_schema(conn: _Connection) -> str:
    """The schema the DSN names, set as the connection's only one, then pg_temp: as
    every pooled connection will be."""
    (schema,) = conn.execute("SELECT current_schema()").fetchone() or (None,)
    if schema is None:
        # A schema the role has no USAGE on is skipped as if it did not exist.
        raise ConfigurationError(
            "the database's search_path names no existing schema: create it first"
            " (and, for the application's role, grant it with 'custodes database grant')"
        )
    conn.execute(
        "SELECT set_config('search_path', quote_ident(%s) || ', pg_temp', false)",
        (schema,),
    )
    return str(schema)


def _lock_migrations(conn: _Connection, schema: str) -> None:
    # Held to the end of the transaction: an application opening while the owner
    # migrates waits, then finds the schema whole.
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s::integer, hashtext(%s))",
        (_MIGRATION_LOCK_CLASS, schema),
    )


@dataclass(frozen=True, slots=True)
class RoleStanding:
    """What a database role may do to the vault's schema, as the server answers for it: the
    one reading of a role's powers, behind the storage's own refusal of a role too strong
    for the application (_check_app_schema), the composition root's choice of how to open
    a database, and `custodes doctor`'s findings."""

    schema: str
    role: str  # current_user
    owner: bool  # owns the schema or a table of it, or may become a role that does
    superuser: bool
    creates_roles: bool  # CREATEROLE: could grant itself membership of the owner
    creates_in_schema: bool  # CREATE on the schema: could plant a table or a function
    rewrites: tuple[str, ...]  # history tables it may UPDATE, DELETE or TRUNCATE, table-wide
    version: int | None  # the schema's version; None: this role may not read it
    # The partitions of each of records, data_keys and tokens; None where any of them is
    # a plain table (a schema that held records before migration 5).
    partitions: int | None = None

    @property
    def holds_owner_powers(self) -> bool:
        """Whether the role is, or can make itself, the schema's owner: no grant limits it."""
        return self.owner or self.superuser or self.creates_roles

    @property
    def too_wide(self) -> bool:
        """Whether the role holds more than grant_app_role gives an application."""
        return self.creates_in_schema or bool(self.rewrites)

    @property
    def migrates(self) -> bool:
        """Whether the role can create and migrate the schema: the owner's open."""
        return self.owner or self.superuser

    @property
    def unpartitioned(self) -> bool:
        """Whether the big tables are plain tables, made before they were partitioned:
        every statement works on them, but VACUUM, index builds and dumps take each whole."""
        return self.version is not None and self.version > 0 and self.partitions is None

    @property
    def expected_version(self) -> int:
        """The schema version this software runs on."""
        return SCHEMA_VERSION


def role_standing(dsn: str, *, connect_timeout: float = 10.0) -> RoleStanding:
    """Connect as the DSN's role and ask the server what it may do to the schema the DSN
    names. Reads only catalogs and the schema version; changes nothing. StorageError if
    the server cannot be reached, ConfigurationError if the DSN names no schema the role
    may use, or the schema is not a vault's."""
    conn = _connect(dsn, connect_timeout)
    try:
        with conn:
            return _standing(conn, _pin_schema(conn))
    except psycopg.Error as exc:
        raise StorageError(f"cannot read the database role's privileges: {_cause(exc)}") from None


def _standing(conn: _Connection, schema: str) -> RoleStanding:
    row = conn.execute(
        "SELECT current_user, r.rolsuper, r.rolcreaterole,"
        " pg_has_role(n.nspowner, 'MEMBER') OR EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c"
        "  WHERE c.relnamespace = n.oid AND pg_has_role(c.relowner, 'MEMBER')),"
        " has_schema_privilege(n.oid, 'CREATE'),"
        # A partition counts as its table: a grant on one partition of tokens rewrites
        # tokens there.
        " ARRAY(SELECT c.relname::text FROM pg_catalog.pg_class AS c"
        "  WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p')"
        "  AND (c.relname = ANY(%s) OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits AS i"
        "   JOIN pg_catalog.pg_class AS p ON p.oid = i.inhparent"
        "   WHERE i.inhrelid = c.oid AND p.relnamespace = n.oid AND p.relname = ANY(%s)))"
        "  AND has_table_privilege(c.oid, 'UPDATE, DELETE, TRUNCATE') ORDER BY c.relname),"
        " (SELECT has_table_privilege(c.oid, 'SELECT') FROM pg_catalog.pg_class AS c"
        "  WHERE c.relnamespace = n.oid AND c.relname = 'meta' AND c.relkind IN ('r', 'p'))"
        " FROM pg_catalog.pg_roles AS r, pg_catalog.pg_namespace AS n"
        " WHERE r.rolname = current_user AND n.nspname = %s",
        (list(_HISTORY_TABLES), list(_HISTORY_TABLES), schema),
    ).fetchone()
    if row is None:
        raise ConfigurationError("the database role or its schema is not in the catalog")
    role, superuser, creates_roles, owner, creates, rewrites, reads_meta = row
    # No meta table yet reads as version 0; one this role may not read, as None (asking
    # would fail the transaction with InsufficientPrivilege).
    version = _schema_version(conn, schema) if reads_meta is not False else None
    counts = _partition_counts(conn, schema)
    partitioned = [counts.get(table) for table in _PARTITIONED_TABLES]
    return RoleStanding(
        schema=schema,
        role=str(role),
        owner=bool(owner),
        superuser=bool(superuser),
        creates_roles=bool(creates_roles),
        creates_in_schema=bool(creates),
        rewrites=tuple(str(name) for name in rewrites),
        version=version,
        partitions=None if None in partitioned else min(n for n in partitioned if n is not None),
    )


def _check_app_schema(conn: _Connection, schema: str) -> None:
    """Opened as the application: the schema must be at SCHEMA_VERSION already, readable
    by this role, and the role must not hold the owner's powers over it."""
    standing = _standing(conn, schema)
    version = standing.version
    if version is None:
        raise ConfigurationError(
            "this database role has not been granted the vault's tables: run"
            " 'custodes database grant' (grant_app_role) as the schema's owner"
        )
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the database schema is version {version}; this software knows only"
            f" up to {SCHEMA_VERSION}"
        )
    if version < SCHEMA_VERSION:
        raise ConfigurationError(
            f"the database schema is version {version}, this software needs"
            f" {SCHEMA_VERSION}: run the migration as the schema's owner ('custodes"
            " database grant', grant_app_role, migrates, then grants); the application's"
            " role never changes the schema"
        )
    if standing.holds_owner_powers or standing.too_wide:
        raise ConfigurationError(
            "opened with the application's privileges, but this database role could"
            " change or remove history: connect as a role prepared by grant_app_role"
        )


def check_app_role(owner_dsn: str, app_role: str, *, connect_timeout: float = 10.0) -> None:
    """As the schema's owner, before anything is made: refuse an application role that
    grant_app_role would refuse (missing, or holding the owner's powers). Reads only."""
    conn = _connect(owner_dsn, connect_timeout)
    try:
        with conn:
            _check_app_role(conn, app_role)
    except psycopg.Error as exc:
        raise StorageError(f"the application role was not checked: {_cause(exc)}") from None


def _check_app_role(conn: _Connection, app_role: str) -> None:
    row = conn.execute(
        "SELECT rolsuper, rolcreaterole, rolname = current_user"
        " OR pg_has_role(rolname, current_user, 'MEMBER')"
        " FROM pg_catalog.pg_roles WHERE rolname = %s",
        (app_role,),
    ).fetchone()
    if row is None:
        raise ConfigurationError("the application's database role does not exist: create it")
    superuser, creates_roles, holds_owner = row
    if superuser or creates_roles or holds_owner:
        raise ConfigurationError(
            "the application's database role must be a plain role of its own: not a"
            " superuser, not allowed to create roles, not the owner or a member of it"
        )


def _migrate(conn: _Connection, schema: str, partitions: int = DEFAULT_PARTITIONS) -> None:
    version = _schema_version(conn, schema)
    if version > SCHEMA_VERSION:
        raise ConfigurationError(
            f"the database schema is version {version}; this software knows only"
            f" up to {SCHEMA_VERSION}"
        )
    if version == SCHEMA_VERSION:
        return
    for script in _MIGRATIONS[version:]:
        conn.execute(script.encode())  # no parameters: one simple query, many statements
    if version < _PARTITIONED_VERSION:
        _partition_tables(conn, partitions)
    conn.execute(
        "INSERT INTO meta(key, value) VALUES (%s, %s)"
        " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (SCHEMA_VERSION_KEY, str(SCHEMA_VERSION).encode("ascii")),
    )


def _check_partitions(partitions: int) -> None:
    if isinstance(partitions, bool) or not isinstance(partitions, int):
        raise ConfigurationError("the partition count must be a whole number")
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ConfigurationError(f"the partition count must be from 1 to {MAX_PARTITIONS}")


def _partition_tables(conn: _Connection, partitions: int) -> None:
    """Migration 5: make records, data_keys and tokens again as hash-partitioned tables,
    if all three are empty; a schema holding records keeps its plain tables (see
    _PARTITIONED_VERSION). Columns, keys and indexes are those of migration 1, declared
    on the parent, so that each partition gets its own and a search reads one."""
    held = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM records) OR EXISTS (SELECT 1 FROM data_keys)"
        " OR EXISTS (SELECT 1 FROM tokens)"
    ).fetchone()
    if held is None or held[0]:
        return
    conn.execute(_PARTITIONED_SCHEMA.encode())
    width = max(3, len(str(partitions - 1)))
    for table in _PARTITIONED_TABLES:
        for remainder in range(partitions):
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {part} PARTITION OF {table}"
                    " FOR VALUES WITH (MODULUS {modulus}, REMAINDER {remainder})"
                ).format(
                    part=sql.Identifier(f"{table}_p{remainder:0{width}d}"),
                    table=sql.Identifier(table),
                    modulus=sql.Literal(partitions),
                    remainder=sql.Literal(remainder),
                )
            )


# Migration 1's three big tables, as partitioned parents (their partitions are made by
# _partition_tables). A partitioned table's primary key must hold its partition key,
# which each does already. SET STORAGE on the parent is copied to every partition made.
_PARTITIONED_SCHEMA = """
    DROP TABLE records, data_keys, tokens;
    CREATE TABLE records(
        record_id text COLLATE "C" PRIMARY KEY,
        seq bigint NOT NULL,
        record_type text NOT NULL,
        payload bytea NOT NULL
    ) PARTITION BY HASH (record_id);
    ALTER TABLE records ALTER COLUMN payload SET STORAGE EXTERNAL;
    CREATE INDEX records_by_seq ON records(seq);
    CREATE TABLE data_keys(
        record_id text COLLATE "C" PRIMARY KEY,
        kek_version bigint NOT NULL,
        wrapped bytea NOT NULL
    ) PARTITION BY HASH (record_id);
    CREATE TABLE tokens(
        token bigint,
        index_id bigint,
        record_id text COLLATE "C",
        seq bigint NOT NULL,
        PRIMARY KEY(token, index_id, record_id)
    ) PARTITION BY HASH (token);
    CREATE INDEX tokens_by_seq ON tokens USING brin(seq)
        WITH (pages_per_range = 32, autosummarize = on);
"""


def _partition_counts(conn: _Connection, schema: str) -> dict[str, int]:
    """How many partitions each of the big tables has; a table that is not partitioned
    is left out (a schema made before migration 5 that held records then)."""
    rows = conn.execute(
        "SELECT c.relname::text, (SELECT count(*) FROM pg_catalog.pg_inherits AS i"
        "  WHERE i.inhparent = c.oid)"
        " FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n"
        "  ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind = 'p' AND c.relname = ANY(%s)",
        (schema, list(_PARTITIONED_TABLES)),
    ).fetchall()
    return {str(name): int(count) for name, count in rows}


def _schema_version(conn: _Connection, schema: str) -> int:
    has_meta = conn.execute(
        "SELECT 1 FROM pg_catalog.pg_tables WHERE schemaname = %s AND tablename = 'meta'",
        (schema,),
    ).fetchone()
    if has_meta is None:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = %s", (SCHEMA_VERSION_KEY,)).fetchone()
    if row is None:
        raise ConfigurationError("the database has no schema version: not a custodes vault")
    try:
        return int(bytes(row[0]).decode("ascii"))
    except (TypeError, ValueError):
        raise ConfigurationError("the database schema version is unreadable") from None


def _stored_log_size(conn: _Connection) -> int:
    # Indexes run from 0 without gaps (log_append checks first_index, the triggers
    # refuse deletes), so the size is the last index + 1: one seek, not a count.
    row = conn.execute("SELECT max(idx) FROM log_entries").fetchone()
    return 0 if row is None or row[0] is None else int(row[0]) + 1


def _cause(exc: psycopg.Error) -> str:
    """What failed, without a value: psycopg's messages can carry a DETAIL line that
    quotes a row (a duplicate key's value), and some primary messages quote the input
    that failed to parse, so only the error's class and its SQLSTATE are kept."""
    name = type(exc).__name__
    return f"{name} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else name


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> tuple[list[Any], ...]:
    """Rows as `width` column lists, for unnest(): one statement per table, not per row."""
    return tuple([row[n] for row in rows] for n in range(width))


def _account_params(account: AccountRow) -> tuple[str, str, str, bytes, float, bool]:
    return (
        str(account.username),
        str(account.role),
        str(account.password_hash),
        bytes(account.attributes),
        float(account.created_at),
        bool(account.disabled),
    )


def _session_from_row(row: Sequence[Any]) -> SessionRow:
    key, username, role, issued_at, expires, last_seen, client = row
    return SessionRow(
        bytes(key),
        str(username),
        str(role),
        float(issued_at),
        float(expires),
        float(last_seen),
        None if client is None else str(client),
    )


def connect_pinned(dsn: str, *, connect_timeout: float = 10.0) -> tuple[_Connection, str]:
    """A connection of its own (autocommit; explicit transactions) pinned to the vault's
    schema as every pooled connection is, and the schema's name: for what reads the
    tables outside the storage Protocol (a backup's locked snapshot, a restore's check)."""
    conn = _connect(dsn, connect_timeout)
    try:
        return conn, _pin_schema(conn)
    except BaseException:
        conn.close()
        raise


def _insert_log_batch(conn: _Connection, checked: CheckedLogAppend) -> None:
    first = checked.first_index
    if not checked.entries:
        return
    size = first + len(checked.entries)
    # Sorted so that each index page is filled in one visit.
    nodes = sorted((level, index, digest) for (level, index), digest in checked.nodes.items())
    subjects = sorted(checked.subjects)
    details = sorted(checked.details)
    # One statement for the four tables (empty arrays insert nothing), its arrays sent
    # in binary: dumped as text, every hash and entry is hex-encoded in Python while the
    # log's lock is held. Not ON CONFLICT DO NOTHING: a node stored twice means the
    # caller's tree is wrong, and the whole batch fails.
    conn.execute(
        _INSERT_LOG_BATCH,
        (
            list(range(first, size)),
            checked.entries,
            *_columns(nodes, 3),
            *_columns(subjects, 2),
            *_columns(details, 2),
        ),
    )


_INSERT_LOG_BATCH = """
    WITH entries AS (
        INSERT INTO log_entries(idx, entry) SELECT * FROM unnest(%b::bigint[], %b::bytea[])
    ), nodes AS (
        INSERT INTO log_nodes(level, idx, hash)
        SELECT * FROM unnest(%b::bigint[], %b::bigint[], %b::bytea[])
    ), subjects AS (
        INSERT INTO log_subjects(commitment, idx) SELECT * FROM unnest(%b::bytea[], %b::bigint[])
    )
    INSERT INTO log_details(idx, blob) SELECT * FROM unnest(%b::bigint[], %b::bytea[])
"""

# The log's size and the stored nodes at the peaks of two trees, the stored one and one of
# %(known)s leaves, in one statement: a tree of n leaves has a peak at each level L whose
# bit is set in n, the perfect subtree (L, (n >> L) - 1) (audit.merkle.peak_positions).
# One row at least, every row carrying the size; a row's hash is null where no node is
# stored (and level and idx too where neither tree has a peak).
LOG_FRONTIER_SQL = """
    WITH stored AS (SELECT coalesce(max(idx) + 1, 0) AS n FROM log_entries),
    sizes AS (SELECT n FROM stored UNION SELECT %(known)s::bigint),
    peaks AS (
        SELECT DISTINCT g AS level, (sizes.n >> g) - 1 AS idx
        FROM sizes, generate_series(0, 62) AS g
        WHERE (sizes.n >> g) & 1 = 1
    )
    SELECT stored.n, peaks.level, peaks.idx, node.hash
    FROM stored
    LEFT JOIN peaks ON true
    LEFT JOIN LATERAL (SELECT hash FROM log_nodes
        WHERE log_nodes.level = peaks.level AND log_nodes.idx = peaks.idx LIMIT 1) AS node
        ON true
"""
