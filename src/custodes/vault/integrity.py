"""The search index held against the records: every stored record's blind-index tokens
re-derived with the vault's keys and compared with the token rows a search reads. A row
deleted or repointed hides a person from search, and nothing else would notice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from custodes.codec import RecordCodec, Values
from custodes.crypto.blind_index import stored_index_id, token_version_of
from custodes.errors import (
    TamperDetected,
)
from custodes.records import CanonicalRecord
from custodes.schema import RecordType, Schema
from custodes.storage.base import Storage, StoredRecord

# Records per page of the check: a durable backend reads a page's tokens as one range of
# seqs in each token tree or partition, so a larger page takes fewer of those reads.
_CHECK_PAGE = 4096


@dataclass(frozen=True, slots=True)
class IndexCheck:
    """What `Vault.verify_records` found: counts, never a value, a token or a record id."""

    records: int  # records read
    tokens: int  # token rows re-derived from them
    missing: int  # rows a record should have and the index lacks: it is hidden from a search
    extra: int  # rows the index holds for a record that it should not
    repointed: int  # rows missing from one record and found on another
    unreadable: int  # records that do not open: tampered, so no token can be re-derived
    # Records linking to a record not stored: that link's index is left out for them, its
    # token being made from the linked record's value.
    partial: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.unreadable)

    def counts(self) -> dict[str, int]:
        return {
            "records": self.records,
            "tokens": self.tokens,
            "missing": self.missing,
            "extra": self.extra,
            "repointed": self.repointed,
            "unreadable": self.unreadable,
            "partial": self.partial,
        }


@dataclass
class _IndexTally:
    records: int = 0
    tokens: int = 0
    unreadable: int = 0
    partial: int = 0
    missing: Counter[tuple[int, int]] = field(default_factory=Counter)
    extra: Counter[tuple[int, int]] = field(default_factory=Counter)

    def record(
        self,
        expected: tuple[frozenset[tuple[int, int]], frozenset[int]] | None,
        held: Sequence[tuple[int, int]],
    ) -> None:
        self.records += 1
        if expected is None:
            self.unreadable += 1
            return
        tokens, skipped = expected
        self.partial += bool(skipped)
        self.tokens += len(tokens)
        stored = {pair for pair in held if pair[0] not in skipped}
        self.missing.update(tokens - stored)
        self.extra.update(stored - tokens)

    def result(self) -> IndexCheck:
        return IndexCheck(
            records=self.records,
            tokens=self.tokens,
            missing=sum(self.missing.values()),
            extra=sum(self.extra.values()),
            repointed=sum((self.missing & self.extra).values()),
            unreadable=self.unreadable,
            partial=self.partial,
        )


class IndexAudit:
    """Re-derives and compares; counts only, never a value, a token or a record id."""

    def __init__(self, schema: Schema, storage: Storage, codec: RecordCodec) -> None:
        self.schema = schema
        self._storage = storage
        self._codec = codec

    def __repr__(self) -> str:
        return "IndexAudit()"

    def run(self) -> IndexCheck:
        check = _IndexTally()
        after = 0
        while page := self._storage.record_tokens(after, _CHECK_PAGE):
            after = page[-1][0]
            stored = self._storage.get_records([row[1] for row in page])
            names = self.linked_source_keys(stored.values())
            live = self._codec.index_versions
            for _position, rid, held in page:
                record = stored.get(rid)
                # While the index keys rotate a record holds its tokens under the old
                # version, the new one, or both; each version it holds must be whole. A
                # version no longer live is held against nothing, so its rows are extra.
                versions = {token_version_of(index_id) for index_id, _ in held} & set(live)
                expected = (
                    None
                    if record is None
                    else self._expected_tokens(record, names, versions or {live[0]})
                )
                check.record(expected, held)
        return check.result()

    def linked_source_keys(self, records: Iterable[StoredRecord]) -> dict[str, str]:
        """The source-key value of every record the given ones link to (a link is stored
        as the keyed id, the token is made from the value): record id -> value."""
        wanted: dict[str, RecordType] = {}
        for stored in records:
            try:
                rt = self._codec.type_of(stored)
                links = [f for f in rt.fields.values() if f.ref is not None]
                if not links:
                    continue
                opened = self._codec.open(stored, [f.name for f in links])
            except TamperDetected:
                continue
            for spec in links:
                value = opened.get(spec.name)
                ref = self.schema.types.get(spec.ref or "")
                if value is None or ref is None or len(ref.source_key) != 1:
                    continue
                ids = [value] if spec.kind == "person_ref" else [r for r, _ in value]  # type: ignore[attr-defined]
                for rid in ids:
                    wanted[str(rid)] = ref
        found: dict[str, str] = {}
        for rid, target in self._storage.get_records(list(wanted)).items():
            key_field = wanted[rid].source_key[0]
            try:
                if self._codec.type_of(target).name != wanted[rid].name:
                    continue
                value = self._codec.open(target, (key_field,)).get(key_field)
            except TamperDetected:
                continue
            if value is not None:
                found[rid] = str(value)
        return found

    def _expected_tokens(
        self, stored: StoredRecord, linked: Mapping[str, str], versions: Iterable[int]
    ) -> tuple[frozenset[tuple[int, int]], frozenset[int]] | None:
        """The tokens ingest wrote for a stored record and the indexes left out (a link to
        a record not stored), or None if the record does not open."""
        try:
            rt, canonical, skipped_ids = self._canonical(stored, linked)
        except TamperDetected:
            return None
        versions = sorted(versions)
        skipped = frozenset(
            stored_index_id(index_id, version) for index_id in skipped_ids for version in versions
        )
        tokens = frozenset(
            t
            for version in versions
            for t in self._codec.tokens_of(rt.name, stored.record_id, canonical, version)
            if t[0] not in skipped
        )
        return tokens, skipped

    def tokens_under(
        self,
        stored: StoredRecord,
        linked: Mapping[str, str],
        version: int,
        values: Values | None = None,
    ) -> tuple[tuple[int, int], ...]:
        """A stored record's tokens under one index key version, as ingest would write
        them, less those of a link to a record not stored (its value is not known);
        TamperDetected if the record does not open. For rotating the index keys; `values`
        are the record's own, if the caller opened it already."""
        rt, canonical, skipped_ids = self._canonical(stored, linked, values)
        skipped = {stored_index_id(index_id, version) for index_id in skipped_ids}
        return tuple(
            t
            for t in self._codec.tokens_of(rt.name, stored.record_id, canonical, version)
            if t[0] not in skipped
        )

    def _canonical(
        self, stored: StoredRecord, linked: Mapping[str, str], opened: Values | None = None
    ) -> tuple[RecordType, dict[str, object], frozenset[int]]:
        """A stored record's canonical values as ingest had them (links by their linked
        record's value), and the index ids of links to records not stored."""
        rt = self._codec.type_of(stored)
        values = self._codec.open(stored) if opened is None else opened
        canonical: dict[str, object] = dict(values)
        unresolved: set[str] = set()
        for spec in rt.fields.values():
            value = values.get(spec.name)
            if spec.ref is None or value is None:
                continue
            links = [(value, "")] if spec.kind == "person_ref" else list(value)  # type: ignore[call-overload]
            ids = [str(r) for r, _ in links]
            if any(r not in linked for r in ids):
                unresolved.add(spec.name)
                del canonical[spec.name]
            elif spec.kind == "person_ref":
                canonical[spec.name] = linked[ids[0]]
            else:
                roles = [role for _, role in links]
                canonical[spec.name] = tuple(zip((linked[r] for r in ids), roles, strict=True))
        skipped = frozenset(
            ix.index_id
            for ix in rt.indexes.values()
            if any(c.field in unresolved for c in ix.components)
        )
        # The same code that wrote the tokens at ingest, decoys included, so the check
        # cannot drift from what ingest does.
        if self._codec.id_of(CanonicalRecord(rt.name, canonical, 0)) != stored.record_id:
            raise TamperDetected()
        return rt, canonical, skipped
