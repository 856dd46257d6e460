"""Throughput of Storage.write_batch alone, on synthetic sealed records.

Random payloads stand in for ciphertext and random integers for blind tokens; no
encryption is timed. Prints records per second per backend; asserts nothing.

    python bench/storage.py [--records N] [--batch N] [--payload BYTES] [--tokens N]
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from custodes.storage import MemoryStorage, SealedRecord, SQLiteStorage, Storage


def synthetic_batch(size: int, payload: int, tokens: int, rng: random.Random) -> list[SealedRecord]:
    return [
        SealedRecord(
            record_id=secrets.token_hex(12),
            record_type="person",
            payload=os.urandom(payload),
            kek_version=1,
            wrapped_key=os.urandom(60),
            tokens=tuple((index_id, rng.getrandbits(48)) for index_id in range(1, tokens + 1)),
        )
        for _ in range(size)
    ]


def run(name: str, storage: Storage, args: argparse.Namespace) -> None:
    rng = random.Random(7)
    timings: list[float] = []
    for _ in range(args.records // args.batch):
        batch = synthetic_batch(args.batch, args.payload, args.tokens, rng)
        started = time.perf_counter()
        storage.write_batch(batch)
        timings.append(time.perf_counter() - started)
    total = sum(timings)
    done = len(timings) * args.batch
    print(
        f"{name:>7}: {done} records in {len(timings)} batches of {args.batch}:"
        f" {done / total:,.0f} records/s overall,"
        f" median batch {statistics.median(timings) * 1000:.1f} ms,"
        f" slowest {max(timings) * 1000:.1f} ms,"
        f" last batch {args.batch / timings[-1]:,.0f} records/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--payload", type=int, default=600)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--directory", type=Path, default=None, help="where the database goes")
    args = parser.parse_args()
    print(
        f"payload {args.payload} bytes, {args.tokens} tokens per record,"
        f" batch {args.batch}, {args.records} records"
    )

    factories: dict[str, Callable[[Path], Storage]] = {
        "memory": lambda _: MemoryStorage(),
        "sqlite": lambda d: SQLiteStorage(d / "bench.db"),
    }
    for name, factory in factories.items():
        with tempfile.TemporaryDirectory(dir=args.directory) as directory:
            storage = factory(Path(directory))
            try:
                run(name, storage, args)
            finally:
                storage.close()


if __name__ == "__main__":
    main()
