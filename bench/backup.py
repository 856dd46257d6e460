"""Backups: create, verify and restore, timed for custodes and for a plain baseline on the
same data, in one run, a column per backend.

The targets, on this kind of 2-core machine, at 1,000,000 records: a backup in under
60 s, its verification in under 30 s, a restore in under 120 s. At another size each
figure is scaled linearly to 1,000,000 records and labelled an estimate (fixed costs,
argon2id opening the keyring among them, are scaled with the rest: below 1,000,000 the
estimate is high).

Each backend's vault is filled from the same synthetic JSON Lines by custodes' ingest
(its time is shown, not measured against anything). Then, each step timed alone after
the page cache's dirty pages are written out (and, on PostgreSQL, a checkpoint):

SQLite      custodes: backup_sqlite (both files by SQLite's online backup API, the content
            digest, the manifest sealed, the statement signed); verify_backup with the
            keyring (every file's SHA-256, the content recomputed, the access log verified
            entry by entry, the manifest opened); restore_sqlite (copied, checked again,
            the keys placed, the restore logged).
            baseline: the vault's two files copied by the online backup API alone;
            PRAGMA integrity_check of both copies; the copies copied into a new
            directory. Every copy synced, as custodes syncs its own.
PostgreSQL  a cluster of the bench's own, archiving its WAL through pgBackRest into an
            encrypted repository (lz4, two processes, start-fast), the vault in it.
            custodes: backup_postgres (full: the tables locked and digested, pgBackRest's
            backup, its manifest kept and signed); verify_postgres_backup with the keyring
            (pgBackRest's verify and manifest, the signer state); restore_postgres to the
            backup into a new cluster directory and port (verified, restored, started,
            its content and log checked, the restore logged).
            baseline, with the same configuration: pgbackrest backup (full), pgbackrest
            verify, pgbackrest restore then pg_ctl start until recovery has ended.

Everything is made in one temporary directory, the HOME of the bench and of everything
it runs included, and removed at the end, every cluster stopped first, on an error or
an interrupt too. Prints a table; asserts nothing about time.

    python bench/backup.py [--records 20000] [--backend sqlite postgresql]
    python bench/backup.py --records 1000000 --backend sqlite postgresql
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import tempfile
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote

from cluster import (
    RECOVERY_SECONDS,
    ArchivingCluster,
    archiving_cluster,
    free_port,
    wait_promoted,
)

if TYPE_CHECKING:
    from custodes.vault import Vault

T = TypeVar("T")
PASSPHRASE = "bench passphrase for a throwaway vault"
TARGET_RECORDS = 1_000_000
TARGETS = {"backup": 60.0, "verify": 30.0, "restore": 120.0}
BACKENDS = ("sqlite", "postgresql")
# The bench's own HOME and XDG directories, under its temporary directory.
XDG = {
    "XDG_CONFIG_HOME": ".config",
    "XDG_DATA_HOME": ".local/share",
    "XDG_CACHE_HOME": ".cache",
    "XDG_STATE_HOME": ".local/state",
}


@dataclass(frozen=True, slots=True)
class Pair:
    """One figure for custodes and for its baseline."""

    custodes: float
    baseline: float


@dataclass(frozen=True, slots=True)
class Column:
    """One backend's figures."""

    backend: str
    fill_seconds: float
    seconds: dict[str, Pair]  # operation -> seconds
    backup_bytes: Pair


def timed(step: Callable[[], T], settle: Callable[[], None] = os.sync) -> tuple[float, T]:
    """Seconds `step` takes, once what earlier steps wrote is on disk; and its result."""
    settle()
    started = time.perf_counter()
    result = step()
    return time.perf_counter() - started, result


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def private_directory(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(mode=mode)
    os.chmod(path, mode)  # whatever the umask
    return path


def say(text: str) -> None:
    print(text, flush=True)


# -- the vault ---------------------------------------------------------------------------


def synthesise(directory: Path, records: int, seed: int) -> tuple[Path, int]:
    """The records every backend is filled with, in one JSON Lines file; their count."""
    from custodes.synth import write_jsonl

    source = directory / "population.jsonl"
    # The default rates give 1.7 records per person (0.2 cases, 0.5 deliveries).
    people = max(1, round(records / 1.7))
    started = time.perf_counter()
    with source.open("wb") as f:
        lines = write_jsonl(f, people, seed=seed)
    say(f"synthesised {lines:,} records in {time.perf_counter() - started:.1f} s")
    return source, lines


def fill_vault(
    area: Path, source: Path, records: int, workers: int, database: str | None
) -> tuple[Vault, float, int]:
    """A vault in `area`, its keys beside it, filled from `source` by custodes' ingest;
    the open vault, the ingest's seconds and the records it holds."""
    from custodes.bootstrap import create_vault

    vault = create_vault(
        area / "vault",
        passphrase=PASSPHRASE,
        keyring_path=area / "keys" / "vault.keyring",
        log_key_path=area / "keys" / "log.key",
        expected_population=max(records, 1000),
        database=database,
    )
    try:
        started = time.perf_counter()
        report = vault.ingest(vault.operator, source, workers=workers)
        seconds = time.perf_counter() - started
    except BaseException:
        vault.close()
        raise
    say(
        f"{area.name}: custodes ingested {report.accepted:,} records with {workers} "
        f"workers in {seconds:.1f} s ({report.rejected:,} refused)"
    )
    return vault, seconds, report.accepted


def held(what: str, found: int, expected: int) -> None:
    """A step that did less than all the work is not a figure."""
    if found != expected:
        raise SystemExit(f"{what} holds {found:,} records, not the {expected:,} stored")


# -- SQLite --------------------------------------------------------------------------------


def copy_online(files: list[Path], destination: Path) -> None:
    """The baseline's backup: each file copied by SQLite's online backup API in one step,
    as custodes copies it, and synced."""
    private_directory(destination)
    for source in files:
        target = destination / source.name
        with (
            closing(sqlite3.connect(source, isolation_level=None)) as reader,
            closing(sqlite3.connect(target, isolation_level=None)) as writer,
        ):
            reader.backup(writer)
        sync(target)
    sync(destination)


def integrity_check(directory: Path) -> None:
    """The baseline's verification: SQLite's own check of every page and index of each
    copy, read as immutable (nothing is written beside a backup)."""
    for path in sorted(directory.iterdir()):
        uri = f"file:{quote(str(path.absolute()))}?mode=ro&immutable=1"
        with closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as db:
            answer = db.execute("PRAGMA integrity_check").fetchall()
        if answer != [("ok",)]:
            raise SystemExit(f"the baseline's copy {path.name} fails SQLite's integrity check")


def copy_files(source: Path, destination: Path) -> None:
    """The baseline's restore: the backup's files copied into a new directory, synced."""
    private_directory(destination)
    for path in sorted(source.iterdir()):
        shutil.copyfile(path, destination / path.name)
        sync(destination / path.name)
    sync(destination)


def sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_sqlite(area: Path, source: Path, records: int, workers: int) -> Column:
    from custodes.backup.files import log_note_signer
    from custodes.backup.sqlite import backup_sqlite, restore_sqlite, verify_backup
    from custodes.settings import VaultLayout

    vault, fill, stored = fill_vault(area, source, records, workers, database=None)
    made, plain = area / "backup", area / "baseline-backup"
    try:
        signer = log_note_signer(area / "keys" / "log.key", passphrase=PASSPHRASE)
        log_key = vault.log_verifier_key
        database = VaultLayout(area / "vault").database
        # The access log's own file beside the records (custodes.storage.sqlite's naming).
        files = [database, database.with_name(database.name + "-log")]
        say(f"{area.name}: backup")
        seconds, made_backup = timed(lambda: backup_sqlite(vault, made, signer=signer))
        backup = Pair(seconds, timed(lambda: copy_online(files, plain))[0])
    finally:
        vault.close()
    held("the backup", made_backup.manifest.record_total, stored)

    say(f"{area.name}: verify")
    seconds, check = timed(lambda: verify_backup(made, passphrase=PASSPHRASE, log_key=log_key))
    held("the verified backup", check.records, stored)
    verify = Pair(seconds, timed(lambda: integrity_check(plain))[0])

    say(f"{area.name}: restore")
    seconds, restored = timed(
        lambda: restore_sqlite(
            made,
            area / "restored",
            keys=area / "restored-keys",
            passphrase=PASSPHRASE,
            log_key=log_key,
        )
    )
    held("the restored vault", restored.check.records, stored)
    restore = Pair(seconds, timed(lambda: copy_files(plain, area / "baseline-restored"))[0])
    return Column(
        "sqlite",
        fill,
        {"backup": backup, "verify": verify, "restore": restore},
        Pair(directory_bytes(made), directory_bytes(plain)),
    )


# -- PostgreSQL ----------------------------------------------------------------------------


def repository_bytes(cluster: ArchivingCluster, label: str) -> int:
    """What one backup set takes in the repository (compressed, encrypted)."""
    (made,) = cluster.pgbackrest.info(label)["backup"]
    return int(made["info"]["repository"]["size"])


def restore_plainly(cluster: ArchivingCluster, label: str, pg_data: Path, port: int) -> None:
    """The baseline's restore: pgBackRest's restore to the end of the backup, with the
    options custodes gives it, then the cluster started and its recovery waited out."""
    from custodes.backup.postgres import RestoreTarget

    cluster.pgbackrest.restore(pg_data, label, RestoreTarget("backup"))
    cluster.start(pg_data, port, pg_data / "restore.log")
    wait_promoted(cluster.url(port=port))


def run_postgres(area: Path, source: Path, records: int, workers: int) -> Column:
    from custodes.backup.files import log_note_signer
    from custodes.backup.postgres import (
        RestoreTarget,
        backup_postgres,
        restore_postgres,
        verify_postgres_backup,
    )

    with archiving_cluster(area / "cluster") as cluster:
        pgbackrest = cluster.pgbackrest
        vault, fill, stored = fill_vault(area, source, records, workers, cluster.url())
        made = area / "backup"

        def quiet() -> None:
            cluster.checkpoint()
            os.sync()

        try:
            signer = log_note_signer(area / "keys" / "log.key", passphrase=PASSPHRASE)
            log_key = vault.log_verifier_key
            say(f"{area.name}: backup")
            custodes_backup, made_backup = timed(
                lambda: backup_postgres(
                    vault,
                    made,
                    signer=signer,
                    database=cluster.url(),
                    pgbackrest=pgbackrest,
                    kind="full",
                ),
                quiet,
            )
            before = set(pgbackrest.labels())
            baseline_backup, _ = timed(lambda: pgbackrest.run("--type=full", "backup"), quiet)
            (plain,) = set(pgbackrest.labels()) - before
        finally:
            vault.close()
        held("the backup", made_backup.manifest.record_total, stored)
        label = str(made_backup.manifest.backend_label)
        backup = Pair(custodes_backup, baseline_backup)

        say(f"{area.name}: verify")
        seconds, check = timed(
            lambda: verify_postgres_backup(
                made, pgbackrest=pgbackrest, passphrase=PASSPHRASE, log_key=log_key
            )
        )
        held("the verified backup", check.records, stored)
        # pgBackRest's verify as custodes runs it, its report read by no one.
        verbose = ("--output=text", "--verbose")
        plain_verify, _ = timed(lambda: pgbackrest.run(f"--set={plain}", *verbose, "verify"))
        verify = Pair(seconds, plain_verify)

        say(f"{area.name}: restore")
        pg_data, port = cluster.directory("restored-custodes"), free_port()
        try:
            custodes_restore, restored = timed(
                lambda: restore_postgres(
                    made,
                    area / "restored",
                    keys=area / "restored-keys",
                    passphrase=PASSPHRASE,
                    database=cluster.url(port=port),
                    pg_data=pg_data,
                    pgbackrest=pgbackrest,
                    pg_ctl=cluster.pg_ctl,
                    to=RestoreTarget("backup"),
                    log_key=log_key,
                    recovery_timeout=RECOVERY_SECONDS,
                )
            )
        finally:
            # Its memory and disk go before the baseline's restore is timed.
            cluster.stop(pg_data)
            shutil.rmtree(pg_data, ignore_errors=True)
        held("the restored vault", restored.check.records, stored)
        pg_data, port = cluster.directory("restored-baseline"), free_port()
        baseline_restore, _ = timed(lambda: restore_plainly(cluster, plain, pg_data, port))
        cluster.stop(pg_data)
        sizes = Pair(
            repository_bytes(cluster, label) + directory_bytes(made),
            repository_bytes(cluster, plain),
        )
    return Column(
        "postgresql",
        fill,
        {"backup": backup, "verify": verify, "restore": Pair(custodes_restore, baseline_restore)},
        sizes,
    )


# -- the table -----------------------------------------------------------------------------


def shown_seconds(seconds: float) -> str:
    # A step of a small vault can take less than a millisecond.
    return f"{seconds:.4f}" if seconds < 1 else f"{seconds:,.2f}"


def rows_of(operation: str, records: int) -> list[tuple[str, Callable[[Column], str]]]:
    """The rows of one operation's block: a name and how a column's cell reads."""
    scale = TARGET_RECORDS / records
    target = TARGETS[operation]
    how = "measured" if records == TARGET_RECORDS else "estimated"

    def at_target(c: Column) -> float:
        return c.seconds[operation].custodes * scale

    rows: list[tuple[str, Callable[[Column], str]]] = [
        ("custodes s", lambda c: shown_seconds(c.seconds[operation].custodes)),
        ("baseline s", lambda c: shown_seconds(c.seconds[operation].baseline)),
        (
            "ratio custodes/baseline",
            lambda c: f"{c.seconds[operation].custodes / c.seconds[operation].baseline:,.2f}",
        ),
    ]
    if operation == "backup":
        rows += [
            ("custodes MiB", lambda c: f"{c.backup_bytes.custodes / 2**20:,.1f}"),
            ("baseline MiB", lambda c: f"{c.backup_bytes.baseline / 2**20:,.1f}"),
        ]
    rows += [
        (f"custodes s at {TARGET_RECORDS:,}, {how}", lambda c: f"{at_target(c):,.1f}"),
        (f"target {target:.0f} s", lambda c: "met" if at_target(c) < target else "missed"),
    ]
    return [(f"{operation} {name}", cell) for name, cell in rows]


def table(columns: list[Column], records: int, workers: int) -> str:
    width = max(12, *(len(c.backend) + 2 for c in columns))
    name_width = 44
    fills = ", ".join(f"{c.backend} {c.fill_seconds:,.1f} s" for c in columns)
    lines = [
        f"records {records:,}; filled by custodes' ingest with {workers} workers in {fills}",
        "targets at 1,000,000 records: "
        + ", ".join(f"{op} < {seconds:.0f} s" for op, seconds in TARGETS.items())
        + ("" if records == TARGET_RECORDS else f" (estimated: seconds x {1e6 / records:g})"),
        f"{'':<{name_width}}" + "".join(f"{c.backend:>{width}}" for c in columns),
    ]
    for operation in TARGETS:
        for name, cell in rows_of(operation, records):
            lines.append(f"{name:<{name_width}}" + "".join(f"{cell(c):>{width}}" for c in columns))
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------


def own_environment(home: Path) -> None:
    """HOME and the XDG directories inside the bench's directory, for the bench and for
    everything it starts; none of the user's CUSTODES_ settings (a database named there
    would take the place of the one the bench made)."""
    for name in [k for k in os.environ if k.startswith("CUSTODES_")]:
        del os.environ[name]
    private_directory(home)
    os.environ["HOME"] = str(home)
    for variable, directory in XDG.items():
        (home / directory).mkdir(parents=True, exist_ok=True)
        os.environ[variable] = str(home / directory)


def interrupted(signum: int, _frame: object) -> None:
    # Raised where the bench is, so that every cleanup on the way out runs.
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000, help="records in the vault")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS,
        default=["sqlite"],
        help="where the vaults are stored, each in turn",
    )
    args = parser.parse_args()
    if not 1 <= args.records <= 100_000_000:
        parser.error("--records is 1..100,000,000")

    signal.signal(signal.SIGTERM, interrupted)
    workdir = Path(tempfile.mkdtemp(prefix="custodes-bench-backup-"))
    try:
        if "postgresql" in args.backend and os.geteuid() == 0:
            # The cluster's OS user passes through to its own directory, and lists nothing.
            os.chmod(workdir, 0o711)
        own_environment(workdir / "home")
        source, records = synthesise(private_directory(workdir / "input"), args.records, args.seed)
        columns = []
        for backend in dict.fromkeys(args.backend):
            area = private_directory(workdir / backend, 0o711 if backend == "postgresql" else 0o700)
            try:
                run = run_postgres if backend == "postgresql" else run_sqlite
                columns.append(run(area, source, records, args.workers))
            finally:
                # Its files go once its figures are in: the next backend's need the disk.
                shutil.rmtree(area, ignore_errors=True)
        say(table(columns, records, args.workers))
    finally:
        # A second interrupt does not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
