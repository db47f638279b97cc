"""Namespace `/simulation` (PROTOCOL.md): the controller's `step`, `reset` and `status`; and
for a community in a district (`microte market --in-district`, docs/hierarchy.md) its
`upstream.residuals`, `upstream.fills` and `upstream.flows`."""

from __future__ import annotations

from typing import Any, ClassVar

from market.core.errors import MarketError
from market.core.protocol import EmptyMsg, StepMsg, UpstreamFillsMsg, UpstreamSlotMsg, decode
from market.core.registry import Role
from market.dispatch.base import Namespace, replying
from market.server.port import MarketPort


class SimulationNamespace(Namespace):
    ms: MarketPort

    NAME = "/simulation"
    ROLES = frozenset[Role]({"controller"})
    EVENTS: ClassVar[dict[str, str] | None] = {
        **{e: e for e in ("step", "reset", "status")},
        "upstream.residuals": "upstream_residuals",
        "upstream.fills": "upstream_fills",
        "upstream.flows": "upstream_flows",
    }

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

    @replying
    async def on_upstream_residuals(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        msg = decode(data, UpstreamSlotMsg)
        return {"residuals": self.ms.upstream_residuals(msg.time_delivery[0])}

    @replying
    async def on_upstream_fills(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        msg = decode(data, UpstreamFillsMsg)
        return await self.ms.upstream_fills(msg)

    @replying
    async def on_upstream_flows(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        msg = decode(data, UpstreamSlotMsg)
        return await self.ms.upstream_flows(msg.time_delivery[0])
