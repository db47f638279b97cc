"""The ledger as the server sees it: a small protocol, implemented in `ledger/`.

The market never imports a backend; the composition root (controller CLI) passes one in.
"""

from __future__ import annotations

from typing import Any, Protocol

from market.core.records import Batch


class Sink(Protocol):
    async def start(self) -> None:
        """Open the store (create tables) before the first write."""

    async def write(self, batch: Batch) -> None:
        """Return only once every record of `batch` is durable. Retried writes are no-ops."""

    async def read(self, table: str, after: tuple[str, int] | None = None) -> list[dict[str, Any]]:
        """Rows of `table` ordered by key; with `after=(column, v)` only rows where column > v.
        Used once at start-up to resume from the ledger."""

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

    async def read(self, table: str, after: tuple[str, int] | None = None) -> list[dict[str, Any]]:
        rows = {
            r.row()["id" if table != "settlements" else "commit_id"]: r.row()
            for b in self.batches
            for r in b.records
            if table == r.TABLE
        }
        return [rows[k] for k in sorted(rows) if after is None or rows[k][after[0]] > after[1]]

    async def close(self) -> None:
        return None
