"""A log rolled back, cut or swapped: caught when the vault opens, by a running server at
its next append or signing round, and by `audit verify` and `doctor` on the host; nothing
is served until the host operator acknowledges the loss, and the acknowledgement itself is
signed, on the log, and reported ever after.

Threat model row 16: an insider who restores an older copy of the vault, cuts the log's
last entries with their checkpoints, or copies another log file over it must not be able
to keep the service running on the shortened history as if nothing had happened.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from custodes.audit.checkpoint import ForkRefused, signed_losses
from custodes.bootstrap import acknowledge_log_loss, create_vault, open_vault, unlock_vault
from custodes.doctor import Deployment, check_log
from custodes.errors import AuditUnavailable, TamperDetected
from custodes.policy import Action
from custodes.sessions import Session
from custodes.vault import Vault
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login

ID = "11010519491231002X"


def _create(tmp: Path) -> Vault:
    return create_vault(
        tmp / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp / "keys" / "vault.keyring",
        log_key_path=tmp / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    )


def _open(tmp: Path) -> Vault:
    return open_vault(tmp / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH)


def _search(vault: Vault, session: Session) -> None:
    vault.search(
        session, PURPOSE, record_type="person", index="national_id", values={"national_id": ID}
    )


def _log_file(tmp: Path) -> Path:
    return tmp / "vault" / "vault.db-log"


def _rewrite_log(tmp: Path, *statements: str) -> None:
    """What an insider with the log file can do: drop its guards and rewrite its rows."""
    db = sqlite3.connect(_log_file(tmp))
    try:
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"):
            db.execute(f'DROP TRIGGER "{name}"')
        for statement in statements:
            db.execute(statement)
        db.commit()
    finally:
        db.close()


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Vault, Session]]:
    """A vault on disk with an investigator logged in and a signed log of a few searches."""
    vault = _create(tmp_path)
    try:
        session = login(vault)
        for _ in range(5):
            _search(vault, session)
        vault.checkpoint(vault.operator)
        yield vault, session
    finally:
        vault.close()


def test_a_log_cut_under_a_running_server_refuses_every_read_from_the_next_one(
    serving: tuple[Vault, Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vault, session = serving
    signed = vault._log.size
    _rewrite_log(tmp_path, f"DELETE FROM log_entries WHERE idx >= {signed - 4}")
    with (
        caplog.at_level(logging.CRITICAL, logger="custodes.audit"),
        pytest.raises(AuditUnavailable),
    ):
        _search(vault, session)
    assert "shrank" in (vault._log.halted or "")
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)
    # It stays refused: entries put back by the same hand change nothing until the
    # operator has looked.
    for _ in range(3):
        with pytest.raises(AuditUnavailable):
            _search(vault, session)
    with pytest.raises(AuditUnavailable):
        vault.checkpoint(vault.operator)
    # And no copy of the vault opens on it either.
    with pytest.raises(TamperDetected, match="rolled back, cut or replaced"):
        _open(tmp_path)


def test_a_log_swapped_under_a_running_server_for_another_history_is_refused(
    serving: tuple[Vault, Session], tmp_path: Path
) -> None:
    # Another vault's log, longer than this one, copied row by row over this log: the
    # size only grows, but its first entries are not the ones this server wrote.
    vault, session = serving
    other_dir = tmp_path / "other"
    other = _create(other_dir)
    try:
        other_session = login(other)
        for _ in range(vault._log.size + 5):
            _search(other, other_session)
    finally:
        other.close()
    _rewrite_log(
        tmp_path,
        f"ATTACH DATABASE '{_log_file(other_dir)}' AS other",
        "DELETE FROM log_entries",
        "DELETE FROM log_nodes",
        "INSERT INTO log_entries SELECT * FROM other.log_entries",
        "INSERT INTO log_nodes SELECT * FROM other.log_nodes",
    )
    with pytest.raises(AuditUnavailable):
        _search(vault, session)
    assert "replaced" in (vault._log.halted or "")


def test_an_idle_server_notices_a_cut_log_in_its_signing_round_loudly(
    serving: tuple[Vault, Session], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No access comes after the cut: the server's own signing round must find it, not
    # stop signing in silence.
    vault, session = serving
    _rewrite_log(tmp_path, f"DELETE FROM log_entries WHERE idx >= {vault._log.size - 3}")
    with caplog.at_level(logging.CRITICAL, logger="custodes.audit"):
        vault.keep_signing(every=0.05)
        deadline = time.monotonic() + 30
        while vault._log.halted is None and time.monotonic() < deadline:
            time.sleep(0.02)
    assert vault._log.halted is not None
    assert any("acknowledge-loss" in r.getMessage() for r in caplog.records)
    with pytest.raises(AuditUnavailable):
        _search(vault, session)


def _rolled_back(tmp: Path) -> int:
    """A vault put back to a copy taken before its last searches were signed; the size
    the signer had signed."""
    vault = _create(tmp)
    try:
        session = login(vault)
        _search(vault, session)
        vault.checkpoint(vault.operator)
        for name in ("vault.db", "vault.db-log"):
            with contextlib.closing(sqlite3.connect(tmp / "vault" / name)) as db:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copy2(tmp / "vault" / name, tmp / f"{name}.copy")
        for _ in range(6):
            _search(vault, session)
        vault.checkpoint(vault.operator)
        signed, _ = vault._log._signer.current()
    finally:
        vault.close()
    for name in ("vault.db", "vault.db-log"):
        for leftover in ("-wal", "-shm"):
            (tmp / "vault" / f"{name}{leftover}").unlink(missing_ok=True)
        shutil.copy2(tmp / f"{name}.copy", tmp / "vault" / name)
    return signed


def _saved_checkpoint(tmp: Path) -> Path:
    """The signer's last checkpoint as an auditor saved it (before the rollback)."""
    state = (tmp / "keys" / "log.key.state").read_text()
    saved = tmp / "saved.note"
    saved.write_text(json.loads(state)["note"])
    return saved


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    env["CUSTODES_KEYRING_PASSPHRASE"] = PASSPHRASE
    return subprocess.run(
        [sys.executable, "-m", "custodes", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_audit_verify_on_the_host_catches_a_rollback_by_the_signers_own_checkpoint(
    tmp_path: Path,
) -> None:
    # The restored copy carries its own checkpoints, which agree with it; the signer's
    # state, kept with its key outside the database, does not.
    _rolled_back(tmp_path)
    done = _cli("audit", "verify", "--vault", str(tmp_path / "vault"))
    assert done.returncode != 0, done.stdout
    assert "the log signer's state" in done.stderr
    assert "truncated" in done.stderr


def test_after_the_operator_acknowledges_a_loss_the_vault_serves_and_says_so_for_good(
    tmp_path: Path,
) -> None:
    signed = _rolled_back(tmp_path)
    saved = _saved_checkpoint(tmp_path)
    with pytest.raises(TamperDetected):
        _open(tmp_path)
    unlocked = unlock_vault(tmp_path / "vault", passphrase=PASSPHRASE)
    loss = acknowledge_log_loss(unlocked, reason="disk failed; restored the nightly copy")
    assert loss.signed.size == signed
    assert loss.resumed.size < signed

    vault = _open(tmp_path)
    try:
        session = login(vault, username="t.after")
        _search(vault, session)
        acknowledged = [
            (index, entry)
            for index, entry in vault._log.entries()
            if entry.action == Action.LOG_LOSS_ACKNOWLEDGE
        ]
        assert [index for index, _ in acknowledged] == [loss.resumed.size]
        assert acknowledged[0][1].detail == {
            "signed_size": signed,
            "resumed_size": loss.resumed.size,
            "reason": "disk failed; restored the nightly copy",
        }
    finally:
        vault.close()

    # Kept, signed, beside the key; doctor and verify report it.
    assert signed_losses(tmp_path / "keys" / "log.key") == [loss]
    findings = [f.check for f in check_log(Deployment(vault_dir=tmp_path / "vault"))]
    assert findings.count("log:loss-acknowledged") == 1
    assert "log:rolled-back" not in findings
    done = _cli("audit", "verify", "--vault", str(tmp_path / "vault"))
    assert done.returncode == 0, done.stderr
    assert "acknowledged a loss" in done.stdout
    # And a checkpoint of the lost entries, held by an auditor, still fails against it.
    done = _cli("audit", "verify", "--vault", str(tmp_path / "vault"), "--checkpoint", str(saved))
    assert done.returncode != 0


def test_a_whole_log_has_no_loss_to_acknowledge(serving: tuple[Vault, Session]) -> None:
    vault, _ = serving
    directory = vault.directory
    assert directory is not None
    vault.close()
    unlocked = unlock_vault(directory, passphrase=PASSPHRASE)
    with pytest.raises(ForkRefused, match="nothing was lost"):
        acknowledge_log_loss(unlocked, reason="trying to reset the signer")


def test_a_forged_or_erased_loss_record_does_not_pass_for_the_signers(tmp_path: Path) -> None:
    _rolled_back(tmp_path)
    unlocked = unlock_vault(tmp_path / "vault", passphrase=PASSPHRASE)
    acknowledge_log_loss(unlocked, reason="restored the nightly copy")
    record = tmp_path / "keys" / "log.key.losses"
    record.write_text(record.read_text().replace("restored", "rEstored"))
    with pytest.raises(TamperDetected):
        signed_losses(tmp_path / "keys" / "log.key")
    findings = [f.check for f in check_log(Deployment(vault_dir=tmp_path / "vault"))]
    assert "log:signer-state" in findings


def test_acknowledging_a_loss_from_the_command_line_needs_a_reason_and_prints_what_was_lost(
    tmp_path: Path,
) -> None:
    signed = _rolled_back(tmp_path)
    vault_dir = str(tmp_path / "vault")
    done = _cli("audit", "acknowledge-loss", "--vault", vault_dir)
    assert done.returncode != 0
    assert "--reason" in done.stderr
    done = _cli("audit", "acknowledge-loss", "--vault", vault_dir, "--reason", "\u202eevil")
    assert done.returncode != 0
    done = _cli("audit", "acknowledge-loss", "--vault", vault_dir, "--reason", "copy restored")
    assert done.returncode == 0, done.stderr
    assert f"had signed {signed:,} entries" in done.stdout
    doctor = _cli("doctor", "--vault", vault_dir)
    assert "acknowledged a loss of the access log" in doctor.stdout
