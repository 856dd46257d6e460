"""Access-log entries: who acted, in what role, why, on which records, with what outcome.

An entry carries record ids and keyed subject commitments, never a personal value. What
must stay private (the values searched for) is sealed in a side blob that the entry names
by hash, so erasing it later leaves the tree intact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

ENTRY_VERSION = 2


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
    records: tuple[str, ...] = ()  # record ids touched (returned, read or revealed)
    result_count: int = 0
    client: str | None = None  # the client's address, for requests that came over a network
    detail: dict[str, Any] = field(default_factory=dict)  # non-personal: index, field, counts
    subjects: tuple[str, ...] = ()  # keyed commitments (hex) of the records touched
    private_hash: str | None = None  # SHA-256 (hex) of the sealed side blob, if any

    def encode(self) -> bytes:
        """Canonical, versioned bytes (sorted keys, no whitespace): the Merkle leaf's data."""
        return self.encode_referencing(self.subjects, self.private_hash)

    def encode_referencing(self, subjects: Sequence[str], private_hash: str | None) -> bytes:
        """The bytes of this entry carrying these subject commitments and details hash in
        place of its own: what the log appends, without building a second entry (a
        frozen dataclass's copy costs more than the encoding, on every audited read)."""
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
            "client": self.client,
            "detail": self.detail,
            "subjects": list(subjects),
            "private": private_hash,
        }
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def decode(cls, data: bytes) -> AccessEntry:
        doc = orjson.loads(data)
        if not isinstance(doc, dict) or doc.get("v") != ENTRY_VERSION:
            raise ValueError("not an access-log entry of a known version")
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
            client=doc["client"],
            detail=doc["detail"],
            subjects=tuple(doc["subjects"]),
            private_hash=doc["private"],
        )
