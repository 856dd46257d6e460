"""The RecordStore contract: sealed records, their keys and tokens, written in batches
that land whole or not at all, and found again by token. A backend's test class
subclasses RecordStoreContract and provides make_storage, a factory of empty stores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from custodes.errors import StorageError
from custodes.storage import BatchOutcome, RecordStore, SealedRecord, StoredRecord
from custodes.storage.base import Rekeyed
from tests.contract import close_backend

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


class RecordStoreContract:
    """Every documented behaviour of the RecordStore Protocol."""

    @pytest.fixture
    def make_storage(self) -> Callable[[], RecordStore]:
        raise NotImplementedError("a backend's test class provides make_storage")

    @pytest.fixture
    def storage(self, make_storage: Callable[[], RecordStore]) -> Iterator[RecordStore]:
        backend = make_storage()
        yield backend
        close_backend(backend)

    def test_backend_is_a_record_store(self, storage: RecordStore) -> None:
        assert isinstance(storage, RecordStore)

    def test_write_batch_stores_records_keys_and_tokens(self, storage: RecordStore) -> None:
        batch = [sealed(n) for n in range(5)]
        assert storage.write_batch(batch) == BatchOutcome(inserted=5, already_present=0)
        got = storage.get_records([r.record_id for r in batch])
        assert got == {r.record_id: stored(r) for r in batch}
        assert all(isinstance(v, StoredRecord) for v in got.values())
        for r in batch:
            for index_id, token in r.tokens:
                assert r.record_id in storage.find(index_id, token, 100)
        assert storage.count_records() == 5

    def test_empty_batch_is_a_no_op(self, storage: RecordStore) -> None:
        assert storage.write_batch([]) == BatchOutcome(inserted=0, already_present=0)
        assert storage.count_records() == 0

    def test_rerunning_a_batch_skips_every_record(self, storage: RecordStore) -> None:
        batch = [sealed(n) for n in range(5)]
        storage.write_batch(batch)
        assert storage.write_batch(batch) == BatchOutcome(inserted=0, already_present=5)
        assert storage.count_records() == 5
        assert storage.find(NAME_INDEX, 1000, 100) == [batch[0].record_id]

    def test_resent_record_adds_no_key_payload_or_token(self, storage: RecordStore) -> None:
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

    def test_batch_mixing_new_and_stored_records(self, storage: RecordStore) -> None:
        storage.write_batch([sealed(1), sealed(2)])
        outcome = storage.write_batch([sealed(2), sealed(3), sealed(1), sealed(4)])
        assert outcome == BatchOutcome(inserted=2, already_present=2)
        assert storage.count_records() == 4

    def test_repeat_within_a_batch_first_wins(self, storage: RecordStore) -> None:
        first = sealed(7, payload=b"first", tokens=((NAME_INDEX, 1),))
        repeat = sealed(7, payload=b"repeat", tokens=((NAME_INDEX, 2),))
        outcome = storage.write_batch([first, sealed(8), repeat])
        assert outcome == BatchOutcome(inserted=2, already_present=1)
        assert storage.get_records([first.record_id])[first.record_id].payload == b"first"
        assert storage.find(NAME_INDEX, 1, 10) == [first.record_id]
        assert storage.find(NAME_INDEX, 2, 10) == []

    def test_a_record_may_repeat_a_token_pair(self, storage: RecordStore) -> None:
        record = sealed(1, tokens=((NAME_INDEX, 5), (NAME_INDEX, 5)))
        assert storage.write_batch([record]).inserted == 1
        assert storage.find(NAME_INDEX, 5, 10) == [record.record_id]

    def test_extreme_token_values_round_trip(self, storage: RecordStore) -> None:
        low, high = -(2**63), 2**63 - 1
        record = sealed(1, tokens=((NAME_INDEX, low), (NAME_INDEX, high), (0, 0)))
        storage.write_batch([record])
        assert storage.find(NAME_INDEX, low, 1) == [record.record_id]
        assert storage.find(NAME_INDEX, high, 1) == [record.record_id]
        assert storage.find(0, 0, 1) == [record.record_id]

    @pytest.mark.parametrize("malformed", sorted(MALFORMED))
    def test_failed_batch_leaves_no_trace(self, storage: RecordStore, malformed: str) -> None:
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

    def test_malformed_repeat_still_refuses_the_batch(self, storage: RecordStore) -> None:
        with pytest.raises(StorageError):
            storage.write_batch([sealed(1), sealed(1)._replace(payload=None)])  # type: ignore[arg-type]
        assert storage.count_records() == 0

    def test_get_records_omits_unknown_ids(self, storage: RecordStore) -> None:
        storage.write_batch([sealed(1), sealed(2)])
        got = storage.get_records(["rec-000001", "nobody", "rec-000002", "rec-000001"])
        assert set(got) == {"rec-000001", "rec-000002"}
        assert storage.get_records([]) == {}
        assert storage.get_records(["nobody"]) == {}

    def test_get_records_of_many_ids(self, storage: RecordStore) -> None:
        batch = [sealed(n) for n in range(1234)]
        assert storage.write_batch(batch).inserted == 1234
        ids = [r.record_id for r in batch] + [f"missing-{n}" for n in range(300)]
        got = storage.get_records(ids)
        assert got == {r.record_id: stored(r) for r in batch}

    def test_find_returns_sorted_ids_up_to_limit(self, storage: RecordStore) -> None:
        ns = [42, 7, 99, 3, 58, 21]
        storage.write_batch([sealed(n, tokens=((NAME_INDEX, 77),)) for n in ns])
        expected = [f"rec-{n:06d}" for n in sorted(ns)]
        assert storage.find(NAME_INDEX, 77, 100) == expected
        assert storage.find(NAME_INDEX, 77, 3) == expected[:3]
        assert storage.find(NAME_INDEX, 77, 1) == expected[:1]
        assert storage.find(NAME_INDEX, 77, 0) == []

    def test_find_keeps_indexes_apart(self, storage: RecordStore) -> None:
        storage.write_batch([sealed(1, tokens=((NAME_INDEX, 5),))])
        assert storage.find(PHONE_INDEX, 5, 10) == []
        assert storage.find(NAME_INDEX, 6, 10) == []

    def test_find_records_is_find_then_get_records_in_one_read(self, storage: RecordStore) -> None:
        ns = [42, 7, 99, 3, 58, 21]
        batch = [sealed(n, tokens=((NAME_INDEX, 77), (PHONE_INDEX, n))) for n in ns]
        storage.write_batch(batch)
        by_id = {r.record_id: stored(r) for r in batch}
        for limit in (100, 3, 1):
            ids = storage.find(NAME_INDEX, 77, limit)
            assert storage.find_records(NAME_INDEX, 77, limit) == [by_id[r] for r in ids]
        assert storage.find_records(PHONE_INDEX, 42, 10) == [by_id["rec-000042"]]
        assert storage.find_records(NAME_INDEX, 77, 0) == []
        assert storage.find_records(PHONE_INDEX, 77, 10) == []
        assert storage.find_records(NAME_INDEX, 2**63, 10) == []
        assert storage.find(NAME_INDEX, 2**63, 10) == []

    def test_record_tokens_lists_each_record_with_its_tokens_in_pages(
        self, storage: RecordStore
    ) -> None:
        batch = [
            sealed(n, tokens=((NAME_INDEX, 1000 + n), (PHONE_INDEX, n % 3))) for n in range(25)
        ]
        storage.write_batch(batch[:10])
        storage.write_batch(batch[10:])
        seen: list[tuple[str, tuple[tuple[int, int], ...]]] = []
        after = 0
        while page := storage.record_tokens(after, 7):
            assert len(page) <= 7
            assert all(position > after for position, _, _ in page)
            after = page[-1][0]
            seen.extend((rid, pairs) for _, rid, pairs in page)
        assert sorted(seen) == sorted((r.record_id, tuple(sorted(r.tokens))) for r in batch)
        assert storage.record_tokens(0, 0) == []

    def test_records_page_walks_every_record_in_storage_order(self, storage: RecordStore) -> None:
        batch = [sealed(n) for n in range(25)]
        storage.write_batch(batch[:10])
        storage.write_batch(batch[10:])
        seen: list[StoredRecord] = []
        after = 0
        while page := storage.records_page(after, 7):
            assert len(page) <= 7
            assert all(position > after for position, _ in page)
            after = page[-1][0]
            seen.extend(record for _, record in page)
        assert sorted(seen) == sorted(stored(r) for r in batch)
        assert storage.records_page(0, 0) == []

    def test_rekey_replaces_keys_payloads_and_adds_tokens_in_one_step(
        self, storage: RecordStore
    ) -> None:
        batch = [sealed(n) for n in range(4)]
        storage.write_batch(batch)
        changes = [
            Rekeyed(batch[0].record_id, batch[0].wrapped_key, 2, b"rewrapped-0", None),
            Rekeyed(
                batch[1].record_id,
                batch[1].wrapped_key,
                2,
                b"rewrapped-1",
                b"resealed-1",
                ((NAME_INDEX + (1 << 32), 5), (PHONE_INDEX + (1 << 32), 6)),
            ),
            # Read before another change landed: left alone.
            Rekeyed(batch[2].record_id, b"not what is stored", 2, b"rewrapped-2", b"x"),
            Rekeyed("rec-unknown", b"wrapped", 2, b"rewrapped", None),
        ]
        assert storage.rekey_records(changes) == 2
        got = storage.get_records([r.record_id for r in batch])
        assert got[batch[0].record_id] == stored(batch[0])._replace(
            kek_version=2, wrapped_key=b"rewrapped-0"
        )
        assert got[batch[1].record_id] == stored(batch[1])._replace(
            kek_version=2, wrapped_key=b"rewrapped-1", payload=b"resealed-1"
        )
        assert got[batch[2].record_id] == stored(batch[2])
        assert storage.find(NAME_INDEX + (1 << 32), 5, 10) == [batch[1].record_id]
        assert storage.find(NAME_INDEX, 1001, 10) == [batch[1].record_id]
        # Applying the same page again changes nothing: the wrapped keys moved on.
        assert storage.rekey_records(changes) == 0
        census = storage.key_census()
        assert census.kek_versions == {1: 2, 2: 2}
        assert census.token_index_ids[NAME_INDEX + (1 << 32)] == 1

    def test_a_malformed_rekey_changes_nothing(self, storage: RecordStore) -> None:
        record = sealed(1)
        storage.write_batch([record])
        good = Rekeyed(record.record_id, record.wrapped_key, 2, b"rewrapped", None)
        bad = good._replace(wrapped_key="SECRET-VALUE")  # type: ignore[arg-type]
        with pytest.raises(StorageError) as caught:
            storage.rekey_records([good, bad])
        assert "SECRET-VALUE" not in str(caught.value)
        assert "change 1" in str(caught.value)
        assert storage.get_records([record.record_id])[record.record_id] == stored(record)

    def test_drop_tokens_deletes_only_the_named_index_ids(self, storage: RecordStore) -> None:
        storage.write_batch([sealed(n) for n in range(5)])
        assert storage.drop_tokens([NAME_INDEX]) == 5
        assert storage.drop_tokens([NAME_INDEX]) == 0
        assert storage.find(NAME_INDEX, 1002, 10) == []
        assert storage.find(PHONE_INDEX, 2, 10) == ["rec-000002"]
        assert storage.key_census().token_index_ids == {PHONE_INDEX: 5}

    def test_key_census_counts_generations_from_the_payload(self, storage: RecordStore) -> None:
        storage.write_batch(
            [sealed(1, payload=b"\x02\x01rest"), sealed(2, payload=b"\x02\x03rest")]
        )
        census = storage.key_census()
        assert census.data_generations == {1: 1, 3: 1}
        assert census.kek_versions == {1: 2}

    def test_count_records_by_type(self, storage: RecordStore) -> None:
        storage.write_batch(
            [sealed(n) for n in range(3)] + [sealed(n, record_type=CASE) for n in range(3, 5)]
        )
        assert storage.count_records() == 5
        assert storage.count_records(PERSON) == 3
        assert storage.count_records(CASE) == 2
        assert storage.count_records("vehicle") == 0

    def test_concurrent_batches_all_land(self, storage: RecordStore) -> None:
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

    def test_an_erased_record_leaves_no_key_payload_or_token_to_find(
        self, storage: RecordStore
    ) -> None:
        batch = [sealed(n) for n in range(6)] + [sealed(6, record_type=CASE)]
        storage.write_batch(batch)
        gone = batch[2]
        assert storage.erase_records([gone.record_id, "rec-unknown", gone.record_id]) == 1
        assert storage.get_records([gone.record_id]) == {}
        for index_id, token in gone.tokens:
            assert gone.record_id not in storage.find(index_id, token, 100)
            assert all(
                r.record_id != gone.record_id for r in storage.find_records(index_id, token, 100)
            )
        assert storage.count_records() == 6
        assert storage.count_records(PERSON) == 5
        listed = {rid for _, rid, _ in storage.record_tokens(0, 100)}
        assert listed == {r.record_id for r in batch} - {gone.record_id}
        # The others keep everything, including tokens shared with the erased record.
        kept = batch[3]
        assert storage.get_records([kept.record_id]) == {kept.record_id: stored(kept)}
        shared = gone.tokens[1]
        assert storage.find(*shared, 100) == sorted(
            r.record_id for r in batch if shared in r.tokens and r is not gone
        )
        assert storage.erase_records([gone.record_id]) == 0
        assert storage.erase_records([]) == 0
        # Erased ids may be stored again (a new ingest of the same person is a new record).
        storage.write_batch([gone])
        assert storage.get_records([gone.record_id]) == {gone.record_id: stored(gone)}
