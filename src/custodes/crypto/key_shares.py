"""The officers' shares of a keyring's sealing key, and the files that carry them.

A shares-mode keyring is sealed (by the one recipe, sealed_file) under the text of a
random 32-byte key; that key is split M-of-N (shamir) and never kept whole. Each share
goes to one officer in a file of its own, optionally sealed under the officer's passphrase.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from custodes.crypto import sealed_file, shamir
from custodes.crypto.keyring import VAULT_ID_BYTES, ShareMode
from custodes.crypto.sealed_file import DEFAULT_KDF, KdfParams, SealedHeader
from custodes.errors import KeyringError

__all__ = [
    "FORMAT",
    "MASTER_KEY_BYTES",
    "KeyShare",
    "is_sealed",
    "key_passphrase",
    "new_shares",
    "parse_share",
    "passphrase_from_shares",
    "read_share_file",
    "write_share_file",
]

FORMAT = "custodes-key-share"
VERSION = 1
MASTER_KEY_BYTES = 32
_PREFIX = "custodes-shares:"
_FILE = "key share file"
_FIELDS = ("format", "version", "vault_id", "officer", "index", "parts", "threshold")


class KeyShare(NamedTuple):
    """One officer's share: which vault, whose, its number (the x coordinate), the mode."""

    vault_id: bytes
    officer: str
    number: int
    mode: ShareMode
    share: bytes

    def __repr__(self) -> str:
        return f"KeyShare(officer={self.officer!r}, number={self.number}, share=<hidden>)"


def key_passphrase(key: bytes) -> str:
    """The text the keyring is sealed under: the whole key, never stored."""
    if len(key) != MASTER_KEY_BYTES:
        raise KeyringError("the shares rebuild a key of the wrong length")
    return _PREFIX + base64.urlsafe_b64encode(key).decode("ascii")


def new_shares(
    vault_id: bytes, mode: ShareMode, officers: Sequence[str]
) -> tuple[str, list[KeyShare]]:
    """A fresh key's passphrase for the keyring, and its shares, one per officer."""
    mode = ShareMode(*mode).check()
    if len(officers) != mode.parts:
        raise KeyringError(f"{mode.parts} shares need {mode.parts} officer names")
    for officer in officers:
        _check_officer(officer)
    if len(set(officers)) != len(officers):
        raise KeyringError("each officer needs a name of their own")
    key = os.urandom(MASTER_KEY_BYTES)
    pieces = shamir.split(key, mode.parts, mode.threshold)
    shares = [
        KeyShare(vault_id, officer, piece[-1], mode, piece)
        for officer, piece in zip(officers, pieces, strict=True)
    ]
    return key_passphrase(key), shares


def passphrase_from_shares(shares: Sequence[KeyShare], *, vault_id: bytes) -> str:
    """Rebuild the keyring's passphrase from at least its threshold of distinct shares.

    Whether the result is right only the keyring's seal can tell: a wrong or forged
    share gives a wrong key, which fails to open it.
    """
    if not shares:
        raise KeyringError("no key shares given")
    mode = shares[0].mode
    for share in shares:
        if not secrets.compare_digest(share.vault_id, vault_id):
            raise KeyringError(f"the share of {share.officer!r} belongs to another vault")
        if share.mode != mode:
            raise KeyringError("the shares disagree on how many are needed")
    indexes = [share.number for share in shares]
    if len(set(indexes)) != len(indexes):
        raise KeyringError("the same share was given twice")
    if len(shares) < mode.threshold:
        raise KeyringError(f"{mode.threshold} shares are needed, {len(shares)} given")
    return key_passphrase(shamir.combine([share.share for share in shares]))


def write_share_file(
    path: Path, share: KeyShare, *, passphrase: str | None, kdf: KdfParams = DEFAULT_KDF
) -> None:
    """Write one officer's share to a new owner-only file, sealed if a passphrase is given."""
    path = Path(path)
    header = _header(share)
    if passphrase is None:
        data = (json.dumps(dict(header, share=_b64(share.share)), indent=2) + "\n").encode()
    else:
        sealed_file.check_passphrase(passphrase)
        data = sealed_file.seal_document(header, share.share, passphrase, kdf)
    sealed_file.make_private_directory(path.parent, what="key share directory")
    sealed_file.write_new_file(path, data, what=_FILE)


def is_sealed(data: bytes) -> bool:
    """Whether a share file's bytes are sealed under a passphrase (False if not JSON)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and "sealed" in doc


def read_share_file(path: Path, *, passphrase: str | None = None) -> KeyShare:
    """Read one share file (with its officer's passphrase if it is sealed)."""
    return parse_share(sealed_file.read_sealed_file(Path(path), what=_FILE), passphrase=passphrase)


def parse_share(data: bytes, *, passphrase: str | None = None) -> KeyShare:
    """A share from a share file's bytes; KeyringError if malformed or the passphrase fails."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KeyringError("not a custodes key share (not a JSON document)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyringError("not a custodes key share")
    if "sealed" not in doc:
        if set(doc) != {*_FIELDS, "share"}:
            raise KeyringError("damaged key share: unexpected or missing fields")
        fields = _check_fields(doc)
        return _share(fields, _unb64(doc["share"]))
    if passphrase is None:
        raise KeyringError("this key share is sealed: its officer's passphrase is needed")
    header, plain = sealed_file.unseal_document(
        data,
        passphrase=passphrase,
        check_header=_check_sealed_header,
        not_json="not a custodes key share (not a JSON document)",
        unseal_failed="wrong passphrase or damaged key share",
    )
    return _share(header.fields, plain)


def _header(share: KeyShare) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "vault_id": share.vault_id.hex(),
        "officer": share.officer,
        "index": share.number,
        "parts": share.mode.parts,
        "threshold": share.mode.threshold,
    }


def _check_fields(doc: dict[str, Any]) -> dict[str, Any]:
    if doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
        raise KeyringError(f"unsupported key share version {doc.get('version')!r}")
    vault_id = doc["vault_id"]
    try:
        raw_id = bytes.fromhex(vault_id) if isinstance(vault_id, str) else b""
    except ValueError:
        raw_id = b""
    if len(raw_id) != VAULT_ID_BYTES or raw_id.hex() != vault_id:
        raise KeyringError("damaged key share: malformed vault id")
    _check_officer(doc["officer"])
    mode = ShareMode(doc["parts"], doc["threshold"]).check()
    index = doc["index"]
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= mode.parts:
        raise KeyringError("damaged key share: malformed index")
    return {key: doc[key] for key in _FIELDS}


def _check_sealed_header(doc: Any) -> SealedHeader:
    if not isinstance(doc, dict) or set(doc) != {*_FIELDS, "kdf", "nonce", "sealed"}:
        raise KeyringError("damaged key share: unexpected or missing fields")
    kdf_doc = doc["kdf"]
    if not isinstance(kdf_doc, dict) or kdf_doc.get("alg") != "argon2id":
        raise KeyringError("damaged key share: malformed KDF settings")
    if set(kdf_doc) != {"alg", "salt", "time_cost", "memory_kib", "parallelism"}:
        raise KeyringError("damaged key share: malformed KDF settings")
    fields = _check_fields(doc)
    return SealedHeader.from_document(
        fields, doc, decode=_decode, sealed_length=MASTER_KEY_BYTES + 1 + 16
    )


def _share(fields: dict[str, Any], piece: bytes) -> KeyShare:
    if len(piece) != MASTER_KEY_BYTES + 1 or piece[-1] != fields["index"]:
        raise KeyringError("damaged key share: the share does not match its index")
    mode = ShareMode(fields["parts"], fields["threshold"])
    return KeyShare(bytes.fromhex(fields["vault_id"]), fields["officer"], piece[-1], mode, piece)


def _check_officer(name: Any) -> None:
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= 64
        or not all(c.isalnum() or c in "-_." for c in name)
    ):
        raise KeyringError("an officer's name is 1 to 64 letters, digits, '-', '_' or '.'")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any) -> bytes:
    return _decode(text, None)


def _decode(text: Any, length: int | None) -> bytes:
    if not isinstance(text, str):
        raise KeyringError("damaged key share: a field is not base64 text")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError("damaged key share: a field is not valid base64") from None
    if length is not None and len(data) != length:
        raise KeyringError("damaged key share: a field has the wrong length")
    return data
