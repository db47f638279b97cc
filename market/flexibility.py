"""Flexibility (seed 001, Energy Web) as a pure core: docs/flexibility.md is its contract.

Each prosumer has at most one active **contract** with its aggregator: the production and
consumption it expects (its baseline), the flexibility it guarantees up (more production
or less consumption) and down (less production or more consumption), for how long, the
longest delay it needs between notice and delivery, a price per kWh for each direction,
and an expiry. Contracts are registered, renegotiated (a downward renegotiation costs
reputation), cancelled and expire; every change is a ledger record.

A grid operator (`dso`) **requests** +/-P W from an aggregator over `[start, end]`. The
request is offered to the aggregator's prosumers whose contract can serve it; those that
accept before the deadline are the candidates of the aggregator's **allocation strategy**
(`fair` or `reputation`, or any other `Strategy`); one request is handled at a time.
After the window, each allocated prosumer's meter data is **checked** against its
baseline (met within a 10 % margin or not); rewards and penalties move tokens (integer
micro-currency) and reputation follows (+ compliance, + participation, - downward
renegotiation, - penalties).

Nothing here touches a socket, clock or database: every method takes `now` (market time),
returns its reply, and leaves ledger records and server-to-client notices in an outbox
(`take_outbox`) that the namespace handler writes and emits. `snapshot`/`restore` let the
handler undo an event whose records could not be made durable.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol

import msgspec

from market.errors import MarketError
from market.protocol import ClientId, Interval, Message, Source, Time, Wh
from market.records import (
    FlexAllocationRecord,
    FlexAnswerRecord,
    FlexContractRecord,
    FlexDeliveryRecord,
    FlexReputationRecord,
    FlexRequestRecord,
    FlexTokenRecord,
    Record,
    amount,
)

MAX_POWER = 10**9  # W
YEAR = 366 * 86400

PowerW = Annotated[int, msgspec.Meta(ge=0, le=MAX_POWER)]
SignedPowerW = Annotated[int, msgspec.Meta(ge=-MAX_POWER, le=MAX_POWER)]
Seconds = Annotated[int, msgspec.Meta(ge=0, le=YEAR)]
Duration = Annotated[int, msgspec.Meta(gt=0, le=YEAR)]
FlexPrice = Annotated[float, msgspec.Meta(ge=0, le=1e6)]  # per kWh; NaN and inf fail the bounds
PartyId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
RefId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
StrategyName = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]*$")]
Direction = Literal["up", "down"]
ContractStatus = Literal["active", "cancelled", "expired"]
RequestStatus = Literal["open", "allocated", "settled"]
Answer = Literal["accept", "decline", "silent"]
Notice = tuple[str, str, dict[str, Any]]  # (participant id, server-to-client event, payload)


# -- wire messages ---------------------------------------------------------------------------


class ContractRegisterMsg(Message, frozen=True):
    """`flex.contract.register` (prosumer)."""

    aggregator: PartyId
    source: Source
    production: PowerW
    consumption: PowerW
    flex_up: PowerW
    flex_down: PowerW
    duration: Duration
    notice: Seconds
    price_up: FlexPrice
    price_down: FlexPrice
    expires: Time


class ContractRenegotiateMsg(Message, frozen=True):
    """`flex.contract.renegotiate` (prosumer): the terms given replace the contract's."""

    id: RefId
    production: PowerW | None = None
    consumption: PowerW | None = None
    flex_up: PowerW | None = None
    flex_down: PowerW | None = None
    duration: Duration | None = None
    notice: Seconds | None = None
    price_up: FlexPrice | None = None
    price_down: FlexPrice | None = None
    expires: Time | None = None


class ContractRefMsg(Message, frozen=True):
    """`flex.contract.cancel` (the prosumer or its aggregator)."""

    id: RefId


class StrategyMsg(Message, frozen=True):
    """`flex.strategy` (aggregator)."""

    strategy: StrategyName


class RequestMsg(Message, frozen=True):
    """`flex.request` (dso): `power` W over `[start, end]`, > 0 up, < 0 down."""

    aggregator: PartyId
    power: SignedPowerW
    start: Time
    end: Time
    answer_within: Annotated[float, msgspec.Meta(gt=0, le=3600)] | None = None
    id: ClientId | None = None


class AnswerMsg(Message, frozen=True):
    """`flex.answer` (prosumer)."""

    request: RefId
    accept: bool


class FlexMeterMsg(Message, frozen=True):
    """`flex.meter` (prosumer): energy metered over the request's window."""

    request: RefId
    time_interval: Interval
    production: Wh
    consumption: Wh


class RequestRefMsg(Message, frozen=True):
    """`flex.settle` (aggregator, dso)."""

    request: RefId


class ResultsMsg(Message, frozen=True):
    """`flex.results` (aggregator, dso): one request or all."""

    request: RefId | None = None


# -- settings --------------------------------------------------------------------------------


class ReputationRules(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Reputation points: every prosumer starts at `initial`; scores stay in [floor, ceiling]."""

    initial: int = 100
    compliance: int = 10  # + a delivery met within the margin
    participation: int = 2  # + an accepted request
    renegotiation: int = 5  # - a downward renegotiation
    penalty: int = 10  # - a delivery not met
    floor: int = 0
    ceiling: int = 1000

    def clamp(self, score: int) -> int:
        return max(self.floor, min(self.ceiling, score))


class FlexConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    slot: Annotated[int, msgspec.Meta(gt=0, le=86400)] = 900  # request windows align to it (seed: 15 min)
    max_window: Annotated[int, msgspec.Meta(gt=0, le=7 * 86400)] = 86400
    answer_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0  # default answer deadline, s
    margin_pct: Annotated[int, msgspec.Meta(ge=0, le=100)] = 10  # delivery met within this margin
    penalty_rate: Annotated[float, msgspec.Meta(ge=0, le=100)] = 1.0  # penalty per kWh missed / price
    strategy: StrategyName = "fair"  # of aggregators that never chose one
    max_modulation_pct: Annotated[int, msgspec.Meta(gt=0, le=100)] = 25  # fair: seed's simplification
    price_weight: Annotated[int, msgspec.Meta(ge=0, le=10**6)] = 100  # reputation points per currency/kWh
    reputation: ReputationRules = ReputationRules()
    max_contracts: Annotated[int, msgspec.Meta(gt=0)] = 100_000
    max_requests: Annotated[int, msgspec.Meta(gt=0)] = 100_000


# -- arithmetic ------------------------------------------------------------------------------


def energy_wh(power_w: int, seconds: int) -> int:
    """Wh of `power_w` W held for `seconds`, rounded half up (floor(x + 1/2), also below 0)."""
    return (power_w * seconds + 1800) // 3600


class DeliveryCheck(msgspec.Struct, frozen=True):
    """The outcome of one allocation's delivery (all energies Wh, money micro-currency)."""

    expected: int  # flexibility asked over the window
    baseline: int  # net energy the contract expects without activation
    delivered: int  # flexibility metered in the request's direction against the baseline
    credited: int  # what is paid: delivered, clamped to [0, expected]
    met: bool
    reward: int
    penalty: int


def check_delivery(
    *,
    power: int,
    seconds: int,
    baseline: int,
    price: float,
    reading: tuple[int, int] | None,
    margin_pct: int = 10,
    penalty_rate: float = 1.0,
) -> DeliveryCheck:
    """Check an allocation of `power` W (signed as its request) over `seconds` against the
    `baseline` Wh (net production - consumption the contract expects over the window).

    `reading` is the (production, consumption) Wh metered over the window, None if none
    arrived. delivered = sign * ((production - consumption) - baseline); met when
    |delivered - expected| <= margin * expected (integers: 100 * deviation <= margin_pct *
    expected); no reading is never met and counts as nothing delivered. The reward pays the
    credited energy at the contract price; a miss also costs a penalty on the deviation
    (at most the expected energy) at `price * penalty_rate`.
    """
    sign = 1 if power > 0 else -1
    expected = energy_wh(abs(power), seconds)
    delivered = 0 if reading is None else sign * ((reading[0] - reading[1]) - baseline)
    deviation = abs(delivered - expected)
    met = reading is not None and 100 * deviation <= margin_pct * expected
    credited = min(max(delivered, 0), expected)
    reward = amount(credited, price)
    penalty = 0 if met else amount(min(deviation, expected), price * penalty_rate)
    return DeliveryCheck(expected, baseline, delivered, credited, met, reward, penalty)


# -- allocation strategies -------------------------------------------------------------------


class Candidate(msgspec.Struct, frozen=True):
    """A prosumer that accepted a request: what its contract guarantees in its direction."""

    prosumer: str
    capacity: int  # W
    reputation: int
    price: float  # per kWh
    seq: int = 0  # contract order (older first on a full tie)


class Share(msgspec.Struct, frozen=True):
    prosumer: str
    power: int  # W, > 0


class Allocation(msgspec.Struct, frozen=True):
    """Shares in the strategy's order; `displaced` accepted but got nothing; `shortfall` W
    of the need that could not be allocated, with the `reason` (None when it is 0)."""

    shares: tuple[Share, ...]
    displaced: tuple[str, ...]
    shortfall: int
    reason: str | None

    @property
    def allocated(self) -> int:
        return sum(s.power for s in self.shares)


class Strategy(Protocol):
    """An allocation strategy: split `need` W (> 0) among the candidates, never giving one
    more than its `capacity`. Deterministic: the same candidates give the same allocation."""

    name: str

    def allocate(self, need: int, candidates: Sequence[Candidate]) -> Allocation: ...


def _shares(candidates: Sequence[Candidate], powers: Sequence[int]) -> tuple[tuple[Share, ...], tuple[str, ...]]:
    shares = tuple(Share(c.prosumer, p) for c, p in zip(candidates, powers, strict=True) if p > 0)
    displaced = tuple(c.prosumer for c, p in zip(candidates, powers, strict=True) if p <= 0)
    return shares, displaced


class FairStrategy:
    """Every accepting prosumer contributes in proportion to its contracted flexibility.

    The seed's simplification: modulation stays within `max_modulation_pct` (25 %) of each
    contract, which everyone is assumed able to deliver. So prosumer i's limit is
    floor(capacity_i * pct / 100); if the need is at least the sum of the limits each gives
    its limit (and the rest is the shortfall), else the need is apportioned exactly by
    largest remainder: floor(need * capacity_i / total) each, then one W more to the largest
    remainders (ties: larger capacity, then candidate order) while below their limit.
    """

    name: str = "fair"

    def __init__(self, max_modulation_pct: int = 25) -> None:
        if not 0 < max_modulation_pct <= 100:
            raise ValueError("max_modulation_pct must be in 1..100")
        self.pct = max_modulation_pct

    def allocate(self, need: int, candidates: Sequence[Candidate]) -> Allocation:
        if need <= 0:
            raise ValueError("need must be > 0")
        total = sum(c.capacity for c in candidates)
        limits = [c.capacity * self.pct // 100 for c in candidates]
        room = sum(limits)
        if not candidates:
            return Allocation((), (), need, "no prosumer accepted")
        if room <= need:
            shares, displaced = _shares(candidates, limits)
            shortfall = need - room
            reason = None
            if shortfall:
                reason = (
                    f"fair: accepting prosumers modulate at most {self.pct} % of their contracted "
                    f"flexibility ({room} W of {total} W)"
                )
            return Allocation(shares, displaced, shortfall, reason)
        powers = [need * c.capacity // total for c in candidates]
        remainders = [need * c.capacity % total for c in candidates]
        order = sorted(range(len(candidates)), key=lambda i: (-remainders[i], -candidates[i].capacity, i))
        left = need - sum(powers)
        while left > 0:  # terminates: room > need, so some candidate is below its limit
            for i in order:
                if left and powers[i] < limits[i]:
                    powers[i] += 1
                    left -= 1
        shares, displaced = _shares(candidates, powers)
        return Allocation(shares, displaced, 0, None)


class ReputationStrategy:
    """Prosumers in order of reputation, ties by guaranteed flexibility; the price is
    considered so that everyone gets a chance: the rank score is
    `reputation - round(price_weight * price)` (a cheaper prosumer can pass a better reputed
    one), then capacity (larger first), price (cheaper first), contract order. Each in turn
    gets its full contracted flexibility until the need is met; the rest are displaced."""

    name: str = "reputation"

    def __init__(self, price_weight: int = 100) -> None:
        if price_weight < 0:
            raise ValueError("price_weight must be >= 0")
        self.price_weight = price_weight

    def score(self, c: Candidate) -> int:
        return c.reputation - round(self.price_weight * c.price)

    def order(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (-self.score(c), -c.capacity, c.price, c.seq, c.prosumer))

    def allocate(self, need: int, candidates: Sequence[Candidate]) -> Allocation:
        if need <= 0:
            raise ValueError("need must be > 0")
        if not candidates:
            return Allocation((), (), need, "no prosumer accepted")
        ranked = self.order(candidates)
        powers: list[int] = []
        left = need
        for c in ranked:
            take = min(c.capacity, left)
            powers.append(take)
            left -= take
        shares, displaced = _shares(ranked, powers)
        reason = None
        if left:
            total = sum(c.capacity for c in candidates)
            reason = f"reputation: accepting prosumers guarantee {total} W in all"
        return Allocation(shares, displaced, left, reason)


def default_strategies(config: FlexConfig) -> dict[str, Strategy]:
    return {
        "fair": FairStrategy(config.max_modulation_pct),
        "reputation": ReputationStrategy(config.price_weight),
    }


# -- state -----------------------------------------------------------------------------------


class Contract(msgspec.Struct, frozen=True):
    id: str
    prosumer: str
    aggregator: str
    source: str
    production: int
    consumption: int
    flex_up: int
    flex_down: int
    duration: int
    notice: int
    price_up: float
    price_down: float
    expires: int
    status: ContractStatus
    version: int
    seq: int

    def capacity(self, direction: Direction) -> int:
        return self.flex_up if direction == "up" else self.flex_down

    def price(self, direction: Direction) -> float:
        return self.price_up if direction == "up" else self.price_down

    @property
    def baseline_w(self) -> int:
        return self.production - self.consumption

    def downward_from(self, old: Contract) -> bool:
        """Less is guaranteed than by `old`: less flexibility, shorter, or a longer notice."""
        return (
            self.flex_up < old.flex_up
            or self.flex_down < old.flex_down
            or self.duration < old.duration
            or self.notice > old.notice
        )

    def wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prosumer": self.prosumer,
            "aggregator": self.aggregator,
            "source": self.source,
            "production": self.production,
            "consumption": self.consumption,
            "flex_up": self.flex_up,
            "flex_down": self.flex_down,
            "duration": self.duration,
            "notice": self.notice,
            "price_up": self.price_up,
            "price_down": self.price_down,
            "expires": self.expires,
            "status": self.status,
            "version": self.version,
        }

    def record(self, event: str, now: int, downward: bool = False) -> FlexContractRecord:
        return FlexContractRecord(
            id=f"{self.id}.{self.version}",
            contract_id=self.id,
            version=self.version,
            event=event,
            prosumer_id=self.prosumer,
            aggregator_id=self.aggregator,
            source=self.source,
            production=self.production,
            consumption=self.consumption,
            flex_up=self.flex_up,
            flex_down=self.flex_down,
            duration=self.duration,
            notice=self.notice,
            price_up=self.price_up,
            price_down=self.price_down,
            expires=self.expires,
            downward=downward,
            time=now,
        )

    @classmethod
    def from_record(cls, r: FlexContractRecord, seq: int) -> Contract:
        status: ContractStatus = "active"
        if r.event == "cancelled":
            status = "cancelled"
        elif r.event == "expired":
            status = "expired"
        return cls(
            id=r.contract_id,
            prosumer=r.prosumer_id,
            aggregator=r.aggregator_id,
            source=r.source,
            production=r.production,
            consumption=r.consumption,
            flex_up=r.flex_up,
            flex_down=r.flex_down,
            duration=r.duration,
            notice=r.notice,
            price_up=r.price_up,
            price_down=r.price_down,
            expires=r.expires,
            status=status,
            version=r.version,
            seq=seq,
        )


class Request(msgspec.Struct, frozen=True):
    id: str
    dso: str
    aggregator: str
    client_id: str | None
    power: int
    start: int
    end: int
    strategy: str
    created: int
    offered: tuple[str, ...]
    answer_within: float | None = None
    status: RequestStatus = "open"
    accepted: int = 0
    allocated: int = 0
    shortfall: int = 0
    reason: str | None = None

    @property
    def direction(self) -> Direction:
        return "up" if self.power > 0 else "down"

    @property
    def need(self) -> int:
        return abs(self.power)

    @property
    def seconds(self) -> int:
        return self.end - self.start

    def same_ask(self, msg: RequestMsg) -> bool:
        return (msg.aggregator, msg.power, msg.start, msg.end) == (self.aggregator, self.power, self.start, self.end)

    def record(self, now: int) -> FlexRequestRecord:
        return FlexRequestRecord(
            id=self.id,
            dso_id=self.dso,
            aggregator_id=self.aggregator,
            client_id=self.client_id,
            power=self.power,
            time_delivery_start=self.start,
            time_delivery_end=self.end,
            strategy=self.strategy,
            offered=len(self.offered),
            accepted=self.accepted,
            allocated=self.allocated,
            shortfall=self.shortfall,
            reason=self.reason,
            time=now,
        )


class Allotment(msgspec.Struct, frozen=True):
    """One accepting prosumer's part of a request: `allocated` (power != 0) or `displaced`."""

    request: str
    prosumer: str
    contract: str
    status: Literal["allocated", "displaced"]
    power: int  # W, signed as the request
    expected: int  # Wh
    baseline: int  # Wh
    price: float
    reputation: int

    def record(self, now: int) -> FlexAllocationRecord:
        return FlexAllocationRecord(
            id=f"{self.request}.{self.prosumer}",
            request_id=self.request,
            prosumer_id=self.prosumer,
            contract_id=self.contract,
            status=self.status,
            power=self.power,
            expected=self.expected,
            baseline=self.baseline,
            price=self.price,
            reputation=self.reputation,
            time=now,
        )


class Delivery(msgspec.Struct, frozen=True):
    request: str
    prosumer: str
    metered: bool
    production: int
    consumption: int
    check: DeliveryCheck
    reputation: int  # after the check

    def wire(self) -> dict[str, Any]:
        c = self.check
        return {
            "request": self.request,
            "prosumer": self.prosumer,
            "metered": self.metered,
            "production": self.production,
            "consumption": self.consumption,
            "baseline_wh": c.baseline,
            "expected_wh": c.expected,
            "delivered_wh": c.delivered,
            "credited_wh": c.credited,
            "met": c.met,
            "reward": c.reward,
            "penalty": c.penalty,
            "reputation": self.reputation,
        }


class Opened(msgspec.Struct, frozen=True):
    """`open_request`'s result: the request, and the reply of a duplicate (else None)."""

    request: Request
    duplicate: dict[str, Any] | None = None


class _State(msgspec.Struct):
    contracts: dict[str, Contract] = {}
    active: dict[str, str] = {}  # prosumer -> its active contract id
    strategies: dict[str, str] = {}  # aggregator -> strategy name
    requests: dict[str, Request] = {}
    client_ids: dict[tuple[str, str], str] = {}  # (dso, client id) -> request id
    answers: dict[tuple[str, str], Answer] = {}  # (request, prosumer)
    allotments: dict[tuple[str, str], Allotment] = {}
    by_request: dict[str, tuple[str, ...]] = {}  # request -> prosumers with an allotment, in order
    readings: dict[tuple[str, str], tuple[int, int]] = {}
    deliveries: dict[tuple[str, str], Delivery] = {}
    reputation: dict[str, int] = {}
    reputation_seq: dict[str, int] = {}
    tokens: dict[str, int] = {}
    next_contract: int = 1
    next_request: int = 1
    open_request: str | None = None
    records: list[Record] = []
    notices: list[Notice] = []

    def copy(self) -> _State:
        """A copy that shares no mutable container with this one (values are frozen)."""
        return _State(
            contracts=dict(self.contracts),
            active=dict(self.active),
            strategies=dict(self.strategies),
            requests=dict(self.requests),
            client_ids=dict(self.client_ids),
            answers=dict(self.answers),
            allotments=dict(self.allotments),
            by_request=dict(self.by_request),
            readings=dict(self.readings),
            deliveries=dict(self.deliveries),
            reputation=dict(self.reputation),
            reputation_seq=dict(self.reputation_seq),
            tokens=dict(self.tokens),
            next_contract=self.next_contract,
            next_request=self.next_request,
            open_request=self.open_request,
            records=list(self.records),
            notices=list(self.notices),
        )


# -- the core --------------------------------------------------------------------------------


class Flexibility:
    """Contracts, requests, allocations, deliveries, tokens and reputation of the aggregators
    of one server."""

    def __init__(self, config: FlexConfig | None = None, strategies: Mapping[str, Strategy] | None = None) -> None:
        self.config = config or FlexConfig()
        self.strategies: dict[str, Strategy] = dict(strategies or default_strategies(self.config))
        if self.config.strategy not in self.strategies:
            raise ValueError(f"unknown default strategy {self.config.strategy!r}")
        self._s = _State()

    # -- outbox and undo -----------------------------------------------------------------

    def take_outbox(self) -> tuple[list[Record], list[Notice]]:
        """Ledger records and server-to-client notices produced since the last call."""
        records, notices = self._s.records, self._s.notices
        self._s.records, self._s.notices = [], []
        return records, notices

    def snapshot(self) -> _State:
        return self._s.copy()

    def restore(self, state: _State) -> None:
        self._s = state.copy()

    def _emit(self, pid: str, event: str, payload: dict[str, Any]) -> None:
        self._s.notices.append((pid, event, payload))

    # -- reading -------------------------------------------------------------------------

    def reputation(self, pid: str) -> int:
        return self._s.reputation.get(pid, self.config.reputation.initial)

    def tokens(self, pid: str) -> int:
        return self._s.tokens.get(pid, 0)

    def contract(self, contract_id: str) -> Contract:
        found = self._s.contracts.get(contract_id)
        if found is None:
            raise MarketError("not_found", f"unknown contract {contract_id!r}")
        return found

    def active_contract(self, prosumer: str) -> Contract | None:
        cid = self._s.active.get(prosumer)
        return None if cid is None else self._s.contracts[cid]

    def contracts(self, aggregator: str | None = None) -> list[Contract]:
        """Every contract (of one aggregator), oldest first, ended ones included."""
        return [c for c in self._s.contracts.values() if aggregator is None or c.aggregator == aggregator]

    def request(self, request_id: str) -> Request:
        found = self._s.requests.get(request_id)
        if found is None:
            raise MarketError("not_found", f"unknown request {request_id!r}")
        return found

    def requests(self) -> list[Request]:
        return list(self._s.requests.values())

    def strategy_of(self, aggregator: str) -> str:
        return self._s.strategies.get(aggregator, self.config.strategy)

    def allotments(self, request_id: str) -> list[Allotment]:
        return [self._s.allotments[(request_id, p)] for p in self._s.by_request.get(request_id, ())]

    def delivery(self, request_id: str, prosumer: str) -> Delivery | None:
        return self._s.deliveries.get((request_id, prosumer))

    def answers(self, request_id: str) -> dict[str, Answer]:
        r = self.request(request_id)
        return {p: self._s.answers[(r.id, p)] for p in r.offered if (r.id, p) in self._s.answers}

    # -- reputation and tokens -----------------------------------------------------------

    def _reputation(self, pid: str, reason: str, delta: int, ref: str, now: int) -> int:
        rules = self.config.reputation
        before = self.reputation(pid)
        score = rules.clamp(before + delta)
        n = self._s.reputation_seq.get(pid, 0) + 1
        self._s.reputation_seq[pid] = n
        self._s.reputation[pid] = score
        self._s.records.append(FlexReputationRecord(f"{pid}.{n}", pid, reason, score - before, score, ref, now))
        return score

    def _transfer(self, request: str, src: str, dst: str, micro: int, reason: str, prosumer: str, now: int) -> None:
        if micro <= 0:
            return
        self._s.tokens[src] = self.tokens(src) - micro
        self._s.tokens[dst] = self.tokens(dst) + micro
        self._s.records.append(FlexTokenRecord(f"{request}.{prosumer}.{reason}", request, src, dst, micro, reason, now))

    # -- contracts -----------------------------------------------------------------------

    def expire(self, now: int) -> int:
        """End every active contract whose expiry is at or before `now`; returns how many."""
        due = [cid for cid in self._s.active.values() if self._s.contracts[cid].expires <= now]
        for cid in sorted(due, key=lambda c: self._s.contracts[c].seq):
            old = self._s.contracts[cid]
            self._end(old, "expired", now)
        return len(due)

    def _end(self, old: Contract, status: Literal["cancelled", "expired"], now: int) -> Contract:
        new = msgspec.structs.replace(old, status=status, version=old.version + 1)
        self._s.contracts[new.id] = new
        self._s.active.pop(new.prosumer, None)
        self._contract_event(new, status, now)
        return new

    def _contract_event(self, c: Contract, event: str, now: int, downward: bool = False) -> None:
        self._s.records.append(c.record(event, now, downward))
        payload = {"event": event, "contract": c.wire(), "downward": downward}
        self._emit(c.prosumer, "flex.contract", payload)
        self._emit(c.aggregator, "flex.contract", payload)

    def register(self, prosumer: str, msg: ContractRegisterMsg, now: int) -> dict[str, Any]:
        if msg.aggregator == prosumer:
            raise MarketError("invalid", "a prosumer cannot be its own aggregator")
        if msg.flex_up == 0 and msg.flex_down == 0:
            raise MarketError("invalid", "a contract guarantees some flexibility: flex_up or flex_down > 0")
        if msg.expires <= now:
            raise MarketError("invalid", f"expires {msg.expires} is not after now ({now})")
        current = self.active_contract(prosumer)
        if current is not None:
            if _terms(current) == _terms_of(msg):
                return {"contract": current.wire(), "duplicate": True}
            raise MarketError("conflict", f"contract {current.id!r} is active: renegotiate or cancel it first")
        if len(self._s.contracts) >= self.config.max_contracts:
            raise MarketError("too_large", f"at most {self.config.max_contracts} contracts")
        seq = self._s.next_contract
        c = Contract(
            id=f"fc{seq}",
            prosumer=prosumer,
            aggregator=msg.aggregator,
            source=msg.source,
            production=msg.production,
            consumption=msg.consumption,
            flex_up=msg.flex_up,
            flex_down=msg.flex_down,
            duration=msg.duration,
            notice=msg.notice,
            price_up=msg.price_up,
            price_down=msg.price_down,
            expires=msg.expires,
            status="active",
            version=1,
            seq=seq,
        )
        self._s.next_contract += 1
        self._s.contracts[c.id] = c
        self._s.active[prosumer] = c.id
        self._contract_event(c, "registered", now)
        return {"contract": c.wire()}

    def renegotiate(self, prosumer: str, msg: ContractRenegotiateMsg, now: int) -> dict[str, Any]:
        old = self._s.contracts.get(msg.id)
        if old is None or old.prosumer != prosumer:
            raise MarketError("not_found", f"unknown contract {msg.id!r}")
        if old.status != "active":
            raise MarketError("closed", f"contract {msg.id!r} is {old.status}")
        changes = {
            k: v for k, v in msgspec.structs.asdict(msg).items() if k != "id" and v is not None and v != getattr(old, k)
        }
        if not changes:
            return {"contract": old.wire(), "duplicate": True}
        new = msgspec.structs.replace(old, version=old.version + 1, **changes)
        if new.flex_up == 0 and new.flex_down == 0:
            raise MarketError("invalid", "a contract guarantees some flexibility: flex_up or flex_down > 0")
        if new.expires <= now:
            raise MarketError("invalid", f"expires {new.expires} is not after now ({now}): cancel instead")
        downward = new.downward_from(old)
        self._s.contracts[new.id] = new
        self._contract_event(new, "renegotiated", now, downward)
        if downward:
            self._reputation(prosumer, "renegotiation", -self.config.reputation.renegotiation, new.id, now)
        return {"contract": new.wire(), "downward": downward, "reputation": self.reputation(prosumer)}

    def cancel(self, by: str, msg: ContractRefMsg, now: int) -> dict[str, Any]:
        old = self._s.contracts.get(msg.id)
        if old is None or by not in (old.prosumer, old.aggregator):
            raise MarketError("not_found", f"unknown contract {msg.id!r}")
        if old.status != "active":
            raise MarketError("closed", f"contract {msg.id!r} is {old.status}")
        return {"contract": self._end(old, "cancelled", now).wire()}

    def set_strategy(self, aggregator: str, msg: StrategyMsg) -> dict[str, Any]:
        if msg.strategy not in self.strategies:
            raise MarketError("invalid", f"unknown strategy {msg.strategy!r}; known: {sorted(self.strategies)}")
        self._s.strategies[aggregator] = msg.strategy
        return {"strategy": msg.strategy}

    # -- requests ------------------------------------------------------------------------

    def eligible(self, aggregator: str, direction: Direction, start: int, end: int, now: int) -> list[Contract]:
        """Active contracts of the aggregator that can serve the window, oldest first: some
        flexibility in the direction, long enough, notice short enough, valid until `end`,
        and their prosumer not allocated in an overlapping window still unsettled."""
        busy: set[str] = set()
        for r in self._s.requests.values():
            if r.status == "allocated" and r.start < end and start < r.end:
                busy.update(a.prosumer for a in self.allotments(r.id) if a.status == "allocated")
        out = [
            c
            for c in (self._s.contracts[cid] for cid in self._s.active.values())
            if c.aggregator == aggregator
            and c.capacity(direction) > 0
            and c.duration >= end - start
            and start - now >= c.notice
            and c.expires >= end
            and c.prosumer not in busy
        ]
        return sorted(out, key=lambda c: c.seq)

    def open_request(self, dso: str, msg: RequestMsg, now: int, reachable: Collection[str] | None = None) -> Opened:
        """Open a request and offer it to the eligible prosumers (those in `reachable`, if
        given). Only one request is open at a time; `allocate` closes it."""
        if msg.id is not None:
            rid = self._s.client_ids.get((dso, msg.id))
            if rid is not None:
                old = self._s.requests[rid]
                if not old.same_ask(msg):
                    raise MarketError("conflict", f"request id {msg.id!r} was used for another request")
                if old.status == "open":
                    raise MarketError("unavailable", f"request {rid!r} is still collecting answers")
                return Opened(old, {"request": self.request_wire(old), "duplicate": True})
        if self._s.open_request is not None:
            raise MarketError("unavailable", f"request {self._s.open_request!r} is being handled: one at a time")
        if msg.power == 0:
            raise MarketError("invalid", "power must not be 0")
        slot = self.config.slot
        if not msg.start < msg.end or msg.start % slot or msg.end % slot:
            raise MarketError("invalid", f"[start, end] must be a non-empty window aligned to {slot} s")
        if msg.end - msg.start > self.config.max_window:
            raise MarketError("invalid", f"the window is longer than {self.config.max_window} s")
        if msg.start < now:
            raise MarketError("closed", f"the window starts before now ({now})")
        if len(self._s.requests) >= self.config.max_requests:
            raise MarketError("too_large", f"at most {self.config.max_requests} requests")
        direction: Direction = "up" if msg.power > 0 else "down"
        offered = tuple(
            c.prosumer
            for c in self.eligible(msg.aggregator, direction, msg.start, msg.end, now)
            if reachable is None or c.prosumer in reachable
        )
        rid = f"fr{self._s.next_request}"
        self._s.next_request += 1
        request = Request(
            id=rid,
            dso=dso,
            aggregator=msg.aggregator,
            client_id=msg.id,
            power=msg.power,
            start=msg.start,
            end=msg.end,
            strategy=self.strategy_of(msg.aggregator),
            created=now,
            offered=offered,
            answer_within=msg.answer_within,
        )
        self._s.requests[rid] = request
        if msg.id is not None:
            self._s.client_ids[(dso, msg.id)] = rid
        self._s.open_request = rid
        within = msg.answer_within if msg.answer_within is not None else self.config.answer_timeout
        for pid in offered:
            c = self._s.contracts[self._s.active[pid]]
            self._emit(
                pid,
                "flex.offer",
                {
                    "request": rid,
                    "aggregator": msg.aggregator,
                    "direction": direction,
                    "power": msg.power,
                    "start": msg.start,
                    "end": msg.end,
                    "answer_within": within,
                    "capacity": c.capacity(direction),
                    "price": c.price(direction),
                },
            )
        return Opened(request)

    def abandon(self, request_id: str) -> None:
        """Forget the open request (its allocation could not be stored): the next may open."""
        if self._s.open_request == request_id:
            self._s.open_request = None
            self._s.requests.pop(request_id, None)
            self._s.client_ids = {k: v for k, v in self._s.client_ids.items() if v != request_id}

    def pending(self, request_id: str) -> list[str]:
        """Offered prosumers that have not answered the open request yet."""
        r = self._s.requests.get(request_id)
        if r is None or r.status != "open":
            return []
        return [p for p in r.offered if (r.id, p) not in self._s.answers]

    def answer(self, prosumer: str, msg: AnswerMsg, now: int) -> dict[str, Any]:
        r = self._s.requests.get(msg.request)
        if r is None or prosumer not in r.offered:
            raise MarketError("not_found", f"no request {msg.request!r} was offered to you")
        given: Answer = "accept" if msg.accept else "decline"
        first = self._s.answers.get((r.id, prosumer))
        if first is not None and first != "silent":
            if first != given:
                raise MarketError("conflict", f"you already answered {first!r}")
            return {"answer": given, "duplicate": True}
        if r.status != "open":
            raise MarketError("closed", f"request {r.id!r} no longer takes answers")
        self._s.answers[(r.id, prosumer)] = given
        self._s.records.append(FlexAnswerRecord(f"{r.id}.{prosumer}", r.id, prosumer, given, now))
        if msg.accept:
            self._reputation(prosumer, "participation", self.config.reputation.participation, r.id, now)
        return {"answer": given}

    def allocate(self, request_id: str, now: int) -> dict[str, Any]:
        """Close the answers of the open request (the silent declined) and allocate it."""
        r = self.request(request_id)
        if r.status != "open":
            raise MarketError("closed", f"request {r.id!r} is already allocated")
        candidates: list[Candidate] = []
        contracts: dict[str, Contract] = {}
        for pid in r.offered:
            ans = self._s.answers.get((r.id, pid))
            if ans is None:
                self._s.answers[(r.id, pid)] = "silent"
                self._s.records.append(FlexAnswerRecord(f"{r.id}.{pid}", r.id, pid, "silent", now))
                continue
            c = self.active_contract(pid)
            if ans != "accept" or c is None or c.aggregator != r.aggregator:
                continue  # declined, or the contract ended while answering
            contracts[pid] = c
            candidates.append(
                Candidate(pid, c.capacity(r.direction), self.reputation(pid), c.price(r.direction), c.seq)
            )
        strategy = self.strategies[r.strategy]
        result = strategy.allocate(r.need, candidates)
        sign = 1 if r.power > 0 else -1
        order: list[str] = []
        for share in result.shares:
            c = contracts[share.prosumer]
            if share.power > c.capacity(r.direction):
                raise AssertionError(f"strategy {strategy.name} gave {share.prosumer} more than its contract")
            a = Allotment(
                r.id,
                share.prosumer,
                c.id,
                "allocated",
                sign * share.power,
                energy_wh(share.power, r.seconds),
                energy_wh(c.baseline_w, r.seconds),
                c.price(r.direction),
                self.reputation(share.prosumer),
            )
            self._s.allotments[(r.id, a.prosumer)] = a
            order.append(a.prosumer)
            self._s.records.append(a.record(now))
            self._emit(
                a.prosumer,
                "flex.allocation",
                {
                    "request": r.id,
                    "power": a.power,
                    "start": r.start,
                    "end": r.end,
                    "expected_wh": a.expected,
                    "baseline_wh": a.baseline,
                    "price": a.price,
                },
            )
        for pid in result.displaced:
            c = contracts[pid]
            a = Allotment(r.id, pid, c.id, "displaced", 0, 0, 0, c.price(r.direction), self.reputation(pid))
            self._s.allotments[(r.id, pid)] = a
            order.append(pid)
            self._s.records.append(a.record(now))
            why = f"not needed: the request is covered by prosumers ranked higher ({r.strategy})"
            self._emit(pid, "flex.displaced", {"request": r.id, "reason": why})
        if not result.shares and not result.displaced and not r.offered:
            reason: str | None = "no eligible prosumer is reachable"
        else:
            reason = result.reason
        new = msgspec.structs.replace(
            r,
            status="allocated",
            accepted=len(candidates),
            allocated=result.allocated,
            shortfall=result.shortfall,
            reason=reason,
        )
        self._s.requests[r.id] = new
        self._s.by_request[r.id] = tuple(order)
        self._s.open_request = None
        self._s.records.append(new.record(now))
        if not result.shares:
            self._settle(new, now)  # nothing to deliver: settled at once
        return {"request": self.request_wire(self._s.requests[r.id])}

    # -- delivery ------------------------------------------------------------------------

    def meter(self, prosumer: str, msg: FlexMeterMsg, now: int) -> dict[str, Any]:
        """A prosumer's energy over an allocated window; the last missing one settles it."""
        r = self._s.requests.get(msg.request)
        a = self._s.allotments.get((msg.request, prosumer))
        if r is None or a is None or a.status != "allocated":
            raise MarketError("not_found", f"you have no allocation in request {msg.request!r}")
        if tuple(msg.time_interval) != (r.start, r.end):
            raise MarketError("invalid", f"time_interval must be the request's window [{r.start}, {r.end}]")
        reading = (msg.production, msg.consumption)
        first = self._s.readings.get((r.id, prosumer))
        if first is not None:
            if first != reading:
                raise MarketError("conflict", "a different reading for this window was already accepted")
            return {"duplicate": True}
        if r.status == "settled":
            raise MarketError("closed", f"request {r.id!r} is already settled")
        if now < r.end:
            raise MarketError("invalid", f"the window ends at {r.end}: meter it afterwards (now {now})")
        self._s.readings[(r.id, prosumer)] = reading
        allocated = [p for p in self._s.by_request.get(r.id, ()) if self._s.allotments[(r.id, p)].status == "allocated"]
        if all((r.id, p) in self._s.readings for p in allocated):
            self._settle(r, now)
            return {"settled": True}
        return {"settled": False}

    def settle(self, by: str, msg: RequestRefMsg, now: int) -> dict[str, Any]:
        """Settle a request after its window, readings missing or not (missing: not delivered)."""
        r = self._s.requests.get(msg.request)
        if r is None or by not in (r.aggregator, r.dso):
            raise MarketError("not_found", f"unknown request {msg.request!r}")
        if r.status == "settled":
            raise MarketError("closed", f"request {r.id!r} is already settled")
        if r.status == "open":
            raise MarketError("invalid", f"request {r.id!r} is still collecting answers")
        if now < r.end:
            raise MarketError("invalid", f"the window ends at {r.end} (now {now})")
        self._settle(r, now)
        return {"request": self.request_wire(self._s.requests[r.id])}

    def _settle(self, r: Request, now: int) -> None:
        rules = self.config.reputation
        for a in self.allotments(r.id):
            if a.status != "allocated":
                continue
            reading = self._s.readings.get((r.id, a.prosumer))
            check = check_delivery(
                power=a.power,
                seconds=r.seconds,
                baseline=a.baseline,
                price=a.price,
                reading=reading,
                margin_pct=self.config.margin_pct,
                penalty_rate=self.config.penalty_rate,
            )
            production, consumption = reading if reading is not None else (0, 0)
            self._s.records.append(
                FlexDeliveryRecord(
                    id=f"{r.id}.{a.prosumer}",
                    request_id=r.id,
                    prosumer_id=a.prosumer,
                    metered=reading is not None,
                    production=production,
                    consumption=consumption,
                    baseline=check.baseline,
                    expected=check.expected,
                    delivered=check.delivered,
                    met=check.met,
                    reward=check.reward,
                    penalty=check.penalty,
                    time=now,
                )
            )
            self._transfer(r.id, r.aggregator, a.prosumer, check.reward, "reward", a.prosumer, now)
            self._transfer(r.id, a.prosumer, r.aggregator, check.penalty, "penalty", a.prosumer, now)
            if check.met:
                score = self._reputation(a.prosumer, "compliance", rules.compliance, r.id, now)
            else:
                score = self._reputation(a.prosumer, "penalty", -rules.penalty, r.id, now)
            d = Delivery(r.id, a.prosumer, reading is not None, production, consumption, check, score)
            self._s.deliveries[(r.id, a.prosumer)] = d
            self._emit(a.prosumer, "flex.delivery", {**d.wire(), "tokens": self.tokens(a.prosumer)})
        settled = msgspec.structs.replace(r, status="settled")
        self._s.requests[r.id] = settled
        summary = self.request_wire(settled)
        self._emit(r.aggregator, "flex.settled", {"request": summary})
        if r.dso != r.aggregator:
            self._emit(r.dso, "flex.settled", {"request": summary})

    # -- results -------------------------------------------------------------------------

    def request_wire(self, r: Request) -> dict[str, Any]:
        answers = {p: self._s.answers.get((r.id, p)) for p in r.offered}
        allotted = self.allotments(r.id)
        deliveries = [d for d in (self._s.deliveries.get((r.id, a.prosumer)) for a in allotted) if d is not None]
        return {
            "id": r.id,
            "dso": r.dso,
            "aggregator": r.aggregator,
            "power": r.power,
            "start": r.start,
            "end": r.end,
            "strategy": r.strategy,
            "status": r.status,
            "offered": list(r.offered),
            "accepted": [p for p, a in answers.items() if a == "accept"],
            "declined": [p for p, a in answers.items() if a == "decline"],
            "silent": [p for p, a in answers.items() if a == "silent"],
            "allocations": [
                {"prosumer": a.prosumer, "power": a.power, "expected_wh": a.expected, "baseline_wh": a.baseline}
                for a in allotted
                if a.status == "allocated"
            ],
            "displaced": [a.prosumer for a in allotted if a.status == "displaced"],
            "allocated": r.allocated,
            "shortfall": r.shortfall,
            "reason": r.reason,
            "requested_wh": energy_wh(r.need, r.seconds),
            "expected_wh": sum(a.expected for a in allotted),
            "delivered_wh": sum(d.check.credited for d in deliveries),
            "met": sum(1 for d in deliveries if d.check.met),
            "failed": sum(1 for d in deliveries if not d.check.met),
            "rewards": sum(d.check.reward for d in deliveries),
            "penalties": sum(d.check.penalty for d in deliveries),
            "deliveries": [d.wire() for d in deliveries],
        }

    def results(self, by: str, msg: ResultsMsg) -> dict[str, Any]:
        """Aggregated results of the requests `by` made (dso) or received (aggregator)."""
        if msg.request is not None:
            r = self._s.requests.get(msg.request)
            if r is None or by not in (r.dso, r.aggregator):
                raise MarketError("not_found", f"unknown request {msg.request!r}")
            chosen = [r]
        else:
            chosen = [r for r in self._s.requests.values() if by in (r.dso, r.aggregator)]
        wires = [self.request_wire(r) for r in chosen]
        totals = {
            key: sum(w[key] for w in wires)
            for key in ("requested_wh", "expected_wh", "delivered_wh", "met", "failed", "rewards", "penalties")
        }
        return {"requests": wires, "totals": {"requests": len(wires), **totals}}

    def status(self, pid: str, role: str) -> dict[str, Any]:
        """A prosumer's own contract and standing; an aggregator's contracts and prosumers."""
        if role == "aggregator":
            mine = self.contracts(pid)
            prosumers = sorted({c.prosumer for c in mine})
            return {
                "strategy": self.strategy_of(pid),
                "contracts": [c.wire() for c in mine],
                "prosumers": [self._standing(p) for p in prosumers],
                "tokens": self.tokens(pid),
            }
        c = self.active_contract(pid)
        return {"contract": None if c is None else c.wire(), **self._standing(pid)}

    def _standing(self, pid: str) -> dict[str, Any]:
        return {"id": pid, "reputation": self.reputation(pid), "tokens": self.tokens(pid)}

    # -- resuming from the ledger --------------------------------------------------------

    def resume(self, rows: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        """Rebuild contracts, reputation, tokens, id counters and the allocations still to
        settle from ledger rows by table (what `take_outbox` produced in earlier runs)."""
        s = _State()
        contract_rows = sorted(
            (msgspec.convert(r, FlexContractRecord) for r in rows.get("flex_contracts", ())),
            key=lambda r: (_number(r.contract_id), r.version),
        )
        for rec in contract_rows:
            seq = _number(rec.contract_id)
            c = Contract.from_record(rec, seq)
            s.contracts[c.id] = c
            if c.status == "active":
                s.active[c.prosumer] = c.id
            elif s.active.get(c.prosumer) == c.id:
                del s.active[c.prosumer]
            s.next_contract = max(s.next_contract, seq + 1)
        reps = sorted(
            (msgspec.convert(r, FlexReputationRecord) for r in rows.get("flex_reputation", ())),
            key=lambda r: (r.participant_id, _number(r.id)),
        )
        for rep in reps:
            s.reputation[rep.participant_id] = rep.score
            s.reputation_seq[rep.participant_id] = _number(rep.id)
        for t in (msgspec.convert(r, FlexTokenRecord) for r in rows.get("flex_tokens", ())):
            s.tokens[t.from_id] = s.tokens.get(t.from_id, 0) - t.amount
            s.tokens[t.to_id] = s.tokens.get(t.to_id, 0) + t.amount
        delivered = {(d["request_id"], d["prosumer_id"]) for d in rows.get("flex_deliveries", ())}
        allotments = [msgspec.convert(r, FlexAllocationRecord) for r in rows.get("flex_allocations", ())]
        for req in sorted(
            (msgspec.convert(r, FlexRequestRecord) for r in rows.get("flex_requests", ())), key=lambda r: _number(r.id)
        ):
            mine = [a for a in allotments if a.request_id == req.id]
            offered = tuple(a.prosumer_id for a in mine)
            done = all((req.id, a.prosumer_id) in delivered for a in mine if a.status == "allocated")
            request = Request(
                id=req.id,
                dso=req.dso_id,
                aggregator=req.aggregator_id,
                client_id=req.client_id,
                power=req.power,
                start=req.time_delivery_start,
                end=req.time_delivery_end,
                strategy=req.strategy,
                created=req.time,
                offered=offered,
                status="settled" if done else "allocated",
                accepted=req.accepted,
                allocated=req.allocated,
                shortfall=req.shortfall,
                reason=req.reason,
            )
            s.requests[req.id] = request
            if req.client_id is not None:
                s.client_ids[(req.dso_id, req.client_id)] = req.id
            s.next_request = max(s.next_request, _number(req.id) + 1)
            if done:
                continue  # settled: its details stay in the ledger
            for a in mine:
                status: Literal["allocated", "displaced"] = "allocated" if a.status == "allocated" else "displaced"
                s.answers[(req.id, a.prosumer_id)] = "accept"
                s.allotments[(req.id, a.prosumer_id)] = Allotment(
                    req.id,
                    a.prosumer_id,
                    a.contract_id,
                    status,
                    a.power,
                    a.expected,
                    a.baseline,
                    a.price,
                    a.reputation,
                )
            s.by_request[req.id] = offered
        self._s = s


def _number(text: str) -> int:
    """The trailing integer of an id (`fc12` -> 12, `P1.7` -> 7)."""
    digits = ""
    for ch in reversed(text):
        if not ch.isdigit():
            break
        digits = ch + digits
    return int(digits) if digits else 0


def _terms(c: Contract) -> tuple[Any, ...]:
    return (
        c.aggregator,
        c.source,
        c.production,
        c.consumption,
        c.flex_up,
        c.flex_down,
        c.duration,
        c.notice,
        c.price_up,
        c.price_down,
        c.expires,
    )


def _terms_of(msg: ContractRegisterMsg) -> tuple[Any, ...]:
    return (
        msg.aggregator,
        msg.source,
        msg.production,
        msg.consumption,
        msg.flex_up,
        msg.flex_down,
        msg.duration,
        msg.notice,
        msg.price_up,
        msg.price_down,
        msg.expires,
    )
