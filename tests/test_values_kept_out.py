"""Threats 9 and 3: values where they should not be.

An auditor's subject report names which fields an official searched by, never the values
(they stay sealed in the log), through the API, the CLI and the dashboard alike; and a
name typed as a JSON key or a CSV header is input like any other value, so an ingest
refusal places it (a line, "unknown field", a column number) and never repeats it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from custodes.errors import InvalidInput, InvalidQuery
from custodes.policy import Role
from custodes.records.validate import query_parts
from custodes.vault import Vault
from custodes.web import deps
from custodes.web.app import create_app
from tests.conftest import login
from tests.test_cli import vault_env  # noqa: F401 - a fixture, used by name
from tests.test_cli_client import (  # noqa: F401 - served is a fixture, used by name
    Served,
    run,
    search_args,
    served,
)
from tests.test_ingest_bad_input import person, rejects_of

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2")
    from fastapi.testclient import TestClient

# A name and an ID number as an uploader's tool might turn them into keys and headers.
NAME_AS_KEY = "Ouyang_Mingyue"
HAN_NAME_AS_KEY = "欧阳明月"
NUMBER_AS_KEY = "330106198804050018"


def test_the_auditors_report_names_the_fields_searched_but_never_their_values(
    served: Served,  # noqa: F811
) -> None:
    person = served.people[0]
    nid, phone = str(person["national_id"]), str(person["phone"])
    officer = served.official("wang.fang")
    served.login(officer)
    done = run(*search_args(person, "--json"), env=officer)
    assert done.returncode == 0, done.stderr
    [found] = orjson.loads(done.stdout)
    record_id = found["record_id"]
    by_phone = ["search", "--phone", phone, "--purpose", "call back", "--case", "K-1"]
    assert run(*by_phone, env=officer).returncode == 0

    # The command line, as a table and as JSON.
    auditor = served.official("zhao.audit", Role.AUDITOR)
    served.login(auditor)
    sar = ["--purpose", "their request"]
    table = run("audit", "subject", record_id, *sar, env={**auditor, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "searched by: national_id" in table.stdout and "searched by: phone" in table.stdout
    as_json = run("audit", "subject", record_id, *sar, "--json", env=auditor)
    assert as_json.returncode == 0, as_json.stderr
    accesses = orjson.loads(as_json.stdout)["accesses"]
    assert ["national_id"] in [a["searched_by"] for a in accesses]

    # The API, asked directly.
    session = login(served.vault, Role.AUDITOR, "api.audit")
    answer = httpx.get(
        f"{served.url}/api/v1/audit/subject/{record_id}",
        headers={"Authorization": f"Bearer {session.token}"},
        params={"purpose": "subject access request"},
    )
    assert answer.status_code == 200, answer.text
    doc: dict[str, Any] = answer.json()
    assert all("private" not in a for a in doc["accesses"])
    assert {"phone"} <= {f for a in doc["accesses"] for f in a["searched_by"]}

    # The dashboard's page, which never showed them.
    with TestClient(create_app(served.vault), base_url="https://testserver") as page_client:
        page_client.cookies.set(deps.SESSION_COOKIE, session.token)
        page = page_client.get(
            f"/audit/subject/{record_id}", params={"reason": "subject access request"}
        )
    assert page.status_code == 200

    for shown in (table.stdout, as_json.stdout, answer.text, page.text):
        assert nid not in shown and phone not in shown
    # Still sealed beside the entries, not thrown away.
    searches = [i for i, e in served.vault._log.entries() if e.action == "record:index:search"]
    assert all(served.vault._log.private_details(i) for i in searches)


@pytest.mark.parametrize("key", [NAME_AS_KEY, HAN_NAME_AS_KEY, NUMBER_AS_KEY])
def test_a_name_used_as_a_json_key_never_reaches_the_rejects_file_or_the_terminal(
    vault_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
    key: str,
) -> None:
    source = tmp_path / "people.jsonl"
    source.write_bytes(orjson.dumps(person(1, **{key: "x"})) + b"\n")
    done = run("ingest", str(source), env=vault_env)
    assert "refused line 1: unknown field" in done.stdout, done.stderr
    rejects = list((Path(vault_env["CUSTODES_VAULT"]) / "rejects").iterdir())
    [written] = [orjson.loads(line) for f in rejects for line in f.read_text().splitlines()]
    assert written == {"line": 1, "field": None, "reason": "unknown field"}
    for shown in (done.stdout, done.stderr, *(f.read_text() for f in rejects)):
        assert key not in shown


def test_a_name_used_as_a_csv_header_never_reaches_the_terminal(
    vault_env: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    source = tmp_path / "people.csv"
    source.write_text(f"name,national_id,{HAN_NAME_AS_KEY}\n欧阳明月,{NUMBER_AS_KEY},1\n", "utf-8")
    done = run("ingest", str(source), "--type", "person", env=vault_env)
    assert done.returncode != 0
    assert "column 3" in done.stderr
    assert HAN_NAME_AS_KEY not in done.stdout + done.stderr


def test_a_search_key_the_index_lacks_is_refused_without_repeating_it(vault: Vault) -> None:
    person_type = vault.schema.types["person"]
    index = person_type.index("national_id")
    with pytest.raises(InvalidQuery) as refused:
        query_parts(person_type, index, {"national_id": NUMBER_AS_KEY, NAME_AS_KEY: "1"})
    assert "an unknown field" in str(refused.value) and NAME_AS_KEY not in str(refused.value)


def test_a_name_sent_as_a_search_key_index_or_type_never_comes_back_from_the_api(
    served: Served,  # noqa: F811
) -> None:
    session = login(served.vault, Role.INVESTIGATOR, "api.investigator")
    nid = str(served.people[0]["national_id"])
    asked = {"purpose": "burglary follow-up", "case_ref": "C-1"}
    for name in (NAME_AS_KEY, HAN_NAME_AS_KEY):
        for body in (
            {"record_type": "person", "index": "national_id", "values": {name: nid}},
            {
                "record_type": "person",
                "index": "national_id",
                "values": {"national_id": nid, name: "1"},
            },
            {"record_type": "person", "index": name, "values": {"national_id": nid}},
            {"record_type": name, "index": "national_id", "values": {"national_id": nid}},
        ):
            answer = httpx.post(
                f"{served.url}/api/v1/search",
                headers={"Authorization": f"Bearer {session.token}"},
                json={**body, **asked},
            )
            assert answer.status_code == 422, answer.text
            assert name not in answer.text and nid not in answer.text


def test_a_record_type_typed_for_an_ingest_is_refused_without_repeating_it(
    vault: Vault, tmp_path: Path
) -> None:
    source = tmp_path / "people.csv"
    source.write_text(f"name,national_id\n欧阳明月,{NUMBER_AS_KEY}\n", "utf-8")
    with pytest.raises(InvalidInput) as refused:
        rejects_of(vault, tmp_path, source, record_type=NAME_AS_KEY)
    assert "unknown record type" in str(refused.value)
    assert NAME_AS_KEY not in str(refused.value)


@pytest.mark.parametrize("typed", [NAME_AS_KEY, HAN_NAME_AS_KEY, NUMBER_AS_KEY])
def test_a_name_typed_as_a_field_to_reveal_stays_off_the_log_and_the_answer(
    vault: Vault, population_file: Path, typed: str
) -> None:
    from custodes.policy import AccessPurpose

    assert vault.ingest(vault.operator, population_file).rejected == 0
    officer = login(vault, Role.OFFICER)
    purpose = AccessPurpose("check an address", "K-2")
    person = next(
        p
        for p in (orjson.loads(line) for line in population_file.read_bytes().splitlines())
        if p["type"] == "person"
    )
    [view] = vault.search(
        officer,
        purpose,
        record_type="person",
        index="national_id",
        values={"national_id": person["national_id"]},
    )
    with pytest.raises(InvalidQuery) as refused:
        vault.reveal(officer, purpose, view.record_id, typed)
    assert typed not in str(refused.value)
    logged = b"".join(e.encode() for _, e in vault._log.entries())
    assert typed.encode() not in logged and typed.encode("unicode_escape") not in logged
