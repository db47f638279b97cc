"""Invariants over random books and meters (hypothesis): energy and money conserved,
limits respected, no self-trade, determinism, and the numpy kernel equal to the scan."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.core import clearing
from market.core.book import Entry
from market.core.clearing import (
    MATCHINGS,
    PRICINGS,
    Fill,
    Matching,
    Pricing,
    _greedy,
    _merge_unless_self_pair,
    _sorted,
    ask_order,
    bid_order,
    clear,
    match_sorted,
    priority_order,
    pro_rata_sorted,
)
from market.core.engine import Market, MarketConfig
from market.core.exchange import exchange
from market.core.protocol import EntryMsg, MeterMsg
from market.core.records import Transaction, amount
from tests.market.builders import SLOT, entry, meter, settlements_of

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PARTICIPANTS = ["p0", "p1", "p2", "p3", "p4"]
SOURCES = ["solar", "wind", "bess"]
# Few distinct prices, so ties are common; some are not binary fractions.
prices = st.sampled_from([0.05, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 1 / 3])
quantities = st.integers(1, 300)


@st.composite
def books(draw: Any, sourced_bids: bool = True, max_size: int = 12) -> tuple[list[Entry], list[Entry]]:
    n_b = draw(st.integers(0, max_size))
    n_a = draw(st.integers(0, max_size))
    bid_sources = st.sampled_from([None, None, *SOURCES]) if sourced_bids else st.just(None)
    bids = [
        entry(
            draw(st.sampled_from(PARTICIPANTS)),
            draw(quantities),
            draw(prices),
            draw(bid_sources),
            uuid=f"b{k}",
            time_submission=draw(st.sampled_from([0, 60])),
            tie=draw(st.integers(0, 3)) * 100 + k,
        )
        for k in range(n_b)
    ]
    asks = [
        entry(
            draw(st.sampled_from(PARTICIPANTS)),
            draw(quantities),
            draw(prices),
            draw(st.sampled_from(SOURCES)),
            side="ask",
            uuid=f"a{k}",
            time_submission=draw(st.sampled_from([0, 60])),
            tie=draw(st.integers(0, 3)) * 100 + k,
        )
        for k in range(n_a)
    ]
    return bids, asks


@st.composite
def meter_maps(draw: Any) -> dict[str, MeterMsg]:
    out = {}
    for p in PARTICIPANTS:
        if draw(st.booleans()) and draw(st.booleans()):  # about a quarter send no reading
            continue
        gen = draw(st.dictionaries(st.sampled_from(SOURCES), st.integers(0, 400), max_size=3))
        other = draw(st.dictionaries(st.sampled_from(["external", "solar", "bess"]), st.integers(0, 400), max_size=3))
        bess = draw(st.dictionaries(st.sampled_from(["solar", "wind"]), st.integers(0, 100), max_size=2))
        out[p] = meter(gen=gen, other=other, bess=bess)
    return out


def naive(bids: Sequence[Entry], asks: Sequence[Entry]) -> list[tuple[str, str, int]]:
    """PROTOCOL.md Matching, literally: each bid (best first) takes the cheapest compatible asks it can pay."""
    b, a = sorted(bids, key=bid_order), sorted(asks, key=ask_order)
    rem = [x.quantity for x in a]
    out = []
    for bid in b:
        need = bid.quantity
        for j, ask in enumerate(a):
            if need == 0 or ask.price > bid.price:
                break
            if rem[j] == 0 or ask.participant == bid.participant or bid.source not in (None, ask.source):
                continue
            q = min(need, rem[j])
            out.append((bid.uuid, ask.uuid, q))
            need -= q
            rem[j] -= q
    return out


def check_fills(
    bids: Sequence[Entry], asks: Sequence[Entry], fills: Sequence[Fill], pricing: Pricing, constrained: bool
) -> None:
    for f in fills:
        assert f.bid.participant != f.ask.participant
        assert f.bid.source in (None, f.ask.source)
        assert f.quantity > 0
        assert f.bid.price >= f.ask.price
        # Every pricing, uniform included, keeps each fill within its bid and ask.
        assert f.price_buy <= f.bid.price
        assert f.price_sell >= f.ask.price
        assert f.price_buy >= f.price_sell
    for e in (*bids, *asks):
        assert sum(f.quantity for f in fills if e.uuid in (f.bid.uuid, f.ask.uuid)) <= e.quantity
    if pricing == "uniform":
        prices = {(f.price_buy, f.price_sell) for f in fills}
        # One price, unless skipped pairs leave no price within every fill's limits (then midpoints).
        assert len(prices) <= 1 or (constrained and min(f.bid.price for f in fills) < max(f.ask.price for f in fills))


@FAST
@given(books(), st.sampled_from(PRICINGS))
def test_clearing_is_the_literal_rule(book: tuple[list[Entry], list[Entry]], pricing: Pricing) -> None:
    bids, asks = book
    fills = clear(bids, asks, pricing)
    assert [(f.bid.uuid, f.ask.uuid, f.quantity) for f in fills] == naive(bids, asks)
    check_fills(bids, asks, fills, pricing, constrained=True)


@FAST
@given(books(sourced_bids=False), st.sampled_from(PRICINGS), st.sampled_from(MATCHINGS))
def test_unconstrained_fills_respect_limits_even_uniform(
    book: tuple[list[Entry], list[Entry]], pricing: Pricing, matching: Matching
) -> None:
    bids, asks = book
    # Distinct participants: no self-pair can constrain the order of fills.
    bids = [
        entry(f"B{k}", e.quantity, e.price, uuid=e.uuid, time_submission=e.time_submission, tie=e.tie)
        for k, e in enumerate(bids)
    ]
    fills = clear(bids, asks, pricing, matching=matching)
    check_fills(bids, asks, fills, pricing, constrained=False)


@FAST
@given(books(), st.randoms(use_true_random=False))
def test_clearing_ignores_input_order(book: tuple[list[Entry], list[Entry]], rnd: random.Random) -> None:
    bids, asks = book
    b, a = bids[:], asks[:]
    rnd.shuffle(b)
    rnd.shuffle(a)
    assert clear(b, a) == clear(bids, asks)


# -- exchange ----------------------------------------------------------------------------

ENERGY_OUT = ("p2p", "bess_compensation", "grid_sell")


def check_exchange(
    txs: Sequence[Transaction],
    meters: Mapping[str, MeterMsg],
    settlements: Sequence[Any],
    pricing: Pricing,
    grid_buy: float,
) -> None:
    parties = {*meters, *(s.seller_id for s in settlements), *(s.buyer_id for s in settlements)}
    for p in sorted(parties):
        m = meters.get(p, meter())
        # (a) every generated Wh, per source, ends in exactly one record where p sells it.
        for src in {*m.generation, *SOURCES}:
            sold = sum(
                t.quantity
                for t in txs
                if t.seller_id == p and t.energy_source == src and (t.kind in ENERGY_OUT or t.kind == "financial")
            )
            assert sold == m.generation.get(src, 0), (p, src)
        # its financial shorts are paid in "grid" energy, never in its own
        assert (
            sum(t.quantity for t in txs if t.seller_id == p and t.kind == "financial" and t.energy_source == "grid")
            >= 0
        )
        # self-consumption
        own = sum(m.consumption.bess.values()) + sum(q for s, q in m.consumption.other.items() if s != "external")
        assert sum(t.quantity for t in txs if t.kind == "self" and t.seller_id == p) == own
        # every imported Wh comes from a peer, a peer's battery, or the grid
        imported = sum(
            t.quantity for t in txs if t.buyer_id == p and t.kind in ("p2p", "bess_compensation", "grid_buy")
        )
        assert imported == m.consumption.other.get("external", 0), p
    for t in txs:
        # (b) exact money
        assert t.amount_buy == amount(t.quantity, t.price_buy) == round(t.quantity * t.price_buy * 1000)
        assert t.amount_sell == round(t.quantity * t.price_sell * 1000)
        assert t.quantity > 0
        assert t.seller_id != t.buyer_id or t.kind == "self"
        if t.kind in ("self", "grid_sell", "grid_buy") or (t.kind == "financial" and t.energy_source == "grid"):
            assert t.amount_buy == t.amount_sell
        if pricing != "pay_as_bid":
            assert t.amount_buy == t.amount_sell
        else:
            assert t.amount_buy >= t.amount_sell
    spread = sum(t.amount_buy for t in txs) - sum(t.amount_sell for t in txs)
    if pricing != "pay_as_bid":
        assert spread == 0
    else:
        assert spread == sum(t.amount_buy - t.amount_sell for t in txs if t.commit_id is not None) >= 0
    # per settlement, what is accounted never exceeds what was settled
    for s in settlements:
        assert sum(t.quantity for t in txs if t.commit_id == s.commit_id) <= s.quantity
        for t in txs:
            if t.commit_id == s.commit_id:
                assert (t.seller_id, t.buyer_id) == (s.seller_id, s.buyer_id)
                if t.kind != "financial" or t.energy_source != "grid":
                    assert (t.price_buy, t.price_sell) == (s.price_buy, s.price_sell)
                else:
                    assert t.price_buy == t.price_sell == -grid_buy


@FAST
@given(books(), meter_maps(), st.sampled_from(PRICINGS), st.sampled_from(MATCHINGS), st.randoms(use_true_random=False))
def test_exchange_conserves_energy_and_money(
    book: tuple[list[Entry], list[Entry]],
    meters: dict[str, MeterMsg],
    pricing: Pricing,
    matching: Matching,
    rnd: random.Random,
) -> None:
    settlements = settlements_of(clear(*book, pricing, matching=matching))
    txs = exchange(SLOT, settlements, meters, 0.25, 0.125, now=60)
    check_exchange(txs, meters, settlements, pricing, 0.25)
    # (d) determinism: same input, same output, whatever the order of the list and the dict.
    assert exchange(SLOT, settlements, meters, 0.25, 0.125, now=60) == txs
    shuffled = settlements[:]
    rnd.shuffle(shuffled)
    keys = list(meters)
    rnd.shuffle(keys)
    assert exchange(SLOT, shuffled, {k: meters[k] for k in keys}, 0.25, 0.125, now=60) == txs
    assert len({t.id for t in txs}) == len(txs)


@SLOW
@given(
    st.lists(
        st.tuples(
            st.sampled_from(PARTICIPANTS),
            st.sampled_from(["bid", "ask"]),
            quantities,
            prices,
            st.sampled_from([None, *SOURCES]),
            st.sampled_from([120, 180]),
        ),
        max_size=25,
    ),
    meter_maps(),
    meter_maps(),
    st.sampled_from(PRICINGS),
    st.sampled_from(MATCHINGS),
)
def test_engine_rounds_conserve(
    orders: list[Any], m120: dict[str, MeterMsg], m180: dict[str, MeterMsg], pricing: Pricing, matching: Matching
) -> None:
    def run() -> list[Any]:
        m = Market(MarketConfig(duration=60, close_steps=2, pricing=pricing, matching=matching))
        m.open_round(0)
        for p, side, q, price, src, start in orders:
            if side == "ask" and src is None:
                src = "solar"
            m.submit(p, side, EntryMsg(q, price, (start, start + 60), None, src))
        out: list[Any] = []
        for t, meters in ((60, {}), (120, m120), (180, m180), (240, {})):
            opened = m.open_round(t)
            out.append(opened)
            for p, reading in meters.items():
                m.meter(
                    p,
                    MeterMsg(time_interval=(t - 60, t), generation=reading.generation, consumption=reading.consumption),
                )
            result = m.process(t - 60, now=t)
            out.append(result)
            slot_settlements = [
                s for o in out if hasattr(o, "settlements") for s in o.settlements if s.time_delivery_start == t - 60
            ]
            check_exchange(result.transactions, meters, slot_settlements, pricing, 0.2)
            # Every settled event names a party of its fill, and each fill reaches both.
            assert [p for p, _ in opened.settled] == [x for s in opened.settlements for x in (s.buyer_id, s.seller_id)]
        return out

    assert run() == run()


# -- the numpy kernel --------------------------------------------------------------------


@st.composite
def unconstrained(draw: Any) -> tuple[list[Entry], list[Entry]]:
    n_b, n_a = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    p = st.sampled_from([0.1, 0.15, 0.2, 0.25, 0.3])
    q = st.integers(1, 50)
    bids = [entry(f"B{k}", draw(q), draw(p), uuid=f"b{k}", tie=k) for k in range(n_b)]
    asks = [
        entry(f"A{k}", draw(q), draw(p), draw(st.sampled_from(SOURCES)), side="ask", uuid=f"a{k}", tie=k)
        for k in range(n_a)
    ]
    return sorted(bids, key=bid_order), sorted(asks, key=ask_order)


@FAST
@given(unconstrained())
def test_numpy_merge_equals_greedy_scan(book: tuple[list[Entry], list[Entry]]) -> None:
    bids, asks = book
    assert _merge_unless_self_pair(bids, asks) == _greedy(bids, asks)


@FAST
@given(
    st.lists(st.tuples(st.integers(1, 9), st.integers(1, 20)), max_size=30),
    st.lists(st.tuples(st.integers(1, 9), st.integers(1, 20)), max_size=30),
)
def test_match_sorted_equals_python_merge(b: list[tuple[int, int]], a: list[tuple[int, int]]) -> None:
    b = sorted(b, key=lambda x: -x[0])
    a = sorted(a, key=lambda x: x[0])
    bi, ai, q = match_sorted(
        np.array([x[0] for x in b], np.float64),
        np.array([x[1] for x in b], np.int64),
        np.array([x[0] for x in a], np.float64),
        np.array([x[1] for x in a], np.int64),
    )
    expected, i, j = [], 0, 0
    rb, ra = [x[1] for x in b], [x[1] for x in a]
    while i < len(b) and j < len(a) and b[i][0] >= a[j][0]:
        f = min(rb[i], ra[j])
        expected.append((i, j, f))
        rb[i] -= f
        ra[j] -= f
        i += rb[i] == 0
        j += ra[j] == 0
    assert list(zip(bi.tolist(), ai.tolist(), q.tolist(), strict=True)) == expected


# -- the numpy path from unsorted arrays ----------------------------------------------------

# Tie keys that agree in their top bits (so the packed sort keys collide), small ones, the
# extremes of 64 bits; times close together (offsets) or far apart (ranks).
TIES = st.sampled_from([0, 1, 2, 7, 2**63, 2**63 + 1, 2**63 + 2**20, 2**64 - 2, 2**64 - 1])
TIMES = st.sampled_from([[0, 60], [0, 900, 1800], [0, 2**40], [5]])
ANY_PRICES = st.sampled_from([-0.5, -0.0, 0.0, 0.1, 0.125, 1 / 3, 0.5, 1e6])


@st.composite
def unsorted_side(draw: Any, side: str, max_size: int = 30) -> list[Entry]:
    times = draw(TIMES)
    return [
        entry(
            f"{side}{k}",  # every order its own participant: no self-pair constrains the fills
            draw(st.integers(1, 60)),
            draw(ANY_PRICES),
            "solar" if side == "A" else None,
            side="ask" if side == "A" else "bid",
            uuid=f"{side}{k}",
            time_submission=draw(st.sampled_from(times)),
            tie=draw(TIES),
        )
        for k in range(draw(st.integers(0, max_size)))
    ]


def arrays(entries: Sequence[Entry]) -> tuple[Any, Any, Any, Any]:
    """(price, quantity, time, tie) columns of entries, in their order."""
    return (
        np.array([e.price for e in entries], np.float64),
        np.array([e.quantity for e in entries], np.int64),
        np.array([e.time_submission for e in entries], np.int64),
        np.array([e.tie for e in entries], np.uint64),
    )


def array_fills(bids: Sequence[Entry], asks: Sequence[Entry], matching: Matching) -> list[tuple[str, str, int]]:
    """The numpy path from unsorted arrays: `priority_order` of each side, then the kernel."""
    bp, bq, bt, btie = arrays(bids)
    ap, aq, at, atie = arrays(asks)
    bo = priority_order(bp, bt, btie, descending=True)
    ao = priority_order(ap, at, atie, descending=False)
    kernel = pro_rata_sorted if matching == "pro_rata" else match_sorted
    bi, ai, q = kernel(bp[bo], bq[bo], ap[ao], aq[ao])
    return [
        (bids[b].uuid, asks[a].uuid, n) for b, a, n in zip(bo[bi].tolist(), ao[ai].tolist(), q.tolist(), strict=True)
    ]


@FAST
@given(unsorted_side("B"), st.booleans(), st.sampled_from([64, 16, 6]))
def test_priority_order_is_the_object_paths_sort(side: list[Entry], descending: bool, key_bits: int) -> None:
    # Narrower keys keep fewer tie bits (more runs to re-sort), or none (the lexsort fallback).
    price, _, time, tie = arrays(side)
    with mock.patch.object(clearing, "_KEY_BITS", key_bits):
        order = priority_order(price, time, tie, descending=descending)
    assert order.dtype == np.int64
    assert [side[k].uuid for k in order.tolist()] == [e.uuid for e in _sorted(side, descending)]


@FAST
@given(unsorted_side("B"), unsorted_side("A"), st.sampled_from(MATCHINGS))
def test_numpy_path_from_unsorted_arrays_equals_clear(bids: list[Entry], asks: list[Entry], matching: Matching) -> None:
    # Empty sides, one side only, equal prices, times and tie keys all come up.
    expected = [(f.bid.uuid, f.ask.uuid, f.quantity) for f in clear(bids, asks, matching=matching)]
    assert array_fills(bids, asks, matching) == expected
