"""Server-to-client payloads of PROTOCOL.md (`start_round`, `settled`, `delivery`).

Decoded leniently (unknown fields ignored) so that a newer server that adds fields does
not break older clients; only what the prosumer uses is declared.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

Interval = tuple[int, int]


class Payload(msgspec.Struct, frozen=True):
    """Base of server payloads."""


class GridPrices(Payload, frozen=True):
    buy_price: float
    sell_price: float


class MarketInfo(Payload, frozen=True):
    time_delivery: Interval
    grid: GridPrices | None = None
    grid_state: str = "GREEN"


class StartRound(Payload, frozen=True):
    time: int
    current_round: Interval
    next_settle: Interval
    mode: str = "sim"
    duration: int | None = None
    timezone: str = "UTC"
    last_round: Interval | None = None
    last_settle: Interval | None = None
    market_info: list[MarketInfo] = []


class Settled(Payload, frozen=True):
    side: str
    quantity: int
    price: float
    time_delivery: Interval
    commit_id: str | None = None
    uuid: str | None = None
    id: str | None = None
    source: str | None = None


class TransactionRow(Payload, frozen=True):
    kind: str
    seller_id: str
    buyer_id: str
    quantity: int
    amount_buy: int
    amount_sell: int
    id: str | None = None
    energy_source: str | None = None


class Delivery(Payload, frozen=True):
    time_delivery: Interval
    transactions: list[TransactionRow] = []


P = TypeVar("P", bound=Payload)


def parse(payload: Any, kind: type[P]) -> P:
    """Decode a server payload or raise `ValueError`."""
    try:
        return msgspec.convert(payload, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad {kind.__name__} payload: {exc}") from None
