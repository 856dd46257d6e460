"""Backups of a vault in PostgreSQL with pgBackRest, and the wipe-and-ransom drill.

Each test starts a cluster of its own that archives its WAL through pgBackRest into an
encrypted repository owned by the cluster's OS user (never by the vault's), makes a
vault there whose server connects as a least-privileged role, and backs it up through
custodes, which locks the vault's tables, seals and signs the manifest around
pgBackRest's backup. The drill then has the thief do what the Shanghai thief did: wipe
the database and leave a ransom note; the restore brings every acknowledged record and
access-log entry back from the repository into a new cluster, verified before it serves.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psycopg
import pytest

from custodes.audit.verify import verify_log
from custodes.backup.files import log_note_signer
from custodes.backup.manifest import BackupTampered
from custodes.backup.postgres import (
    PgBackRest,
    PgCtl,
    RestoreTarget,
    backup_postgres,
    restore_postgres,
    verify_postgres_backup,
)
from custodes.bootstrap import assemble_vault, create_vault, open_vault, unlock_vault
from custodes.errors import ConfigurationError, StorageError
from custodes.storage import PostgresStorage
from custodes.storage.postgres import grant_app_role
from custodes.synth import write_jsonl
from custodes.vault import Vault
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    BINARIES,
    PgCluster,
    pg_cluster_fixture,
)

STANZA = "vault"
OWNER, APP = "custodes_owner", "custodes_app"
HISTORY = (
    "records",
    "data_keys",
    "tokens",
    "log_entries",
    "log_nodes",
    "log_subjects",
    "log_details",
    "checkpoints",
)
TABLES = (*HISTORY, "meta", "accounts", "sessions", "login_failures", "spent", "log_head")

pytestmark = pytest.mark.skipif(
    shutil.which("pgbackrest") is None and os.environ.get("CUSTODES_REQUIRE_POSTGRES") != "1",
    reason="pgBackRest is not installed",
)


@dataclass
class Deployment:
    """A cluster archiving through pgBackRest, a vault on it, and how to reach both."""

    cluster: PgCluster
    vault_dir: Path
    keys: Path
    pgbackrest: PgBackRest
    pg_ctl: PgCtl

    def url(self, user: str = OWNER, port: int | None = None) -> str:
        return psycopg.conninfo.make_conninfo(
            host="127.0.0.1",
            port=port or self.cluster.port,
            user=user,
            dbname="vault",
            connect_timeout=5,
        )

    def superuser(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.cluster.dsn(dbname), autocommit=True)

    def open(self, user: str = APP) -> Vault:
        """The vault as its server runs it: through the least-privileged role."""
        unlocked = unlock_vault(self.vault_dir, passphrase=PASSPHRASE, database=self.url(user))
        return assemble_vault(unlocked, host=True, hash_cost=FAST_HASH)

    def backup(self, vault: Vault, destination: Path, kind: str = "full") -> Path:
        signer = log_note_signer(self.keys / "log.key", passphrase=PASSPHRASE)
        made = backup_postgres(
            vault,
            destination,
            signer=signer,
            database=self.url(OWNER),
            pgbackrest=self.pgbackrest,
            kind=kind,
        )
        return made.directory

    def archive_all(self) -> None:
        """Switch to a new WAL file and wait until the last one is in the repository."""
        with self.superuser() as conn:
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
            assert row is not None
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                done = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
                if done is not None and done[0] is not None and str(done[0]) >= str(row[0]):
                    return
                time.sleep(0.1)
        raise AssertionError("the WAL was not archived in time")


def _as_postgres(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)
    return path


def _pgbackrest_config(cluster: PgCluster, *, cipher: bool = True) -> Path:
    """pgBackRest's configuration, beside the cluster and owned by its OS user: the
    repository, its cipher pass and pgBackRest's own working directories."""
    root = cluster.root
    for name in ("repo", "log", "lock", "spool"):
        _as_postgres(root / "pgbackrest" / name, 0o750)
    lines = [
        "[global]",
        f"repo1-path={root / 'pgbackrest' / 'repo'}",
        "repo1-retention-full=4",
        f"log-path={root / 'pgbackrest' / 'log'}",
        f"lock-path={root / 'pgbackrest' / 'lock'}",
        f"spool-path={root / 'pgbackrest' / 'spool'}",
        "log-level-console=warn",
        "log-level-file=off",
        "compress-type=lz4",
        "start-fast=y",
        *(
            ["repo1-cipher-type=aes-256-cbc", f"repo1-cipher-pass={secrets.token_urlsafe(32)}"]
            if cipher
            else []
        ),
        "",
        f"[{STANZA}]",
        f"pg1-path={cluster.data_dir}",
        f"pg1-port={cluster.port}",
        f"pg1-socket-path={cluster.socket_dir}",
        "",
    ]
    conf = root / "pgbackrest" / "pgbackrest.conf"
    conf.write_text("\n".join(lines), encoding="utf-8")
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(conf, user.pw_uid, user.pw_gid)
    os.chmod(conf, 0o600)
    return conf


def _as_cluster_user(cluster: PgCluster, *argv: str) -> tuple[str, ...]:
    return (*(["runuser", "-u", cluster.owner, "--"] if cluster.owner else []), *argv)


def _deploy(
    tmp_path: Path, pg_cluster: Callable[..., PgCluster], *, cipher: bool = True
) -> Deployment:
    if shutil.which("pgbackrest") is None:
        pytest.fail("pgBackRest is not installed (CUSTODES_REQUIRE_POSTGRES=1)")
    cluster = pg_cluster(
        {"wal_level": "replica", "archive_mode": "on", "archive_timeout": "60"}, start=False
    )
    cluster.start()  # picks its port, which pgBackRest's configuration names
    conf = _pgbackrest_config(cluster, cipher=cipher)
    command = _as_cluster_user(cluster, "pgbackrest", f"--config={conf}")
    archive = f"pgbackrest --config={conf} --stanza={STANZA} archive-push %p"
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"ALTER SYSTEM SET archive_command = '{archive}'")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute(f"CREATE ROLE {OWNER} LOGIN")
        conn.execute(f"CREATE ROLE {APP} LOGIN")
        conn.execute(f"CREATE DATABASE vault OWNER {OWNER}")
    pgbackrest = PgBackRest(STANZA, command)
    pgbackrest.run("stanza-create")
    keys = tmp_path / "keys"
    deployment = Deployment(
        cluster,
        tmp_path / "vault",
        keys,
        pgbackrest,
        PgCtl(_as_cluster_user(cluster, str(BINARIES / "pg_ctl"))),
    )
    _create(deployment)
    return deployment


def _create(deployment: Deployment) -> None:
    """The vault made by the schema's owner, then its server's role granted; the vault
    records the server's connection, never the owner's."""
    create_vault(
        deployment.vault_dir,
        passphrase=PASSPHRASE,
        keyring_path=deployment.keys / "vault.keyring",
        log_key_path=deployment.keys / "log.key",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=deployment.url(OWNER),
    ).close()
    grant_app_role(deployment.url(OWNER), APP)


@pytest.fixture
def deployment(tmp_path: Path, pg_cluster: Callable[..., PgCluster]) -> Iterator[Deployment]:
    yield _deploy(tmp_path, pg_cluster)


def _people(path: Path, count: int, seed: int) -> Path:
    with path.open("wb") as f:
        write_jsonl(f, count, seed=seed)
    return path


def _stored_ids(vault: Vault) -> set[str]:
    storage = vault._storage
    assert isinstance(storage, PostgresStorage)
    return {rid for rid, _, _ in _all_record_tokens(storage)}


def _all_record_tokens(storage: PostgresStorage) -> Iterator[tuple[str, int, object]]:
    after = 0
    while True:
        page = storage.record_tokens(after=after, limit=2000)
        if not page:
            return
        for seq, rid, pairs in page:
            yield rid, seq, pairs
        after = page[-1][0]


@contextlib.contextmanager
def _restored_cluster(deployment: Deployment, name: str) -> Iterator[tuple[Path, int]]:
    """A new, empty directory for a restored cluster and a free port for it; the cluster
    is stopped at the end if the restore started it."""
    from tests.postgres import _free_port

    pg_data = _as_postgres(deployment.cluster.root / name)
    port = _free_port()
    try:
        yield pg_data, port
    finally:
        if (pg_data / "postmaster.pid").exists():
            deployment.pg_ctl.run("stop", "-m", "immediate", "-D", str(pg_data), timeout=60)


def test_a_wiped_and_ransomed_postgresql_vault_is_restored_from_the_pgbackrest_repository(
    tmp_path: Path, deployment: Deployment
) -> None:
    d = deployment
    vault = d.open()
    try:
        first = vault.ingest(vault.operator, _people(tmp_path / "first.jsonl", 150, seed=3))
        assert first.rejected == 0
        backup = d.backup(vault, tmp_path / "backup")
        at_backup = _stored_ids(vault)
        # After the backup: more records and more reads, all acknowledged, then signed.
        later = vault.ingest(vault.operator, _people(tmp_path / "later.jsonl", 60, seed=4))
        assert later.rejected == 0
        session = login(vault)
        for _ in range(5):
            vault.search(
                session,
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": _a_national_id(tmp_path / "first.jsonl")},
            )
        witnessed = vault.checkpoint(vault.operator)
        acknowledged_ids = _stored_ids(vault)
        log_size = vault._storage.log_size()
    finally:
        vault.close()
    assert len(at_backup) == first.accepted
    assert len(acknowledged_ids) == first.accepted + later.accepted

    # The server's own credentials cannot delete, rewrite, empty or drop any table.
    with psycopg.connect(d.url(APP), autocommit=True) as conn:
        for table in TABLES:
            column = _a_column(conn, table)
            for statement in (
                f"DELETE FROM {table}",
                f"UPDATE {table} SET {column} = {column}",
                f"TRUNCATE {table}",
                f"DROP TABLE {table}",
            ):
                if table in ("sessions", "login_failures", "spent") and statement.startswith(
                    "DELETE"
                ):
                    continue  # a session ends, and a count is cleared, by deleting its row
                with pytest.raises(psycopg.errors.Error):
                    conn.execute(statement)
    d.archive_all()
    with d.superuser() as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        before_attack = str(row[0])

    # The thief, as the database's superuser: the vault dropped, a ransom note left.
    with d.superuser() as conn:
        conn.execute("DROP DATABASE vault WITH (FORCE)")
        conn.execute(f"CREATE DATABASE vault OWNER {OWNER}")
    with psycopg.connect(d.cluster.dsn("vault"), autocommit=True) as conn:
        conn.execute("CREATE TABLE README_TO_RECOVER(note text)")
        conn.execute("INSERT INTO README_TO_RECOVER VALUES ('send 10 BTC to recover your data')")
    d.archive_all()

    note = tmp_path / "witness.note"
    note.write_bytes(witnessed)
    with _restored_cluster(d, "restored") as (pg_data, port):
        restored = restore_postgres(
            backup,
            tmp_path / "restored-vault",
            keys=tmp_path / "restored-keys",
            passphrase=PASSPHRASE,
            database=d.url(OWNER, port=port),
            pg_data=pg_data,
            pgbackrest=d.pgbackrest,
            pg_ctl=d.pg_ctl,
            to=RestoreTarget.parse(f"lsn:{before_attack}"),
            checkpoints=[("the witness", witnessed)],
        )
        assert restored.check.records == len(acknowledged_ids)
        back = open_vault(restored.directory, passphrase=PASSPHRASE, hash_cost=FAST_HASH)
        try:
            assert _stored_ids(back) == acknowledged_ids
            # Every entry up to the attack is back, then the restore's own.
            report = verify_log(back._storage, back.log_verifier_key, outside=[])
            assert report.entries >= log_size + 1
            assert report.entries == back._storage.log_size()
            found = back.search(
                login(back, username="t.after"),
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": _a_national_id(tmp_path / "later.jsonl")},
            )
            assert len(found) == 1
        finally:
            back.close()
        with psycopg.connect(d.url(OWNER, port=port), autocommit=True) as conn:
            ransom = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE tablename = 'readme_to_recover'"
            ).fetchone()
            assert ransom == (0,)


def _a_column(conn: psycopg.Connection[tuple[object, ...]], table: str) -> str:
    row = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum = 1",
        (table,),
    ).fetchone()
    assert row is not None
    return str(row[0])


def _a_national_id(path: Path) -> str:
    for doc in map(orjson.loads, path.read_bytes().splitlines()):
        if doc.get("type", "person") == "person" and "national_id" in doc:
            return str(doc["national_id"])
    raise AssertionError("no person in the input")


def test_a_backup_verifies_where_it_lies_and_a_changed_repository_file_fails(
    tmp_path: Path, deployment: Deployment
) -> None:
    d = deployment
    vault = d.open()
    try:
        vault.ingest(vault.operator, _people(tmp_path / "people.jsonl", 80, seed=5))
        backup = d.backup(vault, tmp_path / "backup")
        stored = _stored_ids(vault)
    finally:
        vault.close()
    check = verify_postgres_backup(backup, pgbackrest=d.pgbackrest, passphrase=PASSPHRASE)
    assert check.records == len(stored) and check.counts is not None
    assert sum(check.counts.values()) == len(stored)
    assert any("verified" in note for note in check.notes)

    # Restored to the end of the backup itself: the whole content digest agrees.
    with _restored_cluster(d, "at-backup") as (pg_data, port):
        restored = restore_postgres(
            backup,
            tmp_path / "restored",
            keys=tmp_path / "restored-keys",
            passphrase=PASSPHRASE,
            database=d.url(OWNER, port=port),
            pg_data=pg_data,
            pgbackrest=d.pgbackrest,
            pg_ctl=d.pg_ctl,
            to=RestoreTarget.parse("backup"),
        )
        assert restored.check.records == len(stored)

    # One byte of one file of the cluster's copy in the repository: pgBackRest's own
    # verification fails, and with it the backup's.
    label = check.notes[-1].split()[2].rstrip(":")
    repo = d.cluster.root / "pgbackrest" / "repo" / "backup" / STANZA / label / "pg_data"
    victim = max((p for p in repo.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="verify failed"):
        verify_postgres_backup(backup, pgbackrest=d.pgbackrest)


def test_a_backup_whose_pgbackrest_manifest_is_swapped_for_another_fails_verification(
    tmp_path: Path, deployment: Deployment
) -> None:
    d = deployment
    vault = d.open()
    try:
        first = d.backup(vault, tmp_path / "first")
        vault.ingest(vault.operator, _people(tmp_path / "people.jsonl", 40, seed=6))
        second = d.backup(vault, tmp_path / "second", kind="diff")
    finally:
        vault.close()
    # Swap pgBackRest's manifest of one backup for the other's: the signature holds the
    # copy, and the repository's backup no longer matches it.
    (first / "pgbackrest.manifest").write_bytes((second / "pgbackrest.manifest").read_bytes())
    with pytest.raises(BackupTampered):
        verify_postgres_backup(first, pgbackrest=d.pgbackrest)


def test_a_repository_that_would_hold_the_cluster_in_clear_is_refused(
    tmp_path: Path, pg_cluster: Callable[..., PgCluster]
) -> None:
    d = _deploy(tmp_path, pg_cluster, cipher=False)
    vault = d.open()
    try:
        with pytest.raises(ConfigurationError, match="does not encrypt"):
            d.backup(vault, tmp_path / "backup")
        # Nothing was written, and the refusal cost no entry.
        assert not (tmp_path / "backup").exists()
    finally:
        vault.close()


def test_the_servers_own_role_cannot_take_a_backup_that_would_lock_writers_out(
    tmp_path: Path, deployment: Deployment
) -> None:
    d = deployment
    vault = d.open()
    signer = log_note_signer(d.keys / "log.key", passphrase=PASSPHRASE)
    try:
        with pytest.raises(ConfigurationError, match="owner"):
            backup_postgres(
                vault,
                tmp_path / "backup",
                signer=signer,
                database=d.url(APP),
                pgbackrest=d.pgbackrest,
            )
    finally:
        vault.close()
    assert not (tmp_path / "backup").exists()


def test_backup_verify_and_restore_of_postgresql_from_the_command_line(
    tmp_path: Path, deployment: Deployment
) -> None:
    d = deployment
    vault = d.open()
    try:
        vault.ingest(vault.operator, _people(tmp_path / "people.jsonl", 30, seed=7))
        stored = _stored_ids(vault)
    finally:
        vault.close()
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE,
        "CUSTODES_PGBACKREST": " ".join(d.pgbackrest.command),
        "CUSTODES_PGBACKREST_STANZA": STANZA,
        "CUSTODES_PG_CTL": " ".join(d.pg_ctl.command),
    }

    def custodes(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "custodes", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return str(done.stdout)

    said = custodes(
        "backup",
        "create",
        "--vault",
        str(d.vault_dir),
        "--database",
        d.url(APP),
        "--owner-database",
        d.url(OWNER),
        "--type",
        "full",
        "--to",
        str(tmp_path / "backup"),
    )
    assert f"{len(stored):,} records" in said and "pgBackRest backup" in said
    said = custodes("backup", "verify", str(tmp_path / "backup"))
    assert "verified" in said and "records per type" in said
    with _restored_cluster(d, "from-cli") as (pg_data, port):
        said = custodes(
            "restore",
            str(tmp_path / "backup"),
            "--vault",
            str(tmp_path / "restored"),
            "--keys",
            str(tmp_path / "restored-keys"),
            "--database",
            d.url(OWNER, port=port),
            "--pg-data",
            str(pg_data),
            "--to",
            "latest",
        )
        assert f"{len(stored):,} records" in said
        back = open_vault(tmp_path / "restored", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
        try:
            assert _stored_ids(back) == stored
        finally:
            back.close()
