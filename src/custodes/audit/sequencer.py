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
hundreds of threads taking turns at the interpreter for each commit.

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
    answer:  the entry's index (8, signed; -1: refused)
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
_RECEIVE = 1 << 16


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
            while (request := _take_frame(self.buffer)) is not None:
                self.requests.append(request)
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
    for (worker, _), index in zip(arrived, indexes, strict=True):
        try:
            # Eight bytes, and each connection has one request in flight: the socket's
            # buffer always has room, so the send does not block.
            worker.conn.sendall(_ANSWER.pack(REFUSED if index is None else index))
        except OSError:
            _drop(selector, worker)


def _take_frame(buffer: bytearray) -> Request | None:
    """The first whole request at the start of `buffer`, removed from it; None if it has
    not all arrived; ValueError for a frame that is no entry of ours."""
    if len(buffer) < _REQUEST.size:
        return None
    entry_length, subject_count, details_field = _REQUEST.unpack_from(buffer)
    details_length = details_field - 1 if details_field else 0
    if entry_length > MAX_ENTRY_BYTES or details_length > MAX_DETAILS_BYTES:
        raise ValueError("frame too large")
    body = entry_length + subject_count * SUBJECT_BYTES + details_length
    if len(buffer) < _REQUEST.size + body:
        return None
    request = _parse_body(
        bytes(buffer[_REQUEST.size : _REQUEST.size + body]),
        entry_length,
        subject_count,
        details_field,
    )
    del buffer[: _REQUEST.size + body]
    return request


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


class SequencerClient:
    """A worker's way to the sequencer: a connection per append in flight (each waits for
    its own answer, so none needs matching to its request), kept for the next append and
    closed on any fault."""

    def __init__(self, address: SequencerAddress, *, timeout: float = 30.0) -> None:
        self._address = address
        self._timeout = timeout
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._closed = False

    def append(self, entry: bytes, subjects: Sequence[bytes], details: bytes | None) -> int:
        """The entry's index once the sequencer has stored it durably.

        SequencerUnreachable if the entry did not reach it (append by yourself); the
        plain AuditUnavailable if it was refused or its answer was lost."""
        if any(len(s) != SUBJECT_BYTES for s in subjects) or len(subjects) > 0xFFFF:
            raise ValueError("a subject commitment is 16 bytes, at most 65,535 of them")
        details_field = 0 if details is None else len(details) + 1
        frame = b"".join(
            (
                _REQUEST.pack(len(entry), len(subjects), details_field),
                entry,
                *subjects,
                details or b"",
            )
        )
        conn = self._connection()
        try:
            conn.sendall(frame)
        except OSError:
            conn.close()
            raise SequencerUnreachable("the log sequencer is not answering") from None
        try:
            answer = _read_exactly(conn, _ANSWER.size)
        except (OSError, ValueError):
            answer = None
        if answer is None:
            conn.close()
            raise AuditUnavailable("the log sequencer did not say whether it stored the entry")
        self._put_back(conn)
        (index,) = _ANSWER.unpack(answer)
        if index < 0:
            raise AuditUnavailable("the access log could not record this access")
        return int(index)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _connection(self) -> socket.socket:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.settimeout(self._timeout)
            conn.connect(self._address.name)
            conn.sendall(self._address.secret)
        except OSError:
            conn.close()
            raise SequencerUnreachable("the log sequencer is not running") from None
        return conn

    def _put_back(self, conn: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()
