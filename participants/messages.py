"""Server-to-client payloads of PROTOCOL.md (`start_round`, `settled`, `delivery`).

Decoded leniently (unknown fields ignored) so that a newer server that adds fields does
not break older clients; only what the prosumer uses is declared.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

Interval = tuple[int, int]
E = TypeVar("E", bound="Payload")  # a payload made from one item of a columnar table


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


class SettledColumns(Payload, frozen=True):
    """`/fleet` `settled.columns` (docs/protocol.md): item `k` of every list is member
    `participant[k]`'s `settled` event."""

    participant: list[str]
    side: list[str]
    quantity: list[int]
    price: list[float]
    time_delivery: list[Interval]
    commit_id: list[str | None]
    uuid: list[str | None]
    id: list[str | None]
    source: list[str | None]

    def __post_init__(self) -> None:
        _same_lengths(self, len(self.participant), Settled)

    def event(self, k: int) -> Settled:
        return _item(self, k, Settled)


class TransactionColumns(Payload, frozen=True):
    """The rows of a `delivery.columns` table, a list per field."""

    kind: list[str]
    seller_id: list[str]
    buyer_id: list[str]
    quantity: list[int]
    amount_buy: list[int]
    amount_sell: list[int]
    id: list[str | None]
    energy_source: list[str | None]

    def __post_init__(self) -> None:
        _same_lengths(self, len(self.kind), TransactionRow)

    def row(self, j: int) -> TransactionRow:
        return _item(self, j, TransactionRow)


class DeliveryColumns(Payload, frozen=True):
    """`/fleet` `delivery.columns`: member `participant[k]`'s `delivery` of `time_delivery`
    lists the rows `rows[k]` (indices into `transactions`)."""

    time_delivery: Interval
    participant: list[str]
    rows: list[list[int]]
    transactions: TransactionColumns

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.participant):
            raise ValueError(f"column 'rows' has {len(self.rows)} items, 'participant' has {len(self.participant)}")
        n = len(self.transactions.kind)
        if any(not 0 <= j < n for picks in self.rows for j in picks):
            raise ValueError(f"a row index outside the table of {n} rows")

    def event(self, k: int) -> Delivery:
        return Delivery(self.time_delivery, [self.transactions.row(j) for j in self.rows[k]])


def _same_lengths(table: Payload, n: int, kind: type[Payload]) -> None:
    """Every column of `table` that is a field of `kind` holds `n` items."""
    for name in kind.__struct_fields__:
        got = len(getattr(table, name))
        if got != n:
            raise ValueError(f"column {name!r} has {got} items, not {n}")


def _item(table: Payload, k: int, kind: type[E]) -> E:
    """Item `k` of a columnar table as the payload whose fields name its columns."""
    return kind(*(getattr(table, name)[k] for name in kind.__struct_fields__))


P = TypeVar("P", bound=Payload)


def parse(payload: Any, kind: type[P]) -> P:
    """Decode a server payload or raise `ValueError`."""
    try:
        return msgspec.convert(payload, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ValueError(f"bad {kind.__name__} payload: {exc}") from None
