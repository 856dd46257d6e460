"""The witness: an outside party that cosigns only consistent checkpoints and keeps evidence.

Threat model row 16: a log that forks, truncates or rolls back its history is refused by
the witness, which keeps the log-signed note that proves it.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from custodes.audit.checkpoint import (
    Checkpoint,
    MalformedNote,
    NoteSigner,
    NoteVerifier,
    SignatureInvalid,
    verify_cosignature,
)
from custodes.audit.merkle import consistency_proof, leaf_hash, root_of
from custodes.audit.witness import (
    Conflict,
    ForkDetected,
    InvalidProofError,
    MalformedRequest,
    RollbackRefused,
    UnknownLog,
    Witness,
    encode_request,
    parse_request,
    submit_checkpoint,
)
from custodes.audit.witness_server import ENV_PASSPHRASE, make_server
from custodes.crypto import KdfParams
from custodes.errors import ConfigurationError, KeyringError

FAST_KDF = KdfParams(time_cost=2, memory_kib=19_456, parallelism=1)
PASSPHRASE = "a witness passphrase used only by tests"
ORIGIN = "custodes.example/log/test"
WITNESS_NAME = "dpa.example/witness"
NOW = 1_700_000_000
HONEST = [leaf_hash(f"entry {i}".encode()) for i in range(32)]
FORKED = [*HONEST[:3], leaf_hash(b"an entry rewritten by an insider"), *HONEST[4:]]


def _node(leaves: list[bytes]) -> Callable[[int, int], bytes]:
    return lambda level, index: root_of(leaves[index << level : (index + 1) << level])


def proof(size1: int, size2: int, leaves: list[bytes] = HONEST) -> list[bytes]:
    return consistency_proof(size1, size2, _node(leaves)) if 0 < size1 < size2 else []


class Log:
    """A log under test: a key and a way to sign any tree head, honest or not."""

    def __init__(self) -> None:
        self.signer = NoteSigner(ORIGIN, Ed25519PrivateKey.generate())

    def note(self, size: int, leaves: list[bytes] = HONEST) -> bytes:
        return self.signer.sign(Checkpoint(ORIGIN, size, root_of(leaves[:size])).body())


@pytest.fixture
def log() -> Log:
    return Log()


@pytest.fixture
def witness(tmp_path: Path, log: Log) -> Witness:
    w = Witness.init(
        tmp_path / "witness",
        name=WITNESS_NAME,
        passphrase=PASSPHRASE,
        kdf=FAST_KDF,
        clock=lambda: NOW,
    )
    w.add_log(ORIGIN, log.signer.verifier_key)
    return w


def _check_cosigned(w: Witness, note: bytes, lines: list[str], *, now: float = NOW) -> None:
    body = note.split(b"\n\n")[0] + b"\n"
    [timestamp] = [verify_cosignature(w.verifier_key, body, line) for line in lines]
    assert abs(timestamp - now) <= 60


def test_witness_cosigns_a_growing_log(witness: Witness, log: Log) -> None:
    old = 0
    for size in (1, 2, 5, 8, 13, 13):
        note = log.note(size)
        lines = witness.add_checkpoint(old, proof(old, size), note)
        _check_cosigned(witness, note, lines)
        # Cosignatures ride along in the note: the log's own key still verifies it.
        NoteVerifier.from_key_string(log.signer.verifier_key).verify(note + "".join(lines).encode())
        old = size
    latest = witness.latest(ORIGIN)
    assert latest is not None and latest.startswith(log.note(13).split(b"\n\n")[0])
    assert witness.evidence() == []


def test_witness_conflict_returns_its_size(witness: Witness, log: Log) -> None:
    witness.add_checkpoint(0, [], log.note(4))
    with pytest.raises(Conflict) as caught:
        witness.add_checkpoint(0, [], log.note(9))
    assert caught.value.size == 4
    witness.add_checkpoint(caught.value.size, proof(4, 9), log.note(9))


def test_witness_refuses_a_rollback_and_keeps_evidence(witness: Witness, log: Log) -> None:
    witness.add_checkpoint(0, [], log.note(8))
    with pytest.raises(RollbackRefused):
        witness.add_checkpoint(8, [], log.note(5))
    with pytest.raises(Conflict):
        witness.add_checkpoint(5, [], log.note(5))
    reasons = {json.loads(p.read_text())["reason"] for p in witness.evidence()}
    assert reasons == {"rollback"}


def test_witness_refuses_a_fork_at_the_same_size_and_keeps_both_notes(
    witness: Witness, log: Log
) -> None:
    honest = log.note(6)
    witness.add_checkpoint(0, [], honest)
    forked = log.note(6, FORKED)
    with pytest.raises(ForkDetected):
        witness.add_checkpoint(6, [], forked)
    [evidence] = witness.evidence()
    doc = json.loads(evidence.read_text())
    assert doc["reason"] == "fork"
    assert doc["note"].encode() == forked and doc["cosigned_note"].encode() == honest
    # Both notes verify under the log's key: that is the proof of the split view.
    verifier = NoteVerifier.from_key_string(log.signer.verifier_key)
    assert verifier.verify(forked) != verifier.verify(honest)


def test_witness_refuses_a_rewritten_history_behind_a_bad_proof(witness: Witness, log: Log) -> None:
    witness.add_checkpoint(0, [], log.note(5))
    for bad in (proof(5, 9, FORKED), proof(5, 9), []):
        with pytest.raises(InvalidProofError):
            witness.add_checkpoint(5, bad, log.note(9, FORKED))
    assert {json.loads(p.read_text())["reason"] for p in witness.evidence()} == {"bad-proof"}
    # The honest continuation is still accepted.
    witness.add_checkpoint(5, proof(5, 9), log.note(9))


def test_witness_refuses_a_checkpoint_not_signed_by_the_log(witness: Witness) -> None:
    impostor = Log()
    with pytest.raises(SignatureInvalid):
        witness.add_checkpoint(0, [], impostor.note(3))
    assert witness.evidence() == []


def test_witness_refuses_an_unknown_log(witness: Witness) -> None:
    other = NoteSigner("other.example/log", Ed25519PrivateKey.generate())
    note = other.sign(Checkpoint("other.example/log", 1, HONEST[0]).body())
    with pytest.raises(UnknownLog):
        witness.add_checkpoint(0, [], note)


def test_witness_refuses_a_proof_from_zero(witness: Witness, log: Log) -> None:
    with pytest.raises(InvalidProofError):
        witness.add_checkpoint(0, [HONEST[0]], log.note(3))


def test_witness_remembers_across_restart(tmp_path: Path, witness: Witness, log: Log) -> None:
    witness.add_checkpoint(0, [], log.note(7))
    reopened = Witness.open(witness.directory, passphrase=PASSPHRASE, clock=lambda: NOW)
    assert reopened.verifier_key == witness.verifier_key
    with pytest.raises(Conflict) as caught:
        reopened.add_checkpoint(0, [], log.note(3, FORKED))
    assert caught.value.size == 7


def test_edited_witness_state_is_detected(witness: Witness, log: Log) -> None:
    witness.add_checkpoint(0, [], log.note(7))
    [record] = (witness.directory / "logs").glob("*.json")
    doc = json.loads(record.read_text())
    doc["size"] = 3
    record.write_text(json.dumps(doc))
    with pytest.raises(Exception, match="does not match"):
        witness.add_checkpoint(3, proof(3, 9), log.note(9))


def test_log_key_cannot_be_swapped_for_a_known_origin(witness: Witness) -> None:
    with pytest.raises(ConfigurationError):
        witness.add_log(ORIGIN, Log().signer.verifier_key)


def test_stolen_witness_key_file_holds_no_key_in_the_clear(witness: Witness) -> None:
    seed = witness._cosigner._key.private_bytes_raw()
    raw = (witness.directory / "witness.key").read_bytes()
    for spelling in (seed, seed.hex().encode(), base64.b64encode(seed)):
        assert spelling not in raw
    with pytest.raises(KeyringError, match="wrong passphrase"):
        Witness.open(witness.directory, passphrase="guess")


def test_log_key_file_is_not_a_witness_key(tmp_path: Path) -> None:
    from custodes.audit.checkpoint import create_log_key

    create_log_key(
        tmp_path / "w" / "witness.key", origin=ORIGIN, passphrase=PASSPHRASE, kdf=FAST_KDF
    )
    with pytest.raises(KeyringError, match="witness"):
        Witness.open(tmp_path / "w", passphrase=PASSPHRASE)


# -- the wire format -------------------------------------------------------------------


def test_request_round_trip(log: Log) -> None:
    note = log.note(9)
    assert parse_request(encode_request(5, proof(5, 9), note)) == (5, proof(5, 9), note)


@pytest.mark.parametrize(
    "body",
    [
        b"old 05\n\n",
        b"old -1\n\n",
        b"old 5\n",
        b"new 5\n\n",
        b"old 5\nnot base64!\n\n",
        b"old 5\n" + base64.b64encode(bytes(31)) + b"\n\n",
        b"old 5\n" + (base64.b64encode(bytes(32)) + b"\n") * 64 + b"\n",
        b"old 5\r\n\n",
    ],
    ids=[
        "leading_zero",
        "negative",
        "no_blank_line",
        "wrong_keyword",
        "bad_base64",
        "short_hash",
        "too_many_proof_lines",
        "carriage_return",
    ],
)
def test_malformed_request_is_refused(body: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_request(body)


def test_server_refuses_to_listen_beyond_loopback(witness: Witness) -> None:
    for host in ("0.0.0.0", "192.0.2.1", "::", "example.org"):
        with pytest.raises(ConfigurationError, match="loopback"):
            make_server(witness, host, 0)


def test_client_refuses_a_non_loopback_witness(log: Log) -> None:
    with pytest.raises(ConfigurationError):
        submit_checkpoint("http://192.0.2.1:8080/", log.note(1), 0, [])
    with pytest.raises(ConfigurationError):
        submit_checkpoint("file:///etc/passwd", log.note(1), 0, [])


# -- end to end, the witness in a process of its own ------------------------------------


@pytest.fixture
def witness_process(witness: Witness, tmp_path: Path) -> Iterator[str]:
    env = dict(os.environ, **{ENV_PASSPHRASE: PASSPHRASE})
    with (tmp_path / "witness.stderr").open("wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "custodes.audit.witness_server",
                str(witness.directory),
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening on http://127.0.0.1:"), (
            tmp_path / "witness.stderr"
        ).read_text()
        yield line.split(" ", 2)[2].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def _post(url: str, body: bytes) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url + "add-checkpoint", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get_content_type(), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get_content_type(), exc.read()


def test_separate_witness_process_cosigns_and_refuses_a_fork(
    witness: Witness, witness_process: str, log: Log
) -> None:
    url = witness_process
    old = 0
    for size in (1, 3, 4, 7, 12):
        note = log.note(size)
        lines = submit_checkpoint(url, note, old, proof(old, size))
        _check_cosigned(witness, note, lines, now=time.time())
        old = size

    # A stale client learns the witness's size from the 409 and retries.
    with pytest.raises(Conflict) as caught:
        submit_checkpoint(url, log.note(15), 7, proof(7, 15))
    assert caught.value.size == 12
    submit_checkpoint(url, log.note(15), caught.value.size, proof(12, 15))

    # The insider's rewritten history: refused however it is presented.
    with pytest.raises(ForkDetected):
        submit_checkpoint(url, log.note(15, FORKED), 15, [])
    with pytest.raises(InvalidProofError):
        submit_checkpoint(url, log.note(20, FORKED), 15, proof(15, 20, FORKED))
    with pytest.raises(MalformedRequest):
        submit_checkpoint(url, log.note(10), 15, [])
    assert {json.loads(p.read_text())["reason"] for p in witness.evidence()} == {
        "fork",
        "bad-proof",
        "rollback",
    }

    # Status codes and content types on the wire, as the protocol fixes them.
    status, ctype, body = _post(url, encode_request(3, [], log.note(15)))
    assert (status, ctype, body) == (409, "text/x.tlog.size", b"15\n")
    assert _post(url, encode_request(15, [], Log().note(15)))[0] == 403
    stranger = NoteSigner("other.example/log", Ed25519PrivateKey.generate())
    unknown = stranger.sign(Checkpoint("other.example/log", 1, HONEST[0]).body())
    assert _post(url, encode_request(0, [], unknown))[0] == 404
    assert _post(url, b"old 15\n")[0] == 400
    assert _post(url, encode_request(15, [], log.note(15)[:-1]))[0] == 400
    status, _, body = _post(url, encode_request(15, [], log.note(15)))
    assert status == 200 and body.startswith("\u2014 dpa.example/witness ".encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "add-checkpoint", timeout=10)  # a GET
    refused.value.close()
    assert refused.value.code == 404


def test_witness_process_refuses_without_passphrase(witness: Witness) -> None:
    env = {k: v for k, v in os.environ.items() if k != ENV_PASSPHRASE}
    done = subprocess.run(
        [sys.executable, "-m", "custodes.audit.witness_server", str(witness.directory)],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0 and ENV_PASSPHRASE.encode() in done.stderr


def test_malformed_note_reaches_the_witness_as_a_refusal(witness: Witness, log: Log) -> None:
    with pytest.raises(MalformedNote):
        witness.add_checkpoint(0, [], log.note(3).replace(b"\n\n", b"\n"))


def test_a_witness_key_cannot_be_sealed_with_a_guessable_passphrase(tmp_path: Path) -> None:
    from custodes.errors import WeakPassword

    for weak in ("x", "qwertyuiop12", "aaaaaaaaaaaaaa"):
        with pytest.raises(WeakPassword) as refused:
            Witness.init(tmp_path / f"w-{weak}", name="dpa.example/witness", passphrase=weak)
        assert weak not in str(refused.value)
        assert not (tmp_path / f"w-{weak}").exists()
