"""What a backup holds and vouches for: the manifest, its seal, its signed statement and
the content digest. Pure: no file, no database, no clock.

The manifest is canonical JSON, sealed with AES-256-GCM under a key derived from the
keyring (HKDF, its own label), so only the keyring's holder reads or makes one. Its
statement is a C2SP signed note by the access log's key: whoever holds the log's
published key checks a backup's files and log without the keyring. The statement's first
line (`custodes backup v1`) holds spaces and its second line is not a number, so no
statement can ever be read as a checkpoint, nor a checkpoint as a statement.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.audit.checkpoint import (
    Checkpoint,
    MalformedNote,
    NoteSigner,
    NoteVerifier,
    SignatureInvalid,
    parse_note,
)
from custodes.crypto.keyring import KeyMaterial
from custodes.errors import ConfigurationError, TamperDetected

__all__ = [
    "BACKENDS",
    "BackupCheck",
    "BackupFile",
    "BackupMade",
    "BackupSource",
    "BackupStatement",
    "BackupTampered",
    "ContentDigest",
    "Manifest",
    "Restored",
    "TypeCount",
    "backup_key",
    "open_manifest",
    "read_statement",
    "seal_manifest",
    "sealed_vault_id",
    "sign_statement",
]

FORMAT = "custodes-backup-manifest"
SEALED_FORMAT = "custodes-backup-sealed-manifest"
VERSION = 1
# Where the PostgreSQL path slots in: its manifest names pgBackRest's backup label.
BACKENDS = ("sqlite", "postgresql")
ID_BYTES = 16
DIGEST_BYTES = 32
_NONCE_BYTES = 12
_INFO = b"custodes/backup/v1/manifest"
_STATEMENT_HEADER = "custodes backup v1"
_CONTENT_DOMAIN = b"custodes backup content v1\n"
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class BackupTampered(TamperDetected):
    """A backup does not match what its manifest and its signed statement vouch for."""


# -- the manifest -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackupFile:
    """One file of a backup directory: its name there, size and SHA-256."""

    name: str
    size: int
    sha256: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _FILE_NAME.fullmatch(self.name):
            raise MalformedNote("a backup file name is letters, digits, '.', '_' or '-'")
        _check_count(self.size, "a file size")
        _check_digest(self.sha256, "a file digest")


@dataclass(frozen=True, slots=True)
class TypeCount:
    """How many records of one type the backup holds: the keyed tag storage holds in
    place of the type's name, and the name (None for a tag no type of the schema has)."""

    tag: str
    type: str | None
    count: int

    def __post_init__(self) -> None:
        if not isinstance(self.tag, str) or not self.tag:
            raise MalformedNote("a record type tag must be text")
        if self.type is not None and not isinstance(self.type, str):
            raise MalformedNote("a record type must be text")
        _check_count(self.count, "a record count")


@dataclass(frozen=True, slots=True)
class Manifest:
    """Everything one backup vouches for.

    `content_digest` is `ContentDigest` over the backed-up database (records and their
    wrapped keys, tokens, settings, accounts): recomputable from a copy or a restored
    vault without any key. `checkpoint` is the log's signed note made as the backup
    began: the log in the backup holds it, so a restore is held against it. `files` are
    the backup directory's files (the manifest and its statement aside).
    """

    backup_id: bytes
    vault_id: bytes
    created: int
    backend: str
    records: tuple[TypeCount, ...]
    tokens: int
    content_digest: bytes
    log_size: int
    checkpoint: bytes
    log_verifier_key: str
    files: tuple[BackupFile, ...]
    backend_label: str | None = None  # pgBackRest's backup label, for PostgreSQL
    # For PostgreSQL, whose restores may go past the backup (point in time): the last
    # record sequence number the backup holds, and the ContentDigest's history digest
    # of its records and tokens up to it, which any later restore must still hold.
    record_bound: int | None = None
    history_digest: bytes | None = None

    def __post_init__(self) -> None:
        # One order, whatever the order given: equal manifests compare and seal alike.
        object.__setattr__(self, "records", tuple(sorted(self.records, key=lambda c: c.tag)))
        object.__setattr__(self, "files", tuple(sorted(self.files, key=lambda f: f.name)))
        _check_id(self.backup_id, "the backup id")
        _check_id(self.vault_id, "the vault id")
        _check_count(self.created, "the creation time")
        if self.backend not in BACKENDS:
            raise MalformedNote(f"a backup's backend is one of: {', '.join(BACKENDS)}")
        if self.backend_label is not None and not _LABEL.fullmatch(self.backend_label):
            raise MalformedNote("a backend's backup label is letters, digits, '.', '_' or '-'")
        _check_count(self.tokens, "the token count")
        _check_digest(self.content_digest, "the content digest")
        if (self.record_bound is None) != (self.history_digest is None):
            raise MalformedNote("a record bound comes with its history digest")
        if self.record_bound is not None:
            _check_count(self.record_bound, "the record bound")
            _check_digest(self.history_digest, "the history digest")
        _check_count(self.log_size, "the log's size")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise MalformedNote("a backup lists a file twice")
        tags = [c.tag for c in self.records]
        if len(set(tags)) != len(tags):
            raise MalformedNote("a backup counts a record type twice")
        if self.checkpoint_size() > self.log_size:
            raise MalformedNote("the backup's checkpoint covers more than its log holds")

    @property
    def record_total(self) -> int:
        return sum(c.count for c in self.records)

    @property
    def origin(self) -> str:
        return self.log_verifier_key.split("+", 1)[0]

    def checkpoint_size(self) -> int:
        return self.checkpoint_body().size

    def checkpoint_body(self) -> Checkpoint:
        """The checkpoint's text as written (its signature is checked by the verifier)."""
        return Checkpoint.parse_body(parse_note(self.checkpoint)[0])

    def counts(self) -> dict[str, int]:
        """Records per type, by name (a tag no type has is shown as the tag)."""
        return {c.type or c.tag: c.count for c in self.records}

    def file(self, name: str) -> BackupFile | None:
        return next((f for f in self.files if f.name == name), None)

    def canonical(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "backup_id": self.backup_id.hex(),
            "vault_id": self.vault_id.hex(),
            "created": self.created,
            "backend": self.backend,
            "backend_label": self.backend_label,
            "records": [{"tag": c.tag, "type": c.type, "count": c.count} for c in self.records],
            "tokens": self.tokens,
            "content_digest": self.content_digest.hex(),
            "log": {
                "size": self.log_size,
                "checkpoint": self.checkpoint.decode("utf-8"),
                "verifier_key": self.log_verifier_key,
            },
            "files": [
                {"name": f.name, "size": f.size, "sha256": f.sha256.hex()} for f in self.files
            ],
        }
        if self.record_bound is not None and self.history_digest is not None:
            # Only where there is one: a SQLite manifest keeps the form it always had.
            doc["history"] = {
                "record_bound": self.record_bound,
                "digest": self.history_digest.hex(),
            }
        return _canonical(doc)

    @classmethod
    def parse(cls, data: bytes) -> Manifest:
        """Read a manifest's canonical bytes; refuse anything else (MalformedNote)."""
        try:
            doc = json.loads(data.decode("utf-8"))
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError
            log = doc["log"]
            history = doc.get("history")
            manifest = cls(
                backup_id=bytes.fromhex(doc["backup_id"]),
                vault_id=bytes.fromhex(doc["vault_id"]),
                created=doc["created"],
                backend=doc["backend"],
                backend_label=doc["backend_label"],
                records=tuple(TypeCount(c["tag"], c["type"], c["count"]) for c in doc["records"]),
                tokens=doc["tokens"],
                content_digest=bytes.fromhex(doc["content_digest"]),
                log_size=log["size"],
                checkpoint=str(log["checkpoint"]).encode("utf-8"),
                log_verifier_key=log["verifier_key"],
                files=tuple(
                    BackupFile(f["name"], f["size"], bytes.fromhex(f["sha256"]))
                    for f in doc["files"]
                ),
                record_bound=None if history is None else history["record_bound"],
                history_digest=None if history is None else bytes.fromhex(history["digest"]),
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise MalformedNote("not a custodes backup manifest") from None
        if manifest.canonical() != data:
            raise MalformedNote("the backup manifest is not in its canonical form")
        return manifest


# -- sealed under a key derived from the keyring --------------------------------------------


def backup_key(material: KeyMaterial) -> bytes:
    """The manifest's AES-256-GCM key: HKDF-SHA256 of the keyring's index root, salted
    with the vault id, under a label of its own (no other key of the vault is this one)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=material.vault_id, info=_INFO).derive(
        material.index_root
    )


def _sealed_header(backup_id: bytes, vault_id: bytes) -> dict[str, Any]:
    return {
        "format": SEALED_FORMAT,
        "version": VERSION,
        "backup_id": backup_id.hex(),
        "vault_id": vault_id.hex(),
    }


def seal_manifest(manifest: Manifest, material: KeyMaterial) -> bytes:
    """The manifest.sealed file: a JSON header (authenticated) and the sealed manifest."""
    if manifest.vault_id != material.vault_id:
        raise ConfigurationError("the manifest is for another vault than these keys")
    header = _sealed_header(manifest.backup_id, manifest.vault_id)
    nonce = os.urandom(_NONCE_BYTES)
    sealed = AESGCM(backup_key(material)).encrypt(nonce, manifest.canonical(), _canonical(header))
    doc = dict(header, nonce=_b64(nonce), sealed=_b64(sealed))
    return json.dumps(doc, indent=2).encode() + b"\n"


def sealed_vault_id(data: bytes) -> bytes:
    """The vault id a manifest.sealed file names in its header (authenticated only once
    the manifest is opened): which keyring to open it with."""
    try:
        vault_id = bytes.fromhex(json.loads(data.decode("utf-8"))["vault_id"])
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise BackupTampered("the backup's sealed manifest is malformed") from None
    if len(vault_id) != ID_BYTES:
        raise BackupTampered("the backup's sealed manifest is malformed")
    return vault_id


def open_manifest(data: bytes, material: KeyMaterial) -> Manifest:
    """Open manifest.sealed with the vault's keys; BackupTampered, one opaque error, if it
    was changed in any way or is another vault's."""
    try:
        doc = json.loads(data.decode("utf-8"))
        header = _sealed_header(bytes.fromhex(doc["backup_id"]), bytes.fromhex(doc["vault_id"]))
        if set(doc) != {*header, "nonce", "sealed"} or any(doc[k] != v for k, v in header.items()):
            raise ValueError
        nonce, sealed = _unb64(doc["nonce"]), _unb64(doc["sealed"])
        plain = AESGCM(backup_key(material)).decrypt(nonce, sealed, _canonical(header))
        manifest = Manifest.parse(plain)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, InvalidTag):
        raise BackupTampered("the backup's manifest does not open with this vault's keys") from None
    except MalformedNote:
        raise BackupTampered("the backup's manifest is malformed") from None
    if manifest.vault_id != material.vault_id or doc["backup_id"] != manifest.backup_id.hex():
        raise BackupTampered("the backup's manifest does not match its header")
    return manifest


# -- the signed statement -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackupStatement:
    """What the log's key signs for a backup: the public face of its manifest. Enough to
    check every file, the content and the log without the keyring; the counts per type
    are the sealed manifest's alone."""

    origin: str
    backup_id: bytes
    created: int
    backend: str
    records: int
    content_digest: bytes
    log_size: int
    checkpoint_size: int
    checkpoint_root: bytes
    sealed_digest: bytes  # SHA-256 of the manifest.sealed file
    files: tuple[BackupFile, ...]
    backend_label: str | None = None

    @classmethod
    def of(cls, manifest: Manifest, sealed: bytes) -> BackupStatement:
        cp = manifest.checkpoint_body()
        return cls(
            origin=manifest.origin,
            backup_id=manifest.backup_id,
            created=manifest.created,
            backend=manifest.backend,
            records=manifest.record_total,
            content_digest=manifest.content_digest,
            log_size=manifest.log_size,
            checkpoint_size=cp.size,
            checkpoint_root=cp.root,
            sealed_digest=hashlib.sha256(sealed).digest(),
            files=manifest.files,
            backend_label=manifest.backend_label,
        )

    def body(self) -> bytes:
        lines = [
            _STATEMENT_HEADER,
            self.origin,
            f"id {self.backup_id.hex()}",
            f"created {self.created}",
            f"backend {self.backend}"
            + (f" {self.backend_label}" if self.backend_label is not None else ""),
            f"records {self.records}",
            f"content {_b64(self.content_digest)}",
            f"log {self.log_size}",
            f"checkpoint {self.checkpoint_size} {_b64(self.checkpoint_root)}",
            f"sealed {_b64(self.sealed_digest)}",
            *(f"file {f.size} {_b64(f.sha256)} {f.name}" for f in self.files),
        ]
        return ("\n".join(lines) + "\n").encode("utf-8")

    @classmethod
    def parse_body(cls, body: bytes) -> BackupStatement:
        try:
            lines = body.decode("utf-8").split("\n")
            if len(lines) < 12 or lines[0] != _STATEMENT_HEADER or lines[-1] != "":
                raise ValueError
            (backup_id,) = _words(lines[2], "id", 1)
            (created,) = _words(lines[3], "created", 1)
            backend = _words(lines[4], "backend", 1, 2)
            (records,) = _words(lines[5], "records", 1)
            (content,) = _words(lines[6], "content", 1)
            (log_size,) = _words(lines[7], "log", 1)
            cp_size, cp_root = _words(lines[8], "checkpoint", 2)
            (sealed,) = _words(lines[9], "sealed", 1)
            files = []
            for line in lines[10:-1]:
                size, digest, name = _words(line, "file", 3)
                files.append(BackupFile(name, _decimal(size), _unb64(digest)))
            statement = cls(
                origin=lines[1],
                backup_id=bytes.fromhex(backup_id),
                created=_decimal(created),
                backend=backend[0],
                backend_label=backend[1] if len(backend) == 2 else None,
                records=_decimal(records),
                content_digest=_unb64(content),
                log_size=_decimal(log_size),
                checkpoint_size=_decimal(cp_size),
                checkpoint_root=_unb64(cp_root),
                sealed_digest=_unb64(sealed),
                files=tuple(files),
            )
        except (UnicodeDecodeError, ValueError, TypeError, MalformedNote):
            raise MalformedNote("not a custodes backup statement") from None
        if statement.body() != body:
            raise MalformedNote("the backup statement is not in its canonical form")
        return statement

    def agrees_with(self, manifest: Manifest, sealed: bytes) -> bool:
        """Whether this statement is the one the manifest (as sealed) calls for."""
        return self == BackupStatement.of(manifest, sealed)


def sign_statement(statement: BackupStatement, signer: NoteSigner) -> bytes:
    """The manifest.note file: the statement, signed by the log's key."""
    if signer.name != statement.origin:
        raise ConfigurationError("the signing key is not this vault's log key")
    return signer.sign(statement.body())


def read_statement(note: bytes, verifier_key: str) -> BackupStatement:
    """The statement of a manifest.note, if the log's key signed it; BackupTampered if not
    (a forged, edited or other log's statement, or a checkpoint passed off as one)."""
    try:
        verifier = NoteVerifier.from_key_string(verifier_key)
        statement = BackupStatement.parse_body(verifier.verify(note))
    except MalformedNote:
        raise BackupTampered("the backup's statement is malformed") from None
    except SignatureInvalid:
        raise BackupTampered(
            "the backup's statement does not carry a valid signature by the log's key"
        ) from None
    if statement.origin != verifier.name:
        raise BackupTampered("the backup's statement names another log")
    return statement


# -- the content digest ---------------------------------------------------------------------


class ContentDigest:
    """SHA-256 over a vault database's content, in one order any backend can stream.

    It covers, after the domain line `custodes backup content v1`, four sections in
    this order, each opened by `S` and its name, each row by `R` and then its fields,
    every field a one-letter kind (`s` UTF-8 text, `i` decimal integer, `f` IEEE-754
    big-endian float, `b` bytes, `n` null), an 8-byte big-endian length and its bytes;
    rows strictly ascending by their key; at the end `E` and each section's row count:

    - records: (record id, stored type tag, sealed payload, KEK version, wrapped data
      key), by record id;
    - tokens: (index id, token, record id), by all three;
    - meta: (key, value), by key, leaving out the backend's own bookkeeping (`storage.`
      keys): the sealed settings and their tags, the log's public key, API token rows;
    - accounts: (name, role, password hash, attributes, created at, disabled), by name.

    The history digest is the same stream cut after the tokens section, closed by `H`
    and the two sections' row counts: records and tokens are only ever added, so a
    vault restored to any later moment holds the backup's rows unchanged, and this
    digest, taken over the rows up to the backup's record sequence number, still agrees.

    Left out: sessions, login-failure counts and one-time marks (rewritten by the vault
    as it runs, and granting nothing a restore needs) and the access log, which is held
    against its own signed checkpoint instead. No key is needed: every value is taken
    as stored, sealed or hashed.
    """

    SECTIONS = ("records", "tokens", "meta", "accounts")
    _HISTORY = 2  # records and tokens: the sections that only grow
    __slots__ = ("_hash", "_history", "_last", "_section", "counts")

    def __init__(self) -> None:
        self._hash = hashlib.sha256(_CONTENT_DOMAIN)
        self._history: bytes | None = None
        self._section = -1
        self._last: tuple[Any, ...] | None = None
        self.counts: dict[str, int] = dict.fromkeys(self.SECTIONS, 0)

    def history(self) -> bytes:
        """The history digest: records and tokens alone (after the tokens section)."""
        if self._history is not None:
            return self._history
        if self._section != self._HISTORY - 1:
            raise ConfigurationError("the history digest is taken after the tokens section")
        final = self._hash.copy()
        counts = (self.counts[s] for s in self.SECTIONS[: self._HISTORY])
        final.update(_frame(b"H", b"".join(struct.pack(">Q", n) for n in counts)))
        return final.digest()

    def section(self, name: str) -> None:
        """Start the next section; sections come in SECTIONS order, each once."""
        position = self.SECTIONS.index(name)
        if position <= self._section:
            raise ConfigurationError(f"the content section {name!r} is out of order")
        if position >= self._HISTORY and self._history is None:
            self._section = self._HISTORY - 1
            self._history = self.history()
        self._section = position
        self._last = None
        self._hash.update(_frame(b"S", name.encode()))

    def record(
        self,
        record_id: str,
        record_type: str,
        payload: bytes,
        kek_version: int | None,
        wrapped: bytes | None,
    ) -> None:
        fields = (record_id, record_type, payload, kek_version, wrapped)
        if tuple(map(type, fields)) != _RECORD_TYPES:
            self._row("records", (record_id,), fields)
            return
        # One a record: the same bytes as _row's, framed here without its dispatch.
        self._enter("records", (record_id,))
        rid, rtype = record_id.encode("utf-8", "surrogatepass"), record_type.encode("utf-8")
        version = b"%d" % cast(int, kek_version)
        key = cast(bytes, wrapped)
        self._hash.update(
            b"Rs" + _LENGTH(len(rid)) + rid
            + b"s" + _LENGTH(len(rtype)) + rtype
            + b"b" + _LENGTH(len(payload)) + payload
            + b"i" + _LENGTH(len(version)) + version
            + b"b" + _LENGTH(len(key)) + key
        )  # fmt: skip

    def token(self, index_id: int, token: int, record_id: str) -> None:
        key = (index_id, token, record_id)
        if type(index_id) is not int or type(token) is not int or type(record_id) is not str:
            self._row("tokens", key, key)
            return
        # Billions of rows: the same bytes as _row's, framed here without its dispatch.
        self._enter("tokens", key)
        first, second = b"%d" % index_id, b"%d" % token
        rid = record_id.encode("utf-8", "surrogatepass")
        self._hash.update(
            b"Ri"
            + _LENGTH(len(first))
            + first
            + b"i"
            + _LENGTH(len(second))
            + second
            + b"s"
            + _LENGTH(len(rid))
            + rid
        )

    def meta(self, key: str, value: bytes) -> None:
        if key.startswith("storage."):
            return
        self._row("meta", (key,), (key, value))

    def account(
        self,
        username: str,
        role: str | None,
        password_hash: str | None,
        attributes: bytes | None,
        created_at: float | None,
        disabled: int | None,
    ) -> None:
        fields = (username, role, password_hash, attributes, created_at, disabled)
        self._row("accounts", (username,), fields)

    def digest(self) -> bytes:
        """The digest so far (normally after the last section)."""
        final = self._hash.copy()
        final.update(
            _frame(b"E", b"".join(struct.pack(">Q", self.counts[s]) for s in self.SECTIONS))
        )
        return final.digest()

    def _row(self, section: str, key: tuple[Any, ...], fields: Sequence[Any]) -> None:
        self._enter(section, key)
        self._hash.update(b"R" + b"".join([_field(value) for value in fields]))

    def _enter(self, section: str, key: tuple[Any, ...]) -> None:
        if self._section < 0 or self.SECTIONS[self._section] != section:
            raise ConfigurationError(f"a {section} row outside its section")
        if self._last is not None and not key > self._last:
            raise ConfigurationError(f"the {section} rows are not in ascending order")
        self._last = key
        self.counts[section] += 1


_LENGTH = struct.Struct(">Q").pack
_RECORD_TYPES = (str, str, bytes, int, bytes)


def _field(value: object) -> bytes:
    kind = type(value)
    # The common exact types first (cast: checked by the type test itself), then
    # whatever subclasses them.
    if kind is bytes:
        raw = cast(bytes, value)
        return b"b" + _LENGTH(len(raw)) + raw
    if kind is str:
        text = cast(str, value).encode("utf-8", "surrogatepass")
        return b"s" + _LENGTH(len(text)) + text
    if kind is int:
        digits = b"%d" % cast(int, value)
        return b"i" + _LENGTH(len(digits)) + digits
    if value is None:
        return _frame(b"n", b"")
    if isinstance(value, bytes | bytearray | memoryview):
        return _frame(b"b", bytes(value))
    if isinstance(value, str):
        return _frame(b"s", value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bool):
        return _frame(b"i", b"1" if value else b"0")
    if isinstance(value, int):
        return _frame(b"i", str(value).encode("ascii"))
    if isinstance(value, float):
        return _frame(b"f", struct.pack(">d", value))
    raise ConfigurationError(f"a stored value of type {type(value).__name__} cannot be digested")


def _frame(kind: bytes, data: bytes) -> bytes:
    return kind + _LENGTH(len(data)) + data


# -- what the vault's door hands over, and what it logs ---------------------------------------


@dataclass(frozen=True, slots=True)
class BackupSource:
    """What the vault hands to a backup once the operator's backup is authorised: where
    its files are, its keys (to seal the manifest), the checkpoint it has just signed,
    its log's public key, the keyed tag of each record type and its clock's time."""

    directory: Path
    material: KeyMaterial = field(repr=False)
    checkpoint: bytes
    verifier_key: str
    type_tags: Mapping[str, str]  # record type name -> the tag storage holds
    created: float


@dataclass(frozen=True, slots=True)
class BackupMade:
    """A backup written and sealed: where, and its manifest."""

    directory: Path
    manifest: Manifest

    def logged(self) -> dict[str, Any]:
        """What the access log says of it: ids and counts, never a value."""
        m = self.manifest
        return {
            "backup_id": m.backup_id.hex(),
            "backend": m.backend,
            "records": m.record_total,
            "log_size": m.log_size,
            "checkpoint_size": m.checkpoint_size(),
        }


@dataclass(frozen=True, slots=True)
class BackupCheck:
    """What a verification of a backup found: all of it held against the manifest."""

    backup_id: str
    created: int
    backend: str
    records: int
    log_entries: int
    checkpoint_size: int
    files: int
    counts: dict[str, int] | None = None  # per type, when the keyring was at hand
    notes: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Restored:
    """A vault restored from a backup: where it is, where its keys are, what was checked."""

    directory: Path
    keyring: Path
    log_key: Path
    check: BackupCheck


# -- small shared readers ----------------------------------------------------------------------


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("not base64") from None
    if _b64(data) != text:
        raise ValueError("not canonical base64")
    return data


def _words(line: str, word: str, *counts: int) -> list[str]:
    """The values of a statement line `word value...`, if it has one of `counts` values."""
    head, *values = line.split(" ")
    if head != word or len(values) not in counts:
        raise ValueError(f"expected a {word} line")
    return values


def _decimal(text: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise ValueError("not a decimal")
    return int(text)


def _check_count(value: object, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise MalformedNote(f"{what} must be a non-negative integer")


def _check_digest(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != DIGEST_BYTES:
        raise MalformedNote(f"{what} must be a SHA-256 digest")


def _check_id(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        raise MalformedNote(f"{what} must be {ID_BYTES} bytes")
