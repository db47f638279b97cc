"""Clearing of one slot (PROTOCOL.md section Matching), fills computed by hand.

Prices are binary fractions so that midpoints are exact floats.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from market.core.book import Entry
from market.core.clearing import (
    _greedy,
    _merge_unless_self_pair,
    ask_order,
    bid_order,
    clear,
    match_sorted,
    priority_order,
)
from tests.market.builders import book_with, entry, fills

PRIORITY = book_with(
    bids=[("B1", 100, 0.5), ("B2", 100, 0.25), ("B3", 50, 0.5)],
    asks=[("S1", 80, 0.125, "solar"), ("S2", 100, 0.1875, "solar"), ("S3", 100, 0.375, "wind")],
)


def test_price_time_priority_and_partial_fills_midpoint() -> None:
    # b0 and b2 bid 0.5 (b0 first), b1 bids 0.25; asks from 0.125 up. b1 stops at a2 (0.375 > 0.25).
    assert fills(clear(*PRIORITY)) == [
        ("b0", "a0", 80, 0.3125, 0.3125),
        ("b0", "a1", 20, 0.34375, 0.34375),
        ("b2", "a1", 50, 0.34375, 0.34375),
        ("b1", "a1", 30, 0.21875, 0.21875),
    ]


def test_pay_as_bid() -> None:
    assert fills(clear(*PRIORITY, pricing="pay_as_bid")) == [
        ("b0", "a0", 80, 0.5, 0.125),
        ("b0", "a1", 20, 0.5, 0.1875),
        ("b2", "a1", 50, 0.5, 0.1875),
        ("b1", "a1", 30, 0.25, 0.1875),
    ]


def test_uniform_is_midpoint_of_last_pair() -> None:
    assert fills(clear(*PRIORITY, pricing="uniform")) == [
        ("b0", "a0", 80, 0.21875, 0.21875),
        ("b0", "a1", 20, 0.21875, 0.21875),
        ("b2", "a1", 50, 0.21875, 0.21875),
        ("b1", "a1", 30, 0.21875, 0.21875),
    ]


def test_input_order_does_not_matter() -> None:
    bids, asks = PRIORITY
    rng = random.Random(7)
    for _ in range(5):
        b, a = bids[:], asks[:]
        rng.shuffle(b)
        rng.shuffle(a)
        assert fills(clear(b, a)) == fills(clear(*PRIORITY))


def test_earlier_submission_beats_tie_key() -> None:
    late = entry("B1", 50, 0.5, uuid="late", time_submission=60, tie=0)
    early = entry("B2", 50, 0.5, uuid="early", time_submission=0, tie=99)
    ask = entry("S", 60, 0.25, "solar", side="ask", uuid="a", time_submission=60, tie=5)
    assert fills(clear([late, early], [ask])) == [("early", "a", 50, 0.375, 0.375), ("late", "a", 10, 0.375, 0.375)]
    cheap_late = entry("S1", 50, 0.25, "solar", side="ask", uuid="s1", time_submission=60, tie=0)
    cheap_early = entry("S2", 50, 0.25, "solar", side="ask", uuid="s2", time_submission=0, tie=99)
    assert [f.ask.uuid for f in clear([early], [cheap_late, cheap_early])] == ["s2"]
    # Same second: the tie key decides.
    t1 = entry("B1", 50, 0.5, uuid="t1", tie=2)
    t2 = entry("B2", 50, 0.5, uuid="t2", tie=1)
    assert [f.bid.uuid for f in clear([t1, t2], [ask])] == ["t2", "t1"]


def test_sort_keys() -> None:
    a = entry("A", 1, 0.5, uuid="a", time_submission=0, tie=3)
    b = entry("B", 1, 0.25, uuid="b", time_submission=0, tie=1)
    assert bid_order(a) < bid_order(b)
    assert ask_order(b) < ask_order(a)


def test_no_cross_no_fills() -> None:
    assert clear(*book_with(bids=[("B", 100, 0.125)], asks=[("S", 100, 0.25, "solar")])) == []
    assert clear(*book_with(bids=[("B", 100, 0.5)])) == []
    assert clear(*book_with(asks=[("S", 100, 0.25, "solar")])) == []
    assert clear([], []) == []
    assert clear([], [], pricing="uniform") == []


def test_equal_prices_cross() -> None:
    assert fills(clear(*book_with(bids=[("B", 100, 0.25)], asks=[("S", 40, 0.25, "solar")]))) == [
        ("b0", "a0", 40, 0.25, 0.25)
    ]


def test_one_bid_many_asks_and_one_ask_many_bids() -> None:
    bids, asks = book_with(
        bids=[("B", 250, 0.5)],
        asks=[("S1", 100, 0.125, "solar"), ("S2", 100, 0.25, "solar"), ("S3", 100, 0.375, "bess")],
    )
    assert [(b, a, q) for b, a, q, _, _ in fills(clear(bids, asks))] == [
        ("b0", "a0", 100),
        ("b0", "a1", 100),
        ("b0", "a2", 50),
    ]
    bids, asks = book_with(
        bids=[("B1", 30, 0.5), ("B2", 30, 0.375), ("B3", 100, 0.25)], asks=[("S", 100, 0.125, "wind")]
    )
    assert [(b, a, q) for b, a, q, _, _ in fills(clear(bids, asks))] == [
        ("b0", "a0", 30),
        ("b1", "a0", 30),
        ("b2", "a0", 40),
    ]


def test_self_trade_is_skipped_not_blocking() -> None:
    # A's best bid skips A's own cheap ask and takes B's; C's bid then takes A's ask.
    bids, asks = book_with(
        bids=[("A", 100, 0.5), ("C", 100, 0.375)], asks=[("A", 50, 0.125, "solar"), ("B", 50, 0.25, "solar")]
    )
    assert fills(clear(bids, asks)) == [("b0", "a1", 50, 0.375, 0.375), ("b1", "a0", 50, 0.25, 0.25)]


def test_only_own_asks_no_fill() -> None:
    bids, asks = book_with(bids=[("A", 100, 0.5)], asks=[("A", 50, 0.125, "solar"), ("A", 50, 0.25, "bess")])
    assert clear(bids, asks) == []


def test_self_ask_between_others_is_skipped_for_that_bid_only() -> None:
    bids, asks = book_with(
        bids=[("A", 120, 0.5), ("B", 100, 0.5)],
        asks=[("X", 50, 0.125, "solar"), ("A", 50, 0.1875, "solar"), ("Y", 100, 0.25, "solar")],
    )
    assert [(b, a, q) for b, a, q, _, _ in fills(clear(bids, asks))] == [
        ("b0", "a0", 50),
        ("b0", "a2", 70),
        ("b1", "a1", 50),
        ("b1", "a2", 30),
    ]


@pytest.mark.parametrize("source", [None, "solar"])
def test_repeated_own_asks_are_skipped_once_per_participant(source: str | None) -> None:
    # X's second bid starts past X's own asks (its cursor); Z's bid still finds them.
    bids, asks = book_with(
        bids=[("X", 10, 0.5, source), ("X", 10, 0.5, source), ("Z", 25, 0.25, source)],
        asks=[
            ("X", 10, 0.125, "solar"),
            ("X", 10, 0.125, "solar"),
            ("V", 99, 0.15625, "wind"),
            ("Y", 15, 0.1875, "solar"),
            ("W", 10, 0.375, "solar"),
        ],
    )
    got = [(b, a, q) for b, a, q, _, _ in fills(clear(bids, asks))]
    if source is None:
        # Unsourced bids take V's wind first.
        assert got == [("b0", "a2", 10), ("b1", "a2", 10), ("b2", "a0", 10), ("b2", "a1", 10), ("b2", "a2", 5)]
    else:
        assert got == [("b0", "a3", 10), ("b1", "a3", 5), ("b1", "a4", 5), ("b2", "a0", 10), ("b2", "a1", 10)]


def test_sourced_bid_meets_only_its_source() -> None:
    bids, asks = book_with(
        bids=[("A", 100, 0.5, "wind"), ("B", 100, 0.25)],
        asks=[("S", 100, 0.125, "solar"), ("W", 50, 0.1875, "wind")],
    )
    assert fills(clear(bids, asks)) == [("b0", "a1", 50, 0.34375, 0.34375), ("b1", "a0", 100, 0.1875, 0.1875)]


def test_sourced_bid_without_its_source_gets_nothing_and_later_bids_continue() -> None:
    bids, asks = book_with(
        bids=[("A", 100, 0.5, "bess"), ("B", 30, 0.375, "solar"), ("C", 100, 0.25)],
        asks=[("S", 100, 0.125, "solar"), ("W", 100, 0.4375, "wind")],
    )
    assert [(b, a, q) for b, a, q, _, _ in fills(clear(bids, asks))] == [("b1", "a0", 30), ("b2", "a0", 70)]


def test_sourced_bid_below_its_lane_price_does_not_stop_the_others() -> None:
    bids, asks = book_with(
        bids=[("A", 100, 0.5, "wind"), ("B", 100, 0.25)],
        asks=[("S", 100, 0.125, "solar"), ("W", 100, 0.75, "wind")],
    )
    assert [(b, a, q) for b, a, q, _, _ in fills(clear(bids, asks))] == [("b1", "a0", 100)]


def test_each_entry_filled_at_most_its_quantity() -> None:
    bids, asks = book_with(bids=[("B", 10, 0.5)] * 5, asks=[("S", 7, 0.125, "solar")] * 5)
    result = clear(bids, asks)
    assert sum(f.quantity for f in result) == 35
    for e in (*bids, *asks):
        assert sum(f.quantity for f in result if e.uuid in (f.bid.uuid, f.ask.uuid)) <= e.quantity


def test_match_sorted_by_hand() -> None:
    bi, ai, q = match_sorted(np.array([0.5, 0.25]), np.array([100, 50]), np.array([0.125, 0.375]), np.array([80, 100]))
    assert (bi.tolist(), ai.tolist(), q.tolist()) == ([0, 0], [0, 1], [80, 20])
    # Everything crosses: pieces at every breakpoint, up to the smaller total.
    bi, ai, q = match_sorted(
        np.array([1.0, 1.0]), np.array([30, 30]), np.array([0.5, 0.5, 0.5]), np.array([20, 20, 40])
    )
    assert list(zip(bi.tolist(), ai.tolist(), q.tolist(), strict=True)) == [
        (0, 0, 20),
        (0, 1, 10),
        (1, 1, 10),
        (1, 2, 20),
    ]
    empty = match_sorted(np.zeros(0), np.zeros(0, np.int64), np.array([0.5]), np.array([5]))
    assert [x.tolist() for x in empty] == [[], [], []]
    # A bid and an ask ending together close one piece, not two.
    bi, ai, q = match_sorted(np.array([1.0, 1.0]), np.array([30, 30]), np.array([0.5, 0.5]), np.array([30, 40]))
    assert list(zip(bi.tolist(), ai.tolist(), q.tolist(), strict=True)) == [(0, 0, 30), (1, 1, 30)]
    # Orders of 0 Wh close no piece (as the scan skips them), even when a whole side is 0 Wh.
    bi, ai, q = match_sorted(np.array([1.0, 1.0]), np.array([0, 30]), np.array([0.5] * 3), np.array([20, 0, 10]))
    assert list(zip(bi.tolist(), ai.tolist(), q.tolist(), strict=True)) == [(1, 0, 20), (1, 2, 10)]
    no_energy = match_sorted(np.array([1.0]), np.array([0]), np.array([0.5]), np.array([5]))
    assert [x.tolist() for x in no_energy] == [[], [], []]


def test_priority_order_by_hand() -> None:
    price = np.array([0.25, 0.5, 0.25, 0.25, 0.0, -0.0, 0.25])
    time = np.array([60, 60, 0, 60, 0, 0, 60])
    # Orders 0 and 6 share every key but position; 0 and 3 differ only in the low bits of the tie key.
    tie = np.array([2**63 + 1, 0, 9, 2**63, 5, 5, 2**63 + 1], np.uint64)
    # Bids: 0.5, then the 0.25s (time 0 first, then tie keys), then 0.0 and -0.0 as one price.
    assert priority_order(price, time, tie, descending=True).tolist() == [1, 2, 3, 0, 6, 4, 5]
    assert priority_order(price, time, tie, descending=False).tolist() == [4, 5, 2, 3, 0, 6, 1]
    empty = priority_order(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.uint64), descending=True)
    assert empty.tolist() == []


def big_book(n: int, seed: int, self_pair: bool = False) -> tuple[list[Entry], list[Entry]]:
    rng = random.Random(seed)
    prices = [k / 64 for k in range(4, 20)]  # few distinct prices: many ties
    bids = [
        entry(f"b{k}", rng.randint(1, 500), rng.choice(prices), uuid=f"b{k}", tie=rng.randrange(2**63))
        for k in range(n)
    ]
    asks = [
        entry(
            f"a{k}",
            rng.randint(1, 500),
            rng.choice(prices),
            rng.choice(["solar", "bess"]),
            side="ask",
            uuid=f"a{k}",
            tie=rng.randrange(2**63),
        )
        for k in range(n)
    ]
    if self_pair:
        top = min(bids, key=bid_order)
        asks[min(range(n), key=lambda k: asks[k].price)] = entry(
            top.participant, 10, 0.0, "solar", side="ask", uuid="self", tie=0
        )
    return bids, asks


@pytest.mark.parametrize("self_pair", [False, True])
def test_large_slot_numpy_path_equals_greedy(self_pair: bool) -> None:
    n = 2500
    bids, asks = big_book(n, seed=3, self_pair=self_pair)
    b, a = sorted(bids, key=bid_order), sorted(asks, key=ask_order)
    merged = _merge_unless_self_pair(b, a)
    assert (merged is None) is self_pair
    greedy = _greedy(b, a)
    if merged is not None:
        assert merged == greedy
    result = clear(bids, asks)
    assert [(f.bid.uuid, f.ask.uuid, f.quantity) for f in result] == [(b[i].uuid, a[j].uuid, q) for i, j, q in greedy]
    assert len(result) > n // 4
