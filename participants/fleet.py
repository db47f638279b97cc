"""Many participant clients in one process: connect concurrently, disconnect them all."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from participants.client import ParticipantClient
from participants.prosumer import Stats
from participants.sites import site_for
from participants.spec import ParticipantSpec


class Fleet:
    """Clients for `(spec, token)` pairs. Use `async with Fleet(...) as fleet:`; if any
    client fails to connect, the ones already connected are disconnected and it raises."""

    def __init__(
        self,
        url: str,
        members: Sequence[tuple[ParticipantSpec, str]],
        seed: int,
        *,
        timezone: str = "UTC",
        base_dir: str | Path | None = None,
        concurrency: int = 32,
        connect_retry: float = 0.0,
        others: Sequence[ParticipantSpec] | None = None,
        **client_options: Any,
    ) -> None:
        self.url = url
        self.connect_retry = connect_retry  # seconds each client retries while nothing listens
        self._tokens = [token for _, token in members]
        self._concurrency = max(1, concurrency)
        specs = [spec for spec, _ in members]
        # `others`: the whole scenario when this fleet runs only some of it (a PEM site's target).
        everyone = specs if others is None else others
        self.clients = [
            ParticipantClient(
                site_for(s, seed, timezone=timezone, base_dir=base_dir, others=everyone), **client_options
            )
            for s in specs
        ]

    async def connect(self) -> None:
        gate = asyncio.Semaphore(self._concurrency)

        async def one(client: ParticipantClient, token: str) -> None:
            async with gate:
                await client.connect(self.url, client.prosumer.spec.id, token, connect_retry=self.connect_retry)

        results = await asyncio.gather(
            *(one(c, t) for c, t in zip(self.clients, self._tokens, strict=True)),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.disconnect()
            raise failures[0]

    async def disconnect(self) -> None:
        await asyncio.gather(*(c.disconnect() for c in self.clients), return_exceptions=True)

    def stats(self) -> dict[str, Stats]:
        return {c.prosumer.spec.id: c.stats for c in self.clients}

    async def __aenter__(self) -> Fleet:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.disconnect()


async def run_participants(
    url: str,
    specs_with_tokens: Sequence[tuple[ParticipantSpec, str]],
    seed: int,
    *,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> dict[str, Stats]:
    """Connect every participant, trade until `stop` is set (or the task is cancelled),
    disconnect them all and return their stats by id."""
    fleet = Fleet(url, specs_with_tokens, seed, **options)
    async with fleet:
        await (stop or asyncio.Event()).wait()
    return fleet.stats()
