"""Turns a validated record into what storage holds, and stored bytes back into values.

It derives the record's keyed id, seals its fields under a fresh data key and computes
its blind-index tokens. Pure given its keys: no I/O, so ingest workers run it in parallel.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import orjson

from custodes.crypto import BlindIndexer, KeyMaterial, RecordSealer
from custodes.errors import TamperDetected
from custodes.records import CanonicalRecord, index_parts
from custodes.schema import FieldSpec, IndexSpec, RecordType, Schema
from custodes.storage.base import SealedRecord, StoredRecord

Values = dict[str, object]


class RecordCodec:
    def __init__(self, schema: Schema, material: KeyMaterial, token_bits: Mapping[int, int]):
        self.schema = schema
        self._sealer = RecordSealer(material)
        self._indexer = BlindIndexer(material, token_bits)
        # Per type: (field name, kind, referenced type) and the indexes, looked up once.
        self._plan = {
            rt.name: (
                [(f.name, f.kind, f.ref) for f in rt.fields.values()],
                list(rt.indexes.values()),
            )
            for rt in schema.types.values()
        }

    def record_id(self, record_type: str, source_key: Sequence[str]) -> str:
        return self._indexer.record_id(record_type, source_key)

    def id_of(self, record: CanonicalRecord) -> str:
        rt = self.schema.types[record.record_type]
        return self._indexer.record_id(
            record.record_type, [str(record.values[f]) for f in rt.source_key]
        )

    def seal(self, record: CanonicalRecord) -> SealedRecord:
        rtype = record.record_type
        fields, indexes = self._plan[rtype]
        values = record.values
        record_id = self.id_of(record)
        encoded: dict[str, bytes] = {}
        for name, kind, ref in fields:
            value = values.get(name)
            if value is None:
                continue
            if kind == "person_ref":
                assert ref is not None
                encoded[name] = self._indexer.record_id(ref, (str(value),)).encode()
            elif kind == "person_links":
                assert ref is not None
                links = [
                    (self._indexer.record_id(ref, (nid,)), role)
                    for nid, role in value  # type: ignore[attr-defined]
                ]
                encoded[name] = orjson.dumps(links)
            else:
                encoded[name] = str(value).encode()
        rt = self.schema.types[rtype]
        tokens: list[tuple[int, int]] = []
        for index in indexes:
            for parts in index_parts(rt, index, values):
                tokens.append((index.index_id, self._indexer.token(index.index_id, parts)))
        kek_version, wrapped, payload = self._sealer.seal(rtype, record_id, encoded)
        return SealedRecord(record_id, rtype, payload, kek_version, wrapped, tuple(tokens))

    def open(self, stored: StoredRecord, names: Collection[str] | None = None) -> Values:
        """Decrypt (some of) a stored record's fields. TamperDetected on any inconsistency."""
        rt = self.schema.types.get(stored.record_type)
        if rt is None:
            raise TamperDetected()
        raw = self._sealer.open(
            stored.record_type,
            stored.record_id,
            stored.kek_version,
            stored.wrapped_key,
            stored.payload,
            names,
        )
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

    def token(self, index: IndexSpec, parts: Sequence[str]) -> int:
        return self._indexer.token(index.index_id, parts)

    def link_tokens(
        self, target_type: str, source_value: str
    ) -> list[tuple[RecordType, IndexSpec, int]]:
        """Tokens that find records referring to a target record, in every referring index."""
        found = []
        for rt in self.schema.types.values():
            for index in rt.indexes.values():
                spec = rt.fields[index.components[0].field]
                if spec.ref == target_type and len(index.components) == 1:
                    found.append((rt, index, self.token(index, (source_value,))))
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
