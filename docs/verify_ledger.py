#!/usr/bin/env python3
"""Verify a microte chain ledger without microte, from docs/chain.md alone.

    python3 docs/verify_ledger.py evm+sqlite:///run.db              # chain in run.db.evm
    python3 docs/verify_ledger.py 'evm+sqlite:///run.db?evm_state=/path/chain.evm'
    python3 docs/verify_ledger.py run.db --rpc https://rpc.example   # anchors on a JSON-RPC node

Needs Python 3.11 and web3.py (keccak256, and the JSON-RPC client for --rpc); reads the
SQLite ledger with `sqlite3`, and the in-process chain's file (a py-evm key-value store in
SQLite) by walking its Merkle Patricia tries itself (docs/chain.md, "The in-process chain's
file"). Every anchored row is rebuilt into its leaf (canonical JSON, section 3), every
anchor's leaves are hashed into a root (section 4) and compared with the root the contract
holds (section 5). Prints OK, or names each changed, deleted or inserted row; exit code 0
when everything verifies, 1 when something does not, 2 when the ledger cannot be read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from web3 import Web3
from web3.types import BlockIdentifier

DOMAIN = "microte.ledger.record/1"
OWN_TABLES = ("chain_contracts", "chain_anchors", "chain_leaves")
# keccak256 of the MicroteLedger runtime code (contracts/MicroteLedger.json, deployedBytecode)
CODE_HASH = "0x34a60116347512379aebed40ef438a8cedeeba1e5406fbb4a0705f5872413e45"
MAX_LISTED = 20


class Unreadable(Exception):
    """The ledger cannot be read (exit code 2)."""


def keccak(data: bytes) -> bytes:
    return bytes(Web3.keccak(data))


def pad32(value: int | bytes) -> bytes:
    return value.to_bytes(32, "big") if isinstance(value, int) else value.rjust(32, b"\0")


# -- section 3: the leaf data, canonical JSON ---------------------------------------------------


def float_text(x: float) -> str:
    r = repr(x + 0.0)  # + 0.0: -0.0 -> 0.0
    if r in ("inf", "-inf"):
        return "null"
    if "e" not in r:
        return r
    mantissa, exponent = r.split("e")
    if int(exponent) == -5:
        sign = "-" if mantissa.startswith("-") else ""
        return sign + "0.0000" + mantissa.lstrip("-").replace(".", "")
    return f"{mantissa}e{int(exponent)}"


def string_text(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


# What each declared column type holds (section 2): the Python type sqlite3 reads back.
STORED = {"BIGINT": int, "FLOAT": float, "BOOLEAN": int, "TEXT": str}


def value_text(value: Any, declared: str) -> str:
    """One column's value as JSON, by its declared type; a value of the wrong type is
    encoded by its own type (its leaf cannot match: the caller reports the column)."""
    if value is None:
        return "null"
    if declared == "BOOLEAN" and value in (0, 1) and type(value) is int:
        return "true" if value else "false"
    if type(value) is int:
        return str(value)
    if type(value) is float:
        return float_text(value)
    if type(value) is str:
        return string_text(value)
    return string_text(bytes(value).hex())  # a BLOB: never written by microte


def record_data(table: str, row: dict[str, Any], types: dict[str, str]) -> bytes:
    members = ",".join(f"{string_text(name)}:{value_text(row[name], types[name])}" for name in sorted(row))
    return f"[{string_text(DOMAIN)},{string_text(table)},{{{members}}}]".encode()


def wrong_types(row: dict[str, Any], columns: dict[str, Column]) -> list[str]:
    """Columns whose value cannot have been written by microte (type, NULL, boolean range)."""
    out = []
    for name, col in columns.items():
        value = row[name]
        if value is None:
            if col.notnull:
                out.append(f"column {name}: NULL in a NOT NULL column")
            continue
        expected = STORED.get(col.declared)
        if expected is not None and type(value) is not expected:
            out.append(f"column {name}: {type(value).__name__} value {value!r} in a {col.declared} column")
        elif col.declared == "BOOLEAN" and value not in (0, 1):
            out.append(f"column {name}: {value!r} in a BOOLEAN column (0 or 1)")
    return out


# -- section 4: hashes and the tree ---------------------------------------------------------------


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    level = list(leaves)
    while len(level) > 1:
        up = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            up.append(level[-1])  # the odd last node goes up unchanged
        level = up
    return level[0]


# -- section 6: RLP and the Merkle Patricia tries of the in-process chain's file -----------------


def rlp_decode(data: bytes) -> Any:
    item, end = _rlp_item(data, 0)
    if end != len(data):
        raise ValueError("RLP: trailing bytes")
    return item


def _rlp_item(d: bytes, i: int) -> tuple[Any, int]:
    b = d[i]
    if b < 0x80:  # one byte, itself
        return d[i : i + 1], i + 1
    if b < 0xB8:  # a short string
        n = b - 0x80
        return d[i + 1 : i + 1 + n], i + 1 + n
    if b < 0xC0:  # a long string: its length's length, its length, the string
        ln = b - 0xB7
        n = int.from_bytes(d[i + 1 : i + 1 + ln], "big")
        s = i + 1 + ln
        return d[s : s + n], s + n
    if b < 0xF8:  # a short list
        n, s = b - 0xC0, i + 1
    else:  # a long list
        ln = b - 0xF7
        n, s = int.from_bytes(d[i + 1 : i + 1 + ln], "big"), i + 1 + ln
    items, j = [], s
    while j < s + n:
        item, j = _rlp_item(d, j)
        items.append(item)
    return items, s + n


def _nibbles(data: bytes) -> list[int]:
    return [n for byte in data for n in (byte >> 4, byte & 15)]


BLANK_ROOT = keccak(b"\x80")  # the root of an empty trie: keccak256(RLP(""))


class ChainFile:
    """The in-process chain's file: py-evm's key-value store in one SQLite table, read
    inside one read transaction (a consistent snapshot, even while the market writes)."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise Unreadable(f"no chain state file at {path}")
        self.description = f"in-process chain file {path}"
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        self.conn.execute("BEGIN")
        head = self._get(b"v1:canonical_head_hash")
        header = rlp_decode(self._get(head))
        self.state_root: bytes = header[3]
        self.head_number = int.from_bytes(header[8], "big")
        self._accounts: dict[bytes, list[bytes] | None] = {}

    def close(self) -> None:
        self.conn.close()

    def _get(self, key: bytes) -> bytes:
        row = self.conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        if row is None:
            raise Unreadable(f"chain file: key {key!r} missing")
        return bytes(row[0])

    def _trie_get(self, root: bytes, key: bytes) -> bytes | None:
        """The value at path keccak256(key) of the trie with this root, or None."""
        if root == BLANK_ROOT:
            return None
        path = _nibbles(keccak(key))
        node: Any = root
        while True:
            if isinstance(node, bytes):  # a reference: a node's hash (inlined nodes are lists)
                if node == b"":
                    return None
                node = rlp_decode(self._get(node))
            if len(node) == 17:  # branch
                if not path:
                    return node[16] or None
                node, path = node[path[0]], path[1:]
                continue
            encoded, child = node  # leaf or extension: hex-prefix encoded path
            flag = encoded[0] >> 4
            part = _nibbles(encoded)[1 if flag % 2 else 2 :]
            if path[: len(part)] != part:
                return None
            path = path[len(part) :]
            if flag >= 2:  # leaf
                return child if not path else None
            node = child

    def genesis(self) -> str:
        genesis: bytes = rlp_decode(self._get(b"block-number-to-hash:0"))
        return "0x" + genesis.hex()

    def chain_id(self) -> int | None:
        return None  # not in the file: contracts are matched by the genesis hash

    def _account(self, address: str) -> list[bytes] | None:
        raw = bytes.fromhex(address.removeprefix("0x"))
        if raw not in self._accounts:
            value = self._trie_get(self.state_root, raw)
            self._accounts[raw] = None if value is None else rlp_decode(value)
        return self._accounts[raw]

    def code_hash(self, address: str) -> str | None:
        account = self._account(address)
        return None if account is None else "0x" + account[3].hex()

    def storage(self, address: str, slot: int) -> int:
        account = self._account(address)
        if account is None:
            return 0
        value = self._trie_get(account[2], pad32(slot))
        return 0 if value is None else int.from_bytes(rlp_decode(value), "big")


class ChainRpc:
    """A JSON-RPC node, through web3.py: the same storage slots, with eth_getStorageAt."""

    def __init__(self, url: str | Web3, block: BlockIdentifier | None = None) -> None:
        # A URL, or a Web3 instance on any provider; `block`: the block every read is made at
        # (default: the latest when opened, so that all reads see one state).
        self.w3 = url if isinstance(url, Web3) else Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": 30}))
        self.description = f"JSON-RPC node {url}" if isinstance(url, str) else "web3 provider"
        self.block: BlockIdentifier = self.w3.eth.block_number if block is None else block

    def close(self) -> None:
        pass

    def genesis(self) -> str:
        return "0x" + bytes(self.w3.eth.get_block(0)["hash"]).hex()

    def chain_id(self) -> int | None:
        return int(self.w3.eth.chain_id)

    def code_hash(self, address: str) -> str | None:
        code = bytes(self.w3.eth.get_code(Web3.to_checksum_address(address), self.block))
        return "0x" + keccak(code).hex() if code else None

    def storage(self, address: str, slot: int) -> int:
        value = self.w3.eth.get_storage_at(Web3.to_checksum_address(address), slot, self.block)
        return int.from_bytes(bytes(value), "big")


Chain = ChainFile | ChainRpc


# -- section 5: the contract's storage ---------------------------------------------------------


@dataclass(frozen=True)
class OnChainAnchor:
    root: bytes
    interval_start: int
    interval_end: int
    records: int
    block: int


class Ledger:
    """The MicroteLedger contract's state, read from its storage slots."""

    def __init__(self, chain: Chain, address: str) -> None:
        self.chain = chain
        self.address = address
        self._base = int.from_bytes(keccak(pad32(4)), "big")

    def anchor_count(self) -> int:
        return self.chain.storage(self.address, 4)

    def anchor(self, index: int) -> OnChainAnchor:
        root = self.chain.storage(self.address, self._base + 2 * index).to_bytes(32, "big")
        packed = self.chain.storage(self.address, self._base + 2 * index + 1)
        mask64 = (1 << 64) - 1
        return OnChainAnchor(
            root, packed & mask64, (packed >> 64) & mask64, (packed >> 128) & 0xFFFFFFFF, (packed >> 160) & mask64
        )

    def anchor_index(self, root: bytes) -> int | None:
        n = self.chain.storage(self.address, int.from_bytes(keccak(root + pad32(5)), "big"))
        return n - 1 if n else None

    def settled_parts(self, root: bytes) -> int:
        return self.chain.storage(self.address, int.from_bytes(keccak(root + pad32(6)), "big"))

    def position(self, account: str) -> int:
        """balanceOf - creditOf: the account's net position."""
        key = pad32(bytes.fromhex(account.removeprefix("0x")))
        balance = self.chain.storage(self.address, int.from_bytes(keccak(key + pad32(1)), "big"))
        credit = self.chain.storage(self.address, int.from_bytes(keccak(key + pad32(3)), "big"))
        return balance - credit


def participant_address(participant_id: str) -> str:
    return Web3.to_checksum_address(keccak(b"microte:participant:" + participant_id.encode())[12:])


CLEARING_ADDRESS = Web3.to_checksum_address(keccak(b"microte:clearing")[12:])


def money_deltas(rows: Iterator[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    """Net money per participant id ("" for the clearing account), section 5."""
    deltas: dict[str, int] = {}

    def add(pid: str, value: int) -> None:
        deltas[pid] = deltas.get(pid, 0) + value

    for table, row in rows:
        if table == "transactions":
            add(row["buyer_id"], -row["amount_buy"])
            add(row["seller_id"], row["amount_sell"])
            add("", row["amount_buy"] - row["amount_sell"])
        elif table == "token_transfers":
            add(row["payer_id"], -row["amount"])
            add(row["payee_id"], row["amount"])
        elif table == "flex_tokens":
            add(row["from_id"], -row["amount"])
            add(row["to_id"], row["amount"])
    return {k: v for k, v in deltas.items() if v}


# -- the database --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    declared: str
    notnull: bool


@dataclass
class Table:
    name: str
    key: str
    columns: dict[str, Column]

    @property
    def types(self) -> dict[str, str]:
        return {name: c.declared for name, c in self.columns.items()}


def open_database(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise Unreadable(f"no ledger database at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    conn.execute("BEGIN")  # one snapshot for the whole verification
    return conn


def record_tables(conn: sqlite3.Connection) -> dict[str, Table]:
    names = [
        str(n)
        for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        if not str(n).startswith("sqlite_")
    ]
    missing = [t for t in OWN_TABLES if t not in names]
    if missing:
        raise Unreadable(f"the database has no {', '.join(missing)} table: not a chain ledger (evm+...)")
    tables: dict[str, Table] = {}
    for name in names:
        if name in OWN_TABLES:
            continue
        info = conn.execute(f"PRAGMA table_info({quote(name)})").fetchall()
        columns = {str(c[1]): Column(str(c[2]).upper(), bool(c[3])) for c in info}
        keys = [str(c[1]) for c in info if c[5]]
        if len(keys) != 1:
            raise Unreadable(f"table {name}: expected one key column, found {keys}")
        tables[name] = Table(name, keys[0], columns)
    return tables


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def rows_by_key(conn: sqlite3.Connection, table: Table, keys: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    names = list(table.columns)
    select = ", ".join(quote(n) for n in names)
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT {select} FROM {quote(table.name)} WHERE {quote(table.key)} IN ({marks})"
        for values in conn.execute(sql, chunk):
            row = dict(zip(names, values, strict=True))
            out[str(row[table.key])] = row
    return out


# -- the checks ----------------------------------------------------------------------------------


@dataclass
class Result:
    lines: list[str] = field(default_factory=list)
    named: list[str] = field(default_factory=list)  # tampered rows, for the summary
    anchors: int = 0
    bad_anchors: int = 0
    records: int = 0
    failures: int = 0
    tokens_wrong: int = 0
    lost: int = 0

    def fail(self, line: str) -> None:
        self.failures += 1
        self.lines.append(line)


def changed_columns(table: Table, row: dict[str, Any], recorded: bytes) -> list[str]:
    """What can be told about which column changed: a BOOLEAN whose flip, or a nullable
    column whose NULL, gives back the recorded leaf."""
    found = []
    for name, col in table.columns.items():
        trials = []
        if col.declared == "BOOLEAN" and row[name] in (0, 1):
            trials.append(1 - row[name])
        if not col.notnull and row[name] is not None:
            trials.append(None)
        for was in trials:
            if leaf_hash(record_data(table.name, {**row, name: was}, table.types)) == recorded:
                shown = value_text(was, col.declared)
                found.append(f"column {name}: anchored as {shown}, now {value_text(row[name], col.declared)}")
    return found


def verify(db_path: Path, chain: Chain | Callable[[], Chain], contract: str | None = None) -> Result:
    """Every anchor of the ledger at `db_path` against `chain` (or the chain that `chain()`
    opens: after the database's snapshot is taken, so the chain is not behind it)."""
    with closing(open_database(db_path)) as conn:
        tables = record_tables(conn)  # the first read: the database's snapshot from here on
        if not callable(chain):
            return _verify(conn, tables, chain, contract, db_path)
        opened = chain()
        try:
            return _verify(conn, tables, opened, contract, db_path)
        finally:
            opened.close()


def _verify(
    conn: sqlite3.Connection, tables: dict[str, Table], chain: Chain, contract: str | None, db_path: Path
) -> Result:
    result = Result()
    contract = contract or find_contract(conn, chain)
    code = chain.code_hash(contract)
    if code != CODE_HASH:
        raise Unreadable(f"{contract} on {chain.description} holds {'no' if code is None else 'another'} contract")
    ledger = Ledger(chain, contract)
    result.lines.append(f"ledger {db_path}, {chain.description}, contract {contract}")
    anchors = conn.execute(
        "SELECT seq, label, root, interval_start, interval_end, records, status, contract, chain_index, "
        "settle_parts FROM chain_anchors ORDER BY seq"
    ).fetchall()
    count = ledger.anchor_count()
    seen_indexes: set[int] = set()
    settled: list[int] = []  # anchors whose money is on chain
    racing = False
    for seq, label, root, start, end, records, status, where, index, parts in anchors:
        result.anchors += 1
        problems: list[str] = []
        leaves = conn.execute(
            "SELECT pos, tbl, key, leaf FROM chain_leaves WHERE anchor_seq = ? ORDER BY pos", (seq,)
        ).fetchall()
        result.records += len(leaves)
        now_root = check_rows(conn, tables, leaves, problems, result)
        recorded_root = merkle_root([bytes.fromhex(leaf) for *_, leaf in leaves]) if leaves else None
        if not leaves:
            problems.append("no leaves recorded for this anchor (chain_leaves rows deleted)")
        if [p for p, *_ in leaves] != list(range(len(leaves))):
            problems.append("leaf positions are not 0, 1, 2, ... (chain_leaves altered)")
        if [(t, k) for _, t, k, _ in leaves] != sorted((t, k) for _, t, k, _ in leaves):
            problems.append("leaves are not in (table, key) order (chain_leaves altered)")
        if records != len(leaves):
            problems.append(f"chain_anchors says {records} records, {len(leaves)} leaves are recorded")
        on_chain_index = index if status == "anchored" else None
        if status != "anchored":
            on_chain_index = ledger.anchor_index(bytes.fromhex(root.removeprefix("0x")))
            if on_chain_index is None:
                problems.append("pending: its transaction was never confirmed, the root is not on chain")
            else:
                racing = True  # sent, receipt not recorded yet (the market is writing, or crashed)
        elif str(where).lower() != contract.lower():
            problems.append(f"anchored on contract {where}, not the one verified")
            on_chain_index = None
        elif index is None or index >= count:
            problems.append(f"the chain holds no anchor #{index} ({count} anchors)")
            on_chain_index = None
        if on_chain_index is not None:
            seen_indexes.add(on_chain_index)
            a = ledger.anchor(on_chain_index)
            if now_root is not None and now_root != a.root:
                problems.append(f"root of the rows now 0x{now_root.hex()} != root on chain 0x{a.root.hex()}")
            if recorded_root is not None and recorded_root != a.root:
                problems.append("the recorded leaves do not hash to the root on chain (chain_leaves altered)")
            if "0x" + a.root.hex() != root:
                problems.append(f"root in chain_anchors {root} != root on chain 0x{a.root.hex()}")
            if (a.interval_start, a.interval_end, a.records) != (start, end, records):
                problems.append(
                    f"interval/records in chain_anchors ({start}, {end}, {records}) != on chain "
                    f"({a.interval_start}, {a.interval_end}, {a.records})"
                )
            if status == "anchored":
                done = ledger.settled_parts(a.root)
                if done != (parts or 0):
                    problems.append(f"settlement: {done} parts on chain, {parts} recorded")
                settled.append(seq)
        head = f"anchor #{seq} [{label}] {len(leaves)} records, root {root[:18]}..."
        if on_chain_index is not None:
            head += f" on chain at index {on_chain_index}"
        if problems:
            result.bad_anchors += 1
            result.fail(f"TAMPERED {head}")
            result.lines.extend(f"    {p}" for p in problems)
        else:
            result.lines.append(f"OK       {head}")
    check_unanchored(conn, tables, result)
    lost = [i for i in range(count) if i not in seen_indexes]
    result.lost = len(lost)
    for i in lost[:MAX_LISTED]:
        a = ledger.anchor(i)
        result.fail(f"LOST     anchor #{i} on chain (root 0x{a.root.hex()}, {a.records} records): not in chain_anchors")
    if len(lost) > MAX_LISTED:
        result.fail(f"LOST     ... and {len(lost) - MAX_LISTED} more anchors on chain not in chain_anchors")
    if racing:
        result.lines.append("note: an anchor is on chain but still pending in the database: token check skipped")
    else:
        check_tokens(conn, tables, ledger, settled, result)
    return result


def check_rows(
    conn: sqlite3.Connection, tables: dict[str, Table], leaves: list[Any], problems: list[str], result: Result
) -> bytes | None:
    """Rebuild every leaf of an anchor from its row; name changed and deleted rows. Returns
    the root of the rows as they are now (None when one is gone)."""
    by_table: dict[str, list[str]] = {}
    for _, tbl, key, _ in leaves:
        by_table.setdefault(tbl, []).append(key)
    rows = {t: rows_by_key(conn, tables[t], keys) if t in tables else {} for t, keys in by_table.items()}
    now: list[bytes] = []
    complete = True
    for _, tbl, key, leaf in leaves:
        row = rows[tbl].get(key)
        if row is None:
            problems.append(f"MISSING {tbl} {key}: anchored row deleted")
            result.named.append(f"{tbl} {key} (deleted)")
            complete = False
            continue
        table = tables[tbl]
        recorded = bytes.fromhex(leaf)
        current = leaf_hash(record_data(tbl, row, table.types))
        now.append(current)
        if current == recorded:
            continue
        told = wrong_types(row, table.columns) or changed_columns(table, row, recorded)
        problems.append(f"TAMPERED {tbl} {key}: row changed since it was anchored" + "".join(f"; {t}" for t in told))
        columns = [t.split(":")[0].removeprefix("column ") for t in told]
        result.named.append(f"{tbl} {key}" + (f" ({', '.join(columns)})" if columns else ""))
    return merkle_root(now) if complete and now else None


def check_unanchored(conn: sqlite3.Connection, tables: dict[str, Table], result: Result) -> None:
    found: list[str] = []
    for table in tables.values():
        sql = (
            f"SELECT {quote(table.key)} FROM {quote(table.name)} WHERE {quote(table.key)} NOT IN "
            f"(SELECT key FROM chain_leaves WHERE tbl = ?) ORDER BY {quote(table.key)}"
        )
        found.extend(f"{table.name} {k}" for (k,) in conn.execute(sql, (table.name,)))
    for name in found[:MAX_LISTED]:
        result.fail(f"UNANCHORED {name}: no anchor covers this row")
        result.named.append(f"{name} (not anchored)")
    if len(found) > MAX_LISTED:
        result.fail(f"UNANCHORED ... and {len(found) - MAX_LISTED} more rows")


def check_tokens(
    conn: sqlite3.Connection, tables: dict[str, Table], ledger: Ledger, settled: list[int], result: Result
) -> None:
    rows: list[tuple[str, dict[str, Any]]] = []
    marks = ",".join("?" * len(settled))
    for name in ("transactions", "token_transfers", "flex_tokens"):
        if name not in tables or not settled:
            continue
        keys = [
            str(k)
            for (k,) in conn.execute(
                f"SELECT key FROM chain_leaves WHERE tbl = ? AND anchor_seq IN ({marks})", (name, *settled)
            )
        ]
        rows.extend((name, r) for r in rows_by_key(conn, tables[name], keys).values())
    deltas = money_deltas(iter(rows))
    for pid in sorted(deltas):
        address = participant_address(pid) if pid else CLEARING_ADDRESS
        actual = ledger.position(address)
        if actual != deltas[pid]:
            who = pid or "clearing"
            result.tokens_wrong += 1
            result.fail(f"FAILED   token position of {who} ({address}): {actual} on chain, {deltas[pid]} in the rows")
    result.lines.append(f"tokens: {len(deltas)} accounts compared with the chain")


def find_contract(conn: sqlite3.Connection, chain: Chain) -> str:
    genesis, chain_id = chain.genesis(), chain.chain_id()
    for cid, gen, address in conn.execute("SELECT chain_id, genesis, contract FROM chain_contracts"):
        if str(gen).lower() == genesis.lower() and (chain_id is None or int(cid) == chain_id):
            return str(address)
    raise Unreadable(f"chain_contracts names no contract on {chain.description} (genesis {genesis})")


# -- command line --------------------------------------------------------------------------------


def parse_ledger(url: str) -> tuple[Path, dict[str, str]]:
    """`evm+sqlite:///PATH?options`, `sqlite:///PATH` or a plain path -> (database path, options)."""
    rest = url.removeprefix("evm+")
    if "://" in rest and not rest.startswith("sqlite://"):
        raise Unreadable(f"{url}: this verifier reads SQLite ledgers (evm+sqlite:///PATH)")
    query: dict[str, str] = {}
    if rest.startswith("sqlite:///"):
        rest, _, q = rest.removeprefix("sqlite:///").partition("?")
        query = dict(urllib.parse.parse_qsl(q))
    return Path(urllib.parse.unquote(rest)), query


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ledger", help="evm+sqlite:///PATH[?evm_state=FILE|chain=URL&contract=0x...], or the .db path")
    p.add_argument("--rpc", help="JSON-RPC node holding the anchors (instead of the in-process chain's file)")
    p.add_argument("--chain-file", help="the in-process chain's state file (default: the database path + .evm)")
    p.add_argument("--contract", help="the contract's address (default: from chain_contracts)")
    args = p.parse_args(argv)
    try:
        db_path, options = parse_ledger(args.ledger)
        rpc = args.rpc or options.get("chain")
        state = args.chain_file or options.get("evm_state") or f"{db_path}.evm"
        if state == "memory" and not rpc:
            raise Unreadable("evm_state=memory: that chain was gone when its process ended")
        result = verify(
            db_path, lambda: ChainRpc(rpc) if rpc else ChainFile(Path(state)), args.contract or options.get("contract")
        )
    except (Unreadable, sqlite3.Error, OSError, ValueError) as exc:
        print(f"verify_ledger: {exc}", file=sys.stderr)
        return 2
    print("\n".join(result.lines))
    if result.failures:
        named = ", ".join(result.named[:MAX_LISTED]) + (" ..." if len(result.named) > MAX_LISTED else "")
        print(
            f"FAILED: {result.bad_anchors} of {result.anchors} anchors do not verify"
            + (f"; rows: {named}" if named else "")
            + (f"; {result.lost} anchors on chain not in chain_anchors" if result.lost else "")
            + (f"; {result.tokens_wrong} token positions differ" if result.tokens_wrong else "")
        )
        return 1
    print(f"OK: {result.anchors} anchors, {result.records} records verify against the chain")
    return 0


if __name__ == "__main__":
    sys.exit(main())
