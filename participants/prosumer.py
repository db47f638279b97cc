"""The prosumer's decisions, without I/O: meter readings, orders, commitments and its bill.

`ParticipantClient` is a thin socket shell around this class; everything here is
deterministic given (spec, seed) and the sequence of server payloads.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from market.core.records import Record, amount
from participants.devices import Battery, Commitment, meter_reading, split_own_use
from participants.messages import Delivery, MarketInfo, Settled, StartRound, parse
from participants.profiles import SiteProfiles, build_profiles
from participants.spec import ParticipantSpec
from participants.synthetic import generator, seeded, stable_key
from participants.traders import Observation, Order, draws, trader_for

KEEP_SLOTS = 96  # how many slots back prices, pending bills and deliveries are remembered
FLOWS_KEPT = 2 * KEEP_SLOTS  # metered flows kept for measurements saved after a LEM or KPI period
P2P_KINDS = ("p2p", "bess_compensation")
# Handed to traders that never draw (`traders.draws`), instead of a generator seeded per call.
_UNUSED_RNG = np.random.default_rng(0)


class Stats(msgspec.Struct):
    """Counters and the bill of one participant. Money is integer micro-currency."""

    rounds: int = 0
    meters: int = 0  # readings produced
    orders: int = 0  # orders produced
    accepted: int = 0  # orders the server accepted
    rejected: int = 0  # orders the server refused
    errors: int = 0  # refused or unanswered events, bad payloads
    fills: int = 0  # `settled` events
    bought_wh: int = 0  # settled P2P purchases
    sold_wh: int = 0  # settled P2P sales
    delivered: int = 0  # slots with a `delivery`
    paid: int = 0  # sum of amount_buy where this participant is the buyer
    received: int = 0  # sum of amount_sell where it is the seller
    p2p_bought_wh: int = 0  # delivered p2p / bess_compensation energy
    p2p_sold_wh: int = 0
    grid_bought_wh: int = 0
    grid_sold_wh: int = 0
    compared: int = 0  # delivered slots with a grid-only counterfactual
    grid_only_paid: int = 0  # residual load imported at the grid buy price
    grid_only_received: int = 0  # residual generation exported at the grid sell price

    @property
    def cost(self) -> int:
        return self.paid - self.received

    @property
    def grid_only_cost(self) -> int:
        return self.grid_only_paid - self.grid_only_received

    @property
    def savings(self) -> int:
        """What the market saved against grid only (positive: the market was cheaper)."""
        return self.grid_only_cost - self.cost


class _Facts(msgspec.Struct, frozen=True):
    """What every prosumer reads off one `start_round`."""

    prices: dict[int, tuple[float, float]]  # slot start -> (grid buy, grid sell)
    buy_mean: float | None  # mean grid buy price over the announced slots
    next_info: MarketInfo | None  # the market information of `next_settle`


# (message, its facts), replaced whole (one reference: safe to read from any thread).
_last_facts: tuple[StartRound | None, _Facts | None] = (None, None)


def facts_of(msg: StartRound) -> _Facts:
    """The facts of `msg`, computed once per message object (the in-process market hands
    every prosumer the same one; over sockets each client has its own)."""
    global _last_facts
    seen, known = _last_facts
    if seen is msg and known is not None:
        return known
    prices = {i.time_delivery[0]: (i.grid.buy_price, i.grid.sell_price) for i in msg.market_info if i.grid is not None}
    buys = [i.grid.buy_price for i in msg.market_info if i.grid is not None]
    info = next((i for i in msg.market_info if i.time_delivery == msg.next_settle), None)
    facts = _Facts(prices, sum(buys) / len(buys) if buys else None, info)
    _last_facts = (msg, facts)
    return facts


@functools.lru_cache(maxsize=1 << 15)  # pure: an environment's episodes replay the same slots
def forecast_wh(seed: int, key: int, start: int, source: str, error: float, wh: int) -> int:
    """What a forecast off by `error` expects of `wh` (a source's energy in the slot at
    `start`): drawn per (seed, participant key, slot, source), so always the same."""
    return off_by(wh, error, float(generator(seed % 2**64, key, start, stable_key(source)).standard_normal()))


def off_by(wh: int, error: float, z: float) -> int:
    """A forecast of `wh` that errs by `error` times the normal draw `z` (never negative)."""
    return max(0, round(wh * (1 + error * z)))


def forecast_normals(seed: int, keys: np.ndarray, sources: np.ndarray, starts: np.ndarray) -> list[float]:
    """`forecast_wh`'s normal draw of each row (participant key, `stable_key` of the source,
    slot start: arrays of ints below 2**32), the generators seeded together (`seeded`)."""
    return [float(rng.standard_normal()) for rng in seeded(seed % 2**64, keys, starts, sources)]


class Prosumer:
    """One participant's state: spec, profiles, battery, commitments per slot, bill."""

    def __init__(
        self,
        spec: ParticipantSpec,
        seed: int = 0,
        *,
        timezone: str = "UTC",
        base_dir: str | Path | None = None,
    ) -> None:
        self.spec = spec
        self.seed = seed
        self.base_dir = base_dir
        self.timezone = timezone
        self.profiles: SiteProfiles = build_profiles(spec, seed, timezone, base_dir)
        self.trader = trader_for(spec.trader)
        self._draws = draws(self.trader)
        self.stats = Stats()
        self._key = stable_key(spec.id)
        # Sources whose forecast is off, with their relative error (participants/spec.py).
        self._forecast_errors = {
            src: g.forecast_error
            for src, g in (("solar", spec.pv), ("wind", spec.wind))
            if g is not None and g.forecast_error > 0
        }
        self._restart()

    def _restart(self) -> None:
        """Forget the run (a reset of the market moved time backwards)."""
        spec = self.spec.battery
        self.battery: Battery | None = Battery.from_spec(spec) if spec else None
        self.commitments: dict[int, Commitment] = {}
        self._fills: dict[int, set[tuple[str, str]]] = {}
        self._prices: dict[int, tuple[float, float]] = {}  # slot start -> (buy, sell)
        self._pending: dict[int, tuple[int, int]] = {}  # slot start -> grid-only (paid, received)
        self._delivered: set[int] = set()
        self._energy: dict[tuple[int, int], tuple[dict[str, int], int]] = {}
        # Min-heaps of what the tables above hold, so `_forget` touches only expired slots:
        # the slot starts in commitments/_fills/_prices/_pending/_delivered (each once, see
        # `_kept`) and the keys of `_energy`.
        self._starts: list[int] = []
        self._kept: set[int] = set()
        self._energy_keys: list[tuple[int, int]] = []
        self._time: int | None = None
        self._metered = -1  # start of the last slot metered
        # slot start -> (Wh imported, Wh exported) at the grid connection, as metered: what the
        # Parity agents save as this site's measurements (participants/parity_agents.py).
        self.flows: dict[int, tuple[int, int]] = {}
        self._traded = -1  # start of the last slot traded

    # -- rounds --------------------------------------------------------------------------

    def on_round(self, payload: Any) -> tuple[dict[str, Any] | None, list[Order]]:
        """Handle `start_round`: the meter reading to send (None if that slot was already
        metered) and the orders for `next_settle` (possibly empty)."""
        return self.on_round_msg(parse(payload, StartRound))

    def on_round_msg(self, msg: StartRound, *, trade: bool = True) -> tuple[dict[str, Any] | None, list[Order]]:
        """`on_round` of a decoded payload; `trade=False` meters and remembers the prices but
        leaves `next_settle` to the caller (a participant driven from outside: `observe`)."""
        if msg.timezone != self.timezone:
            self.timezone = msg.timezone
            self.profiles = build_profiles(self.spec, self.seed, msg.timezone, self.base_dir)
            self._energy.clear()
            self._energy_keys.clear()
        if self._time is not None and msg.time < self._time:
            self._restart()
        self._time = msg.time
        self.stats.rounds += 1
        facts = facts_of(msg)
        self._prices.update(facts.prices)
        for start in sorted(facts.prices.keys() - self._kept):
            self._keep(start)

        # sim: the current slot is simulated at once; rt: the slot that just ended.
        slot = msg.current_round if msg.mode == "sim" else msg.last_round
        meter = None
        if slot is not None and slot[0] > self._metered:
            meter = self._meter(slot)
        orders: list[Order] = []
        if trade and msg.next_settle[0] > self._traded:
            self._traded = msg.next_settle[0]
            orders = self._trade(msg)
        self._forget(msg.current_round)
        return meter, orders

    def warm(self, slots: Iterable[tuple[int, int]]) -> None:
        """Compute the energy of `slots` ahead (it is memoized, with the day of profiles it
        builds), so the rounds that meter or trade them do not pay for it."""
        for slot in slots:
            self.energy(slot)

    def energy(self, slot: tuple[int, int]) -> tuple[dict[str, int], int]:
        """(generation per source, load) of a slot; memoized because each slot is forecast
        when traded and computed again when metered."""
        hit = self._energy.get(slot)
        if hit is None:
            hit = self._energy[slot] = self.profiles.slot(slot)
            heapq.heappush(self._energy_keys, slot)
        return hit

    def forecast(self, slot: tuple[int, int]) -> tuple[dict[str, int], int]:
        """(generation per source, load) of a slot as the trader expects it: `energy` with
        each source that has a `forecast_error` off by it, seeded per (seed, participant,
        source, slot) so the same slot always gets the same forecast; the load is exact."""
        gen, load = self.energy(slot)
        if not self._forecast_errors:
            return gen, load
        out = dict(gen)
        for src, error in sorted(self._forecast_errors.items()):
            if out.get(src):
                out[src] = forecast_wh(self.seed, self._key, slot[0], src, error, out[src])
        return out, load

    def _meter(self, slot: tuple[int, int]) -> dict[str, Any]:
        gen, load = self.energy(slot)
        plan = self.commitments.get(slot[0], Commitment()).plan()
        meter, self.battery = meter_reading(load, gen, self.battery, plan, slot)
        self._metered = slot[0]
        self.flows[slot[0]] = (meter["consumption"]["other"]["external"], sum(meter["generation"].values()))
        if len(self.flows) > FLOWS_KEPT:
            del self.flows[next(iter(self.flows))]  # the oldest: slots are metered in order
        self.stats.meters += 1
        prices = self._prices.get(slot[0])
        if prices is not None:
            # Grid only: same site without market or battery; self-use stays free.
            _, surplus, deficit = split_own_use(load, gen)
            self._pending[slot[0]] = (
                amount(deficit, prices[0]),
                amount(sum(surplus.values()), prices[1]),
            )
            self._keep(slot[0])
        return meter

    def _trade(self, msg: StartRound) -> list[Order]:
        obs = self.observe(msg)
        # A generator per (seed, participant, slot): orders never depend on call history.
        # Seeding one costs more than most traders, so only those that draw get their own.
        rng = _UNUSED_RNG
        if self._draws:
            rng = generator(self.seed % 2**64, self._key, obs.next_settle[0])
        orders = self.trader(obs, rng)
        self.stats.orders += len(orders)
        return orders

    def observe(self, msg: StartRound) -> Observation:
        """What the trader knows when it trades `msg.next_settle` (after this round's reading)."""
        slot = msg.next_settle
        gen, load = self.forecast(slot)
        facts = facts_of(msg)
        info = facts.next_info
        prices = self._prices.get(slot[0])
        obs = Observation(
            next_settle=slot,
            generation=gen,
            load=load,
            grid_buy=prices[0] if prices else None,
            grid_sell=prices[1] if prices else None,
            grid_buy_mean=facts.buy_mean,
            grid_state=info.grid_state if info else "GREEN",
            battery=self.battery,
            committed=self.commitments.get(slot[0], Commitment()),
            trader=self.spec.trader,
        )
        return obs

    def _keep(self, start: int) -> None:
        """Note that a per-slot table holds `start`, for `_forget`."""
        if start not in self._kept:
            self._kept.add(start)
            heapq.heappush(self._starts, start)

    def _forget(self, current: tuple[int, int]) -> None:
        """Bound the per-slot memory: drop slots far enough in the past (every slot start
        before the horizon, from every table; the heaps make it cost only what expires)."""
        duration = current[1] - current[0]
        horizon = current[0] - KEEP_SLOTS * duration
        starts = self._starts
        while starts and starts[0] < horizon:
            start = heapq.heappop(starts)
            self._kept.discard(start)
            self.commitments.pop(start, None)
            self._fills.pop(start, None)
            self._prices.pop(start, None)
            self._pending.pop(start, None)
            self._delivered.discard(start)
        keys = self._energy_keys
        while keys and keys[0][0] < current[0] - duration:
            self._energy.pop(heapq.heappop(keys), None)

    def take_records(self) -> list[Record]:
        """Ledger rows this site made since the last call (a PEM site's houses); none here."""
        return []

    # -- settlements and deliveries ------------------------------------------------------

    def on_settled(self, payload: Any) -> None:
        """Record a fill as a commitment of its slot (it steers the battery at metering)."""
        self.on_settled_msg(parse(payload, Settled))

    def on_settled_msg(self, fill: Settled) -> None:
        """`on_settled` of a decoded payload (a fleet decodes its batch at once)."""
        start = fill.time_delivery[0]
        self._keep(start)
        if fill.commit_id is not None:
            seen = self._fills.setdefault(start, set())
            if (fill.commit_id, fill.side) in seen:
                return
            seen.add((fill.commit_id, fill.side))
        c = self.commitments.setdefault(start, Commitment())
        self.stats.fills += 1
        if fill.side == "bid":
            c.bought += fill.quantity
            self.stats.bought_wh += fill.quantity
        else:
            src = fill.source or "bess"
            c.sold[src] = c.sold.get(src, 0) + fill.quantity
            self.stats.sold_wh += fill.quantity

    def on_delivery(self, payload: Any) -> None:
        """Add a delivered slot's ledger rows to the bill (once per slot)."""
        self.on_delivery_msg(parse(payload, Delivery))

    def on_delivery_msg(self, d: Delivery) -> None:
        """`on_delivery` of a decoded payload."""
        start = d.time_delivery[0]
        if start in self._delivered:
            return
        self._delivered.add(start)
        self._keep(start)
        me, s = self.spec.id, self.stats
        s.delivered += 1
        for tx in d.transactions:
            if tx.buyer_id == me:
                s.paid += tx.amount_buy
                if tx.kind in P2P_KINDS:
                    s.p2p_bought_wh += tx.quantity
                elif tx.kind == "grid_buy":
                    s.grid_bought_wh += tx.quantity
            if tx.seller_id == me:
                s.received += tx.amount_sell
                if tx.kind in P2P_KINDS:
                    s.p2p_sold_wh += tx.quantity
                elif tx.kind == "grid_sell":
                    s.grid_sold_wh += tx.quantity
        counterfactual = self._pending.pop(start, None)
        if counterfactual is not None:
            s.compared += 1
            s.grid_only_paid += counterfactual[0]
            s.grid_only_received += counterfactual[1]
