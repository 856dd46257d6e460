"""Threat 17 from the command line: an auditor answers a subject's request with a report and
a bundle anyone can check offline; only auditors read the log, and reading it is logged."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from custodes.bootstrap import open_vault
from tests.conftest import FAST_HASH, PASSPHRASE, read_records
from tests.test_cli import add_official, run, vault_env  # noqa: F401 - a fixture, used by name


@pytest.fixture
def served(
    vault_env: dict[str, str],  # noqa: F811
    population_file: Path,
) -> dict[str, dict[str, str]]:
    assert run("ingest", str(population_file), env=vault_env).returncode == 0
    return {
        "officer": add_official(vault_env, "wang.fang", "investigator"),
        "auditor": add_official(vault_env, "zhao.audit", "auditor"),
        "host": vault_env,
    }


def test_subject_report_lists_the_officials_who_looked_and_verifies_offline(
    served: dict[str, dict[str, str]], population_file: Path, tmp_path: Path
) -> None:
    person = next(r for r in read_records(population_file) if r["type"] == "person")
    officer = served["officer"]
    done = run(
        "search",
        "--national-id",
        str(person["national_id"]),
        "--purpose",
        "address check",
        "--case",
        "K-7",
        "--json",
        env=officer,
    )
    [found] = orjson.loads(done.stdout)
    run("reveal", found["record_id"], "phone", "--purpose", "call the witness", env=officer)

    auditor = served["auditor"]
    bundle = tmp_path / "report.bundle"
    done = run(
        "audit", "subject", found["record_id"], "--bundle", str(bundle), "--json", env=auditor
    )
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    seen = [(a["actor"], a["action"], a["purpose"]) for a in report["accesses"]]
    assert ("wang.fang", "record:index:search", "address check") in seen
    assert ("wang.fang", "record:field:reveal", "call the witness") in seen

    vault = open_vault(
        Path(served["host"]["CUSTODES_VAULT"]), passphrase=PASSPHRASE, hash_cost=FAST_HASH
    )
    log_key = vault.access_log.verifier_key
    vault.close()
    done = run("audit", "verify-bundle", str(bundle), "--log-key", log_key)
    assert done.returncode == 0, done.stderr
    data = bytearray(bundle.read_bytes())
    data[-40] ^= 1
    bundle.write_bytes(bytes(data))
    assert run("audit", "verify-bundle", str(bundle), "--log-key", log_key).returncode != 0


def test_only_auditors_read_the_log_and_the_reading_is_logged(
    served: dict[str, dict[str, str]],
) -> None:
    officer = served["officer"]
    done = run("audit", "log", "--purpose", "curious", env=officer)
    assert done.returncode == 7 and "auditor" in done.stderr
    auditor = served["auditor"]
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
    done = run("audit", "verify", env=served["host"])
    assert done.returncode == 0, done.stderr
