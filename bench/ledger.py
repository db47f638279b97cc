"""Ledger write throughput: rows per second of whole rounds into SQLite and PostgreSQL.

    python bench/ledger.py [--participants 10000] [--rounds 20] [--backend sqlite postgresql]
                           [--path bulk reference] [--repeat 1]

Each round is one `write()` (one transaction) of the rows a round of N participants makes:
a meter reading per participant, a settlement per fifth of them and the transactions of
the exchange (a p2p row per settlement, then grid_buy, self or grid_sell per participant),
with the shapes of a real `microte sim scenarios/community.toml` ledger (ids, canonical
JSON readings, NULL client ids and commit ids). `bulk` is the sink's path (multi-row
inserts on SQLite, COPY on PostgreSQL); `reference` the row-at-a-time statements it
replaced (`DatasetSink(bulk=False)`). PostgreSQL is a throwaway cluster of tests/pg.py
(`initdb` on a free loopback port, server defaults: fsync and synchronous_commit on; the
database collates ICU en-US, as the tests' do, or C with --pg-collation C). The digests of all paths must agree.

Prints figures; never asserts (DESIGN.md: benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path and its name would
# shadow the `ledger` package: put the project root there instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

from ledger import DatasetSink, ledger_digest  # noqa: E402
from market.core.records import GRID_ID, Batch, MeterRecord, Record, Settlement, Transaction, amount  # noqa: E402

T0 = 1_781_481_600
SLOT = 900


def round_batch(n: int, participants: int) -> Batch:
    """The ledger rows of round `n` of a community of `participants` (deterministic)."""
    start, end = T0 + n * SLOT, T0 + (n + 1) * SLOT
    pids = [f"{'S' if p % 4 == 0 else 'H'}{p:05d}" for p in range(participants)]
    records: list[Record] = []
    for p, pid in enumerate(pids):
        solar = (p * 37 + n * 11) % 900 if p % 4 == 0 else 0
        external = 0 if solar > 400 else 20 + (p * 13 + n) % 60
        own = min(solar, 10 + p % 30) if solar else 0
        gen = f'{{"solar":{solar - own}}}' if solar else "{}"
        other = f'{{"external":{external},"solar":{own}}}' if own else f'{{"external":{external}}}'
        records.append(
            MeterRecord(
                id=f"m{start}-{pid}",
                participant_id=pid,
                time_interval_start=start,
                time_interval_end=end,
                generation=gen,
                consumption=f'{{"bess":{{}},"other":{other}}}',
                time_creation=start,
            )
        )
    txs: list[Transaction] = []

    def tx(kind: str, seller: str, buyer: str, source: str, q: int, price: float, commit: str | None) -> None:
        txs.append(
            Transaction(
                id=f"t{start}-{len(txs)}",
                kind=kind,  # type: ignore[arg-type]
                time_delivery_start=start,
                time_delivery_end=end,
                seller_id=seller,
                buyer_id=buyer,
                energy_source=source,
                quantity=q,
                price_buy=price,
                price_sell=price,
                amount_buy=amount(q, price),
                amount_sell=amount(q, price),
                commit_id=commit,
                time_creation=start,
            )
        )

    for seq in range(participants // 5):
        seller, buyer = pids[(seq * 4) % participants], pids[(seq * 7 + 1) % participants]
        q, price = 5 + (seq * 7) % 80, round(0.12 + (seq % 9) / 100, 4)
        commit = f"c{start}-{seq}"
        records.append(
            Settlement(
                commit_id=commit,
                time_delivery_start=start,
                time_delivery_end=end,
                seller_id=seller,
                buyer_id=buyer,
                bid_uuid=f"{start}.{buyer}.{seq % 3}",
                ask_uuid=f"{start}.{seller}.{seq % 2}",
                bid_id=f"{start}-{seq % 3}" if seq % 3 else None,
                ask_id=f"{start}-{seq % 2}",
                energy_source="solar",
                quantity=q,
                price_buy=price,
                price_sell=price,
                amount_buy=amount(q, price),
                amount_sell=amount(q, price),
                dispatch=False,
                seq=seq,
                time_creation=start - SLOT,
            )
        )
        tx("p2p", seller, buyer, "solar", q, price, commit)
    for p, pid in enumerate(pids):
        if p % 4 == 0 and p % 8:
            tx("self", pid, pid, "solar", 10 + p % 30, 0.0, None)
        if p % 10 == 0:
            tx("grid_sell", pid, GRID_ID, "solar", 50 + p % 300, 0.08, None)
        else:
            tx("grid_buy", GRID_ID, pid, GRID_ID, 20 + p % 60, 0.24, None)
    return Batch((*records, *txs))


async def write_all(url: str, batches: list[Batch], bulk: bool) -> tuple[float, int]:
    sink = DatasetSink(url, bulk=bulk)
    await sink.start()
    try:
        t0 = time.perf_counter()
        for batch in batches:
            await sink.write(batch)
        return time.perf_counter() - t0, sink.commits
    finally:
        await sink.close()


def pg_database(server: Any, collation: str, name: str) -> str:
    """A new database: ICU en-US as the tests make them (tests/pg.py), or byte order ("C")."""
    if collation == "icu":
        return str(server.new_database("bench"))
    from tests.pg import connect

    with connect(server.admin_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE bench_c_{name} TEMPLATE template0 ENCODING 'UTF8' LOCALE 'C'")
    return str(server.url(f"bench_c_{name}"))


async def run(args: argparse.Namespace) -> None:
    batches = [round_batch(n, args.participants) for n in range(args.rounds)]
    rows = sum(len(b) for b in batches)
    per_round = len(batches[0])
    mix = {t: sum(t == type(r).TABLE for r in batches[0].records) for t in ("meters", "settlements", "transactions")}
    print(
        f"{args.rounds} rounds of {args.participants} participants: {per_round} rows per round {mix}, "
        f"{rows} rows; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    server = None
    digests: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for backend in args.backend:
                if backend == "postgresql" and server is None:
                    from tests.pg import start_server

                    server = start_server()
                for k in range(args.repeat):
                    for path in args.path:
                        if backend == "sqlite":
                            url = f"sqlite:///{Path(tmp) / f'{path}-{k}.db'}"
                        else:
                            assert server is not None
                            url = pg_database(server, args.pg_collation, f"{path}_{k}")
                        elapsed, commits = await write_all(url, batches, bulk=path == "bulk")
                        digests.add(ledger_digest(url))
                        print(
                            f"ledger {backend:10} {path:9}: {elapsed:6.2f} s, {rows / elapsed:>10,.0f} rows/s, "
                            f"{commits} commits; load average {os.getloadavg()[0]:.2f}",
                            flush=True,
                        )
        finally:
            if server is not None:
                server.stop()
    print(f"digests: {'all equal' if len(digests) == 1 else f'{len(digests)} DIFFERENT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--backend", nargs="+", choices=("sqlite", "postgresql"), default=["sqlite", "postgresql"])
    parser.add_argument("--path", nargs="+", choices=("bulk", "reference"), default=["reference", "bulk"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--pg-collation", choices=("icu", "C"), default="icu", help="the PostgreSQL databases' collation"
    )
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
