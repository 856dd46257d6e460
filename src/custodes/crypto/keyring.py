"""The keyring: a vault's key-encryption keys and blind-index root, sealed under a passphrase.

It lives in its own file, apart from the data it protects; the file holds nothing in
the clear but a header (vault id, KDF settings, and where the KEKs are when a PKCS#11
token holds them) that is authenticated by the seal. A token's KEKs are never in it.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, NamedTuple

from custodes.crypto import sealed_file
from custodes.crypto.pkcs11 import TokenKeks
from custodes.crypto.sealed_file import DEFAULT_KDF, KEY_BYTES, KdfParams, SealedHeader
from custodes.errors import KeyringError

__all__ = [
    "FORMAT",
    "KEY_BYTES",
    "VAULT_ID_BYTES",
    "VERSION",
    "KdfParams",
    "KeyMaterial",
    "Keyring",
    "ShareMode",
    "TokenKeks",
    "read_share_mode",
]

FORMAT = "custodes-keyring"
VERSION = 1
VAULT_ID_BYTES = 16
# A record's payload names its data key generation in one byte (crypto.envelope).
MAX_DATA_GENERATION = 255
_FILE = "keyring file"
_DIRECTORY = "keyring directory"
_UNSEAL_FAILED = "wrong passphrase or damaged keyring"


class KeyMaterial(NamedTuple):
    """The unsealed secrets of one vault. Handed to workers over a pipe, never a file."""

    vault_id: bytes
    kek_version: int
    keks: dict[int, bytes]  # empty when a token holds the KEKs
    index_root: bytes
    token: TokenKeks | None = None  # the PKCS#11 token that holds the KEKs, if one does
    # The roots of the blind-index token keys, by version; None for a keyring written
    # before index keys rotated, whose only version (1) is rooted in the index root.
    token_roots: dict[int, bytes] | None = None
    token_version: int = 1  # the version new tokens are computed under
    data_generation: int = 1  # the generation new data keys are sealed under

    def __repr__(self) -> str:
        # Key bytes must never reach a log line or a traceback through repr().
        versions = ", ".join(str(v) for v in sorted(self.keks))
        where = "" if self.token is None else f", token={self.token!r}"
        return (
            f"KeyMaterial(vault_id={self.vault_id.hex()}, kek_version={self.kek_version}, "
            f"keks=<versions {versions}>, index_root=<hidden>, "
            f"token_versions=<{', '.join(str(v) for v in sorted(self.index_roots()))}>, "
            f"data_generation={self.data_generation}{where})"
        )

    def index_roots(self) -> dict[int, bytes]:
        """The live roots of the blind-index token keys, by version."""
        return {1: self.index_root} if self.token_roots is None else self.token_roots

    def kek_versions(self) -> frozenset[int]:
        """The KEK versions this material can unwrap under: its own, or its token's."""
        return frozenset(self.keks if self.token is None else self.token.key_labels)


class ShareMode(NamedTuple):
    """A keyring sealed under a random key split into `parts` shares, `threshold` to open."""

    parts: int
    threshold: int

    def check(self) -> ShareMode:
        for value in self:
            if not isinstance(value, int) or isinstance(value, bool):
                raise KeyringError("share counts must be integers")
        if not 2 <= self.threshold <= self.parts <= 255:
            raise KeyringError("shares need 2 <= threshold <= parts <= 255")
        return self


def read_share_mode(path: Path) -> ShareMode | None:
    """The unseal mode a keyring file's header names: None for a passphrase keyring.

    Read before the seal is opened, to know what to ask for; the seal authenticates the
    header when the keyring is opened, so an edited mode only makes opening fail.
    """
    raw = sealed_file.read_sealed_file(Path(path), what=_FILE)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KeyringError("not a custodes keyring (not a JSON document)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyringError("not a custodes keyring")
    return _share_mode(doc.get(_SHARES))


_SHARES = "shares"


def _share_mode(value: Any) -> ShareMode | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"parts", "threshold"}:
        raise KeyringError("damaged keyring: malformed share settings")
    return ShareMode(value["parts"], value["threshold"]).check()


class Keyring:
    """An opened keyring file. Create one with `create`, open one with `open`."""

    __slots__ = ("_kdf", "_material", "_path", "_shares")

    def __init__(
        self, path: Path, material: KeyMaterial, kdf: KdfParams, shares: ShareMode | None = None
    ) -> None:
        self._path = path
        self._material = material
        self._kdf = kdf
        self._shares = shares

    def __repr__(self) -> str:
        return f"Keyring(vault_id={self._material.vault_id.hex()})"

    @property
    def vault_id(self) -> bytes:
        return self._material.vault_id

    @property
    def material(self) -> KeyMaterial:
        return self._material

    @property
    def shares(self) -> ShareMode | None:
        """M-of-N shares seal this keyring (their key given as the passphrase), or None."""
        return self._shares

    @classmethod
    def create(
        cls,
        path: Path,
        *,
        vault_id: bytes,
        passphrase: str,
        kdf: KdfParams = DEFAULT_KDF,
        token: TokenKeks | None = None,
        shares: ShareMode | None = None,
    ) -> Keyring:
        """Generate fresh keys for a vault and write them sealed to a new file. With
        `token`, the KEKs are the token's (made there already): the file records which,
        with the blind-index root, and holds no KEK. With `shares`, the passphrase is the
        text of a random key split into shares (custodes.crypto.key_shares) and the
        header says so."""
        path = Path(path)
        sealed_file.check_passphrase(passphrase)
        if not isinstance(vault_id, bytes) or len(vault_id) != VAULT_ID_BYTES:
            raise KeyringError(f"vault id must be {VAULT_ID_BYTES} bytes")
        if not isinstance(kdf, KdfParams):
            raise KeyringError("kdf must be KdfParams")
        if shares is not None:
            shares = ShareMode(*shares).check()
        if path.exists():
            raise KeyringError(f"keyring file already exists, refusing to overwrite: {path}")
        if token is not None and (not token.key_labels or min(token.key_labels) < 1):
            raise KeyringError("a token keyring needs the label of at least one KEK")
        material = KeyMaterial(
            vault_id=vault_id,
            kek_version=1 if token is None else max(token.key_labels),
            keks={1: os.urandom(KEY_BYTES)} if token is None else {},
            index_root=os.urandom(KEY_BYTES),
            token=token,
            # A root of its own, not the index root, so that rotating the index keys
            # can destroy version 1 while record ids (keyed by the index root) stay.
            token_roots={1: os.urandom(KEY_BYTES)},
        )
        sealed_file.make_private_directory(path.parent, what=_DIRECTORY)
        sealed_file.write_new_file(path, _seal(material, passphrase, kdf, shares), what=_FILE)
        return cls(path, material, kdf, shares)

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        passphrase: str,
        vault_id: bytes | None = None,
        token_pin: str | None = None,
    ) -> Keyring:
        """Read and unseal a keyring file; with vault_id, refuse another vault's keyring.
        A keyring whose KEKs are in a token needs the token's PIN too."""
        path = Path(path)
        sealed_file.check_passphrase(passphrase)
        raw = sealed_file.read_sealed_file(path, what=_FILE)
        material, kdf, shares = _unseal(raw, passphrase, vault_id)
        if material.token is not None:
            if not token_pin:
                raise KeyringError(
                    f"this vault's key-encryption keys are in the {material.token.describe()}: "
                    "give its user PIN (CUSTODES_PKCS11_PIN)"
                )
            material = material._replace(token=material.token._replace(pin=token_pin))
        return cls(path, material, kdf, shares)

    @staticmethod
    def token_of(path: Path) -> TokenKeks | None:
        """Where a keyring file says its KEKs are, read from its header without the
        passphrase (for doctor): a token, or None for the file itself. Not verified:
        only unsealing authenticates the header."""
        try:
            doc = json.loads(Path(path).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict):
            return None
        try:
            return _token_from_header(doc)
        except KeyringError:
            return None

    def rotate_kek(self, passphrase: str) -> int:
        """Add a new key-encryption key and make it current; return its version.

        Older versions stay in the keyring so that data wrapped under them still
        opens, until `retire` destroys them.
        """
        return self.rotate(passphrase).kek_version

    def rotate(self, passphrase: str, *, data: bool = False, index: bool = False) -> KeyMaterial:
        """Start a rotation: a new KEK version made current, and with `data` a new data
        key generation, with `index` a new blind-index root. Older versions stay live
        until `retire` destroys them, once nothing stored uses them.

        The passphrase must open the file as it is on disk now, and the file must not
        have changed since this keyring was opened (another process may have rotated
        already: rewriting from a stale copy would lose its new key).
        """
        pin = None if self._material.token is None else self._material.token.pin

        def start(material: KeyMaterial) -> KeyMaterial:
            if material.token is None:
                keks = dict(material.keks)
                version = max(keks) + 1
                keks[version] = os.urandom(KEY_BYTES)
                material = material._replace(kek_version=version, keks=keks)
            else:
                # Made inside the token; a random part in its label, so that a key left
                # by a rotation that died before the keyring named it is never reused.
                from custodes.crypto.pkcs11 import generate_token_kek

                token = material.token._replace(pin=pin or "")
                version = max(token.key_labels) + 1
                label = f"custodes-kek-{material.vault_id.hex()}-v{version}-{os.urandom(4).hex()}"
                generate_token_kek(token, label)
                labels = {**token.key_labels, version: label}
                material = material._replace(
                    kek_version=version, token=material.token._replace(key_labels=labels)
                )
            if data:
                if material.data_generation >= MAX_DATA_GENERATION:
                    raise KeyringError("the data keys have rotated as often as they can")
                material = material._replace(data_generation=material.data_generation + 1)
            if index:
                roots = dict(material.index_roots())
                token_version = max(roots) + 1
                roots[token_version] = os.urandom(KEY_BYTES)
                material = material._replace(token_roots=roots, token_version=token_version)
            return material

        return self._rewrite(passphrase, start, shares=self._shares)

    def retire(
        self, passphrase: str, *, keks: Collection[int] = (), token_versions: Collection[int] = ()
    ) -> KeyMaterial:
        """Destroy old KEK and index-root versions: they leave the keyring file for good.
        The current versions cannot be retired; the caller has checked that nothing
        stored still uses what it names."""
        keks, token_versions = set(keks), set(token_versions)
        if not keks and not token_versions:
            return self._material

        def drop(material: KeyMaterial) -> KeyMaterial:
            if material.kek_version in keks or material.token_version in token_versions:
                raise KeyringError("the current key versions cannot be retired")
            roots = material.index_roots()
            if not keks <= material.kek_versions() or not token_versions <= roots.keys():
                raise KeyringError("no such key version to retire")
            token = material.token
            if token is not None:
                labels = {v: k for v, k in token.key_labels.items() if v not in keks}
                token = token._replace(key_labels=labels)
            return material._replace(
                keks={v: k for v, k in material.keks.items() if v not in keks},
                token_roots={v: r for v, r in roots.items() if v not in token_versions},
                token=token,
            )

        before = self._material.token
        material = self._rewrite(passphrase, drop, shares=self._shares)
        if before is not None:
            # Only once the keyring no longer names them: a crash in between leaves a key
            # nothing uses in the token, never a keyring naming a key that is gone.
            from custodes.crypto.pkcs11 import destroy_token_kek

            for version in sorted(keks):
                destroy_token_kek(before, before.key_labels[version])
        return material

    def reseal(self, passphrase: str, new_passphrase: str, shares: ShareMode | None) -> None:
        """Seal the same keys under a new passphrase (for shares, the text of a new key
        split into new shares: `custodes keys reshare`); the old one opens nothing after."""
        sealed_file.check_passphrase(new_passphrase)
        if shares is not None:
            shares = ShareMode(*shares).check()
        self._rewrite(passphrase, lambda m: m, new_passphrase=new_passphrase, shares=shares)
        self._shares = shares

    def _rewrite(
        self,
        passphrase: str,
        change: Callable[[KeyMaterial], KeyMaterial],
        *,
        shares: ShareMode | None,
        new_passphrase: str | None = None,
    ) -> KeyMaterial:
        """Reseal the keyring file with `change` applied to what it holds, under a lock,
        refusing a file that changed since this keyring read it: with `shares` in its
        header, under `new_passphrase` when given."""
        sealed_file.check_passphrase(passphrase)
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except FileNotFoundError:
            raise KeyringError(f"keyring file not found: {self._path}") from None
        except OSError as exc:
            raise KeyringError(f"cannot open keyring file {self._path}: {exc.strerror}") from None
        try:
            # Serialise rewrites; the lock is on the current file's inode, so a waiter
            # must also check that the path still names the inode it locked.
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked_stat, path_stat = os.fstat(fd), os.stat(self._path)
            if (locked_stat.st_dev, locked_stat.st_ino) != (path_stat.st_dev, path_stat.st_ino):
                raise KeyringError("keyring file changed on disk; open it again before rotating")
            with os.fdopen(os.dup(fd), "rb") as locked:
                raw = locked.read()
            on_disk, _, _ = _unseal(raw, passphrase, self._material.vault_id)
            if not _same_material(on_disk, self._material):
                raise KeyringError("keyring file changed on disk; open it again before rotating")
            material = change(on_disk)
            document = _seal(
                material,
                passphrase if new_passphrase is None else new_passphrase,
                self._kdf,
                shares,
            )
            sealed_file.replace_sealed_file(self._path, document, what=_FILE)
        finally:
            os.close(fd)
        self._material = self._with_pin(material)
        return self._material

    def _with_pin(self, material: KeyMaterial) -> KeyMaterial:
        """Material read from the file, with the token PIN this keyring was opened with."""
        if material.token is None or self._material.token is None:
            return material
        return material._replace(token=material.token._replace(pin=self._material.token.pin))

    def reload(self, passphrase: str) -> KeyMaterial:
        """The keyring as it is on disk now (after another process rotated or retired)."""
        raw = sealed_file.read_sealed_file(self._path, what=_FILE)
        material, _, _ = _unseal(raw, passphrase, self._material.vault_id)
        self._material = self._with_pin(material)
        return self._material


def _same_material(a: KeyMaterial, b: KeyMaterial) -> bool:
    if a.vault_id != b.vault_id or a.kek_version != b.kek_version or a.keks.keys() != b.keks.keys():
        return False
    a_token = None if a.token is None else a.token._replace(pin="")
    b_token = None if b.token is None else b.token._replace(pin="")
    if a_token != b_token or (a.token_version, a.data_generation) != (
        b.token_version,
        b.data_generation,
    ):
        return False
    a_roots, b_roots = a.index_roots(), b.index_roots()
    if a_roots.keys() != b_roots.keys():
        return False
    same = secrets.compare_digest(a.index_root, b.index_root)
    for version, root in a_roots.items():
        same &= secrets.compare_digest(root, b_roots[version])
    for version, key in a.keks.items():
        same &= secrets.compare_digest(key, b.keks[version])
    return same


_KEKS_IN = "keks_in"


def _header(
    vault_id: bytes, token: TokenKeks | None = None, shares: ShareMode | None = None
) -> dict[str, Any]:
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "vault_id": vault_id.hex()}
    if shares is not None:
        header[_SHARES] = shares._asdict()
    if token is not None:
        # Where the KEKs are is no secret, and doctor reads it without the passphrase;
        # the seal authenticates it, and the PIN is never written.
        header[_KEKS_IN] = {
            "pkcs11_module": token.module,
            "token_label": token.token_label,
            "key_labels": {str(v): label for v, label in sorted(token.key_labels.items())},
        }
    return header


def _token_from_header(doc: dict[str, Any]) -> TokenKeks | None:
    where = doc.get(_KEKS_IN)
    if where is None:
        return None
    try:
        module, label, keys = where["pkcs11_module"], where["token_label"], where["key_labels"]
        if set(where) != {"pkcs11_module", "token_label", "key_labels"}:
            raise TypeError
        if not (isinstance(module, str) and isinstance(label, str) and isinstance(keys, dict)):
            raise TypeError
        key_labels = {int(v): str(k) for v, k in keys.items() if isinstance(k, str)}
        if len(key_labels) != len(keys) or not key_labels:
            raise TypeError
    except (TypeError, KeyError, ValueError):
        raise KeyringError("damaged keyring: malformed token settings") from None
    return TokenKeks(module, label, key_labels)


def _seal(
    material: KeyMaterial, passphrase: str, kdf: KdfParams, shares: ShareMode | None = None
) -> bytes:
    secrets_doc = {
        "kek_version": material.kek_version,
        "keks": {str(v): sealed_file.b64encode(k) for v, k in sorted(material.keks.items())},
        "index_root": sealed_file.b64encode(material.index_root),
    }
    if material.token_roots is not None:
        secrets_doc["token_roots"] = {
            str(v): sealed_file.b64encode(k) for v, k in sorted(material.token_roots.items())
        }
        secrets_doc["token_version"] = material.token_version
    if material.data_generation != 1:
        secrets_doc["data_generation"] = material.data_generation
    plain = json.dumps(secrets_doc, sort_keys=True).encode()
    header = _header(material.vault_id, material.token, shares)
    return sealed_file.seal_document(header, plain, passphrase, kdf)


def _unseal(
    raw: bytes, passphrase: str, expected_vault_id: bytes | None
) -> tuple[KeyMaterial, KdfParams, ShareMode | None]:
    header, plain = sealed_file.unseal_document(
        raw,
        passphrase=passphrase,
        check_header=lambda doc: _check_header(doc, expected_vault_id),
        not_json="not a custodes keyring (not a JSON document)",
        unseal_failed=_UNSEAL_FAILED,
    )
    vault_id = bytes.fromhex(header.fields["vault_id"])
    material = _parse_secrets(plain, vault_id, _token_from_header(header.fields))
    return material, header.kdf, _share_mode(header.fields.get(_SHARES))


def _check_header(doc: Any, expected_vault_id: bytes | None) -> SealedHeader:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyringError("not a custodes keyring")
    version = doc.get("version")
    if version != VERSION or isinstance(version, bool):
        raise KeyringError(f"unsupported keyring version {version!r} (supported: {VERSION})")
    if set(doc) - {_KEKS_IN, _SHARES} != {
        "format",
        "version",
        "vault_id",
        "kdf",
        "nonce",
        "sealed",
    }:
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
    header = _header(vault_id, _token_from_header(doc), _share_mode(doc.get(_SHARES)))
    return SealedHeader.from_document(header, doc, decode=_unb64, sealed_length=None)


def _parse_secrets(plain: bytes, vault_id: bytes, token: TokenKeks | None) -> KeyMaterial:
    # The seal authenticated these bytes, so a failure here means a bug in whatever
    # wrote them, not an attack; still refuse rather than run with odd keys.
    try:
        doc = json.loads(plain)
        kek_version = doc["kek_version"]
        keks = {int(v): _unb64(k, KEY_BYTES) for v, k in doc["keks"].items()}
        index_root = _unb64(doc["index_root"], KEY_BYTES)
        roots = doc.get("token_roots")
        token_roots = (
            None if roots is None else {int(v): _unb64(k, KEY_BYTES) for v, k in roots.items()}
        )
        token_version = doc.get("token_version", 1)
        data_generation = doc.get("data_generation", 1)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise KeyringError("damaged keyring: malformed sealed contents") from None
    versions = keks if token is None else token.key_labels
    if token is not None and keks:
        raise KeyringError("damaged keyring: KEK bytes beside a token's KEKs")
    if not isinstance(kek_version, int) or kek_version not in versions or min(versions) < 1:
        raise KeyringError("damaged keyring: malformed sealed contents")
    live_roots = {1: b""} if token_roots is None else token_roots
    if not isinstance(token_version, int) or token_version not in live_roots:
        raise KeyringError("damaged keyring: malformed sealed contents")
    if not isinstance(data_generation, int) or not 1 <= data_generation <= MAX_DATA_GENERATION:
        raise KeyringError("damaged keyring: malformed sealed contents")
    return KeyMaterial(
        vault_id=vault_id,
        kek_version=kek_version,
        keks=keks,
        index_root=index_root,
        token=token,
        token_roots=token_roots,
        token_version=token_version,
        data_generation=data_generation,
    )


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
