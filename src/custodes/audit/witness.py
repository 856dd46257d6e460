"""A witness: an outside party that cosigns a log's checkpoints only while they stay consistent.

C2SP tlog-witness `add-checkpoint` semantics over a directory of the witness's own: its
sealed cosigner key, the latest cosigned checkpoint per log, and refused notes as evidence.
The log's side: the client that has a checkpoint cosigned, and the pusher that keeps a
server's witnesses caught up with what it signs.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import logging
import threading
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
    "WitnessPusher",
    "Witnessed",
    "add_cosignatures",
    "add_log",
    "check_witness_url",
    "cosigners",
    "encode_request",
    "latest_checkpoint",
    "parse_request",
    "submit_checkpoint",
    "witness_checkpoint",
]

log = logging.getLogger("custodes.witness")

KEY_FILE = "witness.key"
LOGS_DIR = "logs"
FORKS_DIR = "forks"
LOCK_FILE = "witness.lock"
MAX_PROOF_LINES = 63  # the protocol's own limit
MAX_REQUEST_BYTES = 512 * 1024
SIZE_CONTENT_TYPE = "text/x.tlog.size"
_COSIGNATURE_BYTES = 8 + 64  # a cosignature/v1 line's timestamp and Ed25519 signature
_ATTEMPTS = 3  # from the size believed held, from the size a Conflict names, once more
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


def check_witness_url(url: str) -> None:
    """Refuse any witness address but http:// on loopback: the client speaks plain HTTP."""
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
    check_witness_url(url)
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
    except (OSError, http.client.HTTPException) as exc:
        # A witness that hangs up or stalls mid-answer: urllib lets these through unwrapped.
        raise StorageError(f"the witness broke off its answer: {type(exc).__name__}") from None
    return _parse_cosignatures(body)


@dataclass(frozen=True, slots=True)
class Witnessed:
    """A witness's answer to one checkpoint: the size it holds now, and the checkpoint
    with its cosignature added (None when it already held a larger checkpoint)."""

    size: int
    note: bytes | None


def witness_checkpoint(
    url: str,
    note: bytes,
    prove: Callable[[int, int], Sequence[bytes]],
    *,
    held: int = 0,
    beside: bytes | None = None,
    timeout: float = 10.0,
) -> Witnessed:
    """Have a witness cosign a log-signed checkpoint, proving it extends what the witness holds.

    The checkpoint goes with a consistency proof from `held`, the size the witness is
    believed to hold (0: unknown; `prove(old, new)` makes the proof), and on Conflict again
    from the size the witness names. Sending a checkpoint the witness already holds is
    harmless: it cosigns that size again. `beside` is the same checkpoint with the
    cosignatures gathered so far, which the answer's note keeps.
    """
    body, _ = parse_note(note)
    size = Checkpoint.parse_body(body).size
    if beside is not None and parse_note(beside)[0] != body:
        raise ValueError("`beside` must be the same checkpoint as `note`")
    old = held
    for _attempt in range(_ATTEMPTS):
        if old > size:
            return Witnessed(old, None)
        proof = list(prove(old, size)) if 0 < old < size else []
        try:
            lines = submit_checkpoint(url, note, old, proof, timeout=timeout)
        except Conflict as conflict:
            old = conflict.size
            continue
        return Witnessed(size, add_cosignatures(beside or note, lines))
    raise ConfigurationError("the witness keeps changing its size; try again")


def add_cosignatures(note: bytes, lines: Sequence[str]) -> bytes:
    """`note` with cosignature lines added, each in place of any earlier line by the same key
    (a witness asked twice cosigns twice), so that the note does not grow with asking."""
    text, _ = parse_note(note)
    added = [line if line.endswith("\n") else line + "\n" for line in lines]
    replaced = {_signing_key(line) for line in added}
    block = note[len(text) + 1 :].decode("utf-8")
    kept = [line + "\n" for line in block[:-1].split("\n") if _signing_key(line) not in replaced]
    cosigned = text + b"\n" + "".join(kept + added).encode("utf-8")
    parse_note(cosigned)  # every line well formed, and not too many of them
    return cosigned


def _signing_key(line: str) -> tuple[str, bytes]:
    [(name, kid, _)] = parse_note(b"x\n\n" + line.removesuffix("\n").encode("utf-8") + b"\n")[1]
    return name, kid


def cosigners(note: bytes) -> dict[str, int]:
    """The witnesses whose cosignatures a checkpoint note carries, each with the time it
    gave: read from the lines, not verified (that takes each witness's key)."""
    body, signatures = parse_note(note)
    origin = Checkpoint.parse_body(body).origin
    return {
        name: int.from_bytes(value[:8], "big")
        for name, _, value in signatures
        if name != origin and len(value) == _COSIGNATURE_BYTES
    }


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


# -- a server's witnesses, kept caught up -----------------------------------------------


@dataclass(slots=True)
class _Behind:
    """What this process knows of one witness: the size it holds, and its failures."""

    held: int = 0  # 0 until the witness first answers
    failures: int = 0
    next_try: float = 0.0  # monotonic time before which it is not asked again


class WitnessPusher:
    """Sends a server's latest signed checkpoint to each of its witnesses, from a thread of
    its own, so that a witness sees every entry within a bounded delay and a slow or absent
    witness never holds up signing.

    `signed` takes each new signed note (the log's signer thread calls it); `send(url,
    note, held, beside)` has one witness cosign it and stores the result. A witness is
    asked only while it holds less than the latest note, as far as this process has heard
    from it, so server processes sharing a log do not ask it once a round each. A failure
    is logged with the witness's address and the error's kind and tried again after a
    backoff that never exceeds the signing interval.
    """

    __slots__ = ("_behind", "_cosigned", "_every", "_lock", "_note", "_send", "_size", "_urls")

    def __init__(
        self,
        urls: Sequence[str],
        send: Callable[[str, bytes, int, bytes | None], Witnessed],
        *,
        every: float,
    ) -> None:
        for url in urls:
            check_witness_url(url)
        if not every > 0:
            raise ConfigurationError("the signing interval must be positive")
        self._urls = tuple(dict.fromkeys(urls))
        self._send = send
        self._every = every
        self._lock = threading.Lock()
        self._note: bytes | None = None
        self._size = 0
        self._cosigned: bytes | None = None  # the latest note with the cosignatures so far
        self._behind = {url: _Behind() for url in self._urls}

    def __repr__(self) -> str:
        return f"WitnessPusher(witnesses={len(self._urls)})"

    def signed(self, note: bytes) -> None:
        """Take a newly signed checkpoint note; returns at once."""
        size = Checkpoint.parse_body(parse_note(note)[0]).size
        with self._lock:
            if size > self._size:
                self._note, self._size, self._cosigned = note, size, None

    def start(self) -> threading.Event:
        """Start pushing; returns the event that stops it."""
        stop = threading.Event()
        threading.Thread(
            target=self._run, args=(stop,), name="custodes-witness-pusher", daemon=True
        ).start()
        return stop

    def _run(self, stop: threading.Event) -> None:
        # A short tick rather than a wake-up from `signed`: the stop event is all the vault
        # holds, and a second's delay after signing is well inside the bound.
        while not stop.wait(min(self._every, 1.0)):
            for url in self._urls:
                self._push_due(url, stop)

    def _push_due(self, url: str, stop: threading.Event) -> None:
        """Ask one witness to cosign the latest note if it is behind it and not backing off."""
        with self._lock:
            note, size, cosigned = self._note, self._size, self._cosigned
        behind = self._behind[url]
        if note is None or behind.held >= size or behind.next_try > time.monotonic():
            return
        try:
            answer = self._send(url, note, behind.held, cosigned)
        except Exception as exc:
            if stop.is_set():
                return  # the vault closed under the push: nothing to retry
            behind.failures += 1
            wait = min(self._every, min(self._every, 1.0) * 2 ** min(behind.failures - 1, 16))
            behind.next_try = time.monotonic() + wait
            log.error(
                "witness %s did not cosign checkpoint %d (%s, attempt %d); retrying in %.1fs",
                _shown(url),
                size,
                type(exc).__name__,
                behind.failures,
                wait,
            )
            return
        if behind.failures:
            log.warning(
                "witness %s caught up at size %d after %d failed attempts",
                _shown(url),
                answer.size,
                behind.failures,
            )
        behind.held, behind.failures, behind.next_try = answer.size, 0, 0.0
        if answer.note is None:
            # Another server process may have just sent a newer checkpoint; if not, the
            # witness saw more of this log than it now holds.
            log.warning(
                "witness %s already holds size %d, beyond the %d signed here",
                _shown(url),
                answer.size,
                size,
            )
        else:
            with self._lock:
                if self._size == size:
                    self._cosigned = answer.note


def _shown(url: str) -> str:
    """A witness address for the logs, without any user or password it carries."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
