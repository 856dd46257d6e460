"""Authentication of the stored rows that decide access (the vault's settings, accounts,
sessions, API tokens and export requests) and of the alerts raised on its use. Each kind
has its own HMAC-SHA256 key, derived with HKDF from the keyring's index root, so a
database writer without the keyring can forge or edit none.

A tag covers a row's fields as one canonical JSON list headed by its kind, so a tag made
for one kind or one row never verifies for another.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from enum import StrEnum

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.crypto.keyring import KeyMaterial

_INFO = b"custodes/row-mac/v1/"


class RowKind(StrEnum):
    """Which kind of row a tag is for; each has its own key."""

    SETTINGS = "settings"
    ACCOUNT = "account"
    SESSION = "session"
    API_TOKEN = "api_token"  # noqa: S105 - a row kind, not a secret
    # A bulk export's request: its scope, its recipient and whether a second person
    # approved it (custodes.export.requests).
    EXPORT_REQUEST = "export_request"
    ALERT = "alert"
    # The anomaly guard's kept state and its list of flagged records (custodes.vault.guard).
    GUARD = "guard"
    # A request to erase a record and whether a second person approved it
    # (custodes.vault.erasure).
    ERASURE_REQUEST = "erasure_request"


class RowMacs:
    """Tags for stored rows, under per-kind keys of one vault."""

    __slots__ = ("_keys",)

    def __init__(self, material: KeyMaterial) -> None:
        self._keys = {
            kind: HKDF(
                algorithm=hashes.SHA256(),
                length=32,
                salt=material.vault_id,
                info=_INFO + kind.value.encode(),
            ).derive(material.index_root)
            for kind in RowKind
        }

    def __repr__(self) -> str:
        return "RowMacs(<hidden>)"

    def tag(self, kind: RowKind, fields: Sequence[object]) -> bytes:
        """The tag of a row's fields (JSON values: str, int, float, bool, None, lists and
        dicts with str keys; bytes given as hex by the caller)."""
        message = orjson.dumps([kind.value, *fields], option=orjson.OPT_SORT_KEYS)
        return hmac.new(self._keys[kind], message, hashlib.sha256).digest()

    def tag_hex(self, kind: RowKind, fields: Sequence[object]) -> str:
        return self.tag(kind, fields).hex()

    def check_hex(self, kind: RowKind, fields: Sequence[object], stored: object) -> bool:
        """Whether a stored hex tag is the tag of these fields (constant time)."""
        if not isinstance(stored, str):
            return False
        return hmac.compare_digest(self.tag_hex(kind, fields), stored)
