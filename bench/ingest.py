"""Ingest throughput: custodes (encrypted) against a plaintext baseline on the same
backend, in one run.

Both read the same synthetic JSON Lines file, parse and validate every record the same
way, and store it durably with the same indexes: custodes as ciphertext with keyed
blind-index tokens, the baseline as plaintext columns. On SQLite: WAL, synchronous=FULL,
batches of 2,000. On PostgreSQL (--backend postgresql, the server named by --database,
each phase in a schema of its own, dropped after): synchronous commits, the baseline
COPYing its rows as custodes does. Each phase runs in its own process so its peak RSS is
its own.

    python bench/ingest.py --records 1000000
    python bench/ingest.py --records 1000000 --backend sqlite postgresql
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def make_input(path: Path, records: int, seed: int) -> int:
    from custodes.synth import write_jsonl

    # The default rates give 1.7 records per person (0.2 cases, 0.5 deliveries).
    people = max(1, round(records / 1.7))
    with path.open("wb") as f:
        return write_jsonl(f, people, seed=seed)


# The server on this kind of machine (trust authentication on loopback).
LOCAL_SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def phase_custodes(
    source: Path, workdir: Path, workers: int, database: str | None = None
) -> dict[str, float]:
    from custodes.bootstrap import create_vault

    vault = create_vault(
        workdir / "vault",
        passphrase="bench passphrase",
        keyring_path=workdir / "keys" / "k",
        # Beside the keyring, in the phase's own directory: never the user's config.
        log_key_path=workdir / "keys" / "log.key",
        database=database,
    )
    try:
        started = time.perf_counter()
        report = vault.ingest(vault.operator, source, workers=workers)
        seconds = time.perf_counter() - started
    finally:
        vault.close()
    handled = report.accepted + report.already_present + report.rejected
    return {"records": handled, "seconds": seconds, "rejected": report.rejected}


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

        from custodes.records import RecordValidator, index_parts
        from custodes.schema import load_schema

        schema = load_schema()
        validator = RecordValidator(schema)
        plan = {
            rt.name: (rt, list(rt.indexes.values()), rt.source_key) for rt in schema.types.values()
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
                rt, indexes, source_key = plan[record.record_type]
                rid = record.record_type + ":" + "|".join(str(record.values[k]) for k in source_key)
                rows.setdefault(rid, (rid, record.record_type, orjson.dumps(record.values)))
                for ix in indexes:
                    for parts in index_parts(rt, ix, record.values):
                        idx_rows.add((ix.index_id, "\x1f".join(parts), rid))
                if len(rows) >= 2000:
                    yield list(rows.values()), sorted(idx_rows)
                    rows, idx_rows = {}, set()
        if rows:
            yield list(rows.values()), sorted(idx_rows)


def phase_plaintext(source: Path, workdir: Path) -> dict[str, float]:
    db = sqlite3.connect(workdir / "plain.db", isolation_level=None)
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


def phase_plaintext_postgres(source: Path, database: str) -> dict[str, float]:
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


def postgres_bytes(database: str) -> int:
    import psycopg

    with psycopg.connect(database) as db:
        row = db.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')"
        ).fetchone()
    return int(row[0]) if row else 0


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


def run_phase(args: argparse.Namespace) -> None:
    source = Path(args.source)
    with tempfile.TemporaryDirectory(prefix="custodes-bench-") as tmp:
        workdir = Path(tmp)
        schema, database = (None, None)
        if args.backend[0] == "postgresql":
            schema, database = fresh_schema(args.database)
        try:
            if args.phase == "plaintext" and database is not None:
                result = phase_plaintext_postgres(source, database)
            elif args.phase == "plaintext":
                result = phase_plaintext(source, workdir)
            else:
                result = phase_custodes(source, workdir, args.workers[0], database)
            files = sum(p.stat().st_size for p in workdir.rglob("*") if p.is_file())
            result["db_bytes"] = files + (postgres_bytes(database) if database else 0)
        finally:
            if schema is not None:
                drop_schema(args.database, schema)
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result["peak_rss_mib"] = usage / 1024
    result["peak_child_rss_mib"] = children / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000, help="records in the input")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument(
        "--backend", nargs="*", choices=["sqlite", "postgresql"], default=["sqlite"]
    )
    parser.add_argument(
        "--database", default=LOCAL_SERVER, help="the PostgreSQL server for --backend postgresql"
    )
    parser.add_argument("--phase", choices=["plaintext", "custodes"], help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase(args)
        return

    with tempfile.TemporaryDirectory(prefix="custodes-bench-input-") as tmp:
        source = Path(tmp) / "population.jsonl"
        lines = make_input(source, args.records, args.seed)
        size = source.stat().st_size
        print(f"input: {lines:,} records, {size / 2**20:,.1f} MiB of JSON Lines")

        def phase(name: str, backend: str, workers: int = 1) -> dict[str, float]:
            cmd = [sys.executable, __file__, "--phase", name, "--source", str(source)]
            cmd += ["--workers", str(workers), "--backend", backend, "--database", args.database]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
            return json.loads(done.stdout.strip().splitlines()[-1])

        for backend in args.backend:
            plain = phase("plaintext", backend)
            plain_rate = plain["records"] / plain["seconds"]
            print(
                f"{backend:>10} plaintext baseline : {plain_rate:>10,.0f} records/s  "
                f"({plain['seconds']:.1f} s, peak RSS {plain['peak_rss_mib']:.0f} MiB, "
                f"db {plain['db_bytes'] / 2**20:,.0f} MiB)"
            )
            for workers in args.workers:
                enc = phase("custodes", backend, workers)
                rate = enc["records"] / enc["seconds"]
                print(
                    f"{backend:>10} custodes, {workers} worker(s): {rate:>10,.0f} records/s  "
                    f"({enc['seconds']:.1f} s, peak RSS {enc['peak_rss_mib']:.0f} MiB, "
                    f"workers' peak {enc['peak_child_rss_mib']:.0f} MiB, "
                    f"db {enc['db_bytes'] / 2**20:,.0f} MiB)  "
                    f"ratio encrypted/plaintext = {rate / plain_rate:.2f}"
                )


if __name__ == "__main__":
    main()
