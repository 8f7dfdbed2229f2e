"""Merkle tree hashing and proofs of Certificate Transparency (RFC 6962, as revised by RFC 9162).

The definitions follow RFC 9162 section 2.1: a leaf hashes as SHA-256(0x00 || data) and an interior
node as SHA-256(0x01 || left || right), the distinct prefixes keeping a leaf from posing as a node;
a tree of n > 1 leaves splits at the largest power of two smaller than n (2.1.1); inclusion proofs
are the audit paths of 2.1.3 and consistency proofs those of 2.1.4, and both verifiers are the
step-by-step algorithms of 2.1.3.2 and 2.1.4.2. Keeping to the standard lets any RFC 9162 tool
check the checkpoints this package publishes. Pure Python: hashlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import string
from collections.abc import Sequence
from typing import Any

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) of RFC 9162 section 2.1.1

_HEX = frozenset(string.digits + "abcdef")


def leaf_hash(data: bytes) -> bytes:
    """The hash of one leaf. ``data``: the leaf's bytes (an entry of the log)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The hash of an interior node. ``left``, ``right``: its children's hashes."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2): RFC 9162's k."""
    return 1 << ((n - 1).bit_length() - 1)


class Frontier:
    """An append-only tree kept as the roots of its perfect subtrees, largest first.

    Those roots are one per set bit of ``size`` (its binary decomposition); they are all a log
    must keep to extend the tree and compute its root, so a checkpoint can be stored as this.
    """

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @property
    def size(self) -> int:
        """The number of leaves appended so far."""
        return self._size

    def append(self, leaf_hash: bytes) -> None:
        """Add one leaf. ``leaf_hash``: its 32-byte :func:`leaf_hash` (not the raw data)."""
        if not _is_hash(leaf_hash):
            raise ValueError(f"leaf_hash must be {HASH_SIZE} bytes")
        self._hashes.append(leaf_hash)
        # Each trailing 1 bit of the old size is a perfect subtree of the same height as the one
        # being completed, so they merge like a binary carry: amortised one merge per append.
        n = self._size
        while n & 1:
            right = self._hashes.pop()
            self._hashes.append(node_hash(self._hashes.pop(), right))
            n >>= 1
        self._size += 1

    def root(self) -> bytes:
        """MTH of all leaves so far (:data:`EMPTY_ROOT` for none)."""
        if not self._hashes:
            return EMPTY_ROOT
        # The first subtree covers exactly the largest power of two below size, i.e. RFC 9162's
        # left half, so folding from the right reproduces MTH's recursion.
        acc = self._hashes[-1]
        for h in reversed(self._hashes[:-1]):
            acc = node_hash(h, acc)
        return acc

    def copy(self) -> Frontier:
        """An independent copy (appending to one leaves the other as it was)."""
        other = Frontier()
        other._size, other._hashes = self._size, list(self._hashes)
        return other

    def to_json(self) -> dict[str, Any]:
        """``{"size": int, "hashes": [hex, ...]}``, the subtree roots largest first."""
        return {"size": self._size, "hashes": hex_list(self._hashes)}

    @classmethod
    def from_json(cls, doc: Any) -> Frontier:
        """Rebuild from :meth:`to_json`'s output ``doc``; ValueError names the bad field."""
        if not isinstance(doc, dict):
            raise ValueError("frontier: expected an object with 'size' and 'hashes'")
        size, items = doc.get("size"), doc.get("hashes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("frontier.size: expected a non-negative integer")
        if not isinstance(items, list):
            raise ValueError("frontier.hashes: expected a list of hex strings")
        if len(items) != size.bit_count():
            raise ValueError(
                f"frontier.hashes: size {size} needs {size.bit_count()} hashes, got {len(items)}"
            )
        out = cls()
        out._size, out._hashes = size, from_hex_list(items, field="frontier.hashes")
        return out


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH (RFC 9162 section 2.1.1) of ``hashes``, the leaf hashes in order; O(n)."""
    frontier = Frontier()
    for h in hashes:
        frontier.append(h)
    return frontier.root()


def _checked_size(hashes: Sequence[bytes], size: int | None) -> int:
    n = len(hashes) if size is None else size
    if not 0 <= n <= len(hashes):
        raise ValueError(f"size {n} is outside 0..{len(hashes)}")
    return n


def inclusion_proof(hashes: Sequence[bytes], index: int, *, size: int | None = None) -> list[bytes]:
    """PATH(index, D[size]) of RFC 9162 section 2.1.3.1, leaf sibling first.

    ``hashes``: the log's leaf hashes; ``index``: the 0-based leaf to prove; ``size``: the tree
    size the proof is against (default: all of ``hashes``).
    """
    n = _checked_size(hashes, size)
    if not 0 <= index < n:
        raise ValueError(f"index {index} is outside 0..{n - 1}")
    # Walk down from the root; each level contributes the MTH of the half not holding the leaf.
    # The RFC lists the deepest sibling first, hence the reversal.
    proof, lo, hi = [], 0, n
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            proof.append(root_from_leaf_hashes(hashes[lo + k : hi]))
            hi = lo + k
        else:
            proof.append(root_from_leaf_hashes(hashes[lo : lo + k]))
            lo += k
    proof.reverse()
    return proof


def verify_inclusion(
    *, leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows leaf hash ``leaf`` at 0-based ``index`` in the tree of ``size``
    leaves whose MTH is ``root`` (RFC 9162 section 2.1.3.2). Never raises."""
    if not (_is_hash(leaf) and _is_hash(root) and all(_is_hash(p) for p in proof)):
        return False
    if not (isinstance(index, int) and isinstance(size, int)) or not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:  # more proof than tree levels
            return False
        if fn & 1 or fn == sn:  # we are a right child, or the last node of a level
            r = node_hash(p, r)
            if not fn & 1:  # skip the levels where the last node has no sibling
                while not fn & 1 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and hmac.compare_digest(r, root)


def consistency_proof(
    hashes: Sequence[bytes], old_size: int, *, size: int | None = None
) -> list[bytes]:
    """PROOF(old_size, D[size]) of RFC 9162 section 2.1.4.1 (empty when the sizes are equal).

    ``hashes``: the log's leaf hashes; ``old_size``: the earlier tree size, 1..size (the RFC has
    no proof from the empty tree); ``size``: the later tree size (default: all of ``hashes``).
    """
    n = _checked_size(hashes, size)
    if not 0 < old_size <= n:
        raise ValueError(f"old_size {old_size} is outside 1..{n}")
    # SUBPROOF(m, D[lo:hi], b) unrolled: m counts the old leaves inside [lo, hi); b stays True
    # while [lo, hi) starts at 0, where the verifier knows the old root and needs no hash.
    proof, lo, hi, m, b = [], 0, n, old_size, True
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            proof.append(root_from_leaf_hashes(hashes[lo + k : hi]))
            hi = lo + k
        else:
            proof.append(root_from_leaf_hashes(hashes[lo : lo + k]))
            lo, m, b = lo + k, m - k, False
    if not b:
        proof.append(root_from_leaf_hashes(hashes[lo:hi]))
    proof.reverse()
    return proof


def verify_consistency(
    *, old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> bool:
    """Whether ``proof`` shows the tree of ``old_size`` leaves with MTH ``old_root`` is a prefix
    of the tree of ``new_size`` leaves with MTH ``new_root`` (RFC 9162 section 2.1.4.2).

    Equal sizes need an empty proof and equal roots; ``old_size`` 0 gets False, as the RFC
    defines no proof for it. Never raises.
    """
    if not (_is_hash(old_root) and _is_hash(new_root) and all(_is_hash(p) for p in proof)):
        return False
    if not (isinstance(old_size, int) and isinstance(new_size, int)):
        return False
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and hmac.compare_digest(old_root, new_root)
    if old_size == 0 or not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # the old tree is one perfect subtree: its root is known
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:  # climb to the root of the subtree that the path starts from
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:  # a left sibling: part of both trees
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:  # a right sibling: only in the new tree
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and hmac.compare_digest(fr, old_root) and hmac.compare_digest(sr, new_root)


def hex_list(hashes: Sequence[bytes]) -> list[str]:
    """``hashes`` as lowercase hex strings, for JSON."""
    return [h.hex() for h in hashes]


def from_hex_list(items: Any, *, field: str) -> list[bytes]:
    """Parse ``items``, a list of 64-char lowercase hex strings, into hashes; ``field`` names
    the list in the ValueError. Strict (no spaces, no capitals) so each hash has one encoding."""
    if not isinstance(items, list):
        raise ValueError(f"{field}: expected a list of hex strings")
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, str) and len(item) == 2 * HASH_SIZE and set(item) <= _HEX):
            raise ValueError(f"{field}[{i}]: expected {2 * HASH_SIZE} lowercase hex characters")
        out.append(bytes.fromhex(item))
    return out
