"""Envelope encryption of records: one data key per record, one padded AEAD per record.

Owns the sealed formats (the wrapped data key, the padded payload, the keyed type tag)
and the single rule for opening them: every failure is one opaque `TamperDetected`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable, Collection, Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.crypto.kek import KekProvider, kek_provider
from custodes.crypto.keyring import KeyMaterial
from custodes.errors import TamperDetected

# Each record gets a fresh 32-byte data key, wrapped with AES-256-GCM under the current
# key-encryption key (KEK); destroying the wrapped key crypto-shreds the record. All of a
# record's fields are sealed together, as ONE AES-256-GCM ciphertext under the data key,
# of a body padded to a bucket: a thief who counts bytes learns the bucket, not which
# fields a record holds or how long any value is (threat 20). The associated data binds
# the vault, record type, record id and key generation, so the whole payload moved to
# another vault, record or type fails to open, and so does any bit of it changed: the
# tag is checked before a byte is decrypted, and a field cannot be moved, dropped,
# renamed or reordered from outside the ciphertext at all.
#
# Wrapped key (61 bytes):
#
#     u8 format (1) | nonce[12] | AES-GCM(KEK, data key)[32 + 16]
#
# Payload (format 2; format 1 sealed each field apart and no longer opens):
#
#     u8 format (2) | u8 data key generation | nonce[12] | AES-GCM(data key, body)[len + 16]
#     body:  u16 count | count * (u8 name_len | name (UTF-8) | u32 value_len | value)
#            | zero bytes up to the bucket
#
# The data key generation starts at 1 and rises by one each time `keys rotate --data`
# re-encrypts every record under new data keys; a record of any generation opens.
#
# Buckets (the body's padded length): 512 bytes for every record of every type, then
# the next power of two. One size for all types, so that length does not tell a person
# from a case or a delivery; 512 holds every synthetic person and delivery with room to
# spare (the longest is about 370 bytes) and all but about one case in a thousand (long
# narratives). Above it powers of two, not fixed steps: a record that long is rare and
# its length is what would single it out, and doubling leaks only which of a handful of
# sizes it reached, at a cost of at most twice its bytes.
#
# Associated data, lp(x) = u32 length | x:
#
#     key wrap:  lp("custodes/data-key/v1") | lp(vault_id) | lp(record_id) | u32 kek_version
#     payload:   lp("custodes/record/v2") | lp(vault_id) | lp(record_type) | lp(record_id)
#                | u8 key generation
#
# Type tag (stored in place of the type's name): the first 8 bytes, in lower-case hex, of
# HMAC-SHA256(HKDF-SHA256(index_root, salt=vault_id, info="custodes/record-type/v1"),
# type name). Keyed, so a thief cannot name a type by hashing the schema's type names.
#
# All integers big-endian. Randomness is drawn as `random(32)` (the data key) and then
# `random(24)` (the wrapping nonce, then the payload's nonce).

FRAME_FORMAT = 2
WRAP_FORMAT = 1
DATA_KEY_GENERATION = 1
DATA_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_KEY_BYTES = 1 + NONCE_BYTES + DATA_KEY_BYTES + TAG_BYTES
MAX_FIELDS = 0xFFFF
MAX_NAME_BYTES = 0xFF
MAX_VALUE_BYTES = 0xFFFFFFFF
BUCKET_BYTES = 512
TYPE_TAG_BYTES = 8
PAYLOAD_HEAD_BYTES = 2 + NONCE_BYTES

RECORD_LABEL = b"custodes/record/v2"
WRAP_LABEL = b"custodes/data-key/v1"
TYPE_TAG_INFO = b"custodes/record-type/v1"

_WRAP_HEAD = bytes((WRAP_FORMAT,))
_U32 = struct.Struct(">I").pack
_NAME_CACHE_LIMIT = 4096


def _lp(data: bytes) -> bytes:
    """Length-prefixed, so that concatenated AAD parts cannot be re-split differently."""
    return len(data).to_bytes(4, "big") + data


def bucket(length: int) -> int:
    """The padded length of a body of `length` bytes: what a thief sees of its size."""
    if length <= BUCKET_BYTES:
        return BUCKET_BYTES
    return 1 << (length - 1).bit_length()


class RecordSealer:
    """Seals and opens records under one vault's key material.

    Build one per process and reuse it: it keeps one AES-GCM object per KEK version.
    `random` is injectable only so that known-answer tests can pin the output.
    """

    __slots__ = (
        "_data_generation",
        "_head",
        "_kek_version",
        "_keks",
        "_name_heads",
        "_random",
        "_record_prefix",
        "_type_key",
        "_type_prefixes",
        "_wrap_prefix",
    )

    def __init__(
        self,
        material: KeyMaterial,
        *,
        random: Callable[[int], bytes] = os.urandom,
        keks: KekProvider | None = None,
    ) -> None:
        # The KEKs are reached through a provider (the keyring's, or a token's), so that
        # this object never needs to hold a KEK's bytes.
        self._keks = kek_provider(material) if keks is None else keks
        if material.kek_version not in self._keks.versions():
            raise ValueError("key material has no key-encryption key of its current version")
        self._kek_version = material.kek_version
        # New records are sealed under fresh data keys of the current generation; a
        # record of any generation opens, its payload naming its own (authenticated).
        self._data_generation = material.data_generation
        if not DATA_KEY_GENERATION <= material.data_generation <= 0xFF:
            raise ValueError("the data key generation does not fit its byte")
        self._head = bytes((FRAME_FORMAT, material.data_generation))
        self._random = random
        self._record_prefix = _lp(RECORD_LABEL) + _lp(material.vault_id)
        self._wrap_prefix = _lp(WRAP_LABEL) + _lp(material.vault_id)
        self._name_heads: dict[str, bytes] = {}
        # AAD up to the record id, per record type (the schema's few).
        self._type_prefixes: dict[str, bytes] = {}
        # From the index root, not a KEK: a tag must survive KEK rotation, as record ids do.
        self._type_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=material.vault_id, info=TYPE_TAG_INFO
        ).derive(material.index_root)

    @property
    def kek_version(self) -> int:
        """The KEK version new records are wrapped under."""
        return self._kek_version

    @property
    def kek_versions(self) -> frozenset[int]:
        """The KEK versions this sealer can unwrap under."""
        return self._keks.versions()

    @property
    def data_generation(self) -> int:
        """The data key generation new records are sealed under."""
        return self._data_generation

    @staticmethod
    def generation_of(payload: bytes) -> int:
        """The data key generation a stored payload names (unauthenticated until opened)."""
        return payload[1] if len(payload) > 1 else 0

    def close(self) -> None:
        """Let go of the KEKs (a token's session, when a token holds them)."""
        self._keks.close()

    def type_tag(self, record_type: str) -> str:
        """The keyed tag stored in place of a record type's name."""
        digest = hmac.digest(self._type_key, record_type.encode("utf-8"), hashlib.sha256)
        return digest[:TYPE_TAG_BYTES].hex()

    def seal(
        self, record_type: str, record_id: str, fields: Mapping[str, bytes]
    ) -> tuple[int, bytes, bytes]:
        """Encrypt a record's fields; return (kek_version, wrapped_key, payload)."""
        count = len(fields)
        if count > MAX_FIELDS:
            raise ValueError(f"a record holds at most {MAX_FIELDS} fields")
        rid = record_id.encode("utf-8")
        data_key = self._random(DATA_KEY_BYTES)
        nonces = self._random(NONCE_BYTES * 2)
        if len(data_key) != DATA_KEY_BYTES or len(nonces) != NONCE_BYTES * 2:
            raise ValueError("the random source returned the wrong number of bytes")
        # What _wrap does, with the record id's length-prefixed form made once for both
        # associated data.
        lp_rid = _U32(len(rid)) + rid
        wrap_nonce = nonces[:NONCE_BYTES]
        kek_version = self._kek_version
        wrap_aad = self._wrap_prefix + lp_rid + kek_version.to_bytes(4, "big")
        wrapped_key = (
            _WRAP_HEAD + wrap_nonce + self._keks.wrap(kek_version, wrap_nonce, data_key, wrap_aad)
        )

        heads = self._name_heads
        parts = [count.to_bytes(2, "big")]
        extend = parts.extend
        for name, value in fields.items():
            head = heads.get(name)
            if head is None:
                head = self._remember_name(name)
            if len(value) > MAX_VALUE_BYTES:
                raise ValueError("a field value is too long to seal")
            extend((head, _U32(len(value)), value))
        body = b"".join(parts)
        body = body.ljust(bucket(len(body)), b"\0")
        nonce = nonces[NONCE_BYTES:]
        head = self._head
        type_prefix = self._type_prefixes.get(record_type)
        if type_prefix is None:
            type_prefix = self._record_prefix + _lp(record_type.encode("utf-8"))
            if len(self._type_prefixes) < _NAME_CACHE_LIMIT:
                self._type_prefixes[record_type] = type_prefix
        aad = type_prefix + lp_rid + head[1:]
        sealed = AESGCM(data_key).encrypt(nonce, body, aad)
        return kek_version, wrapped_key, head + nonce + sealed

    def _remember_name(self, name: str) -> bytes:
        """The body bytes before a field's value length: its name, length-prefixed."""
        encoded = name.encode("utf-8")
        if not 0 < len(encoded) <= MAX_NAME_BYTES:
            raise ValueError(f"a field name must be 1 to {MAX_NAME_BYTES} bytes of UTF-8")
        head = bytes((len(encoded),)) + encoded
        # Field names come from the schema, so the cache stays small; the bound only
        # guards against a caller that invents names.
        if len(self._name_heads) < _NAME_CACHE_LIMIT:
            self._name_heads[name] = head
        return head

    def open(
        self,
        record_type: str,
        record_id: str,
        kek_version: int,
        wrapped_key: bytes,
        payload: bytes,
        names: Collection[str] | None = None,
    ) -> dict[str, bytes]:
        """Decrypt a record and return the named fields (all when names is None).

        A name the record does not hold is absent from the result. The whole payload is
        authenticated before anything is decrypted, whatever was asked for; only the
        requested values are copied out of the body.
        """
        if isinstance(names, str):
            raise TypeError("names must be a collection of field names, not one string")
        try:
            return self._open(record_type, record_id, kek_version, wrapped_key, payload, names)
        except TamperDetected:
            raise
        except (InvalidTag, ValueError, IndexError, OverflowError, UnicodeDecodeError):
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
        return _WRAP_HEAD + nonce + self._keks.wrap(kek_version, nonce, data_key, aad)

    def _unwrap(self, rid: bytes, kek_version: int, wrapped_key: bytes) -> bytes:
        if len(wrapped_key) != WRAPPED_KEY_BYTES or wrapped_key[0] != WRAP_FORMAT:
            raise TamperDetected()
        aad = self._wrap_prefix + _lp(rid) + kek_version.to_bytes(4, "big")
        return self._keks.unwrap(
            kek_version, wrapped_key[1 : 1 + NONCE_BYTES], wrapped_key[1 + NONCE_BYTES :], aad
        )

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
        payload = _as_bytes(payload)
        if len(payload) < PAYLOAD_HEAD_BYTES + BUCKET_BYTES + TAG_BYTES:
            raise TamperDetected()
        if payload[0] != FRAME_FORMAT or not payload[1] >= DATA_KEY_GENERATION:
            raise TamperDetected()
        # The generation byte is bound into the associated data, so it cannot be edited.
        aad = self._record_prefix + _lp(record_type.encode("utf-8")) + _lp(rid) + payload[1:2]
        # AES-GCM checks the tag over the whole payload before it returns any plaintext.
        body = AESGCM(data_key).decrypt(
            payload[2:PAYLOAD_HEAD_BYTES], payload[PAYLOAD_HEAD_BYTES:], aad
        )
        # Compare names as bytes so that fields nobody asked for are not even decoded.
        wanted = None if names is None else {n.encode("utf-8"): n for n in names}
        return _read_body(body, wanted)


def _read_body(body: bytes, wanted: dict[bytes, str] | None) -> dict[str, bytes]:
    """The fields of an authenticated body, only those wanted (all when None).

    Refuses any body custodes would not have written: a count or lengths that overrun,
    an empty or repeated name, padding that is not zeros or not its bucket's size.
    """
    end = len(body)
    count = int.from_bytes(body[0:2], "big")
    at = 2
    seen: set[bytes] = set()
    result: dict[str, bytes] = {}
    for _ in range(count):
        name_end = at + 1 + body[at]
        value_at = name_end + 4
        if name_end == at + 1 or value_at > end:
            raise TamperDetected()
        encoded = body[at + 1 : name_end]
        next_at = value_at + int.from_bytes(body[name_end:value_at], "big")
        if next_at > end or encoded in seen:
            raise TamperDetected()
        seen.add(encoded)
        if wanted is None:
            result[encoded.decode("utf-8")] = body[value_at:next_at]
        else:
            name = wanted.get(encoded)
            if name is not None:
                result[name] = body[value_at:next_at]
        at = next_at
    if end != bucket(at) or body.count(0, at) != end - at:
        raise TamperDetected()
    return result


def _as_bytes(data: object) -> bytes:
    # Some database drivers hand back memoryview or bytearray for binary columns.
    if type(data) is bytes:
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TamperDetected()
