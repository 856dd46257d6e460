"""Host commands for backups: backup create, backup verify, backup restore-keys, restore.

A backup is the vault's two SQLite files and its sealed key files, with a manifest sealed
under the keyring and a statement signed by the log's key. `backup verify` checks one
where it lies (with the log's published key alone, or with the keyring too); `restore`
puts a whole vault back into a new directory and only then lets it serve.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from custodes import settings
from custodes.cli.common import log_to, out, secret, shown, vault_directory, vault_options


@click.command("create")
@vault_options
@click.option(
    "--to",
    "destination",
    required=True,
    type=click.Path(file_okay=False),
    help="A new or empty directory outside the vault directory; made owner-only.",
)
def backup_create(vault_dir: str | None, keyring: str | None, destination: str) -> None:
    """Back the vault up: its database and access log (copied live, consistent with each
    other), its keyring and log signing key with the signer's state (still sealed with the
    passphrase), a manifest sealed under the keyring, and a statement signed by the log's
    key. The backup is on the access log."""
    from custodes.backup.files import log_note_signer
    from custodes.backup.sqlite import backup_sqlite
    from custodes.bootstrap import assemble_vault, unlock_vault

    directory = vault_directory(vault_dir)
    recorded = settings.VaultLayout(directory).read()  # a clear error before any prompt
    passphrase = secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
    keyring_path = Path(keyring) if keyring else None
    unlocked = unlock_vault(directory, passphrase=passphrase, keyring_path=keyring_path)
    signer = log_note_signer(recorded.log_key, passphrase=passphrase)
    vault = assemble_vault(unlocked, host=True)
    log_to(vault)
    try:
        made = backup_sqlite(vault, Path(destination), signer=signer, keyring=keyring_path)
    finally:
        vault.close()
    manifest = made.manifest
    out.print(
        f"backup {manifest.backup_id.hex()} written to {shown(made.directory)}: "
        f"{manifest.record_total:,} records, an access log of {manifest.log_size:,} entries "
        f"signed at size {manifest.checkpoint_size():,}"
    )
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
def backup_verify(directory: str, log_key: str | None, no_keyring: bool) -> None:
    """Check a backup where it lies, without restoring it: the statement's signature,
    every file's size and SHA-256, the content digest and record count recomputed from
    the database copy, and the copied access log verified against the checkpoint the
    backup was made at. With the keyring passphrase (the backup's own keyring copy is
    opened), also the sealed manifest and its counts per record type. Exits non-zero,
    naming the first mismatch."""
    from custodes.backup.sqlite import verify_backup

    passphrase = (
        None if no_keyring else secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
    )
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
def restore(backup: str, vault_dir: str, key_dir: str, log_key: str | None) -> None:
    """Restore a backup into a new vault directory, its keys into a directory of their
    own. Everything is checked in a staging directory first (every file, the content
    digest, the log against the backup's checkpoint); a backup that does not verify
    leaves no vault and no key behind. The restore is on the restored vault's log."""
    from custodes.backup.sqlite import restore_sqlite

    passphrase = secret(settings.ENV_KEYRING_PASSPHRASE, "Keyring passphrase")
    restored = restore_sqlite(
        Path(backup), Path(vault_dir), keys=Path(key_dir), passphrase=passphrase, log_key=log_key
    )
    check = restored.check
    out.print(
        f"restored backup {check.backup_id} into {shown(restored.directory)}: "
        f"{check.records:,} records, an access log of {check.log_entries:,} entries "
        "(and this restore)"
    )
    out.print(shown(f"keyring: {restored.keyring}"))
    out.print(shown(f"log key: {restored.log_key}"))
