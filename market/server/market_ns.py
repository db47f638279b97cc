"""Namespace `/market` (PROTOCOL.md): orders, cancels, meter readings and `resume` of one prosumer."""

from __future__ import annotations

from typing import Any

from market.core.errors import MarketError
from market.core.protocol import MAX_ORDERS, CancelMsg, EntryMsg, MeterMsg, OrdersMsg, ResumeMsg, decode
from market.core.registry import Role
from market.dispatch.base import Namespace, replying
from market.server.port import MarketPort


class MarketNamespace(Namespace):
    ms: MarketPort

    NAME = "/market"
    ROLES = frozenset[Role]({"prosumer", "dso", "aggregator", "oracle", "operator", "controller"})

    def __init__(self, server: MarketPort) -> None:
        super().__init__(server)
        # Accounts the registry says share an owner never trade with each other (wash trades).

    def participant_left(self, pid: str) -> None:
        self.ms.participant_left(pid)  # its readings are no longer awaited

    def session_id(self, pid: str) -> str:
        return self.ms.market_id(pid)  # a pseudonymous auction trades under pseudonyms

    @replying
    async def on_bid(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        await self.ms.admit()
        reply = self.ms.market.submit(pid, "bid", decode(data, EntryMsg))
        await self.ms.persist()
        return reply

    @replying
    async def on_ask(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        await self.ms.admit()
        reply = self.ms.market.submit(pid, "ask", decode(data, EntryMsg))
        await self.ms.persist()
        return reply

    @replying
    async def on_orders(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer", cost=batch_size(data, "orders", MAX_ORDERS))  # a token per order
        OrdersMsg.check_size(data)
        await self.ms.admit()
        results = self.ms.market.submit_orders(pid, decode(data, OrdersMsg))
        await self.ms.persist()
        return {"results": results}

    @replying
    async def on_cancel(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        await self.ms.admit()
        reply = self.ms.market.cancel(pid, decode(data, CancelMsg).uuid)
        await self.ms.persist()
        return reply

    @replying
    async def on_resume(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid)
        msg = decode(data, ResumeMsg)
        try:
            events, more = self.ms.outbox.since(pid, msg.since, msg.limit)
            return {"events": events, "more": more}
        except LookupError as err:
            raise MarketError("not_found", str(err)) from None

    @replying
    async def on_meter(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        msg = decode(data, MeterMsg)
        await self.ms.admit()
        reply = self.ms.market.meter(pid, msg)
        await self.ms.persist()
        self.ms.meter_arrived(pid, msg.time_interval[0])
        return reply


def batch_size(data: Any, key: str, limit: int) -> int:
    """Items of a batch payload `{key: [...]}`, what it costs in rate tokens; 1 for anything
    that is refused before any work (not a list, empty, above `limit`)."""
    items = data.get(key) if isinstance(data, dict) else None
    return len(items) if isinstance(items, list) and 0 < len(items) <= limit else 1
