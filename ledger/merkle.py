"""Merkle trees over a batch of ledger records (pure: no I/O).

A leaf is one record: `leaf_hash(record_data(table, row))`, where `record_data` is a
domain-separated canonical encoding of the table name and the row (sorted-key JSON, as
`ledger.digest` encodes rows). Leaves are ordered by (table, key), so the tree of a batch
does not depend on the order its records were written in.

Hashes are sha256 with RFC 6962 style prefixes: a leaf is sha256(0x00 || data), an
interior node sha256(0x01 || left || right), so an interior node can never pass for a leaf
(no second-preimage trick). A level with an odd number of nodes promotes its last node
unchanged to the level above.

The encoding is specified completely, for verifiers that do not run microte, in
docs/chain.md (*Verifying without microte*): types per column, the canonical JSON and its
float format (msgspec's: Python's repr, but `0.0000...` for exponent -5 and exponents
without `+` or leading zeros), the hashes; docs/verify_ledger.py implements it with the
standard library, and tests/ledger/test_outsider_verifier.py holds the two to the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec

LEAF = b"\x00"
NODE = b"\x01"
DOMAIN = "microte.ledger.record/1"  # versioned: a new encoding gets a new tag

Side = Literal["left", "right"]  # where the sibling sits, relative to the running hash
Proof = list[tuple[Side, bytes]]

_encode = msgspec.json.Encoder(order="sorted").encode


def _canonical(value: Any) -> Any:
    # -0.0 + 0.0 == 0.0: SQLite drops the sign of zero, PostgreSQL keeps it (as ledger.digest).
    return value + 0.0 if type(value) is float else value


def record_data(table: str, row: Mapping[str, Any]) -> bytes:
    """The bytes a record's leaf commits to: domain tag, table name and row, canonical JSON."""
    return _encode([DOMAIN, table, {str(k): _canonical(v) for k, v in row.items()}])


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE + left + right).digest()


def record_leaf(table: str, row: Mapping[str, Any]) -> bytes:
    return leaf_hash(record_data(table, row))


def sorted_leaves(items: Iterable[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
    """(table, key, leaf) items in tree order: by table, then key (code point = UTF-8 byte order)."""
    return sorted(items, key=lambda item: (item[0], item[1]))


def _level_up(level: Sequence[bytes]) -> list[bytes]:
    up = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        up.append(level[-1])  # odd node promoted
    return up


def root(leaves: Sequence[bytes]) -> bytes:
    """Merkle root of leaf hashes, in the given order."""
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = list(leaves)
    while len(level) > 1:
        level = _level_up(level)
    return level[0]


def proof(leaves: Sequence[bytes], index: int) -> Proof:
    """The siblings from leaf `index` up to the root: (side of the sibling, its hash)."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} out of range for {len(leaves)} leaves")
    path: Proof = []
    level = list(leaves)
    i = index
    while len(level) > 1:
        if i % 2:
            path.append(("left", level[i - 1]))
        elif i + 1 < len(level):
            path.append(("right", level[i + 1]))
        # else: the odd last node is promoted; nothing to hash at this level
        level = _level_up(level)
        i //= 2
    return path


def verify(leaf: bytes, path: Sequence[tuple[str, bytes]], expected_root: bytes) -> bool:
    """True when `leaf` with `path` hashes up to `expected_root`."""
    h = leaf
    for side, sibling in path:
        if side == "left":
            h = node_hash(sibling, h)
        elif side == "right":
            h = node_hash(h, sibling)
        else:
            return False
    return h == expected_root
