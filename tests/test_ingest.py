"""Ingest: every format gives the same vault, re-runs add nothing, workers change nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import orjson

from custodes.ingest import Progress
from custodes.vault import Vault
from tests.conftest import PURPOSE, login, read_records


def test_rerunning_the_same_file_adds_nothing(vault: Vault, population_file: Path) -> None:
    first = vault.ingest(vault.operator, population_file)
    second = vault.ingest(vault.operator, population_file)
    total = len(read_records(population_file))
    assert (first.accepted, first.already_present) == (total, 0)
    assert (second.accepted, second.already_present) == (0, total)
    assert vault.count() == total


def test_workers_store_exactly_what_one_process_stores(
    tmp_path: Path, population_file: Path
) -> None:
    from tests.conftest import make_vault

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    one = make_vault(tmp_path / "a", "sqlite")
    two = make_vault(tmp_path / "b", "sqlite")
    try:
        r1 = one.ingest(one.operator, population_file, workers=1, batch_size=97)
        r2 = two.ingest(two.operator, population_file, workers=2, batch_size=97)
        assert (r1.accepted, r1.rejected) == (r2.accepted, r2.rejected)
        assert one.count("person") == two.count("person")
        assert one.count("case") == two.count("case")
    finally:
        one.close()
        two.close()


def test_json_array_and_csv_give_the_same_people(
    vault: Vault, tmp_path: Path, population_file: Path
) -> None:
    people = [r for r in read_records(population_file) if r["type"] == "person"][:40]
    array = tmp_path / "people.json"
    array.write_bytes(orjson.dumps(people, option=orjson.OPT_INDENT_2))
    report = vault.ingest(vault.operator, array)
    assert report.accepted == len(people)

    columns = sorted({k for p in people for k in p if k != "type"})
    table = tmp_path / "people.csv"
    with table.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for p in people:
            writer.writerow({k: p.get(k, "") for k in columns})
    again = vault.ingest(vault.operator, table, record_type="person")
    assert again.already_present == len(people) and again.accepted == 0

    session = login(vault)
    found = vault.search(
        session,
        PURPOSE,
        record_type="person",
        index="national_id",
        values={"national_id": str(people[-1]["national_id"])},
    )
    assert len(found) == 1


def test_progress_reports_every_record(vault: Vault, population_file: Path) -> None:
    seen: list[Progress] = []
    report = vault.ingest(vault.operator, population_file, batch_size=50, progress=seen.append)
    assert seen[-1].records == report.accepted + report.rejected
    assert seen[-1].bytes_read == population_file.stat().st_size == seen[-1].bytes_total
    assert [p.records for p in seen] == sorted(p.records for p in seen)


def test_type_option_applies_to_records_that_name_none(
    vault: Vault, tmp_path: Path, population_file: Path
) -> None:
    people = [r for r in read_records(population_file) if r["type"] == "person"][:5]
    source = tmp_path / "untyped.jsonl"
    source.write_bytes(
        b"".join(orjson.dumps({k: v for k, v in p.items() if k != "type"}) + b"\n" for p in people)
    )
    report = vault.ingest(vault.operator, source, record_type="person")
    assert report.accepted == 5


def test_ingest_is_on_the_access_log(vault: Vault, population_file: Path) -> None:
    report = vault.ingest(vault.operator, population_file)
    _, entry = list(vault._log.entries())[-1]
    assert entry.action == "vault:records:ingest"
    assert entry.detail["accepted"] == report.accepted
