"""The AccountStore contract: accounts, sessions, login failures and one-time marks, as
every process serving a vault shares them. A backend's test class subclasses
AccountStoreContract and provides make_storage, a factory of empty stores.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from custodes.errors import ConfigurationError, RecordNotFound, StorageError
from custodes.storage import AccountRow, AccountStore, SessionRow
from tests.contract import close_backend


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


class AccountStoreContract:
    """Every documented behaviour of the AccountStore Protocol."""

    @pytest.fixture
    def make_storage(self) -> Callable[[], AccountStore]:
        raise NotImplementedError("a backend's test class provides make_storage")

    @pytest.fixture
    def storage(self, make_storage: Callable[[], AccountStore]) -> Iterator[AccountStore]:
        backend = make_storage()
        yield backend
        close_backend(backend)

    def test_backend_is_an_account_store(self, storage: AccountStore) -> None:
        assert isinstance(storage, AccountStore)

    def test_account_round_trip(self, storage: AccountStore) -> None:
        row = account()
        storage.add_account(row)
        assert storage.get_account(row.username) == row
        assert storage.get_account("nobody") is None

    def test_duplicate_account_is_refused(self, storage: AccountStore) -> None:
        storage.add_account(account())
        with pytest.raises(ConfigurationError):
            storage.add_account(account(role="administrator"))
        assert storage.get_account("inspector.ode") == account()

    def test_update_account_replaces_it(self, storage: AccountStore) -> None:
        storage.add_account(account())
        changed = account(role="supervisor", disabled=True, attributes=b"{}")
        storage.update_account(changed)
        assert storage.get_account("inspector.ode") == changed

    def test_replace_account_swaps_only_the_row_it_was_given(self, storage: AccountStore) -> None:
        storage.add_account(account())
        first = account(attributes=b'{"district": "north", "failures": 1}')
        assert storage.replace_account(account(), first)
        # A writer that read the row before the first change loses, and changes nothing.
        stale = account(attributes=b'{"district": "north", "failures": 1, "x": 0}')
        assert not storage.replace_account(account(), stale)
        assert storage.get_account("inspector.ode") == first
        assert not storage.replace_account(account("nobody"), account("nobody"))
        assert storage.get_account("nobody") is None
        with pytest.raises(ConfigurationError):
            storage.replace_account(first, account("someone.else"))

    def test_racing_replacements_of_one_account_lose_no_change(self, storage: AccountStore) -> None:
        # Eight writers each add one to a count by read, change, compare-and-swap, retrying
        # when they lose: every one of their changes is in the final row.
        storage.add_account(account(attributes=b"0"))

        def add_one() -> None:
            while True:
                row = storage.get_account("inspector.ode")
                assert row is not None
                bumped = row._replace(attributes=str(int(row.attributes) + 1).encode())
                if storage.replace_account(row, bumped):
                    return

        threads = [threading.Thread(target=add_one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stored = storage.get_account("inspector.ode")
        assert stored is not None and stored.attributes == b"8"

    def test_update_of_missing_account_is_refused(self, storage: AccountStore) -> None:
        with pytest.raises(RecordNotFound):
            storage.update_account(account())
        assert storage.get_account("inspector.ode") is None

    def test_list_accounts(self, storage: AccountStore) -> None:
        assert storage.list_accounts() == []
        rows = [account("clerk.b"), account("auditor.a"), account("officer.c", disabled=True)]
        for row in rows:
            storage.add_account(row)
        listed = storage.list_accounts()
        assert sorted(listed) == sorted(rows)

    def test_session_round_trip(self, storage: AccountStore) -> None:
        row = session_row(b"a")
        storage.put_session(row)
        assert storage.get_session(row.key) == row
        assert storage.get_session(session_key(b"b")) is None
        assert storage.count_sessions() == 1

    def test_a_session_is_read_with_its_account_in_one_go(self, storage: AccountStore) -> None:
        holder = account("inspector.ode", disabled=True)
        storage.add_account(holder)
        with_account, orphan = session_row(b"a"), session_row(b"b", username="gone.away")
        storage.put_session(with_account)
        storage.put_session(orphan)
        assert storage.get_session_account(with_account.key) == (with_account, holder)
        # A session whose account is gone (a restored copy, a fault) comes back alone.
        assert storage.get_session_account(orphan.key) == (orphan, None)
        assert storage.get_session_account(session_key(b"c")) is None

    def test_sessions_are_counted_per_account(self, storage: AccountStore) -> None:
        assert storage.count_account_sessions("inspector.ode") == 0
        storage.put_session(session_row(b"a"))
        storage.put_session(session_row(b"b"))
        storage.put_session(session_row(b"c", username="inspector.other"))
        assert storage.count_account_sessions("inspector.ode") == 2
        storage.end_session(session_key(b"a"))
        assert storage.count_account_sessions("inspector.ode") == 1
        assert storage.count_account_sessions("nobody") == 0

    def test_a_session_key_is_stored_once(self, storage: AccountStore) -> None:
        storage.put_session(session_row(b"a"))
        with pytest.raises(ConfigurationError):
            storage.put_session(session_row(b"a", username="inspector.other"))
        stored = storage.get_session(session_key(b"a"))
        assert stored is not None and stored.username == "inspector.ode"

    def test_session_key_must_be_a_hash(self, storage: AccountStore) -> None:
        with pytest.raises(StorageError):
            storage.put_session(session_row(b"a")._replace(key=b"short"))
        assert storage.count_sessions() == 0

    def test_list_sessions_by_account(self, storage: AccountStore) -> None:
        rows = [session_row(b"b", username="zhao"), session_row(b"a"), session_row(b"c")]
        for row in rows:
            storage.put_session(row)
        listed = storage.list_sessions()
        assert [r.username for r in listed] == ["inspector.ode", "inspector.ode", "zhao"]
        assert sorted(listed) == sorted(rows)

    def test_touch_moves_last_seen_forward_only(self, storage: AccountStore) -> None:
        row = session_row(b"a", last_seen=100.0)
        storage.put_session(row)
        storage.touch_session(row.key, 160.0)
        storage.touch_session(row.key, 130.0)
        storage.touch_session(session_key(b"gone"), 500.0)
        stored = storage.get_session(row.key)
        assert stored is not None and stored.last_seen == 160.0

    def test_end_one_session_or_all_of_an_account(self, storage: AccountStore) -> None:
        for name, user in ((b"a", "inspector.ode"), (b"b", "inspector.ode"), (b"c", "other")):
            storage.put_session(session_row(name, username=user))
        assert storage.end_session(session_key(b"c")) is True
        assert storage.end_session(session_key(b"c")) is False
        assert storage.end_sessions("inspector.ode") == 2
        assert storage.end_sessions("inspector.ode") == 0
        assert storage.count_sessions() == 0

    def test_purge_removes_expired_and_idle_sessions_only(self, storage: AccountStore) -> None:
        storage.put_session(session_row(b"live", last_seen=950.0, expires=2000.0))
        storage.put_session(session_row(b"expired", last_seen=990.0, expires=1000.0))
        storage.put_session(session_row(b"idle", last_seen=100.0, expires=2000.0))
        assert storage.purge_sessions(1000.0, idle=600.0) == 2
        assert storage.get_session(session_key(b"live")) is not None
        assert storage.count_sessions() == 1

    def test_a_one_time_mark_is_spent_once_until_it_lapses(self, storage: AccountStore) -> None:
        key = session_key(b"challenge")
        assert storage.spend(key, 100.0, keep=60.0) is True
        assert storage.spend(key, 130.0, keep=60.0) is False
        assert storage.spend(session_key(b"other"), 130.0, keep=60.0) is True
        # Forgotten once its time is past, as the value it guards has lapsed by then.
        assert storage.spend(key, 161.0, keep=60.0) is True
        with pytest.raises(StorageError):
            storage.spend(b"short", 1.0, keep=60.0)

    def test_racing_spends_of_one_mark_let_one_through(self, storage: AccountStore) -> None:
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

    def test_login_attempts_count_per_key(self, storage: AccountStore) -> None:
        def always(_: object) -> bool:
            return True

        assert storage.admit_login_attempt(["account:ode"], 10.0, always)
        assert storage.admit_login_attempt(["account:ode", "client:192.0.2.7"], 12.0, always)
        assert storage.login_failures(["account:ode", "client:192.0.2.7", "none"]) == {
            "account:ode": (2, 12.0),
            "client:192.0.2.7": (1, 12.0),
        }
        storage.forgive_login_attempt("account:ode")
        assert storage.login_failures(["account:ode"]) == {"account:ode": (1, 12.0)}
        storage.forgive_login_attempt("client:192.0.2.7")
        storage.forgive_login_attempt("client:192.0.2.7")
        storage.forgive_login_attempt("never.counted")
        assert storage.login_failures(["client:192.0.2.7", "never.counted"]) == {}
        assert storage.admit_login_attempt(["client:192.0.2.7"], 11.0, always)
        storage.clear_login_failures("account:ode")
        assert storage.login_failures(["account:ode"]) == {}
        assert storage.purge_login_failures(before=11.5) == 1
        assert storage.login_failures(["client:192.0.2.7"]) == {}
        assert storage.login_failures([]) == {}

    def test_a_refused_login_attempt_is_not_counted(self, storage: AccountStore) -> None:
        seen: list[dict[str, tuple[int, float]]] = []

        def at_most_two(counts: Any) -> bool:
            seen.append(dict(counts))
            return all(n < 2 for n, _ in counts.values())

        keys = ["account:ode", "client:192.0.2.7"]
        assert storage.admit_login_attempt(keys, 1.0, at_most_two)
        assert storage.admit_login_attempt(keys, 2.0, at_most_two)
        assert not storage.admit_login_attempt(keys, 3.0, at_most_two)
        assert seen[0] == {}
        assert seen[2] == {"account:ode": (2, 2.0), "client:192.0.2.7": (2, 2.0)}
        assert storage.login_failures(keys)["account:ode"] == (2, 2.0)

    def test_racing_login_attempts_are_admitted_one_count_at_a_time(
        self, storage: AccountStore
    ) -> None:
        # Forty attempts at once against a limit of three: exactly three are admitted,
        # however the threads interleave.
        admitted: list[bool] = []

        def below_three(counts: Any) -> bool:
            return all(n < 3 for n, _ in counts.values())

        def attempt() -> None:
            admitted.append(storage.admit_login_attempt(["account:ode"], 5.0, below_three))

        threads = [threading.Thread(target=attempt) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(admitted) == [False] * 37 + [True] * 3
        assert storage.login_failures(["account:ode"]) == {"account:ode": (3, 5.0)}
