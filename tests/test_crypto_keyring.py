"""The keyring file: sealed keys kept apart from the data, and every way it may be attacked."""

from __future__ import annotations

import base64
import json
import os
import pickle
import stat
from pathlib import Path
from typing import Any

import pytest

from custodes.crypto import KdfParams, KeyMaterial, Keyring, RecordSealer
from custodes.errors import KeyringError

# The OWASP floor: the cheapest settings the keyring accepts, so tests stay fast.
FAST = KdfParams(time_cost=2, memory_kib=19_456)
VAULT = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
OTHER_VAULT = bytes.fromhex("00112233445566778899aabbccddeeff")
PASSPHRASE = "correct horse battery staple"


@pytest.fixture
def keyring_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "vault.keyring"


@pytest.fixture
def keyring(keyring_path: Path) -> Keyring:
    return Keyring.create(keyring_path, vault_id=VAULT, passphrase=PASSPHRASE, kdf=FAST)


def _edit(path: Path, change: Any) -> None:
    doc = json.loads(path.read_text("utf-8"))
    change(doc)
    path.write_text(json.dumps(doc), "utf-8")


def test_created_keyring_opens_with_its_passphrase(keyring: Keyring, keyring_path: Path) -> None:
    opened = Keyring.open(keyring_path, passphrase=PASSPHRASE, vault_id=VAULT)
    assert opened.vault_id == VAULT
    assert opened.material == keyring.material
    material = opened.material
    assert material.kek_version == 1
    assert set(material.keks) == {1}
    assert len(material.keks[1]) == 32
    assert len(material.index_root) == 32
    assert material.keks[1] != material.index_root


def test_two_keyrings_get_independent_keys(tmp_path: Path) -> None:
    a = Keyring.create(tmp_path / "a", vault_id=VAULT, passphrase=PASSPHRASE, kdf=FAST)
    b = Keyring.create(tmp_path / "b", vault_id=VAULT, passphrase=PASSPHRASE, kdf=FAST)
    assert a.material.keks[1] != b.material.keks[1]
    assert a.material.index_root != b.material.index_root


def test_wrong_passphrase_is_refused(keyring: Keyring, keyring_path: Path) -> None:
    with pytest.raises(KeyringError, match="wrong passphrase or damaged keyring"):
        Keyring.open(keyring_path, passphrase="correct horse battery stapler")


def test_passphrase_opens_whatever_its_unicode_composition(tmp_path: Path) -> None:
    path = tmp_path / "k"
    Keyring.create(path, vault_id=VAULT, passphrase="caf\u00e9 cr\u00e8me", kdf=FAST)
    opened = Keyring.open(path, passphrase="cafe\u0301 cre\u0300me")
    assert opened.vault_id == VAULT


def test_empty_passphrase_is_refused(keyring: Keyring, keyring_path: Path, tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="passphrase"):
        Keyring.create(tmp_path / "new", vault_id=VAULT, passphrase="", kdf=FAST)
    with pytest.raises(KeyringError, match="passphrase"):
        Keyring.open(keyring_path, passphrase="")
    with pytest.raises(KeyringError, match="passphrase"):
        keyring.rotate_kek("")


def test_keyring_of_another_vault_is_refused(keyring: Keyring, keyring_path: Path) -> None:
    with pytest.raises(KeyringError, match="another vault"):
        Keyring.open(keyring_path, passphrase=PASSPHRASE, vault_id=OTHER_VAULT)


def test_vault_id_must_be_16_bytes(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="16 bytes"):
        Keyring.create(tmp_path / "k", vault_id=b"short", passphrase=PASSPHRASE, kdf=FAST)


def test_missing_keyring_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="not found"):
        Keyring.open(tmp_path / "absent", passphrase=PASSPHRASE)


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff\xfe garbage", b"[1, 2, 3]", b'{"format": "something-else", "version": 1}'],
)
def test_file_that_is_not_a_keyring_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "k"
    path.write_bytes(content)
    with pytest.raises(KeyringError, match="not a custodes keyring"):
        Keyring.open(path, passphrase=PASSPHRASE)


def test_unsupported_keyring_version_is_refused(keyring: Keyring, keyring_path: Path) -> None:
    _edit(keyring_path, lambda d: d.update(version=2))
    with pytest.raises(KeyringError, match="unsupported keyring version 2"):
        Keyring.open(keyring_path, passphrase=PASSPHRASE)


def test_lowered_kdf_cost_in_header_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "k"
    Keyring.create(path, vault_id=VAULT, passphrase=PASSPHRASE, kdf=KdfParams(3, 19_456, 1))
    _edit(path, lambda d: d["kdf"].update(time_cost=2))
    with pytest.raises(KeyringError, match="wrong passphrase or damaged keyring"):
        Keyring.open(path, passphrase=PASSPHRASE)


def test_kdf_cost_below_the_floor_in_header_is_refused(
    keyring: Keyring, keyring_path: Path
) -> None:
    _edit(keyring_path, lambda d: d["kdf"].update(memory_kib=1024))
    with pytest.raises(KeyringError, match="memory_kib"):
        Keyring.open(keyring_path, passphrase=PASSPHRASE)


def test_kdf_cost_inflated_in_header_is_refused_before_deriving(
    keyring: Keyring, keyring_path: Path
) -> None:
    _edit(keyring_path, lambda d: d["kdf"].update(memory_kib=2**40))
    with pytest.raises(KeyringError, match="memory_kib"):
        Keyring.open(keyring_path, passphrase=PASSPHRASE)


def test_changed_vault_id_in_header_is_detected(keyring: Keyring, keyring_path: Path) -> None:
    _edit(keyring_path, lambda d: d.update(vault_id=OTHER_VAULT.hex()))
    with pytest.raises(KeyringError, match="wrong passphrase or damaged keyring"):
        Keyring.open(keyring_path, passphrase=PASSPHRASE)
    with pytest.raises(KeyringError, match="another vault"):
        Keyring.open(keyring_path, passphrase=PASSPHRASE, vault_id=VAULT)


def _flip_b64(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[0] ^= 1
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d["kdf"].update(salt=_flip_b64(d["kdf"]["salt"])), id="salt"),
        pytest.param(lambda d: d["kdf"].update(parallelism=2), id="parallelism"),
        pytest.param(lambda d: d["kdf"].update(memory_kib=19_457), id="memory_kib"),
        pytest.param(lambda d: d.update(nonce=_flip_b64(d["nonce"])), id="nonce"),
        pytest.param(lambda d: d.update(sealed=_flip_b64(d["sealed"])), id="sealed"),
    ],
)
def test_edited_header_or_seal_is_detected(
    keyring: Keyring, keyring_path: Path, change: Any
) -> None:
    _edit(keyring_path, change)
    with pytest.raises(KeyringError, match="wrong passphrase or damaged keyring"):
        Keyring.open(keyring_path, passphrase=PASSPHRASE)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d.update(extra="x"), id="extra-field"),
        pytest.param(lambda d: d.pop("nonce"), id="missing-nonce"),
        pytest.param(lambda d: d["kdf"].update(alg="scrypt"), id="other-kdf"),
        pytest.param(lambda d: d["kdf"].update(time_cost="3"), id="cost-as-text"),
        pytest.param(lambda d: d.update(nonce="!!not base64!!"), id="bad-base64"),
        pytest.param(lambda d: d.update(vault_id="zz"), id="bad-hex"),
    ],
)
def test_malformed_header_is_refused_with_keyring_error(
    keyring: Keyring, keyring_path: Path, change: Any
) -> None:
    _edit(keyring_path, change)
    with pytest.raises(KeyringError):
        Keyring.open(keyring_path, passphrase=PASSPHRASE)


def test_kdf_settings_below_the_owasp_floor_are_refused() -> None:
    with pytest.raises(KeyringError, match="time_cost"):
        KdfParams(time_cost=1)
    with pytest.raises(KeyringError, match="memory_kib"):
        KdfParams(memory_kib=19_455)
    with pytest.raises(KeyringError, match="parallelism"):
        KdfParams(parallelism=0)
    assert KdfParams() == KdfParams(time_cost=3, memory_kib=262_144, parallelism=1)


def test_create_refuses_to_overwrite_a_keyring(keyring: Keyring, keyring_path: Path) -> None:
    before = keyring_path.read_bytes()
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        Keyring.create(keyring_path, vault_id=VAULT, passphrase=PASSPHRASE, kdf=FAST)
    assert keyring_path.read_bytes() == before


def test_create_refuses_to_overwrite_any_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not mine")
    with pytest.raises(KeyringError, match="refusing to overwrite"):
        Keyring.create(path, vault_id=VAULT, passphrase=PASSPHRASE, kdf=FAST)
    assert path.read_text() == "not mine"


def test_keyring_file_is_private_to_its_owner(keyring: Keyring, keyring_path: Path) -> None:
    assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keyring_path.parent.stat().st_mode) == 0o700
    keyring.rotate_kek(PASSPHRASE)
    assert stat.S_IMODE(keyring_path.stat().st_mode) == 0o600


def test_no_temporary_files_are_left_behind(keyring: Keyring, keyring_path: Path) -> None:
    keyring.rotate_kek(PASSPHRASE)
    assert os.listdir(keyring_path.parent) == [keyring_path.name]


def test_stolen_keyring_file_holds_no_key_in_the_clear(
    keyring: Keyring, keyring_path: Path
) -> None:
    keyring.rotate_kek(PASSPHRASE)
    content = keyring_path.read_bytes()
    material = keyring.material
    for key in [*material.keks.values(), material.index_root]:
        for form in (
            key,
            key.hex().encode(),
            key.hex().upper().encode(),
            base64.b64encode(key),
            base64.urlsafe_b64encode(key),
            base64.b64encode(key)[:40],  # a prefix, in case of re-wrapped lines
            base64.b32encode(key),
        ):
            assert form not in content
    assert PASSPHRASE.encode() not in content


def test_key_material_repr_hides_keys(keyring: Keyring) -> None:
    material = keyring.material
    for text in (repr(material), str(material), f"{material}", repr(keyring)):
        for key in [*material.keks.values(), material.index_root]:
            assert key.hex() not in text
            assert repr(key) not in text
            assert base64.b64encode(key).decode() not in text
    assert "hidden" in repr(material)


def test_key_material_crosses_a_process_pipe(keyring: Keyring) -> None:
    material = keyring.material
    copy = pickle.loads(pickle.dumps(material))
    assert isinstance(copy, KeyMaterial)
    assert copy == material


def test_rotation_adds_a_current_key_and_old_data_still_opens(
    keyring: Keyring, keyring_path: Path
) -> None:
    old_material = keyring.material
    version, wrapped, payload = RecordSealer(old_material).seal("person", "r1", {"f": b"v"})
    assert version == 1

    assert keyring.rotate_kek(PASSPHRASE) == 2
    assert keyring.rotate_kek(PASSPHRASE) == 3
    reopened = Keyring.open(keyring_path, passphrase=PASSPHRASE, vault_id=VAULT)
    material = reopened.material
    assert material == keyring.material
    assert material.kek_version == 3
    assert set(material.keks) == {1, 2, 3}
    assert material.keks[1] == old_material.keks[1]
    assert material.index_root == old_material.index_root
    assert len(set(material.keks.values())) == 3

    sealer = RecordSealer(material)
    assert sealer.open("person", "r1", version, wrapped, payload) == {"f": b"v"}
    assert sealer.seal("person", "r2", {"f": b"v"})[0] == 3


def test_rotation_writes_a_fresh_salt_and_nonce(keyring: Keyring, keyring_path: Path) -> None:
    before = json.loads(keyring_path.read_text())
    keyring.rotate_kek(PASSPHRASE)
    after = json.loads(keyring_path.read_text())
    assert before["kdf"]["salt"] != after["kdf"]["salt"]
    assert before["nonce"] != after["nonce"]


def test_rotation_with_wrong_passphrase_leaves_the_keyring_unchanged(
    keyring: Keyring, keyring_path: Path
) -> None:
    before = keyring_path.read_bytes()
    with pytest.raises(KeyringError, match="wrong passphrase or damaged keyring"):
        keyring.rotate_kek("not the passphrase")
    assert keyring_path.read_bytes() == before
    assert keyring.material.kek_version == 1


def test_rotation_from_a_stale_copy_cannot_lose_a_newer_key(
    keyring: Keyring, keyring_path: Path
) -> None:
    stale = Keyring.open(keyring_path, passphrase=PASSPHRASE)
    keyring.rotate_kek(PASSPHRASE)
    with pytest.raises(KeyringError, match="changed on disk"):
        stale.rotate_kek(PASSPHRASE)
    reopened = Keyring.open(keyring_path, passphrase=PASSPHRASE)
    assert reopened.material == keyring.material


@pytest.mark.parametrize("weak", ["x", "aaaaaaaaaaaaaa", "password1234", "123456789012"])
def test_a_vault_cannot_be_sealed_with_a_guessable_passphrase(tmp_path: Path, weak: str) -> None:
    # Whoever holds the passphrase and the files reads everything: one character, or a
    # common password, would hand the population to the first guesser.
    from custodes.bootstrap import create_vault
    from custodes.errors import WeakPassword

    with pytest.raises(WeakPassword) as refused:
        create_vault(tmp_path / "vault", passphrase=weak, keyring_path=tmp_path / "k", kdf=FAST)
    assert weak not in str(refused.value) and "keyring passphrase" in str(refused.value)
    assert not (tmp_path / "vault").exists() and not (tmp_path / "k").exists()
