"""The command line, run as a user runs it: a separate process, secrets in the environment.

Host commands (ingest, account, init) open the vault with the keyring passphrase; an
official's search, show and reveal go to a running server with the session of one login.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import click
import orjson
import pytest

from custodes.audit import Outcome
from custodes.bootstrap import open_vault
from custodes.errors import BudgetExceeded, SessionLimit, TamperDetected
from custodes.policy import AccessPurpose, Action, Role
from tests.conftest import (
    FAST_HASH,
    PASSPHRASE,
    PASSWORD,
    TOTP_SECRETS,
    free_port,
    login,
    make_vault,
    read_records,
    serving,
    totp_now,
    write_jsonl,
)
from tests.test_cli_client import (  # noqa: F401 - served is a fixture, used by name
    Served,
    client_env,
    run,
    search_args,
    served,
    session_path,
)
from tests.test_district_access import RECORDS

CLI_PACKAGE = Path(__file__).resolve().parent.parent / "src" / "custodes" / "cli"


@pytest.fixture
def vault_env(tmp_path: Path) -> dict[str, str]:
    vault = make_vault(tmp_path, "sqlite")
    vault.close()
    return {
        "CUSTODES_VAULT": str(tmp_path / "vault"),
        "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE,
    }


def test_ingest_search_show_reveal(
    vault_env: dict[str, str], population_file: Path, tmp_path: Path
) -> None:
    done = run("ingest", str(population_file), env=vault_env)
    assert done.returncode == 0, done.stderr
    assert "stored" in done.stdout
    person = next(r for r in read_records(population_file) if r["type"] == "person")

    vault = open_vault(
        Path(vault_env["CUSTODES_VAULT"]), passphrase=PASSPHRASE, hash_cost=FAST_HASH
    )
    try:
        with serving(vault) as url:
            served = Served(url, vault, tmp_path)
            reader = served.official("wang.fang")
            served.login(reader)

            done = run(*search_args(person, "--json"), env=reader)
            assert done.returncode == 0, done.stderr
            [found] = orjson.loads(done.stdout)
            assert found["type"] == "person" and "*" in found["fields"]["national_id"]
            assert str(person["national_id"]) not in done.stdout

            asked = ["--purpose", "cli test", "--case", "C-9"]
            done = run("reveal", found["record_id"], "phone", *asked, "--json", env=reader)
            assert done.returncode == 0, done.stderr
            assert orjson.loads(done.stdout)["value"] == person["phone"]
            done = run("reveal", found["record_id"], "phone", *asked, env=reader)
            assert done.stdout == f"{person['phone']}\n"

            done = run("show", found["record_id"], *asked, "--json", env=reader)
            assert done.returncode == 0, done.stderr
            shown = orjson.loads(done.stdout)
            assert set(shown) == {"record_id", "type", "fields", "links"}
            assert (shown["record_id"], shown["fields"]) == (found["record_id"], found["fields"])
            done = run("show", found["record_id"], *asked, env={**reader, "COLUMNS": "160"})
            assert done.returncode == 0 and f"person {found['record_id']}" in done.stdout

            done = run(
                "search",
                "--name",
                str(person["name"]),
                "--birth-date",
                str(person["birth_date"]),
                *asked,
                env={**reader, "COLUMNS": "160"},
            )
            assert done.returncode == 0, done.stderr
            assert found["record_id"] in done.stdout
            done = run("search", "--phone", "13800000000", *asked, env=reader)
            assert (done.returncode, done.stdout) == (0, "no match\n")
    finally:
        vault.close()


def test_bad_query_is_one_line_without_the_value(served: Served) -> None:  # noqa: F811
    reader = served.official("wang.fang", Role.OFFICER)
    served.login(reader)
    done = run(
        "search",
        "--national-id",
        "11010119900307999Q",
        "--purpose",
        "cli test",
        "--case",
        "T-1",
        env=reader,
    )
    assert done.returncode != 0
    assert done.stderr.startswith("custodes: error:") and done.stderr.count("\n") == 1
    assert "11010119900307999Q" not in done.stderr + done.stdout


def test_wrong_password_gets_nothing(served: Served) -> None:  # noqa: F811
    reader = {**served.official("wang.fang", Role.OFFICER), "CUSTODES_PASSWORD": PASSWORD + "!"}
    done = run("login", "--server", served.url, env=reader)
    assert done.returncode == 6
    assert "authentication failed" in done.stderr and done.stdout == ""
    assert PASSWORD not in done.stderr
    assert not session_path(reader).exists()


def test_missing_password_is_refused_not_prompted_without_a_terminal(tmp_path: Path) -> None:
    done = run(
        "login",
        "--server",
        f"http://127.0.0.1:{free_port()}",
        "--user",
        "x.y.z",
        env=client_env(tmp_path / "home"),
    )
    assert done.returncode != 0 and "CUSTODES_PASSWORD" in done.stderr


def test_every_command_is_found_under_its_own_name() -> None:
    from custodes.cli import cli

    def walk(group: click.Group, ctx: click.Context) -> list[str]:
        names = []
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            assert command is not None and command.name == name, name
            names.append(name)
            if isinstance(command, click.Group):
                inner = click.Context(command, parent=ctx, info_name=name)
                names += [f"{name} {sub}" for sub in walk(command, inner)]
        return names

    found = walk(cli, click.Context(cli, info_name="custodes"))
    for expected in (
        "login",
        "logout",
        "search",
        "show",
        "reveal",
        "audit log",
        "audit subject",
        "audit verify",
        "account add",
        "account token",
        "serve",
        "doctor",
        "witness init",
    ):
        assert expected in found


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every `import x` / `from x import a, b` in a module, functions' bodies included."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return found


def test_command_modules_share_only_the_public_common_module() -> None:
    """No command module reaches into another's private names, and common imports no
    command module: the import cycles of the old single-module CLI cannot come back."""
    allowed = {"custodes.cli.common", "custodes.cli.session_file"}
    for path in sorted(CLI_PACKAGE.glob("*.py")):
        for module, names in _imports(path):
            inside = module == "custodes.cli" or module.startswith("custodes.cli.")
            if path.name == "__init__.py" or not inside:
                continue
            if path.name in ("common.py", "session_file.py"):
                raise AssertionError(f"{path.name} imports {module}")
            if module == "custodes.cli":
                assert names == ["session_file"], (path.name, names)
            else:
                assert module in allowed, (path.name, module)
            assert not any(n.startswith("_") for n in names), (path.name, names)
    # The package's own module imports only common; commands are found by name, when run.
    modules = {m for m, _ in _imports(CLI_PACKAGE / "__init__.py") if m.startswith("custodes.cli")}
    assert modules == {"custodes.cli.common"}


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
        {
            "username": "li.lei",
            "role": "supervisor",
            "disabled": False,
            "locked": False,
            "district": "310101",
        }
    ]
    assert "argon2" not in done.stdout


def test_account_assign_and_unassign_a_case_shown_by_list_and_logged(
    vault_env: dict[str, str], tmp_path: Path
) -> None:
    # The case must be stored to be assigned: it opens the records it names.
    stored = run("ingest", str(write_jsonl(tmp_path / "case.jsonl", RECORDS)), env=vault_env)
    assert stored.returncode == 0, stored.stderr
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
            "locked": False,
            "district": "110101",
            "cases": ["A3101042025000017"],
        }
    ]
    table = run("account", "list", env={**vault_env, "COLUMNS": "160"})
    assert table.returncode == 0 and "A3101042025000017" in table.stdout

    unknown = run("account", "assign", "li.lei", "A4401042025000099", env=vault_env)
    assert unknown.returncode == 5 and "no case with that number" in unknown.stderr
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
        events = [e for _, e in vault._log.entries() if e.action.startswith("account:case")]
    finally:
        vault.close()
    # Each change, and each refused attempt (named by account and error, never by the
    # number typed), is on the log as the host operator's.
    changed = {"account": "li.lei", "case": "A3101042025000017"}
    failed = {"account": "li.lei", "error": "InvalidAssignment"}
    assert [(e.action, e.actor, e.outcome, e.detail) for e in events] == [
        (Action.CASE_ASSIGN, "operator", Outcome.GRANTED, changed),
        (Action.CASE_ASSIGN, "operator", Outcome.ERROR, failed),  # no such case stored
        (Action.CASE_ASSIGN, "operator", Outcome.ERROR, failed),
        (Action.CASE_ASSIGN, "operator", Outcome.ERROR, failed),
        (Action.CASE_UNASSIGN, "operator", Outcome.GRANTED, changed),
        (Action.CASE_UNASSIGN, "operator", Outcome.ERROR, failed),
    ]


def test_account_budget_sets_an_accounts_own_limits_and_puts_its_roles_back(
    vault_env: dict[str, str],
) -> None:
    added = run(
        "account",
        "add",
        "wang.fang",
        "--role",
        "officer",
        "--district",
        "110101",
        env={**vault_env, "CUSTODES_NEW_PASSWORD": PASSWORD},
    )
    assert added.returncode == 0, added.stderr
    done = run(
        "account",
        "budget",
        "wang.fang",
        "--views-per-hour",
        "50",
        "--misses-per-day",
        "none",
        env=vault_env,
    )
    assert done.returncode == 0, done.stderr
    assert "given its own budget" in done.stdout
    listed = orjson.loads(run("account", "list", "--json", env=vault_env).stdout)
    assert listed[0]["budget"] == {"views_per_hour": 50, "misses_per_day": None}
    for bad in (("--views-per-hour", "-3"), ("--views-per-hour", "many"), ()):
        refused = run("account", "budget", "wang.fang", *bad, env=vault_env)
        assert refused.returncode == 2, refused.stdout
    both = run(
        "account", "budget", "wang.fang", "--role-default", "--views-per-day", "9", env=vault_env
    )
    assert both.returncode == 2
    back = run("account", "budget", "wang.fang", "--role-default", env=vault_env)
    assert back.returncode == 0, back.stderr
    assert "budget" not in orjson.loads(run("account", "list", "--json", env=vault_env).stdout)[0]
    vault = open_vault(
        Path(vault_env["CUSTODES_VAULT"]), passphrase=PASSPHRASE, hash_cost=FAST_HASH
    )
    try:
        events = [e for _, e in vault._log.entries() if e.action == Action.ACCOUNT_BUDGET]
    finally:
        vault.close()
    assert [(e.actor, e.outcome, e.detail) for e in events] == [
        (
            "operator",
            Outcome.GRANTED,
            {"account": "wang.fang", "limits": {"views_per_hour": 50, "misses_per_day": None}},
        ),
        ("operator", Outcome.GRANTED, {"account": "wang.fang", "limits": "role"}),
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


def test_account_role_budget_sets_a_roles_limits_in_this_vault_and_a_forged_one_stops_reads(
    vault_env: dict[str, str], population_file: Path
) -> None:
    assert run("ingest", str(population_file), env=vault_env).returncode == 0
    done = run(
        "account",
        "role-budget",
        "officer",
        "--views-per-minute",
        "2",
        "--sessions",
        "1",
        env=vault_env,
    )
    assert done.returncode == 0, done.stderr
    assert "views_per_minute 2" in done.stdout and "sessions 1" in done.stdout
    assert (
        run("account", "role-budget", "operator", "--sessions", "1", env=vault_env).returncode == 2
    )
    vault = open_vault(
        Path(vault_env["CUSTODES_VAULT"]), passphrase=PASSPHRASE, hash_cost=FAST_HASH
    )
    try:
        # Every officer now has the role's limits in this vault; an account's own still win.
        session = login(vault, Role.OFFICER, "t.desk")
        wide = login(vault, Role.OFFICER, "t.wide", budget={"views_per_minute": 100})
        with pytest.raises(SessionLimit):
            vault.login("t.desk", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.desk"]))
        adults = [
            str(p["national_id"])
            for p in read_records(population_file)
            if p["type"] == "person" and str(p.get("birth_date", "2020")) < "2000"
        ]
        purpose = AccessPurpose("checking a reported burglary", "C-2026-17")

        def search(who: Any, nid: str) -> list[Any]:
            return vault.search(
                who,
                purpose,
                record_type="person",
                index="national_id",
                values={"national_id": nid},
            )

        for nid in adults[:3]:
            assert len(search(wide, nid)) == 1
        assert len(search(session, adults[0])) == 1
        assert len(search(session, adults[1])) == 1
        with pytest.raises(BudgetExceeded):
            search(session, adults[2])
        [event] = [e for _, e in vault._log.entries() if e.action == Action.ROLE_BUDGET]
        assert event.detail == {
            "role": "officer",
            "limits": {"views_per_minute": 2, "sessions": 1},
        }
        # A database writer who lifts the role's budget stops every officer's read.
        stored = vault._storage.get_meta("role_budgets")
        assert stored is not None
        vault._storage.set_meta("role_budgets", stored.replace(b":2", b":9"))
        vault._keeper.role_budgets._read_at = None
        with pytest.raises(TamperDetected):
            search(wide, adults[0])
    finally:
        vault.close()
    back = run("account", "role-budget", "officer", "--defaults", env=vault_env)
    assert back.returncode == 0 and "default budget" in back.stdout


def test_an_account_added_without_a_district_is_told_so_and_moved_by_account_district(
    vault_env: dict[str, str], population_file: Path
) -> None:
    assert run("ingest", str(population_file), env=vault_env).returncode == 0
    added = run(
        "account",
        "add",
        "li.na",
        "--role",
        "investigator",
        env={**vault_env, "CUSTODES_NEW_PASSWORD": PASSWORD},
    )
    assert added.returncode == 0, added.stderr
    assert "no district, so it reads no records" in added.stdout
    assert "custodes account district li.na" in added.stdout
    person = next(r for r in read_records(population_file) if r["type"] == "person")
    home = str(person["national_id"])[:6]
    vault = open_vault(
        Path(vault_env["CUSTODES_VAULT"]), passphrase=PASSPHRASE, hash_cost=FAST_HASH
    )
    purpose = AccessPurpose("checking a reported burglary", "C-2026-17")

    from tests.conftest import enrol

    # Enrolled here, in this vault: another test's "li.na" has a secret of its own.
    secret = enrol(vault, "li.na")

    def found() -> int:
        session = vault.login("li.na", PASSWORD, totp=totp_now(vault, secret))
        try:
            return len(
                vault.search(
                    session,
                    purpose,
                    record_type="person",
                    index="national_id",
                    values={"national_id": str(person["national_id"])},
                )
            )
        finally:
            vault.logout(session)

    try:
        assert found() == 0  # no district: nothing
    finally:
        vault.close()
    moved = run("account", "district", "li.na", home, env=vault_env)
    assert moved.returncode == 0, moved.stderr
    assert f"li.na moved to district {home}" in moved.stdout
    assert run("account", "district", "li.na", "31x", env=vault_env).returncode == 2
    vault = open_vault(
        Path(vault_env["CUSTODES_VAULT"]), passphrase=PASSPHRASE, hash_cost=FAST_HASH
    )
    try:
        assert found() == 1
        [event] = [e for _, e in vault._log.entries() if e.action == "account:district:set"]
        assert event.detail == {"account": "li.na", "district": home}
    finally:
        vault.close()
    taken = run("account", "district", "li.na", "none", env=vault_env)
    assert taken.returncode == 0 and "li.na left with no district" in taken.stdout


def test_account_mfa_takes_the_accounts_name_and_refuses_anothers_code(
    vault_env: dict[str, str],
) -> None:
    import os
    import subprocess
    import sys

    import pyotp

    added = run(
        "account",
        "add",
        "li.na",
        "--role",
        "investigator",
        "--district",
        "*",
        env={**vault_env, "CUSTODES_NEW_PASSWORD": PASSWORD},
    )
    code = next(
        line.split(":", 1)[1].strip()
        for line in added.stdout.splitlines()
        if line.startswith("enrolment code")
    )
    env = {**vault_env, "CUSTODES_ENROLMENT_CODE": code}
    wrong = run("account", "mfa", "wang.fang", env=env)
    assert wrong.returncode == 2 and "not wang.fang's" in wrong.stderr
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
    with subprocess.Popen(
        [sys.executable, "-m", "custodes", "account", "mfa", "li.na"],
        env={**full_env, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as enrolling:
        assert enrolling.stdout is not None and enrolling.stdin is not None
        for line in enrolling.stdout:
            if line.startswith("key (to type instead of scanning):"):
                key = line.split(":", 1)[1].strip()
                break
        enrolling.stdin.write(pyotp.TOTP(key).now() + "\n")
        enrolling.stdin.flush()
        rest, _ = enrolling.communicate(timeout=60)
    assert enrolling.returncode == 0, rest
    assert "second factor enrolled" in rest
