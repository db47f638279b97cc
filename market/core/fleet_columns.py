"""Columnar `/fleet` batches (docs/protocol.md, `orders.columns` and `meters.columns`).

A batch is a table sent as columns, one list per field, instead of a dict per item. It is
validated in one `msgspec` conversion with the item types of the v1 batches, so a bad
value is named by its column and index (`$.quantity[12]`), then split into the same
per-item messages the v1 events decode to: the market cannot tell the two paths apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated

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
