"""GB 11643 check characters: the standard's worked example and its weighted sum."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from custodes.records.idnumber import (
    birth_date_of,
    birth_date_text,
    check_char,
    problem_with,
    sex_of,
)

WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def test_the_standards_worked_example() -> None:
    assert check_char("11010519491231002") == "X"
    assert problem_with("11010519491231002X") is None
    assert sex_of("11010519491231002X") == "female"
    assert birth_date_of("11010519491231002X").isoformat() == "1949-12-31"


@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_check_char_equals_the_weighted_sum(first17: str) -> None:
    total = sum(int(d) * w for d, w in zip(first17, WEIGHTS, strict=True))
    assert check_char(first17) == "10X98765432"[total % 11]


@given(
    born=st.dates(min_value=dt.date(1880, 1, 1), max_value=dt.date(2100, 12, 31)),
    sequence=st.text(alphabet="0123456789", min_size=3, max_size=3),
)
def test_birth_date_as_text_is_the_iso_form_of_the_encoded_date(
    born: dt.date, sequence: str
) -> None:
    first17 = "110105" + born.strftime("%Y%m%d") + sequence
    number = first17 + check_char(first17)
    assert problem_with(number) is None
    assert birth_date_text(number) == birth_date_of(number).isoformat() == born.isoformat()


def test_reasons_never_repeat_the_number() -> None:
    for bad in (
        "11010519491231002Y",
        "99010519491231002X",
        "11010519491331002X",
        "110105194912310021",
    ):
        reason = problem_with(bad)
        assert reason is not None and bad not in reason
