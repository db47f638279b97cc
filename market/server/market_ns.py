"""Namespace `/market` (PROTOCOL.md): orders, cancels, meter readings and `resume` of one
prosumer, and the extension `round.submit` (its orders and reading in one event) with the
opt-in `auth.combined` (one private `round.result` per round instead of `settled` and
`delivery`; the server sends it: market/server/app.py) and `auth.round_start` (in sim mode
that `round.result` and the next `start_round` as one `round.start`) of docs/protocol.md."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import socketio

from market.core.errors import ErrorCode, MarketError
from market.core.protocol import (
    MAX_ORDERS,
    CancelMsg,
    EntryMsg,
    MeterMsg,
    OrdersMsg,
    ResumeMsg,
    RoundSubmitMsg,
    decode,
    ok,
)
from market.core.registry import Role
from market.dispatch.base import Namespace, replying
from market.server.port import MarketPort


class MarketNamespace(Namespace):
    ms: MarketPort

    NAME = "/market"
    ROLES = frozenset[Role]({"prosumer", "dso", "aggregator", "oracle", "operator", "controller"})
    EVENTS: ClassVar[dict[str, str] | None] = {
        **{e: e for e in ("bid", "ask", "orders", "cancel", "meter", "resume")},
        "round.submit": "round_submit",
    }

    def __init__(self, server: MarketPort) -> None:
        super().__init__(server)
        # Sessions that logged in with `auth.combined = true`: their `settled` and `delivery`
        # payloads of a round reach them as one `round.result` (market/server/app.py).
        self.combined: set[str] = set()
        # Combined sessions that also logged in with `auth.round_start = true`: in sim mode a
        # step's `round.result` rides with the next round's start, as one `round.start`.
        self.starting: set[str] = set()

    async def on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        combined = auth.get("combined", False) if isinstance(auth, dict) else False
        starting = auth.get("round_start", False) if isinstance(auth, dict) else False
        if not isinstance(combined, bool):
            raise socketio.exceptions.ConnectionRefusedError("invalid: auth.combined must be true or false")
        if not isinstance(starting, bool):
            raise socketio.exceptions.ConnectionRefusedError("invalid: auth.round_start must be true or false")
        if starting and not combined:
            raise socketio.exceptions.ConnectionRefusedError("invalid: auth.round_start needs auth.combined = true")
        if combined:  # before the session exists: no private event can slip out as `settled`
            self.combined.add(sid)
        if starting:
            self.starting.add(sid)
        try:
            await super().on_connect(sid, environ, auth)
        except BaseException:
            self.combined.discard(sid)
            self.starting.discard(sid)
            raise

    async def on_disconnect(self, sid: str, *reason: Any) -> None:
        self.combined.discard(sid)
        self.starting.discard(sid)
        await super().on_disconnect(sid, *reason)

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
    async def on_round_submit(self, sid: str, data: Any) -> dict[str, Any]:
        """`round.submit` (extension): the `orders` batch and the `meter` reading of one round in
        one event, each validated and charged as its own event would be. The whole event is
        refused, and nothing of it applied, if either part is refused as a whole (schema, size,
        rate, or the reading itself: `closed`, `conflict`, ...); orders refused one by one
        answer in `results` as in `orders`. The reading is applied first: the engine checks it
        completely before it changes anything, and an order never depends on a reading."""
        pid = self._who(sid, "prosumer", cost=submit_cost(data))  # a token per order, one for the reading
        try:
            OrdersMsg.check_size(data)
            msg = decode(data, RoundSubmitMsg)
        except MarketError as err:
            raise PartRefused(err.code, err.message, part_of(err.message)) from None
        await self.ms.admit()
        market = self.ms.market
        meter: dict[str, Any] | None = None
        if msg.meter is not None:
            try:
                meter = ok(**market.meter(pid, msg.meter))
            except MarketError as err:
                raise PartRefused(
                    err.code, f"meter: {err.message} (nothing of this round.submit was applied)", "meter"
                ) from None
        results = market.submit_orders(pid, OrdersMsg(msg.orders)) if msg.orders else []
        await self.ms.persist()
        if msg.meter is not None:
            self.ms.meter_arrived(pid, msg.meter.time_interval[0])
        return {"results": results} if meter is None else {"results": results, "meter": meter}

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


class PartRefused(MarketError):
    """A `round.submit` refused as a whole because of one part: its error names the part
    (`"part": "orders" | "meter"`, absent when the envelope itself is at fault)."""

    def __init__(self, code: ErrorCode, message: str, part: str | None) -> None:
        super().__init__(code, message)
        self.part = part

    def reply(self) -> dict[str, object]:
        error: dict[str, object] = {"code": self.code, "message": self.message}
        if self.part is not None:
            error["part"] = self.part
        return {"ok": False, "error": error}


_PART = re.compile(r"at `\$\.(orders|meter)\b")


def part_of(message: str) -> str | None:
    """The part of a `round.submit` a decoding error points at (msgspec names the path)."""
    if message.startswith(f"at most {MAX_ORDERS} orders"):
        return "orders"
    found = _PART.search(message)
    return found.group(1) if found else None


def submit_cost(data: Any) -> int:
    """Rate tokens of a `round.submit`: one per order and one for the reading, what the
    `orders` and `meter` events would cost together (1 for a payload refused before any work)."""
    if not isinstance(data, dict):
        return 1
    orders = data.get("orders")
    n = len(orders) if isinstance(orders, list) and len(orders) <= MAX_ORDERS else 0
    return max(1, n + (data.get("meter") is not None))


def batch_size(data: Any, key: str, limit: int) -> int:
    """Items of a batch payload `{key: [...]}`, what it costs in rate tokens; 1 for anything
    that is refused before any work (not a list, empty, above `limit`)."""
    items = data.get(key) if isinstance(data, dict) else None
    return len(items) if isinstance(items, list) and 0 < len(items) <= limit else 1
