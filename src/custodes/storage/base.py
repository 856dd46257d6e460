"""The storage Protocol: what every backend must do, and nothing more.

Backends hold only ciphertext, keyed tokens and non-personal metadata; they never see
a key or a plaintext value. One contract suite (tests/contract/) runs on every backend.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol, runtime_checkable


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


class BatchOutcome(NamedTuple):
    inserted: int  # records newly stored
    already_present: int  # records skipped because their id was stored already


@runtime_checkable
class Storage(Protocol):
    """A backend. Every method is atomic; write_batch is all-or-nothing."""

    def get_meta(self, key: str) -> bytes | None:
        """A piece of non-personal vault metadata, or None."""
        ...

    def set_meta(self, key: str, value: bytes) -> None:
        """Store or replace a piece of non-personal vault metadata, durably."""
        ...

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

    def count_records(self, record_type: str | None = None) -> int: ...

    def add_account(self, account: AccountRow) -> None:
        """Create an account; ConfigurationError if the username is taken."""
        ...

    def update_account(self, account: AccountRow) -> None:
        """Replace an existing account; RecordNotFound if there is none."""
        ...

    def get_account(self, username: str) -> AccountRow | None: ...

    def list_accounts(self) -> list[AccountRow]: ...

    def append_access(self, entry: bytes) -> int:
        """Append one access-log entry and make it durable before returning its sequence
        number (1, 2, ...). Raises AuditUnavailable if it cannot."""
        ...

    def iter_access(self, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """Access-log entries with sequence number greater than after, in order."""
        ...

    def close(self) -> None: ...
