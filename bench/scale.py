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
from psycopg import sql

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
    vacuum_seconds: float
    baseline_vacuum_seconds: float
    bytes: int
    baseline_bytes: int
    largest: list[tuple[str, int]]
    custodes: dict[int, Figures]
    baseline: dict[int, Figures]


def table_of(relation: str) -> str:
    """A partition's parent table's name (records_p3 → records_p), a table's own."""
    return relation.rstrip("0123456789").rstrip("_")


def schema_bytes(server: str, schema: str) -> tuple[int, list[tuple[str, int]]]:
    """Bytes on disk of every relation of the schema, and the largest few by name (a
    partition counted under its parent's name, the part before its number)."""
    by_table: dict[str, int] = {}
    with psycopg.connect(server, autocommit=True) as db:
        db.execute("CHECKPOINT")  # so that sizes are what is on disk, not in flight
        for name, size in db.execute(SCHEMA_BYTES, (schema,)):
            table = table_of(str(name))
            by_table[table] = by_table.get(table, 0) + int(size)
    largest = sorted(by_table.items(), key=lambda item: -item[1])[:4]
    return sum(by_table.values()), largest


# What the server did for each table of a schema, by the statistics PostgreSQL keeps:
# pages it asked the OS for (read) or found in its own buffers (hit), and rows it read
# by sequential scans.
TABLE_COUNTS = """
    SELECT s.relname,
           s.heap_blks_read + s.idx_blks_read
               + coalesce(s.toast_blks_read, 0) + coalesce(s.tidx_blks_read, 0),
           s.heap_blks_hit + s.idx_blks_hit
               + coalesce(s.toast_blks_hit, 0) + coalesce(s.tidx_blks_hit, 0),
           coalesce(t.seq_tup_read, 0)
    FROM pg_statio_user_tables AS s JOIN pg_stat_user_tables AS t USING (relid)
    WHERE s.schemaname = %s
"""
# A backend reports its statistics when idle, at most 10 s after its last transaction
# (PGSTAT_IDLE_INTERVAL); counters are read that long after the load stops (--stats-wait).
STATS_WAIT = 11.0


def disk_reads() -> tuple[int, int]:
    """Read requests and 512-byte sectors read by every whole disk since boot
    (/proc/diskstats; partitions and virtual devices left out)."""
    requests = sectors = 0
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            name = fields[2]
            if Path(f"/sys/block/{name}/device").exists():
                requests += int(fields[3])
                sectors += int(fields[5])
    return requests, sectors


def counting(server: str, schema: str, wait: float) -> Callable[[], dict[str, int]]:
    """What the server and the machine's disks have done for a schema so far, read `wait`
    seconds after the load stops: the counters measure() takes the growth of, over each
    level."""

    def counters() -> dict[str, int]:
        time.sleep(wait)
        counted: dict[str, int] = {}

        def add(name: str, count: int) -> None:
            counted[name] = counted.get(name, 0) + count

        with psycopg.connect(server, autocommit=True) as db:
            for name, read, hit, seq_rows in db.execute(TABLE_COUNTS, (schema,)):
                table = table_of(str(name))
                add("pages " + table, int(read) + int(hit))
                add("os_reads " + table, int(read))
                add("pages", int(read) + int(hit))
                add("os_reads", int(read))
                add("seq_rows", int(seq_rows))
        requests, sectors = disk_reads()
        return counted | {"disk_reads": requests, "disk_kib": sectors // 2}

    return counters


# The schema's tables, partitioned parents standing for their partitions.
SCHEMA_TABLES = """
    SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition
"""


def vacuum(server: str, schema: str) -> float:
    """VACUUM (ANALYZE) every table of the schema, as the PostgreSQL manual advises after
    a bulk load: the statistics the planner needs, the visibility map index-only scans
    need, and hint bits set now rather than by the first reads (which would write every
    page they touch). Both stores get it before they are measured; it is timed apart
    from their loads. Seconds taken."""
    started = time.perf_counter()
    with psycopg.connect(server, autocommit=True) as db:
        for (name,) in db.execute(SCHEMA_TABLES, (schema,)).fetchall():
            db.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(schema, str(name))))
    return time.perf_counter() - started


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

        area = workdir / f"{people}"
        area.mkdir()
        # Each store is measured with only itself on the server, and dropped before
        # the next is made: neither is served from a page cache the other has filled.
        with contextlib.ExitStack() as plain:
            plain_name, plain_dsn = fresh_schema(args.database)
            plain.callback(drop_schema, args.database, plain_name)
            started = time.perf_counter()
            store, token = build_baseline(area, source, plain_dsn)
            baseline_seconds = time.perf_counter() - started
            baseline_vacuum = vacuum(args.database, plain_name)
            baseline_bytes, _ = schema_bytes(args.database, plain_name)
            command = ["--serve-baseline", "postgresql", store, workers]
            with running(command, env, area / "b.log") as p:
                print(f"{people:,} people: measuring the baseline", flush=True)
                baseline = measure(
                    p,
                    token,
                    ids,
                    levels,
                    args,
                    counting(args.database, plain_name, args.stats_wait),
                )

        vault_name, vault_dsn = fresh_schema(args.database)
        made.callback(drop_schema, args.database, vault_name)
        directory, secret, ingest_seconds = build_vault(
            area, source, people, args.workers, vault_dsn
        )
        vault_vacuum = vacuum(args.database, vault_name)
        total, largest = schema_bytes(args.database, vault_name)
        with running(["--serve", str(directory), workers], env, area / "v.log") as port:
            bearer = login(f"http://127.0.0.1:{port}", USER, PASSWORD, secret)
            print(f"{people:,} people: measuring custodes", flush=True)
            custodes = measure(
                port,
                bearer,
                ids,
                levels,
                args,
                counting(args.database, vault_name, args.stats_wait),
            )
    return Size(
        people,
        records,
        ingest_seconds,
        baseline_seconds,
        vault_vacuum,
        baseline_vacuum,
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
        *((f"  {label} a lookup", per_lookup(level, counter)) for label, counter in COUNTED_ROWS),
    ]


# The counters shown a lookup, each as custodes/baseline: what tells a plan that scans
# apart from pages the page cache no longer holds.
COUNTED_ROWS = [
    ("pages touched", "pages"),
    ("pages from the OS", "os_reads"),
    ("disk reads", "disk_reads"),
    ("KiB from disk", "disk_kib"),
    ("rows seq-scanned", "seq_rows"),
]


def per_lookup(level: int, counter: str) -> Callable[[Size], str]:
    def cell(s: Size) -> str:
        mine, theirs = s.custodes[level], s.baseline[level]
        return f"{mine.per_lookup(counter):.1f}/{theirs.per_lookup(counter):.1f}"

    return cell


def table(sizes: list[Size], levels: list[int], args: argparse.Namespace) -> str:
    """A column per population size."""
    rows: list[Row] = [
        ("records (people, cases, deliveries)", lambda s: f"{s.records:,}"),
        ("ingest s", lambda s: f"{s.ingest_seconds:,.0f}"),
        ("  records/s", lambda s: f"{s.records / s.ingest_seconds:,.0f}"),
        ("  baseline s", lambda s: f"{s.baseline_ingest_seconds:,.0f}"),
        (
            "vacuum (analyze) s, custodes/baseline",
            lambda s: f"{s.vacuum_seconds:,.0f}/{s.baseline_vacuum_seconds:,.0f}",
        ),
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
    for s in sizes:
        for level in levels:
            for system, figures in (("custodes", s.custodes), ("baseline", s.baseline)):
                lines.append(
                    f"pages a lookup by table at {s.people:,}, {level} conn, {system}: "
                    + busiest(figures[level])
                )
    return "\n".join(lines)


def busiest(figures: Figures) -> str:
    """The tables whose pages a lookup touched most, each as touched (from the OS)."""
    tables = sorted(
        (
            (name.removeprefix("pages "), count)
            for name, count in figures.counted.items()
            if name.startswith("pages ") and count
        ),
        key=lambda item: (-item[1], item[0]),
    )
    return ", ".join(
        f"{table} {figures.per_lookup('pages ' + table):.1f}"
        f" ({figures.per_lookup('os_reads ' + table):.1f})"
        for table, _ in tables[:8]
    )


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
    parser.add_argument(
        "--stats-wait",
        type=float,
        default=STATS_WAIT,
        help="seconds to let the server's statistics settle before each count",
    )
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
