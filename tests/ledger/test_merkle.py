"""Merkle trees over ledger records (ledger/merkle.py): proofs, tamper evidence, encoding."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ledger import merkle

leaves_st = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=70)


@given(leaves_st)
def test_every_leaf_proof_verifies(leaves: list[bytes]) -> None:
    root = merkle.root(leaves)
    for i, leaf in enumerate(leaves):
        path = merkle.proof(leaves, i)
        assert merkle.verify(leaf, path, root)
        assert len(path) <= max(1, (len(leaves) - 1).bit_length())


@given(leaves_st, st.data())
def test_a_changed_leaf_fails(leaves: list[bytes], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(leaves) - 1))
    flip = data.draw(st.integers(0, 255))
    changed = bytes([leaves[i][0] ^ (flip or 1)]) + leaves[i][1:]
    root = merkle.root(leaves)
    path = merkle.proof(leaves, i)
    assert not merkle.verify(changed, path, root)
    # ... and the root of the changed tree differs
    assert merkle.root([*leaves[:i], changed, *leaves[i + 1 :]]) != root


@given(leaves_st, st.data())
def test_a_proof_is_for_its_position_only(leaves: list[bytes], data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(leaves) - 1))
    j = data.draw(st.integers(0, len(leaves) - 1))
    if leaves[i] != leaves[j]:
        assert not merkle.verify(leaves[j], merkle.proof(leaves, i), merkle.root(leaves))


def test_small_trees_by_hand() -> None:
    a, b, c = (merkle.leaf_hash(x) for x in (b"a", b"b", b"c"))
    assert merkle.root([a]) == a
    assert merkle.root([a, b]) == merkle.node_hash(a, b)
    # odd node promoted: c goes up unchanged
    assert merkle.root([a, b, c]) == merkle.node_hash(merkle.node_hash(a, b), c)
    assert merkle.proof([a, b, c], 2) == [("left", merkle.node_hash(a, b))]
    assert merkle.proof([a, b, c], 0) == [("right", b), ("right", c)]
    assert a == hashlib.sha256(b"\x00a").digest()
    assert merkle.node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    with pytest.raises(ValueError):
        merkle.root([])
    with pytest.raises(IndexError):
        merkle.proof([a], 1)
    assert not merkle.verify(a, [("up", b)], merkle.root([a, b]))


def test_no_second_preimage_through_an_interior_node() -> None:
    """The data of two children is not a leaf of their parent: leaves and nodes hash apart."""
    a, b = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    forged = merkle.leaf_hash(a + b)  # "a record whose data is the two children"
    assert forged != merkle.node_hash(a, b)
    assert not merkle.verify(forged, [], merkle.root([a, b]))


def test_record_encoding_is_canonical_and_domain_separated() -> None:
    row = {"id": "t1", "amount_buy": 5, "price": 0.0, "buyer_id": "Pé-2", "commit_id": None, "dispatch": True}
    shuffled = dict(reversed(list(row.items())))
    assert merkle.record_data("transactions", row) == merkle.record_data("transactions", shuffled)
    # SQLite drops the sign of zero: -0.0 and 0.0 are the same record
    assert merkle.record_leaf("transactions", row) == merkle.record_leaf("transactions", {**row, "price": -0.0})
    # the table is part of the leaf: the same row in another table is another record
    assert merkle.record_leaf("transactions", row) != merkle.record_leaf("settlements", row)
    assert merkle.record_leaf("transactions", row) != merkle.record_leaf("transactions", {**row, "amount_buy": 6})
    assert merkle.record_data("t", row).startswith(b'["microte.ledger.record/1","t",{"amount_buy":5,')


@given(st.lists(st.tuples(st.sampled_from(["meters", "transactions"]), st.text(max_size=8)), unique=True, min_size=1))
def test_leaf_order_does_not_depend_on_write_order(keys: list[tuple[str, str]]) -> None:
    items = [(t, k, merkle.record_leaf(t, {"id": k})) for t, k in keys]
    forward = merkle.root([leaf for *_, leaf in merkle.sorted_leaves(items)])
    backward = merkle.root([leaf for *_, leaf in merkle.sorted_leaves(reversed(items))])
    assert forward == backward
    ordered = [(t, k) for t, k, _ in merkle.sorted_leaves(items)]
    # code point order is UTF-8 byte order: the same as SQLite's and PostgreSQL's "C" collation
    assert ordered == sorted(keys, key=lambda tk: (tk[0].encode(), tk[1].encode()))
