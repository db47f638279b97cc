"""Typed wire messages of PROTOCOL.md version 1, decoded and validated in one place.

Nothing inside `market/` sees a raw dict: `decode(payload, Type)` turns a client payload
into a frozen `msgspec.Struct` or raises `MarketError("invalid", ...)`. Decoding is strict:
a bool is not a number, floats are never ints, NaN and inf are refused by the bounds,
unknown fields are refused. Checks that depend on market settings (alignment to the
slot duration, price bounds, horizon) are made by the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec

from market.core.errors import MarketError

MAX_QUANTITY = 10**9  # Wh, PROTOCOL.md default `max_quantity`
MAX_ORDERS = 1000  # per `orders` batch
# Wire bound on any price; the configured market bounds are narrower. NaN and inf fail it.
PRICE_LIMIT = 1e6

Wh = Annotated[int, msgspec.Meta(ge=0, le=MAX_QUANTITY)]
Quantity = Annotated[int, msgspec.Meta(gt=0, le=MAX_QUANTITY)]
Price = Annotated[float, msgspec.Meta(ge=-PRICE_LIMIT, le=PRICE_LIMIT)]
Time = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
Interval = tuple[Time, Time]
# No control characters: PostgreSQL text cannot hold NUL, and logs should not carry them.
ClientId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f]+$")]
Source = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=r"^[a-z][a-z0-9_]*$")]
Uuid = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]
Side = Literal["bid", "ask"]
GridState = Literal["GREEN", "YELLOW", "RED"]
SourceMap = Annotated[dict[Source, Wh], msgspec.Meta(max_length=16)]


class Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every client payload."""


class EntryMsg(Message, frozen=True):
    """`bid` / `ask` payload."""

    quantity: Quantity
    price: Price
    time_delivery: Interval
    id: ClientId | None = None
    source: Source | None = None


class OrderMsg(Message, frozen=True):
    """One order of an `orders` batch: an entry with its side."""

    side: Side
    quantity: Quantity
    price: Price
    time_delivery: Interval
    id: ClientId | None = None
    source: Source | None = None

    def entry(self) -> EntryMsg:
        return EntryMsg(self.quantity, self.price, self.time_delivery, self.id, self.source)


class OrdersMsg(Message, frozen=True):
    orders: Annotated[list[OrderMsg], msgspec.Meta(min_length=1, max_length=MAX_ORDERS)]

    @classmethod
    def check_size(cls, payload: Any) -> None:
        """An oversized batch is `too_large`, not merely invalid: the client should split it."""
        if (
            isinstance(payload, dict)
            and isinstance(payload.get("orders"), list)
            and len(payload["orders"]) > MAX_ORDERS
        ):
            raise MarketError("too_large", f"at most {MAX_ORDERS} orders per batch")


class CancelMsg(Message, frozen=True):
    uuid: Uuid


class ConsumptionMsg(Message, frozen=True):
    bess: SourceMap = {}
    other: SourceMap = {}


class MeterMsg(Message, frozen=True):
    """`meter` payload: energy of one interval, integer Wh (see PROTOCOL.md meter semantics)."""

    time_interval: Interval
    generation: SourceMap = {}
    consumption: ConsumptionMsg = ConsumptionMsg()


class RoundSubmitMsg(Message, frozen=True):
    """`round.submit` (extension, docs/protocol.md): a participant's orders of the round and
    its meter reading in one acknowledged event; each part as the `orders` and `meter` events."""

    orders: Annotated[list[OrderMsg], msgspec.Meta(max_length=MAX_ORDERS)] = []
    meter: MeterMsg | None = None


RESUME_PAGE = 64  # `resume` events per reply by default: a 40-byte request never returns megabytes
RESUME_PAGE_MAX = 512


class ResumeMsg(Message, frozen=True):
    """`resume` (extension): the private events after `since` (the last `seq` received)."""

    since: Annotated[int, msgspec.Meta(ge=0, le=2**53)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=RESUME_PAGE_MAX)] = RESUME_PAGE  # events per reply (paged)


ParticipantRef = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
MAX_FLEET_ITEMS = 5000  # orders or readings per fleet event (well under the 1 MB message limit)


class FleetOrderMsg(Message, frozen=True):
    """An order of a fleet connection: `participant` must be one the connection authenticated."""

    participant: ParticipantRef
    side: Side
    quantity: Quantity
    price: Price
    time_delivery: Interval
    id: ClientId | None = None
    source: Source | None = None

    def entry(self) -> EntryMsg:
        return EntryMsg(self.quantity, self.price, self.time_delivery, self.id, self.source)


class FleetOrdersMsg(Message, frozen=True):
    orders: Annotated[list[FleetOrderMsg], msgspec.Meta(min_length=1, max_length=MAX_FLEET_ITEMS)]


class FleetMeterMsg(Message, frozen=True):
    participant: ParticipantRef
    time_interval: Interval
    generation: SourceMap = {}
    consumption: ConsumptionMsg = ConsumptionMsg()

    def meter(self) -> MeterMsg:
        return MeterMsg(self.time_interval, self.generation, self.consumption)


class FleetMetersMsg(Message, frozen=True):
    readings: Annotated[list[FleetMeterMsg], msgspec.Meta(min_length=1, max_length=MAX_FLEET_ITEMS)]


class StepMsg(Message, frozen=True):
    time: Time
    duration: Annotated[int, msgspec.Meta(gt=0, le=86400)] | None = None


class UpstreamSlotMsg(Message, frozen=True):
    """`upstream.residuals`, `upstream.flows` (/simulation, docs/hierarchy.md): one slot."""

    time_delivery: Interval


MAX_UPSTREAM_FILLS = 100_000  # fills of one slot the district may hand back in one event


class UpstreamFillMsg(Message, frozen=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]  # the residual's id (`upstream.residuals`)
    quantity: Annotated[int, msgspec.Meta(gt=0, le=MAX_QUANTITY)]
    price: Annotated[float, msgspec.Meta(ge=-1e6, le=1e6)]
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    ref: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]  # the fill's commit id above


class UpstreamFillsMsg(Message, frozen=True):
    """`upstream.fills`: the district's fills of one slot's residuals."""

    time_delivery: Interval
    fills: Annotated[list[UpstreamFillMsg], msgspec.Meta(max_length=MAX_UPSTREAM_FILLS)]


class EmptyMsg(Message, frozen=True):
    """`reset`, `status`: no fields allowed."""


M = TypeVar("M", bound=Message)


def decode(payload: Any, kind: type[M]) -> M:
    """Validate a decoded wire payload (dict from JSON/msgpack) into `kind`, or raise `invalid`."""
    if payload is None and kind is EmptyMsg:
        payload = {}
    if not isinstance(payload, dict):
        raise MarketError("invalid", f"payload must be an object, got {type(payload).__name__}")
    try:
        return msgspec.convert(payload, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise MarketError("invalid", str(exc)) from None


def ok(**fields: Any) -> dict[str, Any]:
    """A success reply."""
    return {"ok": True, **fields}
