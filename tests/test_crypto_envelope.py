"""Sealed records: round trips, the pinned format, and one test per way of tampering."""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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


# A test-side reading of the payload, written from the format description alone.
HEAD = 2 + 12  # format, key generation, nonce
BUCKET = 512


def _split(payload: bytes) -> tuple[int, int, bytes, bytes]:
    """(format, key generation, nonce, ciphertext with its tag)."""
    return payload[0], payload[1], payload[2:HEAD], payload[HEAD:]


def _body(fields: dict[str, bytes], pad_to: int | None = None) -> bytes:
    out = [struct.pack(">H", len(fields))]
    for name, value in fields.items():
        encoded = name.encode()
        out += [bytes((len(encoded),)), encoded, struct.pack(">I", len(value)), value]
    body = b"".join(out)
    size = pad_to if pad_to is not None else max(BUCKET, 1 << (len(body) - 1).bit_length())
    return body + bytes(size - len(body))


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _record_aad(record_type: bytes, record_id: bytes, vault: bytes = VAULT) -> bytes:
    return _lp(b"custodes/record/v2") + _lp(vault) + _lp(record_type) + _lp(record_id) + b"\x01"


def _forged(body: bytes, record_id: str = "kat-record-0001") -> tuple[bytes, bytes]:
    """A record sealed with the KAT's data key around a body of the test's choosing: what
    only a holder of the keys could write, to show that the reader still refuses any
    body custodes would not have written."""
    draw = _counter_random()
    data_key = draw(32)
    nonces = draw(24)
    rid = record_id.encode()
    wrap_aad = _lp(b"custodes/data-key/v1") + _lp(VAULT) + _lp(rid) + struct.pack(">I", 1)
    wrapped = b"\x01" + nonces[:12] + AESGCM(KEK1).encrypt(nonces[:12], data_key, wrap_aad)
    nonce = nonces[12:]
    sealed = AESGCM(data_key).encrypt(nonce, body, _record_aad(b"person", rid))
    return wrapped, b"\x02\x01" + nonce + sealed


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
    assert len(payload) == HEAD + BUCKET + 16
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
    assert _split(payload_a)[2] != _split(payload_b)[2]


def test_stolen_payload_holds_no_plaintext(sealed: tuple[int, bytes, bytes]) -> None:
    _, wrapped, payload = sealed
    for value in [*PERSON.values(), *(name.encode() for name in PERSON)]:
        if value:
            assert value not in payload
            assert value not in wrapped


# --- what a thief who counts bytes sees ------------------------------------------------


@settings(max_examples=100)
@given(fields=field_maps)
def test_a_byte_counter_sees_one_size_for_every_small_record(fields: dict[str, bytes]) -> None:
    # Which fields a record holds, and how long each value is, leave its length alone.
    sealer = RecordSealer(MATERIAL)
    _, wrapped, payload = sealer.seal("person", "r", fields)
    assert len(payload) == HEAD + BUCKET + 16 and len(wrapped) == 61
    assert len(sealer.seal("case", "r", {})[2]) == len(payload)


@pytest.mark.parametrize(
    ("value_bytes", "body_bytes"),
    [(505, 512), (506, 1024), (1017, 1024), (1018, 2048), (3000, 4096)],
)
def test_a_long_record_is_padded_to_the_next_power_of_two(
    sealer: RecordSealer, value_bytes: int, body_bytes: int
) -> None:
    # One field named "n": 2 (count) + 1 + 1 (name) + 4 (length) = 8 bytes around it.
    fields = {"n": b"x" * (value_bytes - 1)}
    version, wrapped, payload = sealer.seal("case", "r", fields)
    assert len(payload) == HEAD + body_bytes + 16
    assert sealer.open("case", "r", version, wrapped, payload) == fields


def test_the_type_tag_is_keyed_stable_and_names_no_type() -> None:
    sealer = RecordSealer(MATERIAL)
    tag = sealer.type_tag("person")
    assert len(tag) == 16 and int(tag, 16) >= 0 and "person" not in tag
    assert tag != sealer.type_tag("case")
    # The same after a KEK rotation (it counts stored records), another in another vault.
    assert RecordSealer(ROTATED).type_tag("person") == tag
    assert RecordSealer(MATERIAL._replace(index_root=bytes(32))).type_tag("person") != tag
    assert RecordSealer(MATERIAL._replace(vault_id=bytes(16))).type_tag("person") != tag
    assert tag != hashlib.sha256(b"person").hexdigest()[:16]


# --- the pinned format -----------------------------------------------------------------

KAT_FIELDS = {"name": "李娜".encode(), "national_id": b"11010519491231002X", "empty": b""}
KAT_WRAPPED_HEX = (
    "01738f6a628495dd2f6de1aa35828a3b13a8e952ad8585848b9b861db7258d01"
    "cb152f013e4e32852603049dd0ed64ba3318d8a3742f431bbb0710723b"
)
# The payload is 542 bytes: its head and tag, and a digest of the whole.
KAT_PAYLOAD_HEAD_HEX = "0201ceccb0b05c74f648024b60cd"  # format 2, generation 1, nonce
KAT_PAYLOAD_TAG_HEX = "bd7476afca3b5f872658b19cc5339a6d"
KAT_PAYLOAD_SHA256 = "185889ff31f837c64ac3c089b436de121b1a2f129e1a7c7a375d58f76f4c1ed7"
KAT_PERSON_TAG = "25c676173874e9e4"


def test_known_answer_pins_the_sealed_format() -> None:
    sealer = RecordSealer(MATERIAL, random=_counter_random())
    version, wrapped, payload = sealer.seal("person", "kat-record-0001", KAT_FIELDS)
    assert version == 1
    assert wrapped.hex() == KAT_WRAPPED_HEX
    assert len(payload) == 542
    assert payload[:HEAD].hex() == KAT_PAYLOAD_HEAD_HEX
    assert payload[-16:].hex() == KAT_PAYLOAD_TAG_HEX
    assert hashlib.sha256(payload).hexdigest() == KAT_PAYLOAD_SHA256
    assert sealer.type_tag("person") == KAT_PERSON_TAG
    assert RecordSealer(MATERIAL).open("person", "kat-record-0001", 1, wrapped, payload) == (
        KAT_FIELDS
    )


def test_known_answer_matches_the_documented_construction() -> None:
    """Rebuild the sealed record and the type tag from the format description alone."""
    wrapped, payload = _forged(_body(KAT_FIELDS))
    sealer = RecordSealer(MATERIAL, random=_counter_random())
    assert sealer.seal("person", "kat-record-0001", KAT_FIELDS) == (1, wrapped, payload)
    type_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=VAULT, info=b"custodes/record-type/v1"
    ).derive(ROOT)
    tag = hmac.digest(type_key, b"person", "sha256")[:8].hex()
    assert sealer.type_tag("person") == tag == KAT_PERSON_TAG


def test_a_payload_of_the_per_field_format_no_longer_opens() -> None:
    # Format 1 (one AEAD per field, lengths in the clear) is refused, not misread.
    wrapped, payload = _forged(_body(KAT_FIELDS))
    with pytest.raises(TamperDetected):
        RecordSealer(MATERIAL).open("person", "kat-record-0001", 1, wrapped, b"\x01" + payload[1:])


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
    # Record a's sealed body under record b's head, and one block of a's inside b's.
    for moved in (payload_b[:HEAD] + payload_a[HEAD:], _blocks(payload_b, {1: payload_a})):
        with pytest.raises(TamperDetected):
            sealer.open("person", "rec-b", vb, wrapped_b, moved, ["national_id"])


def _blocks(payload: bytes, replace: dict[int, bytes]) -> bytes:
    """payload with ciphertext block i (16 bytes) taken from replace[i]'s same block."""
    out = bytearray(payload)
    for i, source in replace.items():
        at = HEAD + 16 * i
        out[at : at + 16] = source[at : at + 16]
    return bytes(out)


def _cipher_blocks(payload: bytes) -> list[bytes]:
    return [payload[i : i + 16] for i in range(HEAD, len(payload), 16)]


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


# A field's name, position and value are inside the one ciphertext: from outside, renaming,
# moving, reordering, dropping or repeating a field can only rearrange ciphertext blocks.


def test_field_renamed_in_the_frame_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    assert b"phone" not in payload
    # Where "phone" sits in the body; flipping its bits toward "mobil" is exactly what a
    # stream cipher would let through without the tag.
    at = HEAD + _body(PERSON).index(b"phone")
    renamed = bytearray(payload)
    for i, (old, new) in enumerate(zip(b"phone", b"mobil", strict=True)):
        renamed[at + i] ^= old ^ new
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, bytes(renamed))
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, bytes(renamed), ["mobil"])


def test_ciphertext_moved_into_another_field_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    blocks = _cipher_blocks(payload)
    blocks[2] = blocks[1]
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, payload[:HEAD] + b"".join(blocks))


def test_fields_reordered_in_the_frame_are_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    blocks = _cipher_blocks(payload)
    blocks[0], blocks[1] = blocks[1], blocks[0]
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, payload[:HEAD] + b"".join(blocks))


def test_field_dropped_from_the_frame_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    # Deleting a field (a flag, a note) must not pass for a record that never had it.
    version, wrapped, payload = sealed
    blocks = _cipher_blocks(payload)
    del blocks[1]
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, payload[:HEAD] + b"".join(blocks))


def test_duplicated_field_in_the_frame_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    blocks = _cipher_blocks(payload)
    blocks.insert(1, blocks[1])
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, payload[:HEAD] + b"".join(blocks))


def test_unknown_key_generation_is_detected(
    sealer: RecordSealer, sealed: tuple[int, bytes, bytes]
) -> None:
    version, wrapped, payload = sealed
    with pytest.raises(TamperDetected):
        sealer.open("person", "rec-a", version, wrapped, payload[:1] + b"\x02" + payload[2:])


def _raw_body(
    entries: list[tuple[bytes, bytes, int]], count: int | None = None, pad_to: int = BUCKET
) -> bytes:
    """A body from (name, value, declared value length) entries, however wrong."""
    out = [struct.pack(">H", len(entries) if count is None else count)]
    for name, value, declared in entries:
        out += [bytes((len(name),)), name, struct.pack(">I", declared), value]
    body = b"".join(out)
    return body + bytes(pad_to - len(body))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_raw_body([(b"name", b"n", 1)], count=2), id="count-overruns"),
        pytest.param(_raw_body([(b"", b"n", 1)]), id="empty-name"),
        pytest.param(_raw_body([(b"name", b"n", 1), (b"name", b"m", 1)]), id="repeated-name"),
        pytest.param(_raw_body([(b"name", b"n", 600)]), id="value-overruns"),
        pytest.param(_raw_body([(b"name", b"n", 1)])[:-1] + b"\x01", id="padding-not-zero"),
        pytest.param(_raw_body([(b"name", b"n", 1)], pad_to=1024), id="padded-past-its-bucket"),
        pytest.param(_raw_body([(b"name", b"n", 1)], pad_to=500), id="padded-short"),
    ],
)
def test_a_body_custodes_would_not_write_is_refused_even_under_a_valid_tag(body: bytes) -> None:
    # Not a thief's move (the tag stops every change from outside), but a reader that
    # trusts lengths it did not check would be one bug away from misreading a record.
    wrapped, payload = _forged(body)
    sealer = RecordSealer(MATERIAL)
    for names in (None, ["name"]):
        with pytest.raises(TamperDetected):
            sealer.open("person", "kat-record-0001", 1, wrapped, payload, names)


def test_a_field_name_that_is_not_utf8_is_refused_when_read() -> None:
    # Names nobody asked for are skipped undecoded, so it is refused once it is read.
    wrapped, payload = _forged(_raw_body([(b"\xff", b"n", 1)]))
    with pytest.raises(TamperDetected):
        RecordSealer(MATERIAL).open("person", "kat-record-0001", 1, wrapped, payload)


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
