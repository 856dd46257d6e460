"""Masks: what an official sees before a reveal must never be the whole value.

All values here are made up.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from custodes.records import mask_value
from custodes.schema import FieldSpec, Sensitivity, load_schema

SCHEMA = load_schema()
PERSON = SCHEMA.record_type("person")
CASE = SCHEMA.record_type("case")


def spec(mask: str) -> FieldSpec:
    return FieldSpec(name="f", kind="text", sensitivity=Sensitivity.PERSONAL, mask=mask)


def test_national_id_keeps_region_and_check_part_only() -> None:
    assert mask_value(PERSON.fields["national_id"], "310101198501011234") == "3101**********1234"


def test_phone_keeps_prefix_and_last_four() -> None:
    assert mask_value(PERSON.fields["phone"], "13812345678") == "138****5678"


def test_name_keeps_the_surname_only() -> None:
    assert mask_value(PERSON.fields["name"], "张伟") == "张*"
    assert mask_value(PERSON.fields["name"], "欧阳修文") == "欧***"


def test_birth_date_shows_the_year() -> None:
    assert mask_value(PERSON.fields["birth_date"], "1985-07-14") == "1985-**-**"


def test_year_mask_on_something_not_a_date_hides_it() -> None:
    assert mask_value(spec("year"), "not a date") == "[hidden]"


def test_hidden_fields_show_a_placeholder() -> None:
    assert mask_value(PERSON.fields["ethnicity"], "汉族") == "[hidden]"


def test_address_prefix_hides_the_length() -> None:
    masked = mask_value(PERSON.fields["address"], "北京市朝阳区建国路88号3单元501室")
    assert masked == "北京市朝阳区…"
    assert mask_value(PERSON.fields["address"], "北京市朝阳区建国路") == "北京市朝阳区…"


def test_prefix_of_a_short_value_shows_at_most_half() -> None:
    assert mask_value(spec("prefix:6"), "朝阳区") == "朝…"
    assert mask_value(spec("prefix:6"), "朝阳区建国路") == "朝阳区…"


def test_keep_of_a_short_value_shows_at_most_half() -> None:
    assert mask_value(spec("keep:2:2"), "SF12") == "SF**"
    assert mask_value(spec("keep:2:2"), "SF1") == "S**"
    assert mask_value(spec("keep:1:0"), "张") == "*"


def test_unmasked_fields_show_the_value() -> None:
    assert mask_value(CASE.fields["case_no"], "AJ-2021-0042") == "AJ-2021-0042"


def test_person_links_render_as_role_and_reference() -> None:
    links = (("310101198501011234", "victim"), ("440305199207150461", "suspect"))
    assert (
        mask_value(CASE.fields["persons"], links)
        == "victim:310101198501011234;suspect:440305199207150461"
    )


masks = st.one_of(
    st.just("hidden"),
    st.just("year"),
    st.builds(lambda a, b: f"keep:{a}:{b}", st.integers(0, 8), st.integers(0, 8)),
    st.builds(lambda n: f"prefix:{n}", st.integers(0, 12)),
)
values = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="*…"), min_size=1, max_size=40),
    st.dates().map(lambda d: d.isoformat()),
)


@given(masks, values)
def test_a_mask_never_shows_the_whole_value(mask: str, value: str) -> None:
    masked = mask_value(spec(mask), value)
    assert masked != value
    if mask.startswith("keep:"):
        shown = sum(1 for c in masked if c != "*")
        assert len(masked) == len(value)
        assert shown < len(value)
    if mask.startswith("prefix:"):
        assert masked.endswith("…")
        assert len(masked) - 1 < len(value)


@given(st.integers(0, 8), st.integers(0, 8), values)
def test_keep_shows_no_more_than_half_of_a_short_value(a: int, b: int, value: str) -> None:
    if len(value) > a + b:
        return
    masked = mask_value(spec(f"keep:{a}:{b}"), value)
    assert sum(1 for c in masked if c != "*") <= len(value) // 2


@pytest.mark.parametrize("length", [7, 8, 40, 200])
def test_prefix_mask_length_does_not_depend_on_the_values_length(length: int) -> None:
    assert len(mask_value(spec("prefix:6"), "x" * length)) == 7
