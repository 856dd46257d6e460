"""Envelope encryption of records: one data key per record, one AEAD per field.

Owns the sealed formats (the wrapped data key and the payload frame) and the single
rule for opening them: every failure is one opaque `TamperDetected`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from custodes.crypto.keyring import KeyMaterial
from custodes.errors import TamperDetected

# Each record gets a fresh 32-byte data key, wrapped with AES-256-GCM under the current
# key-encryption key (KEK); destroying the wrapped key crypto-shreds the record. Each
# field is sealed separately with AES-256-GCM under the data key, its associated data
# binding the vault, record type, record id, field name, key generation, the number of
# fields in the record and the field's position in it: a ciphertext moved to another
# vault, record, type or field, and a field dropped, added or reordered, fail to open.
#
# Wrapped key (61 bytes):
#
#     u8 format (1) | nonce[12] | AES-GCM(KEK, data key)[32 + 16]
#
# Payload:
#
#     u8 format (1) | u16 count | count * (u8 name_len | name (UTF-8) | u8 key generation
#                                           | nonce[12] | u32 ct_len | ciphertext + tag)
#
# Associated data, lp(x) = u32 length | x:
#
#     key wrap:  lp("custodes/data-key/v1") | lp(vault_id) | lp(record_id) | u32 kek_version
#     field:     lp("custodes/field/v1") | lp(vault_id) | lp(record_type) | lp(record_id)
#                | u16 count | u16 position | lp(name) | u8 key generation
#
# All integers big-endian. Randomness is drawn as `random(32)` (the data key) and then
# `random(12 * (count + 1))` (the wrapping nonce, then one nonce per field in order).

FRAME_FORMAT = 1
WRAP_FORMAT = 1
DATA_KEY_GENERATION = 1
DATA_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_KEY_BYTES = 1 + NONCE_BYTES + DATA_KEY_BYTES + TAG_BYTES
MAX_FIELDS = 0xFFFF
MAX_NAME_BYTES = 0xFF

FIELD_LABEL = b"custodes/field/v1"
WRAP_LABEL = b"custodes/data-key/v1"

_FRAME_HEAD = bytes((FRAME_FORMAT,))
_WRAP_HEAD = bytes((WRAP_FORMAT,))
_GEN = bytes((DATA_KEY_GENERATION,))
_U16 = tuple(i.to_bytes(2, "big") for i in range(256))
_NAME_CACHE_LIMIT = 4096


def _lp(data: bytes) -> bytes:
    """Length-prefixed, so that concatenated AAD parts cannot be re-split differently."""
    return len(data).to_bytes(4, "big") + data


class RecordSealer:
    """Seals and opens records under one vault's key material.

    Build one per process and reuse it: it keeps one AES-GCM object per KEK version.
    `random` is injectable only so that known-answer tests can pin the output.
    """

    __slots__ = (
        "_field_prefix",
        "_kek_version",
        "_keks",
        "_name_parts",
        "_random",
        "_wrap_prefix",
    )

    def __init__(
        self, material: KeyMaterial, *, random: Callable[[int], bytes] = os.urandom
    ) -> None:
        if material.kek_version not in material.keks:
            raise ValueError("key material has no key-encryption key of its current version")
        self._kek_version = material.kek_version
        self._keks = {version: AESGCM(key) for version, key in material.keks.items()}
        self._random = random
        self._field_prefix = _lp(FIELD_LABEL) + _lp(material.vault_id)
        self._wrap_prefix = _lp(WRAP_LABEL) + _lp(material.vault_id)
        self._name_parts: dict[str, tuple[bytes, bytes]] = {}

    @property
    def kek_version(self) -> int:
        """The KEK version new records are wrapped under."""
        return self._kek_version

    def seal(
        self, record_type: str, record_id: str, fields: Mapping[str, bytes]
    ) -> tuple[int, bytes, bytes]:
        """Encrypt a record's fields; return (kek_version, wrapped_key, payload)."""
        count = len(fields)
        if count > MAX_FIELDS:
            raise ValueError(f"a record holds at most {MAX_FIELDS} fields")
        rid = record_id.encode("utf-8")
        data_key = self._random(DATA_KEY_BYTES)
        nonces = self._random(NONCE_BYTES * (count + 1))
        if len(data_key) != DATA_KEY_BYTES or len(nonces) != NONCE_BYTES * (count + 1):
            raise ValueError("the random source returned the wrong number of bytes")
        wrapped_key = self._wrap(rid, self._kek_version, data_key, nonces[:NONCE_BYTES])

        aead = AESGCM(data_key)
        encrypt = aead.encrypt
        name_parts = self._name_parts
        count_bytes = count.to_bytes(2, "big")
        prefix = self._field_prefix + _lp(record_type.encode("utf-8")) + _lp(rid) + count_bytes
        parts = [_FRAME_HEAD, count_bytes]
        at = NONCE_BYTES
        for position, (name, value) in enumerate(fields.items()):
            cached = name_parts.get(name)
            if cached is None:
                cached = self._remember_name(name)
            entry_head, aad_tail = cached
            nonce = nonces[at : at + NONCE_BYTES]
            at += NONCE_BYTES
            position_bytes = _U16[position] if position < 256 else position.to_bytes(2, "big")
            sealed = encrypt(nonce, value, prefix + position_bytes + aad_tail)
            parts.append(entry_head + nonce + len(sealed).to_bytes(4, "big"))
            parts.append(sealed)
        return self._kek_version, wrapped_key, b"".join(parts)

    def _remember_name(self, name: str) -> tuple[bytes, bytes]:
        """The frame bytes before the nonce, and the AAD tail, for one field name."""
        encoded = name.encode("utf-8")
        if not 0 < len(encoded) <= MAX_NAME_BYTES:
            raise ValueError(f"a field name must be 1 to {MAX_NAME_BYTES} bytes of UTF-8")
        cached = (bytes((len(encoded),)) + encoded + _GEN, _lp(encoded) + _GEN)
        # Field names come from the schema, so the cache stays small; the bound only
        # guards against a caller that invents names.
        if len(self._name_parts) < _NAME_CACHE_LIMIT:
            self._name_parts[name] = cached
        return cached

    def open(
        self,
        record_type: str,
        record_id: str,
        kek_version: int,
        wrapped_key: bytes,
        payload: bytes,
        names: Collection[str] | None = None,
    ) -> dict[str, bytes]:
        """Decrypt the named fields of a record (all when names is None).

        A name the record does not hold is absent from the result. The whole frame is
        checked for shape, but only the requested fields are decrypted and so
        authenticated: what is returned is always exactly what was sealed for this
        record and field.
        """
        if isinstance(names, str):
            raise TypeError("names must be a collection of field names, not one string")
        try:
            return self._open(record_type, record_id, kek_version, wrapped_key, payload, names)
        except TamperDetected:
            raise
        except (InvalidTag, ValueError, IndexError, OverflowError):
            # Which check failed must not be observable; see TamperDetected.
            raise TamperDetected() from None

    def rewrap(self, record_id: str, kek_version: int, wrapped_key: bytes) -> tuple[int, bytes]:
        """Re-wrap a record's data key under the current KEK, for KEK rotation.

        The payload does not change. Raises TamperDetected as `open` does.
        """
        rid = record_id.encode("utf-8")
        try:
            data_key = self._unwrap(rid, kek_version, _as_bytes(wrapped_key))
        except TamperDetected:
            raise
        except (InvalidTag, ValueError, IndexError, OverflowError):
            raise TamperDetected() from None
        nonce = self._random(NONCE_BYTES)
        if len(nonce) != NONCE_BYTES:
            raise ValueError("the random source returned the wrong number of bytes")
        return self._kek_version, self._wrap(rid, self._kek_version, data_key, nonce)

    def _wrap(self, rid: bytes, kek_version: int, data_key: bytes, nonce: bytes) -> bytes:
        aad = self._wrap_prefix + _lp(rid) + kek_version.to_bytes(4, "big")
        return _WRAP_HEAD + nonce + self._keks[kek_version].encrypt(nonce, data_key, aad)

    def _unwrap(self, rid: bytes, kek_version: int, wrapped_key: bytes) -> bytes:
        kek = self._keks.get(kek_version)
        if kek is None or len(wrapped_key) != WRAPPED_KEY_BYTES or wrapped_key[0] != WRAP_FORMAT:
            raise TamperDetected()
        aad = self._wrap_prefix + _lp(rid) + kek_version.to_bytes(4, "big")
        return kek.decrypt(wrapped_key[1 : 1 + NONCE_BYTES], wrapped_key[1 + NONCE_BYTES :], aad)

    def _open(
        self,
        record_type: str,
        record_id: str,
        kek_version: int,
        wrapped_key: bytes,
        payload: bytes,
        names: Collection[str] | None,
    ) -> dict[str, bytes]:
        rid = record_id.encode("utf-8")
        data_key = self._unwrap(rid, kek_version, _as_bytes(wrapped_key))
        entries = _parse_frame(_as_bytes(payload))
        # Compare names as bytes so that fields nobody asked for are not even decoded.
        wanted = None if names is None else {n.encode("utf-8"): n for n in names}

        decrypt = AESGCM(data_key).decrypt
        count_bytes = len(entries).to_bytes(2, "big")
        prefix = self._field_prefix + _lp(record_type.encode("utf-8")) + _lp(rid) + count_bytes
        result: dict[str, bytes] = {}
        for position, (encoded, nonce, sealed) in enumerate(entries):
            if wanted is None:
                name = encoded.decode("utf-8")
            else:
                name = wanted.get(encoded, "")
                if not name:
                    continue
            position_bytes = _U16[position] if position < 256 else position.to_bytes(2, "big")
            aad = prefix + position_bytes + _lp(encoded) + _GEN
            result[name] = decrypt(nonce, sealed, aad)
        return result


def _as_bytes(data: object) -> bytes:
    # Some database drivers hand back memoryview or bytearray for binary columns.
    if type(data) is bytes:
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TamperDetected()


def _parse_frame(payload: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """Split a payload into (encoded name, nonce, ciphertext) entries without decrypting.

    Refuses anything that is not exactly one well-formed frame: wrong format byte,
    short or trailing bytes, empty or repeated names, unknown key generation.
    """
    end = len(payload)
    if end < 3 or payload[0] != FRAME_FORMAT:
        raise TamperDetected()
    count = int.from_bytes(payload[1:3], "big")
    at = 3
    entries: list[tuple[bytes, bytes, bytes]] = []
    append = entries.append
    for _ in range(count):
        if at >= end:
            raise TamperDetected()
        name_end = at + 1 + payload[at]
        nonce_end = name_end + 1 + NONCE_BYTES
        sealed_at = nonce_end + 4
        if name_end == at + 1 or sealed_at > end or payload[name_end] != DATA_KEY_GENERATION:
            raise TamperDetected()
        sealed_len = int.from_bytes(payload[nonce_end:sealed_at], "big")
        next_at = sealed_at + sealed_len
        if sealed_len < TAG_BYTES or next_at > end:
            raise TamperDetected()
        append(
            (
                payload[at + 1 : name_end],
                payload[name_end + 1 : nonce_end],
                payload[sealed_at:next_at],
            )
        )
        at = next_at
    if at != end or len({entry[0] for entry in entries}) != count:
        raise TamperDetected()
    return entries
