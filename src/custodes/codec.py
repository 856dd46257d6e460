"""Turns a validated record into what storage holds, and stored bytes back into values.

It derives the record's keyed id, seals its fields as one padded blob under a fresh data
key, tags its type with a keyed tag and computes its blind-index tokens, as many per
index for every record. Pure given its keys: no I/O, so ingest workers run it in parallel.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import orjson

from custodes.crypto import BlindIndexer, KeyMaterial, RecordSealer
from custodes.crypto.blind_index import stored_index_id, token_version_of
from custodes.errors import ConfigurationError, TamperDetected
from custodes.records import CanonicalRecord, index_inputs
from custodes.schema import REFERENCE_KINDS, FieldSpec, IndexSpec, RecordType, Schema
from custodes.storage.base import SealedRecord, StoredRecord

Values = dict[str, object]
# What a search looks up for one value: (stored index id, token) under each live version
# of the index keys, the current one first (more than one only while they rotate).
Probe = tuple[tuple[int, int], ...]

# Tokens per index per record, whatever the record holds: one for a single-valued index
# (a decoy when the field is absent), and for a multi-valued one (a case's persons) at
# least LINK_TOKENS, then the next power of two. Otherwise the tokens table would tell a
# thief which fields a record has and how many people a case names, as payload lengths
# did before they were padded.
LINK_TOKENS = 4
# Decoy inputs have one part more than any real input of the index and start with a
# byte no canonical value holds, so no search computes a decoy's token but by chance.
_DECOY = "\x00decoy"


def token_slots(count: int, multi_valued: bool) -> int:
    """How many tokens a record writes to an index that yields `count` real ones."""
    if not multi_valued:
        return 1
    if count <= LINK_TOKENS:
        return LINK_TOKENS
    return 1 << (count - 1).bit_length()


class RecordCodec:
    def __init__(self, schema: Schema, material: KeyMaterial, token_bits: Mapping[int, int]):
        self.schema = schema
        self._token_bits = dict(token_bits)
        self._sealer = RecordSealer(material)
        self._indexer = BlindIndexer(material, token_bits)
        # Per type: (field name, kind, referenced type, None for a kind that refers to no
        # record) and (index, multi-valued) pairs, looked up once.
        self._plan = {
            rt.name: (
                [
                    (f.name, f.kind, f.ref if f.kind in REFERENCE_KINDS else None)
                    for f in rt.fields.values()
                ],
                [
                    (
                        ix,
                        len(ix.components) == 1
                        and rt.fields[ix.components[0].field].kind == "person_links",
                    )
                    for ix in rt.indexes.values()
                ],
            )
            for rt in schema.types.values()
        }
        self._inputs = {
            ix.index_id: index_inputs(rt, ix)
            for rt in schema.types.values()
            for ix in rt.indexes.values()
        }
        self._compile_tokens()
        # Storage holds a keyed tag in place of each type's name; this maps it back.
        self._tags = {name: self._sealer.type_tag(name) for name in schema.types}
        self._types_by_tag = {tag: schema.types[name] for name, tag in self._tags.items()}
        if len(self._types_by_tag) != len(self._tags):
            raise ConfigurationError("two record types share a type tag; rename one")

    def close(self) -> None:
        """Let go of the KEKs (a token's session, when a token holds them)."""
        self._sealer.close()

    def rekey(self, material: KeyMaterial) -> None:
        """Use a rotated keyring's versions from now on (see custodes.vault.rotation).
        Record ids and type tags come from the index root, which never rotates."""
        sealer = RecordSealer(material)
        indexer = BlindIndexer(material, self._token_bits)
        old, self._sealer, self._indexer = self._sealer, sealer, indexer
        self._compile_tokens()
        old.close()

    def _compile_tokens(self) -> None:
        """Per type, what `tokens_of` does under the current index key version, each index's
        token function fetched once: (stored index id, multi-valued, inputs, tokenize)."""
        indexer = self._indexer
        version = indexer.version
        self._token_plan = {
            name: [
                (
                    stored_index_id(index.index_id, version),
                    multi,
                    self._inputs[index.index_id],
                    indexer.tokenizer(index.index_id, version),
                )
                for index, multi in plan[1]
            ]
            for name, plan in self._plan.items()
        }

    def current_enough(self, records: Sequence[SealedRecord]) -> bool:
        """Whether records sealed elsewhere (by ingest workers, with the key material they
        were handed) are under key versions still live here: a KEK this codec can unwrap,
        tokens of a live index key version. A rotation destroys the rest."""
        keks = self._sealer.kek_versions
        versions = set(self._indexer.versions)
        # The distinct versions and index ids of the whole batch, each checked once.
        used_keks = {r.kek_version for r in records}
        stored_ids = {i for r in records for i, _ in r.tokens}
        return used_keks <= keks and all(token_version_of(i) in versions for i in stored_ids)

    @property
    def key_versions(self) -> tuple[int, int, int]:
        """(KEK version, data key generation, index key version) new records get."""
        return self._sealer.kek_version, self._sealer.data_generation, self._indexer.version

    def rewrap(self, stored: StoredRecord) -> tuple[int, bytes]:
        """A stored record's data key wrapped under the current KEK; TamperDetected if it
        does not unwrap."""
        return self._sealer.rewrap(stored.record_id, stored.kek_version, stored.wrapped_key)

    def reseal(self, stored: StoredRecord) -> tuple[tuple[int, bytes, bytes], Values]:
        """A stored record sealed again under a fresh data key of the current generation,
        (kek_version, wrapped_key, payload), and its values (opened to do it, so that a
        caller needing them opens it once). Authenticated whole first."""
        rt = self.type_of(stored)
        sealer = self._sealer
        fields = sealer.open(
            rt.name, stored.record_id, stored.kek_version, stored.wrapped_key, stored.payload
        )
        return sealer.seal(rt.name, stored.record_id, fields), self._decode(rt, fields)

    def record_id(self, record_type: str, source_key: Sequence[str]) -> str:
        return self._indexer.record_id(record_type, source_key)

    def id_of(self, record: CanonicalRecord) -> str:
        rt = self.schema.types[record.record_type]
        return self._indexer.record_id(
            record.record_type, [str(record.values[f]) for f in rt.source_key]
        )

    def seal(self, record: CanonicalRecord) -> SealedRecord:
        rtype = record.record_type
        fields, _ = self._plan[rtype]
        values = record.values
        record_id = self.id_of(record)
        record_id_of = self._indexer.record_id
        encoded: dict[str, bytes] = {}
        for name, kind, ref in fields:
            value = values.get(name)
            if value is None:
                continue
            if ref is None:
                # Canonical values are str already; str() only for a caller's other types.
                encoded[name] = (value if isinstance(value, str) else str(value)).encode()
            elif kind == "person_ref":
                encoded[name] = record_id_of(ref, (str(value),)).encode()
            else:  # person_links, the other kind that refers to records
                links = [
                    (record_id_of(ref, (nid,)), role)
                    for nid, role in value  # type: ignore[attr-defined]
                ]
                encoded[name] = orjson.dumps(links)
        tokens = self._current_tokens(rtype, record_id, values)
        kek_version, wrapped, payload = self._sealer.seal(rtype, record_id, encoded)
        return SealedRecord(record_id, self._tags[rtype], payload, kek_version, wrapped, tokens)

    def _current_tokens(
        self, record_type: str, record_id: str, values: Mapping[str, object]
    ) -> tuple[tuple[int, int], ...]:
        """`tokens_of` under the current version, by the compiled plan."""
        tokens: list[tuple[int, int]] = []
        append = tokens.append
        for stored_id, multi, inputs, tokenize in self._token_plan[record_type]:
            real = inputs(values)
            for parts in real:
                append((stored_id, tokenize(parts)))
            count = len(real)
            slots = token_slots(count, multi) if multi else 1
            for slot in range(count, slots):
                append((stored_id, tokenize((_DECOY, record_id, str(slot)))))
        return tuple(tokens)

    def tokens_of(
        self,
        record_type: str,
        record_id: str,
        values: Mapping[str, object],
        version: int | None = None,
    ) -> tuple[tuple[int, int], ...]:
        """The (stored index id, token) pairs a record writes, from its canonical values,
        under the current index key version or the one named: its values' tokens and its
        decoys. A check that re-derives stored tokens must count the decoys too, or it
        will take them for planted rows.
        """
        indexer = self._indexer
        if version is None or version == indexer.version:
            return self._current_tokens(record_type, record_id, values)
        token = indexer.token
        tokens: list[tuple[int, int]] = []
        for index, multi in self._plan[record_type][1]:
            index_id = index.index_id
            stored_id = stored_index_id(index_id, version)
            real = self._inputs[index_id](values)
            for parts in real:
                tokens.append((stored_id, token(index_id, parts, version)))
            for slot in range(len(real), token_slots(len(real), multi)):
                decoy = (_DECOY, record_id, str(slot))
                tokens.append((stored_id, token(index_id, decoy, version)))
        return tuple(tokens)

    @property
    def index_versions(self) -> tuple[int, ...]:
        """Every live index key version, the current one first."""
        return self._indexer.versions

    def type_tag(self, record_type: str) -> str:
        """The keyed tag storage holds in place of a record type's name."""
        tag = self._tags.get(record_type)
        return self._sealer.type_tag(record_type) if tag is None else tag

    def type_of(self, stored: StoredRecord) -> RecordType:
        """A stored record's type, from its keyed tag; TamperDetected if no type has it."""
        rt = self._types_by_tag.get(stored.record_type)
        if rt is None:
            raise TamperDetected()
        return rt

    def open(self, stored: StoredRecord, names: Collection[str] | None = None) -> Values:
        """A stored record's fields, or only those named. The whole record is decrypted
        and authenticated either way; TamperDetected on any inconsistency."""
        rt = self.type_of(stored)
        raw = self._sealer.open(
            rt.name,
            stored.record_id,
            stored.kek_version,
            stored.wrapped_key,
            stored.payload,
            names,
        )
        return self._decode(rt, raw)

    @staticmethod
    def _decode(rt: RecordType, raw: Mapping[str, bytes]) -> Values:
        values: Values = {}
        for name, data in raw.items():
            spec = rt.fields.get(name)
            if spec is None:
                raise TamperDetected()
            try:
                if spec.kind == "person_links":
                    values[name] = tuple((str(rid), str(role)) for rid, role in orjson.loads(data))
                else:
                    values[name] = data.decode("utf-8")
            except (ValueError, TypeError):
                # Authenticated but undecodable: written by something that is not custodes.
                raise TamperDetected() from None
        return values

    def probe(self, index: IndexSpec, parts: Sequence[str]) -> Probe:
        """What a search for these index values looks up (see Probe)."""
        return self._indexer.probes(index.index_id, parts)

    def link_probes(
        self, target_type: str, source_value: str
    ) -> list[tuple[RecordType, IndexSpec, Probe]]:
        """Probes that find records referring to a target record, in every referring index."""
        found = []
        for rt in self.schema.types.values():
            for index in rt.indexes.values():
                spec = rt.fields[index.components[0].field]
                if spec.ref == target_type and len(index.components) == 1:
                    found.append((rt, index, self.probe(index, (source_value,))))
        return found


def role_of_link(spec: FieldSpec, value: object, record_id: str) -> str | None:
    """The role in which a decoded link field names record_id, or None if it does not.

    A person_ref names its target by the field's own name; person_links carry roles.
    """
    if value is None:
        return None
    if spec.kind == "person_ref":
        return spec.name if value == record_id else None
    for rid, role in value:  # type: ignore[attr-defined]
        if rid == record_id:
            return str(role)
    return None
