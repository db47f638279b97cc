"""The EVM side of the ledger: batch anchors and token settlement (contracts/MicroteLedger.sol).

`EvmAnchor` talks to one deployed `MicroteLedger` contract through web3.py, on

- an in-process chain (eth-tester over py-evm, a real EVM), by default; its state can be
  kept in a file (`ChainStore`, a key-value table in SQLite) so that the chain outlives the
  process: the market writes it, `microte ledger verify` reads it later;
- or any JSON-RPC node by URL (`http://...`): a local node such as ganache in tests, an
  Energy Web node in production. Transactions are signed locally with a private key when
  one is given, else sent from the node's first (unlocked) account.

It is synchronous (web3's sync API): the DualSink runs it in a thread of its own.

Token settlement is custodial: a participant's address is derived from its registry id
(`participant_address`), and the operator settles a batch's money through the clearing
account (`CLEARING_ADDRESS`): every payer pays the clearing account its net amount, the
clearing account pays every payee (`net_transfers`). A payer without the tokens draws credit
(contract `creditOf`), so `balanceOf - creditOf` is each account's net position.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.contract import Contract

from ledger import merkle
from ledger.schema import KEYS
from market.core.records import Record

log = logging.getLogger(__name__)

keccak = Web3.keccak
to_checksum_address = Web3.to_checksum_address

ARTIFACT = Path(__file__).resolve().parents[1] / "contracts" / "MicroteLedger.json"

# Transfers per settlement transaction: a batch with more net transfers settles in parts
# (one `anchorAndSettle`, then `settlePart`s). A transfer costs ~28k gas between existing
# balances, ~42k when it creates them (measured): 250 take 7-11M gas, below the 30M block
# gas limit of eth-tester and of common chains.
MAX_TRANSFERS_PER_TX = 250


# -- addresses and netting (pure) -----------------------------------------------------------


def participant_address(participant_id: str) -> str:
    """The token address of a registry id: the last 20 bytes of
    keccak256("microte:participant:" + id), checksummed. Nobody holds its key: the operator
    settles for it (custodial)."""
    return to_checksum_address(keccak(b"microte:participant:" + participant_id.encode())[12:])


CLEARING_ADDRESS = to_checksum_address(keccak(b"microte:clearing")[12:])

# Tables whose rows move money (integer micro-currency), and how.
MONEY_TABLES: tuple[str, ...] = ("transactions", "token_transfers", "flex_tokens")


def money_deltas(rows: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, int]:
    """Net micro-currency per participant id (None: the clearing account) of ledger rows.

    - transactions: the buyer pays `amount_buy`, the seller receives `amount_sell` (negative
      amounts, as in short financial records, flow the other way); the difference, the
      market's spread, stays with the clearing account.
    - token_transfers: `payer_id` pays `payee_id` `amount`.
    - flex_tokens: `from_id` pays `to_id` `amount`.
    Other tables move no money.
    """
    deltas: dict[str, int] = {}

    def add(pid: str, value: int) -> None:
        deltas[pid] = deltas.get(pid, 0) + value

    clearing = ""  # key of the clearing account in `deltas` (no registry id is empty)
    for table, row in rows:
        if table == "transactions":
            if row["buyer_id"] == row["seller_id"] and row["amount_buy"] == row["amount_sell"]:
                continue  # self-consumption: nothing moves
            add(row["buyer_id"], -int(row["amount_buy"]))
            add(row["seller_id"], int(row["amount_sell"]))
            add(clearing, int(row["amount_buy"]) - int(row["amount_sell"]))
        elif table == "token_transfers":
            add(row["payer_id"], -int(row["amount"]))
            add(row["payee_id"], int(row["amount"]))
        elif table == "flex_tokens":
            add(row["from_id"], -int(row["amount"]))
            add(row["to_id"], int(row["amount"]))
    return {k: v for k, v in deltas.items() if v}


def net_transfers(deltas: Mapping[str, int]) -> list[tuple[str, str, int]]:
    """Token transfers (from address, to address, amount) realising `deltas` through the
    clearing account: payers first (sorted by id), then payees. The clearing account's own
    delta (key "") is what remains with it."""
    pay = sorted((pid, -v) for pid, v in deltas.items() if pid and v < 0)
    receive = sorted((pid, v) for pid, v in deltas.items() if pid and v > 0)
    return [(participant_address(p), CLEARING_ADDRESS, a) for p, a in pay] + [
        (CLEARING_ADDRESS, participant_address(p), a) for p, a in receive
    ]


def gas_bound(transfers: int) -> int:
    """Gas that an anchor with `transfers` settlement transfers cannot exceed: ~150k for the
    anchor and its bookkeeping (new storage slots), at most ~80k per transfer (a new payer
    drawing credit pays a new recipient). Unused gas is not charged."""
    return 250_000 + 80_000 * transfers


def interval_of(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> tuple[int, int]:
    """The market time an anchor covers: its rounds' [open, open + duration]; without a round
    (an anchor made at start or close), the span of its records' creation times."""
    rounds = [(int(r["time"]), int(r["time"]) + int(r["duration"])) for t, r in rows if t == "rounds"]
    if rounds:
        return min(s for s, _ in rounds), max(e for _, e in rounds)
    times = []
    for _, r in rows:
        for name in ("time_creation", "time", "time_submission", "started"):
            if isinstance(r.get(name), int):
                times.append(int(r[name]))
                break
    return (min(times), max(times)) if times else (0, 0)


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- a persistent store for the in-process chain ---------------------------------------------


class ChainStore:
    """py-evm's key-value database in one SQLite file, so the in-process chain survives its
    process. One writer at a time (an exclusive lock next to the file); readers take none.
    Writes become durable at `commit()`, which EvmAnchor calls once each transaction is
    mined: a crash loses at most the block being built."""

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.existed = self.path.exists() and self.path.stat().st_size > 0
        self._lock_file: Any = None
        if readonly:
            if not self.existed:
                raise FileNotFoundError(f"no chain state at {self.path}")
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            return
        self._lock_file = open(self.path.with_name(self.path.name + ".lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"the chain state {self.path} is in use by another process") from None
        self.conn = sqlite3.connect(self.path, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        self.conn.commit()

    def database(self) -> Any:
        """A py-evm `BaseDB` over this store."""
        from eth.db.backends.base import BaseDB

        conn = self.conn

        class _KV(BaseDB):
            def __getitem__(self, key: bytes) -> bytes:
                row = conn.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
                if row is None:
                    raise KeyError(key)
                return bytes(row[0])

            def __setitem__(self, key: bytes, value: bytes) -> None:
                conn.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, value))

            def __delitem__(self, key: bytes) -> None:
                if conn.execute("DELETE FROM kv WHERE k = ?", (key,)).rowcount == 0:
                    raise KeyError(key)

            def _exists(self, key: bytes) -> bool:
                return conn.execute("SELECT 1 FROM kv WHERE k = ?", (key,)).fetchone() is not None

        return _KV()

    def commit(self) -> None:
        if not self.readonly:
            self.conn.commit()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if not self.readonly:
                self.conn.commit()
            self.conn.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None


def in_process_web3(store: ChainStore | None = None) -> tuple[Web3, LocalAccount]:
    """A web3 on an in-process py-evm chain (eth-tester) and its funded operator account.

    With a `store`, the chain lives in it: a new store gets a fresh genesis, an existing one
    continues from its canonical head."""
    from eth.db.atomic import AtomicDB
    from eth_tester import EthereumTester, PyEVMBackend
    from eth_tester.backends.pyevm.main import generate_genesis_state_for_keys, get_default_genesis_params
    from web3 import EthereumTesterProvider

    backend = PyEVMBackend()
    if store is not None:
        chain_class = type(backend.chain)
        db = AtomicDB(store.database())
        if store.existed:
            backend.chain = chain_class(db)
        else:
            genesis_state = generate_genesis_state_for_keys(backend.account_keys)
            backend.chain = chain_class.from_genesis(db, get_default_genesis_params(), genesis_state)
            store.commit()
    w3 = Web3(EthereumTesterProvider(EthereumTester(backend)))
    key = backend.account_keys[0]  # eth-tester's well-known, funded test key
    return w3, Account.from_key(key.to_bytes())


# -- the contract client -----------------------------------------------------------------------


def load_artifact() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(ARTIFACT.read_text())
    return data


@dataclass(frozen=True)
class AnchorResult:
    """Where a batch's anchor landed, and what it cost."""

    index: int  # the anchor's index in the contract
    tx_hash: str  # the transaction that anchored it (with settlement part 0)
    block: int
    transactions: int  # transactions sent for this call (0: it was anchored already)
    gas_used: int
    settle_parts: int


@dataclass(frozen=True)
class ChainAnchor:
    """An anchor as the contract stores it."""

    index: int
    root: bytes
    interval_start: int
    interval_end: int
    records: int
    block: int


class ChainError(RuntimeError):
    """A chain answer that contradicts the ledger (not a transport failure)."""


class EvmAnchor:
    """Deploys (or attaches to) a MicroteLedger contract and anchors batches on it."""

    def __init__(
        self,
        w3: Web3,
        *,
        account: LocalAccount | None = None,
        sender: str | None = None,
        store: ChainStore | None = None,
        receipt_timeout: float = 120.0,
        max_transfers: int = MAX_TRANSFERS_PER_TX,
        estimate_gas: bool = False,
        description: str = "",
    ) -> None:
        self.w3 = w3
        self.account = account  # signs locally when set
        if sender is None:
            sender = account.address if account is not None else w3.eth.accounts[0]
        self.sender = to_checksum_address(sender)
        self.store = store
        self.receipt_timeout = receipt_timeout
        self.max_transfers = max_transfers
        # Gas: the contract's known bound (gas_bound), capped at the block gas limit, instead of
        # eth_estimateGas, which runs the transaction many times (on eth-tester and ganache
        # 3-10x the cost of sending it). Unused gas is not charged.
        self.estimate_gas = estimate_gas
        self.description = description
        self.transactions = 0  # transactions sent by this client
        artifact = load_artifact()
        self._abi = artifact["abi"]
        self._bytecode = artifact["bytecode"]
        self._runtime = bytes.fromhex(artifact["deployedBytecode"].removeprefix("0x"))
        self._contract: Contract | None = None
        self._gas_limit: int | None = None  # the chain's block gas limit

    # -- constructors ---------------------------------------------------------------------------

    @classmethod
    def in_process(cls, state: str | Path | None = None, *, readonly: bool = False, **kw: Any) -> EvmAnchor:
        """The default chain: py-evm in this process; kept in the file `state` if given."""
        store = ChainStore(state, readonly=readonly) if state is not None else None
        try:
            w3, account = in_process_web3(store)
        except BaseException:
            if store is not None:
                store.close()
            raise
        where = f"in-process py-evm chain ({state})" if state is not None else "in-process py-evm chain (memory)"
        return cls(w3, account=account, store=store, description=where, **kw)

    @classmethod
    def connect(cls, url: str, *, private_key: str | None = None, timeout: float = 30.0, **kw: Any) -> EvmAnchor:
        """A JSON-RPC node (`http://` or `https://`)."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"chain URL {url!r}: expected http:// or https:// (a JSON-RPC node)")
        w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": timeout}))
        account = Account.from_key(private_key) if private_key else None
        return cls(w3, account=account, description=f"JSON-RPC node {url}", **kw)

    # -- identity -------------------------------------------------------------------------------

    @property
    def chain_id(self) -> int:
        return int(self.w3.eth.chain_id)

    def genesis_hash(self) -> str:
        return "0x" + bytes(self.w3.eth.get_block(0)["hash"]).hex()

    @property
    def contract(self) -> Contract:
        if self._contract is None:
            raise RuntimeError("no contract: call deploy() or attach() first")
        return self._contract

    @property
    def has_contract(self) -> bool:
        return self._contract is not None

    @property
    def address(self) -> str:
        return str(self.contract.address)

    def deploy(self) -> tuple[str, str, int]:
        """Deploy a new MicroteLedger (the sender becomes its operator): address, tx, block."""
        factory = self.w3.eth.contract(abi=self._abi, bytecode=self._bytecode)
        receipt = self._send(factory.constructor())
        address = receipt["contractAddress"]
        self._contract = self.w3.eth.contract(address=address, abi=self._abi)
        return str(address), _hex(receipt["transactionHash"]), int(receipt["blockNumber"])

    def attach(self, address: str) -> None:
        """Use the contract at `address`: it must run this artifact's code and have the
        sender as its operator (to anchor) or any operator (to verify)."""
        address = to_checksum_address(address)
        code = bytes(self.w3.eth.get_code(address))
        if code != self._runtime:
            what = "no contract" if not code else "a different contract"
            raise ChainError(f"{address} on chain {self.chain_id} holds {what}, not MicroteLedger")
        self._contract = self.w3.eth.contract(address=address, abi=self._abi)

    def operator(self) -> str:
        return str(self.contract.functions.operator().call())

    # -- anchors ----------------------------------------------------------------------------------

    def anchor_index(self, root: bytes) -> int | None:
        """The index of `root`'s anchor, or None if it is not anchored."""
        n = int(self.contract.functions.anchorIndex(root).call())
        return n - 1 if n else None

    def anchor_count(self) -> int:
        return int(self.contract.functions.anchorCount().call())

    def get_anchor(self, index: int) -> ChainAnchor:
        root, start, end, records, block = self.contract.functions.anchors(index).call()
        return ChainAnchor(index, bytes(root), int(start), int(end), int(records), int(block))

    def settled_parts(self, root: bytes) -> int:
        return int(self.contract.functions.settledParts(root).call())

    def anchor_tx(self, root: bytes) -> tuple[str, int] | None:
        """The transaction and block that anchored `root` (from its Anchored event)."""
        events = self.contract.events.Anchored.get_logs(from_block=0, argument_filters={"root": root})
        if not events:
            return None
        event = events[0]
        return _hex(event["transactionHash"]), int(event["blockNumber"])

    def anchor(
        self,
        root: bytes,
        interval: tuple[int, int],
        records: int,
        transfers: Sequence[tuple[str, str, int]] = (),
    ) -> AnchorResult:
        """Anchor one batch and settle its transfers: ONE transaction (`anchor`, or
        `anchorAndSettle` with up to `max_transfers` transfers), plus one `settlePart` per
        further `max_transfers` transfers. Idempotent: what the chain already holds for
        `root` (the anchor, settled parts) is not sent again, so a retry after an ambiguous
        failure (a lost receipt) never anchors or settles twice."""
        start, end = (max(0, int(t)) for t in interval)
        parts = chunks(list(transfers), self.max_transfers)
        sent = 0
        gas = 0
        fn = self.contract.functions
        index = self.anchor_index(root)
        tx_hash: str | None = None
        block = 0
        if index is None:
            if parts:
                f, t, a = _columns(parts[0])
                call = fn.anchorAndSettle(root, start, end, records, f, t, a)
            else:
                call = fn.anchor(root, start, end, records)
            receipt = self._send(call, gas_bound(len(parts[0]) if parts else 0))
            sent += 1
            gas += int(receipt["gasUsed"])
            tx_hash, block = _hex(receipt["transactionHash"]), int(receipt["blockNumber"])
            index = self.anchor_index(root)
            if index is None:
                raise ChainError(f"anchor transaction {tx_hash} was mined but root {root.hex()} is not anchored")
        done = self.settled_parts(root)
        for part in range(done, len(parts)):
            f, t, a = _columns(parts[part])
            receipt = self._send(fn.settlePart(root, part, f, t, a), gas_bound(len(parts[part])))
            sent += 1
            gas += int(receipt["gasUsed"])
        if tx_hash is None:
            found = self.anchor_tx(root)
            if found is not None:
                tx_hash, block = found
        return AnchorResult(index, tx_hash or "", block, sent, gas, len(parts))

    def anchor_records(self, records: Iterable[Record], interval: tuple[int, int] | None = None) -> AnchorResult:
        """Anchor a batch of records as they are (no database): their Merkle root (sorted by
        table and key), their interval (from their RoundRecords if not given), their count, and
        the net settlement of their money. DualSink anchors the rows read back instead."""
        rows = [(r.TABLE, r.row()) for r in records]
        leaves = merkle.sorted_leaves((t, str(row[KEYS[t]]), merkle.record_leaf(t, row)) for t, row in rows)
        root = merkle.root([leaf for *_, leaf in leaves])
        transfers = net_transfers(money_deltas(rows))
        return self.anchor(root, interval or interval_of(rows), len(leaves), transfers)

    # -- tokens -------------------------------------------------------------------------------------

    def balance(self, address: str) -> int:
        return int(self.contract.functions.balanceOf(to_checksum_address(address)).call())

    def credit(self, address: str) -> int:
        return int(self.contract.functions.creditOf(to_checksum_address(address)).call())

    def position(self, address: str) -> int:
        """Net position: balance minus the credit drawn (negative for a net payer)."""
        return self.balance(address) - self.credit(address)

    def mint(self, address: str, amount: int) -> str:
        receipt = self._send(self.contract.functions.mint(to_checksum_address(address), amount), gas_bound(1))
        return _hex(receipt["transactionHash"])

    def settle(self, transfers: Sequence[tuple[str, str, int]]) -> str:
        """Plain `settle` of transfers in one transaction (not tied to an anchor)."""
        f, t, a = _columns(transfers)
        return _hex(self._send(self.contract.functions.settle(f, t, a), gas_bound(len(a)))["transactionHash"])

    # -- transactions ---------------------------------------------------------------------------

    def _send(self, call: Any, gas: int | None = None) -> Any:
        """Send one transaction and wait for its receipt; a reverted one raises ChainError.
        `gas`: the call's gas bound, used instead of an estimate when not estimating."""
        params: dict[str, Any] = {"from": self.sender}
        if gas is not None and not self.estimate_gas:
            if self._gas_limit is None:
                self._gas_limit = int(self.w3.eth.get_block("latest")["gasLimit"])
            params["gas"] = min(gas, self._gas_limit)
        if self.account is None:
            tx_hash = call.transact(params)  # the node signs (an unlocked account)
        else:
            params["nonce"] = self.w3.eth.get_transaction_count(self.sender, "pending")
            params["chainId"] = self.chain_id
            tx = call.build_transaction(params)
            signed = self.account.sign_transaction(tx)
            tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
        self.transactions += 1
        receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=self.receipt_timeout, poll_latency=0.05)
        if self.store is not None:
            self.store.commit()  # the block that holds it is durable
        if int(receipt["status"]) != 1:
            raise ChainError(f"transaction {_hex(tx_hash)} reverted")
        return receipt

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def _columns(transfers: Iterable[tuple[str, str, int]]) -> tuple[list[str], list[str], list[int]]:
    f: list[str] = []
    t: list[str] = []
    a: list[int] = []
    for frm, to, amount in transfers:
        f.append(frm)
        t.append(to)
        a.append(int(amount))
    return f, t, a


def _hex(value: Any) -> str:
    if isinstance(value, str):
        return value if value.startswith("0x") else "0x" + value
    return "0x" + bytes(value).hex()
