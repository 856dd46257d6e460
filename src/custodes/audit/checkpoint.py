"""Signed checkpoints of the access log: C2SP signed notes, checkpoints and cosignatures.

Also the log's signing key, sealed in a file of its own, and `LogSigner`, which refuses
to sign a checkpoint inconsistent with the last one it signed, across restarts.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from custodes.audit.merkle import EMPTY_ROOT, HASH_SIZE, InvalidProof, verify_consistency
from custodes.crypto import sealed_file
from custodes.crypto.sealed_file import (
    DEFAULT_KDF,
    KdfParams,
    SealedHeader,
    b64encode,
    file_lock,
    replace_file_durably,
    strict_b64decode,
)
from custodes.errors import (
    ConfigurationError,
    KeyringError,
    StorageError,
    TamperDetected,
)

__all__ = [
    "MAX_NOTE_BYTES",
    "MAX_SIGNATURES",
    "Checkpoint",
    "Cosigner",
    "ForkRefused",
    "LogLoss",
    "LogSigner",
    "MalformedNote",
    "NoteSigner",
    "NoteVerifier",
    "SignatureInvalid",
    "create_log_key",
    "decode_note_text",
    "key_id",
    "open_log_key",
    "parse_note",
    "read_signing_key",
    "signed_losses",
    "signed_state",
    "signed_state_note",
    "verify_cosignature",
    "write_signing_key",
]

SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
# The spec asks verifiers to accept at least 16 signatures; the caps only bound the
# work an unauthenticated note can cause before any signature is checked.
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 256 * 1024
MAX_TIMESTAMP = 2**63 - 1

_SIG_PREFIX = "\u2014 "  # em dash, space
_KEY_ID_BYTES = 4
_ED25519_SIG_BYTES = 64
_COSIG_HEADER = b"cosignature/v1\n"
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_KEY_FORMAT = "custodes-signing-key"
_STATE_FORMAT = "custodes-log-state"
_LOSSES_FORMAT = "custodes-log-losses"
# The first line of a signed loss statement: never a log origin (it holds spaces), so no
# statement can be read as a checkpoint, nor a checkpoint as a statement.
_LOSS_HEADER = "custodes log loss v1"
# The first line of a signed erasure statement (custodes.audit.erasures), likewise.
ERASURE_HEADER = "custodes erasure v1"
MAX_LOSS_REASON = 500
_FILE_VERSION = 1
_SEED_BYTES = 32
_TAG_BYTES = 16
# The words these files' errors have always used, shared with the keyring's.
_WRITE_AS = "keyring file"
_DIRECTORY_AS = "keyring directory"


class SignatureInvalid(TamperDetected):
    """A signed note or cosignature failed verification (missing, wrong or bad signature)."""


class MalformedNote(SignatureInvalid):
    """A note, checkpoint or cosignature line is not in the format its spec requires."""


class ForkRefused(TamperDetected):
    """The log signer refused a checkpoint inconsistent with the last one it signed."""


# -- signed notes (c2sp.org/signed-note) -----------------------------------------------


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """SHA-256(name || 0x0A || type || public key)[:4], the id in every signature."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()[:4]


def _valid_name(name: str) -> bool:
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _valid_name(name):
        raise ConfigurationError("a key name must be non-empty, without spaces or '+'")


def _has_control(text: str) -> bool:
    return any(c < " " and c != "\n" for c in text)


def _public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _vkey(name: str, sig_type: int, public: bytes) -> str:
    return f"{name}+{key_id(name, sig_type, public).hex()}+{b64encode(bytes([sig_type]) + public)}"


def _parse_vkey(vkey: str, sig_type: int) -> tuple[str, bytes, Ed25519PublicKey]:
    """Read `<name>+<hex key id>+<base64(type || public key)>`; check the id matches."""
    if not isinstance(vkey, str):
        raise ConfigurationError("a verifier key must be text")
    parts = vkey.strip().split("+", 2)
    if len(parts) != 3:
        raise ConfigurationError("a verifier key reads <name>+<key id>+<key>")
    name, hex_id, encoded = parts
    if not _valid_name(name) or _has_control(name):
        raise ConfigurationError("the verifier key's name is not a valid key name")
    raw = strict_b64decode(encoded)
    if raw is None or len(raw) != 1 + 32:
        raise ConfigurationError("the verifier key is not a base64 Ed25519 key")
    if raw[0] != sig_type:
        raise ConfigurationError(f"the verifier key is not of signature type 0x{sig_type:02x}")
    public = raw[1:]
    if hex_id != key_id(name, sig_type, public).hex():
        raise ConfigurationError("the verifier key's id does not match its name and key")
    return name, key_id(name, sig_type, public), Ed25519PublicKey.from_public_bytes(public)


def decode_note_text(text: bytes, *, what: str) -> str:
    """Decode note-like text: at most MAX_NOTE_BYTES of UTF-8, no control but newline.

    Raises MalformedNote naming `what`.
    """
    if len(text) > MAX_NOTE_BYTES:
        raise MalformedNote(f"{what} is longer than {MAX_NOTE_BYTES} bytes")
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedNote(f"{what} is not valid UTF-8") from None
    if _has_control(decoded):
        raise MalformedNote(f"{what} contains a control character")
    return decoded


def parse_note(note: bytes) -> tuple[bytes, list[tuple[str, bytes, bytes]]]:
    """Split a signed note into its text and its (name, key id, signature) triples.

    Checks the format only; no signature is verified here. The text ends at the last
    blank line, as the spec says, and keeps its final newline.
    """
    if not isinstance(note, bytes):
        raise MalformedNote("a note must be bytes")
    decoded = decode_note_text(note, what="note")
    split = decoded.rfind("\n\n")
    if split < 0:
        raise MalformedNote("note has no blank line before its signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    if not block or not block.endswith("\n"):
        raise MalformedNote("note has no signature lines, or they do not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote(f"note has more than {MAX_SIGNATURES} signatures")
    signatures = []
    for number, line in enumerate(lines, start=1):
        if not line.startswith(_SIG_PREFIX):
            raise MalformedNote(f"signature line {number} does not start with an em dash")
        name, space, encoded = line[len(_SIG_PREFIX) :].partition(" ")
        if not space or not _valid_name(name):
            raise MalformedNote(f"signature line {number} has no valid key name")
        raw = strict_b64decode(encoded)
        if raw is None or len(raw) < _KEY_ID_BYTES + 1:
            raise MalformedNote(f"signature line {number} is not a base64 signature")
        signatures.append((name, raw[:_KEY_ID_BYTES], raw[_KEY_ID_BYTES:]))
    return text.encode("utf-8"), signatures


class NoteSigner:
    """Signs note texts with an Ed25519 key under a key name (signature type 0x01)."""

    __slots__ = ("_key", "_key_id", "name")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        _check_name(name)
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigurationError("a note signer needs an Ed25519 private key")
        self.name = name
        self._key = private_key
        self._key_id = key_id(name, SIG_ED25519, _public_bytes(private_key))

    def __repr__(self) -> str:
        return f"NoteSigner({self.verifier_key!r})"

    @property
    def verifier_key(self) -> str:
        return _vkey(self.name, SIG_ED25519, _public_bytes(self._key))

    def sign(self, body: bytes) -> bytes:
        """Return the whole signed note: body, blank line, one signature line."""
        text = decode_note_text(body, what="note text")
        # Stricter than the note spec, as checkpoints require: a blank line inside the
        # text would make the split between text and signatures depend on the reader.
        if not text.endswith("\n") or "\n\n" in text or text.startswith("\n"):
            raise MalformedNote("note text must be non-empty lines, each ending in a newline")
        signature = self._key.sign(body)
        return body + f"\n{_SIG_PREFIX}{self.name} {b64encode(self._key_id + signature)}\n".encode()


class NoteVerifier:
    """Checks notes for a valid signature by one known Ed25519 key."""

    __slots__ = ("_key", "key_id", "name")

    def __init__(self, name: str, public_key: Ed25519PublicKey) -> None:
        _check_name(name)
        self.name = name
        self._key = public_key
        self.key_id = key_id(name, SIG_ED25519, _public_bytes(public_key))

    @classmethod
    def from_key_string(cls, vkey: str) -> NoteVerifier:
        name, _, public = _parse_vkey(vkey, SIG_ED25519)
        return cls(name, public)

    def __repr__(self) -> str:
        return f"NoteVerifier({self.verifier_key!r})"

    @property
    def verifier_key(self) -> str:
        return _vkey(self.name, SIG_ED25519, _public_bytes(self._key))

    def verify(self, note: bytes) -> bytes:
        """Return the note's text if it carries a valid signature by this key.

        Signatures by other keys are ignored (that is how cosignatures ride along); a
        signature that claims to be by this key and fails makes the whole note fail.
        """
        text, signatures = parse_note(note)
        found = False
        for name, kid, signature in signatures:
            if name != self.name or kid != self.key_id:
                continue
            try:
                if len(signature) != _ED25519_SIG_BYTES:
                    raise InvalidSignature
                self._key.verify(signature, text)
            except InvalidSignature:
                raise SignatureInvalid(f"the signature by {self.name} does not verify") from None
            found = True
        if not found:
            raise SignatureInvalid(f"the note carries no signature by {self.name}")
        return text


# -- checkpoints (c2sp.org/tlog-checkpoint) --------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: origin, size and RFC 6962 root, plus optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not _is_line(self.origin):
            raise MalformedNote("checkpoint origin must be one non-empty line of text")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise MalformedNote("checkpoint size must be a non-negative integer")
        if self.size > MAX_TIMESTAMP:
            raise MalformedNote("checkpoint size is out of range")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise MalformedNote(f"checkpoint root must be {HASH_SIZE} bytes")
        if not isinstance(self.extensions, tuple) or not all(
            isinstance(line, str) and _is_line(line) for line in self.extensions
        ):
            raise MalformedNote("checkpoint extension lines must be non-empty lines of text")

    def body(self) -> bytes:
        lines = [self.origin, str(self.size), b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines).encode("utf-8")

    @classmethod
    def parse_body(cls, body: bytes) -> Checkpoint:
        """Read a checkpoint note text; refuse anything but its one canonical form."""
        text = decode_note_text(body, what="checkpoint")
        if not text.endswith("\n"):
            raise MalformedNote("checkpoint text must end in a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3 or not all(lines):
            raise MalformedNote("checkpoint needs origin, size and root, and no empty line")
        origin, size, root, *extensions = lines
        if not _DECIMAL.fullmatch(size):
            raise MalformedNote("checkpoint size is not a decimal without leading zeroes")
        raw_root = strict_b64decode(root)
        if raw_root is None:
            raise MalformedNote("checkpoint root is not base64")
        return cls(origin, int(size), raw_root, tuple(extensions))


def _is_line(text: str) -> bool:
    try:
        text.encode("utf-8")  # lone surrogates cannot be written as UTF-8
    except UnicodeEncodeError:
        return False
    return bool(text) and "\n" not in text and not _has_control(text)


# -- cosignatures (c2sp.org/tlog-cosignature, Ed25519 cosignature/v1) ------------------


def _cosigned_message(checkpoint_body: bytes, timestamp: int) -> bytes:
    return _COSIG_HEADER + f"time {timestamp}\n".encode() + checkpoint_body


def _check_timestamp(timestamp: int) -> None:
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise ValueError("a cosignature timestamp must be an integer")
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise ValueError("a cosignature timestamp must be between 0 and 2**63 - 1")


class Cosigner:
    """A witness's cosigning key: timestamped Ed25519 cosignatures (signature type 0x04)."""

    __slots__ = ("_key", "_key_id", "name")

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        _check_name(name)
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigurationError("a cosigner needs an Ed25519 private key")
        self.name = name
        self._key = private_key
        self._key_id = key_id(name, SIG_COSIGNATURE_V1, _public_bytes(private_key))

    def __repr__(self) -> str:
        return f"Cosigner({self.verifier_key!r})"

    @property
    def verifier_key(self) -> str:
        return _vkey(self.name, SIG_COSIGNATURE_V1, _public_bytes(self._key))

    def cosign(self, checkpoint_body: bytes, timestamp: int) -> str:
        """The note signature line (ending in a newline) cosigning a checkpoint text."""
        _check_timestamp(timestamp)
        # Only ever sign a well-formed checkpoint, so that a cosignature can never be
        # passed off as a statement about some other text.
        Checkpoint.parse_body(checkpoint_body)
        signature = self._key.sign(_cosigned_message(checkpoint_body, timestamp))
        value = self._key_id + timestamp.to_bytes(8, "big") + signature
        return f"{_SIG_PREFIX}{self.name} {b64encode(value)}\n"


def verify_cosignature(vkey: str, checkpoint_body: bytes, line: str) -> int:
    """Check one cosignature line against a witness key; return its timestamp.

    `vkey` is the witness's `<name>+<id>+<base64(0x04 || key)>`; the line may end in a
    newline or not. Raises SignatureInvalid if it is not this witness's valid cosignature.
    """
    name, kid, public = _parse_vkey(vkey, SIG_COSIGNATURE_V1)
    if not isinstance(line, str):
        raise MalformedNote("a cosignature line must be text")
    line = line.removesuffix("\n")
    _, signatures = parse_note(b"x\n\n" + line.encode("utf-8") + b"\n")
    if len(signatures) != 1:
        raise MalformedNote("expected exactly one cosignature line")
    line_name, line_kid, value = signatures[0]
    if line_name != name or line_kid != kid:
        raise SignatureInvalid(f"the cosignature is not by witness {name}")
    if len(value) != 8 + _ED25519_SIG_BYTES:
        raise MalformedNote("a cosignature must hold a timestamp and an Ed25519 signature")
    timestamp = int.from_bytes(value[:8], "big")
    if timestamp > MAX_TIMESTAMP:
        raise SignatureInvalid("the cosignature timestamp is out of range")
    try:
        public.verify(value[8:], _cosigned_message(checkpoint_body, timestamp))
    except InvalidSignature:
        raise SignatureInvalid(f"the cosignature by {name} does not verify") from None
    return timestamp


# -- sealed signing keys ---------------------------------------------------------------


def _key_header(purpose: str, vkey: str) -> dict[str, Any]:
    return {
        "format": _KEY_FORMAT,
        "version": _FILE_VERSION,
        "purpose": purpose,
        "verifier_key": vkey,
    }


def write_signing_key(
    path: Path,
    *,
    purpose: str,
    vkey: str,
    private_key: Ed25519PrivateKey,
    passphrase: str,
    kdf: KdfParams,
) -> None:
    """Seal an Ed25519 seed under a passphrase into a new 0600 file; never overwrite.

    The keyring's recipe (`custodes.crypto.sealed_file`) but a file of its own:
    signing keys never sit beside the data keys. `purpose` is "log" or "witness".
    """
    sealed_file.check_passphrase(passphrase)
    if not isinstance(kdf, KdfParams):
        raise KeyringError("kdf must be KdfParams")
    if path.exists():
        raise KeyringError(f"key file already exists, refusing to overwrite: {path}")
    seed = private_key.private_bytes_raw()
    document = sealed_file.seal_document(_key_header(purpose, vkey), seed, passphrase, kdf)
    sealed_file.make_private_directory(path.parent, what=_DIRECTORY_AS)
    sealed_file.write_new_file(path, document, what=_WRITE_AS)


def reseal_signing_key(
    path: Path, *, purpose: str, passphrase: str, new_passphrase: str, kdf: KdfParams
) -> None:
    """Seal a signing key file's seed again under a new passphrase, in place: a crash
    leaves the old file or the new one, never neither."""
    sealed_file.check_passphrase(new_passphrase)
    vkey, private_key = _read_sealed_key(path, purpose=purpose, passphrase=passphrase)
    seed = private_key.private_bytes_raw()
    document = sealed_file.seal_document(_key_header(purpose, vkey), seed, new_passphrase, kdf)
    sealed_file.replace_sealed_file(path, document, what=_WRITE_AS)


def read_signing_key(
    path: Path, *, purpose: str, sig_type: int, passphrase: str
) -> tuple[str, str, Ed25519PrivateKey]:
    """Unseal a signing key file; return its key name, verifier key string and private key.

    `sig_type` is the signature type the verifier key in the header must have.
    """
    vkey, private_key = _read_sealed_key(path, purpose=purpose, passphrase=passphrase)
    try:
        name, _, _ = _parse_vkey(vkey, sig_type)
    except ConfigurationError:
        raise KeyringError("damaged key file: malformed verifier key in its header") from None
    return name, vkey, private_key


def _read_sealed_key(path: Path, *, purpose: str, passphrase: str) -> tuple[str, Ed25519PrivateKey]:
    """Unseal a signing key file; return its verifier key string and the private key."""
    sealed_file.check_passphrase(passphrase)
    raw = sealed_file.read_sealed_file(path, what="key file")
    header, seed = sealed_file.unseal_document(
        raw,
        passphrase=passphrase,
        check_header=lambda doc: _check_key_header(doc, purpose),
        not_json="not a custodes signing key file (not a JSON document)",
        unseal_failed="wrong passphrase or damaged key file",
    )
    return header.fields["verifier_key"], Ed25519PrivateKey.from_private_bytes(seed)


def _check_key_header(doc: Any, purpose: str) -> SealedHeader:
    if not isinstance(doc, dict) or doc.get("format") != _KEY_FORMAT:
        raise KeyringError("not a custodes signing key file")
    if doc.get("version") != _FILE_VERSION or isinstance(doc.get("version"), bool):
        raise KeyringError(f"unsupported signing key file version (supported: {_FILE_VERSION})")
    fields = {"format", "version", "purpose", "verifier_key", "kdf", "nonce", "sealed"}
    kdf_doc = doc.get("kdf")
    if (
        set(doc) != fields
        or not isinstance(kdf_doc, dict)
        or set(kdf_doc) != {"alg", "salt", "time_cost", "memory_kib", "parallelism"}
        or kdf_doc["alg"] != "argon2id"
        or not isinstance(doc["verifier_key"], str)
    ):
        raise KeyringError("damaged signing key file: unexpected or missing header fields")
    if doc["purpose"] != purpose:
        raise KeyringError(f"this key file does not hold a {purpose} signing key")
    return SealedHeader.from_document(
        _key_header(purpose, doc["verifier_key"]),
        doc,
        decode=_field_b64,
        sealed_length=_SEED_BYTES + _TAG_BYTES,
    )


def _field_b64(text: Any, length: int | None) -> bytes:
    data = strict_b64decode(text) if isinstance(text, str) else None
    if data is None or (length is not None and len(data) != length):
        raise KeyringError("damaged signing key file: a field is not valid base64")
    return data


# -- the log's signer ------------------------------------------------------------------


class LogSigner:
    """The log's checkpoint signer: never signs two checkpoints inconsistent with each other.

    Keeps the last checkpoint it signed in `<key file>.state` (the signed note itself,
    checked against the key on every read) and records each new one there before
    returning it, so a restart cannot make it forget what it has already vouched for.
    """

    __slots__ = ("_last", "_lock", "_signer", "_state_path")

    def __init__(self, signer: NoteSigner, state_path: Path, last: Checkpoint) -> None:
        self._signer = signer
        self._state_path = state_path
        self._last = last
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LogSigner(origin={self.origin!r})"

    @property
    def origin(self) -> str:
        return self._signer.name

    @property
    def verifier_key(self) -> str:
        return self._signer.verifier_key

    @property
    def last_signed(self) -> tuple[int, bytes]:
        """Size and root of the last checkpoint signed (size 0 and the empty root at first)."""
        return self._last.size, self._last.root

    def current(self) -> tuple[int, bytes]:
        """Size and root of the last checkpoint signed with this key by any process."""
        with self._lock, file_lock(_lock_path(self._state_path)):
            self._last = _read_state(
                self._state_path, NoteVerifier.from_key_string(self.verifier_key)
            )
            return self._last.size, self._last.root

    def sign_checkpoint(
        self, cp: Checkpoint, consistency_proof_from_last: Sequence[bytes]
    ) -> bytes:
        """Sign `cp` if it extends the last signed checkpoint; return the signed note.

        `consistency_proof_from_last` proves the last signed tree a prefix of `cp`'s
        (empty when the last size is 0 or equal to `cp.size`). Raises ForkRefused for a
        smaller size, another root at the same size, or a proof that fails.
        """
        if not isinstance(cp, Checkpoint):
            raise TypeError("sign_checkpoint takes a Checkpoint")
        if cp.origin != self.origin:
            raise ConfigurationError("the checkpoint's origin is not this log's origin")
        proof = list(consistency_proof_from_last)
        with self._lock, file_lock(_lock_path(self._state_path)):
            # Another process may share this key: the file, not memory, is the truth.
            last = _read_state(self._state_path, NoteVerifier.from_key_string(self.verifier_key))
            _check_extends(last, cp, proof)
            note = self._signer.sign(cp.body())
            if cp.size > last.size:
                replace_file_durably(self._state_path, _state_document(note))
            self._last = Checkpoint(cp.origin, cp.size, cp.root)
            return note

    @property
    def key_path(self) -> Path:
        """The sealed key file this signer was opened from (its state file lies beside)."""
        return self._state_path.with_name(self._state_path.name.removesuffix(".state"))

    def sign_erasure(self, body: bytes) -> bytes:
        """Sign an erasure statement (custodes.audit.erasures). Only a text whose first
        line is the erasure header: this key signs nothing else that could be read as a
        checkpoint, a backup statement or a loss."""
        if not body.startswith(ERASURE_HEADER.encode() + b"\n"):
            raise MalformedNote("not an erasure statement")
        return self._signer.sign(body)

    def acknowledge_loss(
        self, now: Checkpoint, *, root_at_signed: bytes | None, reason: str, at: float
    ) -> LogLoss:
        """Accept that the log lost entries its signer had signed, and sign from `now` on.

        For the host operator, once a rolled-back, cut or replaced log cannot be put back
        from a copy: `now` is the log as it stands, `root_at_signed` its root at the last
        signed size (None if it is shorter). The loss is kept, signed by this key, in
        `<key file>.losses` before the state moves, and it is never erased: `doctor` and
        `audit verify` show it ever after, and every checkpoint of the lost entries that
        a witness or an auditor holds still fails against the log. Refused (ForkRefused)
        if nothing was lost.
        """
        if now.origin != self.origin:
            raise ConfigurationError("the checkpoint's origin is not this log's origin")
        with self._lock, file_lock(_lock_path(self._state_path)):
            last = _read_state(self._state_path, NoteVerifier.from_key_string(self.verifier_key))
            if now.size >= last.size and root_at_signed == last.root:
                raise ForkRefused(
                    "the access log still holds every entry its signer signed: nothing was lost"
                )
            loss = LogLoss(last, now, int(at), _loss_reason(reason))
            statements = _read_losses(_losses_path(self._state_path), self.verifier_key)
            statements.append(self._signer.sign(loss.body()).decode("utf-8"))
            # The statement is durable before the state moves past what was lost.
            replace_file_durably(_losses_path(self._state_path), _losses_document(statements))
            note = self._signer.sign(now.body())
            replace_file_durably(self._state_path, _state_document(note))
            self._last = now
            return loss


@dataclass(frozen=True, slots=True)
class LogLoss:
    """The host operator's signed acceptance that the log lost signed entries: the last
    checkpoint signed before (`signed`), the log as it was taken up again (`resumed`),
    when, and the reason given."""

    signed: Checkpoint
    resumed: Checkpoint
    at: int
    reason: str

    @property
    def lost(self) -> int:
        """Signed entries no longer in the log (at least: a replaced log may differ
        from an earlier position than its length shows)."""
        return max(0, self.signed.size - self.resumed.size)

    def body(self) -> bytes:
        lines = [
            _LOSS_HEADER,
            self.signed.origin,
            f"signed {self.signed.size} {b64encode(self.signed.root)}",
            f"resumed {self.resumed.size} {b64encode(self.resumed.root)}",
            f"at {self.at}",
            f"reason {self.reason}",
        ]
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def parse_body(cls, body: bytes) -> LogLoss:
        try:
            header, origin, signed, resumed, at, reason = body.decode("utf-8").split("\n")[:-1]
            s_word, s_size, s_root = signed.split(" ")
            r_word, r_size, r_root = resumed.split(" ")
            at_word, at_value = at.split(" ")
            ok = (
                header == _LOSS_HEADER
                and (s_word, r_word, at_word) == ("signed", "resumed", "at")
                and reason.startswith("reason ")
                and all(_DECIMAL.fullmatch(v) for v in (s_size, r_size, at_value))
            )
            if not ok:
                raise ValueError
            signed_root, resumed_root = strict_b64decode(s_root), strict_b64decode(r_root)
            if signed_root is None or resumed_root is None:
                raise ValueError
            return cls(
                Checkpoint(origin, int(s_size), signed_root),
                Checkpoint(origin, int(r_size), resumed_root),
                int(at_value),
                reason.removeprefix("reason "),
            )
        except ValueError:
            raise MalformedNote("not a log loss statement") from None


def _loss_reason(reason: str) -> str:
    from custodes.freetext import HiddenCharacter, one_line

    try:
        text = one_line(reason)
    except HiddenCharacter as exc:
        raise ConfigurationError(f"the reason {exc}") from None
    if not text or len(text) > MAX_LOSS_REASON:
        raise ConfigurationError(
            f"give the reason for accepting the loss in 1 to {MAX_LOSS_REASON} characters"
        )
    return text


def _losses_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name.removesuffix(".state") + ".losses")


def _losses_document(statements: list[str]) -> bytes:
    doc = {"format": _LOSSES_FORMAT, "version": _FILE_VERSION, "statements": statements}
    return json.dumps(doc, indent=2).encode() + b"\n"


def _read_losses(path: Path, vkey: str) -> list[str]:
    """The signed loss statements kept beside the signer's state (none if no file)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    statements: list[str] | None = None
    try:
        doc = json.loads(raw.decode("utf-8"))
        if (
            isinstance(doc, dict)
            and doc.get("format") == _LOSSES_FORMAT
            and doc.get("version") == _FILE_VERSION
            and isinstance(doc.get("statements"), list)
            and all(isinstance(item, str) for item in doc["statements"])
        ):
            statements = list(doc["statements"])
    except (UnicodeDecodeError, ValueError):
        pass
    if statements is None:
        raise TamperDetected("the log signer's record of acknowledged losses is damaged")
    verifier = NoteVerifier.from_key_string(vkey)
    for item in statements:
        try:
            LogLoss.parse_body(verifier.verify(item.encode("utf-8")))
        except (SignatureInvalid, MalformedNote):
            raise TamperDetected(
                "a statement in the log signer's record of acknowledged losses is not "
                "signed by this log key"
            ) from None
    return statements


def signed_losses(key_path: Path) -> list[LogLoss]:
    """Every loss of signed entries the host operator acknowledged for this log key,
    oldest first, each checked against the key (read without its passphrase)."""
    vkey, _ = signed_state(key_path)
    verifier = NoteVerifier.from_key_string(vkey)
    statements = _read_losses(_losses_path(_state_path(Path(key_path))), vkey)
    return [LogLoss.parse_body(verifier.verify(item.encode("utf-8"))) for item in statements]


def _check_extends(last: Checkpoint, cp: Checkpoint, proof: list[bytes]) -> None:
    if cp.size < last.size:
        raise ForkRefused(
            f"refusing to sign size {cp.size}: a checkpoint of size {last.size} is signed"
        )
    if cp.size == last.size:
        if cp.root != last.root or proof:
            raise ForkRefused(f"refusing to sign another root for size {cp.size}")
        return
    if last.size == 0:
        if proof:
            raise ForkRefused("a checkpoint extending the empty tree takes an empty proof")
        return
    try:
        verify_consistency(last.size, cp.size, last.root, cp.root, proof)
    except InvalidProof as exc:
        raise ForkRefused(
            f"refusing to sign size {cp.size}: not proven consistent with size {last.size} ({exc})"
        ) from None


def _lock_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name.removesuffix(".state") + ".lock")


def _state_path(key_path: Path) -> Path:
    return key_path.with_name(key_path.name + ".state")


def _state_document(note: bytes) -> bytes:
    cp = Checkpoint.parse_body(parse_note(note)[0])
    doc = {
        "format": _STATE_FORMAT,
        "version": _FILE_VERSION,
        "size": cp.size,
        "root": b64encode(cp.root),
        "note": note.decode("utf-8"),
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


def signed_state(key_path: Path) -> tuple[str, Checkpoint]:
    """A log key's verifier key (from its file's header: no passphrase needed) and the last
    checkpoint it signed (from its state file, trusted for its signature), for checks made
    without the key, such as `custodes doctor`'s. KeyringError or TamperDetected if either
    file is missing or damaged."""
    try:
        header = json.loads(Path(key_path).read_bytes().decode("utf-8"))
        vkey = header["verifier_key"] if header.get("format") == _KEY_FORMAT else None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError, TypeError):
        vkey = None
    if not isinstance(vkey, str):
        raise KeyringError(f"not a readable custodes signing key file: {key_path}")
    return vkey, _read_state(_state_path(Path(key_path)), NoteVerifier.from_key_string(vkey))


def signed_state_note(key_path: Path) -> bytes:
    """The last checkpoint a log key signed, as its signed note (from its state file,
    checked against the key): a checkpoint held outside the database, for `audit verify`."""
    vkey, _ = signed_state(key_path)
    doc = json.loads(_state_path(Path(key_path)).read_bytes().decode("utf-8"))
    note = str(doc["note"]).encode("utf-8")
    NoteVerifier.from_key_string(vkey).verify(note)
    return note


def _read_state(path: Path, verifier: NoteVerifier) -> Checkpoint:
    """The last signed checkpoint, trusted only because it carries the log's signature."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TamperDetected(
            "the log signer's state file is missing; restore it from a backup before signing"
        ) from None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
        ok = (
            isinstance(doc, dict)
            and doc.get("format") == _STATE_FORMAT
            and doc.get("version") == _FILE_VERSION
            and isinstance(doc.get("note"), str)
        )
    except (UnicodeDecodeError, ValueError):
        ok = False
    if not ok:
        raise TamperDetected("the log signer's state file is damaged")
    try:
        cp = Checkpoint.parse_body(verifier.verify(doc["note"].encode("utf-8")))
    except SignatureInvalid:
        raise TamperDetected("the log signer's state file is not signed by this log key") from None
    if (
        cp.origin != verifier.name
        or doc.get("size") != cp.size
        or doc.get("root") != b64encode(cp.root)
    ):
        raise TamperDetected("the log signer's state file does not match its signed checkpoint")
    return Checkpoint(cp.origin, cp.size, cp.root)


def create_log_key(
    path: Path,
    *,
    origin: str,
    passphrase: str,
    kdf: KdfParams = DEFAULT_KDF,
) -> LogSigner:
    """Generate the log's signing key, sealed in a new file, and its state file beside it.

    The key name is the log's origin, as tlog-checkpoint recommends. The state starts
    at a signed checkpoint of the empty tree, which every later tree extends.
    """
    path = Path(path)
    _check_name(origin)
    if _has_control(origin):
        raise ConfigurationError("the log origin must be one line of text")
    state_path = _state_path(path)
    if state_path.exists():
        raise KeyringError(f"a log signer state file already exists: {state_path}")
    private_key = Ed25519PrivateKey.generate()
    signer = NoteSigner(origin, private_key)
    write_signing_key(
        path,
        purpose="log",
        vkey=signer.verifier_key,
        private_key=private_key,
        passphrase=passphrase,
        kdf=kdf,
    )
    empty = Checkpoint(origin, 0, EMPTY_ROOT)
    replace_file_durably(state_path, _state_document(signer.sign(empty.body())))
    return LogSigner(signer, state_path, empty)


def open_log_key(path: Path, *, passphrase: str) -> LogSigner:
    """Unseal the log's signing key and load the last checkpoint it signed."""
    path = Path(path)
    name, vkey, private_key = read_signing_key(
        path, purpose="log", sig_type=SIG_ED25519, passphrase=passphrase
    )
    signer = NoteSigner(name, private_key)
    if signer.verifier_key != vkey:
        raise KeyringError("damaged key file: the key does not match its header")
    state_path = _state_path(path)
    last = _read_state(state_path, NoteVerifier.from_key_string(vkey))
    return LogSigner(signer, state_path, last)
