"""Threat 18: a database writer without keys hides a person from search by deleting or
repointing a row of the blind index. `Vault.verify_records` (and `custodes audit verify
--records`) re-derives every record's tokens with the keys and finds the rows that moved.
Runs on the in-memory and the SQLite backend alike.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from custodes.errors import AccessDenied
from custodes.policy import AccessPurpose, Action, Role
from custodes.storage.memory import MemoryStorage
from custodes.vault import Vault
from tests.conftest import PASSPHRASE, login

LOOKUP = AccessPurpose("identity check", "C-2024/9")


def _token_row(vault: Vault, record_id: str, index: str) -> tuple[int, int]:
    """The (index id, token) under which a search by `index` finds the record."""
    spec = vault.schema.types["person"].indexes[index]
    pairs = {
        pair
        for _, rid, pairs in vault._storage.record_tokens(0, 10**6)
        if rid == record_id
        for pair in pairs
    }
    [pair] = [p for p in pairs if p[0] == spec.index_id]
    return pair


def _move_token_row(vault: Vault, pair: tuple[int, int], source: str, target: str | None) -> None:
    """What a database writer does: the row taken off one record, onto another or nowhere."""
    storage = vault._storage
    if isinstance(storage, MemoryStorage):
        storage._tokens[pair].discard(source)
        if target is not None:
            storage._tokens[pair].add(target)
        return
    assert vault.directory is not None
    db = sqlite3.connect(vault.directory / "vault.db")
    try:
        seq = "(SELECT seq FROM records WHERE record_id = ?)"
        where = f"index_id = ? AND token = ? AND seq = {seq}"
        # The row lies in one of the two token trees; the writer changes it in both.
        for tree in ("tokens", "tokens_fresh"):
            if target is None:
                db.execute(f"DELETE FROM {tree} WHERE {where}", (*pair, source))
            else:
                db.execute(
                    f"UPDATE {tree} SET seq = {seq} WHERE {where}",
                    (target, *pair, source),
                )
        db.commit()
    finally:
        db.close()


def _search(vault: Vault, person: dict[str, object]) -> list[str]:
    officer = login(vault, Role.INVESTIGATOR, f"inv.{os.urandom(3).hex()}")
    found = vault.search(
        officer,
        LOOKUP,
        record_type="person",
        index="national_id",
        values={"national_id": str(person["national_id"])},
    )
    return [view.record_id for view in found]


@pytest.fixture
def ingested(vault: Vault, population_file: Path) -> Vault:
    assert vault.ingest(vault.operator, population_file).rejected == 0
    return vault


def test_an_untouched_index_verifies_and_the_check_is_logged_with_counts_only(
    ingested: Vault, people: list[dict[str, object]]
) -> None:
    check = ingested.verify_records(ingested.operator)
    assert check.ok
    assert check.records == ingested.count()
    assert (check.missing, check.extra, check.repointed, check.unreadable) == (0, 0, 0, 0)
    [(_, entry)] = [
        (i, e) for i, e in ingested._log.entries() if e.action == Action.RECORDS_VERIFY.value
    ]
    assert entry.detail["records"] == check.records and entry.records == ()


@pytest.mark.parametrize("attack", ["deleted", "repointed"])
def test_a_repointed_or_deleted_token_row_is_found_by_verify_records(
    ingested: Vault, people: list[dict[str, object]], attack: str
) -> None:
    victim, other = people[3], people[4]
    codec = ingested._codec
    victim_id = codec.record_id("person", [str(victim["national_id"])])
    other_id = codec.record_id("person", [str(other["national_id"])])
    assert _search(ingested, victim) == [victim_id]

    pair = _token_row(ingested, victim_id, "national_id")
    _move_token_row(ingested, pair, victim_id, other_id if attack == "repointed" else None)
    assert _search(ingested, victim) == []  # hidden: the search finds nobody

    check = ingested.verify_records(ingested.operator)
    assert not check.ok
    assert check.missing == 1
    assert (check.extra, check.repointed) == ((1, 1) if attack == "repointed" else (0, 0))
    shown = repr(check) + repr(check.counts())
    for person in (victim, other):
        for value in (person["national_id"], person["name"]):
            assert str(value) not in shown
    assert victim_id not in shown


@pytest.mark.parametrize("role", [Role.OFFICER, Role.INVESTIGATOR, Role.ADMIN])
def test_only_auditors_and_the_operator_verify_the_search_index(
    ingested: Vault, role: Role
) -> None:
    with pytest.raises(AccessDenied):
        ingested.verify_records(login(ingested, role, f"someone.{role.value}"))
    auditor = login(ingested, Role.AUDITOR, "an.auditor")
    assert ingested.verify_records(auditor).ok


def test_audit_verify_records_exits_non_zero_on_a_deleted_token_row(
    sqlite_vault: Vault, population_file: Path, people: list[dict[str, object]]
) -> None:
    vault = sqlite_vault
    vault.ingest(vault.operator, population_file)
    victim_id = vault._codec.record_id("person", [str(people[5]["national_id"])])
    pair = _token_row(vault, victim_id, "phone")
    assert vault.directory is not None
    directory = vault.directory

    def verify() -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODES_")}
        env["CUSTODES_KEYRING_PASSPHRASE"] = PASSPHRASE
        command = ["audit", "verify", "--records", "--vault", str(directory)]
        return subprocess.run(
            [sys.executable, "-m", "custodes", *command],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )

    done = verify()
    assert done.returncode == 0, done.stderr
    assert "search index verified" in done.stdout
    _move_token_row(vault, pair, victim_id, None)
    done = verify()
    assert done.returncode != 0
    assert "1 rows missing" in done.stderr
    for value in (people[5]["national_id"], people[5]["phone"], people[5]["name"]):
        assert str(value) not in done.stdout + done.stderr
