"""PostgreSQL for tests: a schema of its own on a server, or a throw-away cluster.

`postgres_dsn` hands each test fresh schemas (dropped afterwards) on the server at
127.0.0.1:5432, or, where none answers, on a cluster the session starts for itself;
`pg_cluster` starts clusters of the test's own, with Debian's PostgreSQL 15 binaries, for
what a shared server cannot be put through (a crash, WAL archiving, roles). Without a
server or the binaries a test is skipped, or fails under CUSTODES_REQUIRE_POSTGRES=1, as
CI runs it. A test module imports the fixtures (postgres_dsn_fixture,
postgres_server_fixture, pg_cluster_fixture) and asks for them by name.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from psycopg import sql

SERVER = "host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3"
BINARIES = Path("/usr/lib/postgresql/15/bin")
START_SECONDS = 30
STOP_SECONDS = 10


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it where PostgreSQL is required (CI)."""
    if os.environ.get("CUSTODES_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (CUSTODES_REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


def with_schema(dsn: str, schema: str) -> str:
    """dsn with its search_path set to schema alone."""
    return psycopg.conninfo.make_conninfo(dsn, options=f"-csearch_path={schema}")


@contextlib.contextmanager
def schema_on(server: str) -> Iterator[Callable[[], str]]:
    """A factory of DSNs, each naming a new, empty schema on server; every schema it
    made is dropped at the end."""
    admin = psycopg.connect(server, autocommit=True)
    made: list[str] = []

    def fresh() -> str:
        name = f"custodes_t_{secrets.token_hex(6)}"
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
        made.append(name)
        return with_schema(server, name)

    try:
        yield fresh
    finally:
        try:
            for name in made:
                admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))
        finally:
            admin.close()


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[str]:
    """The DSN of a server to make schemas on: the shared one at 127.0.0.1:5432, or,
    where none answers (or it refuses us), one throw-away cluster for the session."""
    try:
        psycopg.connect(SERVER).close()
    except psycopg.OperationalError as exc:
        shared = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    else:
        yield SERVER
        return
    if not (BINARIES / "initdb").exists():
        unavailable(
            f"no PostgreSQL server at 127.0.0.1:5432 ({shared}) and no initdb in {BINARIES}"
            " to start one"
        )
    with clusters() as make:
        yield make().dsn()


@pytest.fixture(name="postgres_dsn")
def postgres_dsn_fixture(postgres_server: str) -> Iterator[Callable[[], str]]:
    """Each call: the DSN of a new, empty schema, dropped after the test."""
    with schema_on(postgres_server) as fresh:
        yield fresh


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass
class PgCluster:
    """A PostgreSQL cluster in a temporary directory, run as `owner`: its data directory,
    its unix socket, its log and anything a test puts there (a WAL archive) all inside
    root, and nothing outside it."""

    root: Path
    owner: str | None  # the OS user that runs it (None: the user running the tests)
    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def dsn(self, dbname: str = "postgres", user: str = "postgres") -> str:
        return psycopg.conninfo.make_conninfo(
            host="127.0.0.1", port=self.port, user=user, dbname=dbname, connect_timeout=5
        )

    def run(self, *command: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command as the cluster's OS user, in its directory."""
        argv = [str(part) for part in command]
        if self.owner is not None:
            argv = ["runuser", "-u", self.owner, "--", *argv]
        done = subprocess.run(
            argv,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=START_SECONDS * 2,
            check=False,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{argv[-1]} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def configure(self, settings: Mapping[str, str]) -> None:
        """Add settings to postgresql.conf (later lines win); they apply at the next start."""
        self.settings.update(settings)
        lines = "".join(f"{name} = {_conf_value(value)}\n" for name, value in settings.items())
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as f:
            f.write(lines)

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections. Its first start picks
        a free loopback port (another, if that one is taken by then); later starts keep
        it, so that a DSN handed out before a restart still reaches the cluster."""
        first = self.port == 0
        for _ in range(3 if first else 1):
            if first:
                self.port = _free_port()
                self.configure({"port": str(self.port)})
            started = self.run(
                BINARIES / "pg_ctl",
                "start",
                "-w",
                "-t",
                str(START_SECONDS),
                "-D",
                self.data_dir,
                "-l",
                self.log_file,
                check=False,
            )
            if started.returncode == 0:
                return
        log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        raise RuntimeError(f"the cluster did not start: {started.stderr.strip()}\n{log[-2000:]}")

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def crash(self) -> None:
        """Stop at once, as a power cut would: no checkpoint, no flush of anything not
        yet on disk; the next start replays the WAL."""
        self.run(BINARIES / "pg_ctl", "stop", "-m", "immediate", "-w", "-D", self.data_dir)

    def stop(self) -> None:
        """Stop by the postmaster's pid (a fast shutdown), pg_ctl's immediate stop if it
        does not go in time."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + STOP_SECONDS
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        self.run(BINARIES / "pg_ctl", "stop", "-m", "immediate", "-D", self.data_dir, check=False)


def _cluster_owner() -> str | None:
    """The OS user a cluster runs as: initdb refuses root, so root runs it as postgres."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        unavailable("tests run as root and there is no postgres user to run a cluster")
    return "postgres"


@contextlib.contextmanager
def clusters() -> Iterator[Callable[..., PgCluster]]:
    """A factory of throw-away clusters: make(settings) initialises one with those
    postgresql.conf settings, starts it (unless start=False) and returns it; every
    cluster is stopped and its directory removed at the end."""
    if not (BINARIES / "initdb").exists():
        unavailable(f"PostgreSQL 15's initdb is not installed in {BINARIES}")
    owner = _cluster_owner()
    made: list[PgCluster] = []

    def make(settings: Mapping[str, str] | None = None, *, start: bool = True) -> PgCluster:
        # Not under pytest's base directory: it is private to the user running the
        # tests, and the cluster's owner must be able to reach its own directory.
        root = Path(tempfile.mkdtemp(prefix="custodes-pg-"))
        cluster = PgCluster(root=root, owner=owner)
        made.append(cluster)
        cluster.socket_dir.mkdir()
        if owner is not None:
            user = pwd.getpwnam(owner)
            os.chown(root, user.pw_uid, user.pw_gid)
            os.chown(cluster.socket_dir, user.pw_uid, user.pw_gid)
        cluster.run(
            BINARIES / "initdb",
            "-D",
            cluster.data_dir,
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            # initdb's own fsync of the new files: a throw-away cluster has no use for it.
            # The server's own fsyncs of commits, which the tests rely on, are unchanged.
            "--no-sync",
        )
        cluster.configure(
            {
                "listen_addresses": "127.0.0.1",
                "unix_socket_directories": str(cluster.socket_dir),
                "logging_collector": "off",
                **(settings or {}),
            }
        )
        if start:
            cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            try:
                cluster.stop()
            finally:
                shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(name="pg_cluster")
def pg_cluster_fixture() -> Iterator[Callable[..., PgCluster]]:
    """pg_cluster(settings, start=True): a throw-away cluster of the test's own, with
    those postgresql.conf settings; stopped and removed after the test."""
    with clusters() as make:
        yield make
