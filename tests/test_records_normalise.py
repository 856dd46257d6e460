"""Canonical forms: what each field kind accepts, what it stores, and what it refuses.

All people, numbers and addresses here are made up.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from custodes.records import idnumber, normalise
from custodes.records.normalise import is_han, name_key, name_pinyin

FULL_WIDTH = str.maketrans(
    "0123456789XABCDEFGHIJKLMNOPQRSTUVWYZ-+()",
    "０１２３４５６７８９ＸＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＹＺ－＋（）",
)


def make_id(region: str = "110105", born: str = "19850101", seq: str = "123") -> str:
    first17 = region + born + seq
    return first17 + idnumber.check_char(first17)


def wrong_check(number: str) -> str:
    bad = "0" if number[17] != "0" else "1"
    return number[:17] + bad


@st.composite
def national_ids(draw: st.DrawFn) -> str:
    region = draw(st.sampled_from(sorted(idnumber.PROVINCE_CODES))) + draw(
        st.from_regex(r"[0-9]{4}", fullmatch=True)
    )
    born = draw(st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31)))
    seq = draw(st.from_regex(r"[0-9]{3}", fullmatch=True))
    return make_id(region, born.strftime("%Y%m%d"), seq)


phones = st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True)
iso_dates = st.dates(min_value=dt.date(1800, 1, 1), max_value=dt.date(2200, 12, 31)).map(
    dt.date.isoformat
)


def idempotent(canon: Callable[[str], str], raw: str) -> None:
    """If raw is accepted, its canonical form is accepted and maps to itself."""
    try:
        once = canon(raw)
    except ValueError:
        return
    assert canon(once) == once


# --- national ID -------------------------------------------------------------------


def test_national_id_is_upper_cased_and_stripped_of_spaces() -> None:
    number = make_id(seq="008")
    assert number.endswith("X")  # this synthetic ID was chosen for its X check character
    spaced = f" {number[:6]} {number[6:14]} {number[14:].lower()} "
    assert normalise.national_id(spaced) == number


@given(national_ids())
def test_canonical_national_id_maps_to_itself(number: str) -> None:
    assert normalise.national_id(number) == number


@given(national_ids(), st.booleans())
def test_full_width_national_id_canonicalises_to_the_ascii_form(number: str, space: bool) -> None:
    variant = number.translate(FULL_WIDTH)
    if space:
        variant = variant[:6] + "\u3000" + variant[6:]
    assert normalise.national_id(variant) == number


@given(national_ids())
def test_national_id_with_a_wrong_check_digit_is_refused(number: str) -> None:
    with pytest.raises(ValueError, match="check digit") as exc:
        normalise.national_id(wrong_check(number))
    assert wrong_check(number) not in str(exc.value)


@pytest.mark.parametrize(
    "raw",
    [
        "11010519850101123",  # 17 characters
        "1101051985010112345",  # 19 characters
        "11010519850A011234",  # letter inside
        "990105198501011234",  # no such province
        "110105198502301234",  # 30 February
        "110105187001011234",  # before 1880
    ],
)
def test_malformed_national_ids_are_refused_without_echoing_them(raw: str) -> None:
    with pytest.raises(ValueError) as exc:
        normalise.national_id(raw)
    assert raw not in str(exc.value)


# --- phone -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "13812345678",
        "138-1234-5678",
        "138 1234 5678",
        "138.1234.5678",
        "(138) 1234-5678",
        "+86 138 1234 5678",
        "+8613812345678",
        "0086 13812345678",
        "8613812345678",
        "１３８１２３４５６７８",
        "＋８６ １３８ １２３４ ５６７８",
    ],
)
def test_phone_separators_and_country_code_are_removed(raw: str) -> None:
    assert normalise.phone(raw) == "13812345678"


@given(phones)
def test_canonical_phone_maps_to_itself(number: str) -> None:
    assert normalise.phone(number) == number


@given(phones)
def test_full_width_phone_canonicalises_to_the_ascii_form(number: str) -> None:
    assert normalise.phone(number.translate(FULL_WIDTH)) == number


@pytest.mark.parametrize(
    "raw",
    [
        "12812345678",  # second digit 2: not a mobile number
        "1381234567",  # 10 digits
        "138123456789",  # 12 digits
        "+8512812345678",  # another country
        "23812345678",  # does not start with 1
        "138-ABCD-5678",
        "",
    ],
)
def test_non_mobile_numbers_are_refused_without_echoing_them(raw: str) -> None:
    with pytest.raises(ValueError) as exc:
        normalise.phone(raw)
    if raw:
        assert raw not in str(exc.value)


# --- date --------------------------------------------------------------------------


@given(iso_dates)
def test_canonical_date_maps_to_itself(value: str) -> None:
    assert normalise.date(value) == value


def test_full_width_date_is_accepted() -> None:
    assert normalise.date(" ２０２４－０２－２９ ") == "2024-02-29"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("2023-02-30", "calendar date"),
        ("2023-13-01", "calendar date"),
        ("1799-12-31", "1800 and 2200"),
        ("2201-01-01", "1800 and 2200"),
        ("2023/01/05", "YYYY-MM-DD"),
        ("20230105", "YYYY-MM-DD"),
        ("2023-1-5", "YYYY-MM-DD"),
        ("2023-01-05T00:00", "YYYY-MM-DD"),
        ("2023-W01-1", "YYYY-MM-DD"),
        ("5 January 2023", "YYYY-MM-DD"),
    ],
)
def test_dates_that_are_not_strict_iso_calendar_dates_are_refused(raw: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as exc:
        normalise.date(raw)
    assert raw not in str(exc.value)


# --- name --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("张 三", "张三"),
        ("  张　三  ", "张三"),
        ("阿依古丽•买买提", "阿依古丽·买买提"),
        ("阿依古丽 · 买买提", "阿依古丽·买买提"),
        ("阿依古丽・买买提", "阿依古丽·买买提"),
        ("  Wei   Zhang ", "Wei Zhang"),
        ("Ｗｅｉ Ｚｈａｎｇ", "Wei Zhang"),
        ("Siobhan O’Dwyer", "Siobhan O'Dwyer"),
        ("Anna-Lena Brandt", "Anna-Lena Brandt"),
        ("Ольга Смирнова", "Ольга Смирнова"),
        ("张 Wei", "张 Wei"),
    ],
)
def test_names_are_put_in_canonical_form(raw: str, canonical: str) -> None:
    assert normalise.name(raw) == canonical


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("张三3", "digits"),
        ("Agent 007", "digits"),
        ("张三@", "not allowed"),
        ("张\x00三", "not allowed"),
        ("·张三", "separator"),
        ("张三-", "separator"),
        ("' -", "letter"),
        ("   ", "empty"),
        ("张" * 65, "at most 64"),
    ],
)
def test_names_with_digits_symbols_or_bad_length_are_refused(raw: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as exc:
        normalise.name(raw)
    assert raw.strip() not in str(exc.value) or not raw.strip()


def test_name_length_follows_the_fields_max_length() -> None:
    assert normalise.name("张" * 70, max_length=80) == "张" * 70
    with pytest.raises(ValueError, match="at most 3"):
        normalise.name("欧阳修文", max_length=3)


def test_names_may_carry_combining_marks_on_their_letters() -> None:
    # Devanagari vowel signs are combining marks (category Mc), not letters.
    assert normalise.name("अनीता") == "अनीता"


@given(st.text(alphabet="张王李阿依古丽买提AbcÜé ·•'-　3", max_size=12))
def test_canonical_name_maps_to_itself(raw: str) -> None:
    idempotent(normalise.name, raw)


# --- text, narrative, case number, enum -------------------------------------------


def test_text_is_nfkc_and_whitespace_is_collapsed() -> None:
    assert normalise.text("  北京市\t朝阳区\n 建国路８８号 ") == "北京市 朝阳区 建国路88号"


@pytest.mark.parametrize(
    "raw", ["幸福路\x00一号", "幸福路\x1b一号", "幸福路\u202e一号", "幸福\x85路"]
)
def test_text_with_control_characters_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="control character") as exc:
        normalise.text(raw)
    assert raw not in str(exc.value)


def test_text_length_is_200_unless_the_field_says_otherwise() -> None:
    assert normalise.text("x" * 200) == "x" * 200
    with pytest.raises(ValueError, match="at most 200"):
        normalise.text("x" * 201)
    assert normalise.text("x" * 300, max_length=300) == "x" * 300


@given(st.text(max_size=40))
def test_canonical_text_maps_to_itself(raw: str) -> None:
    idempotent(normalise.text, raw)


def test_narrative_keeps_its_layout_but_not_trailing_spaces_or_crlf() -> None:
    raw = "第一行  \r\n\t缩进的第二行\r第三行 ＡＢＣ\n\n"
    assert normalise.narrative(raw) == "第一行\n\t缩进的第二行\n第三行 ＡＢＣ"


def test_narrative_is_composed_not_compatibility_folded() -> None:
    assert normalise.narrative("Cafe\u0301 ①") == "Café ①"


@pytest.mark.parametrize("raw", ["line\x00one", "bell\x07", "vertical\x0btab", "over\u202eride"])
def test_narrative_with_control_characters_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        normalise.narrative(raw)


def test_narrative_length_is_limited() -> None:
    assert len(normalise.narrative("x" * 20_000)) == 20_000
    with pytest.raises(ValueError, match="at most 20000"):
        normalise.narrative("x" * 20_001)
    with pytest.raises(ValueError, match="at most 10"):
        normalise.narrative("x" * 11, max_length=10)


@given(st.text(max_size=60))
def test_canonical_narrative_maps_to_itself(raw: str) -> None:
    idempotent(normalise.narrative, raw)


def test_case_number_is_upper_cased() -> None:
    assert normalise.case_no(" ａｊ-2023-０００７ ") == "AJ-2023-0007"


@pytest.mark.parametrize("raw", ["AJ1", "AJ 2023 0001", "AJ/2023/0001", "A" * 33, "案件-2023"])
def test_malformed_case_numbers_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match="4 to 32") as exc:
        normalise.case_no(raw)
    assert raw not in str(exc.value)


@given(st.text(max_size=40))
def test_canonical_case_number_maps_to_itself(raw: str) -> None:
    idempotent(normalise.case_no, raw)


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("male", "male"),
        (" Female ", "female"),
        ("ＭＡＬＥ", "male"),
        ("男", "male"),
        ("女", "female"),
    ],
)
def test_enum_accepts_any_case_and_chinese_labels(raw: str, canonical: str) -> None:
    assert normalise.enum(raw, ("male", "female")) == canonical


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("未婚", "single"),
        ("已婚", "married"),
        ("离异", "divorced"),
        ("离婚", "divorced"),
        ("丧偶", "widowed"),
    ],
)
def test_marital_status_chinese_labels(raw: str, canonical: str) -> None:
    assert normalise.enum(raw, ("single", "married", "divorced", "widowed")) == canonical


def test_enum_label_counts_only_when_its_value_is_allowed() -> None:
    with pytest.raises(ValueError, match="one of: female, male"):
        normalise.enum("已婚", ("male", "female"))


def test_enum_refusal_lists_the_values_but_not_the_input() -> None:
    with pytest.raises(ValueError) as exc:
        normalise.enum("unspecifiedx", ("male", "female"))
    assert "unspecifiedx" not in str(exc.value)


# --- name keys --------------------------------------------------------------------


def test_name_key_ignores_case_and_separators() -> None:
    assert name_key("Anna-Lena O'Neil") == name_key("anna lena oneil") == "annalenaoneil"
    assert name_key("阿依古丽·买买提") == "阿依古丽买买提"


@pytest.mark.parametrize("spelling", ["张伟", "Zhang Wei", "zhangwei", "ZHANG-WEI", "Zhāng Wěi"])
def test_han_and_latin_spellings_share_one_pinyin_key(spelling: str) -> None:
    assert name_pinyin(spelling) == "zhangwei"


def test_pinyin_writes_u_umlaut_as_v() -> None:
    assert name_pinyin("吕丽") == name_pinyin("Lü Li") == "lvli"


def test_pinyin_of_a_name_with_a_middle_dot_has_no_separators() -> None:
    assert name_pinyin("阿依古丽·买买提") == "ayigulimaimaiti"


def test_pinyin_is_cached_for_repeated_ingest_lookups() -> None:
    assert name_pinyin.cache_info().maxsize == 1 << 16
    name_pinyin("欧阳修文")
    before = name_pinyin.cache_info().hits
    name_pinyin("欧阳修文")
    assert name_pinyin.cache_info().hits == before + 1


def test_is_han_tells_han_from_latin_names() -> None:
    assert is_han("张伟")
    assert is_han("𠮷田")  # an extension B character
    assert not is_han("Zhang Wei")
    assert not is_han("Ольга")


def test_a_first_generation_15_digit_number_is_the_18_character_one_it_became() -> None:
    from custodes.records.idnumber import check_char
    from custodes.records.normalise import Refusal, national_id

    # 310104 (a Shanghai county), born 1985-03-12, sequence 123: the old card's number.
    old = "310104850312123"
    body = "310104" + "19" + "850312123"
    assert national_id(old) == body + check_char(body)
    assert national_id(" 310104 850312 123 ") == body + check_char(body)
    with pytest.raises(Refusal, match="calendar date"):
        national_id("310104851312123")  # month 13
