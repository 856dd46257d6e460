"""A vault killed (SIGKILL) while it serves reads: after restart, every read that returned
data has its entry in the access log, and the log verifies.

A child process opens the vault and reads from several threads, printing each read's
counter only once the read has returned; the parent kills it mid-stream and reopens.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from custodes.audit.verify import verify_log
from custodes.bootstrap import create_vault, open_vault
from custodes.policy.budgets import NO_LIMITS
from custodes.vault import Vault
from tests.conftest import (
    FAST_HASH,
    FAST_KDF,
    PASSPHRASE,
    PASSWORD,
    PURPOSE,
    TOTP_SECRETS,
    login,
    read_records,
    totp_code,
)

READS_BEFORE_KILL = 200
CHECKPOINT_EVERY = 50
READER_THREADS = 4
DEADLINE_SECONDS = 30.0

READER = textwrap.dedent(
    """
    import json
    import sys
    import threading
    from pathlib import Path

    from custodes.accounts import HashCost
    from custodes.bootstrap import open_vault
    from custodes.policy import AccessPurpose

    config = json.loads(sys.argv[1])
    vault = open_vault(
        Path(config["vault"]),
        passphrase=config["passphrase"],
        keyring_path=Path(config["keyring"]),
        log_key_path=Path(config["log_key"]),
        hash_cost=HashCost(**config["hash_cost"]),
        checkpoint_every=config["checkpoint_every"],
    )
    session = vault.login(config["username"], config["password"], totp=config["totp"])
    people = config["people"]
    lock = threading.Lock()
    counter = iter(range(10**9))


    def serve() -> None:
        while True:
            with lock:
                n = next(counter)
            national_id, record_id = people[n % len(people)]
            purpose = AccessPurpose(f"crash test {n}", "CRASH-1")
            if n % 2:
                vault.reveal(session, purpose, record_id, "phone")
            else:
                vault.search(
                    session,
                    purpose,
                    record_type="person",
                    index="national_id",
                    values={"national_id": national_id},
                )
            # Printed only after the read returned: its data has left the vault.
            with lock:
                sys.stdout.write(f"{n}\\n")
                sys.stdout.flush()


    threads = [threading.Thread(target=serve, daemon=True) for _ in range(config["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    """
)


def key_paths(tmp_path: Path) -> tuple[Path, Path]:
    """The keyring and the log signing key, outside the vault directory."""
    return tmp_path / "keys" / "crash.keyring", tmp_path / "keys" / "crash.logkey"


def prepared_vault(tmp_path: Path, population_file: Path) -> tuple[str, list[list[str]]]:
    """Create and fill a vault, add an official; return their name and people to read."""
    vault: Vault = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        checkpoint_every=CHECKPOINT_EVERY,
        keyring_path=key_paths(tmp_path)[0],
        log_key_path=key_paths(tmp_path)[1],
    )
    try:
        vault.ingest(vault.operator, population_file)
        # Its reader reads without pause until it is killed: no budget would let it.
        session = login(vault, username="t.crash", budget=NO_LIMITS)
        people = []
        for person in [r for r in read_records(population_file) if r["type"] == "person"][:8]:
            national_id = str(person["national_id"])
            found = vault.search(
                session,
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": national_id},
            )
            people.append([national_id, found[0].record_id])
    finally:
        vault.close()
    return "t.crash", people


def read_counters(proc: subprocess.Popen[bytes], wanted: int) -> tuple[list[int], bytes]:
    """Counters the child printed until `wanted` were seen, and any unfinished line."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen: list[int] = []
    pending = b""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while len(seen) < wanted:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the reader printed only {len(seen)} reads in {DEADLINE_SECONDS} s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            pytest.fail(f"the reader exited after {len(seen)} reads")
        *lines, pending = (pending + chunk).split(b"\n")
        seen.extend(int(line) for line in lines)
    return seen, pending


def test_every_read_that_returned_is_logged_after_sigkill(
    tmp_path: Path, population_file: Path
) -> None:
    username, people = prepared_vault(tmp_path, population_file)
    keyring, log_key = key_paths(tmp_path)
    config = {
        "vault": str(tmp_path / "vault"),
        "passphrase": PASSPHRASE,
        "keyring": str(keyring),
        "log_key": str(log_key),
        "hash_cost": {
            "time_cost": FAST_HASH.time_cost,
            "memory_kib": FAST_HASH.memory_kib,
            "parallelism": FAST_HASH.parallelism,
        },
        "checkpoint_every": CHECKPOINT_EVERY,
        "username": username,
        "password": PASSWORD,
        "totp": totp_code(TOTP_SECRETS[username]),
        "people": people,
        "threads": READER_THREADS,
    }
    script = tmp_path / "reader.py"
    script.write_text(READER, encoding="utf-8")
    errors = tmp_path / "reader.err"
    with (
        errors.open("wb") as stderr,
        subprocess.Popen(
            [sys.executable, str(script), json.dumps(config)],
            stdout=subprocess.PIPE,
            stderr=stderr,
        ) as proc,
    ):
        try:
            printed, pending = read_counters(proc, READS_BEFORE_KILL)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            # Reads printed between the last look and the kill returned too.
            assert proc.stdout is not None
            *late, _unfinished = (pending + proc.stdout.read()).split(b"\n")
            printed.extend(int(line) for line in late)
        except BaseException:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            sys.stderr.write(errors.read_text(errors="replace"))
            raise
    assert proc.returncode == -signal.SIGKILL
    assert len(printed) >= READS_BEFORE_KILL

    vault = open_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        hash_cost=FAST_HASH,
        checkpoint_every=CHECKPOINT_EVERY,
        keyring_path=keyring,
        log_key_path=log_key,
    )
    try:
        logged = set()
        for _, entry in vault._log.entries():
            match = re.fullmatch(r"crash test (\d+)", entry.purpose or "")
            if match:
                logged.add(int(match.group(1)))
        missing = sorted(set(printed) - logged)
        assert not missing, f"reads returned without a log entry: {missing[:10]}"

        key = vault._storage.get_meta("log_verifier_key")
        assert key is not None
        report = verify_log(vault._storage, key.decode(), origin=vault._log.origin)
        assert report.entries == vault._log.size
        assert report.root == vault._log.root()
        assert report.checkpoints >= 1 and report.latest_signed >= CHECKPOINT_EVERY
        if report.latest_signed < report.entries:
            uncovered = report.entries - report.latest_signed
            assert report.notes == [
                f"{uncovered} entries after the latest stored checkpoint are not yet covered "
                "by a signature"
            ]
        # The signer, which may have signed just before the kill, accepts the recovered
        # tree as extending everything it signed.
        vault._log.checkpoint()
        report = verify_log(vault._storage, key.decode(), origin=vault._log.origin)
        assert report.latest_signed == report.entries and not report.notes
    finally:
        vault.close()
