"""Threat 19: the holder of the keyring and its passphrase holds no KEK when a token does.

Runs on SoftHSM2, with its configuration and token directory in the test's own temporary
directory. Skipped if SoftHSM2 or python-pkcs11 is missing, failed instead under
CUSTODES_REQUIRE_POSTGRES=1 (CI), so that CI cannot pass by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from custodes.bootstrap import assemble_vault, create_vault, unlock_vault
from custodes.crypto import Keyring, RecordSealer
from custodes.crypto.pkcs11 import KeyStoreUnavailable
from custodes.errors import ConfigurationError, KeyringError
from custodes.vault import Vault
from tests.conftest import FAST_HASH, FAST_KDF, PASSPHRASE, PURPOSE, login, read_records

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
LABEL = "custodes-test"
PIN = "4213-tests-only"
SO_PIN = "9876-tests-only"


def _missing() -> str | None:
    if shutil.which("softhsm2-util") is None:
        return "SoftHSM2 is not installed (softhsm2-util not found)"
    if not Path(MODULE).exists():
        return f"SoftHSM2's PKCS#11 module is not at {MODULE}"
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 is not installed (the 'hsm' extra)"
    return None


class SoftHsm:
    """A SoftHSM2 of the test's own: its config and tokens under one directory."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self._monkeypatch = monkeypatch
        self.root = root
        self.use(root)

    def use(self, root: Path) -> None:
        """Point this process (and the workers it starts) at the tokens under root."""
        tokens = root / "tokens"
        tokens.mkdir(parents=True, exist_ok=True)
        conf = root / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
        self.conf = conf
        self._monkeypatch.setenv("SOFTHSM2_CONF", str(conf))
        import pkcs11

        # The module reads its configuration when initialised: start it again on this one.
        pkcs11.lib(MODULE).reinitialize()

    def init_token(self, label: str = LABEL) -> None:
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                PIN,
                "--so-pin",
                SO_PIN,
            ],
            env={**os.environ, "SOFTHSM2_CONF": str(self.conf)},
            check=True,
            capture_output=True,
        )
        import pkcs11

        pkcs11.lib(MODULE).reinitialize()


@pytest.fixture
def hsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHsm]:
    reason = _missing()
    if reason is not None:
        if os.environ.get("CUSTODES_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason} (CUSTODES_REQUIRE_POSTGRES=1)")
        pytest.skip(reason)
    softhsm = SoftHsm(tmp_path / "softhsm", monkeypatch)
    softhsm.init_token()
    monkeypatch.setenv("CUSTODES_PKCS11_PIN", PIN)
    yield softhsm


def token_vault(tmp_path: Path) -> Vault:
    return create_vault(
        tmp_path / "vault",
        passphrase=PASSPHRASE,
        keyring_path=tmp_path / "keys" / "test.keyring",
        log_key_path=tmp_path / "keys" / "test.logkey",
        kdf=FAST_KDF,
        hash_cost=FAST_HASH,
        pkcs11_module=MODULE,
        pkcs11_token=LABEL,
    )


def reopen(tmp_path: Path) -> Vault:
    unlocked = unlock_vault(tmp_path / "vault", passphrase=PASSPHRASE)
    return assemble_vault(unlocked, hash_cost=FAST_HASH, host=True)


def first_person(population_file: Path) -> dict[str, Any]:
    return next(r for r in read_records(population_file) if r["type"] == "person")


def test_vault_with_its_kek_in_a_token_ingests_searches_and_reveals(
    hsm: SoftHsm, tmp_path: Path, population_file: Path
) -> None:
    vault = token_vault(tmp_path)
    try:
        # Two workers: each opens a session of its own on the token.
        report = vault.ingest(vault.operator, population_file, workers=2, batch_size=97)
        assert report.rejected == 0 and report.accepted > 0
    finally:
        vault.close()
    person = first_person(population_file)
    vault = reopen(tmp_path)
    try:
        session = login(vault)
        found = vault.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": str(person["national_id"])},
        )
        assert len(found) == 1
        rid = found[0].record_id
        assert vault.reveal(session, PURPOSE, rid, "address") == person["address"]
    finally:
        vault.close()


def test_keyring_of_a_token_vault_holds_no_kek(hsm: SoftHsm, tmp_path: Path) -> None:
    token_vault(tmp_path).close()
    keyring_path = tmp_path / "keys" / "test.keyring"
    keyring = Keyring.open(keyring_path, passphrase=PASSPHRASE, token_pin=PIN)
    assert keyring.material.keks == {}
    assert keyring.material.token is not None
    assert keyring.material.token.token_label == LABEL
    header = json.loads(keyring_path.read_bytes())
    assert header["keks_in"]["token_label"] == LABEL
    assert PIN not in keyring_path.read_text()
    assert PIN not in repr(keyring.material)


def test_keyring_and_database_without_the_token_open_nothing(
    hsm: SoftHsm, tmp_path: Path, population_file: Path
) -> None:
    vault = token_vault(tmp_path)
    try:
        vault.ingest(vault.operator, population_file)
    finally:
        vault.close()
    values = {str(v) for r in read_records(population_file) for v in r.values() if v}

    # Another host: the keyring file, its passphrase, the PIN and the database, no token.
    hsm.use(tmp_path / "elsewhere")
    with pytest.raises(KeyStoreUnavailable) as missing:
        reopen(tmp_path)
    assert LABEL in str(missing.value) and "not present" in str(missing.value)
    assert not any(v in str(missing.value) for v in values)

    # Nor can the key material alone, unsealed, be made to open a record.
    material = Keyring.open(
        tmp_path / "keys" / "test.keyring", passphrase=PASSPHRASE, token_pin=PIN
    ).material
    with pytest.raises(KeyStoreUnavailable, match=LABEL):
        RecordSealer(material)

    # A token of the same label, made afresh: it lacks the vault's key.
    hsm.init_token()
    with pytest.raises(KeyStoreUnavailable) as no_key:
        reopen(tmp_path)
    assert "custodes-kek-" in str(no_key.value) and LABEL in str(no_key.value)
    assert not any(v in str(no_key.value) for v in values)


def test_token_vault_needs_the_pin(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_vault(tmp_path).close()
    monkeypatch.delenv("CUSTODES_PKCS11_PIN")
    with pytest.raises(KeyringError, match="CUSTODES_PKCS11_PIN"):
        reopen(tmp_path)
    monkeypatch.setenv("CUSTODES_PKCS11_PIN", "0000-wrong")
    with pytest.raises(KeyStoreUnavailable, match="PIN"):
        reopen(tmp_path)


def test_creating_a_token_vault_without_the_pin_is_refused(
    hsm: SoftHsm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUSTODES_PKCS11_PIN")
    with pytest.raises(ConfigurationError, match="CUSTODES_PKCS11_PIN"):
        token_vault(tmp_path)
    assert not (tmp_path / "keys" / "test.keyring").exists()


def test_token_kek_is_not_extractable(hsm: SoftHsm, tmp_path: Path) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    token_vault(tmp_path).close()
    token = pkcs11.lib(MODULE).get_token(token_label=LABEL)
    with token.open(user_pin=PIN) as session:
        (key,) = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]


def test_doctor_says_where_the_keks_live(hsm: SoftHsm, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from custodes.cli.doctor import doctor

    token_vault(tmp_path).close()
    result = CliRunner().invoke(doctor, ["--vault", str(tmp_path / "vault"), "--port", "1"])
    first = result.output.splitlines()[0]
    assert f"PKCS#11 token {LABEL!r}" in first and MODULE in first, result.output
    assert PIN not in result.output


def test_doctor_says_a_keyring_file_holds_the_keks(tmp_path: Path) -> None:
    from custodes.doctor import where_keks_live
    from tests.conftest import make_vault

    make_vault(tmp_path, "sqlite").close()
    where = where_keks_live(tmp_path / "vault")
    assert where is not None and where.startswith("in the keyring file ")


def test_a_forked_worker_opens_a_session_of_its_own(
    hsm: SoftHsm, tmp_path: Path, population_file: Path
) -> None:
    # As a server does: unlock and check in the parent, then fork workers that each
    # assemble the vault (and reach the token) for themselves.
    vault = token_vault(tmp_path)
    try:
        vault.ingest(vault.operator, population_file)
    finally:
        vault.close()
    person = first_person(population_file)
    unlocked = unlock_vault(tmp_path / "vault", passphrase=PASSPHRASE)
    assemble_vault(unlocked, hash_cost=FAST_HASH).close()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports by its exit status
        status = 1
        try:
            worker = assemble_vault(unlocked, hash_cost=FAST_HASH, host=True)
            session = login(worker)
            found = worker.search(
                session,
                PURPOSE,
                record_type="person",
                index="national_id",
                values={"national_id": str(person["national_id"])},
            )
            shown = worker.reveal(session, PURPOSE, found[0].record_id, "address")
            worker.close()
            status = 0 if shown == person["address"] else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_init_puts_the_kek_in_the_token_and_takes_the_pin_only_from_the_environment(
    hsm: SoftHsm, tmp_path: Path
) -> None:
    from tests.test_cli_client import run

    target = tmp_path / "cli-vault"
    keyring = tmp_path / "cli-keys" / "k.keyring"
    token = ["--pkcs11-module", MODULE, "--pkcs11-token", LABEL]
    base = {"CUSTODES_KEYRING_PASSPHRASE": PASSPHRASE}
    no_pin = run("init", str(target), "--keyring", str(keyring), *token, env=base)
    assert no_pin.returncode == 2 and "CUSTODES_PKCS11_PIN" in no_pin.stderr
    assert not keyring.exists()
    flag = run("init", str(target), "--keyring", str(keyring), *token, "--pkcs11-pin", PIN)
    assert flag.returncode == 2 and "--pkcs11-pin" in flag.stderr

    done = run(
        "init",
        str(target),
        "--keyring",
        str(keyring),
        *token,
        env={**base, "CUSTODES_PKCS11_PIN": PIN},
    )
    assert done.returncode == 0, done.stderr
    assert f"PKCS#11 token {LABEL!r}" in done.stdout and PIN not in done.stdout
    assert Keyring.token_of(keyring) is not None
    # Every later host command needs the PIN as well as the passphrase.
    listed = run("account", "list", env={**base, "CUSTODES_VAULT": str(target)})
    assert listed.returncode == 3 and "CUSTODES_PKCS11_PIN" in listed.stderr
    listed = run(
        "account",
        "list",
        env={**base, "CUSTODES_VAULT": str(target), "CUSTODES_PKCS11_PIN": PIN},
    )
    assert listed.returncode == 0, listed.stderr


def test_a_wrapped_key_changed_in_storage_fails_as_tampering_and_a_lost_session_does_not(
    hsm: SoftHsm, tmp_path: Path
) -> None:
    from custodes.errors import TamperDetected

    token_vault(tmp_path).close()
    material = Keyring.open(
        tmp_path / "keys" / "test.keyring", passphrase=PASSPHRASE, token_pin=PIN
    ).material
    sealer = RecordSealer(material)
    version, wrapped, payload = sealer.seal("person", "r1", {"name": b"synthetic"})
    assert sealer.open("person", "r1", version, wrapped, payload) == {"name": b"synthetic"}
    flipped = wrapped[:20] + bytes([wrapped[20] ^ 1]) + wrapped[21:]
    with pytest.raises(TamperDetected):
        sealer.open("person", "r1", version, flipped, payload)
    with pytest.raises(TamperDetected):
        sealer.open("person", "r2", version, wrapped, payload)
    sealer.close()
    with pytest.raises(KeyStoreUnavailable, match=LABEL):
        sealer.open("person", "r1", version, wrapped, payload)


def test_a_token_kek_rotates_inside_the_token_and_the_old_one_is_destroyed_there(
    hsm: SoftHsm, tmp_path: Path, population_file: Path
) -> None:
    import pkcs11

    vault = token_vault(tmp_path)
    try:
        vault.ingest(vault.operator, population_file)
    finally:
        vault.close()
    person = first_person(population_file)
    keyring_path = tmp_path / "keys" / "test.keyring"
    before = Keyring.open(keyring_path, passphrase=PASSPHRASE, token_pin=PIN).material
    assert before.token is not None
    old_label = before.token.key_labels[1]
    vault = reopen(tmp_path)
    try:
        state = vault.rotate_keys(vault.operator, sleep=lambda _s: None)
        assert state.finished and state.kek_version == 2
        assert set(vault._storage.key_census().kek_versions) == {2}
        session = login(vault)
        found = vault.search(
            session,
            PURPOSE,
            record_type="person",
            index="national_id",
            values={"national_id": str(person["national_id"])},
        )
        assert vault.reveal(session, PURPOSE, found[0].record_id, "address") == person["address"]
    finally:
        vault.close()
    after = Keyring.open(keyring_path, passphrase=PASSPHRASE, token_pin=PIN).material
    assert after.keks == {} and after.token is not None
    assert set(after.token.key_labels) == {2}
    new_label = after.token.key_labels[2]
    lib = pkcs11.lib(MODULE)
    with lib.get_token(token_label=LABEL).open(user_pin=PIN) as session:
        labels = {
            key.label
            for key in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY})
        }
    # The old KEK is gone from the token itself; the new one never left it.
    assert old_label not in labels and new_label in labels
    assert PIN not in keyring_path.read_text()
