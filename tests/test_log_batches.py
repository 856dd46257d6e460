"""The access log under load: batches of bounded size, each stored whole or not at all,
checkpoints signed beside the commits, and proofs read a batch at a time.

Threat model row 16 (an access not on the log did not happen): an appender is released
only once the commit that carries its entry is durable, and every appender of a commit
that failed is refused, however the entries were handed over; a proof is made from the
stored tree alone, and a node missing from it refuses the proof.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import custodes.audit.log as log_module
from custodes.audit import AccessEntry, AccessLog, AuditKeys, Outcome
from custodes.audit.checkpoint import Checkpoint, LogSigner, create_log_key
from custodes.audit.log import KeyedSha256
from custodes.audit.merkle import (
    inclusion_proof,
    inclusion_proof_plan,
    inclusion_proof_positions,
    leaf_hash,
    node_hash,
    verify_inclusion,
)
from custodes.audit.verify import verify_log
from custodes.crypto import KeyMaterial
from custodes.errors import AuditUnavailable, TamperDetected
from custodes.storage import LogAppend, MemoryStorage, SQLiteStorage, Storage
from custodes.storage.base import Rebuild
from tests.conftest import FAST_KDF, PASSPHRASE
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    postgres_dsn_fixture,
    postgres_server_fixture,
)

ORIGIN = "custodes.test/log-batches"


def entry(n: int, *records: str) -> AccessEntry:
    return AccessEntry(
        actor="t.investigator",
        role="investigator",
        action="person:record:read",
        outcome=Outcome.GRANTED,
        time=1_700_000_000.0 + n,
        purpose=f"batch test {n}",
        records=records,
        result_count=len(records),
    )


@pytest.fixture(scope="module")
def keys() -> AuditKeys:
    return AuditKeys(KeyMaterial(os.urandom(16), 1, {1: os.urandom(32)}, os.urandom(32)))


@pytest.fixture
def signer(tmp_path: Path) -> LogSigner:
    return create_log_key(
        tmp_path / "keys" / "log.key", origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "sqlite":
        store: Any = SQLiteStorage(tmp_path / "log.db")
    else:
        from custodes.storage.postgres import PostgresStorage

        store = PostgresStorage(request.getfixturevalue("postgres_dsn")(), max_size=4)
    yield store
    store.close()


def counted_commits(storage: Storage, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    sizes: list[int] = []
    write = storage.log_append

    def counted(batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        sizes.append(len(batch.entries))
        write(batch, rebuild)

    monkeypatch.setattr(storage, "log_append", counted)
    return sizes


def run_threads(count: int, work: Callable[[int], None]) -> list[BaseException]:
    start = threading.Barrier(count)
    failures: list[BaseException] = []

    def run(t: int) -> None:
        start.wait()
        try:
            work(t)
        except BaseException as exc:  # reported by the caller
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failures


def test_many_threads_appends_land_in_commits_no_larger_than_the_cap_each_proven(
    storage: Storage, keys: AuditKeys, signer: LogSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_module, "MAX_BATCH", 8)
    commits = counted_commits(storage, monkeypatch)
    log = AccessLog(storage, keys, signer, origin=ORIGIN, checkpoint_every=64)
    threads, per_thread = 24, 12
    returned: dict[int, int] = {}

    def appender(t: int) -> None:
        for j in range(per_thread):
            n = t * 1000 + j
            returned[n] = log.append(entry(n, f"rec-{t}"))

    assert run_threads(threads, appender) == []
    total = threads * per_thread
    assert sorted(returned.values()) == list(range(total))
    # Each appender was told the very index its entry is stored at, in the tree's order.
    stored = {e.purpose: i for i, e in log.entries()}
    assert all(stored[f"batch test {n}"] == index for n, index in returned.items())
    assert sum(commits) == total and max(commits) <= 8
    assert len(commits) < total  # shared commits, not one an entry
    log.checkpoint()
    report = verify_log(storage, signer.verifier_key, origin=ORIGIN)
    assert report.entries == total and report.root == log.root()
    proofs = log.inclusion_proofs(range(total), total)
    for (index, data), proof in zip(storage.log_entries(), proofs, strict=True):
        verify_inclusion(leaf_hash(data), index, total, proof, log.root())


def test_entries_handed_over_at_once_land_in_order_in_commits_of_the_cap(
    storage: Storage, keys: AuditKeys, signer: LogSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log_module, "MAX_BATCH", 16)
    commits = counted_commits(storage, monkeypatch)
    log = AccessLog(storage, keys, signer, origin=ORIGIN)
    subject = keys.commitment("rec-x")
    items = [(entry(n).encode(), [subject], None) for n in range(40)]
    assert log.append_encoded_many(items) == list(range(40))
    assert commits == [16, 16, 8]
    assert [data for _, data in storage.log_entries()] == [e for e, _, _ in items]
    assert storage.log_subject_entries(subject) == list(range(40))


def test_entries_handed_over_in_batches_and_by_single_appenders_at_once_all_land_once(
    tmp_path: Path, keys: AuditKeys, signer: LogSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sequencer's batches and the appenders of its own process share one queue.
    storage = SQLiteStorage(tmp_path / "log.db")
    monkeypatch.setattr(log_module, "MAX_BATCH", 8)
    log = AccessLog(storage, keys, signer, origin=ORIGIN, checkpoint_every=50)
    returned: dict[int, int] = {}

    def work(t: int) -> None:
        if t < 2:  # handed over, 20 at a time
            for round_ in range(5):
                ns = [10_000 * (t + 1) + 100 * round_ + j for j in range(20)]
                got = log.append_encoded_many([(entry(n).encode(), [], None) for n in ns])
                assert None not in got
                returned.update(zip(ns, [i for i in got if i is not None], strict=True))
        else:
            for j in range(15):
                returned[t * 100 + j] = log.append(entry(t * 100 + j))

    try:
        assert run_threads(8, work) == []
        total = 2 * 100 + 6 * 15
        assert sorted(returned.values()) == list(range(total))
        stored = {e.purpose: i for i, e in log.entries()}
        assert all(stored[f"batch test {n}"] == index for n, index in returned.items())
        # A batch handed over keeps its order in the log.
        for t in range(2):
            for round_ in range(5):
                ns = [10_000 * (t + 1) + 100 * round_ + j for j in range(20)]
                indexes = [returned[n] for n in ns]
                assert indexes == sorted(indexes)
        assert verify_log(storage, signer.verifier_key, origin=ORIGIN).entries == total
    finally:
        storage.close()


def test_a_failed_commit_of_entries_handed_over_refuses_each_of_them_and_stores_none(
    tmp_path: Path, keys: AuditKeys, signer: LogSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = SQLiteStorage(tmp_path / "log.db")
    monkeypatch.setattr(log_module, "MAX_BATCH", 4)
    write = storage.log_append
    calls: list[int] = []

    def second_fails(batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        calls.append(len(batch.entries))
        if len(calls) == 2:
            raise AuditUnavailable("the disk went away for one commit")
        write(batch, rebuild)

    monkeypatch.setattr(storage, "log_append", second_fails)
    log = AccessLog(storage, keys, signer, origin=ORIGIN)
    items = [(entry(n).encode(), [], None) for n in range(10)]
    try:
        got = log.append_encoded_many(items)
        # The first commit landed, the second not at all, the third on top of the first.
        assert got == [0, 1, 2, 3, None, None, None, None, 4, 5]
        stored = [data for _, data in storage.log_entries()]
        assert stored == [e for e, _, _ in items[:4] + items[8:]]
        assert verify_log(storage, signer.verifier_key, origin=ORIGIN).entries == 6
    finally:
        storage.close()


def test_every_waiter_of_a_batch_that_fails_gets_the_error_and_nothing_is_stored(
    tmp_path: Path, keys: AuditKeys, signer: LogSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = SQLiteStorage(tmp_path / "log.db")
    write = storage.log_append
    entered, release = threading.Event(), threading.Event()

    def held_then_refused(batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        # The first commit is held until every other appender is queued behind it; the
        # commit that takes them all up is refused.
        if not entered.is_set():
            entered.set()
            release.wait(10)
            write(batch, rebuild)
            return
        raise AuditUnavailable("the commit was refused")

    monkeypatch.setattr(storage, "log_append", held_then_refused)
    log = AccessLog(storage, keys, signer, origin=ORIGIN)
    first: list[int] = []
    leader = threading.Thread(target=lambda: first.append(log.append(entry(0))))
    leader.start()
    assert entered.wait(10)
    outcomes: list[object] = []
    waiters = []
    for n in range(1, 9):
        waiter = threading.Thread(target=lambda n=n: outcomes.append(_outcome(log, n)))
        waiter.start()
        waiters.append(waiter)
    while len(log._pending) < 8:  # every waiter queued behind the held commit
        threading.Event().wait(0.001)
    release.set()
    leader.join()
    for waiter in waiters:
        waiter.join()
    try:
        assert first == [0]
        assert len(outcomes) == 8 and all(isinstance(o, AuditUnavailable) for o in outcomes)
        assert storage.log_size() == log.size == 1
    finally:
        storage.close()


def _outcome(log: AccessLog, n: int) -> object:
    try:
        return log.append(entry(n))
    except AuditUnavailable as exc:
        return exc


def test_appends_go_on_while_a_checkpoint_is_being_signed(
    tmp_path: Path, keys: AuditKeys, signer: LogSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = SQLiteStorage(tmp_path / "log.db")
    signing, release = threading.Event(), threading.Event()
    sign = LogSigner.sign_checkpoint

    gave_up: list[bool] = []

    def slow_sign(self: LogSigner, cp: Checkpoint, proof: Sequence[bytes]) -> bytes:
        signing.set()
        # Released by the test once the other appends are in; had they waited for this
        # signature, it would give up waiting instead (a guard, not a timing).
        gave_up.append(not release.wait(10))
        return sign(self, cp, proof)

    monkeypatch.setattr(LogSigner, "sign_checkpoint", slow_sign)
    log = AccessLog(storage, keys, signer, origin=ORIGIN, checkpoint_every=2)
    log.append(entry(0))
    crossing = threading.Thread(target=log.append, args=(entry(1),))
    crossing.start()
    try:
        assert signing.wait(10)
        # The entry that crossed the mark is stored; its appender is signing. Others'
        # entries are not held up behind the signature.
        assert [log.append(entry(n)) for n in range(2, 6)] == [2, 3, 4, 5]
    finally:
        release.set()
        crossing.join()
    try:
        assert gave_up == [False]
        assert storage.checkpoints()[0][0] == 2
        log.checkpoint()
        report = verify_log(storage, signer.verifier_key, origin=ORIGIN)
        assert report.entries == 6 and report.checkpoints >= 2
    finally:
        storage.close()


def test_proofs_for_many_entries_read_the_stored_tree_once_and_match_node_by_node(
    storage: Storage, keys: AuditKeys, signer: LogSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = AccessLog(storage, keys, signer, origin=ORIGIN)
    log.append_encoded_many([(entry(n).encode(), [], None) for n in range(300)])
    reads: list[int] = []
    read_nodes = storage.log_nodes

    def counted(positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        reads.append(len(positions))
        return read_nodes(positions)

    monkeypatch.setattr(storage, "log_nodes", counted)
    monkeypatch.setattr(storage, "log_node", _never)
    fresh = AccessLog(storage, keys, signer, origin=ORIGIN)
    reads.clear()  # the frontier read at opening
    for size in (300, 257, 129):
        proofs = fresh.inclusion_proofs(list(range(size)), size)
        assert len(reads) <= 1  # the nodes kept from the last call may cover them all
        reads.clear()
        expected = [inclusion_proof(i, size, _stored_node(read_nodes)) for i in range(size)]
        assert proofs == expected
    assert fresh.inclusion_proof(5, 300) == inclusion_proof(5, 300, _stored_node(read_nodes))


def _stored_node(
    read_nodes: Callable[[Sequence[tuple[int, int]]], dict[tuple[int, int], bytes]],
) -> Callable[[int, int], bytes]:
    def node(level: int, index: int) -> bytes:
        return read_nodes([(level, index)])[level, index]

    return node


def _never(level: int, index: int) -> bytes | None:
    raise AssertionError("a proof read a node by itself")


def test_a_proof_that_needs_a_node_the_store_lacks_is_refused(
    keys: AuditKeys, signer: LogSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = MemoryStorage()
    log = AccessLog(storage, keys, signer, origin=ORIGIN)
    log.append_encoded_many([(entry(n).encode(), [], None) for n in range(20)])
    read_nodes = storage.log_nodes

    def without_a_leaf(positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        found = read_nodes(positions)
        found.pop((0, 6), None)
        return found

    monkeypatch.setattr(storage, "log_nodes", without_a_leaf)
    fresh = AccessLog(storage, keys, signer, origin=ORIGIN)
    with pytest.raises(TamperDetected, match="node 0/6"):
        fresh.inclusion_proofs([7, 3], 20)


def test_a_proof_plan_names_exactly_the_stored_nodes_the_proof_reads() -> None:
    for size in range(1, 70):
        for index in range(size):
            read: list[tuple[int, int]] = []

            def recording(level: int, idx: int, read: list[tuple[int, int]] = read) -> bytes:
                read.append((level, idx))
                return node_hash(level.to_bytes(16, "big"), idx.to_bytes(16, "big"))[:32]

            proof = inclusion_proof(index, size, recording)
            assert inclusion_proof_positions(index, size) == read
            assert len(inclusion_proof_plan(index, size)) == len(proof)


def test_the_subject_key_makes_the_same_hmac_as_the_standard_library() -> None:
    # RFC 4231 test case 2 (a key shorter than a block), then keys of every awkward length.
    assert KeyedSha256(b"Jefe").digest(b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )
    for length in (0, 1, 32, 63, 64, 65, 200):
        key = os.urandom(length)
        for message in (b"", b"rec-1", os.urandom(3000)):
            assert KeyedSha256(key).digest(message) == hmac.digest(key, message, "sha256")


def test_sealed_details_never_share_a_nonce(keys: AuditKeys) -> None:
    nonces = {keys.seal_private({"n": n})[:12] for n in range(3000)}
    assert len(nonces) == 3000
    assert keys.open_private(keys.seal_private({"q": "x"})) == {"q": "x"}


def test_a_forked_worker_never_seals_with_a_nonce_its_parent_drew(keys: AuditKeys) -> None:
    keys.seal_private({"n": 0})  # the parent has nonces drawn and waiting
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, keys.seal_private({"n": 1})[:12])
        finally:
            os._exit(0)
    os.close(write)
    try:
        childs = os.read(read, 12)
    finally:
        os.close(read)
        os.waitpid(child, 0)
    parents = {keys.seal_private({"n": n})[:12] for n in range(2000)}
    assert len(childs) == 12 and childs not in parents
