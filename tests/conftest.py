"""Shared fixtures: vaults on every backend, with the cheapest key-derivation costs allowed.

The costs are the floors the library accepts, not a switch that turns protection off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from custodes.accounts import HashCost
from custodes.audit.checkpoint import LogSigner, create_log_key
from custodes.bootstrap import create_vault, log_origin, memory_vault
from custodes.crypto import KdfParams, KeyMaterial, Keyring
from custodes.policy import AccessPurpose, Role
from custodes.vault import Session, Vault

FAST_KDF = KdfParams(time_cost=2, memory_kib=19_456, parallelism=1)
FAST_HASH = HashCost(time_cost=2, memory_kib=19_456, parallelism=1)
PASSPHRASE = "a keyring passphrase used only by tests"
PASSWORD = "tests-only: violet harbour quietly 7"
PURPOSE = AccessPurpose("test of the search path", "T-1")


def make_vault(tmp: Path, backend: str) -> Vault:
    if backend == "sqlite":
        return create_vault(
            tmp / "vault",
            passphrase=PASSPHRASE,
            keyring_path=tmp / "keys" / "test.keyring",
            kdf=FAST_KDF,
            hash_cost=FAST_HASH,
        )
    return memory_vault(*memory_keys(tmp), hash_cost=FAST_HASH)


def memory_keys(tmp: Path) -> tuple[KeyMaterial, LogSigner]:
    """A keyring and a log signing key in files of their own, for a vault held in memory."""
    vault_id = os.urandom(16)
    keyring = Keyring.create(
        tmp / "keys" / "mem.keyring", vault_id=vault_id, passphrase=PASSPHRASE, kdf=FAST_KDF
    )
    signer = create_log_key(
        tmp / "keys" / "mem.logkey",
        origin=log_origin(vault_id),
        passphrase=PASSPHRASE,
        kdf=FAST_KDF,
    )
    return keyring.material, signer


@pytest.fixture(params=["memory", "sqlite"])
def vault(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, request.param)
    yield v
    v.close()


@pytest.fixture
def sqlite_vault(tmp_path: Path) -> Iterator[Vault]:
    v = make_vault(tmp_path, "sqlite")
    yield v
    v.close()


def login(vault: Vault, role: Role = Role.INVESTIGATOR, username: str | None = None) -> Session:
    name = username or f"t.{role.value}"
    vault.add_account(name, PASSWORD, role, {"district": "test"})
    return vault.login(name, PASSWORD)


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


@pytest.fixture(scope="session")
def population_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic population (people, cases, deliveries) as JSON Lines."""
    from custodes.synth import write_jsonl as synth_jsonl

    path = tmp_path_factory.mktemp("population") / "population.jsonl"
    with path.open("wb") as f:
        synth_jsonl(f, 300, seed=7)
    return path


def read_records(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
