"""The AlertStore contract: alerts raised on officials' use of the vault, stored once,
acted on by compare-and-swap, listed newest first. A backend's test class subclasses
AlertStoreContract and provides make_storage, a factory of empty stores.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from custodes.errors import StorageError
from custodes.storage import AlertRow, AlertStore
from tests.contract import close_backend

T0 = 1_767_225_600.25  # 2026-01-01 00:00:00.25 UTC


def alert(n: int, body: bytes = b'{"state":"open"}', at: float | None = None) -> AlertRow:
    return AlertRow(f"alert-{n:04d}", T0 + n if at is None else at, body)


class AlertStoreContract:
    """Every documented behaviour of the AlertStore Protocol."""

    @pytest.fixture
    def make_storage(self) -> Callable[[], AlertStore]:
        raise NotImplementedError("a backend's test class provides make_storage")

    @pytest.fixture
    def storage(self, make_storage: Callable[[], AlertStore]) -> Iterator[AlertStore]:
        backend = make_storage()
        yield backend
        close_backend(backend)

    def test_backend_is_an_alert_store(self, storage: AlertStore) -> None:
        assert isinstance(storage, AlertStore)

    def test_an_alert_is_stored_once_and_read_back_as_written(self, storage: AlertStore) -> None:
        assert storage.get_alert("alert-0001") is None
        assert storage.put_alert(alert(1)) is True
        assert storage.get_alert("alert-0001") == alert(1)
        # The same id again changes nothing, whatever it carries.
        assert storage.put_alert(alert(1, b'{"state":"resolved"}')) is False
        assert storage.get_alert("alert-0001") == alert(1)

    def test_alerts_are_listed_newest_first_up_to_the_limit(self, storage: AlertStore) -> None:
        for n in (3, 1, 4, 2):
            storage.put_alert(alert(n))
        # Two raised at the same moment come by id, the later id first.
        storage.put_alert(AlertRow("alert-0005b", T0 + 4, b"{}"))
        listed = [row.alert_id for row in storage.list_alerts(10)]
        assert listed == ["alert-0005b", "alert-0004", "alert-0003", "alert-0002", "alert-0001"]
        assert [row.alert_id for row in storage.list_alerts(2)] == ["alert-0005b", "alert-0004"]
        assert storage.list_alerts(0) == []

    def test_replace_takes_effect_only_on_the_row_expected(self, storage: AlertStore) -> None:
        storage.put_alert(alert(1))
        acked = alert(1, b'{"state":"acknowledged"}')
        assert storage.replace_alert(alert(1), acked) is True
        assert storage.get_alert("alert-0001") == acked
        # A step taken on the row as it was before loses: it must read again.
        assert storage.replace_alert(alert(1), alert(1, b'{"state":"resolved"}')) is False
        assert storage.get_alert("alert-0001") == acked
        assert storage.replace_alert(alert(9), alert(9)) is False
        assert storage.get_alert("alert-0009") is None

    def test_an_alert_is_replaced_only_by_one_of_its_own_id(self, storage: AlertStore) -> None:
        storage.put_alert(alert(1))
        with pytest.raises(StorageError):
            storage.replace_alert(alert(1), alert(2))

    def test_bad_rows_are_refused(self, storage: AlertStore) -> None:
        with pytest.raises(StorageError):
            storage.put_alert(AlertRow("", T0, b"{}"))
        with pytest.raises(StorageError):
            storage.put_alert(AlertRow("a" * 65, T0, b"{}"))
        with pytest.raises(StorageError):
            storage.put_alert(AlertRow("alert-x", T0, "text"))  # type: ignore[arg-type]

    def test_concurrent_steps_on_one_alert_never_both_win(self, storage: AlertStore) -> None:
        storage.put_alert(alert(1))
        wins: list[bytes] = []
        start = threading.Barrier(8)

        def step(n: int) -> None:
            start.wait()
            body = b'{"by":"%d"}' % n
            if storage.replace_alert(alert(1), alert(1, body)):
                wins.append(body)

        threads = [threading.Thread(target=step, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1
        stored = storage.get_alert("alert-0001")
        assert stored is not None and stored.body == wins[0]
