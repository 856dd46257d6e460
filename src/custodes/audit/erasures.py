"""The erasure ledger: every record the vault erased, kept beside the log's signing key
(`<log key>.erasures`), never in the database a backup puts back. Append-only: each
statement is a signed note by the log's key that names the hash of the one before, its
records by keyed id only, when, and why (a request's id, or retention by record type).

The log's key signs it because the ledger must be checked by whoever checks the log, with
the same public key and no other secret, and must travel with the signer's state through
backups and restores; its first line (`custodes erasure v1`) is one no checkpoint, backup
statement or loss statement can have. A ledger whose chain or any signature fails raises
ErasureLedgerBroken, and the vault serves nothing on it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from custodes.audit.checkpoint import (
    ERASURE_HEADER,
    LogSigner,
    MalformedNote,
    NoteVerifier,
    SignatureInvalid,
)
from custodes.crypto.sealed_file import file_lock, replace_file_durably
from custodes.errors import ErasureLedgerBroken, StorageError

__all__ = ["Erasure", "ErasureLedger", "erasures_path", "read_erasures"]

_FORMAT = "custodes-erasures"
_VERSION = 1
_RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_REQUEST = re.compile(r"[0-9a-f]{32}")
_START = "start"
# Records one statement names at most: a retention pass writes one statement a batch.
MAX_STATEMENT_RECORDS = 1000


def erasures_path(log_key: Path) -> Path:
    """The ledger beside a log key file (its state and losses lie there too)."""
    return log_key.with_name(log_key.name + ".erasures")


@dataclass(frozen=True, slots=True)
class Erasure:
    """One signed statement of the ledger: records erased together, when and why."""

    seq: int
    previous: str  # base64 SHA-256 of the previous signed note, or "start"
    at: int
    reason: str  # "request <id>" or "retention <record type>"
    records: tuple[str, ...]

    @property
    def kind(self) -> str:
        """ "request" or "retention"."""
        return self.reason.split(" ", 1)[0]

    def body(self, origin: str) -> bytes:
        lines = [
            ERASURE_HEADER,
            origin,
            f"seq {self.seq}",
            f"previous {self.previous}",
            f"at {self.at}",
            f"reason {self.reason}",
            *(f"record {rid}" for rid in self.records),
        ]
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def parse_body(cls, body: bytes, origin: str) -> Erasure:
        try:
            header, name, seq, previous, at, reason, *records = body.decode("utf-8").split("\n")[
                :-1
            ]
            ids = tuple(line.removeprefix("record ") for line in records)
            ok = (
                header == ERASURE_HEADER
                and name == origin
                and seq.startswith("seq ")
                and seq[4:].isdigit()
                and previous.startswith("previous ")
                and at.startswith("at ")
                and at[3:].isdigit()
                and reason.startswith("reason ")
                and valid_reason(reason[7:])
                and 1 <= len(ids) <= MAX_STATEMENT_RECORDS
                and all(
                    line.startswith("record ") and _RECORD_ID.fullmatch(rid)
                    for line, rid in zip(records, ids, strict=True)
                )
            )
            if not ok:
                raise ValueError
            return cls(int(seq[4:]), previous[9:], int(at[3:]), reason[7:], ids)
        except ValueError:
            raise MalformedNote("not an erasure statement") from None


def valid_reason(reason: str) -> bool:
    """Whether a reason is one the ledger keeps: "request <32 hex digits>" or "retention
    <record type name>"; nothing an official typed."""
    kind, _, rest = reason.partition(" ")
    if kind == "request":
        return _REQUEST.fullmatch(rest) is not None
    return kind == "retention" and rest.isidentifier() and len(rest) <= 64


def _note_hash(note: str) -> str:
    return base64.b64encode(hashlib.sha256(note.encode("utf-8")).digest()).decode()


def _read_notes(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read the erasure ledger: {exc.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        doc = None
    if not (
        isinstance(doc, dict)
        and doc.get("format") == _FORMAT
        and doc.get("version") == _VERSION
        and isinstance(doc.get("statements"), list)
        and all(isinstance(item, str) for item in doc["statements"])
    ):
        raise ErasureLedgerBroken("the erasure ledger is damaged")
    return list(doc["statements"])


def _checked(notes: Sequence[str], verifier_key: str) -> list[Erasure]:
    verifier = NoteVerifier.from_key_string(verifier_key)
    erasures: list[Erasure] = []
    previous = _START
    for seq, note in enumerate(notes):
        try:
            text = verifier.verify(note.encode("utf-8"))
            erasure = Erasure.parse_body(text, verifier.name)
        except (SignatureInvalid, MalformedNote):
            raise ErasureLedgerBroken(
                f"statement {seq} of the erasure ledger is not signed by this vault's log key"
            ) from None
        if erasure.seq != seq or erasure.previous != previous:
            raise ErasureLedgerBroken(
                f"statement {seq} of the erasure ledger does not follow the one before it"
            )
        erasures.append(erasure)
        previous = _note_hash(note)
    return erasures


def read_erasures(path: Path, verifier_key: str) -> list[Erasure]:
    """Every statement of a ledger file, oldest first, each checked against the log's
    public key and chained to the one before (none if there is no file)."""
    return _checked(_read_notes(Path(path)), verifier_key)


def _document(notes: Sequence[str]) -> bytes:
    doc = {"format": _FORMAT, "version": _VERSION, "statements": list(notes)}
    return json.dumps(doc, indent=1).encode() + b"\n"


def extends(longer: Path, shorter: Path, verifier_key: str) -> bool:
    """Whether one ledger file holds every statement of another, in order, and more or as
    many: what a restore checks before it takes the vault's current ledger over the
    backup's older copy."""
    later, earlier = _read_notes(Path(longer)), _read_notes(Path(shorter))
    _checked(later, verifier_key)
    _checked(earlier, verifier_key)
    return later[: len(earlier)] == earlier


class ErasureLedger:
    """The ledger of one vault, signed with its log key. Appends under a lock file, so that
    several processes sharing the key append one after another."""

    def __init__(self, signer: LogSigner) -> None:
        self._signer = signer
        self.path = erasures_path(signer.key_path)
        self._seen: tuple[tuple[int, int, int, int] | None, frozenset[str]] = (None, frozenset())
        self._seen_lock = threading.Lock()

    def __repr__(self) -> str:
        return "ErasureLedger()"

    def current(self) -> frozenset[str]:
        """Every record id the ledger names, as the file is now: read and checked again
        only when the file changed (a stat otherwise), so that every read of a record may
        ask, in every process sharing the ledger. ErasureLedgerBroken if it fails."""
        try:
            st = os.stat(self.path)
            identity: tuple[int, int, int, int] | None = (
                st.st_dev,
                st.st_ino,
                st.st_mtime_ns,
                st.st_size,
            )
        except FileNotFoundError:
            identity = None
        seen, ids = self._seen
        if identity == seen and (identity is not None or not ids):
            return ids
        with self._seen_lock:
            ids = frozenset(self.erased_ids()) if identity is not None else frozenset()
            self._seen = (identity, ids)
        return ids

    def erasures(self) -> list[Erasure]:
        """Every statement, checked (ErasureLedgerBroken if any fails)."""
        return read_erasures(self.path, self._signer.verifier_key)

    def erased_ids(self) -> dict[str, Erasure]:
        """Each erased record id -> the statement that erased it (its first)."""
        found: dict[str, Erasure] = {}
        for erasure in self.erasures():
            for record_id in erasure.records:
                found.setdefault(record_id, erasure)
        return found

    def append(self, records: Sequence[str], *, at: float, reason: str) -> list[Erasure]:
        """Sign and keep statements naming `records` (in chunks), durable before return."""
        ids = list(dict.fromkeys(records))
        if not ids:
            return []
        # Checked before anything is signed: a statement the reader would refuse would
        # stop the vault from opening.
        if not valid_reason(reason) or not all(
            isinstance(rid, str) and _RECORD_ID.fullmatch(rid) for rid in ids
        ):
            raise ValueError("an erasure names record ids and a request or a retention rule")
        lock = self.path.with_name(self.path.name + ".lock")
        with file_lock(lock):
            notes = _read_notes(self.path)
            checked = _checked(notes, self._signer.verifier_key)
            previous = _note_hash(notes[-1]) if notes else _START
            made: list[Erasure] = []
            for start in range(0, len(ids), MAX_STATEMENT_RECORDS):
                erasure = Erasure(
                    seq=len(checked) + len(made),
                    previous=previous,
                    at=int(at),
                    reason=reason,
                    records=tuple(ids[start : start + MAX_STATEMENT_RECORDS]),
                )
                note = self._signer.sign_erasure(erasure.body(self._signer.origin)).decode("utf-8")
                notes.append(note)
                previous = _note_hash(note)
                made.append(erasure)
            replace_file_durably(self.path, _document(notes))
            return made
