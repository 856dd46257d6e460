"""What a bulk export holds of a record: each field kept, coarsened, replaced by a keyed
pseudonym or left out, as the schema's export class says; and the keyed watermark.

Pure. The watermark is a keyed choice between two equally coarse forms of a generalised
text (an address cut after N or N+1 characters), made per record under the export's own
key: it survives shuffled, dropped or edited rows and any removed field but the address,
and a recipient cannot tell which form a row was given without the key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from custodes.schema import FieldSpec, RecordType

# Characters of a text kept by "generalise" when its mask names no prefix.
DEFAULT_PREFIX = 6
_PSEUDONYM_HEX = 24  # 96 bits: no two records of a population share one by chance


@dataclass(frozen=True, slots=True)
class ExportKeys:
    """One export's own keys: pseudonyms no other export shares, and its watermark."""

    pseudonym: bytes
    watermark: bytes

    def __repr__(self) -> str:
        return "ExportKeys(<hidden>)"


def pseudonym(key: bytes, record_id: str) -> str:
    """The keyed pseudonym of a record in one export."""
    return hmac.new(key, record_id.encode(), hashlib.sha256).hexdigest()[:_PSEUDONYM_HEX]


def watermark_bit(key: bytes, record_id: str) -> int:
    """The export's keyed choice for one record: which of two coarse forms it is given."""
    return hmac.new(key, b"watermark\x00" + record_id.encode(), hashlib.sha256).digest()[0] & 1


def prefix_length(spec: FieldSpec) -> int:
    head, _, rest = spec.mask.partition(":")
    return int(rest) if head == "prefix" and rest.isdigit() else DEFAULT_PREFIX


def generalise(spec: FieldSpec, value: str, *, longer: bool = False) -> str:
    """A value's coarse form: a date's year, an ID number's 6-digit division code, a
    phone's first 3 digits, a text's first characters (one more when `longer`)."""
    if spec.kind == "date":
        return value[:4]
    if spec.kind == "national_id":
        return value[:6]
    if spec.kind == "phone":
        return value[:3]
    return value[: prefix_length(spec) + (1 if longer else 0)]


def carriers(rt: RecordType, rules: Mapping[str, str]) -> tuple[str, ...]:
    """The fields that carry the watermark: generalised texts."""
    return tuple(
        name
        for name, rule in rules.items()
        if rule == "generalise" and rt.fields[name].kind == "text"
    )


def redact(
    rt: RecordType,
    rules: Mapping[str, str],
    values: Mapping[str, object],
    record_id: str,
    keys: ExportKeys,
) -> dict[str, str]:
    """One export row: the fields `rules` keeps, in the schema's order, each as its rule
    makes it; a field the record lacks stays absent (so does one `rules` drops)."""
    row: dict[str, str] = {}
    for name in rt.fields:
        rule = rules.get(name, "drop")
        if rule == "drop":
            continue
        if rule == "pseudonym":
            row[name] = pseudonym(keys.pseudonym, record_id)
            continue
        value = values.get(name)
        if value is None:
            continue
        text = str(value)
        if rule == "keep":
            row[name] = text
        else:
            spec = rt.fields[name]
            longer = spec.kind == "text" and watermark_bit(keys.watermark, record_id) == 1
            row[name] = generalise(spec, text, longer=longer)
    return row
