"""How the vault reads stored records for one access: finding candidates, opening them,
the record-level facts the policy decides on (districts, minors, reporters, what an
assigned case names), masked views and links. Used only inside the vault's access
function; it decides nothing itself and logs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from custodes.access import Reach
from custodes.codec import Probe, RecordCodec, Values, role_of_link
from custodes.errors import (
    InvalidQuery,
    RecordNotFound,
    SchemaError,
)
from custodes.policy import (
    PROTECTED_REPORTER,
    REPORTER,
    RecordFacts,
    district_of_case_no,
    district_of_national_id,
    is_minor,
)
from custodes.records import index_parts, is_han, mask_value, query_parts
from custodes.schema import IndexSpec, RecordType, Schema
from custodes.storage.base import Storage, StoredRecord
from custodes.vault.views import LinkView, RecordView

MAX_RESULTS = 100
# Incoming links are looked up in pages of this size, growing until a page comes back
# short, so that a person named in many records is never cut off at a fixed limit.
_FIRST_PAGE = 256
# The link kind of a record about one person (a delivery to them), as opposed to one that
# names several (a case).
_ABOUT = frozenset({"person_ref"})


class RecordReader:
    """The vault's reading of its records: storage and codec, never reached from outside."""

    def __init__(
        self,
        schema: Schema,
        storage: Storage,
        codec: RecordCodec,
        erased: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self.schema = schema
        self._storage = storage
        self._codec = codec
        # The records the erasure ledger names: never read, whether or not storage has
        # let go of them yet (a database role that may not delete, a copy put back).
        self._erased = erased

    def __repr__(self) -> str:
        return "RecordReader()"

    def incoming_links(self, record_id: str, *, kinds: frozenset[str] | None = None) -> list[str]:
        """Every record that names a person (cases, deliveries), opening link fields only;
        with `kinds`, only those whose link field is of one of these kinds."""
        stored = self.fetch([record_id]).get(record_id)
        if stored is None:
            # Without the record its source key is unknown, so the records naming it cannot
            # be found: refuse rather than hand out a report that looks complete and is not.
            raise RecordNotFound("no such record")
        rt = self._codec.type_of(stored)
        if len(rt.source_key) != 1:
            return []  # links refer to single-field source keys only
        key_field = rt.source_key[0]
        value = self._codec.open(stored, (key_field,)).get(key_field)
        if value is None:
            return []
        found: dict[str, None] = {}  # ordered and free of repeats
        for other_rt, index, probe in self._codec.link_probes(rt.name, str(value)):
            link_field = other_rt.fields[index.components[0].field]
            if kinds is not None and link_field.kind not in kinds:
                continue
            for candidate in self.find_all(probe):
                # Tokens are truncated, so a bucket may hold records naming someone else:
                # only the decrypted link field decides.
                opened = self._codec.open(candidate, (link_field.name,))
                if role_of_link(link_field, opened.get(link_field.name), record_id) is not None:
                    found[candidate.record_id] = None
        return list(found)

    def first_match(self, rt: RecordType, spec: IndexSpec, parts: tuple[str, ...]) -> str | None:
        """The id of a stored record that truly carries these index values, or None:
        the bucket's other records are dropped after opening their indexed fields alone."""
        names = set(spec.field_names)
        for stored in self.bucket(self._codec.probe(spec, parts), MAX_RESULTS):
            if self.matches(rt, spec, parts, stored.record_id, self._codec.open(stored, names)):
                return stored.record_id
        return None

    def fetch(self, record_ids: Sequence[str]) -> dict[str, StoredRecord]:
        """The stored records among record_ids, less any the erasure ledger names: every
        read of records by id goes through here."""
        found = self._storage.get_records(record_ids)
        erased = self._erased()
        if erased:
            found = {rid: r for rid, r in found.items() if rid not in erased}
        return found

    def bucket(self, probe: Probe, limit: int) -> list[StoredRecord]:
        """The stored records carrying a probe's tokens, at most `limit`, by id: every
        search's one way into the index. While index keys rotate a record may carry its
        tokens under two versions, and is returned once. None the erasure ledger names."""
        erased = self._erased()
        if len(probe) == 1 and not erased:
            (index_id, token), *_ = probe
            return self._storage.find_records(index_id, token, limit)
        found: dict[str, StoredRecord] = {}
        for index_id, token in probe:
            for stored in self._storage.find_records(
                index_id, token, limit + min(len(erased), 256)
            ):
                if stored.record_id not in erased:
                    found.setdefault(stored.record_id, stored)
        return [found[rid] for rid in sorted(found)[:limit]]

    def find_all(self, probe: Probe) -> list[StoredRecord]:
        """Every record carrying a probe's tokens, however many: ids first, then records."""
        ids: set[str] = set()
        for index_id, token in probe:
            limit = _FIRST_PAGE
            while True:
                page = self._storage.find(index_id, token, limit)
                if len(page) < limit:
                    break
                limit *= 4
            ids.update(page)
        return self.load(sorted(ids))

    # -- what an assigned case opens ---------------------------------------------------

    def case_scope(self, case_no: str) -> frozenset[str]:
        """The records a case names: the case itself, every person it links (reporters
        too), and the records about one of those people (a delivery to them). What an
        assignment to the case opens, and nothing else; empty if no such case is stored."""
        scope: set[str] = set()
        for case_id, rt, opened in self.cases_numbered(case_no):
            scope.add(case_id)
            for person_id in _linked_people(rt, opened):
                scope.add(person_id)
                # Another case naming the person is not this case's; a record about them
                # alone (a delivery) is.
                try:
                    scope.update(self.incoming_links(person_id, kinds=_ABOUT))
                except RecordNotFound:
                    continue
        return frozenset(scope)

    def cases_numbered(self, case_no: str) -> Iterator[tuple[str, RecordType, Values]]:
        """The stored records whose case-number field equals `case_no`, opened."""
        for rt in self.schema.types.values():
            for spec in rt.indexes.values():
                if len(spec.components) != 1 or rt.fields[spec.field_names[0]].kind != "case_no":
                    continue
                try:
                    parts = query_parts(rt, spec, {spec.field_names[0]: case_no})
                except SchemaError:
                    continue
                for stored in self.bucket(self._codec.probe(spec, parts), MAX_RESULTS):
                    opened = self._codec.open(stored)
                    if self.matches(rt, spec, parts, stored.record_id, opened):
                        yield stored.record_id, rt, opened

    # -- record-level facts -------------------------------------------------------------

    def facts(self, rt: RecordType, values: Values, reach: Reach) -> RecordFacts:
        """The district (and, for people, minority) of a decrypted record."""
        for spec in rt.fields.values():
            if spec.kind == "national_id":
                number = values.get(spec.name)
                return RecordFacts(
                    district_of_national_id(number),
                    is_minor(values.get("birth_date"), number, reach.today),
                )
        for spec in rt.fields.values():
            if spec.kind == "case_no":
                district = district_of_case_no(values.get(spec.name))
                if district is not None:
                    return RecordFacts(district)
        for spec in rt.fields.values():
            value = values.get(spec.name)
            if spec.kind == "person_links" and value:
                first = value[0][0]  # type: ignore[index]
                return RecordFacts(self.person_district(str(first), reach))
            if spec.kind == "person_ref" and value:
                # A record about one person (a delivery to them: their name, phone and
                # address) is theirs, and a minor's needs the clearance theirs does.
                return self.person_facts(str(value), reach)
        return RecordFacts(None)

    def person_facts(self, record_id: str, reach: Reach) -> RecordFacts:
        """The district and minority of a stored person, opening only what decides them."""
        stored = self.fetch([record_id]).get(record_id)
        if stored is None:
            return RecordFacts(None)
        rt = self._codec.type_of(stored)
        if not any(spec.kind == "national_id" for spec in rt.fields.values()):
            return RecordFacts(None)
        facts = self.facts(rt, self._codec.open(stored, fact_fields(rt)), reach)
        reach.districts[record_id] = facts.district
        return facts

    def person_district(self, record_id: str, reach: Reach) -> str | None:
        if record_id in reach.districts:
            return reach.districts[record_id]
        district: str | None = None
        stored = self.fetch([record_id]).get(record_id)
        if stored is not None:
            rt = self._codec.type_of(stored)
            names = [s.name for s in rt.fields.values() if s.kind == "national_id"]
            if names:
                district = district_of_national_id(self._codec.open(stored, names).get(names[0]))
        reach.districts[record_id] = district
        return district

    def as_hidden_reporter(
        self,
        rt: RecordType,
        spec: IndexSpec,
        parts: tuple[str, ...],
        values: Values,
        reach: Reach,
    ) -> bool:
        """Whether a record matched a link search only as naming the person its reporter,
        which an official below investigator may not learn."""
        if reach.sees_reporters:
            return False
        link = rt.fields[spec.components[0].field]
        if link.ref is None or link.kind != "person_links":
            return False
        target = self._codec.record_id(link.ref, parts)
        return role_of_link(link, values.get(link.name), target) == REPORTER

    # -- helpers ----------------------------------------------------------------------

    # A search is refused in the schema's words only: what a caller sends as a type, an
    # index or a key is input like a value (a person's name makes a fine JSON key), and
    # comes back in no error, on no terminal, in no log.

    def type(self, name: str) -> RecordType:
        rt = self.schema.types.get(name)
        if rt is None:
            known = ", ".join(sorted(self.schema.types))
            raise InvalidQuery(f"unknown record type (known: {known})")
        return rt

    def index(self, rt: RecordType, name: str, values: Mapping[str, str]) -> IndexSpec:
        spec = rt.indexes.get(name)
        if spec is None:
            known = ", ".join(sorted(rt.indexes))
            raise InvalidQuery(f"record type {rt.name!r} has no such index (known: {known})")
        if not set(values) <= set(spec.field_names):
            fields = ", ".join(spec.field_names)
            raise InvalidQuery(f"index {spec.name!r} searches only by: {fields}")
        missing = [f for f in spec.field_names if not values.get(f)]
        if missing:
            raise InvalidQuery(f"index {spec.name!r} needs a value for {', '.join(missing)}")
        # A name typed in Latin letters is looked up in the pinyin twin of a name index.
        for comp in spec.components:
            named = comp.transform == "" and rt.fields[comp.field].kind == "name"
            if named and not is_han(values[comp.field]):
                twin = _pinyin_twin(rt, spec)
                if twin is None:
                    raise InvalidQuery(f"index {spec.name!r} needs the name in Han characters")
                return twin
        return spec

    def matches(
        self,
        rt: RecordType,
        spec: IndexSpec,
        parts: tuple[str, ...],
        record_id: str,
        opened: Values,
    ) -> bool:
        """Whether a decrypted candidate truly carries the searched values."""
        link = rt.fields[spec.components[0].field]
        if link.ref is not None:
            # Links are stored as the target's record id, not its source key.
            target = self._codec.record_id(link.ref, parts)
            return role_of_link(link, opened.get(link.name), target) is not None
        return parts in index_parts(rt, spec, opened)

    def one(self, record_id: str) -> StoredRecord:
        stored = self.fetch([record_id]).get(record_id)
        if stored is None:
            raise RecordNotFound("no such record")
        return stored

    def load(self, record_ids: Sequence[str]) -> list[StoredRecord]:
        found = self.fetch(record_ids)
        return [found[r] for r in record_ids if r in found]

    def view(self, rt: RecordType, record_id: str, values: Values, reach: Reach) -> RecordView:
        masked: dict[str, str] = {}
        for name, spec in rt.fields.items():
            if name not in values:
                continue
            value = values[name]
            if spec.kind == "person_links" and not reach.sees_reporters:
                value = without_reporters(value)
            masked[name] = mask_value(spec, value)
        return RecordView(record_id, rt.name, masked)

    def label(self, rt: RecordType, values: Values) -> str:
        for spec in rt.fields.values():
            if spec.kind in ("name", "case_no") and spec.name in values:
                return mask_value(spec, values[spec.name])
        return mask_value(rt.fields[rt.source_key[0]], values.get(rt.source_key[0], ""))

    def links(self, rt: RecordType, record_id: str, values: Values, reach: Reach) -> list[LinkView]:
        """The records this one names and those that name it, as far as the official may
        see them: links out of reach are left out, reporters hidden below investigator."""
        links: list[LinkView] = []
        # Outgoing: the people a case or a delivery names.
        outgoing: list[tuple[str, str, str]] = []
        for spec in rt.fields.values():
            if spec.kind == "person_links" and spec.name in values:
                for rid, role in values[spec.name]:  # type: ignore[attr-defined]
                    outgoing.append((str(rid), str(spec.ref), str(role)))
            elif spec.kind == "person_ref" and spec.name in values:
                outgoing.append((str(values[spec.name]), str(spec.ref), spec.name))
        found = self.fetch([rid for rid, _, _ in outgoing])
        for rid, ref_type, role in outgoing:
            target = found.get(rid)
            if target is None or self._codec.type_of(target).name != ref_type:
                continue
            if role == REPORTER and not reach.sees_reporters:
                # That a case has a reporter is no secret; who it is, is.
                links.append(LinkView("", ref_type, role, PROTECTED_REPORTER))
                continue
            target_rt = self.schema.types[ref_type]
            opened = self._codec.open(target)
            if not reach.allows(self.facts(target_rt, opened, reach), rid):
                reach.withheld += 1
                continue
            links.append(LinkView(rid, ref_type, role, self.label(target_rt, opened)))
        # Incoming: records that name this one, found through their link indexes.
        if len(rt.source_key) == 1 and rt.source_key[0] in values:
            source_value = str(values[rt.source_key[0]])
            for other_rt, index, probe in self._codec.link_probes(rt.name, source_value):
                link_field = other_rt.fields[index.components[0].field]
                for stored in self.bucket(probe, MAX_RESULTS):
                    opened = self._codec.open(stored)
                    role = role_of_link(link_field, opened.get(link_field.name), record_id)
                    if role is None:
                        continue
                    # A person's page must not tell an officer that they reported a crime.
                    hidden = role == REPORTER and not reach.sees_reporters
                    facts = self.facts(other_rt, opened, reach)
                    if hidden or not reach.allows(facts, stored.record_id):
                        reach.withheld += 1
                        continue
                    label = self.label(other_rt, opened)
                    links.append(LinkView(stored.record_id, other_rt.name, role, label))
        return links


def _linked_people(rt: RecordType, values: Values) -> list[str]:
    """The record ids of the people a record's person-links fields name."""
    return [
        str(person_id)
        for spec in rt.fields.values()
        if spec.kind == "person_links"
        for person_id, _role in values.get(spec.name) or ()  # type: ignore[attr-defined]
    ]


def _pinyin_twin(rt: RecordType, spec: IndexSpec) -> IndexSpec | None:
    wanted = tuple(
        (c.field, "pinyin" if rt.fields[c.field].kind == "name" else c.transform)
        for c in spec.components
    )
    for other in rt.indexes.values():
        if tuple((c.field, c.transform) for c in other.components) == wanted:
            return other
    return None


def fact_fields(rt: RecordType) -> tuple[str, ...]:
    """The fields the record-level rules read (see RecordReader.facts)."""
    kinds = ("national_id", "case_no", "person_links", "person_ref")
    return tuple(
        name for name, spec in rt.fields.items() if spec.kind in kinds or name == "birth_date"
    )


def without_reporters(value: object) -> object:
    """A person-links value without its reporters (their record ids included)."""
    if not isinstance(value, tuple):
        return value
    return tuple(link for link in value if link[1] != REPORTER)


def plain(value: object) -> str:
    if isinstance(value, tuple):
        return "; ".join(f"{role}:{rid}" for rid, role in value)
    return str(value)
