"""Audited lookups over HTTP: exact national-ID searches against the running server, beside
a plaintext baseline on the same backend, in one run.

For each --backend, builds a vault of synthetic people (or uses --vault), serves it on
127.0.0.1 from --server-workers processes (as `custodes serve --workers`), logs in with
password and one-time code, then drives POST /api/v1/search from keep-alive connections
and measures lookups/s and p50/p99 latency. Every lookup is authenticated and on the
access log before it is answered.

The baseline answers the same requests as a plain application would, on the same backend
with as many processes: a FastAPI app under uvicorn that looks the bearer session up in
the database, finds the person by the same index value stored in the clear (the ingest
bench's plaintext store), and commits a plain log row of the lookup (all rows queued
meanwhile in one transaction) before it answers. No encryption, no policy, no Merkle tree,
no signed checkpoints. The ratio is custodes' lookups/s over the baseline's.

On PostgreSQL (the server --database names) each store is made in a schema of its own,
dropped after. Everything else the bench writes, the servers' HOME included, stays in
its temporary directory. Prints a table, a column per backend; asserts nothing.

    python bench/serve.py [--people 1000000] [--seconds 20] [--concurrency 16,32]
    python bench/serve.py --people 1000000 --backend sqlite postgresql
    python bench/serve.py --vault DIR --source people.jsonl   (passphrase, user, password
                                                               and TOTP secret from env)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import os
import queue
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

import httpx
import orjson
from fastapi import FastAPI, Header
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from baseline import (
    LOCAL_SERVER,
    drop_schema,
    fresh_schema,
    store_plaintext,
    store_plaintext_postgres,
)

PASSPHRASE_ENV = "CUSTODES_KEYRING_PASSPHRASE"
PASSPHRASE = "bench passphrase for a throwaway vault"
USER = "bench.investigator"
PASSWORD = "bench only: cobalt meadow lantern 58"
TARGET_RATE = 1000.0
TARGET_P99_MS = 50.0
PURPOSE = {"purpose": "benchmark of audited lookups", "case_ref": "BENCH-1"}
SAMPLE = 20_000
BACKENDS = ("sqlite", "postgresql")
# The servers' own HOME and XDG directories, under the bench's temporary directory.
XDG = {
    "XDG_CONFIG_HOME": ".config",
    "XDG_DATA_HOME": ".local/share",
    "XDG_CACHE_HOME": ".cache",
    "XDG_STATE_HOME": ".local/state",
}


# -- what is served ----------------------------------------------------------------------


def synthesise(workdir: Path, people: int, seed: int) -> Path:
    """The people every backend is filled with, in one JSON Lines file."""
    from custodes.synth import write_jsonl

    source = workdir / "people.jsonl"
    started = time.perf_counter()
    with source.open("wb") as f:
        lines = write_jsonl(f, people, seed=seed)
    print(f"synthesised {lines:,} records in {time.perf_counter() - started:.1f} s", flush=True)
    return source


def build_vault(
    area: Path, source: Path, people: int, workers: int, database: str | None
) -> tuple[Path, str, float]:
    """A vault filled from `source`, its keys beside it in `area`; its directory, the
    investigator's TOTP secret and the seconds the ingest took."""
    import pyotp

    from custodes.bootstrap import create_vault
    from custodes.crypto import KdfParams
    from custodes.policy import Role
    from custodes.policy.budgets import NO_LIMITS

    vault = create_vault(
        area / "vault",
        passphrase=PASSPHRASE,
        keyring_path=area / "keys" / "vault.keyring",
        log_key_path=area / "keys" / "log.key",
        expected_population=max(people, 1000),
        database=database,
        # The cheapest key derivation the library accepts: the keyring is opened once, as
        # each server starts, and what is measured is the vault as it serves.
        kdf=KdfParams(time_cost=2, memory_kib=19_456, parallelism=1),
    )
    try:
        started = time.perf_counter()
        report = vault.ingest(vault.operator, source, workers=workers)
        seconds = time.perf_counter() - started
        print(
            f"{area.name}: custodes ingested {report.accepted:,} records with {workers} "
            f"workers in {seconds:.1f} s",
            flush=True,
        )
        # The bench's one account asks for thousands of records a second: its budget is
        # lifted (bench/guard.py measures what budgets cost).
        vault.admin.add_account(
            vault.operator,
            USER,
            PASSWORD,
            Role.INVESTIGATOR,
            {"district": "*", "budget": dict(NO_LIMITS)},
        )
        code = vault.admin.issue_enrolment(vault.operator, USER)
        secret = vault.enrolment(code).secret
        vault.complete_enrolment(code, pyotp.TOTP(secret).now())
    finally:
        vault.close()
    return area / "vault", secret, seconds


def sample_ids(source: Path, count: int, seed: int) -> list[str]:
    """National IDs drawn evenly from the whole file (reservoir sampling)."""
    rng = random.Random(seed)
    chosen: list[str] = []
    seen = 0
    with source.open("rb") as f:
        for line in f:
            if b'"type":"person"' not in line:
                continue
            seen += 1
            nid = str(orjson.loads(line)["national_id"])
            if len(chosen) < count:
                chosen.append(nid)
            elif (j := rng.randrange(seen)) < count:
                chosen[j] = nid
    return chosen


def serve(vault_dir: str, port: int, workers: int) -> None:
    """The server: `workers` processes sharing the port, as `custodes serve --workers`."""
    from custodes.bootstrap import unlock_vault
    from custodes.web.serve import serve as serve_vault

    unlocked = unlock_vault(Path(vault_dir), passphrase=os.environ[PASSPHRASE_ENV])
    serve_vault(unlocked, host="127.0.0.1", port=port, workers=workers)


# -- the plaintext baseline --------------------------------------------------------------

# The baseline's own tables, beside the plaintext store's records and idx: who may look,
# their sessions (the bearer token's hash), and the log of every lookup.
BASELINE_TABLES = (
    "CREATE TABLE accounts (username TEXT PRIMARY KEY, role TEXT NOT NULL,"
    " disabled BOOLEAN NOT NULL)",
    "CREATE TABLE sessions (token_hash {bytes} PRIMARY KEY,"
    " username TEXT NOT NULL REFERENCES accounts, expires DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE access_log (seq {serial} PRIMARY KEY, at DOUBLE PRECISION NOT NULL,"
    " username TEXT NOT NULL, purpose TEXT NOT NULL, case_ref TEXT, record_type TEXT NOT NULL,"
    " index_name TEXT NOT NULL, query TEXT NOT NULL, record_ids TEXT NOT NULL)",
)
TYPES = {
    "sqlite": {"bytes": "BLOB", "serial": "INTEGER"},
    "postgresql": {"bytes": "BYTEA", "serial": "BIGINT GENERATED ALWAYS AS IDENTITY"},
}
SESSION_QUERY = (
    "SELECT s.username FROM sessions s JOIN accounts a ON a.username = s.username"
    " WHERE s.token_hash = ? AND s.expires > ? AND NOT a.disabled"
)
FIND_QUERY = (
    "SELECT r.record_id, r.type, r.doc FROM idx JOIN records r ON r.record_id = idx.record_id"
    " WHERE idx.index_id = ? AND idx.value = ? AND r.type = ? LIMIT ?"
)
LOG_INSERT = (
    "INSERT INTO access_log (at, username, purpose, case_ref, record_type, index_name, query,"
    " record_ids) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
SESSION_SECONDS = 24 * 3600.0


class PlainDatabase(Protocol):
    """The baseline's database in one server process."""

    def read(self, query: str, params: Sequence[object]) -> list[tuple[Any, ...]]: ...

    def write(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        """Insert the rows in one transaction, durable when this returns."""

    def close(self) -> None: ...


class PlainSqlite:
    """Reads on a connection per thread (WAL lets them run beside the writer); one writing
    connection, synchronous=FULL, as custodes' SQLite storage."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._writer = self._connect()
        self._writer.execute("PRAGMA synchronous=FULL")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        # Two server processes write the one log: the second waits for the first's commit.
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def read(self, query: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
            self._readers.append(conn)
        return conn.execute(query, params).fetchall()

    def write(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            self._writer.executemany(query, rows)
            self._writer.execute("COMMIT")
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise

    def close(self) -> None:
        for conn in [*self._readers, self._writer]:
            conn.close()


class PlainPostgres:
    """Reads through a pool of ten connections, as custodes' PostgreSQL storage; one
    writing connection, synchronous_commit on."""

    def __init__(self, database: str) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self._pool = ConnectionPool(
            database, min_size=1, max_size=10, kwargs={"autocommit": True}, open=True
        )
        self._writer = psycopg.connect(database, autocommit=True)
        self._writer.execute("SET synchronous_commit = on")

    def read(self, query: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        with self._pool.connection() as conn:
            return conn.execute(_postgres(query), params).fetchall()

    def write(self, query: str, rows: Sequence[Sequence[object]]) -> None:
        with self._writer.transaction(), self._writer.cursor() as cur:
            cur.executemany(_postgres(query), rows)

    def close(self) -> None:
        self._pool.close()
        self._writer.close()


def _postgres(query: str) -> str:
    """A query of this file in psycopg's placeholders (none holds a literal '?')."""
    return query.replace("?", "%s")


def open_plain(backend: str, store: str) -> PlainDatabase:
    return PlainSqlite(Path(store)) if backend == "sqlite" else PlainPostgres(store)


def build_baseline(area: Path, source: Path, database: str | None) -> tuple[str, str]:
    """The baseline's store, filled from `source`, with the investigator's account and
    one session; where the store is, and the session's bearer token."""
    started = time.perf_counter()
    if database is None:
        store = str(area / "plain.db")
        stored = store_plaintext(source, Path(store))
    else:
        store = database
        stored = store_plaintext_postgres(source, database)
    backend = "sqlite" if database is None else "postgresql"
    token = secrets.token_urlsafe(32)
    statements: list[tuple[str, tuple[object, ...]]] = [
        *((ddl.format(**TYPES[backend]), ()) for ddl in BASELINE_TABLES),
        ("INSERT INTO accounts VALUES (?, ?, ?)", (USER, "investigator", False)),
        (
            "INSERT INTO sessions VALUES (?, ?, ?)",
            (hashlib.sha256(token.encode()).digest(), USER, time.time() + SESSION_SECONDS),
        ),
    ]
    if database is None:
        with contextlib.closing(sqlite3.connect(store, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            for query, params in statements:
                conn.execute(query, params)
            conn.execute("COMMIT")
    else:
        import psycopg

        with psycopg.connect(database, autocommit=True) as pg, pg.transaction():
            for query, params in statements:
                pg.execute(_postgres(query), params)
    print(
        f"{area.name}: plaintext baseline stored {stored['records']:,.0f} records in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return store, token


class GroupCommit:
    """Log rows made durable in batches: each caller waits until the transaction that
    holds its row has committed; one thread commits every row queued meanwhile at once."""

    def __init__(self, db: PlainDatabase) -> None:
        self._db = db
        self._queue: queue.SimpleQueue[tuple[tuple[object, ...], Future[None]]]
        self._queue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="baseline-log", daemon=True).start()

    def append(self, row: tuple[object, ...]) -> None:
        done: Future[None] = Future()
        self._queue.put((row, done))
        done.result()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(self._queue.get_nowait())
            try:
                self._db.write(LOG_INSERT, [row for row, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    done.set_exception(exc)
            else:
                for _, done in batch:
                    done.set_result(None)


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    record_type: str = Field(min_length=1, max_length=64)
    index: str = Field(min_length=1, max_length=64)
    values: dict[str, Annotated[str, Field(max_length=256)]] = Field(max_length=8)
    purpose: str = Field(min_length=1, max_length=200)
    case_ref: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=20, ge=1, le=100)


class PlainLookups:
    """The baseline's one route: the session, the lookup, the log row, the answer."""

    def __init__(self, db: PlainDatabase) -> None:
        from custodes.schema import load_schema

        self._db = db
        self._log = GroupCommit(db)
        self._schema = load_schema()

    def search(self, token: str, body: SearchBody) -> list[dict[str, Any]] | None:
        """The records found, or None for a bearer token of no live session. InvalidQuery
        or SchemaError for a search the schema has no index for."""
        from custodes.records import query_parts

        token_hash = hashlib.sha256(token.encode()).digest()
        session = self._db.read(SESSION_QUERY, (token_hash, time.time()))
        if not session:
            return None
        rt = self._schema.record_type(body.record_type)
        spec = rt.index(body.index)
        value = "\x1f".join(query_parts(rt, spec, body.values))
        found = self._db.read(FIND_QUERY, (spec.index_id, value, rt.name, body.limit))
        self._log.append(
            (
                time.time(),
                session[0][0],
                body.purpose,
                body.case_ref,
                rt.name,
                spec.name,
                orjson.dumps(body.values).decode(),
                orjson.dumps([rid for rid, _, _ in found]).decode(),
            )
        )
        return [
            {"record_id": rid, "record_type": kind, "fields": orjson.loads(doc)}
            for rid, kind, doc in found
        ]


def baseline_app(lookups: PlainLookups) -> FastAPI:
    from custodes.errors import InvalidQuery, SchemaError
    from custodes.web.deps import VAULT_THREADS

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    # Blocking database calls run on a pool of custodes' size, off the event loop.
    pool = ThreadPoolExecutor(VAULT_THREADS, thread_name_prefix="baseline")

    @app.post("/api/v1/search")
    async def search(body: SearchBody, authorization: Annotated[str, Header()] = "") -> Response:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return Response(status_code=401)
        call = functools.partial(lookups.search, token, body)
        try:
            results = await asyncio.get_running_loop().run_in_executor(pool, call)
        except (InvalidQuery, SchemaError):
            return Response(status_code=400)
        if results is None:
            return Response(status_code=401)
        answer = {"results": results, "next_cursor": None}
        return Response(orjson.dumps(answer), media_type="application/json")

    return app


def serve_baseline(backend: str, store: str, port: int, workers: int) -> None:
    """The baseline server: `workers` forked processes, each with a socket of its own on
    the port (SO_REUSEPORT), as `custodes serve --workers` runs them."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=_baseline_worker, args=(backend, store, port), daemon=True)
        for _ in range(workers)
    ]
    # Stopped, this process exits, and multiprocessing stops its daemonic workers.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))
    for process in processes:
        process.start()
    for process in processes:
        process.join()


def _baseline_worker(backend: str, store: str, port: int) -> None:
    import uvicorn

    if sys.platform == "linux":
        import ctypes

        # PR_SET_PDEATHSIG: SIGTERM when the supervisor dies, however it dies.
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    db = open_plain(backend, store)
    try:
        config = uvicorn.Config(
            baseline_app(PlainLookups(db)),
            access_log=False,
            server_header=False,
            proxy_headers=False,
            log_level="warning",
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        db.close()
        sock.close()


# -- driving a server --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_env(workdir: Path, own_vault: bool) -> dict[str, str]:
    """The servers' environment: HOME and the XDG directories inside the bench's own
    directory, so that nothing a server writes lands in the user's; for a vault built
    here, none of the user's CUSTODES_ settings (a database named there would take the
    place of the one the vault was built in)."""
    env = dict(os.environ)
    if own_vault:
        env = {k: v for k, v in env.items() if not k.startswith("CUSTODES_")}
        env[PASSPHRASE_ENV] = PASSPHRASE
    # libpq reads a password from ~/.pgpass: the user's, not the temporary HOME's.
    env.setdefault("PGPASSFILE", str(Path.home() / ".pgpass"))
    home = workdir / "home"
    env["HOME"] = str(home)
    for variable, directory in XDG.items():
        (home / directory).mkdir(parents=True, exist_ok=True)
        env[variable] = str(home / directory)
    return env


@contextlib.contextmanager
def running(command: list[str], env: dict[str, str], log: Path) -> Iterator[int]:
    """A server started as this script with `command` (and a free port), until it is up;
    its port. Its output goes to `log`, shown if it fails to start. Stopped after."""
    port = free_port()
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, __file__, *command, "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_up(f"http://127.0.0.1:{port}", server, log)
        yield port
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_until_up(
    base: str, server: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"the server exited before it answered:\n{tail}")
        try:
            httpx.get(f"{base}/api/v1/me", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("the server did not answer in time")


def login(base: str, username: str, password: str, secret: str) -> str:
    import pyotp

    totp = pyotp.TOTP(secret)
    # The code that confirmed enrolment is spent; the next step's is accepted too.
    for code in (totp.at(time.time() + 30), totp.now()):
        response = httpx.post(
            f"{base}/api/v1/session",
            json={"username": username, "password": password, "totp": code},
            timeout=30,
        )
        if response.status_code == 201:
            return str(response.json()["token"])
    raise SystemExit(f"login failed: {response.status_code} {response.text}")


class Connection:
    """One keep-alive HTTP/1.1 connection, just enough for this benchmark's POSTs.

    httpx spends about 2 ms of CPU per request here, more than the server does, and on
    two cores that would time the client; this one costs a few tens of microseconds.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def post(self, path: str, token: str, body: bytes) -> tuple[int, bytes]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding":
                raise SystemExit("chunked responses are not expected from this endpoint")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def drive(
    port: int, token: str, ids: list[str], concurrency: int, seconds: float, warmup: float
) -> tuple[list[float], int, float, int]:
    """Latencies (s) of successful lookups after the warm-up, errors, measured seconds,
    and every lookup answered (the warm-up's too)."""
    latencies: list[float] = []
    errors = 0
    answered = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + seconds

    async def worker(n: int) -> None:
        nonlocal errors, answered
        rng = random.Random(n)
        connection = await Connection.open(port)
        try:
            while (now := time.perf_counter()) < stop_at:
                body = {
                    "record_type": "person",
                    "index": "national_id",
                    "values": {"national_id": rng.choice(ids)},
                    "limit": 1,
                    **PURPOSE,
                }
                status, answer = await connection.post("/api/v1/search", token, orjson.dumps(body))
                done = time.perf_counter()
                answered += 1
                ok = status == 200 and len(orjson.loads(answer)["results"]) == 1
                if now >= measure_from:
                    if ok:
                        latencies.append(done - now)
                    else:
                        errors += 1
        finally:
            connection.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return latencies, errors, time.perf_counter() - measure_from, answered


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass(frozen=True, slots=True)
class Figures:
    """One server at one level of concurrency."""

    lookups: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    answered: int = 0  # lookups answered over the whole level, its warm-up included
    # What a counting function saw change over the level (reads, scans...), by name.
    counted: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.lookups / self.seconds

    def per_lookup(self, name: str) -> float:
        # The counters ran over the whole level, so they are divided by all it answered.
        return self.counted.get(name, 0) / self.answered if self.answered else float("nan")


def measure(
    port: int,
    token: str,
    ids: list[str],
    levels: list[int],
    args: argparse.Namespace,
    counting: Callable[[], dict[str, int]] | None = None,
) -> dict[int, Figures]:
    """The server's figures at each level, after a warm-up at the highest; with
    `counting`, how much each of its counters grew over each level."""
    # A server that has just started reads every page from the OS at first; what is
    # measured is the server as it runs, after that.
    asyncio.run(drive(port, token, ids, max(levels), 0.001, args.warmup))
    figures = {}
    for level in levels:
        before = counting() if counting else {}
        latencies, errors, seconds, answered = asyncio.run(
            drive(port, token, ids, level, args.seconds, args.settle)
        )
        after = counting() if counting else {}
        figures[level] = Figures(
            len(latencies),
            errors,
            seconds,
            percentile(latencies, 0.50) * 1000,
            percentile(latencies, 0.99) * 1000,
            answered,
            {name: after[name] - before.get(name, 0) for name in after},
        )
    return figures


@dataclass(frozen=True, slots=True)
class Column:
    """One backend's figures: custodes and its baseline, by level of concurrency."""

    backend: str
    custodes: dict[int, Figures]
    baseline: dict[int, Figures]


@dataclass(frozen=True, slots=True)
class Served:
    """A vault to serve, and how to log in to it."""

    directory: Path
    username: str
    password: str
    secret: str


def run_backend(
    backend: str,
    workdir: Path,
    source: Path,
    ids: list[str],
    levels: list[int],
    args: argparse.Namespace,
    given: Served | None,
) -> Column:
    """The baseline, then custodes, on one backend; each store made, served, measured,
    stopped and (on PostgreSQL, its schema) dropped in turn."""
    area = workdir / backend
    area.mkdir()
    env = server_env(workdir, own_vault=given is None)
    workers = str(args.server_workers)
    with contextlib.ExitStack() as made:
        # Its files go once its figures are in: the next backend's need the disk.
        made.callback(shutil.rmtree, area, ignore_errors=True)

        def database() -> str | None:
            if backend != "postgresql":
                return None
            name, dsn = fresh_schema(args.database)
            made.callback(drop_schema, args.database, name)
            return dsn

        store, token = build_baseline(area, source, database())
        command = ["--serve-baseline", backend, store, workers]
        with running(command, env, area / "baseline.log") as port:
            print(f"{backend}: measuring the baseline", flush=True)
            baseline = measure(port, token, ids, levels, args)
        if given is None:
            directory, secret, _ = build_vault(area, source, args.people, args.workers, database())
            served = Served(directory, USER, PASSWORD, secret)
        else:
            served = given
        with running(["--serve", str(served.directory), workers], env, area / "vault.log") as port:
            token = login(
                f"http://127.0.0.1:{port}", served.username, served.password, served.secret
            )
            print(f"{backend}: measuring custodes", flush=True)
            custodes = measure(port, token, ids, levels, args)
    return Column(backend, custodes, baseline)


def table(columns: list[Column], levels: list[int], args: argparse.Namespace) -> str:
    """The figures, a column per backend, a block per level of concurrency."""
    rows: list[tuple[str, Callable[[Figures, Figures], str]]] = [
        ("audited lookups/s", lambda c, b: f"{c.rate:,.0f}"),
        ("  p50 ms", lambda c, b: f"{c.p50_ms:.1f}"),
        ("  p99 ms", lambda c, b: f"{c.p99_ms:.1f}"),
        ("baseline lookups/s", lambda c, b: f"{b.rate:,.0f}"),
        ("  p50 ms", lambda c, b: f"{b.p50_ms:.1f}"),
        ("  p99 ms", lambda c, b: f"{b.p99_ms:.1f}"),
        ("ratio custodes/baseline", lambda c, b: f"{c.rate / b.rate:.2f}" if b.lookups else "-"),
        ("errors custodes/baseline", lambda c, b: f"{c.errors}/{b.errors}"),
    ]
    width = max(12, *(len(c.backend) for c in columns))
    lines = [
        (f"people {args.people:,}" if not args.vault else "the vault given")
        + f"  server workers {args.server_workers}  "
        f"{args.seconds:g} s measured at each level  "
        f"targets: >= {TARGET_RATE:,.0f} lookups/s at p99 < {TARGET_P99_MS:.0f} ms",
        f"{'':<16}{'':<26}" + "".join(f"{c.backend:>{width}}" for c in columns),
    ]
    for level in levels:
        for n, (name, cell) in enumerate(rows):
            head = f"{level} connections" if n == 0 else ""
            cells = (cell(c.custodes[level], c.baseline[level]) for c in columns)
            lines.append(f"{head:<16}{name:<26}" + "".join(f"{v:>{width}}" for v in cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--people", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS,
        help="where the vaults and baselines are stored, each in turn (default sqlite)",
    )
    parser.add_argument(
        "--database", default=LOCAL_SERVER, help="the PostgreSQL server for --backend postgresql"
    )
    parser.add_argument("--vault", help="an existing vault (skips building one)")
    parser.add_argument("--source", help="with --vault: the JSON Lines it was built from")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--warmup",
        type=float,
        default=20.0,
        help="seconds of load before the first measurement (the servers' page caches fill)",
    )
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds at each level before measuring"
    )
    parser.add_argument(
        "--concurrency",
        default="16,32",
        help="connections in flight; a comma list runs each in turn on the same server",
    )
    parser.add_argument(
        "--server-workers", type=int, default=2, help="server processes (one per core)"
    )
    parser.add_argument("--serve", nargs=2, metavar=("VAULT", "N"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--serve-baseline", nargs=3, metavar=("BACKEND", "STORE", "N"), help=argparse.SUPPRESS
    )
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], args.port, int(args.serve[1]))
        return
    if args.serve_baseline:
        backend, store, workers = args.serve_baseline
        serve_baseline(backend, store, args.port, int(workers))
        return
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error("--concurrency is a number or a comma list of numbers")
    if not all(1 <= c <= 1024 for c in levels) or not 0 < args.seconds <= 3600:
        parser.error("--concurrency is 1..1024 and --seconds 0..3600")
    given: Served | None = None
    if args.vault:
        if not args.source:
            parser.error("--vault needs --source, the file it was built from")
        if args.backend:
            parser.error("--vault is measured on the backend it was created on")
        from custodes.settings import ENV_DATABASE, VaultLayout

        recorded = VaultLayout(Path(args.vault)).read()
        on_postgres = recorded.database is not None or os.environ.get(ENV_DATABASE)
        backends = ["postgresql" if on_postgres else "sqlite"]
        given = Served(
            Path(args.vault).resolve(),
            os.environ["CUSTODES_USER"],
            os.environ["CUSTODES_PASSWORD"],
            os.environ["CUSTODES_TOTP_SECRET"],
        )
    else:
        backends = list(dict.fromkeys(args.backend or ["sqlite"]))

    workdir = Path(tempfile.mkdtemp(prefix="custodes-bench-serve-"))
    try:
        source = Path(args.source) if given else synthesise(workdir, args.people, args.seed)
        ids = sample_ids(source, SAMPLE, args.seed)
        columns = [
            run_backend(backend, workdir, source, ids, levels, args, given) for backend in backends
        ]
        print(table(columns, levels, args), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
