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

Below each custodes figure, where its time went a record: parse, validate and seal as
CPU time of the worker processes (what one core does, whatever else the machine runs),
and the write (the batch's log entry and its storing, durable) as wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baseline import (
    LOCAL_SERVER,
    drop_schema,
    fresh_schema,
    store_plaintext,
    store_plaintext_postgres,
)


def make_input(path: Path, records: int, seed: int) -> int:
    from custodes.synth import write_jsonl

    # The default rates give 1.7 records per person (0.2 cases, 0.5 deliveries).
    people = max(1, round(records / 1.7))
    with path.open("wb") as f:
        return write_jsonl(f, people, seed=seed)


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
    result = {"records": handled, "seconds": seconds, "rejected": report.rejected}
    result.update({f"stage_{name}": value for name, value in report.stage_seconds.items()})
    return result


def stage_line(result: dict[str, float]) -> str:
    """Where a custodes phase spent its time, in µs a record: parse, validate and seal as
    the workers' CPU time (summed over workers), write as the writer's wall time."""
    records = max(1.0, result["records"])

    def us(stage: str) -> float:
        return result.get(f"stage_{stage}", 0.0) / records * 1e6

    sealing = us("parse") + us("validate") + us("seal")
    return (
        f"parse {us('parse'):.1f} + validate {us('validate'):.1f} + seal {us('seal'):.1f}"
        f" = {sealing:.1f} µs CPU ({1e6 / sealing if sealing else 0:,.0f} records/s a core);"
        f" write {us('write'):.1f} µs wall"
    )


def postgres_bytes(database: str) -> int:
    import psycopg

    with psycopg.connect(database) as db:
        row = db.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'm')"
        ).fetchone()
    return int(row[0]) if row else 0


def run_phase(args: argparse.Namespace) -> None:
    source = Path(args.source)
    with tempfile.TemporaryDirectory(prefix="custodes-bench-") as tmp:
        workdir = Path(tmp)
        schema, database = (None, None)
        if args.backend[0] == "postgresql":
            schema, database = fresh_schema(args.database)
        try:
            if args.phase == "plaintext" and database is not None:
                result = store_plaintext_postgres(source, database)
            elif args.phase == "plaintext":
                result = store_plaintext(source, workdir / "plain.db")
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
            result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
            return result

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
                print(f"{'':>10}   per record: {stage_line(enc)}")


if __name__ == "__main__":
    main()
