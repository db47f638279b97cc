"""The `/grid` namespace (PROTOCOL.md, seed 000): a thin adapter over `market.community`.

Event names contain dots (`grid_state.set`, `lem.solve`); `trigger_event` maps each to its
`on_<name with underscores>` handler and answers any other event `invalid`. Roles `dso`,
`aggregator`, `operator`, `prosumer` and `oracle` may connect (others are refused at
connect); each event checks its own roles and answers `forbidden` to the rest.

One lock serializes every event and the periodic solver, so an action is validated, its
records made durable (`await sink.write`), and only then applied and acknowledged, with
nothing in between. "Before" and "after" a slot are judged by the market clock
(`server.clock.now()`: the last `step` in sim mode, the wall clock in rt mode).

The periodic solver is driven by the market clock too, never by polling it: in sim mode the
server calls `on_time(t)` after each `step` to `t` (before it replies), in rt mode a task
sleeps until the next `k*solve_every + solve_delay` of the wall clock and calls it. Either
way `on_time` solves the boundaries that became due, one by one in order, each once, so the
LEMs solved together depend only on the market clock, not on the machine's speed.

A DSO's grid state also reaches the auction: every auction slot overlapping the LEM slot
gets the most severe state of the LEM slots it overlaps (`Market.grid_states`), so a RED
slot clears no P2P fill and `start_round.market_info` carries the state. The auction
honours it for slots whose gate has not closed yet.

Pseudonyms: the core sees no registry id. Each event's sender and the players it names
(by registry id, or by a pseudonym this market gave out) are turned into pseudonyms here
(`market.community.pseudonyms`: keyed HMAC, or an external service), and so are the
participants of the auction's meter readings a solve falls back on; so every `/grid`
record and reply carries pseudonyms. A pseudonym that cannot be had answers `unavailable`
and writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from pathlib import Path
from typing import Any

import msgspec

from market.community.messages import (
    KPI_PLAYER_ROLES,
    LEM_PLAYER_ROLES,
    GridFlowsSetMsg,
    GridStateSetMsg,
    KpiMeasureMsg,
    LemDefaultsSetMsg,
    LemMeasureMsg,
    LemSetMsg,
    LemSolveMsg,
    ParityConfig,
    SlaSetMsg,
    SlaSolveMsg,
)
from market.community.parity import PARITY_RECORDS, Parity
from market.community.pseudonyms import (
    KEY_FILE,
    PREFIX,
    HmacSource,
    PseudonymError,
    Pseudonyms,
    ServiceSource,
    Source,
    create_key,
    read_key,
)
from market.community.solver import auction_money, measurements_from_meters
from market.community.state import Change, Measurement
from market.core.errors import MarketError
from market.core.protocol import EmptyMsg, decode
from market.core.records import Batch, MeterRecord, Record, Transaction
from market.core.registry import Role
from market.core.timing import RealTimeClock
from market.dispatch.base import Namespace, ServerPort, replying

log = logging.getLogger("microte.grid")

NAMESPACE = "/grid"
PERIODIC = "periodic"  # `sla_results.solved_by` of the periodic SLA checker
KEYED = re.compile(PREFIX + r"[0-9a-f]{32}")  # a keyed pseudonym anywhere in a ledger value
ROLES: frozenset[Role] = frozenset({"dso", "aggregator", "operator", "prosumer", "oracle"})
SEE_ALL: frozenset[Role] = frozenset({"aggregator", "operator"})  # tokens.balances of every account
SOLVER_ID = "solver"  # `by` of the periodic solver in logs

# wire event -> handler suffix (`on_<suffix>`)
EVENTS: dict[str, str] = {
    "grid_state.set": "grid_state_set",
    "grid_flows.set": "grid_flows_set",
    "lem.defaults.set": "lem_defaults_set",
    "lem.set": "lem_set",
    "lem.measure": "lem_measure",
    "lem.solve": "lem_solve",
    "tokens.balances": "tokens_balances",
    "sla.set": "sla_set",
    "kpi.measure": "kpi_measure",
    "sla.solve": "sla_solve",
}


class GridNamespace(Namespace):
    NAME = NAMESPACE
    ROLES = ROLES
    EVENTS = EVENTS

    def __init__(self, server: ServerPort, config: ParityConfig | None = None) -> None:
        super().__init__(server)
        self.core = Parity(config, role_of=self._roles_of)
        self._pseudonyms: Pseudonyms | None = None  # made on first use (`pseudonyms`)
        self._key_path: Path | None = None  # the HMAC key file (None: a key in memory only)
        # One event at a time (core call, then ledger write), shared with the periodic solver.
        self._lock = self._serial = asyncio.Lock()
        self._started = False
        # The periodic solver: every boundary <= `_handled` is done (None: none yet, so the
        # first `on_time` starts at the boundary of the earliest unsolved LEM).
        self._handled: int | None = None
        self.periodic_solves = 0  # boundaries the periodic solver has solved (or tried to)
        # boundary -> starts of the LEMs its periodic solve solved (boundaries with none are left out)
        self.solved_at_boundary: dict[int, tuple[int, ...]] = {}
        self.checked_slas: dict[str, int] = {}  # SLA id -> market time the periodic checker checked it

    # -- lifetime --------------------------------------------------------------------------

    def configure(self, config: ParityConfig) -> None:
        """Use `config` (the scenario's `[parity]` table and the `--lem-*` flags) instead of
        the one given at construction. Only before `start()`: the state is rebuilt empty."""
        if self._started:
            raise RuntimeError("GridNamespace.configure() after start()")
        self.core = Parity(config, role_of=self._roles_of)
        self._pseudonyms = None

    async def start(self) -> None:
        """Resume from the ledger, then catch up the periodic solver on the market clock
        (boundaries that became due before a restart are solved now, one by one). In rt
        mode, start the task that follows the wall clock (owned by the server, cancelled at
        shutdown); in sim mode the server's `step` drives it through `on_time`. Call it once
        the sink is open and the market resumed: in `MarketServer._lifetime`, after `_resume()`."""
        self._started = True
        await self.resume()
        if self.core.config.solve_every <= 0:
            return
        if isinstance(self.ms.clock, RealTimeClock):
            self.ms.spawn(self.follow_wall_clock())
        else:
            await self.on_time(self.ms.clock.now())

    async def resume(self) -> None:
        """Rebuild grid states, LEMs, measurements, results, accounts and SLAs from the
        ledger, and hand the states of slots not yet started back to the auction."""
        records: list[Record] = []
        for cls in PARITY_RECORDS:
            records += [msgspec.convert(row, cls) for row in await self.ms.sink.read(cls.TABLE)]
        pseudonyms = self.pseudonyms  # a bad key file fails the start, not the first event
        if isinstance(pseudonyms.source, HmacSource) and pseudonyms.source.from_file:
            # Know every registered id's pseudonym, so one given out by an earlier run names
            # its player again (an external service's are known once asked for in this run).
            await pseudonyms.of(self.ms.registry.ids())
        if not records:
            return
        source = pseudonyms.source
        if isinstance(source, HmacSource) and not source.from_file and not pseudonyms.given_out:
            # A key made now (no file, or the file is gone) cannot be the one the records used.
            where = f"the pseudonym key {self._key_path} does not exist" if self._key_path else "no pseudonym key file"
            raise RuntimeError(
                f"/grid: the ledger holds {len(records)} records written under pseudonyms, but {where}: "
                "restore the key they were made with ([parity.pseudonyms] key_file); a new key would give "
                "every participant new pseudonyms"
            )
        if isinstance(source, HmacSource) and source.from_file:
            self._check_key(records)
        self.core.restore(records)
        now, d = self.ms.clock.now(), self.core.config.lem_duration
        for start in self.core.grid_states():
            if start + d > now:
                self._to_auction(start, start + d)
        log.info("resumed /grid from the ledger: %d records", len(records))

    def _check_key(self, records: list[Record]) -> None:
        """Refuse a key file that is not the one the records' keyed pseudonyms were made with
        (a key from the wrong backup would silently give everyone new pseudonyms): at least
        one of them must name a registered id under this key."""
        found = {m for r in records for v in r.row().values() if isinstance(v, str) for m in KEYED.findall(v)}
        if found and not any(self.pseudonyms.id_of(p) is not None for p in found):
            raise RuntimeError(
                f"/grid: {self._key_path} is not the key the ledger's pseudonyms were made with "
                f"(none of its {len(found)} keyed pseudonyms names a registered id): restore the right key file"
            )

    async def on_time(self, now: int) -> None:
        """The market clock is at `now`: run every periodic solve due by then.

        Boundary `b` (a multiple of `solve_every`) is due at `b + solve_delay`; its solve
        takes the unsolved LEMs that ended by `b`. Due boundaries are handled in order, each
        exactly once (a `step` that jumps ahead solves them one by one; boundaries with no
        LEM to solve are skipped without work); calling again with the same or an earlier
        time does nothing. The records' `time_creation` is `now`. A failed solve is logged;
        its LEMs are retried at the next boundary. Sim mode: the server calls this after
        each `step` has set the clock (and stored the round), before it replies."""
        cfg = self.core.config
        every, delay = cfg.solve_every, cfg.solve_delay
        if every <= 0:
            return
        latest = (now - delay) // every * every  # the last boundary due by `now`
        if self._handled is not None and latest <= self._handled:
            return  # nothing new (every step between two boundaries): no lock, no work
        async with self._lock:
            while self._handled is None or self._handled < latest:
                first_end = self.core.first_unsolved_end()
                if first_end is None:
                    self._handled = latest  # nothing to solve up to `latest`
                    break
                boundary = -(-first_end // every) * every  # the first boundary after that LEM
                if self._handled is not None:
                    boundary = max(boundary, self._handled + every)
                if boundary > latest:
                    self._handled = latest
                    break
                await self._solve_boundary(boundary, now)
                self._handled = boundary
            await self._check_slas(latest, now)

    async def _check_slas(self, boundary: int, now: int) -> None:
        """The periodic SLA checker (`ParityConfig.sla_grace`): check every SLA due by
        `boundary`, each once, as `sla.solve` would; a failed check is retried next time."""
        for sla_id in self.core.due_slas(boundary):
            try:
                reply = await self._commit(self.core.solve_sla(PERIODIC, sla_id, now))
            except Exception:
                log.exception("periodic check of SLA %s failed; the next boundary retries", sla_id)
                continue
            self.checked_slas[sla_id] = now
            log.info("periodic SLA check %s at %d: penalties=%d", sla_id, now, len(reply["penalties"]))

    async def _solve_boundary(self, boundary: int, now: int) -> None:
        self.periodic_solves += 1
        try:
            reply = await self._solve(0, boundary, now)
        except Exception:
            log.exception("periodic solve up to %d failed; the next boundary retries", boundary)
            return
        if reply["lems"]:
            self.solved_at_boundary[boundary] = tuple(x["time_delivery"][0] for x in reply["lems"])
            log.info(
                "periodic solve up to %d at %d: lems=%d transfers=%d",
                boundary,
                now,
                len(reply["lems"]),
                len(reply["transfers"]),
            )

    async def follow_wall_clock(self) -> None:
        """rt mode: sleep until the next `k*solve_every + solve_delay` of the wall clock,
        then `on_time` (no polling in between). It starts by catching up what is due."""
        clock = self.ms.clock
        assert isinstance(clock, RealTimeClock)
        every, delay = self.core.config.solve_every, self.core.config.solve_delay
        while True:
            try:
                await self.on_time(clock.now())
            except Exception:  # on_time logs failed solves itself; this is a last resort
                log.exception("periodic solver failed at %d", clock.now())
            # Seconds to the next instant k*every + delay, a hair after it (never before).
            await asyncio.sleep((clock.seconds_to_next(every) + delay) % every + 0.001)

    # -- pseudonyms ------------------------------------------------------------------------

    @property
    def pseudonyms(self) -> Pseudonyms:
        """The table of registry ids and their pseudonyms (docs/parity.md, *Pseudonyms*)."""
        if self._pseudonyms is None:
            self._pseudonyms = Pseudonyms(self._source(), lambda name: bool(self.ms.registry.roles(name)))
        return self._pseudonyms

    def _source(self) -> Source:
        cfg = self.core.config.pseudonyms
        if cfg.uses_service:
            assert cfg.service is not None
            return ServiceSource(cfg.service, cfg.timeout)
        registry_file = self.ms.registry.path
        if cfg.key_file is not None:
            self._key_path = Path(cfg.key_file)
        elif registry_file is not None:
            self._key_path = registry_file.parent / KEY_FILE
        else:  # a registry built in memory: a key that lives as long as this server
            log.warning("/grid: no pseudonym key file ([parity.pseudonyms] key_file): pseudonyms change on restart")
            return HmacSource(secrets.token_bytes(32))
        path = self._key_path
        if path.exists():
            return HmacSource(read_key(path), from_file=True)

        def make() -> bytes:  # on first use, so a market that never uses /grid writes no key
            key = create_key(path)
            log.info("/grid: made the pseudonym key %s (mode 0600): keep it with the registry", path)
            return key

        return HmacSource(make)

    def _roles_of(self, name: str) -> tuple[str, ...]:
        """The roles of a player the core is given: a pseudonym (or, for a caller of the core
        that gives registry ids, such as a test, the id itself)."""
        pid = self.pseudonyms.id_of(name) if self._pseudonyms is not None else None
        return self.ms.registry.roles(name if pid is None else pid)

    async def _pseudonym_of(self, ids: list[str]) -> dict[str, str]:
        try:
            return await self.pseudonyms.of(ids)
        except PseudonymError as err:
            log.error("/grid: no pseudonyms: %s", err)
            raise MarketError("unavailable", f"no pseudonym: {err}; nothing was written") from None

    async def _me(self, pid: str) -> str:
        return (await self._pseudonym_of([pid]))[pid]

    async def _players(self, names: list[str], roles: frozenset[str]) -> list[str]:
        """The pseudonyms of players named by registry id or by a pseudonym given out;
        `invalid` for a name that is neither a registered holder of `roles`."""
        ids = []
        for name in names:
            pid = name if self.ms.registry.roles(name) else self.pseudonyms.id_of(name)
            if pid is None or not self.ms.registry.has_role(pid, *roles):
                raise MarketError("invalid", f"player {name!r} is not a registered {' or '.join(sorted(roles))}")
            ids.append(pid)
        got = await self._pseudonym_of(ids)
        return [got[p] for p in ids]

    # -- plumbing --------------------------------------------------------------------------

    async def _commit(self, change: Change) -> dict[str, Any]:
        """Make the change's records durable, then apply them; the reply follows."""
        if change.records:
            await self.ms.sink.write(Batch(change.records))
            self.core.apply(change.records)
        return change.reply

    def _now(self) -> int:
        return self.ms.clock.now()

    def _to_auction(self, start: int, end: int) -> None:
        """Give every auction slot overlapping [start, end) its state from the LEM slots."""
        market = self.ms.market
        d = market.times.duration if market.times is not None else self.ms.config.duration
        for slot in range(start // d * d, end, d):
            market.grid_states.set(slot, self.core.auction_state(slot, d))

    async def _auction_side(
        self, start: int, end: int, now: int
    ) -> tuple[dict[int, dict[str, Measurement]], dict[int, dict[str, int]]]:
        """The auction's meter readings (as measurements) and the money its transactions
        moved, per LEM slot and player pseudonym, for the LEMs a solve of [start, end] at
        `now` will take."""
        lems = self.core.pending(start, end, now)
        if not lems:
            return {}, {}
        lo, hi = lems[0].start, lems[-1].end
        d = self.core.config.lem_duration
        meter_rows = await self.ms.sink.read("meters", ("time_interval_start", lo - 1))
        meters = [msgspec.convert(r, MeterRecord) for r in meter_rows if r["time_interval_end"] <= hi]
        tx_rows = await self.ms.sink.read("transactions", ("time_delivery_start", lo - 1))
        txs = [msgspec.convert(r, Transaction) for r in tx_rows if r["time_delivery_end"] <= hi]
        found, money = measurements_from_meters(meters, d), auction_money(txs, d)
        ids = {p for slot in found.values() for p in slot} | {p for slot in money.values() for p in slot}
        names = await self._pseudonym_of(sorted(p for p in ids if self.ms.registry.roles(p)))
        # A pseudonymous auction's rows name players by the pseudonyms this market gave out.
        names.update({p: p for p in ids if self.pseudonyms.id_of(p) is not None})
        measures = {s: {names[p]: m for p, m in slot.items() if p in names} for s, slot in found.items()}
        nets = {s: {names[p]: v for p, v in slot.items() if p in names} for s, slot in money.items()}
        return measures, nets

    async def _solve(self, start: int, end: int, now: int) -> dict[str, Any]:
        fallback, auction = await self._auction_side(start, end, now)
        return await self._commit(self.core.solve(start, end, now, fallback, auction))

    # -- events ----------------------------------------------------------------------------

    @replying
    async def on_grid_state_set(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "dso")
        msg = decode(data, GridStateSetMsg)
        me = await self._me(pid)
        reply = await self._commit(self.core.set_grid_state(me, msg, self._now()))
        self._to_auction(*msg.time_delivery)
        log.info("grid state %s for %s by %s", msg.state, list(msg.time_delivery), pid)
        return reply

    @replying
    async def on_grid_flows_set(self, sid: str, data: Any) -> dict[str, Any]:
        """The DSO's forecast branch flows of an auction slot, for capacity-aware clearing at
        its gate (held by the market until then; not a ledger row: the DSO's own `grid_flows`
        rows and each cut's `curtailments` row carry what was used)."""
        self._who(sid, "dso")
        msg = decode(data, GridFlowsSetMsg)
        self.ms.market.set_base_flows(msg.time_delivery, msg.flows_w)
        return {"time_delivery": list(msg.time_delivery), "branches": len(msg.flows_w)}

    @replying
    async def on_lem_defaults_set(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "operator")
        msg = decode(data, LemDefaultsSetMsg)
        return await self._commit(self.core.set_defaults(await self._me(pid), msg, self._now()))

    @replying
    async def on_lem_set(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "aggregator")
        msg = decode(data, LemSetMsg)
        me = await self._me(pid)
        msg = msgspec.structs.replace(msg, players=await self._players(msg.players, LEM_PLAYER_ROLES))
        return await self._commit(self.core.set_lem(me, msg, self._now()))

    @replying
    async def on_lem_measure(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "prosumer")
        msg = decode(data, LemMeasureMsg)
        return await self._commit(self.core.measure(await self._me(pid), msg, self._now()))

    @replying
    async def on_lem_solve(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "aggregator", "operator")
        msg = decode(data, LemSolveMsg)
        reply = await self._solve(msg.start, msg.end, self._now())
        log.info("lem.solve [%d, %d] by %s: lems=%d", msg.start, msg.end, pid, len(reply["lems"]))
        return reply

    @replying
    async def on_tokens_balances(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid)
        decode(data, EmptyMsg)
        if not self.sessions.roles_of[sid].isdisjoint(SEE_ALL):
            return {"balances": self.core.balances()}
        return {"balances": self.core.balances(await self._me(pid))}

    @replying
    async def on_sla_set(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "aggregator")
        msg = decode(data, SlaSetMsg)
        me = await self._me(pid)
        kpis = [msgspec.structs.replace(k, players=await self._players(k.players, KPI_PLAYER_ROLES)) for k in msg.kpis]
        return await self._commit(self.core.set_sla(me, msgspec.structs.replace(msg, kpis=kpis), self._now()))

    @replying
    async def on_kpi_measure(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "oracle", "prosumer")
        msg = decode(data, KpiMeasureMsg)
        return await self._commit(self.core.measure_kpi(await self._me(pid), msg, self._now()))

    @replying
    async def on_sla_solve(self, sid: str, data: Any) -> dict[str, Any]:
        pid = self._who(sid, "aggregator", "operator")
        msg = decode(data, SlaSolveMsg)
        reply = await self._commit(self.core.solve_sla(await self._me(pid), msg.sla, self._now()))
        log.info("sla.solve %s by %s: penalties=%d", msg.sla, pid, len(reply["penalties"]))
        return reply
