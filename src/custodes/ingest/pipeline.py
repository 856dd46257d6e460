"""The ingest pipeline: read, validate, seal in parallel, store batch by batch.

Workers parse, validate and encrypt; the parent alone writes to storage, in order, one
atomic batch at a time, so that a crash leaves whole batches or none and a re-run of the
same file adds nothing twice (record ids are keyed hashes of each record's source key).
A record whose id is stored already is held against the stored one: the same fields
count as already present, others are refused as a conflict, never dropped.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple

import orjson

from custodes.codec import RecordCodec
from custodes.crypto import KeyMaterial
from custodes.errors import InvalidInput, InvalidRecord, StorageError
from custodes.ingest.readers import (
    FORMATS,
    CountingReader,
    Item,
    detect_format,
    parse_json_line,
    read_csv,
    read_json_array,
    read_jsonl,
)
from custodes.records import CanonicalRecord, RecordValidator
from custodes.schema import Schema, parse_schema
from custodes.storage.base import SealedRecord

DEFAULT_BATCH = 2_000

# (line, field, reason) of a refused record; never its value.
Reject = tuple[int, str | None, str]
# A sealed record and the input line it came from.
Lined = tuple[int, SealedRecord]


@dataclass(frozen=True, slots=True)
class IngestTarget:
    """Where records go: the vault's schema and keys to seal them with, what it holds
    already, and the one write the pipeline makes. The vault hands this over once its
    access function has allowed the ingest.

    `compare_stored` answers, for each record given, in order: None if its id is not
    stored, else the names of the fields in which the stored record differs from it
    (none: the same record); never a value. `write_batch` stores records not stored yet,
    all or none, durably, each batch under an access-log entry of its own made first; it
    returns the ids it stored, which leaves out any that another writer stored meanwhile.
    """

    schema: Schema
    schema_text: str
    material: KeyMaterial
    token_bits: dict[int, int]
    compare_stored: Callable[[Sequence[SealedRecord]], list[tuple[str, ...] | None]]
    write_batch: Callable[[Sequence[SealedRecord]], frozenset[str]]

    def __repr__(self) -> str:
        return "IngestTarget(<keys hidden>)"


class Progress(NamedTuple):
    records: int  # lines handled so far, accepted or not
    accepted: int
    rejected: int
    bytes_read: int
    bytes_total: int | None


@dataclass
class IngestReport:
    accepted: int = 0  # newly stored
    already_present: int = 0  # valid, and stored already with the same fields
    rejected: int = 0  # refused, conflicts included
    conflicting: int = 0  # refused: its key is stored already with other fields
    seconds: float = 0.0
    rejects_path: Path | None = None
    first_rejects: list[Reject] = field(default_factory=list)  # a few, for the summary
    strict_refused: bool = False  # strict mode found rejects and stored nothing
    # Where the time went, in seconds summed over the run: "parse", "validate" and "seal"
    # as CPU time of the threads that did them (the workers' own, whatever else the
    # machine runs), "write" as the writer's wall time (logging and storing each batch,
    # waits for the disk or the server included).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def valid(self) -> int:
        return self.accepted + self.already_present

    @property
    def rate(self) -> float:
        handled = self.valid + self.rejected
        return handled / self.seconds if self.seconds > 0 else 0.0


class _Chunk(NamedTuple):
    sealed: list[Lined]
    rejects: list[Reject]
    stages: tuple[float, float, float] = (0.0, 0.0, 0.0)  # parse, validate, seal: CPU s


# -- the work done for each chunk, in a worker or in-process ------------------------


class _ChunkSealer:
    def __init__(
        self,
        schema: Schema,
        material: KeyMaterial,
        bits: dict[int, int],
        default_type: str | None = None,
    ) -> None:
        self.validator = RecordValidator(schema)
        self.codec = RecordCodec(schema, material, bits)
        self.default_type = default_type

    def __call__(self, items: Sequence[tuple[int, Item]], seal: bool = True) -> _Chunk:
        # Stage by stage over the chunk, so that each stage is timed once a chunk rather
        # than once a record.
        rejects: list[Reject] = []
        clock = time.thread_time
        started = clock()
        docs: list[tuple[int, Mapping[str, Any]]] = []
        for line_no, item in items:
            try:
                if isinstance(item, InvalidRecord):
                    raise item
                docs.append(
                    (line_no, parse_json_line(item, line_no) if isinstance(item, bytes) else item)
                )
            except InvalidRecord as exc:
                rejects.append((line_no, exc.field, exc.reason))
        parsed = clock()
        validate = self.validator.validate
        default_type = self.default_type
        records: list[CanonicalRecord] = []
        for line_no, doc in docs:
            try:
                records.append(validate(doc, line=line_no, record_type=default_type))
            except InvalidRecord as exc:
                rejects.append((line_no, exc.field, exc.reason))
        validated = clock()
        codec_seal = self.codec.seal
        sealed: list[Lined] = [(r.line, codec_seal(r)) for r in records] if seal else []
        done = clock()
        rejects.sort(key=_line)
        return _Chunk(sealed, rejects, (parsed - started, validated - parsed, done - validated))


_worker: _ChunkSealer | None = None
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker(
    parent: int,
    schema_text: str,
    material: KeyMaterial,
    bits: dict[int, int],
    default_type: str | None,
) -> None:
    _die_with(parent)
    global _worker
    _worker = _ChunkSealer(parse_schema(schema_text), material, bits, default_type)


def _die_with(parent: int) -> None:
    """End this worker when the ingest that started it ends, however it ends.

    A worker holds the vault's keys, so none may outlive its ingest. A pipe or a queue
    left open by a killed parent does not end it: every worker holds the pool's queues
    at both ends and waits on them for ever. On Linux the kernel sends SIGKILL at the
    parent's death (PR_SET_PDEATHSIG), which nothing in the worker can miss, delay or
    catch, however busy or stuck it is; elsewhere a thread watches for the reparenting
    that a parent's death causes. Either way, a parent that died before the watch began
    is caught by reading getppid() once it is in place.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="custodes-ingest-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _work(items: Sequence[tuple[int, Item]]) -> _Chunk:
    assert _worker is not None
    return _worker(items)


# -- the pipeline ---------------------------------------------------------------------


def run_ingest(
    target: IngestTarget,
    source: Path | str,
    *,
    fmt: str | None = None,
    record_type: str | None = None,
    workers: int = 1,
    batch_size: int = DEFAULT_BATCH,
    strict: bool = False,
    rejects_dir: Path | None = None,
    progress: Callable[[Progress], None] | None = None,
    stdin: BinaryIO | None = None,
) -> IngestReport:
    """Ingest one input. `source` "-" reads stdin (not with strict, which reads twice).

    Default mode stores every valid record and reports each refused one (line, field,
    reason) to a rejects file; strict mode first validates and seals the whole input and
    holds it against what is stored, and stores nothing at all if any record is refused.
    A record whose key is stored already with other fields is refused as a conflict, in
    either mode; one identical to the stored record is already present.
    """
    from_stdin = str(source) == "-"
    if fmt is None:
        if from_stdin:
            raise InvalidInput("reading standard input needs --format")
        fmt = detect_format(str(source))
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown format (known: {', '.join(FORMATS)})")
    if record_type is not None and record_type not in target.schema.types:
        # Named by the schema's types only: what was typed is never repeated.
        known = ", ".join(sorted(target.schema.types))
        raise InvalidInput(f"unknown record type (known: {known})")
    if strict and from_stdin:
        raise InvalidInput("strict mode reads the input twice and cannot read standard input")
    if workers < 1:
        raise InvalidInput("--workers must be at least 1")

    report = IngestReport()
    started = time.perf_counter()
    sealer = _ChunkSealer(target.schema, target.material, target.token_bits, record_type)
    rejects = _RejectsFile(rejects_dir)
    try:
        if strict:
            # Sealed to be compared with what is stored: a conflict refuses the input
            # like any invalid record. (Two lines of this input that conflict with each
            # other are only found as the second is stored.)
            with _open(source, stdin) as stream:
                items = _items(target.schema, fmt, CountingReader(stream), record_type)
                for result in _sealed_chunks(target, sealer, items, workers, batch_size):
                    _add_stages(report, result.stages)
                    _, _, conflicts = _held(target, result.sealed)
                    report.conflicting += len(conflicts)
                    for rej in sorted(result.rejects + conflicts, key=_line):
                        _note_reject(report, rejects, rej)
            if report.rejected:
                report.strict_refused = True
                return report

        with _open(source, stdin) as stream:
            counter = CountingReader(stream)
            total = _size(source) if not from_stdin else None
            items = _items(target.schema, fmt, counter, record_type)
            handled = 0

            def store(checked: _Checked) -> None:
                nonlocal handled
                began = time.perf_counter()
                conflicts = _store(target, report, checked)
                _add_stage(report, "write", time.perf_counter() - began)
                for rej in sorted(checked.rejects + conflicts, key=_line):
                    _note_reject(report, rejects, rej)
                handled += checked.lines
                if progress is not None:
                    progress(
                        Progress(handled, report.valid, report.rejected, counter.bytes_read, total)
                    )

            # The ids of the chunks handed to the writer and perhaps not yet stored: at
            # most one being stored and the queue's two.
            unsettled: deque[set[str]] = deque(maxlen=3)
            with _InOrderWriter(store) as writer:
                for result in _sealed_chunks(target, sealer, items, workers, batch_size):
                    _add_stages(report, result.stages)
                    writer.put(_check(target, result, unsettled))
    finally:
        report.rejects_path = rejects.close()
        report.seconds = time.perf_counter() - started
    return report


def _add_stages(report: IngestReport, stages: tuple[float, float, float]) -> None:
    for name, seconds in zip(("parse", "validate", "seal"), stages, strict=True):
        _add_stage(report, name, seconds)


def _add_stage(report: IngestReport, name: str, seconds: float) -> None:
    report.stage_seconds[name] = report.stage_seconds.get(name, 0.0) + seconds


class _InOrderWriter:
    """Stores chunks on a thread of its own, in the order given.

    SQLite releases the GIL while it works, so storing one batch overlaps sealing the
    next. The queue is short, which keeps memory flat; a storage error stops the input
    at the next chunk and is raised to the caller.
    """

    def __init__(self, store: Callable[[_Checked], None]) -> None:
        self._store = store
        self._queue: queue.Queue[_Checked | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="custodes-ingest-writer")

    def __enter__(self) -> _InOrderWriter:
        self._thread.start()
        return self

    def put(self, chunk: _Checked) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            if self._error is not None:
                continue  # drain, so that put() never blocks on a dead writer
            try:
                self._store(chunk)
            except BaseException as exc:
                self._error = exc

    def __exit__(self, *exc_info: object) -> None:
        # Whatever was handed over lands (each batch is atomic) before we return or raise.
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc_info[1] is None:
            raise self._error


class _Checked(NamedTuple):
    """A chunk held against what is stored, ready for the writer."""

    new: list[Lined]  # not stored: to write
    later: list[Lined]  # to hold against what is stored once the chunks before are written
    same: int  # stored already with the same fields
    conflicts: list[Reject]  # stored already with other fields
    rejects: list[Reject]  # invalid
    lines: int  # input lines the chunk covers


def _check(target: IngestTarget, chunk: _Chunk, unsettled: deque[set[str]]) -> _Checked:
    """Hold a chunk against what is stored, in the thread that reads the input, so that
    the writer's thread is left to log and write. A record whose id an earlier record of
    this chunk, or of a chunk not yet stored, carries waits until that one is stored."""
    ids: set[str] = set()
    fresh: list[Lined] = []
    later: list[Lined] = []
    earlier = set().union(*unsettled)
    for lined in chunk.sealed:
        record_id = lined[1].record_id
        if record_id in ids or record_id in earlier:
            later.append(lined)
        else:
            fresh.append(lined)
        ids.add(record_id)
    unsettled.append(ids)
    new, same, conflicts = _held(target, fresh)
    lines = len(chunk.sealed) + len(chunk.rejects)
    return _Checked(new, later, same, conflicts, chunk.rejects, lines)


def _store(target: IngestTarget, report: IngestReport, checked: _Checked) -> list[Reject]:
    """Write a checked chunk's new records in one batch and count the chunk; the
    conflicts refused, for the rejects report."""
    new = checked.new
    written = target.write_batch([record for _, record in new]) if new else frozenset()
    # What this batch did not write is held against what is stored now: a record another
    # writer stored between the check and the write (its entry says so), or one whose id
    # came earlier in the input.
    later = [lined for lined in new if lined[1].record_id not in written] + checked.later
    missing, same, conflicts = _held(target, later)
    if missing:
        raise StorageError("the batch was not stored whole; run the ingest again")
    report.accepted += len(written)
    report.already_present += checked.same + same
    report.conflicting += len(checked.conflicts) + len(conflicts)
    return checked.conflicts + conflicts


def _held(target: IngestTarget, sealed: Sequence[Lined]) -> tuple[list[Lined], int, list[Reject]]:
    """Records held against the stored ones of the same ids: those not stored, how many
    are stored with the same fields, and a refusal for each stored with other fields."""
    if not sealed:
        return [], 0, []
    stored = target.compare_stored([record for _, record in sealed])
    absent: list[Lined] = []
    same = 0
    conflicts: list[Reject] = []
    for (line, record), differing in zip(sealed, stored, strict=True):
        if differing is None:
            absent.append((line, record))
        elif differing:
            conflicts.append(_conflict(line, differing))
        else:
            same += 1
    return absent, same, conflicts


def _conflict(line: int, differing: tuple[str, ...]) -> Reject:
    # Field names only: which fields differ, never what either record holds in them.
    named = differing[0] if len(differing) == 1 else None
    return (
        line,
        named,
        "conflicts with the record stored under the same key, which differs in "
        f"{', '.join(differing)}; the stored record is kept",
    )


def _line(rej: Reject) -> int:
    return rej[0]


def _note_reject(report: IngestReport, rejects: _RejectsFile, rej: Reject) -> None:
    report.rejected += 1
    if len(report.first_rejects) < 5:
        report.first_rejects.append(rej)
    rejects.write(rej)


def _sealed_chunks(
    target: IngestTarget,
    sealer: _ChunkSealer,
    items: Iterator[tuple[int, Item]],
    workers: int,
    batch_size: int,
) -> Iterator[_Chunk]:
    chunks = _chunks(items, batch_size)
    ahead = list(islice(chunks, 2))
    if len(ahead) < 2:
        # One batch: sealed here, since starting a process costs more than it saves.
        for chunk in ahead:
            yield sealer(chunk)
        return
    # Even one worker seals in a process of its own: sealed here, records would take turns
    # on this interpreter's lock with the writer's thread, which logs each batch on the
    # access log and writes it, and each would wait on the other.
    #
    # Keys reach the workers through the pool's pipe, never through a file. Spawned, not
    # served by a forkserver: each worker is then this process's own child, which the
    # kernel can end when this process ends (_die_with); a forkserver would sit between
    # them, outliving a killed parent and keeping its workers alive with it. The kernel
    # ties the signal to the thread that spawned the worker: this one, which holds the
    # pool until it has shut down.
    context = multiprocessing.get_context("spawn")
    initargs = (
        os.getpid(),
        target.schema_text,
        target.material,
        target.token_bits,
        sealer.default_type,
    )
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_init_worker, initargs=initargs
    ) as pool:
        pending: deque[Future[_Chunk]] = deque()
        # A bounded window keeps memory flat and results in input order.
        for chunk in chain(ahead, chunks):
            pending.append(pool.submit(_work, chunk))
            if len(pending) >= workers * 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _chunks(items: Iterable[tuple[int, Item]], size: int) -> Iterator[list[tuple[int, Item]]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _items(
    schema: Schema, fmt: str, stream: CountingReader, record_type: str | None
) -> Iterator[tuple[int, Item]]:
    buffered: BinaryIO = _buffered(stream)
    if fmt == "jsonl":
        items = read_jsonl(buffered)
    elif fmt == "json":
        items = read_json_array(buffered)
    else:
        known = {f for rt in schema.types.values() for f in rt.fields}
        required = {
            rt.name: {f.name for f in rt.fields.values() if f.required}
            for rt in schema.types.values()
        }
        items = read_csv(
            buffered, known_columns=known, required_columns=required, record_type=record_type
        )
    return items


def _buffered(raw: CountingReader) -> BinaryIO:
    import io

    return io.BufferedReader(raw, buffer_size=1 << 20)


class _open:
    def __init__(self, source: Path | str, stdin: BinaryIO | None) -> None:
        self._source = source
        self._stdin = stdin
        self._file: IO[bytes] | None = None

    def __enter__(self) -> BinaryIO:
        if str(self._source) == "-":
            return self._stdin if self._stdin is not None else sys.stdin.buffer
        try:
            self._file = open(self._source, "rb")
        except OSError as exc:
            raise InvalidInput(f"cannot open the input: {exc.strerror}") from None
        return self._file

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def _size(source: Path | str) -> int | None:
    try:
        return os.stat(source).st_size
    except OSError:
        return None


class _RejectsFile:
    """JSON Lines of {line, field, reason}: where and why, never what."""

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._file: IO[bytes] | None = None
        self.path: Path | None = None

    def write(self, rej: Reject) -> None:
        if self._directory is None:
            return
        if self._file is None:
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            path = self._directory / f"ingest-{stamp}-{secrets.token_hex(4)}.jsonl"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._file = os.fdopen(fd, "wb")
            self.path = path
        line, fieldname, reason = rej
        self._file.write(orjson.dumps({"line": line, "field": fieldname, "reason": reason}) + b"\n")

    def close(self) -> Path | None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return self.path
