"""Threat 18: a database writer without the keys (a DBA, SQL injection, a hand on the file)
edits or plants the rows that decide access (the stored schema and token sizes, accounts,
sessions, API tokens, failure counts) and gains nothing: the vault refuses to open, or the
row opens nothing and the attempt is on the access log as tampering."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import orjson
import pytest

from custodes.accounts import LOCK_AFTER_FAILURES
from custodes.audit import Outcome
from custodes.bootstrap import assemble_vault, open_vault, seal_settings, unlock_vault
from custodes.errors import AuthenticationFailed, TamperDetected
from custodes.policy import Action, Role
from custodes.sessions import token_key
from custodes.settings import VaultLayout
from custodes.storage.base import AccountRow, SessionRow
from custodes.vault import Vault
from tests.conftest import (
    FAST_HASH,
    PASSPHRASE,
    PASSWORD,
    TOTP_SECRETS,
    enrol,
    login,
    make_vault,
    totp_now,
)

SHIPPED_SCHEMA = resources.files("custodes").joinpath("schemas/population.toml")


def database(vault: Vault) -> Path:
    assert vault.directory is not None
    return VaultLayout(vault.directory).database


def writer(path: Path) -> sqlite3.Connection:
    """The attacker's own connection to the vault file: plain SQL, no keys."""
    return sqlite3.connect(path, isolation_level=None)


def forge_account(vault: Vault, username: str, change: Callable[[AccountRow], AccountRow]) -> None:
    """Rewrite an account's stored row as a writer without keys would: through sqlite3 on
    the file for SQLite, on the storage object for the memory backend."""
    row = vault._storage.get_account(username)
    assert row is not None
    forged = change(row)
    if vault.directory is None:
        vault._storage.update_account(forged)
        return
    conn = writer(database(vault))
    try:
        conn.execute(
            "UPDATE accounts SET role = ?, password_hash = ?, attributes = ?, disabled = ?"
            " WHERE username = ?",
            (forged.role, forged.password_hash, forged.attributes, int(forged.disabled), username),
        )
    finally:
        conn.close()


def forge_session(vault: Vault, row: SessionRow) -> None:
    """Plant or replace a session row, as a writer without keys would."""
    if vault.directory is None:
        vault._storage.end_session(row.key)
        vault._storage.put_session(row)
        return
    conn = writer(database(vault))
    try:
        conn.execute(
            "INSERT OR REPLACE INTO sessions(key, username, role, issued_at, expires,"
            " last_seen, client) VALUES (?, ?, ?, ?, ?, ?, ?)",
            tuple(row),
        )
    finally:
        conn.close()


def forge_meta(vault: Vault, key: str, value: bytes) -> None:
    if vault.directory is None:
        vault._storage.set_meta(key, value)
        return
    conn = writer(database(vault))
    try:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
    finally:
        conn.close()


def attributes_of(row: AccountRow) -> dict[str, object]:
    return dict(orjson.loads(row.attributes))


def tampering(vault: Vault) -> list[dict[str, object]]:
    return [
        dict(e.detail)
        for _, e in vault._log.entries()
        if e.action == Action.ROW_TAMPERED and e.outcome is Outcome.DENIED
    ]


def searches(vault: Vault, session: object) -> None:
    """Any access through the vault's one door with this session."""
    from custodes.policy import AccessPurpose

    vault.search(
        session,  # type: ignore[arg-type]
        AccessPurpose("checking a forged row opens nothing", "T-18"),
        record_type="person",
        index="national_id",
        values={"national_id": "11010519491231002X"},
    )


# -- the stored settings: schema, token sizes, expected population --------------------


def _edited_schema(text: str) -> bytes:
    # Every mask and every sensitivity class dropped to the weakest: what the attacker of
    # the report did to see full ID numbers and reveal narratives as an officer.
    edited = text.replace('sensitivity = "restricted"', 'sensitivity = "identifying"')
    edited = edited.replace('sensitivity = "sensitive"', 'sensitivity = "identifying"')
    assert edited != text
    return edited.encode()


@pytest.mark.parametrize("setting", ["schema", "token_bits", "expected_population"])
def test_an_edited_stored_schema_stops_the_vault_from_opening(tmp_path: Path, setting: str) -> None:
    vault = make_vault(tmp_path, "sqlite")
    login(vault, Role.OFFICER, "t.officer")
    directory = vault.directory
    assert directory is not None
    stored = vault._storage.get_meta(setting)
    vault.close()
    assert stored is not None
    if setting == "schema":
        forged = _edited_schema(stored.decode())
    elif setting == "token_bits":
        forged = orjson.dumps({k: 40 for k in orjson.loads(stored)})
    else:
        forged = b"1000"
    conn = writer(VaultLayout(directory).database)
    conn.execute("UPDATE meta SET value = ? WHERE key = ?", (forged, setting))
    conn.close()

    unlocked = unlock_vault(
        directory, passphrase=PASSPHRASE, keyring_path=tmp_path / "keys" / "test.keyring"
    )
    # Neither a server process nor a host command runs on it.
    for host in (False, True):
        with pytest.raises(TamperDetected) as refused:
            assemble_vault(unlocked, hash_cost=FAST_HASH, host=host)
        assert repr(setting) in str(refused.value)
        assert forged.decode() not in str(refused.value)


def test_a_removed_settings_seal_stops_the_vault_from_opening(tmp_path: Path) -> None:
    vault = make_vault(tmp_path, "sqlite")
    directory = vault.directory
    assert directory is not None
    vault.close()
    conn = writer(VaultLayout(directory).database)
    conn.execute("DELETE FROM meta WHERE key = 'settings_mac'")
    conn.close()
    with pytest.raises(TamperDetected) as refused:
        open_vault(
            directory, passphrase=PASSPHRASE, keyring_path=tmp_path / "keys" / "test.keyring"
        )
    assert "'settings_mac'" in str(refused.value)


def test_a_vault_from_before_the_seal_is_sealed_once_and_only_against_its_own_schema(
    tmp_path: Path,
) -> None:
    keyring = tmp_path / "keys" / "test.keyring"
    vault = make_vault(tmp_path, "sqlite")
    login(vault, Role.OFFICER, "t.officer")
    directory = vault.directory
    assert directory is not None
    vault.close()
    # What a vault made before this change holds: no settings seal, no account tags.
    conn = writer(VaultLayout(directory).database)
    conn.execute("DELETE FROM meta WHERE key = 'settings_mac'")
    for name, attributes in conn.execute("SELECT username, attributes FROM accounts").fetchall():
        plain = orjson.loads(attributes)
        plain.pop("row_mac")
        conn.execute(
            "UPDATE accounts SET attributes = ? WHERE username = ?", (orjson.dumps(plain), name)
        )
    stored = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
    conn.close()
    unlocked = unlock_vault(directory, passphrase=PASSPHRASE, keyring_path=keyring)

    # A schema edited before the upgrade is never blessed: it must equal the operator's file.
    edited = tmp_path / "edited.toml"
    edited.write_bytes(_edited_schema(stored.decode()))
    with pytest.raises(TamperDetected):
        seal_settings(unlocked, schema_path=edited, expected_population=10**9)
    own = tmp_path / "population.toml"
    own.write_text(SHIPPED_SCHEMA.read_text("utf-8"), "utf-8")
    with pytest.raises(TamperDetected):
        seal_settings(unlocked, schema_path=own, expected_population=1000)

    assert seal_settings(unlocked, schema_path=own, expected_population=10**9) == ["t.officer"]
    reopened = assemble_vault(unlocked, hash_cost=FAST_HASH)
    try:
        reopened.login("t.officer", PASSWORD, totp=totp_now(reopened, TOTP_SECRETS["t.officer"]))
    finally:
        reopened.close()


# -- accounts: role, district, cases, lock, disabled, password, second factor ----------


def test_a_database_writer_cannot_raise_an_accounts_role(vault: Vault) -> None:
    session = login(vault, Role.OFFICER, "t.officer")
    forge_account(vault, "t.officer", lambda row: row._replace(role=Role.SUPERVISOR.value))

    with pytest.raises(AuthenticationFailed):
        searches(vault, session)
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.officer"]))
    assert vault._accounts.get("t.officer") is None
    assert {"row": "account", "account": "t.officer"} in tampering(vault)


def test_a_database_writer_cannot_widen_a_district_or_assign_a_case(vault: Vault) -> None:
    session = login(vault, Role.OFFICER, "t.officer", district="3101")

    def widen(row: AccountRow) -> AccountRow:
        attributes = attributes_of(row)
        attributes["district"] = "*"
        attributes["cases"] = ["A3101050000202400001"]
        return row._replace(attributes=orjson.dumps(attributes))

    forge_account(vault, "t.officer", widen)
    with pytest.raises(AuthenticationFailed):
        searches(vault, session)
    assert vault._accounts.get("t.officer") is None
    assert all(a.username != "t.officer" for a in vault.admin.list_accounts(vault.operator))
    # Nor can an administrator build on the forged row: it is refused, not blessed.
    with pytest.raises(TamperDetected):
        vault.admin.assign_case(vault.operator, "t.officer", "A3101050000202400002")
    assert {"row": "account", "account": "t.officer"} in tampering(vault)


def test_a_database_writer_cannot_unlock_re_enable_or_take_over_an_account(
    vault: Vault,
) -> None:
    from argon2 import PasswordHasher

    login(vault, Role.OFFICER, "t.locked")
    login(vault, Role.OFFICER, "t.disabled")
    login(vault, Role.OFFICER, "t.victim")
    for attempt in range(LOCK_AFTER_FAILURES):
        with pytest.raises(AuthenticationFailed):
            vault.login("t.locked", f"wrong guess {attempt}")
    vault.admin.disable_account(vault.operator, "t.disabled")

    def unlock(row: AccountRow) -> AccountRow:
        attributes = attributes_of(row)
        security = dict(attributes["security"])  # type: ignore[call-overload]
        security.pop("locked", None)
        security["failures"] = 0
        attributes["security"] = security
        return row._replace(attributes=orjson.dumps(attributes))

    forge_account(vault, "t.locked", unlock)
    # The failure counters are only counters: wiping them unlocks nothing either.
    for key in ("account:t.locked", "account:t.disabled"):
        vault._storage.clear_login_failures(key)
    forge_account(vault, "t.disabled", lambda row: row._replace(disabled=False))
    own_password = "a password the attacker chose 7741"
    forge_account(
        vault,
        "t.victim",
        lambda row: row._replace(password_hash=PasswordHasher().hash(own_password)),
    )

    for name, password in (
        ("t.locked", PASSWORD),
        ("t.disabled", PASSWORD),
        ("t.victim", own_password),
    ):
        with pytest.raises(AuthenticationFailed):
            vault.login(name, password, totp=totp_now(vault, TOTP_SECRETS[name]))
    logged = tampering(vault)
    for name in ("t.locked", "t.disabled", "t.victim"):
        assert {"row": "account", "account": name} in logged


def test_a_database_writer_cannot_plant_a_second_factor_or_an_enrolment_code(
    vault: Vault,
) -> None:
    login(vault, Role.OFFICER, "t.officer")
    planted = "an enrolment code the attacker chose"

    def plant(row: AccountRow) -> AccountRow:
        attributes = attributes_of(row)
        security = dict(attributes["security"])  # type: ignore[call-overload]
        security["enrolment"] = {
            "hash": hashlib.sha256(planted.encode()).hexdigest(),
            "expires": 9e12,
        }
        attributes["security"] = security
        return row._replace(attributes=orjson.dumps(attributes))

    forge_account(vault, "t.officer", plant)
    with pytest.raises(AuthenticationFailed):
        vault.enrolment(planted)


def test_the_account_the_vault_writes_itself_still_works(vault: Vault) -> None:
    """The other side of the tags: every change the vault makes keeps the row valid."""
    login(vault, Role.OFFICER, "t.officer")
    vault.admin.disable_account(vault.operator, "t.officer")
    vault.admin.enable_account(vault.operator, "t.officer")
    vault.admin.unlock_account(vault.operator, "t.officer")
    enrol(vault, "t.officer")
    vault.login("t.officer", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.officer"]))
    account = vault._accounts.get("t.officer")
    assert account is not None and "row_mac" not in account.attributes
    assert tampering(vault) == []


# -- sessions and API tokens ---------------------------------------------------------


def test_a_forged_session_row_opens_nothing_and_is_logged_as_tampering(vault: Vault) -> None:
    session = login(vault, Role.OFFICER, "t.officer")
    row = vault._storage.get_session(token_key(session.token))
    assert row is not None

    # Raising the role, or moving the end, of a session the writer holds.
    forge_session(vault, row._replace(role=Role.SUPERVISOR.value))
    with pytest.raises(AuthenticationFailed):
        vault.session_for(session.token)
    forge_session(vault, row._replace(expires=row.expires + 365 * 86400))
    with pytest.raises(AuthenticationFailed):
        searches(vault, session)

    # A session planted for a token of the writer's own choosing, in the right shape.
    planted = os.urandom(32).hex()[:43]
    forge_session(
        vault,
        SessionRow(
            token_key(planted),
            "t.officer",
            "supervisor",
            row.issued_at,
            row.expires,
            row.last_seen,
            None,
        ),
    )
    with pytest.raises(AuthenticationFailed):
        vault.session_for(planted)
    logged = tampering(vault)
    assert logged.count({"row": "session", "account": "t.officer"}) >= 3
    assert not any(session.token in str(e) or planted in str(e) for e in logged)


def test_a_forged_api_token_row_opens_nothing(vault: Vault) -> None:
    login(vault, Role.OFFICER, "t.officer")
    token = vault.admin.issue_api_token(vault.operator, "t.officer", "search", days=1)
    assert vault.session_for(token).scope == "search"
    key = "api_token:" + hashlib.sha256(token.encode()).hexdigest()
    stored = vault._storage.get_meta(key)
    assert stored is not None
    doc = orjson.loads(stored)

    # Its expiry moved a year on.
    forge_meta(vault, key, orjson.dumps({**doc, "expires": doc["expires"] + 365 * 86400}))
    with pytest.raises(AuthenticationFailed):
        vault.session_for(token)
    # A token of the writer's own, with a row copied from the real one (tag included).
    own = "cst_" + os.urandom(32).hex()
    forge_meta(vault, "api_token:" + hashlib.sha256(own.encode()).hexdigest(), stored)
    with pytest.raises(AuthenticationFailed):
        vault.session_for(own)
    logged = tampering(vault)
    assert logged.count({"row": "api_token", "account": "t.officer"}) == 2


# -- a right password on an account awaiting enrolment ---------------------------------


def test_a_right_password_on_an_account_awaiting_enrolment_answers_like_a_wrong_one(
    vault: Vault,
) -> None:
    vault.admin.add_account(vault.operator, "t.pending", PASSWORD, Role.OFFICER)
    answers = []
    for password in (PASSWORD, "a wrong password 5513", PASSWORD):
        with pytest.raises(AuthenticationFailed) as refused:
            vault.login("t.pending", password, client="192.0.2.44")
        answers.append((type(refused.value), str(refused.value)))
    assert answers[0] == answers[1] == answers[2]
    # Counted like a wrong one too, so the throttle says nothing either.
    logins = [e for _, e in vault._log.entries() if e.action == Action.LOGIN]
    assert [(e.outcome, e.role) for e in logins] == [(Outcome.DENIED, "")] * 3
    assert vault._storage.login_failures(["account:t.pending"])["account:t.pending"][0] == 3


def test_rows_written_by_hand_in_the_wrong_shape_fail_closed(sqlite_vault: Vault) -> None:
    vault = sqlite_vault
    session = login(vault, Role.OFFICER, "t.officer")
    conn = writer(database(vault))
    try:
        conn.execute("UPDATE sessions SET expires = 'never'")
        conn.execute("UPDATE accounts SET attributes = x'00ff'")
    finally:
        conn.close()
    with pytest.raises(AuthenticationFailed):
        vault.session_for(session.token)
    with pytest.raises(AuthenticationFailed):
        vault.login("t.officer", PASSWORD, totp=totp_now(vault, TOTP_SECRETS["t.officer"]))
    logged = tampering(vault)
    assert {"row": "session", "account": "t.officer"} in logged
    assert {"row": "account", "account": "t.officer"} in logged


def test_the_host_operator_seals_an_old_vault_once_from_the_command_line(
    tmp_path: Path,
) -> None:
    from tests.test_cli_client import run

    vault = make_vault(tmp_path, "sqlite")
    directory = vault.directory
    assert directory is not None
    vault.close()
    conn = writer(VaultLayout(directory).database)
    conn.execute("DELETE FROM meta WHERE key = 'settings_mac'")
    conn.close()
    env = {
        "CUSTODES_VAULT": str(directory),
        "CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE,
        "CUSTODES_KEYRING": str(tmp_path / "keys" / "test.keyring"),
    }
    refused = run("account", "list", env=env)
    assert refused.returncode == 4 and "custodes upgrade" in refused.stderr
    done = run("upgrade", env=env)
    assert done.returncode == 0, done.stderr
    assert "sealed" in done.stdout
    assert run("account", "list", env=env).returncode == 0
    again = run("upgrade", env=env)
    assert again.returncode == 2 and "sealed already" in again.stderr
