"""`microte flexsim`: the seed 001 simulation of an aggregator's flexibility (docs/flexibility.md).

n prosumers with a realistic mix of sources (solar, wind, battery) join the aggregator over
time (a seeded Poisson process: the population grows), register contracts, renegotiate them
at random (mostly downward) and renew some when they expire; the grid operator sends
flexibility requests at random (another Poisson process). Every request goes through offers,
answers, allocation, meter readings after the window, the delivery check, tokens and
reputation. The same world is played once per allocation strategy, and the report compares
requested against delivered flexibility.

One `Scheduler` plays the world's events, in the same order, over either transport:

- `inproc` (`InprocBackend`): the core (`market.flexibility.Flexibility`) called in this
  process, each call wrapped as the `/flex` namespace wraps an event (expire due contracts,
  undo on a refusal), its notices handed to the prosumers' brains;
- `socket` (`SocketBackend`): a `microte market` subprocess on a free port with its ledger,
  the aggregator, grid operator and token operator as socket.io clients of this process, and
  the prosumers as socket.io agents (`participants.flex_agents`) in `workers` processes of
  their own, answering offers and metering on their own.

Both make the same decisions (the prosumers' `ProsumerBrain`) at the same market times
(every event happens on a slot boundary; the socket controller steps the server there), so
they give the same report and the same flexibility ledger: `flex_digest` of the seven
`flex_*` tables is printed for each run (the in-process run writes the same records, in
memory or to `--ledger-dir`).

Reproducible by construction: the world is drawn from the seed before any strategy runs, and
every random answer or delivery outcome comes from a generator keyed by (seed, what, request
number, prosumer), so both strategies face exactly the same draws.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import heapq
import secrets
import sys
import tempfile
import time
import tomllib
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec
import numpy as np
import socketio

from controller import runloop
from market.core import wire
from market.core.errors import MarketError
from market.core.protocol import decode
from market.core.records import Batch, Record
from market.flexibility.machine import FLEX_RECORDS, Flexibility
from market.flexibility.messages import (
    AnswerMsg,
    ContractRegisterMsg,
    ContractRenegotiateMsg,
    FlexConfig,
    FlexMeterMsg,
    FundMsg,
    RequestMsg,
    RequestRefMsg,
    ResultsMsg,
    StrategyMsg,
)
from participants.flex_agents import (
    AgentHost,
    AggregatorAgent,
    Behaviour,
    FlexSite,
    FlexTerms,
    GridOperatorAgent,
    ProsumerBrain,
    SiteSource,
    TokenOperatorAgent,
    keyed_rng,
)
from participants.spec import BatterySpec, PvSpec, WindSpec

AGGREGATOR = "AGG"
DSO = "DSO"
OPERATOR = "OPS"
CONTROLLER = "CTL"
HOUR = 3600
DAY = 86400
START = 1_767_225_600  # 2026-01-01T00:00:00Z, a multiple of 900
FLEX_TABLES: tuple[str, ...] = tuple(cls.TABLE for cls in FLEX_RECORDS)

# keys of the per-event generators (the prosumers' answers and deliveries: 5 and 6, flex_agents)
_PROSUMER, _JOIN, _REQUEST, _RENEGOTIATE, _RENEW = 1, 2, 3, 4, 7


class FlexSimParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    seed: int = 42
    prosumers: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 60
    initial: Annotated[int, msgspec.Meta(ge=0)] = 10  # registered at the start; the rest join over time
    days: Annotated[float, msgspec.Meta(gt=0, le=366)] = 3.0
    join_rate: Annotated[float, msgspec.Meta(gt=0)] = 2.0  # joins per hour
    request_rate: Annotated[float, msgspec.Meta(gt=0)] = 0.5  # requests per hour
    renegotiation_rate: Annotated[float, msgspec.Meta(ge=0)] = 0.3  # per contract per day
    downward_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.6  # of renegotiations
    renew_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.7  # expired contracts renewed
    up_share: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.6  # requests asking for more injection
    request_fraction: tuple[float, float] = (0.05, 0.5)  # of the contracted flexibility in that direction
    mix: dict[str, float] = msgspec.field(default_factory=lambda: {"solar": 0.5, "wind": 0.2, "bess": 0.3})
    slot: Annotated[int, msgspec.Meta(gt=0, le=86400)] = 900
    answer_silent: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.05  # chance an offer gets no answer
    meter_missing: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.02  # chance an allocated site never meters
    strategies: tuple[str, ...] = ("fair", "reputation")
    # The aggregator's `flex.strategy` settings: fair's cap (the seed's simplification: 25 %)
    # and its forecast of who can deliver (energy source and delivery history).
    max_modulation_pct: Annotated[int, msgspec.Meta(gt=0, le=100)] = 25
    forecast: bool = False  # as the server's default; scenarios/flex.toml turns it on
    budget: Annotated[float, msgspec.Meta(ge=0, le=1e9)] = 10_000.0  # currency minted to the aggregator at the start
    answer_within: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 2.0  # s, the dso's deadline (socket: wall clock)
    flex: FlexConfig = FlexConfig()

    def __post_init__(self) -> None:
        if set(self.mix) - {"solar", "wind", "bess"} or not any(v > 0 for v in self.mix.values()):
            raise ValueError("mix: weights of solar, wind and bess, one at least > 0")
        lo, hi = self.request_fraction
        if not 0 < lo <= hi <= 1:
            raise ValueError("request_fraction: 0 < low <= high <= 1")
        unknown = set(self.strategies) - {"fair", "reputation"}
        if unknown or not self.strategies:
            raise ValueError(f"strategies: fair and/or reputation, not {sorted(unknown)}")

    def settings(self, strategy: str) -> dict[str, Any]:
        """The aggregator's `flex.strategy` payload for `strategy`."""
        chosen: dict[str, Any] = {"strategy": strategy, "forecast": self.forecast}
        if strategy == "fair":
            chosen["max_modulation_pct"] = self.max_modulation_pct
        return chosen


# -- the world ---------------------------------------------------------------------------------


class SimRequest(msgspec.Struct, frozen=True):
    at: int  # seconds after the start (a slot boundary)
    lead: int  # seconds from `at` to the window's start
    slots: int
    up: bool
    fraction: float  # of the contracted flexibility in its direction, at `at`


class SimRenegotiation(msgspec.Struct, frozen=True):
    at: int
    pick: float  # which active contract: index floor(pick * len(active))
    downward: bool
    factor: float  # applied to flex_up and flex_down


class World(msgspec.Struct, frozen=True):
    params: FlexSimParams
    prosumers: tuple[FlexSite, ...]
    requests: tuple[SimRequest, ...]
    renegotiations: tuple[SimRenegotiation, ...]


def _price(rng: np.random.Generator, lo: float, hi: float) -> float:
    return round(float(rng.uniform(lo, hi)), 3)


def _aligned(t: int, slot: int) -> int:
    """The first slot boundary at or after `t` (events happen on boundaries: the socket
    controller can step the server's clock only there)."""
    return -(-t // slot) * slot


def make_prosumer(index: int, joins: int, params: FlexSimParams) -> FlexSite:
    """A seeded site: solar (household with PV), wind (small turbine) or battery; sizes as
    in `participants.spec.synthetic_spec`."""
    rng = keyed_rng(params.seed, _PROSUMER, index)
    names = sorted(params.mix)
    weights = np.array([params.mix[n] for n in names], dtype=float)
    source: SiteSource = names[int(rng.choice(len(names), p=weights / weights.sum()))]  # type: ignore[assignment]
    consumption = int(rng.integers(300, 900))  # W, average household load
    pv = wind = battery = None
    if source == "solar":
        pv = PvSpec(kw=round(float(rng.uniform(3.0, 10.0)), 1))
        production = round(pv.kw * 1000 * float(rng.uniform(0.15, 0.35)))  # average over the contracted hours
        flex_up = round(consumption * float(rng.uniform(0.3, 0.6)))  # shifting load
        flex_down = round(production * float(rng.uniform(0.4, 0.8)))  # curtailing PV
        reliability = float(rng.beta(8, 2))
    elif source == "wind":
        wind = WindSpec(kw=round(float(rng.uniform(2.0, 10.0)), 1))
        production = round(wind.kw * 1000 * float(rng.uniform(0.25, 0.45)))  # capacity factor
        flex_up = round(consumption * float(rng.uniform(0.3, 0.6)))
        flex_down = round(production * float(rng.uniform(0.5, 0.9)))
        reliability = float(rng.beta(6, 3))
    else:
        battery = BatterySpec(
            capacity_wh=int(rng.choice([5000, 7500, 10000, 13500])),
            power_w=int(rng.choice([3000, 3680, 5000])),
            efficiency=round(float(rng.uniform(0.88, 0.96)), 2),
        )
        production = 0
        flex_up = flex_down = round(battery.power_w * float(rng.uniform(0.6, 1.0)))
        reliability = float(rng.beta(19, 1))
    start = START + joins
    terms = FlexTerms(
        aggregator=AGGREGATOR,
        source=source,
        production=production,
        consumption=consumption,
        flex_up=flex_up,
        flex_down=flex_down,
        duration=int(rng.choice([3600, 7200, 4 * 3600])),
        notice=int(rng.choice([300, 600, 900])),
        price_up=_price(rng, 0.15, 0.40),
        price_down=_price(rng, 0.03, 0.12),
        expires=start + int(rng.uniform(1, 5) * DAY) // params.slot * params.slot,
    )
    return FlexSite(
        id=f"F{index + 1:04d}",
        index=index,
        source=source,
        joins=joins,
        terms=terms,
        reliability=reliability,
        accept=float(rng.uniform(0.6, 0.95)),
        pv=pv,
        wind=wind,
        battery=battery,
    )


def _poisson_times(rng: np.random.Generator, rate_per_hour: float, horizon: int, limit: int | None = None) -> list[int]:
    times: list[int] = []
    t = 0.0
    while limit is None or len(times) < limit:
        t += float(rng.exponential(HOUR / rate_per_hour))
        if t >= horizon:
            break
        times.append(int(t))
    return times


def make_world(params: FlexSimParams) -> World:
    horizon = int(params.days * DAY)
    slot = params.slot
    initial = min(params.initial, params.prosumers)
    later = _poisson_times(keyed_rng(params.seed, _JOIN), params.join_rate, horizon, params.prosumers - initial)
    joins = [0] * initial + [_aligned(t, slot) for t in later]
    prosumers = tuple(make_prosumer(i, t, params) for i, t in enumerate(joins))
    rng = keyed_rng(params.seed, _REQUEST)
    lo, hi = params.request_fraction
    requests = tuple(
        SimRequest(
            at=_aligned(t, slot),
            lead=int(rng.choice([900, 1800])),
            slots=int(rng.integers(1, 5)),
            up=bool(rng.random() < params.up_share),
            fraction=float(rng.uniform(lo, hi)),
        )
        for t in _poisson_times(rng, params.request_rate, horizon)
    )
    rng = keyed_rng(params.seed, _RENEGOTIATE)
    renegotiations: list[SimRenegotiation] = []
    if params.renegotiation_rate > 0:
        # A rate per contract: draw at the rate of the whole community, pick a contract then.
        for t in _poisson_times(rng, params.renegotiation_rate * params.prosumers / 24, horizon):
            down = bool(rng.random() < params.downward_share)
            factor = float(rng.uniform(0.5, 0.9) if down else rng.uniform(1.05, 1.3))
            renegotiations.append(SimRenegotiation(_aligned(t, slot), float(rng.random()), down, factor))
    return World(params, prosumers, requests, tuple(renegotiations))


# -- results -----------------------------------------------------------------------------------


class StrategyResult(msgspec.Struct, frozen=True):
    strategy: str
    requests: int
    requested_wh: int
    allocated_wh: int
    delivered_wh: int  # credited: delivered within [0, expected] per allocation
    allocations: int
    met: int
    displaced: int
    shortfall_requests: int  # requests not fully allocated
    budget_requests: int  # requests cut because the aggregator's budget could not pay for more
    rewards: int  # micro-currency
    penalties: int  # assessed
    penalties_paid: int  # collected: at most what the prosumer held
    tokens_left: int  # the aggregator's balance at the end
    min_balance: int  # the lowest balance of any account at the end (never below 0)
    participants: int  # distinct prosumers allocated at least once
    mean_reputation: float
    records: int  # rows of the flex_* tables
    digest: str  # flex_digest of those tables
    expired: int  # contracts that expired
    renewed: int

    @property
    def delivered_share(self) -> float:
        return self.delivered_wh / self.requested_wh if self.requested_wh else 0.0

    @property
    def met_share(self) -> float:
        return self.met / self.allocations if self.allocations else 0.0


class WorldSummary(msgspec.Struct, frozen=True):
    prosumers: dict[str, int]  # by source
    joined_later: int
    requests: int
    renegotiations_down: int
    renegotiations_up: int
    expired: int
    renewed: int


class FlexSimReport(msgspec.Struct, frozen=True):
    params: FlexSimParams
    world: WorldSummary
    results: tuple[StrategyResult, ...]


class Percentiles(msgspec.Struct, frozen=True):
    """Of a sample of durations, in milliseconds."""

    n: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, ms: Sequence[float]) -> Percentiles:
        if not ms:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        a = np.asarray(ms, dtype=float)
        q = np.percentile(a, [50, 95, 99])
        return cls(
            len(a), round(float(q[0]), 1), round(float(q[1]), 1), round(float(q[2]), 1), round(float(a.max()), 1)
        )


class LoadStats(msgspec.Struct, frozen=True):
    """How the server held up in one socket run (wall clock: not part of the report)."""

    strategy: str
    prosumers: int
    workers: int
    seconds: float  # from the first step to the results
    steps: int
    acks: dict[str, Percentiles]  # acknowledgement latency of the prosumers' events
    request_round: Percentiles  # a flex.request: offers, answers (or their deadline), allocation
    delivery_round: Percentiles  # a window's readings and the aggregator's settle
    step: Percentiles
    refused: dict[str, int]  # the prosumers' refused events by code (closed: an answer too late)
    silent: int


def flex_digest(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """sha256 over the rows of the seven `flex_*` tables, each in id order, every column in
    its record's field order (as `ledger_digest` does for the auction's tables)."""
    digest = hashlib.sha256()
    encode = msgspec.json.Encoder().encode
    for cls in FLEX_RECORDS:
        columns = [f.name for f in msgspec.structs.fields(cls)]
        digest.update(encode([cls.TABLE, columns]) + b"\n")
        for row in sorted(rows.get(cls.TABLE, ()), key=lambda r: str(r["id"])):
            values = [row[c] + 0.0 if type(row[c]) is float else row[c] for c in columns]
            digest.update(encode(values) + b"\n")
    return digest.hexdigest()


def record_rows(records: Sequence[Record]) -> dict[str, list[dict[str, Any]]]:
    """Rows per table, as a ledger stores them (the first record of an id wins)."""
    seen: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in FLEX_TABLES}
    for r in records:
        row = r.row()
        seen[r.TABLE].setdefault(str(row["id"]), row)
    return {t: list(rows.values()) for t, rows in seen.items()}


def _result(
    strategy: str,
    world: World,
    requests: Sequence[Mapping[str, Any]],
    status: Mapping[str, Any],
    balances: Mapping[str, int],
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    renewed: int,
) -> StrategyResult:
    allocated_to = {a["prosumer"] for w in requests for a in w["allocations"]}
    reputation = {p["id"]: p["reputation"] for p in status["prosumers"]}
    reps = [reputation[p.id] for p in world.prosumers]
    return StrategyResult(
        strategy=strategy,
        requests=len(requests),
        requested_wh=sum(w["requested_wh"] for w in requests),
        allocated_wh=sum(w["expected_wh"] for w in requests),
        delivered_wh=sum(w["delivered_wh"] for w in requests),
        allocations=sum(len(w["allocations"]) for w in requests),
        met=sum(w["met"] for w in requests),
        displaced=sum(len(w["displaced"]) for w in requests),
        shortfall_requests=sum(1 for w in requests if w["shortfall"] > 0),
        budget_requests=sum(1 for w in requests if "budget:" in (w["reason"] or "")),
        rewards=sum(w["rewards"] for w in requests),
        penalties=sum(w["penalties"] for w in requests),
        penalties_paid=sum(w["penalties_paid"] for w in requests),
        tokens_left=int(status["tokens"]),
        min_balance=min([int(status["tokens"]), *(balances.get(p.id, 0) for p in world.prosumers)]),
        participants=len(allocated_to),
        mean_reputation=round(sum(reps) / len(reps), 2) if reps else 0.0,
        records=sum(len(v) for v in rows.values()),
        digest=flex_digest(rows),
        expired=sum(1 for r in rows.get("flex_contracts", ()) if r["event"] == "expired"),
        renewed=renewed,
    )


# -- playing the world ---------------------------------------------------------------------------


class Backend(Protocol):
    """What the scheduler asks of a transport: one method per thing that happens."""

    async def at(self, now: int) -> None: ...  # the market clock reaches `now`
    async def fund(self, micro: int) -> None: ...  # the operator mints the aggregator's budget
    async def choose(self, settings: dict[str, Any]) -> None: ...  # the aggregator's flex.strategy
    async def join(self, site: FlexSite) -> None: ...
    async def renew(self, site: FlexSite, terms: FlexTerms) -> bool: ...
    async def active_contracts(self) -> list[dict[str, Any]]: ...  # the aggregator's, oldest first
    async def renegotiate(self, site: FlexSite, change: dict[str, Any]) -> None: ...
    async def request(self, ask: dict[str, Any]) -> dict[str, Any]: ...  # the dso's flex.request -> R
    async def deliver(self, request_id: str, sites: Sequence[FlexSite]) -> None: ...  # read, then settle
    async def finish(self, request_ids: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int]]:
        """The requests' `R` (the aggregator's `flex.results`, one request at a time: all at
        once come in pages of at most ~1 MB, one request a page with thousands of
        prosumers), its `flex.status`, and every balance (the operator's `flex.status`)."""
        ...


class _Event(msgspec.Struct, frozen=True, order=True):
    time: int
    order: int  # tie-break: creation order
    kind: str
    index: int


class Scheduler:
    """One run of the world under one strategy, over a backend: the events in time order
    (ties by creation order), each on a slot boundary."""

    def __init__(self, world: World, strategy: str, backend: Backend) -> None:
        self.world = world
        self.params = world.params
        self.strategy = strategy
        self.backend = backend
        self.by_id = {p.id: p for p in world.prosumers}
        self.queue: list[_Event] = []
        self.renewals: list[tuple[int, FlexTerms]] = []
        self.deliveries: list[tuple[str, tuple[FlexSite, ...]]] = []
        self.request_ids: list[str] = []
        self.renewed = 0
        self.end = START + int(world.params.days * DAY)  # no renewal after it
        self._seq = 0

    def push(self, time: int, kind: str, index: int) -> None:
        self._seq += 1
        heapq.heappush(self.queue, _Event(time, self._seq, kind, index))

    async def run(self) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int]]:
        await self.backend.at(START)
        if self.params.budget > 0:
            await self.backend.fund(round(self.params.budget * 1_000_000))
        await self.backend.choose(self.params.settings(self.strategy))
        for i, p in enumerate(self.world.prosumers):
            self.push(START + p.joins, "join", i)
        for i, q in enumerate(self.world.requests):
            self.push(START + q.at, "request", i)
        for i, r in enumerate(self.world.renegotiations):
            self.push(START + r.at, "renegotiate", i)
        now = START
        while self.queue:
            ev = heapq.heappop(self.queue)
            if ev.time > now:
                now = ev.time
                await self.backend.at(now)
            await getattr(self, f"_{ev.kind}")(now, ev.index)
        return await self.backend.finish(self.request_ids)

    async def _join(self, now: int, index: int) -> None:
        p = self.world.prosumers[index]
        await self.backend.join(p)
        self._schedule_renewal(index, p.terms)

    def _schedule_renewal(self, index: int, terms: FlexTerms) -> None:
        rng = keyed_rng(self.params.seed, _RENEW, index, terms.expires)
        if rng.random() < self.params.renew_share:
            at = _aligned(terms.expires + int(rng.uniform(0, 6 * HOUR)), self.params.slot)
            if at < self.end:
                self.renewals.append((index, terms))
                self.push(at, "renew", len(self.renewals) - 1)

    async def _renew(self, now: int, n: int) -> None:
        index, old = self.renewals[n]
        rng = keyed_rng(self.params.seed, _RENEW, index, old.expires, 1)
        expires = now + int(rng.uniform(1, 5) * DAY) // self.params.slot * self.params.slot
        terms = msgspec.structs.replace(old, expires=expires)
        if await self.backend.renew(self.world.prosumers[index], terms):  # unless still active
            self.renewed += 1
            self._schedule_renewal(index, terms)

    async def _renegotiate(self, now: int, n: int) -> None:
        r = self.world.renegotiations[n]
        active = await self.backend.active_contracts()
        if not active:
            return
        c = active[min(len(active) - 1, int(r.pick * len(active)))]
        up = max(0, round(c["flex_up"] * r.factor))
        down = max(0, round(c["flex_down"] * r.factor))
        if up == 0 and down == 0:
            return
        await self.backend.renegotiate(self.by_id[c["prosumer"]], {"id": c["id"], "flex_up": up, "flex_down": down})

    async def _request(self, now: int, n: int) -> None:
        r = self.world.requests[n]
        slot = self.params.slot
        direction = "flex_up" if r.up else "flex_down"
        total = sum(int(c[direction]) for c in await self.backend.active_contracts())
        power = round(r.fraction * total)
        if power <= 0:
            return
        start = _aligned(now + r.lead, slot)
        ask = {
            "aggregator": AGGREGATOR,
            "power": power if r.up else -power,
            "start": start,
            "end": start + r.slots * slot,
            "answer_within": self.params.answer_within,
            "id": f"dso-{n + 1}",
        }
        reply = await self.backend.request(ask)
        self.request_ids.append(reply["id"])
        allocated = tuple(self.by_id[a["prosumer"]] for a in reply["allocations"])
        if allocated:  # else settled at once: nothing to deliver
            self.deliveries.append((reply["id"], allocated))
            self.push(int(reply["end"]), "deliver", len(self.deliveries) - 1)

    async def _deliver(self, now: int, n: int) -> None:
        await self.backend.deliver(*self.deliveries[n])


# -- in process --------------------------------------------------------------------------------


class InprocBackend:
    """The core in this process. Every call is one `/flex` event as `FlexNamespace` runs it
    (due contracts expire first; a refusal undoes it), with the payloads the socket agents
    send, decoded as the namespace decodes them; notices go to the prosumers' brains."""

    def __init__(self, params: FlexSimParams) -> None:
        self.core = Flexibility(msgspec.structs.replace(params.flex, slot=params.slot))
        self.behaviour = Behaviour(params.seed, params.answer_silent, params.meter_missing)
        self.brains: dict[str, ProsumerBrain] = {}
        self.now = 0
        self.records: list[Record] = []
        self._offers: list[tuple[str, dict[str, Any]]] = []

    def _event(self, fn: Any, *args: Any) -> Any:
        saved = self.core.savepoint()
        try:
            self.core.expire(self.now)
            reply = fn(*args)
        except MarketError:
            self.core.rollback(saved)
            raise
        records, notices = self.core.take_outbox()
        self.records += records
        for pid, event, payload in notices:
            brain = self.brains.get(pid)
            if brain is None:
                continue  # the aggregator, the dso and the operator only read
            if event == "flex.contract":
                brain.on_contract(payload["contract"])
            elif event == "flex.allocation":
                brain.on_allocation(payload)
            elif event == "flex.offer":
                self._offers.append((pid, payload))
        return reply

    def _try(self, fn: Any, *args: Any) -> Any:
        with contextlib.suppress(MarketError):  # refused, as a socket client's event may be
            return self._event(fn, *args)
        return None

    async def at(self, now: int) -> None:
        self.now = now

    async def fund(self, micro: int) -> None:
        msg = decode({"aggregator": AGGREGATOR, "amount": micro, "id": "budget"}, FundMsg)
        self._event(self.core.fund, OPERATOR, msg, self.now)

    async def choose(self, settings: dict[str, Any]) -> None:
        self._event(self.core.set_strategy, AGGREGATOR, decode(settings, StrategyMsg))

    def _register(self, site: FlexSite, terms: FlexTerms) -> None:
        msg = decode(msgspec.to_builtins(terms), ContractRegisterMsg)
        reply = self._event(self.core.register, site.id, msg, self.now)
        self.brains[site.id].on_contract(reply["contract"])

    async def join(self, site: FlexSite) -> None:
        self.brains[site.id] = ProsumerBrain(site, self.behaviour)
        self._register(site, site.terms)

    async def renew(self, site: FlexSite, terms: FlexTerms) -> bool:
        if self._event(self.core.status, site.id, "prosumer")["contract"] is not None:
            return False
        self._register(site, terms)
        return True

    async def active_contracts(self) -> list[dict[str, Any]]:
        status = self._event(self.core.status, AGGREGATOR, "aggregator")
        return [c for c in status["contracts"] if c["status"] == "active"]

    async def renegotiate(self, site: FlexSite, change: dict[str, Any]) -> None:
        reply = self._try(self.core.renegotiate, site.id, decode(change, ContractRenegotiateMsg), self.now)
        if reply is not None:
            self.brains[site.id].on_contract(reply["contract"])

    async def request(self, ask: dict[str, Any]) -> dict[str, Any]:
        online = set(self.brains)
        opened = self._event(self.core.open_request, DSO, decode(ask, RequestMsg), self.now, online)
        offers, self._offers = self._offers, []
        for pid, offer in offers:
            accept = self.brains[pid].answer(offer)
            if accept is not None:
                msg = decode({"request": offer["request"], "accept": accept}, AnswerMsg)
                self._try(self.core.answer, pid, msg, self.now)
        reply: dict[str, Any] = self._event(self.core.allocate, opened.request.id, self.now)["request"]
        return reply

    async def deliver(self, request_id: str, sites: Sequence[FlexSite]) -> None:
        for site in sites:
            reading = self.brains[site.id].reading(request_id)
            if reading is not None:
                self._event(self.core.meter, site.id, decode(reading, FlexMeterMsg), self.now)
        self._try(self.core.settle, AGGREGATOR, decode({"request": request_id}, RequestRefMsg), self.now)

    async def finish(self, request_ids: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int]]:
        requests = [
            self._event(self.core.results, AGGREGATOR, decode({"request": rid}, ResultsMsg))["requests"][0]
            for rid in request_ids
        ]
        status = self._event(self.core.status, AGGREGATOR, "aggregator")
        balances = self._event(self.core.status, OPERATOR, "operator")["balances"]
        return requests, status, balances


async def _write_ledger(url: str, records: Sequence[Record]) -> None:
    """Store records in a (fresh) ledger, as the server would have."""
    from controller.sim import fresh_ledger
    from ledger import open_sink

    fresh_ledger(url)
    sink = open_sink(url)
    await sink.start()
    try:
        for i in range(0, len(records), 5000):
            await sink.write(Batch(tuple(records[i : i + 5000])))
    finally:
        await sink.close()


async def run_inproc(world: World, strategy: str, ledger: str | None = None) -> StrategyResult:
    backend = InprocBackend(world.params)
    scheduler = Scheduler(world, strategy, backend)
    requests, status, balances = await scheduler.run()
    if ledger is not None:
        await _write_ledger(ledger, backend.records)
    rows = record_rows(backend.records)
    return _result(strategy, world, requests, status, balances, rows, scheduler.renewed)


# -- over sockets --------------------------------------------------------------------------------


class Worker(Protocol):
    async def call(self, command: dict[str, Any]) -> dict[str, Any]: ...
    async def close(self) -> None: ...


class LocalWorker:
    """Prosumer agents in this process (`workers=0`)."""

    def __init__(self, host: AgentHost) -> None:
        self.host = host

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        return await self.host.handle(command)

    async def close(self) -> None:
        await self.host.handle({"op": "close"})


class ProcessWorker:
    """Prosumer agents in a process of their own (`python -m participants.flex_agents`),
    one command at a time over its stdin and stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self._n = 0
        self._lock = asyncio.Lock()
        self._encode = msgspec.json.Encoder().encode

    @classmethod
    async def start(cls, url: str, behaviour: Behaviour, serializer: str) -> ProcessWorker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "participants.flex_agents", "--url", url, "--seed", str(behaviour.seed)),
            *("--answer-silent", str(behaviour.answer_silent), "--meter-missing", str(behaviour.meter_missing)),
            *("--serializer", serializer),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**26,
        )
        return cls(proc)

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        async with self._lock:
            self._n += 1
            self.proc.stdin.write(self._encode({"n": self._n, **command}) + b"\n")
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent process exited (code {await self.proc.wait()})")
        answer: dict[str, Any] = msgspec.json.decode(line)
        if "error" in answer:
            raise RuntimeError(f"agent process: {command['op']}: {answer['error']}")
        reply: dict[str, Any] = answer["reply"]
        return reply

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.call({"op": "close"}), 30)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class SocketBackend:
    """The world over a real `microte market`: the aggregator, grid operator and token
    operator are socket.io clients of this process, the prosumers agents of the workers
    (prosumer i in worker i mod K); the controller steps the server's clock."""

    def __init__(self, url: str, tokens: Mapping[str, str], workers: Sequence[Worker], serializer: str) -> None:
        self.url = url
        self.tokens = tokens
        self.workers = workers
        self.serializer = serializer
        self.ctl = socketio.AsyncClient(reconnection=False, serializer=wire.serializer(serializer))
        self.agg = AggregatorAgent(AGGREGATOR, tokens[AGGREGATOR], serializer)
        self.dso = GridOperatorAgent(DSO, tokens[DSO], serializer)
        self.ops = TokenOperatorAgent(OPERATOR, tokens[OPERATOR], serializer)
        self.request_ms: list[float] = []
        self.delivery_ms: list[float] = []
        self.step_ms: list[float] = []
        self.clock = 0
        self.started = 0.0

    async def open(self) -> None:
        await self.ctl.connect(
            self.url,
            namespaces=["/simulation"],
            transports=["websocket"],
            auth={"id": CONTROLLER, "token": self.tokens[CONTROLLER]},
        )
        for peer in (self.agg, self.dso, self.ops):
            await peer.connect(self.url)
        self.started = time.perf_counter()

    async def close(self) -> None:
        for peer in (self.agg, self.dso, self.ops):
            with contextlib.suppress(Exception):
                await peer.disconnect()
        with contextlib.suppress(Exception):
            await self.ctl.disconnect()

    def _worker(self, site: FlexSite) -> Worker:
        return self.workers[site.index % len(self.workers)]

    async def at(self, now: int) -> None:
        t0 = time.perf_counter()
        reply = await self.ctl.call("step", {"time": now}, namespace="/simulation", timeout=120)
        if not reply.get("ok"):
            raise RuntimeError(f"step {now} refused: {reply}")
        self.step_ms.append((time.perf_counter() - t0) * 1000)
        self.clock = now

    async def fund(self, micro: int) -> None:
        await self.ops.fund(AGGREGATOR, micro, "budget")

    async def choose(self, settings: dict[str, Any]) -> None:
        await self.agg.choose(settings)

    async def join(self, site: FlexSite) -> None:
        command = {"op": "join", "site": msgspec.to_builtins(site), "token": self.tokens[site.id]}
        await self._worker(site).call(command)

    async def renew(self, site: FlexSite, terms: FlexTerms) -> bool:
        command = {"op": "renew", "index": site.index, "terms": msgspec.to_builtins(terms)}
        return bool((await self._worker(site).call(command))["renewed"])

    async def active_contracts(self) -> list[dict[str, Any]]:
        return await self.agg.active_contracts()

    async def renegotiate(self, site: FlexSite, change: dict[str, Any]) -> None:
        await self._worker(site).call({"op": "renegotiate", "index": site.index, "change": change})

    async def request(self, ask: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        reply = await self.dso.request(ask)
        self.request_ms.append((time.perf_counter() - t0) * 1000)
        return reply

    async def deliver(self, request_id: str, sites: Sequence[FlexSite]) -> None:
        t0 = time.perf_counter()
        shards: dict[int, list[int]] = {}
        for site in sites:
            shards.setdefault(site.index % len(self.workers), []).append(site.index)
        await asyncio.gather(
            *(self.workers[w].call({"op": "deliver", "request": request_id, "indices": i}) for w, i in shards.items())
        )
        await self.agg.settle(request_id)  # `closed` when the last reading settled it
        self.delivery_ms.append((time.perf_counter() - t0) * 1000)

    async def finish(self, request_ids: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int]]:
        requests = [(await self.agg.results(rid))["requests"][0] for rid in request_ids]
        status = await self.agg.status()
        balances = (await self.ops.status())["balances"]
        return requests, status, balances

    async def load(self, strategy: str, prosumers: int) -> LoadStats:
        seconds = time.perf_counter() - self.started
        stats = [await w.call({"op": "stats"}) for w in self.workers]
        acks: dict[str, list[float]] = {}
        refused: Counter[str] = Counter()
        for s in stats:
            for event, values in s["latency"].items():
                acks.setdefault(event, []).extend(values)
            refused.update(s["refused"])
        return LoadStats(
            strategy=strategy,
            prosumers=prosumers,
            workers=len(self.workers),
            seconds=round(seconds, 2),
            steps=len(self.step_ms),
            acks={e: Percentiles.of(v) for e, v in sorted(acks.items())},
            request_round=Percentiles.of(self.request_ms),
            delivery_round=Percentiles.of(self.delivery_ms),
            step=Percentiles.of(self.step_ms),
            refused=dict(sorted(refused.items())),
            silent=sum(int(s["silent"]) for s in stats),
        )


def socket_compatible(params: FlexSimParams) -> None:
    """The server runs /flex with its default settings (only the slot follows --duration);
    what an aggregator may choose goes over the wire (`flex.strategy`)."""
    server = FlexConfig(slot=params.slot)
    mine = msgspec.structs.replace(params.flex, slot=params.slot, strategy=server.strategy)
    if mine != server:
        theirs, ours = msgspec.to_builtins(server), msgspec.to_builtins(mine)
        differ = sorted(k for k in ours if ours[k] != theirs[k])
        raise ValueError(
            f"--transport socket: the server's /flex settings are its defaults; flex.{', flex.'.join(differ)} "
            "differ (fair's cap and the forecast are the aggregator's: max_modulation_pct, forecast)"
        )


@contextlib.asynccontextmanager
async def _workers(url: str, behaviour: Behaviour, count: int, serializer: str) -> AsyncIterator[list[Worker]]:
    workers: list[Worker] = []
    try:
        if count == 0:
            workers.append(LocalWorker(AgentHost(url, behaviour, serializer)))
        else:
            workers += await asyncio.gather(*(ProcessWorker.start(url, behaviour, serializer) for _ in range(count)))
        yield workers
    finally:
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)


async def run_socket(
    world: World, strategy: str, ledger: str, *, workers: int = 2, serializer: str = "json"
) -> tuple[StrategyResult, LoadStats]:
    """One strategy over a `microte market` subprocess writing `ledger` (a database URL)."""
    from controller.sim import fresh_ledger, market_process, write_registry
    from ledger import read_rows

    params = world.params
    socket_compatible(params)
    ids = [AGGREGATOR, DSO, OPERATOR, CONTROLLER, *(p.id for p in world.prosumers)]
    tokens = {pid: secrets.token_urlsafe(18) for pid in ids}
    roles = {AGGREGATOR: "aggregator", DSO: "dso", OPERATOR: "operator", CONTROLLER: "controller"}
    fresh_ledger(ledger)
    behaviour = Behaviour(params.seed, params.answer_silent, params.meter_missing)
    with tempfile.TemporaryDirectory(prefix="microte-flex-") as tmp:
        registry = Path(tmp) / "registry.toml"
        write_registry(registry, tokens, roles)
        server_args = [
            *("--registry", str(registry), "--port", "0", "--ledger", ledger, "--mode", "sim"),
            *("--duration", str(params.slot), "--round-timeout", "1", "--log-level", "WARNING"),
            *("--serializer", serializer),
        ]
        async with market_process(server_args) as url, _workers(url, behaviour, workers, serializer) as shards:
            backend = SocketBackend(url, tokens, shards, serializer)
            await backend.open()
            try:
                scheduler = Scheduler(world, strategy, backend)
                requests, status, balances = await scheduler.run()
                load = await backend.load(strategy, len(world.prosumers))
            finally:
                await backend.close()
    rows = {t: read_rows(ledger, t) for t in FLEX_TABLES}  # the server has stopped: all flushed
    return _result(strategy, world, requests, status, balances, rows, scheduler.renewed), load


# -- both strategies ------------------------------------------------------------------------------


def _summary(world: World, last: StrategyResult | None) -> WorldSummary:
    down = sum(1 for r in world.renegotiations if r.downward)
    return WorldSummary(
        prosumers=dict(sorted(Counter(p.source for p in world.prosumers).items())),
        joined_later=sum(1 for p in world.prosumers if p.joins > 0),
        requests=len(world.requests),
        renegotiations_down=down,
        renegotiations_up=len(world.renegotiations) - down,
        expired=last.expired if last else 0,  # the same in every run
        renewed=last.renewed if last else 0,
    )


def _ledger(ledger_dir: str | Path | None, transport: str, strategy: str) -> str | None:
    if ledger_dir is None:
        return None
    return f"sqlite:///{Path(ledger_dir) / f'flexsim-{transport}-{strategy}.db'}"


async def run_async(
    params: FlexSimParams,
    *,
    transport: str = "inproc",
    workers: int = 2,
    ledger_dir: str | Path | None = None,
    serializer: str = "json",
) -> tuple[FlexSimReport, tuple[LoadStats, ...]]:
    """Every strategy of `params` over `transport`; with `ledger_dir`, each run's ledger is
    the SQLite file `flexsim-{transport}-{strategy}.db` there (socket runs without one write
    to a temporary directory)."""
    world = make_world(params)
    results: list[StrategyResult] = []
    loads: list[LoadStats] = []
    if ledger_dir is not None:
        Path(ledger_dir).mkdir(parents=True, exist_ok=True)
    for strategy in params.strategies:
        if transport == "inproc":
            results.append(await run_inproc(world, strategy, _ledger(ledger_dir, transport, strategy)))
            continue
        with tempfile.TemporaryDirectory(prefix="microte-flexsim-") as tmp:
            ledger = _ledger(ledger_dir or tmp, transport, strategy)
            assert ledger is not None
            result, load = await run_socket(world, strategy, ledger, workers=workers, serializer=serializer)
        results.append(result)
        loads.append(load)
    return FlexSimReport(params, _summary(world, results[-1] if results else None), tuple(results)), tuple(loads)


def run(params: FlexSimParams) -> FlexSimReport:
    """In process (the report only)."""
    return runloop.run(run_async(params))[0]


# -- the report ------------------------------------------------------------------------------


def _kwh(wh: int) -> str:
    return f"{wh / 1000:,.1f}"


def _money(micro: int) -> str:
    return f"{micro / 1e6:,.2f}"


def render(report: FlexSimReport, loads: Sequence[LoadStats] = ()) -> str:
    p, w = report.params, report.world
    mix = ", ".join(f"{n} {src}" for src, n in w.prosumers.items())
    lines = [
        f"flexsim seed={p.seed}: {sum(w.prosumers.values())} prosumers ({mix}), {w.joined_later} joined over "
        f"{p.days:g} days; {w.requests} grid requests of {p.request_fraction[0]:.0%}-{p.request_fraction[1]:.0%}; "
        f"renegotiations {w.renegotiations_down} down / {w.renegotiations_up} up; contracts expired {w.expired}, "
        f"renewed {w.renewed}; max modulation {p.max_modulation_pct} %, forecast {'on' if p.forecast else 'off'}, "
        f"budget {p.budget:,.2f}",
        "",
    ]
    rs = report.results
    rows: list[tuple[str, Sequence[str]]] = [
        ("requests handled", [str(r.requests) for r in rs]),
        ("requested kWh", [_kwh(r.requested_wh) for r in rs]),
        ("allocated kWh", [_kwh(r.allocated_wh) for r in rs]),
        ("delivered kWh", [_kwh(r.delivered_wh) for r in rs]),
        ("delivered / requested", [f"{r.delivered_share:.1%}" for r in rs]),
        ("requests short", [str(r.shortfall_requests) for r in rs]),
        ("  of them by the budget", [str(r.budget_requests) for r in rs]),
        ("allocations", [str(r.allocations) for r in rs]),
        ("met within margin", [f"{r.met} ({r.met_share:.0%})" for r in rs]),
        ("displaced", [str(r.displaced) for r in rs]),
        ("prosumers allocated", [str(r.participants) for r in rs]),
        ("rewards", [_money(r.rewards) for r in rs]),
        ("penalties", [_money(r.penalties) for r in rs]),
        ("  collected", [_money(r.penalties_paid) for r in rs]),
        ("aggregator tokens left", [_money(r.tokens_left) for r in rs]),
        ("lowest balance", [_money(r.min_balance) for r in rs]),
        ("mean reputation", [f"{r.mean_reputation:.1f}" for r in rs]),
        ("ledger records", [str(r.records) for r in rs]),
        ("flex digest", [r.digest[:12] for r in rs]),
    ]
    width = max(14, *(len(r.strategy) + 2 for r in rs))
    lines.append(f"  {'':<24}" + "".join(f"{r.strategy:>{width}}" for r in rs))
    for label, values in rows:
        lines.append(f"  {label:<24}" + "".join(f"{v:>{width}}" for v in values))
    lines.append("  (energies in kWh, money in currency units; delivered = credited flexibility)")
    for load in loads:
        lines += ["", _render_load(load)]
    return "\n".join(lines)


def _render_load(load: LoadStats) -> str:
    def ms(x: Percentiles) -> str:
        return f"n {x.n:>6}  p50 {x.p50:>8.1f}  p95 {x.p95:>8.1f}  p99 {x.p99:>8.1f}  max {x.max:>8.1f}"

    lines = [
        f"socket run ({load.strategy}): {load.prosumers} prosumers in {load.workers} agent process(es), "
        f"{load.seconds:.1f} s, {load.steps} steps; ms:"
    ]
    for event, x in load.acks.items():
        lines.append(f"  ack {event:<26}{ms(x)}")
    lines.append(f"  {'request round':<30}{ms(load.request_round)}")
    lines.append(f"  {'delivery round':<30}{ms(load.delivery_round)}")
    lines.append(f"  {'step':<30}{ms(load.step)}")
    refused = ", ".join(f"{c} {n}" for c, n in load.refused.items()) or "none"
    lines.append(f"  prosumers' events refused: {refused}; offers left silent: {load.silent}")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("params", nargs="?", help="TOML file with FlexSimParams fields (top level or a [flexsim] table)")
    p.add_argument("--seed", type=int)
    p.add_argument("--prosumers", type=int)
    p.add_argument("--days", type=float)
    p.add_argument("--strategy", action="append", choices=["fair", "reputation"], help="repeat for several")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any FlexSimParams field, the value in TOML (e.g. max_modulation_pct=50, request_fraction=[0.05,0.25])",
    )
    p.add_argument(
        "--transport",
        choices=["inproc", "socket"],
        default="inproc",
        help="inproc: the core in this process; socket: a microte market subprocess, its ledger and socket.io "
        "agents (the same report and flex digest)",
    )
    p.add_argument("--workers", type=int, default=2, help="socket: processes the prosumer agents are split over")
    p.add_argument("--ledger-dir", help="write each run's ledger as flexsim-TRANSPORT-STRATEGY.db there")
    p.add_argument("--serializer", choices=["json", "msgpack"], default="json")


def _settings(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"flexsim --set {pair!r}: KEY=VALUE")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare word
    return out


def load_params(path: str | None, **overrides: Any) -> FlexSimParams:
    data: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            loaded = tomllib.load(f)
        data = loaded.get("flexsim", loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(data, FlexSimParams, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise SystemExit(f"flexsim parameters: {exc}") from None


def main(args: argparse.Namespace) -> int:
    strategies = tuple(args.strategy) if args.strategy else None
    overrides = _settings(getattr(args, "set", []) or [])
    overrides.update(seed=args.seed, prosumers=args.prosumers, days=args.days, strategies=strategies)
    params = load_params(args.params, **overrides)
    transport = getattr(args, "transport", "inproc")
    try:
        report, loads = runloop.run(
            run_async(
                params,
                transport=transport,
                workers=getattr(args, "workers", 2),
                ledger_dir=getattr(args, "ledger_dir", None),
                serializer=getattr(args, "serializer", "json"),
            )
        )
    except ValueError as err:
        print(f"microte flexsim: {err}", file=sys.stderr)
        return 2
    print(render(report, loads))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="microte flexsim")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
