"""The command line, run as a user runs it: a separate process, secrets in the environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from custodes.bootstrap import open_vault
from custodes.vault import CASE_ASSIGN, CASE_UNASSIGN, SYSTEM_ACTOR
from tests.conftest import FAST_HASH, PASSPHRASE, PASSWORD, make_vault, read_records, totp_code

# Not an environment variable custodes reads: run() turns it into a fresh CUSTODES_TOTP,
# as an official would type the current code from an authenticator app.
TOTP_SECRET = "test:totp-secret"


def run(
    *args: str, env: dict[str, str] | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    full_env.update(env or {})
    secret = full_env.pop(TOTP_SECRET, None)
    if secret is not None:
        full_env["CUSTODES_TOTP"] = totp_code(secret)
    return subprocess.run(
        [sys.executable, "-m", "custodes", *args],
        capture_output=True,
        text=True,
        env=full_env,
        input=None if input is None else input.decode(),
        timeout=120,
        check=False,
    )


def add_official(vault_env: dict[str, str], name: str, role: str) -> dict[str, str]:
    """Add an account with the CLI, enrol its second factor with the printed code, and
    return the environment its holder reads with."""
    done = run(
        "account",
        "add",
        name,
        "--role",
        role,
        "--district",
        "*",
        env={**vault_env, "CUSTODES_NEW_PASSWORD": PASSWORD},
    )
    assert done.returncode == 0, done.stderr
    found = re.search(r"enrolment code \(one use, valid 24 h\): (\S+)", done.stdout)
    assert found, done.stdout
    vault = open_vault(
        Path(vault_env["CUSTODES_VAULT"]), passphrase=PASSPHRASE, hash_cost=FAST_HASH
    )
    try:
        secret = vault.enrolment(found[1]).secret
        vault.complete_enrolment(found[1], totp_code(secret))
    finally:
        vault.close()
    return {**vault_env, "CUSTODES_USER": name, "CUSTODES_PASSWORD": PASSWORD, TOTP_SECRET: secret}


@pytest.fixture
def vault_env(tmp_path: Path) -> dict[str, str]:
    vault = make_vault(tmp_path, "sqlite")
    vault.close()
    return {
        "CUSTODES_VAULT": str(tmp_path / "vault"),
        "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE,
    }


def test_ingest_search_show_reveal(vault_env: dict[str, str], population_file: Path) -> None:
    done = run("ingest", str(population_file), env=vault_env)
    assert done.returncode == 0, done.stderr
    assert "stored" in done.stdout
    reader = add_official(vault_env, "wang.fang", "investigator")
    # Each one-time code works once, and a window holds three: a colleague runs the rest.
    colleague = add_official(vault_env, "li.na", "investigator")
    person = next(r for r in read_records(population_file) if r["type"] == "person")

    done = run(
        "search",
        "--national-id",
        str(person["national_id"]),
        "--purpose",
        "cli test",
        "--json",
        env=reader,
    )
    assert done.returncode == 0, done.stderr
    [found] = orjson.loads(done.stdout)
    assert found["type"] == "person" and "*" in found["fields"]["national_id"]
    assert str(person["national_id"]) not in done.stdout

    done = run(
        "reveal",
        found["record_id"],
        "phone",
        "--purpose",
        "cli test",
        "--case",
        "C-9",
        "--json",
        env=reader,
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["value"] == person["phone"]

    done = run("show", found["record_id"], "--purpose", "cli test", "--json", env=colleague)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["record_id"] == found["record_id"]

    done = run(
        "search",
        "--name",
        str(person["name"]),
        "--birth-date",
        str(person["birth_date"]),
        "--purpose",
        "cli test",
        env=colleague,
    )
    assert done.returncode == 0, done.stderr
    assert found["record_id"] in done.stdout


def test_bad_query_is_one_line_without_the_value(vault_env: dict[str, str]) -> None:
    reader = add_official(vault_env, "wang.fang", "officer")
    done = run("search", "--national-id", "11010119900307999Q", "--purpose", "cli test", env=reader)
    assert done.returncode != 0
    assert done.stderr.startswith("custodes: error:") and done.stderr.count("\n") == 1
    assert "11010119900307999Q" not in done.stderr + done.stdout


def test_wrong_password_gets_nothing(vault_env: dict[str, str], population_file: Path) -> None:
    run("ingest", str(population_file), env=vault_env)
    reader = {
        **add_official(vault_env, "wang.fang", "officer"),
        "CUSTODES_PASSWORD": PASSWORD + "!",
    }
    person = next(r for r in read_records(population_file) if r["type"] == "person")
    done = run(
        "search", "--national-id", str(person["national_id"]), "--purpose", "cli test", env=reader
    )
    assert done.returncode == 6
    assert "authentication failed" in done.stderr and done.stdout == ""


def test_missing_password_is_refused_not_prompted_without_a_terminal(
    vault_env: dict[str, str],
) -> None:
    done = run(
        "search",
        "--phone",
        "13800000000",
        "--purpose",
        "cli test",
        "--user",
        "x.y.z",
        env=vault_env,
    )
    assert done.returncode != 0 and "CUSTODES_PASSWORD" in done.stderr


@pytest.mark.parametrize("weak", ["short", "password1234", "woaini1314520", "qwertyuiop123"])
def test_account_add_refuses_weak_passwords(vault_env: dict[str, str], weak: str) -> None:
    done = run(
        "account",
        "add",
        "li.lei",
        "--role",
        "officer",
        env={**vault_env, "CUSTODES_NEW_PASSWORD": weak},
    )
    assert done.returncode == 6
    assert weak not in done.stderr


def test_account_list_shows_no_hashes(vault_env: dict[str, str]) -> None:
    run(
        "account",
        "add",
        "li.lei",
        "--role",
        "supervisor",
        "--district",
        "310101",
        env={**vault_env, "CUSTODES_NEW_PASSWORD": PASSWORD},
    )
    done = run("account", "list", "--json", env=vault_env)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == [
        {"username": "li.lei", "role": "supervisor", "disabled": False, "district": "310101"}
    ]
    assert "argon2" not in done.stdout


def test_account_assign_and_unassign_a_case_shown_by_list_and_logged(
    vault_env: dict[str, str],
) -> None:
    added = run(
        "account",
        "add",
        "li.lei",
        "--role",
        "officer",
        "--district",
        "110101",
        env={**vault_env, "CUSTODES_NEW_PASSWORD": PASSWORD},
    )
    assert added.returncode == 0, added.stderr
    done = run("account", "assign", "li.lei", "a3101042025000017", env=vault_env)
    assert done.returncode == 0, done.stderr
    assert "assigned the case" in done.stdout
    listed = run("account", "list", "--json", env=vault_env)
    assert orjson.loads(listed.stdout) == [
        {
            "username": "li.lei",
            "role": "officer",
            "disabled": False,
            "district": "110101",
            "cases": ["A3101042025000017"],
        }
    ]
    table = run("account", "list", env={**vault_env, "COLUMNS": "160"})
    assert table.returncode == 0 and "A3101042025000017" in table.stdout

    for bad in ("A/1", "案件20250001"):
        refused = run("account", "assign", "li.lei", bad, env=vault_env)
        assert refused.returncode == 5
        assert refused.stderr.startswith("custodes: error:") and refused.stderr.count("\n") == 1
        assert "case number" in refused.stderr and bad not in refused.stderr

    done = run("account", "unassign", "li.lei", "A3101042025000017", env=vault_env)
    assert done.returncode == 0, done.stderr
    listed = run("account", "list", "--json", env=vault_env)
    assert "cases" not in orjson.loads(listed.stdout)[0]
    again = run("account", "unassign", "li.lei", "A3101042025000017", env=vault_env)
    assert again.returncode == 5 and "not assigned" in again.stderr

    vault = open_vault(
        Path(vault_env["CUSTODES_VAULT"]), passphrase=PASSPHRASE, hash_cost=FAST_HASH
    )
    try:
        events = [e for _, e in vault.access_log.entries() if e.action.startswith("account:case")]
    finally:
        vault.close()
    assert [(e.action, e.actor, e.detail) for e in events] == [
        (CASE_ASSIGN, SYSTEM_ACTOR, {"account": "li.lei", "case": "A3101042025000017"}),
        (CASE_UNASSIGN, SYSTEM_ACTOR, {"account": "li.lei", "case": "A3101042025000017"}),
    ]


def test_init_refuses_a_keyring_inside_the_vault(tmp_path: Path) -> None:
    target = tmp_path / "v"
    done = run(
        "init",
        str(target),
        "--keyring",
        str(target / "keys" / "k"),
        env={"CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE},
    )
    assert done.returncode == 2 and "outside the vault directory" in done.stderr
    assert not (target / "keys").exists()


def test_wrong_keyring_passphrase_opens_nothing(vault_env: dict[str, str]) -> None:
    done = run(
        "account", "list", env={**vault_env, "CUSTODES_KEYRING_PASSPHRASE": "not the passphrase"}
    )
    assert done.returncode == 3 and "passphrase" in done.stderr


def test_synth_to_stdout_is_deterministic() -> None:
    a = run("synth", "--count", "50", "--seed", "3")
    b = run("synth", "--count", "50", "--seed", "3")
    assert a.returncode == 0 and a.stdout == b.stdout
    assert sum(1 for line in a.stdout.splitlines() if '"person"' in line) == 50
