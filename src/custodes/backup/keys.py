"""The key files every backup carries, whatever its backend: copied sealed into the
backup in the order that keeps it restorable, opened with the backup's own keyring to
read its manifest, placed back outside the restored vault, and the restore put on the
restored vault's own log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from custodes.audit.erasures import erasures_path, extends
from custodes.backup.files import (
    KEYRING,
    LOG_KEY,
    LOG_KEY_ERASURES,
    LOG_KEY_LOSSES,
    LOG_KEY_STATE,
    Signed,
    copy_sealed_file,
    read_checked,
    signer_losses_path,
    signer_state_path,
)
from custodes.backup.manifest import (
    BackupTampered,
    Manifest,
    open_manifest,
    sealed_vault_id,
)
from custodes.crypto import KeyMaterial, Keyring
from custodes.crypto.sealed_file import make_private_directory, write_new_file
from custodes.errors import ConfigurationError
from custodes.settings import default_log_key_path

__all__ = [
    "PlacedKeys",
    "backup_material",
    "copy_erasures",
    "copy_keyring",
    "copy_signer_files",
    "open_agreeing",
    "place_keys",
    "record_restore",
    "restore_detail",
    "take_later_erasures",
]


def copy_signer_files(staging: Path, log_key: Path) -> None:
    """The log's signing key and its signer's state, then its record of losses (a loss is
    recorded before the state moves past it). Copied before the log, so that the log in
    the backup holds every checkpoint the state knows and the restored vault does not
    halt."""
    copy_sealed_file(log_key, staging / LOG_KEY, what="log signing key")
    copy_sealed_file(signer_state_path(log_key), staging / LOG_KEY_STATE, what="log signer state")
    if signer_losses_path(log_key).exists():
        copy_sealed_file(
            signer_losses_path(log_key), staging / LOG_KEY_LOSSES, what="log signer's losses"
        )


def copy_erasures(staging: Path, log_key: Path) -> None:
    """The erasure ledger, if any record was ever erased, copied after the records: a
    restore applies it again, so a record erased while the copy ran stays erased."""
    if erasures_path(log_key).exists():
        copy_sealed_file(erasures_path(log_key), staging / LOG_KEY_ERASURES, what="erasure ledger")


def copy_keyring(staging: Path, keyring: Path, vault_id: bytes) -> None:
    """The keyring, copied after the records (a KEK added meanwhile is in it: a keyring
    only grows), and refused if it is another vault's."""
    copy_sealed_file(keyring, staging / KEYRING, what="keyring")
    if _keyring_vault_id(staging / KEYRING) != vault_id:
        raise ConfigurationError("the keyring given is another vault's: the backup would not open")


def _keyring_vault_id(path: Path) -> bytes | None:
    """The vault id a keyring file names in its header (read without the passphrase)."""
    try:
        return bytes.fromhex(json.loads(path.read_bytes())["vault_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def backup_material(directory: Path, signed: Signed, passphrase: str | None) -> KeyMaterial:
    """The vault's keys, from the keyring copy the backup carries."""
    if passphrase is None:
        raise ConfigurationError("the keyring passphrase is needed to open the manifest")
    keyring = Keyring.open(
        directory / KEYRING, passphrase=passphrase, vault_id=sealed_vault_id(signed.sealed)
    )
    return keyring.material


def open_agreeing(signed: Signed, material: KeyMaterial) -> Manifest:
    """The sealed manifest, opened, if the signed statement is the one it calls for."""
    manifest = open_manifest(signed.sealed, material)
    if not signed.statement.agrees_with(manifest, signed.sealed):
        raise BackupTampered("the backup's signed statement and its sealed manifest disagree")
    if manifest.log_verifier_key != signed.verifier_key:
        raise BackupTampered("the backup's manifest names another log key")
    return manifest


@dataclass(frozen=True, slots=True)
class PlacedKeys:
    """Where a restore puts the vault's key files: named by the vault id, in a directory
    of their own."""

    keyring: Path
    log_key: Path

    @classmethod
    def under(cls, keys: Path, manifest: Manifest) -> PlacedKeys:
        vault_id = manifest.vault_id.hex()
        return cls(keys / f"{vault_id}.keyring", keys / f"{vault_id}.key")

    def paths(self) -> dict[str, Path]:
        """The backup's name of each key file -> where it goes."""
        return {
            KEYRING: self.keyring,
            LOG_KEY: self.log_key,
            LOG_KEY_STATE: signer_state_path(self.log_key),
            LOG_KEY_LOSSES: signer_losses_path(self.log_key),
            LOG_KEY_ERASURES: erasures_path(self.log_key),
        }

    def refuse_present(self, keys: Path) -> None:
        if any(path.exists() for path in self.paths().values()):
            raise ConfigurationError(
                f"a key file of this vault is already in {keys}: a restore never replaces a key"
            )


def place_keys(backup: Path, manifest: Manifest, placed: PlacedKeys, written: list[Path]) -> None:
    """Write the backup's key files where `placed` says, each held against the manifest;
    every file written is appended to `written`, for the caller to remove on failure."""
    make_private_directory(placed.keyring.parent, what="key directory")
    for name, path in placed.paths().items():
        listed = manifest.file(name)
        if listed is None:
            continue  # no losses were ever acknowledged
        write_new_file(path, read_checked(backup, listed), what="key file")
        written.append(path)


def take_later_erasures(
    placed: PlacedKeys, later: Path | None, manifest: Manifest, written: list[Path]
) -> int:
    """Put the vault's current erasure ledger (`later`, kept with its keys) in place of the
    backup's older copy, so that the restored vault erases again every record erased
    since the backup; how many statements it holds. Refused unless it is this vault's,
    every statement signed and chained, and holds the backup's copy whole
    (ErasureLedgerBroken, ConfigurationError). Without `later`, the ledger kept beside
    the vault's log key in its default place is taken, if there is one."""
    from custodes.audit.erasures import read_erasures

    target = erasures_path(placed.log_key)
    vkey = manifest.log_verifier_key
    if later is None:
        # Not named: the ledger beside the vault's log key where keys are kept by default
        # (the key directory that outlived the vault's), if there is one.
        kept = erasures_path(default_log_key_path(manifest.vault_id))
        if not kept.is_file() or kept == target:
            return len(read_erasures(target, vkey))
        later = kept
    later = Path(later)
    if not later.is_file():
        raise ConfigurationError("the erasure ledger given is not a file")
    if not extends(later, target, vkey):
        raise ConfigurationError(
            "the erasure ledger given does not hold every erasure the backup's copy holds"
        )
    data = later.read_bytes()
    if target in written:
        target.unlink()
        written.remove(target)
    write_new_file(target, data, what="key file")
    written.append(target)
    return len(read_erasures(target, vkey))


def restore_detail(manifest: Manifest, scope: str, **more: Any) -> dict[str, Any]:
    """What the restored vault's log says of a restore: ids and counts, never a value."""
    return {
        "scope": scope,
        "backup_id": manifest.backup_id.hex(),
        "backup_created": manifest.created,
        "records": manifest.record_total,
        "log_size": manifest.log_size,
        "checkpoint_size": manifest.checkpoint_size(),
        **more,
    }


def record_restore(directory: Path, passphrase: str, detail: Mapping[str, Any]) -> None:
    """Open the restored vault with its keys, as its host operator, and log the restore
    on its own access log, signed at once."""
    from custodes.bootstrap import open_vault

    vault = open_vault(directory, passphrase=passphrase)
    try:
        vault.record_restore(vault.operator, detail)
    finally:
        vault.close()
