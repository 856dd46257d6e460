"""Host commands for backups: backup create, backup verify, backup restore-keys, restore.

A backup is the vault's sealed key files, a manifest sealed under the keyring and a
statement signed by the log's key, around the data: the vault's two SQLite files, or for
a vault in PostgreSQL a pgBackRest backup of its cluster (with pgBackRest's manifest).
`backup verify` checks one where it lies (with the log's published key alone, or with the
keyring too); `restore` puts a whole vault back into a new directory (and, for
PostgreSQL, a new cluster, to the backup or to a later moment) and only then lets it
serve.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

import click

from custodes import settings
from custodes.cli.common import (
    F,
    database_override,
    keyring_passphrase,
    log_to,
    out,
    secret,
    shown,
    vault_directory,
    vault_options,
)

if TYPE_CHECKING:
    from custodes.backup.postgres import PgBackRest

ENV_PGBACKREST = "CUSTODES_PGBACKREST"
ENV_PGBACKREST_STANZA = "CUSTODES_PGBACKREST_STANZA"
ENV_PG_CTL = "CUSTODES_PG_CTL"


def pgbackrest_options(fn: F) -> F:
    """The pgBackRest stanza and the command that runs pgBackRest as the cluster's user."""
    fn = click.option(
        "--pgbackrest",
        "pgbackrest_command",
        envvar=ENV_PGBACKREST,
        metavar="COMMAND",
        help="How to run pgBackRest as the cluster's OS user, e.g. 'sudo -u postgres "
        f"pgbackrest' (default: pgbackrest; also ${ENV_PGBACKREST}).",
    )(fn)
    fn = click.option(
        "--stanza",
        envvar=ENV_PGBACKREST_STANZA,
        metavar="NAME",
        help=f"The pgBackRest stanza of the vault's cluster (also ${ENV_PGBACKREST_STANZA}).",
    )(fn)
    return fn


def _pgbackrest(stanza: str | None, command: str | None) -> PgBackRest:
    from custodes.backup.postgres import PgBackRest

    if not stanza:
        raise click.UsageError("a vault in PostgreSQL is backed up by pgBackRest: name --stanza")
    return PgBackRest.from_text(stanza, command)


@click.command("create")
@vault_options
@click.option(
    "--to",
    "destination",
    required=True,
    type=click.Path(file_okay=False),
    help="A new or empty directory outside the vault directory; made owner-only.",
)
@pgbackrest_options
@click.option(
    "--type",
    "kind",
    type=click.Choice(["full", "diff", "incr"]),
    default="diff",
    show_default=True,
    help="PostgreSQL: pgBackRest's backup type (the first is always full).",
)
@click.option(
    "--owner-database",
    metavar="URL",
    help="PostgreSQL: the schema owner's connection, which locks the vault's tables "
    "against writers while pgBackRest runs (default: the vault's own).",
)
def backup_create(
    vault_dir: str | None,
    keyring: str | None,
    destination: str,
    stanza: str | None,
    pgbackrest_command: str | None,
    kind: str,
    owner_database: str | None,
) -> None:
    """Back the vault up: its records and access log, consistent with each other (SQLite:
    both files copied live; PostgreSQL: a pgBackRest backup, its manifest kept), its
    keyring and log signing key with the signer's state (still sealed with the
    passphrase), a manifest sealed under the keyring, and a statement signed by the log's
    key. The backup is on the access log."""
    from custodes.backup.files import log_note_signer
    from custodes.bootstrap import assemble_vault, unlock_vault

    directory = vault_directory(vault_dir)
    recorded = settings.VaultLayout(directory).read()  # a clear error before any prompt
    database = database_override() or recorded.database
    pgbackrest = _pgbackrest(stanza, pgbackrest_command) if database else None
    passphrase = keyring_passphrase(directory, keyring)
    keyring_path = Path(keyring) if keyring else None
    unlocked = unlock_vault(
        directory, passphrase=passphrase, keyring_path=keyring_path, database=database
    )
    signer = log_note_signer(recorded.log_key, passphrase=passphrase)
    vault = assemble_vault(unlocked, host=True)
    log_to(vault)
    try:
        if database is not None and pgbackrest is not None:
            from custodes.backup.postgres import backup_postgres

            made = backup_postgres(
                vault,
                Path(destination),
                signer=signer,
                database=owner_database or database,
                pgbackrest=pgbackrest,
                kind=kind,
                keyring=keyring_path,
            )
        else:
            from custodes.backup.sqlite import backup_sqlite

            made = backup_sqlite(vault, Path(destination), signer=signer, keyring=keyring_path)
    finally:
        vault.close()
    manifest = made.manifest
    out.print(
        f"backup {manifest.backup_id.hex()} written to {shown(made.directory)}: "
        f"{manifest.record_total:,} records, an access log of {manifest.log_size:,} entries "
        f"signed at size {manifest.checkpoint_size():,}"
    )
    if manifest.backend_label is not None:
        out.print(f"pgBackRest backup {manifest.backend_label}")
    check = f"custodes backup verify {shlex.quote(str(made.directory))}"
    out.print(shown(f"check it with: {check} --log-key '{vault.log_verifier_key}'"))


@click.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--log-key",
    help="The log's published verifier key. Without it, the key the backup carries is "
    "used, which a backup forged whole would carry too.",
)
@click.option(
    "--no-keyring",
    is_flag=True,
    help="Check only what the log's key vouches for (signature, files, content, log): "
    "no passphrase, no counts per record type.",
)
@pgbackrest_options
def backup_verify(
    directory: str,
    log_key: str | None,
    no_keyring: bool,
    stanza: str | None,
    pgbackrest_command: str | None,
) -> None:
    """Check a backup where it lies, without restoring it: the statement's signature,
    every file's size and SHA-256, the content digest and record count recomputed from
    the database copy, and the copied access log verified against the checkpoint the
    backup was made at. For PostgreSQL, pgBackRest's manifest in the repository against
    the signed copy, and every file of the backup and its WAL by `pgbackrest verify`. With
    the keyring passphrase (the backup's own keyring copy is opened), also the sealed
    manifest and its counts per record type. Exits non-zero, naming the first
    mismatch."""
    from custodes.backup.files import read_signed
    from custodes.backup.sqlite import verify_backup

    signed = read_signed(Path(directory), log_key)
    passphrase = (
        None if no_keyring else secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
    )
    if signed.statement.backend == "postgresql":
        from custodes.backup.postgres import verify_postgres_backup

        check = verify_postgres_backup(
            Path(directory),
            pgbackrest=_pgbackrest(stanza, pgbackrest_command),
            signed=signed,
            passphrase=passphrase,
        )
    else:
        check = verify_backup(Path(directory), passphrase=passphrase, log_key=log_key)
    out.print(
        f"backup {check.backup_id} verified: {check.files} files, {check.records:,} records "
        f"matching the content digest, an access log of {check.log_entries:,} entries "
        f"consistent with its checkpoint at size {check.checkpoint_size:,}"
    )
    if check.counts is not None:
        counts = ", ".join(f"{name} {n:,}" for name, n in sorted(check.counts.items()))
        out.print(shown(f"records per type: {counts}"))
    for note in check.notes:
        out.print(shown(f"note: {note}"))


@click.command("restore-keys")
@click.argument("backup", type=click.Path(exists=True, file_okay=False))
@click.option("--vault", "vault_dir", type=click.Path(file_okay=False), help="Vault directory.")
@click.option("--log-key", help="The log's published verifier key.")
def backup_restore_keys(backup: str, vault_dir: str | None, log_key: str | None) -> None:
    """Put back the key files a vault lost (keyring, log signing key, the signer's state
    or its record of losses) from a backup of it, where the vault records them; files
    still there are never replaced. On the access log."""
    from custodes.backup.sqlite import restore_keys

    directory = vault_directory(vault_dir)
    settings.VaultLayout(directory).read()
    passphrase = secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
    restored = restore_keys(Path(backup), directory, passphrase=passphrase, log_key=log_key)
    out.print(f"put back from the backup: {', '.join(restored)}")


@click.command("restore")
@click.argument("backup", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--vault",
    "vault_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="A new or empty directory for the restored vault.",
)
@click.option(
    "--keys",
    "key_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where the restored keyring and log key go: outside the vault directory.",
)
@click.option("--log-key", help="The log's published verifier key.")
@pgbackrest_options
@click.option(
    "--database",
    metavar="URL",
    help="PostgreSQL: where the restored cluster will answer (its host and port are the "
    "ones it is started on); recorded as the restored vault's database.",
)
@click.option(
    "--pg-data",
    type=click.Path(file_okay=False),
    help="PostgreSQL: a new or empty directory for the restored cluster, owned by its OS user.",
)
@click.option(
    "--pg-ctl",
    "pg_ctl_command",
    envvar=ENV_PG_CTL,
    metavar="COMMAND",
    help="PostgreSQL: how to run pg_ctl as the cluster's OS user (default: pg_ctl; also "
    f"${ENV_PG_CTL}).",
)
@click.option(
    "--to",
    "target",
    default="latest",
    show_default=True,
    help="PostgreSQL: replay the archived WAL to the end of the backup ('backup'), to the "
    "last archived WAL ('latest'), or to just before a moment (ISO 8601 with its offset).",
)
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A signed checkpoint held elsewhere (a witness's cosigned note) that the restored "
    "log must extend; repeatable.",
)
@click.option(
    "--erasures",
    "erasures",
    type=click.Path(exists=True, dir_okay=False),
    help="The vault's current erasure ledger (LOGKEY.erasures, kept with its keys): every "
    "record erased since the backup is erased again before the restored vault opens. "
    "Default: the ledger beside the log key in its default place, if there is one.",
)
def restore(
    backup: str,
    vault_dir: str,
    key_dir: str,
    log_key: str | None,
    stanza: str | None,
    pgbackrest_command: str | None,
    database: str | None,
    pg_data: str | None,
    pg_ctl_command: str | None,
    target: str,
    checkpoints: tuple[str, ...],
    erasures: str | None,
) -> None:
    """Restore a backup into a new vault directory, its keys into a directory of their
    own. Everything is checked before the vault directory exists (every file, the content
    digest, the log against the backup's checkpoint, the signer state and any checkpoint
    given); a backup that does not verify leaves no vault and no key behind. For
    PostgreSQL, pgBackRest restores the cluster into --pg-data and pg_ctl starts it on
    --database's port. The restore is on the restored vault's log."""
    from custodes.backup.files import read_signed

    signed = read_signed(Path(backup), log_key)
    notes = [(f"the checkpoint in {Path(p).name}", Path(p).read_bytes()) for p in checkpoints]
    if signed.statement.backend == "postgresql":
        from custodes.backup.postgres import PgCtl, RestoreTarget, restore_postgres

        if not database or not pg_data:
            raise click.UsageError("a PostgreSQL backup is restored with --database and --pg-data")
        pgbackrest = _pgbackrest(stanza, pgbackrest_command)
        to = RestoreTarget.parse(target)
        passphrase = secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
        restored = restore_postgres(
            Path(backup),
            Path(vault_dir),
            keys=Path(key_dir),
            passphrase=passphrase,
            database=database,
            pg_data=Path(pg_data),
            pgbackrest=pgbackrest,
            pg_ctl=PgCtl.from_text(pg_ctl_command),
            to=to,
            checkpoints=notes,
            log_key=log_key,
            erasures=Path(erasures) if erasures else None,
        )
    else:
        from custodes.backup.sqlite import restore_sqlite

        if notes:
            raise click.UsageError("--checkpoint is for PostgreSQL restores")
        passphrase = secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
        restored = restore_sqlite(
            Path(backup),
            Path(vault_dir),
            keys=Path(key_dir),
            passphrase=passphrase,
            log_key=log_key,
            erasures=Path(erasures) if erasures else None,
        )
    check = restored.check
    out.print(
        f"restored backup {check.backup_id} into {shown(restored.directory)}: "
        f"{check.records:,} records, an access log of {check.log_entries:,} entries "
        "(and this restore)"
    )
    out.print(shown(f"keyring: {restored.keyring}"))
    out.print(shown(f"log key: {restored.log_key}"))
