"""Ledger write throughput: transaction rows per second into a temporary SQLite file.

    python bench/ledger.py [--rows 500000] [--batch 5000] [--concurrency 1]

Prints figures; never asserts (DESIGN.md: benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name would
# shadow the `ledger` package: put the project root there instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

from ledger import DatasetSink, read_rows  # noqa: E402
from market.core.records import Batch, Transaction, amount  # noqa: E402


def make_batches(rows: int, size: int) -> list[Batch]:
    batches = []
    for start in range(0, rows, size):
        records = []
        for i in range(start, min(start + size, rows)):
            slot = 1_700_000_000 + (i // 1000) * 900
            quantity = 100 + i % 900
            price = 0.05 + (i % 17) / 1000
            records.append(
                Transaction(
                    id=f"{slot}-{i:09d}",
                    kind="p2p",
                    time_delivery_start=slot,
                    time_delivery_end=slot + 900,
                    seller_id=f"P{i % 50}",
                    buyer_id=f"P{(i + 7) % 50}",
                    energy_source="solar",
                    quantity=quantity,
                    price_buy=price,
                    price_sell=price,
                    amount_buy=amount(quantity, price),
                    amount_sell=amount(quantity, price),
                    commit_id=None if i % 3 else f"c{i}",
                    time_creation=slot,
                )
            )
        batches.append(Batch(tuple(records)))
    return batches


async def run(rows: int, size: int, concurrency: int) -> None:
    batches = make_batches(rows, size)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        sink = DatasetSink(url)
        await sink.start()
        sem = asyncio.Semaphore(concurrency)

        async def one(batch: Batch) -> None:
            async with sem:
                await sink.write(batch)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in batches))
        elapsed = time.perf_counter() - t0
        await sink.close()
        stored = len(read_rows(url, "transactions"))
    print(
        f"ledger sqlite: {rows} rows in batches of {size}, concurrency {concurrency}: "
        f"{elapsed:.2f} s, {rows / elapsed:,.0f} rows/s, {sink.commits} commits, "
        f"{stored} rows stored"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.batch, args.concurrency))


if __name__ == "__main__":
    main()
