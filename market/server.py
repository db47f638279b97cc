"""The socket.io shell around the market engine (PROTOCOL.md namespaces /market, /simulation).

Handlers decode, call the core and emit what it returned; nothing here decides prices or
energy. The round loop (sim: driven by `step`; rt: by the wall clock) waits for meter
readings no longer than its deadline and replies or moves on only once the round's
records are durable in the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, ClassVar

import cuid
import msgspec
import socketio
from aiohttp import web

from market import wire
from market.engine import Market, MarketConfig, Recovered, RoundOpen, SlotResult
from market.errors import IllegalTransition, MarketError
from market.outbox import Outbox
from market.protocol import CancelMsg, EmptyMsg, EntryMsg, MeterMsg, OrdersMsg, ResumeMsg, StepMsg, decode, ok
from market.ratelimit import RateLimiter
from market.records import (
    Batch,
    CancelRecord,
    EntryRecord,
    MeterRecord,
    Record,
    RoundRecord,
    RunRecord,
    Settlement,
)
from market.registry import Registry, Role
from market.sink import Sink
from market.timing import RealTimeClock, SimClock

log = logging.getLogger("microte.market")

MAX_PAYLOAD = 1_000_000  # bytes per socket.io message; larger ones close the connection
NAMESPACE_ROLES: dict[str, frozenset[Role]] = {
    "/market": frozenset({"prosumer", "dso", "aggregator", "oracle", "operator", "controller"}),
    "/simulation": frozenset({"controller"}),
    "/balancing": frozenset({"operator"}),
    "/fleet": frozenset({"prosumer"}),
    "/flex": frozenset({"prosumer", "aggregator", "dso"}),
    "/grid": frozenset({"dso", "aggregator", "operator", "prosumer", "oracle"}),
}


class Sessions:
    """Authenticated sessions of one namespace: one live session per participant id."""

    def __init__(self) -> None:
        self.pid_of: dict[str, str] = {}  # sid -> participant id
        self.sid_of: dict[str, str] = {}  # participant id -> sid
        self.role_of: dict[str, Role] = {}  # sid -> role

    def add(self, sid: str, pid: str, role: Role) -> str | None:
        """Register a session; returns the sid it replaces, if any."""
        old = self.sid_of.get(pid)
        self.pid_of[sid], self.sid_of[pid], self.role_of[sid] = pid, sid, role
        return old

    def remove(self, sid: str) -> str | None:
        pid = self.pid_of.pop(sid, None)
        self.role_of.pop(sid, None)
        if pid is not None and self.sid_of.get(pid) == sid:
            del self.sid_of[pid]
        return pid

    def online(self) -> list[str]:
        return sorted(self.sid_of)


class _MeterWait:
    """Readings still expected for one slot, and an event set when none are."""

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.done = asyncio.Event()
        if not expected:
            self.done.set()

    def arrived(self, pid: str) -> None:
        self.expected.discard(pid)
        if not self.expected:
            self.done.set()


class MarketServer:
    def __init__(
        self,
        config: MarketConfig,
        registry: Registry,
        sink: Sink,
        *,
        serializer: str = "json",
        run: RunRecord | None = None,
    ) -> None:
        self.config = config
        self.market = Market(config)
        self.registry = registry
        self.sink = sink
        self.clock: SimClock | RealTimeClock = SimClock() if config.mode == "sim" else RealTimeClock()
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            async_handlers=False,  # one client's events are handled in the order it sent them
            serializer=wire.serializer(serializer),
            max_http_buffer_size=MAX_PAYLOAD,
            cors_allowed_origins="*",
        )
        self.sessions = {ns: Sessions() for ns in NAMESPACE_ROLES}
        self.sio.register_namespace(MarketNamespace(self))
        self.sio.register_namespace(SimulationNamespace(self))
        from market.balancing_ns import BalancingNamespace  # it subclasses _Namespace below

        self.sio.register_namespace(BalancingNamespace(self))
        from market.fleet_ns import FleetNamespace

        self.fleet = FleetNamespace(self)
        self.sio.register_namespace(self.fleet)
        from market.flex_ns import FlexNamespace

        self.sio.register_namespace(FlexNamespace(self))
        from market.grid_ns import GridNamespace

        self.grid = GridNamespace(self)
        self.sio.register_namespace(self.grid)
        self.limiter = RateLimiter(config.rate_per_second, config.rate_burst)
        self.outbox = Outbox()
        self._waits: dict[int, _MeterWait] = {}
        self._round_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_round: RoundRecord | None = None
        self.run = run or RunRecord(
            id=cuid.cuid(), scenario="", seed=0, started=int(time.time()), config=canonical_config(config)
        )

    # -- app -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        self.sio.attach(app)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _app: web.Application) -> AsyncIterator[None]:
        await self.sink.start()
        await self._resume()
        await self.grid.start()  # resume /grid from the ledger, start the periodic LEM solver
        await self.sink.write(Batch((self.run,)))
        if self.config.mode == "rt":
            self._spawn(self._rt_loop())
        yield
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.sink.close()

    async def _resume(self) -> None:
        """Pick up where the ledger ends: the last processed round, the open book, and the
        fills and readings of slots not processed yet (after a crash or a restart)."""
        rounds = await self.sink.read("rounds")
        if not rounds:
            return
        last = msgspec.convert(max(rounds, key=lambda r: (r["time"], r["current_round_start"])), RoundRecord)
        after = last.current_round_start
        rec = Recovered(
            last_round=last,
            entries=[
                msgspec.convert(r, EntryRecord) for r in await self.sink.read("entries", ("time_delivery_start", after))
            ],
            cancels=[
                msgspec.convert(r, CancelRecord)
                for r in await self.sink.read("cancels", ("time_delivery_start", after))
            ],
            settlements=[
                msgspec.convert(r, Settlement)
                for r in await self.sink.read("settlements", ("time_delivery_start", after))
            ],
            meters=[
                msgspec.convert(r, MeterRecord) for r in await self.sink.read("meters", ("time_interval_start", after))
            ],
        )
        self.market.restore(rec)
        self._last_round = last
        if isinstance(self.clock, SimClock):
            self.clock.set(last.time)
        log.info(
            "resumed from the ledger: last round=%s slot=%s open entries=%d fills=%d readings=%d",
            last.time,
            last.current_round_start,
            len(self.market.book),
            len(rec.settlements),
            len(rec.meters),
        )

    async def persist(self) -> None:
        """Make the records of acknowledged actions durable before the acknowledgement."""
        if not self.config.ack_durable:
            return  # sim: they go with the round's records, before the `step` reply
        records = self.market.take_journal()
        if records:
            await self.sink.write(Batch(tuple(records)))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- rounds ----------------------------------------------------------------------------

    async def step(self, t: int, duration: int | None) -> dict[str, Any]:
        """One sim round: open it, wait for the current round's readings (bounded), process
        and store it. Returns the `round` object of the `step` reply."""
        async with self._round_lock:
            assert isinstance(self.clock, SimClock)
            last = self._last_round
            if last is not None and t == last.time and last.current_round_start == t:
                return _round_reply(last)  # a retried step (say, after a restart): same answer
            opened = self.market.open_round(t, duration)
            self.clock.set(t)
            wait = self._expect(t)
            await self._announce(opened)
            for skipped in [s for s in self.market.delivering() if s < t]:  # a step that jumped ahead
                await self._finish(opened, skipped, [])
            await self._await_readings(wait, self.config.round_timeout)
            return await self._finish(opened, t, opened.settlements)

    async def _rt_loop(self) -> None:
        """rt mode: open a round at every multiple of the duration, whatever clients do;
        the slot that just ended is processed when its readings are in or its grace ends."""
        assert isinstance(self.clock, RealTimeClock)
        d = self.config.duration
        while True:
            await asyncio.sleep(self.clock.seconds_to_next(d) + 0.001)
            t = self.clock.now() // d * d
            if self.market.times is not None and t <= self.market.times.time:
                continue  # woke a hair early: this boundary's round is already open
            try:
                async with self._round_lock:
                    opened = self.market.open_round(t)
                    wait = self._expect(t - d) if (t - d) in self.market.delivering() else None
                    await self._announce(opened)
            except Exception:
                log.exception("round=%s could not open; the next boundary will try again", t)
                continue
            if wait is not None:
                self._spawn(self._rt_process(opened, t - d, wait))

    async def _rt_process(self, opened: RoundOpen, slot: int, wait: _MeterWait) -> None:
        await self._await_readings(wait, self.config.meter_grace)
        try:
            async with self._round_lock:
                await self._finish(opened, slot, opened.settlements)
        except Exception:
            log.exception("slot=%s could not be processed", slot)

    def online(self) -> list[str]:
        """Participants connected to /market or through a fleet connection."""
        return sorted({*self.sessions["/market"].sid_of, *self.fleet.sid_of})

    def _expect(self, slot: int) -> _MeterWait:
        prosumers = {p for p in self.online() if self.registry.role(p) == "prosumer"}
        wait = self._waits[slot] = _MeterWait(prosumers - set(self.market.metered(slot)))
        return wait

    async def _await_readings(self, wait: _MeterWait, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait.done.wait(), timeout)

    async def _announce(self, opened: RoundOpen) -> None:
        await self._send_private("settled", opened.settled)
        await self.sio.emit("start_round", opened.start_round, namespace="/market")
        if self.fleet.members:
            await self.sio.emit("start_round", opened.start_round, namespace="/fleet")
        log.info("round=%s start trades=%d", opened.times.time, len(opened.settlements))

    async def _finish(self, opened: RoundOpen, slot: int, fills: Sequence[Settlement]) -> dict[str, Any]:
        """Process `slot` and make its records durable, with `fills` (the round's clearing)."""
        self._waits.pop(slot, None)
        result = self.market.process(slot, self.clock.now())
        metered = set(result.metered)
        missing = [p for p in self.registry.ids("prosumer") if p not in metered]
        # Entries and cancels acknowledged since the last round and not yet durable (readings
        # are among result.meters).
        journal = [r for r in self.market.take_journal() if not isinstance(r, MeterRecord)]
        records: list[Record] = [*journal, *fills, *result.meters, *result.transactions]
        summary = RoundRecord(
            id=f"r{opened.times.time}-{slot}",
            time=opened.times.time,
            duration=opened.times.duration,
            current_round_start=slot,
            matched_slot_start=opened.times.last_settle[0],
            trades=len(fills),
            metered=len(result.metered),
            missing=msgspec.json.encode(missing).decode(),
            records=len(records),
        )
        await self.sink.write(Batch((*records, summary)))
        self._last_round = summary
        await self._deliver(result)
        log.info(
            "round=%s slot=%s metered=%d missing=%d records=%d",
            opened.times.time,
            slot,
            len(result.metered),
            len(missing),
            len(records),
        )
        return _round_reply(summary)

    async def _deliver(self, result: SlotResult) -> None:
        await self._send_private("delivery", list(result.deliveries.items()))

    async def _send_private(self, event: str, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Send each participant its private events: one message each on /market, one
        batch per fleet connection on /fleet. Each is kept (numbered) for `resume`."""
        market_sids = self.sessions["/market"].sid_of
        batches: dict[str, list[dict[str, Any]]] = {}
        for pid, payload in items:
            numbered = self.outbox.push(pid, event, payload)
            sid = market_sids.get(pid)
            if sid is not None:
                await self.sio.emit(event, numbered, to=sid, namespace="/market")
            elif (fleet_sid := self.fleet.sid_of.get(pid)) is not None:
                batches.setdefault(fleet_sid, []).append({"participant": pid, **numbered})
        for fleet_sid, events in batches.items():
            await self.sio.emit(event, {"events": events}, to=fleet_sid, namespace="/fleet")

    # -- events of the /market namespace ----------------------------------------------------

    def meter_arrived(self, pid: str, slot: int) -> None:
        wait = self._waits.get(slot)
        if wait is not None:
            wait.arrived(pid)

    def participant_left(self, pid: str) -> None:
        for wait in self._waits.values():
            wait.arrived(pid)

    async def reset(self) -> None:
        async with self._round_lock:
            self.market.reset()
            self._waits.clear()


def _round_reply(r: RoundRecord) -> dict[str, Any]:
    return {
        "current_round": [r.current_round_start, r.current_round_start + r.duration],
        "metered": r.metered,
        "missing": msgspec.json.decode(r.missing),
        "trades": r.trades,
        "records": r.records,
    }


def canonical_config(config: MarketConfig) -> str:
    return msgspec.json.encode(msgspec.to_builtins(config, order="sorted")).decode()


Handler = Callable[[str, Any], Awaitable[dict[str, Any]]]


def _replying(fn: Callable[..., Awaitable[dict[str, Any]]]) -> Handler:
    """Turn a handler's result or MarketError into a PROTOCOL.md reply; never let an
    unexpected error escape into the socket layer."""

    async def handler(self: _Namespace, sid: str, data: Any = None) -> dict[str, Any]:
        try:
            return ok(**await fn(self, sid, data))
        except MarketError as err:
            return err.reply()
        except IllegalTransition as err:
            log.error("illegal transition: %s", err)
            return MarketError("unavailable", "the market cannot do that now").reply()
        except Exception:
            log.exception("handler %s failed", fn.__name__)
            return MarketError("unavailable", "internal error").reply()

    handler.__name__ = fn.__name__
    return handler  # type: ignore[return-value]


class _Namespace(socketio.AsyncNamespace):  # type: ignore[misc]
    # Wire event -> handler suffix (`on_<suffix>`), for names such as "asset.upsert";
    # None: the event name is the suffix. Anything else is answered `invalid`, never silence.
    EVENTS: ClassVar[dict[str, str] | None] = None
    _serial: asyncio.Lock | None = None  # set: the namespace handles one event at a time

    async def trigger_event(self, event: str, *args: Any) -> Any:
        if event in ("connect", "disconnect"):
            return await super().trigger_event(event, *args)
        suffix = event if self.EVENTS is None else self.EVENTS.get(event)
        if suffix is None or suffix in ("connect", "disconnect") or not hasattr(self, f"on_{suffix}"):
            return MarketError("invalid", f"unknown event {event!r}").reply()
        if self._serial is None:
            return await super().trigger_event(suffix, *args)
        async with self._serial:
            return await super().trigger_event(suffix, *args)

    def __init__(self, server: MarketServer, namespace: str) -> None:
        super().__init__(namespace)
        self.ms = server
        self.sessions = server.sessions[namespace]

    async def on_connect(self, sid: str, _environ: dict[str, Any], auth: Any = None) -> None:
        who = self.ms.registry.authenticate(auth)
        if who is None:
            log.warning("ns=%s refused: bad credentials", self.namespace)
            raise socketio.exceptions.ConnectionRefusedError("unauthorized: unknown id or wrong token")
        pid, role = who
        if role not in NAMESPACE_ROLES[self.namespace]:
            raise socketio.exceptions.ConnectionRefusedError(f"unauthorized: role {role} may not use {self.namespace}")
        old = self.sessions.add(sid, pid, role)
        if old is not None:
            # One live session per id: the newest login wins, the old one is closed.
            self.sessions.pid_of.pop(old, None)
            await self.ms.sio.disconnect(old, namespace=self.namespace)
        log.info("ns=%s connect participant=%s role=%s", self.namespace, pid, role)

    async def on_disconnect(self, sid: str, *_reason: Any) -> None:
        pid = self.sessions.remove(sid)
        if pid is not None:
            log.info("ns=%s disconnect participant=%s", self.namespace, pid)
            if self.namespace == "/market":
                self.ms.participant_left(pid)

    def _who(self, sid: str, *roles: Role) -> str:
        pid = self.sessions.pid_of.get(sid)
        if pid is None:
            raise MarketError("unauthorized", "no authenticated session")
        if roles and self.sessions.role_of[sid] not in roles:
            raise MarketError("forbidden", f"role {self.sessions.role_of[sid]} may not do this")
        if not self.ms.limiter.allow(pid):
            raise MarketError("rate_limited", "too many events: slow down")
        return pid


class MarketNamespace(_Namespace):
    def __init__(self, server: MarketServer) -> None:
        super().__init__(server, "/market")

    @_replying
    async def on_bid(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        reply = self.ms.market.submit(pid, "bid", decode(data, EntryMsg))
        await self.ms.persist()
        return reply

    @_replying
    async def on_ask(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        reply = self.ms.market.submit(pid, "ask", decode(data, EntryMsg))
        await self.ms.persist()
        return reply

    @_replying
    async def on_orders(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        OrdersMsg.check_size(data)
        results = self.ms.market.submit_orders(pid, decode(data, OrdersMsg))
        await self.ms.persist()
        return {"results": results}

    @_replying
    async def on_cancel(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        reply = self.ms.market.cancel(pid, decode(data, CancelMsg).uuid)
        await self.ms.persist()
        return reply

    @_replying
    async def on_resume(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid)
        since = decode(data, ResumeMsg).since
        try:
            return {"events": self.ms.outbox.since(pid, since)}
        except LookupError as err:
            raise MarketError("not_found", str(err)) from None

    @_replying
    async def on_meter(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        msg = decode(data, MeterMsg)
        reply = self.ms.market.meter(pid, msg)
        await self.ms.persist()
        self.ms.meter_arrived(pid, msg.time_interval[0])
        return reply


class SimulationNamespace(_Namespace):
    def __init__(self, server: MarketServer) -> None:
        super().__init__(server, "/simulation")

    @_replying
    async def on_step(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        if self.ms.config.mode != "sim":
            raise MarketError("invalid", "step is only for sim mode")
        msg = decode(data, StepMsg)
        return {"round": await self.ms.step(msg.time, msg.duration)}

    @_replying
    async def on_reset(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        decode(data, EmptyMsg)
        await self.ms.reset()
        return {}

    @_replying
    async def on_status(self, sid: str, data: Any) -> dict[str, Any]:
        self._who(sid, "controller")
        decode(data, EmptyMsg)
        return {
            "mode": self.ms.config.mode,
            "time": self.ms.clock.now(),
            "participants": {
                "registered": self.ms.registry.ids(),
                "online": self.ms.online(),
            },
        }
