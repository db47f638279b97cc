"""What sites record of their own (a PEM site's houses, docs/pem.md), written to the ledger
on a connection of the process that runs them: the market server never sees the houses."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from ledger import open_sink
from market.core.records import Batch
from participants.prosumer import Prosumer

Flush = Callable[[], Awaitable[None]]


def plain_database(ledger: str) -> bool:
    """A SQLite or PostgreSQL ledger, which a second connection of this process can write."""
    return ledger.split(":", 1)[0].split("+", 1)[0].lower() in ("sqlite", "postgresql")


def needs_ledger(prosumers: Sequence[Prosumer]) -> bool:
    return any(p.spec.pem is not None for p in prosumers)


@contextlib.asynccontextmanager
async def site_records(
    prosumers: Sequence[Prosumer], ledger: str | None
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """A `flush()` that writes the rows the sites made since the last one (called after
    every step, or periodically), and once more on exit. No sites: a no-op, no connection."""
    sites = [p for p in prosumers if p.spec.pem is not None]

    async def nothing() -> None:
        return None

    if not sites:
        yield nothing
        return
    if ledger is None or not plain_database(ledger):
        raise ValueError("a pem site's house rows need a sqlite:/// or postgresql:// ledger")
    sink = open_sink(ledger)
    await sink.start()

    async def flush() -> None:
        records = [r for p in sites for r in p.take_records()]
        if records:
            await sink.write(Batch(tuple(records)))

    try:
        yield flush
        await flush()
    finally:
        await sink.close()
