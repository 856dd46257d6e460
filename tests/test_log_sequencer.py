"""The log sequencer: one process appends the access-log entries of every server worker.

Threat model row 16 (an access not on the log did not happen): an entry handed to the
sequencer is answered only once it is durable, an entry whose answer is lost is refused,
never appended twice, and a worker that cannot reach the sequencer appends by itself. A
local program that is not one of the server's workers cannot put entries on the log.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from custodes.audit import AccessEntry, AccessLog, AuditKeys, Outcome
from custodes.audit.checkpoint import LogSigner, create_log_key
from custodes.audit.sequencer import (
    SECRET_BYTES,
    Request,
    SequencerAddress,
    SequencerClient,
    SequencerUnreachable,
    _read_exactly,
    _read_request,
    serve,
)
from custodes.audit.verify import verify_log
from custodes.crypto import KeyMaterial
from custodes.errors import AuditUnavailable
from custodes.storage import SQLiteStorage
from tests.conftest import FAST_KDF, PASSPHRASE

ORIGIN = "custodes.test/log-sequencer"


def _entry(n: int, *records: str) -> AccessEntry:
    return AccessEntry(
        actor="t.investigator",
        role="investigator",
        action="person:record:read",
        outcome=Outcome.GRANTED,
        time=1_700_000_000.0 + n,
        purpose=f"sequencer test {n}",
        records=records,
        result_count=len(records),
    )


@pytest.fixture
def signer(tmp_path: Path) -> LogSigner:
    return create_log_key(
        tmp_path / "keys" / "log.key", origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF
    )


@pytest.fixture
def keys() -> AuditKeys:
    return AuditKeys(KeyMaterial(os.urandom(16), 1, {1: os.urandom(32)}, os.urandom(32)))


class _Processes:
    """The sequencer's log and the workers' logs, each on a connection of its own to one
    SQLite file, as the server's processes each open the vault for themselves."""

    def __init__(self, directory: Path, keys: AuditKeys, signer: LogSigner) -> None:
        self._directory, self._keys, self._signer = directory, keys, signer
        self._stores: list[SQLiteStorage] = []
        self._clients: list[SequencerClient] = []

    def log(self) -> AccessLog:
        store = SQLiteStorage(self._directory / "log.db")
        self._stores.append(store)
        return AccessLog(store, self._keys, self._signer, origin=ORIGIN, checkpoint_every=50)

    def worker(self, address: SequencerAddress) -> AccessLog:
        """A worker's log, handing its entries to the sequencer at `address`."""
        log = self.log()
        client = SequencerClient(address)
        self._clients.append(client)
        log.sequence_through(client)
        return log

    def close(self) -> None:
        for client in self._clients:
            client.close()
        for store in self._stores:
            store.close()


@pytest.fixture
def processes(tmp_path: Path, keys: AuditKeys, signer: LogSigner) -> Iterator[_Processes]:
    found = _Processes(tmp_path, keys, signer)
    yield found
    found.close()


@contextlib.contextmanager
def _running(log: AccessLog, address: SequencerAddress) -> Iterator[threading.Event]:
    listener = address.listen()
    stop = threading.Event()
    thread = threading.Thread(
        target=serve, args=(listener, address.secret, log.append_encoded_many, stop), daemon=True
    )
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def _closed_without_answer(conn: socket.socket) -> bool:
    """Whether the sequencer ended the connection (closed, or reset over unread bytes)
    rather than answer."""
    try:
        return conn.recv(8) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def address() -> SequencerAddress:
    return SequencerAddress.new()


def test_entries_handed_over_by_two_workers_land_once_each_in_one_verified_log(
    processes: _Processes, address: SequencerAddress, signer: LogSigner
) -> None:
    sequencer = processes.log()
    workers = [processes.worker(address), processes.worker(address)]
    indexes: list[int] = []
    lock = threading.Lock()

    def appender(worker: AccessLog, base: int) -> None:
        for n in range(40):
            index = worker.append(_entry(base + n, f"rec-{base + n}"), private={"q": n})
            with lock:
                indexes.append(index)

    with _running(sequencer, address):
        threads = [
            threading.Thread(target=appender, args=(workers[i % 2], 1000 * i)) for i in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(indexes) == list(range(240))
    # The sequencer wrote them all: the workers' own trees never moved, yet each knows the
    # log reached at least as far as its own last entry.
    assert all(worker.root() == workers[0].root() for worker in workers)
    assert max(w.size for w in workers) == 240
    # Signed as it grew, every 50 entries, by the one process that wrote it.
    report = verify_log(processes.log()._storage, signer.verifier_key)
    assert report.entries == 240 and report.checkpoints == 4
    # Each entry holds the subject and the sealed details its worker made.
    assert [i for i, _ in sequencer.entries_for(["rec-1005"])] != []
    assert sequencer.private_details(0) is not None


def test_a_worker_appends_by_itself_while_no_sequencer_listens(
    processes: _Processes, address: SequencerAddress
) -> None:
    worker = processes.worker(address)
    assert [worker.append(_entry(n, "rec-a")) for n in range(3)] == [0, 1, 2]
    assert worker.size == 3
    # And through it again once it is up, on the same tree.
    with _running(processes.log(), address):
        assert worker.append(_entry(3, "rec-a")) == 3


def test_an_entry_whose_answer_is_lost_is_refused_and_not_appended_again(
    processes: _Processes, address: SequencerAddress
) -> None:
    # A sequencer that dies holding the entry: it may or may not have stored it, and the
    # worker must neither answer the read nor log the access a second time.
    listener = address.listen()
    taken = threading.Event()

    def dies_after_reading() -> None:
        conn, _ = listener.accept()
        with conn:
            # The secret, then the whole request; then gone without an answer.
            assert _read_exactly(conn, SECRET_BYTES) == address.secret
            if _read_request(conn) is not None:
                taken.set()

    threading.Thread(target=dies_after_reading, daemon=True).start()
    worker = processes.worker(address)
    try:
        with pytest.raises(AuditUnavailable):
            worker.append(_entry(1, "rec-b"))
    finally:
        listener.close()
    assert taken.is_set()
    assert worker.size == 0
    assert processes.log().size == 0


def test_a_local_program_without_the_secret_cannot_put_entries_on_the_log(
    processes: _Processes, address: SequencerAddress
) -> None:
    sequencer = processes.log()
    worker = processes.worker(address)
    encoded = _entry(7, "rec-c").encode()
    with _running(sequencer, address):
        forger = SequencerClient(SequencerAddress(address.name, os.urandom(32)))
        with pytest.raises(AuditUnavailable):
            forger.append(encoded, [], None)
        # Straight onto the socket, the frame first, no secret at all.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(address.name)
            raw.sendall(len(encoded).to_bytes(4, "big") + b"\0\0\0\0\0\0" + encoded)
            assert _closed_without_answer(raw)  # no index, nothing stored
        assert worker.append(_entry(8, "rec-c")) == 0  # the first entry is a worker's
    assert sequencer.size == 1


def test_a_frame_too_large_for_an_entry_ends_the_connection_and_stores_nothing(
    processes: _Processes, address: SequencerAddress
) -> None:
    sequencer = processes.log()
    with _running(sequencer, address), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
        raw.settimeout(5)
        raw.connect(address.name)
        raw.sendall(address.secret + (1 << 30).to_bytes(4, "big") + b"\0\0\0\0\0\0")
        assert _closed_without_answer(raw)
    assert sequencer.size == 0


def test_a_workers_threads_share_one_connection_and_each_gets_its_own_entrys_index(
    processes: _Processes, address: SequencerAddress
) -> None:
    # Answers come back in batches over one connection, matched to their frames by
    # order: a thread handed another's index would answer a read logged under another
    # access. Each entry names its own thread, so the index proves the match.
    sequencer = processes.log()
    worker = processes.worker(address)
    batch_sizes: list[int] = []
    connections: list[int] = []

    def append_many(items: Sequence[Request]) -> Sequence[int | None]:
        batch_sizes.append(len(items))
        return sequencer.append_encoded_many(items)

    got: dict[tuple[int, int], int] = {}
    lock = threading.Lock()
    start = threading.Barrier(32)

    def appender(t: int) -> None:
        start.wait()
        for n in range(10):
            index = worker.append(_entry(n, f"rec-{t}-{n}"))
            with lock:
                got[(t, n)] = index

    listener = address.listen()
    stop = threading.Event()
    serving = threading.Thread(
        target=serve, args=(_Counting(listener, connections), address.secret, append_many, stop)
    )
    serving.start()
    try:
        threads = [threading.Thread(target=appender, args=(t,)) for t in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        stop.set()
        serving.join(timeout=10)
        listener.close()
    assert sorted(got.values()) == list(range(320))
    for (t, n), index in got.items():
        assert [i for i, _ in sequencer.entries_for([f"rec-{t}-{n}"])] == [index]
    assert len(connections) == 1  # one connection for all 32 threads
    assert max(batch_sizes) > 1  # and their entries went over it together


class _Counting:
    """A listening socket that counts the connections it accepts."""

    def __init__(self, listener: socket.socket, accepted: list[int]) -> None:
        self._listener, self._accepted = listener, accepted

    def accept(self) -> tuple[socket.socket, object]:
        conn, peer = self._listener.accept()
        self._accepted.append(conn.fileno())
        return conn, peer

    def __getattr__(self, name: str) -> object:
        return getattr(self._listener, name)


def test_a_batch_cut_short_answers_what_was_answered_and_refuses_the_rest(
    processes: _Processes, address: SequencerAddress
) -> None:
    # A sequencer that answers the first two frames it reads and dies holding the third:
    # that one may have been stored, so it is refused, and appended neither there nor here
    # (however the three threads' frames were batched).
    listener = address.listen()

    def answers_two_of_three() -> None:
        conn, _ = listener.accept()
        with conn:
            assert _read_exactly(conn, SECRET_BYTES) == address.secret
            for answer in (41, 42):
                assert _read_request(conn) is not None
                conn.sendall(answer.to_bytes(8, "big"))
            assert _read_request(conn) is not None

    worker = processes.worker(address)
    client = processes._clients[-1]
    threading.Thread(target=answers_two_of_three, daemon=True).start()
    outcomes: list[object] = [None, None, None]

    def appender(i: int) -> None:
        try:
            outcomes[i] = client.append(_entry(i, "rec-cut").encode(), [], None)
        except AuditUnavailable as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=appender, args=(i,)) for i in range(3)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        listener.close()
    assert sorted(o for o in outcomes if isinstance(o, int)) == [41, 42]
    refused = [o for o in outcomes if isinstance(o, AuditUnavailable)]
    assert len(refused) == 1 and not isinstance(refused[0], SequencerUnreachable)
    assert worker.size == 0
