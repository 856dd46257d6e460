"""Storage backends: the Protocols a backend implements (one per concern, and Storage,
all of them together) and the backends. They hold only ciphertext, wrapped keys, keyed
tokens and non-personal metadata.
"""

from typing import TYPE_CHECKING

from custodes.storage.base import (
    AccountRow,
    AccountStore,
    AlertRow,
    AlertStore,
    BatchOutcome,
    LogAppend,
    LogStore,
    MetaStore,
    RecordStore,
    SealedRecord,
    SessionRow,
    Storage,
    StoredRecord,
    UsageStore,
)
from custodes.storage.memory import MemoryStorage
from custodes.storage.sqlite import SQLiteStorage

if TYPE_CHECKING:
    from custodes.storage.postgres import PostgresStorage

__all__ = [
    "AccountRow",
    "AccountStore",
    "AlertRow",
    "AlertStore",
    "BatchOutcome",
    "LogAppend",
    "LogStore",
    "MemoryStorage",
    "MetaStore",
    "PostgresStorage",
    "RecordStore",
    "SQLiteStorage",
    "SealedRecord",
    "SessionRow",
    "Storage",
    "StoredRecord",
    "UsageStore",
]


def __getattr__(name: str) -> object:
    # psycopg takes a tenth of a second to import: only a vault on PostgreSQL pays it.
    if name == "PostgresStorage":
        from custodes.storage.postgres import PostgresStorage

        return PostgresStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
