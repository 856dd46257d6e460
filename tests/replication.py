"""Streaming replicas for tests: a standby of a test's own cluster, made by pg_basebackup.

`replica_of(primary)` copies a running PgCluster with pg_basebackup -R (the copy knows
its primary and starts as a hot standby), starts it on a free loopback port under a
temporary directory of its own, and stops it by its postmaster's pid and removes it at
the end, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg

from tests.postgres import BINARIES, PgCluster


@contextlib.contextmanager
def replica_of(primary: PgCluster) -> Iterator[PgCluster]:
    """A hot standby streaming from primary (which must be running), started."""
    root = Path(tempfile.mkdtemp(prefix="custodes-replica-"))
    replica = PgCluster(root=root, owner=primary.owner)
    try:
        replica.socket_dir.mkdir()
        if primary.owner is not None:
            user = pwd.getpwnam(primary.owner)
            os.chown(root, user.pw_uid, user.pw_gid)
            os.chown(replica.socket_dir, user.pw_uid, user.pw_gid)
        replica.run(
            BINARIES / "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(primary.port),
            "-U",
            "postgres",
            "-D",
            replica.data_dir,
            "-R",
            "-X",
            "stream",
            "--no-sync",
        )
        # The copy carries the primary's settings; these lines, appended, win.
        replica.configure({"unix_socket_directories": str(replica.socket_dir), "hot_standby": "on"})
        replica.start()
        yield replica
    finally:
        try:
            replica.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


def replay_lsn(replica: PgCluster) -> int:
    """How far the replica has replayed the primary's WAL, in bytes."""
    with psycopg.connect(replica.dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '0/0')::int8"
        ).fetchone()
    assert row is not None
    return int(row[0])
