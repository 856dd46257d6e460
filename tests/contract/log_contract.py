"""The LogStore contract: the access log's entries, tree nodes, subject references,
sealed details and checkpoints, appended whole or refused whole. A backend's test class
subclasses LogStoreContract and provides make_storage, a factory of empty stores.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from custodes.errors import AuditUnavailable, LogMoved, StorageError
from custodes.storage import LogAppend, LogStore
from tests.contract import close_backend


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


def log_contents(storage: LogStore) -> tuple[Any, ...]:
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


class LogStoreContract:
    """Every documented behaviour of the LogStore Protocol."""

    @pytest.fixture
    def make_storage(self) -> Callable[[], LogStore]:
        raise NotImplementedError("a backend's test class provides make_storage")

    @pytest.fixture
    def storage(self, make_storage: Callable[[], LogStore]) -> Iterator[LogStore]:
        backend = make_storage()
        yield backend
        close_backend(backend)

    def test_backend_is_a_log_store(self, storage: LogStore) -> None:
        assert isinstance(storage, LogStore)

    def test_new_log_is_empty(self, storage: LogStore) -> None:
        assert storage.log_size() == 0
        assert list(storage.log_entries()) == []
        assert storage.log_node(0, 0) is None
        assert storage.log_subject_entries(SUBJECT_A) == []
        assert storage.log_detail(0) is None
        assert storage.checkpoints() == []

    def test_log_append_and_read_back(self, storage: LogStore) -> None:
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
        # A range of entries' details in one read, in order, those without left out.
        assert list(storage.log_detail_range(0, 6)) == [(1, b"d1"), (3, b"d3")]
        assert list(storage.log_detail_range(2, 3)) == []
        assert list(storage.log_detail_range(3, 2**70)) == [(3, b"d3")]

    def test_log_nodes_read_many_positions_at_once(self, storage: LogStore) -> None:
        storage.log_append(log_batch(0, 5))
        stored = [(0, 0), (0, 4), (1, 0), (1, 1), (2, 0)]
        absent = [(1, 2), (3, 0), (0, 5), (-1, 0), (0, 2**63)]
        asked = [*absent, *reversed(stored), (2, 0)]  # any order, repeats allowed
        assert storage.log_nodes(asked) == {p: node_hash(*p) for p in stored}
        assert storage.log_nodes([]) == {}
        # More positions than one statement binds on every backend.
        many = [(0, i) for i in range(1_500)]
        assert storage.log_nodes(many) == {(0, i): node_hash(0, i) for i in range(5)}

    def test_empty_log_batch_changes_nothing(self, storage: LogStore) -> None:
        storage.log_append(log_batch(0, 2))
        storage.log_append(LogAppend(2, [], [], [], []))
        assert storage.log_size() == 2

    @pytest.mark.parametrize("first_index", [0, 1, 3, 10])
    def test_append_from_a_stale_index_is_refused(
        self, storage: LogStore, first_index: int
    ) -> None:
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

    def test_resent_batch_is_refused_whole(self, storage: LogStore) -> None:
        batch = log_batch(0, 4, subjects=((SUBJECT_A, 1),), details=((1, b"d"),))
        storage.log_append(batch)
        before = log_contents(storage)
        with pytest.raises(AuditUnavailable):
            storage.log_append(batch)
        assert log_contents(storage) == before

    @pytest.mark.parametrize("malformed", sorted(MALFORMED_LOG))
    def test_malformed_log_batch_leaves_no_trace(self, storage: LogStore, malformed: str) -> None:
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

    def test_an_entry_naming_a_subject_twice_references_it_once(self, storage: LogStore) -> None:
        storage.log_append(log_batch(0, 1, subjects=((SUBJECT_A, 0), (SUBJECT_A, 0))))
        assert storage.log_subject_entries(SUBJECT_A) == [0]

    def test_subject_entries_ascend_across_batches(self, storage: LogStore) -> None:
        storage.log_append(log_batch(0, 3, subjects=((SUBJECT_A, 2), (SUBJECT_A, 0))))
        storage.log_append(log_batch(3, 3, subjects=((SUBJECT_B, 3), (SUBJECT_A, 5))))
        storage.log_append(log_batch(6, 1, subjects=((SUBJECT_A, 6),)))
        assert storage.log_subject_entries(SUBJECT_A) == [0, 2, 5, 6]
        assert storage.log_subject_entries(SUBJECT_B) == [3]
        assert storage.log_subject_entries(b"nobody") == []

    def test_subject_rows_stream_by_entry_then_commitment(self, storage: LogStore) -> None:
        # More rows than a page, so that a backend paging them is made to page.
        subjects = tuple(
            (bytes([k]) + SUBJECT_B[1:] if k else SUBJECT_A, i) for i in range(700) for k in (2, 0)
        )
        storage.log_append(log_batch(0, 700, subjects=subjects))
        rows = list(storage.log_subject_rows())
        assert rows == sorted((i, c) for c, i in subjects)
        assert list(storage.log_subject_rows(5, 7)) == [r for r in rows if 5 <= r[0] < 7]
        assert list(storage.log_subject_rows(699)) == rows[-2:]
        assert list(storage.log_subject_rows(700)) == []

    def test_log_entries_stream_ranges(self, storage: LogStore) -> None:
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

    def test_append_while_streaming(self, storage: LogStore) -> None:
        storage.log_append(log_batch(0, 1500))
        seen = []
        # An open range ends at the size when it was asked for.
        for index, data in storage.log_entries():
            seen.append((index, data))
            if index == 3:
                storage.log_append(log_batch(1500, 1))
        assert seen == [(i, entry(i)) for i in range(1500)]
        assert list(storage.log_entries(1500)) == [(1500, entry(1500))]

    def test_concurrent_writers_each_append_whole_batches(self, storage: LogStore) -> None:
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

    def test_checkpoints_ascend_and_replace(self, storage: LogStore) -> None:
        storage.put_checkpoint(8, b"note 8")
        storage.put_checkpoint(3, b"note 3")
        storage.put_checkpoint(0, b"note 0")
        storage.put_checkpoint(8, b"note 8, cosigned")
        assert storage.checkpoints() == [(0, b"note 0"), (3, b"note 3"), (8, b"note 8, cosigned")]

    @pytest.mark.parametrize(
        ("size", "note"), [(-1, b"note"), ("3", b"note"), (True, b"note"), (3, "SECRET-VALUE")]
    )
    def test_malformed_checkpoint_is_refused(self, storage: LogStore, size: Any, note: Any) -> None:
        with pytest.raises(StorageError) as refused:
            storage.put_checkpoint(size, note)
        assert "SECRET-VALUE" not in str(refused.value)
        assert storage.checkpoints() == []
