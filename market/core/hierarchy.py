"""A market of markets (docs/hierarchy.md), pure: what a community passes up to the market
above it after its own clearing, and how what comes back settles in the community.

After a slot's local clearing, every entry's unmatched remainder is a `Residual`. The
community trades its residuals in the upstream market as one participant, one upstream
order per residual (so a fill upstream belongs to exactly one member: nothing is split,
and quantities and amounts are the same at both levels, exactly). A fill upstream comes
back as a settlement between the member and the community's upstream account
`UPSTREAM_ID`, at the upstream fill's prices; the exchange then settles it like any P2P
fill against the member's meter and the upstream account's reading, which is what it
bought upstream (generation) and sold upstream (consumption). What the upstream account
physically passed on is the community's reading in the upstream market (`physical_flows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec

from market.core.book import Entry
from market.core.clearing import Fill
from market.core.protocol import MAX_QUANTITY, ConsumptionMsg, MeterMsg
from market.core.records import Settlement, Transaction, amount

UPSTREAM_ID = "upstream"  # a community's account with the market above it (reserved id)
MAX_PRICE = 1e6  # per kWh: an upstream fill's amounts stay far inside int64
_PHYSICAL = ("p2p", "bess_compensation")


class Residual(msgspec.Struct, frozen=True):
    """What was left of one entry after its slot's local clearing."""

    side: Literal["bid", "ask"]
    participant: str
    uuid: str
    id: str | None
    price: float
    quantity: int  # Wh not matched locally, > 0
    source: str | None  # an ask's source


class UpstreamFill(msgspec.Struct, frozen=True):
    """A fill of one residual in the upstream market: `quantity` Wh of it at the upstream
    fill's prices; `source` is the energy's source (an ask's own, or the upstream seller's
    for a bid); `ref` names the upstream fill (its commit id there)."""

    residual: Residual
    quantity: int
    price_buy: float
    price_sell: float
    source: str
    ref: str


def matched(fills: Iterable[Fill]) -> dict[str, int]:
    """Wh matched per entry uuid by a slot's fills."""
    out: dict[str, int] = {}
    for f in fills:
        out[f.bid.uuid] = out.get(f.bid.uuid, 0) + f.quantity
        out[f.ask.uuid] = out.get(f.ask.uuid, 0) + f.quantity
    return out


def settled(settlements: Iterable[Settlement]) -> dict[str, int]:
    """`matched` from a slot's recorded (local) settlements, as a restart finds them."""
    out: dict[str, int] = {}
    for s in settlements:
        out[s.bid_uuid] = out.get(s.bid_uuid, 0) + s.quantity
        out[s.ask_uuid] = out.get(s.ask_uuid, 0) + s.quantity
    return out


def residuals(entries: Iterable[Entry], matched_wh: Mapping[str, int]) -> list[Residual]:
    """The unmatched remainder of every entry of a slot, bids first, each side by uuid: an
    order that depends only on the entries and the fills, so a restart finds the same list
    (the upstream orders are named by their position in it)."""
    out = [
        Residual(e.side, e.participant, e.uuid, e.id, e.price, e.quantity - matched_wh.get(e.uuid, 0), e.source)
        for e in entries
        if e.quantity > matched_wh.get(e.uuid, 0)
    ]
    out.sort(key=lambda r: (r.side != "bid", r.uuid))
    return out


def check_fills(
    fills: Sequence[UpstreamFill], open_residuals: Mapping[str, Residual], taken: Mapping[str, int] | None = None
) -> None:
    """Refuse fills of residuals the community never passed up, or beyond what was left of
    them (`taken`: Wh of each residual that earlier upstream fills already took)."""
    total = dict(taken or {})
    for f in fills:
        r = open_residuals.get(f.residual.uuid)
        if r is None or r != f.residual:
            raise ValueError(f"upstream fill {f.ref}: no such residual {f.residual.uuid}")
        if f.quantity <= 0:
            raise ValueError(f"upstream fill {f.ref}: quantity {f.quantity} is not positive")
        if (
            not (math.isfinite(f.price_buy) and math.isfinite(f.price_sell))
            or max(abs(f.price_buy), abs(f.price_sell)) > MAX_PRICE
        ):
            raise ValueError(f"upstream fill {f.ref}: price outside +-{MAX_PRICE:g}")
        if f.quantity > MAX_QUANTITY:
            raise ValueError(f"upstream fill {f.ref}: quantity {f.quantity} above {MAX_QUANTITY}")
        if r.side == "ask" and f.source != r.source:
            raise ValueError(f"upstream fill {f.ref}: source {f.source!r}, the ask offered {r.source!r}")
        # The member's limit holds above too: nobody pays above its bid or gets below its ask.
        if r.side == "bid" and f.price_buy > r.price:
            raise ValueError(f"upstream fill {f.ref}: price {f.price_buy} above the bid's {r.price}")
        if r.side == "ask" and f.price_sell < r.price:
            raise ValueError(f"upstream fill {f.ref}: price {f.price_sell} below the ask's {r.price}")
        total[r.uuid] = total.get(r.uuid, 0) + f.quantity
        if total[r.uuid] > r.quantity:
            raise ValueError(f"upstream fill {f.ref}: {total[r.uuid]} Wh of residual {r.uuid} exceed its {r.quantity}")


def ref_of(s: Settlement) -> str:
    """The upstream fill a community's upstream settlement came from (`UpstreamFill.ref`)."""
    return s.ask_uuid if s.seller_id == UPSTREAM_ID else s.bid_uuid


def member_uuid(s: Settlement) -> str:
    """The residual (the member's entry) an upstream settlement filled."""
    return s.bid_uuid if s.seller_id == UPSTREAM_ID else s.ask_uuid


def upstream_settlements(
    slot: tuple[int, int],
    fills: Sequence[UpstreamFill],
    first_seq: int,
    now: int,
    dispatch: Iterable[str],
    first_id: int = 0,
) -> list[Settlement]:
    """The community's settlements of upstream fills, after its other ones (`first_seq` on),
    ids `u{start}-{i}` from `first_id`: a member's bid is bought from `UPSTREAM_ID`, its ask
    sold to it. (Fills come in batches: the market above, then the one above that.)"""
    dispatching = frozenset(dispatch)
    out: list[Settlement] = []
    for i, f in enumerate(fills):
        r, bid = f.residual, f.residual.side == "bid"
        out.append(
            Settlement(
                commit_id=f"u{slot[0]}-{first_id + i}",
                time_delivery_start=slot[0],
                time_delivery_end=slot[1],
                seller_id=UPSTREAM_ID if bid else r.participant,
                buyer_id=r.participant if bid else UPSTREAM_ID,
                bid_uuid=r.uuid if bid else f.ref,
                ask_uuid=f.ref if bid else r.uuid,
                bid_id=r.id if bid else None,
                ask_id=None if bid else r.id,
                energy_source=f.source,
                quantity=f.quantity,
                price_buy=f.price_buy,
                price_sell=f.price_sell,
                amount_buy=amount(f.quantity, f.price_buy),
                amount_sell=amount(f.quantity, f.price_sell),
                dispatch=f.source in dispatching,
                seq=first_seq + i,
                time_creation=now,
            )
        )
    return out


def upstream_meter(slot: tuple[int, int], settlements: Iterable[Settlement]) -> MeterMsg | None:
    """The upstream account's reading of a slot: it delivers what the community bought
    upstream (generation per source) and takes what it sold (imports); None if neither."""
    gen: dict[str, int] = {}
    taken = 0
    for s in settlements:
        if s.seller_id == UPSTREAM_ID:
            gen[s.energy_source] = gen.get(s.energy_source, 0) + s.quantity
        elif s.buyer_id == UPSTREAM_ID:
            taken += s.quantity
    if not gen and not taken:
        return None
    return MeterMsg(
        time_interval=slot,
        generation=dict(sorted(gen.items())),
        consumption=ConsumptionMsg(other={"external": taken} if taken else {}),
    )


def _passed(rows: Iterable[Transaction]) -> tuple[dict[str, int], dict[str, int]]:
    """What the upstream account physically passed in a slot, per source: (taken from the
    members, delivered to them). Financial rows moved no energy."""
    taken: dict[str, int] = {}
    given: dict[str, int] = {}
    for t in rows:
        if t.kind not in _PHYSICAL:
            continue
        if t.buyer_id == UPSTREAM_ID:
            taken[t.energy_source] = taken.get(t.energy_source, 0) + t.quantity
        elif t.seller_id == UPSTREAM_ID:
            given[t.energy_source] = given.get(t.energy_source, 0) + t.quantity
    return dict(sorted(taken.items())), dict(sorted(given.items()))


def physical_flows(rows: Iterable[Transaction]) -> tuple[dict[str, int], int]:
    """The community's reading in the upstream market for a slot: (energy the members
    delivered to the upstream account, per source; energy it delivered to the members)."""
    taken, given = _passed(rows)
    return taken, sum(given.values())


def passed_reading(slot: tuple[int, int], rows: Iterable[Transaction]) -> MeterMsg:
    """The upstream account's reading as it physically passed energy on in a slot: what it
    delivered to members (generation, by source) and what it took from them (imports)."""
    taken, given = _passed(rows)
    total = sum(taken.values())
    other = {"external": total} if total else {}
    return MeterMsg(time_interval=slot, generation=given, consumption=ConsumptionMsg(other=other))


# -- the wire between a market and the one above (the socket runner, the rt link, in-process) --


def residual_rows(start: int, found: Sequence[Residual]) -> list[dict[str, Any]]:
    """A slot's residuals as the market above may see them: `{start}-{n}` by position (the
    order a restart finds again), no member named (`upstream.residuals`)."""
    return [
        {"id": f"{start}-{n}", "side": r.side, "quantity": r.quantity, "price": r.price, "source": r.source}
        for n, r in enumerate(found)
    ]


def upstream_orders(market: str, rows: Iterable[Mapping[str, Any]], slot: Sequence[int]) -> list[dict[str, Any]]:
    """The orders `market` places above for residual rows: one each, client id
    `{market}:{id}`, so a fill routed to another market is refused there (`residual_id`)."""
    out: list[dict[str, Any]] = []
    for r in rows:
        order = {"side": r["side"], "quantity": r["quantity"], "price": r["price"], "time_delivery": list(slot)}
        order["id"] = f"{market}:{r['id']}"
        if r["source"] is not None:
            order["source"] = r["source"]
        out.append(order)
    return out


def residual_id(market: str, order_id: str) -> str:
    """The residual an order of `market` above carries; ValueError for another's order."""
    mine, _, rid = order_id.partition(":")
    if mine != market or not rid:
        raise ValueError(f"{market}: a fill of order {order_id!r}, which it never placed")
    return rid


def fill_of(market: str, settled: Mapping[str, Any]) -> dict[str, Any]:
    """An `upstream.fills` item from the `settled` payload `market` got above."""
    return {
        "id": residual_id(market, str(settled["id"])),
        "quantity": settled["quantity"],
        "price": settled["price"],
        "source": settled["source"],
        "ref": settled["commit_id"],
    }
