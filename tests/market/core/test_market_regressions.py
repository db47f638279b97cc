"""Regressions: faults found in review of the engine and clearing, each pinned by the test
that first showed it (duration changed under a matched slot, a fill stranded by a step
that jumped ahead, a later slot processed first, an unvalidated timezone, a uniform price
outside a fill's limits)."""

from __future__ import annotations

import pytest

from market.core.clearing import clear
from market.core.engine import MarketConfig, Phase
from market.core.errors import MarketError
from tests.market.builders import ask, bid, book_with, fills, market, meter


def test_duration_cannot_change_while_a_matched_slot_waits() -> None:
    m = market(duration=60)
    m.open_round(0)
    bid(m, "B", 100, 0.25, (120, 180))
    ask(m, "S", 100, 0.125, (120, 180))
    m.open_round(60)  # [120, 180] is matched, not yet delivering
    m.process(0, now=60)
    m.process(60, now=120)
    # Accepted today: the 60 s settlement of [120, 180] is then delivered and recorded as [120, 240].
    with pytest.raises(MarketError):
        m.open_round(120, 120)


def test_a_skipped_matched_slot_is_not_stranded() -> None:
    m = market(duration=60)
    m.open_round(0)
    bid(m, "B", 100, 0.25, (120, 180))
    ask(m, "S", 100, 0.125, (120, 180))
    assert len(m.open_round(60).settlements) == 1  # both parties were told they traded
    m.process(0, now=60)
    m.process(60, now=120)
    m.open_round(180)  # sim step skips the round at 120
    # Today [120, 180] stays MATCHED forever: its settlement is never exchanged nor recorded.
    assert m.phase(120) is not Phase.MATCHED


def test_processing_a_later_slot_first_does_not_strand_an_earlier_one() -> None:
    m = market(duration=60, mode="rt")
    m.open_round(0)
    m.open_round(60)
    m.process(60, now=120)
    # Today slot 0 is reported PROCESSED but still sits in _delivering: its readings are
    # refused as `closed` and process(0) raises IllegalTransition.
    m.meter("P", meter(other={"external": 5}, slot=(0, 60)))
    assert [t.kind for t in m.process(0, now=120).transactions] == ["grid_buy"]


def test_market_timezone_is_validated() -> None:
    with pytest.raises(ValueError):
        MarketConfig(timezone="Mars/Olympus")


def test_uniform_price_respects_every_matched_limit() -> None:
    bids, asks = book_with(
        bids=[("A", 50, 0.5), ("C", 50, 0.25)], asks=[("A", 50, 0.0625, "solar"), ("B", 50, 0.375, "solar")]
    )
    result = clear(bids, asks, "uniform")
    # The self-pair skip let B's dear ask in: no one price suits both fills, so each gets its midpoint
    # (the last pair's midpoint, 0.15625, would pay B below its ask of 0.375).
    assert fills(result) == [("b0", "a1", 50, 0.4375, 0.4375), ("b1", "a0", 50, 0.15625, 0.15625)]
    assert all(f.price_sell >= f.ask.price and f.price_buy <= f.bid.price for f in result)
