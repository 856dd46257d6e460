"""The access log: an RFC 6962 Merkle tree of entries, appended durably with group commit.

`append` returns only once the entry, its tree nodes and its subject references are
synced to storage; concurrent appenders share one transaction. Signed checkpoints are
issued every N entries or T seconds, and on demand.

The subject index (commitment -> entries) is storage outside the tree, so a subject access
report is not taken from it on trust: `proven_entries_for` reads every leaf up to a signed
checkpoint, recomputes that checkpoint's root, picks the entries whose own commitments
name the subject and holds them against the index, refusing on any difference. That
costs one pass over the log per report (about 3 us an entry from a cached file: at 10^9
entries, most of an hour). It was chosen over a per-subject chain carried in the entries
because such a chain would be built from the index at append time: rows deleted before
the next access to the person (the report's own entry included) would be left out of the
chain itself, and the report would prove itself complete while short. A report that
scales needs a per-subject map committed in the tree; until then, the scan pays for
completeness.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from custodes.audit.checkpoint import Checkpoint, LogSigner
from custodes.audit.entry import AccessEntry
from custodes.audit.merkle import (
    CompactRange,
    Fold,
    consistency_proof,
    fold,
    inclusion_proof_plan,
    leaf_hash,
    peak_positions,
)
from custodes.audit.sequencer import SequencerClient, SequencerUnreachable
from custodes.audit.verify import carried_subjects
from custodes.crypto import KeyMaterial
from custodes.errors import AuditUnavailable, CustodesError, LogMoved, TamperDetected
from custodes.storage.base import LogAppend, LogStore

SUBJECT_INFO = b"custodes/audit-subject/v1"
PRIVATE_INFO = b"custodes/audit-private/v1"
COMMITMENT_BYTES = 16
_NONCES_PER_DRAW = 1024


class AuditKeys:
    """Keys of the access log, derived from the vault's index root (never stored).

    The subject key makes commitments (so a person's entries can be found without the
    log saying who they are); the private key seals side blobs.
    """

    __slots__ = ("_nonces", "_nonces_pid", "_private", "_subject")

    def __init__(self, material: KeyMaterial) -> None:
        self._subject = KeyedSha256(_derive(material, SUBJECT_INFO))
        self._private = AESGCM(_derive(material, PRIVATE_INFO))
        # Random nonces drawn a thousand at a time: each draw is a system call that lets
        # go of the interpreter's lock. A deque's popleft is atomic, so no two appenders
        # ever take the same one; the draws are this process's own (see _nonce).
        self._nonces: collections.deque[bytes] = collections.deque()
        self._nonces_pid = os.getpid()

    def _nonce(self) -> bytes:
        if self._nonces_pid != os.getpid():
            # A forked server worker holds a copy of its parent's draws under the same
            # key: taking one would seal two blobs with one nonce. It draws its own.
            self._nonces, self._nonces_pid = collections.deque(), os.getpid()
        try:
            return self._nonces.popleft()
        except IndexError:
            drawn = os.urandom(12 * _NONCES_PER_DRAW)
            self._nonces.extend(drawn[i : i + 12] for i in range(12, len(drawn), 12))
            return drawn[:12]

    def commitment(self, record_id: str) -> bytes:
        return self._subject.digest(record_id.encode())[:COMMITMENT_BYTES]

    def seal_private(self, details: dict[str, Any]) -> bytes:
        nonce = self._nonce()
        return nonce + self._private.encrypt(nonce, orjson.dumps(details), PRIVATE_INFO)

    def open_private(self, blob: bytes) -> dict[str, Any]:
        try:
            doc = orjson.loads(self._private.decrypt(blob[:12], blob[12:], PRIVATE_INFO))
        except (InvalidTag, ValueError):
            raise TamperDetected() from None
        if not isinstance(doc, dict):
            raise TamperDetected()
        return doc


class KeyedSha256:
    """HMAC-SHA256 (RFC 2104) under one key: the hash states of the padded key made once,
    copied for each message. The same digest as hmac.digest, which hands the
    interpreter's lock away on every call (OpenSSL's one-shot HMAC), so that each of a
    busy log's appenders queued to take it back behind the others, for every entry."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        padded = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def _derive(material: KeyMaterial, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=material.vault_id, info=info).derive(material.index_root)


# The most entries one commit carries: enough that a busy log commits hundreds at a time,
# bounded so that one transaction (and the appenders it holds) stays a few milliseconds long.
MAX_BATCH = 1024

# Proofs keep the tree's upper levels in memory: the levels at and above this many below
# the top, at most about 2^17 nodes (some 20 MB) whatever the log's size. Stored nodes
# never change, so what is kept never goes stale.
_KEPT_LEVELS = 16
_NODES_PER_READ = 4096

# How often a commit is rebuilt when other processes keep appending first; each attempt
# follows a fresh read of the log, so more than a few means something is wrong.
_MOVED_RETRIES = 32


def _moved_pause(attempt: int) -> float:
    """Seconds to wait before the attempt after `attempt` lost: none at first, then up to
    a millisecond more each time, at most 20 ms. Jitter, not a secret: the standard
    library's generator is enough."""
    return 0.0 if attempt == 0 else random.uniform(0, min(0.001 * attempt, 0.02))  # noqa: S311


def _taken_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)
class _Pending:
    entry: bytes
    subjects: list[bytes]
    private: bytes | None
    # Released once the entry is stored or refused, or to hand this appender the next
    # commit. A bare lock, taken at creation: far cheaper to wait on than an Event.
    wake: threading.Lock = field(default_factory=_taken_lock)
    index: int = -1
    error: BaseException | None = None

    @property
    def settled(self) -> bool:
        return self.index >= 0 or self.error is not None


log = logging.getLogger("custodes.audit")


class AccessLog:
    def __init__(
        self,
        storage: LogStore,
        keys: AuditKeys,
        signer: LogSigner,
        *,
        origin: str,
        checkpoint_every: int = 1000,
        checkpoint_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._storage = storage
        self._keys = keys
        self._signer = signer
        self.origin = origin
        self.clock = clock
        self._every = max(1, checkpoint_every)
        self._interval = checkpoint_interval
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        # Held while a checkpoint is made, taken before the commit lock when both are: a
        # checkpoint holds the commit lock only to read the frontier, never while it
        # signs and stores, so that the appenders' commits go on meanwhile.
        self._sign_lock = threading.Lock()
        self._upper: dict[tuple[int, int], bytes] = {}
        self._pending: list[_Pending] = []
        # Where entries go when a sequencer appends for this process (see
        # sequence_through), and the size its last answer proves the log has reached.
        self._sequencer: SequencerClient | None = None
        self._sequenced = 0
        self._committing = False  # an appender is leading a commit; guarded by the queue lock
        # Why the log stopped taking entries (it was found rolled back, cut or replaced),
        # or None. Once set it stays set for the life of the process: every access needs
        # an entry, so nothing is served until the host operator has acknowledged the loss.
        self._halted: str | None = None
        # The signer's state is read before the log: another process may append and sign
        # in between, and a log read first would then look shorter than what was signed.
        signed = signer.current()
        self._range = stored_range(storage, storage.log_size())
        self._check_against_signer(signed)
        stored = storage.checkpoints()
        self._checkpointed = stored[-1][0] if stored else 0
        self._checkpointed_at = clock()

    def _check_against_signer(self, signed: tuple[int, bytes]) -> None:
        """Refuse a log that is not the one its signer last signed: shorter (a restored
        older copy, its tail cut with its checkpoints, a fresh file swapped in) or another
        tree at that size. The signer's state lives with its key, out of the database
        writer's reach, and carries the log's own signature. Nothing is served from such
        a log: `custodes doctor` and `custodes audit verify` tell the operator what happened,
        and `custodes audit acknowledge-loss` is how the operator accepts it."""
        signed_size, signed_root = signed
        size = self._range.size
        if size < signed_size:
            raise TamperDetected(
                f"the access log holds {size:,} entries but its signer already signed "
                f"{signed_size:,}: it was rolled back, cut or replaced; nothing is served "
                "from it (run 'custodes doctor' and 'custodes audit verify')"
            )
        if signed_size and stored_root(self._storage, signed_size) != signed_root:
            raise TamperDetected(
                f"the access log's first {signed_size:,} entries are not the ones its signer "
                "signed: it was replaced; nothing is served from it (run 'custodes audit "
                "verify')"
            )

    def sequence_through(self, client: SequencerClient | None) -> None:
        """Hand this process's entries to the log sequencer (None: append them here).
        Checkpoints, proofs and reads stay with this process."""
        self._sequencer = client

    @property
    def halted(self) -> str | None:
        """Why this log refuses every entry (and so every access), or None."""
        return self._halted

    def _halt(self, why: str) -> AuditUnavailable:
        if self._halted is None:
            self._halted = why
        log.critical(
            "the access log was rolled back, cut or replaced (%s): every access is refused "
            "until the host operator restores it or runs 'custodes audit acknowledge-loss'",
            self._halted,
        )
        return AuditUnavailable(
            "the access log was rolled back, cut or replaced, so nothing is served until "
            "the host operator has dealt with it"
        )

    def check_whole(self) -> None:
        """Hold the log as it is stored now against this process's view and its signer's
        last checkpoint; halt it (every access refused, loudly logged) if it shrank or
        holds another history. What a server runs on every signing round, so that a cut
        made while it is idle is caught within a round."""
        with self._commit_lock:
            if self._halted is not None:
                raise self._halt(self._halted)
            signed = self._signer.current()  # first, as when the log was opened
            self._catch_up()
            try:
                self._check_against_signer(signed)
            except TamperDetected as exc:
                raise self._halt(str(exc)) from None

    # -- appending ----------------------------------------------------------------------

    def append(self, entry: AccessEntry, *, private: dict[str, Any] | None = None) -> int:
        """Append an entry; return its index once it is durable. AuditUnavailable if not.

        Subject commitments are made here from the entry's record ids; `private` holds
        what must stay secret (such as the values searched for) and is sealed aside.
        """
        if self._halted is not None:
            raise self._halt(self._halted)
        subjects = [self._keys.commitment(r) for r in dict.fromkeys(entry.records)]
        blob = self._keys.seal_private(private) if private else None
        encoded = entry.encode_referencing(
            [c.hex() for c in subjects],
            hashlib.sha256(blob).hexdigest() if blob is not None else None,
        )
        if self._sequencer is not None:
            try:
                index = self._sequencer.append(encoded, subjects, blob)
            except SequencerUnreachable:
                pass  # appended here instead, through the same storage lock
            else:
                with self._queue_lock:
                    self._sequenced = max(self._sequenced, index + 1)
                return index
        return self.append_encoded(encoded, subjects, blob)

    def append_encoded(self, entry: bytes, subjects: Sequence[bytes], private: bytes | None) -> int:
        """Append an entry already encoded, with its subject commitments and sealed
        details, as `append` builds them; its index once durable. What the log sequencer
        runs for the worker that built the entry (custodes.audit.sequencer)."""
        if self._halted is not None:
            raise self._halt(self._halted)
        pending = _Pending(entry, list(subjects), private)
        with self._queue_lock:
            self._pending.append(pending)
            leads = not self._committing
            self._committing = True
        # Group commit: one appender at a time leads, writing everything queued so far in
        # one transaction (and one fsync). The others each wait on a lock of their own,
        # not on a shared one, so that all of a batch are released at once, and the first
        # of those who queued meanwhile leads the next commit, taking everyone queued by then.
        if not leads:
            pending.wake.acquire()
        if not pending.settled:
            self._lead(pending)
        if pending.error is not None or pending.index < 0:
            raise AuditUnavailable(
                "the access log could not record this access, so it was refused"
            ) from pending.error
        self._maybe_checkpoint()
        return pending.index

    def append_encoded_many(
        self, items: Sequence[tuple[bytes, Sequence[bytes], bytes | None]]
    ) -> list[int | None]:
        """Append entries built as `append_encoded` takes them, in order, in as few
        commits as the batch cap allows; each one's index once durable, or None where its
        commit failed (a commit's entries are stored all or none). What the log sequencer
        runs for every request that has reached it, from every worker, at once."""
        if self._halted is not None:
            raise self._halt(self._halted)
        mine = [_Pending(entry, list(subjects), private) for entry, subjects, private in items]
        if not mine:
            return []
        with self._queue_lock:
            self._pending.extend(mine)
            leads = not self._committing
            self._committing = True
        # In queue order: while one of these waits, those before it are settled, so the
        # commit that wakes it either stored it or hands it the lead.
        for position, pending in enumerate(mine):
            if pending.settled:
                continue
            if position or not leads:
                pending.wake.acquire()
            if not pending.settled:
                self._lead(pending)
        self._maybe_checkpoint()
        return [p.index if p.error is None and p.index >= 0 else None for p in mine]

    def _lead(self, pending: _Pending) -> None:
        try:
            with self._commit_lock:
                self._commit_queued()
        finally:
            with self._queue_lock:
                if not pending.settled and pending in self._pending:
                    # Interrupted before its commit: refuse the entry, never leave it queued.
                    self._pending.remove(pending)
                    pending.error = AuditUnavailable("the append was interrupted")
                if self._pending:
                    self._pending[0].wake.release()
                else:
                    self._committing = False

    def _commit_queued(self) -> None:
        with self._queue_lock:
            # Those beyond the cap stay queued, the first of them to lead the next commit.
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        if not batch:
            return
        try:
            for attempt in range(_MOVED_RETRIES):
                try:
                    first, frontier = self._write(batch)
                    break
                except LogMoved:
                    # Another process sharing the log appended first, and the storage
                    # could not let this writer take up its entries under its lock: build
                    # again on the tree as it now stands, after a short random pause that
                    # grows, so that two busy processes stop meeting at the same moment
                    # (a refused access is the price of losing every race).
                    time.sleep(_moved_pause(attempt))
                    self._catch_up()
            else:
                raise AuditUnavailable("the access log kept moving under this writer")
        except BaseException as exc:
            # Whatever the fault, every appender of the batch is refused: none may return
            # as if its entry were stored.
            for item in batch:
                item.error = exc
                item.wake.release()
            if not isinstance(exc, Exception):
                raise
            return
        self._range = frontier
        for offset, item in enumerate(batch):
            item.index = first + offset
            item.wake.release()

    def _write(self, batch: list[_Pending]) -> tuple[int, CompactRange]:
        """Store a batch on top of the tree as this process knows it, or, where the
        storage lets it, on top of the entries another process appended meanwhile,
        taken up under the storage's write lock; the first index and the new frontier."""
        built: list[tuple[int, CompactRange]] = []

        def build() -> LogAppend:
            frontier = self._range.copy()
            first = frontier.size
            nodes: list[tuple[int, int, bytes]] = []
            subjects: list[tuple[bytes, int]] = []
            private: list[tuple[int, bytes]] = []
            for offset, item in enumerate(batch):
                index = first + offset
                nodes.extend(frontier.append(leaf_hash(item.entry)))
                subjects.extend((c, index) for c in item.subjects)
                if item.private is not None:
                    private.append((index, item.private))
            built.append((first, frontier))
            return LogAppend(first, [p.entry for p in batch], nodes, subjects, private)

        def rebuild(stored: int, nodes: Mapping[tuple[int, int], bytes]) -> LogAppend:
            # Under the storage's write lock: the log stands still at `stored` entries.
            self._catch_up(stored, nodes)
            if self._range.size != stored:
                raise LogMoved("the access log moved while this writer took it up")
            return build()

        self._storage.log_append(build(), rebuild)
        return built[-1]

    def _catch_up(
        self, size: int | None = None, read: Mapping[tuple[int, int], bytes] | None = None
    ) -> None:
        """Take up entries appended by other processes. Only under the commit lock.

        The log only grows, and only on top of the tree this process holds: a log that
        shrank, or whose first entries are no longer the ones this process knew, was cut
        or replaced under it, and the log halts (AuditUnavailable) rather than serve on.
        """
        known = self._range
        if size is None:
            size = self._storage.log_size()
        if size == known.size:
            return
        if size < known.size:
            raise self._halt(f"it shrank from {known.size:,} to {size:,} entries")
        # Both frontiers, under the commit lock of a busy log: the stored peaks of the
        # tree this process knows (the same peaks, the same tree) and the peaks of the
        # tree as it stands now; what the storage read with the size, the rest in one read.
        old, new = peak_positions(known.size), peak_positions(size)
        nodes = dict(read or {})
        if unread := [position for position in old + new if position not in nodes]:
            nodes.update(self._storage.log_nodes(unread))
        if [nodes.get(position) for position in old] != list(known.peaks):
            raise self._halt(f"its first {known.size:,} entries were replaced")
        self._range = _range_of(size, new, nodes)

    # -- checkpoints ------------------------------------------------------------------

    def _due(self) -> bool:
        size = self._range.size
        return size - self._checkpointed >= self._every or (
            size > self._checkpointed and self.clock() - self._checkpointed_at >= self._interval
        )

    def _maybe_checkpoint(self) -> None:
        if not self._due():
            return
        # The entry is durable; a checkpoint that failed is retried on the next append,
        # and the verifier reports entries that no signature covers. One being signed
        # already is left to its signer: this appender's read is not held up behind a
        # signature, and the next append after it finds the rest due.
        if not self._sign_lock.acquire(blocking=False):
            return
        try:
            # Asked again under the lock: every appender of the batch that crossed the
            # mark finds a checkpoint due, and one checkpoint is enough.
            if self._due():
                with contextlib.suppress(CustodesError):
                    self._checkpoint_signing()
        finally:
            self._sign_lock.release()

    def checkpoint(self) -> bytes:
        """Sign and store a checkpoint of the tree as it is now; return the signed note."""
        with self._sign_lock:
            return self._checkpoint_signing()

    def keep_signing(
        self, every: float, on_signed: Callable[[bytes], None] | None = None
    ) -> threading.Event:
        """Sign a checkpoint every `every` seconds while entries wait for one, even when
        no new access comes: appends sign only when the next one arrives, so a lookup at
        night would stay unsigned (and changeable unnoticed) until morning. Returns the
        event that stops the thread. A checkpoint that cannot be signed (a log cut behind
        its signer, a missing state file) is reported on every round, never skipped.

        `on_signed` is handed the latest signed note, outside the lock, after each round
        in which it changed, whoever signed it (this round, an append, another process):
        what a server sends on to its witnesses."""
        stop = threading.Event()

        def run() -> None:
            handed = 0
            while not stop.wait(every):
                note = None
                try:
                    with self._sign_lock:
                        with self._commit_lock:
                            if self._halted is not None:
                                raise self._halt(self._halted)  # said again, every round
                            # Every round holds the whole log against its signer (read
                            # first, as at opening): a cut or a swap made while the server
                            # is idle halts it here, loudly, instead of leaving it to stop
                            # signing.
                            size, root = self._signer.current()
                            self._catch_up()
                            try:
                                self._check_against_signer((size, root))
                            except TamperDetected as exc:
                                raise self._halt(str(exc)) from None
                            grown = self._range.size > size
                        if grown:
                            note, size = self._checkpoint_signing(), self._checkpointed
                        elif on_signed is not None and size > handed:
                            # Signed elsewhere: the same note once more (Ed25519 signatures
                            # are deterministic). Should yet another be signed meanwhile,
                            # this is refused, and the next round hands that one on.
                            with contextlib.suppress(CustodesError):
                                note = self._signer.sign_checkpoint(
                                    Checkpoint(self.origin, size, root), []
                                )
                except CustodesError as exc:
                    log.error("the access log could not be signed: %s", type(exc).__name__)
                if note is not None and on_signed is not None:
                    handed = size
                    on_signed(note)

        threading.Thread(target=run, name="custodes-log-signer", daemon=True).start()
        return stop

    def _checkpoint_signing(self) -> bytes:
        """Sign and store a checkpoint of the tree as it stands; only under the sign lock.
        The frontier is read under the commit lock, and signed and stored after it is let
        go: its entries and nodes are durable, and appends may go on beyond it."""
        with self._commit_lock:
            if self._halted is not None:
                raise self._halt(self._halted)  # and said again, on every round that tries
            # Other processes may share this log and its key: start from the tree and the
            # last signature as they stand now, not as this process last saw them.
            self._catch_up()
            frontier = self._range.copy()
        last_size, _ = self._signer.current()
        proof: list[bytes] = []
        if 0 < last_size < frontier.size:
            # Through the node cache: each read of storage here would wait behind the
            # searches sharing its connection, with every appender queued behind this one.
            proof = consistency_proof(last_size, frontier.size, self._proof_node)
        note = self._signer.sign_checkpoint(
            Checkpoint(self.origin, frontier.size, frontier.root()), proof
        )
        if frontier.size == last_size:
            # Signed before, by anyone (the signature is the same): the stored note may by
            # now carry witnesses' cosignatures, which storing the bare note would drop.
            stored = dict(self._storage.checkpoints()).get(frontier.size)
            if stored is not None and stored.startswith(note):
                self._checkpointed, self._checkpointed_at = frontier.size, self.clock()
                return stored
        self._storage.put_checkpoint(frontier.size, note)
        self._checkpointed = frontier.size
        self._checkpointed_at = self.clock()
        return note

    def latest_checkpoint(self) -> tuple[int, bytes] | None:
        stored = self._storage.checkpoints()
        return stored[-1] if stored else None

    @property
    def verifier_key(self) -> str:
        return self._signer.verifier_key

    # -- reading ----------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Entries in the log as this process knows it: its own tree, or further, as far
        as the last entry the sequencer stored for it."""
        return max(self._range.size, self._sequenced)

    def root(self) -> bytes:
        return self._range.root()

    def entries(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, AccessEntry]]:
        for index, data in self._storage.log_entries(start, end):
            yield index, AccessEntry.decode(data)

    def raw_entry(self, index: int) -> bytes:
        for _, data in self._storage.log_entries(index, index + 1):
            return data
        raise TamperDetected(f"the access log has no entry {index}")

    def entries_for(self, record_ids: Sequence[str]) -> list[tuple[int, AccessEntry]]:
        """Every entry that touched any of these records, in log order."""
        indexes: set[int] = set()
        for record_id in record_ids:
            indexes.update(self._storage.log_subject_entries(self._keys.commitment(record_id)))
        found = []
        for index in sorted(indexes):
            found.append((index, AccessEntry.decode(self.raw_entry(index))))
        return found

    def proven_entries_for(
        self, record_ids: Sequence[str], checkpoint: Checkpoint
    ) -> list[tuple[int, AccessEntry]]:
        """Every entry in the tree a signed checkpoint covers that names any of these
        records, in log order, proven complete: read from the leaves, whose root must be
        the checkpoint's, and held against the subject index. TamperDetected (naming an
        entry position, never a record) if the leaves or the index disagree."""
        wanted = {self._keys.commitment(r) for r in dict.fromkeys(record_ids)}
        needles = [c.hex().encode("ascii") for c in wanted]
        indexed: set[int] = set()
        for commitment in wanted:
            indexed.update(
                i for i in self._storage.log_subject_entries(commitment) if i < checkpoint.size
            )
        tree = CompactRange()
        found: list[tuple[int, AccessEntry]] = []
        for index, data in self._storage.log_entries(0, checkpoint.size):
            if index != tree.size:
                raise TamperDetected(f"the access log lacks entry {tree.size}")
            tree.append(leaf_hash(data))
            # A byte search first: most leaves name none of these commitments, and
            # decoding every leaf would cost more than reading it.
            if any(needle in data for needle in needles) and (
                (carried_subjects(data) or set()) & wanted
            ):
                try:
                    found.append((index, AccessEntry.decode(data)))
                except (ValueError, KeyError, TypeError):
                    raise TamperDetected(f"the access log's entry {index} is unreadable") from None
        if tree.size != checkpoint.size or tree.root() != checkpoint.root:
            raise TamperDetected("the access log's entries do not match its signed checkpoint")
        named = {index for index, _ in found}
        if indexed != named:
            raise TamperDetected(
                f"the access log's subject index does not match entry {min(indexed ^ named)}"
            )
        return found

    def private_details(self, index: int) -> dict[str, Any] | None:
        blob = self._storage.log_detail(index)
        return None if blob is None else self._keys.open_private(blob)

    def sealed_details(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        """(index, sealed details) for the entries start <= index < end that have them,
        in order, a page a query: open the ones needed with open_details."""
        return self._storage.log_detail_range(start, end)

    def open_details(self, sealed: bytes) -> dict[str, Any]:
        return self._keys.open_private(sealed)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return self.inclusion_proofs([index], size)[0]

    def inclusion_proofs(self, indexes: Sequence[int], size: int) -> list[list[bytes]]:
        """The audit paths of these leaves in the tree of `size` leaves (at most the size
        stored), in order: the nodes they need that are not kept in memory are read in
        one go (a page of a few thousand at a time), never one query a node."""
        plans = [inclusion_proof_plan(index, size) for index in indexes]
        wanted: set[tuple[int, int]] = set()
        folds: set[Fold] = set()
        for hash_ in {hash_ for plan in plans for hash_ in plan}:
            if isinstance(hash_, Fold):
                # The right edge's folds: the same for every proof in a tree of this size.
                folds.add(hash_)
                wanted.update(hash_)
            else:
                wanted.add(hash_)
        hashes = self._stored_nodes(wanted, size)
        for folded in folds:
            hashes[folded] = fold([hashes[p] for p in folded])
        return [[hashes[hash_] for hash_ in plan] for plan in plans]

    def _stored_nodes(
        self, wanted: set[tuple[int, int]], size: int
    ) -> dict[tuple[int, int] | Fold, bytes]:
        """The stored nodes asked for (keyed so that a proof's folds may join them)."""
        kept = self._upper
        # get, not `in` then a subscript: another thread's proofs may clear it meanwhile.
        found: dict[tuple[int, int] | Fold, bytes] = {
            p: node for p in wanted if (node := kept.get(p)) is not None
        }
        unread = sorted(wanted.difference(found))
        for start in range(0, len(unread), _NODES_PER_READ):
            read = self._storage.log_nodes(unread[start : start + _NODES_PER_READ])
            found.update(read.items())
        if missing := [p for p in unread if p not in found]:
            level, index = min(missing)
            raise TamperDetected(f"the access log lacks tree node {level}/{index}")
        floor = max(0, size.bit_length() - _KEPT_LEVELS)
        if len(kept) > 4 << _KEPT_LEVELS:
            kept.clear()  # a log grown by many levels since: the low ones kept are spent
        kept.update((p, found[p]) for p in unread if p[0] >= floor)
        return found

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        return consistency_proof(size1, size2, self._proof_node)

    @functools.cached_property
    def _proof_node(self) -> Callable[[int, int], bytes]:
        # Stored nodes never change, and every proof climbs through the same few upper
        # levels, so a bounded cache serves most of each proof from memory.
        return functools.lru_cache(maxsize=1 << 18)(self._node)

    def _node(self, level: int, index: int) -> bytes:
        node = self._storage.log_node(level, index)
        if node is None:
            raise TamperDetected(f"the access log lacks tree node {level}/{index}")
        return node


def stored_root(storage: LogStore, size: int) -> bytes:
    """The root of the stored tree at `size` (at most the stored size), from the O(log n)
    nodes of its compact range; TamperDetected if one of them is missing."""
    return stored_range(storage, size).root()


def stored_range(storage: LogStore, size: int) -> CompactRange:
    """The compact range of the stored tree at `size`, its peaks read in one go."""
    positions = peak_positions(size)
    return _range_of(size, positions, storage.log_nodes(positions))


def _range_of(
    size: int, positions: Sequence[tuple[int, int]], nodes: Mapping[tuple[int, int], bytes]
) -> CompactRange:
    missing = [position for position in positions if position not in nodes]
    if missing:
        level, index = missing[0]
        raise TamperDetected(f"the access log lacks tree node {level}/{index}")
    return CompactRange(size, [nodes[position] for position in positions])
