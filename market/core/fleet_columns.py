"""Columnar `/fleet` batches (docs/protocol.md, `orders.columns` and `meters.columns`).

A batch is a table sent as columns, one list per field, instead of a dict per item. It is
validated in one `msgspec` conversion with the item types of the v1 batches, so a bad
value is named by its column and index (`$.quantity[12]`), then split into the same
per-item messages the v1 events decode to: the market cannot tell the two paths apart.

`decode_orders` and `decode_meters` take the same tables faster: the strings' patterns,
checked one string at a time, were ~90 % of a conversion (0.6 of 0.7 ms for 1,000 orders).
A conversion without them checks everything else; each string column is then checked in
one regular-expression match over the column joined by a character no valid string
holds. Only if a check fails is the table converted with the patterns again, which
names the offending item as before: the same table or the same error either way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import msgspec

from market.core.errors import MarketError
from market.core.protocol import (
    MAX_FLEET_ITEMS,
    ClientId,
    ConsumptionMsg,
    EntryMsg,
    Interval,
    Message,
    MeterMsg,
    ParticipantRef,
    Price,
    Quantity,
    Side,
    Source,
    Wh,
    decode,
)

Participants = Annotated[list[ParticipantRef], msgspec.Meta(min_length=1, max_length=MAX_FLEET_ITEMS)]
# Per source, one value per reading; null: the reading has no such entry (not the same
# reading as an entry of 0 Wh, and the ledger keeps what was sent).
SourceColumns = Annotated[dict[Source, list[Wh | None]], msgspec.Meta(max_length=16)]


def _check_lengths(n: int, columns: Mapping[str, Sequence[object] | None]) -> None:
    for name, column in columns.items():
        if column is not None and len(column) != n:
            raise MarketError("invalid", f"column {name!r} has {len(column)} items, `participant` has {n}")


class OrderColumns(Message, frozen=True):
    participant: Participants
    side: list[Side]
    quantity: list[Quantity]
    price: list[Price]
    time_delivery: list[Interval]
    id: list[ClientId | None] | None = None
    source: list[Source | None] | None = None

    def items(self) -> list[tuple[str, Side, EntryMsg]]:
        """(participant, side, entry) per order, in order; `invalid` if columns differ in length."""
        n = len(self.participant)
        _check_lengths(
            n,
            {
                "side": self.side,
                "quantity": self.quantity,
                "price": self.price,
                "time_delivery": self.time_delivery,
                "id": self.id,
                "source": self.source,
            },
        )
        ids = self.id if self.id is not None else [None] * n
        sources = self.source if self.source is not None else [None] * n
        return [
            (pid, side, EntryMsg(q, p, td, i, s))
            for pid, side, q, p, td, i, s in zip(
                self.participant, self.side, self.quantity, self.price, self.time_delivery, ids, sources, strict=True
            )
        ]


class MeterColumns(Message, frozen=True):
    participant: Participants
    time_interval: list[Interval]
    generation: SourceColumns = msgspec.field(default_factory=dict)
    bess: SourceColumns = msgspec.field(default_factory=dict)  # consumption.bess
    other: SourceColumns = msgspec.field(default_factory=dict)  # consumption.other (incl. "external")

    def items(self) -> list[tuple[str, MeterMsg]]:
        """(participant, reading) per reading, in order; `invalid` if columns differ in length."""
        n = len(self.participant)
        _check_lengths(n, {"time_interval": self.time_interval})
        maps = []
        for name, table in (("generation", self.generation), ("bess", self.bess), ("other", self.other)):
            _check_lengths(n, {f"{name}.{src}": column for src, column in table.items()})
            rows: list[dict[str, int]] = [{} for _ in range(n)]
            for src, column in table.items():
                for row, value in zip(rows, column, strict=True):
                    if value is not None:
                        row[src] = value
            maps.append(rows)
        gen, bess, other = maps
        return [
            (pid, MeterMsg(ti, g, ConsumptionMsg(b, o)))
            for pid, ti, g, b, o in zip(self.participant, self.time_interval, gen, bess, other, strict=True)
        ]


# `OrderColumns` and `MeterColumns` field for field, without the strings' patterns
# (`ParticipantRef`, `ClientId`, `Source`), which are checked by column below: a field
# added to one must be added here too (the tests' random tables would fail otherwise).
_Refs = Annotated[list[str], msgspec.Meta(min_length=1, max_length=MAX_FLEET_ITEMS)]


class _LooseOrders(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    participant: _Refs
    side: list[Side]
    quantity: list[Quantity]
    price: list[Price]
    time_delivery: list[Interval]
    id: list[str | None] | None = None
    source: list[str | None] | None = None


class _LooseMeters(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    participant: _Refs
    time_interval: list[Interval]
    generation: Annotated[dict[str, list[Wh | None]], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=dict)
    bess: Annotated[dict[str, list[Wh | None]], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=dict)
    other: Annotated[dict[str, list[Wh | None]], msgspec.Meta(max_length=16)] = msgspec.field(default_factory=dict)


# Each item as its type allows (or stricter), then the separator, which none may hold.
_REFS = re.compile(r"(?:[A-Za-z0-9_.:-]{1,64}\n)*")  # ParticipantRef
_IDS = re.compile(r"(?:[^\x00-\x1f\x7f]{1,64}\x00)*")  # ClientId
_SOURCE = re.compile(r"[a-z][a-z0-9_]{0,31}")  # Source


def _all(run: re.Pattern[str], strings: list[str], sep: str) -> bool:
    return run.fullmatch(sep.join(strings) + sep if strings else "") is not None


def _sources(names: Any) -> bool:
    return all(_SOURCE.fullmatch(name) for name in names)


def decode_orders(data: Any) -> OrderColumns:
    """`decode(data, OrderColumns)`, with its string columns checked at once."""
    if isinstance(data, dict):
        try:
            t = msgspec.convert(data, _LooseOrders, strict=True)
        except msgspec.ValidationError:
            t = None  # the strict conversion says what
        if (
            t is not None
            and _all(_REFS, t.participant, "\n")
            and (t.id is None or _all(_IDS, [i for i in t.id if i is not None], "\x00"))
            and (t.source is None or _sources({s for s in t.source if s is not None}))
        ):
            return OrderColumns(t.participant, t.side, t.quantity, t.price, t.time_delivery, t.id, t.source)
    return decode(data, OrderColumns)


def decode_meters(data: Any) -> MeterColumns:
    """`decode(data, MeterColumns)`, with its string columns checked at once."""
    if isinstance(data, dict):
        try:
            t = msgspec.convert(data, _LooseMeters, strict=True)
        except msgspec.ValidationError:
            t = None
        if (
            t is not None
            and _all(_REFS, t.participant, "\n")
            and _sources(t.generation)
            and _sources(t.bess)
            and _sources(t.other)
        ):
            return MeterColumns(t.participant, t.time_interval, t.generation, t.bess, t.other)
    return decode(data, MeterColumns)
