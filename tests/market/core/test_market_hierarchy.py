"""A market below another (market/core/hierarchy.py, docs/hierarchy.md): the residuals a
slot's clearing leaves, upstream fills settled with the `upstream` account, its reading,
what it physically passed on, and every refusal leaving the market as it was."""

from __future__ import annotations

import pytest

from market.core.engine import Market, MarketConfig, Recovered
from market.core.errors import MarketError
from market.core.hierarchy import UPSTREAM_ID, Residual, UpstreamFill, physical_flows
from market.core.records import CancelRecord, EntryRecord, RoundRecord, Settlement
from tests.market.builders import ask, bid, meter

D = 60


def clearing() -> tuple[Market, list[Settlement]]:
    """Slot (120, 180) cleared at round 60; its local settlements."""
    m = Market(MarketConfig(duration=D, close_steps=2), upstream=True)
    m.open_round(0)
    bid(m, "B1", 4000, 0.20, (120, 180), id="b1")
    bid(m, "B2", 1000, 0.12, (120, 180))
    ask(m, "S1", 3000, 0.10, (120, 180), id="s1")
    ask(m, "S2", 2500, 0.18, (120, 180))
    opened = m.open_round(D)  # closes (120, 180)
    return m, opened.settlements


@pytest.fixture
def cleared() -> Market:
    return clearing()[0]


def test_residual_remainders(cleared: Market) -> None:
    res = cleared.residuals_of(120)
    by = {(r.participant, r.side): r.quantity for r in res}
    # B1 4000 @0.20 takes S1's 3000 and 1000 of S2 (0.18 <= 0.20); B2 @0.12 meets nothing left
    # at or below 0.12; S2 keeps 1500.
    assert by == {("B2", "bid"): 1000, ("S2", "ask"): 1500}
    assert all(r.quantity > 0 for r in res)


def upstream_fill(r: Residual, q: int, price: float, ref: str, source: str = "wind") -> UpstreamFill:
    return UpstreamFill(r, q, price, price, r.source or source if r.side == "ask" else source, ref)


def test_upstream_fills_settle_with_the_upstream_account(cleared: Market) -> None:
    res = {r.participant: r for r in cleared.residuals_of(120)}
    result = cleared.upstream_fills(
        120, [upstream_fill(res["B2"], 800, 0.11, "d1"), upstream_fill(res["S2"], 1500, 0.19, "d2")], now=D
    )
    events = result.settled
    assert [(p, e["side"], e["quantity"], e["price"]) for p, e in events] == [
        ("B2", "bid", 800, 0.11),
        ("S2", "ask", 1500, 0.19),
    ]
    assert not any(isinstance(r, Settlement) for r in cleared.take_journal())  # the caller stores them
    assert [(s.seller_id, s.buyer_id, s.quantity, s.amount_buy) for s in result.settlements] == [
        (UPSTREAM_ID, "B2", 800, 88_000),
        ("S2", UPSTREAM_ID, 1500, 285_000),
    ]
    # Delivery: B2 takes 1000, S2 produces only 1200 of its 1500 sold upstream.
    cleared.open_round(2 * D)
    cleared.meter("B1", meter(other={"external": 4000}, slot=(120, 180)))
    cleared.meter("B2", meter(other={"external": 1000}, slot=(120, 180)))
    cleared.meter("S1", meter(gen={"solar": 3000}, slot=(120, 180)))
    cleared.meter("S2", meter(gen={"solar": 2200}, slot=(120, 180)))
    result = cleared.process(120, 2 * D)
    up = next(r for r in result.meters if r.participant_id == UPSTREAM_ID)
    # Its reading on the ledger is what physically passed: 800 delivered to B2, 1200 taken from S2.
    assert up.generation == '{"wind":800}' and '"external":1200' in up.consumption
    rows = [(t.kind, t.seller_id, t.buyer_id, t.quantity) for t in result.transactions]
    assert ("p2p", UPSTREAM_ID, "B2", 800) in rows
    assert ("grid_buy", "grid", "B2", 200) in rows  # the rest of B2's load
    assert ("p2p", "S2", UPSTREAM_ID, 1200) in rows  # S2's 1000 locally came first
    assert ("financial", "S2", UPSTREAM_ID, 300) in rows  # 300 sold upstream and not produced
    # ... and short above too (settled there): not bought here from the grid a second time.
    assert not [r for r in rows if r[0] == "grid_buy" and r[2] == UPSTREAM_ID]
    assert physical_flows(result.transactions) == ({"solar": 1200}, 800)


def test_bad_upstream_fills_change_nothing(cleared: Market) -> None:
    res = {r.participant: r for r in cleared.residuals_of(120)}
    before = cleared.residuals_of(120), list(cleared.take_journal())
    fake = Residual("bid", "B9", "nope", None, 0.2, 100, None)
    for fills, code, words in [
        ([upstream_fill(fake, 100, 0.1, "x")], "invalid", "no such residual"),
        ([upstream_fill(res["B2"], 1001, 0.1, "x")], "invalid", "exceed"),
        ([upstream_fill(res["B2"], 600, 0.1, "x"), upstream_fill(res["B2"], 600, 0.1, "y")], "invalid", "exceed"),
        ([upstream_fill(res["B2"], 0, 0.1, "x")], "invalid", "not positive"),
        ([upstream_fill(res["B2"], 100, 0.121, "x")], "invalid", "above the bid"),  # B2 bid 0.12
        ([upstream_fill(res["S2"], 100, 0.179, "x")], "invalid", "below the ask"),  # S2 asked 0.18
        ([upstream_fill(res["S2"], 100, 1e300, "x")], "invalid", "price outside"),  # amounts would overflow
        ([upstream_fill(res["B2"], 100, float("nan"), "x")], "invalid", "price outside"),
        ([UpstreamFill(res["S2"], 100, 0.2, 0.2, "wind", "x")], "invalid", "the ask offered"),  # S2 sold solar
        ([upstream_fill(res["B2"], 100, 0.1, "x", source="plutonium")], "invalid", "unknown source"),
    ]:
        with pytest.raises(MarketError, match=words) as info:
            cleared.upstream_fills(120, fills, now=D)
        assert info.value.code == code
    assert (cleared.residuals_of(120), cleared.take_journal()) == (before[0], [])
    refused = cleared.upstream_fills(120, [upstream_fill(res["B2"], 500, 0.1, "x")], now=D)
    cleared.drop_upstream(120, refused.settlements)  # the ledger refused them: as if never given
    first = cleared.upstream_fills(120, [upstream_fill(res["B2"], 700, 0.1, "z")], now=D)
    assert [s.commit_id for s in first.settlements] == ["u120-0"]
    # A resend settles nothing twice; the same fill with other terms is a conflict.
    assert cleared.upstream_fills(120, [upstream_fill(res["B2"], 700, 0.1, "z")], now=D + 7).settlements == []
    with pytest.raises(MarketError, match="settled otherwise") as info:
        cleared.upstream_fills(120, [upstream_fill(res["B2"], 600, 0.1, "z")], now=D)
    assert info.value.code == "conflict"
    # A second batch (the market above the one above) takes what is left, and no more.
    with pytest.raises(MarketError, match="exceed"):
        cleared.upstream_fills(120, [upstream_fill(res["B2"], 301, 0.1, "y")], now=D)
    second = cleared.upstream_fills(120, [upstream_fill(res["B2"], 300, 0.09, "y")], now=D)
    assert [s.commit_id for s in second.settlements] == ["u120-1"]
    with pytest.raises(MarketError) as info:
        cleared.upstream_fills(180, [], now=D)  # still open
    assert info.value.code == "closed"


def test_only_a_market_below_takes_upstream_fills() -> None:
    m = Market(MarketConfig(duration=D))
    m.open_round(0)
    with pytest.raises(MarketError, match="no market above"):
        m.upstream_fills(60, [], now=0)
    assert m.residuals_of(60) == []


def test_nobody_trades_as_the_upstream_account(cleared: Market) -> None:
    for action in (
        lambda: bid(cleared, UPSTREAM_ID, 100, 0.1, (240, 300)),
        lambda: cleared.meter(UPSTREAM_ID, meter(other={"external": 1}, slot=(60, 120))),
    ):
        with pytest.raises(MarketError) as info:
            action()
        assert info.value.code == "forbidden"
    plain = Market(MarketConfig(duration=D))  # elsewhere `upstream` is an id like any other
    plain.open_round(0)
    assert "entry" in bid(plain, UPSTREAM_ID, 100, 0.1, (120, 180))


def test_a_restart_finds_the_same_residuals() -> None:
    """After a stop between a slot's clearing and its upstream fills, the restored market
    has the same residuals (so the upstream orders named by position still mean the same),
    and fills already settled before the stop are not taken twice."""
    cleared, local = clearing()
    journal = cleared.take_journal()
    entries = [r for r in journal if isinstance(r, EntryRecord)]
    cancels = [r for r in journal if isinstance(r, CancelRecord)]
    assert local and entries
    last = RoundRecord("r60-60", 60, D, 60, 120, 0, 0, "[]", 0)

    def restarted(settlements: list[Settlement]) -> Market:
        m = Market(MarketConfig(duration=D, close_steps=2), upstream=True)
        m.restore(Recovered(last, entries, cancels, settlements, []))
        return m

    again = restarted(local)
    assert again.residuals_of(120) == cleared.residuals_of(120)
    res = {r.participant: r for r in again.residuals_of(120)}
    upstream = again.upstream_fills(120, [upstream_fill(res["B2"], 400, 0.1, "x")], now=D).settlements
    twice = restarted([*local, *upstream])
    assert twice.upstream_fills(120, [upstream_fill(res["B2"], 400, 0.1, "x")], now=D).settlements == []
    with pytest.raises(MarketError, match="settled otherwise"):
        twice.upstream_fills(120, [upstream_fill(res["B2"], 300, 0.1, "x")], now=D)
    with pytest.raises(MarketError, match="exceed"):  # what the restored fills took is counted
        twice.upstream_fills(120, [upstream_fill(res["B2"], 601, 0.1, "w")], now=D)
