"""Names as a clerk types them: pinyin given name first ("Na Li") or family name first
("Li Na", "li na") finds 李娜 with her birth date, as one logged search; a rare character
is found when typed as itself, and a search that finds nobody by name says what to try.

The stored tokens are made family name first and never change: only the query side
tries both orders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pypinyin import lazy_pinyin

from custodes.policy import Role
from custodes.records import query_orders, query_parts
from custodes.records.idnumber import check_char
from custodes.schema import load_schema
from custodes.vault import Session, Vault
from tests.conftest import PURPOSE, login, write_jsonl
from tests.test_cli_client import (  # noqa: F401 - served is a fixture, used by name
    Served,
    run,
    served,
)

SEARCH = "record:index:search"


def national_id(region: str, born: str, serial: str) -> str:
    body = region + born.replace("-", "") + serial
    return body + check_char(body)


LI_NA: dict[str, object] = {
    "type": "person",
    "name": "李娜",
    "national_id": national_id("310101", "1985-03-12", "123"),
    "birth_date": "1985-03-12",
}
# Another 李娜, born another day: a name search needs the birth date to tell them apart.
OTHER_LI_NA: dict[str, object] = {
    **LI_NA,
    "national_id": national_id("310101", "1990-07-01", "456"),
}
OTHER_LI_NA["birth_date"] = "1990-07-01"
RARE: list[dict[str, object]] = [
    {  # 𠮷 (U+20BB7): a variant of 吉 that no pinyin table reads
        "type": "person",
        "name": "王𠮷",
        "national_id": national_id("310104", "1979-11-02", "271"),
        "birth_date": "1979-11-02",
    },
    {  # 𪚥 (U+2A6A5), read zhé
        "type": "person",
        "name": "李𪚥",
        "national_id": national_id("310104", "2001-05-20", "314"),
        "birth_date": "2001-05-20",
    },
]


@pytest.fixture
def loaded(vault: Vault, tmp_path: Path) -> Vault:
    source = write_jsonl(tmp_path / "people.jsonl", [LI_NA, OTHER_LI_NA, *RARE])
    report = vault.ingest(vault.operator, source)
    assert report.rejected == 0 and report.accepted == 4
    return vault


def by_name(vault: Vault, session: Session, name: str, born: str) -> set[str]:
    found = vault.search(
        session,
        PURPOSE,
        record_type="person",
        index="name_birth",
        values={"name": name, "birth_date": born},
    )
    return {v.fields["national_id"] for v in found}


def searches_logged(vault: Vault) -> int:
    return sum(e.action == SEARCH for _, e in vault._log.entries())


@pytest.mark.parametrize("typed", ["Na Li", "Li Na", "li na", "NA  LI", "na li", "李娜", "李 娜"])
def test_a_clerk_typing_the_given_name_first_in_pinyin_finds_the_person(
    loaded: Vault, typed: str
) -> None:
    session = login(loaded, Role.OFFICER, district="3101")
    before = searches_logged(loaded)
    found = by_name(loaded, session, typed, "1985-03-12")
    assert found == {"3101**********" + str(LI_NA["national_id"])[-4:]}
    # Both orders are tried inside one search: one entry on the log, one charge.
    assert searches_logged(loaded) == before + 1


def test_both_orders_find_nobody_of_another_birth_date_or_another_name(loaded: Vault) -> None:
    session = login(loaded)
    assert by_name(loaded, session, "Na Li", "1970-01-01") == set()
    assert by_name(loaded, session, "Na Wang", "1985-03-12") == set()
    assert len(by_name(loaded, session, "Na Li", "1990-07-01")) == 1


def test_query_orders_add_the_turned_name_only_for_pinyin_of_two_or_more_words() -> None:
    person = load_schema().types["person"]
    pinyin = person.indexes["name_pinyin_birth"]
    han = person.indexes["name_birth"]
    born = {"birth_date": "1985-03-12"}
    assert query_orders(person, pinyin, {"name": "Na Li", **born}) == [
        ("nali", "1985-03-12"),
        ("lina", "1985-03-12"),
    ]
    assert query_orders(person, pinyin, {"name": "Xiao Ming Wang", **born})[1] == (
        "wangxiaoming",
        "1985-03-12",
    )
    # One word, a palindrome of words, or Han characters: only the name as typed.
    for name in ("Lina", "Na Na"):
        assert query_orders(person, pinyin, {"name": name, **born}) == [
            query_parts(person, pinyin, {"name": name, **born})
        ]
    assert len(query_orders(person, han, {"name": "李娜", **born})) == 1


def test_a_name_with_a_rare_character_is_found_when_typed_as_itself(loaded: Vault) -> None:
    session = login(loaded)
    assert len(by_name(loaded, session, "王𠮷", "1979-11-02")) == 1
    assert len(by_name(loaded, session, "李𪚥", "2001-05-20")) == 1
    # A rare character with a known reading is found in pinyin too, in either order.
    assert len(by_name(loaded, session, "Li Zhe", "2001-05-20")) == 1
    assert len(by_name(loaded, session, "Zhe Li", "2001-05-20")) == 1
    # Its common form is another character, and 𠮷 has no reading to find in pinyin:
    # both find nobody, which the command line's hint says (below).
    assert by_name(loaded, session, "王吉", "1979-11-02") == set()
    assert by_name(loaded, session, "Wang Ji", "1979-11-02") == set()


def test_a_name_search_that_finds_nobody_says_what_a_clerk_can_try(
    served: Served,  # noqa: F811
) -> None:
    official = served.official("wang.clerk")
    served.login(official)
    person = served.people[0]
    asked = ["--purpose", "a caller at the counter", "--case", "T-1"]
    family, *given = lazy_pinyin(str(person["name"]))
    turned = f"{''.join(given)} {family}".title()
    found = run(
        "search", "--name", turned, "--birth-date", person["birth_date"], *asked, env=official
    )
    assert found.returncode == 0 and "no match" not in found.stdout, found.stderr
    nobody = run("search", "--name", "王吉", "--birth-date", "1979-11-02", *asked, env=official)
    assert nobody.returncode == 0, nobody.stderr
    assert nobody.stdout.startswith("no match") and "𠮷, not 吉" in " ".join(nobody.stdout.split())
