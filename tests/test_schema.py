"""Schemas: the shipped one loads; a user's own works end to end; a broken one is refused
with a message that says what to fix.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from custodes.bootstrap import create_vault
from custodes.errors import SchemaError
from custodes.schema import Sensitivity, load_schema, parse_schema
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login, write_jsonl

VEHICLES = """
name = "vehicles"
version = 1

[types.owner]
source_key = ["national_id"]

[types.owner.fields]
national_id = { kind = "national_id", required = true, sensitivity = "personal", mask = "none" }
plate = { kind = "text", required = true, sensitivity = "personal", mask = "keep:2:1" }

[[types.owner.indexes]]
name = "plate"
fields = ["plate"]
"""


def test_population_schema_declares_every_field_of_the_threat_model() -> None:
    schema = load_schema()
    person = schema.record_type("person")
    assert set(person.fields) == {
        "name",
        "national_id",
        "phone",
        "gender",
        "birth_date",
        "birth_place",
        "ethnicity",
        "education",
        "marital_status",
        "address",
    }
    assert person.fields["ethnicity"].sensitivity is Sensitivity.SENSITIVE
    assert schema.record_type("case").fields["narrative"].sensitivity is Sensitivity.RESTRICTED
    assert {ix.name for ix in person.indexes.values()} >= {"national_id", "phone", "name_birth"}
    ids = [ix.index_id for ix in schema.all_indexes()]
    assert len(ids) == len(set(ids))


def test_a_users_own_schema_works_end_to_end(tmp_path: Path) -> None:
    schema_file = tmp_path / "vehicles.toml"
    schema_file.write_text(VEHICLES, "utf-8")
    vault = create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "k",
        log_key_path=tmp_path / "l",
        schema_path=schema_file,
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
    )
    try:
        source = write_jsonl(
            tmp_path / "o.jsonl", [{"national_id": "11010519491231002X", "plate": "沪A 12345"}]
        )
        assert vault.ingest(vault.operator, source, record_type="owner").accepted == 1
        session = login(vault)
        [found] = vault.search(
            session, PURPOSE, record_type="owner", index="plate", values={"plate": "沪A　12345"}
        )
        assert found.fields["plate"] == "沪A*****5"
    finally:
        vault.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('kind = "text"', 'kind = "licence"'), "unknown kind"),
        (('sensitivity = "personal"', 'sensitivity = "secret"'), "unknown sensitivity"),
        (('mask = "keep:2:1"', 'mask = "stars"'), "unknown mask"),
        (('source_key = ["national_id"]', 'source_key = ["vin"]'), "unknown field"),
        (('fields = ["plate"]', 'fields = ["plate:soundex"]'), "unknown transform"),
        (("version = 1", 'version = "one"'), "'version' must be int"),
    ],
)
def test_a_broken_schema_is_refused_saying_what_is_wrong(
    change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in VEHICLES
    with pytest.raises(SchemaError, match=message):
        parse_schema(VEHICLES.replace(old, new, 1))


def test_a_schema_that_is_not_toml_is_refused() -> None:
    with pytest.raises(SchemaError, match="not valid TOML"):
        parse_schema("name = ")
