"""Subject access reports: who looked at a person's records, when, in what role and why.

The format of a report, its offline-verifiable bundle and the bundle's verifier. The vault
builds reports (it finds the person's records, logs the request, then reads the log's
subject index); this module reads no record and no storage.

Bundle format, ``custodes subject-report v1`` (UTF-8, each line ends in one ``\\n``)::

    custodes subject-report v1
    origin <log origin>
    subject <person record id>
    linked <record id>                      zero or more: records that name the person
    checkpoint <length in bytes of the note that follows>
    <signed checkpoint note, verbatim, exactly that many bytes>
    entry <index> <base64 of the exact leaf bytes>
    proof <base64 hash> <base64 hash> ...   the entry's inclusion proof (may be empty)
    ...                                     more entry/proof pairs, indexes ascending
    end

The note is framed by its length, so its blank line and signature lines need no
escaping. Base64 is standard and padded, and only its canonical spelling is accepted.
A verifier checks the note's signature with the log's key, every proof against the
note's root and size, and that every entry names the subject or a linked record.

What the bundle proves, and what it does not: each entry in it is in the signed log.
It does not prove that no entry was left out (anyone may drop an entry and the rest
still verify); completeness comes from the vault, which checks the subject index against
every leaf up to the report's signed checkpoint before it builds a report. The
``linked`` lines are the vault's statement of which records name the person, not
something the log proves. Private details (the values an official searched for) live
outside the tree, sealed, and stay there: a report names which fields an access
searched by, never their values (`render_text`, `as_json`); the bundle carries neither.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from datetime import UTC, datetime
from typing import Any

from custodes.audit.checkpoint import MAX_NOTE_BYTES, Checkpoint, NoteVerifier, SignatureInvalid
from custodes.audit.entry import AccessEntry, Outcome
from custodes.audit.merkle import HASH_SIZE, InvalidProof, leaf_hash, verify_inclusion
from custodes.errors import TamperDetected
from custodes.freetext import escape_hidden

__all__ = [
    "BUNDLE_FORMAT",
    "BundleInvalid",
    "ReportedAccess",
    "SubjectReport",
    "VerifiedBundle",
    "as_json",
    "check_inclusion",
    "iso_time",
    "open_checkpoint",
    "render_text",
    "verify_bundle",
]

BUNDLE_FORMAT = "custodes subject-report v1"
# Bounds the work an unauthenticated bundle can cause before anything is verified.
MAX_BUNDLE_BYTES = 64 * 1024 * 1024

_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_TOKEN = re.compile(r"[!-~]+")  # printable ASCII without spaces: ids and origins
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # a field name: ASCII, never a value


class BundleInvalid(TamperDetected):
    """A subject-report bundle failed verification. Names the entry and the check, no data."""

    def __init__(self, reason: str, *, index: int | None = None) -> None:
        self.index = index
        self.reason = reason
        where = f"entry {index}: " if index is not None else ""
        super().__init__(f"subject report bundle invalid: {where}{reason}")


# -- the report -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportedAccess:
    """One access-log entry that touched the subject's records, with its proof."""

    index: int
    time: str  # ISO 8601, UTC
    actor: str
    role: str
    action: str
    outcome: Outcome
    purpose: str | None
    case_ref: str | None
    records: tuple[str, ...]  # which of the subject's records it touched
    # The entry's sealed details as the log holds them (the values searched for, if still
    # held). Taken only to learn which fields were searched: a report hands an auditor
    # the names of the fields, never the values, which stay sealed in the log.
    private: InitVar[dict[str, Any] | None]
    leaf: bytes  # the exact leaf bytes in the tree
    proof: tuple[bytes, ...]  # inclusion proof against the report's checkpoint
    searched_by: tuple[str, ...] = field(default=())  # the fields searched, by name

    def __post_init__(self, private: dict[str, Any] | None) -> None:
        if private is not None and not self.searched_by:
            object.__setattr__(self, "searched_by", searched_fields(private))


def searched_fields(private: dict[str, Any] | None) -> tuple[str, ...]:
    """The names of the fields an access searched by, from its sealed details."""
    values = private.get("values") if isinstance(private, dict) else None
    if not isinstance(values, dict):
        return ()
    return tuple(name for name in values if isinstance(name, str) and _FIELD.fullmatch(name))


@dataclass(frozen=True, slots=True)
class SubjectReport:
    origin: str
    subject: str
    linked: tuple[str, ...]
    checkpoint_note: bytes
    checkpoint: Checkpoint
    accesses: tuple[ReportedAccess, ...]
    report_index: int  # the log entry recording this report
    # When the record was erased and why ("request <id>" or "retention <type>"), from the
    # erasure ledger: the person's data is gone, the fact of past accesses is not.
    erased_at: str | None = None
    erased_for: str | None = None

    def bundle(self) -> bytes:
        """The self-contained, offline-verifiable bundle (format in the module docstring)."""
        head = [BUNDLE_FORMAT, f"origin {self.origin}", f"subject {self.subject}"]
        head += [f"linked {r}" for r in self.linked]
        head.append(f"checkpoint {len(self.checkpoint_note)}")
        body = []
        for access in self.accesses:
            body.append(f"entry {access.index} {_b64(access.leaf)}")
            body.append(" ".join(["proof", *(_b64(h) for h in access.proof)]))
        body.append("end")
        return _lines(head).encode("utf-8") + self.checkpoint_note + _lines(body).encode("utf-8")


# -- verifying a bundle ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    origin: str
    subject: str
    linked: tuple[str, ...]
    checkpoint: Checkpoint
    entries: tuple[tuple[int, AccessEntry], ...]  # every entry proven, in log order


def verify_bundle(bundle: bytes, verifier_key: str) -> VerifiedBundle:
    """Check a bundle offline with only the log's public key; return its proven entries.

    Raises BundleInvalid naming the entry and the check that failed. Proves that each
    entry is in the signed log and names the subject, not that none was left out.
    """
    if not isinstance(bundle, bytes) or len(bundle) > MAX_BUNDLE_BYTES:
        raise BundleInvalid(f"a bundle must be bytes, at most {MAX_BUNDLE_BYTES}")
    reader = _Reader(bundle)
    if reader.line() != BUNDLE_FORMAT:
        raise BundleInvalid(f"not a {BUNDLE_FORMAT!r} bundle")
    origin = reader.field("origin")
    subject = reader.field("subject")
    linked: list[str] = []
    line = reader.line()
    while line.startswith("linked "):
        linked.append(_token(line.removeprefix("linked "), "a linked record id"))
        line = reader.line()
    length = line.removeprefix("checkpoint ")
    if length == line or not _DECIMAL.fullmatch(length) or int(length) > MAX_NOTE_BYTES:
        raise BundleInvalid("the checkpoint line is missing or its length is not valid")
    checkpoint = open_checkpoint(reader.take(int(length)), verifier_key)
    if checkpoint.origin != origin:
        raise BundleInvalid("the checkpoint is for another log than the bundle names")

    names = {subject, *linked}
    entries: list[tuple[int, AccessEntry]] = []
    while (line := reader.line()) != "end":
        index, leaf = _entry_line(line, after=entries[-1][0] if entries else -1)
        proof = _proof_line(reader.line(), index)
        try:
            check_inclusion(leaf, index, proof, checkpoint)
        except BundleInvalid as exc:
            raise BundleInvalid(exc.reason, index=index) from None
        try:
            entry = AccessEntry.decode(leaf)
        except (ValueError, KeyError, TypeError):
            raise BundleInvalid("is in the log but is not a readable entry", index=index) from None
        # Membership is tested element by element: a leaf is only as well-formed as the
        # log that holds it, and a non-text record id must not crash the verifier.
        if not any(isinstance(r, str) and r in names for r in entry.records):
            raise BundleInvalid("does not name the subject or a linked record", index=index)
        entries.append((index, entry))
    if not reader.at_end():
        raise BundleInvalid("there is data after the end line")
    return VerifiedBundle(origin, subject, tuple(linked), checkpoint, tuple(entries))


class _Reader:
    """Reads a bundle line by line, and the length-framed note in one piece."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def line(self) -> str:
        end = self._data.find(b"\n", self._pos)
        if end < 0:
            raise BundleInvalid("the bundle is truncated: a line or the end line is missing")
        raw = self._data[self._pos : end]
        self._pos = end + 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleInvalid("a line is not valid UTF-8") from None
        if any(c < " " for c in text):
            raise BundleInvalid("a line contains a control character")
        return text

    def field(self, name: str) -> str:
        line = self.line()
        value = line.removeprefix(name + " ")
        if value == line:
            raise BundleInvalid(f"the {name} line is missing")
        return _token(value, f"the {name}")

    def take(self, length: int) -> bytes:
        if self._pos + length > len(self._data):
            raise BundleInvalid("the bundle is truncated inside the checkpoint note")
        chunk = self._data[self._pos : self._pos + length]
        self._pos += length
        return chunk

    def at_end(self) -> bool:
        return self._pos == len(self._data)


def _token(text: str, what: str) -> str:
    if not _TOKEN.fullmatch(text):
        raise BundleInvalid(f"{what} is not one word of printable text")
    return text


def _entry_line(line: str, *, after: int) -> tuple[int, bytes]:
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != "entry" or not _DECIMAL.fullmatch(parts[1]):
        raise BundleInvalid(f"expected an entry line after entry {after}")
    index = int(parts[1])
    if index <= after:
        raise BundleInvalid("entries are not in ascending log order", index=index)
    leaf = _unb64(parts[2])
    if leaf is None:
        raise BundleInvalid("the leaf is not canonical base64", index=index)
    return index, leaf


def _proof_line(line: str, index: int) -> tuple[bytes, ...]:
    parts = line.split(" ")
    if parts[0] != "proof":
        raise BundleInvalid("the entry has no proof line", index=index)
    hashes = []
    for position, text in enumerate(parts[1:]):
        raw = _unb64(text)
        if raw is None or len(raw) != HASH_SIZE:
            raise BundleInvalid(f"proof hash {position} is not a base64 hash", index=index)
        hashes.append(raw)
    return tuple(hashes)


# -- shared checks ---------------------------------------------------------------------


def open_checkpoint(note: bytes, verifier_key: str) -> Checkpoint:
    """The checkpoint a note signs, if this log's key signed it; else BundleInvalid."""
    verifier = NoteVerifier.from_key_string(verifier_key)
    try:
        return Checkpoint.parse_body(verifier.verify(note))
    except SignatureInvalid:
        raise BundleInvalid("the checkpoint does not carry a valid signature by this log") from None


def check_inclusion(
    leaf: bytes, index: int, proof: Sequence[bytes], checkpoint: Checkpoint
) -> None:
    """Raise BundleInvalid unless the proof puts the leaf at index in the checkpoint."""
    try:
        verify_inclusion(leaf_hash(leaf), index, checkpoint.size, proof, checkpoint.root)
    except InvalidProof as exc:
        raise BundleInvalid(str(exc), index=index) from None


def _lines(lines: Sequence[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes | None:
    # One spelling per value: a non-canonical one decodes to the same bytes, which would
    # let two different bundles carry the same proof.
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    return data if _b64(data) == text else None


def iso_time(timestamp: float) -> str:
    """A log entry's time as a report shows it: ISO 8601 in UTC, to the second."""
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


# -- presenting the report -------------------------------------------------------------

_COLUMNS = ("when", "who", "role", "action", "purpose", "case", "outcome")


def render_text(report: SubjectReport) -> str:
    """A table for people: one row per access, the fields it searched by beneath it.

    Every text from the log is escaped (`\\u202e`): an entry written before purposes were
    checked, or by a writer who went around the check, shows what it holds and cannot
    erase or reorder a line on the reader's terminal.
    """
    rows = [
        tuple(
            escape_hidden(cell)
            for cell in (
                a.time,
                a.actor,
                a.role or "-",
                a.action,
                a.purpose or "-",
                a.case_ref or "-",
                a.outcome.value,
            )
        )
        for a in report.accesses
    ]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(_COLUMNS)]

    def row(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [
        escape_hidden(f"Subject access report for record {report.subject}"),
        escape_hidden(f"Records: {', '.join((report.subject, *report.linked))}"),
        escape_hidden(
            f"Log {report.origin}, checkpoint of {report.checkpoint.size} entries; "
            f"{len(rows)} accesses, each proven included"
        ),
    ]
    if report.erased_at is not None:
        out.append(
            escape_hidden(
                f"Erased {report.erased_at} ({report.erased_for or 'reason not kept'}): "
                "the record, its key and its search tokens are destroyed"
            )
        )
    out += [
        "",
        row(_COLUMNS),
        row(["-" * w for w in widths]),
    ]
    for cells, access in zip(rows, report.accesses, strict=True):
        out.append(row(cells))
        if access.searched_by:
            out.append(escape_hidden(f"    searched by: {', '.join(access.searched_by)}"))
    return "\n".join(out) + "\n"


def as_json(report: SubjectReport) -> dict[str, Any]:
    """The report as JSON-ready data, proofs included (base64)."""
    return {
        "format": BUNDLE_FORMAT,
        "origin": report.origin,
        "subject": report.subject,
        "linked": list(report.linked),
        "report_index": report.report_index,
        "erased": None
        if report.erased_at is None
        else {"at": report.erased_at, "for": report.erased_for},
        "checkpoint": {
            "size": report.checkpoint.size,
            "root": _b64(report.checkpoint.root),
            "note": report.checkpoint_note.decode("utf-8"),
        },
        "accesses": [
            {
                "index": a.index,
                "time": a.time,
                "actor": a.actor,
                "role": a.role,
                "action": a.action,
                "outcome": a.outcome.value,
                "purpose": a.purpose,
                "case": a.case_ref,
                "records": list(a.records),
                "searched_by": list(a.searched_by),
                "leaf": _b64(a.leaf),
                "proof": [_b64(h) for h in a.proof],
            }
            for a in report.accesses
        ],
    }


# -- reading a report back -------------------------------------------------------------


def report_from_json(doc: Any) -> SubjectReport:
    """The report that `as_json` gave `doc`: how a client rebuilds the API's report, to
    print it and to write its bundle without asking the server twice.

    Checks the shape, that the note states the checkpoint's origin, size and root, and that
    every proof puts its leaf in that checkpoint; BundleInvalid otherwise. The note's
    signature is left to `verify_bundle`, which has the log's key.
    """
    try:
        return _report_from_json(doc)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        raise BundleInvalid("the report is not in the shape as_json gives") from None


def _report_from_json(doc: Any) -> SubjectReport:
    if doc["format"] != BUNDLE_FORMAT:
        raise BundleInvalid(f"not a {BUNDLE_FORMAT!r} report")
    stated = doc["checkpoint"]
    note = _json_text(stated["note"]).encode("utf-8")
    try:
        # The note's text ends at its last blank line; its signatures follow.
        checkpoint = Checkpoint.parse_body(note[: note.rfind(b"\n\n") + 1])
    except SignatureInvalid:
        raise BundleInvalid("the checkpoint note is malformed") from None
    if (
        checkpoint.origin != doc["origin"]
        or checkpoint.size != _json_int(stated["size"])
        or _b64(checkpoint.root) != stated["root"]
    ):
        raise BundleInvalid("the checkpoint note does not state the origin, size and root given")
    erased = doc.get("erased")
    if erased is not None and not isinstance(erased, dict):
        raise TypeError("erased is an object")
    accesses = []
    for access in doc["accesses"]:
        index = _json_int(access["index"])
        leaf = _json_bytes(access["leaf"])
        proof = tuple(_json_bytes(h) for h in access["proof"])
        check_inclusion(leaf, index, proof, checkpoint)
        # Field names only: whatever else an answer carries (an older server's "private"
        # with the values searched for) is not taken, so it is never shown or written.
        named = access.get("searched_by", [])
        if not isinstance(named, list):
            raise TypeError("searched_by is a list of field names")
        searched_by = tuple(_json_field(f) for f in named)
        accesses.append(
            ReportedAccess(
                index=index,
                time=_json_text(access["time"]),
                actor=_json_text(access["actor"]),
                role=_json_text(access["role"]),
                action=_json_text(access["action"]),
                outcome=Outcome(access["outcome"]),
                purpose=_json_optional_text(access["purpose"]),
                case_ref=_json_optional_text(access["case"]),
                records=tuple(_json_text(r) for r in access["records"]),
                private=None,
                leaf=leaf,
                proof=proof,
                searched_by=searched_by,
            )
        )
    return SubjectReport(
        origin=_json_text(doc["origin"]),
        subject=_json_text(doc["subject"]),
        linked=tuple(_json_text(r) for r in doc["linked"]),
        checkpoint_note=note,
        checkpoint=checkpoint,
        accesses=tuple(accesses),
        report_index=_json_int(doc["report_index"]),
        erased_at=None if erased is None else _json_text(erased["at"]),
        erased_for=None if erased is None else _json_text(erased["for"]),
    )


def _json_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("expected text")
    return value


def _json_field(value: Any) -> str:
    if not _FIELD.fullmatch(_json_text(value)):
        raise ValueError("expected a field name")
    return str(value)


def _json_optional_text(value: Any) -> str | None:
    return None if value is None else _json_text(value)


def _json_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError("expected a non-negative integer")
    return value


def _json_bytes(value: Any) -> bytes:
    decoded = _unb64(_json_text(value))
    if decoded is None:
        raise ValueError("expected canonical base64")
    return decoded
