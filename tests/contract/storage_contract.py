"""The storage contract: what every backend must do, tested once for all of them.

A backend's test module subclasses StorageContract and provides make_storage, a
factory returning a fresh, empty backend on each call.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from custodes.errors import (
    AuditUnavailable,
    ConfigurationError,
    LogMoved,
    RecordNotFound,
    StorageError,
)
from custodes.storage import (
    AccountRow,
    BatchOutcome,
    LogAppend,
    SealedRecord,
    SessionRow,
    Storage,
    StoredRecord,
)

PERSON = "person"
CASE = "case"
NAME_INDEX = 1
PHONE_INDEX = 2


def sealed(
    n: int,
    *,
    record_type: str = PERSON,
    tokens: tuple[tuple[int, int], ...] | None = None,
    payload: bytes | None = None,
) -> SealedRecord:
    """A synthetic sealed record; its bytes stand in for ciphertext."""
    return SealedRecord(
        record_id=f"rec-{n:06d}",
        record_type=record_type,
        payload=payload if payload is not None else b"sealed:" + n.to_bytes(4, "big") * 8,
        kek_version=1,
        wrapped_key=b"wrapped:" + n.to_bytes(4, "big"),
        tokens=tokens if tokens is not None else ((NAME_INDEX, 1000 + n), (PHONE_INDEX, n % 7)),
    )


def stored(record: SealedRecord) -> StoredRecord:
    return StoredRecord(
        record.record_id,
        record.record_type,
        record.payload,
        record.kek_version,
        record.wrapped_key,
    )


def session_key(name: bytes) -> bytes:
    return hashlib.sha256(name).digest()


def session_row(name: bytes, **changes: Any) -> SessionRow:
    row = SessionRow(session_key(name), "inspector.ode", "officer", 1.0, 9e9, 1.0, "192.0.2.7")
    return row._replace(**changes)


def account(username: str = "inspector.ode", **changes: Any) -> AccountRow:
    row = AccountRow(
        username=username,
        role="investigator",
        password_hash="$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
        attributes=b'{"district": "north", "clearance": 2}',
        created_at=1_700_000_000.5,
        disabled=False,
    )
    return row._replace(**changes)


def node_hash(level: int, index: int) -> bytes:
    """A stand-in for a subtree hash: storage keeps hashes, it never computes them."""
    return hashlib.sha256(b"node %d %d" % (level, index)).digest()


def entry(index: int) -> bytes:
    return b"entry %d" % index


def log_batch(
    first: int,
    count: int,
    *,
    subjects: tuple[tuple[bytes, int], ...] = (),
    details: tuple[tuple[int, bytes], ...] = (),
) -> LogAppend:
    """Entries first .. first + count - 1 with every subtree they complete: the leaves,
    and each higher node whose last leaf falls in the batch."""
    size = first + count
    nodes = []
    level = 0
    while 1 << level <= size:
        for index in range(first >> level, size >> level):
            if (index + 1) << level > first:
                nodes.append((level, index, node_hash(level, index)))
        level += 1
    return LogAppend(
        first_index=first,
        entries=[entry(i) for i in range(first, size)],
        nodes=nodes,
        subjects=list(subjects),
        details=list(details),
    )


def log_contents(storage: Storage) -> tuple[Any, ...]:
    """Everything the log holds that a test can see, to show a refusal changed nothing."""
    size = storage.log_size()
    return (
        size,
        list(storage.log_entries()),
        [storage.log_node(level, i) for level in range(4) for i in range(size + 2)],
        storage.log_subject_entries(SUBJECT_A),
        [storage.log_detail(i) for i in range(size + 2)],
        storage.checkpoints(),
    )


SUBJECT_A = hashlib.sha256(b"subject a").digest()
SUBJECT_B = hashlib.sha256(b"subject b").digest()


def _with(batch: LogAppend, **changes: Any) -> LogAppend:
    """batch with some fields replaced, by values of any type (the malformed ones)."""
    return batch._replace(**changes)


def _add_node(batch: LogAppend, node: Any) -> LogAppend:
    return _with(batch, nodes=[*batch.nodes, node])


# Each is a way a log batch (entries 2 and 3 after two stored) can be malformed; the
# backend must refuse it whole and store nothing of it.
MALFORMED_LOG: dict[str, Callable[[LogAppend], Any]] = {
    "not_a_batch": lambda b: "SECRET-VALUE",
    "first_index_not_int": lambda b: _with(b, first_index="2"),
    "first_index_negative": lambda b: _with(b, first_index=-1),
    "entry_not_bytes": lambda b: _with(b, entries=[b"ok", "SECRET-VALUE"]),
    "entries_not_a_sequence": lambda b: _with(b, entries=None),
    "hash_too_short": lambda b: _with(b, nodes=[(0, 2, b"\x00" * 31), *b.nodes[1:]]),
    "hash_not_bytes": lambda b: _with(b, nodes=[(0, 2, "SECRET-VALUE"), *b.nodes[1:]]),
    "node_level_not_int": lambda b: _add_node(b, ("1", 0, node_hash(1, 0))),
    "node_not_a_triple": lambda b: _add_node(b, (0, node_hash(0, 9))),
    "node_beyond_the_batch": lambda b: _add_node(b, (0, 4, node_hash(0, 4))),
    "node_of_an_incomplete_subtree": lambda b: _add_node(b, (3, 0, node_hash(3, 0))),
    "node_negative_index": lambda b: _add_node(b, (0, -1, node_hash(0, -1))),
    "node_absurd_level": lambda b: _add_node(b, (10**9, 0, node_hash(0, 0))),
    "node_repeated_in_batch": lambda b: _add_node(b, b.nodes[0]),
    "node_already_stored": lambda b: _add_node(b, (0, 1, node_hash(0, 1))),
    "subject_not_bytes": lambda b: _with(b, subjects=[("SECRET-VALUE", 2)]),
    "subject_of_an_old_entry": lambda b: _with(b, subjects=[(SUBJECT_A, 1)]),
    "subject_beyond_the_batch": lambda b: _with(b, subjects=[(SUBJECT_A, 4)]),
    "detail_not_bytes": lambda b: _with(b, details=[(2, "SECRET-VALUE")]),
    "detail_of_an_old_entry": lambda b: _with(b, details=[(0, b"sealed")]),
    "detail_index_not_int": lambda b: _with(b, details=[("2", b"sealed")]),
    "detail_repeated": lambda b: _with(b, details=[(2, b"sealed"), (2, b"again")]),
}


# Each is a way a record can be malformed; the backend must refuse the whole batch.
MALFORMED: dict[str, Callable[[SealedRecord], Any]] = {
    "payload_not_bytes": lambda r: r._replace(payload="SECRET-VALUE"),  # type: ignore[arg-type]
    "token_not_int": lambda r: r._replace(tokens=((NAME_INDEX, "SECRET-VALUE"),)),  # type: ignore[arg-type]
    "index_id_not_int": lambda r: r._replace(tokens=(("SECRET-VALUE", 1),)),  # type: ignore[arg-type]
    "token_too_large": lambda r: r._replace(tokens=((NAME_INDEX, 2**64),)),
    "tokens_not_pairs": lambda r: r._replace(tokens=(("SECRET-VALUE",),)),  # type: ignore[arg-type]
    "wrapped_key_not_bytes": lambda r: r._replace(wrapped_key="SECRET-VALUE"),  # type: ignore[arg-type]
    "kek_version_not_int": lambda r: r._replace(kek_version="SECRET-VALUE"),  # type: ignore[arg-type]
    "record_id_not_str": lambda r: r._replace(record_id=b"SECRET-VALUE"),  # type: ignore[arg-type]
    "record_id_empty": lambda r: r._replace(record_id=""),
    "record_type_not_str": lambda r: r._replace(record_type=None),  # type: ignore[arg-type]
    "not_a_record": lambda r: "SECRET-VALUE",
}


class StorageContract:
    """Every documented behaviour of the Storage Protocol."""

    @pytest.fixture
    def make_storage(self) -> Callable[[], Storage]:
        raise NotImplementedError("a backend's test class provides make_storage")

    @pytest.fixture
    def storage(self, make_storage: Callable[[], Storage]) -> Iterator[Storage]:
        backend = make_storage()
        yield backend
        backend.close()

    def test_backend_satisfies_the_protocol(self, storage: Storage) -> None:
        assert isinstance(storage, Storage)

    # -- metadata -----------------------------------------------------------------

    def test_meta_round_trip(self, storage: Storage) -> None:
        assert storage.get_meta("vault.id") is None
        storage.set_meta("vault.id", b"\x00\x01vault")
        storage.set_meta("empty", b"")
        assert storage.get_meta("vault.id") == b"\x00\x01vault"
        assert storage.get_meta("empty") == b""

    def test_meta_overwrite_replaces_the_value(self, storage: Storage) -> None:
        storage.set_meta("kek.current", b"1")
        storage.set_meta("kek.current", b"2")
        assert storage.get_meta("kek.current") == b"2"

    def test_meta_value_must_be_bytes(self, storage: Storage) -> None:
        with pytest.raises(StorageError):
            storage.set_meta("kek.current", "2")  # type: ignore[arg-type]
        assert storage.get_meta("kek.current") is None

    # -- write_batch --------------------------------------------------------------

    def test_write_batch_stores_records_keys_and_tokens(self, storage: Storage) -> None:
        batch = [sealed(n) for n in range(5)]
        assert storage.write_batch(batch) == BatchOutcome(inserted=5, already_present=0)
        got = storage.get_records([r.record_id for r in batch])
        assert got == {r.record_id: stored(r) for r in batch}
        assert all(isinstance(v, StoredRecord) for v in got.values())
        for r in batch:
            for index_id, token in r.tokens:
                assert r.record_id in storage.find(index_id, token, 100)
        assert storage.count_records() == 5

    def test_empty_batch_is_a_no_op(self, storage: Storage) -> None:
        assert storage.write_batch([]) == BatchOutcome(inserted=0, already_present=0)
        assert storage.count_records() == 0

    def test_rerunning_a_batch_skips_every_record(self, storage: Storage) -> None:
        batch = [sealed(n) for n in range(5)]
        storage.write_batch(batch)
        assert storage.write_batch(batch) == BatchOutcome(inserted=0, already_present=5)
        assert storage.count_records() == 5
        assert storage.find(NAME_INDEX, 1000, 100) == [batch[0].record_id]

    def test_resent_record_adds_no_key_payload_or_token(self, storage: Storage) -> None:
        original = sealed(1)
        storage.write_batch([original])
        resent = original._replace(
            payload=b"other ciphertext",
            kek_version=9,
            wrapped_key=b"other key",
            tokens=((NAME_INDEX, 424242), (PHONE_INDEX, 515151)),
        )
        assert storage.write_batch([resent]) == BatchOutcome(inserted=0, already_present=1)
        assert storage.find(NAME_INDEX, 424242, 10) == []
        assert storage.find(PHONE_INDEX, 515151, 10) == []
        assert storage.get_records([original.record_id]) == {original.record_id: stored(original)}

    def test_batch_mixing_new_and_stored_records(self, storage: Storage) -> None:
        storage.write_batch([sealed(1), sealed(2)])
        outcome = storage.write_batch([sealed(2), sealed(3), sealed(1), sealed(4)])
        assert outcome == BatchOutcome(inserted=2, already_present=2)
        assert storage.count_records() == 4

    def test_repeat_within_a_batch_first_wins(self, storage: Storage) -> None:
        first = sealed(7, payload=b"first", tokens=((NAME_INDEX, 1),))
        repeat = sealed(7, payload=b"repeat", tokens=((NAME_INDEX, 2),))
        outcome = storage.write_batch([first, sealed(8), repeat])
        assert outcome == BatchOutcome(inserted=2, already_present=1)
        assert storage.get_records([first.record_id])[first.record_id].payload == b"first"
        assert storage.find(NAME_INDEX, 1, 10) == [first.record_id]
        assert storage.find(NAME_INDEX, 2, 10) == []

    def test_a_record_may_repeat_a_token_pair(self, storage: Storage) -> None:
        record = sealed(1, tokens=((NAME_INDEX, 5), (NAME_INDEX, 5)))
        assert storage.write_batch([record]).inserted == 1
        assert storage.find(NAME_INDEX, 5, 10) == [record.record_id]

    def test_extreme_token_values_round_trip(self, storage: Storage) -> None:
        low, high = -(2**63), 2**63 - 1
        record = sealed(1, tokens=((NAME_INDEX, low), (NAME_INDEX, high), (0, 0)))
        storage.write_batch([record])
        assert storage.find(NAME_INDEX, low, 1) == [record.record_id]
        assert storage.find(NAME_INDEX, high, 1) == [record.record_id]
        assert storage.find(0, 0, 1) == [record.record_id]

    @pytest.mark.parametrize("malformed", sorted(MALFORMED))
    def test_failed_batch_leaves_no_trace(self, storage: Storage, malformed: str) -> None:
        before = sealed(100)
        storage.write_batch([before])
        good = [sealed(n) for n in range(10)]
        bad = MALFORMED[malformed](sealed(10))
        with pytest.raises(StorageError) as refused:
            storage.write_batch([*good, bad, sealed(11)])
        assert "SECRET-VALUE" not in str(refused.value)
        assert storage.count_records() == 1
        assert storage.get_records([r.record_id for r in good]) == {}
        for r in good:
            for index_id, token in r.tokens:
                assert storage.find(index_id, token, 100) in ([], [before.record_id])
        assert storage.get_records([before.record_id]) == {before.record_id: stored(before)}

    def test_malformed_repeat_still_refuses_the_batch(self, storage: Storage) -> None:
        with pytest.raises(StorageError):
            storage.write_batch([sealed(1), sealed(1)._replace(payload=None)])  # type: ignore[arg-type]
        assert storage.count_records() == 0

    # -- reads --------------------------------------------------------------------

    def test_get_records_omits_unknown_ids(self, storage: Storage) -> None:
        storage.write_batch([sealed(1), sealed(2)])
        got = storage.get_records(["rec-000001", "nobody", "rec-000002", "rec-000001"])
        assert set(got) == {"rec-000001", "rec-000002"}
        assert storage.get_records([]) == {}
        assert storage.get_records(["nobody"]) == {}

    def test_get_records_of_many_ids(self, storage: Storage) -> None:
        batch = [sealed(n) for n in range(1234)]
        assert storage.write_batch(batch).inserted == 1234
        ids = [r.record_id for r in batch] + [f"missing-{n}" for n in range(300)]
        got = storage.get_records(ids)
        assert got == {r.record_id: stored(r) for r in batch}

    def test_find_returns_sorted_ids_up_to_limit(self, storage: Storage) -> None:
        ns = [42, 7, 99, 3, 58, 21]
        storage.write_batch([sealed(n, tokens=((NAME_INDEX, 77),)) for n in ns])
        expected = [f"rec-{n:06d}" for n in sorted(ns)]
        assert storage.find(NAME_INDEX, 77, 100) == expected
        assert storage.find(NAME_INDEX, 77, 3) == expected[:3]
        assert storage.find(NAME_INDEX, 77, 1) == expected[:1]
        assert storage.find(NAME_INDEX, 77, 0) == []

    def test_find_keeps_indexes_apart(self, storage: Storage) -> None:
        storage.write_batch([sealed(1, tokens=((NAME_INDEX, 5),))])
        assert storage.find(PHONE_INDEX, 5, 10) == []
        assert storage.find(NAME_INDEX, 6, 10) == []

    def test_count_records_by_type(self, storage: Storage) -> None:
        storage.write_batch(
            [sealed(n) for n in range(3)] + [sealed(n, record_type=CASE) for n in range(3, 5)]
        )
        assert storage.count_records() == 5
        assert storage.count_records(PERSON) == 3
        assert storage.count_records(CASE) == 2
        assert storage.count_records("vehicle") == 0

    def test_concurrent_batches_all_land(self, storage: Storage) -> None:
        errors: list[BaseException] = []

        def ingest(start: int) -> None:
            try:
                for k in range(10):
                    base = start + k * 20
                    storage.write_batch([sealed(n) for n in range(base, base + 20)])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=ingest, args=(t * 1000,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert storage.count_records() == 800

    # -- accounts -----------------------------------------------------------------

    def test_account_round_trip(self, storage: Storage) -> None:
        row = account()
        storage.add_account(row)
        assert storage.get_account(row.username) == row
        assert storage.get_account("nobody") is None

    def test_duplicate_account_is_refused(self, storage: Storage) -> None:
        storage.add_account(account())
        with pytest.raises(ConfigurationError):
            storage.add_account(account(role="administrator"))
        assert storage.get_account("inspector.ode") == account()

    def test_update_account_replaces_it(self, storage: Storage) -> None:
        storage.add_account(account())
        changed = account(role="supervisor", disabled=True, attributes=b"{}")
        storage.update_account(changed)
        assert storage.get_account("inspector.ode") == changed

    def test_update_of_missing_account_is_refused(self, storage: Storage) -> None:
        with pytest.raises(RecordNotFound):
            storage.update_account(account())
        assert storage.get_account("inspector.ode") is None

    def test_list_accounts(self, storage: Storage) -> None:
        assert storage.list_accounts() == []
        rows = [account("clerk.b"), account("auditor.a"), account("officer.c", disabled=True)]
        for row in rows:
            storage.add_account(row)
        listed = storage.list_accounts()
        assert sorted(listed) == sorted(rows)

    # -- access log ---------------------------------------------------------------

    def test_new_log_is_empty(self, storage: Storage) -> None:
        assert storage.log_size() == 0
        assert list(storage.log_entries()) == []
        assert storage.log_node(0, 0) is None
        assert storage.log_subject_entries(SUBJECT_A) == []
        assert storage.log_detail(0) is None
        assert storage.checkpoints() == []

    def test_log_append_and_read_back(self, storage: Storage) -> None:
        storage.log_append(
            log_batch(0, 3, subjects=((SUBJECT_A, 0), (SUBJECT_B, 1)), details=((1, b"d1"),))
        )
        storage.log_append(log_batch(3, 2, subjects=((SUBJECT_A, 4),), details=((3, b"d3"),)))
        assert storage.log_size() == 5
        assert list(storage.log_entries()) == [(i, entry(i)) for i in range(5)]
        for level, index in [(0, 0), (0, 4), (1, 0), (1, 1), (2, 0)]:
            assert storage.log_node(level, index) == node_hash(level, index)
        assert storage.log_node(1, 2) is None  # leaves 4 and 5: not complete
        assert storage.log_node(3, 0) is None
        assert storage.log_subject_entries(SUBJECT_A) == [0, 4]
        assert storage.log_subject_entries(SUBJECT_B) == [1]
        assert [storage.log_detail(i) for i in range(6)] == [None, b"d1", None, b"d3", None, None]

    def test_empty_log_batch_changes_nothing(self, storage: Storage) -> None:
        storage.log_append(log_batch(0, 2))
        storage.log_append(LogAppend(2, [], [], [], []))
        assert storage.log_size() == 2

    @pytest.mark.parametrize("first_index", [0, 1, 3, 10])
    def test_append_from_a_stale_index_is_refused(self, storage: Storage, first_index: int) -> None:
        storage.log_append(log_batch(0, 2))
        before = log_contents(storage)
        # A well-formed batch built for another size: what a writer whose view of the
        # log is out of date sends.
        stale = log_batch(
            first_index, 2, subjects=((SUBJECT_A, first_index),), details=((first_index, b"d"),)
        )
        with pytest.raises(LogMoved, match="moved"):
            storage.log_append(stale)
        assert log_contents(storage) == before
        storage.log_append(log_batch(2, 2))
        assert storage.log_size() == 4

    def test_resent_batch_is_refused_whole(self, storage: Storage) -> None:
        batch = log_batch(0, 4, subjects=((SUBJECT_A, 1),), details=((1, b"d"),))
        storage.log_append(batch)
        before = log_contents(storage)
        with pytest.raises(AuditUnavailable):
            storage.log_append(batch)
        assert log_contents(storage) == before

    @pytest.mark.parametrize("malformed", sorted(MALFORMED_LOG))
    def test_malformed_log_batch_leaves_no_trace(self, storage: Storage, malformed: str) -> None:
        storage.log_append(log_batch(0, 2, subjects=((SUBJECT_A, 0),)))
        before = log_contents(storage)
        good = log_batch(2, 2, subjects=((SUBJECT_A, 3),), details=((3, b"sealed"),))
        with pytest.raises(AuditUnavailable) as refused:
            storage.log_append(MALFORMED_LOG[malformed](good))
        assert "SECRET-VALUE" not in str(refused.value)
        assert log_contents(storage) == before
        # Nothing half-written stands in the way of the correct batch.
        storage.log_append(good)
        assert storage.log_size() == 4
        assert storage.log_subject_entries(SUBJECT_A) == [0, 3]
        assert storage.log_detail(3) == b"sealed"

    def test_an_entry_naming_a_subject_twice_references_it_once(self, storage: Storage) -> None:
        storage.log_append(log_batch(0, 1, subjects=((SUBJECT_A, 0), (SUBJECT_A, 0))))
        assert storage.log_subject_entries(SUBJECT_A) == [0]

    def test_subject_entries_ascend_across_batches(self, storage: Storage) -> None:
        storage.log_append(log_batch(0, 3, subjects=((SUBJECT_A, 2), (SUBJECT_A, 0))))
        storage.log_append(log_batch(3, 3, subjects=((SUBJECT_B, 3), (SUBJECT_A, 5))))
        storage.log_append(log_batch(6, 1, subjects=((SUBJECT_A, 6),)))
        assert storage.log_subject_entries(SUBJECT_A) == [0, 2, 5, 6]
        assert storage.log_subject_entries(SUBJECT_B) == [3]
        assert storage.log_subject_entries(b"nobody") == []

    def test_log_entries_stream_ranges(self, storage: Storage) -> None:
        for first in range(0, 2500, 500):
            storage.log_append(log_batch(first, 500))
        everything = list(storage.log_entries())
        assert everything == [(i, entry(i)) for i in range(2500)]
        assert list(storage.log_entries(10, 20)) == everything[10:20]
        assert list(storage.log_entries(999, 2001)) == everything[999:2001]
        assert list(storage.log_entries(2490)) == everything[2490:]
        assert list(storage.log_entries(-5, 2)) == everything[:2]
        assert list(storage.log_entries(2400, 10**6)) == everything[2400:]
        assert list(storage.log_entries(2500)) == []
        assert list(storage.log_entries(20, 10)) == []
        assert list(storage.log_entries(0, 0)) == []

    def test_append_while_streaming(self, storage: Storage) -> None:
        storage.log_append(log_batch(0, 1500))
        seen = []
        # An open range ends at the size when it was asked for.
        for index, data in storage.log_entries():
            seen.append((index, data))
            if index == 3:
                storage.log_append(log_batch(1500, 1))
        assert seen == [(i, entry(i)) for i in range(1500)]
        assert list(storage.log_entries(1500)) == [(1500, entry(1500))]

    def test_concurrent_writers_each_append_whole_batches(self, storage: Storage) -> None:
        errors: list[BaseException] = []

        def writer(subject: bytes) -> None:
            try:
                for _ in range(10):
                    # Retry from the new size when another writer got there first.
                    while True:
                        size = storage.log_size()
                        batch = log_batch(size, 3, subjects=((subject, size),))
                        try:
                            storage.log_append(batch)
                            break
                        except AuditUnavailable:
                            continue
            except BaseException as exc:
                errors.append(exc)

        subjects = [hashlib.sha256(b"%d" % t).digest() for t in range(4)]
        threads = [threading.Thread(target=writer, args=(s,)) for s in subjects]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert list(storage.log_entries()) == [(i, entry(i)) for i in range(120)]
        firsts = sorted(i for s in subjects for i in storage.log_subject_entries(s))
        assert firsts == list(range(0, 120, 3))

    def test_checkpoints_ascend_and_replace(self, storage: Storage) -> None:
        storage.put_checkpoint(8, b"note 8")
        storage.put_checkpoint(3, b"note 3")
        storage.put_checkpoint(0, b"note 0")
        storage.put_checkpoint(8, b"note 8, cosigned")
        assert storage.checkpoints() == [(0, b"note 0"), (3, b"note 3"), (8, b"note 8, cosigned")]

    @pytest.mark.parametrize(
        ("size", "note"), [(-1, b"note"), ("3", b"note"), (True, b"note"), (3, "SECRET-VALUE")]
    )
    def test_malformed_checkpoint_is_refused(self, storage: Storage, size: Any, note: Any) -> None:
        with pytest.raises(StorageError) as refused:
            storage.put_checkpoint(size, note)
        assert "SECRET-VALUE" not in str(refused.value)
        assert storage.checkpoints() == []

    # -- sessions and login throttling ------------------------------------------------

    def test_session_round_trip(self, storage: Storage) -> None:
        row = session_row(b"a")
        storage.put_session(row)
        assert storage.get_session(row.key) == row
        assert storage.get_session(session_key(b"b")) is None
        assert storage.count_sessions() == 1

    def test_a_session_key_is_stored_once(self, storage: Storage) -> None:
        storage.put_session(session_row(b"a"))
        with pytest.raises(ConfigurationError):
            storage.put_session(session_row(b"a", username="inspector.other"))
        stored = storage.get_session(session_key(b"a"))
        assert stored is not None and stored.username == "inspector.ode"

    def test_session_key_must_be_a_hash(self, storage: Storage) -> None:
        with pytest.raises(StorageError):
            storage.put_session(session_row(b"a")._replace(key=b"short"))
        assert storage.count_sessions() == 0

    def test_list_sessions_by_account(self, storage: Storage) -> None:
        rows = [session_row(b"b", username="zhao"), session_row(b"a"), session_row(b"c")]
        for row in rows:
            storage.put_session(row)
        listed = storage.list_sessions()
        assert [r.username for r in listed] == ["inspector.ode", "inspector.ode", "zhao"]
        assert sorted(listed) == sorted(rows)

    def test_touch_moves_last_seen_forward_only(self, storage: Storage) -> None:
        row = session_row(b"a", last_seen=100.0)
        storage.put_session(row)
        storage.touch_session(row.key, 160.0)
        storage.touch_session(row.key, 130.0)
        storage.touch_session(session_key(b"gone"), 500.0)
        stored = storage.get_session(row.key)
        assert stored is not None and stored.last_seen == 160.0

    def test_end_one_session_or_all_of_an_account(self, storage: Storage) -> None:
        for name, user in ((b"a", "inspector.ode"), (b"b", "inspector.ode"), (b"c", "other")):
            storage.put_session(session_row(name, username=user))
        assert storage.end_session(session_key(b"c")) is True
        assert storage.end_session(session_key(b"c")) is False
        assert storage.end_sessions("inspector.ode") == 2
        assert storage.end_sessions("inspector.ode") == 0
        assert storage.count_sessions() == 0

    def test_purge_removes_expired_and_idle_sessions_only(self, storage: Storage) -> None:
        storage.put_session(session_row(b"live", last_seen=950.0, expires=2000.0))
        storage.put_session(session_row(b"expired", last_seen=990.0, expires=1000.0))
        storage.put_session(session_row(b"idle", last_seen=100.0, expires=2000.0))
        assert storage.purge_sessions(1000.0, idle=600.0) == 2
        assert storage.get_session(session_key(b"live")) is not None
        assert storage.count_sessions() == 1

    def test_a_one_time_mark_is_spent_once_until_it_lapses(self, storage: Storage) -> None:
        key = session_key(b"challenge")
        assert storage.spend(key, 100.0, keep=60.0) is True
        assert storage.spend(key, 130.0, keep=60.0) is False
        assert storage.spend(session_key(b"other"), 130.0, keep=60.0) is True
        # Forgotten once its time is past, as the value it guards has lapsed by then.
        assert storage.spend(key, 161.0, keep=60.0) is True
        with pytest.raises(StorageError):
            storage.spend(b"short", 1.0, keep=60.0)

    def test_racing_spends_of_one_mark_let_one_through(self, storage: Storage) -> None:
        key = session_key(b"raced")
        results: list[bool] = []
        threads = [
            threading.Thread(target=lambda: results.append(storage.spend(key, 5.0, 60.0)))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False] * 7 + [True]

    def test_login_failures_count_per_key(self, storage: Storage) -> None:
        storage.record_login_failure("account:ode", 10.0)
        storage.record_login_failure("account:ode", 12.0)
        storage.record_login_failure("client:192.0.2.7", 11.0)
        assert storage.login_failures(["account:ode", "client:192.0.2.7", "none"]) == {
            "account:ode": (2, 12.0),
            "client:192.0.2.7": (1, 11.0),
        }
        storage.clear_login_failures("account:ode")
        assert storage.login_failures(["account:ode"]) == {}
        assert storage.purge_login_failures(before=11.5) == 1
        assert storage.login_failures(["client:192.0.2.7"]) == {}
        assert storage.login_failures([]) == {}

    # -- lifecycle ----------------------------------------------------------------

    def test_closed_storage_refuses_to_audit(self, make_storage: Callable[[], Storage]) -> None:
        backend = make_storage()
        backend.close()
        backend.close()
        with pytest.raises(AuditUnavailable):
            backend.log_append(log_batch(0, 1))
        with pytest.raises(StorageError):
            backend.write_batch([sealed(1)])
        with pytest.raises(StorageError):
            backend.get_records(["rec-000001"])
        with pytest.raises(StorageError):
            backend.log_size()
        with pytest.raises(StorageError):
            backend.log_entries()
        with pytest.raises(StorageError):
            backend.put_checkpoint(0, b"note")
