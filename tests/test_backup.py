"""Threat 5: a wipe-and-ransom bot deletes the vault and leaves a ransom note.

A backup (the vault's two SQLite files and its sealed keys, a manifest sealed under the
keyring and a statement signed by the log's key) must restore everything it holds,
checked before the restored vault serves; a tampered backup must fail its check where it
lies; a lost keyring or log signer state must come back from it; and the backup itself
must hold nothing a thief could read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sqlite3
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from custodes.audit.checkpoint import Checkpoint, MalformedNote, parse_note
from custodes.audit.verify import OutsideCheckpoint
from custodes.backup.files import describe, log_note_signer, signer_state_path
from custodes.backup.manifest import (
    BackupMade,
    BackupStatement,
    BackupTampered,
    Manifest,
    open_manifest,
    read_statement,
    seal_manifest,
    sign_statement,
)
from custodes.backup.sqlite import (
    SQLiteCopy,
    backup_sqlite,
    restore_keys,
    restore_sqlite,
    verify_backup,
)
from custodes.bootstrap import open_vault, verify_log_files
from custodes.crypto import Keyring
from custodes.errors import AccessDenied, ConfigurationError, KeyringError, TamperDetected
from custodes.policy import AccessPurpose, Action, Role
from custodes.settings import VaultLayout
from custodes.synth import write_jsonl
from custodes.vault import Session, Vault
from tests.conftest import (
    FAST_HASH,
    PASSPHRASE,
    PASSWORD,
    PURPOSE,
    TOTP_SECRETS,
    login,
    make_vault,
    totp_now,
)
from tests.test_cli_client import run
from tests.test_stolen_disk import personal_values, scan_bytes

AUDIT = AccessPurpose("review of backups and restores")
RANSOM_NOTE = (
    "All your records have been downloaded and deleted. To recover them send 10 BTC to "
    "the address below and write to the mail address within 48 hours."
)


@dataclasses.dataclass
class Population:
    vault: Vault
    records: list[dict[str, Any]]
    people: list[dict[str, Any]]

    @property
    def directory(self) -> Path:
        assert self.vault.directory is not None
        return self.vault.directory


def populated(tmp: Path, count: int = 300) -> Population:
    """A SQLite vault holding a synthetic population, ingested as the operator would."""
    vault = make_vault(tmp, "sqlite")
    source = tmp / "population.jsonl"
    with source.open("wb") as f:
        write_jsonl(f, count, seed=20220701)
    records = [orjson.loads(line) for line in source.read_bytes().splitlines()]
    report = vault.ingest(vault.operator, source)
    assert report.accepted == len(records) and report.rejected == 0
    people = [r for r in records if r["type"] == "person"]
    return Population(vault, records, people)


def search(vault: Vault, session: Session, person: dict[str, Any]) -> int:
    found = vault.search(
        session,
        PURPOSE,
        record_type="person",
        index="national_id",
        values={"national_id": str(person["national_id"])},
    )
    return len(found)


def back_up(vault: Vault, destination: Path) -> BackupMade:
    assert vault.directory is not None
    signer = log_note_signer(VaultLayout(vault.directory).read().log_key, passphrase=PASSPHRASE)
    return backup_sqlite(vault, destination, signer=signer)


def stored_rows(database: Path) -> dict[str, str]:
    """Each stored record's id -> a digest of its sealed payload and wrapped key."""
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT r.record_id, r.payload, k.wrapped FROM records AS r"
            " JOIN data_keys AS k ON k.seq = r.seq"
        ).fetchall()
    return {rid: hashlib.sha256(payload + wrapped).hexdigest() for rid, payload, wrapped in rows}


def log_actions(vault: Vault, auditor: Session, prefix: str) -> list[dict[str, Any]]:
    return [
        {"action": e.action, "outcome": e.outcome.value, "actor": e.actor, **e.detail}
        for _, e in vault.read_log(auditor, AUDIT, action=prefix)
    ]


def relogin(vault: Vault, username: str) -> Session:
    """A session for an account the vault already holds (restored with it)."""
    return vault.login(username, PASSWORD, totp=totp_now(vault, TOTP_SECRETS[username]))


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def file_digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


@pytest.fixture
def population(tmp_path: Path) -> Iterator[Population]:
    held = populated(tmp_path)
    yield held
    held.vault.close()


# -- the drill ---------------------------------------------------------------------------


def test_a_wiped_vault_directory_is_restored_whole_from_the_backup(tmp_path: Path) -> None:
    held = populated(tmp_path, count=400)
    vault, people = held.vault, held.people
    officer = login(vault, Role.SUPERVISOR, "li.jing")
    auditor = login(vault, Role.AUDITOR, "wu.min")
    assert all(search(vault, officer, person) == 1 for person in people[:3])
    log_key = vault.log_verifier_key
    made = back_up(vault, tmp_path / "offsite" / "monday")
    backed_up = stored_rows(held.directory / "vault.db")
    assert len(backed_up) == len(held.records)
    # Reads after the backup: the backup cannot hold them.
    assert all(search(vault, officer, person) == 1 for person in people[3:6])
    assert [e["backup_id"] for e in log_actions(vault, auditor, Action.BACKUP_CREATE)] == [
        made.manifest.backup_id.hex()
    ]
    vault.close()

    # The bot wipes the vault directory and leaves its note in its place.
    shutil.rmtree(held.directory)
    held.directory.mkdir()
    (held.directory / "README_TO_RECOVER").write_text(RANSOM_NOTE)
    with pytest.raises(ConfigurationError):
        open_vault(held.directory, passphrase=PASSPHRASE)

    restored = restore_sqlite(
        made.directory,
        tmp_path / "vault-restored",
        keys=tmp_path / "keys-restored",
        passphrase=PASSPHRASE,
        log_key=log_key,
    )
    manifest = made.manifest
    assert restored.check.records == manifest.record_total == len(held.records)
    by_type = Counter(str(r["type"]) for r in held.records)
    assert restored.check.counts == manifest.counts() == by_type

    # Every record of the backup is back, sealed payload and wrapped key byte for byte,
    # and the content is the one the manifest vouches for.
    assert stored_rows(restored.directory / "vault.db") == backed_up
    with closing(
        SQLiteCopy(restored.directory / "vault.db", restored.directory / "vault.db-log")
    ) as copy:
        content = copy.content()
    assert content.digest == manifest.content_digest
    assert content.counts == {c.tag: c.count for c in manifest.records}

    # The restored log holds every entry up to the backup, held against the checkpoint
    # signed as the backup began, and the restore itself.
    report = verify_log_files(
        restored.directory,
        log_key=log_key,
        outside=[OutsideCheckpoint("the backup's manifest", manifest.checkpoint)],
    )
    assert report.entries == manifest.log_size + 1
    assert manifest.checkpoint_size() <= manifest.log_size

    reopened = open_vault(restored.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        officer = relogin(reopened, "li.jing")
        assert search(reopened, officer, people[0]) == 1
        assert reopened.count() == len(held.records)
        auditor = relogin(reopened, "wu.min")
        searches = log_actions(reopened, auditor, Action.SEARCH)
        assert len(searches) == 4  # three before the backup and the one just made
        [restore] = log_actions(reopened, auditor, Action.BACKUP_RESTORE)
        assert restore["outcome"] == "granted" and restore["actor"] == "operator"
        assert restore["backup_id"] == manifest.backup_id.hex()
        assert restore["checkpoint_size"] == manifest.checkpoint_size()
    finally:
        reopened.close()
    # Nothing was left beside the restored vault: no staging directory, no stray key (the
    # signer's lock file aside).
    restored_keys = {p.name for p in (tmp_path / "keys-restored").iterdir()}
    assert {n for n in restored_keys if not n.endswith(".lock")} == {
        restored.keyring.name,
        restored.log_key.name,
        signer_state_path(restored.log_key).name,
    }
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_a_backup_taken_while_officials_search_and_the_log_is_signed_restores_and_opens(
    tmp_path: Path,
) -> None:
    """The copies' order: the signer's state before the log, the records before the log.
    A state copied after the log could name a checkpoint the log copy lacks, and the
    restored vault would refuse to open."""
    held = populated(tmp_path, count=100)
    vault = held.vault
    officer = login(vault, Role.SUPERVISOR, "zhao.lei")
    vault.keep_signing(0.005)
    stop = threading.Event()
    answered: list[int] = []

    def keep_searching() -> None:
        while not stop.is_set():
            answered.append(search(vault, officer, held.people[len(answered) % 20]))

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        made = back_up(vault, tmp_path / "backup")
    finally:
        stop.set()
        searcher.join()
    vault.close()
    assert answered and all(n == 1 for n in answered)
    verify_backup(made.directory, passphrase=PASSPHRASE, log_key=vault.log_verifier_key)
    restored = restore_sqlite(
        made.directory, tmp_path / "restored", keys=tmp_path / "keys2", passphrase=PASSPHRASE
    )
    reopened = open_vault(restored.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        assert reopened.count() == len(held.records)
        reopened.checkpoint(reopened.operator)  # the restored signer signs on from the copy
    finally:
        reopened.close()


# -- tampering ----------------------------------------------------------------------------


def test_a_tampered_backup_fails_verification_without_restoring(
    population: Population, tmp_path: Path
) -> None:
    vault = population.vault
    log_key = vault.log_verifier_key
    made = back_up(vault, tmp_path / "backup")
    check = verify_backup(made.directory, passphrase=PASSPHRASE, log_key=log_key)
    assert check.records == len(population.records) and check.counts is not None
    before = file_digests(made.directory)
    assert verify_backup(made.directory, log_key=log_key).counts is None  # with the key alone
    # A check reads the backup and writes nothing beside it, not even a lock file.
    assert file_digests(made.directory) == before

    def remove(name: str) -> Callable[[Path], None]:
        return lambda directory: (directory / name).unlink()

    def flip(name: str, at: float = 0.5) -> Callable[[Path], None]:
        return lambda directory: flip_byte(directory / name, at)

    def plant(directory: Path) -> None:
        (directory / "README_TO_RECOVER").write_text(RANSOM_NOTE)

    tampering: dict[str, Callable[[Path], None]] = {
        "a byte of the database copy": flip("vault.db"),
        "the database copy's last byte": flip("vault.db", 0.9999),
        "a byte of the access log copy": flip("vault.db-log"),
        "a byte of the sealed manifest": flip("manifest.sealed"),
        "a byte of the signed statement": flip("manifest.note", 0.3),
        "a byte of the keyring copy": flip("keyring"),
        "a byte of the signer state copy": flip("log.key.state"),
        "the access log copy dropped": remove("vault.db-log"),
        "the keyring copy dropped": remove("keyring"),
        "the signed statement dropped": remove("manifest.note"),
        "a ransom note planted": plant,
    }
    for what, tamper in tampering.items():
        copy = tmp_path / "tampered" / what.replace(" ", "-")
        shutil.copytree(made.directory, copy)
        tamper(copy)
        for keys in ({"passphrase": PASSPHRASE}, {}):
            with pytest.raises(TamperDetected):
                verify_backup(copy, log_key=log_key, **keys)
            assert not (tmp_path / "restored").exists(), what
    # A backup signed by another log's key is not this vault's, however well formed.
    other = make_vault(tmp_path / "other", "sqlite")
    try:
        with pytest.raises(BackupTampered):
            verify_backup(made.directory, log_key=other.log_verifier_key)
    finally:
        other.close()
    assert file_digests(made.directory) == before


def forge(backup: Path, log_key_file: Path, edit: Callable[[Path], None]) -> Path:
    """What an insider holding the keyring passphrase could make: a backup whose database
    or log was edited, with a manifest resealed and re-signed over the new files, the
    content digest and checkpoint left as they were."""
    forged = backup.with_name(backup.name + "-forged")
    shutil.copytree(backup, forged)
    edit(forged)
    assert not [p for p in forged.iterdir() if p.name.endswith(("-wal", "-shm", "-journal"))]
    material = Keyring.open(forged / "keyring", passphrase=PASSPHRASE).material
    manifest = open_manifest((forged / "manifest.sealed").read_bytes(), material)
    manifest = dataclasses.replace(
        manifest, files=tuple(describe(forged / f.name) for f in manifest.files)
    )
    sealed = seal_manifest(manifest, material)
    signer = log_note_signer(log_key_file, passphrase=PASSPHRASE)
    (forged / "manifest.sealed").write_bytes(sealed)
    (forged / "manifest.note").write_bytes(
        sign_statement(BackupStatement.of(manifest, sealed), signer)
    )
    return forged


def repoint_a_token(directory: Path) -> None:
    """Point one search-index row at another record: a person hidden from search."""
    with closing(sqlite3.connect(directory / "vault.db", isolation_level=None)) as conn:
        # A small vault's tokens are all in the fresh tree (the storage's folds start
        # at 65,536 rows).
        index_id, token, seq = conn.execute(
            "SELECT index_id, token, seq FROM tokens_fresh ORDER BY seq LIMIT 1"
        ).fetchone()
        conn.execute(
            "UPDATE tokens_fresh SET seq = (SELECT max(seq) FROM records)"
            " WHERE index_id = ? AND token = ? AND seq = ?",
            (index_id, token, seq),
        )


def cut_the_log(directory: Path) -> None:
    """Drop the log's last entry, as someone holding the file can (triggers and all)."""
    with closing(sqlite3.connect(directory / "vault.db-log", isolation_level=None)) as conn:
        conn.execute("DROP TRIGGER log_entries_no_delete")
        conn.execute("DELETE FROM log_entries WHERE idx = (SELECT max(idx) FROM log_entries)")


@pytest.mark.parametrize(
    ("edit", "reason"),
    [(repoint_a_token, "content"), (cut_the_log, "access log")],
    ids=["a-search-token-repointed", "the-log-cut"],
)
def test_a_restore_that_does_not_verify_never_serves(
    population: Population, tmp_path: Path, edit: Callable[[Path], None], reason: str
) -> None:
    vault = population.vault
    log_key = vault.log_verifier_key
    log_key_file = VaultLayout(population.directory).read().log_key
    made = back_up(vault, tmp_path / "backup")
    forged = forge(made.directory, log_key_file, edit)
    # Every file matches the forged manifest and its signature: only the content digest
    # or the log's checkpoint can tell.
    with pytest.raises(BackupTampered, match=reason):
        verify_backup(forged, passphrase=PASSPHRASE, log_key=log_key)

    target, keys = tmp_path / "restored", tmp_path / "restored-keys"
    with pytest.raises(BackupTampered, match=reason):
        restore_sqlite(forged, target, keys=keys, passphrase=PASSPHRASE, log_key=log_key)
    # Nothing serves: no vault where it was asked for, no key written, no staging left.
    assert not target.exists()
    assert not keys.exists() or not any(keys.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    with pytest.raises(ConfigurationError):
        open_vault(target, passphrase=PASSPHRASE)
    # A byte flipped in the copy (no resealing) is refused before anything is staged.
    flipped = tmp_path / "flipped"
    shutil.copytree(made.directory, flipped)
    flip_byte(flipped / "vault.db")
    with pytest.raises(BackupTampered):
        restore_sqlite(flipped, target, keys=keys, passphrase=PASSPHRASE, log_key=log_key)
    assert not target.exists()
    # The backup as made restores: the refusals came from the edits.
    restored = restore_sqlite(made.directory, target, keys=keys, passphrase=PASSPHRASE)
    assert restored.check.records == len(population.records)


def test_a_restore_never_writes_over_a_vault_or_a_key(
    population: Population, tmp_path: Path
) -> None:
    made = back_up(population.vault, tmp_path / "backup")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "README_TO_RECOVER").write_text(RANSOM_NOTE)
    with pytest.raises(ConfigurationError, match="not empty"):
        restore_sqlite(made.directory, occupied, keys=tmp_path / "k", passphrase=PASSPHRASE)
    assert [p.name for p in occupied.iterdir()] == ["README_TO_RECOVER"]
    with pytest.raises(ConfigurationError, match="outside the vault directory"):
        restore_sqlite(
            made.directory, tmp_path / "new", keys=tmp_path / "new" / "keys", passphrase=PASSPHRASE
        )
    # The live vault's own key directory already holds this vault's keys under the names
    # a restore would use: nothing is replaced.
    recorded = VaultLayout(population.directory).read()
    held_keys = tmp_path / "held-keys"
    held_keys.mkdir()
    vault_id = recorded.vault_id.hex()
    shutil.copy(recorded.keyring, held_keys / f"{vault_id}.keyring")
    before = file_digests(held_keys)
    with pytest.raises(ConfigurationError, match="never replaces a key"):
        restore_sqlite(made.directory, tmp_path / "new", keys=held_keys, passphrase=PASSPHRASE)
    assert file_digests(held_keys) == before and not (tmp_path / "new").exists()
    with pytest.raises(KeyringError):
        restore_sqlite(
            made.directory, tmp_path / "new", keys=tmp_path / "k", passphrase="not the passphrase!"
        )
    assert not (tmp_path / "new").exists()


def test_a_backup_inside_the_vault_directory_is_refused(
    population: Population, tmp_path: Path
) -> None:
    inside = population.directory / "backups" / "today"
    with pytest.raises(ConfigurationError, match="inside the vault directory"):
        back_up(population.vault, inside)
    assert not (population.directory / "backups").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("not a backup")
    with pytest.raises(ConfigurationError, match="not an empty directory"):
        back_up(population.vault, occupied)
    # Refused before the act: no entry for a backup that was never attempted.
    auditor = login(population.vault, Role.AUDITOR)
    assert log_actions(population.vault, auditor, Action.BACKUP_CREATE) == []


def test_a_backup_statement_and_a_checkpoint_are_never_read_as_each_other(
    population: Population, tmp_path: Path
) -> None:
    vault = population.vault
    made = back_up(vault, tmp_path / "backup")
    statement = (made.directory / "manifest.note").read_bytes()
    with pytest.raises(MalformedNote):
        Checkpoint.parse_body(parse_note(statement)[0])
    checkpoint = made.manifest.checkpoint
    with pytest.raises(BackupTampered):
        read_statement(checkpoint, vault.log_verifier_key)
    assert read_statement(statement, vault.log_verifier_key).backup_id == made.manifest.backup_id
    # The manifest is canonical and opens only with this vault's keys.
    sealed = (made.directory / "manifest.sealed").read_bytes()
    assert Manifest.parse(made.manifest.canonical()) == made.manifest
    make_vault(tmp_path / "other", "sqlite").close()
    others = Keyring.open(tmp_path / "other" / "keys" / "test.keyring", passphrase=PASSPHRASE)
    with pytest.raises(BackupTampered):
        open_manifest(sealed, others.material)


# -- keys ---------------------------------------------------------------------------------


def test_losing_the_signer_state_or_the_keyring_is_recoverable_from_the_backup(
    tmp_path: Path,
) -> None:
    held = populated(tmp_path, count=100)
    vault = held.vault
    officer = login(vault, Role.SUPERVISOR, "sun.li")
    log_key = vault.log_verifier_key
    made = back_up(vault, tmp_path / "backup")
    # The vault goes on after the backup: more reads, a newer signed checkpoint.
    assert search(vault, officer, held.people[0]) == 1
    vault.checkpoint(vault.operator)
    vault.close()

    recorded = VaultLayout(held.directory).read()
    state = signer_state_path(recorded.log_key)
    names = {state: "log.key.state", recorded.keyring: "keyring"}
    losses = ((state,), (recorded.keyring,), (recorded.keyring, state))
    for round_, lost in enumerate(losses):
        for path in lost:
            path.unlink()
        with pytest.raises((KeyringError, TamperDetected)):
            open_vault(held.directory, passphrase=PASSPHRASE)
        put_back = restore_keys(
            made.directory, held.directory, passphrase=PASSPHRASE, log_key=log_key
        )
        assert sorted(put_back) == sorted(names[path] for path in lost)
        reopened = open_vault(held.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
        try:
            reader = login(reopened, Role.SUPERVISOR, f"reader.{round_}")
            assert search(reopened, reader, held.people[round_ + 1]) == 1
            # The signer signs on from its restored state: the log extends it.
            reopened.checkpoint(reopened.operator)
            report = reopened.verify_log(reopened.operator)
            assert report.latest_signed == report.entries - 1  # all but its own entry
        finally:
            reopened.close()
    with pytest.raises(ConfigurationError, match="nothing to restore"):
        restore_keys(made.directory, held.directory, passphrase=PASSPHRASE)

    reopened = open_vault(held.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        auditor = login(reopened, Role.AUDITOR)
        restores = log_actions(reopened, auditor, Action.BACKUP_RESTORE)
        assert [(e["scope"], sorted(e["files"])) for e in restores] == [
            ("keys", sorted(names[path] for path in lost)) for lost in losses
        ]
        assert {e["backup_id"] for e in restores} == {made.manifest.backup_id.hex()}
    finally:
        reopened.close()


# -- what the backup holds -----------------------------------------------------------------


def test_the_backup_holds_no_personal_value_in_clear(tmp_path: Path) -> None:
    held = populated(tmp_path, count=600)
    vault = held.vault
    officer = login(vault, Role.SUPERVISOR)
    # Searched and revealed values are on the log (sealed): the log copy is scanned too.
    for person in held.people[:5]:
        [view] = vault.search(
            officer,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": str(person["national_id"])},
        )
        vault.reveal(officer, PURPOSE, view.record_id, "address")
    made = back_up(vault, tmp_path / "backup")
    vault.close()
    values = personal_values(held.records)
    assert len(values) > 1000
    assert scan_bytes(made.directory, values) == []
    # The scan finds the same values where they are in clear: it can fail.
    control = tmp_path / "control"
    control.mkdir()
    shutil.copy(tmp_path / "population.jsonl", control)
    assert scan_bytes(control, values)
    # Owner-only, as the vault's own files.
    assert stat.S_IMODE(made.directory.stat().st_mode) == 0o700
    for path in made.directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


# -- on the access log -----------------------------------------------------------------------


def test_backup_and_restore_appear_on_the_access_log(
    population: Population, tmp_path: Path
) -> None:
    vault = population.vault
    auditor = login(vault, Role.AUDITOR)
    admin = login(vault, Role.ADMIN)
    officer = login(vault, Role.SUPERVISOR, "zhou.yu")
    made = back_up(vault, tmp_path / "backup")
    # Only the host operator backs up: an official's session is refused, and logged.
    for session in (admin, officer):
        with pytest.raises(AccessDenied):
            vault.backup(session, lambda source: made)
        with pytest.raises(AccessDenied):
            vault.record_restore(session, {"scope": "vault"})
    entries = log_actions(vault, auditor, "vault:backup")
    granted = [e for e in entries if e["outcome"] == "granted"]
    assert [e["action"] for e in granted] == [Action.BACKUP_CREATE.value]
    assert granted[0]["actor"] == "operator"
    assert granted[0]["backup_id"] == made.manifest.backup_id.hex()
    assert granted[0]["records"] == len(population.records)
    assert granted[0]["checkpoint_size"] == made.manifest.checkpoint_size()
    denied = [(e["action"], e["actor"]) for e in entries if e["outcome"] == "denied"]
    assert sorted(denied) == sorted(
        (action.value, name)
        for action in (Action.BACKUP_CREATE, Action.BACKUP_RESTORE)
        for name in (admin.username, officer.username)
    )
    # The backup's checkpoint was signed before its copy: the log copy holds it.
    assert made.manifest.checkpoint_size() <= made.manifest.log_size

    restored = restore_sqlite(
        made.directory, tmp_path / "restored", keys=tmp_path / "rk", passphrase=PASSPHRASE
    )
    reopened = open_vault(restored.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        auditor = relogin(reopened, auditor.username)
        [entry] = log_actions(reopened, auditor, Action.BACKUP_RESTORE)
        assert entry["outcome"] == "granted" and entry["scope"] == "vault"
        assert entry["backup_id"] == made.manifest.backup_id.hex()
        assert entry["records"] == len(population.records)
    finally:
        reopened.close()


# -- the command line ------------------------------------------------------------------------


def test_backup_verify_and_restore_from_the_command_line(tmp_path: Path) -> None:
    held = populated(tmp_path, count=50)
    log_key = held.vault.log_verifier_key
    directory = held.directory
    held.vault.close()
    env = {"CUSTODES_VAULT": str(directory), "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    backup = tmp_path / "backups" / "nightly"

    done = run("backup", "create", "--to", str(directory / "inside"), env=env)
    assert done.returncode == 2 and "inside the vault directory" in done.stderr
    assert not (directory / "inside").exists()

    done = run("backup", "create", "--to", str(backup), env=env)
    assert done.returncode == 0, done.stderr
    assert "written to" in done.stdout and log_key in done.stdout

    done = run("backup", "verify", str(backup), "--log-key", log_key, env=env)
    assert done.returncode == 0, done.stderr
    assert "verified" in done.stdout and "person" in done.stdout
    # With the published log key alone, no passphrase.
    done = run("backup", "verify", str(backup), "--no-keyring", "--log-key", log_key)
    assert done.returncode == 0, done.stderr

    tampered = tmp_path / "tampered"
    shutil.copytree(backup, tampered)
    flip_byte(tampered / "vault.db-log")
    done = run("backup", "verify", str(tampered), "--log-key", log_key, env=env)
    assert done.returncode == TamperDetected.exit_code
    assert done.stderr.count("\n") == 1 and "vault.db-log" in done.stderr

    done = run(
        "restore",
        str(backup),
        "--vault",
        str(tmp_path / "restored"),
        "--keys",
        str(tmp_path / "restored-keys"),
        "--log-key",
        log_key,
        env={"CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE},
    )
    assert done.returncode == 0, done.stderr
    reopened = open_vault(tmp_path / "restored", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        assert reopened.count() == len(held.records)
    finally:
        reopened.close()
