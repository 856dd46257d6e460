"""Threat 16: an insider, or the operator, edits, deletes, truncates or reorders the access
log, or replaces a checkpoint. `custodes audit verify` catches each, exits non-zero and
names the first bad position; a fork is caught by whoever holds a witnessed checkpoint.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from custodes.audit import AccessEntry, Outcome
from custodes.audit.checkpoint import Checkpoint, NoteSigner, _read_sealed_key, _state_document
from custodes.audit.merkle import CompactRange, leaf_hash
from custodes.audit.witness import Witness
from custodes.bootstrap import create_vault
from custodes.settings import VaultLayout
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE

ENTRIES = 230
EVERY = 50


def run_verify(directory: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    return subprocess.run(
        [sys.executable, "-m", "custodes", "audit", "verify", "--vault", str(directory), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    vault = create_vault(
        root / "vault",
        passphrase=PASSPHRASE,
        keyring_path=root / "keys" / "k",
        log_key_path=root / "keys" / "log",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        checkpoint_every=EVERY,
    )
    for n in range(ENTRIES):
        vault._log.append(
            AccessEntry(
                f"officer.{n % 7}",
                "officer",
                "record:index:search",
                Outcome.GRANTED,
                1_700_000_000.0 + n,
                purpose=f"inquiry {n}",
                records=(f"r{n:022d}",),
                result_count=1,
            )
        )
    vault.close()
    return root


@pytest.fixture
def copy(pristine: Path, tmp_path: Path) -> Path:
    target = tmp_path / "vault"
    shutil.copytree(pristine / "vault", target)
    return target


def tamper(directory: Path, *statements: str, params: tuple[object, ...] = ()) -> None:
    """What an insider with the database file can do: drop the guards and rewrite rows."""
    db = sqlite3.connect(directory / "vault.db-log")
    try:
        triggers = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")]
        for name in triggers:
            db.execute(f'DROP TRIGGER "{name}"')
        for statement in statements:
            db.execute(statement, params if "?" in statement else ())
        db.commit()
    finally:
        db.close()


def entry_bytes(directory: Path, index: int) -> bytes:
    db = sqlite3.connect(directory / "vault.db-log")
    try:
        return bytes(
            db.execute("SELECT entry FROM log_entries WHERE idx = ?", (index,)).fetchone()[0]
        )
    finally:
        db.close()


def assert_caught(done: subprocess.CompletedProcess[str], position: int, words: str) -> None:
    assert done.returncode != 0, done.stdout
    assert f"first bad position {position}" in done.stderr, done.stderr
    assert words in done.stderr, done.stderr


def test_untouched_log_verifies(copy: Path) -> None:
    done = run_verify(copy)
    assert done.returncode == 0, done.stderr
    assert f"{ENTRIES} entries" in done.stdout.replace(",", "")


def test_edited_entry_is_caught(copy: Path) -> None:
    edited = entry_bytes(copy, 123).replace(b"inquiry 123", b"inquiry 124")
    tamper(copy, "UPDATE log_entries SET entry = ? WHERE idx = 123", params=(edited,))
    assert_caught(run_verify(copy), 123, "edited")


def test_edited_entry_with_its_leaf_rewritten_is_still_caught(copy: Path) -> None:
    edited = entry_bytes(copy, 123).replace(b"inquiry 123", b"inquiry 124")
    tamper(
        copy,
        "UPDATE log_entries SET entry = ? WHERE idx = 123",
        f"UPDATE log_nodes SET hash = x'{leaf_hash(edited).hex()}' WHERE level = 0 AND idx = 123",
        params=(edited,),
    )
    done = run_verify(copy)
    assert done.returncode != 0
    # The stored leaf no longer betrays the entry, so the checkpoint that covers it does.
    assert "first bad position 100" in done.stderr and "signed at size 150" in done.stderr


def test_deleted_entry_is_caught(copy: Path) -> None:
    tamper(copy, "DELETE FROM log_entries WHERE idx = 77")
    assert_caught(run_verify(copy), 77, "missing")


def test_deleted_entry_with_the_rest_renumbered_is_caught(copy: Path) -> None:
    tamper(
        copy,
        "DELETE FROM log_entries WHERE idx = 77",
        "UPDATE log_entries SET idx = idx - 1 WHERE idx > 77",
    )
    assert_caught(run_verify(copy), 77, "edited or moved")


def test_truncated_tail_is_caught(copy: Path) -> None:
    tamper(copy, "DELETE FROM log_entries WHERE idx >= 160", "DELETE FROM log_nodes")
    assert_caught(run_verify(copy), 160, "truncated")


def test_reordered_entries_are_caught(copy: Path) -> None:
    a, b = entry_bytes(copy, 10), entry_bytes(copy, 11)
    tamper(copy, "UPDATE log_entries SET entry = ? WHERE idx = 10", params=(b,))
    tamper(copy, "UPDATE log_entries SET entry = ? WHERE idx = 11", params=(a,))
    assert_caught(run_verify(copy), 10, "edited or moved")


def test_replaced_checkpoint_is_caught(copy: Path) -> None:
    db = sqlite3.connect(copy / "vault.db-log")
    note = bytes(db.execute("SELECT note FROM checkpoints WHERE size = 100").fetchone()[0])
    db.close()
    body, _, signatures = note.partition(b"\n\n")
    forged_root = Checkpoint.parse_body(body + b"\n")
    swapped = Checkpoint(forged_root.origin, 100, bytes(32)).body() + b"\n" + signatures
    tamper(copy, "UPDATE checkpoints SET note = ? WHERE size = 100", params=(swapped,))
    assert_caught(run_verify(copy), 100, "replaced or forged")


def test_fork_after_a_witness_cosigned_is_caught(
    copy: Path, pristine: Path, tmp_path: Path
) -> None:
    """The operator holds the signing key and re-signs a rewritten history: only an
    outside holder of an earlier checkpoint can tell, and the verifier uses it."""
    db = sqlite3.connect(copy / "vault.db-log")
    witnessed = bytes(db.execute("SELECT note FROM checkpoints WHERE size = 200").fetchone()[0])
    db.close()
    db = sqlite3.connect(copy / "vault.db")
    vkey = bytes(
        db.execute("SELECT value FROM meta WHERE key = 'log_verifier_key'").fetchone()[0]
    ).decode()
    db.close()
    witness = Witness.init(
        tmp_path / "witness", name="dpa.test/witness", passphrase=PASSPHRASE, kdf=FAST_KDF
    )
    origin = vkey.split("+", 1)[0]
    witness.add_log(origin, vkey)
    assert witness.add_checkpoint(0, [], witnessed)

    # The fork: entry 42 rewritten, every node and checkpoint recomputed and re-signed.
    _, private_key = _read_sealed_key(
        pristine / "keys" / "log", purpose="log", passphrase=PASSPHRASE
    )
    signer = NoteSigner(origin, private_key)
    db = sqlite3.connect(copy / "vault.db-log")
    entries = [bytes(r[0]) for r in db.execute("SELECT entry FROM log_entries ORDER BY idx")]
    db.close()
    entries[42] = entries[42].replace(b"inquiry 42", b"inquiry 43")
    tree = CompactRange()
    nodes: list[tuple[int, int, bytes]] = []
    notes: list[tuple[int, bytes]] = []
    for n, data in enumerate(entries, 1):
        nodes.extend(tree.append(leaf_hash(data)))
        if n % EVERY == 0:
            notes.append((n, signer.sign(Checkpoint(origin, n, tree.root()).body())))
    tamper(copy, "DELETE FROM log_nodes", "DELETE FROM checkpoints")
    db = sqlite3.connect(copy / "vault.db-log")
    with db:
        db.execute("UPDATE log_entries SET entry = ? WHERE idx = 42", (entries[42],))
        db.executemany("INSERT INTO log_nodes VALUES (?, ?, ?)", nodes)
        db.executemany("INSERT INTO checkpoints VALUES (?, ?)", notes)
    db.close()

    # The signer's own last checkpoint, kept with its key outside the database, catches
    # a fork that left it behind...
    assert_caught(run_verify(copy), 0, "forked")
    # ...but the key's holder can re-sign that too: against everything the host holds,
    # the fork then looks whole...
    layout = VaultLayout(copy)
    recorded = layout.read()
    keys = shutil.copytree(recorded.log_key.parent, tmp_path / "own-keys")
    layout.vault_file.unlink()
    layout.write(recorded.vault_id, keys / recorded.keyring.name, keys / recorded.log_key.name)
    (keys / "log.state").write_bytes(_state_document(notes[-1][1]))
    assert run_verify(copy).returncode == 0
    # ...but not against what the witness holds.
    done = run_verify(copy, "--witness-dir", str(tmp_path / "witness"))
    assert_caught(done, 0, "forked")
    done = run_verify(
        copy, "--log-key", vkey, "--checkpoint", str(_write(tmp_path / "cp", witnessed))
    )
    assert_caught(done, 0, "forked")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- the subject index: what a person's subject access report is built from ---------------


def published_key_and_checkpoint(directory: Path, tmp_path: Path) -> tuple[str, ...]:
    """What an outside auditor brings: the published key and a checkpoint saved earlier."""
    db = sqlite3.connect(directory / "vault.db")
    key = bytes(db.execute("SELECT value FROM meta WHERE key = 'log_verifier_key'").fetchone()[0])
    db.close()
    db = sqlite3.connect(directory / "vault.db-log")
    saved = bytes(db.execute("SELECT note FROM checkpoints WHERE size = 200").fetchone()[0])
    db.close()
    note = tmp_path / "saved.note"
    note.write_bytes(saved)
    return ("--log-key", key.decode(), "--checkpoint", str(note))


def test_deleting_subject_index_rows_is_caught_by_verify(copy: Path, tmp_path: Path) -> None:
    """The attack that emptied a subject report: one DELETE on the index, the signed tree
    untouched. Verify recomputes the index from the leaves and names the entry."""
    outside = published_key_and_checkpoint(copy, tmp_path)
    assert run_verify(copy, *outside).returncode == 0
    tamper(copy, "DELETE FROM log_subjects WHERE idx IN (17, 180)")
    assert_caught(run_verify(copy, *outside), 17, "subject index")


@pytest.mark.parametrize(
    ("statement", "position"),
    [
        # An entry made to name someone else's subject, or a second one.
        ("INSERT INTO log_subjects(commitment, idx) VALUES (randomblob(16), 40)", 40),
        # A person's row moved to another entry: one loses it, the other gains it.
        ("UPDATE log_subjects SET idx = 141 WHERE idx = 140", 140),
        # The commitment changed: the entry now names nobody it carries.
        ("UPDATE log_subjects SET commitment = randomblob(16) WHERE idx = 66", 66),
        # A row for an entry the log does not hold.
        ("INSERT INTO log_subjects(commitment, idx) VALUES (randomblob(16), 5000)", 5000),
    ],
    ids=["added", "repointed", "changed", "beyond_the_log"],
)
def test_an_added_or_repointed_subject_row_is_caught(
    copy: Path, statement: str, position: int
) -> None:
    tamper(copy, statement)
    assert_caught(run_verify(copy), position, "subject index")


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM log_subjects WHERE idx = 3",
        "UPDATE log_subjects SET idx = 4 WHERE idx = 3",
        "INSERT OR REPLACE INTO log_subjects(commitment, idx)"
        " SELECT commitment, idx FROM log_subjects WHERE idx = 3",
    ],
    ids=["delete", "update", "replace"],
)
def test_subject_index_cannot_be_rewritten_through_sql(copy: Path, statement: str) -> None:
    """A stray or injected statement, without dropping the guards first, changes nothing."""
    db = sqlite3.connect(copy / "vault.db-log")
    try:
        before = db.execute("SELECT count(*), max(idx) FROM log_subjects").fetchone()
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute(statement)
        db.rollback()
        assert db.execute("SELECT count(*), max(idx) FROM log_subjects").fetchone() == before
    finally:
        db.close()
    assert run_verify(copy).returncode == 0


def test_a_vault_from_before_the_subject_guards_gets_them_when_opened(tmp_path: Path) -> None:
    """A log written before the subject index was guarded is guarded from its next open."""
    from custodes.storage.sqlite import _MIGRATIONS, SCHEMA_VERSION_KEY, SQLiteStorage

    # The version before the subject index's guards (see storage/sqlite.py, step 7).
    before_guards = len(_MIGRATIONS) + 2

    SQLiteStorage(tmp_path / "vault.db").close()
    db = sqlite3.connect(tmp_path / "vault.db-log")
    for name in ("log_subjects_no_update", "log_subjects_no_delete", "log_subjects_no_replace"):
        db.execute(f'DROP TRIGGER "{name}"')
    db.execute("INSERT INTO log_subjects(commitment, idx) VALUES (x'00', 0)")
    db.commit()
    db.close()
    db = sqlite3.connect(tmp_path / "vault.db")
    db.execute(
        "UPDATE meta SET value = ? WHERE key = ?",
        (str(before_guards).encode(), SCHEMA_VERSION_KEY),
    )
    db.commit()
    db.close()

    SQLiteStorage(tmp_path / "vault.db").close()
    db = sqlite3.connect(tmp_path / "vault.db-log")
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM log_subjects")
    finally:
        db.close()
