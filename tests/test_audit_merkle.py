"""The access log's Merkle math: RFC 6962 known answers, the public proof vectors, and
property tests that every honest proof verifies and every tampered one is refused.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from custodes.audit.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    CompactRange,
    InvalidProof,
    NodeSource,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_of,
    subtree_root,
    verify_consistency,
    verify_inclusion,
)

# The vectors are shared data kept beside the repository, not inside it.
VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors" / "rfc6962"
REQUIRE_VECTORS = os.environ.get("CUSTODES_REQUIRE_VECTORS") == "1"

# The eight leaves of the README's reference tree (RFC 6962 test data), as hex.
REFERENCE_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]


# ---------------------------------------------------------------- helpers


class Log:
    """A log grown leaf by leaf, keeping every node append reports and every root."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self.nodes: dict[tuple[int, int], bytes] = {}
        self.roots = [EMPTY_ROOT]
        self.frontier = CompactRange()
        for leaf in leaves:
            for level, index, h in self.frontier.append(leaf):
                assert (level, index) not in self.nodes
                self.nodes[level, index] = h
            self.roots.append(self.frontier.root())

    def source(self, size: int) -> NodeSource:
        """A node source that refuses nodes not yet complete in a tree of ``size``."""

        def get_node(level: int, index: int) -> bytes:
            assert (index + 1) << level <= size, "asked for a node beyond the tree"
            return self.nodes[level, index]

        return get_node


def flip(h: bytes, bit: int) -> bytes:
    bit %= len(h) * 8
    out = bytearray(h)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def rejects(check: Any, *args: Any) -> bool:
    try:
        check(*args)
    except InvalidProof:
        return True
    return False


def _entries(size: int, fillers: list[bytes]) -> list[bytes]:
    # The position prefix keeps entries distinct, so no leaf can stand in for another.
    return [i.to_bytes(4, "big") + fillers[i % len(fillers)] for i in range(size)]


# Logs of 2 to 301 entries: every shape of the tree's right edge up to nine levels.
entries = st.builds(
    _entries,
    st.integers(min_value=2, max_value=301),
    st.lists(st.binary(max_size=40), min_size=1, max_size=8),
)


def grown(data: list[bytes]) -> Log:
    return Log([leaf_hash(d) for d in data])


# ---------------------------------------------------------------- known answers


def test_leaf_hash_of_empty_entry_is_the_rfc_known_answer() -> None:
    assert leaf_hash(b"").hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT.hex() == ("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert root_of([]) == EMPTY_ROOT
    assert CompactRange().root() == EMPTY_ROOT
    assert len(EMPTY_ROOT) == HASH_SIZE


def test_reference_tree_of_eight_leaves_has_the_rfc_root() -> None:
    want = "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    hashes = [leaf_hash(d) for d in REFERENCE_LEAVES]
    assert root_of(hashes).hex() == want
    assert Log(hashes).frontier.root().hex() == want


def test_node_hash_is_domain_separated_from_leaf_hash() -> None:
    left, right = leaf_hash(b"a"), leaf_hash(b"b")
    assert node_hash(left, right) != leaf_hash(left + right)


# ---------------------------------------------------------------- public vectors


def _vector_params(kind: str) -> list[Any]:
    files = sorted((VECTORS / kind).glob("**/*.json")) if VECTORS.is_dir() else []
    if not files:
        return [pytest.param(None, id="absent")]
    return [pytest.param(f, id=f.relative_to(VECTORS / kind).as_posix()) for f in files]


def _load_vector(path: Path | None) -> dict[str, Any]:
    if path is None:
        reason = "RFC 6962 vectors not found in shared/vectors/rfc6962 beside the repository"
        if REQUIRE_VECTORS:
            pytest.fail(reason + " (CUSTODES_REQUIRE_VECTORS=1)")
        pytest.skip(reason)
    vector: dict[str, Any] = json.loads(path.read_text())
    return vector


def _b64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def _proof(vector: dict[str, Any]) -> list[bytes]:
    return [_b64(p) for p in vector["proof"] or []]


@pytest.mark.parametrize("path", _vector_params("inclusion"))
def test_inclusion_vector(path: Path | None) -> None:
    v = _load_vector(path)
    refused = rejects(
        verify_inclusion,
        _b64(v["leafHash"]),
        v["leafIdx"],
        v["treeSize"],
        _proof(v),
        _b64(v["root"]),
    )
    assert refused == v["wantErr"], v["desc"]


@pytest.mark.parametrize("path", _vector_params("consistency"))
def test_consistency_vector(path: Path | None) -> None:
    v = _load_vector(path)
    refused = rejects(
        verify_consistency,
        v["size1"],
        v["size2"],
        _b64(v["root1"]),
        _b64(v["root2"]),
        _proof(v),
    )
    assert refused == v["wantErr"], v["desc"]


def _happy_paths(kind: str) -> list[Any]:
    params = _vector_params(kind)
    if params[0].values[0] is None:
        return params
    return [p for p in params if p.values[0].name == "happy-path.json"]


@pytest.mark.parametrize("path", _happy_paths("inclusion"))
def test_generated_inclusion_proof_equals_vector(path: Path | None) -> None:
    v = _load_vector(path)
    log = Log([leaf_hash(d) for d in REFERENCE_LEAVES])
    size = v["treeSize"]
    if _b64(v["root"]) != log.roots[size]:
        pytest.skip("vector is not over the reference tree")
    assert inclusion_proof(v["leafIdx"], size, log.source(size)) == _proof(v)


@pytest.mark.parametrize("path", _happy_paths("consistency"))
def test_generated_consistency_proof_equals_vector(path: Path | None) -> None:
    v = _load_vector(path)
    log = Log([leaf_hash(d) for d in REFERENCE_LEAVES])
    size1, size2 = v["size1"], v["size2"]
    if (_b64(v["root1"]), _b64(v["root2"])) != (log.roots[size1], log.roots[size2]):
        pytest.skip("vector is not over the reference tree")
    assert consistency_proof(size1, size2, log.source(size2)) == _proof(v)


# ---------------------------------------------------------------- the frontier


@given(entries)
def test_frontier_root_equals_full_recomputation_at_every_size(data: list[bytes]) -> None:
    log = grown(data)
    for size in range(len(data) + 1):
        assert log.roots[size] == root_of(log.leaves[:size])


@given(entries)
def test_append_reports_every_completed_subtree_exactly_once(data: list[bytes]) -> None:
    log = grown(data)
    n = len(data)
    # A tree of n leaves has 2n - popcount(n) complete perfect subtrees.
    assert len(log.nodes) == 2 * n - n.bit_count()
    for (level, index), h in log.nodes.items():
        assert h == root_of(log.leaves[index << level : (index + 1) << level])


@given(entries, st.data())
def test_frontier_rebuilt_from_storage_is_identical(data: list[bytes], draw: st.DataObject) -> None:
    log = grown(data)
    size = draw.draw(st.integers(0, len(data)))
    rebuilt = CompactRange.from_source(size, log.source(size))
    assert rebuilt.size == size
    assert rebuilt.root() == log.roots[size]
    assert rebuilt == CompactRange.from_source(size, log.source(size))
    if size == len(data):
        assert rebuilt == log.frontier
        assert rebuilt.peaks == log.frontier.peaks
    # A rebuilt frontier keeps growing exactly like the original did.
    for leaf in log.leaves[size:]:
        rebuilt.append(leaf)
    assert rebuilt == log.frontier


def test_frontier_copy_is_independent() -> None:
    frontier = CompactRange()
    frontier.append(leaf_hash(b"first"))
    snapshot = frontier.copy()
    frontier.append(leaf_hash(b"second"))
    assert snapshot.size == 1
    assert snapshot.root() == leaf_hash(b"first")
    assert frontier.size == 2


def test_frontier_refuses_peaks_that_do_not_fit_its_size() -> None:
    with pytest.raises(ValueError):
        CompactRange(3, [leaf_hash(b"only one")])
    with pytest.raises(ValueError):
        CompactRange(1, [b"short"])
    with pytest.raises(ValueError):
        CompactRange().append(b"not a hash")


# ---------------------------------------------------------------- honest proofs


@given(entries, st.data())
def test_every_inclusion_proof_verifies(data: list[bytes], draw: st.DataObject) -> None:
    log = grown(data)
    size = draw.draw(st.integers(1, len(data)))
    index = draw.draw(st.integers(0, size - 1))
    proof = inclusion_proof(index, size, log.source(size))
    verify_inclusion(log.leaves[index], index, size, proof, log.roots[size])


@given(entries, st.data())
def test_every_consistency_proof_verifies(data: list[bytes], draw: st.DataObject) -> None:
    log = grown(data)
    size2 = draw.draw(st.integers(1, len(data)))
    size1 = draw.draw(st.integers(1, size2))
    proof = consistency_proof(size1, size2, log.source(size2))
    verify_consistency(size1, size2, log.roots[size1], log.roots[size2], proof)


@given(entries, st.data())
def test_subtree_root_of_aligned_range_equals_recomputation(
    data: list[bytes], draw: st.DataObject
) -> None:
    log = grown(data)
    n = len(data)
    level = draw.draw(st.integers(0, (n - 1).bit_length() - 1))
    start = draw.draw(st.integers(0, (n - 1) >> level)) << level
    # Stored nodes cover the range only if it is no longer than its start's alignment.
    longest = n - start if start == 0 else min(1 << level, n - start)
    end = start + draw.draw(st.integers(0, longest))
    assert subtree_root(start, end, log.source(n)) == root_of(log.leaves[start:end])


def test_subtree_root_refuses_ranges_that_are_not_stored_subtrees() -> None:
    log = grown([b"%d" % i for i in range(8)])
    with pytest.raises(ValueError):
        subtree_root(1, 3, log.source(8))
    with pytest.raises(ValueError):
        subtree_root(5, 4, log.source(8))


def test_proof_generation_refuses_impossible_sizes() -> None:
    log = grown([b"a", b"b", b"c"])
    with pytest.raises(ValueError):
        inclusion_proof(3, 3, log.source(3))
    with pytest.raises(ValueError):
        consistency_proof(0, 3, log.source(3))
    with pytest.raises(ValueError):
        consistency_proof(3, 2, log.source(3))
    assert consistency_proof(3, 3, log.source(3)) == []


# ---------------------------------------------------------------- tampering


@given(entries, st.data())
def test_flipped_bit_in_inclusion_proof_root_or_leaf_is_detected(
    data: list[bytes], draw: st.DataObject
) -> None:
    log = grown(data)
    size = len(data)
    index = draw.draw(st.integers(0, size - 1))
    proof = inclusion_proof(index, size, log.source(size))
    leaf, root = log.leaves[index], log.roots[size]
    bit = draw.draw(st.integers(0, HASH_SIZE * 8 - 1))
    for position in range(len(proof)):
        forged = [flip(h, bit) if i == position else h for i, h in enumerate(proof)]
        assert rejects(verify_inclusion, leaf, index, size, forged, root)
    assert rejects(verify_inclusion, flip(leaf, bit), index, size, proof, root)
    assert rejects(verify_inclusion, leaf, index, size, proof, flip(root, bit))


@given(entries, st.data())
def test_inclusion_proof_for_neighbouring_leaf_is_refused(
    data: list[bytes], draw: st.DataObject
) -> None:
    log = grown(data)
    size = len(data)
    index = draw.draw(st.integers(0, size - 1))
    proof = inclusion_proof(index, size, log.source(size))
    for other in (index - 1, index + 1):
        assert rejects(verify_inclusion, log.leaves[index], other, size, proof, log.roots[size])


@given(entries, st.data())
def test_inclusion_proof_replayed_against_neighbouring_checkpoint_is_refused(
    data: list[bytes], draw: st.DataObject
) -> None:
    # The proof alone does not fix the tree size (RFC 9162); the root does. A checkpoint
    # pairs the two, so the attack is a proof shown against a neighbouring checkpoint.
    log = grown(data)
    size = len(data) - 1
    index = draw.draw(st.integers(0, size - 1))
    proof = inclusion_proof(index, size, log.source(size))
    leaf = log.leaves[index]
    for other in (size - 1, size + 1):
        root = log.roots[other]
        assert rejects(verify_inclusion, leaf, index, other, proof, root)


@given(entries, st.data())
def test_flipped_bit_in_consistency_proof_or_either_root_is_detected(
    data: list[bytes], draw: st.DataObject
) -> None:
    log = grown(data)
    size2 = len(data)
    size1 = draw.draw(st.integers(1, size2))
    proof = consistency_proof(size1, size2, log.source(size2))
    root1, root2 = log.roots[size1], log.roots[size2]
    bit = draw.draw(st.integers(0, HASH_SIZE * 8 - 1))
    for position in range(len(proof)):
        forged = [flip(h, bit) if i == position else h for i, h in enumerate(proof)]
        assert rejects(verify_consistency, size1, size2, root1, root2, forged)
    assert rejects(verify_consistency, size1, size2, flip(root1, bit), root2, proof)
    assert rejects(verify_consistency, size1, size2, root1, flip(root2, bit), proof)


@given(entries, st.data())
def test_consistency_proof_with_a_size_off_by_one_is_refused(
    data: list[bytes], draw: st.DataObject
) -> None:
    log = grown(data)
    size2 = len(data) - 1
    size1 = draw.draw(st.integers(1, size2))
    proof = consistency_proof(size1, size2, log.source(size2))
    root1, root2 = log.roots[size1], log.roots[size2]
    for other in (size1 - 1, size1 + 1):
        assert rejects(verify_consistency, other, size2, root1, root2, proof)
        assert rejects(verify_consistency, other, size2, log.roots[other], root2, proof)
    for other in (size2 - 1, size2 + 1):
        assert rejects(verify_consistency, size1, other, root1, log.roots[other], proof)


@given(entries, st.data())
def test_truncated_or_extended_proofs_are_refused(data: list[bytes], draw: st.DataObject) -> None:
    log = grown(data)
    size = len(data)
    index = draw.draw(st.integers(0, size - 1))
    size1 = draw.draw(st.integers(1, size - 1))
    incl = inclusion_proof(index, size, log.source(size))
    cons = consistency_proof(size1, size, log.source(size))
    leaf, root1, root2 = log.leaves[index], log.roots[size1], log.roots[size]
    for forged in (incl[:-1], [*incl, root2], [root2, *incl]):
        assert rejects(verify_inclusion, leaf, index, size, forged, root2)
    for forged in (cons[:-1], [*cons, root2], [root1, *cons]):
        assert rejects(verify_consistency, size1, size, root1, root2, forged)


def test_proof_hash_of_wrong_length_is_refused() -> None:
    log = grown([b"%d" % i for i in range(5)])
    proof = inclusion_proof(1, 5, log.source(5))
    forged = [proof[0] + b"\x00", *proof[1:]]
    with pytest.raises(InvalidProof, match="not 32 bytes"):
        verify_inclusion(log.leaves[1], 1, 5, forged, log.roots[5])


def test_consistency_with_the_empty_tree_is_refused() -> None:
    with pytest.raises(InvalidProof):
        verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    with pytest.raises(InvalidProof):
        verify_consistency(0, 1, EMPTY_ROOT, leaf_hash(b""), [])


@settings(max_examples=25)
@given(entries)
def test_refusal_messages_carry_no_hash(data: list[bytes]) -> None:
    log = grown(data)
    size = len(data)
    proof = inclusion_proof(0, size, log.source(size))
    root = flip(log.roots[size], 0)
    with pytest.raises(InvalidProof) as refused:
        verify_inclusion(log.leaves[0], 0, size, proof, root)
    message = str(refused.value)
    for h in (*proof, root, log.roots[size], log.leaves[0]):
        assert h.hex() not in message
        assert base64.b64encode(h).decode() not in message
