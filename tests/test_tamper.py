"""Threat 4 and 16's cousin for data: whoever can write the database cannot make the vault
return wrong data. A flipped bit or a moved ciphertext is an integrity error, logged.
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from custodes.audit import Outcome
from custodes.errors import TamperDetected
from custodes.storage import MemoryStorage
from custodes.vault import Vault
from tests.conftest import PURPOSE, login, make_vault, read_records


@pytest.fixture(scope="module")
def memory_vault_loaded(tmp_path_factory: pytest.TempPathFactory, population_file: Path) -> Vault:
    vault = make_vault(tmp_path_factory.mktemp("tamper"), "memory")
    vault.ingest(vault.operator, population_file)
    return vault


_EXAMPLES = itertools.count()


def stored_ids(vault: Vault) -> list[str]:
    storage = vault._storage
    assert isinstance(storage, MemoryStorage)
    return sorted(storage._records)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_bit_flipped_in_a_stored_record_is_detected(
    memory_vault_loaded: Vault, data: st.DataObject
) -> None:
    vault = memory_vault_loaded
    storage = vault._storage
    assert isinstance(storage, MemoryStorage)
    record_id = data.draw(st.sampled_from(stored_ids(vault)))
    original = storage._records[record_id]
    target = data.draw(st.sampled_from(["payload", "wrapped_key"]))
    blob = bytearray(getattr(original, target))
    bit = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[bit // 8] ^= 1 << (bit % 8)
    storage._records[record_id] = original._replace(**{target: bytes(blob)})
    # A name of its own per example: hypothesis may draw the same bit of the same record
    # for the payload and for the wrapped key.
    session = login(vault, username=f"t.{next(_EXAMPLES)}")
    try:
        with pytest.raises(TamperDetected):
            vault.record(session, PURPOSE, record_id)
    finally:
        storage._records[record_id] = original
    _, entry = list(vault._log.entries())[-1]
    assert entry.outcome is Outcome.ERROR and entry.detail["error"] == "TamperDetected"


def test_ciphertext_moved_between_records_in_the_database_is_detected(
    tmp_path: Path, population_file: Path
) -> None:
    vault = make_vault(tmp_path, "sqlite")
    vault.ingest(vault.operator, population_file)
    people = [r for r in read_records(population_file) if r["type"] == "person"][:2]
    session = login(vault)
    ids = [
        vault.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": str(p["national_id"])},
        )[0].record_id
        for p in people
    ]
    vault.close()
    # The thief with write access swaps the two people's sealed fields.
    db = sqlite3.connect(tmp_path / "vault" / "vault.db")
    with db:
        a, b = (
            db.execute("SELECT payload FROM records WHERE record_id = ?", (i,)).fetchone()[0]
            for i in ids
        )
        db.execute("UPDATE records SET payload = ? WHERE record_id = ?", (b, ids[0]))
        db.execute("UPDATE records SET payload = ? WHERE record_id = ?", (a, ids[1]))
    db.close()
    from custodes.bootstrap import open_vault
    from tests.conftest import FAST_HASH, PASSPHRASE, PASSWORD, TOTP_SECRETS, totp_code

    reopened = open_vault(tmp_path / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        totp = totp_code(TOTP_SECRETS["t.investigator"])
        session = reopened.login("t.investigator", PASSWORD, totp=totp)
        for record_id in ids:
            with pytest.raises(TamperDetected):
                reopened.reveal(session, PURPOSE, record_id, "name")
    finally:
        reopened.close()


@pytest.mark.parametrize("relabel", ["case", "unknown"])
def test_record_relabelled_with_another_type_tag_in_the_database_is_detected(
    tmp_path: Path, population_file: Path, relabel: str
) -> None:
    vault = make_vault(tmp_path, "sqlite")
    vault.ingest(vault.operator, population_file)
    person = next(r for r in read_records(population_file) if r["type"] == "person")
    record_id = vault._codec.record_id("person", (str(person["national_id"]),))
    tag = vault._codec.type_tag("case") if relabel == "case" else "0" * 16
    login(vault)  # the investigator's account, for after the reopening
    vault.close()
    # The row keeps its sealed payload; only the keyed type tag beside it is rewritten,
    # so the record would be read as a case (or as nothing the schema knows).
    db = sqlite3.connect(tmp_path / "vault" / "vault.db")
    with db:
        db.execute("UPDATE records SET record_type = ? WHERE record_id = ?", (tag, record_id))
    db.close()
    from custodes.bootstrap import open_vault
    from tests.conftest import FAST_HASH, PASSPHRASE, PASSWORD, TOTP_SECRETS, totp_code

    reopened = open_vault(tmp_path / "vault", passphrase=PASSPHRASE, hash_cost=FAST_HASH)
    try:
        totp = totp_code(TOTP_SECRETS["t.investigator"])
        session = reopened.login("t.investigator", PASSWORD, totp=totp)
        with pytest.raises(TamperDetected):
            reopened.record(session, PURPOSE, record_id)
    finally:
        reopened.close()
