"""An export sealed to its recipient's X25519 key, and opened with the private key.

File format, version 1 (all lengths fixed but the last):

    magic       8 bytes   b"CUSTXPRT"
    version     1 byte    1
    ephemeral  32 bytes   the sender's one-time X25519 public key
    nonce      12 bytes
    ciphertext  rest      AES-256-GCM of the export, its 16-byte tag last

The key is HKDF-SHA256 of the X25519 shared secret, salted with the ephemeral and the
recipient's public keys; the first 53 bytes are the associated data, so a header changed
in any bit fails to open. Needs nothing of the vault: a recipient runs it alone.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.errors import InvalidInput, TamperDetected

MAGIC = b"CUSTXPRT"
VERSION = 1
_HEADER = len(MAGIC) + 1 + 32 + 12
_INFO = b"custodes/export/v1"


def _key(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_INFO
    ).derive(shared)


def seal_for(recipient: bytes, plaintext: bytes) -> bytes:
    """`plaintext` sealed to the holder of the private key of `recipient` (raw, 32 bytes)."""
    peer = X25519PublicKey.from_public_bytes(recipient)
    one_time = X25519PrivateKey.generate()
    ephemeral = one_time.public_key().public_bytes_raw()
    nonce = os.urandom(12)
    header = MAGIC + bytes([VERSION]) + ephemeral + nonce
    key = _key(one_time.exchange(peer), ephemeral, recipient)
    return header + AESGCM(key).encrypt(nonce, plaintext, header)


def open_sealed(private: X25519PrivateKey, blob: bytes) -> bytes:
    """The export inside `blob`; TamperDetected, one opaque error, if it is not sealed to
    this key or was changed."""
    if len(blob) < _HEADER + 16 or blob[: len(MAGIC)] != MAGIC:
        raise InvalidInput("not a custodes export file")
    if blob[len(MAGIC)] != VERSION:
        raise InvalidInput(f"export file version {blob[len(MAGIC)]} is not supported")
    header = blob[:_HEADER]
    ephemeral = header[len(MAGIC) + 1 : len(MAGIC) + 33]
    nonce = header[len(MAGIC) + 33 :]
    recipient = private.public_key().public_bytes_raw()
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral))
        return AESGCM(_key(shared, ephemeral, recipient)).decrypt(nonce, blob[_HEADER:], header)
    except (InvalidTag, ValueError):
        raise TamperDetected("the export does not open with this key, or was changed") from None


def fingerprint(public: bytes) -> str:
    """A recipient key's short name for the log: SHA-256 of its raw bytes, 32 hex digits."""
    return hashlib.sha256(public).hexdigest()[:32]


def public_key_bytes(text: str | bytes) -> bytes:
    """A recipient's public key, raw: given as base64 of its 32 bytes or as a PEM file."""
    data = text.encode() if isinstance(text, str) else text
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise InvalidInput("the recipient key is not a readable PEM public key") from None
        if not isinstance(key, X25519PublicKey):
            raise InvalidInput("the recipient key is not an X25519 key")
        return key.public_bytes_raw()
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise InvalidInput("the recipient key is 32 bytes in base64, or an X25519 PEM file")
    return raw


def private_key(data: bytes) -> X25519PrivateKey:
    """A recipient's private key from its PEM file (PKCS #8, as `keygen` writes it)."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise InvalidInput("the private key is not a readable unencrypted PEM key") from None
    if not isinstance(key, X25519PrivateKey):
        raise InvalidInput("the private key is not an X25519 key")
    return key


def keygen() -> tuple[bytes, bytes, str]:
    """A new recipient key pair: the private key's PEM, the public key's PEM, and the
    public key in base64 (what a request names)."""
    key = X25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public = key.public_key()
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem, base64.b64encode(public.public_bytes_raw()).decode()
