"""A vault whose access log lives in a database of its own.

The records, their keys and tokens, accounts, sessions, settings and alerts stay in the
vault's database; the access log (its entries, tree nodes, subject index, sealed details
and checkpoints) is kept in another: a schema on another PostgreSQL cluster, with its own
disks, its own replication and its own administrators. Whoever runs the records'
database then cannot reach the log at all, and the log's commits (one a batch of reads)
do not share a WAL with the records' writes.

Each side is a whole PostgresStorage, migrated and granted like any vault schema; only
the log's tables of the log side, and all but those of the records side, are ever used.
The two are bound to each other at creation: a random binding is written into the log
side (meta `log_of`) and then into the records side (meta `log_apart`). A records
database is then never opened without its log database, nor with another vault's log
(either would be a vault that reads and answers with an empty or foreign log), and a
vault whose log is already in its own database does not move it elsewhere.

A read needs nothing of both at once: its entry is appended to the log, durable, before
the records are read, as with one database. What one database gave and two do not: one
snapshot of both, so a backup of such a vault is refused (custodes.backup).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from custodes.errors import ConfigurationError
from custodes.storage.base import (
    AccountStore,
    AlertStore,
    LogAppend,
    MetaStore,
    Rebuild,
    RecordStore,
    Storage,
    UsageStore,
)

if TYPE_CHECKING:
    from custodes.storage.postgres import PostgresStorage

# Where the binding is kept: in the records' database, the log database's; in the log's,
# the records database's. Both the same random value.
LOG_APART_KEY = "log_apart"
LOG_OF_KEY = "log_of"

# What the records side answers: every Protocol but the log's, and what a caller asks of
# a PostgreSQL storage itself (its privileges, where its reads went).
_RECORDS_SIDE = frozenset(
    name
    for protocol in (RecordStore, AccountStore, MetaStore, UsageStore, AlertStore)
    for name in dir(protocol)
    if not name.startswith("_")
) | {"privileges", "read_routing"}


class LogApartStorage:
    """Storage whose LogStore is one PostgreSQL storage and whose every other Protocol is
    another. Made by `open_log_apart`, which checks that the two belong together."""

    def __init__(self, records: PostgresStorage, log: PostgresStorage) -> None:
        self._records = records
        self._log = log

    def __getattr__(self, name: str) -> Any:
        # Only for what the records side serves: a name of the log's, or a private one,
        # is never answered by the records' database.
        if name in _RECORDS_SIDE:
            return getattr(self._records, name)
        raise AttributeError(name)

    # -- the access log, in its own database ---------------------------------------------

    def log_append(self, batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        self._log.log_append(batch, rebuild)

    def log_size(self) -> int:
        return self._log.log_size()

    def log_entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        return self._log.log_entries(start, end)

    def log_node(self, level: int, index: int) -> bytes | None:
        return self._log.log_node(level, index)

    def log_nodes(self, positions: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        return self._log.log_nodes(positions)

    def log_subject_entries(self, commitment: bytes) -> list[int]:
        return self._log.log_subject_entries(commitment)

    def log_subject_rows(
        self, start: int = 0, end: int | None = None
    ) -> Iterator[tuple[int, bytes]]:
        return self._log.log_subject_rows(start, end)

    def log_detail(self, index: int) -> bytes | None:
        return self._log.log_detail(index)

    def log_detail_range(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        return self._log.log_detail_range(start, end)

    def put_checkpoint(self, size: int, note: bytes) -> None:
        self._log.put_checkpoint(size, note)

    def checkpoints(self) -> list[tuple[int, bytes]]:
        return self._log.checkpoints()

    def close(self) -> None:
        try:
            self._log.close()
        finally:
            self._records.close()


def open_log_apart(records: PostgresStorage, log: PostgresStorage) -> Storage:
    """The two storages as one vault's, bound to each other (a new pair is bound here);
    ConfigurationError, with both closed, if they do not belong together."""
    try:
        _bind(records, log)
    except BaseException:
        log.close()
        records.close()
        raise
    return LogApartStorage(records, log)


def _bind(records: PostgresStorage, log: PostgresStorage) -> None:
    apart = records.get_meta(LOG_APART_KEY)
    of = log.get_meta(LOG_OF_KEY)
    if apart is not None and of is not None:
        if not secrets.compare_digest(apart, of):
            raise ConfigurationError(
                "the log database holds another vault's access log: name this vault's own"
            )
        return
    if apart is not None:
        raise ConfigurationError(
            "the log database holds no access log of this vault: name the one it was created with"
        )
    if of is not None:
        raise ConfigurationError(
            "the log database is bound to another vault (or to a creation that did not "
            "finish): give this vault's log a schema of its own"
        )
    # A new pair. The log stays where it is once it holds entries: a vault whose log is
    # in its records' database keeps it there, and a log database that holds entries
    # already is some other vault's.
    if records.log_size():
        raise ConfigurationError(
            "this vault's access log is in its records' database already and is not moved: "
            "leave log_database unset"
        )
    if log.log_size() or log.get_meta("vault_id") is not None:
        raise ConfigurationError("the log database is not empty: give it a schema of its own")
    binding = secrets.token_hex(16).encode()
    # The log side first: a failure in between leaves a log database bound to nothing,
    # which is refused next time, rather than a vault bound to no log.
    log.set_meta(LOG_OF_KEY, binding)
    records.set_meta(LOG_APART_KEY, binding)


def check_log_in_place(records: PostgresStorage) -> None:
    """Refuse to open, on its records' database alone, a vault whose access log lives in
    a database of its own: it would read and answer with an empty log."""
    if records.get_meta(LOG_APART_KEY) is not None:
        raise ConfigurationError(
            "this vault's access log lives in a database of its own: name it "
            "(log_database in the vault's settings, or CUSTODES_LOG_DATABASE)"
        )
