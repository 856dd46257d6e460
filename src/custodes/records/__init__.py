"""Validation, canonical forms, index inputs and masks for input records.

Pure code: no I/O. Resident ID numbers are checked in `idnumber`.
"""

from custodes.records.masks import mask_value
from custodes.records.normalise import is_han, name_key, name_pinyin
from custodes.records.validate import (
    CanonicalRecord,
    RecordValidator,
    canonical_query,
    index_inputs,
    index_parts,
    query_orders,
    query_parts,
)

__all__ = [
    "CanonicalRecord",
    "RecordValidator",
    "canonical_query",
    "index_inputs",
    "index_parts",
    "is_han",
    "mask_value",
    "name_key",
    "name_pinyin",
    "query_orders",
    "query_parts",
]
