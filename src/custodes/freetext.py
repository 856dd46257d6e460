"""Free text that people type and that is kept and shown again (stated purposes, case
references, audit filters): one rule where it comes in and one escape where it goes out,
so that no stored line can hide, reorder or rewrite what an auditor's screen shows.
"""

from __future__ import annotations

import unicodedata

__all__ = ["HiddenCharacter", "escape_hidden", "is_hidden", "one_line"]

# Controls (ESC, CR, C1's CSI), format characters (zero-width, bidi embeddings, overrides
# and isolates, BOM), line and paragraph separators, private use, surrogates, unassigned:
# each can make a line read differently from what it holds, and no purpose needs one.
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class HiddenCharacter(ValueError):
    """Text holds a character that would not show as itself. Says so, never which text."""


def is_hidden(ch: str) -> bool:
    return unicodedata.category(ch) in _HIDDEN


def one_line(text: str) -> str:
    """`text` normalised (NFKC, runs of spaces made one, ends trimmed); HiddenCharacter if
    it holds a control, format, separator, private-use or unassigned character."""
    normal = unicodedata.normalize("NFKC", text)
    if any(is_hidden(ch) for ch in normal):
        raise HiddenCharacter(
            "must not contain control, formatting, private-use or unassigned characters"
        )
    return " ".join(normal.split())


def escape_hidden(text: str) -> str:
    """`text` with every hidden character spelt out (`\\u202e`), for a terminal or a page.

    Whatever a stored entry holds (written before input was checked, or by a writer who
    went around the check) reaches the reader as visible text, never as an instruction.
    """
    if text.isprintable():  # the usual case: nothing to escape (isprintable is stricter)
        return text
    return "".join(_escape(ch) if is_hidden(ch) else ch for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
