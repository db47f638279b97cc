"""Pro-rata matching (`matching = "pro_rata"`, TREX-Core's MicroTE4): a tied price level's
volume split in proportion to its orders' quantities, exact in Wh; worked by hand, then
invariants (hypothesis), then the numpy kernel equal to the Python path."""

from __future__ import annotations

import random
from collections import defaultdict
from fractions import Fraction
from itertools import groupby

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.scenario import Scenario
from market.core.book import Entry
from market.core.clearing import PRICINGS, Pricing, ask_order, bid_order, clear, pro_rata_sorted, split_pro_rata
from market.core.engine import Market, MarketConfig
from market.core.protocol import EntryMsg
from tests.market.builders import book_with, fills
from tests.market.core.test_market_clearing import big_book
from tests.market.core.test_market_properties import FAST, books, check_fills, unconstrained

PR = {"matching": "pro_rata"}


def quantities(result: list[tuple[str, str, int, float, float]]) -> list[tuple[str, str, int]]:
    return [(b, a, q) for b, a, q, _, _ in result]


def test_a_tied_bid_level_shares_in_proportion_to_quantity() -> None:
    book = book_with(bids=[("B1", 60, 0.5), ("B2", 40, 0.5)], asks=[("S", 50, 0.125, "solar")])
    assert quantities(fills(clear(*book))) == [("b0", "a0", 50)]  # price-time: the earlier bid takes it all
    assert quantities(fills(clear(*book, **PR))) == [("b0", "a0", 30), ("b1", "a0", 20)]


def test_a_tied_ask_level_shares_too() -> None:
    book = book_with(bids=[("B", 20, 0.5)], asks=[("S1", 30, 0.125, "solar"), ("S2", 10, 0.125, "wind")])
    assert quantities(fills(clear(*book, **PR))) == [("b0", "a0", 15), ("b0", "a1", 5)]


def test_remainders_go_to_the_largest_fractions_then_by_priority() -> None:
    # 7 Wh over 5, 3, 2: exact shares 3.5, 2.1, 1.4 -> floors 3, 2, 1; the 1 Wh left goes to
    # the largest fraction (0.5: b0).
    book = book_with(bids=[("B1", 5, 0.5), ("B2", 3, 0.5), ("B3", 2, 0.5)], asks=[("S", 7, 0.125, "solar")])
    assert quantities(fills(clear(*book, **PR))) == [("b0", "a0", 4), ("b1", "a0", 2), ("b2", "a0", 1)]
    # 2 Wh over three equal bids: equal fractions, so priority (submission, then tie key) decides.
    book = book_with(bids=[("B1", 1, 0.5), ("B2", 1, 0.5), ("B3", 1, 0.5)], asks=[("S", 2, 0.125, "solar")])
    assert quantities(fills(clear(*book, **PR))) == [("b0", "a0", 1), ("b1", "a0", 1)]


def test_split_pro_rata_is_exact_integer_arithmetic() -> None:
    assert split_pro_rata([5, 3, 2], 7) == [4, 2, 1]
    assert split_pro_rata([1, 1, 1], 2) == [1, 1, 0]
    assert split_pro_rata([10, 20], 30) == [10, 20] and split_pro_rata([10, 20], 0) == [0, 0]
    # Large quantities (no float rounding): 10^9 + 1 Wh over two orders of 10^9 Wh.
    big = 10**9
    assert split_pro_rata([big, big], big + 1) == [big // 2 + 1, big // 2]
    with pytest.raises(ValueError):
        split_pro_rata([1, 2], 4)


def test_levels_above_the_margin_are_filled_whole() -> None:
    # The 0.5 level is above the margin: filled whole; only the marginal 0.375 level is split.
    book = book_with(bids=[("B1", 10, 0.5), ("B2", 20, 0.375), ("B3", 20, 0.375)], asks=[("S", 30, 0.125, "solar")])
    assert quantities(fills(clear(*book, **PR))) == [("b0", "a0", 10), ("b1", "a0", 10), ("b2", "a0", 10)]


def test_an_owner_never_trades_with_itself_the_volume_goes_to_the_others() -> None:
    # B1's share would meet its own ask: it cannot, so B2 (who can) trades the level's volume.
    book = book_with(bids=[("X", 100, 0.5), ("Y", 100, 0.5)], asks=[("X", 100, 0.125, "solar")])
    assert quantities(fills(clear(*book, **PR))) == [("b1", "a0", 100)]
    # A bid naming a source still meets only that source.
    book = book_with(bids=[("B1", 50, 0.5, "wind"), ("B2", 50, 0.5)], asks=[("S", 60, 0.125, "solar")])
    assert quantities(fills(clear(*book, **PR))) == [("b1", "a0", 50)]


def test_the_engine_and_the_scenario_select_it() -> None:
    assert MarketConfig().matching == "price_time"
    config = Scenario(market={"matching": "pro_rata"}).market_config()
    assert config.matching == "pro_rata"
    with pytest.raises(Exception, match="matching"):
        Scenario(market={"matching": "fifo"}).market_config()
    m = Market(MarketConfig(duration=60, close_steps=2, matching="pro_rata"))
    m.open_round(0)
    slot = (120, 180)
    for who, q in (("B1", 60), ("B2", 40)):
        assert "entry" in m.submit(who, "bid", EntryMsg(q, 0.3, slot, None, None))
    assert "entry" in m.submit("S", "ask", EntryMsg(50, 0.1, slot, None, "solar"))
    opened = m.open_round(60)  # the slot's gate closed: it is cleared
    assert [(s.buyer_id, s.quantity) for s in opened.settlements] == [("B1", 30), ("B2", 20)]


# -- invariants ---------------------------------------------------------------------------


@FAST
@given(books(), st.sampled_from(PRICINGS))
def test_pro_rata_fills_respect_owners_sources_limits_and_quantities(
    book: tuple[list[Entry], list[Entry]], pricing: Pricing
) -> None:
    bids, asks = book
    result = clear(bids, asks, pricing, matching="pro_rata")
    check_fills(bids, asks, result, pricing, constrained=True)
    assert len({(f.bid.uuid, f.ask.uuid) for f in result}) == len(result)  # one fill per pair


@FAST
@given(books(), st.randoms(use_true_random=False))
def test_pro_rata_ignores_input_order(book: tuple[list[Entry], list[Entry]], rnd: random.Random) -> None:
    bids, asks = book
    b, a = bids[:], asks[:]
    rnd.shuffle(b)
    rnd.shuffle(a)
    assert clear(b, a, matching="pro_rata") == clear(bids, asks, matching="pro_rata")


def level_fills(entries: list[Entry], result: list, side: str) -> list[list[tuple[int, int]]]:
    """Per price level, in priority order: (quantity, filled) of each entry."""
    filled: dict[str, int] = defaultdict(int)
    for f in result:
        filled[(f.bid if side == "bid" else f.ask).uuid] += f.quantity
    return [[(e.quantity, filled[e.uuid]) for e in level] for _, level in groupby(entries, key=lambda e: e.price)]


@FAST
@given(unconstrained())
def test_each_tied_order_gets_its_proportional_share_within_one_wh(book: tuple[list[Entry], list[Entry]]) -> None:
    """Unconstrained (no owner on both sides, no sourced bid): every level trades what it
    trades under price-time priority, and each order of it within 1 Wh of its exact share."""
    bids, asks = book
    pro, pt = clear(bids, asks, matching="pro_rata"), clear(bids, asks)
    assert sum(f.quantity for f in pro) == sum(f.quantity for f in pt)
    for entries, side in ((bids, "bid"), (asks, "ask")):
        pro_levels, pt_levels = level_fills(entries, pro, side), level_fills(entries, pt, side)
        for level, same in zip(pro_levels, pt_levels, strict=True):
            total = sum(x for _, x in level)
            assert total == sum(x for _, x in same)  # the same volume per price level
            quantity = sum(q for q, _ in level)
            for q, x in level:
                assert abs(x - Fraction(total * q, quantity)) < 1


@FAST
@given(unconstrained())
def test_numpy_kernel_equals_the_python_path(book: tuple[list[Entry], list[Entry]]) -> None:
    bids, asks = book
    assert kernel(bids, asks) == [(f.bid.uuid, f.ask.uuid, f.quantity) for f in clear(bids, asks, matching="pro_rata")]


def kernel(bids: list[Entry], asks: list[Entry]) -> list[tuple[str, str, int]]:
    bi, ai, q = pro_rata_sorted(
        np.array([e.price for e in bids], np.float64),
        np.array([e.quantity for e in bids], np.int64),
        np.array([e.price for e in asks], np.float64),
        np.array([e.quantity for e in asks], np.int64),
    )
    return [(bids[i].uuid, asks[j].uuid, int(x)) for i, j, x in zip(bi.tolist(), ai.tolist(), q.tolist(), strict=True)]


def test_numpy_kernel_equals_the_python_path_on_a_large_slot() -> None:
    bids, asks = big_book(2500, seed=5)
    b, a = sorted(bids, key=bid_order), sorted(asks, key=ask_order)
    python = [(f.bid.uuid, f.ask.uuid, f.quantity) for f in clear(b, a, ranked=True, matching="pro_rata")]
    assert kernel(b, a) == python
    assert len(python) > 500
