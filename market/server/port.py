"""What the server's own namespaces (`/market`, `/simulation`, `/fleet`) use of it: the
`ServerPort` of every adapter plus the round loop's controls and the private-event outbox."""

from __future__ import annotations

from typing import Any, Protocol

from market.core.protocol import UpstreamFillsMsg
from market.dispatch.base import ServerPort, Sessions
from market.server.outbox import Outbox


class MarketPort(ServerPort, Protocol):
    outbox: Outbox
    market_ids: dict[str, str]  # registry id -> pseudonym, when the auction trades under pseudonyms
    sessions: dict[str, Sessions]  # namespace -> its sessions

    async def step(self, t: int, duration: int | None) -> dict[str, Any]: ...

    def upstream_residuals(self, start: int) -> list[dict[str, Any]]: ...

    async def upstream_fills(self, msg: UpstreamFillsMsg) -> dict[str, Any]: ...

    async def upstream_flows(self, start: int) -> dict[str, Any]: ...

    async def reset(self) -> None: ...

    def online(self) -> list[str]: ...

    async def admit(self) -> None: ...

    def market_id(self, pid: str) -> str: ...
