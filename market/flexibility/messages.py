"""Energy Web flexibility: the wire messages of `/flex`, their value types, and the settings."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from market.core.protocol import ClientId, Interval, Message, Source, Time, Wh

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


Percent = Annotated[int, msgspec.Meta(gt=0, le=100)]
PriceWeight = Annotated[int, msgspec.Meta(ge=0, le=10**6)]
Micro = Annotated[int, msgspec.Meta(gt=0, le=10**15)]  # tokens: micro-currency, as ledger amounts


class StrategyMsg(Message, frozen=True):
    """`flex.strategy` (aggregator): the strategy and its settings; what is not given takes
    the server's default (each call replaces the aggregator's whole choice)."""

    strategy: StrategyName
    max_modulation_pct: Percent | None = None  # fair: each prosumer modulates at most this % of its estimate
    price_weight: PriceWeight | None = None  # reputation: points per currency/kWh of price
    forecast: bool | None = None  # estimate what each can deliver: energy source and delivery history


class FundMsg(Message, frozen=True):
    """`flex.fund` (operator): mint `amount` tokens to an aggregator's budget (ERC20 `mint`)."""

    aggregator: PartyId
    amount: Micro
    id: ClientId  # required: a retry of the same id mints nothing twice


class TransferMsg(Message, frozen=True):
    """`flex.transfer` (any /flex role): move `amount` of one's own tokens (ERC20 `transfer`)."""

    to: PartyId
    amount: Micro
    id: ClientId


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


# `flex.results` without `request` comes in pages, in request order (as `resume`'s events):
# at most `limit` requests, and never more than RESULTS_PAGE_PROSUMERS offered prosumers in
# all (a request's `R` grows by ~400 bytes per prosumer offered). So a page stays under
# ~1 MB unless one request alone is larger (offered to more prosumers): it comes alone.
RESULTS_PAGE = 64  # requests per page by default
RESULTS_PAGE_MAX = 512
RESULTS_PAGE_PROSUMERS = 2000


class ResultsMsg(Message, frozen=True):
    """`flex.results` (aggregator, dso): one request, or a page of all of them (the first,
    or the one after `after`: the `next` of the page before)."""

    request: RefId | None = None
    after: RefId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=RESULTS_PAGE_MAX)] = RESULTS_PAGE


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
    max_modulation_pct: Percent = 25  # fair: seed's simplification (an aggregator may choose its own)
    price_weight: PriceWeight = 100  # reputation points per currency/kWh
    # The aggregator's estimate of what each prosumer can deliver (docs/flexibility.md,
    # *Forecast*): off unless an aggregator asks for it with `flex.strategy`.
    forecast: bool = False
    latitude: Annotated[float, msgspec.Meta(ge=-90, le=90)] = 50.0  # where the aggregator's sites are
    longitude: Annotated[float, msgspec.Meta(ge=-180, le=180)] = 0.0
    daylight_full: Annotated[float, msgspec.Meta(gt=0, le=90)] = 15.0  # sun elevation (deg) of full PV flexibility
    trust_prior: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2  # deliveries a newcomer is trusted for
    reputation: ReputationRules = ReputationRules()
    max_contracts: Annotated[int, msgspec.Meta(gt=0)] = 100_000
    max_requests: Annotated[int, msgspec.Meta(gt=0)] = 100_000
