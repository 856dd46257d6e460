"""Throughput of the durable access log: appends, verification and proofs, per backend.

For each backend asked for (SQLite; PostgreSQL in a schema of its own, dropped after) it
prints (a) synced appends per second one at a time, (b) the same with group commit from
many threads of one process, (e) the same from several processes handing their entries
to the log sequencer, (c) the time `verify_log` takes over a log of N entries (built in
big batches, not by synced single appends), and (d) inclusion proofs generated and
verified per second: node by node through a cache (how they were made before), one read
a proof, and one read for a batch of proofs. Each figure stands beside the target and the
previous figures, and beside what this process did per second of its own CPU time (on a
machine shared with other work, wall-clock rates are mostly waits for a core); every
append is acknowledged only after its batch's COMMIT, synced (SQLite: WAL with
synchronous=FULL; PostgreSQL: synchronous_commit on). Asserts nothing.
With --profile, (b) also prints the appender threads' merged cProfile.

    python bench/audit.py [--backend sqlite postgresql] [--database URL] [--entries N]
                          [--single N] [--concurrent N] [--threads 64,256]
                          [--processes 4] [--proofs N] [--checkpoint-every N] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import multiprocessing
import os
import pstats
import random
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from baseline import LOCAL_SERVER, drop_schema, fresh_schema
from custodes.audit import AccessEntry, AccessLog, AuditKeys, Outcome
from custodes.audit.checkpoint import Checkpoint, LogSigner, create_log_key
from custodes.audit.merkle import (
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    subtree_root,
    verify_inclusion,
)
from custodes.audit.sequencer import SequencerAddress, SequencerClient, serve
from custodes.audit.verify import verify_log
from custodes.crypto import KdfParams, KeyMaterial
from custodes.storage import LogAppend, SQLiteStorage
from custodes.storage.base import LogStore, Rebuild

# The cheapest key-derivation cost the library accepts: the bench times the log, not argon2.
FLOOR_KDF = KdfParams(time_cost=2, memory_kib=19_456, parallelism=1)
PASSPHRASE = "a log key passphrase used only by this benchmark"
ORIGIN = "custodes.bench/access-log"
BUILD_BATCH = 20_000
PROOF_BATCH = 256
# What the issue measured before this work, on this kind of machine, unloaded.
PREVIOUS_APPENDS = "6,000-11,000/s"
PREVIOUS_PROOFS = "9,700/s"
TARGET = "20,000/s"


class Backend:
    """Where a phase's log lives: a file of its own, or a PostgreSQL schema of its own."""

    def __init__(self, name: str, directory: Path, server: str) -> None:
        self.name, self._directory, self._server = name, directory, server
        self._schemas: list[str] = []

    def location(self, phase: str) -> str:
        if self.name == "sqlite":
            (self._directory / phase).mkdir()
            return str(self._directory / phase / "audit.db")
        schema, dsn = fresh_schema(self._server)
        self._schemas.append(schema)
        return dsn

    def open(self, location: str, pool: int = 4) -> LogStore:
        if self.name == "sqlite":
            return SQLiteStorage(Path(location))
        from custodes.storage.postgres import PostgresStorage

        return PostgresStorage(location, min_size=1, max_size=pool)

    def durability(self) -> str:
        if self.name == "sqlite":
            return "WAL, synchronous=FULL: each commit fsynced"
        import psycopg

        with psycopg.connect(self._server) as db:
            fsync = db.execute("SHOW fsync").fetchone()
            sync = db.execute("SHOW synchronous_commit").fetchone()
        return (
            f"server fsync={fsync[0] if fsync else '?'}, synchronous_commit "
            f"{sync[0] if sync else '?'} (the log's connections set it on)"
        )

    def drop(self) -> None:
        for schema in self._schemas:
            with contextlib.suppress(Exception):
                drop_schema(self._server, schema)


def read_entry(n: int, rng: random.Random) -> tuple[AccessEntry, dict[str, object]]:
    """A search that returned one person, as the vault logs it, with its sealed query."""
    record = rng.randbytes(12).hex()
    entry = AccessEntry(
        actor=f"officer.{n % 97:02d}",
        role="investigator",
        action="person:record:search",
        outcome=Outcome.GRANTED,
        time=1_700_000_000.0 + n / 1000,
        purpose=f"benchmark case work {n}",
        case_ref=f"C-{n % 5000}",
        record_type="person",
        records=(record,),
        result_count=1,
        detail={"index": "national_id"},
    )
    return entry, {"values": {"national_id": f"{n:018d}"}}


def new_keys() -> AuditKeys:
    return AuditKeys(KeyMaterial(os.urandom(16), 1, {1: os.urandom(32)}, os.urandom(32)))


def new_signer(directory: Path, name: str) -> LogSigner:
    return create_log_key(
        directory / f"{name}.key", origin=ORIGIN, passphrase=PASSPHRASE, kdf=FLOOR_KDF
    )


def count_commits(storage: LogStore) -> list[int]:
    """Wrap the log's storage so that each group commit's size is recorded."""
    write = storage.log_append
    sizes: list[int] = []

    def counted(batch: LogAppend, rebuild: Rebuild | None = None) -> None:
        sizes.append(len(batch.entries))
        write(batch, rebuild)

    storage.log_append = counted  # type: ignore[method-assign]
    return sizes


def close(storage: LogStore) -> None:
    closer = getattr(storage, "close", None)
    if closer is not None:
        closer()


def commits_said(commits: list[int]) -> str:
    mean = sum(commits) / len(commits) if commits else 0.0
    return f"{len(commits):,} commits, {mean:,.1f} entries each (largest {max(commits, default=0)})"


def single_appends(backend: Backend, directory: Path, count: int, every: int) -> float:
    storage = backend.open(backend.location("single"))
    log = AccessLog(
        storage, new_keys(), new_signer(directory, "single"), origin=ORIGIN, checkpoint_every=every
    )
    rng = random.Random(1)
    work = [read_entry(n, rng) for n in range(count)]
    try:
        t0 = time.perf_counter()
        for entry, private in work:
            log.append(entry, private=private)
        elapsed = time.perf_counter() - t0
    finally:
        close(storage)
    rate = count / elapsed
    print(
        f"(a) synced appends, one thread: {rate:,.0f} appends/s "
        f"({elapsed / count * 1e6:,.0f} us each; one commit and its sync per append)"
    )
    return rate


def concurrent_appends(
    backend: Backend, directory: Path, threads: int, count: int, every: int, profile: bool
) -> float:
    storage = backend.open(backend.location(f"group{threads}"))
    log = AccessLog(
        storage,
        new_keys(),
        new_signer(directory, f"group{threads}"),
        origin=ORIGIN,
        checkpoint_every=every,
    )
    commits = count_commits(storage)
    per_thread = count // threads
    rng = random.Random(threads)
    work = [
        [read_entry(t * per_thread + j, rng) for j in range(per_thread)] for t in range(threads)
    ]
    start = threading.Barrier(threads + 1)
    failures: list[BaseException] = []
    profiles: list[cProfile.Profile] = []

    def appender(mine: list[tuple[AccessEntry, dict[str, object]]]) -> None:
        # cProfile sees only the thread that enabled it: each appender keeps its own.
        profiler = cProfile.Profile() if profile else None
        start.wait()
        if profiler is not None:
            profiler.enable()
        try:
            for entry, private in mine:
                log.append(entry, private=private)
        except BaseException as exc:  # reported below
            failures.append(exc)
        if profiler is not None:
            profiler.disable()
            profiles.append(profiler)

    workers = [threading.Thread(target=appender, args=(w,)) for w in work]
    for w in workers:
        w.start()
    try:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        start.wait()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        close(storage)
    total = per_thread * threads
    rate = total / elapsed
    print(
        f"(b) synced appends, group commit, {threads} threads of one process: "
        f"{rate:,.0f} appends/s; {commits_said(commits)}"
        + (f"; {len(failures)} appenders FAILED: {failures[0]!r}" if failures else "")
    )
    user, system = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
    switches = cpu1.ru_nvcsw - cpu0.ru_nvcsw + cpu1.ru_nivcsw - cpu0.ru_nivcsw
    print(
        f"    CPU per append: {user / total * 1e6:,.0f} us user, "
        f"{system / total * 1e6:,.0f} us system; {switches / total:.1f} context switches; "
        f"{total / (user + system):,.0f} appends per second of this process's CPU time"
    )
    if profiles:
        stats = pstats.Stats(profiles[0])
        for other in profiles[1:]:
            stats.add(other)
        stats.sort_stats("tottime").print_stats(20)
    return rate


def _worker_process(
    backend: Backend,
    location: str,
    signer: LogSigner,
    keys: AuditKeys,
    address: SequencerAddress,
    threads: int,
    per_thread: int,
    seed: int,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """One server worker: its own storage and log, its entries handed to the sequencer."""
    storage = backend.open(location, pool=2)
    log = AccessLog(storage, keys, signer, origin=ORIGIN, checkpoint_every=1 << 40)
    client = SequencerClient(address)
    log.sequence_through(client)
    rng = random.Random(seed)
    work = [
        [read_entry(seed * 10**7 + t * per_thread + j, rng) for j in range(per_thread)]
        for t in range(threads)
    ]
    failures: list[str] = []
    local_go = threading.Event()

    def appender(mine: list[tuple[AccessEntry, dict[str, object]]]) -> None:
        local_go.wait()
        try:
            for entry, private in mine:
                log.append(entry, private=private)
        except Exception as exc:  # reported by the parent
            failures.append(type(exc).__name__)

    runners = [threading.Thread(target=appender, args=(w,)) for w in work]
    for r in runners:
        r.start()
    ready.put(True)
    go.wait()
    local_go.set()
    for r in runners:
        r.join()
    client.close()
    close(storage)
    results.put((threads * per_thread, failures, log.size))


def sequenced_appends(
    backend: Backend, directory: Path, processes: int, threads: int, count: int, every: int
) -> float:
    location = backend.location(f"sequenced{processes}")
    signer = new_signer(directory, f"sequenced{processes}")
    keys = new_keys()
    address = SequencerAddress.new()
    listener = address.listen()
    per_thread = count // (processes * threads)
    context = multiprocessing.get_context("fork")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    # The store made first, as `custodes init` makes a vault before a server opens it, and
    # closed again: the children are forked before this process holds the log open or
    # runs a thread, as the supervisor forks.
    close(backend.open(location))
    children = [
        context.Process(
            target=_worker_process,
            args=(
                backend,
                location,
                signer,
                keys,
                address,
                threads,
                per_thread,
                p + 1,
                ready,
                go,
                results,
            ),
        )
        for p in range(processes)
    ]
    for child in children:
        child.start()
    storage = backend.open(location)
    log = AccessLog(storage, keys, signer, origin=ORIGIN, checkpoint_every=every)
    commits = count_commits(storage)
    stop = threading.Event()
    server = threading.Thread(
        target=serve, args=(listener, address.secret, log.append_encoded_many, stop), daemon=True
    )
    server.start()
    try:
        for _ in children:
            ready.get()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        go.set()
        got = [results.get() for _ in children]
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        for child in children:
            child.join()
    finally:
        stop.set()
        server.join(timeout=10)
        listener.close()
        close(storage)
    total = sum(n for n, _, _ in got)
    failures = [f for _, fs, _ in got for f in fs]
    rate = total / elapsed
    print(
        f"(e) synced appends through the sequencer, {processes} processes x {threads} threads: "
        f"{rate:,.0f} appends/s; {commits_said(commits)}"
        + (f"; {len(failures)} appenders FAILED ({failures[0]})" if failures else "")
    )
    user, system = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
    print(
        f"    the sequencer's CPU per append: {user / total * 1e6:,.0f} us user, "
        f"{system / total * 1e6:,.0f} us system (the workers seal and encode, beside it)"
    )
    return rate


def batched_appends(backend: Backend, directory: Path, count: int, batch: int, every: int) -> float:
    """The sequencer's own path without its sockets: entries built and sealed beforehand,
    as the workers build them, appended `batch` at a time from one thread."""
    storage = backend.open(backend.location(f"batched{batch}"))
    keys = new_keys()
    log = AccessLog(
        storage,
        keys,
        new_signer(directory, f"batched{batch}"),
        origin=ORIGIN,
        checkpoint_every=every,
    )
    commits = count_commits(storage)
    rng = random.Random(batch)
    built = []
    for n in range(count):
        entry, private = read_entry(n, rng)
        subjects = [keys.commitment(r) for r in entry.records]
        blob = keys.seal_private(private)
        encoded = entry.encode_referencing(
            [c.hex() for c in subjects], hashlib.sha256(blob).hexdigest()
        )
        built.append((encoded, subjects, blob))
    try:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for start in range(0, count, batch):
            log.append_encoded_many(built[start : start + batch])
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        close(storage)
    rate = count / elapsed
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    print(
        f"(f) synced appends of built entries, {batch} a call from one thread (the "
        f"sequencer's path, no sockets): {rate:,.0f} appends/s; {commits_said(commits)}; "
        f"{count / cpu:,.0f} per second of CPU time"
    )
    return rate


def build_log(storage: LogStore, signer: LogSigner, entries: int, every: int) -> None:
    """Store N entries with their nodes and checkpoints in big batches."""
    rng = random.Random(6962)
    tail = rng.randbytes(120).hex()
    frontier = CompactRange()

    def node(level: int, index: int) -> bytes:
        found = storage.log_node(level, index)
        assert found is not None
        return found

    # Checkpoints where a live log would have signed them, each proven to extend the
    # one before, as the signer demands; the last one at the very end.
    marks = [*range(every, entries, every), entries]
    last_signed = 0
    t0 = time.perf_counter()
    while frontier.size < entries:
        first = frontier.size
        stop = min(first + BUILD_BATCH, entries)
        # Entries of a realistic size; their content is not what is being measured.
        batch = [b'{"n":%d,"pad":"%s"}' % (i, tail.encode()) for i in range(first, stop)]
        nodes = [n for data in batch for n in frontier.append(leaf_hash(data))]
        storage.log_append(LogAppend(first, batch, nodes, [], []))
        while marks and marks[0] <= stop:
            sign(storage, signer, marks[0], last_signed, node)
            last_signed = marks.pop(0)
    print(f"    built a log of {entries:,} entries in {time.perf_counter() - t0:.1f} s")


def sign(
    storage: LogStore, signer: LogSigner, size: int, last: int, node: Callable[[int, int], bytes]
) -> None:
    root = subtree_root(0, size, node)
    proof = consistency_proof(last, size, node) if last else []
    storage.put_checkpoint(size, signer.sign_checkpoint(Checkpoint(ORIGIN, size, root), proof))


def chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def verify_and_prove(
    backend: Backend, directory: Path, entries: int, proofs: int, every: int
) -> float:
    signer = new_signer(directory, "verify")
    storage = backend.open(backend.location("verify"))
    try:
        build_log(storage, signer, entries, every)
        t0 = time.perf_counter()
        report = verify_log(storage, signer.verifier_key, origin=ORIGIN)
        elapsed = time.perf_counter() - t0
        print(
            f"(c) verify_log over {report.entries:,} entries and {report.checkpoints:,} "
            f"checkpoints: {elapsed:.2f} s (target < 10 s for 1,000,000)"
        )
        size = storage.log_size()
        rng = random.Random(9162)
        indexes = [rng.randrange(size) for _ in range(proofs)]

        def fresh_log() -> AccessLog:
            # A log opened afresh for each method: none starts with another's nodes kept.
            return AccessLog(storage, new_keys(), signer, origin=ORIGIN)

        log = fresh_log()
        root = log.root()
        leaves = [leaf_hash(log.raw_entry(i)) for i in indexes]
        # Before: the proof asks for each node in turn, each read through a cache of nodes.
        before = fresh_log()
        t0 = time.perf_counter()
        old = [inclusion_proof(i, size, before._proof_node) for i in indexes]
        node_by_node = proofs / (time.perf_counter() - t0)
        single = fresh_log()
        t0 = time.perf_counter()
        one_each = [single.inclusion_proof(i, size) for i in indexes]
        one_read = proofs / (time.perf_counter() - t0)
        batched = fresh_log()
        t0, cpu0 = time.perf_counter(), time.process_time()
        made = [
            p for part in chunks(indexes, PROOF_BATCH) for p in batched.inclusion_proofs(part, size)
        ]
        t1, cpu1 = time.perf_counter(), time.process_time()
        for i, leaf, proof in zip(indexes, leaves, made, strict=True):
            verify_inclusion(leaf, i, size, proof, root)
        t2 = time.perf_counter()
        assert made == one_each == old  # the same proofs, whichever way they were read
        generated = proofs / (t1 - t0)
        print(
            f"(d) inclusion proofs, {sum(map(len, made)) / proofs:.1f} hashes each: "
            f"{generated:,.0f} generated/s in batches of {PROOF_BATCH} (one read a batch), "
            f"{one_read:,.0f}/s one read a proof, {node_by_node:,.0f}/s node by node as "
            f"before ({generated / node_by_node:.1f}x); {proofs / (t2 - t1):,.0f} verified/s"
        )
        # Wall time on a loaded machine is mostly waiting for a core: this process's own
        # CPU time says what one core would do alone (the database server's is not in it).
        print(f"    in batches: {proofs / (cpu1 - cpu0):,.0f} generated per second of CPU time")
        return generated
    finally:
        close(storage)


def run_backend(name: str, args: argparse.Namespace, base: Path) -> None:
    (base / name).mkdir()
    backend = Backend(name, base / name, args.database)
    print(f"== {name}: {backend.durability()}")
    try:
        single = single_appends(backend, base / name, args.single, args.checkpoint_every)
        best = 0.0
        for threads in (int(t) for t in args.threads.split(",")):
            rate = concurrent_appends(
                backend, base / name, threads, args.concurrent, args.checkpoint_every, args.profile
            )
            best = max(best, rate)
            print(f"    {rate / single:.1f}x one thread's appends")
        per_process = max(1, int(args.threads.split(",")[-1]) // args.processes)
        rate = sequenced_appends(
            backend,
            base / name,
            args.processes,
            per_process,
            args.concurrent,
            args.checkpoint_every,
        )
        best = max(best, rate)
        print(f"    {rate / single:.1f}x one thread's appends")
        batched = batched_appends(backend, base / name, args.concurrent, 256, args.checkpoint_every)
        print(f"    {batched / single:.1f}x one thread's appends")
        generated = verify_and_prove(
            backend, base / name, args.entries, args.proofs, args.checkpoint_every
        )
        print(
            f"== {name}: durable appends {best:,.0f}/s from appenders waiting each for its "
            f"own, {batched:,.0f}/s handed over 256 at a time (target {TARGET}; previously "
            f"{PREVIOUS_APPENDS}), proofs generated {generated:,.0f}/s (target {TARGET}; "
            f"previously {PREVIOUS_PROOFS})"
        )
    finally:
        backend.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--backend", nargs="+", default=["sqlite"], choices=["sqlite", "postgresql"]
    )
    parser.add_argument("--database", default=LOCAL_SERVER, help="PostgreSQL server")
    parser.add_argument("--entries", type=int, default=1_000_000, help="log size for (c), (d)")
    parser.add_argument("--single", type=int, default=2_000, help="appends for (a)")
    parser.add_argument("--concurrent", type=int, default=50_000, help="appends for (b), (e)")
    parser.add_argument("--threads", default="64,256", help="thread counts for (b)")
    parser.add_argument("--processes", type=int, default=4, help="worker processes for (e)")
    parser.add_argument("--proofs", type=int, default=50_000)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="profile (b) with cProfile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="custodes-bench-") as tmp:
        for name in args.backend:
            run_backend(name, args, Path(tmp))


if __name__ == "__main__":
    main()
