"""Canonical forms for every scalar field kind, and the name keys used by blind indexes.

Each canonicaliser takes the raw text, returns the one form the vault stores and
indexes, and raises `ValueError` with a reason that never repeats the value.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import unicodedata
from collections.abc import Callable, Collection, Mapping

from custodes.records import idnumber
from custodes.schema import FieldSpec

NAME_MAX = 64
TEXT_MAX = 200
NARRATIVE_MAX = 20_000


class Refusal(ValueError):
    """A value was refused; the message is a fixed reason, never the value itself."""


# CJK unified ideographs, extension A, compatibility ideographs, and planes 2-3
# (extensions B onwards live there and nothing else does).
_HAN_CLASS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
_HAN = re.compile(f"[{_HAN_CLASS}]")
_HAN_GAP = re.compile(f"(?<=[{_HAN_CLASS}]) (?=[{_HAN_CLASS}])")
_DOT_GAP = re.compile(" ?· ?")

# Separators people type between the parts of a name, mapped to the one form kept.
# Uyghur, Tibetan and transliterated names use a middle dot, typed with many variants.
_NAME_PUNCT = str.maketrans(
    {
        "•": "·",  # bullet
        "・": "·",  # katakana middle dot (also what NFKC makes of the half-width one)
        "‧": "·",  # hyphenation point
        "∙": "·",  # bullet operator
        "‐": "-",  # hyphen
        "’": "'",  # right single quotation mark, the usual typographic apostrophe
        "ʼ": "'",  # modifier letter apostrophe
    }
)
_NAME_PUNCT_FOUND = re.compile("[" + "".join(chr(c) for c in _NAME_PUNCT) + "]")
_NAME_SEPARATORS = str.maketrans("", "", " ·'-")
_NAME_KEY_DROP = str.maketrans("", "", " ·'-")

# C0 and C1 controls, lone surrogates (unencodable), and the bidi embeddings,
# overrides and isolates that can make stored text display as something else.
_UNSAFE = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{_UNSAFE}]")

_PHONE_DROP = str.maketrans("", "", " -.()\t\u00a0")
_PHONE = re.compile(r"(?:\+86|0086|86)?(1[3-9][0-9]{9})")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_CASE_NO = re.compile(r"[A-Z0-9-]{4,32}")

# Chinese labels found in source systems for the population schema's enum values.
ENUM_LABELS: Mapping[str, str] = {
    "男": "male",
    "男性": "male",
    "女": "female",
    "女性": "female",
    "未婚": "single",
    "已婚": "married",
    "离异": "divorced",
    "离婚": "divorced",
    "丧偶": "widowed",
}


def _nfkc(raw: str) -> str:
    # NFKC leaves ASCII unchanged; skipping it keeps the common case cheap.
    return raw if raw.isascii() else unicodedata.normalize("NFKC", raw)


def national_id(raw: str) -> str:
    """A resident ID number: 18 ASCII characters, check character upper-cased; a
    first-generation 15-digit number becomes the 18-character one it was replaced by."""
    s = _nfkc(raw)
    if len(s) != 18 or not s.isalnum():
        s = "".join(s.split())
    s = s.upper()
    if len(s) == 15 and s.isdigit() and s.isascii():
        s = idnumber.from_first_generation(s)
    problem = idnumber.problem_with(s)
    if problem is not None:
        raise Refusal(problem)
    return s


def phone(raw: str) -> str:
    """A mainland mobile number as its 11 digits, without country code or separators."""
    s = _nfkc(raw)
    if len(s) == 11 and s.isdigit() and s.isascii() and s[0] == "1" and s[1] in "3456789":
        return s
    s = "".join(s.translate(_PHONE_DROP).split())
    m = _PHONE.fullmatch(s)
    if m is None:
        raise Refusal("must be a mainland mobile number of 11 digits starting 13-19")
    return m.group(1)


def date(raw: str) -> str:
    """A calendar date written strictly as YYYY-MM-DD, year 1800 to 2200."""
    s = raw if raw.isascii() else unicodedata.normalize("NFKC", raw)
    s = s.strip()
    # The pattern first: fromisoformat alone also accepts other ISO 8601 shapes.
    if _DATE.fullmatch(s) is None:
        raise Refusal("must be a date written YYYY-MM-DD")
    try:
        year = dt.date.fromisoformat(s).year
    except ValueError:
        raise Refusal("is not a calendar date") from None
    if not 1800 <= year <= 2200:
        raise Refusal("year must be between 1800 and 2200")
    return s


def name(raw: str, max_length: int = 0) -> str:
    """A person's name in any script: spacing collapsed, Han characters run together.

    Allowed besides letters (and the combining marks that follow them): one middle
    dot form `·`, space, hyphen and apostrophe. Digits are refused.
    """
    limit = max_length or NAME_MAX
    s = raw
    if not s.isascii():
        s = unicodedata.normalize("NFKC", s)
        if _NAME_PUNCT_FOUND.search(s) is not None:
            s = s.translate(_NAME_PUNCT)
    s = " ".join(s.split())
    if " " in s:
        s = _DOT_GAP.sub("·", _HAN_GAP.sub("", s))
    if not s:
        raise Refusal("must not be empty")
    if len(s) > limit:
        raise Refusal(f"must be at most {limit} characters")
    if not s.isalpha() and not s.translate(_NAME_SEPARATORS).isalpha():
        _explain_bad_name(s)
    if s[0] in "·-" or s[-1] in "·-":
        raise Refusal("must not begin or end with a separator")
    return s


def _explain_bad_name(s: str) -> None:
    """Raise the reason a name that failed the fast check is refused, or accept it."""
    letters = 0
    previous_is_letter = False
    for c in s:
        if c.isalpha():
            letters += 1
            previous_is_letter = True
        elif unicodedata.category(c)[0] == "M" and previous_is_letter:
            continue  # a combining mark on a letter, as in many Indic and Arabic names
        elif c in " ·'-":
            previous_is_letter = False
        elif c.isdigit() or c.isnumeric():
            raise Refusal("must not contain digits")
        else:
            raise Refusal("contains a character not allowed in a name")
    if letters == 0:
        raise Refusal("must contain a letter")


def text(raw: str, max_length: int = 0) -> str:
    """Free short text: NFKC, whitespace collapsed to single spaces, no control characters."""
    limit = max_length or TEXT_MAX
    s = raw if raw.isascii() else unicodedata.normalize("NFKC", raw)
    # Printable text holds no control and no whitespace but the plain space, so the
    # common, already tidy value skips the scan and the re-spacing.
    if not (s.isprintable() and s[:1] != " " and s[-1:] != " " and "  " not in s):
        if _CONTROL.search(s) is not None:
            raise Refusal("contains a control character")
        s = " ".join(s.split())
    if not s:
        raise Refusal("must not be empty")
    if len(s) > limit:
        raise Refusal(f"must be at most {limit} characters")
    return s


def narrative(raw: str, max_length: int = 0) -> str:
    """Free long text kept as written (NFC only): lines end in `\\n`, no trailing spaces."""
    limit = max_length or NARRATIVE_MAX
    s = raw if raw.isascii() else unicodedata.normalize("NFC", raw)
    if _CONTROL.search(s) is not None:
        raise Refusal("contains a control character")
    # splitlines also breaks at \r, \r\n and the Unicode line and paragraph separators.
    s = "\n".join(line.rstrip() for line in s.splitlines()).strip("\n")
    if not s:
        raise Refusal("must not be empty")
    if len(s) > limit:
        raise Refusal(f"must be at most {limit} characters")
    return s


def case_no(raw: str) -> str:
    """A case number: 4 to 32 upper-case letters, digits and hyphens."""
    s = _nfkc(raw).strip().upper()
    if _CASE_NO.fullmatch(s) is None:
        raise Refusal("must be 4 to 32 letters, digits or hyphens")
    return s


def enum_lookup(values: Collection[str]) -> dict[str, str]:
    """Every accepted spelling of an enum's values (the values and their Chinese labels)."""
    table = {v: v for v in values}
    table.update((label, v) for label, v in ENUM_LABELS.items() if v in table)
    return table


def enum(raw: str, values: Collection[str] | Mapping[str, str]) -> str:
    """One of `values` (case-insensitive), or a Chinese label for one of them."""
    table = values if isinstance(values, Mapping) else enum_lookup(values)
    hit = table.get(raw)
    if hit is not None:
        return hit
    hit = table.get(_nfkc(raw).strip().lower())
    if hit is None:
        allowed = ", ".join(sorted(set(table.values())))
        raise Refusal(f"must be one of: {allowed}")
    return hit


def canonicaliser(field: FieldSpec) -> Callable[[str], str]:
    """The canonicaliser for one value of `field`; for reference kinds, one national ID."""
    kind = field.kind
    if kind in ("national_id", "person_ref", "person_links"):
        return national_id
    if kind == "phone":
        return phone
    if kind == "date":
        return date
    if kind == "case_no":
        return case_no
    if kind in ("name", "text", "narrative"):
        fn = {"name": name, "text": text, "narrative": narrative}[kind]
        return functools.partial(fn, max_length=field.max_length) if field.max_length else fn
    if kind == "enum":
        return functools.partial(enum, values=enum_lookup(field.values))
    raise ValueError(f"no canonical form for field kind {kind!r}")


def is_han(text: str) -> bool:
    """Whether the text contains a Han character (so a name is written in Chinese)."""
    return _HAN.search(text) is not None


def name_key(canonical_name: str) -> str:
    """The form in which two canonical names compare equal: case-folded, no separators."""
    return canonical_name.casefold().translate(_NAME_KEY_DROP)


def _letters_key(s: str) -> str:
    # ü is the pinyin vowel written v; other accents (tone marks) are dropped.
    s = unicodedata.normalize("NFKD", s.casefold().replace("ü", "v"))
    return "".join(c for c in s if c.isalpha())


@functools.lru_cache(maxsize=1 << 16)
def name_pinyin(canonical_name: str) -> str:
    """A name as toneless lower-case pinyin without separators: 张伟, Zhang Wei -> zhangwei.

    Cached because ingest asks for it once per record and the conversion is slow.
    """
    if not is_han(canonical_name):
        return _letters_key(canonical_name)
    return "".join(_char_pinyin(ch) for ch in canonical_name)


@functools.lru_cache(maxsize=1 << 15)
def _char_pinyin(ch: str) -> str:
    # Character by character: a population has millions of distinct names but only a few
    # thousand distinct name characters, so this cache almost always hits, where a cache
    # of whole names misses on most new people. Names are not dictionary phrases, so
    # converting them character by character loses nothing that pypinyin would use.
    from pypinyin import Style, lazy_pinyin  # imported on first use: its tables are large

    return "".join(_letters_key(s) for s in lazy_pinyin(ch, style=Style.NORMAL))
