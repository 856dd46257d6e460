"""A witness: an outside party that cosigns a log's checkpoints only while they stay consistent.

C2SP tlog-witness `add-checkpoint` semantics over a directory of the witness's own: its
sealed cosigner key, the latest cosigned checkpoint per log, and refused notes as evidence.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from custodes.accounts import check_password_strength
from custodes.audit.checkpoint import (
    SIG_COSIGNATURE_V1,
    Checkpoint,
    Cosigner,
    MalformedNote,
    NoteVerifier,
    SignatureInvalid,
    decode_note_text,
    parse_note,
    read_signing_key,
    write_signing_key,
)
from custodes.audit.merkle import HASH_SIZE, InvalidProof, verify_consistency
from custodes.crypto.sealed_file import (
    DEFAULT_KDF,
    KdfParams,
    file_lock,
    make_private_directory,
    replace_file_durably,
    strict_b64decode,
)
from custodes.errors import (
    ConfigurationError,
    CustodesError,
    InvalidInput,
    StorageError,
    TamperDetected,
)

__all__ = [
    "MAX_PROOF_LINES",
    "MAX_REQUEST_BYTES",
    "Conflict",
    "ForkDetected",
    "InvalidProofError",
    "MalformedRequest",
    "RollbackRefused",
    "UnknownLog",
    "Witness",
    "add_log",
    "encode_request",
    "latest_checkpoint",
    "parse_request",
    "submit_checkpoint",
]

KEY_FILE = "witness.key"
LOGS_DIR = "logs"
FORKS_DIR = "forks"
LOCK_FILE = "witness.lock"
MAX_PROOF_LINES = 63  # the protocol's own limit
MAX_REQUEST_BYTES = 512 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"
_LOG_FORMAT = "custodes-witness-log"
_FILE_VERSION = 1


class UnknownLog(CustodesError):
    """The witness has no key for this checkpoint's origin (HTTP 404)."""


class Conflict(CustodesError):
    """The client's old size is not the size the witness last cosigned (HTTP 409).

    `size` is the witness's size: retry with a consistency proof from it.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        super().__init__(f"the witness last cosigned size {size}; submit a proof from it")


class ForkDetected(TamperDetected):
    """A log-signed checkpoint has another root at the size the witness cosigned (HTTP 409)."""


class RollbackRefused(TamperDetected):
    """A checkpoint smaller than the old size it claims to extend (HTTP 400)."""


class InvalidProofError(TamperDetected):
    """The consistency proof from the witnessed checkpoint does not verify (HTTP 422)."""


class MalformedRequest(InvalidInput):
    """An add-checkpoint request is not in the protocol's format (HTTP 400)."""


@dataclass(frozen=True)
class _LogState:
    origin: str
    log_key: str
    latest: Checkpoint | None
    note: bytes | None


def _origin_file(directory: Path, origin: str) -> Path:
    # Origins are URL-like ("example.org/log"): hash them into a safe file name.
    return directory / LOGS_DIR / f"{hashlib.sha256(origin.encode()).hexdigest()[:32]}.json"


def _check_origin(origin: str) -> None:
    if not isinstance(origin, str):
        raise ConfigurationError("a log origin must be text")
    try:
        Checkpoint(origin, 0, bytes(HASH_SIZE))
    except MalformedNote:
        raise ConfigurationError("a log origin must be one non-empty line of text") from None


def add_log(directory: Path, *, origin: str, log_vkey: str) -> None:
    """Trust `log_vkey` for checkpoints of `origin`; needs no passphrase.

    Adding the same key again does nothing; another key for a known origin is refused,
    since silently swapping it would let a new key restart the log's history.
    """
    directory = Path(directory)
    _check_origin(origin)
    vkey = NoteVerifier.from_key_string(log_vkey).verifier_key
    if not (directory / KEY_FILE).exists():
        raise ConfigurationError(f"not a witness directory (no {KEY_FILE}): {directory}")
    with file_lock(directory / LOCK_FILE):
        path = _origin_file(directory, origin)
        if path.exists():
            if _load_log(path, origin).log_key != vkey:
                raise ConfigurationError("this origin already has another log key")
            return
        _write_log(path, _LogState(origin, vkey, None, None))


def _write_log(path: Path, state: _LogState) -> None:
    doc = {
        "format": _LOG_FORMAT,
        "version": _FILE_VERSION,
        "origin": state.origin,
        "log_key": state.log_key,
        "size": state.latest.size if state.latest else 0,
        "root": base64.b64encode(state.latest.root).decode() if state.latest else None,
        "note": state.note.decode("utf-8") if state.note is not None else None,
    }
    replace_file_durably(path, json.dumps(doc, indent=2).encode() + b"\n")


def _load_log(path: Path, origin: str) -> _LogState:
    """Read one log's record; the stored note is re-verified so an edit cannot pass."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UnknownLog("the witness has no key for this log origin") from None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, ValueError):
        raise TamperDetected("a witness log record is damaged") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != _LOG_FORMAT
        or doc.get("version") != _FILE_VERSION
        or doc.get("origin") != origin
        or not isinstance(doc.get("log_key"), str)
    ):
        raise TamperDetected("a witness log record is damaged")
    verifier = NoteVerifier.from_key_string(doc["log_key"])
    note = doc.get("note")
    if note is None:
        if doc.get("size") != 0 or doc.get("root") is not None:
            raise TamperDetected("a witness log record is damaged")
        return _LogState(origin, doc["log_key"], None, None)
    if not isinstance(note, str):
        raise TamperDetected("a witness log record is damaged")
    try:
        cp = Checkpoint.parse_body(verifier.verify(note.encode("utf-8")))
    except SignatureInvalid:
        raise TamperDetected("a witness log record's checkpoint does not verify") from None
    if cp.origin != origin or doc.get("size") != cp.size:
        raise TamperDetected("a witness log record does not match its checkpoint")
    return _LogState(origin, doc["log_key"], cp, note.encode("utf-8"))


def latest_checkpoint(directory: Path, origin: str) -> bytes | None:
    """The latest note a witness directory cosigned for a log, read without its key.

    What an auditor takes from a witness to check the log against (`audit verify`).
    """
    path = _origin_file(Path(directory), origin)
    if not path.exists():
        return None
    return _load_log(path, origin).note


class Witness:
    """One witness: a cosigner key and the latest checkpoint it cosigned for each log."""

    __slots__ = ("_clock", "_cosigner", "directory")

    def __init__(
        self, directory: Path, cosigner: Cosigner, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = Path(directory)
        self._cosigner = cosigner
        self._clock = clock

    def __repr__(self) -> str:
        return f"Witness(name={self.name!r})"

    @classmethod
    def init(
        cls,
        directory: Path,
        *,
        name: str,
        passphrase: str,
        kdf: KdfParams = DEFAULT_KDF,
        clock: Callable[[], float] = time.time,
    ) -> Witness:
        """Create a witness directory with a new cosigner key sealed under `passphrase`."""
        # The key that vouches for a log's history: no weaker than an official's password.
        check_password_strength(passphrase, what="witness passphrase")
        directory = Path(directory)
        private_key = Ed25519PrivateKey.generate()
        cosigner = Cosigner(name, private_key)
        # The words this directory's errors have always used, shared with the keyring's.
        make_private_directory(directory, what="keyring directory")
        write_signing_key(
            directory / KEY_FILE,
            purpose="witness",
            vkey=cosigner.verifier_key,
            private_key=private_key,
            passphrase=passphrase,
            kdf=kdf,
        )
        for sub in (LOGS_DIR, FORKS_DIR):
            (directory / sub).mkdir(mode=0o700, exist_ok=True)
        return cls(directory, cosigner, clock=clock)

    @classmethod
    def open(
        cls, directory: Path, *, passphrase: str, clock: Callable[[], float] = time.time
    ) -> Witness:
        directory = Path(directory)
        name, vkey, private_key = read_signing_key(
            directory / KEY_FILE,
            purpose="witness",
            sig_type=SIG_COSIGNATURE_V1,
            passphrase=passphrase,
        )
        cosigner = Cosigner(name, private_key)
        if cosigner.verifier_key != vkey:
            raise ConfigurationError("damaged witness key file: key and header disagree")
        return cls(directory, cosigner, clock=clock)

    @property
    def name(self) -> str:
        return self._cosigner.name

    @property
    def verifier_key(self) -> str:
        """`<name>+<key id>+<base64(0x04 || key)>`: what logs and auditors configure."""
        return self._cosigner.verifier_key

    def add_log(self, origin: str, log_vkey: str) -> None:
        add_log(self.directory, origin=origin, log_vkey=log_vkey)

    def latest(self, origin: str) -> bytes | None:
        """The latest checkpoint note cosigned for `origin`, or None before the first."""
        return _load_log(_origin_file(self.directory, origin), origin).note

    def add_checkpoint(self, old_size: int, proof: Sequence[bytes], note: bytes) -> list[str]:
        """Cosign `note` if it extends the checkpoint last cosigned for its log.

        Checks in the order tlog-witness gives: known origin (UnknownLog), a valid log
        signature (SignatureInvalid), old size not above the new one (RollbackRefused),
        old size equal to the stored one (Conflict), the consistency proof
        (InvalidProofError), the same root at the same size (ForkDetected). The new state
        is on disk before the cosignature line (ending in a newline) is returned.
        """
        if not isinstance(old_size, int) or isinstance(old_size, bool) or old_size < 0:
            raise MalformedRequest("old size must be a non-negative integer")
        proof = list(proof)
        if len(proof) > MAX_PROOF_LINES or any(
            not isinstance(h, bytes) or len(h) != HASH_SIZE for h in proof
        ):
            raise MalformedRequest(f"a proof is at most {MAX_PROOF_LINES} hashes of 32 bytes")
        body, _ = parse_note(note)
        cp = Checkpoint.parse_body(body)
        path = _origin_file(self.directory, cp.origin)
        # Check the log's signature before taking the lock: it needs no state, and an
        # unsigned flood must not queue behind honest requests.
        verifier = NoteVerifier.from_key_string(_load_log(path, cp.origin).log_key)
        verifier.verify(note)
        with file_lock(self.directory / LOCK_FILE):
            # Check-and-persist under one lock, so two requests cannot roll each other back.
            state = _load_log(path, cp.origin)
            if state.log_key != verifier.verifier_key:
                raise ConfigurationError("the log key changed during the request")
            self._check(state, old_size, proof, cp, note)
            if state.latest is None or cp.size > state.latest.size:
                _write_log(path, _LogState(cp.origin, state.log_key, cp, note))
            timestamp = int(self._clock())
            return [self._cosigner.cosign(body, timestamp)]

    def _check(
        self, state: _LogState, old_size: int, proof: list[bytes], cp: Checkpoint, note: bytes
    ) -> None:
        latest = state.latest
        stored_size = latest.size if latest else 0
        if old_size > cp.size:
            if cp.size < stored_size:
                self._keep_evidence("rollback", state, old_size, proof, note)
            raise RollbackRefused(f"checkpoint size {cp.size} is below the old size {old_size}")
        if latest is not None and cp.size == latest.size and cp.root != latest.root:
            # Two log-signed roots for one size: proof of a split view whatever the client
            # claims, so keep it even when the old size is also wrong.
            self._keep_evidence("fork", state, old_size, proof, note)
            if old_size == stored_size:
                raise ForkDetected(f"the log signed another root for size {cp.size}")
        if old_size != stored_size:
            if cp.size < stored_size:
                self._keep_evidence("rollback", state, old_size, proof, note)
            raise Conflict(stored_size)
        if latest is None or old_size == 0:
            if proof:
                raise InvalidProofError("a proof from size 0 must be empty")
            return
        if cp.size == latest.size:
            if proof:
                raise InvalidProofError(f"a proof from size {cp.size} to itself must be empty")
            return
        try:
            verify_consistency(latest.size, cp.size, latest.root, cp.root, proof)
        except InvalidProof as exc:
            self._keep_evidence("bad-proof", state, old_size, proof, note)
            raise InvalidProofError(f"consistency proof rejected: {exc}") from None

    def _keep_evidence(
        self, reason: str, state: _LogState, old_size: int, proof: list[bytes], note: bytes
    ) -> None:
        """Keep a log-signed note the witness refused: it may prove the log misbehaved.

        Only notes bearing the log's valid signature get here, and the file name is a hash
        of the request, so replays cannot fill the disk.
        """
        proof_text = [base64.b64encode(h).decode() for h in proof]
        digest = hashlib.sha256(note + b"\0" + "\n".join(proof_text).encode()).hexdigest()
        forks = self.directory / FORKS_DIR
        forks.mkdir(mode=0o700, exist_ok=True)
        path = forks / f"{reason}-{digest[:32]}.json"
        if path.exists():
            return
        doc: dict[str, Any] = {
            "reason": reason,
            "origin": state.origin,
            "received": int(self._clock()),
            "old_size": old_size,
            "proof": proof_text,
            "note": note.decode("utf-8"),
            "cosigned_note": state.note.decode("utf-8") if state.note is not None else None,
        }
        replace_file_durably(path, json.dumps(doc, indent=2).encode() + b"\n")

    def evidence(self) -> list[Path]:
        """The files of refused, log-signed checkpoints kept so far."""
        return sorted((self.directory / FORKS_DIR).glob("*.json"))


# -- the wire format -----------------------------------------------------------------


def encode_request(old_size: int, proof: Sequence[bytes], note: bytes) -> bytes:
    """The add-checkpoint body: `old <size>`, base64 proof lines, a blank line, the note."""
    lines = [f"old {old_size}", *(base64.b64encode(h).decode() for h in proof)]
    return "".join(line + "\n" for line in lines).encode() + b"\n" + note


def parse_request(body: bytes) -> tuple[int, list[bytes], bytes]:
    """Split an add-checkpoint body into old size, proof hashes and note; refuse other forms."""
    if len(body) > MAX_REQUEST_BYTES:
        raise MalformedRequest("request body is too large")
    head, sep, note = body.partition(b"\n\n")
    if not sep:
        raise MalformedRequest("request has no blank line before the checkpoint")
    try:
        lines = decode_note_text(head + b"\n", what="request").split("\n")[:-1]
    except MalformedNote:
        raise MalformedRequest("request header is not clean UTF-8 text") from None
    first, proof_lines = lines[0], lines[1:]
    size_text = first.removeprefix("old ")
    if size_text == first or not size_text.isascii() or not size_text.isdigit():
        raise MalformedRequest("first line must be `old <size>`")
    if size_text != str(int(size_text)):
        raise MalformedRequest("old size must have no leading zeroes")
    if len(proof_lines) > MAX_PROOF_LINES:
        raise MalformedRequest(f"more than {MAX_PROOF_LINES} proof lines")
    proof = []
    for number, line in enumerate(proof_lines, start=2):
        raw = strict_b64decode(line)
        if raw is None or len(raw) != HASH_SIZE:
            raise MalformedRequest(f"line {number} is not a base64 hash")
        proof.append(raw)
    return int(size_text), proof, note


# -- the client ----------------------------------------------------------------------


def _check_loopback_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ConfigurationError("the witness URL must be http://<loopback address>[:port]/")
    if parts.hostname != "localhost":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigurationError("only a loopback witness is supported until TLS is added")


def submit_checkpoint(
    url: str, note: bytes, old_size: int, proof: Sequence[bytes], *, timeout: float = 10.0
) -> list[str]:
    """POST a checkpoint to a witness's `<url>/add-checkpoint`; return its cosignature lines.

    Raises Conflict(size) on a size mismatch, so the caller can retry with a proof from
    that size, and the matching error for every other refusal.
    """
    _check_loopback_url(url)
    request = urllib.request.Request(  # noqa: S310 - scheme checked above: http only
        url.rstrip("/") + "/add-checkpoint",
        data=encode_request(old_size, proof, note),
        method="POST",
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body = response.read(MAX_REQUEST_BYTES + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            _raise_for(exc.code, exc.headers.get_content_type(), exc.read(1024))
    except urllib.error.URLError as exc:
        raise StorageError(f"cannot reach the witness: {exc.reason}") from None
    return _parse_cosignatures(body)


def _raise_for(status: int, content_type: str, body: bytes) -> NoReturn:
    if status == 409 and content_type == SIZE_CONTENT_TYPE:
        text = body.decode("ascii", "replace")
        if text.endswith("\n") and text[:-1].isdigit() and text[:-1] == str(int(text[:-1])):
            raise Conflict(int(text[:-1]))
        raise MalformedRequest("the witness sent a malformed size")
    errors: dict[int, CustodesError] = {
        400: MalformedRequest("the witness refused the request as malformed or a rollback"),
        403: SignatureInvalid("the witness found no valid signature by the log key"),
        404: UnknownLog("the witness does not know this log"),
        409: ForkDetected("the witness holds another root for this size"),
        422: InvalidProofError("the witness rejected the consistency proof"),
    }
    raise errors.get(status, StorageError(f"the witness answered HTTP {status}"))


def _parse_cosignatures(body: bytes) -> list[str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedNote("the witness response is not UTF-8") from None
    if not text.endswith("\n") or len(body) > MAX_REQUEST_BYTES:
        raise MalformedNote("the witness response is not a list of signature lines")
    lines = [line + "\n" for line in text[:-1].split("\n")]
    parse_note(b"x\n\n" + text.encode("utf-8"))  # checks every line's format
    return lines
