"""A PostgreSQL cluster of a bench's own that archives its WAL through pgBackRest into an
encrypted repository beside it, for what the shared server cannot be put through (a
backup of the whole cluster, a restore into a new one).

Initialised with Debian's PostgreSQL 15 binaries in the directory the bench names, run as
the `postgres` OS user when the bench runs as root (initdb refuses root), listening on a
free loopback port. Leaving `archiving_cluster` stops it and every cluster restored
beside it, and removes the directory, whether the bench finished, failed or was
interrupted.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

from custodes.backup.postgres import PgBackRest, PgCtl

BINARIES = Path("/usr/lib/postgresql/15/bin")
STANZA = "vault"
# The role that owns the vault's database: the vault is made, filled and backed up as it
# (a backup locks the vault's tables, which only the owner may).
OWNER = "custodes_owner"
DATABASE = "vault"
COMMAND_SECONDS = 120
RECOVERY_SECONDS = 1800
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass(frozen=True, slots=True)
class ArchivingCluster:
    """The cluster's directory (data, socket, pgBackRest's configuration, repository and
    working directories, the HOME of whatever runs as its owner), its owner and port."""

    root: Path
    owner: str | None  # None: the user running the bench
    port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def pgbackrest_dir(self) -> Path:
        return self.root / "pgbackrest"

    @property
    def repository(self) -> Path:
        return self.pgbackrest_dir / "repo"

    @property
    def pgbackrest_conf(self) -> Path:
        return self.pgbackrest_dir / "pgbackrest.conf"

    def as_owner(self, *argv: str | Path) -> tuple[str, ...]:
        """A command run as the cluster's owner, with a HOME inside the cluster's directory:
        nothing it runs writes to another user's."""
        user = ("runuser", "-u", self.owner, "--") if self.owner else ()
        return (*user, "env", f"HOME={self.home}", *(str(part) for part in argv))

    def run(self, *argv: str | Path, timeout: float = COMMAND_SECONDS) -> None:
        done = subprocess.run(
            self.as_owner(*argv),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip()).splitlines()
            raise SystemExit(
                f"{Path(str(argv[0])).name} failed (exit {done.returncode})"
                + (f": {said[-1]}" if said else "")
            )

    @property
    def pgbackrest(self) -> PgBackRest:
        return PgBackRest(STANZA, self.as_owner("pgbackrest", f"--config={self.pgbackrest_conf}"))

    @property
    def pg_ctl(self) -> PgCtl:
        return PgCtl(self.as_owner(BINARIES / "pg_ctl"))

    def url(self, port: int | None = None, user: str = OWNER, dbname: str = DATABASE) -> str:
        """A connection to this cluster, or to one restored from it listening on `port`."""
        return psycopg.conninfo.make_conninfo(
            host="127.0.0.1", port=port or self.port, user=user, dbname=dbname, connect_timeout=5
        )

    def checkpoint(self) -> None:
        """Everything the cluster holds written to its files: a backup that follows pays
        for no earlier write (pgBackRest's start-fast would otherwise flush it)."""
        with psycopg.connect(self.url(user="postgres", dbname="postgres"), autocommit=True) as c:
            c.execute("CHECKPOINT")

    def directory(self, name: str) -> Path:
        """A new, empty directory beside the cluster, its owner's: for a restored cluster."""
        path = self.root / name
        _make_owned(path, self.owner)
        return path

    def start(self, data_dir: Path, port: int, log: Path) -> None:
        self.run(
            BINARIES / "pg_ctl",
            "start",
            "-w",
            "-t",
            str(RECOVERY_SECONDS),
            "-D",
            data_dir,
            "-l",
            log,
            "-o",
            f"-c port={port} -c listen_addresses=127.0.0.1",
            timeout=RECOVERY_SECONDS + 30,
        )

    def stop(self, data_dir: Path) -> None:
        """Stop the cluster running in `data_dir`, if one does: a fast shutdown, or an
        immediate one if that does not end in time."""
        if not (data_dir / "postmaster.pid").exists():
            return
        try:
            self.run(BINARIES / "pg_ctl", "stop", "-m", "fast", "-w", "-t", "60", "-D", data_dir)
        except (SystemExit, subprocess.TimeoutExpired):
            with contextlib.suppress(SystemExit, subprocess.TimeoutExpired):
                self.run(BINARIES / "pg_ctl", "stop", "-m", "immediate", "-w", "-D", data_dir)

    def stop_all(self) -> None:
        """Stop this cluster and every one restored beside it."""
        for pid_file in sorted(self.root.glob("*/postmaster.pid")):
            self.stop(pid_file.parent)


def _cluster_owner() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise SystemExit(
            "running as root, the bench runs its cluster as the postgres OS user, and there is none"
        ) from None
    return "postgres"


def _make_owned(path: Path, owner: str | None, mode: int = 0o700) -> None:
    path.mkdir(mode=mode)
    if owner is not None:
        user = pwd.getpwnam(owner)
        os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)


def _write_owned(path: Path, text: str, owner: str | None) -> None:
    path.write_text(text, encoding="utf-8")
    if owner is not None:
        user = pwd.getpwnam(owner)
        os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, 0o600)


def _pgbackrest_conf(cluster: ArchivingCluster) -> str:
    """pgBackRest's configuration: an encrypted repository (custodes refuses a plain one),
    lz4, two processes (one a core), the backup started by an immediate checkpoint."""
    return "\n".join(
        [
            "[global]",
            f"repo1-path={cluster.repository}",
            "repo1-retention-full=4",
            "repo1-cipher-type=aes-256-cbc",
            f"repo1-cipher-pass={secrets.token_urlsafe(32)}",
            f"log-path={cluster.pgbackrest_dir / 'log'}",
            f"lock-path={cluster.pgbackrest_dir / 'lock'}",
            f"spool-path={cluster.pgbackrest_dir / 'spool'}",
            "log-level-console=warn",
            "log-level-file=off",
            "compress-type=lz4",
            "process-max=2",
            "start-fast=y",
            "",
            f"[{STANZA}]",
            f"pg1-path={cluster.data_dir}",
            f"pg1-port={cluster.port}",
            f"pg1-socket-path={cluster.socket_dir}",
            "",
        ]
    )


@contextlib.contextmanager
def archiving_cluster(root: Path) -> Iterator[ArchivingCluster]:
    """A new cluster in `root` (which must not exist; its parent must let the cluster's
    owner through), archiving into its stanza, with an empty database owned by OWNER.
    Stopped, with every cluster restored beside it, and removed at the end."""
    if not (BINARIES / "initdb").exists():
        raise SystemExit(f"PostgreSQL 15's initdb is not installed in {BINARIES}")
    if shutil.which("pgbackrest") is None:
        raise SystemExit("pgBackRest is not installed")
    owner = _cluster_owner()
    _make_owned(root, owner)
    cluster = ArchivingCluster(root, owner, free_port())
    try:
        try:
            cluster.run("test", "-w", root)
        except SystemExit:
            raise SystemExit(
                f"the {owner} OS user cannot reach the bench's directory: set TMPDIR to a "
                "directory it may pass through"
            ) from None
        for path in (cluster.socket_dir, cluster.home, cluster.pgbackrest_dir):
            _make_owned(path, owner)
        for name in ("repo", "log", "lock", "spool"):
            _make_owned(cluster.pgbackrest_dir / name, owner, 0o750)
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
            # initdb's own fsync of its new files only; the server's fsyncs are unchanged.
            "--no-sync",
        )
        archive = f"pgbackrest --config={cluster.pgbackrest_conf} --stanza={STANZA} archive-push %p"
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(cluster.socket_dir),
            "logging_collector": "off",
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": archive,
            "archive_timeout": "60",
        }
        with (cluster.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("".join(f"{k} = {_conf_value(v)}\n" for k, v in settings.items()))
        for attempt in range(3):
            # The port was free when picked; another may have taken it since.
            if attempt:
                cluster = ArchivingCluster(root, owner, free_port())
            _write_owned(cluster.pgbackrest_conf, _pgbackrest_conf(cluster), owner)
            try:
                cluster.start(cluster.data_dir, cluster.port, root / "server.log")
                break
            except SystemExit:
                if attempt == 2:
                    raise
        with psycopg.connect(
            cluster.url(user="postgres", dbname="postgres"), autocommit=True
        ) as conn:
            conn.execute(f"CREATE ROLE {OWNER} LOGIN")
            conn.execute(f"CREATE DATABASE {DATABASE} OWNER {OWNER}")
        cluster.pgbackrest.run("stanza-create")
        yield cluster
    finally:
        # An interrupt's second signal does not cut the stopping short.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
        try:
            cluster.stop_all()
            end_processes_naming(root)
            shutil.rmtree(root, ignore_errors=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def end_processes_naming(root: Path, grace: float = 10.0) -> None:
    """End what still runs from `root` once its clusters are stopped: an interrupted
    command's children (subprocess ends the command it ran, but pgBackRest's workers
    under runuser go on), or a cluster that would not stop. Each is known by its id,
    found by its command line naming the bench's own new directory."""
    mine = str(root).encode()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [pid for pid in _pids() if pid != os.getpid() and mine in _cmdline(pid)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [pid for pid in left if mine in _cmdline(pid)]
        if not left:
            return


def _pids() -> list[int]:
    proc = Path("/proc")
    return [int(p.name) for p in proc.iterdir() if p.name.isdigit()] if proc.is_dir() else []


def _cmdline(pid: int) -> bytes:
    # Empty once the process has exited, a zombie included.
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_promoted(database: str, timeout: float = RECOVERY_SECONDS) -> None:
    """Until the restored cluster `database` reaches has left recovery."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(psycopg.OperationalError),
            psycopg.connect(database, autocommit=True, connect_timeout=5) as conn,
        ):
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
            if row is not None and not row[0]:
                return
        time.sleep(0.2)
    raise SystemExit("the restored cluster did not finish its recovery in time")
