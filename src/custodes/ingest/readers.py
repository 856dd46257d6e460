"""Streaming readers for JSON Lines, JSON arrays and CSV.

Each yields (line number, item) where the item is raw bytes still to be parsed (JSON
Lines, parsed in a worker), a dict, or an InvalidRecord for a line that cannot even be
read. Memory stays flat in the input size: nothing holds more than one record at a time.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from typing import BinaryIO

import orjson

from custodes.errors import InvalidInput, InvalidRecord

MAX_RECORD_BYTES = 1 << 20  # one record (a JSON line, a CSV row, an array element)
_CHUNK = 1 << 16

Item = bytes | dict[str, object] | InvalidRecord
FORMATS = ("jsonl", "json", "csv")


def detect_format(name: str) -> str:
    lower = name.lower()
    if lower.endswith((".jsonl", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    if lower.endswith(".json"):
        return "json"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    raise InvalidInput("cannot tell the input format from the file name; pass --format")


class CountingReader(io.RawIOBase):
    """Wraps a binary stream and counts the bytes read, for the progress bar."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.bytes_read += n
        return n


def read_jsonl(stream: BinaryIO) -> Iterator[tuple[int, Item]]:
    """Raw lines of a JSON Lines file; parsing happens in the workers."""
    line_no = 0
    readline = stream.readline
    while True:
        line = readline(MAX_RECORD_BYTES + 1)
        if not line:
            return
        line_no += 1
        if len(line) > MAX_RECORD_BYTES and not line.endswith(b"\n"):
            # Skip the rest of the over-long line without holding it in memory.
            while line and not line.endswith(b"\n"):
                line = readline(_CHUNK)
            yield (
                line_no,
                InvalidRecord(
                    f"the record is longer than the {MAX_RECORD_BYTES >> 20} MiB limit",
                    line=line_no,
                ),
            )
            continue
        if line.strip():
            yield line_no, line


def parse_json_line(raw: bytes, line_no: int) -> dict[str, object]:
    """Parse one JSON Lines record; InvalidRecord that never quotes the input."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson refuses bytes that are not UTF-8 too; decoding them (only then, as
        # valid lines need no second pass) says where.
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise InvalidRecord(
                f"not valid UTF-8 (byte {bad.start + 1} of the line)", line=line_no
            ) from None
        raise InvalidRecord(f"malformed JSON at column {exc.colno}", line=line_no) from None
    if not isinstance(doc, dict):
        raise InvalidRecord("a record must be a JSON object", line=line_no)
    return doc


def read_json_array(stream: BinaryIO) -> Iterator[tuple[int, Item]]:
    """Elements of one top-level JSON array, parsed incrementally.

    A syntax error cannot be skipped inside an array (there is no line to resume at),
    so it ends the input with InvalidInput naming the line.
    """
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    buf = ""
    pos = 0
    line = 1
    eof = False

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = stream.read(_CHUNK)
        try:
            text = utf8.decode(chunk, final=not chunk)
        except UnicodeDecodeError:
            raise InvalidInput("not valid UTF-8", line=line) from None
        if not chunk:
            eof = True
        buf = buf[pos:] + text
        pos = 0
        return bool(chunk) or bool(text)

    def skip_ws() -> None:
        nonlocal pos, line
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                if buf[pos] == "\n":
                    line += 1
                pos += 1
            if pos < len(buf) or not fill():
                return

    skip_ws()
    if pos >= len(buf) or buf[pos] != "[":
        raise InvalidInput("a JSON input must be one array of objects", line=line)
    pos += 1
    skip_ws()
    if pos < len(buf) and buf[pos] == "]":
        pos += 1
        skip_ws()
        if pos < len(buf):
            raise InvalidInput("unexpected content after the JSON array", line=line)
        return
    while True:
        skip_ws()
        start_line = line
        while True:
            try:
                doc, end = decoder.raw_decode(buf, pos)
                break
            except json.JSONDecodeError:
                if len(buf) - pos > MAX_RECORD_BYTES:
                    raise InvalidInput(
                        "malformed JSON, or an element longer than the 1 MiB limit",
                        line=start_line,
                    ) from None
                if not fill():
                    raise InvalidInput("malformed JSON", line=start_line) from None
        line += buf.count("\n", pos, end)
        pos = end
        if isinstance(doc, dict):
            yield start_line, doc
        else:
            yield start_line, InvalidRecord("a record must be a JSON object", line=start_line)
        skip_ws()
        if pos >= len(buf):
            raise InvalidInput("the JSON array is not closed", line=line)
        if buf[pos] == ",":
            pos += 1
            continue
        if buf[pos] == "]":
            pos += 1
            skip_ws()
            if pos < len(buf):
                raise InvalidInput("unexpected content after the JSON array", line=line)
            return
        raise InvalidInput("expected ',' or ']' between array elements", line=line)


def read_csv(
    stream: BinaryIO,
    *,
    known_columns: set[str],
    required_columns: dict[str, set[str]],
    record_type: str | None,
) -> Iterator[tuple[int, Item]]:
    """Rows of a CSV file with a header line, as dicts of the non-empty cells.

    The header is checked before any row is read: an unknown or missing column refuses
    the whole file. Bytes that are not UTF-8 refuse only their row.
    """
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="")
    csv.field_size_limit(MAX_RECORD_BYTES)
    reader = csv.reader(text, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidInput("the CSV file is empty", line=1) from None
    except csv.Error as exc:
        raise InvalidInput(f"unreadable CSV header ({_csv_reason(exc)})", line=1) from None
    header = [h.strip().lstrip("\ufeff") for h in header]
    if any(_has_surrogates(h) for h in header):
        raise InvalidInput("the CSV header is not valid UTF-8", line=1)
    for number, col in enumerate(header, start=1):
        if col not in known_columns and col != "type":
            # A header cell is input like any other (a name pasted as a title): it is
            # placed by its position, never repeated.
            raise InvalidInput(
                f"column {number} of the CSV header is not a field of the schema", line=1
            )
    if len(set(header)) != len(header):
        raise InvalidInput("a column is named twice in the CSV header", line=1)
    if "type" not in header:
        if record_type is None:
            raise InvalidInput("the CSV has no 'type' column; pass --type", line=1)
        for col in sorted(required_columns.get(record_type, set())):
            if col not in header:
                raise InvalidInput(f"missing column {col!r} required by {record_type}", line=1)
    width = len(header)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InvalidInput(
                f"malformed CSV ({_csv_reason(exc)})", line=reader.line_num
            ) from None
        line_no = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != width:
            yield (
                line_no,
                InvalidRecord(
                    f"the row has {len(row)} cells but the header has {width}", line=line_no
                ),
            )
            continue
        doc: dict[str, object] = {}
        bad: str | None = None
        for col, cell in zip(header, row, strict=True):
            if _has_surrogates(cell):
                bad = col
                break
            if cell != "":
                doc[col] = cell
        if bad is not None:
            yield line_no, InvalidRecord("not valid UTF-8", field=bad, line=line_no)
            continue
        if "type" not in doc and record_type is not None:
            doc["type"] = record_type
        yield line_no, doc


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _csv_reason(exc: csv.Error) -> str:
    # csv's messages describe structure ("field larger than field limit"), never content.
    return str(exc).split(":")[0]
