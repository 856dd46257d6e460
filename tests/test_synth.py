"""The synthetic population: deterministic, streamed, valid, and internally consistent."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import re
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custodes.records import RecordValidator
from custodes.records.idnumber import (
    PROVINCE_CODES,
    birth_date_of,
    check_char,
    problem_with,
    sex_of,
)
from custodes.schema import load_schema
from custodes.synth import PROVINCES, REFERENCE_DATE, generate, write_jsonl

COUNT = 3000
ROLES = {"suspect", "victim", "reporter", "witness"}


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return list(generate(COUNT, seed=11))


@pytest.fixture(scope="module")
def people(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["national_id"]: r for r in records if r["type"] == "person"}


def jsonl(count: int, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    lines = write_jsonl(out, count, **kwargs)
    data = out.getvalue()
    assert data.count(b"\n") == lines
    return data


def age_on(born: dt.date, day: dt.date) -> int:
    return day.year - born.year - ((day.month, day.day) < (born.month, born.day))


def check_references(stream: list[dict[str, Any]]) -> None:
    """Every case and delivery names only people already emitted, none twice per case."""
    seen: dict[str, dict[str, Any]] = {}
    for record in stream:
        if record["type"] == "person":
            seen[record["national_id"]] = record
        elif record["type"] == "case":
            ids = [link["national_id"] for link in record["persons"]]
            assert 1 <= len(ids) <= 4
            assert len(set(ids)) == len(ids)
            assert all(i in seen for i in ids)
            assert {link["role"] for link in record["persons"]} <= ROLES
        else:
            assert record["type"] == "delivery"
            assert record["recipient"] in seen
            assert record["recipient_name"] == seen[record["recipient"]]["name"]


def test_the_same_seed_gives_the_same_bytes() -> None:
    assert jsonl(2000, seed=5) == jsonl(2000, seed=5)


def test_a_different_seed_gives_different_people() -> None:
    a, b = jsonl(200, seed=5), jsonl(200, seed=6)
    assert a != b
    ids_a = {orjson.loads(line).get("national_id") for line in a.splitlines()}
    ids_b = {orjson.loads(line).get("national_id") for line in b.splitlines()}
    assert len(ids_a & ids_b - {None}) < 5


def test_zero_rates_give_only_people() -> None:
    plain = list(generate(1000, seed=2, cases_per_person=0, deliveries_per_person=0))
    assert {r["type"] for r in plain} == {"person"}
    assert len(plain) == 1000


def test_write_jsonl_writes_what_generate_yields(records: list[dict[str, Any]]) -> None:
    data = jsonl(COUNT, seed=11)
    assert data == b"".join(orjson.dumps(r) + b"\n" for r in records)


def test_output_is_utf8_with_chinese_kept_unescaped() -> None:
    data = jsonl(50, seed=1)
    text = data.decode("utf-8")
    assert "\\u" not in text
    assert re.search("[\u4e00-\u9fff]", text)


def test_every_record_validates_against_the_population_schema(
    records: list[dict[str, Any]],
) -> None:
    validator = RecordValidator(load_schema())
    for line, record in enumerate(records, start=1):
        validator.validate(record, line=line)


def test_national_id_encodes_birth_date_and_gender(people: dict[str, dict[str, Any]]) -> None:
    for number, person in people.items():
        assert problem_with(number) is None
        assert number[17] == check_char(number[:17])
        assert birth_date_of(number).isoformat() == person["birth_date"]
        assert sex_of(number) == person["gender"]
        assert number[:2] in PROVINCE_CODES
        assert not number.endswith("00", 0, 6)  # a county, not a province or prefecture


def test_birth_place_is_the_province_of_the_id_region(people: dict[str, dict[str, Any]]) -> None:
    with_place = [p for p in people.values() if "birth_place" in p]
    assert len(with_place) > 0.95 * len(people)
    for person in with_place:
        assert person["birth_place"].startswith(PROVINCES[person["national_id"][:2]])
        assert len(person["birth_place"]) > len(PROVINCES[person["national_id"][:2]])


def test_provinces_table_names_every_province_code() -> None:
    assert set(PROVINCES) == PROVINCE_CODES
    assert len(set(PROVINCES.values())) == 34


def test_ages_are_between_0_and_95_at_the_reference_date(
    people: dict[str, dict[str, Any]],
) -> None:
    ages = [age_on(dt.date.fromisoformat(p["birth_date"]), REFERENCE_DATE) for p in people.values()]
    assert min(ages) >= 0
    assert max(ages) <= 95
    assert min(ages) < 5 and max(ages) > 75  # the whole pyramid, not a band of it


def test_minors_are_single_and_marital_status_fits_the_age(
    people: dict[str, dict[str, Any]],
) -> None:
    for person in people.values():
        age = age_on(dt.date.fromisoformat(person["birth_date"]), REFERENCE_DATE)
        status = person.get("marital_status")
        if age < 20:
            assert status in (None, "single")
        assert status in (None, "single", "married", "divorced", "widowed")
    statuses = Counter(p.get("marital_status") for p in people.values())
    assert statuses["married"] > statuses["divorced"] > 0
    assert statuses["widowed"] > 0


def test_names_are_a_surname_and_one_or_two_given_characters(
    people: dict[str, dict[str, Any]],
) -> None:
    for person in people.values():
        assert re.fullmatch("[\u4e00-\u9fff]{2,4}", person["name"])


def test_phones_are_mainland_mobile_numbers_and_sometimes_absent(
    people: dict[str, dict[str, Any]],
) -> None:
    from faker.providers.phone_number.zh_CN import Provider

    prefixes = {str(p) for p in Provider.phonenumber_prefixes}
    phones = [p["phone"] for p in people.values() if "phone" in p]
    assert 0.7 * len(people) < len(phones) < len(people)
    for phone in phones:
        assert re.fullmatch(r"1\d{10}", phone)
        assert phone[:3] in prefixes


def test_optional_fields_are_sometimes_missing(people: dict[str, dict[str, Any]]) -> None:
    for field in ("birth_place", "ethnicity", "education", "marital_status", "address"):
        missing = sum(field not in p for p in people.values())
        assert 0 < missing < 0.06 * len(people), field


def test_ethnicity_is_mostly_han_with_minorities(people: dict[str, dict[str, Any]]) -> None:
    shares = Counter(p["ethnicity"] for p in people.values() if "ethnicity" in p)
    han = shares["汉族"] / sum(shares.values())
    assert 0.85 < han < 0.97
    assert len(shares) > 5


def test_genders_are_roughly_balanced(people: dict[str, dict[str, Any]]) -> None:
    male = sum(p["gender"] == "male" for p in people.values()) / len(people)
    assert 0.46 < male < 0.56


def test_addresses_run_from_province_to_house_number(people: dict[str, dict[str, Any]]) -> None:
    provinces = tuple(PROVINCES.values())
    for person in people.values():
        if "address" in person:
            assert person["address"].startswith(provinces)
            assert re.search(r"\d+号", person["address"])


def test_references_point_to_people_emitted_earlier(records: list[dict[str, Any]]) -> None:
    check_references(records)


def test_case_narratives_name_every_linked_person(
    records: list[dict[str, Any]], people: dict[str, dict[str, Any]]
) -> None:
    cases = [r for r in records if r["type"] == "case"]
    with_narrative = [c for c in cases if "narrative" in c]
    assert len(with_narrative) > 0.9 * len(cases)
    for case in with_narrative:
        for link in case["persons"]:
            assert people[link["national_id"]]["name"] in case["narrative"]
        assert case["narrative"].count("。") <= 3
        assert re.search(r"\d{4}年\d{1,2}月\d{1,2}日", case["narrative"])


def test_people_are_born_before_the_events_that_name_them(
    records: list[dict[str, Any]], people: dict[str, dict[str, Any]]
) -> None:
    for record in records:
        if record["type"] == "case":
            opened = dt.date.fromisoformat(record["opened_on"])
            assert opened <= REFERENCE_DATE
            for link in record["persons"]:
                born = dt.date.fromisoformat(people[link["national_id"]]["birth_date"])
                assert born < opened
                if link["role"] == "suspect":
                    assert age_on(born, opened) >= 14
        elif record["type"] == "delivery" and "delivered_on" in record:
            born = dt.date.fromisoformat(people[record["recipient"]]["birth_date"])
            assert born < dt.date.fromisoformat(record["delivered_on"]) <= REFERENCE_DATE


def test_national_ids_case_numbers_and_waybills_are_unique() -> None:
    stream = list(generate(6000, seed=3, cases_per_person=1.0, deliveries_per_person=1.0))
    for kind, key in (("person", "national_id"), ("case", "case_no"), ("delivery", "waybill_no")):
        keys = [r[key] for r in stream if r["type"] == kind]
        assert len(keys) == len(set(keys)), kind
    for record in stream:
        if record["type"] == "case":
            assert re.fullmatch(r"A\d{6}\d{4}\d{6}", record["case_no"])
        elif record["type"] == "delivery":
            assert re.fullmatch(r"[A-Z]{2}\d{12}", record["waybill_no"])


def test_ids_stay_unique_when_everyone_shares_few_birthdays() -> None:
    # Many people per (birth date, gender) is where collisions would show first.
    stream = generate(20_000, seed=9, cases_per_person=0, deliveries_per_person=0)
    by_day = Counter((r["birth_date"], r["gender"]) for r in stream)
    assert max(by_day.values()) > 1
    stream = generate(20_000, seed=9, cases_per_person=0, deliveries_per_person=0)
    ids = [r["national_id"] for r in stream]
    assert len(set(ids)) == len(ids)


def test_generate_is_lazy() -> None:
    start = time.perf_counter()
    first = list(itertools.islice(generate(10**9, seed=1), 10))
    assert len(first) == 10
    assert time.perf_counter() - start < 10  # a billion eager people would take hours


def test_counts_follow_the_rates() -> None:
    kinds = Counter(
        r["type"] for r in generate(5000, seed=4, cases_per_person=0.2, deliveries_per_person=0.5)
    )
    assert kinds["person"] == 5000
    assert abs(kinds["case"] - 1000) <= 1
    assert abs(kinds["delivery"] - 2500) <= 1


def test_fractional_rates_accumulate_across_chunks() -> None:
    kinds = Counter(r["type"] for r in generate(4500, seed=4, cases_per_person=0.0015))
    assert abs(kinds["case"] - 7) <= 1


def test_a_population_of_one_child_still_gets_valid_cases() -> None:
    # Roles that need an adult cannot be filled; cases fall back to a child victim.
    validator = RecordValidator(load_schema())
    children = 0
    for seed in range(40):
        stream = list(generate(1, seed=seed, cases_per_person=3, deliveries_per_person=2))
        born = dt.date.fromisoformat(stream[0]["birth_date"])
        children += age_on(born, REFERENCE_DATE) < 14
        assert sum(r["type"] == "case" for r in stream) == 3
        check_references(stream)
        for line, record in enumerate(stream, start=1):
            validator.validate(record, line=line)
    assert children > 0


def test_zero_people_write_nothing() -> None:
    assert jsonl(0, seed=1) == b""


@pytest.mark.parametrize(
    ("count", "rate"),
    [(-1, 0.2), (1.5, 0.2), (True, 0.2), (10, -0.1), (10, float("nan")), (10, float("inf"))],
)
def test_invalid_arguments_are_refused_at_once(count: Any, rate: float) -> None:
    with pytest.raises(ValueError):
        generate(count, seed=1, cases_per_person=rate)
    with pytest.raises(ValueError):
        write_jsonl(io.BytesIO(), count, seed=1, deliveries_per_person=rate)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=-(2**64), max_value=2**64),
    count=st.integers(min_value=0, max_value=40),
    cases=st.floats(min_value=0, max_value=3),
    deliveries=st.floats(min_value=0, max_value=3),
)
def test_any_small_population_is_valid_and_consistent(
    seed: int, count: int, cases: float, deliveries: float
) -> None:
    # Tiny populations exercise the paths where few people can fill a case's roles.
    stream = list(
        generate(count, seed=seed, cases_per_person=cases, deliveries_per_person=deliveries)
    )
    assert sum(r["type"] == "person" for r in stream) == count
    check_references(stream)
    validator = RecordValidator(load_schema())
    for line, record in enumerate(stream, start=1):
        validator.validate(record, line=line)
