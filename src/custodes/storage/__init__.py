"""Storage backends: the Protocols a backend implements (one per concern, and Storage,
all of them together) and the backends. They hold only ciphertext, wrapped keys, keyed
tokens and non-personal metadata.
"""

from custodes.storage.base import (
    AccountRow,
    AccountStore,
    BatchOutcome,
    LogAppend,
    LogStore,
    MetaStore,
    RecordStore,
    SealedRecord,
    SessionRow,
    Storage,
    StoredRecord,
)
from custodes.storage.memory import MemoryStorage
from custodes.storage.sqlite import SQLiteStorage

__all__ = [
    "AccountRow",
    "AccountStore",
    "BatchOutcome",
    "LogAppend",
    "LogStore",
    "MemoryStorage",
    "MetaStore",
    "RecordStore",
    "SQLiteStorage",
    "SealedRecord",
    "SessionRow",
    "Storage",
    "StoredRecord",
]
