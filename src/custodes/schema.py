"""Record types and their fields: how each is validated, protected, masked and found.

A schema is data (a TOML file); this module turns it into checked, immutable
objects. The `population` schema ships with the package; users may supply their own.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from importlib import resources
from pathlib import Path
from typing import Any

from custodes.errors import SchemaError


class Sensitivity(IntEnum):
    """How much harm a field's disclosure does; later gates which roles may reveal it."""

    BASIC = 0
    PERSONAL = 1
    IDENTIFYING = 2
    SENSITIVE = 3
    RESTRICTED = 4


FIELD_KINDS = frozenset(
    {
        "name",  # a person's name; Han characters or Latin letters
        "national_id",  # GB 11643 resident ID number, 18 characters with check digit
        "phone",  # mainland mobile number, stored as 11 digits
        "date",  # ISO 8601 calendar date
        "enum",  # one of `values`
        "text",  # free short text, NFKC-normalised, whitespace collapsed
        "narrative",  # free long text, kept as written (NFC)
        "case_no",  # case number: letters and digits, upper-cased
        "person_ref",  # a reference to another record by its source key
        "person_links",  # a list of {national_id, role} references
    }
)

MASK_FORMS = ("none", "hidden", "year", "keep:", "prefix:")

# Multi-valued kinds produce one index token per linked record.
MULTI_VALUED_KINDS = frozenset({"person_links"})
REFERENCE_KINDS = frozenset({"person_ref", "person_links"})

# Transforms an index component may apply to a field's canonical value.
INDEX_TRANSFORMS = frozenset({"", "pinyin"})

# What a bulk export does with a field (custodes.export.pseudonymise): leave it out, copy
# it, coarsen it, or replace it with a keyed pseudonym of the record that no other export
# shares. A field an export class does not name is left out.
EXPORT_RULES = frozenset({"drop", "keep", "generalise", "pseudonym"})
# The kinds whose values have a coarser form: a date its year, an ID number its 6-digit
# division code, a phone its first 3 digits, a text (an address) its first characters.
GENERALISED_KINDS = frozenset({"date", "national_id", "phone", "text"})


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    kind: str
    sensitivity: Sensitivity
    mask: str
    required: bool = False
    values: tuple[str, ...] = ()  # allowed values, for enum
    ref: str | None = None  # referenced record type, for person_ref / person_links
    roles: tuple[str, ...] = ()  # allowed roles, for person_links
    max_length: int = 0  # 0: the kind's default


@dataclass(frozen=True, slots=True)
class IndexComponent:
    field: str
    transform: str = ""  # "" (canonical value) or "pinyin"


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """A keyed blind index over one field, or a compound over several."""

    record_type: str
    name: str
    components: tuple[IndexComponent, ...]
    # A stable small integer naming this index in storage (not secret). Computed once:
    # ingest asks for it for every token it writes.
    index_id: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        digest = hashlib.sha256(self.qualified_name.encode()).digest()
        object.__setattr__(self, "index_id", int.from_bytes(digest[:4], "big") & 0x7FFFFFFF)

    @property
    def qualified_name(self) -> str:
        return f"{self.record_type}.{self.name}"

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(c.field for c in self.components)


@dataclass(frozen=True, slots=True)
class Retention:
    """How long a record type is kept: `days` after the date in its field `field`. A
    record without that date is kept."""

    field: str
    days: int


@dataclass(frozen=True, slots=True)
class RecordType:
    name: str
    description: str
    fields: Mapping[str, FieldSpec]
    source_key: tuple[str, ...]
    indexes: Mapping[str, IndexSpec]
    retention: Retention | None = None

    def field(self, name: str) -> FieldSpec:
        try:
            return self.fields[name]
        except KeyError:
            raise SchemaError(f"record type {self.name!r} has no field {name!r}") from None

    def index(self, name: str) -> IndexSpec:
        try:
            return self.indexes[name]
        except KeyError:
            known = ", ".join(sorted(self.indexes))
            raise SchemaError(
                f"record type {self.name!r} has no index {name!r} (known: {known})"
            ) from None


@dataclass(frozen=True, slots=True)
class Schema:
    name: str
    version: int
    types: Mapping[str, RecordType]
    digest: str = field(default="")  # SHA-256 of the source text; pins a vault to its schema
    # Export purpose class -> record type -> field -> rule (one of EXPORT_RULES).
    exports: Mapping[str, Mapping[str, Mapping[str, str]]] = field(default_factory=dict)

    def record_type(self, name: str) -> RecordType:
        try:
            return self.types[name]
        except KeyError:
            known = ", ".join(sorted(self.types))
            raise SchemaError(f"unknown record type {name!r} (known: {known})") from None

    def all_indexes(self) -> list[IndexSpec]:
        return [ix for rt in self.types.values() for ix in rt.indexes.values()]

    def export_rules(self, purpose_class: str, record_type: str) -> Mapping[str, str]:
        """What an export of this class does with each field of this type that it keeps
        (fields absent are dropped)."""
        rules = self.exports.get(purpose_class)
        if rules is None:
            known = ", ".join(sorted(self.exports)) or "none"
            raise SchemaError(f"unknown export class {purpose_class!r} (known: {known})")
        if record_type not in rules:
            raise SchemaError(
                f"export class {purpose_class!r} does not export records of type {record_type!r}"
            )
        return {name: rule for name, rule in rules[record_type].items() if rule != "drop"}


def load_schema(path: Path | None = None) -> Schema:
    """Load a schema file, or the shipped `population` schema when no path is given."""
    if path is None:
        text = resources.files("custodes").joinpath("schemas/population.toml").read_text("utf-8")
    else:
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise SchemaError(f"cannot read schema file: {exc.strerror}") from None
    return parse_schema(text)


def parse_schema(text: str) -> Schema:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(f"schema is not valid TOML: {exc}") from None
    name = _require(doc, "name", str, "schema")
    version = _require(doc, "version", int, "schema")
    raw_types = _require(doc, "types", dict, "schema")
    if not raw_types:
        raise SchemaError("schema declares no record types")
    types = {tname: _parse_type(tname, spec) for tname, spec in raw_types.items()}
    schema = Schema(
        name=name,
        version=version,
        types=types,
        digest=hashlib.sha256(text.encode("utf-8")).hexdigest(),
        exports=_parse_exports(doc.get("exports", {}), types),
    )
    _check_references(schema)
    return schema


def _parse_exports(
    raw: Any, types: Mapping[str, RecordType]
) -> dict[str, dict[str, dict[str, str]]]:
    if not isinstance(raw, dict):
        raise SchemaError("exports: must be a table of export classes")
    classes: dict[str, dict[str, dict[str, str]]] = {}
    for cname, per_type in raw.items():
        where = f"export class {cname!r}"
        if not cname.isidentifier():
            raise SchemaError(f"{where}: name must be an identifier")
        if not isinstance(per_type, dict) or not per_type:
            raise SchemaError(f"{where}: must be a table naming record types")
        classes[cname] = {}
        for tname, rules in per_type.items():
            rt = types.get(tname)
            if rt is None:
                raise SchemaError(f"{where}: unknown record type {tname!r}")
            if not isinstance(rules, dict):
                raise SchemaError(f"{where} type {tname!r}: must be a table of fields")
            checked: dict[str, str] = {}
            for fname, rule in rules.items():
                at = f"{where} type {tname!r} field {fname!r}"
                spec = rt.fields.get(fname)
                if spec is None:
                    raise SchemaError(f"{at}: no such field")
                if rule not in EXPORT_RULES:
                    raise SchemaError(f"{at}: the rule is one of {', '.join(sorted(EXPORT_RULES))}")
                if rule == "generalise" and spec.kind not in GENERALISED_KINDS:
                    raise SchemaError(f"{at}: a {spec.kind} field has no general form")
                if rule != "drop" and spec.kind in MULTI_VALUED_KINDS:
                    raise SchemaError(f"{at}: a list of links is never exported")
                checked[fname] = rule
            if not any(r == "pseudonym" for r in checked.values()):
                # Without one, two rows of an export could not be told apart from two
                # people, nor a leaked row be traced to its export.
                raise SchemaError(f"{where} type {tname!r}: needs one field as a pseudonym")
            classes[cname][tname] = checked
    return classes


def _parse_type(tname: str, spec: Any) -> RecordType:
    where = f"type {tname!r}"
    if not isinstance(spec, dict):
        raise SchemaError(f"{where}: must be a table")
    if not tname.isidentifier():
        raise SchemaError(f"{where}: name must be an identifier")
    raw_fields = _require(spec, "fields", dict, where)
    fields = {fname: _parse_field(tname, fname, f) for fname, f in raw_fields.items()}
    source_key = tuple(_require(spec, "source_key", list, where))
    if not source_key:
        raise SchemaError(f"{where}: source_key must name at least one field")
    for fname in source_key:
        if fname not in fields:
            raise SchemaError(f"{where}: source_key names unknown field {fname!r}")
        if not fields[fname].required:
            raise SchemaError(f"{where}: source_key field {fname!r} must be required")
    indexes: dict[str, IndexSpec] = {}
    for raw_ix in spec.get("indexes", []):
        ix = _parse_index(tname, raw_ix, fields)
        if ix.name in indexes:
            raise SchemaError(f"{where}: index {ix.name!r} declared twice")
        indexes[ix.name] = ix
    return RecordType(
        name=tname,
        description=str(spec.get("description", "")),
        fields=fields,
        source_key=source_key,
        indexes=indexes,
        retention=_parse_retention(where, spec.get("retention"), fields),
    )


def _parse_retention(where: str, spec: Any, fields: Mapping[str, FieldSpec]) -> Retention | None:
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise SchemaError(f"{where}: retention must be a table")
    fname = _require(spec, "field", str, f"{where} retention")
    days = _require(spec, "days", int, f"{where} retention")
    if fname not in fields or fields[fname].kind != "date":
        raise SchemaError(f"{where}: retention counts from a date field of the type")
    if not 1 <= days <= 100 * 366:
        raise SchemaError(f"{where}: retention days must be 1 to 36,600")
    return Retention(fname, days)


def _parse_field(tname: str, fname: str, spec: Any) -> FieldSpec:
    where = f"type {tname!r} field {fname!r}"
    if not isinstance(spec, dict):
        raise SchemaError(f"{where}: must be a table")
    if not fname.isidentifier():
        raise SchemaError(f"{where}: name must be an identifier")
    kind = _require(spec, "kind", str, where)
    if kind not in FIELD_KINDS:
        raise SchemaError(f"{where}: unknown kind {kind!r}")
    sens_name = _require(spec, "sensitivity", str, where)
    try:
        sensitivity = Sensitivity[sens_name.upper()]
    except KeyError:
        raise SchemaError(f"{where}: unknown sensitivity {sens_name!r}") from None
    mask = _require(spec, "mask", str, where)
    _check_mask(where, mask)
    values = tuple(spec.get("values", ()))
    if kind == "enum" and not values:
        raise SchemaError(f"{where}: an enum needs values")
    ref = spec.get("ref")
    if kind in REFERENCE_KINDS and not ref:
        raise SchemaError(f"{where}: a {kind} needs ref, the record type it points to")
    roles = tuple(spec.get("roles", ()))
    if kind == "person_links" and not roles:
        raise SchemaError(f"{where}: person_links needs roles")
    return FieldSpec(
        name=fname,
        kind=kind,
        sensitivity=sensitivity,
        mask=mask,
        required=bool(spec.get("required", False)),
        values=values,
        ref=ref,
        roles=roles,
        max_length=int(spec.get("max_length", 0)),
    )


def _parse_index(tname: str, spec: Any, fields: Mapping[str, FieldSpec]) -> IndexSpec:
    where = f"type {tname!r} index"
    if not isinstance(spec, dict):
        raise SchemaError(f"{where}: must be a table")
    name = _require(spec, "name", str, where)
    where = f"type {tname!r} index {name!r}"
    comps: list[IndexComponent] = []
    for raw in _require(spec, "fields", list, where):
        fname, _, transform = str(raw).partition(":")
        if fname not in fields:
            raise SchemaError(f"{where}: unknown field {fname!r}")
        if transform not in INDEX_TRANSFORMS:
            raise SchemaError(f"{where}: unknown transform {transform!r}")
        if transform == "pinyin" and fields[fname].kind != "name":
            raise SchemaError(f"{where}: pinyin applies only to name fields")
        comps.append(IndexComponent(fname, transform))
    if not comps:
        raise SchemaError(f"{where}: needs at least one field")
    multi = [c for c in comps if fields[c.field].kind in MULTI_VALUED_KINDS]
    if multi and len(comps) > 1:
        raise SchemaError(f"{where}: a multi-valued field must be indexed alone")
    return IndexSpec(record_type=tname, name=name, components=tuple(comps))


def _check_mask(where: str, mask: str) -> None:
    if mask in ("none", "hidden", "year"):
        return
    head, _, rest = mask.partition(":")
    try:
        if head == "keep":
            a, b = rest.split(":")
            if int(a) >= 0 and int(b) >= 0:
                return
        elif head == "prefix" and int(rest) >= 0:
            return
    except ValueError:
        pass
    raise SchemaError(f"{where}: unknown mask {mask!r}")


def _check_references(schema: Schema) -> None:
    for rt in schema.types.values():
        for f in rt.fields.values():
            if f.ref is None:
                continue
            target = schema.types.get(f.ref)
            if target is None:
                raise SchemaError(f"type {rt.name!r} field {f.name!r}: unknown ref {f.ref!r}")
            if len(target.source_key) != 1:
                raise SchemaError(
                    f"type {rt.name!r} field {f.name!r}: ref {f.ref!r} must have a one-field "
                    "source key"
                )


def _require(doc: Mapping[str, Any], key: str, typ: type, where: str) -> Any:
    if key not in doc:
        raise SchemaError(f"{where}: missing {key!r}")
    value = doc[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise SchemaError(f"{where}: {key!r} must be {typ.__name__}")
    return value
