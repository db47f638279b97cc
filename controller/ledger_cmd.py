"""`microte ledger verify URL [--record ID [--table T]]`: check a chain ledger (docs/chain.md);
`microte ledger balances URL`: its token balances on chain next to the database's money.

Every anchor's Merkle root is recomputed from the rows the database holds now, and compared
with the root the contract stores and with the anchors table. A row whose leaf no longer
matches the leaf recorded when it was anchored is named; so are anchored rows that were
deleted, rows that no anchor covers (inserted afterwards, or written after the last anchor
of a run that crashed), and anchors that the chain holds and the database lost. Token
balances on the chain are compared with the net money of the anchored rows.

With `--record ID`, prints the inclusion proof of that record (JSON) against its anchored
root instead, and whether it verifies against the chain.

`balances` lists every token account (participants named by a money row, the clearing
account, every address a `Transfer` event of the contract names): its balance and credit on
chain, its net position there, and the net money of every money row in the database.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ledger import CHAIN_PREFIX, is_chain_url, merkle
from ledger.dual import (
    ChainConfig,
    anchor_leaves,
    by_table,
    chain_anchors,
    chain_contracts,
    chain_leaves,
    parse_url,
    rows_by_key,
)
from ledger.evm import CLEARING_ADDRESS, MONEY_TABLES, ChainError, EvmAnchor, money_deltas, participant_address
from ledger.schema import KEYS, TABLE_MAP

MAX_LISTED = 20  # unanchored rows named one by one before "... and N more"


@dataclass
class AnchorCheck:
    seq: int
    label: str
    records: int
    transfers: int
    root: str
    chain_index: int | None
    tx_hash: str | None
    block: int | None
    problems: list[str] = field(default_factory=list)
    tampered: list[tuple[str, str]] = field(default_factory=list)  # (table, key) of changed/deleted rows

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Report:
    chain: str
    contract: str | None
    anchors: list[AnchorCheck] = field(default_factory=list)
    unanchored: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # not tied to one anchor
    accounts: int = 0  # token accounts compared

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unanchored and all(a.ok for a in self.anchors)

    @property
    def tampered(self) -> list[tuple[str, str]]:
        return [t for a in self.anchors for t in a.tampered]


def _config(url: str) -> ChainConfig:
    # A plain database URL means the chain ledger on it, with the default chain options.
    return parse_url(url if is_chain_url(url) else CHAIN_PREFIX + url)


@contextmanager
def _database(db_url: str) -> Iterator[sa.Connection]:
    parsed = sa.make_url(db_url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").exists():
        raise FileNotFoundError(f"no ledger database at {parsed.database}")
    engine = sa.create_engine(parsed)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(chain_anchors.name):
                raise LookupError(
                    f"{db_url} has no anchors table: it was not written as a chain ledger ({CHAIN_PREFIX}...)"
                )
            yield conn
    finally:
        engine.dispose()


def _attach(conn: sa.Connection, chain: EvmAnchor, config: ChainConfig) -> str | None:
    address = config.contract
    if address is None:
        address = conn.execute(
            sa.select(chain_contracts.c.contract).where(
                chain_contracts.c.chain_id == chain.chain_id, chain_contracts.c.genesis == chain.genesis_hash()
            )
        ).scalar()
    if address is not None:
        chain.attach(str(address))
    return None if address is None else str(address)


def verify(url: str) -> Report:
    """Check every anchor of the ledger at `url` against its rows and the chain."""
    config = _config(url)
    with _database(config.db_url) as conn:
        chain = config.open_chain(readonly=True)
        try:
            contract = _attach(conn, chain, config)
            report = Report(chain.description, contract)
            if contract is None:
                report.problems.append(f"no MicroteLedger contract of this ledger on {chain.description}")
            _check_anchors(conn, chain if contract else None, report)
            _check_unanchored(conn, report)
            if contract is not None:
                _check_chain_only(conn, chain, report)
                _check_tokens(conn, chain, report)
        finally:
            chain.close()
    return report


def _check_anchors(conn: sa.Connection, chain: EvmAnchor | None, report: Report) -> None:
    chain_id = chain.chain_id if chain is not None else None
    for a in conn.execute(sa.select(chain_anchors).order_by(chain_anchors.c.seq)).all():
        check = AnchorCheck(a.seq, a.label, a.records, a.transfers, a.root, a.chain_index, a.tx_hash, a.block)
        report.anchors.append(check)
        leaves = anchor_leaves(conn, a.seq)
        stored = [bytes.fromhex(leaf) for _, _, leaf in leaves]
        if not stored:
            check.problems.append("no leaves recorded for this anchor (chain_leaves rows deleted)")
            continue
        if "0x" + merkle.root(stored).hex() != a.root:
            check.problems.append("the recorded leaves do not hash to the recorded root (chain_leaves altered)")
        current: list[bytes] = []
        rows: dict[str, dict[str, dict[str, Any]]] = {
            table: rows_by_key(conn, table, keys) for table, keys in by_table((t, k) for t, k, _ in leaves).items()
        }
        for (table, key, _), leaf in zip(leaves, stored, strict=True):
            row = rows[table].get(key)
            if row is None:
                check.problems.append(f"{table} {key}: anchored row deleted")
                check.tampered.append((table, key))
                current.append(b"")
                continue
            now = merkle.record_leaf(table, row)
            current.append(now)
            if now != leaf:
                check.problems.append(f"{table} {key}: row changed since it was anchored")
                check.tampered.append((table, key))
        recomputed = merkle.root([leaf or merkle.leaf_hash(b"") for leaf in current])
        if a.records != len(leaves):
            check.problems.append(f"the anchors table says {a.records} records, {len(leaves)} leaves are recorded")
        if a.status != "anchored":
            check.problems.append("not anchored: its transaction was never confirmed (pending)")
            continue
        if chain is None:
            continue
        if a.chain_id != chain_id or str(a.contract).lower() != chain.address.lower():
            check.problems.append(f"anchored on chain {a.chain_id} contract {a.contract}: not the chain verified")
            continue
        if a.chain_index is None or a.chain_index >= chain.anchor_count():
            check.problems.append(f"the chain holds no anchor #{a.chain_index}")
            continue
        on_chain = chain.get_anchor(a.chain_index)
        if on_chain.root != recomputed:
            check.problems.append(f"root of the rows now 0x{recomputed.hex()} != root on chain 0x{on_chain.root.hex()}")
        if "0x" + on_chain.root.hex() != a.root:
            check.problems.append(f"root in the anchors table {a.root} != root on chain 0x{on_chain.root.hex()}")
        if (on_chain.interval_start, on_chain.interval_end, on_chain.records) != (
            a.interval_start,
            a.interval_end,
            a.records,
        ):
            check.problems.append(
                f"interval/records in the anchors table ({a.interval_start}, {a.interval_end}, {a.records}) "
                f"!= on chain ({on_chain.interval_start}, {on_chain.interval_end}, {on_chain.records})"
            )
        if chain.settled_parts(on_chain.root) != (a.settle_parts or 0):
            check.problems.append(
                f"settlement: {chain.settled_parts(on_chain.root)} parts on chain, {a.settle_parts} recorded"
            )


def _check_unanchored(conn: sa.Connection, report: Report) -> None:
    for table, t in TABLE_MAP.items():
        key = t.c[KEYS[table]]
        covered = sa.exists().where(chain_leaves.c.tbl == table, chain_leaves.c.key == key)
        query = sa.select(key).where(~covered).order_by(key)
        report.unanchored.extend((table, str(k)) for k in conn.execute(query).scalars())


def _check_chain_only(conn: sa.Connection, chain: EvmAnchor, report: Report) -> None:
    """Anchors the contract holds that the anchors table lost."""
    known = {
        int(i)
        for i in conn.execute(
            sa.select(chain_anchors.c.chain_index).where(
                chain_anchors.c.contract == chain.address, chain_anchors.c.chain_index.is_not(None)
            )
        ).scalars()
    }
    lost = [i for i in range(chain.anchor_count()) if i not in known]
    for i in lost[:MAX_LISTED]:
        a = chain.get_anchor(i)
        report.problems.append(
            f"anchor #{i} on chain (root 0x{a.root.hex()}, {a.records} records) is missing from the anchors table"
        )
    if len(lost) > MAX_LISTED:
        report.problems.append(f"... and {len(lost) - MAX_LISTED} more anchors missing from the anchors table")


def _check_tokens(conn: sa.Connection, chain: EvmAnchor, report: Report) -> None:
    """Token positions on the chain against the net money of the anchored rows."""
    anchored = sa.select(chain_anchors.c.seq).where(
        chain_anchors.c.status == "anchored", chain_anchors.c.contract == chain.address
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    for table in ("transactions", "token_transfers", "flex_tokens"):
        keys = list(
            conn.execute(
                sa.select(chain_leaves.c.key).where(
                    chain_leaves.c.tbl == table, chain_leaves.c.anchor_seq.in_(anchored)
                )
            ).scalars()
        )
        rows.extend((table, r) for r in rows_by_key(conn, table, [str(k) for k in keys]).values())
    deltas = money_deltas(rows)
    accounts = {(participant_address(p) if p else CLEARING_ADDRESS): (p or "clearing") for p in deltas}
    wrong = []
    for address, who in sorted(accounts.items(), key=lambda kv: kv[1]):
        expected = deltas["" if who == "clearing" else who]
        actual = chain.position(address)
        if actual != expected:
            wrong.append(f"{who} ({address}): {actual} on chain, {expected} in the ledger")
    report.accounts = len(accounts)
    report.problems.extend(f"token position of {w}" for w in wrong[:MAX_LISTED])
    if len(wrong) > MAX_LISTED:
        report.problems.append(f"... and {len(wrong) - MAX_LISTED} more token positions differ")


def render(report: Report) -> str:
    lines = [f"chain: {report.chain}, contract {report.contract or '(none)'}"]
    for a in report.anchors:
        head = (
            f"#{a.seq} [{a.label}] records={a.records} transfers={a.transfers} root={a.root[:18]}... "
            f"chain index={a.chain_index} block={a.block} tx={(a.tx_hash or '-')[:18]}..."
        )
        lines.append(("OK       " if a.ok else "TAMPERED ") + head)
        lines.extend(f"    {p}" for p in a.problems)
    for table, key in report.unanchored[:MAX_LISTED]:
        lines.append(f"UNANCHORED {table} {key}: no anchor covers this row")
    if len(report.unanchored) > MAX_LISTED:
        lines.append(f"UNANCHORED ... and {len(report.unanchored) - MAX_LISTED} more rows")
    lines.extend(f"FAILED   {p}" for p in report.problems)
    records = sum(a.records for a in report.anchors)
    bad = [a for a in report.anchors if not a.ok]
    if report.ok:
        lines.append(
            f"OK: {len(report.anchors)} anchors, {records} records, {report.accounts} token accounts match the chain"
        )
    else:
        named = ", ".join(f"{t} {k}" for t, k in report.tampered[:MAX_LISTED])
        lines.append(
            f"FAILED: {len(bad)} of {len(report.anchors)} anchors do not verify"
            + (f"; tampered rows: {named}" if named else "")
            + (f"; {len(report.unanchored)} rows not anchored" if report.unanchored else "")
        )
    return "\n".join(lines)


def inclusion_proofs(url: str, record_id: str, table: str | None = None) -> list[dict[str, Any]]:
    """The inclusion proof of each record with key `record_id` (in `table`, or any table)."""
    config = _config(url)
    out: list[dict[str, Any]] = []
    with _database(config.db_url) as conn:
        query = sa.select(chain_leaves).where(chain_leaves.c.key == record_id)
        if table is not None:
            query = query.where(chain_leaves.c.tbl == table)
        hits = conn.execute(query.order_by(chain_leaves.c.tbl)).all()
        if not hits:
            found = [t for t in ([table] if table else TABLE_MAP) if rows_by_key(conn, t, [record_id])]
            if found:
                raise LookupError(f"record {record_id!r} ({', '.join(found)}) is not anchored")
            raise LookupError(f"no record {record_id!r}" + (f" in {table}" if table else ""))
        chain = config.open_chain(readonly=True)
        try:
            contract = _attach(conn, chain, config)
            for hit in hits:
                out.append(_proof(conn, chain if contract else None, hit))
        finally:
            chain.close()
    return out


def _proof(conn: sa.Connection, chain: EvmAnchor | None, hit: Any) -> dict[str, Any]:
    a = conn.execute(sa.select(chain_anchors).where(chain_anchors.c.seq == hit.anchor_seq)).one()
    leaves = [bytes.fromhex(leaf) for _, _, leaf in anchor_leaves(conn, a.seq)]
    path = merkle.proof(leaves, hit.pos)
    row = rows_by_key(conn, hit.tbl, [hit.key]).get(hit.key)
    leaf = merkle.record_leaf(hit.tbl, row) if row is not None else None
    chain_root: bytes | None = None
    if chain is not None and a.status == "anchored" and a.chain_index is not None and a.contract == chain.address:
        chain_root = chain.get_anchor(a.chain_index).root
    return {
        "record": {"table": hit.tbl, "key": hit.key, "row": row},
        "leaf": None if leaf is None else "0x" + leaf.hex(),
        "anchored_leaf": "0x" + hit.leaf,
        "leaf_encoding": "sha256(0x00 || data), data = JSON [domain, table, row] with sorted keys",
        "leaf_data": None if row is None else merkle.record_data(hit.tbl, row).decode(),
        "position": hit.pos,
        "proof": [{"side": side, "hash": "0x" + h.hex()} for side, h in path],
        "node_encoding": "sha256(0x01 || left || right)",
        "anchor": {
            "seq": a.seq,
            "label": a.label,
            "root": a.root,
            "interval": [a.interval_start, a.interval_end],
            "records": a.records,
            "status": a.status,
            "chain_id": a.chain_id,
            "contract": a.contract,
            "index": a.chain_index,
            "tx_hash": a.tx_hash,
            "block": a.block,
        },
        "chain_root": None if chain_root is None else "0x" + chain_root.hex(),
        "verified": leaf is not None and chain_root is not None and merkle.verify(leaf, path, chain_root),
    }


@dataclass
class Account:
    who: str  # participant id, "clearing", or "?" (an address on chain that no row names)
    address: str
    balance: int  # balanceOf on chain
    credit: int  # creditOf on chain
    database: int  # net money over every money row in the database

    @property
    def chain(self) -> int:
        return self.balance - self.credit

    @property
    def ok(self) -> bool:
        return self.chain == self.database


@dataclass
class Balances:
    chain: str
    contract: str
    accounts: list[Account] = field(default_factory=list)
    unanchored_rows: int = 0  # money rows no confirmed anchor covers (not settled on chain)

    @property
    def mismatches(self) -> list[Account]:
        return [a for a in self.accounts if not a.ok]

    @property
    def ok(self) -> bool:
        return not self.mismatches


def balances(url: str) -> Balances:
    """Token balances on chain against the net money of the database's money rows."""
    config = _config(url)
    with _database(config.db_url) as conn:
        chain = config.open_chain(readonly=True)
        try:
            contract = _attach(conn, chain, config)
            if contract is None:
                raise LookupError(f"no MicroteLedger contract of this ledger on {chain.description}")
            rows: list[tuple[str, dict[str, Any]]] = []
            for table in MONEY_TABLES:
                rows.extend((table, dict(r._mapping)) for r in conn.execute(sa.select(*TABLE_MAP[table].columns)))
            settled = _settled_keys(conn, chain.address)
            report = Balances(chain.description, contract)
            report.unanchored_rows = sum(1 for t, r in rows if (t, str(r[KEYS[t]])) not in settled)
            deltas = money_deltas(rows)
            # "" is no participant: flex_tokens mints from it, money_deltas books it to the clearing account
            ids = {str(r[c]) for t, r in rows for c in _PARTIES[t]} - {""}
            names = {participant_address(p): p for p in sorted(ids)} | {CLEARING_ADDRESS: "clearing"}
            addresses = set(names) | _token_accounts(conn, chain)

            def order(address: str) -> tuple[int, str]:  # participants, the clearing account, unknown
                who = names.get(address)
                return (2 if who is None else 1 if who == "clearing" else 0, who or address)

            for address in sorted(addresses, key=order):
                who = names.get(address, "?")
                expected = deltas.get("" if who == "clearing" else who, 0) if who != "?" else 0
                report.accounts.append(Account(who, address, chain.balance(address), chain.credit(address), expected))
        finally:
            chain.close()
    return report


_PARTIES = {
    "transactions": ("buyer_id", "seller_id"),
    "token_transfers": ("payer_id", "payee_id"),
    "flex_tokens": ("from_id", "to_id"),
}


def _settled_keys(conn: sa.Connection, contract: str) -> set[tuple[str, str]]:
    anchored = sa.select(chain_anchors.c.seq).where(
        chain_anchors.c.status == "anchored", chain_anchors.c.contract == contract
    )
    query = sa.select(chain_leaves.c.tbl, chain_leaves.c.key).where(
        chain_leaves.c.tbl.in_(MONEY_TABLES), chain_leaves.c.anchor_seq.in_(anchored)
    )
    return {(str(t), str(k)) for t, k in conn.execute(query)}


def _token_accounts(conn: sa.Connection, chain: EvmAnchor) -> set[str]:
    """Every address a Transfer event of the contract names (minting's zero address aside)."""
    start = conn.execute(
        sa.select(chain_contracts.c.deploy_block).where(chain_contracts.c.contract == chain.address)
    ).scalar()
    out: set[str] = set()
    for event in chain.contract.events.Transfer.get_logs(from_block=int(start or 0)):
        out.update(str(event["args"][side]) for side in ("from", "to"))
    out.discard("0x0000000000000000000000000000000000000000")
    return out


def render_balances(report: Balances) -> str:
    header = ("account", "address", "balance", "credit", "chain net", "database net")
    cells = [(a.who, a.address, str(a.balance), str(a.credit), str(a.chain), str(a.database)) for a in report.accounts]
    widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        left = [row[i].ljust(widths[i]) for i in range(2)]
        right = [row[i].rjust(widths[i]) for i in range(2, len(row))]
        return "  ".join(left + right)

    lines = [f"chain: {report.chain}, contract {report.contract}", line(header)]
    for account, row in zip(report.accounts, cells, strict=True):
        lines.append(
            line(row) + ("" if account.ok else f"  MISMATCH (chain - database = {account.chain - account.database})")
        )
    pending = (
        f"; {report.unanchored_rows} money rows are not anchored yet (not settled on chain)"
        if report.unanchored_rows
        else ""
    )
    if report.ok:
        lines.append(f"OK: {len(report.accounts)} accounts, the chain's token positions equal the database's net money")
    else:
        lines.append(f"FAILED: {len(report.mismatches)} of {len(report.accounts)} accounts differ{pending}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.action == "balances":
        return main_balances(args)
    try:
        if args.record is not None:
            proofs = inclusion_proofs(args.url, args.record, args.table)
            print(json.dumps(proofs[0] if len(proofs) == 1 else proofs, indent=2))
            return 0 if all(p["verified"] for p in proofs) else 1
        report = verify(args.url)
    except (LookupError, OSError, ValueError, ChainError) as exc:
        print(f"microte ledger verify: {exc}", file=sys.stderr)
        return 2
    print(render(report))
    return 0 if report.ok else 1


def main_balances(args: argparse.Namespace) -> int:
    try:
        report = balances(args.url)
    except (LookupError, OSError, ValueError, ChainError) as exc:
        print(f"microte ledger balances: {exc}", file=sys.stderr)
        return 2
    print(render_balances(report))
    return 0 if report.ok else 1
