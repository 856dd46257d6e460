"""What the benches measure custodes against, and where they run it on PostgreSQL.

The plaintext baseline: the input parsed and validated as custodes does, stored durably
with the same index values in the clear (SQLite: WAL, synchronous=FULL; PostgreSQL:
synchronous commits, COPY). Each PostgreSQL phase runs in a schema of its own, made fresh
on the server and dropped after.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

# The server on this kind of machine (trust authentication on loopback).
LOCAL_SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"

PlainRow = tuple[str, str, bytes]  # record id, type, the validated fields as JSON
IndexRow = tuple[int, str, str]  # index id, plaintext index value, record id


class PlaintextBatches:
    """The input as both baselines store it: parsed and validated as custodes does, keyed
    by the record's source key, with the same index values in the clear; 2,000 records a
    batch (a record repeated within a batch kept once). Counts what it read and refused."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.handled = self.rejected = 0

    def __iter__(self) -> Iterator[tuple[list[PlainRow], list[IndexRow]]]:
        import orjson

        from custodes.records import RecordValidator, index_inputs
        from custodes.schema import load_schema

        schema = load_schema()
        validator = RecordValidator(schema)
        # The index inputs compiled once per index, as custodes's codec does.
        plan = {
            rt.name: (
                [(ix.index_id, index_inputs(rt, ix)) for ix in rt.indexes.values()],
                rt.source_key,
            )
            for rt in schema.types.values()
        }
        rows: dict[str, PlainRow] = {}
        idx_rows: set[IndexRow] = set()
        with self.source.open("rb") as f:
            for line_no, line in enumerate(f, 1):
                self.handled += 1
                try:
                    record = validator.validate(orjson.loads(line), line=line_no)
                except Exception:
                    self.rejected += 1
                    continue
                indexes, source_key = plan[record.record_type]
                rid = record.record_type + ":" + "|".join(str(record.values[k]) for k in source_key)
                rows.setdefault(rid, (rid, record.record_type, orjson.dumps(record.values)))
                for index_id, inputs in indexes:
                    for parts in inputs(record.values):
                        idx_rows.add((index_id, "\x1f".join(parts), rid))
                if len(rows) >= 2000:
                    yield list(rows.values()), sorted(idx_rows)
                    rows, idx_rows = {}, set()
        if rows:
            yield list(rows.values()), sorted(idx_rows)


def store_plaintext(source: Path, path: Path) -> dict[str, float]:
    """The baseline in a new SQLite file: records handled and refused, seconds taken."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(
        "CREATE TABLE records (record_id TEXT PRIMARY KEY, type TEXT, doc BLOB) WITHOUT ROWID"
    )
    db.execute(
        "CREATE TABLE idx (index_id INTEGER, value TEXT, record_id TEXT, "
        "PRIMARY KEY (index_id, value, record_id)) WITHOUT ROWID"
    )
    batches = PlaintextBatches(source)
    started = time.perf_counter()
    for rows, idx_rows in batches:
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT OR IGNORE INTO records VALUES (?, ?, ?)", rows)
        db.executemany("INSERT OR IGNORE INTO idx VALUES (?, ?, ?)", idx_rows)
        db.execute("COMMIT")
    seconds = time.perf_counter() - started
    db.close()
    return {"records": batches.handled, "seconds": seconds, "rejected": batches.rejected}


def store_plaintext_postgres(source: Path, database: str) -> dict[str, float]:
    """The baseline in the (empty) schema `database` names, as store_plaintext."""
    import psycopg

    db = psycopg.connect(database, autocommit=True)
    db.execute("SET synchronous_commit = on")
    db.execute(
        'CREATE TABLE records (record_id TEXT COLLATE "C" PRIMARY KEY, type TEXT, doc BYTEA)'
    )
    db.execute(
        'CREATE TABLE idx (index_id INTEGER, value TEXT COLLATE "C", record_id TEXT COLLATE "C",'
        " PRIMARY KEY (index_id, value, record_id))"
    )
    batches = PlaintextBatches(source)
    started = time.perf_counter()
    for rows, idx_rows in batches:
        with db.transaction(), db.cursor() as cur:
            with cur.copy("COPY records (record_id, type, doc) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            with cur.copy("COPY idx (index_id, value, record_id) FROM STDIN") as copy:
                for idx_row in idx_rows:
                    copy.write_row(idx_row)
    seconds = time.perf_counter() - started
    db.close()
    return {"records": batches.handled, "seconds": seconds, "rejected": batches.rejected}


def fresh_schema(server: str) -> tuple[str, str]:
    """A new schema on the server, and a connection string whose search_path is it."""
    import secrets

    import psycopg
    from psycopg import sql

    name = f"custodes_bench_{secrets.token_hex(4)}"
    with psycopg.connect(server, autocommit=True) as db:
        db.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    return name, psycopg.conninfo.make_conninfo(server, options=f"-csearch_path={name}")


def drop_schema(server: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server, autocommit=True) as db:
        db.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
