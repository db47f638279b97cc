"""Clearing of one delivery slot: the `microte` mechanism of PROTOCOL.md, as pure functions.

Bids are taken by price descending, asks ascending, ties by submission (time, then the
entry's tie key). The best bid meets the cheapest compatible ask while bid price >= ask
price: a pair of the same owner is skipped (self-trades and wash trades: `owners` maps a
participant to its owner, by default the participant itself), and a bid with a `source`
only meets asks of that source. Each meeting fills min(remaining quantities) (partial fills).

`clear` runs a greedy scan over the sorted entries (linear after the sort). `match_sorted`
is the same rule as a numpy kernel over arrays (cumsum + searchsorted, no participant or
source constraints) for callers that already hold arrays; on `Entry` objects the scan is
faster at every size measured (building the arrays and checking owners costs more per
entry than the scan itself; see docs/benchmarks-clearing.md), so `clear` does not use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import attrgetter
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

from market.core.book import Entry
from market.core.book import ask_order as ask_order
from market.core.book import bid_order as bid_order

Pricing = Literal["midpoint", "pay_as_bid", "uniform"]
PRICINGS: tuple[Pricing, ...] = ("midpoint", "pay_as_bid", "uniform")

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class Fill(msgspec.Struct, frozen=True, gc=False):
    """One fill of a slot. `gc=False`: a fill only refers to entries, which refer to
    nothing that could refer back, so no cycle is possible (and creation is ~40 % cheaper)."""

    bid: Entry
    ask: Entry
    quantity: int
    price_buy: float  # per kWh paid by the buyer
    price_sell: float  # per kWh received by the seller


_PRICE = attrgetter("price")
_TIME = attrgetter("time_submission")
_TIE = attrgetter("tie")


def _sorted(entries: Sequence[Entry], descending: bool) -> list[Entry]:
    """Entries by `bid_order` (descending) or `ask_order`: three stable passes on single
    keys (fast C comparisons) instead of one pass on tuples; `reverse` keeps stability."""
    out = sorted(entries, key=_TIE)
    out.sort(key=_TIME)
    out.sort(key=_PRICE, reverse=descending)
    return out


def clear(
    bids: Sequence[Entry],
    asks: Sequence[Entry],
    pricing: Pricing = "midpoint",
    *,
    ranked: bool = False,
    owners: Mapping[str, str] | None = None,
) -> list[Fill]:
    """Fills of one slot, in commit order, priced by `pricing`. `ranked`: the entries are
    already in `bid_order` / `ask_order` (as `Book.pop_slot` gives them), so no sort.
    `owners`: participant -> owner for accounts that share one (the registry's `owner`);
    a participant it does not name is its own owner. No bid meets an ask of its owner."""
    b = bids if ranked else _sorted(bids, descending=True)
    a = asks if ranked else _sorted(asks, descending=False)
    return _price(b, a, _greedy(b, a, owners), pricing)


def _greedy(
    bids: Sequence[Entry], asks: Sequence[Entry], owners: Mapping[str, str] | None = None
) -> list[tuple[int, int, int]]:
    """Greedy scan over sorted entries: each bid, best first, takes the cheapest asks it may
    meet (not its owner's; only its source's if it names one) while it can pay them; it
    stops at the first bid that cannot pay the cheapest open ask.

    Linear in practice: each source's asks keep a cursor past exhausted asks, and each
    (source, owner) a cursor past asks that are exhausted or its owner's (both only move
    forward), so an owner's bids never rescan its own asks. Without `owners` (or with an
    empty one) the owner is the participant, at no cost per entry."""
    n = len(asks)
    owners = owners or None
    # A sentinel ask at the end (never exhausted, never affordable) ends every scan.
    price = [a.price for a in asks]
    price.append(float("inf"))
    if owners is None:
        owner = [a.participant for a in asks]
    else:
        owner = [owners.get(a.participant, a.participant) for a in asks]
    owner.append("")
    remaining = [a.quantity for a in asks]
    remaining.append(1)
    lanes: dict[str, list[int]] = {}
    cursors: dict[str, int] = {}
    if any(x.source is not None for x in bids):
        for j, a in enumerate(asks):
            if a.source is not None:
                lanes.setdefault(a.source, []).append(j)
        for indices in lanes.values():
            indices.append(n)
        cursors = dict.fromkeys(lanes, 0)
    own_any: dict[str, int] = {}  # owner -> position among all asks
    own_lane: dict[tuple[str, str], int] = {}  # (source, owner) -> position in the lane
    pairs: list[tuple[int, int, int]] = []
    add = pairs.append
    first = 0  # the cheapest ask that is not exhausted
    for i, bid in enumerate(bids):
        limit = bid.price
        while not remaining[first]:
            first += 1
        if price[first] > limit:
            break  # no later (cheaper) bid can pay the cheapest open ask either
        need = bid.quantity
        who = bid.participant if owners is None else owners.get(bid.participant, bid.participant)
        src = bid.source
        if src is None:
            j = own_any.get(who, 0)
            if j < first:
                j = first
            while price[j] <= limit:
                r = remaining[j]
                if r and owner[j] != who:
                    if r > need:
                        remaining[j] = r - need
                        add((i, j, need))
                        break
                    remaining[j] = 0
                    add((i, j, r))
                    need -= r
                    if not need:
                        break
                j += 1
            own_any[who] = j
            continue
        lane = lanes.get(src)
        if lane is None:
            continue
        pos = cursors[src]
        while not remaining[lane[pos]]:
            pos += 1
        cursors[src] = pos
        mine = own_lane.get((src, who), 0)
        if mine > pos:
            pos = mine
        j = lane[pos]
        while price[j] <= limit:
            r = remaining[j]
            if r and owner[j] != who:
                if r > need:
                    remaining[j] = r - need
                    add((i, j, need))
                    break
                remaining[j] = 0
                add((i, j, r))
                need -= r
                if not need:
                    break
            pos += 1
            j = lane[pos]
        own_lane[src, who] = pos
    return pairs


def _merge_unless_self_pair(
    bids: Sequence[Entry], asks: Sequence[Entry], owners: Mapping[str, str] | None = None
) -> list[tuple[int, int, int]] | None:
    """`match_sorted` on sorted entries without bid sources; None when it would pair an
    owner with itself (the greedy scan, which skips such pairs, must decide then).
    Gives exactly the fills of `_greedy` otherwise (tests/market check it)."""
    own = owners or {}
    bi, ai, q = match_sorted(
        np.fromiter((e.price for e in bids), np.float64, len(bids)),
        np.fromiter((e.quantity for e in bids), np.int64, len(bids)),
        np.fromiter((e.price for e in asks), np.float64, len(asks)),
        np.fromiter((e.quantity for e in asks), np.int64, len(asks)),
    )
    ids: dict[str, int] = {}
    bo = np.fromiter(
        (ids.setdefault(own.get(e.participant, e.participant), len(ids)) for e in bids), np.int64, len(bids)
    )
    ao = np.fromiter(
        (ids.setdefault(own.get(e.participant, e.participant), len(ids)) for e in asks), np.int64, len(asks)
    )
    if np.any(bo[bi] == ao[ai]):
        return None
    return list(zip(bi.tolist(), ai.tolist(), q.tolist(), strict=True))


def match_sorted(
    bid_price: FloatArray, bid_qty: IntArray, ask_price: FloatArray, ask_qty: IntArray
) -> tuple[IntArray, IntArray, IntArray]:
    """Fills of sorted bids (price descending) against sorted asks (ascending), with no
    participant or source constraints: (bid index, ask index, quantity) per fill.

    Cumulative quantities put every bid and ask on one axis of energy; each fill is a piece
    between consecutive breakpoints of the two, and fills stop at the first piece whose
    bid price is below its ask price (prices only get worse along the axis)."""
    if len(bid_qty) == 0 or len(ask_qty) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    bid_end = np.cumsum(bid_qty)
    ask_end = np.cumsum(ask_qty)
    # The breakpoints of both, sorted and distinct. Not np.union1d: numpy 2's unique is
    # 100x slower here than a sort, which is near linear on two concatenated sorted runs.
    cuts = np.concatenate((bid_end, ask_end))
    cuts.sort(kind="stable")
    distinct = np.empty(len(cuts), dtype=bool)
    distinct[0] = True
    np.not_equal(cuts[1:], cuts[:-1], out=distinct[1:])
    cuts = cuts[distinct]
    cuts = cuts[cuts <= min(bid_end[-1], ask_end[-1])]
    starts = np.concatenate(([0], cuts[:-1]))
    bi = np.searchsorted(bid_end, starts, side="right")
    ai = np.searchsorted(ask_end, starts, side="right")
    crossing = bid_price[bi] >= ask_price[ai]
    # Prices get worse monotonically, so the crossing pieces form a prefix.
    n = int(np.argmin(crossing)) if not crossing.all() else len(crossing)
    return (
        bi[:n].astype(np.int64),
        ai[:n].astype(np.int64),
        (cuts[:n] - starts[:n]).astype(np.int64),
    )


def _price(
    bids: Sequence[Entry], asks: Sequence[Entry], pairs: list[tuple[int, int, int]], pricing: Pricing
) -> list[Fill]:
    if pricing == "pay_as_bid":
        return [Fill(bids[i], asks[j], q, bids[i].price, asks[j].price) for i, j, q in pairs]
    if pricing == "uniform":
        if not pairs:
            return []
        # The marginal pair: lowest matched bid, highest matched ask. Without skipped pairs
        # that is the last matched pair (PROTOCOL.md); with them, it keeps every fill within
        # its limits. If no single price can (a skip let a dear ask in), pairs get midpoints.
        low_bid = min(bids[i].price for i, _, _ in pairs)
        high_ask = max(asks[j].price for _, j, _ in pairs)
        if low_bid >= high_ask:
            p = (low_bid + high_ask) / 2
            return [Fill(bids[i], asks[j], q, p, p) for i, j, q in pairs]
    out = []
    for i, j, q in pairs:
        b, a = bids[i], asks[j]
        p = (b.price + a.price) / 2
        out.append(Fill(b, a, q, p, p))
    return out
