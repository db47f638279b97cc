"""A ledger on a database and a chain: records to the database first, then their Merkle
root anchored on an EVM chain (docs/chain.md).

`DualSink` implements `market.sink.Sink`:

- `write(batch)` first makes the batch durable in the database (the wrapped sink: SQLite or
  PostgreSQL). Nothing is acknowledged before that.
- A batch that closes a round (it holds a `RoundRecord`, as `MarketServer._finish` writes
  one per round) is then anchored: the records written since the last anchor and the
  round's own become ONE anchor, a Merkle root (ledger/merkle.py) sent in ONE transaction
  with the net token settlement of their money (ledger/evm.py). `write` returns once the
  transaction's receipt is in and the anchor is recorded; if the chain stays unreachable
  after the retries, `write` raises, and the records stay durable in the database and are
  anchored by a later write (or at the next start).
- Other batches (acknowledged orders, readings, grid and flexibility events) are durable on
  return and ride with the next round's anchor: one transaction per round, never per trade.

Each anchor is written ahead in the database (tables `chain_anchors` and `chain_leaves`: its
root, interval, count and every leaf's table, key and hash) before its transaction is sent,
and completed with the transaction hash and block after. A crash in between is resolved at
the next start: the chain is asked whether the root is anchored, and the transaction is sent
only if it is not. Rows that no anchor covers (written just before a crash) are anchored at
start. A record anchored once is never anchored again: a retried batch is not duplicated.

URLs (`ledger.open_sink`): `evm+` before a database URL, chain options in its query string:

    evm+sqlite:///ledger.db                       in-process chain, kept in ledger.db.evm
    evm+sqlite:///ledger.db?evm_state=memory      in-process chain in memory (lost at exit)
    evm+sqlite:///ledger.db?chain=http://127.0.0.1:8545     a JSON-RPC node
    evm+postgresql://user@host/db?chain=https://node.example&contract=0x...&max_transfers=100

The private key that signs on a JSON-RPC node comes from $MICROTE_CHAIN_KEY (hex), never from
the URL; without it the node's first unlocked account sends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential

from ledger import CHAIN_PREFIX, is_chain_url, merkle
from ledger.dataset_sink import DatasetSink
from ledger.dataset_sink import is_transient as db_transient
from ledger.evm import MAX_TRANSFERS_PER_TX, ChainError, EvmAnchor, interval_of, money_deltas, net_transfers
from ledger.schema import KEYS, TABLE_MAP
from market.core.records import Batch, Record, RoundRecord

log = logging.getLogger(__name__)

T = TypeVar("T")

CHAIN_KEY_ENV = "MICROTE_CHAIN_KEY"
_OPTIONS = ("chain", "evm_state", "contract", "max_transfers")

# -- the anchors' tables (ledger-local: not records of the market) ---------------------------

metadata = sa.MetaData()

chain_contracts = sa.Table(
    "chain_contracts",
    metadata,
    sa.Column("chain_id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("genesis", sa.Text, primary_key=True),  # block 0's hash: tells chains apart
    sa.Column("contract", sa.Text, nullable=False),
    sa.Column("deploy_tx", sa.Text),
    sa.Column("deploy_block", sa.BigInteger),
    sa.Column("operator", sa.Text, nullable=False),
    sa.Column("time_created", sa.BigInteger, nullable=False),
)

chain_anchors = sa.Table(
    "chain_anchors",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),  # 0, 1, 2... local order
    sa.Column("label", sa.Text, nullable=False),  # the round ids it closes
    sa.Column("root", sa.Text, nullable=False),  # hex, 0x...
    sa.Column("interval_start", sa.BigInteger, nullable=False),
    sa.Column("interval_end", sa.BigInteger, nullable=False),
    sa.Column("records", sa.BigInteger, nullable=False),
    sa.Column("transfers", sa.BigInteger, nullable=False),  # net token transfers settled with it
    sa.Column("status", sa.Text, nullable=False),  # pending | anchored
    sa.Column("chain_id", sa.BigInteger),
    sa.Column("contract", sa.Text),
    sa.Column("chain_index", sa.BigInteger),  # the anchor's index in the contract
    sa.Column("tx_hash", sa.Text),
    sa.Column("block", sa.BigInteger),
    sa.Column("settle_parts", sa.BigInteger),
    sa.Column("gas_used", sa.BigInteger),
    sa.Column("time_created", sa.BigInteger, nullable=False),
    sa.Column("time_anchored", sa.BigInteger),
)

chain_leaves = sa.Table(
    "chain_leaves",
    metadata,
    sa.Column("anchor_seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("pos", sa.BigInteger, primary_key=True, autoincrement=False),  # leaf index in the tree
    sa.Column("tbl", sa.Text, nullable=False),
    sa.Column("key", sa.Text, nullable=False),
    sa.Column("leaf", sa.Text, nullable=False),  # hex sha256(0x00 || record data)
)
# A record is anchored once; also the index of "which anchor holds this record".
sa.Index("ux_chain_leaves_record", chain_leaves.c.tbl, chain_leaves.c.key, unique=True)


# -- URLs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainConfig:
    """A dual ledger URL taken apart."""

    db_url: str  # the database, as `DatasetSink` and `ledger.digest` take it
    chain: str | None  # a JSON-RPC node URL; None: the in-process chain
    state: str | None  # in-process chain: file kept in; None: memory
    contract: str | None  # attach to this contract address instead of the recorded one
    max_transfers: int = MAX_TRANSFERS_PER_TX  # token transfers per transaction

    def open_chain(self, *, readonly: bool = False) -> EvmAnchor:
        if self.chain is not None:
            key = os.environ.get(CHAIN_KEY_ENV) or None
            return EvmAnchor.connect(self.chain, private_key=key, max_transfers=self.max_transfers)
        return EvmAnchor.in_process(self.state, readonly=readonly, max_transfers=self.max_transfers)

    def describe(self) -> str:
        if self.chain is not None:
            return f"JSON-RPC node {self.chain}"
        return f"in-process chain ({self.state or 'memory'})"


def parse_url(url: str) -> ChainConfig:
    """`evm+DATABASE_URL[?chain=URL&evm_state=PATH|memory&contract=0x...]`."""
    if not is_chain_url(url):
        raise ValueError(
            f"not a chain ledger URL: {url!r} (expected {CHAIN_PREFIX}sqlite:///... or {CHAIN_PREFIX}postgresql://...)"
        )
    try:
        parsed = sa.make_url(url[len(CHAIN_PREFIX) :])
    except sa.exc.ArgumentError as exc:
        raise ValueError(f"ledger URL {url!r}: {exc}") from None
    query = parsed.query
    for name in _OPTIONS:
        if isinstance(query.get(name), tuple):
            raise ValueError(f"ledger URL {url!r}: {name} given more than once")
    chain = _opt(query, "chain")
    state = _opt(query, "evm_state")
    contract = _opt(query, "contract")
    max_transfers = _opt(query, "max_transfers")
    if max_transfers is not None and (not max_transfers.isdigit() or int(max_transfers) < 1):
        raise ValueError(f"ledger URL {url!r}: max_transfers must be a positive integer")
    db = parsed.difference_update_query(_OPTIONS)
    backend = db.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        scheme = url.partition(":")[0]
        raise ValueError(
            f"unknown ledger URL scheme {scheme!r} in {url!r}: a chain ledger is {CHAIN_PREFIX} before a "
            f"database URL ({CHAIN_PREFIX}sqlite:///PATH or {CHAIN_PREFIX}postgresql://...), the node in ?chain=URL"
        )
    if backend == "sqlite" and db.database in (None, "", ":memory:"):
        raise ValueError(f"ledger URL {url!r}: SQLite needs a file, e.g. {CHAIN_PREFIX}sqlite:///microte.db")
    if chain is not None:
        if state is not None:
            raise ValueError(f"ledger URL {url!r}: evm_state is for the in-process chain, not with chain=")
    elif state == "memory":
        state = None
    elif state is None:
        if backend == "sqlite":
            state = f"{db.database}.evm"  # next to the database file
        else:
            log.warning("in-process chain of %s kept in memory: give evm_state=PATH to keep it", url)
    return ChainConfig(
        db.render_as_string(hide_password=False),
        chain,
        state,
        contract,
        int(max_transfers) if max_transfers else MAX_TRANSFERS_PER_TX,
    )


def _opt(query: Any, name: str) -> str | None:
    value = query.get(name)
    return str(value) if value else None


def db_url(url: str) -> str:
    """The database part of a ledger URL (any URL that is not a chain URL is returned as is)."""
    return parse_url(url).db_url if is_chain_url(url) else url


# -- reading rows back -------------------------------------------------------------------------

_IN_CHUNK = 500  # keys per IN (...): below every backend's parameter limit


def rows_by_key(conn: sa.Connection, table: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The current rows of `table` with these keys (key -> row, columns in struct order)."""
    t = TABLE_MAP[table]
    key = t.c[KEYS[table]]
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(keys), _IN_CHUNK):
        query = sa.select(*t.columns).where(key.in_(keys[i : i + _IN_CHUNK]))
        for row in conn.execute(query):
            values = {str(k): v for k, v in row._mapping.items()}
            out[str(values[KEYS[table]])] = values
    return out


def by_table(items: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for table, key in items:
        grouped.setdefault(table, []).append(key)
    return grouped


def label_of(rows: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    ids = sorted(str(r["id"]) for t, r in rows if t == RoundRecord.TABLE)
    if not ids:
        return "records between rounds"
    return ",".join(ids) if len(ids) <= 3 else f"{ids[0]}..{ids[-1]} ({len(ids)} rounds)"


def record_key(record: Record) -> tuple[str, str]:
    return record.TABLE, str(getattr(record, KEYS[record.TABLE]))


def is_chain_transient(exc: BaseException) -> bool:
    """Failures worth retrying: the node unreachable or slow, a lost receipt, a busy database.
    A reverted transaction or a contradiction (ChainError) is not retried."""
    from web3.exceptions import ProviderConnectionError, RequestTimedOut, TimeExhausted

    if isinstance(exc, OSError | TimeoutError | ProviderConnectionError | RequestTimedOut | TimeExhausted):
        return True  # requests' ConnectionError and Timeout are OSErrors
    return db_transient(exc)


# -- the sink ------------------------------------------------------------------------------------


class DualSink:
    """Records to the database (durable first), then each round's Merkle root to the chain."""

    def __init__(
        self,
        db: DatasetSink,
        chain: EvmAnchor | Callable[[], EvmAnchor],
        *,
        contract: str | None = None,
        retry_attempts: int = 6,
        retry_wait_max: float = 2.0,
        busy_timeout: float = 5.0,
    ) -> None:
        self.db = db
        self._chain_factory = chain if callable(chain) and not isinstance(chain, EvmAnchor) else None
        self.chain: EvmAnchor | None = chain if isinstance(chain, EvmAnchor) else None
        self.contract = contract
        self.retry_attempts = retry_attempts
        self.retry_wait_max = retry_wait_max
        self.busy_timeout = busy_timeout
        self.anchored = 0  # anchors completed by this sink
        self.retries = 0
        self._engine: sa.Engine | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[tuple[str, str]] = []  # durable, not yet anchored (table, key)
        self._staged: dict[int, list[tuple[str, str, int]]] = {}  # seq -> transfers (a cache)
        self._lock = asyncio.Lock()
        self._open = False

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> DualSink:
        config = parse_url(url)
        return cls(DatasetSink(config.db_url), config.open_chain, contract=config.contract, **kw)

    # -- Sink ------------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.db.start()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chain")
        try:
            async for attempt in self._retrying():
                with attempt:
                    await self._run(self._connect)
            self._open = True
            # Finish what a previous run left: anchors written ahead, rows no anchor covers.
            async with self._lock:
                await self._run(self._stage_unanchored)
                await self._resolve()
        except BaseException:
            await self._shutdown()
            await self.db.close()
            raise

    async def write(self, batch: Batch) -> None:
        if not self._open:
            raise RuntimeError("chain ledger sink is not open (call start(), not after close())")
        await self.db.write(batch)  # durable before anything else, or raise
        keys = [record_key(r) for r in batch.records]
        if not any(isinstance(r, RoundRecord) for r in batch.records):
            self._pending.extend(keys)  # anchored with the next round
            return
        async with self._lock:
            keys = self._pending + keys
            self._pending = []
            try:
                async for attempt in self._retrying():
                    with attempt:
                        await self._run(self._stage, keys)
            except BaseException:
                self._pending[:0] = keys  # not staged: still to anchor
                raise
            await self._resolve()

    async def read(self, table: str, after: tuple[str, int] | None = None) -> list[dict[str, Any]]:
        return await self.db.read(table, after)

    async def close(self) -> None:
        if self._open:
            self._open = False
            async with self._lock:
                try:
                    if self._pending:
                        keys, self._pending = self._pending, []
                        await self._run(self._stage, keys)
                    await self._resolve()
                except Exception:
                    # Durable in the database: anchored at the next start.
                    log.exception("could not anchor the last records; they are anchored at the next start")
        await self.db.close()
        await self._shutdown()

    # -- anchoring -----------------------------------------------------------------------------------

    async def _resolve(self) -> None:
        """Send every anchor written ahead and not yet on the chain, in order, with retries."""
        async for attempt in self._retrying():
            with attempt:
                await self._run(self._send_pending)

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_random_exponential(multiplier=0.05, max=self.retry_wait_max),
            retry=retry_if_exception(is_chain_transient),
            before_sleep=self._on_retry,
            reraise=True,
        )

    def _on_retry(self, state: RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        log.warning("chain anchor failed (attempt %d), retrying: %r", state.attempt_number, exc)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- chain thread --------------------------------------------------------------------------------

    def _connect(self) -> None:
        if self._engine is None:
            self._engine = open_engine(self.db.url, self.busy_timeout)
            with self._engine.begin() as conn:
                metadata.create_all(conn, checkfirst=True)
        if self.chain is None:
            assert self._chain_factory is not None
            self.chain = self._chain_factory()
        chain = self.chain
        if chain.has_contract:
            return
        chain_id, genesis = chain.chain_id, chain.genesis_hash()
        with self._engine.begin() as conn:
            known = conn.execute(
                sa.select(chain_contracts.c.contract).where(
                    chain_contracts.c.chain_id == chain_id, chain_contracts.c.genesis == genesis
                )
            ).scalar()
        address = self.contract or known
        if address is not None:
            chain.attach(address)
            operator = chain.operator()
            if operator.lower() != chain.sender.lower():
                raise ChainError(f"contract {address}: operator is {operator}, not this sender {chain.sender}")
            deploy_tx, deploy_block = None, None
        else:
            address, deploy_tx, deploy_block = chain.deploy()
            log.info("deployed MicroteLedger at %s on chain %s (%s)", address, chain_id, chain.description)
        if known != address:
            with self._engine.begin() as conn:
                conn.execute(
                    chain_contracts.delete().where(
                        chain_contracts.c.chain_id == chain_id, chain_contracts.c.genesis == genesis
                    )
                )
                conn.execute(
                    chain_contracts.insert().values(
                        chain_id=chain_id,
                        genesis=genesis,
                        contract=address,
                        deploy_tx=deploy_tx,
                        deploy_block=deploy_block,
                        operator=chain.sender,
                        time_created=int(time.time()),
                    )
                )

    def _stage(self, keys: Sequence[tuple[str, str]]) -> int | None:
        """Write one anchor ahead (status pending) for the records of `keys` not anchored yet,
        its leaves computed from the rows as the database holds them."""
        assert self._engine is not None
        with self._engine.begin() as conn:
            wanted = _unique(keys)
            grouped = by_table(wanted)
            for table, ks in list(grouped.items()):
                done = _anchored_keys(conn, table, ks)
                grouped[table] = [k for k in ks if k not in done]
            rows: list[tuple[str, dict[str, Any]]] = []
            leaves: list[tuple[str, str, bytes]] = []
            for table, ks in grouped.items():
                if not ks:
                    continue
                found = rows_by_key(conn, table, ks)
                for k in ks:
                    row = found.get(k)
                    if row is None:
                        log.error("record %s %r is not in the database: not anchored", table, k)
                        continue
                    rows.append((table, row))
                    leaves.append((table, k, merkle.record_leaf(table, row)))
            if not leaves:
                return None
            leaves = merkle.sorted_leaves(leaves)
            root = merkle.root([leaf for _, _, leaf in leaves])
            interval = interval_of(rows)
            transfers = net_transfers(money_deltas(rows))
            seq = conn.execute(sa.select(sa.func.coalesce(sa.func.max(chain_anchors.c.seq) + 1, 0))).scalar_one()
            conn.execute(
                chain_anchors.insert().values(
                    seq=seq,
                    label=label_of(rows),
                    root="0x" + root.hex(),
                    interval_start=interval[0],
                    interval_end=interval[1],
                    records=len(leaves),
                    transfers=len(transfers),
                    status="pending",
                    time_created=int(time.time()),
                )
            )
            conn.execute(
                chain_leaves.insert(),
                [
                    {"anchor_seq": seq, "pos": i, "tbl": t, "key": k, "leaf": leaf.hex()}
                    for i, (t, k, leaf) in enumerate(leaves)
                ],
            )
        self._staged[seq] = transfers
        return int(seq)

    def _stage_unanchored(self) -> None:
        """Anchor rows that no anchor covers: written just before a crash, or before this
        database was first used with a chain."""
        assert self._engine is not None
        keys: list[tuple[str, str]] = []
        with self._engine.connect() as conn:
            for table, t in TABLE_MAP.items():
                key = t.c[KEYS[table]]
                covered = sa.exists().where(chain_leaves.c.tbl == table, chain_leaves.c.key == key)
                keys.extend((table, str(k)) for k in conn.execute(sa.select(key).where(~covered)).scalars())
        if keys:
            log.info("anchoring %d records that no anchor covers", len(keys))
            self._stage(keys)

    def _send_pending(self) -> None:
        assert self._engine is not None and self.chain is not None
        chain = self.chain
        with self._engine.connect() as conn:
            pending = conn.execute(
                sa.select(chain_anchors).where(chain_anchors.c.status == "pending").order_by(chain_anchors.c.seq)
            ).all()
        for a in pending:
            transfers = self._staged.get(a.seq)
            if transfers is None:
                transfers = self._transfers_of(a.seq)
            root = bytes.fromhex(a.root.removeprefix("0x"))
            result = chain.anchor(root, (a.interval_start, a.interval_end), a.records, transfers)
            with self._engine.begin() as conn:
                conn.execute(
                    chain_anchors.update()
                    .where(chain_anchors.c.seq == a.seq)
                    .values(
                        status="anchored",
                        chain_id=chain.chain_id,
                        contract=chain.address,
                        chain_index=result.index,
                        tx_hash=result.tx_hash,
                        block=result.block,
                        settle_parts=result.settle_parts,
                        gas_used=result.gas_used,
                        time_anchored=int(time.time()),
                    )
                )
            self._staged.pop(a.seq, None)
            self.anchored += 1

    def _transfers_of(self, seq: int) -> list[tuple[str, str, int]]:
        assert self._engine is not None
        with self._engine.connect() as conn:
            return net_transfers(money_deltas(anchor_rows(conn, seq)))

    async def _shutdown(self) -> None:
        if self._executor is None:
            return

        def dispose() -> None:
            if self.chain is not None:
                self.chain.close()
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None

        await self._run(dispose)
        self._executor.shutdown(wait=True)
        self._executor = None


def _unique(keys: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(keys))


def _anchored_keys(conn: sa.Connection, table: str, keys: Sequence[str]) -> set[str]:
    done: set[str] = set()
    for i in range(0, len(keys), _IN_CHUNK):
        query = sa.select(chain_leaves.c.key).where(
            chain_leaves.c.tbl == table, chain_leaves.c.key.in_(keys[i : i + _IN_CHUNK])
        )
        done.update(str(k) for k in conn.execute(query).scalars())
    return done


def anchor_leaves(conn: sa.Connection, seq: int) -> list[tuple[str, str, str]]:
    """(table, key, leaf hex) of an anchor, in tree order."""
    query = (
        sa.select(chain_leaves.c.tbl, chain_leaves.c.key, chain_leaves.c.leaf)
        .where(chain_leaves.c.anchor_seq == seq)
        .order_by(chain_leaves.c.pos)
    )
    return [(str(t), str(k), str(leaf)) for t, k, leaf in conn.execute(query)]


def anchor_rows(conn: sa.Connection, seq: int) -> list[tuple[str, dict[str, Any]]]:
    """The current rows of an anchor's records (those still in the database)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for table, keys in by_table((t, k) for t, k, _ in anchor_leaves(conn, seq)).items():
        found = rows_by_key(conn, table, keys)
        out.extend((table, found[k]) for k in keys if k in found)
    return out


def open_engine(url: str, busy_timeout: float = 5.0) -> sa.Engine:
    """An engine on the ledger's database, set up as DatasetSink sets up its own (SQLite:
    WAL, synchronous=FULL), for the anchors' tables."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_pre_ping=True)
    if parsed.database and not Path(parsed.database).parent.exists():
        raise FileNotFoundError(f"no directory for the ledger database {parsed.database}")
    engine = sa.create_engine(parsed, connect_args={"timeout": busy_timeout})

    @sa.event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    return engine
