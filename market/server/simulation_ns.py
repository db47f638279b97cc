"""Namespace `/simulation` (PROTOCOL.md): the controller's `step`, `reset` and `status`."""

from __future__ import annotations

from typing import Any

from market.core.errors import MarketError
from market.core.protocol import EmptyMsg, StepMsg, decode
from market.core.registry import Role
from market.dispatch.base import Namespace, replying
from market.server.port import MarketPort


class SimulationNamespace(Namespace):
    ms: MarketPort

    NAME = "/simulation"
    ROLES = frozenset[Role]({"controller"})

    def __init__(self, server: MarketPort) -> None:
        super().__init__(server)

    @replying
    async def on_step(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        if self.ms.config.mode != "sim":
            raise MarketError("invalid", "step is only for sim mode")
        msg = decode(data, StepMsg)
        return {"round": await self.ms.step(msg.time, msg.duration)}

    @replying
    async def on_reset(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        decode(data, EmptyMsg)
        await self.ms.reset()
        return {}

    @replying
    async def on_status(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        decode(data, EmptyMsg)
        return {
            "mode": self.ms.config.mode,
            "time": self.ms.clock.now(),
            "participants": {
                "registered": [self.ms.market_id(p) for p in self.ms.registry.ids()],
                "online": self.ms.online(),
            },
        }
