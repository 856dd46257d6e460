"""The usage meter: budgets charged write-behind, exactly where it matters.

Far from a limit a process holds its charges and sends them in one call; the first read
of a window and every read past half a limit are charged in storage before they are
judged, so that one process stops an account at exactly its limit and several stop it
within a bounded margin; nothing held is lost on close, and a failed charge fails its
read without losing what was held before it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from custodes.errors import StorageError
from custodes.metering import NEAR, UsageMeter
from custodes.storage import MemoryStorage

T0 = 1_767_225_600
LIMIT = 40


class CountingStore:
    """A real store, counting the calls that reach it; can be made to fail."""

    def __init__(self) -> None:
        self.store = MemoryStorage()
        self.calls = 0
        self.failing = False

    def charge_usage(self, account: str, charges: Sequence[tuple[str, int, int]]) -> list[int]:
        self.calls += 1
        if self.failing:
            raise StorageError("usage was not charged: the database is away")
        return self.store.charge_usage(account, charges)

    def stored(self, account: str, key: str = "views/60", start: int = T0) -> int:
        return self.store.charge_usage(account, [(key, start, 0)])[0]


def charge(meter: UsageMeter, account: str = "clerk", start: int = T0) -> int:
    [total] = meter.charge(account, [("views/60", start, 1)], [LIMIT])
    return total


def test_one_process_stops_an_account_at_exactly_its_limit_with_few_round_trips() -> None:
    store = CountingStore()
    meter = UsageMeter(store, flush_every=3600)  # no timed flush during the test
    totals = [charge(meter) for _ in range(LIMIT + 1)]
    assert totals == list(range(1, LIMIT + 2))  # the read past the limit sees it
    # The first read of the window and every read past half the limit went to storage;
    # the ones between were held.
    assert store.calls == 1 + (LIMIT + 1 - int(LIMIT * NEAR))
    assert store.stored("clerk") == LIMIT + 1
    meter.close()


def test_held_charges_reach_storage_on_the_timer_and_on_close() -> None:
    store = CountingStore()
    meter = UsageMeter(store, flush_every=0.01)
    for _ in range(5):
        charge(meter)
    deadline = time.monotonic() + 5
    while store.stored("clerk") < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.stored("clerk") == 5
    closing = UsageMeter(store, flush_every=3600)
    for _ in range(3):
        charge(closing)
    assert store.stored("clerk") == 6  # the first went at once, two are held
    closing.close()
    assert store.stored("clerk") == 8
    meter.close()
    # A new window is judged on storage's answer, not on the last window's count.
    again = UsageMeter(store, flush_every=3600)
    assert charge(again, start=T0 + 60) == 1
    again.close()


def test_two_processes_stop_an_account_within_a_bounded_margin() -> None:
    store = CountingStore()
    meters = [UsageMeter(store, flush_every=3600), UsageMeter(store, flush_every=3600)]
    answered = 0
    for n in range(10 * LIMIT):
        if charge(meters[n % 2]) > LIMIT:
            break
        answered += 1
    assert LIMIT * NEAR < answered <= LIMIT * (1 + NEAR)
    for meter in meters:
        meter.close()


def test_a_failed_charge_fails_its_read_and_keeps_what_was_held() -> None:
    store = CountingStore()
    meter = UsageMeter(store, flush_every=3600)
    for _ in range(3):
        charge(meter)  # the first sent, two held
    store.failing = True
    with pytest.raises(StorageError):
        for _ in range(LIMIT):
            charge(meter)  # past half the limit, a charge must reach storage
    store.failing = False
    meter.close()
    # Everything answered was charged; the read that failed was not.
    assert store.stored("clerk") == int(LIMIT * NEAR)


def test_accounts_are_metered_apart() -> None:
    store = CountingStore()
    meter = UsageMeter(store, flush_every=3600)
    for _ in range(3):
        charge(meter, "a")
    assert charge(meter, "b") == 1
    meter.close()
    assert (store.stored("a"), store.stored("b")) == (3, 1)
