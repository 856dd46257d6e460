"""Input records checked against a schema and turned into canonical values.

Also the inputs of the blind indexes, for a stored record and for a search. Every
refusal names the line and field, never the value.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

from custodes.errors import InvalidQuery, InvalidRecord
from custodes.records import idnumber
from custodes.records.normalise import (
    Refusal,
    canonicaliser,
    enum_lookup,
    is_han,
    name_key,
    name_pinyin,
    national_id,
)
from custodes.schema import FieldSpec, IndexSpec, RecordType, Schema

Links = tuple[tuple[str, str], ...]


class CanonicalRecord(NamedTuple):
    """One validated record: canonical values by field name, and its input line."""

    record_type: str
    values: dict[str, object]
    line: int

    def __repr__(self) -> str:
        # Records end up in debug output and tracebacks; show their shape, not their values.
        fields = ", ".join(self.values)
        return f"CanonicalRecord({self.record_type!r}, line={self.line}, fields=[{fields}])"


def _reason(exc: ValueError) -> str:
    # Only our own refusals carry a reason known to be free of the value; any other
    # ValueError (from a library) might quote it, so it is replaced wholesale.
    return str(exc) if isinstance(exc, Refusal) else "is not valid"


def _schema_name(key: object, names: frozenset[str]) -> str | None:
    # An unknown key comes from the input, and a name or an ID number makes a fine JSON
    # key: it is named only if the schema itself has a field of that name.
    return key if isinstance(key, str) and key in names else None


class _LinksParser:
    """Canonicalises a person_links value: a JSON list of objects, or a CSV string."""

    __slots__ = ("roles",)

    def __init__(self, field: FieldSpec) -> None:
        self.roles = frozenset(field.roles)

    def __call__(self, value: object) -> Links:
        if isinstance(value, str):
            pairs = self._from_string(value)
        elif isinstance(value, list | tuple):
            pairs = self._from_list(value)
        else:
            raise Refusal(
                "must be a list of {national_id, role} objects or a 'role:national_id;...' string"
            )
        seen: set[tuple[str, str]] = set()
        links: list[tuple[str, str]] = []
        for number, (role, raw_id) in enumerate(pairs, start=1):
            link = (self._id(number, raw_id), self._role(number, role))
            if link not in seen:
                seen.add(link)
                links.append(link)
        return tuple(links)

    @staticmethod
    def _from_string(value: str) -> list[tuple[str, str]]:
        pairs = []
        for number, entry in enumerate((e for e in value.split(";") if e.strip()), start=1):
            role, sep, raw_id = entry.partition(":")
            if not sep:
                raise Refusal(f"entry {number}: must be written role:national_id")
            pairs.append((role, raw_id))
        return pairs

    @staticmethod
    def _from_list(value: Sequence[object]) -> list[tuple[str, str]]:
        pairs = []
        for number, entry in enumerate(value, start=1):
            if not isinstance(entry, Mapping):
                raise Refusal(f"entry {number}: must be an object with national_id and role")
            if set(entry) != {"national_id", "role"}:
                raise Refusal(f"entry {number}: must have exactly the keys national_id and role")
            role, raw_id = entry["role"], entry["national_id"]
            if not isinstance(role, str) or not isinstance(raw_id, str):
                raise Refusal(f"entry {number}: national_id and role must be strings")
            pairs.append((role, raw_id))
        return pairs

    @staticmethod
    def _id(number: int, raw_id: str) -> str:
        try:
            return national_id(raw_id)
        except ValueError as exc:
            raise Refusal(f"entry {number}: national_id {_reason(exc)}") from None

    def _role(self, number: int, raw_role: str) -> str:
        role = unicodedata.normalize("NFKC", raw_role).strip().lower()
        if role not in self.roles:
            allowed = ", ".join(sorted(self.roles))
            raise Refusal(f"entry {number}: role must be one of: {allowed}")
        return role


class _Step(NamedTuple):
    name: str
    canon: Callable[[Any], object]
    required: bool
    scalar: bool  # the raw value must be a string
    # Raw spellings already known to be valid, mapped to their canonical form (enums).
    known: Mapping[str, str] | None = None


class _Plan(NamedTuple):
    record_type: str
    allowed_keys: frozenset[str]
    steps: tuple[_Step, ...]
    # (national_id field, birth_date field) when both exist and must agree.
    birth_check: tuple[str, str] | None


def _plan(rt: RecordType) -> _Plan:
    steps = []
    for f in rt.fields.values():
        if f.kind == "person_links":
            steps.append(_Step(f.name, _LinksParser(f), f.required, scalar=False))
        elif f.kind == "enum":
            known = enum_lookup(f.values)
            steps.append(_Step(f.name, canonicaliser(f), f.required, scalar=True, known=known))
        else:
            steps.append(_Step(f.name, canonicaliser(f), f.required, scalar=True))
    id_fields = [f.name for f in rt.fields.values() if f.kind == "national_id"]
    birth = rt.fields.get("birth_date")
    birth_check = None
    if id_fields and birth is not None and birth.kind == "date":
        birth_check = (id_fields[0], birth.name)
    return _Plan(
        record_type=rt.name,
        allowed_keys=frozenset(rt.fields) | {"type"},
        steps=tuple(steps),
        birth_check=birth_check,
    )


class RecordValidator:
    """Validates raw records (parsed JSON objects or CSV rows) against one schema."""

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self._plans = {name: _plan(rt) for name, rt in schema.types.items()}
        self._names = frozenset(f for rt in schema.types.values() for f in rt.fields)

    def validate(
        self, raw: Mapping[str, Any], *, line: int, record_type: str | None = None
    ) -> CanonicalRecord:
        """The canonical record, or `InvalidRecord` for the first problem found."""
        plan = self._plan_for(raw, line, record_type)
        if not plan.allowed_keys.issuperset(raw):
            for key in raw:
                if key not in plan.allowed_keys:
                    field = _schema_name(key, self._names)
                    raise InvalidRecord("unknown field", field=field, line=line)
        values: dict[str, object] = {}
        for name, canon, required, scalar, known in plan.steps:
            value = raw.get(name)
            if value.__class__ is str:
                if known is not None:
                    hit = known.get(value)
                    if hit is not None:
                        values[name] = hit
                        continue
                absent = not value or value.isspace()
            elif isinstance(value, str):
                value = str(value)  # a str subclass: work on the plain string
                absent = not value or value.isspace()
            elif value is None or (not scalar and value == []):
                absent = True
            elif scalar:
                raise InvalidRecord("must be a string", field=name, line=line)
            else:
                absent = False
            if absent:
                if required:
                    raise InvalidRecord("is required", field=name, line=line)
                continue
            try:
                canonical = canon(value)
            except ValueError as exc:
                raise InvalidRecord(_reason(exc), field=name, line=line) from None
            if not canonical:  # a link list holding nothing but separators
                if required:
                    raise InvalidRecord("is required", field=name, line=line)
                continue
            values[name] = canonical
        if plan.birth_check is not None:
            _check_birth_date(values, plan.birth_check, line)
        return CanonicalRecord(plan.record_type, values, line)

    def _plan_for(self, raw: Mapping[str, Any], line: int, record_type: str | None) -> _Plan:
        if type(raw) is not dict and not isinstance(raw, Mapping):
            raise InvalidRecord("a record must be an object", line=line)
        name = raw.get("type")
        if name is None or name == "":  # an empty CSV column names no type
            name = record_type
        if name is None:
            raise InvalidRecord("record type is not given", field="type", line=line)
        if not isinstance(name, str):
            raise InvalidRecord("must be a string", field="type", line=line)
        plan = self._plans.get(name)
        if plan is None:
            known = ", ".join(sorted(self._plans))
            raise InvalidRecord(f"unknown record type (known: {known})", field="type", line=line)
        return plan


def _check_birth_date(values: Mapping[str, object], fields: tuple[str, str], line: int) -> None:
    id_field, birth_field = fields
    number = values.get(id_field)
    born = values.get(birth_field)
    # Both are canonical by now (a valid number, a date written YYYY-MM-DD), so the
    # digits compare as the dates would, without building either date.
    if (
        isinstance(number, str)
        and isinstance(born, str)
        and idnumber.birth_date_text(number) != born
    ):
        raise InvalidRecord(
            f"{birth_field} does not match the date encoded in {id_field}",
            field=birth_field,
            line=line,
        )


def canonical_query(field: FieldSpec, raw: str) -> str:
    """The canonical form of a search value; for reference kinds, a national ID."""
    if not isinstance(raw, str):
        raise InvalidQuery(f"field {field.name!r}: must be a string")
    if not raw or raw.isspace():
        raise InvalidQuery(f"field {field.name!r}: must not be empty")
    try:
        return canonicaliser(field)(raw)
    except ValueError as exc:
        raise InvalidQuery(f"field {field.name!r}: {_reason(exc)}") from None


def _transformer(field: FieldSpec, transform: str) -> Callable[[str], str] | None:
    """What an index component does to a canonical value before it is tokenised (None:
    nothing); the one rule for ingest and search alike."""
    if transform == "pinyin":
        return name_pinyin
    if field.kind == "name":
        return name_key
    return None


def _transform(field: FieldSpec, transform: str, canonical: str) -> str:
    step = _transformer(field, transform)
    return canonical if step is None else step(canonical)


IndexInputs = Callable[[Mapping[str, object]], list[tuple[str, ...]]]


def index_inputs(record_type: RecordType, index: IndexSpec) -> IndexInputs:
    """`index_parts` for one index, with the schema looked up once: ingest calls it for
    every record."""
    if index.record_type != record_type.name:
        raise ValueError(f"index {index.qualified_name!r} is not on type {record_type.name!r}")
    components = index.components
    if len(components) == 1:
        field = record_type.fields[components[0].field]
        name = field.name
        if field.kind == "person_links":

            def linked(values: Mapping[str, object]) -> list[tuple[str, ...]]:
                links = cast(Links | None, values.get(name))
                if links is None:
                    return []
                # One token per person, whatever roles they hold in the record.
                return [(number,) for number in dict.fromkeys(number for number, _ in links)]

            return linked
        step = _transformer(field, components[0].transform)

        def single(values: Mapping[str, object]) -> list[tuple[str, ...]]:
            value = cast(str | None, values.get(name))
            if value is None:
                return []
            return [(value,) if step is None else (step(value),)]

        return single
    steps = [(c.field, _transformer(record_type.fields[c.field], c.transform)) for c in components]

    def joined(values: Mapping[str, object]) -> list[tuple[str, ...]]:
        parts = []
        for name, step in steps:
            value = cast(str | None, values.get(name))
            if value is None:
                return []
            parts.append(value if step is None else step(value))
        return [tuple(parts)]

    return joined


def index_parts(
    record_type: RecordType, index: IndexSpec, values: Mapping[str, object]
) -> list[tuple[str, ...]]:
    """The blind-index inputs of a stored record: one tuple per token to write.

    `[]` when the record lacks a component; one tuple per linked person for a
    multi-valued field.
    """
    return index_inputs(record_type, index)(values)


def query_parts(
    record_type: RecordType, index: IndexSpec, raw_values: Mapping[str, str]
) -> tuple[str, ...]:
    """The blind-index inputs of a search: the same canonical form and transform as ingest."""
    if index.record_type != record_type.name:
        raise InvalidQuery(f"index {index.qualified_name!r} is not on type {record_type.name!r}")
    wanted = index.field_names
    for key in raw_values:
        if key not in wanted:
            shown = _schema_name(key, frozenset(record_type.fields))
            what = f"field {shown!r}" if shown else "an unknown field"
            raise InvalidQuery(f"index {index.qualified_name!r} does not search {what}")
    parts = []
    for component in index.components:
        field = record_type.fields[component.field]
        raw = raw_values.get(component.field)
        if raw is None:
            raise InvalidQuery(
                f"index {index.qualified_name!r} needs a value for field {field.name!r}"
            )
        parts.append(_transform(field, component.transform, canonical_query(field, raw)))
    return tuple(parts)


def query_orders(
    record_type: RecordType, index: IndexSpec, raw_values: Mapping[str, str]
) -> list[tuple[str, ...]]:
    """The blind-index inputs a search tries: `query_parts`, then, for a name typed in
    Latin letters as two or more words, the same with the last word moved to the front.

    A clerk types a name in pinyin given name first as often as family name first ("Na Li"
    for 李娜); names are stored, and their tokens made, family name first, so the query
    side tries both and the stored tokens never change. Han characters are written family
    name first, and are taken as typed.
    """
    first = query_parts(record_type, index, raw_values)
    orders = [first]
    for at, component in enumerate(index.components):
        field = record_type.fields[component.field]
        raw = raw_values[component.field]
        if field.kind != "name" or component.transform != "pinyin" or is_han(raw):
            continue
        words = canonical_query(field, raw).split(" ")
        if len(words) < 2:
            continue
        turned = canonical_query(field, " ".join([words[-1], *words[:-1]]))
        other = (*first[:at], _transform(field, component.transform, turned), *first[at + 1 :])
        if other not in orders:
            orders.append(other)
    return orders
