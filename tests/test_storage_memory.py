"""MemoryStorage runs the full storage contract."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from custodes.storage import MemoryStorage, Storage
from tests.contract.storage_contract import StorageContract


class TestMemory(StorageContract):
    @pytest.fixture
    def make_storage(self) -> Callable[[], Storage]:
        return MemoryStorage
