"""Canary records: synthetic people stored exactly like real ones, whose every read is an
alarm.

A canary is sealed by the same codec, with the same padding and the same index tokens as
a real person, so that neither a thief with the database nor an official through the API
can tell one from a person. Which records are canaries is a list sealed under a key of
the vault's (AES-256-GCM, bound to the vault), kept in its metadata: the database holds
only ciphertext that says how many there are at most (its length), never which. The
access function (custodes.access) asks this list about every record a read returns; a
canary among them locks the account and raises a critical alert.

No legitimate search returns a canary: its values are drawn so that none of its indexed
values (ID number, phone, name with birth date) is any stored person's, so a search for
a real person cannot find one. Only a read of records the official had no one real in
mind for does: walking ID numbers, dumping record ids taken from the database.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.codec import RecordCodec
from custodes.crypto import KeyMaterial
from custodes.errors import ConfigurationError, InvalidRecord, TamperDetected
from custodes.records import RecordValidator
from custodes.schema import Schema
from custodes.storage.base import MetaStore, SealedRecord
from custodes.synth import generate

# The metadata key of the sealed list.
CANARIES = "canaries"
# A process holding the list reads it again after this many seconds, so that canaries
# planted on the host while a server runs are watched for within that time.
REFRESH = 2.0
_INFO = b"custodes/canaries/v1"


class CanaryList:
    """The vault's canary records, by id: read from its sealed list, cached briefly."""

    def __init__(
        self,
        meta: MetaStore,
        material: KeyMaterial,
        *,
        clock: Callable[[], float] = time.monotonic,
        refresh: float = REFRESH,
    ) -> None:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=material.vault_id, info=_INFO).derive(
            material.index_root
        )
        self._aead = AESGCM(key)
        self._aad = material.vault_id + b"\x00" + CANARIES.encode()
        self._meta = meta
        self._clock = clock
        self._refresh = refresh
        self._lock = threading.Lock()
        self._ids: frozenset[str] = frozenset()
        self._read_at: float | None = None

    def __repr__(self) -> str:
        return "CanaryList(<sealed>)"

    def among(self, record_ids: Iterable[str]) -> list[str]:
        """The canaries among record_ids, in their order (none, nearly always)."""
        ids = self.ids()
        if not ids:
            return []
        return [rid for rid in record_ids if rid in ids]

    def ids(self) -> frozenset[str]:
        now = self._clock()
        with self._lock:
            if self._read_at is None or now - self._read_at >= self._refresh:
                self._ids = self._load()
                self._read_at = now
            return self._ids

    def add(self, record_ids: Iterable[str]) -> int:
        """Add canaries to the sealed list; how many it holds now. Written before the
        records are, so that a crash between leaves a name with no record (harmless),
        never a canary stored unwatched."""
        with self._lock:
            held = self._load() | frozenset(record_ids)
            self._store(held)
            self._ids = held
            self._read_at = self._clock()
            return len(held)

    def _load(self) -> frozenset[str]:
        sealed = self._meta.get_meta(CANARIES)
        if sealed is None:
            return frozenset()
        try:
            plain = self._aead.decrypt(sealed[:12], sealed[12:], self._aad)
            ids = orjson.loads(plain)
        except (InvalidTag, orjson.JSONDecodeError, ValueError):
            raise TamperDetected(
                "the vault's sealed list of canary records fails its seal: it was changed "
                "outside custodes"
            ) from None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise TamperDetected("the vault's sealed list of canary records is malformed")
        return frozenset(ids)

    def _store(self, ids: frozenset[str]) -> None:
        nonce = os.urandom(12)
        plain = orjson.dumps(sorted(ids))
        self._meta.set_meta(CANARIES, nonce + self._aead.encrypt(nonce, plain, self._aad))


# Whether any stored record carries these values in this index: (type, index, values).
Taken = Callable[[str, str, Mapping[str, str]], bool]
# The record type canaries are drawn as: a person of the population schema, as the
# synthetic generator makes them.
CANARY_TYPE = "person"


def canary_people(
    schema: Schema, codec: RecordCodec, count: int, *, seed: int, taken: Taken
) -> list[SealedRecord]:
    """`count` synthetic people, sealed as ingest seals a person, none of whose indexed
    values any stored record carries (`taken`) or another of them does: a search for a
    real person can never find one. Drawn by the synthetic generator under `seed`, which
    nothing keeps: only the sealed list says which records they are."""
    rt = schema.types.get(CANARY_TYPE)
    if rt is None:
        raise ConfigurationError(
            "canary records are synthetic people: the vault's schema has no 'person' type"
        )
    validator = RecordValidator(schema)
    drawn: list[SealedRecord] = []
    seen: set[tuple[str, tuple[str, ...]]] = set()
    # Each draw is a fresh person; a few are passed over for sharing a value, so the
    # stream is longer than asked. A vault that refuses nearly all is out of values.
    for number, raw in enumerate(
        generate(count * 20 + 100, seed=seed, cases_per_person=0.0, deliveries_per_person=0.0)
    ):
        if len(drawn) == count:
            break
        fields = {k: v for k, v in raw.items() if k != "type"}
        try:
            record = validator.validate(fields, line=number + 1, record_type=CANARY_TYPE)
        except InvalidRecord:
            raise ConfigurationError(
                "the vault's 'person' type is not the population schema's: canary records "
                "cannot be drawn for it"
            ) from None
        keys: list[tuple[str, tuple[str, ...]]] = []
        clash = False
        for spec in rt.indexes.values():
            names = spec.field_names
            if not all(record.values.get(name) is not None for name in names):
                continue
            values = {name: str(record.values[name]) for name in names}
            key = (spec.name, tuple(values[name] for name in names))
            if key in seen or taken(CANARY_TYPE, spec.name, values):
                clash = True
                break
            keys.append(key)
        if clash:
            continue
        seen.update(keys)
        drawn.append(codec.seal(record))
    if len(drawn) < count:
        raise ConfigurationError("too few synthetic people were free of every stored value")
    return drawn
