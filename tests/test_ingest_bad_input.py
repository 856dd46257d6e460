"""Bad input: each kind gets its documented error naming line and field, never the value,
and leaves the vault unchanged for what it refused.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from custodes.errors import InvalidInput
from custodes.records.idnumber import check_char
from custodes.vault import Vault
from tests.conftest import write_jsonl

BIRTH = "19880405"


def national_id(seq: int, region: str = "330106", born: str = BIRTH) -> str:
    first17 = f"{region}{born}{seq:03d}"
    return first17 + check_char(first17)


def person(seq: int, **changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "type": "person",
        "name": "欧阳明月",
        "national_id": national_id(seq),
        "phone": f"1390571{seq:04d}",
        "birth_date": "1988-04-05",
        "address": "浙江省杭州市西湖区文三路478号",
    }
    doc.update(changes)
    return doc


def rejects_of(
    vault: Vault, tmp: Path, source: Path, **options: object
) -> tuple[object, list[dict[str, object]], str]:
    report = vault.ingest(vault.operator, source, rejects_dir=tmp / "rejects", **options)
    text = report.rejects_path.read_text("utf-8") if report.rejects_path else ""
    return report, [orjson.loads(line) for line in text.splitlines()], text


def assert_no_values(text: str, *values: object) -> None:
    for value in values:
        assert str(value) not in text


def test_malformed_json_line_is_refused_by_line(vault: Vault, tmp_path: Path) -> None:
    good = orjson.dumps(person(1))
    secret_id = national_id(2)
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        good + b"\n" + b'{"type": "person", "national_id": "' + secret_id.encode() + b'"\n'
    )
    report, rejects, text = rejects_of(vault, tmp_path, source)
    assert report.accepted == 1 and report.rejected == 1
    assert rejects == [{"line": 2, "field": None, "reason": rejects[0]["reason"]}]
    assert "malformed JSON" in str(rejects[0]["reason"])
    assert_no_values(text, secret_id)


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"phone": 13905710001}, "phone", "must be a string"),
        ({"name": ["欧阳", "明月"]}, "name", "must be a string"),
        (
            {"national_id": national_id(1)[:17] + ("0" if national_id(1)[17] != "0" else "1")},
            "national_id",
            "check digit",
        ),
        ({"birth_date": "1988-02-30"}, "birth_date", ""),
        ({"birth_date": "1988-04-06"}, "birth_date", "national_id"),
        ({"phone": "12345"}, "phone", ""),
        ({"shoe_size": "42"}, None, "unknown field"),
        ({"national_id": None}, "national_id", ""),
    ],
)
def test_invalid_field_is_refused_naming_field_not_value(
    vault: Vault, tmp_path: Path, change: dict[str, object], field: str | None, reason: str
) -> None:
    bad = person(1, **change)
    source = write_jsonl(tmp_path / "in.jsonl", [person(2), bad])
    report, rejects, text = rejects_of(vault, tmp_path, source)
    assert report.accepted == 1 and report.rejected == 1
    assert rejects[0]["line"] == 2 and rejects[0]["field"] == field
    assert reason in str(rejects[0]["reason"])
    assert_no_values(
        text, *[v for v in bad.values() if isinstance(v, str) and len(v) > 3 and v != "person"]
    )
    assert vault.count() == 1


def test_strict_batch_lands_whole_or_not_at_all(vault: Vault, tmp_path: Path) -> None:
    source = write_jsonl(
        tmp_path / "in.jsonl",
        [person(i) for i in range(1, 50)] + [person(60, birth_date="1988-13-01")],
    )
    report, rejects, _ = rejects_of(vault, tmp_path, source, strict=True)
    assert report.strict_refused and report.accepted == 0
    assert vault.count() == 0
    assert rejects == [{"line": 50, "field": "birth_date", "reason": rejects[0]["reason"]}]
    fixed = write_jsonl(tmp_path / "fixed.jsonl", [person(i) for i in range(1, 50)])
    report, _, _ = rejects_of(vault, tmp_path, fixed, strict=True)
    assert report.accepted == 49 and vault.count() == 49


def test_csv_with_a_missing_column_is_refused_whole(vault: Vault, tmp_path: Path) -> None:
    source = tmp_path / "people.csv"
    source.write_text("name,phone,birth_date\n欧阳明月,13905710001,1988-04-05\n", "utf-8")
    with pytest.raises(InvalidInput) as refused:
        vault.ingest(vault.operator, source, record_type="person")
    assert "national_id" in str(refused.value) and "line 1" in str(refused.value)
    assert "欧阳明月" not in str(refused.value)
    assert vault.count() == 0


def test_csv_with_an_unknown_column_is_refused_whole(vault: Vault, tmp_path: Path) -> None:
    source = tmp_path / "people.csv"
    source.write_text(f"name,national_id,salary\n欧阳明月,{national_id(1)},9000\n", "utf-8")
    with pytest.raises(InvalidInput, match="column 3 of the CSV header") as refused:
        vault.ingest(vault.operator, source, record_type="person")
    assert "salary" not in str(refused.value)
    assert vault.count() == 0


def test_ten_megabyte_line_is_refused_and_the_rest_lands(vault: Vault, tmp_path: Path) -> None:
    huge = orjson.dumps(person(3, address="杭" * (10 * 1024 * 1024 // 3)))
    assert len(huge) > 10 * 1024 * 1024
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        orjson.dumps(person(1)) + b"\n" + huge + b"\n" + orjson.dumps(person(2)) + b"\n"
    )
    report, rejects, text = rejects_of(vault, tmp_path, source)
    assert report.accepted == 2 and report.rejected == 1
    assert rejects[0]["line"] == 2 and "limit" in str(rejects[0]["reason"])
    assert "杭杭杭" not in text


def test_non_utf8_bytes_are_refused_by_line(vault: Vault, tmp_path: Path) -> None:
    gbk = orjson.dumps(person(1)).decode().encode("gb18030")
    source = tmp_path / "in.jsonl"
    source.write_bytes(orjson.dumps(person(2)) + b"\n" + gbk + b"\n")
    report, rejects, text = rejects_of(vault, tmp_path, source)
    assert report.accepted == 1 and rejects[0]["line"] == 2
    assert "UTF-8" in str(rejects[0]["reason"])
    assert national_id(1) not in text


def test_non_utf8_csv_cell_is_refused_naming_its_column(vault: Vault, tmp_path: Path) -> None:
    source = tmp_path / "people.csv"
    source.write_bytes(
        b"name,national_id,birth_date\n"
        + "欧阳明月".encode("gb18030")
        + b","
        + national_id(1).encode()
        + b",1988-04-05\n"
        + "欧阳明月".encode()
        + b","
        + national_id(2).encode()
        + b",1988-04-05\n"
    )
    report, rejects, _ = rejects_of(vault, tmp_path, source, record_type="person")
    assert report.accepted == 1
    assert rejects == [{"line": 2, "field": "name", "reason": "not valid UTF-8"}]


def test_broken_json_array_is_refused_at_its_line(vault: Vault, tmp_path: Path) -> None:
    source = tmp_path / "in.json"
    source.write_text("[\n" + orjson.dumps(person(1)).decode() + ',\n{"name": \n', "utf-8")
    with pytest.raises(InvalidInput) as refused:
        vault.ingest(vault.operator, source)
    assert "line 3" in str(refused.value)


def test_a_json_array_that_is_not_an_array_is_refused(vault: Vault, tmp_path: Path) -> None:
    source = tmp_path / "in.json"
    source.write_text(orjson.dumps(person(1)).decode(), "utf-8")
    with pytest.raises(InvalidInput, match="array"):
        vault.ingest(vault.operator, source)
    assert vault.count() == 0
