"""The storage Protocols: what a backend must do, one small Protocol per concern, and
Storage, all four together. Backends hold only ciphertext, keyed tokens and non-personal
metadata, never a key or a plaintext value; tests/contract/ holds a suite per Protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

# Counted login attempts per key: (how many, time of the last).
LoginCounts = Mapping[str, tuple[int, float]]


class SealedRecord(NamedTuple):
    """One record as it is stored: sealed fields, its wrapped data key, its index tokens."""

    record_id: str
    record_type: str
    payload: bytes  # the sealed fields (custodes.crypto.envelope)
    kek_version: int  # which key-encryption key wrapped the data key
    wrapped_key: bytes  # this record's own data key, wrapped (the unit of crypto-shredding)
    tokens: tuple[tuple[int, int], ...]  # (index_id, blind token) pairs


class StoredRecord(NamedTuple):
    """A record read back: what is needed to open it. Tokens are not returned."""

    record_id: str
    record_type: str
    payload: bytes
    kek_version: int
    wrapped_key: bytes


class AccountRow(NamedTuple):
    """An official's account. Holds a password hash, never a password."""

    username: str
    role: str
    password_hash: str
    attributes: bytes  # JSON object: district, clearance, MFA state, ...
    created_at: float
    disabled: bool


class SessionRow(NamedTuple):
    """A logged-in session, as every server process sharing the vault sees it."""

    key: bytes  # SHA-256 of the bearer token: the token itself is never stored
    username: str
    role: str
    issued_at: float
    expires: float  # absolute end
    last_seen: float  # for the idle timeout; refreshed at most once a minute
    client: str | None  # the network address it was opened from


class AlertRow(NamedTuple):
    """An alert as stored: what someone must look at, and how far it has been dealt with.
    Names accounts, signals and records by keyed id, never a personal value."""

    alert_id: str
    raised_at: float
    body: bytes  # JSON object: the alert, its state, and its tag (custodes.alerts)


class Rekeyed(NamedTuple):
    """One record's keys after a rotation step, applied only if the record still holds
    `expected_wrapped` (the wrapped key it was read with): a record changed or erased in
    the meantime is left alone."""

    record_id: str
    expected_wrapped: bytes
    kek_version: int
    wrapped_key: bytes
    payload: bytes | None  # re-encrypted under a new data key, or None: unchanged
    tokens: tuple[tuple[int, int], ...] = ()  # (index id, token) pairs to add


class KeyCensus(NamedTuple):
    """Which key versions the stored rows use: what a rotation must finish before an old
    version is destroyed. Counts only."""

    kek_versions: dict[int, int]  # records per KEK version wrapping their data key
    data_generations: dict[int, int]  # records per data key generation (payload byte 1)
    token_index_ids: dict[int, int]  # token rows per stored index id


class BatchOutcome(NamedTuple):
    inserted: int  # records newly stored
    already_present: int  # records skipped because their id was stored already


def checked_subjects(start: int, subjects: Sequence[str]) -> list[str]:
    """UsageStore.note_subjects's subjects, each once, or ValueError."""
    if not fits_int64(start) or isinstance(subjects, str):
        raise ValueError("subjects are noted as a sequence of record ids in a 64-bit window")
    if not all(isinstance(s, str) for s in subjects):
        raise ValueError("a noted subject is a record id")
    return list(dict.fromkeys(subjects))


def checked_charges(charges: Sequence[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """UsageStore.charge_usage's charges as given, or ValueError: whole amounts not below
    zero, 64-bit window starts, each counter once."""
    seen: set[str] = set()
    for counter, start, amount in charges:
        if not isinstance(counter, str) or counter in seen:
            raise ValueError("each usage counter is charged once per call")
        if not (fits_int64(start) and fits_int64(amount)) or amount < 0:
            raise ValueError("a usage charge is a whole amount, not below zero")
        seen.add(counter)
    return list(charges)


class LogAppend(NamedTuple):
    """One group commit to the access log."""

    first_index: int  # index of the first new entry: must equal the stored log size
    entries: Sequence[bytes]  # encoded entries, the leaves' data
    nodes: Sequence[tuple[int, int, bytes]]  # (level, index, hash) completed, leaves included
    subjects: Sequence[tuple[bytes, int]]  # (subject commitment, entry index)
    details: Sequence[tuple[int, bytes]]  # (entry index, sealed private details)


@runtime_checkable
class RecordStore(Protocol):
    """Sealed records, their wrapped keys and their blind-index tokens."""

    def write_batch(self, records: Sequence[SealedRecord]) -> BatchOutcome:
        """Store records with their keys and tokens, all or none, durably.

        A record whose id is already stored, or repeats an earlier one in the same
        batch, is skipped together with its key and tokens: ingest is idempotent.
        Raises StorageError if nothing was stored.
        """
        ...

    def get_records(self, record_ids: Sequence[str]) -> dict[str, StoredRecord]:
        """The stored records among record_ids, keyed by id; unknown ids are absent."""
        ...

    def find(self, index_id: int, token: int, limit: int) -> list[str]:
        """Ids of records carrying this token in this index, at most limit, sorted."""
        ...

    def find_records(self, index_id: int, token: int, limit: int) -> list[StoredRecord]:
        """The stored records carrying this token in this index, at most limit, by id:
        find and get_records in one read (one round trip to a database server, one
        snapshot), for a search that opens what it finds."""
        ...

    def count_records(self, record_type: str | None = None) -> int: ...

    def record_tokens(
        self, after: int, limit: int
    ) -> list[tuple[int, str, tuple[tuple[int, int], ...]]]:
        """Stored records in storage order after position `after` (0: from the first), at
        most `limit`: (position, record id, its (index_id, token) pairs as a search finds
        them, sorted). For checking the search index against the records themselves."""
        ...

    def records_page(self, after: int, limit: int) -> list[tuple[int, StoredRecord]]:
        """Stored records in storage order after position `after` (0: from the first), at
        most `limit`, with their positions (as record_tokens numbers them)."""
        ...

    def rekey_records(self, changes: Sequence[Rekeyed]) -> int:
        """Apply a page of rotated keys, all in one transaction: each record's KEK version
        and wrapped key, its payload when given, and its added tokens (already present:
        ignored), where the record still holds the expected wrapped key. Returns how
        many records changed. Raises StorageError if nothing was applied."""
        ...

    def drop_tokens(self, index_ids: Collection[int]) -> int:
        """Delete every token row of these stored index ids (a retired index key
        version's); returns how many went."""
        ...

    def key_census(self) -> KeyCensus:
        """How many rows use each key version (a full read: for finishing a rotation)."""
        ...

    def erase_records(self, record_ids: Sequence[str]) -> int:
        """Delete these records with their wrapped data keys and every blind-index token
        of theirs, in one durable transaction; how many were stored (unknown ids are
        skipped). Crypto-shredding: without its data key the record cannot be opened
        from any copy of its payload. Sends nothing a database keeps readable that it
        can avoid keeping (see each backend)."""
        ...


@runtime_checkable
class AccountStore(Protocol):
    """Officials' accounts, and what every process serving the vault must share about
    them: sessions, failed logins, one-time marks."""

    def add_account(self, account: AccountRow) -> None:
        """Create an account; ConfigurationError if the username is taken."""
        ...

    def update_account(self, account: AccountRow) -> None:
        """Replace an existing account; RecordNotFound if there is none."""
        ...

    def replace_account(self, expected: AccountRow, account: AccountRow) -> bool:
        """Replace the account only if its stored row is still exactly `expected`;
        whether it was. Atomic across every process sharing the store, so that two
        read-modify-writes of one account (two failed logins on two servers) never
        lose one another's change: the loser reads again and retries."""
        ...

    def get_account(self, username: str) -> AccountRow | None: ...

    def list_accounts(self) -> list[AccountRow]: ...

    def put_session(self, session: SessionRow) -> None:
        """Store a new session, durably."""
        ...

    def get_session(self, key: bytes) -> SessionRow | None: ...

    def get_session_account(self, key: bytes) -> tuple[SessionRow, AccountRow | None] | None:
        """A session and the account its row names (None if there is no such account), in
        one read: what every request checks first."""
        ...

    def touch_session(self, key: bytes, last_seen: float) -> None:
        """Move a session's last_seen forward (never back); no-op if it has ended."""
        ...

    def end_session(self, key: bytes) -> bool:
        """Delete a session; whether it existed."""
        ...

    def end_sessions(self, username: str) -> int:
        """Delete every session of an account; how many there were."""
        ...

    def purge_sessions(self, now: float, idle: float) -> int:
        """Delete sessions past their end or idle longer than `idle` seconds; how many."""
        ...

    def count_sessions(self) -> int: ...

    def count_account_sessions(self, username: str) -> int:
        """How many sessions of this account are stored (ended ones are deleted)."""
        ...

    def list_sessions(self) -> list[SessionRow]:
        """Every stored session, ended or not, by account name (for deployment checks)."""
        ...

    def login_failures(self, keys: Sequence[str]) -> LoginCounts:
        """(attempts, time of the last) for each key counted since it was last cleared."""
        ...

    def admit_login_attempt(
        self, keys: Sequence[str], now: float, admit: Callable[[LoginCounts], bool]
    ) -> bool:
        """Count one more login attempt for each key (an account name, a client address)
        if `admit` says yes to their counts as they stand; whether it did. The read, the
        decision and the count are one step across every process sharing the store: a
        thousand attempts at once cannot all read the same count and all be let through.
        `admit` must be quick and must not call the store."""
        ...

    def forgive_login_attempt(self, key: str) -> None:
        """Take one counted attempt back from a key (the attempt succeeded)."""
        ...

    def clear_login_failures(self, key: str) -> None: ...

    def purge_login_failures(self, before: float) -> int:
        """Forget keys whose last failure is older than `before`; how many."""
        ...

    def spend(self, key: bytes, now: float, keep: float) -> bool:
        """Mark a one-time value (its hash) used for `keep` seconds; True the first time,
        False if it is marked already, whichever process marked it. Marks past their
        time are forgotten on the way."""
        ...


def fits_int64(*values: int) -> bool:
    """Whether every value is an int a database's 64-bit integer holds: a key outside
    that range is stored nowhere, and is answered as absent rather than sent."""
    return all(type(value) is int and -(2**63) <= value < 2**63 for value in values)


# How a writer that lost a race rebuilds its batch under the log's write lock: from the
# stored size and the stored nodes the backend read with it (see LogStore.log_append).
Rebuild = Callable[[int, Mapping[tuple[int, int], bytes]], LogAppend]


@runtime_checkable
class LogStore(Protocol):
    """The access log: a Merkle tree of entries (custodes.audit) and its checkpoints."""

    def log_append(self, batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        """Append entries with their tree nodes, subject references and sealed details,
        all or none, durable (synced) before returning.

        Raises AuditUnavailable if it cannot, and its subclass LogMoved if
        batch.first_index is not the number of entries already stored (another writer,
        perhaps another process, got there first: rebuild the batch on the new tree).

        A backend whose readers go on while a writer holds its write lock (PostgreSQL,
        SQLite in WAL mode) calls `rebuild`, if given, with the stored size, under that
        lock, and writes the batch it returns instead: a writer that lost a race to a
        busy one then takes up the new entries and appends with no one able to move the
        log meanwhile, where retrying from outside the lock could lose every race. One
        whose readers would wait on the lock (memory) raises LogMoved.

        With the size goes what the backend read of the tree under the same lock: the
        stored nodes at the peaks (merkle.peak_positions) of the stored size and of
        batch.first_index, or any part of them, even none. A backend that reaches its
        database over a network reads them with the size, so that a writer holding the
        lock makes no round trip to take the new entries up.
        """
        ...

    def log_size(self) -> int:
        """How many entries the access log holds."""
        ...

    def log_entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(index, entry) for start <= index < end, in order, streamed."""
        ...

    def log_node(self, level: int, index: int) -> bytes | None:
        """A stored perfect-subtree hash (level 0: leaf hashes), or None."""
        ...

    def log_nodes(self, positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The stored nodes among the (level, index) positions asked for, in one read
        (those not stored are left out): a compact range's peaks cost one round trip."""
        ...

    def log_subject_entries(self, commitment: bytes) -> list[int]:
        """Indexes of the entries that reference a subject commitment, ascending."""
        ...

    def log_subject_rows(
        self, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        """Every (entry index, commitment) of the subject index for start <= index < end
        (no end: every row from start, even one naming no stored entry), ascending by
        index then commitment, streamed: what the verifier holds against the commitments
        the entries themselves carry."""
        ...

    def log_detail(self, index: int) -> bytes | None:
        """The sealed private details of an entry, or None (none, or erased)."""
        ...

    def log_detail_range(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(index, sealed details) of every entry with details (not erased) for start <=
        index < end, in order, streamed: a reader of many entries' details (the anomaly
        guard) makes a query a page, not one an entry."""
        ...

    def put_checkpoint(self, size: int, note: bytes) -> None:
        """Store the signed checkpoint note for a tree size, durably; a later call for the
        same size replaces it (to add cosignatures)."""
        ...

    def checkpoints(self) -> list[tuple[int, bytes]]:
        """Every stored (size, note), ascending by size."""
        ...


@runtime_checkable
class MetaStore(Protocol):
    """Non-personal vault metadata: the vault id, its schema, token sizes, the log's
    verifier key."""

    def get_meta(self, key: str) -> bytes | None:
        """A piece of non-personal vault metadata, or None."""
        ...

    def set_meta(self, key: str, value: bytes) -> None:
        """Store or replace a piece of non-personal vault metadata, durably."""
        ...


@runtime_checkable
class UsageStore(Protocol):
    """Counters of what each official has been shown (custodes.policy.budgets), shared by
    every process serving the vault and kept across restarts."""

    def charge_usage(self, account: str, charges: Sequence[tuple[str, int, int]]) -> list[int]:
        """Add to the account's counters, each charge (counter, window start, amount), all
        at once, and return the totals after, in the charges' order. A counter holds one
        window at a time: a charge for a later window starts it again from its amount;
        one for an earlier window (a process whose clock is behind) adds to the stored
        one. Amounts are whole and not negative, each counter named once per call
        (ValueError otherwise).

        Written without waiting for the disk: a crash of the machine may forget the last
        moments' charges (the access log, which is synced, keeps every read)."""
        ...

    def note_subjects(self, account: str, counter: str, start: int, subjects: Sequence[str]) -> int:
        """Count distinct subjects (record ids) on one of the account's counters, for the
        window starting at `start`: each subject not yet noted on it in this window adds
        one (a subject noted in an earlier window counts again), and the counter's total
        after is returned; counted once across every process sharing the store. Notes of
        earlier windows are forgotten on the way. Written like charge_usage, unsynced."""
        ...


@runtime_checkable
class AlertStore(Protocol):
    """The alerts raised on officials' use of the vault, shared by every process serving
    it, for supervisors and auditors to acknowledge and resolve (custodes.alerts)."""

    def put_alert(self, row: AlertRow) -> bool:
        """Store a new alert, durably; False (and nothing changed) if its id is stored."""
        ...

    def replace_alert(self, expected: AlertRow, row: AlertRow) -> bool:
        """Replace an alert only if its stored row is still exactly `expected`; whether it
        was. Atomic across processes, so that two supervisors acting on one alert at once
        never lose one another's step."""
        ...

    def get_alert(self, alert_id: str) -> AlertRow | None: ...

    def list_alerts(self, limit: int) -> list[AlertRow]:
        """The latest alerts, at most `limit`, newest first (by time raised, then id)."""
        ...


class Storage(RecordStore, AccountStore, LogStore, MetaStore, UsageStore, AlertStore, Protocol):
    """A whole backend. Every method is atomic; write_batch is all-or-nothing."""

    def close(self) -> None: ...
