"""The PostgreSQL adapter of backups: pgBackRest copies the cluster and archives its WAL
into a repository of its own; custodes vouches for what the copy holds.

A physical backup is consistent only at the moment pgBackRest stops it, which no reader
of the live database can see. So the vault's content tables (records, their data keys,
tokens, settings, accounts) are locked against writers in SHARE mode for the length of
pgBackRest's run, and read in that same transaction's snapshot: nothing written to them
commits between the snapshot and the backup's stop, so the snapshot's content is the
backup's. Reads, searches and the access log go on meanwhile (the log is never locked:
it is held against its own signed checkpoints instead). Ingest waits.

The manifest also carries the record sequence number the snapshot ended at and the
history digest of the records and tokens up to it: a restore to a later moment (the last
archived WAL, or a point in time) must still hold every one of them unchanged, since
records and tokens are only ever added.

pgBackRest runs as the OS user that owns the cluster (the operator gives the command,
e.g. through runuser or sudo); its repository belongs to that user or a repository host,
never to the server's own user and never inside the vault directory. custodes never
reads the repository's files itself: `pgbackrest verify` checks them against
pgBackRest's backup manifest, whose copy custodes keeps, hashed and signed, in the
backup directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import conninfo

from custodes.audit.checkpoint import Checkpoint, NoteSigner, parse_note, signed_state_note
from custodes.audit.verify import LogTampered, OutsideCheckpoint, verify_log
from custodes.backup.files import (
    LOG_KEY,
    MANIFEST,
    STATEMENT,
    Signed,
    check_destination,
    check_restore_places,
    describe,
    discard,
    publish,
    read_checked,
    read_signed,
    staging_directory,
    write_new,
)
from custodes.backup.keys import (
    PlacedKeys,
    backup_material,
    copy_erasures,
    copy_keyring,
    copy_signer_files,
    open_agreeing,
    place_keys,
    record_restore,
    restore_detail,
    take_later_erasures,
)
from custodes.backup.manifest import (
    BackupCheck,
    BackupMade,
    BackupSource,
    BackupStatement,
    BackupTampered,
    ContentDigest,
    Manifest,
    Restored,
    TypeCount,
    seal_manifest,
    sign_statement,
)
from custodes.errors import ConfigurationError, CustodesError, StorageError
from custodes.settings import VaultLayout, check_database_url

if TYPE_CHECKING:
    from custodes.vault import Vault

__all__ = [
    "BACKEND",
    "PGBACKREST_MANIFEST",
    "PgBackRest",
    "RestoreTarget",
    "backup_postgres",
    "restore_postgres",
    "verify_postgres_backup",
]

BACKEND = "postgresql"
# pgBackRest's own manifest of the backup (every file of the cluster, its size and
# checksum), copied from the repository: signed with the rest, it pins the backup.
PGBACKREST_MANIFEST = "pgbackrest.manifest"
BACKUP_TYPES = ("full", "diff", "incr")
_CONTENT_TABLES = "records, data_keys, tokens, meta, accounts"
# How long a backup waits for running writers before it locks them out, and how many
# rows a page of the snapshot's stream holds.
_LOCK_TIMEOUT = "60s"
_PAGE = 5000


# -- pgBackRest, run as the operator says ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RestoreTarget:
    """How far a restore replays the archived WAL: to the end of the backup itself
    ("backup"), to the last archived WAL ("latest"), to just before a moment ("time")
    or to just before a WAL position ("lsn").

    A moment is matched against commit records only, so replay to just before a DROP
    DATABASE's commit has already replayed the drop's first, non-transactional step
    and finds the database invalid: after such an attack, restore to the WAL position
    where it began (the server's log, or pg_waldump, names it)."""

    kind: str  # "backup", "latest", "time" or "lsn"
    moment: datetime | None = None
    lsn: str | None = None

    @classmethod
    def parse(cls, text: str) -> RestoreTarget:
        if text in ("backup", "latest"):
            return cls(text)
        if text.startswith("lsn:"):
            return cls("lsn", lsn=_lsn(text[4:]))
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise ConfigurationError(
                "a restore target is 'backup', 'latest', 'lsn:' and a WAL position "
                "(lsn:0/5000100) or an ISO 8601 time with its offset "
                "(2026-12-03T22:55:10+00:00)"
            ) from None
        if moment.tzinfo is None:
            raise ConfigurationError("a restore time must name its UTC offset")
        return cls("time", moment)

    def options(self) -> list[str]:
        if self.kind == "backup":
            return ["--type=immediate", "--target-action=promote"]
        if self.kind == "time" and self.moment is not None:
            target = f"--target={self.moment.isoformat(sep=' ')}"
        elif self.kind == "lsn" and self.lsn is not None:
            target = f"--target={_lsn(self.lsn)}"
        else:
            return []  # the end of the archive: recovery ends and the cluster promotes
        return [f"--type={self.kind}", target, "--target-exclusive", "--target-action=promote"]

    def __str__(self) -> str:
        if self.moment is not None:
            return self.moment.isoformat()
        return f"lsn:{self.lsn}" if self.lsn is not None else self.kind


def _lsn(text: str) -> str:
    high, _, low = text.partition("/")
    try:
        if not high or not low or len(high) > 8 or len(low) > 8:
            raise ValueError
        int(high, 16), int(low, 16)
    except ValueError:
        raise ConfigurationError("a WAL position is two hexadecimal numbers: 0/5000100") from None
    return text.upper()


@dataclass(frozen=True, slots=True)
class PgBackRest:
    """pgBackRest for one stanza, run by `command` (e.g. `runuser -u postgres --
    pgbackrest --config=...`): custodes passes it options and reads its JSON, and says
    what failed by pgBackRest's own last line (paths and LSNs, never a stored value)."""

    stanza: str
    command: tuple[str, ...] = ("pgbackrest",)
    timeout: float = 6 * 3600

    @classmethod
    def from_text(cls, stanza: str, command: str | None) -> PgBackRest:
        argv = tuple(shlex.split(command)) if command else ("pgbackrest",)
        if not argv:
            raise ConfigurationError("the pgBackRest command is empty")
        if not stanza or any(c.isspace() for c in stanza):
            raise ConfigurationError("the pgBackRest stanza is one word")
        return cls(stanza, argv)

    def run(self, *args: str) -> str:
        argv = [*self.command, f"--stanza={self.stanza}", *args]
        done = _run_tool(argv, f"pgBackRest's {args[-1]}", self.timeout)
        return done.stdout.decode("utf-8", "replace")

    def info(self, label: str | None = None) -> dict[str, Any]:
        args = ["--output=json", *([f"--set={label}"] if label else []), "info"]
        try:
            (stanza,) = json.loads(self.run(*args))
        except (ValueError, TypeError):
            raise StorageError("pgBackRest's info is not the JSON it documents") from None
        if not isinstance(stanza, dict):
            raise StorageError("pgBackRest's info is not the JSON it documents")
        return stanza

    def labels(self) -> list[str]:
        return [str(b["label"]) for b in self.info().get("backup", [])]

    def encrypted(self) -> bool:
        """Whether every repository of the stanza encrypts what it holds."""
        repos = self.info().get("repo", [])
        return bool(repos) and all(r.get("cipher", "none") != "none" for r in repos)

    def backup(self, kind: str, backup_id: str) -> str:
        """Take a backup of this kind; its label. The custodes backup's id goes with it as
        an annotation, by which the new backup is found among the stanza's."""
        if kind not in BACKUP_TYPES:
            raise ConfigurationError(f"a backup type is one of: {', '.join(BACKUP_TYPES)}")
        before = set(self.labels())
        self.run(f"--type={kind}", f"--annotation=custodes-backup={backup_id}", "backup")
        for label in self.labels():
            if label in before:
                continue
            (made,) = self.info(label).get("backup", [None])
            if (
                isinstance(made, dict)
                and made.get("annotation", {}).get("custodes-backup") == backup_id
            ):
                return label
        raise StorageError("pgBackRest reports no backup made by this run")

    def verify(self, label: str) -> None:
        """pgBackRest checks every file of the backup against its manifest (and those of
        the backups it builds on), and the archived WAL: a file missing or changed fails.

        pgBackRest's verify exits 0 whatever it finds and says it in its report, so the
        report is read: this backup must be listed as valid, and every archived WAL file
        it checked must be valid."""
        report = self.run(f"--set={label}", "--output=text", "--verbose", "verify")
        lines = [line.strip() for line in report.splitlines()]
        mine = [line for line in lines if line.startswith(f"backup: {label},")]
        if not mine:
            raise StorageError(f"pgBackRest's verify did not report on backup {label}")
        if not mine[0].startswith(f"backup: {label}, status: valid,"):
            said = mine[0].split(",")[1].strip()
            raise StorageError(f"pgBackRest's verify failed for backup {label}: {said}")
        for line in lines:
            if line.startswith("archiveId:"):
                counts = dict(
                    part.strip().rsplit(": ", 1) for part in line.split(",")[1:] if ": " in part
                )
                if counts.get("total WAL checked") != counts.get("total valid WAL"):
                    raise StorageError(
                        f"pgBackRest's verify failed: the archived WAL is not whole ({line})"
                    )

    def manifest(self, label: str) -> bytes:
        """pgBackRest's manifest of the backup, as the repository holds it (decrypted)."""
        argv = [
            *self.command,
            f"--stanza={self.stanza}",
            "repo-get",
            f"backup/{self.stanza}/{label}/backup.manifest",
        ]
        done = _run_tool(argv, "pgBackRest's repo-get", 600, check=False)
        if done.returncode != 0 or not done.stdout:
            raise BackupTampered(f"the repository holds no manifest for backup {label}")
        return done.stdout

    def restore(self, pg_data: Path, label: str, target: RestoreTarget) -> None:
        # The restored cluster does not archive until its operator says where: the
        # stanza still names the lost cluster's directory, and two clusters pushing
        # into one stanza would be refused by pgBackRest anyway.
        self.run(
            f"--pg1-path={pg_data}",
            f"--set={label}",
            "--archive-mode=off",
            *target.options(),
            "restore",
        )


# -- backing up ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Snapshot:
    content: ContentDigest
    counts: dict[str, int]
    bound: int
    log_size: int
    vault_id: bytes | None


def backup_postgres(
    vault: Vault,
    destination: Path,
    *,
    signer: NoteSigner,
    database: str,
    pgbackrest: PgBackRest,
    kind: str = "diff",
    keyring: Path | None = None,
    log_key: Path | None = None,
    allow_plain_repository: bool = False,
) -> BackupMade:
    """Back up a vault held in PostgreSQL: a pgBackRest backup of its cluster, and in
    `destination` (new or empty, never inside the vault directory) the manifest sealed
    under the keyring, the statement signed by the log's key, pgBackRest's manifest and
    the sealed key files. A logged act (`vault:backup:create`).

    `database` is a connection as the schema's owner: locking the content tables against
    writers is the owner's right, never the server's."""
    if vault.directory is None:
        raise ConfigurationError("a vault held in memory has no files to back up")
    recorded = VaultLayout(vault.directory).read()
    if recorded.database is None:
        raise ConfigurationError("this vault's records are in SQLite: back it up as such")
    if recorded.log_database is not None:
        # A backup is one cluster's, read in one snapshot that holds every read's entry
        # beside the records it read; a log in another cluster is in neither.
        raise ConfigurationError(
            "this vault's access log lives in a database of its own, which a backup of the "
            "records' cluster would not hold: back up each cluster with pgBackRest itself"
        )
    database = check_database_url(database)
    keyring_path = Path(keyring) if keyring else recorded.keyring
    log_key_path = Path(log_key) if log_key else recorded.log_key
    if signer.verifier_key != vault.log_verifier_key:
        raise ConfigurationError("the signing key given is not this vault's log key")
    destination = check_destination(destination, vault_directory=vault.directory)
    if kind not in BACKUP_TYPES:
        raise ConfigurationError(f"a backup type is one of: {', '.join(BACKUP_TYPES)}")
    # Before the act: a repository that would hold the cluster in clear costs no entry.
    if not allow_plain_repository and not pgbackrest.encrypted():
        raise ConfigurationError(
            "the pgBackRest repository does not encrypt what it holds: set "
            "repo1-cipher-type=aes-256-cbc and a repo1-cipher-pass of its own"
        )

    def make(source: BackupSource) -> BackupMade:
        staging = staging_directory(destination, vault_directory=source.directory)
        try:
            manifest = _write_backup(
                source, staging, database, pgbackrest, kind, keyring_path, log_key_path, signer
            )
            publish(staging, destination)
        except BaseException:
            discard(staging)
            raise
        return BackupMade(destination, manifest)

    return vault.backup(vault.operator, make)


def _write_backup(
    source: BackupSource,
    staging: Path,
    database: str,
    pgbackrest: PgBackRest,
    kind: str,
    keyring: Path,
    log_key: Path,
    signer: NoteSigner,
) -> Manifest:
    from custodes.storage.postgres import connect_pinned

    backup_id = os.urandom(16)
    copy_signer_files(staging, log_key)  # before the snapshot: the log holds their state
    conn, _ = connect_pinned(database)
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
            try:
                conn.execute(f"LOCK TABLE {_CONTENT_TABLES} IN SHARE MODE")
            except psycopg.errors.InsufficientPrivilege:
                raise ConfigurationError(
                    "a backup locks the vault's tables against writers, which only the "
                    "schema's owner may: pass the owner's connection (--owner-database)"
                ) from None
            snapshot = _read_snapshot(conn)
            if snapshot.vault_id != source.material.vault_id:
                raise ConfigurationError("the database holds another vault")
            # Still locked: pgBackRest's stop falls inside the window the snapshot saw.
            label = pgbackrest.backup(kind, backup_id.hex())
    except psycopg.Error as exc:
        raise StorageError(f"the backup's snapshot failed: {type(exc).__name__}") from None
    finally:
        conn.close()
    write_new(staging / PGBACKREST_MANIFEST, pgbackrest.manifest(label))
    copy_keyring(staging, keyring, source.material.vault_id)
    copy_erasures(staging, log_key)
    names = {tag: name for name, tag in source.type_tags.items()}
    content = snapshot.content
    manifest = Manifest(
        backup_id=backup_id,
        vault_id=source.material.vault_id,
        created=int(source.created),
        backend=BACKEND,
        backend_label=label,
        records=tuple(TypeCount(tag, names.get(tag), n) for tag, n in snapshot.counts.items()),
        tokens=content.counts["tokens"],
        content_digest=content.digest(),
        log_size=snapshot.log_size,
        checkpoint=source.checkpoint,
        log_verifier_key=source.verifier_key,
        files=tuple(describe(path) for path in sorted(staging.iterdir())),
        record_bound=snapshot.bound,
        history_digest=content.history(),
    )
    sealed = seal_manifest(manifest, source.material)
    write_new(staging / MANIFEST, sealed)
    write_new(staging / STATEMENT, sign_statement(BackupStatement.of(manifest, sealed), signer))
    return manifest


def _read_snapshot(conn: psycopg.Connection[Any], bound: int | None = None) -> _Snapshot:
    """The content digest of the vault's tables as this transaction sees them; with
    `bound`, records and tokens only up to that sequence number (a later restore's view
    of a backup's history)."""
    if bound is None:
        row = conn.execute("SELECT last_value, is_called FROM record_seq").fetchone()
        bound = int(row[0]) if row is not None and row[1] else 0
    digest, counts = ContentDigest(), dict[str, int]()
    try:
        digest.section("records")
        for rid, rtype, payload, kek_version, wrapped in _stream(
            conn,
            "SELECT r.record_id, r.record_type, r.payload, k.kek_version, k.wrapped"
            " FROM records AS r LEFT JOIN data_keys AS k ON k.record_id = r.record_id"
            " WHERE r.seq <= %s ORDER BY r.record_id",
            (bound,),
        ):
            digest.record(rid, rtype, bytes(payload), kek_version, _maybe_bytes(wrapped))
            counts[rtype] = counts.get(rtype, 0) + 1
        digest.section("tokens")
        for index_id, token, rid in _stream(
            conn,
            "SELECT index_id, token, record_id FROM tokens WHERE seq <= %s ORDER BY 1, 2, 3",
            (bound,),
        ):
            digest.token(index_id, token, rid)
        digest.section("meta")
        for key, value in conn.execute("SELECT key, value FROM meta ORDER BY key"):
            digest.meta(key, bytes(value))
        digest.section("accounts")
        for row in conn.execute(
            "SELECT username, role, password_hash, attributes, created_at, disabled"
            " FROM accounts ORDER BY username"
        ):
            username, role, password_hash, attributes, created_at, disabled = row
            digest.account(
                username, role, password_hash, bytes(attributes), created_at, int(disabled)
            )
    except (ConfigurationError, TypeError, ValueError):
        raise BackupTampered("the database holds rows custodes did not write") from None
    (last,) = conn.execute("SELECT max(idx) FROM log_entries").fetchone() or (None,)
    vault_id = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()
    return _Snapshot(
        content=digest,
        counts=counts,
        bound=bound,
        log_size=0 if last is None else int(last) + 1,
        vault_id=None if vault_id is None else bytes(vault_id[0]),
    )


def _stream(
    conn: psycopg.Connection[Any], query: str, params: tuple[object, ...]
) -> Iterator[tuple[Any, ...]]:
    # A named (server-side) cursor: a billion rows are paged, never held at once.
    with conn.cursor(name=f"custodes_backup_{os.urandom(4).hex()}") as cursor:
        cursor.itersize = _PAGE
        cursor.execute(query, params)
        yield from cursor


def _maybe_bytes(value: object) -> bytes | None:
    return None if value is None else bytes(value)  # type: ignore[call-overload]


# -- verifying where it lies -----------------------------------------------------------------


def verify_postgres_backup(
    directory: Path,
    *,
    pgbackrest: PgBackRest,
    signed: Signed | None = None,
    passphrase: str | None = None,
    log_key: str | None = None,
) -> BackupCheck:
    """Check a PostgreSQL backup without restoring it: the statement's signature and the
    backup directory's files (custodes.backup.files), pgBackRest's manifest in the
    repository against the signed copy, every file of the backup and the WAL it needs
    (`pgbackrest verify`), the checkpoint the backup was made at against the signer state
    it carries; with the keyring, the sealed manifest and its counts."""
    directory = Path(directory)
    if signed is None:
        signed = read_signed(directory, log_key)
    statement = signed.statement
    if statement.backend != BACKEND or statement.backend_label is None:
        raise ConfigurationError(f"this is a {statement.backend} backup, not a PostgreSQL one")
    manifest = None
    if passphrase is not None:
        manifest = open_agreeing(signed, backup_material(directory, signed, passphrase))
    label = statement.backend_label
    listed = next((f for f in statement.files if f.name == PGBACKREST_MANIFEST), None)
    if listed is None:
        raise BackupTampered("the backup lacks pgBackRest's manifest")
    if pgbackrest.manifest(label) != read_checked(directory, listed):
        raise BackupTampered(
            f"the repository's backup {label} is not the one this backup's statement signs"
        )
    pgbackrest.verify(label)
    _check_signer_state(directory, statement)
    return BackupCheck(
        backup_id=statement.backup_id.hex(),
        created=statement.created,
        backend=statement.backend,
        records=statement.records,
        log_entries=statement.log_size,
        checkpoint_size=statement.checkpoint_size,
        files=len(statement.files),
        counts=manifest.counts() if manifest is not None else None,
        notes=(*signed.notes, f"pgBackRest backup {label}: every file and its WAL verified"),
    )


def _check_signer_state(keys: Path, statement: BackupStatement) -> bytes:
    """The signer state carried was copied after the backup's checkpoint was signed: it
    knows a checkpoint at least as large, within the log the backup holds, and at the
    same size the same root. Its signed note, to hold a restored log against."""
    try:
        note = signed_state_note(keys / LOG_KEY)
        state = Checkpoint.parse_body(parse_note(note)[0]) if note else None
    except CustodesError:
        raise BackupTampered("the backup's log signer state is damaged") from None
    if state is None or note is None:
        raise BackupTampered("the backup's log signer state holds no checkpoint")
    if not statement.checkpoint_size <= state.size <= statement.log_size:
        raise BackupTampered("the backup's signer state does not fit the log it holds")
    if state.size == statement.checkpoint_size and state.root != statement.checkpoint_root:
        raise BackupTampered("the backup's signer state forks from its checkpoint")
    return note


# -- restoring -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PgCtl:
    """pg_ctl, run as the operator says (as the cluster's OS user)."""

    command: tuple[str, ...] = ("pg_ctl",)

    @classmethod
    def from_text(cls, command: str | None) -> PgCtl:
        argv = tuple(shlex.split(command)) if command else ("pg_ctl",)
        if not argv:
            raise ConfigurationError("the pg_ctl command is empty")
        return cls(argv)

    def run(self, *args: str, timeout: float) -> None:
        _run_tool([*self.command, *args], f"pg_ctl {args[0]}", timeout)


def _run_tool(
    argv: Sequence[str], what: str, timeout: float, *, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run pgBackRest or pg_ctl; with check, StorageError if it fails, saying so by the
    tool's own last line (paths, labels and LSNs, never a stored value)."""
    try:
        # The operator's own command for pgBackRest or pg_ctl, never a stored value.
        done = subprocess.run(  # noqa: S603
            list(argv),
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise ConfigurationError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise StorageError(f"{what} did not finish in time") from None
    if check and done.returncode != 0:
        output = done.stderr.strip() or done.stdout.strip()
        said = output.decode("utf-8", "replace").splitlines()
        raise StorageError(
            f"{what} failed (exit {done.returncode})" + (f": {said[-1]}" if said else "")
        )
    return done


def restore_postgres(
    backup: Path,
    target: Path,
    *,
    keys: Path,
    passphrase: str,
    database: str,
    pg_data: Path,
    pgbackrest: PgBackRest,
    pg_ctl: PgCtl,
    to: RestoreTarget,
    checkpoints: Sequence[tuple[str, bytes]] = (),
    log_key: str | None = None,
    recovery_timeout: float = 600.0,
    erasures: Path | None = None,
) -> Restored:
    """Restore a PostgreSQL backup: pgBackRest puts the cluster back into `pg_data` (new
    or empty) and replays the archived WAL as far as `to` says; pg_ctl starts it where
    `database` will reach it; and only once the restored database verifies is a vault
    directory written at `target` with its keys in `keys`, and the restore logged.

    What must hold: the backup itself (as `backup verify` checks it); the content as the
    backup saw it (to the backup: the whole content digest; later: the history digest of
    every record and token up to the backup's bound, and its counts); the access log,
    whole, extending the backup's checkpoint, the signer state it carries and every
    checkpoint in `checkpoints` (a witness's, named). A restore that fails stops the
    restored cluster and leaves no vault directory and no key: it never serves.
    `erasures` is the vault's current erasure ledger, applied again before the restored
    vault opens (the backup carries its own, older copy).
    """
    backup, target, keys = Path(backup), Path(target).absolute(), Path(keys).absolute()
    pg_data = Path(pg_data).absolute()
    database = check_database_url(database)
    check_restore_places(backup, target, keys)
    if pg_data.exists() and any(pg_data.iterdir()):
        raise ConfigurationError(
            "the cluster directory to restore into is not empty: a restore never writes "
            "over a database"
        )
    signed = read_signed(backup, log_key)
    verify_postgres_backup(backup, pgbackrest=pgbackrest, signed=signed)
    manifest = open_agreeing(signed, backup_material(backup, signed, passphrase))
    state_note = _check_signer_state(backup, signed.statement)
    placed = PlacedKeys.under(keys, manifest)
    placed.refuse_present(keys)
    assert manifest.backend_label is not None  # verified above

    pgbackrest.restore(pg_data, manifest.backend_label, to)
    host, port = _listen_address(database)
    pg_ctl.run(
        "start",
        "-w",
        "-t",
        str(int(recovery_timeout)),
        "-D",
        str(pg_data),
        "-l",
        str(pg_data / "custodes-restore.log"),
        "-o",
        f"-c port={port} -c listen_addresses={host}",
        timeout=recovery_timeout + 30,
    )
    staging: Path | None = None
    written: list[Path] = []
    try:
        _wait_promoted(database, pg_data, recovery_timeout)
        check = _check_restored(database, signed, manifest, to, state_note, checkpoints)
        staging = staging_directory(target, vault_directory=None)
        VaultLayout(staging).write(manifest.vault_id, placed.keyring, placed.log_key, database)
        place_keys(backup, manifest, placed, written)
        take_later_erasures(placed, erasures, manifest, written)
        record_restore(
            staging, passphrase, restore_detail(manifest, "vault", backend=BACKEND, to=str(to))
        )
        publish(staging, target)
    except BaseException:
        if staging is not None:
            discard(staging)
        for path in written:
            path.unlink(missing_ok=True)
        with contextlib.suppress(CustodesError):  # the first failure is the one to report
            pg_ctl.run("stop", "-m", "fast", "-w", "-D", str(pg_data), timeout=120)
        raise
    return Restored(target, placed.keyring, placed.log_key, check)


def _listen_address(database: str) -> tuple[str, int]:
    """Where the restored cluster listens: the host and port the database URL names."""
    params = conninfo.conninfo_to_dict(database)
    host = str(params.get("host") or "127.0.0.1")
    if host.startswith("/") or "," in host:
        raise ConfigurationError("restore to a database reached by one TCP host and port")
    return host, int(params.get("port") or 5432)


def _wait_promoted(database: str, pg_data: Path, timeout: float) -> None:
    """Until the restored cluster has replayed its WAL and left recovery; StorageError
    at once if it stopped (its recovery failed) or refuses the database (invalid)."""
    deadline = time.monotonic() + timeout
    refused = 0
    while True:
        if not (pg_data / "postmaster.pid").exists():
            raise StorageError(
                "the restored cluster stopped during its recovery: see custodes-restore.log "
                "in its directory"
            )
        try:
            with psycopg.connect(database, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row is not None and not row[0]:
                    return
        except psycopg.OperationalError as exc:
            # Recovery answers "starting up" or "not yet accepting connections"; anything
            # else for some seconds (an invalid or missing database) will not pass.
            said = str(exc)
            if "starting up" not in said and "not yet accepting" not in said:
                refused += 1
                if refused >= 25:
                    first = said.splitlines()[0] if said else type(exc).__name__
                    raise StorageError(
                        f"the restored database refuses connections: {first}"
                    ) from None
        if time.monotonic() > deadline:
            raise StorageError("the restored cluster did not finish its recovery in time")
        time.sleep(0.2)


def _check_restored(
    database: str,
    signed: Signed,
    manifest: Manifest,
    to: RestoreTarget,
    state_note: bytes,
    checkpoints: Sequence[tuple[str, bytes]],
) -> BackupCheck:
    from custodes.storage.postgres import PostgresStorage, connect_pinned

    assert manifest.record_bound is not None and manifest.history_digest is not None
    conn, _ = connect_pinned(database)
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            held = _read_snapshot(conn, manifest.record_bound)
            (records,) = conn.execute("SELECT count(*) FROM records").fetchone() or (0,)
    finally:
        conn.close()
    if held.vault_id != manifest.vault_id:
        raise BackupTampered("the restored database is of another vault")
    expected = {c.tag: c.count for c in manifest.records}
    if held.counts != expected or held.content.counts["tokens"] != manifest.tokens:
        raise BackupTampered("the restored database's counts are not the manifest's")
    if held.content.history() != manifest.history_digest:
        raise BackupTampered("the restored records and tokens are not the ones backed up")
    if to.kind == "backup" and held.content.digest() != manifest.content_digest:
        raise BackupTampered("the restored database's content is not the one backed up")
    outside = [
        OutsideCheckpoint("the backup's manifest", manifest.checkpoint),
        OutsideCheckpoint("the log signer state in the backup", state_note),
        *(OutsideCheckpoint(name, note) for name, note in checkpoints),
    ]
    storage = PostgresStorage(database, max_size=2)
    try:
        report = verify_log(storage, signed.verifier_key, origin=manifest.origin, outside=outside)
    except LogTampered as exc:
        raise BackupTampered(f"the restored access log does not verify: {exc}") from None
    finally:
        storage.close()
    if report.entries < manifest.log_size:
        raise BackupTampered(
            f"the restored access log holds {report.entries} entries, fewer than the "
            f"{manifest.log_size} the backup holds"
        )
    return BackupCheck(
        backup_id=manifest.backup_id.hex(),
        created=manifest.created,
        backend=BACKEND,
        records=int(records),
        log_entries=report.entries,
        checkpoint_size=manifest.checkpoint_size(),
        files=len(manifest.files),
        counts=manifest.counts(),
        notes=signed.notes,
    )
