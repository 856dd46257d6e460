"""The MetaStore contract: non-personal vault metadata, stored and replaced. A backend's
test class subclasses MetaStoreContract and provides make_storage, a factory of empty stores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from custodes.errors import StorageError
from custodes.storage import MetaStore
from tests.contract import close_backend


class MetaStoreContract:
    """Every documented behaviour of the MetaStore Protocol."""

    @pytest.fixture
    def make_storage(self) -> Callable[[], MetaStore]:
        raise NotImplementedError("a backend's test class provides make_storage")

    @pytest.fixture
    def storage(self, make_storage: Callable[[], MetaStore]) -> Iterator[MetaStore]:
        backend = make_storage()
        yield backend
        close_backend(backend)

    def test_backend_is_a_meta_store(self, storage: MetaStore) -> None:
        assert isinstance(storage, MetaStore)

    def test_meta_round_trip(self, storage: MetaStore) -> None:
        assert storage.get_meta("vault.id") is None
        storage.set_meta("vault.id", b"\x00\x01vault")
        storage.set_meta("empty", b"")
        assert storage.get_meta("vault.id") == b"\x00\x01vault"
        assert storage.get_meta("empty") == b""

    def test_meta_overwrite_replaces_the_value(self, storage: MetaStore) -> None:
        storage.set_meta("kek.current", b"1")
        storage.set_meta("kek.current", b"2")
        assert storage.get_meta("kek.current") == b"2"

    def test_meta_value_must_be_bytes(self, storage: MetaStore) -> None:
        with pytest.raises(StorageError):
            storage.set_meta("kek.current", "2")  # type: ignore[arg-type]
        assert storage.get_meta("kek.current") is None
