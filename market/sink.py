"""The ledger as the server sees it: a small protocol, implemented in `ledger/`.

The market never imports a backend; the composition root (controller CLI) passes one in.
"""

from __future__ import annotations

from typing import Protocol

from market.records import Batch


class Sink(Protocol):
    async def start(self) -> None:
        """Open the store (create tables) before the first write."""

    async def write(self, batch: Batch) -> None:
        """Return only once every record of `batch` is durable. Retried writes are no-ops."""

    async def close(self) -> None:
        """Flush what is queued and release the store."""


class MemorySink:
    """A sink that keeps records in memory: for tests of the core and for `--ledger memory:`."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    async def start(self) -> None:
        return None

    async def write(self, batch: Batch) -> None:
        self.batches.append(batch)

    async def close(self) -> None:
        return None
