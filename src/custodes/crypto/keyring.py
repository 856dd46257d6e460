"""The keyring: a vault's key-encryption keys and blind-index root, sealed under a passphrase.

It lives in its own file, apart from the data it protects; the file holds nothing in
the clear but a header (vault id, KDF settings) that is authenticated by the seal.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from custodes.errors import KeyringError

FORMAT = "custodes-keyring"
VERSION = 1
VAULT_ID_BYTES = 16
KEY_BYTES = 32
_SALT_BYTES = 16
_NONCE_BYTES = 12

# OWASP's minimum for argon2id. Below it a stolen keyring file is too cheap to attack.
MIN_TIME_COST = 2
MIN_MEMORY_KIB = 19_456
# Upper bounds exist only so that an edited header cannot make opening the keyring
# allocate unbounded memory before the seal gets a chance to reject the edit.
MAX_TIME_COST = 64
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_PARALLELISM = 64

_UNSEAL_FAILED = "wrong passphrase or damaged keyring"


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


class KeyMaterial(NamedTuple):
    """The unsealed secrets of one vault. Handed to workers over a pipe, never a file."""

    vault_id: bytes
    kek_version: int
    keks: dict[int, bytes]
    index_root: bytes

    def __repr__(self) -> str:
        # Key bytes must never reach a log line or a traceback through repr().
        versions = ", ".join(str(v) for v in sorted(self.keks))
        return (
            f"KeyMaterial(vault_id={self.vault_id.hex()}, kek_version={self.kek_version}, "
            f"keks=<versions {versions}>, index_root=<hidden>)"
        )


class Keyring:
    """An opened keyring file. Create one with `create`, open one with `open`."""

    __slots__ = ("_kdf", "_material", "_path")

    def __init__(self, path: Path, material: KeyMaterial, kdf: KdfParams) -> None:
        self._path = path
        self._material = material
        self._kdf = kdf

    def __repr__(self) -> str:
        return f"Keyring(vault_id={self._material.vault_id.hex()})"

    @property
    def vault_id(self) -> bytes:
        return self._material.vault_id

    @property
    def material(self) -> KeyMaterial:
        return self._material

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        vault_id: bytes,
        passphrase: str,
        kdf: KdfParams = KdfParams(),  # frozen: sharing the default is safe
    ) -> Keyring:
        """Generate fresh keys for a vault and write them sealed to a new file."""
        path = Path(path)
        _check_passphrase(passphrase)
        if not isinstance(vault_id, bytes) or len(vault_id) != VAULT_ID_BYTES:
            raise KeyringError(f"vault id must be {VAULT_ID_BYTES} bytes")
        if not isinstance(kdf, KdfParams):
            raise KeyringError("kdf must be KdfParams")
        if path.exists():
            raise KeyringError(f"keyring file already exists, refusing to overwrite: {path}")
        material = KeyMaterial(
            vault_id=vault_id,
            kek_version=1,
            keks={1: os.urandom(KEY_BYTES)},
            index_root=os.urandom(KEY_BYTES),
        )
        _create_private_dir(path.parent)
        _write_atomically(path, _seal(material, passphrase, kdf), replace=False)
        return cls(path, material, kdf)

    @classmethod
    def open(cls, path: Path, *, passphrase: str, vault_id: bytes | None = None) -> Keyring:
        """Read and unseal a keyring file; with vault_id, refuse another vault's keyring."""
        path = Path(path)
        _check_passphrase(passphrase)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise KeyringError(f"keyring file not found: {path}") from None
        except OSError as exc:
            raise KeyringError(f"cannot read keyring file {path}: {exc.strerror}") from None
        material, kdf = _unseal(raw, passphrase, vault_id)
        return cls(path, material, kdf)

    def rotate_kek(self, passphrase: str) -> int:
        """Add a new key-encryption key and make it current; return its version.

        Older versions stay in the keyring so that data wrapped under them still
        opens. The passphrase must open the file as it is on disk now, and the file
        must not have changed since this keyring was opened (another process may have
        rotated already: rewriting from a stale copy would lose its new key).
        """
        _check_passphrase(passphrase)
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except FileNotFoundError:
            raise KeyringError(f"keyring file not found: {self._path}") from None
        except OSError as exc:
            raise KeyringError(f"cannot open keyring file {self._path}: {exc.strerror}") from None
        try:
            # Serialise rotations; the lock is on the current file's inode, so a waiter
            # must also check that the path still names the inode it locked.
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked_stat, path_stat = os.fstat(fd), os.stat(self._path)
            if (locked_stat.st_dev, locked_stat.st_ino) != (path_stat.st_dev, path_stat.st_ino):
                raise KeyringError("keyring file changed on disk; open it again before rotating")
            with os.fdopen(os.dup(fd), "rb") as locked:
                raw = locked.read()
            on_disk, _ = _unseal(raw, passphrase, self._material.vault_id)
            if not _same_material(on_disk, self._material):
                raise KeyringError("keyring file changed on disk; open it again before rotating")
            version = max(on_disk.keks) + 1
            keks = dict(on_disk.keks)
            keks[version] = os.urandom(KEY_BYTES)
            material = on_disk._replace(kek_version=version, keks=keks)
            _write_atomically(self._path, _seal(material, passphrase, self._kdf), replace=True)
        finally:
            os.close(fd)
        self._material = material
        return version


def _check_passphrase(passphrase: str) -> None:
    if not isinstance(passphrase, str) or not passphrase:
        raise KeyringError("a non-empty passphrase is required")


def _same_material(a: KeyMaterial, b: KeyMaterial) -> bool:
    if a.vault_id != b.vault_id or a.kek_version != b.kek_version or a.keks.keys() != b.keks.keys():
        return False
    same = secrets.compare_digest(a.index_root, b.index_root)
    for version, key in a.keks.items():
        same &= secrets.compare_digest(key, b.keks[version])
    return same


def _sealing_key(passphrase: str, salt: bytes, kdf: KdfParams) -> bytes:
    # NFC so that the same passphrase typed on systems that compose accents
    # differently still opens the keyring.
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


def _header(vault_id: bytes, salt: bytes, kdf: KdfParams) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "vault_id": vault_id.hex(),
        "kdf": {
            "alg": "argon2id",
            "salt": _b64(salt),
            "time_cost": kdf.time_cost,
            "memory_kib": kdf.memory_kib,
            "parallelism": kdf.parallelism,
        },
    }


def _canonical(header: dict[str, Any]) -> bytes:
    # The AAD is rebuilt from the parsed values, so an edit to any header field, not
    # only to its bytes, changes it.
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _seal(material: KeyMaterial, passphrase: str, kdf: KdfParams) -> bytes:
    salt = os.urandom(_SALT_BYTES)
    nonce = os.urandom(_NONCE_BYTES)
    header = _header(material.vault_id, salt, kdf)
    secrets_doc = {
        "kek_version": material.kek_version,
        "keks": {str(v): _b64(k) for v, k in sorted(material.keks.items())},
        "index_root": _b64(material.index_root),
    }
    sealed = AESGCM(_sealing_key(passphrase, salt, kdf)).encrypt(
        nonce, json.dumps(secrets_doc, sort_keys=True).encode(), _canonical(header)
    )
    doc = dict(header, nonce=_b64(nonce), sealed=_b64(sealed))
    return json.dumps(doc, indent=2).encode() + b"\n"


def _unseal(
    raw: bytes, passphrase: str, expected_vault_id: bytes | None
) -> tuple[KeyMaterial, KdfParams]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KeyringError("not a custodes keyring (not a JSON document)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyringError("not a custodes keyring")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise KeyringError(f"unsupported keyring version {version!r} (supported: {VERSION})")
    if set(doc) != {"format", "version", "vault_id", "kdf", "nonce", "sealed"}:
        raise KeyringError("damaged keyring: unexpected or missing header fields")
    vault_id = _unhex(doc["vault_id"], VAULT_ID_BYTES)
    if expected_vault_id is not None and not secrets.compare_digest(vault_id, expected_vault_id):
        raise KeyringError("keyring belongs to another vault")
    kdf_doc = doc["kdf"]
    if not isinstance(kdf_doc, dict) or set(kdf_doc) != {
        "alg",
        "salt",
        "time_cost",
        "memory_kib",
        "parallelism",
    }:
        raise KeyringError("damaged keyring: malformed KDF settings")
    if kdf_doc["alg"] != "argon2id":
        raise KeyringError(f"unsupported keyring KDF {kdf_doc['alg']!r}")
    kdf = KdfParams(
        time_cost=kdf_doc["time_cost"],
        memory_kib=kdf_doc["memory_kib"],
        parallelism=kdf_doc["parallelism"],
    )
    salt = _unb64(kdf_doc["salt"], _SALT_BYTES)
    nonce = _unb64(doc["nonce"], _NONCE_BYTES)
    sealed = _unb64(doc["sealed"], None)
    aad = _canonical(_header(vault_id, salt, kdf))
    try:
        plain = AESGCM(_sealing_key(passphrase, salt, kdf)).decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise KeyringError(_UNSEAL_FAILED) from None
    return _parse_secrets(plain, vault_id), kdf


def _parse_secrets(plain: bytes, vault_id: bytes) -> KeyMaterial:
    # The seal authenticated these bytes, so a failure here means a bug in whatever
    # wrote them, not an attack; still refuse rather than run with odd keys.
    try:
        doc = json.loads(plain)
        kek_version = doc["kek_version"]
        keks = {int(v): _unb64(k, KEY_BYTES) for v, k in doc["keks"].items()}
        index_root = _unb64(doc["index_root"], KEY_BYTES)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KeyringError("damaged keyring: malformed sealed contents") from None
    if not isinstance(kek_version, int) or kek_version not in keks or min(keks) < 1:
        raise KeyringError("damaged keyring: malformed sealed contents")
    return KeyMaterial(vault_id=vault_id, kek_version=kek_version, keks=keks, index_root=index_root)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, length: int | None) -> bytes:
    if not isinstance(text, str):
        raise KeyringError("damaged keyring: a field is not base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("damaged keyring: a field is not valid base64") from None
    if length is not None and len(data) != length:
        raise KeyringError("damaged keyring: a field has the wrong length")
    return data


def _unhex(text: Any, length: int) -> bytes:
    if not isinstance(text, str):
        raise KeyringError("damaged keyring: vault id is not hex text")
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise KeyringError("damaged keyring: vault id is not valid hex") from None
    if len(data) != length or text != data.hex():
        raise KeyringError("damaged keyring: vault id is malformed")
    return data


def _create_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyringError(f"cannot create keyring directory {directory}: {exc.strerror}") from None


def _write_atomically(path: Path, data: bytes, *, replace: bool) -> None:
    """Write data to path so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise KeyringError(f"cannot write keyring file {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            # A hard link never replaces an existing file, so two concurrent creators
            # cannot overwrite each other's keys.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise KeyringError(
                    f"keyring file already exists, refusing to overwrite: {path}"
                ) from None
            except OSError:
                # Some filesystems have no hard links; fall back to check-then-rename.
                if path.exists():
                    raise KeyringError(
                        f"keyring file already exists, refusing to overwrite: {path}"
                    ) from None
                os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise KeyringError(f"cannot write keyring file {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
