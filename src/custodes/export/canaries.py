"""An export's canaries: a few synthetic people (or records) of its own, made by the
synth engine under a random seed, redacted exactly as the real rows and put among them at
random places. No other export holds them, so finding one in a leak names the export.

Pure: the seed and the positions come from the caller.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from custodes.synth import generate

MIN_CANARIES = 3
MAX_CANARIES = 20


def canary_count(rows: int) -> int:
    """How many canaries an export of `rows` real rows carries: 1%, at least 3, at most 20."""
    return max(MIN_CANARIES, min(MAX_CANARIES, rows // 100))


def synthetic_records(record_type: str, count: int, seed: int) -> list[Mapping[str, object]]:
    """`count` synthetic records of a type the synth engine makes (person, case,
    delivery), the same for the same seed; fewer only for a type it does not make."""
    people = max(count, 8) * 4
    found: list[Mapping[str, object]] = []
    for record in generate(people, seed=seed, cases_per_person=0.5, deliveries_per_person=0.5):
        if record.get("type") == record_type:
            found.append({k: v for k, v in record.items() if k != "type"})
            if len(found) == count:
                break
    return found


def placed(
    rows: list[dict[str, str]], canaries: list[dict[str, str]], seed: int
) -> list[dict[str, str]]:
    """The rows with the canaries put in at random places (decided by `seed`)."""
    rng = random.Random(seed)  # noqa: S311 - seeded from the OS source: places, not keys
    out = list(rows)
    for canary in canaries:
        out.insert(rng.randint(0, len(out)), canary)
    return out
