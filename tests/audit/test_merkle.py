"""RFC 9162 Merkle trees: published vectors, a cross-check against pymerkle, and every way a
verifier must say no."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymerkle import ConsistencyProof, InclusionProof, InmemoryTree

from sparsecircuits.audit import merkle as m

# --- Known answers -------------------------------------------------------------------------------
# The Certificate Transparency reference data: leaves, the root of every prefix 1..8, and the
# published inclusion / consistency proofs. Taken (as data) from transparency-dev/merkle,
# proof/verify_test.go (inherited from google/certificate-transparency and Trillian). The Go
# vectors number leaves from 1; here `index` is 0-based.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_ROOTS = {
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    4: "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    6: "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
# (index, size, proof)
CT_INCLUSION = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]
# (old_size, new_size, proof)
CT_CONSISTENCY = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]
CT_HASHES = [m.leaf_hash(x) for x in CT_LEAVES]


def _h(items: list[str]) -> list[bytes]:
    return [bytes.fromhex(x) for x in items]


def _mth(hashes: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.1 written out recursively: the reference the fast code must match."""
    n = len(hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashes[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(hashes[:k]) + _mth(hashes[k:])).digest()


def test_primitives() -> None:
    assert m.HASH_SIZE == 32
    assert m.EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert m.leaf_hash(b"x") == hashlib.sha256(b"\x00x").digest()
    a, b = m.leaf_hash(b"a"), m.leaf_hash(b"b")
    assert m.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    assert m.root_from_leaf_hashes([]) == m.EMPTY_ROOT


def test_ct_roots() -> None:
    for size, root in CT_ROOTS.items():
        assert m.root_from_leaf_hashes(CT_HASHES[:size]).hex() == root


@pytest.mark.parametrize(("index", "size", "proof"), CT_INCLUSION)
def test_ct_inclusion(index: int, size: int, proof: list[str]) -> None:
    assert m.inclusion_proof(CT_HASHES, index, size=size) == _h(proof)
    root = bytes.fromhex(CT_ROOTS[size])
    assert m.verify_inclusion(
        leaf=CT_HASHES[index], index=index, size=size, proof=_h(proof), root=root
    )


@pytest.mark.parametrize(("old", "new", "proof"), CT_CONSISTENCY)
def test_ct_consistency(old: int, new: int, proof: list[str]) -> None:
    assert m.consistency_proof(CT_HASHES, old, size=new) == _h(proof)
    old_root, new_root = bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new])
    assert m.verify_consistency(
        old_size=old, new_size=new, proof=_h(proof), old_root=old_root, new_root=new_root
    )


# --- Cross-check against pymerkle --------------------------------------------------------------
# pymerkle (independent implementation) with its defaults: security on, i.e. leaf prefix 0x00 and
# node prefix 0x01, and sha256 of b"" for the empty tree, which is RFC 9162's hashing.
# Its inclusion path is [leaf hash, siblings bottom-up]: the RFC audit path is path[1:], compared
# for equality. Its consistency path is laid out differently (it descends to a leaf of the new
# part instead of stopping at the old tree's last subtree, and always names the old subtree's
# root); _rfc_consistency turns it into the RFC form, which must equal ours exactly.


def _pymerkle_tree(data: list[bytes]) -> InmemoryTree:
    tree = InmemoryTree(algorithm="sha256")
    assert tree.leaf_prefix == b"\x00" and tree.node_prefix == b"\x01"
    for d in data:
        tree.append_entry(d)
    return tree


def _rfc_consistency(proof: ConsistencyProof) -> list[bytes]:
    """pymerkle's consistency path (bottom-up; subset[i] == 1 where path[i] is in the old tree)
    rewritten as RFC 9162's PROOF: the new-only hashes below the lowest old-tree hash fold into
    the one subtree the RFC names, and that old-tree hash stays only if the old tree is not a
    single left-aligned subtree there (the RFC's b flag: some higher hash is old too)."""
    if proof.prior_size == proof.size:
        return []
    path, subset, rule = proof.path, proof.subset, proof.rule
    first = subset.index(1)
    assert rule[: first - 1] == [0] * (first - 1)  # all right siblings: a plain left fold
    acc = path[0]
    for h in path[1:first]:
        acc = m.node_hash(acc, h)
    head = [path[first]] if any(subset[first + 1 :]) else []
    return [*head, acc, *path[first + 1 :]]


def _pairs(n: int, draw: st.DataObject) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Every (index, n) and (old, n), plus a few random smaller trees."""
    incl = [(i, n) for i in range(n)]
    cons = [(o, n) for o in range(1, n + 1)]
    for _ in range(8):
        size = draw.draw(st.integers(1, n))
        incl.append((draw.draw(st.integers(0, size - 1)), size))
        cons.append((draw.draw(st.integers(1, size)), size))
    return incl, cons


# The length is drawn first: a plain st.lists(max_size=70) stays under ~15 leaves almost always.
LEAF_LISTS = st.integers(1, 70).flatmap(
    lambda n: st.lists(st.binary(max_size=12), min_size=n, max_size=n)
)


@settings(max_examples=60, deadline=None)
@given(data=LEAF_LISTS, draw=st.data())
def test_against_pymerkle(data: list[bytes], draw: st.DataObject) -> None:
    tree = _pymerkle_tree(data)
    hashes = [m.leaf_hash(d) for d in data]
    n = len(data)
    assert [tree.get_leaf(i + 1) for i in range(n)] == hashes
    frontier = m.Frontier()
    roots = [m.EMPTY_ROOT]
    for h in hashes:
        frontier.append(h)
        roots.append(frontier.root())
    for size in range(n + 1):
        assert roots[size] == m.root_from_leaf_hashes(hashes[:size]) == tree.get_root(size)

    incl, cons = _pairs(n, draw)
    for index, size in incl:
        ours = m.inclusion_proof(hashes, index, size=size)
        theirs = tree.prove_inclusion(index + 1, size)
        assert theirs.path == [hashes[index], *ours]
        theirs.verify(hashes[index], roots[size], index=index + 1, size=size)
        assert m.verify_inclusion(
            leaf=hashes[index], index=index, size=size, proof=ours, root=roots[size]
        )
    for old, size in cons:
        ours = m.consistency_proof(hashes, old, size=size)
        theirs = tree.prove_consistency(old, size)
        assert _rfc_consistency(theirs) == ours
        theirs.verify(roots[old], roots[size], prior_size=old, later_size=size)
        assert m.verify_consistency(
            old_size=old, new_size=size, proof=ours, old_root=roots[old], new_root=roots[size]
        )


def test_pymerkle_proofs_are_the_classes_we_expect() -> None:
    # Guards the cross-check: a pymerkle upgrade that renames these would fail loudly here.
    tree = _pymerkle_tree([b"a", b"b", b"c"])
    assert isinstance(tree.prove_inclusion(1, 3), InclusionProof)
    assert isinstance(tree.prove_consistency(1, 3), ConsistencyProof)
    assert tree.get_root(0) == m.EMPTY_ROOT


# --- Every check fails when it should -----------------------------------------------------------
TREE = [m.leaf_hash(bytes([i, i * 3 % 256])) for i in range(21)]
ROOTS = [_mth(TREE[:n]) for n in range(len(TREE) + 1)]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _flip(proof: list[bytes], i: int) -> list[bytes]:
    out = list(proof)
    out[i] = bytes([out[i][0] ^ 0x08]) + out[i][1:]
    return out


def _inclusion_probes(index: int, size: int, proof: list[bytes]) -> list[dict]:
    root, leaf = ROOTS[size], TREE[index]
    base = {"leaf": leaf, "index": index, "size": size, "proof": proof, "root": root}
    probes = [
        {**base, "index": index - 1},
        {**base, "index": index + 1},
        {**base, "index": index ^ 2},
        {**base, "index": size},  # index == size
        {**base, "size": size * 2},
        {**base, "size": size // 2},
        {**base, "leaf": SOME_HASH},
        {**base, "root": m.EMPTY_ROOT},
        {**base, "root": SOME_HASH},
        {**base, "proof": [*proof, root]},  # too long
        {**base, "proof": [root, *proof]},
        {**base, "proof": [*proof, b""]},  # not a hash
    ]
    probes += [{**base, "proof": _flip(proof, i)} for i in range(len(proof))]
    if proof:
        probes.append({**base, "proof": proof[:-1]})  # too short
    if len(proof) > 1:
        probes.append({**base, "proof": [proof[0], SOME_HASH, *proof[1:]]})
    return probes


def test_inclusion_rejects_every_corruption() -> None:
    checked = 0
    for size in range(1, len(TREE) + 1):
        for index in range(size):
            proof = m.inclusion_proof(TREE, index, size=size)
            ok = {"leaf": TREE[index], "index": index, "size": size, "root": ROOTS[size]}
            assert m.verify_inclusion(**ok, proof=proof)
            for probe in _inclusion_probes(index, size, proof):
                assert not m.verify_inclusion(**probe), (index, size, probe)
                checked += 1
    assert checked > 3000


def _consistency_probes(old: int, new: int, proof: list[bytes]) -> list[dict]:
    r1, r2 = ROOTS[old], ROOTS[new]
    base = {"old_size": old, "new_size": new, "proof": proof, "old_root": r1, "new_root": r2}
    probes = [
        {**base, "old_size": old - 1},
        {**base, "old_size": old + 1},
        {**base, "old_size": old ^ 2},
        {**base, "new_size": new * 2},
        {**base, "new_size": new // 2},
        {**base, "old_root": SOME_HASH},
        {**base, "new_root": SOME_HASH},
        {**base, "old_root": r2, "new_root": r1},  # swapped
        {**base, "proof": []},
        {**base, "proof": [*proof, b""]},
        {**base, "proof": [*proof, r1]},
        {**base, "proof": [*proof, r2]},
        {**base, "proof": [r1, *proof]},  # what a verifier forgetting the power-of-2 rule sends
        {**base, "proof": [r2, *proof]},
        {**base, "proof": [proof[0], *proof]},
        {**base, "proof": proof[:-1]},
    ]
    probes += [{**base, "proof": _flip(proof, i)} for i in range(len(proof))]
    return probes


def test_consistency_rejects_every_corruption() -> None:
    checked = 0
    for new in range(2, len(TREE) + 1):
        for old in range(1, new):
            proof = m.consistency_proof(TREE, old, size=new)
            ok = {"old_size": old, "new_size": new, "old_root": ROOTS[old], "new_root": ROOTS[new]}
            assert m.verify_consistency(**ok, proof=proof)
            for probe in _consistency_probes(old, new, proof):
                assert not m.verify_consistency(**probe), (old, new, probe)
                checked += 1
    assert checked > 3000


def test_consistency_edge_sizes() -> None:
    r = ROOTS[5]
    assert m.verify_consistency(old_size=5, new_size=5, proof=[], old_root=r, new_root=r)
    assert not m.verify_consistency(old_size=5, new_size=5, proof=[r], old_root=r, new_root=r)
    assert not m.verify_consistency(old_size=5, new_size=5, proof=[], old_root=r, new_root=ROOTS[4])
    e = m.EMPTY_ROOT
    assert m.verify_consistency(old_size=0, new_size=0, proof=[], old_root=e, new_root=e)
    # No RFC proof exists from the empty tree: refused, whatever is offered.
    assert not m.verify_consistency(old_size=0, new_size=5, proof=[], old_root=e, new_root=r)
    assert not m.verify_consistency(old_size=6, new_size=5, proof=[], old_root=r, new_root=r)
    # Old size a power of two: the proof omits the old root, and the verifier prepends it.
    proof = m.consistency_proof(TREE, 4, size=8)
    assert proof == [_mth(TREE[4:8])]
    assert m.verify_consistency(
        old_size=4, new_size=8, proof=proof, old_root=ROOTS[4], new_root=ROOTS[8]
    )


def test_verifiers_never_raise_on_junk() -> None:
    leaf, root = TREE[0], ROOTS[1]
    junk_incl = [
        {"leaf": "x", "index": 0, "size": 1, "proof": [], "root": root},
        {"leaf": leaf, "index": 0, "size": 1, "proof": [], "root": None},
        {"leaf": leaf, "index": 0, "size": 1, "proof": ["ab"], "root": root},
        {"leaf": leaf, "index": -1, "size": 1, "proof": [], "root": root},
        {"leaf": leaf, "index": 0, "size": 0, "proof": [], "root": root},
        {"leaf": leaf, "index": 0, "size": 1.0, "proof": [], "root": root},
        {"leaf": leaf[:31], "index": 0, "size": 1, "proof": [], "root": root[:31]},
    ]
    for kw in junk_incl:
        assert m.verify_inclusion(**kw) is False
    assert m.verify_inclusion(leaf=leaf, index=0, size=1, proof=[], root=root) is True
    junk_cons = [
        {"old_size": 1, "new_size": 2, "proof": [None], "old_root": root, "new_root": root},
        {"old_size": "1", "new_size": 2, "proof": [], "old_root": root, "new_root": root},
        {"old_size": -1, "new_size": 2, "proof": [], "old_root": root, "new_root": root},
        {"old_size": 1, "new_size": 1, "proof": [], "old_root": b"", "new_root": b""},
    ]
    for kw in junk_cons:
        assert m.verify_consistency(**kw) is False


def test_proof_builders_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="index"):
        m.inclusion_proof(TREE, 5, size=5)
    with pytest.raises(ValueError, match="index"):
        m.inclusion_proof(TREE, -1)
    with pytest.raises(ValueError, match="size"):
        m.inclusion_proof(TREE, 0, size=len(TREE) + 1)
    with pytest.raises(ValueError, match="old_size"):
        m.consistency_proof(TREE, 0)
    with pytest.raises(ValueError, match="old_size"):
        m.consistency_proof(TREE, 6, size=5)
    assert m.consistency_proof(TREE, 5, size=5) == []
    assert m.consistency_proof(TREE, len(TREE)) == []


# --- Frontier ------------------------------------------------------------------------------------


def test_frontier_matches_mth_for_every_size() -> None:
    hashes = [m.leaf_hash(i.to_bytes(2, "big")) for i in range(200)]
    frontier = m.Frontier()
    assert frontier.size == 0 and frontier.root() == m.EMPTY_ROOT
    for n in range(1, 201):
        frontier.append(hashes[n - 1])
        expected = _mth(hashes[:n])
        assert frontier.size == n
        assert frontier.root() == expected == m.root_from_leaf_hashes(hashes[:n])
        doc = frontier.to_json()
        assert len(doc["hashes"]) == n.bit_count()
        back = m.Frontier.from_json(doc)
        assert back.size == n and back.root() == expected and back.to_json() == doc


def test_frontier_copy_is_independent() -> None:
    f = m.Frontier()
    for h in TREE[:5]:
        f.append(h)
    g = f.copy()
    g.append(TREE[5])
    assert f.size == 5 and f.root() == ROOTS[5]
    assert g.size == 6 and g.root() == ROOTS[6]
    # Resuming from a stored frontier continues the same tree.
    h = m.Frontier.from_json(f.to_json())
    for x in TREE[5:]:
        h.append(x)
    assert h.root() == ROOTS[-1]


def test_frontier_append_rejects_non_hashes() -> None:
    with pytest.raises(ValueError, match="leaf_hash"):
        m.Frontier().append(b"short")
    with pytest.raises(ValueError, match="leaf_hash"):
        m.Frontier().append("0" * 32)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"size": 3, "hashes": ["00" * 32]}, "frontier.hashes"),  # popcount(3) == 2
        ({"size": 4, "hashes": ["00" * 32, "11" * 32]}, "frontier.hashes"),
        ({"size": 1, "hashes": ["zz" * 32]}, r"frontier.hashes\[0\]"),
        ({"size": 1, "hashes": ["00" * 31]}, r"frontier.hashes\[0\]"),
        ({"size": 1, "hashes": ["AB" * 32]}, r"frontier.hashes\[0\]"),
        ({"size": 1, "hashes": [" 0" * 32]}, r"frontier.hashes\[0\]"),
        ({"size": 1, "hashes": [7]}, r"frontier.hashes\[0\]"),
        ({"size": 1, "hashes": "00" * 32}, "frontier.hashes"),
        ({"size": -1, "hashes": []}, "frontier.size"),
        ({"size": True, "hashes": ["00" * 32]}, "frontier.size"),
        ({"size": "1", "hashes": ["00" * 32]}, "frontier.size"),
        ({"hashes": []}, "frontier.size"),
        (["not", "a", "dict"], "frontier"),
    ],
)
def test_frontier_from_json_rejects(doc: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        m.Frontier.from_json(doc)


def test_hex_helpers() -> None:
    assert m.from_hex_list(m.hex_list(TREE), field="x") == TREE
    with pytest.raises(ValueError, match=r"^proof\[1\]"):
        m.from_hex_list(["00" * 32, "0g" * 32], field="proof")
    with pytest.raises(ValueError, match=r"^proof:"):
        m.from_hex_list("00" * 32, field="proof")
