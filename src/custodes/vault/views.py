"""What the vault hands out: masked records, their links, a reading of the access log."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from custodes.audit import AccessEntry


@dataclass(frozen=True, slots=True)
class LinkView:
    record_id: str
    record_type: str
    role: str  # suspect / victim / ... for case links; "recipient" for deliveries
    label: str  # a masked name or a case number, enough to tell links apart


@dataclass(frozen=True, slots=True)
class RecordView:
    """A record as an official first sees it: every field masked."""

    record_id: str
    record_type: str
    fields: dict[str, str]
    links: list[LinkView] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "record_id": self.record_id,
            "type": self.record_type,
            "fields": self.fields,
            "links": [
                {
                    "record_id": ln.record_id,
                    "type": ln.record_type,
                    "role": ln.role,
                    "label": ln.label,
                }
                for ln in self.links
            ],
        }


@dataclass(frozen=True, slots=True)
class LogExtract:
    """Access-log entries matching an auditor's filters, streamed, with the log's state
    when the reading was logged: its size and the largest size a signed checkpoint covers."""

    entries: Iterator[tuple[int, AccessEntry]]
    size: int
    signed: int

    def __iter__(self) -> Iterator[tuple[int, AccessEntry]]:
        return self.entries
