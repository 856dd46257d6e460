"""MemoryStorage: a complete storage backend held in dictionaries.

A real backend, not a mock: it keeps every promise of the Storage Protocol (atomic
batches, idempotent ingest, sorted lookups, an append-only access log) and runs the same
contract suite as the durable backends. Nothing survives the process. Also owns the
validation of access-log batches, which every backend applies before it writes.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from custodes.errors import (
    AuditUnavailable,
    ConfigurationError,
    LogMoved,
    RecordNotFound,
    StorageError,
)
from custodes.storage.base import (
    AccountRow,
    AlertRow,
    BatchOutcome,
    KeyCensus,
    LogAppend,
    LoginCounts,
    Rebuild,
    Rekeyed,
    SealedRecord,
    SessionRow,
    StoredRecord,
    checked_charges,
    checked_subjects,
)

# The durable backends store integers as signed 64-bit values; refusing the same range
# here keeps a batch that one backend accepts acceptable to all of them.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# Entries are handed out in pages so that a reader never holds the lock while its
# caller works, and a writer is never held up by a slow reader.
LOG_PAGE = 1000
HASH_SIZE = 32


class MemoryStorage:
    """Storage in process memory, safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._meta: dict[str, bytes] = {}
        self._records: dict[str, StoredRecord] = {}
        self._type_counts: Counter[str] = Counter()
        self._tokens: dict[tuple[int, int], set[str]] = {}
        self._accounts: dict[str, AccountRow] = {}
        self._sessions: dict[bytes, SessionRow] = {}
        self._login_failures: dict[str, tuple[int, float]] = {}
        self._spent: dict[bytes, float] = {}
        self._usage: dict[tuple[str, str], tuple[int, int]] = {}  # -> (window start, total)
        self._alerts: dict[str, AlertRow] = {}
        # (account, counter) -> subject -> the window it was last noted in
        self._subjects: dict[tuple[str, str], dict[str, int]] = {}
        self._log_entries: list[bytes] = []
        self._log_nodes: dict[tuple[int, int], bytes] = {}
        self._log_subjects: dict[bytes, list[int]] = {}
        self._log_details: dict[int, bytes] = {}
        self._checkpoints: dict[int, bytes] = {}

    def get_meta(self, key: str) -> bytes | None:
        with self._lock:
            self._check_open()
            return self._meta.get(key)

    def set_meta(self, key: str, value: bytes) -> None:
        if not isinstance(key, str) or not isinstance(value, bytes):
            raise StorageError("meta key must be str and value bytes")
        with self._lock:
            self._check_open()
            self._meta[key] = value

    def write_batch(self, records: Sequence[SealedRecord]) -> BatchOutcome:
        # Validate everything first so that a bad record late in the batch cannot leave
        # the earlier ones applied.
        checked = [checked_record(position, record) for position, record in enumerate(records)]
        with self._lock:
            self._check_open()
            inserted = 0
            for record, tokens in checked:
                if record.record_id in self._records:
                    continue
                self._records[record.record_id] = record
                self._type_counts[record.record_type] += 1
                for pair in tokens:
                    self._tokens.setdefault(pair, set()).add(record.record_id)
                inserted += 1
            return BatchOutcome(inserted=inserted, already_present=len(checked) - inserted)

    def get_records(self, record_ids: Sequence[str]) -> dict[str, StoredRecord]:
        with self._lock:
            self._check_open()
            return {rid: self._records[rid] for rid in record_ids if rid in self._records}

    def find(self, index_id: int, token: int, limit: int) -> list[str]:
        if limit <= 0:
            return []
        with self._lock:
            self._check_open()
            return sorted(self._tokens.get((index_id, token), ()))[:limit]

    def find_records(self, index_id: int, token: int, limit: int) -> list[StoredRecord]:
        if limit <= 0:
            return []
        with self._lock:
            self._check_open()
            held = sorted(r for r in self._tokens.get((index_id, token), ()) if r in self._records)
            return [self._records[r] for r in held[:limit]]

    def count_records(self, record_type: str | None = None) -> int:
        with self._lock:
            self._check_open()
            if record_type is None:
                return len(self._records)
            return self._type_counts.get(record_type, 0)

    def record_tokens(
        self, after: int, limit: int
    ) -> list[tuple[int, str, tuple[tuple[int, int], ...]]]:
        if limit <= 0:
            return []
        with self._lock:
            self._check_open()
            # Positions follow insertion order, as a durable backend's row numbers do.
            page = list(self._records)[max(after, 0) : max(after, 0) + limit]
            wanted = set(page)
            # Read back from the search structure itself, not from what was written:
            # this is what a search would find.
            held: dict[str, list[tuple[int, int]]] = {rid: [] for rid in page}
            for pair, ids in self._tokens.items():
                for rid in ids & wanted:
                    held[rid].append(pair)
        start = max(after, 0) + 1
        return [(start + n, rid, tuple(sorted(held[rid]))) for n, rid in enumerate(page)]

    def records_page(self, after: int, limit: int) -> list[tuple[int, StoredRecord]]:
        if limit <= 0:
            return []
        with self._lock:
            self._check_open()
            page = list(self._records.values())[max(after, 0) : max(after, 0) + limit]
        start = max(after, 0) + 1
        return [(start + n, record) for n, record in enumerate(page)]

    def rekey_records(self, changes: Sequence[Rekeyed]) -> int:
        checked = checked_rekeyed(changes)
        with self._lock:
            self._check_open()
            applied = 0
            for change in checked:
                stored = self._records.get(change.record_id)
                if stored is None or stored.wrapped_key != change.expected_wrapped:
                    continue
                payload = stored.payload if change.payload is None else change.payload
                self._records[change.record_id] = stored._replace(
                    kek_version=change.kek_version, wrapped_key=change.wrapped_key, payload=payload
                )
                for pair in change.tokens:
                    self._tokens.setdefault(pair, set()).add(change.record_id)
                applied += 1
            return applied

    def drop_tokens(self, index_ids: Collection[int]) -> int:
        dropped = set(index_ids)
        with self._lock:
            self._check_open()
            gone = [pair for pair in self._tokens if pair[0] in dropped]
            count = 0
            for pair in gone:
                count += len(self._tokens.pop(pair))
            return count

    def key_census(self) -> KeyCensus:
        with self._lock:
            self._check_open()
            keks = Counter(r.kek_version for r in self._records.values())
            generations = Counter(
                r.payload[1] if len(r.payload) > 1 else 0 for r in self._records.values()
            )
            tokens: Counter[int] = Counter()
            for (index_id, _), ids in self._tokens.items():
                tokens[index_id] += len(ids)
        return census_of(keks.items(), generations.items(), tokens.items())

    def erase_records(self, record_ids: Sequence[str]) -> int:
        wanted = set(record_ids)
        with self._lock:
            self._check_open()
            gone = [self._records.pop(rid) for rid in list(wanted) if rid in self._records]
            for record in gone:
                self._type_counts[record.record_type] -= 1
            if gone:
                erased = {record.record_id for record in gone}
                for pair in list(self._tokens):
                    held = self._tokens[pair]
                    held -= erased
                    if not held:
                        del self._tokens[pair]
            return len(gone)

    def add_account(self, account: AccountRow) -> None:
        row = account_from_row(account)
        with self._lock:
            self._check_open()
            if row.username in self._accounts:
                raise ConfigurationError("an account with that username already exists")
            self._accounts[row.username] = row

    def update_account(self, account: AccountRow) -> None:
        row = account_from_row(account)
        with self._lock:
            self._check_open()
            if row.username not in self._accounts:
                raise RecordNotFound("no account with that username")
            self._accounts[row.username] = row

    def replace_account(self, expected: AccountRow, account: AccountRow) -> bool:
        row = account_from_row(account)
        if row.username != expected.username:
            raise ConfigurationError("an account is replaced only by a row of the same name")
        with self._lock:
            self._check_open()
            if self._accounts.get(row.username) != account_from_row(expected):
                return False
            self._accounts[row.username] = row
            return True

    def get_account(self, username: str) -> AccountRow | None:
        with self._lock:
            self._check_open()
            return self._accounts.get(username)

    def list_accounts(self) -> list[AccountRow]:
        with self._lock:
            self._check_open()
            return [self._accounts[name] for name in sorted(self._accounts)]

    # -- sessions and login throttling ------------------------------------------------

    def put_session(self, session: SessionRow) -> None:
        row = checked_session(session)
        with self._lock:
            self._check_open()
            if row.key in self._sessions:
                raise ConfigurationError("a session with that key already exists")
            self._sessions[row.key] = row

    def get_session(self, key: bytes) -> SessionRow | None:
        with self._lock:
            self._check_open()
            return self._sessions.get(key)

    def count_account_sessions(self, username: str) -> int:
        with self._lock:
            self._check_open()
            return sum(1 for row in self._sessions.values() if row.username == username)

    def get_session_account(self, key: bytes) -> tuple[SessionRow, AccountRow | None] | None:
        with self._lock:
            self._check_open()
            session = self._sessions.get(key)
            if session is None:
                return None
            return session, self._accounts.get(session.username)

    def touch_session(self, key: bytes, last_seen: float) -> None:
        with self._lock:
            self._check_open()
            row = self._sessions.get(key)
            if row is not None and last_seen > row.last_seen:
                self._sessions[key] = row._replace(last_seen=float(last_seen))

    def end_session(self, key: bytes) -> bool:
        with self._lock:
            self._check_open()
            return self._sessions.pop(key, None) is not None

    def end_sessions(self, username: str) -> int:
        with self._lock:
            self._check_open()
            ended = [k for k, row in self._sessions.items() if row.username == username]
            for key in ended:
                del self._sessions[key]
            return len(ended)

    def purge_sessions(self, now: float, idle: float) -> int:
        with self._lock:
            self._check_open()
            stale = [
                k
                for k, row in self._sessions.items()
                if row.expires <= now or row.last_seen < now - idle
            ]
            for key in stale:
                del self._sessions[key]
            return len(stale)

    def count_sessions(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._sessions)

    def list_sessions(self) -> list[SessionRow]:
        with self._lock:
            self._check_open()
            return sorted(self._sessions.values(), key=lambda row: (row.username, row.key))

    def login_failures(self, keys: Sequence[str]) -> dict[str, tuple[int, float]]:
        with self._lock:
            self._check_open()
            return {k: self._login_failures[k] for k in keys if k in self._login_failures}

    def admit_login_attempt(
        self, keys: Sequence[str], now: float, admit: Callable[[LoginCounts], bool]
    ) -> bool:
        wanted = list(dict.fromkeys(keys))
        with self._lock:
            self._check_open()
            counts = {k: self._login_failures[k] for k in wanted if k in self._login_failures}
            if not admit(counts):
                return False
            for key in wanted:
                count, _ = self._login_failures.get(key, (0, 0.0))
                self._login_failures[key] = (count + 1, float(now))
            return True

    def forgive_login_attempt(self, key: str) -> None:
        with self._lock:
            self._check_open()
            if key in self._login_failures:
                count, last = self._login_failures[key]
                if count <= 1:
                    del self._login_failures[key]
                else:
                    self._login_failures[key] = (count - 1, last)

    def clear_login_failures(self, key: str) -> None:
        with self._lock:
            self._check_open()
            self._login_failures.pop(key, None)

    def purge_login_failures(self, before: float) -> int:
        with self._lock:
            self._check_open()
            stale = [k for k, (_, last) in self._login_failures.items() if last < before]
            for key in stale:
                del self._login_failures[key]
            return len(stale)

    def spend(self, key: bytes, now: float, keep: float) -> bool:
        key = checked_spend(key, now, keep)
        with self._lock:
            self._check_open()
            for old in [k for k, until in self._spent.items() if until <= now]:
                del self._spent[old]
            if key in self._spent:
                return False
            self._spent[key] = now + keep
            return True

    # -- access log ---------------------------------------------------------------

    def log_append(self, batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        # rebuild is not called here: every read of the log waits on the lock a writer
        # holds (the caller catches up on LogMoved instead).
        checked = checked_log_append(batch)
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the access log is closed")
            if checked.first_index != len(self._log_entries):
                raise LogMoved("the access log moved: another writer appended")
            # Checked before anything is applied, so that a refused batch leaves no trace.
            if any(key in self._log_nodes for key in checked.nodes):
                raise AuditUnavailable("the access log refused the batch: a tree node is stored")
            self._log_entries.extend(checked.entries)
            self._log_nodes.update(checked.nodes)
            # Every index in the batch is above every stored one, so appending the batch's
            # references in index order keeps each subject's list ascending.
            for commitment, index in sorted(checked.subjects, key=lambda pair: pair[1]):
                self._log_subjects.setdefault(commitment, []).append(index)
            self._log_details.update(checked.details)

    def log_size(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._log_entries)

    def log_entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        # Not a generator itself: the end of an open range is the size at the call, not
        # at the first next(), and a closed backend is refused at once.
        with self._lock:
            self._check_open()
            stop = len(self._log_entries) if end is None else end
        return self._stream_entries(max(start, 0), stop)

    def _stream_entries(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        while start < stop:
            with self._lock:
                self._check_open()
                page = self._log_entries[start : min(stop, start + LOG_PAGE)]
            if not page:
                return
            yield from enumerate(page, start)
            start += len(page)

    def log_node(self, level: int, index: int) -> bytes | None:
        with self._lock:
            self._check_open()
            return self._log_nodes.get((level, index))

    def log_nodes(self, positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        with self._lock:
            self._check_open()
            found = ((p, self._log_nodes.get(p)) for p in positions)
            return {p: node for p, node in found if node is not None}

    def log_subject_entries(self, commitment: bytes) -> list[int]:
        with self._lock:
            self._check_open()
            return list(self._log_subjects.get(commitment, ()))

    def log_subject_rows(
        self, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        with self._lock:
            self._check_open()
            rows = sorted(
                (index, commitment)
                for commitment, indexes in self._log_subjects.items()
                for index in indexes
                if start <= index and (end is None or index < end)
            )
        return iter(rows)

    def log_detail(self, index: int) -> bytes | None:
        with self._lock:
            self._check_open()
            return self._log_details.get(index)

    def log_detail_range(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        with self._lock:
            self._check_open()
            found = sorted(
                (i, blob)
                for i, blob in self._log_details.items()
                if start <= i < end and blob is not None
            )
        return iter(found)

    def put_checkpoint(self, size: int, note: bytes) -> None:
        checked_checkpoint(size, note)
        with self._lock:
            self._check_open()
            self._checkpoints[size] = note

    def checkpoints(self) -> list[tuple[int, bytes]]:
        with self._lock:
            self._check_open()
            return sorted(self._checkpoints.items())

    # -- alerts -------------------------------------------------------------------

    def put_alert(self, row: AlertRow) -> bool:
        row = checked_alert(row)
        with self._lock:
            self._check_open()
            if row.alert_id in self._alerts:
                return False
            self._alerts[row.alert_id] = row
            return True

    def replace_alert(self, expected: AlertRow, row: AlertRow) -> bool:
        row = checked_alert(row)
        if row.alert_id != expected.alert_id:
            raise StorageError("an alert is replaced only by a row of the same id")
        with self._lock:
            self._check_open()
            if self._alerts.get(row.alert_id) != checked_alert(expected):
                return False
            self._alerts[row.alert_id] = row
            return True

    def get_alert(self, alert_id: str) -> AlertRow | None:
        with self._lock:
            self._check_open()
            return self._alerts.get(alert_id)

    def list_alerts(self, limit: int) -> list[AlertRow]:
        with self._lock:
            self._check_open()
            rows = sorted(self._alerts.values(), key=lambda r: (r.raised_at, r.alert_id))
            return rows[::-1][: max(limit, 0)]

    # -- usage --------------------------------------------------------------------

    def charge_usage(self, account: str, charges: Sequence[tuple[str, int, int]]) -> list[int]:
        checked = checked_charges(charges)
        with self._lock:
            self._check_open()
            totals = []
            for counter, start, amount in checked:
                stored_start, total = self._usage.get((account, counter), (start, 0))
                if stored_start < start:
                    stored_start, total = start, 0
                total += amount
                self._usage[(account, counter)] = (stored_start, total)
                totals.append(total)
            return totals

    def note_subjects(self, account: str, counter: str, start: int, subjects: Sequence[str]) -> int:
        checked = checked_subjects(start, subjects)
        with self._lock:
            self._check_open()
            noted = self._subjects.setdefault((account, counter), {})
            for subject in [s for s, at in noted.items() if at < start]:
                del noted[subject]
            new = 0
            for subject in checked:
                if noted.get(subject, start - 1) < start:
                    noted[subject] = start
                    new += 1
        return self.charge_usage(account, [(counter, start, new)])[0]

    # -- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("storage is closed")


def checked_spend(key: bytes, now: float, keep: float) -> bytes:
    if not isinstance(key, bytes) or len(key) != HASH_SIZE:
        raise StorageError("a one-time mark is a 32-byte hash")
    if not keep > 0 or now != now:  # NaN compares unequal to itself
        raise StorageError("a one-time mark is kept for a positive time")
    return key


def checked_alert(row: AlertRow) -> AlertRow:
    """An alert row with its types checked, as every backend stores it."""
    alert_id, raised_at, body = row
    if not isinstance(alert_id, str) or not 0 < len(alert_id) <= 64:
        raise StorageError("an alert's id is text of at most 64 characters")
    if not isinstance(body, bytes):
        raise StorageError("an alert's body is bytes")
    try:
        when = float(raised_at)
    except (TypeError, ValueError):
        raise StorageError("an alert's time is a number") from None
    return AlertRow(alert_id, when, body)


def checked_session(session: SessionRow) -> SessionRow:
    """A session row with its types checked, as every backend stores it."""
    key, username, role, issued_at, expires, last_seen, client = session
    if not isinstance(key, bytes) or len(key) != HASH_SIZE:
        raise StorageError("a session key is a 32-byte hash")
    if not isinstance(username, str) or not isinstance(role, str):
        raise StorageError("a session names an account and a role")
    if client is not None and not isinstance(client, str):
        raise StorageError("a session's client address is text")
    try:
        times = (float(issued_at), float(expires), float(last_seen))
    except (TypeError, ValueError):
        raise StorageError("a session's times are numbers") from None
    return SessionRow(key, username, role, *times, client)


def checked_record(
    position: int, record: SealedRecord, refused: str = "batch refused: record"
) -> tuple[StoredRecord, frozenset[tuple[int, int]]]:
    """The record as stored and its token pairs, or StorageError naming what is wrong.

    Messages name the position in the batch and the field, never a value.
    """

    def refuse(what: str) -> StorageError:
        return StorageError(f"{refused} {position}: {what}")

    try:
        record_id, record_type, payload, kek_version, wrapped_key, tokens = record
    except (TypeError, ValueError):
        raise refuse("not a SealedRecord") from None
    if type(record_id) is not str or not record_id:
        raise refuse("record_id is not a non-empty str")
    if type(record_type) is not str or not record_type:
        raise refuse("record_type is not a non-empty str")
    if type(payload) is not bytes:
        raise refuse("payload is not bytes")
    if type(kek_version) is not int or not _INT64_MIN <= kek_version <= _INT64_MAX:
        raise refuse("kek_version is not a 64-bit int")
    if type(wrapped_key) is not bytes:
        raise refuse("wrapped_key is not bytes")
    pairs: set[tuple[int, int]] = set()
    try:
        for index_id, token in tokens:
            if type(index_id) is not int or type(token) is not int:
                raise refuse("a token or index id is not an int")
            if not (_INT64_MIN <= index_id <= _INT64_MAX and _INT64_MIN <= token <= _INT64_MAX):
                raise refuse("a token or index id is outside the 64-bit range")
            pairs.add((index_id, token))
    except (TypeError, ValueError):
        raise refuse("tokens are not (index_id, token) pairs") from None
    stored = StoredRecord(record_id, record_type, payload, kek_version, wrapped_key)
    return stored, frozenset(pairs)


def checked_rekeyed(changes: Sequence[Rekeyed]) -> list[Rekeyed]:
    """A page of rotated keys as every backend accepts it, or StorageError naming the
    position and field, never a value."""
    checked: list[Rekeyed] = []
    refused = "rekey refused: change"
    for position, change in enumerate(changes):
        try:
            rid, expected, version, wrapped, payload, tokens = change
        except (TypeError, ValueError):
            raise StorageError(f"{refused} {position}: not a Rekeyed") from None
        # The fields a record has, checked as a batch's are ("-": no type, no new payload).
        record = SealedRecord(
            rid, "-", b"-" if payload is None else payload, version, wrapped, tokens
        )
        checked_record(position, record, refused)
        if type(expected) is not bytes:
            raise StorageError(f"{refused} {position}: expected_wrapped is not bytes")
        checked.append(Rekeyed(rid, expected, version, wrapped, payload, tuple(tokens)))
    return checked


def census_of(
    kek_versions: Iterable[tuple[Any, Any]],
    generations: Iterable[tuple[Any, Any]],
    token_ids: Iterable[tuple[Any, Any]],
) -> KeyCensus:
    """A KeyCensus from (value, count) rows, as a database's GROUP BY returns them."""
    return KeyCensus(
        {int(v): int(n) for v, n in kek_versions},
        {int(v): int(n) for v, n in generations},
        {int(v): int(n) for v, n in token_ids},
    )


class CheckedLogAppend(NamedTuple):
    """A log batch that passed checked_log_append, as plain lists."""

    first_index: int
    entries: list[bytes]
    nodes: dict[tuple[int, int], bytes]  # (level, index) -> hash, in the batch's order
    subjects: list[tuple[bytes, int]]  # distinct (commitment, entry index)
    details: list[tuple[int, bytes]]  # (entry index, sealed details), distinct indexes


def checked_log_append(batch: LogAppend) -> CheckedLogAppend:
    """The batch as plain lists, or AuditUnavailable naming what is wrong (never a value).

    Every backend checks a batch whole before it writes anything, so that a malformed
    batch is refused the same way everywhere and leaves no trace. Beyond types, every
    reference must fall inside the log as it will be once the batch is in: a subject or
    detail must name a new entry, a node must be a subtree completed by the end of it.
    """

    def refuse(what: str) -> AuditUnavailable:
        return AuditUnavailable(f"the access log refused the batch: {what}")

    try:
        first_index, entries, nodes, subjects, details = batch
    except (TypeError, ValueError):
        raise refuse("not a LogAppend") from None
    if type(first_index) is not int or not 0 <= first_index <= _INT64_MAX:
        raise refuse("first_index is not a non-negative 64-bit int")
    try:
        entry_list = list(entries)
        node_rows = [(level, index, digest) for level, index, digest in nodes]
        subject_rows = [(commitment, index) for commitment, index in subjects]
        detail_rows = [(index, sealed) for index, sealed in details]
    except (TypeError, ValueError):
        raise refuse("entries, nodes, subjects or details are not sequences of tuples") from None
    for position, entry in enumerate(entry_list):
        if type(entry) is not bytes:
            raise refuse(f"entry {position} is not bytes")
    size = first_index + len(entry_list)
    if size > _INT64_MAX:
        raise refuse("the log would outgrow 64-bit indexes")

    def is_new_entry(index: object) -> bool:
        return type(index) is int and first_index <= index < size

    node_map: dict[tuple[int, int], bytes] = {}
    for position, (level, index, digest) in enumerate(node_rows):
        # A level above 62 cannot fit under a 64-bit size; checked first so that the
        # shift below stays small.
        if type(level) is not int or type(index) is not int or not 0 <= level <= 62:
            raise refuse(f"node {position}: level or index is not a valid int")
        if index < 0 or (index + 1) << level > size:
            raise refuse(f"node {position}: not a subtree completed by this batch")
        if type(digest) is not bytes or len(digest) != HASH_SIZE:
            raise refuse(f"node {position}: hash is not {HASH_SIZE} bytes")
        if (level, index) in node_map:
            raise refuse(f"node {position}: repeats a node of the batch")
        node_map[level, index] = digest
    for position, (commitment, index) in enumerate(subject_rows):
        if type(commitment) is not bytes or not is_new_entry(index):
            raise refuse(f"subject {position}: not (bytes, index of a new entry)")
    seen_details: set[int] = set()
    for position, (index, sealed) in enumerate(detail_rows):
        if type(sealed) is not bytes or not is_new_entry(index):
            raise refuse(f"detail {position}: not (index of a new entry, bytes)")
        if index in seen_details:
            raise refuse(f"detail {position}: repeats an entry of the batch")
        seen_details.add(index)
    return CheckedLogAppend(
        first_index=first_index,
        entries=entry_list,
        nodes=node_map,
        # An entry may name one subject twice; it still references it once.
        subjects=list(dict.fromkeys(subject_rows)),
        details=detail_rows,
    )


def checked_checkpoint(size: int, note: bytes) -> None:
    """Refuse a checkpoint that is not (non-negative 64-bit size, bytes)."""
    if type(size) is not int or not 0 <= size <= _INT64_MAX or type(note) is not bytes:
        raise StorageError("a checkpoint must be a non-negative int size and a bytes note")


def stored_record_from_row(row: Sequence[Any]) -> StoredRecord:
    """A record as a database returns it: (record_id, record_type, payload, kek_version,
    wrapped)."""
    rid, rtype, payload, kek_version, wrapped = row
    return StoredRecord(str(rid), str(rtype), bytes(payload), int(kek_version), bytes(wrapped))


def account_from_row(row: Sequence[Any]) -> AccountRow:
    """An account row as every backend hands it back (a database's row, or a row given
    to the memory backend), its columns in AccountRow's order and types."""
    username, role, password_hash, attributes, created_at, disabled = row
    return AccountRow(
        username=str(username),
        role=str(role),
        password_hash=str(password_hash),
        attributes=bytes(attributes),
        created_at=float(created_at),
        disabled=bool(disabled),
    )
