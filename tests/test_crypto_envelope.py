"""Sealed records: round trips, the pinned format, and one test per way of tampering."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from custodes.crypto import KeyMaterial, RecordSealer
from custodes.errors import TamperDetected

VAULT = bytes(range(16))
KEK1 = bytes(range(32, 64))
KEK2 = bytes(range(64, 96))
ROOT = bytes(range(96, 128))
MATERIAL = KeyMaterial(vault_id=VAULT, kek_version=1, keks={1: KEK1}, index_root=ROOT)
ROTATED = KeyMaterial(vault_id=VAULT, kek_version=2, keks={1: KEK1, 2: KEK2}, index_root=ROOT)

# Synthetic people only.
PERSON = {
    "name": "张伟".encode(),
    "national_id": b"110101199003078515",
    "phone": b"13800138000",
    "birth_date": b"1990-03-07",
    "notes": b"",
}

field_names = st.text(min_size=1, max_size=12).filter(lambda s: len(s.encode()) <= 255)
field_maps = st.dictionaries(field_names, st.binary(max_size=48), max_size=6)


def _counter_random() -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom: SHA-256 in counter mode over a label."""
    state = {"counter": 0}

    def draw(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(b"custodes-kat" + state["counter"].to_bytes(4, "big")).digest()
            state["counter"] += 1
        return out[:n]

    return draw


# A test-side reading of the frame, written from the format description alone.
Entry = tuple[bytes, int, bytes, bytes]  # name, key generation, nonce, ciphertext


def _split(payload: bytes) -> list[Entry]:
    assert payload[0] == 1
    (count,) = struct.unpack_from(">H", payload, 1)
    at = 3
    entries = []
    for _ in range(count):
        name_len = payload[at]
        name = payload[at + 1 : at + 1 + name_len]
        at += 1 + name_len
        generation = payload[at]
        nonce = payload[at + 1 : at + 13]
        (sealed_len,) = struct.unpack_from(">I", payload, at + 13)
        sealed = payload[at + 17 : at + 17 + sealed_len]
        at += 17 + sealed_len
        entries.append((name, generation, nonce, sealed))
    assert at == len(payload)
    return entries


def _join(entries: list[Entry]) -> bytes:
    out = [b"\x01", struct.pack(">H", len(entries))]
    for name, generation, nonce, sealed in entries:
        out += [bytes((len(name),)), name, bytes((generation,)), nonce]
        out += [struct.pack(">I", len(sealed)), sealed]
    return b"".join(out)


@pytest.fixture
def sealer() -> RecordSealer:
    return RecordSealer(MATERIAL)


@pytest.fixture
def sealed(sealer: RecordSealer) -> tuple[int, bytes, bytes]:
    return sealer.seal("person", "rec-a", PERSON)


# --- round trips -----------------------------------------------------------------------


@settings(max_examples=200)
@given(fields=field_maps, record_type=st.text(max_size=10), record_id=st.text(max_size=30))
def test_any_record_round_trips(fields: dict[str, bytes], record_type: str, record_id: str) -> None:
    sealer = RecordSealer(MATERIAL)
    version, wrapped, payload = sealer.seal(record_type, record_id, fields)
    assert version == 1
    assert sealer.open(record_type, record_id, version, wrapped, payload) == fields


@given(fields=field_maps, data=st.data())
def test_open_returns_only_the_requested_fields(
    fields: dict[str, bytes], data: st.DataObject
) -> None:
    sealer = RecordSealer(MATERIAL)
    version, wrapped, payload = sealer.seal("person", "r", fields)
    names = data.draw(st.sets(st.sampled_from([*fields, "absent"])))
    opened = sealer.open("person", "r", version, wrapped, payload, names)
    assert opened == {n: v for n, v in fields.items() if n in names}


def test_a_record_with_no_fields_round_trips(sealer: RecordSealer) -> None:
    version, wrapped, payload = sealer.seal("person", "r", {})
    assert payload == b"\x01\x00\x00"
    assert sealer.open("person", "r", version, wrapped, payload) == {}


def test_payload_from_a_database_driver_as_memoryview_opens(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    # Typed as bytes, but tolerated at run time: some drivers return binary columns so.
    wrapped_view, payload_view = memoryview(wrapped), memoryview(payload)
    opened = sealer.open("person", "rec-a", version, wrapped_view, payload_view)  # type: ignore[arg-type]
    assert opened == PERSON


def test_each_record_gets_its_own_data_key_and_nonces(sealer: RecordSealer) -> None:
    _, wrapped_a, payload_a = sealer.seal("person", "r", PERSON)
    _, wrapped_b, payload_b = sealer.seal("person", "r", PERSON)
    assert wrapped_a != wrapped_b
    nonces = [e[2] for e in _split(payload_a) + _split(payload_b)]
    assert len(set(nonces)) == len(nonces)


def test_stolen_payload_holds_no_plaintext(sealed: tuple[int, bytes, bytes]) -> None:
    _, wrapped, payload = sealed
    for value in PERSON.values():
        if value:
            assert value not in payload
            assert value not in wrapped


# --- the pinned format -----------------------------------------------------------------

KAT_FIELDS = {"name": "李娜".encode(), "national_id": b"11010519491231002X", "empty": b""}
KAT_WRAPPED_HEX = (
    "01738f6a628495dd2f6de1aa35828a3b13a8e952ad8585848b9b861db7258d01"
    "cb152f013e4e32852603049dd0ed64ba3318d8a3742f431bbb0710723b"
)
KAT_PAYLOAD_HEX = (
    "010003"  # format 1, three fields
    "046e616d6501ceccb0b05c74f648024b60cd00000016"  # "name", generation 1, nonce, length
    "56d7e0b5ccc518930113ade9be0f6e0d0dca1671ec27"
    "0b6e6174696f6e616c5f69640192a375cb5c5b847be3ad5c0b00000022"  # "national_id"
    "6242136b8b13da663beac0ae100b3702515f9d2833e6f9f42ff39b5576ed86322faa"
    "05656d70747901e9b3eb690ff97e1629cf93ca00000010"  # "empty": the tag alone
    "30025e52297bf07d82087fcf2ddcd834"
)


def test_known_answer_pins_the_sealed_format() -> None:
    sealer = RecordSealer(MATERIAL, random=_counter_random())
    version, wrapped, payload = sealer.seal("person", "kat-record-0001", KAT_FIELDS)
    assert version == 1
    assert wrapped.hex() == KAT_WRAPPED_HEX
    assert payload.hex() == KAT_PAYLOAD_HEX
    assert RecordSealer(MATERIAL).open("person", "kat-record-0001", 1, wrapped, payload) == (
        KAT_FIELDS
    )


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def test_known_answer_matches_the_documented_construction() -> None:
    """Rebuild the sealed record from the format description with raw AES-GCM."""
    draw = _counter_random()
    data_key = draw(32)
    nonces = draw(12 * (len(KAT_FIELDS) + 1))
    record_id = b"kat-record-0001"
    wrap_aad = _lp(b"custodes/data-key/v1") + _lp(VAULT) + _lp(record_id) + struct.pack(">I", 1)
    wrapped = b"\x01" + nonces[:12] + AESGCM(KEK1).encrypt(nonces[:12], data_key, wrap_aad)
    entries = []
    for position, (name, value) in enumerate(KAT_FIELDS.items()):
        encoded = name.encode()
        nonce = nonces[12 * (position + 1) : 12 * (position + 2)]
        aad = (
            _lp(b"custodes/field/v1")
            + _lp(VAULT)
            + _lp(b"person")
            + _lp(record_id)
            + struct.pack(">HH", len(KAT_FIELDS), position)
            + _lp(encoded)
            + b"\x01"
        )
        entries.append((encoded, 1, nonce, AESGCM(data_key).encrypt(nonce, value, aad)))

    sealer = RecordSealer(MATERIAL, random=_counter_random())
    assert sealer.seal("person", "kat-record-0001", KAT_FIELDS) == (1, wrapped, _join(entries))


# --- tampering: every failure is the one opaque TamperDetected -------------------------


@settings(max_examples=300)
@given(fields=field_maps, data=st.data())
def test_any_single_bit_flip_in_payload_is_detected(
    fields: dict[str, bytes], data: st.DataObject
) -> None:
    sealer = RecordSealer(MATERIAL)
    version, wrapped, payload = sealer.seal("person", "r", fields)
    bit = data.draw(st.integers(0, len(payload) * 8 - 1))
    damaged = bytearray(payload)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TamperDetected):
        sealer.open("person", "r", version, wrapped, bytes(damaged))


@settings(max_examples=200)
@given(bit=st.integers(0, 61 * 8 - 1))
def test_any_single_bit_flip_in_wrapped_key_is_detected(bit: int) -> None:
    sealer = RecordSealer(MATERIAL)
    version, wrapped, payload = sealer.seal("person", "r", PERSON)
    assert len(wrapped) == 61
    damaged = bytearray(wrapped)
    damaged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(TamperDetected):
        sealer.open("person", "r", version, bytes(damaged), payload)


@settings(max_examples=300)
@given(garbage=st.binary(max_size=200), wrapped_garbage=st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_tamper_detected(garbage: bytes, wrapped_garbage: bytes) -> None:
    sealer = RecordSealer(MATERIAL)
    version, wrapped, _ = sealer.seal("person", "r", PERSON)
    with pytest.raises(TamperDetected):
        sealer.open("person", "r", version, wrapped, garbage)
    with pytest.raises(TamperDetected):
        sealer.open("person", "r", version, wrapped_garbage, garbage)


def test_payload_swapped_between_records_is_detected(sealer: RecordSealer) -> None:
    va, wrapped_a, payload_a = sealer.seal("person", "rec-a", PERSON)
    vb, wrapped_b, payload_b = sealer.seal("person", "rec-b", PERSON)
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", va, wrapped_a, payload_b)
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-b", vb, wrapped_b, payload_a)


def test_whole_record_moved_to_another_record_id_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-b", version, wrapped, payload)


def test_wrapped_key_moved_to_another_record_is_detected(sealer: RecordSealer) -> None:
    # Even if the attacker also moves the field ciphertexts, the key wrap names its record.
    version, wrapped_a, payload_a = sealer.seal("person", "rec-a", PERSON)
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-b", version, wrapped_a, payload_a)


def test_ciphertext_moved_to_another_record_is_detected(sealer: RecordSealer) -> None:
    _, _, payload_a = sealer.seal("person", "rec-a", PERSON)
    vb, wrapped_b, payload_b = sealer.seal("person", "rec-b", PERSON)
    entries_b = _split(payload_b)
    entries_b[1] = _split(payload_a)[1]
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-b", vb, wrapped_b, _join(entries_b), ["national_id"])


def test_changed_record_type_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    with pytest.raises(TamperDetected):
        sealer.open("case", "rec-a", version, wrapped, payload)


def test_record_sealed_in_another_vault_is_detected(sealed: tuple[int, bytes, bytes]) -> None:
    # Same keys, different vault id: ciphertexts are bound to the vault they belong to.
    other = RecordSealer(MATERIAL._replace(vault_id=bytes(16)))
    version, wrapped, payload = sealed
    with pytest.raises(TamperDetected):
        other.open("person", "rec-a", version, wrapped, payload)


def test_field_renamed_in_the_frame_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    entries = _split(payload)
    _, generation, nonce, ciphertext = entries[1]
    entries[1] = (b"mobile_no_x", generation, nonce, ciphertext)
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, _join(entries))
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, _join(entries), ["mobile_no_x"])


def test_ciphertext_moved_into_another_field_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    entries = _split(payload)
    # Give "phone" the national ID's nonce and ciphertext, keeping the names in place.
    entries[2] = (entries[2][0], *entries[1][1:])
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, _join(entries), ["phone"])


def test_fields_reordered_in_the_frame_are_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    entries = _split(payload)
    entries[0], entries[1] = entries[1], entries[0]
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, _join(entries), ["name"])


def test_field_dropped_from_the_frame_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    # Deleting a field (a flag, a note) must not pass for a record that never had it.
    version, wrapped, payload = sealed
    entries = _split(payload)
    del entries[-1]
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, _join(entries), ["name"])


def test_duplicated_field_in_the_frame_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    entries = _split(payload)
    entries.append(entries[0])
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, _join(entries))


def test_unknown_key_generation_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    entries = _split(payload)
    entries[0] = (entries[0][0], 2, *entries[0][2:])
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, _join(entries), ["phone"])


def test_truncated_payload_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    for length in range(len(payload)):
        with pytest.raises(TamperDetected):
            sealer.open("person", "rec-a", version, wrapped, payload[:length])


@pytest.mark.parametrize("extra", [b"\x00", b"\x01\x00\x00", b"x" * 40])
def test_bytes_appended_to_payload_are_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes], extra: bytes
) -> None:
    version, wrapped, payload = sealed
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, payload + extra)


def test_truncated_or_extended_wrapped_key_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    for damaged in (wrapped[:-1], wrapped + b"\x00", b""):
        with pytest.raises(TamperDetected):
            sealer.open("person", "rec-a", version, damaged, payload)


@pytest.mark.parametrize("version", [0, 2, -1, 2**40])
def test_unknown_kek_version_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes], version: int
) -> None:
    _, wrapped, payload = sealed
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, payload)


def test_wrapped_key_relabelled_with_another_kek_version_is_detected() -> None:
    sealer = RecordSealer(ROTATED)
    _, wrapped, payload = sealer.seal("person", "r", PERSON)
    with pytest.raises(TamperDetected):
        sealer.open("person", "r", 1, wrapped, payload)


def test_erased_record_cannot_be_opened_without_its_wrapped_key(sealer: RecordSealer) -> None:
    # Crypto-shredding: another record's key, even for identical fields, opens nothing.
    va, _, payload_a = sealer.seal("person", "rec-a", PERSON)
    _, wrapped_other, _ = sealer.seal("person", "rec-a", PERSON)
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", va, wrapped_other, payload_a)


# --- rotation --------------------------------------------------------------------------


def test_kek_rotation_rewraps_without_touching_the_payload() -> None:
    version, wrapped, payload = RecordSealer(MATERIAL).seal("person", "r", PERSON)
    rotated = RecordSealer(ROTATED)
    assert rotated.open("person", "r", version, wrapped, payload) == PERSON
    new_version, new_wrapped = rotated.rewrap("r", version, wrapped)
    assert new_version == 2
    assert rotated.open("person", "r", new_version, new_wrapped, payload) == PERSON
    with pytest.raises(TamperDetected):
        rotated.rewrap("other", version, wrapped)
    with pytest.raises(TamperDetected):
        RecordSealer(MATERIAL).open("person", "r", new_version, new_wrapped, payload)


# --- misuse by the caller --------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "x" * 256, "名" * 86])
def test_field_names_must_fit_the_frame(sealer: RecordSealer, name: str) -> None:
    with pytest.raises(ValueError, match="field name"):
        sealer.seal("person", "r", {name: b"v"})


def test_a_single_string_of_names_is_refused(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    # "name" would otherwise be read as the names "n", "a", "m", "e".
    version, wrapped, payload = sealed
    with pytest.raises(TypeError, match="collection"):
        sealer.open("person", "rec-a", version, wrapped, payload, "name")


def test_a_short_random_source_is_refused() -> None:
    sealer = RecordSealer(MATERIAL, random=lambda n: bytes(n - 1))
    with pytest.raises(ValueError, match="random source"):
        sealer.seal("person", "r", PERSON)


def test_key_material_without_its_current_kek_is_refused() -> None:
    with pytest.raises(ValueError, match="current version"):
        RecordSealer(MATERIAL._replace(kek_version=5))


def test_tamper_message_carries_nothing_about_the_record(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    with pytest.raises(TamperDetected) as caught:
        sealer.open("person", "rec-a", version, wrapped, payload[:-1])
    assert str(caught.value) == "stored data failed its integrity check"
    assert caught.value.__cause__ is None
