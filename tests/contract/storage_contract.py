"""The whole Storage contract: every concern's suite at once, and what only a whole
backend promises (closed, it refuses everything). A backend's test class subclasses
StorageContract and provides make_storage, a factory of fresh, empty backends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from custodes.errors import AuditUnavailable, StorageError
from custodes.storage import Storage
from tests.contract.accounts_contract import AccountStoreContract
from tests.contract.alerts_contract import AlertStoreContract
from tests.contract.log_contract import LogStoreContract, log_batch
from tests.contract.meta_contract import MetaStoreContract
from tests.contract.records_contract import RecordStoreContract, sealed
from tests.contract.usage_contract import UsageStoreContract


class StorageContract(
    RecordStoreContract,
    AccountStoreContract,
    LogStoreContract,
    MetaStoreContract,
    UsageStoreContract,
    AlertStoreContract,
):
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
