"""RFC 6962 / RFC 9162 Merkle tree math for the access log: hashes, roots, proofs.

Pure functions over hashes; storage is reached only through a ``NodeSource`` callable,
so the same code proves from SQLite, from memory, or from a verifier's own recomputation.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "CompactRange",
    "Fold",
    "InvalidProof",
    "NodeSource",
    "consistency_proof",
    "fold",
    "inclusion_proof",
    "inclusion_proof_plan",
    "inclusion_proof_positions",
    "leaf_hash",
    "node_hash",
    "peak_positions",
    "root_of",
    "subtree_root",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

# Domain-separation prefixes (RFC 6962 §2.1): a leaf can never be passed off as a node.
_LEAF = b"\x00"
_NODE = b"\x01"

NodeSource = Callable[[int, int], bytes]
"""Returns the stored perfect-subtree node ``(level, index)``.

Node ``(l, i)`` covers leaves ``[i * 2**l, (i + 1) * 2**l)``; level 0 holds leaf hashes.
"""


class InvalidProof(ValueError):
    """A Merkle proof, root or size failed verification.

    The message names sizes and indexes only, never a hash or any logged data.
    """


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data): the hash of one log entry."""
    return hashlib.sha256(_LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return hashlib.sha256(_NODE + left + right).digest()


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle tree hash (RFC 6962 §2.1) of a list of leaf hashes.

    Pairs each level left to right and carries an odd last node up unchanged, which
    yields exactly the left-balanced RFC tree without recursion.
    """
    if not leaf_hashes:
        return EMPTY_ROOT
    if any(len(h) != HASH_SIZE for h in leaf_hashes):
        raise ValueError(f"every leaf hash must be {HASH_SIZE} bytes")
    # Local bindings: this loop runs once per node, a million times for a large log.
    sha = hashlib.sha256
    prefix = _NODE
    level = leaf_hashes
    while len(level) > 1:
        pairs = iter(level)
        nxt = [sha(prefix + a + b).digest() for a, b in zip(pairs, pairs, strict=False)]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def peak_positions(size: int) -> list[tuple[int, int]]:
    """The (level, index) of each peak of a tree of ``size`` leaves, left to right: the
    nodes a compact range holds, so that a caller can fetch them all in one read."""
    if size < 0:
        raise ValueError("size must not be negative")
    positions = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            positions.append((level, start >> level))
            start += 1 << level
    return positions


class CompactRange:
    """The right frontier of a log: one hash per perfect subtree in the size's binary form.

    ``peaks`` run left to right, largest subtree first. Appending a leaf merges equal-sized
    peaks, so the frontier never holds more than log2(size) + 1 hashes.
    """

    __slots__ = ("_peaks", "_size")

    def __init__(self, size: int = 0, peaks: Sequence[bytes] = ()) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        if len(peaks) != size.bit_count():
            raise ValueError(
                f"a tree of size {size} has {size.bit_count()} peaks, not {len(peaks)}"
            )
        if any(len(p) != HASH_SIZE for p in peaks):
            raise ValueError(f"every peak must be {HASH_SIZE} bytes")
        self._size = size
        self._peaks = list(peaks)

    @classmethod
    def from_source(cls, size: int, get_node: NodeSource) -> CompactRange:
        """Rebuild the frontier of a tree of ``size`` leaves from stored nodes."""
        return cls(size, [get_node(level, index) for level, index in peak_positions(size)])

    @property
    def size(self) -> int:
        return self._size

    @property
    def peaks(self) -> tuple[bytes, ...]:
        return tuple(self._peaks)

    def copy(self) -> CompactRange:
        return CompactRange(self._size, self._peaks)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add one leaf hash; return every node it completes, the leaf included.

        Each node comes as ``(level, index, hash)``, lowest level first, ready to store.
        """
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash must be {HASH_SIZE} bytes")
        peaks = self._peaks
        index = self._size
        completed = [(0, index, leaf)]
        node = leaf
        level = 0
        # Each trailing one bit of the old size is a peak of the same height as the
        # node just completed: merge them until a zero bit leaves room.
        while index & 1:
            node = node_hash(peaks.pop(), node)
            index >>= 1
            level += 1
            completed.append((level, index, node))
        peaks.append(node)
        self._size += 1
        return completed

    def root(self) -> bytes:
        """The Merkle tree hash of everything appended so far."""
        peaks = self._peaks
        if not peaks:
            return EMPTY_ROOT
        node = peaks[-1]
        for peak in reversed(peaks[:-1]):
            node = node_hash(peak, node)
        return node

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompactRange):
            return NotImplemented
        return self._size == other._size and self._peaks == other._peaks

    __hash__ = None  # type: ignore[assignment]  # mutable: appends change equality

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size})"


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n >= 2): the RFC's left subtree size."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_root(start: int, end: int, get_node: NodeSource) -> bytes:
    """The Merkle tree hash of leaves ``[start, end)``, folded from stored perfect nodes.

    The range must start on a multiple of the largest power of two not above its length
    (true of every range a proof needs) so that each piece is a stored node.
    """
    if not 0 <= start <= end:
        raise ValueError(f"leaf range [{start}, {end}) is not a range")
    n = end - start
    if n == 0:
        return EMPTY_ROOT
    return fold([get_node(level, index) for level, index in _subtree_positions(start, end)])


def _subtree_positions(start: int, end: int) -> list[tuple[int, int]]:
    """The stored nodes, left to right, that subtree_root folds for leaves [start, end)."""
    n = end - start
    if start % (1 << (n.bit_length() - 1)):
        raise ValueError(f"leaf range [{start}, {end}) is not aligned to stored subtrees")
    positions = []
    pos = start
    for level in range(n.bit_length() - 1, -1, -1):
        if n >> level & 1:
            positions.append((level, pos >> level))
            pos += 1 << level
    return positions


class Fold(tuple[tuple[int, int], ...]):
    """Adjacent stored nodes (level, index), left to right, whose fold is one hash of a
    proof: where the proof passes the tree's right edge."""

    __slots__ = ()


def inclusion_proof_plan(index: int, size: int) -> list[tuple[int, int] | Fold]:
    """What inclusion_proof reads for leaf ``index`` of ``size``, hash by hash of the proof
    (bottom up): each hash is one stored node (level, index), or a Fold of a few. It
    depends on the two numbers alone, so a caller can fetch every node of many proofs in
    one read first."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of size {size}")
    # The tree is perfect subtrees side by side, one for each bit set in the size; the
    # leaf's is the one of the highest bit in which its index and the size differ. Inside
    # it every sibling is a stored node; above it, the path is the same for all its leaves.
    height = (size ^ index).bit_length() - 1
    plan: list[tuple[int, int] | Fold] = [(level, (index >> level) ^ 1) for level in range(height)]
    plan.extend(_plan_above(size, height))
    return plan


@functools.lru_cache(maxsize=1 << 12)
def _plan_above(size: int, height: int) -> tuple[tuple[int, int] | Fold, ...]:
    """The hashes of a proof above the perfect subtree of ``height`` that holds its leaf
    in a tree of ``size``, bottom up: computed once for all that subtree's leaves."""
    index = (size >> (height + 1)) << (height + 1)  # the subtree's first leaf
    # Walk down from the root while the subtree holding the leaf is imperfect; each
    # sibling met on the way is a stored node or a fold of a few (the right edge).
    upper: list[tuple[int, int] | Fold] = []
    start, end = 0, size
    while (end - start) & (end - start - 1):
        k = _split(end - start)
        mid = start + k
        if index < mid:
            pieces = _subtree_positions(mid, end)
            upper.append(pieces[0] if len(pieces) == 1 else Fold(pieces))
            end = mid
        else:
            upper.append((k.bit_length() - 1, start // k))
            start = mid
    return tuple(reversed(upper))


def inclusion_proof_positions(index: int, size: int) -> list[tuple[int, int]]:
    """Every stored node (level, index) that inclusion_proof reads for leaf ``index``."""
    positions: list[tuple[int, int]] = []
    for hash_ in inclusion_proof_plan(index, size):
        if isinstance(hash_, Fold):
            positions.extend(hash_)
        else:
            positions.append(hash_)
    return positions


def fold(pieces: Sequence[bytes]) -> bytes:
    """The root of adjacent perfect subtrees, largest (leftmost) first, as subtree_root
    folds them."""
    node = pieces[-1]
    for piece in reversed(pieces[:-1]):
        node = node_hash(piece, node)
    return node


def inclusion_proof(index: int, size: int, get_node: NodeSource) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 §2.1.3.1)."""
    return [
        fold([get_node(*p) for p in hash_]) if isinstance(hash_, Fold) else get_node(*hash_)
        for hash_ in inclusion_proof_plan(index, size)
    ]


def consistency_proof(size1: int, size2: int, get_node: NodeSource) -> list[bytes]:
    """The proof that the tree of ``size1`` leaves is a prefix of ``size2`` (RFC 9162 §2.1.4.1)."""
    if not 0 < size1 <= size2:
        raise ValueError(f"no consistency proof from size {size1} to size {size2}")
    proof = []
    start, end = 0, size2
    # Whether the current subtree's old part is the whole old tree, whose root the
    # verifier already holds (SUBPROOF's b flag).
    whole_old_tree = True
    while True:
        n = end - start
        m = size1 - start
        if m == n:
            if not whole_old_tree:
                proof.append(subtree_root(start, end, get_node))
            break
        k = _split(n)
        mid = start + k
        if m <= k:
            proof.append(subtree_root(mid, end, get_node))
            end = mid
        else:
            proof.append(get_node(k.bit_length() - 1, start // k))
            start = mid
            whole_old_tree = False
    proof.reverse()
    return proof


def _check_hashes(proof: Sequence[bytes]) -> None:
    for position, h in enumerate(proof):
        if len(h) != HASH_SIZE:
            raise InvalidProof(f"proof hash {position} is not {HASH_SIZE} bytes")


def _inclusion_proof_length(index: int, size: int) -> int:
    # Levels where the paths to leaf `index` and to the last leaf differ each need a
    # sibling; above them, every left turn on the path needs one too.
    inner = (index ^ (size - 1)).bit_length()
    return inner + (index >> inner).bit_count()


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` sits at ``index`` in the tree of ``size`` with ``root``.

    Follows RFC 9162 §2.1.3.2; raises ``InvalidProof`` on any failure. The proof does not
    bind ``size`` on its own: callers must take size and root together from a checkpoint.
    """
    if not 0 <= index < size:
        raise InvalidProof(f"leaf index {index} is not below tree size {size}")
    if len(leaf_hash) != HASH_SIZE:
        raise InvalidProof(f"leaf hash is not {HASH_SIZE} bytes")
    expected = _inclusion_proof_length(index, size)
    if len(proof) != expected:
        raise InvalidProof(
            f"inclusion proof for leaf {index} of {size} has {len(proof)} hashes, not {expected}"
        )
    _check_hashes(proof)
    fn, sn = index, size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            raise InvalidProof(f"inclusion proof for leaf {index} of {size} is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # On the right edge of an imperfect tree, climb past levels with no sibling.
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof(f"inclusion proof for leaf {index} of {size} is too short")
    if r != root:
        raise InvalidProof(f"inclusion proof for leaf {index} of {size} does not match the root")


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``size1`` with ``root1`` is a prefix of ``size2`` with ``root2``.

    Follows RFC 9162 §2.1.4.2; raises ``InvalidProof`` on any failure. A size1 of 0 is
    refused: every tree extends the empty one, so such a "proof" would prove nothing.
    """
    if size1 < 0 or size2 < 0:
        raise InvalidProof("tree sizes must not be negative")
    if size1 > size2:
        raise InvalidProof(f"tree size {size1} cannot be a prefix of smaller size {size2}")
    if size1 == 0:
        raise InvalidProof("consistency with the empty tree proves nothing")
    if size1 == size2:
        if proof:
            raise InvalidProof(f"equal tree sizes {size1} need an empty proof")
        # The same tree: the roots must be equal, whatever their form.
        if root1 != root2:
            raise InvalidProof(f"roots for the same tree size {size1} differ")
        return
    if not proof:
        raise InvalidProof(f"empty consistency proof from size {size1} to {size2}")
    if len(root1) != HASH_SIZE or len(root2) != HASH_SIZE:
        raise InvalidProof(f"roots are not {HASH_SIZE} bytes")
    # The largest perfect subtree ending at size1 is shared by both trees; its root is
    # root1 itself when size1 is a power of two, otherwise the proof's first hash.
    shift = (size1 & -size1).bit_length() - 1
    size1_is_perfect = size1 == 1 << shift
    expected = _inclusion_proof_length((size1 - 1) >> shift, ((size2 - 1) >> shift) + 1)
    expected += 0 if size1_is_perfect else 1
    if len(proof) != expected:
        raise InvalidProof(
            f"consistency proof from size {size1} to {size2} has {len(proof)} hashes, "
            f"not {expected}"
        )
    _check_hashes(proof)
    path = [root1, *proof] if size1_is_perfect else list(proof)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise InvalidProof(f"consistency proof from size {size1} to {size2} is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InvalidProof(f"consistency proof from size {size1} to {size2} is too short")
    if fr != root1:
        raise InvalidProof(f"consistency proof does not match the root of size {size1}")
    if sr != root2:
        raise InvalidProof(f"consistency proof does not match the root of size {size2}")
