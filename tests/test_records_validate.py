"""Record validation against the population schema, and the blind-index inputs it feeds.

Every refusal must name the line and field and never the value. All people here are
made up.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from custodes.errors import InvalidQuery, InvalidRecord
from custodes.records import (
    CanonicalRecord,
    RecordValidator,
    canonical_query,
    idnumber,
    index_parts,
    query_parts,
)
from custodes.schema import Schema, load_schema

SCHEMA = load_schema()
PERSON = SCHEMA.record_type("person")
CASE = SCHEMA.record_type("case")
DELIVERY = SCHEMA.record_type("delivery")
FULL_WIDTH = str.maketrans("0123456789X-", "０１２３４５６７８９Ｘ－")


def make_id(region: str = "310101", born: str = "19850101", seq: str = "123") -> str:
    first17 = region + born + seq
    return first17 + idnumber.check_char(first17)


ID_A = make_id()
ID_B = make_id("440305", "19920715", "046")
ID_C = make_id("650102", "20010320", "517")


def person(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "person",
        "name": "张 晓梅",
        "national_id": ID_A,
        "phone": "+86 139-0000-1234",
        "gender": "女",
        "birth_date": "1985-01-01",
        "birth_place": "上海市  黄浦区",
        "marital_status": "Married",
        "address": "上海市黄浦区示例路１号",
    }
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not ...}


def case(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "case",
        "case_no": "aj-2021-0042",
        "opened_on": "2021-06-01",
        "category": "盗窃",
        "narrative": "报案人称\r\n自行车被盗。 ",
        "persons": [
            {"national_id": ID_B, "role": "victim"},
            {"national_id": ID_C, "role": "suspect"},
        ],
    }
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not ...}


@pytest.fixture(scope="module")
def validator() -> RecordValidator:
    return RecordValidator(SCHEMA)


def refusal(validator: RecordValidator, raw: Any, **kw: Any) -> InvalidRecord:
    with pytest.raises(InvalidRecord) as exc:
        validator.validate(raw, line=kw.pop("line", 7), **kw)
    return exc.value


# --- accepted records --------------------------------------------------------------


def test_person_record_is_put_in_canonical_form(validator: RecordValidator) -> None:
    record = validator.validate(person(), line=3)
    assert record == CanonicalRecord(
        "person",
        {
            "name": "张晓梅",
            "national_id": ID_A,
            "phone": "13900001234",
            "gender": "female",
            "birth_date": "1985-01-01",
            "birth_place": "上海市 黄浦区",
            "marital_status": "married",
            "address": "上海市黄浦区示例路1号",
        },
        3,
    )


def test_values_keep_the_schemas_field_order(validator: RecordValidator) -> None:
    record = validator.validate(person(), line=1)
    assert list(record.values) == [f for f in PERSON.fields if f in record.values]


@pytest.mark.parametrize("empty", [None, "", "   "])
def test_absent_optional_fields_are_omitted(validator: RecordValidator, empty: Any) -> None:
    record = validator.validate(person(phone=empty, address=...), line=1)
    assert "phone" not in record.values
    assert "address" not in record.values


def test_record_type_may_come_from_the_caller(validator: RecordValidator) -> None:
    raw = person(type=...)
    assert validator.validate(raw, line=1, record_type="person").record_type == "person"


def test_an_empty_type_column_falls_back_to_the_callers_default(
    validator: RecordValidator,
) -> None:
    assert validator.validate(person(type=""), line=1, record_type="person").record_type == "person"


def test_type_in_the_record_overrides_the_callers_default(validator: RecordValidator) -> None:
    assert validator.validate(case(), line=1, record_type="person").record_type == "case"


def test_case_record_links_are_canonical_and_in_input_order(validator: RecordValidator) -> None:
    record = validator.validate(case(), line=1)
    assert record.values["case_no"] == "AJ-2021-0042"
    assert record.values["narrative"] == "报案人称\n自行车被盗。"
    assert record.values["persons"] == ((ID_B, "victim"), (ID_C, "suspect"))


def test_links_may_be_written_as_a_csv_string(validator: RecordValidator) -> None:
    text = f"victim:{ID_B.translate(FULL_WIDTH)}; Suspect : {ID_C.lower()} ;"
    record = validator.validate(case(persons=text), line=1)
    assert record.values["persons"] == ((ID_B, "victim"), (ID_C, "suspect"))


def test_duplicate_links_are_dropped_but_other_roles_kept(validator: RecordValidator) -> None:
    links = [
        {"national_id": ID_B, "role": "victim"},
        {"national_id": ID_B.lower(), "role": "victim"},
        {"national_id": ID_B, "role": "reporter"},
    ]
    record = validator.validate(case(persons=links), line=1)
    assert record.values["persons"] == ((ID_B, "victim"), (ID_B, "reporter"))


@pytest.mark.parametrize("empty", [[], "", " ; "])
def test_an_empty_link_list_is_an_absent_field(validator: RecordValidator, empty: Any) -> None:
    assert "persons" not in validator.validate(case(persons=empty), line=1).values


def test_delivery_recipient_is_a_canonical_national_id(validator: RecordValidator) -> None:
    raw = {
        "type": "delivery",
        "waybill_no": "SF1234567890",
        "recipient_name": "李 雷",
        "address": "深圳市南山区示例街2号",
        "recipient": ID_B.translate(FULL_WIDTH),
    }
    assert validator.validate(raw, line=1).values["recipient"] == ID_B


@given(st.booleans(), st.booleans())
def test_full_width_input_validates_to_the_same_record(wide_id: bool, wide_phone: bool) -> None:
    validator = RecordValidator(SCHEMA)
    plain = validator.validate(person(), line=1)
    variant = person(
        national_id=ID_A.translate(FULL_WIDTH) if wide_id else ID_A,
        phone="１３９ ００００ １２３４" if wide_phone else "13900001234",
        birth_date="１９８５－０１－０１",
    )
    assert validator.validate(variant, line=1) == plain


@given(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31)))
def test_a_canonical_record_validates_to_itself(born: dt.date) -> None:
    validator = RecordValidator(SCHEMA)
    number = make_id("130102", born.strftime("%Y%m%d"), "371")
    first = validator.validate(person(national_id=number, birth_date=born.isoformat()), line=1)
    again = validator.validate(dict(first.values), line=1, record_type="person")
    assert again == first


def test_canonical_record_repr_shows_no_values(validator: RecordValidator) -> None:
    record = validator.validate(person(), line=9)
    text = repr(record)
    assert "person" in text and "line=9" in text and "national_id" in text
    for value in record.values.values():
        assert str(value) not in text


# --- refused records --------------------------------------------------------------


def test_a_key_the_schema_lacks_is_refused_without_repeating_it(
    validator: RecordValidator,
) -> None:
    # A key is input like a value: "nickname" or "Zhang_Wei" alike are placed, not named.
    for key in ("nickname", "Zhang_Wei"):
        exc = refusal(validator, person(**{key: "小梅"}))
        assert (exc.field, exc.reason, exc.line) == (None, "unknown field", 7)
        assert key not in str(exc) and "小梅" not in str(exc)


def test_a_field_of_another_record_type_is_refused_by_its_schema_name(
    validator: RecordValidator,
) -> None:
    exc = refusal(validator, person(case_no="A-1"))
    assert (exc.field, exc.reason) == ("case_no", "unknown field")


def test_unknown_key_that_could_be_a_value_is_not_echoed(validator: RecordValidator) -> None:
    raw = person()
    raw["张晓梅 13900001234"] = "x"
    exc = refusal(validator, raw)
    assert exc.field is None and exc.reason == "unknown field"
    assert "张晓梅" not in str(exc)


def test_misspelt_field_is_reported_before_the_missing_one(validator: RecordValidator) -> None:
    raw = person(national_id=...)
    raw["nationalid"] = ID_A
    exc = refusal(validator, raw)
    assert (exc.field, exc.reason) == (None, "unknown field")


@pytest.mark.parametrize("missing", ["name", "national_id"])
def test_missing_required_field_is_refused(validator: RecordValidator, missing: str) -> None:
    exc = refusal(validator, person(**{missing: ...}))
    assert (exc.field, exc.reason) == (missing, "is required")


@pytest.mark.parametrize("empty", [None, "", " \t "])
def test_empty_required_field_is_refused(validator: RecordValidator, empty: Any) -> None:
    assert refusal(validator, person(name=empty)).field == "name"


def test_required_links_cannot_be_empty() -> None:
    schema = _case_schema_with_required_links()
    v = RecordValidator(schema)
    exc = refusal(v, case(persons=[]))
    assert (exc.field, exc.reason) == ("persons", "is required")


def _case_schema_with_required_links() -> Schema:
    from dataclasses import replace

    persons = replace(CASE.fields["persons"], required=True)
    fields = {**CASE.fields, "persons": persons}
    return replace(SCHEMA, types={"case": replace(CASE, fields=fields)})


@pytest.mark.parametrize("value", [13900001234, 139.0, True, ["13900001234"], {"n": "1390"}])
def test_scalar_fields_must_be_json_strings(validator: RecordValidator, value: Any) -> None:
    exc = refusal(validator, person(phone=value))
    assert (exc.field, exc.reason) == ("phone", "must be a string")
    assert "13900001234" not in str(exc)


def test_record_without_a_type_is_refused(validator: RecordValidator) -> None:
    exc = refusal(validator, person(type=...))
    assert exc.field == "type"


def test_unknown_record_type_is_refused_without_echoing_it(validator: RecordValidator) -> None:
    exc = refusal(validator, person(type="dossier_on_zhang"))
    assert exc.field == "type" and "dossier_on_zhang" not in str(exc)


def test_a_non_object_record_is_refused(validator: RecordValidator) -> None:
    exc = refusal(validator, [ID_A])
    assert ID_A not in str(exc)


def test_invalid_check_digit_is_refused(validator: RecordValidator) -> None:
    bad = ID_A[:17] + ("0" if ID_A[17] != "0" else "1")
    exc = refusal(validator, person(national_id=bad))
    assert exc.field == "national_id" and "check digit" in exc.reason
    assert bad not in str(exc)


def test_impossible_date_is_refused(validator: RecordValidator) -> None:
    exc = refusal(validator, case(opened_on="2023-02-30"))
    assert (exc.field, exc.reason) == ("opened_on", "is not a calendar date")
    assert "2023-02-30" not in str(exc)


def test_birth_date_must_match_the_national_id(validator: RecordValidator) -> None:
    exc = refusal(validator, person(birth_date="1985-01-02"))
    assert exc.field == "birth_date"
    assert exc.reason == "birth_date does not match the date encoded in national_id"
    assert "1985-01-02" not in str(exc) and ID_A not in str(exc)


def test_the_first_problem_in_schema_order_is_reported(validator: RecordValidator) -> None:
    exc = refusal(validator, person(address="\x00", phone="12", name="9"))
    assert exc.field == "name"


def test_refusal_carries_the_input_line(validator: RecordValidator) -> None:
    exc = refusal(validator, person(phone="12"), line=4211)
    assert exc.line == 4211 and str(exc).startswith("line 4211, field 'phone': ")


@pytest.mark.parametrize(
    ("persons", "secret"),
    [
        ([{"national_id": ID_B, "role": "informant"}], ID_B),
        ([{"national_id": ID_B[:17] + "Y", "role": "victim"}], ID_B[:17]),
        ([{"national_id": ID_B}], ID_B),
        ([{"national_id": ID_B, "role": "victim", "name": "王芳"}], "王芳"),
        ([ID_B], ID_B),
        ([{"national_id": int(ID_B[:17]), "role": "victim"}], ID_B[:17]),
        (f"victim={ID_B}", ID_B),
        (f"{ID_B}:victim", ID_B),
        ({"national_id": ID_B, "role": "victim"}, ID_B),
        (42, "42"),
    ],
)
def test_malformed_links_are_refused_without_echoing_them(
    validator: RecordValidator, persons: Any, secret: str
) -> None:
    exc = refusal(validator, case(persons=persons))
    assert exc.field == "persons"
    assert secret not in str(exc)


def test_link_refusal_names_the_entry(validator: RecordValidator) -> None:
    links = [{"national_id": ID_B, "role": "victim"}, {"national_id": "1", "role": "witness"}]
    assert refusal(validator, case(persons=links)).reason.startswith("entry 2: national_id")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "张晓梅2"),
        ("national_id", "310101198501011230"),
        ("phone", "23900001234"),
        ("gender", "unspecified-gender"),
        ("birth_date", "1985-02-31"),
        ("birth_place", "上海\x07黄浦"),
        ("marital_status", "partnered-since-2019"),
        ("address", "示例路" * 80),
    ],
)
def test_no_refused_value_appears_in_the_error(
    validator: RecordValidator, field: str, value: str
) -> None:
    exc = refusal(validator, person(**{field: value}))
    assert exc.field == field
    for text in (str(exc), repr(exc), exc.reason):
        assert value not in text


# --- search values and index inputs ------------------------------------------------


def test_search_value_is_canonicalised_like_stored_values() -> None:
    assert canonical_query(PERSON.fields["phone"], "+86 139 0000 1234") == "13900001234"
    assert canonical_query(CASE.fields["persons"], ID_B.lower()) == ID_B


@pytest.mark.parametrize("raw", ["13900001", "", "  "])
def test_bad_search_value_names_the_field_not_the_value(raw: str) -> None:
    with pytest.raises(InvalidQuery) as exc:
        canonical_query(PERSON.fields["phone"], raw)
    assert "'phone'" in str(exc.value)
    if raw.strip():
        assert raw not in str(exc.value)


def test_person_index_inputs(validator: RecordValidator) -> None:
    values = validator.validate(person(name="Anna-Lena  Wu", birth_date=...), line=1).values
    assert index_parts(PERSON, PERSON.index("national_id"), values) == [(ID_A,)]
    assert index_parts(PERSON, PERSON.index("phone"), values) == [("13900001234",)]
    # No birth date: the compound indexes have nothing to hold.
    assert index_parts(PERSON, PERSON.index("name_birth"), values) == []
    values = {**values, "birth_date": "1985-01-01"}
    assert index_parts(PERSON, PERSON.index("name_birth"), values) == [("annalenawu", "1985-01-01")]
    assert index_parts(PERSON, PERSON.index("name_pinyin_birth"), values) == [
        ("annalenawu", "1985-01-01")
    ]


def test_multi_valued_index_gives_one_input_per_linked_person(validator: RecordValidator) -> None:
    links = f"victim:{ID_B};reporter:{ID_B};suspect:{ID_C}"
    values = validator.validate(case(persons=links), line=1).values
    assert index_parts(CASE, CASE.index("linked_person"), values) == [(ID_B,), (ID_C,)]


def test_reference_index_gives_the_referenced_national_id() -> None:
    values = {"recipient": ID_C}
    assert index_parts(DELIVERY, DELIVERY.index("linked_person"), values) == [(ID_C,)]


def test_search_finds_the_inputs_ingest_wrote(validator: RecordValidator) -> None:
    stored = validator.validate(person(), line=1).values
    for index_name, query in [
        ("national_id", {"national_id": ID_A.lower()}),
        ("phone", {"phone": "139-0000-1234"}),
        ("name_birth", {"name": "张 晓 梅", "birth_date": "1985-01-01"}),
        ("name_pinyin_birth", {"name": "Zhang Xiaomei", "birth_date": "1985-01-01"}),
        ("name_pinyin_birth", {"name": "张晓梅", "birth_date": "1985-01-01"}),
    ]:
        index = PERSON.index(index_name)
        assert query_parts(PERSON, index, query) in index_parts(PERSON, index, stored)


def test_search_for_a_linked_person_uses_their_national_id(validator: RecordValidator) -> None:
    stored = validator.validate(case(), line=1).values
    index = CASE.index("linked_person")
    assert query_parts(CASE, index, {"persons": ID_C}) in index_parts(CASE, index, stored)


def test_search_must_give_every_component_and_nothing_else() -> None:
    index = PERSON.index("name_birth")
    with pytest.raises(InvalidQuery, match="needs a value for field 'birth_date'"):
        query_parts(PERSON, index, {"name": "张晓梅"})
    with pytest.raises(InvalidQuery, match="does not search field 'phone'"):
        query_parts(PERSON, index, {"name": "张晓梅", "birth_date": "1985-01-01", "phone": "1"})


def test_bad_search_value_in_an_index_query_is_not_echoed() -> None:
    with pytest.raises(InvalidQuery) as exc:
        query_parts(PERSON, PERSON.index("name_birth"), {"name": "张晓梅", "birth_date": "85-1-1"})
    assert "birth_date" in str(exc.value) and "85-1-1" not in str(exc.value)
    assert "张晓梅" not in str(exc.value)
