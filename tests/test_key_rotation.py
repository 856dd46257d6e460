"""Key rotation, online (threat 19: a key that leaked or aged stays in use forever): a new
KEK rewraps every data key, --data re-encrypts every record under new data keys, --index
rebuilds every token under a new index key; the old keys are destroyed once nothing
uses them, every record stays readable and findable, and each step is on the log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from custodes.bootstrap import assemble_vault, create_vault, unlock_vault
from custodes.crypto import Keyring
from custodes.errors import ConfigurationError
from custodes.policy import Role
from custodes.settings import VaultLayout
from custodes.vault import Vault
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login
from tests.postgres import (  # noqa: F401 - fixtures, asked for by name
    postgres_dsn_fixture,
    postgres_server_fixture,
)


def _open(directory: Path) -> Vault:
    return assemble_vault(unlock_vault(directory, passphrase=PASSPHRASE), host=True)


@pytest.fixture
def stocked(tmp_path: Path, population_file: Path) -> Iterator[Vault]:
    """A SQLite vault holding the small population, opened on the host from its files
    (so that it follows its keyring file as a server does)."""
    created = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "test.keyring",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    )
    created.ingest(created.operator, population_file)
    created.close()
    vault = _open(tmp_path / "vault")
    yield vault
    vault.close()


UNLIMITED: dict[str, int | None] = {
    "views_per_minute": None,
    "views_per_hour": None,
    "views_per_day": None,
    "subjects_per_day": None,
}
_checkers = 0


def _find_everyone(vault: Vault, people: list[dict[str, Any]]) -> int:
    global _checkers
    _checkers += 1
    session = login(vault, Role.SUPERVISOR, f"r.checker{_checkers}", budget=UNLIMITED)
    found = 0
    for person in people:
        views = vault.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": person["national_id"]},
        )
        found += len(views) == 1
    vault.logout(session)
    return found


def _doctor(vault: Vault) -> set[str]:
    from custodes.doctor import Deployment, examine

    return {f.check for f in examine(Deployment(vault_dir=vault.directory or Path()))}


def _keyring(vault: Vault) -> Keyring:
    return Keyring.open(
        VaultLayout(vault.directory or Path()).read().keyring, passphrase=PASSPHRASE
    )


def test_a_full_rotation_leaves_every_record_found_and_no_old_key(
    stocked: Vault, people: list[dict[str, Any]]
) -> None:
    before = _keyring(stocked).material
    census = stocked._storage.key_census()
    assert set(census.kek_versions) == {1} and set(census.data_generations) == {1}

    state = stocked.rotate_keys(stocked.operator, data=True, index=True, sleep=lambda _s: None)

    assert state.finished
    after = _keyring(stocked).material
    # The old versions are gone from the keyring file, not just unused.
    assert set(after.keks) == {2} and set(after.index_roots()) == {2}
    assert after.data_generation == 2
    assert after.keks[2] != before.keks[1]
    assert after.index_roots()[2] != before.index_roots()[1]
    census = stocked._storage.key_census()
    assert set(census.kek_versions) == {2}
    assert set(census.data_generations) == {2}
    assert {index_id >> 32 for index_id in census.token_index_ids} == {1}  # version 2
    assert _find_everyone(stocked, people) == len(people)
    check = stocked.verify_records(stocked.operator)
    assert check.ok and check.records == sum(census.kek_versions.values())
    # A vault opened afresh after the rotation reads the same.
    stocked.close()
    reopened = _open(stocked.directory or Path())
    try:
        assert _find_everyone(reopened, people[:20]) == 20
        assert reopened.verify_log(reopened.operator).entries > 0  # raises if it fails
        auditor = login(reopened, Role.AUDITOR, "r.auditor")
        steps = [
            entry for _, entry in reopened.read_log(auditor, PURPOSE, action="vault:keys:rotate")
        ]
        assert [s.detail["step"] for s in steps] == [
            "start",
            "pass",
            "swept",
            "tokens-dropped",
            "retired",
        ]
        swept = next(s for s in steps if s.detail["step"] == "swept").detail
        assert swept["resealed"] == swept["records"] == check.records
    finally:
        reopened.close()


def test_a_kek_rotation_rewraps_without_re_encrypting(
    stocked: Vault, people: list[dict[str, Any]]
) -> None:
    payloads = {r.record_id: r.payload for _, r in stocked._storage.records_page(0, 10_000)}
    state = stocked.rotate_keys(stocked.operator, sleep=lambda _s: None)
    assert state.finished and state.kek_version == 2 and state.data_generation == 1
    after = {r.record_id: r for _, r in stocked._storage.records_page(0, 10_000)}
    assert {rid: r.payload for rid, r in after.items()} == payloads
    assert {r.kek_version for r in after.values()} == {2}
    assert set(_keyring(stocked).material.keks) == {2}
    assert _find_everyone(stocked, people[:30]) == 30


def test_an_interrupted_rotation_is_finished_by_resume_and_refuses_a_new_one(
    stocked: Vault, people: list[dict[str, Any]]
) -> None:
    class Killed(Exception):
        pass

    seen = 0

    def progress(done: int, _total: int) -> None:
        nonlocal seen
        seen = done
        if done >= 200:
            raise Killed

    with pytest.raises(Killed):
        stocked.rotate_keys(
            stocked.operator,
            data=True,
            index=True,
            progress=progress,
            sleep=lambda _s: None,
            page=100,
        )
    state = stocked.key_state(stocked.operator)
    assert not state.finished
    assert "keys:rotation-unfinished" in _doctor(stocked)
    assert 0 < state.behind_data < sum(stocked._storage.key_census().kek_versions.values())
    # Every record reads and is found meanwhile, under whichever keys it holds now.
    assert _find_everyone(stocked, people) == len(people)
    with pytest.raises(ConfigurationError, match="--resume"):
        stocked.rotate_keys(stocked.operator, sleep=lambda _s: None)

    state = stocked.rotate_keys(stocked.operator, resume=True, sleep=lambda _s: None)
    assert state.finished
    assert "keys:rotation-unfinished" not in _doctor(stocked)
    assert _find_everyone(stocked, people) == len(people)
    assert stocked.verify_records(stocked.operator).ok
    material = _keyring(stocked).material
    assert set(material.keks) == {2} and set(material.index_roots()) == {2}


def test_a_server_process_follows_a_rotation_done_beside_it(
    stocked: Vault, people: list[dict[str, Any]]
) -> None:
    # Another process's vault (here, a second one on the same files) keeps finding
    # everyone through a rotation it did not run: it reads the keyring again.
    other = _open(stocked.directory or Path())
    try:
        session = login(other, Role.SUPERVISOR, "r.other", budget=UNLIMITED)
        stocked.rotate_keys(stocked.operator, data=True, index=True, sleep=lambda _s: None)
        other._key_watch._last = 0.0  # type: ignore[union-attr]  # its next check is due
        for person in people[:25]:
            views = other.search(
                session,
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": person["national_id"]},
            )
            assert len(views) == 1
    finally:
        other.close()


def test_an_ingest_sealed_under_keys_destroyed_meanwhile_is_refused_whole(
    stocked: Vault, tmp_path: Path
) -> None:
    from custodes.synth import write_jsonl

    stale = stocked._material  # what ingest workers started before the rotation hold
    stocked.rotate_keys(stocked.operator, data=True, index=True, sleep=lambda _s: None)
    more = tmp_path / "more.jsonl"
    with more.open("wb") as f:
        write_jsonl(f, 40, seed=99)
    held = stocked._storage.count_records()
    stocked._material = stale
    with pytest.raises(ConfigurationError, match="rotated while this ingest ran"):
        stocked.ingest(stocked.operator, more, workers=1)
    assert stocked._storage.count_records() == held
    # Run again with the keys of today, it lands.
    stocked._material = _keyring(stocked).material
    report = stocked.ingest(stocked.operator, more, workers=1)
    assert report.accepted > 0 and report.rejected == 0
    assert stocked.verify_records(stocked.operator).ok


def test_the_keys_commands_rotate_and_report_as_the_host_runs_them(
    stocked: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    import custodes.vault.door as door
    from custodes.cli import cli

    directory = str(stocked.directory)
    stocked.close()
    monkeypatch.setenv("CUSTODES_KEYRING_PASSPHRASE", PASSPHRASE)
    runner = CliRunner()
    # No server runs beside it here, so no grace is waited for.
    monkeypatch.setattr(door, "GRACE_SECONDS", 0.0)
    done = runner.invoke(cli, ["keys", "rotate", "--index", "--vault", directory, "--json"])
    assert done.exit_code == 0, done.output
    state = json.loads(done.stdout.strip().splitlines()[-1])
    assert state["finished"] and state["kek_version"] == 2 and state["index_version"] == 2
    status = runner.invoke(cli, ["keys", "status", "--vault", directory])
    assert status.exit_code == 0, status.output
    assert "no older key is live" in status.stdout
    refused = runner.invoke(cli, ["keys", "rotate", "--resume", "--data", "--vault", directory])
    assert refused.exit_code != 0 and "--resume" in refused.output


@pytest.mark.postgres
def test_on_postgresql_a_full_rotation_leaves_every_record_found_and_no_old_key(
    tmp_path: Path, population_file: Path, people: list[dict[str, Any]], postgres_dsn: Any
) -> None:
    created = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "pg.keyring",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        database=postgres_dsn(),
    )
    try:
        created.ingest(created.operator, population_file, workers=1)
    finally:
        created.close()
    vault = _open(tmp_path / "vault")
    try:
        state = vault.rotate_keys(vault.operator, data=True, index=True, sleep=lambda _s: None)
        assert state.finished
        census = vault._storage.key_census()
        assert set(census.kek_versions) == {2} and set(census.data_generations) == {2}
        assert {index_id >> 32 for index_id in census.token_index_ids} == {1}
        assert _find_everyone(vault, people) == len(people)
        assert vault.verify_records(vault.operator).ok
    finally:
        vault.close()
