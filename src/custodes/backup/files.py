"""The backup directory, whatever the backend: owner-only, never inside the vault, made
beside its final place and moved there whole; the sealed key files every backup carries;
and a backup's signed statement and files read back and checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from custodes.audit.checkpoint import (
    SIG_ED25519,
    NoteSigner,
    read_signing_key,
    signed_state,
)
from custodes.backup.manifest import (
    BackupFile,
    BackupStatement,
    BackupTampered,
    read_statement,
)
from custodes.errors import ConfigurationError, CustodesError, KeyringError, StorageError
from custodes.settings import is_within

__all__ = [
    "DATABASE",
    "KEYRING",
    "LOG",
    "LOG_KEY",
    "LOG_KEY_ERASURES",
    "LOG_KEY_LOSSES",
    "LOG_KEY_STATE",
    "MANIFEST",
    "STATEMENT",
    "Signed",
    "check_destination",
    "check_files",
    "check_restore_places",
    "copy_sealed_file",
    "describe",
    "discard",
    "log_note_signer",
    "publish",
    "read_checked",
    "read_signed",
    "signer_losses_path",
    "signer_state_path",
    "staging_directory",
    "sync_file",
    "write_new",
]

# The backup directory's files. The database and log keep the vault directory's names;
# the key files are the sealed files as they were, under names of their own.
DATABASE = "vault.db"
LOG = "vault.db-log"
KEYRING = "keyring"
LOG_KEY = "log.key"
LOG_KEY_STATE = "log.key.state"  # the last checkpoint the log's key signed
LOG_KEY_LOSSES = "log.key.losses"  # the losses of the log the operator acknowledged
LOG_KEY_ERASURES = "log.key.erasures"  # the erasure ledger (custodes.audit.erasures)
MANIFEST = "manifest.sealed"
STATEMENT = "manifest.note"
_CHUNK = 1 << 20


def signer_state_path(log_key: Path) -> Path:
    """The log signer's state file beside its key (custodes.audit.checkpoint's naming)."""
    return log_key.with_name(log_key.name + ".state")


def signer_losses_path(log_key: Path) -> Path:
    """The log signer's record of acknowledged losses beside its key."""
    return log_key.with_name(log_key.name + ".losses")


def log_note_signer(log_key: Path, *, passphrase: str) -> NoteSigner:
    """The log's key, unsealed, as the signer of a backup's statement."""
    name, vkey, private_key = read_signing_key(
        Path(log_key), purpose="log", sig_type=SIG_ED25519, passphrase=passphrase
    )
    signer = NoteSigner(name, private_key)
    if signer.verifier_key != vkey:
        raise KeyringError("damaged key file: the key does not match its header")
    return signer


# -- writing a backup directory ------------------------------------------------------------


def check_destination(destination: Path, *, vault_directory: Path | None) -> Path:
    """The absolute destination of a backup or a restore, if it may be written: refused
    if it exists and is not an empty directory, or lies inside (or holds) the vault
    directory: a backup beside the data is wiped with it."""
    destination = Path(destination).absolute()
    if vault_directory is not None and (
        is_within(destination, vault_directory) or is_within(vault_directory, destination)
    ):
        raise ConfigurationError(
            "a backup never goes inside the vault directory: whatever wipes the vault "
            "would take its backup too"
        )
    if destination.is_symlink() or (
        destination.exists() and (not destination.is_dir() or any(destination.iterdir()))
    ):
        raise ConfigurationError(f"{destination} exists and is not an empty directory")
    return destination


def check_restore_places(backup: Path, target: Path, keys: Path) -> None:
    """Where a restore may write (absolute paths): a new or empty vault directory, keys
    outside it, and both apart from the backup."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigurationError(
            "the directory to restore into exists and is not empty: a restore never writes "
            "over a vault"
        )
    if is_within(keys, target):
        raise ConfigurationError(
            "keys must live outside the vault directory: keys are never kept beside the "
            "data they protect"
        )
    if is_within(target, backup) or is_within(backup, target) or is_within(keys, backup):
        raise ConfigurationError("restore into directories apart from the backup")


def staging_directory(destination: Path, *, vault_directory: Path | None) -> Path:
    """A new owner-only directory beside `destination` (checked by check_destination),
    where a backup or a restore is written before it is moved into place: an interrupted
    one leaves nothing at the name the operator gave."""
    destination = check_destination(destination, vault_directory=vault_directory)
    try:
        destination.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = destination.with_name(f".{destination.name}.{secrets.token_hex(6)}.partial")
        staging.mkdir(mode=0o700)
        os.chmod(staging, 0o700)  # whatever the umask
    except OSError as exc:
        raise StorageError(
            f"cannot create a directory beside {destination}: {exc.strerror}"
        ) from None
    return staging


def write_new(path: Path, data: bytes) -> None:
    """A new 0600 file, written and synced; never over another."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot create {path.name}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        raise StorageError(f"cannot write {path.name}: {exc.strerror}") from None
    finally:
        os.close(fd)


def copy_sealed_file(source: Path, destination: Path, *, what: str) -> None:
    """Copy a sealed key file as it is (still sealed with the passphrase)."""
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"the {what} is not where the vault records it") from None
    except OSError as exc:
        raise StorageError(f"cannot read the {what}: {exc.strerror}") from None
    write_new(destination, data)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging: Path, destination: Path) -> None:
    """Move a finished staging directory to its name, durably: the rename is the moment
    the backup (or the restored vault) exists."""
    destination = Path(destination).absolute()
    try:
        sync_file(staging)
        # rename(2) takes the place of an empty directory, and fails on anything else.
        os.rename(staging, destination)
        sync_file(destination.parent)
    except OSError as exc:
        raise StorageError(
            f"cannot move the finished directory into place: {exc.strerror}"
        ) from None


def discard(staging: Path) -> None:
    """Remove an unfinished staging directory."""
    shutil.rmtree(staging, ignore_errors=True)


# -- reading a backup directory back ---------------------------------------------------------


def describe(path: Path) -> BackupFile:
    """A file's name, size and SHA-256, streamed."""
    digest = hashlib.sha256()
    size = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise StorageError(f"cannot read {path.name}: {exc.strerror}") from None
    return BackupFile(path.name, size, digest.digest())


def read_checked(directory: Path, listed: BackupFile) -> bytes:
    """A small file of a backup, read once and held against its listing."""
    try:
        data = (directory / listed.name).read_bytes()
    except OSError:
        raise BackupTampered(f"the backup's file {listed.name} cannot be read") from None
    if len(data) != listed.size or hashlib.sha256(data).digest() != listed.sha256:
        raise BackupTampered(f"the backup's file {listed.name} is not the one its manifest lists")
    return data


@dataclass(frozen=True, slots=True)
class Signed:
    """A backup directory whose statement verified and whose files are the ones listed."""

    statement: BackupStatement
    sealed: bytes  # the manifest.sealed file, its digest the statement's
    verifier_key: str
    notes: tuple[str, ...]


def read_signed(directory: Path, log_key: str | None) -> Signed:
    """Check a backup directory with the log's public key alone: the statement's
    signature, the sealed manifest's digest, and every file (present, regular, of the
    size and SHA-256 listed; nothing unlisted). `log_key` is the published key; without
    it the key in the backup's own key file is used, which a forger would have replaced
    (said in the notes). BackupTampered at the first mismatch."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigurationError(f"{directory} is not a backup directory")
    notes: list[str] = []
    try:
        carried, _ = signed_state(directory / LOG_KEY)
    except CustodesError:
        raise BackupTampered(
            "the backup's log key or the signer state beside it is missing or damaged"
        ) from None
    if log_key is None:
        log_key = carried
        notes.append(
            "checked against the log key the backup carries; pass the published log key "
            "to rule out a backup forged whole"
        )
    elif log_key.strip() != carried:
        raise BackupTampered("the backup's log key is not the one given")
    try:
        note = (directory / STATEMENT).read_bytes()
        sealed = (directory / MANIFEST).read_bytes()
    except OSError:
        raise BackupTampered("the backup's manifest or its signed statement is missing") from None
    statement = read_statement(note, carried)
    if hashlib.sha256(sealed).digest() != statement.sealed_digest:
        raise BackupTampered("the backup's sealed manifest is not the one its statement signs")
    check_files(directory, statement.files)
    return Signed(statement, sealed, carried, tuple(notes))


def check_files(directory: Path, listed: Sequence[BackupFile]) -> None:
    """Every listed file present, regular, of its size and SHA-256; no other file but the
    manifest and its statement."""
    expected = {f.name for f in listed} | {MANIFEST, STATEMENT}
    present = {p.name for p in directory.iterdir()}
    missing = sorted(expected - present)
    if missing:
        raise BackupTampered(f"the backup lacks {', '.join(missing)}")
    unlisted = len(present - expected)
    if unlisted:
        raise BackupTampered(f"the backup holds {unlisted} file(s) its manifest does not list")
    for item in listed:
        path = directory / item.name
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(path.lstat().st_mode):
                raise BackupTampered(f"the backup's {item.name} is not a regular file")
        if describe(path) != item:
            raise BackupTampered(
                f"the backup's file {item.name} is not the one its manifest lists "
                "(its size or SHA-256 differs)"
            )
