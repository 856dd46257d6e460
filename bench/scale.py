"""custodes at population sizes on PostgreSQL: ingest, bytes per person, audited lookups.

For each --people size, in turn and each in schemas of its own on the server --database
names (dropped after): synthesises that many people (with their cases and deliveries),
stores them as the plaintext baseline and as a custodes vault (--workers ingest
processes), measures what each takes on disk per person (every table, index and TOAST
relation of its schema, partitions included), then serves each from --server-workers
processes and drives audited exact-ID searches over HTTP at each --concurrency level
(bench/serve.py's driver: keep-alive connections, lookups/s, p50 and p99). Every lookup
of custodes is authenticated and on the access log before it is answered; the
baseline's commits a plain log row.

Prints a table, a column per size; asserts nothing. The figures in docs/scaling.md come
from this script.

    python bench/scale.py --people 1000000 10000000 [--concurrency 16,64] [--seconds 20]
    python bench/scale.py --people 20000 --seconds 2 --warmup 1   (a quick look)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from baseline import LOCAL_SERVER, drop_schema, fresh_schema
from serve import (
    PASSWORD,
    USER,
    Figures,
    build_baseline,
    build_vault,
    login,
    measure,
    running,
    sample_ids,
    server_env,
    synthesise,
)

SAMPLE = 20_000

# The relations of a schema and what they hold on disk: tables (partitions are tables
# too; a partitioned parent holds nothing itself) with their indexes and TOAST.
SCHEMA_BYTES = """
    SELECT c.relname, pg_total_relation_size(c.oid)
    FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname = %s AND c.relkind IN ('r', 'm')
"""


@dataclass(frozen=True, slots=True)
class Size:
    """One population size's figures."""

    people: int
    records: int
    ingest_seconds: float
    baseline_ingest_seconds: float
    bytes: int
    baseline_bytes: int
    largest: list[tuple[str, int]]
    custodes: dict[int, Figures]
    baseline: dict[int, Figures]


def schema_bytes(server: str, schema: str) -> tuple[int, list[tuple[str, int]]]:
    """Bytes on disk of every relation of the schema, and the largest few by name (a
    partition counted under its parent's name, the part before its number)."""
    by_table: dict[str, int] = {}
    with psycopg.connect(server, autocommit=True) as db:
        db.execute("CHECKPOINT")  # so that sizes are what is on disk, not in flight
        for name, size in db.execute(SCHEMA_BYTES, (schema,)):
            table = str(name).rstrip("0123456789").rstrip("_")
            by_table[table] = by_table.get(table, 0) + int(size)
    largest = sorted(by_table.items(), key=lambda item: -item[1])[:4]
    return sum(by_table.values()), largest


def count_lines(source: Path) -> int:
    with source.open("rb") as f:
        return sum(1 for _ in f)


def run_size(people: int, args: argparse.Namespace, levels: list[int]) -> Size:
    workdir = Path(tempfile.mkdtemp(prefix="custodes-bench-scale-"))
    with contextlib.ExitStack() as made:
        made.callback(shutil.rmtree, workdir, ignore_errors=True)
        source = synthesise(workdir, people, args.seed)
        records = count_lines(source)
        ids = sample_ids(source, SAMPLE, args.seed)
        env = server_env(workdir, own_vault=True)
        workers = str(args.server_workers)

        plain_name, plain_dsn = fresh_schema(args.database)
        made.callback(drop_schema, args.database, plain_name)
        area = workdir / f"{people}"
        area.mkdir()
        started = time.perf_counter()
        store, token = build_baseline(area, source, plain_dsn)
        baseline_seconds = time.perf_counter() - started
        baseline_bytes, _ = schema_bytes(args.database, plain_name)
        with running(["--serve-baseline", "postgresql", store, workers], env, area / "b.log") as p:
            print(f"{people:,} people: measuring the baseline", flush=True)
            baseline = measure(p, token, ids, levels, args)

        vault_name, vault_dsn = fresh_schema(args.database)
        made.callback(drop_schema, args.database, vault_name)
        directory, secret, ingest_seconds = build_vault(
            area, source, people, args.workers, vault_dsn
        )
        total, largest = schema_bytes(args.database, vault_name)
        with running(["--serve", str(directory), workers], env, area / "v.log") as port:
            bearer = login(f"http://127.0.0.1:{port}", USER, PASSWORD, secret)
            print(f"{people:,} people: measuring custodes", flush=True)
            custodes = measure(port, bearer, ids, levels, args)
    return Size(
        people,
        records,
        ingest_seconds,
        baseline_seconds,
        total,
        baseline_bytes,
        largest,
        custodes,
        baseline,
    )


Row = tuple[str, Callable[[Size], str]]


def level_rows(level: int) -> list[Row]:
    """The rows of one level of concurrency."""

    def ratio(s: Size) -> str:
        plain = s.baseline[level]
        return f"{s.custodes[level].rate / plain.rate:.2f}" if plain.lookups else "-"

    return [
        (f"{level} conn: lookups/s", lambda s: f"{s.custodes[level].rate:,.0f}"),
        ("  p99 ms", lambda s: f"{s.custodes[level].p99_ms:.1f}"),
        ("  baseline lookups/s", lambda s: f"{s.baseline[level].rate:,.0f}"),
        ("  baseline p99 ms", lambda s: f"{s.baseline[level].p99_ms:.1f}"),
        ("  ratio", ratio),
        ("  errors", lambda s: f"{s.custodes[level].errors}/{s.baseline[level].errors}"),
    ]


def table(sizes: list[Size], levels: list[int], args: argparse.Namespace) -> str:
    """A column per population size."""
    rows: list[Row] = [
        ("records (people, cases, deliveries)", lambda s: f"{s.records:,}"),
        ("ingest s", lambda s: f"{s.ingest_seconds:,.0f}"),
        ("  records/s", lambda s: f"{s.records / s.ingest_seconds:,.0f}"),
        ("  baseline s", lambda s: f"{s.baseline_ingest_seconds:,.0f}"),
        ("bytes per person on disk", lambda s: f"{s.bytes / s.people:,.0f}"),
        ("  baseline", lambda s: f"{s.baseline_bytes / s.people:,.0f}"),
    ]
    for level in levels:
        rows += level_rows(level)
    width = 14
    lines = [
        f"PostgreSQL; ingest workers {args.workers}, server workers {args.server_workers}, "
        f"{args.seconds:g} s measured at each level",
        f"{'people':<38}" + "".join(f"{s.people:>{width},}" for s in sizes),
    ]
    for name, cell in rows:
        lines.append(f"{name:<38}" + "".join(f"{cell(s):>{width}}" for s in sizes))
    for s in sizes:
        parts = ", ".join(f"{name} {size / s.people:,.0f}" for name, size in s.largest)
        lines.append(f"bytes per person by table at {s.people:,}: {parts}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--people", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    parser.add_argument("--database", default=LOCAL_SERVER, help="the PostgreSQL server")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--server-workers", type=int, default=2)
    args = parser.parse_args()
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error("--concurrency is a number or a comma list of numbers")
    if not all(1 <= c <= 1024 for c in levels) or not all(p >= 100 for p in args.people):
        parser.error("--concurrency is 1..1024 and each --people at least 100")
    sizes = []
    for people in args.people:
        sizes.append(run_size(people, args, levels))
        print(table(sizes, levels, args), flush=True)


if __name__ == "__main__":
    main()
