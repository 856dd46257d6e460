"""A bulk export's request, as stored: who asked, for what, of which records, to whom,
and where it stands (requested, approved, produced). The state decides whether an export
may be produced, so the row carries a tag under a key of its own (crypto.row_mac): a
database writer without the keyring can neither approve a request nor reopen a used one
by editing it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from custodes.crypto.row_mac import RowKind, RowMacs
from custodes.errors import TamperDetected
from custodes.storage.base import MetaStore

_PREFIX = "export/"


class ExportState(StrEnum):
    REQUESTED = "requested"
    APPROVED = "approved"
    PRODUCED = "produced"


@dataclass(frozen=True, slots=True)
class ExportRequest:
    export_id: str
    requester: str
    record_type: str
    purpose_class: str
    reason: str
    case_ref: str | None
    recipient: str  # the recipient's X25519 public key, base64 of its 32 bytes
    district: str | None = None
    record_ids: tuple[str, ...] | None = None
    requested_at: float = 0.0
    state: ExportState = ExportState.REQUESTED
    approver: str | None = None
    approved_at: float | None = None
    produced_at: float | None = None

    def fields(self) -> list[object]:
        """Every field, in order, as the tag covers them."""
        return [
            self.export_id,
            self.requester,
            self.record_type,
            self.purpose_class,
            self.reason,
            self.case_ref,
            self.recipient,
            self.district,
            None if self.record_ids is None else list(self.record_ids),
            float(self.requested_at),
            self.state.value,
            self.approver,
            None if self.approved_at is None else float(self.approved_at),
            None if self.produced_at is None else float(self.produced_at),
        ]

    def moved_to(self, state: ExportState, **changes: Any) -> ExportRequest:
        return dataclasses.replace(self, state=state, **changes)


class ExportRequests:
    """Export requests in the vault's metadata store, each tagged; a row whose tag fails
    is refused (TamperDetected), never honoured."""

    def __init__(self, meta: MetaStore, macs: RowMacs) -> None:
        self._meta = meta
        self._macs = macs

    def __repr__(self) -> str:
        return "ExportRequests()"

    def put(self, request: ExportRequest) -> None:
        fields = request.fields()
        tag = self._macs.tag_hex(RowKind.EXPORT_REQUEST, fields)
        self._meta.set_meta(_PREFIX + request.export_id, orjson.dumps([fields, tag]))

    def get(self, export_id: str) -> ExportRequest | None:
        stored = self._meta.get_meta(_PREFIX + export_id)
        if stored is None:
            return None
        try:
            fields, tag = orjson.loads(stored)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            raise TamperDetected("the export request failed its integrity check") from None
        if not isinstance(fields, list) or not self._macs.check_hex(
            RowKind.EXPORT_REQUEST, fields, tag
        ):
            raise TamperDetected("the export request failed its integrity check")
        try:
            request = _from_fields(fields)
        except (ValueError, TypeError):
            raise TamperDetected("the export request failed its integrity check") from None
        if request.export_id != export_id:  # a whole tagged row copied under another id
            raise TamperDetected("the export request failed its integrity check")
        return request


def _from_fields(fields: list[Any]) -> ExportRequest:
    (
        export_id,
        requester,
        record_type,
        purpose_class,
        reason,
        case_ref,
        recipient,
        district,
        record_ids,
        requested_at,
        state,
        approver,
        approved_at,
        produced_at,
    ) = fields
    return ExportRequest(
        export_id=str(export_id),
        requester=str(requester),
        record_type=str(record_type),
        purpose_class=str(purpose_class),
        reason=str(reason),
        case_ref=None if case_ref is None else str(case_ref),
        recipient=str(recipient),
        district=None if district is None else str(district),
        record_ids=None if record_ids is None else tuple(str(r) for r in record_ids),
        requested_at=float(requested_at),
        state=ExportState(state),
        approver=None if approver is None else str(approver),
        approved_at=None if approved_at is None else float(approved_at),
        produced_at=None if produced_at is None else float(produced_at),
    )
