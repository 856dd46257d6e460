"""Throughput of Storage.write_batch alone, on synthetic sealed records, then the cost
of a token lookup (find_records) in what was written.

Random payloads stand in for ciphertext and random integers for blind tokens; no
encryption is timed. Prints, per backend, microseconds per record overall and over
the last stretch of the run, bytes written, file size and peak RSS, and microseconds per
lookup of a stored token (reopened, so its first reads are cold); asserts nothing.
Each backend runs in its own process so that its peak RSS is its own.

    python bench/storage.py [--records N] [--batch N] [--payload BYTES] [--tokens MEAN]
                            [--lookups N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from custodes.storage import MemoryStorage, SealedRecord, SQLiteStorage, Storage

FACTORIES: dict[str, Callable[[Path], Storage]] = {
    "memory": lambda _: MemoryStorage(),
    "sqlite": lambda d: SQLiteStorage(d / "bench.db"),
}


def synthetic_batch(
    size: int, payload: int, wrapped: int, tokens: float, rng: random.Random
) -> list[SealedRecord]:
    # A fractional mean (4.7 tokens) gives each record the floor or the ceiling of it.
    whole, fraction = int(tokens), tokens - int(tokens)
    batch = []
    for _ in range(size):
        count = whole + (rng.random() < fraction)
        batch.append(
            SealedRecord(
                record_id=rng.randbytes(12).hex(),
                record_type="person",
                payload=os.urandom(payload),
                kek_version=1,
                wrapped_key=os.urandom(wrapped),
                tokens=tuple(
                    (index_id, rng.getrandbits(64) - 2**63) for index_id in range(1, count + 1)
                ),
            )
        )
    return batch


def bytes_written() -> int | None:
    """Bytes this process has passed to write calls so far (Linux only): the WAL, the
    checkpoints into the database file, everything."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run(name: str, args: argparse.Namespace) -> dict[str, float | int | None]:
    rng = random.Random(7)
    timings: list[float] = []
    stored_tokens: list[tuple[int, int]] = []
    lookup_us: float | None = None
    with tempfile.TemporaryDirectory(dir=args.directory) as directory:
        storage = FACTORIES[name](Path(directory))
        written_before = bytes_written()
        try:
            for _ in range(args.records // args.batch):
                batch = synthetic_batch(args.batch, args.payload, args.wrapped, args.tokens, rng)
                started = time.perf_counter()
                storage.write_batch(batch)
                timings.append(time.perf_counter() - started)
                # Tokens of records from every part of the run, old and recent.
                stored_tokens.extend(rng.choice(batch).tokens[0] for _ in range(20))
            written_after = bytes_written()
            if args.lookups and name != "memory":
                storage.close()
                storage = FACTORIES[name](Path(directory))
            if args.lookups and stored_tokens:
                probes = [rng.choice(stored_tokens) for _ in range(args.lookups)]
                started = time.perf_counter()
                for index_id, token in probes:
                    storage.find_records(index_id, token, 10)
                lookup_us = (time.perf_counter() - started) / len(probes) * 1e6
        finally:
            storage.close()
        file_bytes = sum(p.stat().st_size for p in Path(directory).iterdir())
    done = len(timings) * args.batch
    tail_batches = max(1, min(len(timings), args.tail // args.batch))
    written = (
        None if written_before is None or written_after is None else written_after - written_before
    )
    return {
        "records": done,
        "batches": len(timings),
        "us_per_record": sum(timings) / done * 1e6,
        "tail_records": tail_batches * args.batch,
        "tail_us_per_record": sum(timings[-tail_batches:]) / (tail_batches * args.batch) * 1e6,
        "median_batch_ms": statistics.median(timings) * 1000,
        "slowest_batch_ms": max(timings) * 1000,
        "bytes_written": written,
        "file_bytes": file_bytes,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "lookup_us": lookup_us,
    }


def report(name: str, r: dict[str, float | int | None]) -> None:
    written = r["bytes_written"]
    per_record = "n/a" if written is None else f"{written / float(r['records'] or 1):,.0f} B/record"
    print(
        f"{name:>7}: {r['records']:,} records in {r['batches']} batches:"
        f" {r['us_per_record']:.2f} us/record overall"
        f" ({1e6 / float(r['us_per_record'] or 1):,.0f} records/s),"
        f" last {r['tail_records']:,}: {r['tail_us_per_record']:.2f} us/record;"
        f" median batch {r['median_batch_ms']:.1f} ms, slowest {r['slowest_batch_ms']:.1f} ms;"
        f" written {per_record}, file {float(r['file_bytes'] or 0) / 2**20:,.0f} MiB,"
        f" peak RSS {r['peak_rss_mib']:.0f} MiB"
        + ("" if r["lookup_us"] is None else f"; lookup {r['lookup_us']:.1f} us")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--payload", type=int, default=700, help="sealed payload bytes")
    parser.add_argument("--wrapped", type=int, default=61, help="wrapped data key bytes")
    parser.add_argument("--tokens", type=float, default=4.7, help="mean tokens per record")
    parser.add_argument("--tail", type=int, default=100_000, help="records in the last stretch")
    parser.add_argument(
        "--backend", choices=sorted(FACTORIES), action="append", help="default: every backend"
    )
    parser.add_argument("--lookups", type=int, default=5_000, help="token lookups timed")
    parser.add_argument("--directory", type=Path, default=None, help="where the database goes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    backends = args.backend or list(FACTORIES)
    if args.child:
        print(json.dumps(run(backends[0], args)))
        return

    print(
        f"payload {args.payload} bytes, wrapped key {args.wrapped} bytes,"
        f" {args.tokens} tokens per record, batch {args.batch}, {args.records:,} records"
    )
    for name in backends:
        cmd = [sys.executable, __file__, "--child", "--backend", name]
        cmd += ["--records", str(args.records), "--batch", str(args.batch)]
        cmd += ["--payload", str(args.payload), "--wrapped", str(args.wrapped)]
        cmd += ["--tokens", str(args.tokens), "--tail", str(args.tail)]
        cmd += ["--lookups", str(args.lookups)]
        if args.directory is not None:
            cmd += ["--directory", str(args.directory)]
        done = subprocess.run(cmd, check=True, capture_output=True, text=True)
        report(name, json.loads(done.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
