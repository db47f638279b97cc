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
from collections.abc import AsyncIterator, Callable, Container, Coroutine, Mapping, Sequence
from typing import Any

import cuid
import msgspec
from aiohttp import web

from market.balancing.namespace import BalancingNamespace
from market.community.namespace import GridNamespace
from market.community.pseudonyms import PseudonymError
from market.core import wire
from market.core.engine import (
    Market,
    MarketConfig,
    Phase,
    Recovered,
    RoundOpen,
    SlotResult,
    canonical_config,
    deliveries,
    slot_records,
)
from market.core.errors import MarketError
from market.core.fleet_results import all_but, delivery_columns, route_rows, route_settled, settled_columns
from market.core.hierarchy import UpstreamFill, physical_flows, residual_rows
from market.core.protocol import UpstreamFillsMsg
from market.core.records import (
    GRID_ID,
    Batch,
    CancelRecord,
    EntryRecord,
    MeterRecord,
    Record,
    RoundRecord,
    RunRecord,
    Settlement,
    Transaction,
)
from market.core.registry import Registry
from market.core.sink import Sink
from market.core.timing import RealTimeClock, SimClock
from market.dispatch.base import Namespace, Sessions, address_key, backing_off, peer_address
from market.dispatch.ratelimit import RateLimiter
from market.flexibility.namespace import FlexNamespace
from market.server import dashboard
from market.server.commit import GroupCommit
from market.server.dashboard import DashboardFeed
from market.server.fleet_ns import FleetNamespace
from market.server.guard import ConnectionGuard, GuardedServer, install_repeat_filter, raise_fd_limit
from market.server.market_ns import MarketNamespace
from market.server.observe import Health, Metrics, attach
from market.server.outbox import BUDGET_BYTES, Outbox
from market.server.simulation_ns import SimulationNamespace
from market.server.upstream import UpstreamLink

log = logging.getLogger("microte.market")

MAX_PAYLOAD = 1_000_000  # bytes per socket.io message; larger ones close the connection
# sim: how long a step's results for `auth.round_start` sessions wait for the next step (a
# controller stepping back to back sends it within a millisecond), then go as `round.result`.
CARRY_SECONDS = 0.05


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
        guard: ConnectionGuard | None = None,
        in_district: bool = False,
        outbox_bytes: int = BUDGET_BYTES,
    ) -> None:
        self.config = config
        # A community in a district (docs/hierarchy.md): residuals kept, the district's fills
        # taken from the controller on /simulation.
        self.market = Market(config, upstream=in_district)
        self.upstream_link: UpstreamLink | None = None  # rt: the session above (`--upstream URL`)
        self._passed_up: set[int] = set()  # slots whose residuals went up
        self.market.owners = registry.owners()  # same-owner pairs never trade (wash trades)
        self.registry = registry
        self.sink = sink
        self.clock: SimClock | RealTimeClock = SimClock() if config.mode == "sim" else RealTimeClock()
        self.sio = GuardedServer(
            async_mode="aiohttp",
            async_handlers=False,  # one client's events are handled in the order it sent them
            serializer=wire.serializer(serializer),
            max_http_buffer_size=MAX_PAYLOAD,
            cors_allowed_origins="*",
        )
        self.sio.text_only = serializer == "json"
        self.guard = guard or ConnectionGuard()
        self.sio.guard = self.guard
        self._eio_connect, self._eio_disconnect = self.sio._handle_eio_connect, self.sio._handle_eio_disconnect
        self.sio.eio.on("connect", self._on_eio_connect)
        self.sio.eio.on("disconnect", self._on_eio_disconnect)
        self.limiter = RateLimiter(config.rate_per_second, config.rate_burst)
        self.fleet = FleetNamespace(self)
        self.grid = GridNamespace(self)
        self.dashboard = DashboardFeed(self, self.sio)  # GET /dashboard and /observe (read-only)
        self.market_ns = MarketNamespace(self)
        # Every namespace of PROTOCOL.md; each owns its sessions and its core.
        self.namespaces: tuple[Namespace, ...] = (
            self.market_ns,
            SimulationNamespace(self),
            BalancingNamespace(self),
            self.fleet,
            FlexNamespace(self),
            self.grid,
            self.dashboard.namespace,
        )
        self.sessions: dict[str, Sessions] = {ns.NAME: ns.sessions for ns in self.namespaces}
        for ns in self.namespaces:
            self.sio.register_namespace(ns)
        self.outbox = Outbox(budget=outbox_bytes)
        # Private events of `auth.combined` sessions, held until the round's `round.result`
        # (`_flush_private`): participant -> (event, payload), in the order they were made.
        self._held: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        # sim: what a step held for `auth.round_start` sessions goes out with the next round's
        # start; this sends it as `round.result` if no step comes within CARRY_SECONDS.
        self._carry: asyncio.Task[None] | None = None
        self._waits: dict[int, _MeterWait] = {}
        self._round_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_round: RoundRecord | None = None
        self.ledger_ok = True  # the last ledger write succeeded (/healthz)
        self.ledger_failures = 0  # ledger writes that failed (/metrics)
        self.rounds_processed = 0  # slots processed and stored (/metrics)
        self.heartbeat = time.monotonic()  # rt: the round loop's last boundary (/healthz)
        self.metrics: Metrics | None = None  # set by app()
        self.commits = GroupCommit(self._write)
        self._unannounced: list[tuple[str, dict[str, Any]]] = []  # `settled` events whose fills await the ledger
        # ... and the fills of those whose connection takes them in columns (with those parties).
        self._unannounced_fills: list[tuple[list[Settlement], frozenset[str]]] = []
        self._backlog: list[Record] = []  # round records the ledger refused, written with the next batch
        # The slots whose records are in the backlog: their deliveries go out once it is written.
        self._undelivered: list[tuple[SlotResult, frozenset[str]]] = []
        self._admit = asyncio.Event()  # cleared while a round opens: new actions wait (ack durability)
        self._admit.set()
        self.caught_up = 0  # slots processed after a boundary later than their own (stall, restart)
        # A pseudonymous auction (`[parity.pseudonyms] market`): registry id <-> the name the
        # auction knows it by; empty: the auction uses registry ids.
        self.market_ids: dict[str, str] = {}
        self._registry_ids: dict[str, str] = {}
        self._ids_of: dict[str, tuple[str, ...]] = {}  # `market_ids_of`, until the names change
        self._resumed_ids: set[str] = set()
        self.run = run or RunRecord(
            id=cuid.cuid(), scenario="", seed=0, started=int(time.time()), config=canonical_config(config)
        )

    # -- app -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        self.sio.attach(app)
        app.cleanup_ctx.append(self._lifetime)
        app.on_shutdown.append(self._close_connections)
        self.metrics = attach(app, self)  # GET /healthz, GET /metrics (docs/operations.md)
        dashboard.attach(app)
        return app

    def replied(self, seconds: float, reply: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.observe_ack(seconds)
            if not reply.get("ok"):
                self.metrics.refused(str(reply.get("error", {}).get("code", "other")))

    def health(self) -> Health:
        """One reading of the server's health (/healthz, the dashboard)."""
        return Health(self)

    def last_processed(self) -> RoundRecord | None:
        """The last processed round (/healthz)."""
        return self._last_round

    async def _write(self, batch: Batch) -> None:
        """Every ledger write of the server: `ledger_ok` says whether the last one succeeded."""
        try:
            await self.sink.write(batch)
        except Exception:
            self.ledger_ok = False
            self.ledger_failures += 1
            raise
        self.ledger_ok = True

    async def _close_connections(self, _app: web.Application) -> None:
        """Close every socket.io connection at shutdown, so the server exits in seconds
        instead of waiting for clients to leave."""
        self._stop_carry()
        with contextlib.suppress(Exception):
            await self._flush_private()  # a step's results still held for `round_start` sessions
        with contextlib.suppress(Exception):
            if self.sio.eio.sockets:  # engine.io closes every client when given no sid
                await asyncio.wait_for(self.sio.eio.disconnect(), 2)
            await asyncio.wait_for(self.sio.shutdown(), 2)

    async def _on_eio_connect(self, eio_sid: str, environ: dict[str, Any]) -> bool | dict[str, str]:
        address = peer_address(environ)
        wait = self.limiter.logins.wait((address_key(address),))
        if wait > 0:
            # An address backing off from failed logins is refused at the handshake (engine.io
            # answers 401 with this body), before the websocket upgrade and the login: a
            # guessing flood then costs the server a fraction of a handshake per attempt.
            log.warning("connection refused: its address backs off after failed logins")
            return {"message": backing_off(wait)}
        accepted, evict = self.guard.opened(eio_sid, address, time.monotonic())
        for old in evict:  # the oldest connections that have not logged in make room
            self.spawn(self._drop(old))
        if not accepted:
            log.warning("connection refused: its address holds %d connections", self.guard.max_per_address)
            return False
        await self._eio_connect(eio_sid, environ)
        return True

    async def _on_eio_disconnect(self, eio_sid: str, *reason: Any) -> None:
        self.guard.closed(eio_sid)
        self.sio.forget_pings(eio_sid)
        await self._eio_disconnect(eio_sid, *reason)

    async def _drop(self, eio_sid: str) -> None:
        """Close an engine.io connection without waiting for the client: a polling session
        whose client never polls again would otherwise be kept forever."""
        if not await self.sio.close_now(eio_sid, abort=False):  # a websocket hears CLOSE
            return
        self.guard.closed(eio_sid)

    def authenticated(self, sid: str, namespace: str, members: int = 1) -> None:
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, namespace)
        if eio_sid is not None:
            self.guard.authenticated(eio_sid, members)

    async def _sweep_unauthenticated(self) -> None:
        """Close connections that did not log in within the guard's `auth_timeout`."""
        while True:
            await asyncio.sleep(min(1.0, self.guard.auth_timeout / 2))
            stale = self.guard.expired(time.monotonic())
            for eio_sid in stale:
                await self._drop(eio_sid)
            slow = [s for s in list(self.sio.eio.sockets) if self.sio.queued(s) > self.sio.max_queued]
            for eio_sid in slow:  # readers that stopped reading broadcasts
                await self.sio.drop_slow(eio_sid)
            if slow:
                log.warning("closed %d slow reader(s) (more than %d packets unsent)", len(slow), self.sio.max_queued)
            if stale:
                log.warning(
                    "closed %d connection(s) that did not log in within %.1f s", len(stale), self.guard.auth_timeout
                )

    async def _lifetime(self, _app: web.Application) -> AsyncIterator[None]:
        limit = raise_fd_limit()
        install_repeat_filter()
        log.info("open files limit: %d", limit)
        self.spawn(self._sweep_unauthenticated())
        self.spawn(self.dashboard.run())
        await self.sink.start()
        await self._resume()
        for ns in self.namespaces:  # resume each from the ledger, start its periodic tasks
            await ns.start()
        await self._name_the_auction()
        await self._write(Batch((self.run,)))
        if self.upstream_link is not None:
            self.spawn(self.upstream_link.run())
        if self.config.mode == "rt":
            # Orders are accepted as soon as the server listens: the round the wall clock is
            # in opens now (catching up any slot left from before a restart).
            await self._rt_boundary(self.clock.now() // self.config.duration * self.config.duration)
            self.spawn(self._rt_loop())
        yield
        if self.upstream_link is not None:
            await self.upstream_link.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.commits.drain()
        # What the market acknowledged and has not stored yet (`round` durability: the
        # entries, cancels and readings since the last round) is written before exit.
        if not await self._store(self.market.take_journal()):
            log.error("shutdown: %d record(s) could not be stored", len(self._backlog))
        await self.sink.close()

    async def _resume(self) -> None:
        """Pick up where the ledger ends: the last processed round (if any), the open book,
        and the fills and readings of slots not processed yet (after a crash or a restart)."""
        rounds = await self.sink.read("rounds")
        last = (
            msgspec.convert(max(rounds, key=lambda r: (r["current_round_start"], r["time"])), RoundRecord)
            if rounds
            else None
        )
        after = last.current_round_start if last is not None else -(2**62)
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
        # Who the open book, fills and readings name (a pseudonymous auction checks its key).
        self._resumed_ids = {e.participant_id for e in rec.entries} | {m.participant_id for m in rec.meters}
        if last is None and not (rec.entries or rec.settlements or rec.meters):
            return
        self.market.restore(rec)
        self._last_round = last
        if isinstance(self.clock, SimClock) and last is not None:
            self.clock.set(last.time)
        log.info(
            "resumed from the ledger: last round=%s slot=%s open entries=%d fills=%d readings=%d",
            last.time if last else None,
            last.current_round_start if last else None,
            len(self.market.book),
            len(rec.settlements),
            len(rec.meters),
        )

    async def persist(self) -> None:
        """Make the records of acknowledged actions durable before the acknowledgement. If
        the write fails the action is undone completely and the client hears `unavailable`."""
        if not self.config.ack_durable:
            return  # sim: they go with the round's records, before the `step` reply
        records = self.market.take_journal()
        try:
            await self.commits.commit(records, undo=lambda: self.market.undo(records))
        except Exception as err:
            log.warning("ledger write failed, %d record(s) undone: %s", len(records), err)
            raise MarketError("unavailable", "the ledger could not store it: nothing changed, retry later") from None
        self.market.durable(records)

    async def admit(self) -> None:
        """Wait while a round opens (ack durability): gate closure sees only durable entries.
        rt under `round` durability: refuse while what it acknowledged waits for the ledger
        (a round's store failed), rather than acknowledge more it may not be able to store."""
        if self._backlog and self.config.mode == "rt" and not self.config.ack_durable:
            raise MarketError(
                "unavailable",
                f"the ledger could not store {len(self._backlog)} record(s) of the last round: nothing is"
                " acknowledged until it has them (retried at every round boundary); retry later",
            )
        if not self._admit.is_set():
            await self._admit.wait()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- a community in a district (docs/hierarchy.md) ---------------------------------------

    def _pass_up(self, duration: int) -> None:
        """rt: place above the residuals of every slot whose gate closed and that has not gone up."""
        assert self.upstream_link is not None
        for start in self.market.residual_slots():
            if start not in self._passed_up:
                self._passed_up.add(start)
                self.spawn(self.upstream_link.pass_up(start, duration))
        self._passed_up = {s for s in self._passed_up if s in set(self.market.residual_slots())}

    def upstream_residuals(self, start: int) -> list[dict[str, Any]]:
        """The residuals of a cleared slot as the district sees them: `{start}-{n}` by
        position (the order restore finds again), no member named."""
        if not self.market.upstream:
            raise MarketError("invalid", "this market is not in a district (microte market --in-district)")
        return residual_rows(start, self.market.residuals_of(start))

    async def upstream_fills(self, msg: UpstreamFillsMsg) -> dict[str, Any]:
        """Settle the district's fills of a slot's residuals: durable before the reply, and
        each member told (`settled`) before its next `start_round`."""
        start = msg.time_delivery[0]
        mine = {f"{start}-{n}": r for n, r in enumerate(self.market.residuals_of(start))}
        fills = []
        for f in msg.fills:
            r = mine.get(f.id)
            if r is None:
                raise MarketError("invalid", f"upstream.fills: no residual {f.id!r} in slot {start}")
            fills.append(UpstreamFill(r, f.quantity, f.price, f.price, f.source, f.ref))
        async with self._round_lock:
            # Whatever the ledger refused before goes first; if it still cannot, nothing is applied.
            if not await self._store([]):
                raise MarketError("unavailable", "the ledger refuses writes; nothing was applied")
            result = self.market.upstream_fills(start, fills, self.clock.now())
            try:  # on their own, not through the backlog: a refusal must leave nothing behind
                if result.settlements:
                    await self._write(Batch(tuple(result.settlements)))
            except Exception as err:
                self.market.drop_upstream(start, result.settlements)
                log.error("upstream fills of slot %s refused by the ledger (%s); nothing was applied", start, err)
                raise MarketError("unavailable", "the ledger refused the upstream fills; nothing was applied") from None
            await self._send_private("settled", result.settled)
        # The members' fills go back to the caller too (the controller, the operator): a member
        # that is itself a market below gets them from there, with no race against `settled`.
        events = [{"participant": pid, **payload} for pid, payload in result.settled]
        return {
            "settled": len(result.settlements),
            "duplicate": not result.settlements and bool(fills),
            "events": events,
        }

    async def upstream_flows(self, start: int) -> dict[str, Any]:
        """What the upstream account physically passed on in a processed slot (from the
        ledger, so a restarted community answers the same): the community's reading above."""
        if not self.market.upstream:
            raise MarketError("invalid", "this market is not in a district (microte market --in-district)")
        if self.market.phase(start) is not Phase.PROCESSED:
            raise MarketError("invalid", f"slot {start} is not processed yet")
        rows = await self.sink.read("transactions", ("time_delivery_start", start - 1))
        gen, taken = physical_flows(msgspec.convert(r, Transaction) for r in rows if r["time_delivery_start"] == start)
        return {"generation": gen, "external": taken}

    # -- rounds ----------------------------------------------------------------------------

    async def step(self, t: int, duration: int | None) -> dict[str, Any]:
        """One sim round: open it, wait for the current round's readings (bounded), process
        and store it. Returns the `round` object of the `step` reply."""
        async with self._round_lock:
            assert isinstance(self.clock, SimClock)
            last = self._last_round
            if last is not None and t == last.time and last.current_round_start == t:
                # A retried step (say, after a restart, or after its store failed): the same
                # answer, once its records are durable.
                if self._backlog:
                    if not await self._store([]):
                        raise _not_stored(t)
                    await self._hand_out()  # the deliveries that waited for it
                return _round_reply(last)
            self._stop_carry()  # what the last step held goes out with this round's start
            self._admit.clear()
            try:
                await self.commits.drain()
                columnar = frozenset(self._columnar())
                opened = self.market.open_round(t, duration, parties=self._dict_parties(columnar))
            finally:
                self._admit.set()
            self.clock.set(t)
            wait = self._expect(t)
            try:
                await self._announce(opened, columnar)
                for skipped in [s for s in self.market.delivering() if s < t]:  # a step that jumped ahead
                    await self._finish(opened, skipped, [])
                await self._await_readings(wait, self.config.round_timeout)
                reply = await self._finish(opened, t, opened.settlements)
            finally:
                await self._hand_out()
            self.dashboard.recent.cleared(opened)
            # /grid's periodic solver follows the market clock, after the slot's readings are stored.
            await self.grid.on_time(t)
            return reply

    async def _rt_loop(self) -> None:
        """rt mode: open a round at every multiple of the duration, whatever clients do."""
        assert isinstance(self.clock, RealTimeClock)
        d = self.config.duration
        while True:
            await asyncio.sleep(self.clock.seconds_to_next(d) + 0.001)
            await self._rt_boundary(self.clock.now() // d * d)

    async def _rt_boundary(self, t: int) -> None:
        """Open the round at boundary `t` (its fills stored before they are announced), then
        process every slot still delivering before `t`, oldest first, each exactly once:
        the one that just ended and any left by a stall or a restart (docs/protocol.md,
        *Resume and catch-up*)."""
        self.heartbeat = time.monotonic()
        if self.market.times is not None and t <= self.market.times.time:
            return  # woke a hair early: this boundary's round is already open
        try:
            async with self._round_lock:
                self._admit.clear()
                try:
                    await self.commits.drain()
                    columnar = frozenset(self._columnar())
                    opened = self.market.open_round(t, parties=self._dict_parties(columnar))
                finally:
                    self._admit.set()
                late = [s for s in self.market.delivering() if s < t]
                waits = [self._expect(s) for s in late]
                # Entries and readings acknowledged so far (`round` durability) and the fills
                # go to the ledger before anyone hears of the fills.
                journal = [r for r in self.market.take_journal() if not isinstance(r, MeterRecord)]
                if not await self._store([*journal, *opened.settlements]):
                    self._unannounced += opened.settled  # sent once stored, at a later boundary
                    self._unannounced_fills.append((opened.settlements, columnar))
                    return
                self.dashboard.recent.cleared(opened)
                # What an earlier boundary still holds (its slots are still being processed)
                # reaches combined sessions before this round's start_round.
                await self._flush_private()
                if self._unannounced:
                    await self._send_private("settled", self._unannounced)
                    self._unannounced = []
                for fills, their in self._unannounced_fills:
                    await self._send_settled(fills, their)
                self._unannounced_fills = []
                await self._announce(opened, columnar)
            if self.upstream_link is not None:
                self._pass_up(opened.times.duration)
        except Exception:
            log.exception("round=%s could not open; the next boundary will try again", t)
            await self._flush_private()
            return
        if late:
            self.spawn(self._rt_process(opened, late, waits))
        else:
            await self._flush_private()

    async def _store(self, records: Sequence[Record]) -> bool:
        """Write `records` after any the ledger refused before (in order: fills before the
        rows that settle them); on failure keep them all for the next write. The market's
        state has moved on, so what it produced must reach the ledger eventually. Once it
        has, the deliveries of the slots that waited for it go out."""
        batch = [*self._backlog, *records]
        if not batch:
            return True
        try:
            await self._write(Batch(tuple(batch)))
        except Exception as err:
            self._backlog = batch
            log.error("ledger write failed (%s); %d record(s) kept for the next write", err, len(batch))
            return False
        self._backlog = []
        waiting, self._undelivered = self._undelivered, []
        for result, columnar in waiting:  # their records are durable now
            self.rounds_processed += 1
            await self._deliver(result, columnar)
        return True

    async def _rt_process(self, opened: RoundOpen, slots: list[int], waits: list[_MeterWait]) -> None:
        try:
            await self._rt_process_slots(opened, slots, waits)
        finally:
            await self._flush_private()  # the boundary's fills and deliveries: one `round.result`

    async def _rt_process_slots(self, opened: RoundOpen, slots: list[int], waits: list[_MeterWait]) -> None:
        # One grace for all: readings of a slot are asked for by this round's announcement.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.meter_grace
        for wait in waits:
            await self._await_readings(wait, max(0.0, deadline - loop.time()))
        d = opened.times.duration
        for slot in slots:
            try:
                async with self._round_lock:
                    if slot not in self.market.delivering():
                        continue  # processed by a later boundary's catch-up: once only
                    trades = len(opened.settlements) if slot == opened.times.time - d else 0
                    await self._finish(opened, slot, [], trades=trades)
                    if self.upstream_link is not None:
                        self.spawn(self.upstream_link.processed(slot, d))
                    if opened.times.time > slot + d:
                        self.caught_up += 1
                        log.warning("slot=%s processed late, at round=%s", slot, opened.times.time)
            except MarketError as err:  # processed, its store failed: the next write takes it
                log.error("slot=%s: %s; its records and deliveries go with the next write", slot, err.message)
                return
            except Exception:
                log.exception("slot=%s could not be processed; the next boundary retries", slot)
                return

    async def _name_the_auction(self) -> None:
        """Under `[parity.pseudonyms] market`, the auction knows every participant by its
        `/grid` pseudonym: sessions, book, fills, readings, rounds and every ledger row. Asked
        once for the whole registry before a client is admitted; a source that fails stops
        the start, so nothing is ever written under a registry id."""
        if not self.grid.core.config.pseudonyms.market:
            return
        try:
            names = await self.grid.pseudonyms.of(self.registry.ids())
        except PseudonymError as err:
            raise RuntimeError(
                f"the auction trades under pseudonyms ([parity.pseudonyms] market) and none could be had: {err}; "
                "the market did not start and wrote nothing"
            ) from None
        if self._resumed_ids and self._resumed_ids.isdisjoint(names.values()):
            raise RuntimeError(
                "the auction trades under pseudonyms and none of those its open book and readings were stored "
                "under is a pseudonym of a registered id now: the pseudonym key or service changed; restore it"
            )
        self.market_ids, self._registry_ids = names, {m: p for p, m in names.items()}
        self._ids_of.clear()
        self.market.owners = {names[a]: names[o] for a, o in self.registry.owners().items()}
        log.info("the auction trades under pseudonyms: %d participants", len(names))

    def market_id(self, pid: str) -> str:
        """The name the auction knows registry id `pid` by (itself unless pseudonymous)."""
        return self.market_ids.get(pid, pid)

    def market_ids_of(self, role: str) -> list[str]:
        """The auction's names of every registered holder of `role`, in registry order."""
        return list(self._market_ids_of(role))

    def _market_ids_of(self, role: str) -> tuple[str, ...]:
        # Made once per role (each round asks twice): the registry never changes, the names
        # only when the auction's pseudonyms are set.
        ids = self._ids_of.get(role)
        if ids is None:
            ids = self._ids_of[role] = tuple(self.market_id(p) for p in self.registry.ids(role))  # type: ignore[arg-type]
        return ids

    def own_view(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A private payload as its participant sees it: its own transactions name it by its
        registry id (it knows itself by no other); counterparties keep their pseudonyms."""
        pid = self._registry_ids.get(name)
        txs = payload.get("transactions")
        if pid is None or not isinstance(txs, list):
            return payload
        mine = {name: pid}
        shown = [
            {
                **t,
                "buyer_id": mine.get(t["buyer_id"], t["buyer_id"]),
                "seller_id": mine.get(t["seller_id"], t["seller_id"]),
            }
            for t in txs
        ]
        return {**payload, "transactions": shown}

    def online(self) -> list[str]:
        """Participants connected to /market or through a fleet connection."""
        return sorted(self._online())

    def _online(self) -> set[str]:
        return self.sessions["/market"].sid_of.keys() | self.fleet.sid_of.keys()

    def _expect(self, slot: int) -> _MeterWait:
        prosumers = self._online().intersection(self._market_ids_of("prosumer"))  # no sorting: a set
        wait = self._waits[slot] = _MeterWait(prosumers.difference(self.market.metered(slot)))
        return wait

    async def _await_readings(self, wait: _MeterWait, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wait.done.wait(), timeout)

    async def _announce(self, opened: RoundOpen, columnar: frozenset[str]) -> None:
        """Send the round's fills and start: `columnar`, the parties whose fills `opened.settled`
        leaves out (their connection takes them in columns)."""
        sim = self.config.mode == "sim"
        starting = self._starting() if sim else {}
        if sim:
            # Held by the last step for a session that has since logged in again without
            # `round_start` (or left): sent now, before this round's start, as combined.
            await self._flush_private(hold=starting)
        carried = {pid: len(self._held.get(pid, ())) for pid in starting}  # held by the last step
        await self._send_private("settled", opened.settled)
        await self._send_settled(opened.settlements, columnar)
        skip: list[str] = []
        if sim:
            # A fill of a slot this very round delivers (close_steps = 1, or a step that jumped
            # to a slot it cleared) steers the reading a participant sends on start_round: a
            # combined session gets those before it, in a `round.result` of their own.
            t = opened.times.time

            def due(_event: str, payload: dict[str, Any]) -> bool:
                return bool(payload["time_delivery"][0] <= t)

            await self._flush_private(due, hold=starting)
            skip = await self._start_each(opened, starting, carried, due)
        await self.sio.emit("start_round", opened.start_round, namespace="/market", skip_sid=skip or None)
        if self.fleet.members:
            await self.sio.emit("start_round", opened.start_round, namespace="/fleet")
        log.info("round=%s start trades=%d", opened.times.time, len(opened.settlements))

    async def _finish(
        self, opened: RoundOpen, slot: int, fills: Sequence[Settlement], *, trades: int | None = None
    ) -> dict[str, Any]:
        """Process `slot` and make its records durable, with `fills` (the round's clearing)."""
        self._waits.pop(slot, None)
        columnar = frozenset(self._columnar())
        result = self.market.process(slot, self.clock.now(), parties=self._dict_parties(columnar))
        metered = set(result.metered)
        missing = [p for p in self._market_ids_of("prosumer") if p not in metered]
        # With the entries and cancels acknowledged since the last round and not yet durable.
        records, summary = slot_records(opened, result, self.market.take_journal(), fills, missing, trades)
        self._last_round = summary
        if not await self._store([*records, summary]):
            self._undelivered.append((result, columnar))  # sent by the write that stores them
            raise _not_stored(slot)
        self.rounds_processed += 1
        await self._deliver(result, columnar)
        log.info(
            "round=%s slot=%s metered=%d missing=%d records=%d",
            opened.times.time,
            slot,
            len(result.metered),
            len(missing),
            len(records),
        )
        return _round_reply(summary)

    async def _deliver(self, result: SlotResult, columnar: frozenset[str]) -> None:
        """Each party's `delivery`; those in `columnar` (left out of `result.deliveries`) in
        one `delivery.columns` per `/fleet` connection that takes columns."""
        await self._send_private("delivery", list(result.deliveries.items()))
        if not columnar:
            return
        rows = tuple(result.transactions)
        per_sid, rest = route_rows(rows, columnar, self._columnar())
        if rest:  # left their columnar connection since: as everyone else
            await self._send_private("delivery", list(deliveries(result.slot, result.transactions, rest).items()))
        for sid, picks in per_sid.items():
            payload = delivery_columns(result.slot, rows, picks, self.outbox.push_refs)
            await self.sio.emit("delivery.columns", payload, to=sid, namespace="/fleet")

    @staticmethod
    def _dict_parties(columnar: frozenset[str]) -> Container[str] | None:
        """Whom the engine makes private payloads for: every party but those that get theirs
        in columns, and but the grid (a ledger account, not a participant: nobody reads it)."""
        return all_but(columnar | {GRID_ID})

    def _columnar(self) -> dict[str, str]:
        """participant -> `/fleet` sid of those whose private events go in columns."""
        if not self.fleet.columnar:
            return {}
        return self.fleet.columnar_routes(self.sessions["/market"].sid_of)

    async def _send_settled(self, settlements: Sequence[Settlement], columnar: frozenset[str]) -> None:
        """The `settled` events of the parties in `columnar`: one `settled.columns` per `/fleet`
        connection that takes columns, or as everyone else's if they left it since."""
        if not columnar:
            return
        per_sid, rest = route_settled(settlements, columnar, self._columnar())
        await self._send_private("settled", rest)
        for sid, items in per_sid.items():
            payload = settled_columns(items, self.outbox.push_refs)
            await self.sio.emit("settled.columns", payload, to=sid, namespace="/fleet")

    async def _send_private(self, event: str, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Send each participant its private events: one message each on /market, one
        batch per fleet connection on /fleet. Each is kept (numbered) for `resume`. A
        session that logged in with `auth.combined` gets them later, with the rest of its
        round, in one `round.result` (`_flush_private`)."""
        market_sids = self.sessions["/market"].sid_of
        combined = self.market_ns.combined
        batches: dict[str, list[dict[str, Any]]] = {}
        for pid, payload in items:
            shown = self.own_view(pid, payload) if self.market_ids else payload
            sid = market_sids.get(pid)
            if sid is not None and sid in combined:
                self._held.setdefault(pid, []).append((event, shown))
                continue
            numbered = self.outbox.push(pid, event, shown)
            if sid is not None:
                await self.sio.emit(event, numbered, to=sid, namespace="/market")
            elif (fleet_sid := self.fleet.sid_of.get(pid)) is not None:
                batches.setdefault(fleet_sid, []).append({"participant": pid, **numbered})
        for fleet_sid, events in batches.items():
            await self.sio.emit(event, {"events": events}, to=fleet_sid, namespace="/fleet")

    async def _flush_private(
        self, due: Callable[[str, dict[str, Any]], bool] | None = None, *, hold: Container[str] = ()
    ) -> None:
        """Send what `_send_private` held for combined sessions (all of it, or what `due`
        selects; nothing of the participants in `hold`): each participant one `round.result`
        `{"settled": [...], "delivery": [...]}`. Each payload is numbered in the outbox now,
        in the order it was made, so `resume` never returns what a `round.result` is about
        to carry. A participant that meanwhile logged in again without `combined` gets the
        separate events; one that is away finds them with `resume`."""
        if not self._held:
            return
        if due is None and not hold:
            sending, self._held = self._held, {}
        else:
            sending = {}
            for pid, events in list(self._held.items()):
                if pid in hold:
                    continue
                if due is None:
                    sending[pid] = self._held.pop(pid)
                    continue
                now = [e for e in events if due(*e)]
                if now:
                    sending[pid] = now
                    kept = [e for e in events if not due(*e)]
                    if kept:
                        self._held[pid] = kept
                    else:
                        del self._held[pid]
        market_sids, combined = self.sessions["/market"].sid_of, self.market_ns.combined
        for pid, events in sending.items():
            numbered = [(event, self.outbox.push(pid, event, payload)) for event, payload in events]
            sid = market_sids.get(pid)
            if sid is None:
                continue  # away (or moved to /fleet): kept for `resume`
            if sid in combined:
                result = {
                    "settled": [p for e, p in numbered if e == "settled"],
                    "delivery": [p for e, p in numbered if e == "delivery"],
                }
                await self.sio.emit("round.result", result, to=sid, namespace="/market")
            else:
                for event, payload in numbered:
                    await self.sio.emit(event, payload, to=sid, namespace="/market")

    def _starting(self) -> dict[str, str]:
        """participant -> sid of the connected `auth.round_start` sessions."""
        starting = self.market_ns.starting
        if not starting:
            return {}
        return {pid: sid for pid, sid in self.sessions["/market"].sid_of.items() if sid in starting}

    async def _start_each(
        self,
        opened: RoundOpen,
        starting: Mapping[str, str],
        carried: Mapping[str, int],
        due: Callable[[str, dict[str, Any]], bool],
    ) -> list[str]:
        """sim: each `round_start` session's `round.start`: this round's `start_round` with
        what `round.result` would have carried before it (the last step's events, then those of
        this round that are `due`), numbered now. Returns their sids (no `start_round` for them)."""
        for pid, sid in starting.items():
            events = self._held.pop(pid, [])
            n = carried.get(pid, 0)
            now = [*events[:n], *(e for e in events[n:] if due(*e))]
            kept = [e for e in events[n:] if not due(*e)]
            if kept:
                self._held[pid] = kept
            numbered = [(event, self.outbox.push(pid, event, payload)) for event, payload in now]
            payload = {
                **opened.start_round,
                "settled": [p for e, p in numbered if e == "settled"],
                "delivery": [p for e, p in numbered if e == "delivery"],
            }
            await self.sio.emit("round.start", payload, to=sid, namespace="/market")
        return list(starting.values())

    async def _hand_out(self) -> None:
        """The step's one `round.result` per combined session; `round_start` sessions get
        theirs with the next round's start (`_start_each`), or after CARRY_SECONDS."""
        starting = self._starting()
        await self._flush_private(hold=starting)
        if any(pid in self._held for pid in starting) and self._carry is None:
            self._carry = self.spawn(self._send_carried())  # cancelled with the server's other tasks

    def _stop_carry(self) -> None:
        if self._carry is not None:
            self._carry.cancel()
            self._carry = None

    async def _send_carried(self) -> None:
        """No step came for CARRY_SECONDS: what the last one held goes as `round.result`."""
        await asyncio.sleep(CARRY_SECONDS)
        async with self._round_lock:
            self._carry = None
            await self._flush_private()

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
            self.dashboard.recent.clear()
            self._waits.clear()


def _not_stored(slot: int) -> MarketError:
    return MarketError("unavailable", f"slot {slot} is processed but the ledger could not store it yet")


def _round_reply(r: RoundRecord) -> dict[str, Any]:
    return {
        "current_round": [r.current_round_start, r.current_round_start + r.duration],
        "metered": r.metered,
        "missing": msgspec.json.decode(r.missing),
        "trades": r.trades,
        "records": r.records,
    }
