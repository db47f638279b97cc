"""Real server, real socket.io clients, on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import socketio
from aiohttp import web

from ledger import open_sink
from market.core.engine import MarketConfig
from market.core.records import Batch
from market.core.registry import Registry
from market.server.app import MarketServer

TOKENS = {"NOBODY": "", "P1": "tok-p1", "P2": "tok-p2", "P3": "tok-p3", "CTL": "tok-ctl", "DSO": "tok-dso"}
ROLES = {"CTL": "controller", "DSO": "dso"}


def registry() -> Registry:
    return Registry.from_dict(
        {"participants": [{"id": p, "token": t, "role": ROLES.get(p, "prosumer")} for p, t in TOKENS.items() if t]}
    )


@asynccontextmanager
async def serving(server: MarketServer) -> AsyncIterator[str]:
    """Serve `server` on 127.0.0.1 with an ephemeral port; yields its URL."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running(
    config: MarketConfig, ledger_url: str, reg: Registry | None = None
) -> AsyncIterator[tuple[str, MarketServer]]:
    server = MarketServer(config, reg or registry(), open_sink(ledger_url))
    async with serving(server) as url:
        yield url, server


async def client(url: str, pid: str, namespace: str = "/market", token: str | None = None) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(
        url,
        namespaces=[namespace],
        auth={"id": pid, "token": token if token is not None else TOKENS[pid]},
        transports=["websocket"],
        wait_timeout=5,
    )
    return sio


class Inbox:
    """Collects server events of one client."""

    def __init__(self, sio: socketio.AsyncClient, *events: str) -> None:
        self.events: dict[str, list[Any]] = {e: [] for e in events}
        for e in events:
            sio.on(e, self._collector(e), namespace="/market")

    def _collector(self, event: str) -> Callable[[Any], Any]:
        async def collect(data: Any) -> None:
            self.events[event].append(data)

        return collect


@pytest.fixture
def ledger_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path}/ledger.db"


async def refusal(url: str, pid: str, namespace: str = "/market", token: str | None = None) -> str:
    """The connect error message the server sends when it refuses a login."""
    sio = socketio.AsyncClient(reconnection=False)
    errors: list[Any] = []
    sio.on("connect_error", errors.append, namespace=namespace)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(
            url,
            namespaces=[namespace],
            transports=["websocket"],
            wait_timeout=5,
            auth={"id": pid, "token": token if token is not None else TOKENS[pid]},
        )
    await sio.disconnect()
    assert errors, "no connect_error received"
    data = errors[0]
    return str(data.get("message") if isinstance(data, dict) else data)


class FlakySink:
    """A real ledger whose writes fail while `failing` is set (as with a full disk)."""

    def __init__(self, url: str) -> None:
        self.inner = open_sink(url)
        self.failing = False

    async def start(self) -> None:
        await self.inner.start()

    async def write(self, batch: Batch) -> None:
        if self.failing:
            raise OSError(28, "No space left on device")
        await self.inner.write(batch)

    async def read(self, table: str, after: Any = None) -> list[dict[str, Any]]:
        return await self.inner.read(table, after)

    async def close(self) -> None:
        await self.inner.close()
