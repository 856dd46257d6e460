"""A highly available PostgreSQL for tests: etcd and Patroni nodes, all of the test's own.

`patroni_cluster(nodes=2)` starts one etcd member and `nodes` Patroni nodes (Debian's
etcd 3.4 and Patroni 3.0, PostgreSQL 15), each under one temporary directory on free
loopback ports, with synchronous replication (an acknowledged commit is on the standby
Patroni would promote) and failover right after a primary crashes
(primary_start_timeout 0). Everything is stopped by pid at the end, also when the test
fails. Without the packages a test is skipped, or fails under CUSTODES_REQUIRE_POSTGRES=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.postgres import BINARIES, _cluster_owner, _free_port, unavailable

PATRONI = Path("/usr/bin/patroni")
ETCD = Path("/usr/bin/etcd")
SCOPE = "custodes-test"
READY_SECONDS = 90.0
STOP_SECONDS = 15.0


@dataclass
class PatroniNode:
    name: str
    root: Path
    pg_port: int
    rest_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "patroni.log"

    @property
    def postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return None
        return int(first) if first.strip().isdigit() else None

    def dsn(self, dbname: str = "postgres") -> str:
        return psycopg.conninfo.make_conninfo(
            host="127.0.0.1", port=self.pg_port, user="postgres", dbname=dbname, connect_timeout=3
        )


@dataclass
class PatroniCluster:
    root: Path
    nodes: list[PatroniNode] = field(default_factory=list)
    etcd: subprocess.Popen[bytes] | None = None
    etcd_port: int = 0

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq's multi-host form: every node, and only the one that takes writes."""
        return psycopg.conninfo.make_conninfo(
            host=",".join("127.0.0.1" for _ in self.nodes),
            port=",".join(str(n.pg_port) for n in self.nodes),
            user="postgres",
            dbname=dbname,
            target_session_attrs="read-write",
            connect_timeout=2,
        )

    def standby_dsn(self, dbname: str = "postgres") -> str:
        """The same nodes, and only one that is a standby: where reads may go."""
        return psycopg.conninfo.make_conninfo(
            self.dsn(dbname), target_session_attrs="standby", connect_timeout=2
        )

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view of the cluster (its REST API, from any node that answers)."""
        for node in self.nodes:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{node.rest_port}/cluster", timeout=2
                ) as answer:
                    members: list[dict[str, Any]] = json.load(answer)["members"]
                    return members
            except OSError:
                continue
        return []

    def leader(self) -> PatroniNode | None:
        for member in self.members():
            if member.get("role") == "leader" and member.get("state") == "running":
                return next(n for n in self.nodes if n.name == member["name"])
        return None

    def wait_ready(self, *, other_than: str | None = None) -> PatroniNode:
        """Wait for a running leader (not `other_than`) with a synchronous standby
        streaming from it; the leader."""
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            members = self.members()
            roles = {m.get("role") for m in members if m.get("state") in ("running", "streaming")}
            leader = self.leader()
            if (
                leader is not None
                and leader.name != other_than
                and (other_than is not None or "sync_standby" in roles)
            ):
                return leader
            time.sleep(0.2)
        logs = "\n".join(
            n.log_file.read_text(errors="replace")[-3000:]
            for n in self.nodes
            if n.log_file.exists()
        )
        raise RuntimeError(f"the Patroni cluster was not ready in time\n{logs}")


def _node_config(node: PatroniNode, etcd_port: int, unix_socket_dir: Path) -> dict[str, Any]:
    return {
        "scope": SCOPE,
        "name": node.name,
        "log": {"level": "INFO"},
        "restapi": {
            "listen": f"127.0.0.1:{node.rest_port}",
            "connect_address": f"127.0.0.1:{node.rest_port}",
        },
        "etcd3": {"hosts": [f"127.0.0.1:{etcd_port}"]},
        "bootstrap": {
            "dcs": {
                # Short timings for a test: the leader key lives 10 s, each node looks
                # every second, and a crashed primary is failed over at once rather than
                # restarted in place.
                "ttl": 10,
                "loop_wait": 1,
                "retry_timeout": 3,
                "primary_start_timeout": 0,
                "synchronous_mode": True,
                "postgresql": {
                    "use_pg_rewind": False,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "max_wal_senders": 5,
                        "max_replication_slots": 5,
                    },
                },
            },
            # initdb's own fsync of the new files: a throw-away cluster has no use for it.
            # The server's own fsyncs of commits, which the tests rely on, are unchanged.
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "no-sync"],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{node.pg_port}",
            "connect_address": f"127.0.0.1:{node.pg_port}",
            "data_dir": str(node.data_dir),
            "bin_dir": str(BINARIES),
            "pgpass": str(node.root / "pgpass"),
            # The standby's copy starts after an immediate checkpoint, not a spread one.
            "basebackup": [{"checkpoint": "fast"}],
            "authentication": {
                "superuser": {"username": "postgres"},
                "replication": {"username": "postgres"},
            },
            "pg_hba": [
                "local all all trust",
                "host all all 127.0.0.1/32 trust",
                "host replication all 127.0.0.1/32 trust",
            ],
            "parameters": {"unix_socket_directories": str(unix_socket_dir)},
        },
    }


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it has not gone in time."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()


def _kill_postmaster(node: PatroniNode) -> None:
    pid = node.postmaster_pid
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def patroni_cluster(nodes: int = 2) -> Iterator[PatroniCluster]:
    """An etcd member and `nodes` Patroni nodes, the first one bootstrapping the cluster;
    returned once it has a leader and a synchronous standby."""
    for binary in (PATRONI, ETCD, BINARIES / "initdb"):
        if not binary.exists():
            unavailable(f"{binary} is not installed (Debian: patroni etcd-server postgresql-15)")
    owner = _cluster_owner()
    # Not under pytest's base directory: the nodes' OS user must reach its own files.
    root = Path(tempfile.mkdtemp(prefix="custodes-patroni-"))
    cluster = PatroniCluster(root=root)
    user = pwd.getpwnam(owner) if owner is not None else None
    try:
        etcd_dir = root / "etcd"
        etcd_dir.mkdir()
        cluster.etcd_port = _free_port()
        peer_port = _free_port()
        client = f"http://127.0.0.1:{cluster.etcd_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        with (etcd_dir / "etcd.log").open("wb") as etcd_log:
            cluster.etcd = subprocess.Popen(
                [
                    str(ETCD),
                    "--name",
                    "etcd0",
                    "--data-dir",
                    str(etcd_dir / "data"),
                    "--listen-client-urls",
                    client,
                    "--advertise-client-urls",
                    client,
                    "--listen-peer-urls",
                    peer,
                    "--initial-advertise-peer-urls",
                    peer,
                    "--initial-cluster",
                    f"etcd0={peer}",
                    "--unsafe-no-fsync",
                ],
                stdout=etcd_log,
                stderr=subprocess.STDOUT,
                cwd=etcd_dir,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(etcd_dir)},
            )
        _wait_for_etcd(client, cluster.etcd)
        for number in range(1, nodes + 1):
            node = PatroniNode(
                name=f"node{number}",
                root=root / f"node{number}",
                pg_port=_free_port(),
                rest_port=_free_port(),
            )
            node.root.mkdir(mode=0o700)
            if user is not None:
                os.chown(root, user.pw_uid, user.pw_gid)
                os.chown(node.root, user.pw_uid, user.pw_gid)
            config = node.root / "patroni.yml"
            # JSON is YAML: no YAML writer is needed.
            config.write_text(json.dumps(_node_config(node, cluster.etcd_port, node.root)))
            if user is not None:
                os.chown(config, user.pw_uid, user.pw_gid)
            cluster.nodes.append(node)
            with node.log_file.open("wb") as log:
                node.process = subprocess.Popen(
                    [str(PATRONI), str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=node.root,
                    env={
                        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                        "HOME": str(node.root),
                        "LANG": "C.UTF-8",
                    },
                    user=None if user is None else user.pw_uid,
                    group=None if user is None else user.pw_gid,
                    extra_groups=None if user is None else [],
                )
            if number == 1:
                # The first node bootstraps (initdb) alone; the others copy it.
                _wait_for_leader(cluster)
        cluster.wait_ready()
        yield cluster
    finally:
        for node in cluster.nodes:
            _stop(node.process)
        for node in cluster.nodes:
            # Patroni stops its PostgreSQL; one it could not (killed, or stuck) is killed.
            _kill_postmaster(node)
        _stop(cluster.etcd)
        shutil.rmtree(root, ignore_errors=True)


def _wait_for_etcd(client: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("etcd exited at its start")
        try:
            with urllib.request.urlopen(f"{client}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("etcd did not answer in time")


def _wait_for_leader(cluster: PatroniCluster) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while cluster.leader() is None:
        if time.monotonic() > deadline:
            log = cluster.nodes[0].log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the first Patroni node did not become the leader in time\n{log}")
        time.sleep(0.2)
