"""Where a vault's key-encryption keys live, behind one small interface.

`RecordSealer` wraps and unwraps data keys through a `KekProvider`: the keys sealed in
the keyring file (`KeyringKeks`), or AES keys inside a PKCS#11 token that never leave it
(`custodes.crypto.pkcs11.Pkcs11Keks`). `kek_provider` picks one from the key material.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from custodes.errors import TamperDetected

if TYPE_CHECKING:
    from custodes.crypto.keyring import KeyMaterial

__all__ = ["KekProvider", "KeyringKeks", "kek_provider"]


class KekProvider(Protocol):
    """Wraps data keys with AES-256-GCM under a versioned KEK the caller never holds."""

    def versions(self) -> frozenset[int]: ...

    def wrap(self, version: int, nonce: bytes, data_key: bytes, aad: bytes) -> bytes:
        """AES-GCM(KEK[version], data_key, aad) with the given nonce: ciphertext | tag."""
        ...

    def unwrap(self, version: int, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
        """The data key; TamperDetected if the tag fails or the version is unknown."""
        ...

    def close(self) -> None: ...


class KeyringKeks:
    """KEKs held in memory, unsealed from the keyring file."""

    __slots__ = ("_keks",)

    def __init__(self, keks: dict[int, bytes]) -> None:
        self._keks = {version: AESGCM(key) for version, key in keks.items()}

    def __repr__(self) -> str:
        return f"KeyringKeks(versions={sorted(self._keks)})"

    def versions(self) -> frozenset[int]:
        return frozenset(self._keks)

    def wrap(self, version: int, nonce: bytes, data_key: bytes, aad: bytes) -> bytes:
        return self._keks[version].encrypt(nonce, data_key, aad)

    def unwrap(self, version: int, nonce: bytes, wrapped: bytes, aad: bytes) -> bytes:
        kek = self._keks.get(version)
        if kek is None:
            raise TamperDetected()
        try:
            return kek.decrypt(nonce, wrapped, aad)
        except (InvalidTag, ValueError):
            raise TamperDetected() from None

    def close(self) -> None:
        """Nothing to let go of: the keys are the keyring's, in this process's memory."""


def kek_provider(material: KeyMaterial) -> KekProvider:
    """The KEKs of this key material: in the token it names, else its own. Each process
    calls this for itself: a token session does not survive a fork."""
    if material.token is None:
        return KeyringKeks(material.keks)
    from custodes.crypto.pkcs11 import Pkcs11Keks

    return Pkcs11Keks(material.token)
