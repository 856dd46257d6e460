"""Keyed, truncated blind-index tokens and keyed record identifiers.

A token lets storage find records by an exact value without ever holding the value;
a record id names a source record deterministically without revealing it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.crypto.keyring import KeyMaterial
from custodes.errors import ConfigurationError

MIN_TOKEN_BITS = 8
MAX_TOKEN_BITS = 63  # a non-negative token then fits a signed 64-bit SQL INTEGER
DEFAULT_POPULATION = 10**9

INDEX_INFO_PREFIX = b"custodes/blind-index/v1/"
RECORD_ID_INFO = b"custodes/record-id/v1"
_SHA256_BLOCK = 64
_TYPE_HEADS_LIMIT = 256  # record types come from the schema; the bound guards the rest
RECORD_ID_BYTES = 15  # 120 bits: collisions are negligible even at 10**10 records


def plan_token_bits(expected_distinct: int = DEFAULT_POPULATION, bucket: int = 4) -> int:
    """Token length in bits so that about `bucket` or more distinct values share each token.

    floor(log2(expected_distinct / bucket)), clamped to [8, 63]; 10**9 gives 27.

    Why truncate: a full-length keyed token is a unique pseudonym for a value, so a
    thief holding the database (without the keys) could still link every record that
    shares a national ID or a name. Cut to this length, each token value is shared by
    several distinct values at full scale, so a token never singles out one person.
    A search then returns a few false positives, which the vault drops after
    decrypting the indexed fields.
    """
    if expected_distinct < 1 or bucket < 1:
        raise ValueError("expected_distinct and bucket must be positive")
    # Integer form of floor(log2(n / b)): exact, with no float rounding at the edges.
    per_bucket = expected_distinct // bucket
    bits = per_bucket.bit_length() - 1 if per_bucket else MIN_TOKEN_BITS
    return max(MIN_TOKEN_BITS, min(MAX_TOKEN_BITS, bits))


def _encode_parts(parts: Sequence[str]) -> bytes:
    # Each part length-prefixed: ("ab", "c") and ("a", "bc") must not collide.
    if len(parts) == 1:  # most index inputs: no list to build
        encoded = parts[0].encode("utf-8")
        return len(encoded).to_bytes(4, "big") + encoded
    out = []
    for part in parts:
        encoded = part.encode("utf-8")
        out.append(len(encoded).to_bytes(4, "big"))
        out.append(encoded)
    return b"".join(out)


# RFC 4648 base32 in lower case, two characters (ten bits) a lookup. The standard
# library's encoder is pure Python, a loop and a translation per call; every record id
# of an ingest goes through this, one to a dozen per record.
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
_BASE32_PAIRS = tuple(a + b for a in _BASE32 for b in _BASE32)


def base32_lower(data: bytes) -> str:
    """`base64.b32encode(data).decode().lower()` for data of a multiple of 5 bytes (no
    padding then), by table."""
    if len(data) == RECORD_ID_BYTES:
        return _base32_120(int.from_bytes(data, "big"))
    if len(data) % 5:
        raise ValueError("base32 without padding needs a multiple of 5 bytes")
    number = int.from_bytes(data, "big")
    pairs = _BASE32_PAIRS
    return "".join([pairs[number >> shift & 0x3FF] for shift in range(len(data) * 8 - 10, -1, -10)])


def _base32_120(n: int) -> str:
    # A record id's 120 bits written out, twelve lookups: half the time of the loop.
    p = _BASE32_PAIRS
    return "".join(
        [
            p[n >> 110],
            p[n >> 100 & 0x3FF],
            p[n >> 90 & 0x3FF],
            p[n >> 80 & 0x3FF],
            p[n >> 70 & 0x3FF],
            p[n >> 60 & 0x3FF],
            p[n >> 50 & 0x3FF],
            p[n >> 40 & 0x3FF],
            p[n >> 30 & 0x3FF],
            p[n >> 20 & 0x3FF],
            p[n >> 10 & 0x3FF],
            p[n & 0x3FF],
        ]
    )


class _HmacSha256:
    """HMAC-SHA256 under one fixed key, with the padded-key states computed once.

    The same value as `hmac.digest(key, message, "sha256")` (RFC 2104, which suggests
    this precomputation), but about 2.5x faster, because `hmac.digest` rebuilds both
    padded-key states on every call and ingest computes several tokens per record.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _SHA256_BLOCK:
            raise ValueError("HMAC key longer than the SHA-256 block")
        padded = key.ljust(_SHA256_BLOCK, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def states(self) -> tuple[hashlib._Hash, hashlib._Hash]:
        """The two padded-key states, to be copied, never updated, by a caller that
        inlines `digest` in a hot loop."""
        return self._inner, self._outer


def _derive(root: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(root)


# Index ids fit 32 bits (31 in practice, see schema.IndexSpec); the version of the key
# a token was computed under is stored above them (version 1 as the bare index id, as
# before tokens had versions), so that tokens of two versions live side by side while
# `keys rotate --index` rebuilds them.
INDEX_ID_BITS = 32
MAX_TOKEN_VERSION = 0x7F


def stored_index_id(index_id: int, version: int) -> int:
    """The index id a token of `version` is stored under."""
    return index_id | ((version - 1) << INDEX_ID_BITS)


def token_version_of(stored_id: int) -> int:
    """The key version of a stored index id (see stored_index_id)."""
    return (stored_id >> INDEX_ID_BITS) + 1


class BlindIndexer:
    """Computes tokens and record ids for one vault.

    `bits` maps each index id to its token length; the vault fixes this plan when it
    is created, because changing it would orphan every stored token. Tokens are
    computed under every live version of the index keys (material.index_roots()): new
    ones are stored under the current version, and a search probes every live one.
    """

    __slots__ = (
        "_bits",
        "_current",
        "_index_keys",
        "_record_id_mac",
        "_roots",
        "_type_heads",
        "_vault_id",
        "_versions",
    )

    def __init__(self, material: KeyMaterial, bits: Mapping[int, int]) -> None:
        for index_id, width in bits.items():
            if not 0 <= index_id <= 0xFFFFFFFF:
                raise ConfigurationError(f"index id {index_id} does not fit 32 bits")
            if not MIN_TOKEN_BITS <= width <= MAX_TOKEN_BITS:
                raise ConfigurationError(
                    f"index {index_id}: token bits must be between {MIN_TOKEN_BITS} "
                    f"and {MAX_TOKEN_BITS}"
                )
        self._bits = dict(bits)
        self._roots = dict(material.index_roots())
        if not all(1 <= v <= MAX_TOKEN_VERSION for v in self._roots):
            raise ConfigurationError("an index key version is out of range")
        self._current = material.token_version
        # The current version first: a search probes it first.
        self._versions = (self._current, *sorted(set(self._roots) - {self._current}))
        self._vault_id = material.vault_id
        self._index_keys: dict[tuple[int, int], tuple[_HmacSha256, int]] = {}
        # Record ids are keyed by the index root itself, which never rotates: they name
        # records on the access log for good.
        # Each record type's encoded part, the first of every id's message.
        self._type_heads: dict[str, bytes] = {}
        self._record_id_mac = _HmacSha256(
            _derive(material.index_root, self._vault_id, RECORD_ID_INFO)
        )

    def __repr__(self) -> str:
        return f"BlindIndexer(indexes={len(self._bits)})"

    @property
    def version(self) -> int:
        """The version new tokens are computed under."""
        return self._current

    @property
    def versions(self) -> tuple[int, ...]:
        """Every live version, the current one first."""
        return self._versions

    def token(self, index_id: int, parts: Sequence[str], version: int | None = None) -> int:
        """The blind token of a value (one part per index component) in one index, under
        the current key version or the one named."""
        key = (index_id, self._current if version is None else version)
        entry = self._index_keys.get(key)
        if entry is None:
            entry = self._index_key(*key)
        mac, shift = entry
        return int.from_bytes(mac.digest(_encode_parts(parts))[:8], "big") >> shift

    def tokenizer(
        self, index_id: int, version: int | None = None
    ) -> Callable[[Sequence[str]], int]:
        """`token` with the index and version fixed: what ingest calls for every value of
        every record, with the key looked up once and the HMAC inlined."""
        key = (index_id, self._current if version is None else version)
        entry = self._index_keys.get(key)
        if entry is None:
            entry = self._index_key(*key)
        mac, shift = entry
        inner_state, outer_state = mac.states()
        encode = _encode_parts
        from_bytes = int.from_bytes

        def token(parts: Sequence[str]) -> int:
            inner = inner_state.copy()
            inner.update(encode(parts))
            outer = outer_state.copy()
            outer.update(inner.digest())
            return from_bytes(outer.digest()[:8], "big") >> shift

        return token

    def probes(self, index_id: int, parts: Sequence[str]) -> tuple[tuple[int, int], ...]:
        """(stored index id, token) under every live version: what a search looks up."""
        encoded = _encode_parts(parts)
        found = []
        for version in self._versions:
            entry = self._index_keys.get((index_id, version))
            if entry is None:
                entry = self._index_key(index_id, version)
            mac, shift = entry
            token = int.from_bytes(mac.digest(encoded)[:8], "big") >> shift
            found.append((stored_index_id(index_id, version), token))
        return tuple(found)

    def bits(self, index_id: int) -> int:
        """The token length of an index."""
        try:
            return self._bits[index_id]
        except KeyError:
            raise ConfigurationError(f"no token plan for index {index_id}") from None

    def record_id(self, record_type: str, source_key: Sequence[str]) -> str:
        """A deterministic, keyed id for a source record: 24 lower-case base32 characters."""
        # The parts' encodings concatenated are the encoding of all the parts.
        head = self._type_heads.get(record_type)
        if head is None:
            head = _encode_parts((record_type,))
            if len(self._type_heads) < _TYPE_HEADS_LIMIT:
                self._type_heads[record_type] = head
        message = head + _encode_parts(source_key)
        return base32_lower(self._record_id_mac.digest(message)[:RECORD_ID_BYTES])

    def _index_key(self, index_id: int, version: int) -> tuple[_HmacSha256, int]:
        width = self.bits(index_id)
        root = self._roots.get(version)
        if root is None:
            raise ConfigurationError(f"no index key of version {version}")
        key = _derive(root, self._vault_id, INDEX_INFO_PREFIX + index_id.to_bytes(4, "big"))
        entry = (_HmacSha256(key), 64 - width)
        self._index_keys[(index_id, version)] = entry
        return entry
