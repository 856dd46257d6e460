"""The access log as appenders and auditors see it: a durable, append-only Merkle tree.

Threat model row 16: an access that is not on the log did not happen, so `append` must
never return before its entry is stored, must refuse when it cannot store it, and every
signed checkpoint must extend the one before it, across restarts and rollbacks alike.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from custodes.audit import AccessEntry, AccessLog, AuditKeys, Outcome
from custodes.audit.checkpoint import (
    Checkpoint,
    LogSigner,
    NoteVerifier,
    create_log_key,
)
from custodes.audit.merkle import (
    leaf_hash,
    peak_positions,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from custodes.audit.verify import verify_log
from custodes.bootstrap import create_vault, open_vault
from custodes.crypto import KeyMaterial
from custodes.errors import AuditUnavailable, LogMoved, StorageError, TamperDetected
from custodes.storage import LogAppend, MemoryStorage, SQLiteStorage, Storage
from custodes.storage.base import Rebuild
from custodes.vault import Vault
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    postgres_dsn_fixture,
    postgres_server_fixture,
)

ORIGIN = "custodes.test/access-log"


def entry(n: int, *records: str) -> AccessEntry:
    return AccessEntry(
        actor="t.investigator",
        role="investigator",
        action="person:record:read",
        outcome=Outcome.GRANTED,
        time=1_700_000_000.0 + n,
        purpose=f"access log test {n}",
        records=records,
        result_count=len(records),
    )


def open_storage(backend: str, path: Path) -> Storage:
    return SQLiteStorage(path / "log.db") if backend == "sqlite" else MemoryStorage()


@pytest.fixture(scope="module")
def keys() -> AuditKeys:
    return AuditKeys(KeyMaterial(os.urandom(16), 1, {1: os.urandom(32)}, os.urandom(32)))


@pytest.fixture
def signer(tmp_path: Path) -> LogSigner:
    return create_log_key(
        tmp_path / "keys" / "log.key", origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF
    )


@pytest.fixture(params=["memory", "sqlite"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    store = open_storage(request.param, tmp_path)
    yield store
    store.close()


@pytest.fixture
def sqlite_storage(tmp_path: Path) -> Iterator[Storage]:
    store = open_storage("sqlite", tmp_path)
    yield store
    store.close()


def make_log(storage: Storage, keys: AuditKeys, signer: LogSigner, **options: Any) -> AccessLog:
    return AccessLog(storage, keys, signer, origin=ORIGIN, **options)


def stored_leaves(storage: Storage) -> list[bytes]:
    return [leaf_hash(data) for _, data in storage.log_entries()]


def signed(signer: LogSigner, note: bytes) -> Checkpoint:
    return Checkpoint.parse_body(NoteVerifier.from_key_string(signer.verifier_key).verify(note))


def stored_checkpoints(storage: Storage, signer: LogSigner) -> list[Checkpoint]:
    found = []
    for size, note in storage.checkpoints():
        cp = signed(signer, note)
        assert cp.size == size and cp.origin == ORIGIN
        found.append(cp)
    return found


def assert_each_extends_the_last(log: AccessLog, checkpoints: list[Checkpoint]) -> None:
    for old, new in itertools.pairwise(checkpoints):
        assert old.size < new.size
        proof = log.consistency_proof(old.size, new.size)
        verify_consistency(old.size, new.size, old.root, new.root, proof)


# -- appending and proving ------------------------------------------------------------


def test_appends_return_consecutive_indexes_and_the_root_covers_every_stored_entry(
    storage: Storage, keys: AuditKeys, signer: LogSigner
) -> None:
    log = make_log(storage, keys, signer)
    indexes = [log.append(entry(n, f"rec-{n % 7}")) for n in range(45)]
    assert indexes == list(range(45))
    assert log.size == storage.log_size() == 45
    leaves = stored_leaves(storage)
    assert len(leaves) == 45
    assert log.root() == root_of(leaves)
    for index, stored in log.entries():
        assert stored.purpose == f"access log test {index}"


def test_stored_nodes_prove_inclusion_and_consistency_against_signed_checkpoints(
    storage: Storage, keys: AuditKeys, signer: LogSigner
) -> None:
    log = make_log(storage, keys, signer, checkpoint_every=8)
    for n in range(37):
        log.append(entry(n))
    log.checkpoint()
    checkpoints = stored_checkpoints(storage, signer)
    assert [cp.size for cp in checkpoints] == [8, 16, 24, 32, 37]
    leaves = stored_leaves(storage)
    for cp in checkpoints:
        assert cp.root == root_of(leaves[: cp.size])
        for index in range(cp.size):
            proof = log.inclusion_proof(index, cp.size)
            verify_inclusion(leaves[index], index, cp.size, proof, cp.root)
    for old in checkpoints:
        for new in checkpoints:
            if old.size < new.size:
                proof = log.consistency_proof(old.size, new.size)
                verify_consistency(old.size, new.size, old.root, new.root, proof)


def test_subject_references_find_entries_and_private_details_open_again(
    storage: Storage, keys: AuditKeys, signer: LogSigner
) -> None:
    log = make_log(storage, keys, signer)
    log.append(entry(0, "alice"))
    log.append(entry(1, "bob"), private={"values": {"phone": "13800000000"}})
    log.append(entry(2, "alice", "bob", "alice"))
    assert [i for i, _ in log.entries_for(["alice"])] == [0, 2]
    assert [i for i, _ in log.entries_for(["bob"])] == [1, 2]
    assert log.private_details(1) == {"values": {"phone": "13800000000"}}
    assert log.private_details(0) is None
    _, second = next(log.entries(1, 2))
    assert second.private_hash is not None and len(second.subjects) == 1


# -- group commit ---------------------------------------------------------------------


def test_concurrent_appenders_share_commits_and_lose_nothing(
    sqlite_storage: Storage,
    keys: AuditKeys,
    signer: LogSigner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads, per_thread = 16, 50
    total = threads * per_thread
    commits = []
    write = sqlite_storage.log_append

    def counted(batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        commits.append(len(batch.entries))
        write(batch, rebuild)

    monkeypatch.setattr(sqlite_storage, "log_append", counted)
    log = make_log(sqlite_storage, keys, signer, checkpoint_every=100)
    start = threading.Barrier(threads)
    returned: list[list[int]] = [[] for _ in range(threads)]
    failures: list[BaseException] = []

    def appender(t: int) -> None:
        try:
            start.wait()
            for j in range(per_thread):
                returned[t].append(log.append(entry(t * 1000 + j, f"rec-{t}")))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    workers = [threading.Thread(target=appender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not failures

    indexes = sorted(i for got in returned for i in got)
    assert indexes == list(range(total))
    purposes = [e.purpose for _, e in log.entries()]
    expected = {
        f"access log test {t * 1000 + j}" for t in range(threads) for j in range(per_thread)
    }
    assert len(purposes) == total and set(purposes) == expected
    # Each appender got back the index its own entry was stored at.
    for t, got in enumerate(returned):
        for j, index in enumerate(got):
            assert next(log.entries(index, index + 1))[1].purpose == (
                f"access log test {t * 1000 + j}"
            )
    assert sum(commits) == total
    assert len(commits) < total // 4, f"{len(commits)} commits for {total} appends"

    report = verify_log(sqlite_storage, signer.verifier_key, origin=ORIGIN)
    assert report.entries == total and report.root == log.root()
    checkpoints = stored_checkpoints(sqlite_storage, signer)
    assert checkpoints and report.checkpoints == len(checkpoints)
    assert_each_extends_the_last(log, checkpoints)


# -- checkpoints ------------------------------------------------------------------------


def test_checkpoints_come_every_n_entries_and_on_demand_each_extending_the_last(
    storage: Storage, keys: AuditKeys, signer: LogSigner
) -> None:
    log = make_log(storage, keys, signer, checkpoint_every=10)
    for n in range(35):
        log.append(entry(n))
    assert [size for size, _ in storage.checkpoints()] == [10, 20, 30]
    note = log.checkpoint()
    assert signed(signer, note).size == 35
    assert log.latest_checkpoint() == (35, note)
    checkpoints = stored_checkpoints(storage, signer)
    assert [cp.size for cp in checkpoints] == [10, 20, 30, 35]
    assert signer.last_signed == (35, checkpoints[-1].root)
    assert_each_extends_the_last(log, checkpoints)
    # The count starts again from the checkpoint made on demand.
    for n in range(35, 45):
        log.append(entry(n))
    assert [size for size, _ in storage.checkpoints()] == [10, 20, 30, 35, 45]
    assert_each_extends_the_last(log, stored_checkpoints(storage, signer))


def test_a_quiet_log_is_checkpointed_once_its_interval_has_passed(
    storage: Storage, keys: AuditKeys, signer: LogSigner
) -> None:
    now = [1_700_000_000.0]
    log = make_log(
        storage, keys, signer, checkpoint_every=1000, checkpoint_interval=60.0, clock=lambda: now[0]
    )
    log.append(entry(0))
    assert storage.checkpoints() == []
    now[0] += 61
    log.append(entry(1))
    assert [size for size, _ in storage.checkpoints()] == [2]


def test_a_lookup_at_night_is_signed_without_waiting_for_the_morning(
    storage: Storage, keys: AuditKeys, signer: LogSigner
) -> None:
    # Appends sign only when the next one comes; a server also signs on a timer, so an
    # entry with no access after it is covered (and so tamper-evident) within a bound.
    log = make_log(storage, keys, signer, checkpoint_every=1000, checkpoint_interval=3600.0)
    log.append(entry(0))
    log.append(entry(1))
    assert storage.checkpoints() == []
    stop = log.keep_signing(0.01)
    try:
        for _ in range(1000):
            if storage.checkpoints():
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
    assert [size for size, _ in storage.checkpoints()] == [2]


# -- failing closed -------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        AuditUnavailable("the disk is full"),
        StorageError("the database is locked"),
        OSError(5, "Input/output error"),
        RuntimeError("an unexpected fault in the backend"),
    ],
    ids=["audit-unavailable", "storage-error", "os-error", "unexpected"],
)
def test_append_fails_closed_while_the_store_refuses_and_recovers_after(
    storage: Storage,
    keys: AuditKeys,
    signer: LogSigner,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
) -> None:
    log = make_log(storage, keys, signer, checkpoint_every=4)
    for n in range(5):
        log.append(entry(n, "before"))
    size, root = log.size, log.root()
    write = storage.log_append
    broken = [True]

    def flaky(batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        if broken[0]:
            raise failure
        write(batch, rebuild)

    monkeypatch.setattr(storage, "log_append", flaky)
    for n in range(5, 8):
        with pytest.raises(AuditUnavailable):
            log.append(entry(n, "refused"), private={"values": {"q": "x"}})
    assert (log.size, log.root()) == (size, root)
    assert storage.log_size() == size and len(stored_leaves(storage)) == size
    assert storage.log_node(0, size) is None and storage.log_detail(size) is None
    assert log.entries_for(["refused"]) == []

    broken[0] = False
    assert log.append(entry(8, "after")) == size
    assert log.root() == root_of(stored_leaves(storage))
    report = verify_log(storage, signer.verifier_key, origin=ORIGIN)
    assert report.entries == size + 1
    assert_each_extends_the_last(log, stored_checkpoints(storage, signer))


def test_every_appender_sharing_a_failed_commit_is_refused(
    sqlite_storage: Storage,
    keys: AuditKeys,
    signer: LogSigner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fault of any type must reach every appender of the batch: none may return as if
    # its entry were stored.
    log = make_log(sqlite_storage, keys, signer)
    threads = 8
    start = threading.Barrier(threads)

    def broken(batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        raise RuntimeError("an unexpected fault in the backend")

    monkeypatch.setattr(sqlite_storage, "log_append", broken)
    outcomes: list[object] = []

    def appender(t: int) -> None:
        start.wait()
        for j in range(10):
            try:
                outcomes.append(log.append(entry(t * 100 + j)))
            except AuditUnavailable as exc:
                outcomes.append(exc)

    workers = [threading.Thread(target=appender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(outcomes) == threads * 10
    assert all(isinstance(o, AuditUnavailable) for o in outcomes), outcomes
    assert log.size == sqlite_storage.log_size() == 0


def test_a_commit_the_database_aborts_partway_leaves_no_trace(
    tmp_path: Path, sqlite_storage: Storage, keys: AuditKeys, signer: LogSigner
) -> None:
    log = make_log(sqlite_storage, keys, signer)
    for n in range(3):
        log.append(entry(n, "before"), private={"values": {"n": str(n)}})
    size, root = log.size, log.root()
    # The disk fills up after the entry and its nodes are written, before its subjects.
    with contextlib.closing(sqlite3.connect(tmp_path / "log.db-log")) as db:
        db.execute(
            "CREATE TRIGGER disk_full BEFORE INSERT ON log_subjects"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
        db.commit()
        with pytest.raises(AuditUnavailable):
            log.append(entry(3, "refused"), private={"values": {"n": "3"}})
        assert sqlite_storage.log_size() == size
        assert sum(1 for _ in sqlite_storage.log_entries()) == size
        assert sqlite_storage.log_node(0, size) is None
        assert sqlite_storage.log_detail(size) is None
        assert (log.size, log.root()) == (size, root)
        db.execute("DROP TRIGGER disk_full")
        db.commit()
    assert log.append(entry(4, "after")) == size
    assert verify_log(sqlite_storage, signer.verifier_key).entries == size + 1


# -- restarts and rollbacks -----------------------------------------------------------


def keyring_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "test.keyring"


def log_key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "test.logkey"


def new_vault(tmp_path: Path, checkpoint_every: int = 1000) -> Vault:
    return create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        checkpoint_every=checkpoint_every,
        keyring_path=keyring_path(tmp_path),
        log_key_path=log_key_path(tmp_path),
    )


def reopen(tmp_path: Path, checkpoint_every: int = 1000) -> Vault:
    return open_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        hash_cost=FAST_HASH,
        checkpoint_every=checkpoint_every,
        keyring_path=keyring_path(tmp_path),
        log_key_path=log_key_path(tmp_path),
    )


@contextlib.contextmanager
def opened(factory: Callable[[], Vault]) -> Iterator[Vault]:
    vault = factory()
    try:
        yield vault
    finally:
        vault.close()


def verifier_key(vault: Vault) -> str:
    key = vault._storage.get_meta("log_verifier_key")
    assert key is not None
    return key.decode()


def test_reopened_vault_continues_the_same_tree(tmp_path: Path) -> None:
    with opened(lambda: new_vault(tmp_path, checkpoint_every=10)) as vault:
        for n in range(23):
            vault._log.append(entry(n, f"rec-{n}"))
        size, root = vault._log.size, vault._log.root()
        first = vault._log.checkpoint()
    with opened(lambda: reopen(tmp_path, checkpoint_every=10)) as vault:
        log = vault._log
        assert (log.size, log.root()) == (size, root)
        assert log.latest_checkpoint() == (size, first)
        assert log.append(entry(100, "rec-0")) == size
        for n in range(101, 110):
            log.append(entry(n))
        assert log.root() == root_of(stored_leaves(vault._storage))
        assert [i for i, _ in log.entries_for(["rec-0"])] == [0, size]
        log.checkpoint()
        report = verify_log(vault._storage, verifier_key(vault), origin=log.origin)
        assert report.entries == report.latest_signed == size + 10
        verifier = NoteVerifier.from_key_string(verifier_key(vault))
        checkpoints = [
            Checkpoint.parse_body(verifier.verify(note)) for _, note in vault._storage.checkpoints()
        ]
        assert_each_extends_the_last(log, checkpoints)


def rolled_back_vault(tmp_path: Path) -> Path:
    """A vault whose log signed size 30 after a copy of its database was taken at size 12."""
    with opened(lambda: new_vault(tmp_path, checkpoint_every=10)) as vault:
        for n in range(12):
            vault._log.append(entry(n))
    database = tmp_path / "vault" / "vault.db"
    files = ("vault.db", "vault.db-log")  # the records' file and the log's
    for name in files:
        shutil.copy2(database.with_name(name), tmp_path / f"{name}.old")
    with opened(lambda: reopen(tmp_path, checkpoint_every=10)) as vault:
        for n in range(12, 30):
            vault._log.append(entry(n))
        assert vault._log.checkpoint()
    for name in files:
        for leftover in (database.with_name(f"{name}-wal"), database.with_name(f"{name}-shm")):
            leftover.unlink(missing_ok=True)
        shutil.copy2(tmp_path / f"{name}.old", database.with_name(name))
    return database


def test_a_vault_rolled_back_to_an_older_copy_does_not_open(tmp_path: Path) -> None:
    # A restored older copy, or a log cut with its checkpoints: the signer's own state,
    # kept with its key out of the database writer's reach, already signed more. Nothing
    # is served from it, and the host commands that would say why still work.
    rolled_back_vault(tmp_path)
    with pytest.raises(TamperDetected, match="holds 12 entries but its signer already signed 30"):
        reopen(tmp_path, checkpoint_every=10)


def test_a_rolled_back_log_regrown_past_its_last_size_does_not_open(
    tmp_path: Path, keys: AuditKeys
) -> None:
    # The rolled-back copy takes new entries (here through a log of another key, since its
    # own refuses to open) until it is longer than what was signed: same sizes, another
    # history. The tree at the signed size is not the one signed.
    database = rolled_back_vault(tmp_path)
    storage = SQLiteStorage(database)
    try:
        other = create_log_key(
            tmp_path / "other" / "log.key", origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF
        )
        regrowing = AccessLog(storage, keys, other, origin=ORIGIN, checkpoint_every=1000)
        for n in range(12, 40):
            regrowing.append(entry(n + 1000))
    finally:
        storage.close()
    with pytest.raises(TamperDetected, match="not the ones its signer signed"):
        reopen(tmp_path, checkpoint_every=1000)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_writer_racing_a_busy_one_on_the_same_log_is_never_starved(
    backend: str,
    tmp_path: Path,
    keys: AuditKeys,
    signer: LogSigner,
    request: pytest.FixtureRequest,
) -> None:
    # Two processes' logs on one database (two handles, as two server workers hold), each
    # appending from several threads as fast as it can: the one that loses a race must
    # still get its entries in, never be refused for a log that keeps moving.
    if backend == "sqlite":
        stores: list[Storage] = [open_storage("sqlite", tmp_path) for _ in range(2)]
    else:
        from custodes.storage import PostgresStorage

        dsn = request.getfixturevalue("postgres_dsn")()
        stores = [PostgresStorage(dsn) for _ in range(2)]
    raced, taken_up = [0], [0]
    for store in stores:
        write = store.log_append

        def counted(batch: LogAppend, rebuild: Rebuild | None = None, write: Any = write) -> None:
            assert rebuild is not None

            def counted_rebuild(stored: int, nodes: Mapping[tuple[int, int], bytes]) -> LogAppend:
                taken_up[0] += 1
                if backend == "postgresql":
                    # Read with the size, in the same round trip: both frontiers, whole.
                    wanted = {*peak_positions(stored), *peak_positions(batch.first_index)}
                    assert wanted <= set(nodes)
                return rebuild(stored, nodes)

            try:
                write(batch, counted_rebuild)
            except LogMoved:
                raced[0] += 1
                raise

        setattr(store, "log_append", counted)  # noqa: B010 - an instance's own method
    logs = [make_log(store, keys, signer, checkpoint_every=10_000) for store in stores]
    threads, per_thread = 8, 250
    failures: list[BaseException] = []
    start = threading.Barrier(threads * 2)

    def appender(log: AccessLog, t: int) -> None:
        start.wait()
        for n in range(per_thread):
            try:
                log.append(entry(t * 1000 + n, f"r{t}-{n}"))
            except BaseException as exc:
                failures.append(exc)

    workers = [
        threading.Thread(target=appender, args=(log, w * threads + t))
        for w, log in enumerate(logs)
        for t in range(threads)
    ]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert not failures, repr(failures[0].__cause__)
        assert raced[0] + taken_up[0] > 0, "the two writers never met: no race was run"
        # Every race lost was made good under the storage's lock, none from outside.
        assert taken_up[0] > 0 and raced[0] == 0
        total = threads * 2 * per_thread
        assert stores[0].log_size() == total
        report = verify_log(stores[0], signer.verifier_key, origin=ORIGIN)
        assert report.entries == total
    finally:
        for store in stores:
            store.close()
