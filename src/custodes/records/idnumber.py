"""Chinese resident identity numbers (GB 11643-1999).

18 characters: a 6-digit administrative division code, the birth date as YYYYMMDD,
a 3-digit sequence whose parity gives the sex (odd: male), and a MOD 11-2 check
character (0-9 or X).
"""

from __future__ import annotations

import datetime as dt

_CHECK = "10X98765432"

# First two digits of the division code: provinces, autonomous regions, municipalities,
# Taiwan (71), Hong Kong (81), Macao (82).
PROVINCE_CODES = frozenset(
    {
        "11", "12", "13", "14", "15", "21", "22", "23", "31", "32", "33", "34", "35",
        "36", "37", "41", "42", "43", "44", "45", "46", "50", "51", "52", "53", "54",
        "61", "62", "63", "64", "65", "71", "81", "82",
    }
)  # fmt: skip


def check_char(first17: str) -> str:
    """The MOD 11-2 check character for the first 17 digits.

    The standard's weights are 2**k mod 11 for the digit k places left of the check
    character; since 13 = 2 (mod 11), reading the digits in base 13 and doubling gives
    the weighted sum modulo 11 in one C-level call, three times faster on ingest.
    """
    return _CHECK[2 * int(first17, 13) % 11]


def birth_date_of(number: str) -> dt.date:
    """The birth date encoded in a (structurally valid) 18-character number."""
    return dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))


def birth_date_text(number: str) -> str:
    """The birth date of a valid 18-character number, written YYYY-MM-DD."""
    return f"{number[6:10]}-{number[10:12]}-{number[12:14]}"


def sex_of(number: str) -> str:
    """'male' or 'female', from the parity of the sequence code."""
    return "male" if int(number[16]) % 2 else "female"


def from_first_generation(number: str) -> str:
    """The 18-character number of a first-generation, 15-digit resident ID (GB 11643-1989:
    region, birth date as YYMMDD, sequence): every holder was born in the 1900s, so the
    century is 19, and the check character is computed. A clerk types what is on the
    card; the vault stores and searches the one form."""
    body = number[:6] + "19" + number[6:15]
    return body + check_char(body)


def problem_with(number: str) -> str | None:
    """Why an upper-cased, 18-character candidate is not a valid number, or None.

    The reason never repeats the number.
    """
    if len(number) != 18:
        return "must be 18 characters"
    if not number[:17].isdigit() or not number[:17].isascii():
        return "the first 17 characters must be digits"
    if not (number[17].isdigit() and number[17].isascii()) and number[17] != "X":
        return "the last character must be a digit or X"
    if number[:2] not in PROVINCE_CODES:
        return "the region code names no province"
    try:
        born = birth_date_of(number)
    except ValueError:
        return "the encoded birth date is not a calendar date"
    if born.year < 1880:
        return "the encoded birth date is before 1880"
    if number[17] != check_char(number[:17]):
        return "the check digit does not match"
    return None
