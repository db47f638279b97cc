"""Builders of market core data for tests: entries, books, meters, settlements, markets.

Books are written as rows `(participant, quantity, price)` or `(participant, quantity,
price, source)`; entries get uuids `b0, b1, ...` / `a0, a1, ...`, one submission time and
tie keys in row order, so ties are broken by the order written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from market.core.book import Entry
from market.core.clearing import Fill
from market.core.engine import Market, MarketConfig
from market.core.protocol import ConsumptionMsg, EntryMsg, MeterMsg, Side
from market.core.records import Settlement, Transaction, amount
from market.core.timing import Slot

SLOT: Slot = (0, 60)
Row = tuple[Any, ...]  # (participant, quantity, price[, source])


def entry(
    participant: str,
    quantity: int,
    price: float,
    source: str | None = None,
    *,
    side: Side = "bid",
    uuid: str | None = None,
    id: str | None = None,
    slot: Slot = SLOT,
    time_submission: int = 0,
    tie: int = 0,
) -> Entry:
    return Entry(
        uuid=uuid or f"{side[0]}-{participant}-{tie}",
        id=id,
        participant=participant,
        side=side,
        quantity=quantity,
        price=price,
        time_delivery=slot,
        source=source,
        time_submission=time_submission,
        tie=tie,
    )


def entries(side: Side, rows: Iterable[Row], slot: Slot = SLOT, time_submission: int = 0) -> list[Entry]:
    out = []
    for k, row in enumerate(rows):
        participant, quantity, price, *rest = row
        source = rest[0] if rest else None
        out.append(
            entry(
                participant,
                quantity,
                price,
                source,
                side=side,
                uuid=f"{side[0]}{k}",
                slot=slot,
                time_submission=time_submission,
                tie=k,
            )
        )
    return out


def book_with(bids: Iterable[Row] = (), asks: Iterable[Row] = (), slot: Slot = SLOT) -> tuple[list[Entry], list[Entry]]:
    """(bids, asks) as the book hands them to the clearing."""
    return entries("bid", bids, slot), entries("ask", asks, slot)


def fills(result: Sequence[Fill]) -> list[tuple[str, str, int, float, float]]:
    """A clearing result as (bid uuid, ask uuid, quantity, price_buy, price_sell) rows."""
    return [(f.bid.uuid, f.ask.uuid, f.quantity, f.price_buy, f.price_sell) for f in result]


def meter(
    gen: Mapping[str, int] | None = None,
    other: Mapping[str, int] | None = None,
    bess: Mapping[str, int] | None = None,
    slot: Slot = SLOT,
) -> MeterMsg:
    """`meter(gen={"solar": 500}, other={"external": 300, "solar": 100}, bess={})`."""
    return MeterMsg(
        time_interval=slot,
        generation=dict(gen or {}),
        consumption=ConsumptionMsg(bess=dict(bess or {}), other=dict(other or {})),
    )


def settlement(
    seller: str,
    buyer: str,
    quantity: int,
    price: float = 0.15,
    source: str = "solar",
    *,
    seq: int = 0,
    price_sell: float | None = None,
    dispatch: bool | None = None,
    slot: Slot = SLOT,
) -> Settlement:
    """One fill as the engine records it; `price` is the buyer's (and, unless
    `price_sell` is given, the seller's) price; `bess` is dispatch by default."""
    ps = price if price_sell is None else price_sell
    return Settlement(
        commit_id=f"c{slot[0]}-{seq}",
        time_delivery_start=slot[0],
        time_delivery_end=slot[1],
        seller_id=seller,
        buyer_id=buyer,
        bid_uuid=f"{buyer}.bid{seq}",
        ask_uuid=f"{seller}.ask{seq}",
        bid_id=None,
        ask_id=None,
        energy_source=source,
        quantity=quantity,
        price_buy=price,
        price_sell=ps,
        amount_buy=amount(quantity, price),
        amount_sell=amount(quantity, ps),
        dispatch=source == "bess" if dispatch is None else dispatch,
        seq=seq,
        time_creation=0,
    )


TxRow = tuple[str, str, str, str, int, float, float, int, int, str | None]


def rows(transactions: Iterable[Transaction]) -> list[TxRow]:
    """Transactions as (kind, seller, buyer, source, quantity, price_buy, price_sell,
    amount_buy, amount_sell, commit_id), the fields expected rows are written with."""
    return [
        (
            t.kind,
            t.seller_id,
            t.buyer_id,
            t.energy_source,
            t.quantity,
            t.price_buy,
            t.price_sell,
            t.amount_buy,
            t.amount_sell,
            t.commit_id,
        )
        for t in transactions
    ]


# -- engine ------------------------------------------------------------------------------


def market(*, journal: bool = True, **config: Any) -> Market:
    return Market(MarketConfig(**config), journal=journal)


def entry_msg(quantity: int, price: float, slot: Slot, source: str | None = None, id: str | None = None) -> EntryMsg:
    return EntryMsg(quantity=quantity, price=price, time_delivery=slot, id=id, source=source)


def bid(
    m: Market,
    participant: str,
    quantity: int,
    price: float,
    slot: Slot,
    source: str | None = None,
    id: str | None = None,
) -> dict[str, Any]:
    return m.submit(participant, "bid", entry_msg(quantity, price, slot, source, id))


def ask(
    m: Market,
    participant: str,
    quantity: int,
    price: float,
    slot: Slot,
    source: str | None = "solar",
    id: str | None = None,
) -> dict[str, Any]:
    return m.submit(participant, "ask", entry_msg(quantity, price, slot, source, id))


def settlements_of(result: Sequence[Fill], slot: Slot = SLOT, dispatch: Iterable[str] = ("bess",)) -> list[Settlement]:
    """A slot's fills as the engine records them (commit order = fill order)."""
    d = frozenset(dispatch)
    return [
        Settlement(
            commit_id=f"c{slot[0]}-{seq}",
            time_delivery_start=slot[0],
            time_delivery_end=slot[1],
            seller_id=f.ask.participant,
            buyer_id=f.bid.participant,
            bid_uuid=f.bid.uuid,
            ask_uuid=f.ask.uuid,
            bid_id=f.bid.id,
            ask_id=f.ask.id,
            energy_source=f.ask.source or "",
            quantity=f.quantity,
            price_buy=f.price_buy,
            price_sell=f.price_sell,
            amount_buy=amount(f.quantity, f.price_buy),
            amount_sell=amount(f.quantity, f.price_sell),
            dispatch=(f.ask.source or "") in d,
            seq=seq,
            time_creation=0,
        )
        for seq, f in enumerate(result)
    ]
