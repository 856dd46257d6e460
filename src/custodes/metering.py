"""Charging officials' budgets without a storage round trip on every read.

Every read an official is shown is charged to counters in the vault's storage, shared by
every server process and kept across restarts (storage.base.UsageStore). Waiting on that
write for each read cost a lookup a sixth of its throughput, so the meter charges
write-behind: a process keeps its own charges for a few hundredths of a second and sends
them in one call, and judges each read on what it last heard from storage plus what it
has charged since. It charges synchronously, and judges on storage's own answer, when
that view could be wrong where it matters:

- the first read of an account in a window (a new minute, hour or day, a restarted
  process): the process knows nothing of the account's total yet;
- any read that brings a counter past NEAR of its limit: near a limit, the reads of the
  account's other sessions in other processes must be counted before the next is
  answered.

So an account within half its budget is metered in memory, and one near its limit is
metered exactly. What other processes charged in the last interval can be missed only
below that half: k processes serving one account at once let it see at most about
k × NEAR of a limit before every read is charged in storage, a bound the budgets leave
room for. A crash loses at most the interval's charges, as the counters' unsynced writes
already may (the access log, synced, keeps every read).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from custodes.errors import CustodesError
from custodes.storage.base import UsageStore

logger = logging.getLogger("custodes.metering")

# How often a process sends the charges it holds.
FLUSH_EVERY = 0.05
# The share of a limit from which every read is charged in storage before it is judged.
NEAR = 0.5

_Key = tuple[str, str]  # (account, counter)


class _Window:
    """A counter's amount in one window: (window start, amount), and for a counter of
    distinct subjects, the subjects that make up the amount."""

    __slots__ = ("amount", "start", "subjects")

    def __init__(self, start: int, amount: int, subjects: Sequence[str] = ()) -> None:
        self.start = start
        self.amount = amount
        self.subjects = list(subjects)

    def add(self, start: int, amount: int, subjects: Sequence[str] = ()) -> None:
        # As storage does: a later window starts again, an earlier one adds to this one.
        if start > self.start:
            self.start, self.amount, self.subjects = start, amount, list(subjects)
        else:
            self.amount += amount
            self.subjects += subjects

    def copy(self) -> _Window:
        return _Window(self.start, self.amount, self.subjects)

    def at(self, start: int) -> int:
        return self.amount if self.start == start else 0


def _merge(batch: dict[str, _Window], key: str, window: _Window) -> None:
    if key in batch:
        batch[key].add(window.start, window.amount, window.subjects)
    else:
        batch[key] = window.copy()


class UsageMeter:
    """The account counters of one process: held briefly, sent in one call, read as
    storage last answered plus what is held and on its way."""

    def __init__(
        self, store: UsageStore, *, flush_every: float = FLUSH_EVERY, near: float = NEAR
    ) -> None:
        self._store = store
        self._flush_every = flush_every
        self._near = near
        self._lock = threading.Lock()
        self._known: dict[_Key, _Window] = {}  # storage's last total per counter
        self._pending: dict[str, dict[str, _Window]] = {}  # not sent yet, by account
        self._sent: dict[_Key, _Window] = {}  # sent, not answered yet
        # The subjects this process has counted in a counter's current window.
        self._seen: dict[_Key, tuple[int, set[str]]] = {}
        self._wake = threading.Event()
        self._closed = False
        self._flusher: threading.Thread | None = None

    def __repr__(self) -> str:
        return "UsageMeter()"

    def charge(
        self,
        account: str,
        rows: Sequence[tuple[str, int, int]],
        limits: Sequence[int],
        *,
        distinct: str | None = None,
        subjects: Sequence[str] = (),
    ) -> list[int]:
        """Charge (counter, window start, amount) rows to the account; the totals after,
        in the rows' order, each judged against its limit in `limits` by the caller. The
        row of counter `distinct`, if any, counts `subjects` (record ids) not counted
        yet in its window, whatever its amount says."""
        with self._lock:
            windows = [
                self._counted(account, key, start, subjects)
                if key == distinct
                else _Window(start, amount)
                for key, start, amount in rows
            ]
            views = [
                self._view(account, key, w.start) + w.amount
                for (key, _, _), w in zip(rows, windows, strict=True)
            ]
            exact = any(
                (known := self._known.get((account, key))) is None
                or known.start < start
                or total > limit * self._near
                for (key, start, _), total, limit in zip(rows, views, limits, strict=True)
            )
            if not exact and not self._closed:
                held = self._pending.setdefault(account, {})
                for (key, _, _), window in zip(rows, windows, strict=True):
                    _merge(held, key, window)
                self._start_flusher()
                return views
            # Sent now together with whatever the account has held back, in one call.
            earlier = self._take(account)
            batch = {key: w.copy() for key, w in earlier.items()}
            for (key, _, _), window in zip(rows, windows, strict=True):
                _merge(batch, key, window)
            self._mark_sent(account, batch)
        try:
            self._send(account, batch, distinct)
        except CustodesError:
            # This read fails and is charged nothing; what was held before it is kept.
            self._hold(account, earlier)
            raise
        with self._lock:
            return [self._view(account, key, start) for key, start, _ in rows]

    def flush(self) -> None:
        """Send every charge held, now."""
        with self._lock:
            accounts = list(self._pending)
            batches = [(account, self._take(account)) for account in accounts]
            for account, batch in batches:
                self._mark_sent(account, batch)
        for account, batch in batches:
            try:
                self._send(account, batch, None)
            except CustodesError as exc:
                logger.error(
                    "usage of account %s was not charged (%s); kept to charge again",
                    account,
                    type(exc).__name__,
                )
                self._hold(account, batch)

    def close(self) -> None:
        """Send what is held and stop sending: a closing vault loses no charge."""
        with self._lock:
            self._closed = True
        self._wake.set()
        if self._flusher is not None:
            self._flusher.join(5.0)
        self.flush()

    # -- internals (under the lock, except _send and _run) -------------------------------

    def _view(self, account: str, key: str, start: int) -> int:
        total = 0
        known = self._known.get((account, key))
        if known is not None:
            total += known.at(start)
        held = self._pending.get(account, {}).get(key)
        if held is not None:
            total += held.at(start)
        sent = self._sent.get((account, key))
        if sent is not None:
            total += sent.at(start)
        return total

    def _hold(self, account: str, batch: dict[str, _Window]) -> None:
        """Put charges that could not be sent back among those held (takes the lock)."""
        with self._lock:
            held = self._pending.setdefault(account, {})
            for key, window in batch.items():
                _merge(held, key, window)

    def _counted(self, account: str, key: str, start: int, subjects: Sequence[str]) -> _Window:
        """The subjects of a read not counted yet in this process, in this window."""
        at, seen = self._seen.get((account, key), (start, set()))
        if at != start:
            if at > start:
                return _Window(start, 0)  # a late read of a past window adds nothing
            seen = set()
        new = [s for s in dict.fromkeys(subjects) if s not in seen]
        seen.update(new)
        self._seen[(account, key)] = (start, seen)
        return _Window(start, len(new), new)

    def _take(self, account: str) -> dict[str, _Window]:
        return self._pending.pop(account, {})

    def _mark_sent(self, account: str, batch: dict[str, _Window]) -> None:
        for key, window in batch.items():
            sent = self._sent.get((account, key))
            if sent is None:
                self._sent[(account, key)] = _Window(window.start, window.amount)
            else:
                sent.add(window.start, window.amount)

    def _send(
        self, account: str, batch: dict[str, _Window], distinct: str | None
    ) -> dict[str, int]:
        """Charge a batch in storage; storage's totals, which now include it. A counter
        of distinct subjects (`distinct`, or one whose window holds subjects) is noted
        subject by subject, so that storage counts each once across processes."""
        counted = {k: w for k, w in batch.items() if k == distinct or w.subjects}
        rows = [(key, w.start, w.amount) for key, w in batch.items() if key not in counted]
        try:
            totals = list(self._store.charge_usage(account, rows)) if rows else []
            for key, window in counted.items():
                total = self._store.note_subjects(account, key, window.start, window.subjects)
                rows.append((key, window.start, window.amount))
                totals.append(total)
        finally:
            with self._lock:
                for key, window in batch.items():
                    sent = self._sent.get((account, key))
                    if sent is not None and sent.start == window.start:
                        sent.amount -= window.amount
                        if sent.amount <= 0:
                            del self._sent[(account, key)]
        answered: dict[str, int] = {}
        with self._lock:
            for (key, start, _), total in zip(rows, totals, strict=True):
                known = self._known.get((account, key))
                # Answers to two calls may arrive out of order: a total only grows
                # within a window, and a later window replaces an earlier one.
                if known is None or start > known.start:
                    self._known[(account, key)] = _Window(start, total)
                elif start == known.start:
                    known.amount = max(known.amount, total)
                answered[key] = total
        return answered

    def _start_flusher(self) -> None:
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(
                target=self._run, name="custodes-usage-meter", daemon=True
            )
            self._flusher.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._flush_every)
            with self._lock:
                closed = self._closed
            if closed:
                return
            self.flush()
