"""Key rotation, online: the vault's records brought under new key versions while it serves.

`keys rotate` makes a new KEK current (and with --data a new data key generation, with
--index a new blind-index key) in the keyring, then walks every record in storage order:

- a data key wrapped under an older KEK is rewrapped (the payload stays as it is);
- a payload of an older data key generation is decrypted, authenticated and sealed
  again under a fresh data key (and wrapped under the current KEK);
- while index keys rotate, the record's tokens under the new version are added beside
  the old ones, so that a search, which probes every live version, finds it throughout.

Each page is one transaction that applies only where a record still holds the wrapped key
it was read with. The last page done is kept in the vault's metadata, so a rotation killed
at any point resumes where it stopped (`keys rotate --resume`); the cursor only saves
work, since the census below decides what is finished. When a pass leaves nothing under an
old version (KeyCensus, counted by the database itself), the old index version's tokens are
deleted and, after a grace period in which every serving process reads the keyring again
(custodes.key_watch), the old KEK and index key are removed from the keyring for good.

Searches and reads go on throughout: a record is always readable under the keys it holds,
and every process knows a new version before any record needs it (the rotation waits
GRACE_SECONDS after each change of the keyring). Each step is on the access log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from custodes.codec import RecordCodec
from custodes.crypto.blind_index import stored_index_id, token_version_of
from custodes.crypto.envelope import RecordSealer
from custodes.crypto.keyring import KeyMaterial
from custodes.errors import TamperDetected
from custodes.schema import Schema
from custodes.storage.base import KeyCensus, Rekeyed, Storage, StoredRecord
from custodes.vault.integrity import IndexAudit

__all__ = [
    "CURSOR_KEY",
    "MAX_PASSES",
    "PAGE",
    "STARTED_KEY",
    "RotationState",
    "RotationStep",
    "Sweeper",
    "behind",
    "old_index_ids",
]

PAGE = 1000
CURSOR_KEY = "rotation.cursor"
# Set when a rotation begins, emptied when it has destroyed the old keys: only a hint, for
# `doctor` (which holds no key); the keyring and the census decide what is finished.
STARTED_KEY = "rotation.started"
# Passes over the records before giving up: one normally, another if records were written
# under old keys by a process that had not yet read the keyring (it reads it within the
# grace period, so a third pass finds nothing new).
MAX_PASSES = 3


@dataclass(frozen=True, slots=True)
class RotationState:
    """Where a vault's keys stand: current versions, older ones still live, and how many
    stored rows are under the older ones. Counts and version numbers only."""

    kek_version: int
    data_generation: int
    token_version: int
    old_keks: tuple[int, ...]
    old_token_versions: tuple[int, ...]
    behind_kek: int  # records whose data key is wrapped under an older KEK
    behind_data: int  # records sealed under an older data key generation
    old_tokens: int  # token rows under an older index key version

    @property
    def finished(self) -> bool:
        """Nothing stored uses an old version, and no old version is left to destroy."""
        return not (
            self.old_keks
            or self.old_token_versions
            or self.behind_kek
            or self.behind_data
            or self.old_tokens
        )

    def counts(self) -> dict[str, int]:
        return {
            "kek_version": self.kek_version,
            "data_generation": self.data_generation,
            "index_version": self.token_version,
            "old_keks": len(self.old_keks),
            "old_index_versions": len(self.old_token_versions),
            "behind_kek": self.behind_kek,
            "behind_data": self.behind_data,
            "old_tokens": self.old_tokens,
        }


def behind(material: KeyMaterial, census: KeyCensus) -> RotationState:
    """What a census says is left to do under this material's current versions."""
    roots = material.index_roots()
    return RotationState(
        kek_version=material.kek_version,
        data_generation=material.data_generation,
        token_version=material.token_version,
        old_keks=tuple(sorted(v for v in material.kek_versions() if v != material.kek_version)),
        old_token_versions=tuple(sorted(v for v in roots if v != material.token_version)),
        behind_kek=sum(n for v, n in census.kek_versions.items() if v != material.kek_version),
        behind_data=sum(
            n for g, n in census.data_generations.items() if g != material.data_generation
        ),
        old_tokens=sum(
            n
            for index_id, n in census.token_index_ids.items()
            if token_version_of(index_id) != material.token_version
        ),
    )


@dataclass(slots=True)
class RotationStep:
    """What one pass did: counts only."""

    rewrapped: int = 0
    resealed: int = 0
    reindexed: int = 0
    unreadable: int = 0
    skipped: int = 0  # changed by another writer between read and write; the next pass sees it
    seen: int = 0

    def counts(self) -> dict[str, int]:
        return {
            "rewrapped": self.rewrapped,
            "resealed": self.resealed,
            "reindexed": self.reindexed,
            "unreadable": self.unreadable,
            "skipped": self.skipped,
            "records": self.seen,
        }


@dataclass(slots=True)
class Sweeper:
    """Walks the records once and brings each under the codec's current versions."""

    schema: Schema
    storage: Storage
    codec: RecordCodec
    progress: Callable[[int], None] = field(default=lambda _n: None)
    page: int = PAGE

    def sweep(self, *, reindex: bool, start: int = 0) -> RotationStep:
        kek, generation, index_version = self.codec.key_versions
        audit = IndexAudit(self.schema, self.storage, self.codec)
        step = RotationStep()
        after = start
        while batch := self.storage.records_page(after, self.page):
            changes = self._changes(batch, kek, generation, index_version, reindex, audit, step)
            if changes:
                applied = self.storage.rekey_records(changes)
                step.skipped += len(changes) - applied
            after = batch[-1][0]
            # Saved after the page is durable: a crash repeats at most one page, which
            # changes nothing it already changed (each change names the key it replaces).
            self.storage.set_meta(CURSOR_KEY, str(after).encode())
            step.seen += len(batch)
            self.progress(len(batch))
        self.storage.set_meta(CURSOR_KEY, b"0")
        return step

    def _changes(
        self,
        batch: list[tuple[int, StoredRecord]],
        kek: int,
        generation: int,
        index_version: int,
        reindex: bool,
        audit: IndexAudit,
        step: RotationStep,
    ) -> list[Rekeyed]:
        linked = audit.linked_source_keys(record for _, record in batch) if reindex else {}
        changes: list[Rekeyed] = []
        for _, stored in batch:
            reseal = RecordSealer.generation_of(stored.payload) != generation
            rewrap = stored.kek_version != kek
            if not (reseal or rewrap or reindex):
                continue
            try:
                payload: bytes | None = None
                values = None
                if reseal:
                    (version, wrapped, payload), values = self.codec.reseal(stored)
                elif rewrap:
                    version, wrapped = self.codec.rewrap(stored)
                else:
                    version, wrapped = stored.kek_version, stored.wrapped_key
                tokens: tuple[tuple[int, int], ...] = ()
                if reindex:
                    tokens = audit.tokens_under(stored, linked, index_version, values)
            except TamperDetected:
                # A record that does not open is left as it is: `audit verify-records`
                # reports it, and the census keeps its old key from being destroyed.
                step.unreadable += 1
                continue
            step.resealed += reseal
            step.rewrapped += rewrap and not reseal
            step.reindexed += bool(tokens)
            changes.append(
                Rekeyed(stored.record_id, stored.wrapped_key, version, wrapped, payload, tokens)
            )
        return changes


def old_index_ids(schema: Schema, versions: tuple[int, ...]) -> list[int]:
    """The stored index ids of the given index key versions, for every index."""
    return [
        stored_index_id(index.index_id, version)
        for index in schema.all_indexes()
        for version in versions
    ]
