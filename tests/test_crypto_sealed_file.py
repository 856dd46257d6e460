"""The sealed-file recipe behind the keyring and the signing keys, and how it may be attacked."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custodes.crypto import sealed_file
from custodes.crypto.sealed_file import KdfParams, SealedHeader
from custodes.errors import KeyringError, StorageError

# The OWASP floor: the cheapest settings the recipe accepts, so tests stay fast.
FAST = KdfParams(time_cost=2, memory_kib=19_456)
PASSPHRASE = "p\u00e4ssphrase"  # composed a-umlaut
HEADER = {"format": "custodes-test", "version": 1}
NOT_JSON = "not a test file (not a JSON document)"
FAILED = "wrong passphrase or damaged test file"

# Sealed with salt 00..0f and nonce 10..1b; computed apart from this code with argon2id
# and AES-GCM directly, so a change to the layout or the AAD fails here.
KNOWN_ANSWER = b"""{
  "format": "custodes-test",
  "version": 1,
  "kdf": {
    "alg": "argon2id",
    "salt": "AAECAwQFBgcICQoLDA0ODw==",
    "time_cost": 2,
    "memory_kib": 19456,
    "parallelism": 1
  },
  "nonce": "EBESExQVFhcYGRob",
  "sealed": "nvmP0dUKlO4SFuftauDvGmOVYXs/2ZUjBf8="
}
"""


def _lenient(text: Any, length: int | None) -> bytes:
    data = base64.b64decode(text, validate=True)
    if length is not None and len(data) != length:
        raise KeyringError("a field has the wrong length")
    return data


def _check(doc: Any) -> SealedHeader:
    if not isinstance(doc, dict) or doc.get("format") != "custodes-test":
        raise KeyringError("not a test file")
    fields = {"format": doc["format"], "version": doc["version"]}
    return SealedHeader.from_document(fields, doc, decode=_lenient, sealed_length=None)


def _unseal(data: bytes, passphrase: str = PASSPHRASE) -> tuple[SealedHeader, bytes]:
    return sealed_file.unseal_document(
        data, passphrase=passphrase, check_header=_check, not_json=NOT_JSON, unseal_failed=FAILED
    )


def _edited(data: bytes, change: Any) -> bytes:
    doc = json.loads(data)
    change(doc)
    return json.dumps(doc).encode()


def test_known_answer_document_opens() -> None:
    header, secret = _unseal(KNOWN_ANSWER)
    assert secret == b"the secret"
    assert header.fields == HEADER
    assert header.kdf == FAST


def test_known_answer_document_is_written_byte_for_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([bytes(range(16)), bytes(range(16, 28))])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    assert sealed_file.seal_document(HEADER, b"the secret", PASSPHRASE, FAST) == KNOWN_ANSWER


@settings(max_examples=10, deadline=None)
@given(secret=st.binary(max_size=256), purpose=st.text(max_size=20))
def test_sealed_document_round_trips(secret: bytes, purpose: str) -> None:
    data = sealed_file.seal_document(dict(HEADER, purpose=purpose), secret, PASSPHRASE, FAST)
    header, opened = sealed_file.unseal_document(
        data,
        passphrase=PASSPHRASE,
        check_header=lambda doc: SealedHeader.from_document(
            {"format": doc["format"], "version": doc["version"], "purpose": doc["purpose"]},
            doc,
            decode=_lenient,
            sealed_length=None,
        ),
        not_json=NOT_JSON,
        unseal_failed=FAILED,
    )
    assert opened == secret
    assert header.fields["purpose"] == purpose


def test_stolen_file_holds_no_secret_in_the_clear() -> None:
    secret = os.urandom(32)
    data = sealed_file.seal_document(HEADER, secret, PASSPHRASE, FAST)
    for spelling in (secret, secret.hex().encode(), base64.b64encode(secret)):
        assert spelling not in data


def test_each_seal_draws_a_fresh_salt_and_nonce() -> None:
    first = json.loads(sealed_file.seal_document(HEADER, b"s", PASSPHRASE, FAST))
    second = json.loads(sealed_file.seal_document(HEADER, b"s", PASSPHRASE, FAST))
    assert first["kdf"]["salt"] != second["kdf"]["salt"]
    assert first["nonce"] != second["nonce"]


def test_wrong_passphrase_is_refused_in_the_formats_words() -> None:
    with pytest.raises(KeyringError, match=f"^{re.escape(FAILED)}$"):
        _unseal(KNOWN_ANSWER, "passphrase")


def test_passphrase_opens_whatever_its_unicode_composition() -> None:
    _, secret = _unseal(KNOWN_ANSWER, "pa\u0308ssphrase")  # a + combining diaeresis
    assert secret == b"the secret"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda d: d.update(version=2), id="header-field"),
        pytest.param(lambda d: d["kdf"].update(time_cost=3), id="kdf-cost"),
        pytest.param(lambda d: d["kdf"].update(salt="AAECAwQFBgcICQoLDA0ODg=="), id="salt"),
        pytest.param(lambda d: d.update(nonce="EBESExQVFhcYGRoa"), id="nonce"),
        pytest.param(
            lambda d: d.update(sealed="nvmP0dUKlO4SFuftauDvGmOVYXs/2ZUjBf4="), id="ciphertext"
        ),
    ],
)
def test_edited_header_or_seal_is_detected(change: Any) -> None:
    with pytest.raises(KeyringError, match=f"^{re.escape(FAILED)}$"):
        _unseal(_edited(KNOWN_ANSWER, change))


def test_kdf_cost_below_the_floor_in_the_header_is_refused() -> None:
    with pytest.raises(KeyringError, match="memory_kib"):
        _unseal(_edited(KNOWN_ANSWER, lambda d: d["kdf"].update(memory_kib=8)))


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"not json"])
def test_file_that_is_not_json_is_refused_in_the_formats_words(data: bytes) -> None:
    with pytest.raises(KeyringError, match=f"^{re.escape(NOT_JSON)}$"):
        _unseal(data)


def test_header_check_refuses_before_any_key_is_derived(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object) -> bytes:
        raise AssertionError("derived a key for a refused header")

    monkeypatch.setattr(sealed_file, "sealing_key", never)
    with pytest.raises(KeyringError, match="not a test file"):
        _unseal(_edited(KNOWN_ANSWER, lambda d: d.update(format="other")))


def test_empty_passphrase_is_refused() -> None:
    for passphrase in ("", None, b"bytes"):
        with pytest.raises(KeyringError, match="passphrase"):
            sealed_file.check_passphrase(passphrase)  # type: ignore[arg-type]


@given(st.binary(max_size=64))
def test_strict_base64_round_trips(data: bytes) -> None:
    assert sealed_file.strict_b64decode(sealed_file.b64encode(data)) == data


@pytest.mark.parametrize("text", ["AB==", "AAB=", "AAA", "AA A=", "AA\u00e9=", "A===", "*AAA"])
def test_strict_base64_refuses_all_but_the_canonical_spelling(text: str) -> None:
    assert sealed_file.strict_b64decode(text) is None


def test_new_file_is_private_to_its_owner(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    sealed_file.make_private_directory(directory, what="test directory")
    sealed_file.write_new_file(directory / "f", b"data", what="test file")
    assert (directory / "f").read_bytes() == b"data"
    assert stat.S_IMODE((directory / "f").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert [p.name for p in directory.iterdir()] == ["f"]


def test_new_file_never_overwrites_an_existing_one(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"first")
    with pytest.raises(KeyringError, match="test file already exists, refusing to overwrite"):
        sealed_file.write_new_file(path, b"second", what="test file")
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_missing_sealed_file_is_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match=r"^test file not found: "):
        sealed_file.read_sealed_file(tmp_path / "absent", what="test file")


def test_replacing_a_file_leaves_the_new_one_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    sealed_file.replace_file_durably(path, b"new")
    sealed_file.replace_sealed_file(path, b"newer", what="test file")
    assert path.read_bytes() == b"newer"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_replacing_in_a_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot write"):
        sealed_file.replace_file_durably(tmp_path / "absent" / "f", b"data")
    with pytest.raises(KeyringError, match="cannot write test file"):
        sealed_file.replace_sealed_file(tmp_path / "absent" / "f", b"data", what="test file")


def test_file_lock_admits_one_holder_at_a_time(tmp_path: Path) -> None:
    lock = tmp_path / "f.lock"
    events: list[str] = []
    held = threading.Event()

    def second() -> None:
        held.wait()
        with sealed_file.file_lock(lock):
            events.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with sealed_file.file_lock(lock):
        held.set()
        time.sleep(0.2)
        events.append("first")
    thread.join()
    assert events == ["first", "second"]
