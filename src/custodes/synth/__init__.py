"""A deterministic generator of synthetic people, their cases and their deliveries.

Output follows the `population` schema and is the same, byte for byte, for the same
arguments; it streams in chunks, so memory stays flat however many people are asked for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import BinaryIO

import orjson

from custodes.synth._engine import REFERENCE_DATE, Population, Record
from custodes.synth._tables import PROVINCES

__all__ = ["PROVINCES", "REFERENCE_DATE", "Record", "generate", "write_jsonl"]


def generate(
    count: int,
    *,
    seed: int,
    cases_per_person: float = 0.2,
    deliveries_per_person: float = 0.5,
) -> Iterator[Record]:
    """Yield `count` people and, interleaved by chunk, about `count * rate` cases and
    deliveries, each a dict with a `"type"` key. A case or delivery only names people
    already yielded. Lazy: nothing is generated before the first record is asked for.
    """
    _check(count, cases_per_person, deliveries_per_person)
    return _records(Population(seed, cases_per_person, deliveries_per_person), count)


def write_jsonl(
    out: BinaryIO,
    count: int,
    *,
    seed: int,
    cases_per_person: float = 0.2,
    deliveries_per_person: float = 0.5,
) -> int:
    """Write the records of `generate` to `out` as JSON Lines (UTF-8, non-ASCII kept);
    return the number of lines written."""
    _check(count, cases_per_person, deliveries_per_person)
    population = Population(seed, cases_per_person, deliveries_per_person)
    dumps = orjson.dumps
    lines = 0
    for chunk in population.chunks(count):
        # Appending each line to one buffer frees it at once; keeping a chunk's worth of
        # small bytes objects alive to join them costs several times the encoding itself.
        buffer = bytearray()
        for record in chunk:
            buffer += dumps(record)
            buffer += b"\n"
        out.write(buffer)
        lines += len(chunk)
    return lines


def _records(population: Population, count: int) -> Iterator[Record]:
    for chunk in population.chunks(count):
        yield from chunk


def _check(count: int, cases_per_person: float, deliveries_per_person: float) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError("count must be a non-negative integer")
    for label, rate in (
        ("cases_per_person", cases_per_person),
        ("deliveries_per_person", deliveries_per_person),
    ):
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"{label} must be a finite, non-negative number")
