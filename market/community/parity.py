"""The Parity market (seed 000, PROTOCOL.md namespace `/grid`) as a pure core.

No bids: a local energy market (LEM) is a 15-minute slot with a list of players, priced
after the fact from what the community consumed (Ec) and produced (Ep), shaped by the
DSO's grid state of the slot:

    p_buy  = (Ec*pbBAU - min(Ec,Ep)*(pbBAU-pbP2P)) / Ec      (pbBAU if Ec = 0)
    p_sell = (Ep*psBAU + min(Ec,Ep)*(psP2P-psBAU)) / Ep      (psBAU if Ep = 0)

(cents per kWh, divided by 100 into currency; the sell price is the corrected one of
seeds/README.md: the matched share earns psP2P). Each player's balance moves by
`round(1e6 * (ep*p_sell - ec*p_buy - beta*(ec-ep)*(Ec-Ep)/(Ec+Ep)))` micro-currency (kWh,
Python `round`): following the community's net flow costs, countering it earns, at most
`beta` per kWh of one's own flow at any community size. Parameters are the LEM's own if its
aggregator gave them and the slot is GREEN, else the operator's defaults for the slot's
grid state (GREEN when the DSO set none); a RED slot is not solved as P2P: its players
get a result row with amount 0 and no tokens move. After a solve, each player's total
over the solved LEMs moves as one token transfer: a negative total is paid to the LEM's
aggregator, a positive one paid by it.

SLAs carry KPIs (rule `gt`/`lt`, limit, penalty in micro-currency, players, resolution),
set before their period starts; players save one value per resolution period of the SLA
once that period has ended (by the market clock), and checking the SLA after its end costs
each breaking value its KPI's penalty, paid to the SLA's aggregator, exactly once.

Every accepted action is a `Change`: the ledger records it produces and its reply. Nothing
is mutated until the caller has made the records durable and calls `apply(records)`; the
same `apply` rebuilds the state from the ledger after a restart (`restore`). Records have
deterministic ids, so a retried write is a no-op. Participant ids are pseudonyms: the
namespace turns registry ids into them before it calls the core (`market.community.pseudonyms`),
so the ledger never holds a registry id; the core does not care which it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec

from market.community.messages import (
    KPI_PLAYER_ROLES,
    LEM_PLAYER_ROLES,
    SEVERITY,
    GridStateSetMsg,
    KpiMeasureMsg,
    KpiMsg,
    LemDefaultsSetMsg,
    LemMeasureMsg,
    LemParams,
    LemSetMsg,
    Measured,
    ParityConfig,
    RoleOf,
    SlaSetMsg,
)
from market.community.solver import LemSolution, solve_lem
from market.community.state import Change, Kpi, Lem, Measurement, Sla
from market.core.errors import MarketError
from market.core.protocol import GridState, Interval
from market.core.records import (
    GridStateRecord,
    KpiValueRecord,
    LemDefaultsRecord,
    LemMeasureRecord,
    LemRecord,
    LemResultRecord,
    Record,
    SlaRecord,
    SlaResultRecord,
    TokenTransfer,
)
from market.core.timing import is_aligned

# -- the core --------------------------------------------------------------------------------

# Order in which `restore` applies the ledger's records (what each kind depends on first).
_RESTORE_ORDER: tuple[type[Record], ...] = (
    LemDefaultsRecord,
    GridStateRecord,
    LemRecord,
    LemMeasureRecord,
    LemResultRecord,
    TokenTransfer,
    SlaRecord,
    KpiValueRecord,
    SlaResultRecord,
)
PARITY_RECORDS: tuple[type[Record], ...] = _RESTORE_ORDER
ParamsSource = Literal["lem", "defaults", "none"]


class Parity:
    """Grid states, LEMs, measurements, token accounts and SLAs of one Parity market.

    `role_of` (the registry's lookup) checks that LEM players are prosumers and KPI players
    prosumers or oracles; without it any id is accepted."""

    def __init__(self, config: ParityConfig | None = None, role_of: RoleOf | None = None) -> None:
        self.config = config or ParityConfig()
        self._role_of = role_of
        self._defaults: dict[GridState, LemParams] = dict(self.config.defaults)
        self._defaults_rev: dict[GridState, int] = {}
        self._grid: dict[int, GridState] = {}  # LEM slot start -> state
        self._grid_rev: dict[int, int] = {}
        self._lems: dict[int, Lem] = {}
        self._measures: dict[int, dict[str, Measurement]] = {}
        self._results: dict[int, dict[str, LemResultRecord]] = {}  # solved LEMs
        self._accounts: dict[str, int] = {}
        self._transfers: dict[str, TokenTransfer] = {}
        self._slas: dict[str, Sla] = {}
        self._kpi_values: dict[tuple[str, str, str, int], float] = {}
        self._sla_results: dict[str, SlaResultRecord] = {}
        self._penalties: dict[str, list[TokenTransfer]] = {}
        self._apply: dict[type[Record], Callable[[Any], None]] = {
            GridStateRecord: self._apply_grid_state,
            LemDefaultsRecord: self._apply_defaults,
            LemRecord: self._apply_lem,
            LemMeasureRecord: self._apply_measure,
            LemResultRecord: self._apply_result,
            TokenTransfer: self._apply_transfer,
            SlaRecord: self._apply_sla,
            KpiValueRecord: self._apply_kpi_value,
            SlaResultRecord: self._apply_sla_result,
        }

    # -- queries ---------------------------------------------------------------------------

    def grid_state(self, lem_start: int) -> GridState:
        return self._grid.get(lem_start, "GREEN")

    def grid_states(self) -> dict[int, GridState]:
        return dict(sorted(self._grid.items()))

    def auction_state(self, slot_start: int, duration: int) -> GridState:
        """The state of the auction slot [slot_start, slot_start + duration): the most severe
        state of the LEM slots it overlaps (just the LEM slot's state when it lies in one)."""
        d = self.config.lem_duration
        first = slot_start // d * d
        states = [self.grid_state(s) for s in range(first, slot_start + duration, d)]
        return max(states, key=SEVERITY.__getitem__)

    def defaults(self, state: GridState) -> LemParams | None:
        return self._defaults.get(state)

    def lem(self, start: int) -> Lem:
        found = self._lems.get(start)
        if found is None:
            raise MarketError("not_found", f"no LEM for the slot starting at {start}")
        return found

    def is_solved(self, lem_start: int) -> bool:
        return lem_start in self._results

    def results(self, lem_start: int) -> list[LemResultRecord]:
        return list(self._results.get(lem_start, {}).values())

    def measurement(self, lem_start: int, participant: str) -> Measurement | None:
        return self._measures.get(lem_start, {}).get(participant)

    def pending(self, start: int, end: int, now: int) -> list[Lem]:
        """Unsolved LEMs inside [start, end] whose slot has ended by `now`, by start."""
        return [
            lem
            for s, lem in sorted(self._lems.items())
            if s >= start and lem.end <= end and lem.end <= now and s not in self._results
        ]

    def first_unsolved_end(self) -> int | None:
        """The earliest end of an unsolved LEM (None: every LEM is solved)."""
        return min((lem.end for s, lem in self._lems.items() if s not in self._results), default=None)

    def due_slas(self, boundary: int) -> list[str]:
        """The unchecked SLAs the periodic checker takes at `boundary`: those that ended by
        `boundary - sla_grace`, by end then id."""
        until = boundary - self.config.sla_grace
        due = [s for s in self._slas.values() if s.end <= until and s.id not in self._sla_results]
        return [s.id for s in sorted(due, key=lambda s: (s.end, s.id))]

    def balances(self, participant: str | None = None) -> dict[str, int]:
        """Every account (None), or one participant's alone (0 if it has none yet)."""
        if participant is not None:
            return {participant: self._accounts.get(participant, 0)}
        return dict(sorted(self._accounts.items()))

    def transfers(self) -> list[TokenTransfer]:
        return list(self._transfers.values())

    def sla(self, sla_id: str) -> Sla:
        found = self._slas.get(sla_id)
        if found is None:
            raise MarketError("not_found", f"unknown SLA {sla_id!r}")
        return found

    # -- actions: each returns a Change and mutates nothing ---------------------------------

    def set_grid_state(self, dso: str, msg: GridStateSetMsg, now: int) -> Change:
        start, end = self._lem_slot(msg.time_delivery)
        if now >= start:
            raise MarketError("closed", f"the slot starting at {start} has started (market time {now})")
        revision = self._grid_rev.get(start, 0)
        record = GridStateRecord(
            id=f"g{start}.{revision}",
            time_delivery_start=start,
            time_delivery_end=end,
            state=msg.state,
            revision=revision,
            dso_id=dso,
            time_creation=now,
        )
        return Change((record,), {"grid_state": {"time_delivery": [start, end], "state": msg.state}})

    def set_defaults(self, operator: str, msg: LemDefaultsSetMsg, now: int) -> Change:
        revision = self._defaults_rev.get(msg.grid_state, 0)
        p = msg.params()
        record = LemDefaultsRecord(
            id=f"d.{msg.grid_state}.{revision}",
            grid_state=msg.grid_state,
            revision=revision,
            pb_bau=p.pb_bau,
            ps_bau=p.ps_bau,
            pb_p2p=p.pb_p2p,
            ps_p2p=p.ps_p2p,
            beta=p.beta,
            operator_id=operator,
            time_creation=now,
        )
        return Change((record,), {"defaults": {"grid_state": msg.grid_state, **p.wire()}})

    def set_lem(self, aggregator: str, msg: LemSetMsg, now: int) -> Change:
        start, end = self._lem_slot(msg.time_delivery)
        if now >= end:
            raise MarketError("closed", f"the slot starting at {start} has ended (market time {now})")
        if start in self._lems:
            raise MarketError("conflict", f"a LEM for the slot starting at {start} is already set")
        if len(self._lems) >= self.config.max_lems:
            raise MarketError("too_large", f"at most {self.config.max_lems} LEMs")
        self._check_players(msg.players, LEM_PLAYER_ROLES)
        lem = Lem(start, end, aggregator, tuple(msg.players), msg.params)
        record = LemRecord(
            id=f"lem{start}",
            time_delivery_start=start,
            time_delivery_end=end,
            aggregator_id=aggregator,
            players=msgspec.json.encode(list(msg.players)).decode(),
            params=msgspec.json.encode(msg.params.wire()).decode() if msg.params is not None else None,
            time_creation=now,
        )
        return Change((record,), {"lem": lem.wire()})

    def measure(self, participant: str, msg: LemMeasureMsg, now: int) -> Change:
        start, end = self._lem_slot(msg.time_delivery)
        lem = self.lem(start)
        if participant not in lem.players:
            raise MarketError("forbidden", f"{participant} is not a player of the LEM starting at {start}")
        if start in self._results:
            raise MarketError("closed", f"the LEM starting at {start} is already solved")
        if now < end:
            raise MarketError("invalid", f"the LEM slot ends at {end}: measure it after (market time {now})")
        if self.measurement(start, participant) is not None:
            raise MarketError("conflict", f"{participant} already saved its measurement of the LEM starting at {start}")
        record = LemMeasureRecord(
            id=f"lm{start}/{participant}",
            time_delivery_start=start,
            time_delivery_end=end,
            participant_id=participant,
            consumption=msg.consumption,
            production=msg.production,
            time_creation=now,
        )
        return Change((record,), {})

    def solve(
        self,
        start: int,
        end: int,
        now: int,
        fallback: Mapping[int, Mapping[str, Measurement]] | None = None,
        auction: Mapping[int, Mapping[str, int]] | None = None,
    ) -> Change:
        """Solve every unsolved LEM inside [start, end] whose slot has ended by `now`.

        A player's energies are its own measurement, else its meter readings (`fallback`,
        see `measurements_from_meters`), else 0 and 0. `auction`: what the auction's
        transactions moved per LEM slot and player (`auction_money`), netted out of the LEM
        amount so that each kWh is paid once, at the LEM's price (RED: the auction's)."""
        if start > end:
            raise MarketError("invalid", f"start {start} is after end {end}")
        lems = self.pending(start, end, now)
        if not lems:
            return Change((), {"balances": {}, "transfers": [], "lems": []})
        solve_id = f"s{lems[0].start}-{lems[-1].end}"
        records: list[Record] = []
        totals: dict[tuple[str, str], int] = {}  # (aggregator, player) -> micro
        balances: dict[str, int] = {}
        lem_replies = []
        for lem in lems:
            rows, source = self._solve_one(
                lem, solve_id, now, (fallback or {}).get(lem.start, {}), (auction or {}).get(lem.start, {})
            )
            records += rows
            for row in rows:
                key = (lem.aggregator, row.participant_id)
                totals[key] = totals.get(key, 0) + row.amount
                balances[row.participant_id] = balances.get(row.participant_id, 0) + row.amount
            lem_replies.append(
                {
                    "time_delivery": [lem.start, lem.end],
                    "grid_state": rows[0].grid_state,
                    "skipped": rows[0].skipped,
                    "p_buy": rows[0].p_buy,
                    "p_sell": rows[0].p_sell,
                    "params": source,
                    "balances": {r.participant_id: r.amount for r in rows},
                }
            )
        span = (lems[0].start, lems[-1].end)
        transfers = [
            t
            for (aggregator, player), total in sorted(totals.items())
            if (t := _lem_transfer(solve_id, aggregator, player, total, span, now)) is not None
        ]
        records += transfers
        reply = {
            "balances": balances,
            "transfers": [transfer_wire(t) for t in transfers],
            "lems": lem_replies,
        }
        return Change(tuple(records), reply)

    def _solve_one(
        self,
        lem: Lem,
        solve_id: str,
        now: int,
        fallback: Mapping[str, Measurement],
        auction: Mapping[str, int],
    ) -> tuple[list[LemResultRecord], ParamsSource]:
        """The LEM's result rows, and whose parameters priced it: the aggregator's own
        (`lem`: GREEN only), the operator's defaults of the grid state, or none (RED)."""
        state = self.grid_state(lem.start)
        measures: dict[str, Measurement] = {}
        measured: dict[str, Measured] = {}
        own = self._measures.get(lem.start, {})
        for p in lem.players:
            if p in own:
                measures[p], measured[p] = own[p], "prosumer"
            elif p in fallback:
                measures[p], measured[p] = fallback[p], "meter"
            else:
                measures[p], measured[p] = Measurement(0, 0), "none"
        skipped = state == "RED"
        # The aggregator's own parameters refine a GREEN market only (as the reference): in
        # YELLOW the operator's YELLOW defaults apply, the DSO's congestion price included.
        own_params = lem.params if state == "GREEN" else None
        params = own_params or self._defaults.get(state)
        source: ParamsSource = "none" if skipped else "lem" if own_params is not None else "defaults"
        if params is None and not skipped:
            raise MarketError("unavailable", f"no LEM parameters for grid state {state} (lem.defaults.set)")
        if skipped or params is None:
            # RED: business as usual with the grid; nothing moves on the token ledger.
            total_c = sum(m.consumption for m in measures.values())
            total_p = sum(m.production for m in measures.values())
            bau = params or LemParams(0.0, 0.0, 0.0, 0.0, 0.0)
            solution = LemSolution(bau.pb_bau / 100, bau.ps_bau / 100, total_c, total_p, dict.fromkeys(lem.players, 0))
            beta = bau.beta
        else:
            solution = solve_lem(params, lem.players, measures)
            beta = params.beta
        rows = [
            LemResultRecord(
                id=f"lr{lem.start}/{p}",
                solve_id=solve_id,
                time_delivery_start=lem.start,
                time_delivery_end=lem.end,
                participant_id=p,
                aggregator_id=lem.aggregator,
                grid_state=state,
                skipped=skipped,
                consumption=measures[p].consumption,
                production=measures[p].production,
                measured=measured[p],
                total_consumption=solution.total_consumption,
                total_production=solution.total_production,
                p_buy=solution.p_buy,
                p_sell=solution.p_sell,
                beta=beta,
                # The auction settled its share in money already: tokens move the rest of
                # the LEM's price (RED: none, the auction's settlement stands).
                amount=0 if skipped else solution.amounts[p] - auction.get(p, 0),
                time_creation=now,
                auction=auction.get(p, 0),
            )
            for p in lem.players
        ]
        return rows, source

    def set_sla(self, aggregator: str, msg: SlaSetMsg, now: int) -> Change:
        if msg.start >= msg.end:
            raise MarketError("invalid", f"start {msg.start} must be before end {msg.end}")
        if msg.start <= now:
            raise MarketError(
                "invalid",
                f"start {msg.start} must be after the market time {now}: an SLA is set before its period starts",
            )
        if msg.id in self._slas:
            raise MarketError("conflict", f"SLA {msg.id!r} is already set")
        if len(self._slas) >= self.config.max_slas:
            raise MarketError("too_large", f"at most {self.config.max_slas} SLAs")
        seen: set[str] = set()
        for k in msg.kpis:
            if k.id in seen:
                raise MarketError("invalid", f"KPI id {k.id!r} appears twice")
            seen.add(k.id)
            if (msg.end - msg.start) % k.resolution:
                raise MarketError("invalid", f"KPI {k.id!r}: resolution {k.resolution} does not divide the SLA period")
            self._check_players(k.players, KPI_PLAYER_ROLES)
        sla = Sla(
            msg.id,
            aggregator,
            msg.start,
            msg.end,
            tuple(Kpi(k.id, k.signal, k.rule, k.limit, k.penalty, tuple(k.players), k.resolution) for k in msg.kpis),
        )
        record = SlaRecord(
            id=sla.id,
            aggregator_id=aggregator,
            start=sla.start,
            end=sla.end,
            kpis=msgspec.json.encode([k.wire() for k in sla.kpis]).decode(),
            time_creation=now,
        )
        return Change((record,), {"sla": sla.wire()})

    def measure_kpi(self, participant: str, msg: KpiMeasureMsg, now: int) -> Change:
        sla = self.sla(msg.sla)
        kpi = sla.kpi(msg.kpi)
        if participant not in kpi.players:
            raise MarketError("forbidden", f"{participant} is not a player of KPI {kpi.id!r}")
        start, end = msg.time_interval
        if end - start != kpi.resolution or (start - sla.start) % kpi.resolution or start < sla.start or end > sla.end:
            raise MarketError(
                "invalid",
                f"time_interval {[start, end]} is not a {kpi.resolution} s period of SLA {sla.id!r} "
                f"[{sla.start}, {sla.end}]",
            )
        if sla.id in self._sla_results:
            raise MarketError("closed", f"SLA {sla.id!r} is already checked")
        if end > now:
            raise MarketError(
                "invalid",
                f"time_interval {[start, end]} ends after the market time {now}: "
                f"a KPI value is saved once its period has ended",
            )
        key = (sla.id, kpi.id, participant, start)
        if key in self._kpi_values:
            raise MarketError("conflict", f"{participant} already saved KPI {kpi.id!r} for {[start, end]}")
        if len(self._kpi_values) >= self.config.max_kpi_values:
            raise MarketError("too_large", f"at most {self.config.max_kpi_values} KPI values")
        record = KpiValueRecord(
            id=f"kv/{sla.id}/{kpi.id}/{participant}/{start}",
            sla_id=sla.id,
            kpi_id=kpi.id,
            participant_id=participant,
            time_interval_start=start,
            time_interval_end=end,
            value=msg.value,
            time_creation=now,
        )
        return Change((record,), {})

    def solve_sla(self, by: str, sla_id: str, now: int) -> Change:
        """The SLA's penalties, applied once: checking it again replies the same penalties
        with `"duplicate": true` and produces no record."""
        sla = self.sla(sla_id)
        if sla.id in self._sla_results:
            return Change((), {"penalties": self.penalties(sla.id), "duplicate": True})
        if now < sla.end:
            raise MarketError("invalid", f"SLA {sla.id!r} ends at {sla.end}: check it after (market time {now})")
        transfers: list[TokenTransfer] = []
        for kpi in sla.kpis:
            for player in kpi.players:
                for start in range(sla.start, sla.end, kpi.resolution):
                    value = self._kpi_values.get((sla.id, kpi.id, player, start))
                    if value is None or not kpi.broken(value):
                        continue
                    transfers.append(
                        TokenTransfer(
                            id=f"p/{sla.id}/{kpi.id}/{player}/{start}",
                            kind="sla_penalty",
                            payer_id=player,
                            payee_id=sla.aggregator,
                            amount=kpi.penalty,
                            reference=sla.id,
                            kpi_id=kpi.id,
                            time_start=start,
                            time_end=start + kpi.resolution,
                            time_creation=now,
                        )
                    )
        result = SlaResultRecord(
            id=sla.id,
            penalties=len(transfers),
            amount=sum(t.amount for t in transfers),
            solved_by=by,
            time_creation=now,
        )
        return Change((*transfers, result), {"penalties": [penalty_wire(t) for t in transfers]})

    def penalties(self, sla_id: str) -> list[dict[str, Any]]:
        """The SLA's penalties in the order checking made them: KPI, player, period."""
        found = self._penalties.get(sla_id, [])
        if not found:
            return []
        sla = self.sla(sla_id)
        rank = {(k.id, p): (i, j) for i, k in enumerate(sla.kpis) for j, p in enumerate(k.players)}
        ordered = sorted(found, key=lambda t: (rank.get((t.kpi_id or "", t.payer_id), (0, 0)), t.time_start))
        return [penalty_wire(t) for t in ordered]

    # -- checks ----------------------------------------------------------------------------

    def _lem_slot(self, interval: Interval) -> tuple[int, int]:
        if not is_aligned(interval, self.config.lem_duration):
            raise MarketError(
                "invalid", f"time_delivery {list(interval)} is not an aligned {self.config.lem_duration} s LEM slot"
            )
        return interval

    def _check_players(self, players: Sequence[str], roles: frozenset[str]) -> None:
        if len(set(players)) != len(players):
            raise MarketError("invalid", "a player appears twice")
        if self._role_of is None:
            return
        for p in players:
            got = self._role_of(p)
            held = {got} if isinstance(got, str) else set(got or ())
            if held.isdisjoint(roles):
                raise MarketError("invalid", f"player {p!r} is not a registered {' or '.join(sorted(roles))}")

    # -- state changes ---------------------------------------------------------------------

    def apply(self, records: Iterable[Record]) -> None:
        """Make durable records part of the state (after `sink.write`); other kinds are ignored."""
        for r in records:
            fn = self._apply.get(type(r))
            if fn is not None:
                fn(r)

    def restore(self, records: Iterable[Record]) -> None:
        """Rebuild the state from the ledger's records of these kinds (any order)."""
        rank = {cls: i for i, cls in enumerate(_RESTORE_ORDER)}
        ordered = sorted(
            (r for r in records if type(r) in rank),
            key=lambda r: (rank[type(r)], getattr(r, "revision", 0)),
        )
        self.apply(ordered)

    def _apply_grid_state(self, r: GridStateRecord) -> None:
        self._grid[r.time_delivery_start] = r.state
        self._grid_rev[r.time_delivery_start] = max(self._grid_rev.get(r.time_delivery_start, 0), r.revision + 1)

    def _apply_defaults(self, r: LemDefaultsRecord) -> None:
        self._defaults[r.grid_state] = LemParams(r.pb_bau, r.ps_bau, r.pb_p2p, r.ps_p2p, r.beta)
        self._defaults_rev[r.grid_state] = max(self._defaults_rev.get(r.grid_state, 0), r.revision + 1)

    def _apply_lem(self, r: LemRecord) -> None:
        params = msgspec.json.decode(r.params, type=LemParams) if r.params is not None else None
        players = tuple(msgspec.json.decode(r.players, type=list[str]))
        self._lems[r.time_delivery_start] = Lem(
            r.time_delivery_start, r.time_delivery_end, r.aggregator_id, players, params
        )

    def _apply_measure(self, r: LemMeasureRecord) -> None:
        self._measures.setdefault(r.time_delivery_start, {})[r.participant_id] = Measurement(
            r.consumption, r.production
        )

    def _apply_result(self, r: LemResultRecord) -> None:
        self._results.setdefault(r.time_delivery_start, {})[r.participant_id] = r

    def _apply_transfer(self, t: TokenTransfer) -> None:
        if t.id in self._transfers:
            return  # already counted (a replayed record)
        self._transfers[t.id] = t
        self._accounts[t.payer_id] = self._accounts.get(t.payer_id, 0) - t.amount
        self._accounts[t.payee_id] = self._accounts.get(t.payee_id, 0) + t.amount
        if t.kind == "sla_penalty":
            self._penalties.setdefault(t.reference, []).append(t)

    def _apply_sla(self, r: SlaRecord) -> None:
        kpis = msgspec.json.decode(r.kpis, type=list[KpiMsg])
        self._slas[r.id] = Sla(
            r.id,
            r.aggregator_id,
            r.start,
            r.end,
            tuple(Kpi(k.id, k.signal, k.rule, k.limit, k.penalty, tuple(k.players), k.resolution) for k in kpis),
        )

    def _apply_kpi_value(self, r: KpiValueRecord) -> None:
        self._kpi_values[(r.sla_id, r.kpi_id, r.participant_id, r.time_interval_start)] = r.value

    def _apply_sla_result(self, r: SlaResultRecord) -> None:
        self._sla_results[r.id] = r

    def snapshot(self) -> dict[str, Any]:
        """Every piece of state as plain data, in a canonical order (tests compare it to show
        that nothing changed, or that a restore rebuilt the same state)."""
        state: dict[str, Any] = msgspec.to_builtins(
            {
                "defaults": sorted(self._defaults.items()),
                "defaults_rev": sorted(self._defaults_rev.items()),
                "grid": sorted(self._grid.items()),
                "grid_rev": sorted(self._grid_rev.items()),
                "lems": [lem for _, lem in sorted(self._lems.items())],
                "measures": [[s, sorted(m.items())] for s, m in sorted(self._measures.items())],
                "results": [[s, sorted(r.items())] for s, r in sorted(self._results.items())],
                "accounts": sorted(self._accounts.items()),
                "transfers": sorted(self._transfers.items()),
                "slas": sorted(self._slas.items()),
                "kpi_values": sorted([*k, v] for k, v in self._kpi_values.items()),
                "sla_results": sorted(self._sla_results.items()),
                "penalties": {s: self.penalties(s) for s in sorted(self._penalties)},
            }
        )
        return state


def _lem_transfer(
    solve_id: str, aggregator: str, player: str, total: int, span: tuple[int, int], now: int
) -> TokenTransfer | None:
    if total == 0 or player == aggregator:
        return None
    payer, payee = (player, aggregator) if total < 0 else (aggregator, player)
    return TokenTransfer(
        id=f"t/{solve_id}/{payer}/{payee}",
        kind="lem",
        payer_id=payer,
        payee_id=payee,
        amount=abs(total),
        reference=solve_id,
        kpi_id=None,
        time_start=span[0],
        time_end=span[1],
        time_creation=now,
    )


def transfer_wire(t: TokenTransfer) -> dict[str, Any]:
    return {
        "id": t.id,
        "kind": t.kind,
        "from": t.payer_id,
        "to": t.payee_id,
        "amount": t.amount,
        "reference": t.reference,
        "time_interval": [t.time_start, t.time_end],
    }


def penalty_wire(t: TokenTransfer) -> dict[str, Any]:
    return {"player": t.payer_id, "kpi": t.kpi_id, "time_interval": [t.time_start, t.time_end], "amount": t.amount}
