"""The UsageStore contract: counters of what each official has been shown, charged
atomically and shared by every process (custodes.policy.budgets). A backend's test class
subclasses UsageStoreContract and provides make_storage, a factory of empty stores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from custodes.errors import StorageError
from custodes.storage import UsageStore
from tests.contract import close_backend

HOUR = 3600
T0 = 1_767_225_600  # 2026-01-01 00:00 UTC


class UsageStoreContract:
    """Every documented behaviour of the UsageStore Protocol."""

    @pytest.fixture
    def make_storage(self) -> Callable[[], UsageStore]:
        raise NotImplementedError("a backend's test class provides make_storage")

    @pytest.fixture
    def storage(self, make_storage: Callable[[], UsageStore]) -> Iterator[UsageStore]:
        backend = make_storage()
        yield backend
        close_backend(backend)

    def test_backend_is_a_usage_store(self, storage: UsageStore) -> None:
        assert isinstance(storage, UsageStore)

    def test_charges_add_up_per_account_and_counter(self, storage: UsageStore) -> None:
        assert storage.charge_usage("clerk.a", [("views/3600", T0, 2), ("misses/3600", T0, 1)]) == [
            2,
            1,
        ]
        assert storage.charge_usage("clerk.a", [("views/3600", T0, 3)]) == [5]
        assert storage.charge_usage("clerk.b", [("views/3600", T0, 1)]) == [1]
        assert storage.charge_usage("clerk.a", [("misses/3600", T0, 1), ("views/3600", T0, 0)]) == [
            2,
            5,
        ]

    def test_a_new_window_starts_again_and_an_older_one_adds_to_the_stored(
        self, storage: UsageStore
    ) -> None:
        storage.charge_usage("clerk.a", [("views/3600", T0, 7)])
        assert storage.charge_usage("clerk.a", [("views/3600", T0 + HOUR, 2)]) == [2]
        # A process whose clock is behind charges the window before: it is not lost, and
        # it does not start the counter again.
        assert storage.charge_usage("clerk.a", [("views/3600", T0, 1)]) == [3]
        assert storage.charge_usage("clerk.a", [("views/3600", T0 + HOUR, 1)]) == [4]

    def test_nothing_charged_reads_nothing(self, storage: UsageStore) -> None:
        assert storage.charge_usage("clerk.a", []) == []

    def test_concurrent_charges_are_all_counted(self, storage: UsageStore) -> None:
        errors: list[BaseException] = []

        def charge() -> None:
            try:
                for _ in range(25):
                    storage.charge_usage("clerk.a", [("views/60", T0, 1), ("views/3600", T0, 1)])
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=charge) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert storage.charge_usage("clerk.a", [("views/60", T0, 0), ("views/3600", T0, 0)]) == [
            100,
            100,
        ]

    def test_a_charge_that_is_no_counter_is_refused(self, storage: UsageStore) -> None:
        with pytest.raises((StorageError, ValueError)):
            storage.charge_usage("clerk.a", [("views/3600", T0, -1)])
        with pytest.raises((StorageError, ValueError)):
            storage.charge_usage("clerk.a", [("views/3600", T0, 1), ("views/3600", T0, 1)])

    def test_distinct_subjects_count_once_per_window(self, storage: UsageStore) -> None:
        day = 86_400
        assert storage.note_subjects("clerk.a", "subjects/86400", T0, ["r1", "r2", "r1"]) == 2
        assert storage.note_subjects("clerk.a", "subjects/86400", T0, ["r2", "r3"]) == 3
        assert storage.note_subjects("clerk.a", "subjects/86400", T0, []) == 3
        # Another account's notes are its own.
        assert storage.note_subjects("clerk.b", "subjects/86400", T0, ["r1"]) == 1
        # A new window counts every subject again, from nothing.
        assert storage.note_subjects("clerk.a", "subjects/86400", T0 + day, ["r1"]) == 1
        assert storage.note_subjects("clerk.a", "subjects/86400", T0 + day, ["r2", "r1"]) == 2
        # The counter is one of the account's usage counters like any other.
        assert storage.charge_usage("clerk.a", [("subjects/86400", T0 + day, 0)]) == [2]

    def test_subjects_noted_at_once_are_counted_once(self, storage: UsageStore) -> None:
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def note(lane: int) -> None:
            try:
                start.wait()
                for n in range(20):
                    # Every lane notes the same 30 subjects, in its own order.
                    ids = [f"r{(n * 7 + lane + k) % 30}" for k in range(3)]
                    storage.note_subjects("clerk.a", "subjects/86400", T0, ids)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=note, args=(lane,)) for lane in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert storage.note_subjects("clerk.a", "subjects/86400", T0, []) == 30

    def test_noted_subjects_are_record_ids(self, storage: UsageStore) -> None:
        with pytest.raises((StorageError, ValueError)):
            storage.note_subjects("clerk.a", "subjects/86400", T0, "r1")
        with pytest.raises((StorageError, ValueError)):
            storage.note_subjects("clerk.a", "subjects/86400", T0, [1])  # type: ignore[list-item]
