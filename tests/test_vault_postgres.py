"""A whole vault on PostgreSQL: created, filled, searched, reopened and verified through
the same composition root and commands as one on SQLite; its settings name the database
but never a password."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from custodes.bootstrap import create_vault, deployment_facts, open_vault, verify_log_files
from custodes.errors import ConfigurationError
from custodes.settings import VaultLayout, check_database_url
from custodes.storage import PostgresStorage
from custodes.synth import write_jsonl
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    postgres_dsn_fixture,
    postgres_server_fixture,
)


def _people(tmp_path: Path, count: int = 120) -> tuple[Path, list[str]]:
    source = tmp_path / "people.jsonl"
    with source.open("wb") as f:
        write_jsonl(f, count, seed=23)
    ids = [
        str(doc["national_id"])
        for doc in map(orjson.loads, source.read_bytes().splitlines())
        if doc.get("type", "person") == "person" and "national_id" in doc
    ]
    return source, ids


def test_a_vault_on_postgresql_is_filled_searched_reopened_and_verified(
    tmp_path: Path, postgres_dsn: Callable[[], str]
) -> None:
    database = postgres_dsn()
    vault = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "vault.keyring",
        log_key_path=tmp_path / "keys" / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=database,
    )
    source, ids = _people(tmp_path)
    try:
        assert isinstance(vault._storage, PostgresStorage)
        report = vault.ingest(vault.operator, source, workers=1)
        assert report.accepted > 0 and report.rejected == 0
        session = login(vault)
        found = vault.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": ids[0]},
        )
        assert len(found) == 1
        vault.checkpoint(vault.operator)
    finally:
        vault.close()
    # Nothing of the records is in the directory: only the settings, naming the database.
    assert not VaultLayout(tmp_path / "vault").database.exists()
    assert VaultLayout(tmp_path / "vault").read().database == database

    reopened = open_vault(tmp_path / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        session = login(reopened, username="t.second")
        again = reopened.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": ids[1]},
        )
        assert len(again) == 1
        key = reopened.log_verifier_key
    finally:
        reopened.close()
    report = verify_log_files(tmp_path / "vault", log_key=key)
    assert report.entries > 0 and report.latest_signed > 0
    facts = deployment_facts(tmp_path / "vault")
    assert facts is not None
    assert {a.username for a in facts.accounts} == {"t.investigator", "t.second"}

    # The schema holds a vault now: a second one is refused there.
    with pytest.raises(ConfigurationError, match="already holds a custodes vault"):
        create_vault(
            tmp_path / "other",
            passphrase=PASSPHRASE,
            keyring_path=tmp_path / "keys2" / "vault.keyring",
            log_key_path=tmp_path / "keys2" / "log.key",
            kdf=FAST_KDF,
            database=database,
        )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://custodes:hunter2-secret@127.0.0.1/vault",
        "host=127.0.0.1 dbname=vault password=hunter2-secret",
        "host=127.0.0.1 dbname=vault passfile=/somewhere/hunter2-secret",
    ],
)
def test_a_database_password_is_never_kept_in_the_vaults_settings(url: str) -> None:
    with pytest.raises(ConfigurationError, match="PGPASSFILE") as refused:
        check_database_url(url)
    assert "hunter2" not in str(refused.value)


def test_init_on_postgresql_from_the_command_line_and_every_command_after_it(
    tmp_path: Path, postgres_dsn: Callable[[], str]
) -> None:
    database = postgres_dsn()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    env["CUSTODES_KEYRING_PASSPHRASE"] = PASSPHRASE
    env["CUSTODES_KEYRING"] = str(tmp_path / "keys" / "vault.keyring")
    env["CUSTODES_LOG_KEY"] = str(tmp_path / "keys" / "log.key")
    vault_dir = str(tmp_path / "vault")
    source, _ = _people(tmp_path, 60)

    def custodes(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "custodes", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )

    refused = custodes("init", vault_dir, "--database", "postgresql://u:hunter2@127.0.0.1/x")
    assert refused.returncode != 0
    assert "hunter2" not in refused.stdout + refused.stderr
    created = custodes("init", vault_dir, "--database", database)
    assert created.returncode == 0, created.stderr
    ingested = custodes("ingest", "--vault", vault_dir, str(source))
    assert ingested.returncode == 0, ingested.stderr
    # Any host command may name the database for its run (here the same one, as another
    # role's URL would be); one with a password is refused before anything is opened.
    again = custodes("ingest", "--vault", vault_dir, "--database", database, str(source))
    assert again.returncode == 0, again.stderr
    assert "already" in again.stdout
    bad = custodes(
        "ingest", "--vault", vault_dir, "--database", "postgresql://u:hunter2@h/x", str(source)
    )
    assert bad.returncode != 0 and "hunter2" not in bad.stdout + bad.stderr
    checked = custodes("audit", "checkpoint", "--vault", vault_dir)
    assert checked.returncode == 0, checked.stderr
    verified = custodes("audit", "verify", "--vault", vault_dir)
    assert verified.returncode == 0, verified.stderr
    doctor = custodes("doctor", "--vault", vault_dir)
    assert "Traceback" not in doctor.stderr
