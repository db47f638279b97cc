"""Capacity-aware clearing (docs/grid.md): fills that would push a feeder branch past its
limit are curtailed at gate closure, using the feeder's sensitivities (`curtail`); each cut
is on the ledger (`curtailments`) with the branch that bound it. Pure and fast."""

from __future__ import annotations

import time

import pytest

from market.core.capacity import Branch, CapacityLimits, Sensitivities
from market.core.engine import Market, MarketConfig
from market.core.records import CurtailmentRecord
from tests.market.builders import ask, bid

# A two-branch radial feeder: slack 0 -- trafo (b0, 100 kW) -- busbar 1; busbar 1 -- line b1
# (30 kW) -- bus 2; busbar 1 -- line b2 (200 kW) -- bus 3.
SENS = Sensitivities(
    branches=(
        Branch("trafo", 0, "trafo", 100.0),
        Branch("line", 0, "weak", 30.0),
        Branch("line", 1, "strong", 200.0),
    ),
    paths={0: (), 1: (0,), 2: (1, 0), 3: (2, 0)},
    slack=0,
)
LIMITS = CapacityLimits(bus_of={"S": 2, "S2": 2, "S3": 3, "B": 3, "B2": 3}, sensitivities=SENS)
SLOT = (1800, 2700)


def market(capacity: CapacityLimits | None) -> Market:
    m = Market(MarketConfig(duration=900), capacity=capacity)
    m.open_round(0)
    return m


def test_fills_over_a_weak_line_are_curtailed_to_its_limit() -> None:
    rows = [("S", 6000, 0.10), ("S2", 6000, 0.11), ("S3", 6000, 0.12)]  # 6 kWh in 15 min: 24 kW each
    free, capped = market(None), market(LIMITS)
    for m in (free, capped):
        bid(m, "B", 12_000, 0.30, SLOT)
        bid(m, "B2", 6_000, 0.25, SLOT)
        for seller, q, p in rows:
            ask(m, seller, q, p, SLOT)
    unlimited = free.open_round(900).settlements
    limited = capped.open_round(900).settlements
    over_weak = sum(s.quantity for s in unlimited if s.seller_id in ("S", "S2")) * 4 / 1000
    assert over_weak == 48.0  # kW over the 30 kW line: unconstrained trading overloads it
    weak = sum(s.quantity for s in limited if s.seller_id in ("S", "S2")) * 4 / 1000
    assert weak <= 30.0 and weak == pytest.approx(30.0, abs=0.004)
    # S3 shares no weak branch with the buyers: its fill is whole.
    assert [s.quantity for s in limited if s.seller_id == "S3"] == [
        s.quantity for s in unlimited if s.seller_id == "S3"
    ]
    # Commit ids stay dense, prices as cleared.
    assert [s.seq for s in limited] == list(range(len(limited)))
    assert {(s.bid_uuid, s.ask_uuid): s.price_buy for s in limited}.items() <= {
        (s.bid_uuid, s.ask_uuid): s.price_buy for s in unlimited
    }.items()


def test_base_flow_of_the_dso_leaves_less_room() -> None:
    m = market(LIMITS)
    m.base_flows[1800] = [0.0, 25_000.0, 0.0]  # the weak line carries 25 kW before trading
    bid(m, "B", 12_000, 0.30, SLOT)
    ask(m, "S", 12_000, 0.10, SLOT)
    [fill] = m.open_round(900).settlements
    assert fill.quantity == 1250  # 5 kW for 15 minutes
    assert 1800 not in m.base_flows


def test_capacity_check_is_cheap() -> None:
    """1,000 fills over a 100-branch feeder: the check adds well under the clearing's own cost."""
    branches = tuple(Branch("line", i, f"l{i}", 1e9) for i in range(100))
    paths = {b: tuple(range(b, -1, -1)) for b in range(100)}
    limits = CapacityLimits({f"P{i}": i % 100 for i in range(2000)}, Sensitivities(branches, paths, 0))
    m = market(limits)
    for i in range(1000):
        bid(m, f"P{2 * i}", 100, 0.30, SLOT)
        ask(m, f"P{2 * i + 1}", 100, 0.10, SLOT)
    t = time.perf_counter()
    fills = m.open_round(900).settlements
    assert len(fills) == 1000
    print(f"clearing with capacity check: {(time.perf_counter() - t) * 1000:.1f} ms for 1000 fills")


def test_each_cut_is_recorded_with_its_binding_branch_and_settlement() -> None:
    """The same book as above: the ledger's `curtailments` say, for every fill the limits
    cut, what was cleared and kept, which settlement holds the rest, and the weak line's
    flow and limit; the uncut fills have no row."""
    free, capped = market(None), market(LIMITS)
    for m in (free, capped):
        bid(m, "B", 12_000, 0.30, SLOT)
        bid(m, "B2", 6_000, 0.25, SLOT)
        for seller, q, p in (("S", 6000, 0.10), ("S2", 6000, 0.11), ("S3", 6000, 0.12)):
            ask(m, seller, q, p, SLOT)
    cleared = free.open_round(900).settlements
    kept = {s.commit_id: s for s in capped.open_round(900).settlements}
    cuts = [r for r in capped.take_journal() if isinstance(r, CurtailmentRecord)]
    assert cuts and all(c.branch == "weak" and c.limit_w == 30_000.0 for c in cuts)
    for c in cuts:
        i = int(c.id.rsplit("-", 1)[1])
        assert (c.seller_id, c.buyer_id, c.cleared) == (cleared[i].seller_id, cleared[i].buyer_id, cleared[i].quantity)
        assert c.kept < c.cleared and c.flow_w <= c.limit_w
        if c.kept:
            assert c.commit_id is not None and kept[c.commit_id].quantity == c.kept
            assert (kept[c.commit_id].bid_uuid, kept[c.commit_id].ask_uuid) == (c.bid_uuid, c.ask_uuid)
        else:
            assert c.commit_id is None
    cut_pairs = {(c.bid_uuid, c.ask_uuid) for c in cuts}
    whole = [s for s in cleared if (s.bid_uuid, s.ask_uuid) not in cut_pairs]
    assert {(s.bid_uuid, s.ask_uuid, s.quantity) for s in whole} <= {
        (s.bid_uuid, s.ask_uuid, s.quantity) for s in kept.values()
    }
    assert sum(s.quantity for s in kept.values()) == sum(s.quantity for s in whole) + sum(c.kept for c in cuts)
