"""Proposed: the DSO's YELLOW state adds the configured grid fee to P2P fills."""

from __future__ import annotations

import pytest

from market.core.engine import Market, MarketConfig
from market.core.grid import GridStates
from tests.market.builders import ask, bid


def test_yellow_fee_applies_to_p2p_fills() -> None:
    states = GridStates()
    states.set(120, "YELLOW")
    m = Market(MarketConfig(yellow_fee=0.04), states)
    m.open_round(0)
    bid(m, "B", 100, 0.20, (120, 180))
    ask(m, "S", 100, 0.10, (120, 180))
    bid(m, "B2", 100, 0.12, (120, 180))  # 0.12 < 0.11 + 0.04: would trade in GREEN, not in YELLOW
    ask(m, "S2", 100, 0.11, (120, 180))
    bid(m, "B", 100, 0.20, (180, 240))  # the next slot is GREEN: no fee
    ask(m, "S", 100, 0.10, (180, 240))
    [yellow] = m.open_round(60).settlements
    assert (yellow.buyer_id, yellow.seller_id, yellow.quantity) == ("B", "S", 100)
    # midpoint of the bid 0.20 and the ask plus fee 0.14: the buyer pays 0.17, the seller gets 0.13
    assert (yellow.price_buy, yellow.price_sell) == pytest.approx((0.17, 0.13))
    assert yellow.amount_buy - yellow.amount_sell == 4_000  # 100 Wh * 0.04 per kWh: the operator's
    assert m.start_round_payload()["market_info"][1]["grid_state"] == "YELLOW"
    [green] = m.open_round(120).settlements
    assert (green.price_buy, green.price_sell) == pytest.approx((0.15, 0.15))


@pytest.mark.parametrize("pricing", ["midpoint", "pay_as_bid", "uniform"])
def test_yellow_fee_keeps_every_fill_within_its_limits(pricing: str) -> None:
    states = GridStates()
    states.set(120, "YELLOW")
    m = Market(MarketConfig(yellow_fee=0.03, pricing=pricing), states)  # type: ignore[arg-type]
    m.open_round(0)
    for k, (b, a) in enumerate([(0.30, 0.10), (0.25, 0.12), (0.16, 0.13), (0.15, 0.12)]):
        bid(m, f"B{k}", 100, b, (120, 180))
        ask(m, f"S{k}", 100, a, (120, 180))
    fills = m.open_round(60).settlements
    limits = {f"B{k}": b for k, (b, _) in enumerate([(0.30, 0.10), (0.25, 0.12), (0.16, 0.13), (0.15, 0.12)])}
    asks = {f"S{k}": a for k, (_, a) in enumerate([(0.30, 0.10), (0.25, 0.12), (0.16, 0.13), (0.15, 0.12)])}
    assert fills
    for f in fills:
        assert f.price_buy <= limits[f.buyer_id] and f.price_sell >= asks[f.seller_id]
        if pricing == "pay_as_bid":  # the whole spread, fee included, is the operator's
            assert f.price_buy - f.price_sell >= 0.03 - 1e-12
        else:
            assert f.price_buy - f.price_sell == pytest.approx(0.03)
