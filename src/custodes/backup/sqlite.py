"""The SQLite adapter of backups: copy a live vault with SQLite's online backup API, check
a copy without restoring it, and restore one into a new directory.

The order of the copies is what makes a backup restorable. The log's signer state is
copied first (the log copied later holds every entry it signed, so the restored vault
does not halt), then the records, then the log (every read of a copied record was logged
before it was answered, so before the log's copy: no acknowledged read goes missing, and
the checkpoint signed as the backup began is in the copy), then the keyring (a KEK added
meanwhile is in it; a keyring only grows). Each database is copied in one step of the
backup API: one consistent snapshot of that file, taken beside running writers.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from custodes.audit.checkpoint import (
    Checkpoint,
    NoteSigner,
    parse_note,
    signed_state_note,
)
from custodes.audit.verify import LogTampered, OutsideCheckpoint, verify_log
from custodes.backup.files import (
    DATABASE,
    LOG,
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
    sync_file,
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
    sealed_vault_id,
    sign_statement,
)
from custodes.crypto import KeyMaterial
from custodes.crypto.sealed_file import make_private_directory, write_new_file
from custodes.errors import ConfigurationError, CustodesError, StorageError
from custodes.settings import VaultLayout
from custodes.storage.base import LogAppend, Rebuild, fits_int64

if TYPE_CHECKING:
    from custodes.vault import Vault

__all__ = [
    "BackupCheck",
    "Restored",
    "SQLiteCopy",
    "backup_sqlite",
    "restore_keys",
    "restore_sqlite",
    "verify_backup",
]

BACKEND = "sqlite"


# -- backing up -------------------------------------------------------------------------------


def backup_sqlite(
    vault: Vault,
    destination: Path,
    *,
    signer: NoteSigner,
    keyring: Path | None = None,
    log_key: Path | None = None,
) -> BackupMade:
    """Back up a vault held in SQLite into `destination` (new or empty, never inside the
    vault directory), as its host operator: a logged act (`vault:backup:create`).

    `signer` is the log's key (`files.log_note_signer`), which signs the backup's
    statement; `keyring` and `log_key` are the key files to carry, if not where the
    vault records them. The directory appears only once the backup is whole.
    """
    if vault.directory is None:
        raise ConfigurationError("a vault held in memory has no files to back up")
    recorded = VaultLayout(vault.directory).read()
    keyring_path = Path(keyring) if keyring else recorded.keyring
    log_key_path = Path(log_key) if log_key else recorded.log_key
    if signer.verifier_key != vault.log_verifier_key:
        raise ConfigurationError("the signing key given is not this vault's log key")
    # Checked before the act, so that a refused destination costs no log entry; the
    # directory itself is made once the backup is authorised.
    destination = check_destination(destination, vault_directory=vault.directory)

    def make(source: BackupSource) -> BackupMade:
        staging = staging_directory(destination, vault_directory=source.directory)
        try:
            manifest = _write_backup(source, staging, keyring_path, log_key_path, signer)
            publish(staging, destination)
        except BaseException:
            discard(staging)
            raise
        return BackupMade(destination, manifest)

    return vault.backup(vault.operator, make)


def _write_backup(
    source: BackupSource, staging: Path, keyring: Path, log_key: Path, signer: NoteSigner
) -> Manifest:
    layout = VaultLayout(source.directory)
    if layout.read().database is not None:
        raise ConfigurationError(
            "this vault's records are in PostgreSQL: its backups are pgBackRest's, which "
            "custodes does not drive yet"
        )
    # The signer's state before the log, the keyring after the records (see the
    # module's docstring).
    copy_signer_files(staging, log_key)
    _copy_database(layout.database, staging / DATABASE)
    _copy_database(_log_file(layout.database), staging / LOG)
    copy_keyring(staging, keyring, source.material.vault_id)
    copy_erasures(staging, log_key)
    copy = SQLiteCopy(staging / DATABASE, staging / LOG)
    try:
        if copy.meta("vault_id") != source.material.vault_id:
            raise ConfigurationError("the vault database belongs to another vault")
        content = copy.content()
        log_size = copy.log_size()
    finally:
        copy.close()
    names = {tag: name for name, tag in source.type_tags.items()}
    manifest = Manifest(
        backup_id=os.urandom(16),
        vault_id=source.material.vault_id,
        created=int(source.created),
        backend=BACKEND,
        records=tuple(TypeCount(tag, names.get(tag), n) for tag, n in content.counts.items()),
        tokens=content.tokens,
        content_digest=content.digest,
        log_size=log_size,
        checkpoint=source.checkpoint,
        log_verifier_key=source.verifier_key,
        files=tuple(describe(path) for path in sorted(staging.iterdir())),
    )
    sealed = seal_manifest(manifest, source.material)
    write_new(staging / MANIFEST, sealed)
    write_new(staging / STATEMENT, sign_statement(BackupStatement.of(manifest, sealed), signer))
    return manifest


def _copy_database(source: Path, destination: Path) -> None:
    """One SQLite file copied by the online backup API in a single step: a consistent
    snapshot, taken while the vault's own connections go on reading and writing."""
    write_new(destination, b"")  # owner-only before SQLite fills it
    try:
        reader = sqlite3.connect(source, isolation_level=None)
        try:
            reader.execute("PRAGMA query_only=ON").fetchall()
            reader.execute("PRAGMA busy_timeout=10000").fetchall()
            target = sqlite3.connect(destination, isolation_level=None)
            try:
                reader.backup(target)
            finally:
                target.close()
        finally:
            reader.close()
        sync_file(destination)
    except sqlite3.Error as exc:
        raise StorageError(f"cannot copy {source.name}: {exc}") from exc
    except OSError as exc:
        raise StorageError(f"cannot copy {source.name}: {exc.strerror}") from None


def _log_file(database: Path) -> Path:
    # The access log's own file beside the records (custodes.storage.sqlite's naming).
    return database.with_name(database.name + "-log")


# -- a copy, read without restoring it -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Content:
    """What a database copy holds, counted and digested without any key."""

    counts: dict[str, int]  # stored type tag -> records
    tokens: int
    digest: bytes

    @property
    def records(self) -> int:
        return sum(self.counts.values())


class SQLiteCopy:
    """A vault's two SQLite files as copied (a backup, or a restore before it is opened),
    read only and as immutable: nothing is written beside them, not even a lock. Reads
    the access log for the verifier (the log's read side of the storage Protocol)."""

    def __init__(self, database: Path, log: Path) -> None:
        self._db = _open_immutable(database)
        try:
            self._log = _open_immutable(log)
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return "SQLiteCopy()"

    def close(self) -> None:
        self._db.close()
        self._log.close()

    def meta(self, key: str) -> bytes | None:
        row = self._query(self._db, "SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else _bytes(row[0])

    def content(self) -> Content:
        """Counts per stored type tag, token rows, and the ContentDigest."""
        digest = ContentDigest()
        counts: dict[str, int] = {}
        try:
            digest.section("records")
            for rid, rtype, payload, kek_version, wrapped in self._query(
                self._db,
                "SELECT r.record_id, r.record_type, r.payload, k.kek_version, k.wrapped"
                " FROM records AS r LEFT JOIN data_keys AS k ON k.seq = r.seq"
                " ORDER BY r.record_id",
            ):
                digest.record(rid, rtype, payload, kek_version, wrapped)
                counts[rtype] = counts.get(rtype, 0) + 1
            digest.section("tokens")
            # Both token trees of the storage's layout (its folded and fresh ones), or the
            # one table of a copy made before it: the same rows, in the same order.
            fresh = self._query(
                self._db, "SELECT 1 FROM sqlite_master WHERE name = 'tokens_fresh'"
            ).fetchone()
            rows = (
                "(SELECT index_id, token, seq FROM tokens"
                " UNION ALL SELECT index_id, token, seq FROM tokens_fresh)"
                if fresh is not None
                else "tokens"
            )
            for index_id, token, rid in self._query(
                self._db,
                f"SELECT t.index_id, t.token, r.record_id FROM {rows} AS t"  # noqa: S608 - fixed names
                " JOIN records AS r ON r.seq = t.seq ORDER BY 1, 2, 3",
            ):
                digest.token(index_id, token, rid)
            (tokens,) = self._query(self._db, f"SELECT count(*) FROM {rows}").fetchone()  # noqa: S608 - fixed names
            digest.section("meta")
            for key, value in self._query(self._db, "SELECT key, value FROM meta ORDER BY key"):
                digest.meta(key, value)
            digest.section("accounts")
            for row in self._query(
                self._db,
                "SELECT username, role, password_hash, attributes, created_at, disabled"
                " FROM accounts ORDER BY username",
            ):
                digest.account(*row)
        except (ConfigurationError, TypeError, ValueError):
            # Rows in the wrong order or of the wrong kind: written by hand, not by custodes.
            raise BackupTampered("the database copy holds rows custodes did not write") from None
        return Content(counts, int(tokens), digest.digest())

    # -- the log, read only ---------------------------------------------------------------

    def log_size(self) -> int:
        (last,) = self._query(self._log, "SELECT max(idx) FROM log_entries").fetchone()
        return 0 if last is None else int(last) + 1

    def log_entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        stop = self.log_size() if end is None else end
        return self._paged(
            "SELECT idx, entry FROM log_entries WHERE idx >= ? AND idx < ? ORDER BY idx",
            start,
            stop,
        )

    def log_node(self, level: int, index: int) -> bytes | None:
        row = self._query(
            self._log, "SELECT hash FROM log_nodes WHERE level = ? AND idx = ?", (level, index)
        ).fetchone()
        return None if row is None else _bytes(row[0])

    def log_nodes(self, positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        # A file on local disk: a point read a position costs no round trip.
        found = ((p, self.log_node(*p)) for p in positions if fits_int64(*p))
        return {p: node for p, node in found if node is not None}

    def log_subject_entries(self, commitment: bytes) -> list[int]:
        sql = "SELECT idx FROM log_subjects WHERE commitment = ? ORDER BY idx"
        return [int(i) for (i,) in self._query(self._log, sql, (commitment,))]

    def log_subject_rows(
        self, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        stop = 2**63 - 1 if end is None else end
        return self._paged(
            "SELECT idx, commitment FROM log_subjects WHERE idx >= ? AND idx < ?"
            " ORDER BY idx, commitment",
            start,
            stop,
        )

    def log_detail(self, index: int) -> bytes | None:
        row = self._query(
            self._log, "SELECT blob FROM log_details WHERE idx = ?", (index,)
        ).fetchone()
        return None if row is None or row[0] is None else _bytes(row[0])

    def log_detail_range(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        rows = self._query(
            self._log,
            "SELECT idx, blob FROM log_details WHERE idx >= ? AND idx < ?"
            " AND blob IS NOT NULL ORDER BY idx",
            (max(start, 0), min(end, 2**63 - 1)),
        )
        for index, blob in rows:
            yield int(index), _bytes(blob)

    def checkpoints(self) -> list[tuple[int, bytes]]:
        sql = "SELECT size, note FROM checkpoints ORDER BY size"
        return [(int(size), _bytes(note)) for size, note in self._query(self._log, sql)]

    def log_append(self, batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        raise StorageError("a copy of a vault is read only")

    def put_checkpoint(self, size: int, note: bytes) -> None:
        raise StorageError("a copy of a vault is read only")

    def _paged(self, sql: str, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        # One cursor streams the whole range: the copy is immutable, so nothing moves.
        for index, value in self._query(self._log, sql, (max(start, 0), stop)):
            yield int(index), _bytes(value)

    @staticmethod
    def _query(conn: sqlite3.Connection, sql: str, params: tuple[object, ...] = ()) -> Any:
        try:
            return conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise BackupTampered(f"the database copy cannot be read ({exc})") from None


def _open_immutable(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise BackupTampered(f"the copy lacks {path.name}")
    uri = f"file:{quote(str(path.absolute()))}?mode=ro&immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA temp_store=MEMORY").fetchall()  # sorts hold tokens: not on disk
        conn.execute("PRAGMA query_only=ON").fetchall()
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error as exc:
        raise BackupTampered(f"{path.name} is not a readable database ({exc})") from None
    return conn


def _bytes(value: object) -> bytes:
    # A row written by hand may hold text where a blob belongs.
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise BackupTampered("the database copy holds rows custodes did not write")


# -- verifying ----------------------------------------------------------------------------------


def verify_backup(
    directory: Path,
    *,
    passphrase: str | None = None,
    material: KeyMaterial | None = None,
    log_key: str | None = None,
) -> BackupCheck:
    """Check a backup where it lies, without restoring it; BackupTampered (a
    TamperDetected) names the first mismatch.

    With the log's published key alone (`log_key`): the statement's signature, every
    file's size and SHA-256, the content digest and record count recomputed from the
    database copy, and the copied access log verified entry by entry against the
    checkpoint signed as the backup began and the signer state it carries. With the
    keyring (the backup's own copy, opened with `passphrase`, or `material`): also the
    sealed manifest and its counts per record type.
    """
    signed = read_signed(Path(directory), log_key)
    manifest = None
    if material is not None or passphrase is not None:
        if material is None:
            material = backup_material(Path(directory), signed, passphrase)
        manifest = open_agreeing(signed, material)
    return _check_database(Path(directory), Path(directory), signed, manifest)


def _check_database(
    data: Path, keys: Path, signed: Signed, manifest: Manifest | None
) -> BackupCheck:
    """Hold the database and log files in `data` (a backup, or a restore's staging
    directory) against the statement, the manifest if opened, and the signer state
    carried in `keys` (the backup)."""
    statement = signed.statement
    if statement.backend != BACKEND:
        raise ConfigurationError(f"this is a {statement.backend} backup, not a SQLite one")
    try:
        state_note = signed_state_note(keys / LOG_KEY)
    except CustodesError:
        raise BackupTampered("the backup's log signer state is damaged") from None
    copy = SQLiteCopy(data / DATABASE, data / LOG)
    try:
        if copy.meta("log_verifier_key") != signed.verifier_key.encode():
            raise BackupTampered("the database copy names another log key")
        if manifest is not None and copy.meta("vault_id") != manifest.vault_id:
            raise BackupTampered("the database copy is of another vault")
        content = copy.content()
        if content.digest != statement.content_digest or content.records != statement.records:
            raise BackupTampered(
                "the database copy's content is not the one the backup vouches for"
            )
        if manifest is not None and (
            content.counts != {c.tag: c.count for c in manifest.records}
            or content.tokens != manifest.tokens
        ):
            raise BackupTampered("the database copy's counts are not the manifest's")
        checkpoint = _checkpoint_note(copy, statement, manifest)
        try:
            report = verify_log(
                copy,
                signed.verifier_key,
                origin=statement.origin,
                outside=[
                    OutsideCheckpoint("the backup's manifest", checkpoint),
                    OutsideCheckpoint("the log signer state in the backup", state_note),
                ],
            )
        except LogTampered as exc:
            raise BackupTampered(f"the backed-up access log does not verify: {exc}") from None
        if report.entries != statement.log_size:
            raise BackupTampered(
                f"the backed-up access log holds {report.entries} entries, the manifest "
                f"{statement.log_size}"
            )
    finally:
        copy.close()
    return BackupCheck(
        backup_id=statement.backup_id.hex(),
        created=statement.created,
        backend=statement.backend,
        records=content.records,
        log_entries=report.entries,
        checkpoint_size=statement.checkpoint_size,
        files=len(statement.files),
        counts=manifest.counts() if manifest is not None else None,
        notes=signed.notes,
    )


def _checkpoint_note(
    copy: SQLiteCopy, statement: BackupStatement, manifest: Manifest | None
) -> bytes:
    """The checkpoint the backup is held against: the manifest's, or without the keyring
    the copy's own stored note of the size and root the statement signs."""
    if manifest is not None:
        note = manifest.checkpoint
    else:
        stored = dict(copy.checkpoints())
        if statement.checkpoint_size not in stored:
            raise BackupTampered("the backed-up log lacks the checkpoint the backup was made at")
        note = stored[statement.checkpoint_size]
    try:
        cp = Checkpoint.parse_body(parse_note(note)[0])
    except CustodesError:
        raise BackupTampered("the backup's checkpoint is malformed") from None
    if (cp.size, cp.root) != (statement.checkpoint_size, statement.checkpoint_root):
        raise BackupTampered("the backup's checkpoint is not the one its statement signs")
    return note


# -- restoring ---------------------------------------------------------------------------------


def restore_sqlite(
    backup: Path,
    target: Path,
    *,
    keys: Path,
    passphrase: str,
    log_key: str | None = None,
    erasures: Path | None = None,
) -> Restored:
    """Restore a SQLite backup into `target` (new or empty), its keys into `keys` (outside
    it; no key file there is ever replaced), and only then let it be opened.

    The database and log are copied into a staging directory beside `target` and checked
    there (every byte against the manifest, the content digest recomputed, the log
    verified against the backup's checkpoint and signer state); the keys are written, the
    restore is put on the restored vault's own access log (`vault:backup:restore`), and
    the directory is renamed to `target`. Anything that fails leaves no vault at
    `target` and no key written: a restore that does not verify never serves.
    `erasures` is the vault's current erasure ledger (kept with its keys): the restored
    vault erases again every record it names before it opens, so a backup taken before
    an erasure does not bring the person back.
    """
    backup, target, keys = Path(backup), Path(target).absolute(), Path(keys).absolute()
    check_restore_places(backup, target, keys)
    signed = read_signed(backup, log_key)
    manifest = open_agreeing(signed, backup_material(backup, signed, passphrase))
    placed = PlacedKeys.under(keys, manifest)
    placed.refuse_present(keys)
    staging = staging_directory(target, vault_directory=None)
    written: list[Path] = []
    try:
        for name in (DATABASE, LOG):
            _copy_listed(backup, staging, manifest, name)
        check = _check_database(staging, backup, signed, manifest)
        VaultLayout(staging).write(manifest.vault_id, placed.keyring, placed.log_key)
        place_keys(backup, manifest, placed, written)
        take_later_erasures(placed, erasures, manifest, written)
        record_restore(staging, passphrase, restore_detail(manifest, "vault"))
        publish(staging, target)
    except BaseException:
        discard(staging)
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return Restored(target, placed.keyring, placed.log_key, check)


def restore_keys(
    backup: Path, vault: Path, *, passphrase: str, log_key: str | None = None
) -> list[str]:
    """Put back the key files a vault lost (its keyring, its log signing key, the signer's
    state or its record of losses) from a backup of that vault, where the vault records
    them; return their backup names. Files still there are never replaced.

    The backup is checked first (its signature, every file, the sealed manifest); the
    vault must then open with the keys put back, and the restore goes on its access log,
    or the files are removed again. A signer state from a backup knows the checkpoints
    signed up to the backup only: witnesses and the checkpoints stored in the log hold
    the later ones.
    """
    backup, vault = Path(backup), Path(vault)
    recorded = VaultLayout(vault).read()
    signed = read_signed(backup, log_key)
    if sealed_vault_id(signed.sealed) != recorded.vault_id:
        raise ConfigurationError("the backup is of another vault")
    manifest = open_agreeing(signed, backup_material(backup, signed, passphrase))
    placed = PlacedKeys(recorded.keyring, recorded.log_key).paths()
    missing = [name for name, path in placed.items() if manifest.file(name) and not path.exists()]
    if not missing:
        raise ConfigurationError("every key file of the vault is in place: nothing to restore")
    written: list[Path] = []
    try:
        for name in missing:
            listed = manifest.file(name)
            assert listed is not None
            path = placed[name]
            make_private_directory(path.parent, what="key directory")
            write_new_file(path, read_checked(backup, listed), what="key file")
            written.append(path)
        record_restore(vault, passphrase, restore_detail(manifest, "keys", files=missing))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return missing


def _copy_listed(backup: Path, staging: Path, manifest: Manifest, name: str) -> None:
    """Copy one file of the backup, hashing what is written: the staged copy, not only the
    backup, is held against the manifest."""
    listed = manifest.file(name)
    if listed is None:
        raise BackupTampered(f"the backup's manifest lists no {name}")
    digest, size = hashlib.sha256(), 0
    try:
        fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out, (backup / name).open("rb") as source:
            while chunk := source.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise StorageError(f"cannot copy {name}: {exc.strerror}") from None
    if size != listed.size or digest.digest() != listed.sha256:
        raise BackupTampered(f"the backup's file {name} is not the one its manifest lists")
