"""Energy Web flexibility: contracts, requests, allotments and deliveries (the state), and the delivery check."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from market.core.records import (
    FlexAllocationRecord,
    FlexContractRecord,
    FlexRequestRecord,
    Record,
    amount,
)
from market.flexibility.messages import Answer, ContractStatus, Direction, Notice, RequestMsg, RequestStatus

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
    offered: tuple[str, ...]  # in contract order
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
    penalty_paid: int = 0  # of `check.penalty`: what the prosumer held (tokens never go negative)

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
            "penalty_paid": self.penalty_paid,
            "reputation": self.reputation,
        }


class Savepoint(msgspec.Struct, frozen=True):
    """Where `Flexibility.rollback` goes back to: the small tables copied, the append-only
    ones by length."""

    state: _State
    lengths: tuple[int, ...]


class Opened(msgspec.Struct, frozen=True):
    """`open_request`'s result: the request, and the reply of a duplicate (else None)."""

    request: Request
    duplicate: dict[str, Any] | None = None


class StrategyChoice(msgspec.Struct, frozen=True):
    """An aggregator's `flex.strategy`: the strategy and the settings it gave (None: the
    server's default)."""

    name: str
    max_modulation_pct: int | None = None
    price_weight: int | None = None
    forecast: bool = False


# Tables of the state that only ever get new keys (never an overwrite or a deletion): an
# undo can truncate them to their length at a savepoint (dicts keep insertion order) instead
# of copying them. They grow with every request; the other tables stay small.
APPEND_ONLY: tuple[str, ...] = ("answers", "allotments", "readings", "deliveries")


class _State(msgspec.Struct):
    contracts: dict[str, Contract] = {}
    active: dict[str, str] = {}  # prosumer -> its active contract id
    strategies: dict[str, StrategyChoice] = {}  # aggregator -> its choice
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
    reserved: dict[str, int] = {}  # aggregator -> rewards its unsettled allocations may cost
    supply: int = 0  # tokens minted (`flex.fund`): the sum of every balance
    token_ops: dict[tuple[str, str, str], tuple[str, int]] = {}  # (kind, account, client id) -> (other, amount)
    history: dict[str, tuple[int, int]] = {}  # prosumer -> (deliveries, sum of their ratios, permille)
    offered_to: dict[str, frozenset[str]] = {}  # request -> its offered prosumers (an index of `offered`)
    next_contract: int = 1
    next_request: int = 1
    open_request: str | None = None
    records: list[Record] = []
    notices: list[Notice] = []

    def copy(self, share_append_only: bool = False) -> _State:
        """A copy that shares no mutable container with this one (values are frozen), but
        the `APPEND_ONLY` tables if `share_append_only` (a savepoint's)."""
        grown: Any = (lambda d: d) if share_append_only else dict
        return _State(
            contracts=dict(self.contracts),
            active=dict(self.active),
            strategies=dict(self.strategies),
            requests=dict(self.requests),
            client_ids=dict(self.client_ids),
            answers=grown(self.answers),
            allotments=grown(self.allotments),
            by_request=dict(self.by_request),
            readings=grown(self.readings),
            deliveries=grown(self.deliveries),
            reputation=dict(self.reputation),
            reputation_seq=dict(self.reputation_seq),
            tokens=dict(self.tokens),
            reserved=dict(self.reserved),
            supply=self.supply,
            token_ops=dict(self.token_ops),
            history=dict(self.history),
            offered_to=dict(self.offered_to),
            next_contract=self.next_contract,
            next_request=self.next_request,
            open_request=self.open_request,
            records=list(self.records),
            notices=list(self.notices),
        )
