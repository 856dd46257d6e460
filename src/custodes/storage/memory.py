"""MemoryStorage: a complete storage backend held in dictionaries.

A real backend, not a mock: it keeps every promise of the Storage Protocol (atomic
batches, idempotent ingest, sorted lookups, a numbered access log) and runs the same
contract suite as the durable backends. Nothing survives the process.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence

from custodes.errors import AuditUnavailable, ConfigurationError, RecordNotFound, StorageError
from custodes.storage.base import AccountRow, BatchOutcome, SealedRecord, StoredRecord

# The durable backends store integers as signed 64-bit values; refusing the same range
# here keeps a batch that one backend accepts acceptable to all of them.
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


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
        self._access_log: list[bytes] = []

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
        checked = [_checked_record(position, record) for position, record in enumerate(records)]
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

    def count_records(self, record_type: str | None = None) -> int:
        with self._lock:
            self._check_open()
            if record_type is None:
                return len(self._records)
            return self._type_counts.get(record_type, 0)

    def add_account(self, account: AccountRow) -> None:
        row = _normalised_account(account)
        with self._lock:
            self._check_open()
            if row.username in self._accounts:
                raise ConfigurationError("an account with that username already exists")
            self._accounts[row.username] = row

    def update_account(self, account: AccountRow) -> None:
        row = _normalised_account(account)
        with self._lock:
            self._check_open()
            if row.username not in self._accounts:
                raise RecordNotFound("no account with that username")
            self._accounts[row.username] = row

    def get_account(self, username: str) -> AccountRow | None:
        with self._lock:
            self._check_open()
            return self._accounts.get(username)

    def list_accounts(self) -> list[AccountRow]:
        with self._lock:
            self._check_open()
            return [self._accounts[name] for name in sorted(self._accounts)]

    def append_access(self, entry: bytes) -> int:
        if not isinstance(entry, bytes):
            raise AuditUnavailable("an access-log entry must be bytes")
        with self._lock:
            if self._closed:
                raise AuditUnavailable("the access log is closed")
            self._access_log.append(entry)
            return len(self._access_log)

    def iter_access(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        with self._lock:
            self._check_open()
            end = len(self._access_log)
        # The log only grows, so entries up to end can be read without holding the lock,
        # and a caller may append while iterating.
        for seq in range(max(after, 0) + 1, end + 1):
            yield seq, self._access_log[seq - 1]

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("storage is closed")


def _checked_record(
    position: int, record: SealedRecord
) -> tuple[StoredRecord, frozenset[tuple[int, int]]]:
    """The record as stored and its token pairs, or StorageError naming what is wrong.

    Messages name the position in the batch and the field, never a value.
    """

    def refuse(what: str) -> StorageError:
        return StorageError(f"batch refused: record {position}: {what}")

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


def _normalised_account(account: AccountRow) -> AccountRow:
    # Store what a database would hand back, so both backends return equal rows.
    return AccountRow(
        username=str(account.username),
        role=str(account.role),
        password_hash=str(account.password_hash),
        attributes=bytes(account.attributes),
        created_at=float(account.created_at),
        disabled=bool(account.disabled),
    )
