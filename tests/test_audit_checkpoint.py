"""Signed checkpoints: notes, cosignatures and the log signer, attack by attack.

Threat model row 16: whoever edits, truncates or forks the access log is caught by
anyone holding an earlier signed checkpoint, so signatures must not bend.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from custodes.audit.checkpoint import (
    MAX_SIGNATURES,
    Checkpoint,
    Cosigner,
    ForkRefused,
    MalformedNote,
    NoteSigner,
    NoteVerifier,
    SignatureInvalid,
    create_log_key,
    key_id,
    open_log_key,
    parse_note,
    verify_cosignature,
)
from custodes.audit.merkle import EMPTY_ROOT, consistency_proof, leaf_hash, root_of
from custodes.crypto import KdfParams
from custodes.errors import KeyringError, TamperDetected

FAST_KDF = KdfParams(time_cost=2, memory_kib=19_456, parallelism=1)
PASSPHRASE = "a log key passphrase used only by tests"
ORIGIN = "custodes.example/log/test"
LEAVES = [leaf_hash(f"entry {i}".encode()) for i in range(40)]


def tree(size: int, leaves: list[bytes] = LEAVES) -> tuple[bytes, object]:
    def node(level: int, index: int) -> bytes:
        return root_of(leaves[index << level : (index + 1) << level])

    return root_of(leaves[:size]), node


def proof(size1: int, size2: int, leaves: list[bytes] = LEAVES) -> list[bytes]:
    _, node = tree(size2, leaves)
    return consistency_proof(size1, size2, node)  # type: ignore[arg-type]


def checkpoint(size: int, leaves: list[bytes] = LEAVES) -> Checkpoint:
    return Checkpoint(ORIGIN, size, root_of(leaves[:size]))


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(ORIGIN, Ed25519PrivateKey.generate())


# -- signed notes ----------------------------------------------------------------------


def test_known_answer_from_the_note_spec_ecosystem() -> None:
    # The PeterNeumann key and note from the Go sumdb/note documentation.
    seed = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
    signer = NoteSigner("PeterNeumann", Ed25519PrivateKey.from_private_bytes(seed))
    assert (
        signer.verifier_key == "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
    )
    text = (
        b"If you think cryptography is the answer to your problem,\n"
        b"then you don't know what your problem is.\n"
    )
    expected = (
        text
        + (
            "\n\u2014 PeterNeumann "
            "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
        ).encode()
    )
    assert signer.sign(text) == expected
    assert NoteVerifier.from_key_string(signer.verifier_key).verify(expected) == text


@settings(max_examples=50, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=2**63 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(
        st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs",)), min_size=1),
        max_size=3,
    ),
)
def test_checkpoint_note_round_trip(size: int, root: bytes, extensions: list[str]) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(32))
    signer = NoteSigner(ORIGIN, key)
    cp = Checkpoint(ORIGIN, size, root, tuple(extensions))
    note = signer.sign(cp.body())
    body = NoteVerifier.from_key_string(signer.verifier_key).verify(note)
    assert Checkpoint.parse_body(body) == cp
    text, sigs = parse_note(note)
    assert text == cp.body()
    assert [(n, k) for n, k, _ in sigs] == [
        (ORIGIN, key_id(ORIGIN, 1, key.public_key().public_bytes_raw()))
    ]


def test_checkpoint_body_is_the_spec_format() -> None:
    cp = Checkpoint(
        "example.com/behind-the-sofa",
        20852163,
        base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="),
    )
    assert cp.body() == (
        b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    )


def _note(signer: NoteSigner) -> bytes:
    return signer.sign(checkpoint(5).body())


def _sig_line(signer: NoteSigner) -> bytes:
    return _note(signer).split(b"\n\n", 1)[1]


MALFORMED = {
    "no_blank_line": lambda n: n.replace(b"\n\n", b"\n"),
    "no_signature_lines": lambda n: n.split(b"\n\n")[0] + b"\n\n",
    "missing_final_newline": lambda n: n[:-1],
    "not_utf8": lambda n: n.replace(b"custodes", b"cust\xffdes"),
    "control_character_in_text": lambda n: n.replace(b"custodes", b"cust\x1bdes"),
    "carriage_return_line_ends": lambda n: n.replace(b"\n", b"\r\n"),
    "nul_byte": lambda n: n.replace(b"custodes", b"cust\x00des"),
    "hyphen_instead_of_em_dash": lambda n: n.replace("\u2014".encode(), b"-"),
    "bad_base64": lambda n: n[:-3] + b"!!\n",
    "unpadded_base64": lambda n: n.rstrip(b"=\n") + b"\n",
    "noncanonical_base64": lambda n: n[:-3] + b"B=\n",
    "signature_too_short": lambda n: n.split(b"\n\n")[0] + "\n\n\u2014 k AAAA\n".encode(),
    "name_with_plus": lambda n: n.replace(ORIGIN.encode() + b" ", b"a+b "),
    "no_name": lambda n: n.replace("\u2014 ".encode() + ORIGIN.encode(), "\u2014 ".encode()),
    "too_many_signatures": lambda n: n + n.split(b"\n\n", 1)[1] * MAX_SIGNATURES,
}


@pytest.mark.parametrize("attack", sorted(MALFORMED))
def test_malformed_note_is_refused(signer: NoteSigner, attack: str) -> None:
    note = MALFORMED[attack](_note(signer))
    with pytest.raises(MalformedNote):
        NoteVerifier.from_key_string(signer.verifier_key).verify(note)


def test_note_signed_by_another_key_under_the_same_name_is_refused(signer: NoteSigner) -> None:
    impostor = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    with pytest.raises(SignatureInvalid, match="no signature"):
        NoteVerifier.from_key_string(signer.verifier_key).verify(_note(impostor))


def test_forged_signature_claiming_the_log_key_fails_the_whole_note(signer: NoteSigner) -> None:
    note = _note(signer)
    _, sigs = parse_note(note)
    name, kid, sig = sigs[0]
    forged = bytes([sig[0] ^ 1]) + sig[1:]
    line = f"\u2014 {name} {base64.b64encode(kid + forged).decode()}\n".encode()
    with pytest.raises(SignatureInvalid, match="does not verify"):
        NoteVerifier.from_key_string(signer.verifier_key).verify(note + line)


def test_unknown_signatures_ride_along_without_harm(signer: NoteSigner) -> None:
    other = NoteSigner("someone.example/else", Ed25519PrivateKey.generate())
    note = _note(signer) + _sig_line(other)
    assert NoteVerifier.from_key_string(signer.verifier_key).verify(note) == checkpoint(5).body()


@pytest.mark.parametrize(
    ("field", "old", "new"),
    [
        ("size", b"\n5\n", b"\n6\n"),
        ("origin", ORIGIN.encode(), b"custodes.example/log/other"),
        ("root", None, None),
    ],
)
def test_edited_checkpoint_body_fails_verification(
    signer: NoteSigner, field: str, old: bytes | None, new: bytes | None
) -> None:
    note = _note(signer)
    if field == "root":
        old = base64.b64encode(checkpoint(5).root)
        new = base64.b64encode(checkpoint(6).root)
    assert old is not None and new is not None
    edited = note.replace(old, new, 1)
    assert edited != note
    with pytest.raises(SignatureInvalid):
        NoteVerifier.from_key_string(signer.verifier_key).verify(edited)


@pytest.mark.parametrize(
    "body",
    [
        b"origin\n05\n" + base64.b64encode(bytes(32)) + b"\n",
        b"origin\n-1\n" + base64.b64encode(bytes(32)) + b"\n",
        b"origin\n5\n" + base64.b64encode(bytes(31)) + b"\n",
        b"origin\n5\n",
        b"origin\n5\n" + base64.b64encode(bytes(32)) + b"\n\nextension\n",
        b"origin\n5\n" + base64.b64encode(bytes(32)),
    ],
    ids=["leading_zero", "negative", "short_root", "no_root", "empty_line", "no_newline"],
)
def test_malformed_checkpoint_body_is_refused(body: bytes) -> None:
    with pytest.raises(MalformedNote):
        Checkpoint.parse_body(body)


def test_checkpoint_line_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(MalformedNote):
        Checkpoint(ORIGIN, 1, bytes(32), ("\ud800",))


def test_verifier_key_with_a_wrong_id_is_refused(signer: NoteSigner) -> None:
    name, kid, key = signer.verifier_key.split("+", 2)
    wrong = f"{name}+{(int(kid, 16) ^ 1):08x}+{key}"
    with pytest.raises(Exception, match="id does not match"):
        NoteVerifier.from_key_string(wrong)


# -- cosignatures ----------------------------------------------------------------------


@pytest.fixture
def cosigner() -> Cosigner:
    return Cosigner("witness.example/w1", Ed25519PrivateKey.generate())


def test_cosignature_round_trip(cosigner: Cosigner) -> None:
    body = checkpoint(7).body()
    line = cosigner.cosign(body, 1_679_315_147)
    assert line.startswith("\u2014 witness.example/w1 ") and line.endswith("\n")
    raw = base64.b64decode(line.split(" ")[2])
    assert len(raw) == 4 + 8 + 64
    assert raw[4:12] == (1_679_315_147).to_bytes(8, "big")
    assert verify_cosignature(cosigner.verifier_key, body, line) == 1_679_315_147
    assert (
        "+" in cosigner.verifier_key
        and base64.b64decode(cosigner.verifier_key.split("+", 2)[2])[0] == 0x04
    )


def test_cosignature_with_changed_timestamp_fails(cosigner: Cosigner) -> None:
    body = checkpoint(7).body()
    prefix, encoded = cosigner.cosign(body, 1000).rsplit(" ", 1)
    raw = bytearray(base64.b64decode(encoded))
    raw[11] ^= 1
    with pytest.raises(SignatureInvalid):
        verify_cosignature(
            cosigner.verifier_key, body, f"{prefix} {base64.b64encode(raw).decode()}"
        )


def test_cosignature_moved_to_another_checkpoint_fails(cosigner: Cosigner) -> None:
    line = cosigner.cosign(checkpoint(7).body(), 1000)
    with pytest.raises(SignatureInvalid):
        verify_cosignature(cosigner.verifier_key, checkpoint(8).body(), line)


def test_cosignature_by_another_witness_is_not_accepted(cosigner: Cosigner) -> None:
    other = Cosigner("witness.example/w1", Ed25519PrivateKey.generate())
    line = other.cosign(checkpoint(7).body(), 1000)
    with pytest.raises(SignatureInvalid, match="not by witness"):
        verify_cosignature(cosigner.verifier_key, checkpoint(7).body(), line)


def test_log_signature_is_not_a_cosignature(signer: NoteSigner) -> None:
    # Same key, other type byte: a log signature can never be passed off as a cosignature.
    key = Ed25519PrivateKey.generate()
    log = NoteSigner("shared.example/k", key)
    witness = Cosigner("shared.example/k", key)
    line = _sig_line(log).decode()
    with pytest.raises(SignatureInvalid):
        verify_cosignature(witness.verifier_key, checkpoint(5).body(), line)


def test_cosigner_signs_only_checkpoints(cosigner: Cosigner) -> None:
    with pytest.raises(MalformedNote):
        cosigner.cosign(b"anything at all\n", 1000)


# -- the log signer --------------------------------------------------------------------


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "log-keys" / "log.key"


def test_log_signer_signs_a_growing_log(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    assert signer.last_signed == (0, EMPTY_ROOT)
    verifier = NoteVerifier.from_key_string(signer.verifier_key)
    previous = 0
    for size in (1, 2, 5, 8, 13):
        note = signer.sign_checkpoint(checkpoint(size), proof(previous, size) if previous else [])
        assert Checkpoint.parse_body(verifier.verify(note)) == checkpoint(size)
        previous = size
    assert signer.last_signed == (13, checkpoint(13).root)
    # Re-signing the same tree head is consistent, so it is allowed.
    signer.sign_checkpoint(checkpoint(13), [])


def test_log_signer_refuses_another_root_at_the_same_size(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    signer.sign_checkpoint(checkpoint(4), [])
    forked = [*LEAVES[:3], leaf_hash(b"rewritten entry")]
    with pytest.raises(ForkRefused):
        signer.sign_checkpoint(checkpoint(4, forked), [])


def test_log_signer_refuses_a_truncated_log(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    signer.sign_checkpoint(checkpoint(6), [])
    with pytest.raises(ForkRefused):
        signer.sign_checkpoint(checkpoint(5), [])


def test_log_signer_refuses_a_rewritten_history_with_any_proof(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    signer.sign_checkpoint(checkpoint(5), [])
    forked = [*LEAVES[:2], leaf_hash(b"deleted and replaced"), *LEAVES[3:]]
    with pytest.raises(ForkRefused):
        signer.sign_checkpoint(checkpoint(9, forked), proof(5, 9, forked))
    with pytest.raises(ForkRefused):
        signer.sign_checkpoint(checkpoint(9, forked), proof(5, 9))
    with pytest.raises(ForkRefused):
        signer.sign_checkpoint(checkpoint(9), [])
    assert signer.last_signed[0] == 5


def test_log_signer_remembers_across_restart(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    signer.sign_checkpoint(checkpoint(7), [])
    reopened = open_log_key(key_path, passphrase=PASSPHRASE)
    assert reopened.last_signed == (7, checkpoint(7).root)
    assert reopened.verifier_key == signer.verifier_key
    forked = [leaf_hash(b"other history"), *LEAVES[1:]]
    with pytest.raises(ForkRefused):
        reopened.sign_checkpoint(checkpoint(7, forked), [])
    reopened.sign_checkpoint(checkpoint(9), proof(7, 9))


def test_two_signers_sharing_the_key_file_cannot_fork(key_path: Path) -> None:
    first = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    second = open_log_key(key_path, passphrase=PASSPHRASE)
    first.sign_checkpoint(checkpoint(3), [])
    forked = [leaf_hash(b"a different first entry"), *LEAVES[1:]]
    with pytest.raises(ForkRefused):
        second.sign_checkpoint(checkpoint(3, forked), [])
    with pytest.raises(ForkRefused):
        second.sign_checkpoint(checkpoint(5, forked), [])


def test_deleted_state_file_stops_the_signer(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    signer.sign_checkpoint(checkpoint(3), [])
    state = key_path.with_name(key_path.name + ".state")
    state.unlink()
    with pytest.raises(TamperDetected, match="missing"):
        open_log_key(key_path, passphrase=PASSPHRASE)
    with pytest.raises(TamperDetected, match="missing"):
        signer.sign_checkpoint(checkpoint(4), proof(3, 4))


def test_state_file_reset_by_hand_is_detected(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    signer.sign_checkpoint(checkpoint(3), [])
    state = key_path.with_name(key_path.name + ".state")
    doc = json.loads(state.read_text())
    doc["size"] = 0
    state.write_text(json.dumps(doc))
    with pytest.raises(TamperDetected):
        open_log_key(key_path, passphrase=PASSPHRASE)
    forged = NoteSigner(ORIGIN, Ed25519PrivateKey.generate()).sign(checkpoint(1).body())
    doc.update(size=1, root=base64.b64encode(checkpoint(1).root).decode(), note=forged.decode())
    state.write_text(json.dumps(doc))
    with pytest.raises(TamperDetected, match="not signed"):
        open_log_key(key_path, passphrase=PASSPHRASE)


def test_stolen_log_key_file_holds_no_key_in_the_clear(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    seed = signer._signer._key.private_bytes_raw()
    raw = key_path.read_bytes()
    for spelling in (
        seed,
        seed.hex().encode(),
        base64.b64encode(seed),
        base64.b64encode(b"\x01" + seed),
    ):
        assert spelling not in raw
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(key_path.with_name("log.key.state")).st_mode) == 0o600


def test_wrong_passphrase_is_refused(key_path: Path) -> None:
    create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    with pytest.raises(KeyringError, match="wrong passphrase"):
        open_log_key(key_path, passphrase="not the passphrase")


def test_edited_key_file_header_is_refused(key_path: Path) -> None:
    create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    doc = json.loads(key_path.read_text())
    other = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())
    doc["verifier_key"] = other.verifier_key
    key_path.write_text(json.dumps(doc))
    with pytest.raises(KeyringError):
        open_log_key(key_path, passphrase=PASSPHRASE)


def test_existing_key_file_is_never_overwritten(key_path: Path) -> None:
    create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    before = key_path.read_bytes()
    with pytest.raises(KeyringError, match="exists"):
        create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    assert key_path.read_bytes() == before


def test_kdf_below_the_floor_is_refused() -> None:
    with pytest.raises(KeyringError):
        KdfParams(time_cost=1, memory_kib=19_456)


def test_signer_refuses_a_checkpoint_for_another_origin(key_path: Path) -> None:
    signer = create_log_key(key_path, origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF)
    with pytest.raises(Exception, match="origin"):
        signer.sign_checkpoint(Checkpoint("other.example/log", 1, LEAVES[0]), [])
