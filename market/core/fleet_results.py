"""Columnar private events for `/fleet` (docs/protocol.md, `settled.columns` and
`delivery.columns`): a connection's members' fills and deliveries as one table per round.

A delivery's transaction rows appear once in the table however many members they concern,
and no dict is made per event: what the payloads of PROTOCOL.md would repeat per member is
sent once. What each member was sent is kept for `resume` as a reference to the records
(`SettledRef`, `DeliveryRef`), made into the PROTOCOL.md payload only if it is asked for:
the same payload the member would have been sent as a `settled` or `delivery` event.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Container, Mapping, Sequence
from typing import Any, ClassVar

import msgspec

from market.core.engine import settled_event
from market.core.protocol import Side
from market.core.records import Settlement, Transaction
from market.core.timing import Slot


class SettledRef(msgspec.Struct, frozen=True, gc=False):
    """One member's `settled` event: a side of a fill (no reference cycle: `gc=False`)."""

    EVENT: ClassVar[str] = "settled"

    fill: Settlement
    side: Side

    def payload(self) -> dict[str, Any]:
        return settled_event(self.fill, self.side)


class DeliveryRef(msgspec.Struct, frozen=True, gc=False):
    """One member's `delivery` event: its rows (`picks`) of a slot's transaction rows."""

    EVENT: ClassVar[str] = "delivery"

    slot: Slot
    rows: tuple[Transaction, ...]
    picks: tuple[int, ...]

    def payload(self) -> dict[str, Any]:
        rows = self.rows
        return {"time_delivery": list(self.slot), "transactions": [rows[i].row() for i in self.picks]}


# Numbers members' events in the outbox, (member, its event's records) each in order, keeping
# the references for `resume`: their `seq`s.
Number = Callable[[Sequence[tuple[str, SettledRef]] | Sequence[tuple[str, DeliveryRef]]], list[int]]

TRANSACTION_FIELDS = Transaction.__struct_fields__


def settled_columns(items: Sequence[tuple[str, SettledRef]], number: Number) -> dict[str, Any]:
    """The `settled.columns` payload of `(member, fill side)` items, in order, each numbered."""
    participant, commit_id, uuid, client_id, side, price, quantity, source, interval = ([] for _ in range(9))
    seq = number(items)
    for pid, ref in items:
        s = ref.fill
        participant.append(pid)
        commit_id.append(s.commit_id)
        quantity.append(s.quantity)
        source.append(s.energy_source)
        interval.append([s.time_delivery_start, s.time_delivery_end])
        side.append(ref.side)
        if ref.side == "bid":
            uuid.append(s.bid_uuid)
            client_id.append(s.bid_id)
            price.append(s.price_buy)
        else:
            uuid.append(s.ask_uuid)
            client_id.append(s.ask_id)
            price.append(s.price_sell)
    return {
        "participant": participant,
        "seq": seq,
        "commit_id": commit_id,
        "uuid": uuid,
        "id": client_id,
        "side": side,
        "price": price,
        "quantity": quantity,
        "source": source,
        "time_delivery": interval,
    }


def delivery_columns(
    slot: Slot, rows: tuple[Transaction, ...], picks: dict[str, list[int]], number: Number
) -> dict[str, Any]:
    """The `delivery.columns` payload of the members in `picks` (member -> indices of its
    rows in `rows`, in the order members first appear in them), each numbered: the rows any
    of them is a party to, once each in their order, and each member's rows by index."""
    used = sorted({i for mine in picks.values() for i in mine})
    if len(used) == len(rows):  # every row concerns a member (one fleet for the market): as they are
        table, indices = rows, list(picks.values())
    else:
        at = {i: j for j, i in enumerate(used)}
        table, indices = tuple(rows[i] for i in used), [[at[i] for i in mine] for mine in picks.values()]
    columns = (
        [list(c) for c in zip(*map(msgspec.structs.astuple, table), strict=True)]
        if table
        else [[] for _ in TRANSACTION_FIELDS]
    )
    return {
        "time_delivery": list(slot),
        "participant": list(picks),
        "seq": number([(pid, DeliveryRef(slot, rows, tuple(mine))) for pid, mine in picks.items()]),
        "rows": indices,
        "transactions": dict(zip(TRANSACTION_FIELDS, columns, strict=True)),
    }


class _AllBut:
    """Every name but some (`in` only): the parties an engine call makes payloads for."""

    __slots__ = ("_out",)

    def __init__(self, out: Container[str]) -> None:
        self._out = out

    def __contains__(self, name: object) -> bool:
        return name not in self._out


def all_but(names: Collection[str]) -> Container[str] | None:
    """The parties whose events are made as dicts when `names` get theirs in columns (None: all)."""
    return _AllBut(names) if names else None


def route_settled(
    settlements: Sequence[Settlement], columnar: Container[str], routes: Mapping[str, str]
) -> tuple[dict[str, list[tuple[str, SettledRef]]], list[tuple[str, dict[str, Any]]]]:
    """The fill sides of the parties in `columnar`, in the order `settled` events are made
    (each fill's buyer, then its seller): per connection for those `routes` still sends
    columns to, and as `settled` payloads for the others (they left a columnar connection
    between the clearing and now)."""
    per_sid: dict[str, list[tuple[str, SettledRef]]] = {}
    rest: list[tuple[str, dict[str, Any]]] = []

    def put(pid: str, s: Settlement, side: Side) -> None:
        if pid not in columnar:
            return
        sid = routes.get(pid)
        if sid is None:
            rest.append((pid, settled_event(s, side)))
        else:
            per_sid.setdefault(sid, []).append((pid, SettledRef(s, side)))

    for s in settlements:
        put(s.buyer_id, s, "bid")
        put(s.seller_id, s, "ask")
    return per_sid, rest


def route_rows(
    rows: Sequence[Transaction], columnar: Container[str], routes: Mapping[str, str]
) -> tuple[dict[str, dict[str, list[int]]], set[str]]:
    """Each party in `columnar`'s row indices, per connection `routes` sends columns to
    (members in the order they first appear, as `delivery` payloads are made), and the
    parties in `columnar` it no longer does."""
    mine: dict[str, list[int]] = {}  # every party's rows, parties in the order they first appear
    for i, r in enumerate(rows):
        seller, buyer = r.seller_id, r.buyer_id
        at = mine.get(seller)
        if at is None:
            mine[seller] = [i]
        else:
            at.append(i)
        if buyer != seller:
            at = mine.get(buyer)
            if at is None:
                mine[buyer] = [i]
            else:
                at.append(i)
    picks: dict[str, dict[str, list[int]]] = {}
    rest: set[str] = set()
    for pid, at in mine.items():  # then sorted out once per party, not per row
        if pid not in columnar:
            continue
        sid = routes.get(pid)
        if sid is None:
            rest.add(pid)
        else:
            picks.setdefault(sid, {})[pid] = at
    return picks, rest
