"""Threat 17 from the command line: an auditor answers a subject's request with a report and
a bundle anyone can check offline; only auditors read the log, and reading it is logged.

The auditor's commands are clients of the running server, like an official's; verifying
the log and a bundle needs only the log's public key.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from custodes.audit.report import BundleInvalid, as_json, report_from_json
from custodes.policy import AccessPurpose, Role
from custodes.policy.budgets import NO_LIMITS
from custodes.records.idnumber import check_char
from tests.conftest import PASSPHRASE, login
from tests.test_cli_client import (  # noqa: F401 - served is a fixture, used by name
    Served,
    run,
    search_args,
    served,
)

SUBJECT_REPORT = "audit:subject:report"


@pytest.fixture
def officials(served: Served) -> dict[str, dict[str, str]]:  # noqa: F811
    """An investigator and an auditor, each logged in from a home of their own."""
    found = {
        "officer": served.official("wang.fang"),
        "auditor": served.official("zhao.audit", Role.AUDITOR),
    }
    for env in found.values():
        served.login(env)
    return found


def _reports_of(served: Served, record_id: str) -> int:  # noqa: F811
    return sum(
        e.action == SUBJECT_REPORT and record_id in e.records
        for _, e in served.vault._log.entries()
    )


def test_subject_report_lists_the_officials_who_looked_and_verifies_offline(
    served: Served,  # noqa: F811
    officials: dict[str, dict[str, str]],
    tmp_path: Path,
) -> None:
    person = served.people[0]
    officer = officials["officer"]
    args = search_args(person, "--json")
    args[args.index("--purpose") + 1] = "address check"
    args[args.index("--case") + 1] = "K-7"
    done = run(*args, env=officer)
    [found] = orjson.loads(done.stdout)
    asked = ["--purpose", "call the witness", "--case", "K-7"]
    assert run("reveal", found["record_id"], "phone", *asked, env=officer).returncode == 0

    auditor = officials["auditor"]
    bundle = tmp_path / "report.bundle"
    done = run(
        "audit",
        "subject",
        found["record_id"],
        "--purpose",
        "their request",
        "--bundle",
        str(bundle),
        "--json",
        env=auditor,
    )
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    seen = [(a["actor"], a["action"], a["purpose"]) for a in report["accesses"]]
    assert ("wang.fang", "record:index:search", "address check") in seen
    assert ("wang.fang", "record:field:reveal", "call the witness") in seen
    # Asked of the server once: the bundle was rebuilt from the same report.
    assert _reports_of(served, found["record_id"]) == 1

    log_key = served.vault._log.verifier_key
    done = run("audit", "verify-bundle", str(bundle), "--log-key", log_key)
    assert done.returncode == 0, done.stderr
    data = bytearray(bundle.read_bytes())
    data[-40] ^= 1
    bundle.write_bytes(bytes(data))
    assert run("audit", "verify-bundle", str(bundle), "--log-key", log_key).returncode != 0

    done = run("audit", "subject", found["record_id"], "--purpose", "their request", env=auditor)
    assert done.returncode == 0, done.stderr
    assert f"Subject access report for record {found['record_id']}" in done.stdout
    assert "call the witness" in done.stdout


def test_the_client_rebuilds_the_servers_report_exactly_and_refuses_a_broken_proof(
    served: Served,  # noqa: F811
    officials: dict[str, dict[str, str]],
    tmp_path: Path,
) -> None:
    record_id = orjson.loads(
        run(*search_args(served.people[1], "--json"), env=officials["officer"]).stdout
    )[0]["record_id"]
    bundle = tmp_path / "report.bundle"
    done = run(
        "audit",
        "subject",
        record_id,
        "--purpose",
        "their request",
        "--bundle",
        str(bundle),
        "--json",
        env=officials["auditor"],
    )
    assert done.returncode == 0, done.stderr
    doc = orjson.loads(done.stdout)
    rebuilt = report_from_json(doc)
    assert as_json(rebuilt) == doc
    assert rebuilt.bundle() == bundle.read_bytes()

    first = doc["accesses"][0]
    broken = {**doc, "accesses": [{**first, "leaf": first["leaf"][:-4] + "AAA="}]}
    with pytest.raises(BundleInvalid):
        report_from_json(broken)
    with pytest.raises(BundleInvalid):
        report_from_json({**doc, "checkpoint": {**doc["checkpoint"], "size": 1}})


def test_only_auditors_read_the_log_and_the_reading_is_logged(
    served: Served,  # noqa: F811
    officials: dict[str, dict[str, str]],
) -> None:
    officer = officials["officer"]
    done = run("audit", "log", "--purpose", "curious", env=officer)
    assert done.returncode == 7 and "auditor" in done.stderr
    auditor = officials["auditor"]
    done = run(
        "audit",
        "log",
        "--purpose",
        "quarterly review",
        "--actor",
        "wang.fang",
        "--json",
        env=auditor,
    )
    assert done.returncode == 0, done.stderr
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert rows and all(r["actor"] == "wang.fang" for r in rows)
    assert any(r["action"] == "audit:log:read" and r["outcome"] == "denied" for r in rows)
    host = {"CUSTODES_VAULT": str(served.root / "vault"), "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    done = run("audit", "verify", env=host)
    assert done.returncode == 0, done.stderr


def test_audit_log_walks_every_page_of_the_log(
    served: Served,  # noqa: F811
    officials: dict[str, dict[str, str]],
) -> None:
    # More entries than the API's largest page, by one account, all on the log.
    session = login(served.vault, Role.INVESTIGATOR, "page.turner", budget=NO_LIMITS)
    stated = AccessPurpose("a page of the log", "T-1")
    for n in range(230):
        served.vault.search(
            session,
            stated,
            record_type="person",
            index="phone",
            values={"phone": f"1380000{n:04d}"},
        )
    done = run(
        "audit",
        "log",
        "--purpose",
        "quarterly review",
        "--actor",
        "page.turner",
        "--json",
        env=officials["auditor"],
    )
    assert done.returncode == 0, done.stderr
    indexes = [orjson.loads(line)["index"] for line in done.stdout.splitlines()]
    assert len(indexes) >= 231 and indexes == sorted(set(indexes))

    done = run(
        "audit",
        "log",
        "--purpose",
        "quarterly review",
        "--actor",
        "page.turner",
        "--since",
        "2000-01-01T00:00",
        env={**officials["auditor"], "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(f"{len(indexes):,} entries\n")


def test_audit_key_prints_the_public_key_that_verify_and_verify_bundle_take(
    tmp_path: Path,
) -> None:
    """A newcomer reads the log's public key from the host, with no passphrase, and hands
    it to the verifier as printed."""
    from tests.conftest import make_vault

    vault = make_vault(tmp_path, "sqlite")
    try:
        published = vault.log_verifier_key
        vault.checkpoint(vault.operator)
    finally:
        vault.close()
    env = {"CUSTODES_VAULT": str(tmp_path / "vault")}  # no passphrase, no keyring
    done = run("audit", "key", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == published
    verified = run("audit", "verify", "--log-key", done.stdout.strip(), env=env)
    assert verified.returncode == 0, verified.stderr


def test_an_auditor_starts_a_subject_access_request_from_the_id_number_a_citizen_brings(
    served: Served,  # noqa: F811
    officials: dict[str, dict[str, str]],
) -> None:
    person = served.people[0]
    number = str(person["national_id"])
    auditor = officials["auditor"]
    sar = ["--purpose", "their request at the counter", "--case", "SAR-9"]
    done = run("audit", "subject", "--national-id", number, *sar, "--json", env=auditor)
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    # The lookup itself is in the person's report: they see who looked them up, and why.
    lookups = [a for a in report["accesses"] if a["action"] == "audit:subject:lookup"]
    assert [(a["actor"], a["purpose"]) for a in lookups] == [
        ("zhao.audit", "their request at the counter")
    ]
    assert number not in done.stdout.replace(report["subject"], "")
    # Only the id comes back: no field of the record.
    vault = served.vault
    [entry] = [e for _, e in vault._log.entries() if e.action == "audit:subject:lookup"]
    assert entry.records == (report["subject"],) and entry.result_count == 1
    # A number nobody holds: not found, and logged all the same.
    body = "11010519800101001"
    nobody = body + check_char(body)
    absent = run("audit", "subject", "--national-id", nobody, *sar, env=auditor)
    assert absent.returncode != 0 and "no person" in absent.stderr
    assert nobody not in absent.stderr
    # Officials who read records cannot use it as a back door to search: auditors only.
    officer = officials["officer"]
    refused = run("audit", "subject", "--national-id", number, *sar, env=officer)
    assert refused.returncode != 0
    both = run("audit", "subject", "RECORD", "--national-id", number, *sar, env=auditor)
    assert both.returncode == 2


def test_a_subject_report_whose_auditor_stated_no_purpose_is_refused_not_given_one(
    served: Served,  # noqa: F811
    officials: dict[str, dict[str, str]],
) -> None:
    import httpx

    person = served.people[0]
    record_id = orjson.loads(run(*search_args(person, "--json"), env=officials["officer"]).stdout)[
        0
    ]["record_id"]
    entries = served.vault._log.size
    auditor = officials["auditor"]
    by_id = run("audit", "subject", record_id, env=auditor)
    by_number = run("audit", "subject", "--national-id", str(person["national_id"]), env=auditor)
    for done in (by_id, by_number):
        assert done.returncode == 2 and "--purpose" in done.stderr, done.stderr
    token = login(served.vault, Role.AUDITOR, "api.audit").token
    with httpx.Client(base_url=f"{served.url}/api/v1") as api:
        headers = {"Authorization": f"Bearer {token}"}
        for answer in (
            api.get(f"/audit/subject/{record_id}", headers=headers),
            api.get(f"/audit/subject/{record_id}/bundle", headers=headers),
            api.post(
                "/audit/subject/lookup",
                json={"national_id": person["national_id"]},
                headers=headers,
            ),
        ):
            assert answer.status_code == 422, answer.text
            assert "purpose" in answer.text and "subject access request" not in answer.text
    # Nothing was read, so nothing but the API login is on the log.
    later = served.vault._log.entries(entries)
    assert not [e for _, e in later if e.action.startswith("audit:subject")]
