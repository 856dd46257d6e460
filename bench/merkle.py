"""Throughput of the access log's Merkle math, in memory, on synthetic entries.

Prints appends per second of CompactRange.append, the time to recompute a root from
raw entries (leaf hashing plus root_of), and inclusion proofs generated and verified
per second against a dict of stored nodes, and the same for consistency proofs;
asserts nothing.

    python bench/merkle.py [--entries N] [--entry-size BYTES] [--proofs N] [--seed N]
"""

from __future__ import annotations

import argparse
import random
import resource
import time

from custodes.audit.merkle import (
    CompactRange,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_of,
    subtree_root,
    verify_consistency,
    verify_inclusion,
)


def synthetic_entries(count: int, size: int, rng: random.Random) -> list[bytes]:
    # Distinct entries of a realistic size; a shared random tail keeps generation cheap.
    tail = rng.randbytes(max(size - 12, 0))
    return [b"%011d:" % i + tail for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--entry-size", type=int, default=200)
    parser.add_argument("--proofs", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=6962)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    n = args.entries

    entries = synthetic_entries(n, args.entry_size, rng)
    print(f"entries: {n:,} of {args.entry_size} bytes")

    t0 = time.perf_counter()
    leaves = [leaf_hash(e) for e in entries]
    t1 = time.perf_counter()
    root = root_of(leaves)
    t2 = time.perf_counter()
    print(f"root from entries: {t2 - t0:.2f} s", end=" ")
    print(f"(leaf hashing {t1 - t0:.2f} s, root_of {t2 - t1:.2f} s)")

    frontier = CompactRange()
    nodes: dict[tuple[int, int], bytes] = {}
    t0 = time.perf_counter()
    for leaf in leaves:
        frontier.append(leaf)
    t1 = time.perf_counter()
    print(f"CompactRange.append: {n / (t1 - t0):,.0f} appends/s")
    print(f"frontier root agrees with root_of: {'yes' if frontier.root() == root else 'NO'}")

    # Storing what append returns is what the log does; timed apart from the pure append.
    frontier = CompactRange()
    t0 = time.perf_counter()
    for leaf in leaves:
        for level, index, h in frontier.append(leaf):
            nodes[level, index] = h
    t1 = time.perf_counter()
    print(f"append + store in dict: {n / (t1 - t0):,.0f} appends/s, {len(nodes):,} nodes")

    def get_node(level: int, index: int) -> bytes:
        return nodes[level, index]

    indexes = [rng.randrange(n) for _ in range(args.proofs)]
    t0 = time.perf_counter()
    proofs = [inclusion_proof(i, n, get_node) for i in indexes]
    t1 = time.perf_counter()
    print(f"inclusion proofs generated: {len(proofs) / (t1 - t0):,.0f}/s ({len(proofs[0])} hashes)")

    t0 = time.perf_counter()
    for i, proof in zip(indexes, proofs, strict=True):
        verify_inclusion(leaves[i], i, n, proof, root)
    t1 = time.perf_counter()
    print(f"inclusion proofs verified: {len(proofs) / (t1 - t0):,.0f}/s")

    pairs = [sorted((rng.randrange(1, n + 1), n)) for _ in range(args.proofs)]
    t0 = time.perf_counter()
    cproofs = [consistency_proof(a, b, get_node) for a, b in pairs]
    t1 = time.perf_counter()
    print(f"consistency proofs to size {n:,} generated: {len(cproofs) / (t1 - t0):,.0f}/s")
    old_roots = {a: subtree_root(0, a, get_node) for a, _ in pairs}
    t0 = time.perf_counter()
    for (a, b), proof in zip(pairs, cproofs, strict=True):
        verify_consistency(a, b, old_roots[a], root, proof)
    t1 = time.perf_counter()
    print(f"consistency proofs verified: {len(cproofs) / (t1 - t0):,.0f}/s")

    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mib:,.0f} MiB")


if __name__ == "__main__":
    main()
