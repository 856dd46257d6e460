"""How fast the synthetic population generator writes JSON Lines, on one core.

Prints people/s, records/s and bytes/s for one run of `write_jsonl`; asserts nothing.
Usage: python bench/synth.py [--count N] [--seed S] [--cases R] [--deliveries R] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import BinaryIO

from custodes.synth import generate, write_jsonl


class _CountingSink:
    """A write-only binary sink that keeps only the number of bytes written to it."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return self.inner.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200_000, help="people to generate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=float, default=0.2, help="cases per person")
    parser.add_argument("--deliveries", type=float, default=0.5, help="deliveries per person")
    parser.add_argument("--out", default=os.devnull, help="where to write (default: discard)")
    args = parser.parse_args()

    # Build the lookup tables outside the timed run: they are built once per process.
    next(generate(1, seed=args.seed))

    with open(args.out, "wb") as raw:
        sink = _CountingSink(raw)
        start, cpu_start = time.perf_counter(), time.process_time()
        lines = write_jsonl(
            sink,  # type: ignore[arg-type]
            args.count,
            seed=args.seed,
            cases_per_person=args.cases,
            deliveries_per_person=args.deliveries,
        )
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start

    print(f"people      {args.count:>12,}")
    print(f"records     {lines:>12,}")
    print(f"bytes       {sink.bytes:>12,}")
    print(f"seconds     {elapsed:>12.3f}  (cpu {cpu:.3f})")
    print(f"people/s    {args.count / elapsed:>12,.0f}")
    print(f"records/s   {lines / elapsed:>12,.0f}")
    print(f"bytes/s     {sink.bytes / elapsed:>12,.0f}")
    # On a busy machine wall time includes waiting for a core; CPU time does not.
    print(f"people/s    {args.count / cpu:>12,.0f}  per CPU second")


if __name__ == "__main__":
    main()
