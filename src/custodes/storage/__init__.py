"""Storage backends: the Protocol every backend implements, and the backends.

Backends hold only ciphertext, wrapped keys, keyed tokens and non-personal metadata.
"""

from custodes.storage.base import (
    AccountRow,
    BatchOutcome,
    LogAppend,
    SealedRecord,
    SessionRow,
    Storage,
    StoredRecord,
)
from custodes.storage.memory import MemoryStorage
from custodes.storage.sqlite import SQLiteStorage

__all__ = [
    "AccountRow",
    "BatchOutcome",
    "LogAppend",
    "MemoryStorage",
    "SQLiteStorage",
    "SealedRecord",
    "SessionRow",
    "Storage",
    "StoredRecord",
]
