"""The ingest pipeline: read, validate, seal in parallel, store batch by batch.

Workers parse, validate and encrypt; the parent alone writes to storage, in order, one
atomic batch at a time, so that a crash leaves whole batches or none and a re-run of the
same file adds nothing twice (record ids are keyed hashes of each record's source key).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, BinaryIO, NamedTuple

import orjson

from custodes.codec import RecordCodec
from custodes.crypto import KeyMaterial
from custodes.errors import InvalidInput, InvalidRecord
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
from custodes.records import RecordValidator
from custodes.schema import Schema, parse_schema
from custodes.storage.base import BatchOutcome, SealedRecord

DEFAULT_BATCH = 2_000

# (line, field, reason) of a refused record; never its value.
Reject = tuple[int, str | None, str]


@dataclass(frozen=True, slots=True)
class IngestTarget:
    """Where records go: the vault's schema and keys to seal them with, and the one
    write the pipeline makes (an atomic, durable batch). The vault hands this over once
    its access function has allowed the ingest."""

    schema: Schema
    schema_text: str
    material: KeyMaterial
    token_bits: dict[int, int]
    write_batch: Callable[[Sequence[SealedRecord]], BatchOutcome]

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
    already_present: int = 0  # valid, but stored by an earlier run
    rejected: int = 0
    seconds: float = 0.0
    rejects_path: Path | None = None
    first_rejects: list[Reject] = field(default_factory=list)  # a few, for the summary
    strict_refused: bool = False  # strict mode found rejects and stored nothing

    @property
    def valid(self) -> int:
        return self.accepted + self.already_present

    @property
    def rate(self) -> float:
        handled = self.valid + self.rejected
        return handled / self.seconds if self.seconds > 0 else 0.0


class _Chunk(NamedTuple):
    sealed: list[SealedRecord]
    rejects: list[Reject]


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
        sealed: list[SealedRecord] = []
        rejects: list[Reject] = []
        validate = self.validator.validate
        default_type = self.default_type
        codec_seal = self.codec.seal
        for line_no, item in items:
            try:
                if isinstance(item, InvalidRecord):
                    raise item
                doc = parse_json_line(item, line_no) if isinstance(item, bytes) else item
                record = validate(doc, line=line_no, record_type=default_type)
            except InvalidRecord as exc:
                rejects.append((line_no, exc.field, exc.reason))
                continue
            if seal:
                sealed.append(codec_seal(record))
        return _Chunk(sealed, rejects)


_worker: _ChunkSealer | None = None


def _init_worker(
    schema_text: str, material: KeyMaterial, bits: dict[int, int], default_type: str | None
) -> None:
    global _worker
    _worker = _ChunkSealer(parse_schema(schema_text), material, bits, default_type)


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
    reason) to a rejects file; strict mode first validates the whole input and stores
    nothing at all if any record is refused.
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
            with _open(source, stdin) as stream:
                counter = CountingReader(stream)
                for chunk in _chunks(_items(target.schema, fmt, counter, record_type), batch_size):
                    result = sealer(chunk, seal=False)
                    for rej in result.rejects:
                        _note_reject(report, rejects, rej)
            if report.rejected:
                report.strict_refused = True
                return report

        with _open(source, stdin) as stream:
            counter = CountingReader(stream)
            total = _size(source) if not from_stdin else None
            items = _items(target.schema, fmt, counter, record_type)
            handled = 0

            def store(result: _Chunk) -> None:
                nonlocal handled
                if result.sealed:
                    outcome = target.write_batch(result.sealed)
                    report.accepted += outcome.inserted
                    report.already_present += outcome.already_present
                for rej in result.rejects:
                    _note_reject(report, rejects, rej)
                handled += len(result.sealed) + len(result.rejects)
                if progress is not None:
                    progress(
                        Progress(handled, report.valid, report.rejected, counter.bytes_read, total)
                    )

            with _InOrderWriter(store) as writer:
                for result in _sealed_chunks(target, sealer, items, workers, batch_size):
                    writer.put(result)
    finally:
        report.rejects_path = rejects.close()
        report.seconds = time.perf_counter() - started
    return report


class _InOrderWriter:
    """Stores chunks on a thread of its own, in the order given.

    SQLite releases the GIL while it works, so storing one batch overlaps sealing the
    next. The queue is short, which keeps memory flat; a storage error stops the input
    at the next chunk and is raised to the caller.
    """

    def __init__(self, store: Callable[[_Chunk], None]) -> None:
        self._store = store
        self._queue: queue.Queue[_Chunk | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="custodes-ingest-writer")

    def __enter__(self) -> _InOrderWriter:
        self._thread.start()
        return self

    def put(self, chunk: _Chunk) -> None:
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
    if workers == 1:
        for chunk in chunks:
            yield sealer(chunk)
        return
    # Keys reach the workers through the pool's pipe, never through a file.
    context = multiprocessing.get_context("forkserver" if sys.platform != "win32" else "spawn")
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(target.schema_text, target.material, target.token_bits, sealer.default_type),
    ) as pool:
        pending: deque[Future[_Chunk]] = deque()
        # A bounded window keeps memory flat and results in input order.
        for chunk in chunks:
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
