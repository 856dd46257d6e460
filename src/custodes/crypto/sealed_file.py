"""Secrets sealed under a passphrase, each in a small file of its own: the one recipe.

argon2id turns the NFC-normalised passphrase into an AES-256-GCM key, and the JSON
header (format, version, KDF salt and costs) is authenticated as AAD. Files are written
0600, atomically and synced, into 0700 directories; a new file never replaces another.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import secrets
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from custodes.errors import KeyringError, StorageError

__all__ = [
    "DEFAULT_KDF",
    "KEY_BYTES",
    "MAX_MEMORY_KIB",
    "MAX_PARALLELISM",
    "MAX_TIME_COST",
    "MIN_MEMORY_KIB",
    "MIN_TIME_COST",
    "NONCE_BYTES",
    "SALT_BYTES",
    "KdfParams",
    "SealedHeader",
    "b64encode",
    "check_passphrase",
    "file_lock",
    "kdf_header",
    "make_private_directory",
    "read_sealed_file",
    "replace_file_durably",
    "replace_sealed_file",
    "seal_document",
    "sealing_key",
    "strict_b64decode",
    "unseal_document",
    "write_new_file",
]

KEY_BYTES = 32
SALT_BYTES = 16
NONCE_BYTES = 12

# OWASP's minimum for argon2id. Below it a stolen keyring file is too cheap to attack.
MIN_TIME_COST = 2
MIN_MEMORY_KIB = 19_456
# Upper bounds exist only so that an edited header cannot make opening the keyring
# allocate unbounded memory before the seal gets a chance to reject the edit.
MAX_TIME_COST = 64
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_PARALLELISM = 64


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost settings used to turn the passphrase into the sealing key."""

    time_cost: int = 3
    memory_kib: int = 262_144
    parallelism: int = 1

    def __post_init__(self) -> None:
        for name in ("time_cost", "memory_kib", "parallelism"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise KeyringError(f"KDF setting {name} must be an integer")
        if not MIN_TIME_COST <= self.time_cost <= MAX_TIME_COST:
            raise KeyringError(f"KDF time_cost must be between {MIN_TIME_COST} and {MAX_TIME_COST}")
        if not MIN_MEMORY_KIB <= self.memory_kib <= MAX_MEMORY_KIB:
            raise KeyringError(
                f"KDF memory_kib must be between {MIN_MEMORY_KIB} and {MAX_MEMORY_KIB}"
            )
        if not 1 <= self.parallelism <= MAX_PARALLELISM:
            raise KeyringError(f"KDF parallelism must be between 1 and {MAX_PARALLELISM}")


DEFAULT_KDF = KdfParams()  # frozen: sharing one default is safe


class SealedHeader(NamedTuple):
    """A sealed file's header as its format's own check read it, ready to authenticate.

    `fields` are the header fields that come before `kdf` (format, version, and whatever
    the format adds), with the values the file holds.
    """

    fields: dict[str, Any]
    kdf: KdfParams
    salt: bytes
    nonce: bytes
    sealed: bytes

    @classmethod
    def from_document(
        cls,
        fields: dict[str, Any],
        doc: dict[str, Any],
        *,
        decode: Callable[[Any, int | None], bytes],
        sealed_length: int | None,
    ) -> SealedHeader:
        """Read the KDF costs, salt, nonce and ciphertext of a document whose keys are checked.

        `decode(text, length)` turns one base64 field into bytes of that length (any
        length for None), raising in the format's words; KdfParams refuses bad costs.
        """
        kdf_doc = doc["kdf"]
        kdf = KdfParams(
            time_cost=kdf_doc["time_cost"],
            memory_kib=kdf_doc["memory_kib"],
            parallelism=kdf_doc["parallelism"],
        )
        return cls(
            fields=fields,
            kdf=kdf,
            salt=decode(kdf_doc["salt"], SALT_BYTES),
            nonce=decode(doc["nonce"], NONCE_BYTES),
            sealed=decode(doc["sealed"], sealed_length),
        )


def check_passphrase(passphrase: str) -> None:
    """Refuse anything but a non-empty string (KeyringError)."""
    if not isinstance(passphrase, str) or not passphrase:
        raise KeyringError("a non-empty passphrase is required")


def sealing_key(passphrase: str, salt: bytes, kdf: KdfParams) -> bytes:
    """The AES-256-GCM key for a passphrase: argon2id over its NFC UTF-8 bytes."""
    # NFC so that the same passphrase typed on systems that compose accents
    # differently still opens the file.
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    return hash_secret_raw(
        secret=secret,
        salt=salt,
        time_cost=kdf.time_cost,
        memory_cost=kdf.memory_kib,
        parallelism=kdf.parallelism,
        hash_len=KEY_BYTES,
        type=Type.ID,
    )


def kdf_header(salt: bytes, kdf: KdfParams) -> dict[str, Any]:
    """The header's `kdf` block: algorithm, salt and costs."""
    return {
        "alg": "argon2id",
        "salt": b64encode(salt),
        "time_cost": kdf.time_cost,
        "memory_kib": kdf.memory_kib,
        "parallelism": kdf.parallelism,
    }


def _canonical(header: dict[str, Any]) -> bytes:
    # The AAD is rebuilt from the parsed values, so an edit to any header field, not
    # only to its bytes, changes it.
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal_document(header: dict[str, Any], secret: bytes, passphrase: str, kdf: KdfParams) -> bytes:
    """Seal `secret` under `passphrase`; return the file's bytes (indented JSON, newline).

    The document is `header`'s fields, then `kdf`, `nonce` and `sealed`; everything but
    the nonce and the ciphertext is authenticated. Salt and nonce are fresh each time.
    """
    salt = os.urandom(SALT_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    authenticated = dict(header, kdf=kdf_header(salt, kdf))
    sealed = AESGCM(sealing_key(passphrase, salt, kdf)).encrypt(
        nonce, secret, _canonical(authenticated)
    )
    doc = dict(authenticated, nonce=b64encode(nonce), sealed=b64encode(sealed))
    return json.dumps(doc, indent=2).encode() + b"\n"


def unseal_document(
    data: bytes,
    *,
    passphrase: str,
    check_header: Callable[[Any], SealedHeader],
    not_json: str,
    unseal_failed: str,
) -> tuple[SealedHeader, bytes]:
    """Open a document written by `seal_document`; return its header and the secret.

    `check_header` gets the parsed JSON and raises, in its format's words, unless it is
    a well-formed header. KeyringError(`not_json`) if `data` is not a JSON document,
    KeyringError(`unseal_failed`) if the passphrase is wrong or anything authenticated
    was changed: the two cannot be told apart.
    """
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KeyringError(not_json) from None
    header = check_header(doc)
    aad = _canonical(dict(header.fields, kdf=kdf_header(header.salt, header.kdf)))
    try:
        secret = AESGCM(sealing_key(passphrase, header.salt, header.kdf)).decrypt(
            header.nonce, header.sealed, aad
        )
    except InvalidTag:
        raise KeyringError(unseal_failed) from None
    return header, secret


# -- base64 -----------------------------------------------------------------------------


def b64encode(data: bytes) -> str:
    """Standard padded base64, as text."""
    return base64.b64encode(data).decode("ascii")


def strict_b64decode(text: str) -> bytes | None:
    """Decode standard padded base64, accepting only its one canonical spelling; else None.

    Non-canonical spellings (stray trailing bits) decode to the same bytes; refusing
    them keeps each signed note and proof byte-for-byte unique.
    """
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    return data if b64encode(data) == text else None


# -- private files and directories ---------------------------------------------------------


def read_sealed_file(path: Path, *, what: str) -> bytes:
    """The bytes of a sealed file; KeyringError naming `what` if missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyringError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise KeyringError(f"cannot read {what} {path}: {exc.strerror}") from None


def make_private_directory(directory: Path, *, what: str) -> None:
    """Create `directory` (and its parents) as 0700 if missing; KeyringError naming `what`."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyringError(f"cannot create {what} {directory}: {exc.strerror}") from None


def write_new_file(path: Path, data: bytes, *, what: str) -> None:
    """Write a new 0600 file at `path`, atomically and synced; never overwrite one.

    A crash leaves no file or the whole of it. Raises KeyringError, naming the file as
    `what`, if `path` exists (even if another process creates it meanwhile) or if it
    cannot be written.
    """
    exists = f"{what} already exists, refusing to overwrite: {path}"

    def link(tmp: Path) -> None:
        # A hard link never replaces an existing file, so two concurrent creators
        # cannot overwrite each other's keys.
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeyringError(exists) from None
        except OSError:
            # Some filesystems have no hard links; fall back to check-then-rename.
            if path.exists():
                raise KeyringError(exists) from None
            os.replace(tmp, path)

    try:
        _write_through_temporary(path, data, link)
    except OSError as exc:
        raise KeyringError(f"cannot write {what} {path}: {exc.strerror}") from None


def replace_sealed_file(path: Path, data: bytes, *, what: str) -> None:
    """Replace a sealed file so that a crash leaves the old or the new one, synced.

    Raises KeyringError, naming the file as `what`, if it cannot be written.
    """
    try:
        _write_through_temporary(path, data, lambda tmp: os.replace(tmp, path))
    except OSError as exc:
        raise KeyringError(f"cannot write {what} {path}: {exc.strerror}") from None


def replace_file_durably(path: Path, data: bytes) -> None:
    """Replace a small 0600 file so that a crash leaves the old or the new one, synced.

    Raises StorageError if it cannot be written.
    """
    try:
        _write_through_temporary(path, data, lambda tmp: os.replace(tmp, path))
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from None


def _write_through_temporary(path: Path, data: bytes, put: Callable[[Path], None]) -> None:
    """Write and sync a 0600 temporary beside `path`, `put` it in place, sync the directory."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        put(tmp)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock held on a lock file of its own (the data files get renamed).

    Raises StorageError if the lock file cannot be opened.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StorageError(f"cannot open lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
