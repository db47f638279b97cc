"""Clearing of one delivery slot: the `microte` mechanism of PROTOCOL.md, as pure functions.

Bids are taken by price descending, asks ascending, ties by submission (time, then the
entry's tie key). The best bid meets the cheapest compatible ask while bid price >= ask
price: a pair of the same participant is skipped, and a bid with a `source` only meets
asks of that source. Each meeting fills min(remaining quantities) (partial fills).

Two implementations give the same fills: a greedy scan (small slots, or when sources or
self-pairs constrain it) and a numpy merge of cumulative quantities for large
unconstrained slots (sort + cumsum + searchsorted, O(n log n), no pairwise scan).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np
import numpy.typing as npt

from market.book import Entry

Pricing = Literal["midpoint", "pay_as_bid", "uniform"]
PRICINGS: tuple[Pricing, ...] = ("midpoint", "pay_as_bid", "uniform")
NUMPY_MIN_ORDERS = 4000  # below this the plain loop is faster than building arrays

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


class Fill(msgspec.Struct, frozen=True):
    bid: Entry
    ask: Entry
    quantity: int
    price_buy: float  # per kWh paid by the buyer
    price_sell: float  # per kWh received by the seller


def bid_order(e: Entry) -> tuple[float, int, int]:
    return (-e.price, e.time_submission, e.tie)


def ask_order(e: Entry) -> tuple[float, int, int]:
    return (e.price, e.time_submission, e.tie)


def clear(bids: Sequence[Entry], asks: Sequence[Entry], pricing: Pricing = "midpoint") -> list[Fill]:
    """Fills of one slot, in commit order, priced by `pricing`."""
    b = sorted(bids, key=bid_order)
    a = sorted(asks, key=ask_order)
    pairs: list[tuple[int, int, int]] | None = None
    if len(b) + len(a) >= NUMPY_MIN_ORDERS and all(x.source is None for x in b):
        pairs = _merge_unless_self_pair(b, a)
    if pairs is None:
        pairs = _greedy(b, a)
    return _price([(b[i], a[j], q) for i, j, q in pairs], pricing)


def _greedy(bids: Sequence[Entry], asks: Sequence[Entry]) -> list[tuple[int, int, int]]:
    """Greedy scan over sorted entries. Each source's asks keep their own cursor past
    exhausted asks, so a bid only rescans asks it was incompatible with (its own)."""
    remaining = [a.quantity for a in asks]
    lanes: dict[str | None, list[int]] = {None: list(range(len(asks)))}
    for j, a in enumerate(asks):
        lanes.setdefault(a.source, []).append(j)
    cursors = dict.fromkeys(lanes, 0)
    pairs: list[tuple[int, int, int]] = []
    for i, bid in enumerate(bids):
        lane_key = bid.source
        lane = lanes.get(lane_key)
        if lane is None:
            continue
        pos = cursors[lane_key]
        while pos < len(lane) and remaining[lane[pos]] == 0:
            pos += 1
        cursors[lane_key] = pos
        # The cheapest open ask (of any source) is dearer than this bid: no later bid can pay it.
        all_lane = lanes[None]
        first = cursors[None]
        while first < len(all_lane) and remaining[all_lane[first]] == 0:
            first += 1
        cursors[None] = first
        if first == len(all_lane) or asks[all_lane[first]].price > bid.price:
            break
        need = bid.quantity
        while need and pos < len(lane):
            j = lane[pos]
            ask = asks[j]
            if ask.price > bid.price:
                break
            if remaining[j] and ask.participant != bid.participant:
                q = min(need, remaining[j])
                pairs.append((i, j, q))
                need -= q
                remaining[j] -= q
            pos += 1 if remaining[j] == 0 or ask.participant == bid.participant else 0
    return pairs


def _merge_unless_self_pair(bids: Sequence[Entry], asks: Sequence[Entry]) -> list[tuple[int, int, int]] | None:
    """numpy merge; None when it would pair a participant with itself (the greedy scan,
    which skips such pairs, must decide then)."""
    bi, ai, q = match_sorted(
        np.fromiter((e.price for e in bids), np.float64, len(bids)),
        np.fromiter((e.quantity for e in bids), np.int64, len(bids)),
        np.fromiter((e.price for e in asks), np.float64, len(asks)),
        np.fromiter((e.quantity for e in asks), np.int64, len(asks)),
    )
    owners: dict[str, int] = {}
    bo = np.fromiter((owners.setdefault(e.participant, len(owners)) for e in bids), np.int64, len(bids))
    ao = np.fromiter((owners.setdefault(e.participant, len(owners)) for e in asks), np.int64, len(asks))
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
    cuts = np.union1d(bid_end, ask_end)
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


def _price(matches: list[tuple[Entry, Entry, int]], pricing: Pricing) -> list[Fill]:
    if pricing == "pay_as_bid":
        return [Fill(b, a, q, b.price, a.price) for b, a, q in matches]
    if pricing == "uniform":
        if not matches:
            return []
        last_bid, last_ask, _ = matches[-1]
        p = (last_bid.price + last_ask.price) / 2
        return [Fill(b, a, q, p, p) for b, a, q in matches]
    return [Fill(b, a, q, (b.price + a.price) / 2, (b.price + a.price) / 2) for b, a, q in matches]
