"""`microte flexsim`: the seed 001 simulation of an aggregator's flexibility (docs/flexibility.md).

n prosumers with a realistic mix of sources (solar, wind, battery) join the aggregator over
time (a seeded Poisson process), register contracts, renegotiate them at random (mostly
downward) and renew some when they expire; the grid operator sends flexibility requests at
random (another Poisson process). Each request goes through the real core
(`market.flexibility.Flexibility`): offers, answers, allocation, meter readings after the
window, delivery check, tokens and reputation. The same world is played once per
allocation strategy, and the report compares requested against delivered flexibility.

Reproducible by construction: the world (prosumers, joins, requests, renegotiations) is
drawn from the seed before any strategy runs, and every random answer or delivery outcome
comes from a generator keyed by (seed, what, request, prosumer), so both strategies face
exactly the same draws and the same seed prints the same report.
"""

from __future__ import annotations

import argparse
import heapq
import tomllib
from collections import Counter
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from market.flexibility.contracts import energy_wh
from market.flexibility.machine import Flexibility
from market.flexibility.messages import (
    AnswerMsg,
    ContractRegisterMsg,
    ContractRenegotiateMsg,
    FlexConfig,
    FlexMeterMsg,
    RequestMsg,
    RequestRefMsg,
)
from participants.devices import Battery
from participants.spec import BatterySpec, PvSpec, WindSpec

AGGREGATOR = "AGG"
DSO = "DSO"
HOUR = 3600
DAY = 86400
START = 1_767_225_600  # 2026-01-01T00:00:00Z, a multiple of 900

# keys of the per-event generators
_PROSUMER, _JOIN, _REQUEST, _RENEGOTIATE, _ANSWER, _DELIVER, _RENEW = range(1, 8)

Source = Literal["solar", "wind", "bess"]


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
    flex: FlexConfig = FlexConfig()

    def __post_init__(self) -> None:
        if set(self.mix) - {"solar", "wind", "bess"} or not any(v > 0 for v in self.mix.values()):
            raise ValueError("mix: weights of solar, wind and bess, one at least > 0")
        lo, hi = self.request_fraction
        if not 0 < lo <= hi <= 1:
            raise ValueError("request_fraction: 0 < low <= high <= 1")


# -- the world ---------------------------------------------------------------------------------


class SimProsumer(msgspec.Struct, frozen=True):
    """A site and the terms it offers; `reliability` is the chance it delivers more than the
    25 % everyone can (its own, unknown to the aggregator: reputation has to learn it)."""

    id: str
    source: Source
    joins: int  # seconds after the start
    terms: ContractRegisterMsg
    reliability: float
    accept: float  # chance it accepts an offer
    pv: PvSpec | None = None
    wind: WindSpec | None = None
    battery: BatterySpec | None = None


class SimRequest(msgspec.Struct, frozen=True):
    at: int  # seconds after the start
    lead: int  # seconds from `at` to the window's start (before alignment)
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
    prosumers: tuple[SimProsumer, ...]
    requests: tuple[SimRequest, ...]
    renegotiations: tuple[SimRenegotiation, ...]


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed % 2**63, *key])


def _price(rng: np.random.Generator, lo: float, hi: float) -> float:
    return round(float(rng.uniform(lo, hi)), 3)


def make_prosumer(index: int, joins: int, params: FlexSimParams) -> SimProsumer:
    """A seeded site: solar (household with PV), wind (small turbine) or battery; sizes as
    in `participants.spec.synthetic_spec`."""
    rng = _rng(params.seed, _PROSUMER, index)
    names = sorted(params.mix)
    weights = np.array([params.mix[n] for n in names], dtype=float)
    source: Source = names[int(rng.choice(len(names), p=weights / weights.sum()))]  # type: ignore[assignment]
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
    terms = ContractRegisterMsg(
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
    return SimProsumer(
        id=f"F{index + 1:04d}",
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
    initial = min(params.initial, params.prosumers)
    joins = [0] * initial + _poisson_times(
        _rng(params.seed, _JOIN), params.join_rate, horizon, params.prosumers - initial
    )
    prosumers = tuple(make_prosumer(i, t, params) for i, t in enumerate(joins))
    rng = _rng(params.seed, _REQUEST)
    lo, hi = params.request_fraction
    requests = tuple(
        SimRequest(
            at=t,
            lead=int(rng.choice([900, 1800])),
            slots=int(rng.integers(1, 5)),
            up=bool(rng.random() < params.up_share),
            fraction=float(rng.uniform(lo, hi)),
        )
        for t in _poisson_times(rng, params.request_rate, horizon)
    )
    rng = _rng(params.seed, _RENEGOTIATE)
    renegotiations: list[SimRenegotiation] = []
    if params.renegotiation_rate > 0:
        # A rate per contract: draw at the rate of the whole community, pick a contract then.
        for t in _poisson_times(rng, params.renegotiation_rate * params.prosumers / 24, horizon):
            down = bool(rng.random() < params.downward_share)
            factor = float(rng.uniform(0.5, 0.9) if down else rng.uniform(1.05, 1.3))
            renegotiations.append(SimRenegotiation(t, float(rng.random()), down, factor))
    return World(params, prosumers, requests, tuple(renegotiations))


# -- playing it ------------------------------------------------------------------------------


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
    rewards: int  # micro-currency
    penalties: int
    participants: int  # distinct prosumers allocated at least once
    mean_reputation: float
    records: int  # ledger records the core produced

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


class _Event(msgspec.Struct, frozen=True, order=True):
    time: int
    order: int  # tie-break: creation order
    kind: str
    index: int


class _Player:
    """One run of the world under one strategy."""

    def __init__(self, world: World, strategy: str) -> None:
        self.world = world
        self.params = world.params
        self.seed = world.params.seed
        config = msgspec.structs.replace(world.params.flex, slot=world.params.slot, strategy=strategy)
        self.core = Flexibility(config)
        self.by_id = {p.id: i for i, p in enumerate(world.prosumers)}
        self.queue: list[_Event] = []
        self.records = 0
        self.renewed = 0
        self.renewals: list[tuple[int, ContractRegisterMsg]] = []
        self.rids: dict[int, str] = {}  # world request index -> core request id
        self.expired = 0
        self.end = START + int(world.params.days * DAY)  # no event after it but deliveries
        self._seq = 0

    def push(self, time: int, kind: str, index: int) -> None:
        self._seq += 1
        heapq.heappush(self.queue, _Event(time, self._seq, kind, index))

    def flush(self) -> None:
        records, _notices = self.core.take_outbox()
        self.records += len(records)

    def run(self) -> StrategyResult:
        for i, p in enumerate(self.world.prosumers):
            self.push(START + p.joins, "join", i)
        for i, q in enumerate(self.world.requests):
            self.push(START + q.at, "request", i)
        for i, r in enumerate(self.world.renegotiations):
            self.push(START + r.at, "renegotiate", i)
        while self.queue:
            ev = heapq.heappop(self.queue)
            self.expired += self.core.expire(ev.time)
            getattr(self, f"_{ev.kind}")(ev.time, ev.index)
            self.flush()
        return self.result()

    # -- events ------------------------------------------------------------------------

    def _join(self, now: int, index: int) -> None:
        p = self.world.prosumers[index]
        self.core.register(p.id, p.terms, now)
        self._schedule_renewal(index, p.terms)

    def _schedule_renewal(self, index: int, terms: ContractRegisterMsg) -> None:
        rng = _rng(self.seed, _RENEW, index, terms.expires)
        if rng.random() < self.params.renew_share:
            at = terms.expires + int(rng.uniform(0, 6 * HOUR))
            if at < self.end:
                self.renewals.append((index, terms))
                self.push(at, "renew", len(self.renewals) - 1)

    def _renew(self, now: int, n: int) -> None:
        index, old = self.renewals[n]
        p = self.world.prosumers[index]
        current = self.core.active_contract(p.id)
        if current is not None:
            return  # still active (renegotiated to a later expiry)
        rng = _rng(self.seed, _RENEW, index, old.expires, 1)
        terms = msgspec.structs.replace(
            old, expires=now + int(rng.uniform(1, 5) * DAY) // self.params.slot * self.params.slot
        )
        self.core.register(p.id, terms, now)
        self.renewed += 1
        self._schedule_renewal(index, terms)

    def _renegotiate(self, now: int, n: int) -> None:
        r = self.world.renegotiations[n]
        active = sorted((c for c in self.core.contracts(AGGREGATOR) if c.status == "active"), key=lambda c: c.seq)
        if not active:
            return
        c = active[min(len(active) - 1, int(r.pick * len(active)))]
        up = max(0, round(c.flex_up * r.factor))
        down = max(0, round(c.flex_down * r.factor))
        if up == 0 and down == 0:
            return
        self.core.renegotiate(c.prosumer, ContractRenegotiateMsg(id=c.id, flex_up=up, flex_down=down), now)

    def _request(self, now: int, n: int) -> None:
        r = self.world.requests[n]
        slot = self.params.slot
        direction: Literal["up", "down"] = "up" if r.up else "down"
        active = [c for c in self.core.contracts(AGGREGATOR) if c.status == "active"]
        total = sum(c.capacity(direction) for c in active)
        power = round(r.fraction * total)
        if power <= 0:
            return
        start = -(-(now + r.lead) // slot) * slot
        msg = RequestMsg(
            aggregator=AGGREGATOR, power=power if r.up else -power, start=start, end=start + r.slots * slot
        )
        opened = self.core.open_request(DSO, msg, now)
        rid = opened.request.id
        for pid in opened.request.offered:
            i = self.by_id[pid]
            rng = _rng(self.seed, _ANSWER, n, i)
            if rng.random() < self.params.answer_silent:
                continue
            accept = bool(rng.random() < self.world.prosumers[i].accept)
            self.core.answer(pid, AnswerMsg(request=rid, accept=accept), now)
        self.core.allocate(rid, now)
        self.rids[n] = rid
        self.push(msg.end, "deliver", n)

    def _deliver(self, now: int, n: int) -> None:
        rid = self.rids[n]
        req = self.core.request(rid)
        if req.status == "settled":
            return
        seconds = req.end - req.start
        for a in self.core.allotments(rid):
            if a.status != "allocated":
                continue
            i = self.by_id[a.prosumer]
            p = self.world.prosumers[i]
            contract = self.core.contract(a.contract)
            rng = _rng(self.seed, _DELIVER, n, i)
            if rng.random() < self.params.meter_missing:
                continue
            expected = energy_wh(abs(a.power), seconds)
            fraction = abs(a.power) / max(1, contract.capacity(req.direction))
            able = rng.random() < (0.98 if fraction <= 0.25 else p.reliability)
            if p.battery is not None:
                able = able and _battery_can(p.battery, rng, expected, a.power > 0, seconds)
            noise = float(rng.normal(0, 0.03))
            short = float(rng.uniform(0, 0.8))
            delivered = round(expected * (1 + noise)) if able else round(expected * short)
            net = a.baseline + (delivered if a.power > 0 else -delivered)
            production = max(0, net + contract.consumption)
            consumption = production - net
            meter = FlexMeterMsg(
                request=rid, time_interval=(req.start, req.end), production=production, consumption=consumption
            )
            self.core.meter(a.prosumer, meter, now)
        if self.core.request(rid).status != "settled":
            self.core.settle(AGGREGATOR, RequestRefMsg(request=rid), now)

    # -- outcome -----------------------------------------------------------------------

    def result(self) -> StrategyResult:
        requests = [r for r in self.core.requests() if r.aggregator == AGGREGATOR]
        wires = [self.core.request_wire(r) for r in requests]
        allocated_to = {a["prosumer"] for w in wires for a in w["allocations"]}
        joined = [p.id for p in self.world.prosumers]
        reps = [self.core.reputation(p) for p in joined]
        return StrategyResult(
            strategy=self.core.config.strategy,
            requests=len(wires),
            requested_wh=sum(w["requested_wh"] for w in wires),
            allocated_wh=sum(w["expected_wh"] for w in wires),
            delivered_wh=sum(w["delivered_wh"] for w in wires),
            allocations=sum(len(w["allocations"]) for w in wires),
            met=sum(w["met"] for w in wires),
            displaced=sum(len(w["displaced"]) for w in wires),
            shortfall_requests=sum(1 for w in wires if w["shortfall"] > 0),
            rewards=sum(w["rewards"] for w in wires),
            penalties=sum(w["penalties"] for w in wires),
            participants=len(allocated_to),
            mean_reputation=round(sum(reps) / len(reps), 2) if reps else 0.0,
            records=self.records,
        )


def _battery_can(spec: BatterySpec, rng: np.random.Generator, wh: int, up: bool, seconds: int) -> bool:
    """Whether a battery at a random state of charge can give (up) or take (down) `wh` in the window."""
    battery = msgspec.structs.replace(
        Battery.from_spec(spec), soc_wh=round(float(rng.uniform(0.1, 0.95)) * spec.capacity_wh)
    )
    if wh > battery.limit(seconds):
        return False
    return battery.soc_wh >= wh if up else battery.max_input() >= wh


def run(params: FlexSimParams) -> FlexSimReport:
    world = make_world(params)
    results: list[StrategyResult] = []
    expired = renewed = 0
    for strategy in params.strategies:
        player = _Player(world, strategy)
        results.append(player.run())
        expired, renewed = player.expired, player.renewed  # the same in every run
    down = sum(1 for r in world.renegotiations if r.downward)
    summary = WorldSummary(
        prosumers=dict(sorted(Counter(p.source for p in world.prosumers).items())),
        joined_later=sum(1 for p in world.prosumers if p.joins > 0),
        requests=len(world.requests),
        renegotiations_down=down,
        renegotiations_up=len(world.renegotiations) - down,
        expired=expired,
        renewed=renewed,
    )
    return FlexSimReport(params, summary, tuple(results))


# -- the report ------------------------------------------------------------------------------


def _kwh(wh: int) -> str:
    return f"{wh / 1000:,.1f}"


def _money(micro: int) -> str:
    return f"{micro / 1e6:,.2f}"


def render(report: FlexSimReport) -> str:
    p, w = report.params, report.world
    mix = ", ".join(f"{n} {src}" for src, n in w.prosumers.items())
    lines = [
        f"flexsim seed={p.seed}: {sum(w.prosumers.values())} prosumers ({mix}), {w.joined_later} joined over "
        f"{p.days:g} days; {w.requests} grid requests; renegotiations {w.renegotiations_down} down / "
        f"{w.renegotiations_up} up; contracts expired {w.expired}, renewed {w.renewed}",
        "",
    ]
    rows: list[tuple[str, Sequence[str]]] = [
        ("requests handled", [str(r.requests) for r in report.results]),
        ("requested kWh", [_kwh(r.requested_wh) for r in report.results]),
        ("allocated kWh", [_kwh(r.allocated_wh) for r in report.results]),
        ("delivered kWh", [_kwh(r.delivered_wh) for r in report.results]),
        ("delivered / requested", [f"{r.delivered_share:.1%}" for r in report.results]),
        ("requests short", [str(r.shortfall_requests) for r in report.results]),
        ("allocations", [str(r.allocations) for r in report.results]),
        ("met within margin", [f"{r.met} ({r.met_share:.0%})" for r in report.results]),
        ("displaced", [str(r.displaced) for r in report.results]),
        ("prosumers allocated", [str(r.participants) for r in report.results]),
        ("rewards", [_money(r.rewards) for r in report.results]),
        ("penalties", [_money(r.penalties) for r in report.results]),
        ("mean reputation", [f"{r.mean_reputation:.1f}" for r in report.results]),
        ("ledger records", [str(r.records) for r in report.results]),
    ]
    width = max(12, *(len(r.strategy) + 2 for r in report.results))
    lines.append(f"  {'':<24}" + "".join(f"{r.strategy:>{width}}" for r in report.results))
    for label, values in rows:
        lines.append(f"  {label:<24}" + "".join(f"{v:>{width}}" for v in values))
    lines.append("  (energies in kWh, money in currency units; delivered = credited flexibility)")
    return "\n".join(lines)


# -- command line ----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("params", nargs="?", help="TOML file with FlexSimParams fields (top level or a [flexsim] table)")
    p.add_argument("--seed", type=int)
    p.add_argument("--prosumers", type=int)
    p.add_argument("--days", type=float)
    p.add_argument("--strategy", action="append", choices=["fair", "reputation"], help="repeat for several")


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
    params = load_params(args.params, seed=args.seed, prosumers=args.prosumers, days=args.days, strategies=strategies)
    print(render(run(params)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="microte flexsim")
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
