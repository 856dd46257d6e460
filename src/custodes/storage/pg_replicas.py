"""Reads of records and tokens from PostgreSQL streaming replicas, within a lag bound.

ReplicaRouter owns a pool per replica and one watch thread that, every few hundred
milliseconds, samples the primary's WAL position and each replica's replay position. A
replica serves a read only while it has replayed everything the primary had written at
some moment less than the bound ago, and after this process's last write of records:
a replica that lags, is down, was promoted or belongs to another cluster is passed over,
and the read goes to the primary. The choice never rests on a clock of the database's:
the positions are compared, and the times are this process's own monotonic clock.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg_pool import ConnectionPool

_T = TypeVar("_T")
_Connection = psycopg.Connection[tuple[Any, ...]]

log = logging.getLogger("custodes.storage")

# The watch samples at a quarter of the bound, within these limits: often enough that a
# caught-up replica is found again soon after a write, rarely enough to cost nothing.
_FASTEST_WATCH = 0.1
_SLOWEST_WATCH = 0.5
# A replica read waits at most this long for a pooled connection before the primary
# takes the read instead.
_REPLICA_CHECKOUT = 0.5
# With the cluster's system identifier: a replica of another cluster has WAL positions
# that mean nothing here, and is never read from.
_PRIMARY_POSITION = (
    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8,"
    " (SELECT system_identifier FROM pg_control_system())"
)
_REPLAY_POSITION = (
    "SELECT pg_is_in_recovery(), pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::int8,"
    " (SELECT system_identifier FROM pg_control_system())"
)


@dataclass(frozen=True, slots=True)
class ReadRouting:
    """How many reads of records and tokens each side served, since the storage opened."""

    replica: int
    primary: int


@dataclass(slots=True)
class _Replica:
    number: int  # its place in the configured list, from 1: logs name it by this alone
    dsn: str
    pool: ConnectionPool[_Connection]
    watch: _Connection | None = None
    # The latest time (monotonic) at which the primary's WAL position was one this
    # replica has since replayed; None while it has not been seen caught up to any.
    caught_up_at: float | None = None
    # Set by a failed read: no read goes there again until the watch reaches it afresh.
    failed: bool = False
    foreign: bool = False  # a standby of another cluster, last the watch looked


class ReplicaRouter:
    """The replicas one PostgresStorage may read from, and the rule that picks one."""

    def __init__(
        self,
        primary_dsn: str,
        replica_dsns: tuple[str, ...],
        *,
        max_lag: float,
        max_size: int,
        connect_timeout: float,
        configure: Callable[[_Connection], None],
    ) -> None:
        self._primary_dsn = primary_dsn
        self._max_lag = max_lag
        self._interval = min(max(max_lag / 4, _FASTEST_WATCH), _SLOWEST_WATCH)
        self._connect_timeout = max(1, int(min(connect_timeout, 3.0)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fence = time.monotonic()
        self._primary_watch: _Connection | None = None
        self._system: int | None = None  # the primary cluster's system identifier
        # (monotonic time, primary WAL position) of each round of the watch, oldest first.
        self._samples: deque[tuple[float, int]] = deque()
        self._served_replica = 0
        self._served_primary = 0
        self._turn = itertools.count()
        self._replicas = [
            _Replica(
                number,
                dsn,
                ConnectionPool(
                    dsn,
                    min_size=0,
                    max_size=max_size,
                    open=False,
                    kwargs={"autocommit": True, "connect_timeout": self._connect_timeout},
                    configure=configure,
                    timeout=_REPLICA_CHECKOUT,
                    name=f"custodes-replica-{number}",
                ),
            )
            for number, dsn in enumerate(replica_dsns, 1)
        ]
        for replica in self._replicas:
            # Not waited for: a replica that is down at the start must not stop the vault
            # from opening; the watch finds it when it comes.
            replica.pool.open(wait=False)
        self._thread = threading.Thread(target=self._watch, name="custodes-replica-watch")
        self._thread.daemon = True
        self._thread.start()

    # -- the read path ----------------------------------------------------------------

    def fence(self) -> None:
        """This process wrote records or tokens: no replica serves a read until it is seen
        to have replayed the primary's position of a moment after now."""
        with self._lock:
            self._fence = time.monotonic()

    def read(self, action: Callable[[_Connection], _T], on_primary: Callable[[], _T]) -> _T:
        """action on a replica within the bound, else on_primary(); a replica that fails
        the read is passed over and the read runs on the primary (reads are idempotent)."""
        replica = self._choose()
        if replica is not None:
            try:
                with replica.pool.connection() as conn:
                    result = action(conn)
            except psycopg.Error as exc:
                replica.failed = True
                log.warning(
                    "replica %d failed a read (%s); reading from the primary",
                    replica.number,
                    type(exc).__name__,
                )
            else:
                with self._lock:
                    self._served_replica += 1
                return result
        result = on_primary()
        with self._lock:
            self._served_primary += 1
        return result

    def routing(self) -> ReadRouting:
        with self._lock:
            return ReadRouting(self._served_replica, self._served_primary)

    def _choose(self) -> _Replica | None:
        now = time.monotonic()
        with self._lock:
            fence = self._fence
        fresh = [
            r
            for r in self._replicas
            if not r.failed
            and r.caught_up_at is not None
            and r.caught_up_at > fence
            and now - r.caught_up_at <= self._max_lag
        ]
        if not fresh:
            return None
        return fresh[next(self._turn) % len(fresh)]

    # -- the watch ----------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._round()
            except Exception as exc:  # the watch outlives any one failure
                log.warning("the replica watch failed a round (%s)", type(exc).__name__)

    def _round(self) -> None:
        started = time.monotonic()
        try:
            self._primary_watch = self._reach(self._primary_watch, self._primary_dsn)
            row = self._primary_watch.execute(_PRIMARY_POSITION).fetchone()
        except psycopg.Error:
            # The primary unreachable (a failover under way): no new sample, so every
            # replica's last catch-up ages past the bound and reads go to the primary,
            # which fail until it is back. A replica being promoted serves nothing stale.
            _close(self._primary_watch)
            self._primary_watch = None
            return
        if row is None or row[0] is None:
            return
        self._system = int(row[1])
        self._samples.append((started, int(row[0])))
        horizon = started - self._max_lag - 2 * self._interval
        while len(self._samples) > 1 and self._samples[1][0] < horizon:
            self._samples.popleft()
        for replica in self._replicas:
            self._check(replica)

    def _check(self, replica: _Replica) -> None:
        try:
            replica.watch = self._reach(replica.watch, replica.dsn)
            row = replica.watch.execute(_REPLAY_POSITION).fetchone()
        except psycopg.Error:
            _close(replica.watch)
            replica.watch = None
            replica.caught_up_at = None
            return
        if row is None or not row[0] or row[1] is None:
            # Not in recovery: promoted, or never a replica. It is not read from as one.
            replica.caught_up_at = None
            return
        if int(row[2]) != self._system:
            if not replica.foreign:
                log.error(
                    "replica %d replicates another cluster: no read goes there", replica.number
                )
            replica.foreign = True
            replica.caught_up_at = None
            return
        replica.foreign = False
        replayed = int(row[1])
        caught_up = [t for t, position in self._samples if position <= replayed]
        replica.caught_up_at = max(caught_up) if caught_up else None
        replica.failed = False

    def _reach(self, conn: _Connection | None, dsn: str) -> _Connection:
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        return psycopg.connect(dsn, autocommit=True, connect_timeout=self._connect_timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for replica in self._replicas:
            _close(replica.watch)
            replica.watch = None
            replica.pool.close()
        _close(self._primary_watch)
        self._primary_watch = None


def _close(conn: _Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(psycopg.Error):
            conn.close()


@dataclass(frozen=True, slots=True)
class ReplicaStanding:
    """What a configured replica is, asked of it and of the primary (for doctor)."""

    reachable: bool
    standby: bool = False  # in recovery: a standby, not a primary
    same_cluster: bool = False  # a standby of the primary's own cluster


def replica_standing(
    primary_dsn: str, replica_dsn: str, *, connect_timeout: int = 3
) -> ReplicaStanding:
    """Whether a replica answers, is a standby, and replicates the primary's cluster. A
    primary that does not answer leaves the last unknown (False)."""
    try:
        with psycopg.connect(replica_dsn, autocommit=True, connect_timeout=connect_timeout) as conn:
            row = conn.execute(_REPLAY_POSITION).fetchone()
    except psycopg.Error:
        return ReplicaStanding(reachable=False)
    if row is None or not row[0]:
        return ReplicaStanding(reachable=True)
    try:
        with psycopg.connect(primary_dsn, autocommit=True, connect_timeout=connect_timeout) as conn:
            primary = conn.execute(_PRIMARY_POSITION).fetchone()
    except psycopg.Error:
        primary = None
    same = primary is not None and int(primary[1]) == int(row[2])
    return ReplicaStanding(reachable=True, standby=True, same_cluster=same)
