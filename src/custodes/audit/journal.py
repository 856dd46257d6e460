"""Access-log entries and the durable journal that the access function writes first.

An entry names who acted, in what role, why, on which record ids, and what came of it.
It carries record ids, never a personal value.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from custodes.errors import AuditUnavailable, CustodesError
from custodes.storage.base import Storage

ENTRY_VERSION = 1


class Outcome(StrEnum):
    GRANTED = "granted"
    DENIED = "denied"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class AccessEntry:
    actor: str
    role: str
    action: str  # subject:object:action tag, see custodes.policy.Action
    outcome: Outcome
    time: float
    purpose: str | None = None
    case_ref: str | None = None
    record_type: str | None = None
    records: tuple[str, ...] = ()  # record ids touched (returned or revealed)
    result_count: int = 0
    detail: dict[str, Any] = field(default_factory=dict)  # non-personal: index, field, counts

    def encode(self) -> bytes:
        """Canonical, versioned bytes: sorted keys, no whitespace, UTF-8."""
        doc = {
            "v": ENTRY_VERSION,
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "outcome": self.outcome.value,
            "time": round(self.time, 6),
            "purpose": self.purpose,
            "case": self.case_ref,
            "type": self.record_type,
            "records": list(self.records),
            "count": self.result_count,
            "detail": self.detail,
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def decode(cls, data: bytes) -> AccessEntry:
        doc = orjson.loads(data)
        return cls(
            actor=doc["actor"],
            role=doc["role"],
            action=doc["action"],
            outcome=Outcome(doc["outcome"]),
            time=doc["time"],
            purpose=doc["purpose"],
            case_ref=doc["case"],
            record_type=doc["type"],
            records=tuple(doc["records"]),
            result_count=doc["count"],
            detail=doc["detail"],
        )


class AccessJournal:
    """Appends entries durably; a failure to append raises AuditUnavailable."""

    def __init__(self, storage: Storage, clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self.clock = clock

    def append(self, entry: AccessEntry) -> int:
        try:
            return self._storage.append_access(entry.encode())
        except AuditUnavailable:
            raise
        except (CustodesError, OSError) as exc:
            raise AuditUnavailable(
                "the access log could not record this access, so it was refused"
            ) from exc

    def entries(self, after: int = 0) -> Iterator[tuple[int, AccessEntry]]:
        for seq, data in self._storage.iter_access(after):
            yield seq, AccessEntry.decode(data)

    def entries_for(self, record_ids: Sequence[str]) -> Iterator[tuple[int, AccessEntry]]:
        wanted = set(record_ids)
        for seq, entry in self.entries():
            if wanted.intersection(entry.records):
                yield seq, entry
