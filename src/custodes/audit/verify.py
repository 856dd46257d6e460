"""The offline verifier: recompute the tree from the stored entries and hold every signed
checkpoint, stored or brought from outside, against it.

It needs no data key, only the log's public key. The first inconsistency is reported
with its position: an edited, deleted or reordered entry, a truncated tail, a replaced
checkpoint, or a log that forked from a checkpoint a witness holds.

The subject index (which entries name which keyed subject commitment, what subject access
reports are built from) is not in the tree, but every entry's leaf carries its own
commitments: the index is recomputed from the leaves in the same pass and any row missing,
added or changed is reported at its entry's position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import orjson

from custodes.audit.checkpoint import Checkpoint, NoteVerifier, SignatureInvalid
from custodes.audit.merkle import CompactRange, leaf_hash
from custodes.errors import TamperDetected
from custodes.storage.base import LogStore


class LogTampered(TamperDetected):
    """The access log does not match its own signed history."""

    def __init__(self, position: int, reason: str) -> None:
        self.position = position
        self.reason = reason
        super().__init__(f"access log tampered: first bad position {position}: {reason}")


@dataclass(frozen=True, slots=True)
class OutsideCheckpoint:
    """A signed checkpoint held outside the vault: by an auditor, or in a witness's store."""

    source: str  # where it came from, for the report
    note: bytes


@dataclass
class VerifyReport:
    entries: int = 0
    root: bytes = b""
    checkpoints: int = 0  # stored checkpoints that verified
    outside: int = 0  # outside checkpoints that verified
    latest_signed: int = 0  # largest size covered by a verified signature
    notes: list[str] = field(default_factory=list)


def verify_log(
    storage: LogStore,
    verifier_key: str,
    *,
    origin: str | None = None,
    outside: Sequence[OutsideCheckpoint] = (),
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Raise LogTampered at the first inconsistency; otherwise say what was checked."""
    verifier = NoteVerifier.from_key_string(verifier_key)
    stored = [
        (size, _open(verifier, note, f"the checkpoint stored for size {size}", size))
        for size, note in storage.checkpoints()
    ]
    for size, cp in stored:
        if cp.size != size:
            raise LogTampered(size, f"the checkpoint stored for size {size} is for size {cp.size}")
        if origin is not None and cp.origin != origin:
            raise LogTampered(size, f"the checkpoint stored for size {size} names another log")
    held = [
        (o.source, _open(verifier, o.note, f"the checkpoint from {o.source}", 0)) for o in outside
    ]
    for source, cp in held:
        if origin is not None and cp.origin != origin:
            raise LogTampered(cp.size, f"the checkpoint from {source} names another log")

    # Every size at which a signed root must match the recomputed one.
    wanted: dict[int, list[tuple[str, Checkpoint]]] = {}
    for size, cp in stored:
        wanted.setdefault(size, []).append(("stored", cp))
    for source, cp in held:
        wanted.setdefault(cp.size, []).append((source, cp))

    report = VerifyReport()
    tree = CompactRange()
    expected = 0
    # The largest sizes whose signed roots matched: any, and those held outside. A fork
    # re-signed with the log's own key matches every stored checkpoint, so against an
    # outside one the divergence can only be placed after the last outside match.
    last_good = 0
    last_good_outside = 0
    # The entries' end is fixed before any subject row is read: an entry and its rows are
    # committed together, so every entry read then has its rows among those read after.
    # Read the other way round, an append made between the two reads (a server serving
    # while the log is verified) left its entry without rows: tampered, wrongly.
    entries = storage.log_entries(0, None)
    subjects = _SubjectIndexCheck(storage.log_subject_rows(0, None))
    for index, data in entries:
        if index != expected:
            raise LogTampered(expected, f"entry {expected} is missing: deleted or renumbered")
        tree.append(leaf_hash(data))
        subjects.entry(index, data)
        expected += 1
        if expected in wanted:
            root = tree.root()
            for source, cp in wanted[expected]:
                if cp.root != root:
                    start = last_good if source == "stored" else last_good_outside
                    raise _mismatch(storage, start, expected, source)
            last_good = expected
            if any(source != "stored" for source, _ in wanted[expected]):
                last_good_outside = expected
        if progress is not None and expected % 100_000 == 0:
            progress(expected)
    report.entries = expected
    report.root = tree.root()

    for size in sorted(wanted):
        if size > expected:
            sources = ", ".join(sorted({s for s, _ in wanted[size]}))
            raise LogTampered(
                expected,
                f"the log ends after {expected} entries but a checkpoint ({sources}) signed "
                f"{size}: truncated",
            )
    # After the tree: an edited entry is named as edited, not by the index it no longer
    # matches. Rows past the entries read may belong to appends made meanwhile; only
    # those past the log as it now stands are certainly forged.
    subjects.finish(expected, storage.log_size)
    if subjects.first_bad is not None:
        raise LogTampered(
            subjects.first_bad,
            f"the subject index does not match entry {subjects.first_bad}: a row was "
            "deleted, added or changed",
        )
    report.checkpoints = len(stored)
    report.outside = len(held)
    report.latest_signed = max((cp.size for _, cp in stored), default=0)
    if report.latest_signed < expected:
        report.notes.append(
            f"{expected - report.latest_signed} entries after the latest stored checkpoint "
            "are not yet covered by a signature"
        )
    return report


class _SubjectIndexCheck:
    """Holds the subject index, streamed in entry order, against the commitments each
    entry carries; remembers the first entry where they differ."""

    def __init__(self, rows: Iterator[tuple[int, bytes]]) -> None:
        self._rows = rows
        self._next = next(rows, None)
        self.first_bad: int | None = None

    def _bad(self, index: int) -> None:
        if self.first_bad is None or index < self.first_bad:
            self.first_bad = index

    def entry(self, index: int, data: bytes) -> None:
        held: set[bytes] = set()
        while self._next is not None and self._next[0] <= index:
            row_index, commitment = self._next
            if row_index < index:
                self._bad(max(row_index, 0))  # a row naming no entry at all
            else:
                held.add(commitment)
            self._next = next(self._rows, None)
        if held != (carried_subjects(data) or set()):
            self._bad(index)

    def finish(self, size: int, current_size: Callable[[], int]) -> None:
        beyond = []
        while self._next is not None:
            if self._next[0] >= size:
                beyond.append(self._next[0])
            self._next = next(self._rows, None)
        if beyond:
            now = current_size()  # read after the rows: an entry precedes its rows
            forged = [i for i in beyond if i >= now]
            if forged:
                self._bad(min(forged))


def carried_subjects(data: bytes) -> set[bytes] | None:
    """The subject commitments an entry's leaf carries, or None if it carries no readable
    list (then no row of the index may name it)."""
    try:
        doc = orjson.loads(data)
        listed = doc["subjects"] if isinstance(doc, dict) else None
        if not isinstance(listed, list):
            return None
        return {bytes.fromhex(c) for c in listed if isinstance(c, str)}
    except (ValueError, KeyError, TypeError):
        return None


def _open(verifier: NoteVerifier, note: bytes, what: str, position: int) -> Checkpoint:
    try:
        body = verifier.verify(note)
        return Checkpoint.parse_body(body)
    except SignatureInvalid:
        raise LogTampered(
            position, f"{what} does not carry a valid log signature: replaced or forged"
        ) from None
    except ValueError:
        raise LogTampered(position, f"{what} is not a well-formed checkpoint") from None


def _mismatch(storage: LogStore, start: int, end: int, source: str) -> LogTampered:
    """Name the first bad entry between two checkpoints, as precisely as the store allows."""
    for index, data in storage.log_entries(start, end):
        stored_leaf = storage.log_node(0, index)
        if stored_leaf is not None and stored_leaf != leaf_hash(data):
            return LogTampered(index, f"entry {index} was edited or moved")
    where = "the checkpoint" if source == "stored" else f"the checkpoint from {source}"
    if source == "stored":
        reason = f"entries {start} to {end - 1} do not match {where} signed at size {end}"
    else:
        reason = (
            f"entries {start} to {end - 1} do not match {where} at size {end}: the log forked "
            "from a checkpoint held outside"
        )
    return LogTampered(start, reason)


def read_notes(paths: Iterable[tuple[str, bytes]]) -> list[OutsideCheckpoint]:
    return [OutsideCheckpoint(source, note) for source, note in paths]
