"""One writer for the access log of a server with several worker processes.

Each worker's group commit batches only its own readers, and the workers take turns at the
storage's log lock: with two workers each commit waits for the other's, and each carries
half the entries it could. The sequencer is one more process, forked by the supervisor
beside the workers, that appends for all of them: a worker hands it an entry it has
already built and sealed (the bytes that become the leaf, the subject commitments, the
sealed details) and waits for the index, which comes back only once the entry is durable.
Entries from every worker then share one transaction, and no two processes contend for
the lock. One thread serves every connection: it takes every request that has arrived,
from all of them, appends them as one batch, answers each, and looks again; the requests
that arrive while a batch commits make the next one. No thread per connection, so no
hundreds of threads taking turns at the interpreter for each commit. A worker, likewise,
sends its threads' entries over one connection, as many as are waiting in one write
(SequencerClient), so that a batch, not an entry, costs the system calls on either side.

The sequencer is a shortcut, never the only way: a worker that cannot reach it (not yet
started, restarting after a crash) appends by itself as before, through the same lock, so
that nothing is refused while it is away. An entry handed over whose answer is lost (the
sequencer died after reading it) is refused: it may be stored, and appending it again
would log the access twice.

The channel is a Unix socket in Linux's abstract namespace, named at random by the
supervisor before it forks. Only a process of the server's own user may connect (the
kernel's peer credentials), and it must first send the secret the supervisor drew, which
only its forked children hold: another local program cannot put entries on the log.

Frames, all integers big-endian:
    request: entry length (4 bytes), subject count (2), sealed-details length + 1 (4;
             0: none), then the entry, the subjects (16 bytes each), the details
    answer:  the entry's index (8, signed; -1: refused), a connection's answers in the
             order of its requests
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from custodes.errors import AuditUnavailable, CustodesError

log = logging.getLogger("custodes.audit")

_REQUEST = struct.Struct("!IHI")
_ANSWER = struct.Struct("!q")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
SECRET_BYTES = 32
SUBJECT_BYTES = 16
# An entry names at most a few thousand records (access.MAX_ENTRY_RECORDS) and its sealed
# details hold their ids: a frame beyond these is no entry of ours, and the connection goes.
MAX_ENTRY_BYTES = 1 << 20
MAX_DETAILS_BYTES = 4 << 20
REFUSED = -1

# One request: entry bytes, subject commitments, sealed details.
Request = tuple[bytes, list[bytes], "bytes | None"]
# The sequencer's side: requests -> each one's index once durable, or None if refused.
AppendMany = Callable[[Sequence[Request]], Sequence["int | None"]]
# Bytes read from a connection at a time.
_RECEIVE = 1 << 18


class SequencerUnreachable(AuditUnavailable):
    """No entry reached the sequencer: the caller may append by itself."""


@dataclass(frozen=True, slots=True)
class SequencerAddress:
    """Where the sequencer listens, and the secret a worker proves itself with."""

    name: bytes  # abstract socket name, leading NUL included
    secret: bytes

    @classmethod
    def new(cls) -> SequencerAddress:
        return cls(b"\0custodes-log-" + secrets.token_hex(16).encode(), secrets.token_bytes(32))

    def listen(self, backlog: int = 256) -> socket.socket:
        """The listening socket, made by the supervisor before it forks, so that a
        sequencer started again takes up the connections queued while it was away."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return sock


# -- the sequencer's side -------------------------------------------------------------------


def serve(
    listener: socket.socket, secret: bytes, append: AppendMany, stop: threading.Event
) -> None:
    """Serve workers until `stop` is set: every request that has arrived, from every
    connection, appended as one batch, then each answered with its index."""
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    try:
        while not stop.is_set():
            arrived: list[tuple[_Worker, Request]] = []
            for key, _ in selector.select(timeout=0.5):
                if key.data is None:
                    _accept(listener, selector)
                    continue
                worker: _Worker = key.data
                if not worker.receive(secret):
                    _drop(selector, worker)
                    continue
                arrived.extend((worker, request) for request in worker.take_requests())
            if arrived:
                _append_and_answer(selector, arrived, append)
    finally:
        for key in list(selector.get_map().values()):
            if key.data is not None:
                key.data.conn.close()
        selector.close()


@dataclass(eq=False)
class _Worker:
    """One connection from a worker, with what it has sent that is not yet a request."""

    conn: socket.socket
    admitted: bool = False
    buffer: bytearray = field(default_factory=bytearray)
    requests: list[Request] = field(default_factory=list)

    def receive(self, secret: bytes) -> bool:
        """Read what has arrived; False when the connection is to go (closed by the
        worker, no secret of ours first, a frame that is no entry of ours)."""
        try:
            data = self.conn.recv(_RECEIVE)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        self.buffer += data
        if not self.admitted:
            if len(self.buffer) < SECRET_BYTES:
                return True
            offered = bytes(self.buffer[:SECRET_BYTES])
            del self.buffer[:SECRET_BYTES]
            if not hmac.compare_digest(offered, secret):
                log.warning(
                    "the log sequencer refused a connection that is not a worker of its own"
                )
                return False
            self.admitted = True
        try:
            self.requests.extend(_take_frames(self.buffer))
        except ValueError:
            return False
        return True

    def take_requests(self) -> list[Request]:
        taken, self.requests = self.requests, []
        return taken


def _accept(listener: socket.socket, selector: selectors.BaseSelector) -> None:
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return
    except OSError as exc:
        log.error("the log sequencer could not accept a worker (%s)", exc.strerror)
        return
    try:
        _pid, uid, _gid = _UCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except OSError:
        conn.close()
        return
    if uid != os.geteuid():
        log.warning("the log sequencer refused a connection that is not a worker of its own")
        conn.close()
        return
    conn.setblocking(False)
    selector.register(conn, selectors.EVENT_READ, _Worker(conn))


def _drop(selector: selectors.BaseSelector, worker: _Worker) -> None:
    with contextlib.suppress(KeyError, ValueError):
        selector.unregister(worker.conn)
    worker.conn.close()


def _append_and_answer(
    selector: selectors.BaseSelector,
    arrived: list[tuple[_Worker, Request]],
    append: AppendMany,
) -> None:
    try:
        indexes = list(append([request for _, request in arrived]))
    except CustodesError:
        indexes = [None] * len(arrived)  # the append said why, in its own log
    except Exception as exc:
        # Whatever went wrong, every entry of the batch is refused, and the sequencer
        # serves on: a worker must never wait for an answer that will not come.
        log.error("the log sequencer could not append a batch (%s)", type(exc).__name__)
        indexes = [None] * len(arrived)
    # Each connection's answers in one send, in the order its requests came. A worker
    # has at most one batch of MAX_BATCH frames in flight and reads their answers before
    # it sends again, so the socket's buffer always has room and the send never blocks.
    answers: dict[_Worker, list[bytes]] = {}
    for (worker, _), index in zip(arrived, indexes, strict=True):
        answers.setdefault(worker, []).append(_ANSWER.pack(REFUSED if index is None else index))
    for worker, packed in answers.items():
        try:
            worker.conn.sendall(b"".join(packed))
        except OSError:
            _drop(selector, worker)


def _take_frames(buffer: bytearray) -> list[Request]:
    """The whole requests at the start of `buffer`, removed from it (what follows them
    has not all arrived); ValueError for a frame that is no entry of ours."""
    taken: list[Request] = []
    at = 0
    while len(buffer) - at >= _REQUEST.size:
        entry_length, subject_count, details_field = _REQUEST.unpack_from(buffer, at)
        details_length = details_field - 1 if details_field else 0
        if entry_length > MAX_ENTRY_BYTES or details_length > MAX_DETAILS_BYTES:
            raise ValueError("frame too large")
        body = entry_length + subject_count * SUBJECT_BYTES + details_length
        start = at + _REQUEST.size
        if len(buffer) < start + body:
            break
        taken.append(
            _parse_body(
                bytes(buffer[start : start + body]), entry_length, subject_count, details_field
            )
        )
        at = start + body
    del buffer[:at]
    return taken


def _read_request(conn: socket.socket) -> Request | None:
    """One request read whole from a blocking connection, or None at a clean end."""
    head = _read_exactly(conn, _REQUEST.size)
    if head is None:
        return None
    entry_length, subject_count, details_field = _REQUEST.unpack(head)
    details_length = details_field - 1 if details_field else 0
    if entry_length > MAX_ENTRY_BYTES or details_length > MAX_DETAILS_BYTES:
        raise ValueError("frame too large")
    body = _read_exactly(conn, entry_length + subject_count * SUBJECT_BYTES + details_length)
    if body is None:
        raise ValueError("frame cut short")
    return _parse_body(body, entry_length, subject_count, details_field)


def _parse_body(body: bytes, entry_length: int, subject_count: int, details_field: int) -> Request:
    view = memoryview(body)
    entry = bytes(view[:entry_length])
    at = entry_length
    subjects = [
        bytes(view[at + i * SUBJECT_BYTES : at + (i + 1) * SUBJECT_BYTES])
        for i in range(subject_count)
    ]
    at += subject_count * SUBJECT_BYTES
    details = bytes(view[at:]) if details_field else None
    return entry, subjects, details


def _read_exactly(conn: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None at a clean end before the first; ValueError if cut within."""
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:])
        if n == 0:
            if got == 0:
                return None
            raise ValueError("frame cut short")
        got += n
    return bytes(buffer)


# -- a worker's side ------------------------------------------------------------------------

# The most frames a worker sends in one write. Their answers (8 bytes each) then always
# fit the socket's buffer, so the sequencer's send of them never blocks; and a write
# holds a few MiB at most however large the entries (an ingest batch's seals its ids).
MAX_BATCH = 1024
MAX_BATCH_BYTES = 4 << 20


@dataclass(eq=False, slots=True)
class _Waiter:
    """One append waiting in a worker: its frame, and how it ended once it has."""

    frame: bytes
    wake: threading.Lock = field(default_factory=threading.Lock)
    settled: bool = False
    index: int = REFUSED
    # Why it ended without an index: SequencerUnreachable (its frame never reached the
    # sequencer whole) or AuditUnavailable (it did, and its answer was lost).
    failure: type[AuditUnavailable] | None = None

    def result(self) -> int:
        if self.failure is SequencerUnreachable:
            raise SequencerUnreachable("the log sequencer is not answering")
        if self.failure is not None:
            raise AuditUnavailable("the log sequencer did not say whether it stored the entry")
        if self.index < 0:
            raise AuditUnavailable("the access log could not record this access")
        return self.index


class SequencerClient:
    """A worker's way to the sequencer: one connection for the whole process, shared by
    its threads.

    The first thread to find no batch in flight leads: it sends every frame queued so far
    in one write, reads their answers in order (the sequencer answers a connection's
    requests in the order they came), settles each waiting thread, and hands the lead to
    the first that queued meanwhile. A batch costs a write and a read here and in the
    sequencer, where a connection per entry cost a pair of system calls and a turn of the
    sequencer's loop for each. The connection is closed on any fault and made again for
    the next batch."""

    def __init__(self, address: SequencerAddress, *, timeout: float = 30.0) -> None:
        self._address = address
        self._timeout = timeout
        self._lock = threading.Lock()  # guards the queue, the lead and the connection
        self._queue: list[_Waiter] = []
        self._leading = False
        self._conn: socket.socket | None = None
        self._closed = False

    def append(self, entry: bytes, subjects: Sequence[bytes], details: bytes | None) -> int:
        """The entry's index once the sequencer has stored it durably.

        SequencerUnreachable if the entry did not reach it (append by yourself); the
        plain AuditUnavailable if it was refused or its answer was lost."""
        if any(len(s) != SUBJECT_BYTES for s in subjects) or len(subjects) > 0xFFFF:
            raise ValueError("a subject commitment is 16 bytes, at most 65,535 of them")
        details_field = 0 if details is None else len(details) + 1
        waiter = _Waiter(
            b"".join(
                (
                    _REQUEST.pack(len(entry), len(subjects), details_field),
                    entry,
                    *subjects,
                    details or b"",
                )
            )
        )
        waiter.wake.acquire()
        with self._lock:
            self._queue.append(waiter)
            leads = not self._leading
            self._leading = True
        if not leads:
            # Released once it is settled, or handed the lead with its frame not yet sent.
            waiter.wake.acquire()
        if not waiter.settled:
            self._lead()
        return waiter.result()

    def _lead(self) -> None:
        # The leader is the first queued (a lead is only ever taken by, or handed to, the
        # head of the queue), so its own frame is in the batch it sends.
        with self._lock:
            count = size = 0
            for waiter in self._queue[:MAX_BATCH]:
                size += len(waiter.frame)
                if count and size > MAX_BATCH_BYTES:
                    break
                count += 1
            batch = self._queue[:count]
            del self._queue[:count]
        try:
            self._exchange(batch)
        finally:
            for waiter in batch:
                if not waiter.settled:  # only on an unexpected error: the answer is lost
                    waiter.failure, waiter.settled = AuditUnavailable, True
            with self._lock:
                following = self._queue[0] if self._queue else None
                if following is None:
                    self._leading = False
            for waiter in batch[1:]:
                waiter.wake.release()
            if following is not None:
                following.wake.release()  # not settled: it leads the next batch

    def _exchange(self, batch: list[_Waiter]) -> None:
        """Send the batch's frames in one write and settle each with its answer."""
        try:
            conn = self._connection()
        except SequencerUnreachable:
            for waiter in batch:
                waiter.failure, waiter.settled = SequencerUnreachable, True
            return
        data = b"".join(waiter.frame for waiter in batch)
        sent = 0
        try:
            view = memoryview(data)
            while sent < len(data):
                sent += conn.send(view[sent:])
        except OSError:
            self._drop(conn)
            # A frame sent whole may have been stored; one cut short or never begun was
            # not (the sequencer drops what a closed connection left unfinished).
            end = 0
            for waiter in batch:
                end += len(waiter.frame)
                waiter.failure = AuditUnavailable if end <= sent else SequencerUnreachable
                waiter.settled = True
            return
        answers = _read_answers(conn, len(batch))
        for waiter, index in zip(batch, answers, strict=False):
            waiter.index, waiter.settled = index, True
        if len(answers) < len(batch):
            self._drop(conn)
            for waiter in batch[len(answers) :]:
                waiter.failure, waiter.settled = AuditUnavailable, True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise SequencerUnreachable("this worker's way to the log sequencer is closed")
            if self._conn is not None:
                return self._conn
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(self._timeout)
            conn.connect(self._address.name)
            conn.sendall(self._address.secret)
        except OSError:
            conn.close()
            raise SequencerUnreachable("the log sequencer is not running") from None
        with self._lock:
            if not self._closed:
                self._conn = conn
                return conn
        conn.close()
        raise SequencerUnreachable("this worker's way to the log sequencer is closed")

    def _drop(self, conn: socket.socket) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None
        conn.close()


def _read_answers(conn: socket.socket, count: int) -> list[int]:
    """Up to `count` answers, in order: fewer if the connection ended or failed first."""
    wanted = count * _ANSWER.size
    buffer = bytearray(wanted)
    view = memoryview(buffer)
    got = 0
    try:
        while got < wanted:
            n = conn.recv_into(view[got:])
            if n == 0:
                break
            got += n
    except OSError:
        pass
    whole = got // _ANSWER.size
    return [index for (index,) in _ANSWER.iter_unpack(view[: whole * _ANSWER.size])]
