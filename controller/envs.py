"""Research environments on the in-process market (docs/rl.md).

- `ProsumerEnv`: Gymnasium, registered as `microte/Prosumer-v0`: one prosumer of a
  scenario is the agent, the others run their scenario traders.
- `parallel_env(...)`: PettingZoo `ParallelEnv`, every prosumer an agent.

One step is one market round of `controller.inproc.InprocMarket`: the same engine, devices,
profiles and traders as `microte sim`. An agent's orders are placed for the round's
`next_settle`; its reward is minus the money it paid for the slot delivered in that step.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import gymnasium
import msgspec
import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from controller import runloop
from controller.inproc import InprocMarket
from controller.scenario import Scenario, community, load_scenario
from market.core.protocol import MAX_ORDERS, MAX_QUANTITY, PRICE_LIMIT, EntryMsg, Side
from market.core.records import Record
from participants.devices import split_own_use
from participants.messages import StartRound
from participants.population import Population, inside_all, max_input_all, plain, split_all
from participants.prosumer import Prosumer, facts_of
from participants.traders import Observation, Order, inside

ENV_ID = "microte/Prosumer-v0"
GRID_STATES = {"GREEN": 0.0, "YELLOW": 0.5, "RED": 1.0}
OBS_FIELDS = (
    "grid_buy",  # currency/kWh the agent would pay the grid in next_settle
    "grid_sell",  # ... and receive
    "grid_state",  # of next_settle: GREEN 0, YELLOW 0.5, RED 1
    "load_kwh",  # forecast of next_settle
    "generation_kwh",  # forecast, all sources
    "soc",  # battery state of charge, fraction (0 without a battery)
    "bought_kwh",  # fills announced this round (any slot): bought
    "sold_kwh",  # ... and sold
    "paid",  # the last delivered slot: net money paid (currency; negative: earned)
    "p2p_kwh",  # ... P2P energy bought plus sold
    "grid_kwh",  # ... grid energy bought plus sold
    "hour_sin",  # local time of day of next_settle
    "hour_cos",
)
ACT_FIELDS = ("bid_price", "bid_quantity", "ask_price", "ask_quantity")


# Wide finite bounds (prices in currency/kWh, energies in kWh per slot, money per slot).
OBS_BOUND = 1e6


def observation_space() -> spaces.Box:
    return spaces.Box(-OBS_BOUND, OBS_BOUND, shape=(len(OBS_FIELDS),), dtype=np.float32)


def action_space() -> spaces.Box:
    """Each in [0, 1]: prices as a fraction of the grid band (sell price 0, buy price 1),
    quantities as a fraction of what the agent could buy or sell (see `orders_of`)."""
    return spaces.Box(0.0, 1.0, shape=(len(ACT_FIELDS),), dtype=np.float32)


def orders_of(obs: Observation, action: np.ndarray) -> list[Order]:
    """An action as PROTOCOL.md orders for `obs.next_settle` (ids `<slot>-a<n>`).

    bid quantity = action[1] * (forecast load not covered by own generation, minus what is
    already bought, plus what the battery can take); ask quantity = action[3] * (forecast
    surplus per source not yet sold, plus the battery's energy above empty), asked source by
    source (solar, wind, then bess). Prices: grid sell + action * (grid buy - grid sell),
    kept strictly inside the band; nothing is ordered when the band is unknown."""
    low, high = obs.grid_sell, obs.grid_buy
    if low is None or high is None or high <= low:
        return []
    a = _unit(action)
    _, surplus, deficit = split_own_use(obs.load, obs.generation)
    b = obs.battery
    limit = b.limit(obs.duration) if b is not None else 0
    can_buy = max(0, deficit - obs.committed.bought) + (min(b.max_input(), limit) if b is not None else 0)
    sellable = {s: max(0, q - obs.committed.sold.get(s, 0)) for s, q in sorted(surplus.items())}
    if b is not None:
        sellable["bess"] = max(0, min(b.soc_wh, limit) - obs.committed.sold.get("bess", 0))
    slot = [obs.next_settle[0], obs.next_settle[1]]
    orders: list[Order] = []

    def add(side: str, quantity: int, price: float, source: str | None = None) -> None:
        if quantity > 0:
            o: Order = {"side": side, "quantity": quantity, "price": inside(price, low, high), "time_delivery": slot}
            o["id"] = f"{slot[0]}-a{len(orders)}"
            if source is not None:
                o["source"] = source
            orders.append(o)

    add("bid", int(a[1] * can_buy), low + float(a[0]) * (high - low))
    left = int(a[3] * sum(sellable.values()))
    for source, q in sellable.items():
        take = min(q, left)
        add("ask", take, low + float(a[2]) * (high - low), source)
        left -= take
    return orders


def _unit(action: np.ndarray) -> list[float]:
    """Each value of `action` clipped to [0, 1], NaN as 0 (what `np.clip(np.nan_to_num(a),
    0, 1)` gives, in plain floats: a handful of values, where numpy's calls cost most)."""
    return [min(1.0, max(0.0, x)) if x == x else 0.0 for x in np.asarray(action, dtype=np.float64).ravel().tolist()]


class _Agent:
    """What the environments know of one agent: its prosumer, the round's observation."""

    def __init__(self, prosumer: Prosumer, timezone: str) -> None:
        self.prosumer = prosumer
        self.timezone = timezone
        self.obs: Observation | None = None
        self.fills = (0, 0)  # Wh bought, sold in the fills announced this round
        self.delivery = (0, 0, 0, 0)  # paid, received, p2p Wh, grid Wh of the last delivered slot

    def observe(self, msg: StartRound) -> np.ndarray:
        self.obs = o = self.prosumer.observe(msg)
        b = o.battery
        hour = ((o.next_settle[0] % 86400) / 3600 + _utc_offset_hours(self.timezone, o.next_settle[0])) % 24
        values = (
            o.grid_buy or 0.0,
            o.grid_sell or 0.0,
            GRID_STATES.get(o.grid_state, 0.0),
            o.load / 1000,
            sum(o.generation.values()) / 1000,
            b.soc_wh / b.capacity_wh if b is not None else 0.0,
            self.fills[0] / 1000,
            self.fills[1] / 1000,
            (self.delivery[0] - self.delivery[1]) / 1e6,
            self.delivery[2] / 1000,
            self.delivery[3] / 1000,
            math.sin(2 * math.pi * hour / 24),
            math.cos(2 * math.pi * hour / 24),
        )
        return np.asarray(values, dtype=np.float32)

    def snapshot(self) -> tuple[int, int, int, int, int, int, int, int]:
        s = self.prosumer.stats
        return (
            s.paid,
            s.received,
            s.p2p_bought_wh + s.p2p_sold_wh,
            s.grid_bought_wh + s.grid_sold_wh,
            s.bought_wh,
            s.sold_wh,
            s.delivered,
            s.fills,
        )


def delivery_between(before: tuple[int, ...], now: tuple[int, ...]) -> tuple[int, int, int, int]:
    """Paid, received, P2P Wh and grid Wh between two `_Agent.snapshot`s."""
    return (now[0] - before[0], now[1] - before[1], now[2] - before[2], now[3] - before[3])


def _utc_offset_hours(timezone: str, t: int) -> float:
    offset = datetime.fromtimestamp(t, UTC).astimezone(ZoneInfo(timezone)).utcoffset()
    return offset.total_seconds() / 3600 if offset is not None else 0.0


class _Crowd:
    """Agents that are members of the market's population (participants/population.py):
    their observations and orders computed for all of them at once, the same values as an
    `_Agent` each (tests/controller/test_envs.py compares them)."""

    def __init__(self, population: Population, agents: Sequence[str], timezone: str) -> None:
        self.pop, self.names, self.timezone = population, list(agents), timezone
        self.rows = np.array([population.index[a] for a in agents], dtype=np.int64)
        self.fills = np.zeros((len(agents), 2), dtype=np.int64)  # Wh bought, sold announced this round
        self.delivery = np.zeros((len(agents), 4), dtype=np.int64)  # as `_Agent.delivery`
        self.slot: tuple[int, int] | None = None

    def snapshot(self) -> np.ndarray:
        """`_Agent.snapshot` of every agent (a row each)."""
        st, r = self.pop.stats, self.rows
        return np.stack(
            [
                st["paid"][r],
                st["received"][r],
                st["p2p_bought_wh"][r] + st["p2p_sold_wh"][r],
                st["grid_bought_wh"][r] + st["grid_sold_wh"][r],
                st["bought_wh"][r],
                st["sold_wh"][r],
                st["delivered"][r],
                st["fills"][r],
            ],
            axis=1,
        )

    def observe(self, msg: StartRound) -> np.ndarray:
        """`_Agent.observe` of every agent (a row each)."""
        pop, r = self.pop, self.rows
        self.slot = slot = msg.next_settle
        gen, load = pop.forecast(slot)
        prices = pop.prices(slot[0])
        info = facts_of(msg).next_info
        hour = ((slot[0] % 86400) / 3600 + _utc_offset_hours(self.timezone, slot[0])) % 24
        has = pop.has_battery[r]
        soc = np.where(has, pop.soc[r] / np.where(has, pop.capacity[r], 1), 0.0)
        n = len(r)
        columns = (
            np.full(n, prices[0] if prices else 0.0),
            np.full(n, prices[1] if prices else 0.0),
            np.full(n, GRID_STATES.get(info.grid_state if info else "GREEN", 0.0)),
            load[r] / 1000,
            gen[r].sum(axis=1) / 1000,
            soc,
            self.fills[:, 0] / 1000,
            self.fills[:, 1] / 1000,
            (self.delivery[:, 0] - self.delivery[:, 1]) / 1e6,
            self.delivery[:, 2] / 1000,
            self.delivery[:, 3] / 1000,
            np.full(n, math.sin(2 * math.pi * hour / 24)),
            np.full(n, math.cos(2 * math.pi * hour / 24)),
        )
        return np.stack(columns, axis=1).astype(np.float32)

    def orders(self, actions: np.ndarray) -> list[list[Order]]:
        """`orders_of` of every agent's observation and its row of `actions`."""
        pop, r, slot = self.pop, self.rows, self.slot
        assert slot is not None
        prices = pop.prices(slot[0])
        low, high = (prices[1], prices[0]) if prices else (None, None)
        n = len(r)
        if low is None or high is None or high <= low:
            return [[] for _ in range(n)]
        a = np.clip(np.nan_to_num(np.asarray(actions, dtype=np.float64), nan=0.0), 0.0, 1.0)
        gen, load = pop.forecast(slot)
        _, surplus, deficit = split_all(load[r], gen[r])
        bought, sold = pop.committed(slot[0])
        bought, sold = bought[r], sold[r]
        has, soc = pop.has_battery[r], pop.soc[r]
        limit = np.where(has, pop.power[r] * (slot[1] - slot[0]) // 3600, 0)
        room = np.where(has, np.minimum(max_input_all(pop.capacity[r], soc, pop.efficiency[r]), limit), 0)
        can_buy = np.maximum(0, deficit - bought) + room
        s = surplus.shape[1]
        sellable = np.zeros((n, s + 1), dtype=np.int64)
        sellable[:, :s] = np.maximum(0, surplus - sold[:, :s])
        sellable[:, s] = np.where(has, np.maximum(0, np.minimum(soc, limit) - sold[:, s]), 0)
        bid = (a[:, 1] * can_buy).astype(np.int64)
        left = (a[:, 3] * sellable.sum(axis=1)).astype(np.int64)
        asks = np.zeros_like(sellable)
        for j in range(s + 1):
            take = np.minimum(sellable[:, j], left)
            asks[:, j] = take
            left -= take
        bid_price = inside_all(low + a[:, 0] * (high - low), low, high).tolist()
        ask_price = inside_all(low + a[:, 2] * (high - low), low, high).tolist()
        names = [*pop.sources, "bess"]
        td = [slot[0], slot[1]]
        out: list[list[Order]] = []
        for i, (q, row) in enumerate(zip(bid.tolist(), asks.tolist(), strict=True)):
            orders: list[Order] = []
            if q > 0:
                orders.append({"side": "bid", "quantity": q, "price": bid_price[i], "time_delivery": td})
            for name, take in zip(names, row, strict=True):
                if take > 0:
                    o = {"side": "ask", "quantity": take, "price": ask_price[i], "time_delivery": td, "source": name}
                    orders.append(o)
            for k, o in enumerate(orders):
                o["id"] = f"{slot[0]}-a{k}"
            out.append(orders)
        return out


class _Episode:
    """One run of the scenario with `agents` driven from outside. `crowd`: the agents are
    members of the market's population (`_Crowd`) when they are all plain prosumers, else
    an `_Agent` each (the reference; same observations, rewards and ledger)."""

    def __init__(
        self,
        scenario: Scenario,
        base_dir: Path,
        participants: int | None,
        agents: Sequence[str] | None,
        keep_records: bool = False,
        crowd: bool = False,
    ) -> None:
        specs = community(scenario, participants)
        ids = [s.id for s in specs]
        chosen = list(ids) if agents is None else list(agents)
        unknown = [a for a in chosen if a not in ids]
        if unknown:
            raise ValueError(f"no such participant in the scenario: {unknown} (it has {ids[:5]}...)")
        self.scenario = scenario
        spec_of = {s.id: s for s in specs}
        crowd = crowd and all(plain(spec_of[a]) for a in chosen)
        self.market = InprocMarket(
            scenario, specs, base_dir=base_dir, external=chosen, crowd=crowd, journal=keep_records
        )
        self.crowd = (
            _Crowd(self.market.population, chosen, scenario.timezone)
            if crowd and self.market.population is not None
            else None
        )
        self.agents = {} if self.crowd else {a: _Agent(self.market.prosumers[a], scenario.timezone) for a in chosen}
        runloop.settle_heap_once()  # the imports are long-lived: collections need not walk them
        self.round = 0
        self.rounds = scenario.rounds
        self.keep_records = keep_records
        self.records: list[Record] = []  # the episode's ledger records, if kept

    @property
    def t(self) -> int:
        return self.scenario.start_time + self.round * self.scenario.step

    def open(self) -> dict[str, np.ndarray]:
        """Open the next round (fills announced, every prosumer metered, the scripted ones
        trade): each agent's observation."""
        crowd = self.crowd
        if crowd is not None:
            first = crowd.snapshot()
            msg = self._open()
            crowd.fills = (crowd.snapshot() - first)[:, 4:6]
            return dict(zip(crowd.names, crowd.observe(msg), strict=True))
        before = {a: ag.snapshot() for a, ag in self.agents.items()}
        msg = self._open()
        out = {}
        for a, ag in self.agents.items():
            now = ag.snapshot()
            ag.fills = (now[4] - before[a][4], now[5] - before[a][5])
            out[a] = ag.observe(msg)
        return out

    def _open(self) -> StartRound:
        self.market.open(self.t)
        assert self.market.message is not None
        return self.market.message  # as the market decoded it for its prosumers

    def step(self, actions: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        """Place the agents' orders, close the round: (reward, info) per agent."""
        if self.crowd is not None:
            return self._crowd_step(actions)
        infos: dict[str, dict[str, Any]] = {}
        for a, ag in self.agents.items():
            assert ag.obs is not None
            orders = orders_of(ag.obs, actions[a]) if a in actions else []
            refused: list[dict[str, Any]] = []
            if orders and _within_bounds(orders):
                refused = [r for r in self.market.submit_each(_entries(a, orders)) if r is not None]
            elif orders:
                refused = [r for r in self.market.submit(a, orders) if not r.get("ok")]
            infos[a] = {"orders": orders, "refused": refused}
        before = {a: ag.snapshot() for a, ag in self.agents.items()}
        record = self.market.close()
        records = self.market.take_records()  # no ledger: kept in memory only if asked
        if self.keep_records:
            self.records += records
        rewards = {}
        for a, ag in self.agents.items():
            ag.delivery = delivery_between(before[a], ag.snapshot())
            paid, received = ag.delivery[0], ag.delivery[1]
            rewards[a] = -(paid - received) / 1e6
            infos[a].update(slot=record.current_round_start, paid=paid, received=received)
        self.round += 1
        return rewards, infos

    def _crowd_step(self, actions: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
        crowd = self.crowd
        assert crowd is not None
        acted = np.array([a in actions for a in crowd.names], dtype=bool)
        matrix = np.zeros((len(crowd.names), len(ACT_FIELDS)), dtype=np.float64)
        for i, a in enumerate(crowd.names):
            if acted[i]:
                matrix[i] = np.asarray(actions[a], dtype=np.float64)
        infos: dict[str, dict[str, Any]] = {}
        batch: list[tuple[str, Side, EntryMsg]] = []  # agents' orders within bounds, booked together
        owners: list[str] = []

        def book() -> None:  # in the agents' order, so the book is as if each were booked in turn
            for a, reply in zip(owners, self.market.submit_each(batch), strict=True):
                if reply is not None:
                    infos[a]["refused"].append(reply)
            batch.clear()
            owners.clear()

        for a, did, orders in zip(crowd.names, acted.tolist(), crowd.orders(matrix), strict=True):
            orders = orders if did else []
            infos[a] = {"orders": orders, "refused": []}
            if not orders:
                continue
            if _within_bounds(orders):
                batch += _entries(a, orders)
                owners += [a] * len(orders)
            else:  # outside the protocol's bounds: refused as a client's batch would be
                book()
                infos[a]["refused"] = [r for r in self.market.submit(a, orders) if not r.get("ok")]
        book()
        before = crowd.snapshot()
        record = self.market.close()
        records = self.market.take_records()
        if self.keep_records:
            self.records += records
        crowd.delivery = (crowd.snapshot() - before)[:, :4]
        rewards = {}
        for a, (paid, received) in zip(crowd.names, crowd.delivery[:, :2].tolist(), strict=True):
            rewards[a] = -(paid - received) / 1e6
            infos[a].update(slot=record.current_round_start, paid=paid, received=received)
        self.round += 1
        return rewards, infos


def _within_bounds(orders: list[Order]) -> bool:
    """Whether `orders_of`'s batch is within the protocol's bounds, so that it can be booked
    as entries already decoded (`InprocMarket.submit_each`), as `OrdersMsg` would decode it."""
    return len(orders) <= MAX_ORDERS and all(
        o["quantity"] <= MAX_QUANTITY and abs(o["price"]) <= PRICE_LIMIT for o in orders
    )


def _entries(agent: str, orders: list[Order]) -> list[tuple[str, Side, EntryMsg]]:
    """`orders_of`'s batch of `agent` as `InprocMarket.submit_each` books it."""
    return [(agent, o["side"], _entry(o)) for o in orders]


def _entry(o: Order) -> EntryMsg:
    """An order of `orders_of` as the market decodes it (its prices are inside the grid band)."""
    td = o["time_delivery"]
    return EntryMsg(o["quantity"], o["price"], (td[0], td[1]), o["id"], o.get("source"))


def episode_scenario(
    scenario: str | Path, seed: int | None, days: float | None = None, day: int = 0
) -> tuple[Scenario, Path]:
    """The scenario an episode runs: its seed and length replaced when given, starting `day`
    days after the file's start; and the directory its profile files are relative to. The
    file is parsed again only when it changed (a reset every simulated day parsed it each time)."""
    path = Path(scenario)
    stat = path.stat()
    return _episode_scenario(path, stat.st_mtime_ns, stat.st_size, seed, days, day)


@functools.lru_cache(maxsize=64)
def _episode_scenario(
    scenario: Path, _mtime_ns: int, _size: int, seed: int | None, days: float | None, day: int
) -> tuple[Scenario, Path]:
    overrides: dict[str, Any] = {}
    if seed is not None:
        overrides["seed"] = int(seed)
    if days is not None:
        overrides["days"] = days
    scn = load_scenario(scenario, overrides)
    if day:
        scn = msgspec.structs.replace(scn, start=scn.start_time + day * 86400)
    return scn, Path(scenario).parent


class ProsumerEnv(gymnasium.Env[np.ndarray, np.ndarray]):
    """One prosumer of `scenario` trades; every other participant runs its scenario trader.

    `reset(seed=N)` runs the scenario with seed N (profiles and random traders follow it);
    `options={"day": k}` starts k days after the scenario's start (held-out days). An
    episode is the scenario's `days` (or `days=`), then `truncated`."""

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium's convention)

    def __init__(
        self,
        scenario: str | Path,
        participant: str,
        seed: int | None = None,
        *,
        days: float | None = None,
        participants: int | None = None,
        keep_records: bool = False,
    ) -> None:
        self.scenario_path, self.participant = Path(scenario), participant
        self.days, self.participants, self.keep_records = days, participants, keep_records
        self._seed = seed
        self.observation_space = observation_space()
        self.action_space = action_space()
        self._episode: _Episode | None = None
        self.records: list[Record] = []
        episode_scenario(self.scenario_path, seed, days)  # a bad scenario fails here, not at reset

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if seed is not None:
            self._seed = seed
        day = int((options or {}).get("day", 0))
        scenario, base = episode_scenario(self.scenario_path, self._seed, self.days, day)
        self._episode = _Episode(scenario, base, self.participants, [self.participant], self.keep_records)
        self.records = self._episode.records  # the episode's ledger records (`keep_records=True`)
        obs = self._episode.open()[self.participant]
        return obs, {"slot": self._episode.t}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        ep = self._episode
        if ep is None or ep.round >= ep.rounds:
            raise RuntimeError("no episode running: call reset() first")
        rewards, infos = ep.step({self.participant: action})
        truncated = ep.round >= ep.rounds
        # After the last round there is nothing more to see.
        obs = np.zeros(len(OBS_FIELDS), dtype=np.float32) if truncated else ep.open()[self.participant]
        return obs, rewards[self.participant], False, truncated, infos[self.participant]


class MarketParallelEnv(ParallelEnv):  # type: ignore[misc]
    """Every prosumer of `scenario` (or those in `agents`) is an agent; same spaces as `ProsumerEnv`."""

    metadata = {"render_modes": [], "name": "microte_market_v0"}  # noqa: RUF012

    def __init__(
        self,
        scenario: str | Path,
        seed: int | None = None,
        *,
        days: float | None = None,
        participants: int | None = None,
        agents: Sequence[str] | None = None,
        crowd: bool = True,
    ) -> None:
        """`crowd`: the agents' observations and orders as arrays (False: an `_Agent` each,
        the reference: the same observations, rewards and ledger)."""
        self.scenario_path, self.days, self.participants = Path(scenario), days, participants
        self.crowd = crowd
        self._seed = seed
        scn, _ = episode_scenario(self.scenario_path, seed, days)
        ids = [s.id for s in community(scn, participants)]
        self.possible_agents = list(agents) if agents is not None else ids
        self.agents: list[str] = []
        self._episode: _Episode | None = None
        self._obs_space, self._act_space = observation_space(), action_space()

    def observation_space(self, agent: str) -> spaces.Box:
        return self._obs_space

    def action_space(self, agent: str) -> spaces.Box:
        return self._act_space

    def reset(
        self, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        if seed is not None:
            self._seed = seed
        day = int((options or {}).get("day", 0))
        scenario, base = episode_scenario(self.scenario_path, self._seed, self.days, day)
        self._episode = _Episode(scenario, base, self.participants, self.possible_agents, crowd=self.crowd)
        self.agents = list(self.possible_agents)
        obs = self._episode.open()
        return obs, {a: {"slot": self._episode.t} for a in self.agents}

    def step(self, actions: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], ...]:
        ep = self._episode
        if ep is None:
            raise RuntimeError("call reset() first")
        rewards, infos = ep.step(actions)
        truncated = ep.round >= ep.rounds
        obs = {a: np.zeros(len(OBS_FIELDS), dtype=np.float32) for a in self.agents} if truncated else ep.open()
        done = {a: False for a in self.agents}
        trunc = {a: truncated for a in self.agents}
        if truncated:
            self.agents = []
            self._episode = None
        return obs, rewards, done, trunc, infos


def parallel_env(scenario: str | Path, seed: int | None = None, **kwargs: Any) -> MarketParallelEnv:
    """PettingZoo's constructor convention: `controller.envs.parallel_env(scenario=PATH, seed=N)`."""
    return MarketParallelEnv(scenario, seed, **kwargs)


def register_envs() -> None:
    """Register `microte/Prosumer-v0` with Gymnasium (importing this module does it)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="controller.envs:ProsumerEnv")


register_envs()
