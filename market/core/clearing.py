"""Clearing of one delivery slot: the `microte` mechanism of PROTOCOL.md, as pure functions.

Bids are taken by price descending, asks ascending, ties by submission (time, then the
entry's tie key). The best bid meets the cheapest compatible ask while bid price >= ask
price: a pair of the same owner is skipped (self-trades and wash trades: `owners` maps a
participant to its owner, by default the participant itself), and a bid with a `source`
only meets asks of that source. Each meeting fills min(remaining quantities) (partial fills).

`clear` runs a greedy scan over the sorted entries (linear after the sort). `match_sorted`
is the same rule as a numpy kernel over arrays (cumulative sums merged on one axis, no
participant or source constraints) for callers that already hold arrays, each side put in
priority by `priority_order` (the order `clear` sorts in); on `Entry` objects the scan is
faster at every size measured (building the arrays and checking owners costs more per
entry than the scan itself; see docs/benchmarks-clearing.md), so `clear` does not use it.

Two matchings decide who trades within a price level. `price_time` (the default, PROTOCOL.md):
the earliest orders of a level take its volume first. `pro_rata` (TREX-Core's MicroTE4):
every level trades the volume it trades under price-time priority, split among its orders
in proportion to their quantities, exact in Wh (`split_pro_rata`: floors of the exact
shares, then the Wh left over one each to the largest remainders, equal remainders by
priority: submission time, then tie key). Without owner or source constraints only the
marginal level of each side is ever split: the levels above it are filled whole either
way. The shares are then paired as price-time pairs orders (best bid first, cheapest
compatible ask, owners and bid sources honoured); volume a constraint keeps from the order
it was shared to (its owner's own ask, a sourced bid) is matched afterwards, by price-time
priority, among what is left.
`pro_rata_sorted` is the same rule as a numpy kernel for unconstrained arrays.
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
Matching = Literal["price_time", "pro_rata"]
MATCHINGS: tuple[Matching, ...] = ("price_time", "pro_rata")

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
UIntArray = npt.NDArray[np.uint64]


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
    matching: Matching = "price_time",
) -> list[Fill]:
    """Fills of one slot, in commit order, priced by `pricing`. `ranked`: the entries are
    already in `bid_order` / `ask_order` (as `Book.pop_slot` gives them), so no sort.
    `owners`: participant -> owner for accounts that share one (the registry's `owner`);
    a participant it does not name is its own owner. No bid meets an ask of its owner.
    `matching`: who trades within a price level (module docstring)."""
    b = bids if ranked else _sorted(bids, descending=True)
    a = asks if ranked else _sorted(asks, descending=False)
    pairs = _pro_rata(b, a, owners) if matching == "pro_rata" else _greedy(b, a, owners)
    return _price(b, a, pairs, pricing)


def split_pro_rata(quantities: Sequence[int], volume: int) -> list[int]:
    """`volume` Wh split over orders of `quantities` (in priority order) in proportion to
    them, exactly: each gets the floor of its share `volume * q / total`, and the Wh left
    (fewer than the orders) go one each to the largest remainders, equal remainders to the
    earlier order. Every part is within 1 Wh of its exact share and at most its quantity."""
    total = sum(quantities)
    if not 0 <= volume <= total:
        raise ValueError(f"cannot split {volume} Wh over orders of {total} Wh")
    if volume == total:
        return list(quantities)
    if not volume:
        return [0] * len(quantities)
    parts = [volume * q // total for q in quantities]
    left = volume - sum(parts)
    if left:
        # Remainders of volume * q / total, compared as integers (exact).
        by_remainder = sorted(range(len(parts)), key=lambda k: (-(volume * quantities[k] % total), k))
        for k in by_remainder[:left]:
            parts[k] += 1
    return parts


def _split_levels(entries: Sequence[Entry], filled: list[int]) -> list[int]:
    """Each price level's filled volume split over its orders by `split_pro_rata`."""
    out = list(filled)
    k, n = 0, len(entries)
    while k < n:
        end = k + 1
        price = entries[k].price
        while end < n and entries[end].price == price:
            end += 1
        if end - k > 1:
            volume = sum(filled[k:end])
            out[k:end] = split_pro_rata([e.quantity for e in entries[k:end]], volume)
        k = end
    return out


def _pro_rata(
    bids: Sequence[Entry], asks: Sequence[Entry], owners: Mapping[str, str] | None = None
) -> list[tuple[int, int, int]]:
    """Pro-rata pairs over sorted entries: each level's price-time volume split over its
    orders, those shares paired by the greedy scan; what constraints left unpaired is
    matched by the scan among the quantities still open. One pair per (bid, ask), in the
    order first made."""
    first = _greedy(bids, asks, owners)
    if not first:
        return first
    bid_share, ask_share = _filled(first, len(bids), len(asks))
    bid_share, ask_share = _split_levels(bids, bid_share), _split_levels(asks, ask_share)
    pairs = _greedy(bids, asks, owners, bid_share, ask_share)
    bid_done, ask_done = _filled(pairs, len(bids), len(asks))
    if bid_done == bid_share and ask_done == ask_share:
        return pairs
    # A constraint kept some shares unpaired: price-time among the quantities still open.
    rest = _greedy(
        bids,
        asks,
        owners,
        [e.quantity - d for e, d in zip(bids, bid_done, strict=True)],
        [e.quantity - d for e, d in zip(asks, ask_done, strict=True)],
    )
    merged: dict[tuple[int, int], int] = {}
    for i, j, q in (*pairs, *rest):
        merged[i, j] = merged.get((i, j), 0) + q
    return [(i, j, q) for (i, j), q in merged.items()]


def _filled(pairs: list[tuple[int, int, int]], n_bids: int, n_asks: int) -> tuple[list[int], list[int]]:
    """Wh filled per bid and per ask by `pairs`."""
    bid_filled, ask_filled = [0] * n_bids, [0] * n_asks
    for i, j, q in pairs:
        bid_filled[i] += q
        ask_filled[j] += q
    return bid_filled, ask_filled


def _greedy(
    bids: Sequence[Entry],
    asks: Sequence[Entry],
    owners: Mapping[str, str] | None = None,
    bid_quantity: Sequence[int] | None = None,
    ask_quantity: Sequence[int] | None = None,
) -> list[tuple[int, int, int]]:
    """Greedy scan over sorted entries: each bid, best first, takes the cheapest asks it may
    meet (not its owner's; only its source's if it names one) while it can pay them; it
    stops at the first bid that cannot pay the cheapest open ask. `bid_quantity` and
    `ask_quantity` replace the entries' quantities (0: the entry takes no part).

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
    remaining = [a.quantity for a in asks] if ask_quantity is None else list(ask_quantity)
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
        need = bid.quantity if bid_quantity is None else bid_quantity[i]
        if not need:
            continue
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


def priority_order(price: FloatArray, time: IntArray, tie: UIntArray, *, descending: bool) -> IntArray:
    """Indices of one side's orders in price-time priority, as `clear` sorts entries: by
    price (`descending` for bids), then submission time, then tie key, then position (the
    object path's sort is stable). Prices finite, times >= 0, tie keys in [0, 2^64).

    One sort of uint64 keys instead of a three-key `np.lexsort` (stable merge sorts, ~5x
    slower): from the top, each key packs the price's dense rank, the time (its offset or
    rank), as many top bits of the tie key as fit, and the position. Orders whose keys agree
    above the position (tie keys equal in those bits) are then ordered by the full tie key."""
    n = len(price)
    if n == 0:
        return np.zeros(0, np.int64)
    # Prices are floats: only their order counts, so rank them (equal prices, -0.0 and
    # 0.0 included, share a rank) in price order and build the keys in that order.
    by_price = np.argsort(price)
    rank = _levels(price[by_price])
    top = int(rank[-1])
    if descending:
        rank = top - rank
    when, time_bits = _time_key(time, by_price)
    pos_bits = (n - 1).bit_length()
    rank_bits = top.bit_length()
    tie_bits = min(_KEY_BITS - rank_bits - time_bits - pos_bits, 64)
    if tie_bits < 0:  # past ~2^21 orders per side the ranks alone fill 64 bits
        return np.lexsort((tie, time, -price if descending else price)).astype(np.int64)
    key = rank << (time_bits + tie_bits + pos_bits)
    key |= when << (tie_bits + pos_bits)
    if tie_bits:
        key |= (tie[by_price].astype(np.uint64, copy=False) >> (64 - tie_bits)) << pos_bits
    key |= by_price.astype(np.uint64)
    key.sort()
    order = (key & np.uint64((1 << pos_bits) - 1)).astype(np.int64)
    above = key >> pos_bits
    same = above[1:] == above[:-1]
    if same.any():
        _order_ties(order, same, tie)
    return order


_KEY_BITS = 64  # of a `priority_order` key (a test narrows it to force the other paths)


def _levels(sorted_values: npt.NDArray[np.generic]) -> UIntArray:
    """Dense ranks of sorted values: 0 for the smallest, +1 at each change."""
    rank = np.zeros(len(sorted_values), np.uint64)
    np.cumsum(sorted_values[1:] != sorted_values[:-1], out=rank[1:])
    return rank


def _time_key(time: IntArray, by_price: IntArray) -> tuple[UIntArray, int]:
    """Submission times in `by_price` order as small unsigned keys, and their bit width:
    the offset from the earliest, or the dense rank where the span needs more bits."""
    earliest, span = int(time.min()), int(time.max() - time.min())
    if span.bit_length() <= len(time).bit_length():
        return (time[by_price] - earliest).astype(np.uint64), span.bit_length()
    distinct, rank = np.unique(time, return_inverse=True)
    return rank[by_price].astype(np.uint64), (len(distinct) - 1).bit_length()


def _order_ties(order: IntArray, same: npt.NDArray[np.bool_], tie: UIntArray) -> None:
    """Each run of `order` whose keys agreed above the position re-sorted in place by the
    full tie key, then position (rare: tie keys are 64-bit hashes)."""
    member = np.zeros(len(order), bool)
    member[1:] = same
    member[:-1] |= same
    at = np.flatnonzero(member)
    run = np.cumsum(~np.concatenate(([False], same))[at])
    sub = order[at]
    order[at] = sub[np.lexsort((sub, tie[sub], run))]


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
    # Both sides' breakpoints on one axis, the side in the low bit (a bid first at an equal
    # end): a stable sort merges the two sorted runs in linear time. Not np.union1d (numpy
    # 2's unique is 100x slower here) nor searchsorted (a binary search per breakpoint).
    cuts = np.concatenate((bid_end << 1, (ask_end << 1) | 1))
    cuts.sort(kind="stable")
    is_ask = cuts & 1
    cuts >>= 1
    # Pieces end at breakpoints in (0, the smaller total]: orders of 0 Wh close none.
    lo = int(np.searchsorted(cuts, 0, side="right"))
    hi = int(np.searchsorted(cuts, min(bid_end[-1], ask_end[-1]), side="right"))
    if lo == hi:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    # Of equal breakpoints the first stands for all; the bids and asks before it are the
    # ones that end before the piece it closes, so their counts index the piece's pair.
    first = np.empty(hi - lo, dtype=bool)
    first[0] = True
    np.not_equal(cuts[lo + 1 : hi], cuts[lo : hi - 1], out=first[1:])
    at = np.flatnonzero(first) + lo
    asks_before = np.cumsum(is_ask[:hi])[at] - is_ask[at]
    bi = at - asks_before
    crossing = bid_price[bi] >= ask_price[asks_before]
    # Prices get worse monotonically, so the crossing pieces form a prefix.
    n = int(np.argmin(crossing)) if not crossing.all() else len(crossing)
    ends = cuts[at[:n]]
    return bi[:n], asks_before[:n], np.diff(ends, prepend=0)


def pro_rata_sorted(
    bid_price: FloatArray, bid_qty: IntArray, ask_price: FloatArray, ask_qty: IntArray
) -> tuple[IntArray, IntArray, IntArray]:
    """`match_sorted` with pro-rata matching (module docstring): the volume of price-time
    priority, each side's marginal level split by `split_pro_rata`, the shares paired along
    one axis of energy. Equal to `clear(..., matching="pro_rata")` on unconstrained entries
    (tests/market check it)."""
    _, _, q = match_sorted(bid_price, bid_qty, ask_price, ask_qty)
    volume = int(q.sum())
    if not volume:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    bid_share = _split_sorted(bid_price, bid_qty, volume)
    ask_share = _split_sorted(ask_price, ask_qty, volume)
    bk, ak = np.flatnonzero(bid_share), np.flatnonzero(ask_share)
    bi, ai, q = match_sorted(bid_price[bk], bid_share[bk], ask_price[ak], ask_share[ak])
    return bk[bi].astype(np.int64), ak[ai].astype(np.int64), q


def _split_sorted(price: FloatArray, qty: IntArray, volume: int) -> IntArray:
    """Shares of `volume` Wh over one sorted side: price-time fills a prefix of the side's
    energy axis; the level where that prefix ends is split by `split_pro_rata` (exact
    Python integers: products of Wh may pass 2^63), every other level is whole or empty."""
    end = np.cumsum(qty)
    share: IntArray = np.clip(volume - (end - qty), 0, qty).astype(np.int64)
    starts = np.flatnonzero(np.concatenate(([True], price[1:] != price[:-1])))
    last = int(np.searchsorted(end, volume, side="left"))  # the entry where the volume ends
    level = int(np.searchsorted(starts, last, side="right")) - 1
    lo = int(starts[level])
    hi = int(starts[level + 1]) if level + 1 < len(starts) else len(qty)
    if hi - lo > 1:
        share[lo:hi] = split_pro_rata(qty[lo:hi].tolist(), int(share[lo:hi].sum()))
    return share


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
