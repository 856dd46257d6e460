"""Throughput of the durable access log on SQLite: appends, verification and proofs.

Prints (a) synced appends per second one at a time, (b) the same with group commit
from many threads, (c) the time `verify_log` takes over a log of N entries (built in
big batches, not by synced single appends), and (d) inclusion proofs generated from
the SQLite store and verified per second; each beside its target. Asserts nothing.
With --profile, (b) also prints the appender threads' merged cProfile (its times include
waits for the GIL and for locks).

    python bench/audit.py [--entries N] [--single N] [--concurrent N] [--threads 32,64]
                          [--proofs N] [--checkpoint-every N] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import resource
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from custodes.audit import AccessEntry, AccessLog, AuditKeys, Outcome
from custodes.audit.checkpoint import Checkpoint, LogSigner, create_log_key
from custodes.audit.merkle import (
    CompactRange,
    consistency_proof,
    leaf_hash,
    subtree_root,
    verify_inclusion,
)
from custodes.audit.verify import verify_log
from custodes.crypto import KdfParams, KeyMaterial
from custodes.storage import LogAppend, SQLiteStorage

# The cheapest key-derivation cost the library accepts: the bench times the log, not argon2.
FLOOR_KDF = KdfParams(time_cost=2, memory_kib=19_456, parallelism=1)
PASSPHRASE = "a log key passphrase used only by this benchmark"
ORIGIN = "custodes.bench/access-log"
BUILD_BATCH = 20_000


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


def new_log(
    directory: Path, signer: LogSigner, checkpoint_every: int
) -> tuple[AccessLog, SQLiteStorage]:
    material = KeyMaterial(os.urandom(16), 1, {1: os.urandom(32)}, os.urandom(32))
    storage = SQLiteStorage(directory / "audit.db")
    log = AccessLog(
        storage, AuditKeys(material), signer, origin=ORIGIN, checkpoint_every=checkpoint_every
    )
    return log, storage


def new_signer(directory: Path, name: str) -> LogSigner:
    return create_log_key(
        directory / f"{name}.key", origin=ORIGIN, passphrase=PASSPHRASE, kdf=FLOOR_KDF
    )


def count_commits(storage: SQLiteStorage) -> list[int]:
    """Wrap the log's storage so that each group commit's size is recorded."""
    write = storage.log_append
    sizes: list[int] = []

    def counted(batch: LogAppend) -> None:
        sizes.append(len(batch.entries))
        write(batch)

    storage.log_append = counted  # type: ignore[method-assign]
    return sizes


def single_appends(directory: Path, count: int, checkpoint_every: int) -> None:
    log, storage = new_log(directory, new_signer(directory, "single"), checkpoint_every)
    rng = random.Random(1)
    work = [read_entry(n, rng) for n in range(count)]
    try:
        t0 = time.perf_counter()
        for entry, private in work:
            log.append(entry, private=private)
        elapsed = time.perf_counter() - t0
    finally:
        storage.close()
    print(
        f"(a) synced appends, one thread: {count / elapsed:,.0f} appends/s "
        f"({elapsed / count * 1e6:,.0f} us each; bound by one fsync per append)"
    )


def concurrent_appends(
    directory: Path, threads: int, count: int, checkpoint_every: int, profile: bool
) -> None:
    log, storage = new_log(directory, new_signer(directory, f"group{threads}"), checkpoint_every)
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
        storage.close()
    total = per_thread * threads
    mean = total / len(commits) if commits else 0.0
    print(
        f"(b) synced appends, group commit, {threads} threads: {total / elapsed:,.0f} appends/s "
        f"(target > 20,000/s); {len(commits):,} commits, {mean:,.1f} entries each "
        f"(largest {max(commits, default=0)})"
        + (f"; {len(failures)} appenders FAILED: {failures[0]!r}" if failures else "")
    )
    user, system = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
    switches = cpu1.ru_nvcsw - cpu0.ru_nvcsw + cpu1.ru_nivcsw - cpu0.ru_nivcsw
    print(
        f"    CPU per append: {user / total * 1e6:,.0f} us user, "
        f"{system / total * 1e6:,.0f} us system; {switches / total:.1f} context switches"
    )
    if profiles:
        stats = pstats.Stats(profiles[0])
        for other in profiles[1:]:
            stats.add(other)
        stats.sort_stats("tottime").print_stats(20)


def build_log(
    directory: Path, signer: LogSigner, entries: int, checkpoint_every: int
) -> SQLiteStorage:
    """Store N entries with their nodes and checkpoints in big unsynced-per-entry batches."""
    storage = SQLiteStorage(directory / "verify.db")
    rng = random.Random(6962)
    tail = rng.randbytes(120).hex()
    frontier = CompactRange()

    def node(level: int, index: int) -> bytes:
        found = storage.log_node(level, index)
        assert found is not None
        return found

    # Checkpoints where a live log would have signed them, each proven to extend the
    # one before, as the signer demands; the last one at the very end.
    marks = [*range(checkpoint_every, entries, checkpoint_every), entries]
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
    return storage


def sign(
    storage: SQLiteStorage,
    signer: LogSigner,
    size: int,
    last: int,
    node: Callable[[int, int], bytes],
) -> None:
    root = subtree_root(0, size, node)
    proof = consistency_proof(last, size, node) if last else []
    storage.put_checkpoint(size, signer.sign_checkpoint(Checkpoint(ORIGIN, size, root), proof))


def verify_and_prove(directory: Path, entries: int, proofs: int, checkpoint_every: int) -> None:
    signer = new_signer(directory, "verify")
    storage = build_log(directory, signer, entries, checkpoint_every)
    try:
        t0 = time.perf_counter()
        report = verify_log(storage, signer.verifier_key, origin=ORIGIN)
        elapsed = time.perf_counter() - t0
        print(
            f"(c) verify_log over {report.entries:,} entries and {report.checkpoints:,} "
            f"checkpoints: {elapsed:.2f} s (target < 10 s for 1,000,000)"
        )
        log = AccessLog(
            storage,
            AuditKeys(KeyMaterial(os.urandom(16), 1, {1: os.urandom(32)}, os.urandom(32))),
            signer,
            origin=ORIGIN,
        )
        size, root = log.size, log.root()
        rng = random.Random(9162)
        indexes = [rng.randrange(size) for _ in range(proofs)]
        leaves = [leaf_hash(log.raw_entry(i)) for i in indexes]
        t0 = time.perf_counter()
        made = [log.inclusion_proof(i, size) for i in indexes]
        t1 = time.perf_counter()
        for i, leaf, proof in zip(indexes, leaves, made, strict=True):
            verify_inclusion(leaf, i, size, proof, root)
        t2 = time.perf_counter()
        print(
            f"(d) inclusion proofs from SQLite: {proofs / (t1 - t0):,.0f} generated/s, "
            f"{proofs / (t2 - t1):,.0f} verified/s (targets > 20,000/s each; "
            f"{sum(map(len, made)) / proofs:.1f} hashes each)"
        )
    finally:
        storage.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="log size for (c), (d)")
    parser.add_argument("--single", type=int, default=2_000, help="appends for (a)")
    parser.add_argument("--concurrent", type=int, default=50_000, help="appends for (b)")
    parser.add_argument("--threads", default="32,64", help="thread counts for (b)")
    parser.add_argument("--proofs", type=int, default=50_000)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--profile", action="store_true", help="profile (b) with cProfile")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="custodes-bench-") as tmp:
        base = Path(tmp)
        for name in ("single", "verify", *(f"group{t}" for t in args.threads.split(","))):
            (base / name).mkdir()
        single_appends(base / "single", args.single, args.checkpoint_every)
        for threads in (int(t) for t in args.threads.split(",")):
            concurrent_appends(
                base / f"group{threads}",
                threads,
                args.concurrent,
                args.checkpoint_every,
                args.profile,
            )
        verify_and_prove(base / "verify", args.entries, args.proofs, args.checkpoint_every)


if __name__ == "__main__":
    main()
