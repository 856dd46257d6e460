"""Field masks: what an official sees of a value before revealing it.

Implements the schema's mask forms (none, hidden, year, keep:A:B, prefix:N) on
canonical values.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from custodes.schema import FieldSpec

HIDDEN = "[hidden]"
ELLIPSIS = "…"

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def render(canonical: object) -> str:
    """A canonical value as text; person links as `role:national_id;...`."""
    if isinstance(canonical, str):
        return canonical
    if isinstance(canonical, tuple):
        return ";".join(f"{role}:{number}" for number, role in canonical)
    raise TypeError(f"cannot render a canonical value of type {type(canonical).__name__}")


def _keep(first: int, last: int, s: str) -> str:
    n = len(s)
    if n > first + last:
        return s[:first] + "*" * (n - first - last) + s[n - last :]
    # A value this short would be shown whole; never show more than half of it.
    shown = min(first, n // 2)
    return s[:shown] + "*" * (n - shown)


def _prefix(count: int, s: str) -> str:
    # Always the ellipsis, so the mask does not reveal the value's length.
    shown = count if len(s) > count else len(s) // 2
    return s[:shown] + ELLIPSIS


def _year(s: str) -> str:
    if _DATE.fullmatch(s) is None:
        return HIDDEN
    return s[:4] + "-**-**"


def _none(s: str) -> str:
    return s


def _hidden(s: str) -> str:
    return HIDDEN


@functools.lru_cache(maxsize=256)
def _mask_function(mask: str) -> Callable[[str], str]:
    if mask == "none":
        return _none
    if mask == "hidden":
        return _hidden
    if mask == "year":
        return _year
    head, _, rest = mask.partition(":")
    if head == "keep":
        first, last = (int(n) for n in rest.split(":"))
        return functools.partial(_keep, first, last)
    if head == "prefix":
        return functools.partial(_prefix, int(rest))
    raise ValueError(f"unknown mask {mask!r}")


def mask_value(field: FieldSpec, canonical: object) -> str:
    """The masked form of a field's canonical value, per the field's mask."""
    return _mask_function(field.mask)(render(canonical))
