"""Limits and integrity (docs/protocol.md): open entries per participant are bounded, with
counts that the book derives itself (exact through cancels, gate closure, undo and restore),
and a bid and an ask of one owner never trade with each other (wash trades)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from market.core.book import Book, Entry
from market.core.clearing import PRICINGS, Pricing, _greedy, _merge_unless_self_pair, ask_order, bid_order, clear
from market.core.engine import Market, MarketConfig, Recovered
from market.core.errors import MarketError
from market.core.grid import GridStates
from market.core.protocol import EntryMsg, OrderMsg, OrdersMsg
from market.core.records import CancelRecord, EntryRecord
from market.core.registry import Registry
from tests.market.builders import entry, fills

D = 60
OPEN = 120  # next_settle of the round at 0 (close_steps 2)


def started(**config: Any) -> Market:
    m = Market(MarketConfig(duration=D, **config))
    m.open_round(0)
    return m


def msg(start: int = OPEN, *, id: str | None = None, price: float = 0.2, quantity: int = 10) -> EntryMsg:
    return EntryMsg(quantity=quantity, price=price, time_delivery=(start, start + D), id=id)


def refused(m: Market, pid: str, start: int = OPEN, **kw: Any) -> MarketError:
    before = (m.book.entries(), len(m.journal))
    with pytest.raises(MarketError) as info:
        m.submit(pid, "bid", msg(start, **kw))
    assert (m.book.entries(), len(m.journal)) == before  # nothing changed
    return info.value


# -- open entries per participant ------------------------------------------------------------


def test_defaults() -> None:
    c = MarketConfig()
    assert (c.max_open_per_slot, c.max_open_total) == (1000, 10000)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"max_open_per_slot": 0}, MarketConfig)


def test_entries_of_one_slot_are_capped_per_participant() -> None:
    m = started(max_open_per_slot=3, max_open_total=100)
    for _ in range(3):
        m.submit("A", "bid", msg())
    err = refused(m, "A")
    assert err.code == "invalid" and "max_open_per_slot" in err.message and "3" in err.message
    m.submit("B", "bid", msg())  # another participant is not affected
    m.submit("A", "bid", msg(OPEN + D))  # nor another slot
    assert len(m.book) == 5


def test_entries_of_all_slots_are_capped_per_participant() -> None:
    m = started(max_open_per_slot=3, max_open_total=4)
    for start in (OPEN, OPEN + D):
        m.submit("A", "bid", msg(start))
        m.submit("A", "ask", _ask(start))  # bids and asks count alike
    err = refused(m, "A", OPEN + 5 * D)
    assert err.code == "invalid" and "max_open_total" in err.message and "4" in err.message
    m.submit("B", "bid", msg(OPEN + 5 * D))


def _ask(start: int) -> EntryMsg:
    return EntryMsg(quantity=10, price=0.1, time_delivery=(start, start + D), source="solar")


def test_a_cancel_frees_room() -> None:
    m = started(max_open_per_slot=2)
    first = m.submit("A", "bid", msg())["entry"]["uuid"]
    m.submit("A", "bid", msg())
    refused(m, "A")
    m.cancel("A", first)
    m.submit("A", "bid", msg())
    refused(m, "A")


def test_gate_closure_frees_the_total() -> None:
    m = started(max_open_total=2)
    m.submit("A", "bid", msg(OPEN))
    m.submit("A", "bid", msg(OPEN + D))
    refused(m, "A", OPEN + 2 * D)
    m.open_round(D)  # the slot at OPEN is last_settle now: cleared and out of the book
    assert m.book.open_count("A", OPEN) == (0, 1)
    m.submit("A", "bid", msg(OPEN + 2 * D))
    refused(m, "A", OPEN + 3 * D)


def test_a_resubmission_at_the_cap_is_still_a_duplicate() -> None:
    m = started(max_open_per_slot=1)
    first = m.submit("A", "bid", msg(id="x"))
    assert m.submit("A", "bid", msg(id="x")) == {**first, "duplicate": True}
    refused(m, "A", id="y")


def test_an_undone_entry_frees_room() -> None:
    m = started(max_open_per_slot=1)
    m.submit("A", "bid", msg())
    m.undo(m.take_journal())
    assert m.book.open_count("A", OPEN) == (0, 0)
    m.submit("A", "bid", msg())


def test_orders_past_the_cap_are_refused_one_by_one() -> None:
    m = started(max_open_per_slot=2)
    orders = OrdersMsg([OrderMsg("bid", 10, 0.2, (OPEN, OPEN + D))] * 3)
    results = m.submit_orders("A", orders)
    assert [r["ok"] for r in results] == [True, True, False]
    assert results[2]["error"]["code"] == "invalid"
    assert len(m.book) == 2


def test_restore_rebuilds_the_counts_from_the_book() -> None:
    m = started(max_open_per_slot=3, max_open_total=4)
    for k in range(3):
        m.submit("A", "bid", msg(id=f"e{k}"))
    cancelled = m.submit("A", "bid", msg(OPEN + D))["entry"]["uuid"]
    m.cancel("A", cancelled)
    journal = m.take_journal()
    entries = [r for r in journal if isinstance(r, EntryRecord)]
    cancels = [r for r in journal if isinstance(r, CancelRecord)]

    again = Market(MarketConfig(duration=D, max_open_per_slot=3, max_open_total=4))
    again.restore(Recovered(None, entries, cancels, [], []))
    again.open_round(0)
    assert again.book.open_count("A", OPEN) == (3, 3)  # the cancelled one is only remembered
    refused(again, "A")  # the slot is full after the restart, too
    again.submit("A", "bid", msg(OPEN + D))
    refused(again, "A", OPEN + 2 * D)  # and so is the total


def test_book_counts_follow_every_change() -> None:
    book = Book()
    a = [entry("A", 10, 0.2, uuid=f"a{k}", slot=(0, 60)) for k in range(3)]
    b = entry("A", 10, 0.1, "solar", side="ask", uuid="b0", slot=(60, 120), id="cid")
    other = entry("B", 10, 0.2, uuid="o", slot=(0, 60))
    for e in (*a, b, other):
        book.add(e)
    assert book.open_count("A", 0) == (3, 4)
    assert book.open_count("A", 60) == (1, 4)
    assert book.open_count("B", 0) == (1, 1)
    book.cancel("A", "a0")
    assert book.open_count("A", 0) == (2, 3)
    book.forget("b0")
    assert book.open_count("A", 60) == (0, 2)
    book.remember(b)  # known by client id, not booked
    assert book.open_count("A", 60) == (0, 2)
    book.pop_slot(0)
    assert book.open_count("A", 0) == (0, 0) and book.open_count("B", 0) == (0, 0)
    book.add(a[0])
    book.clear()
    assert book.open_count("A", 0) == (0, 0)


def test_a_submit_past_the_cap_costs_constant_time() -> None:
    """Counts are kept, not recounted: a full slot refuses in O(1) (timed against a tiny one)."""
    import time

    def refusal_time(n: int) -> float:
        m = started(max_open_per_slot=n, max_open_total=n)
        m.submit_orders("A", OrdersMsg([OrderMsg("bid", 10, 0.2, (OPEN, OPEN + D))] * min(n, 1000)))
        for k in range(1000, n, 1000):
            m.submit_orders("A", OrdersMsg([OrderMsg("bid", 10, 0.2 + k * 1e-6, (OPEN, OPEN + D))] * 1000))
        t = time.perf_counter()
        for _ in range(2000):
            with pytest.raises(MarketError):
                m.submit("A", "bid", msg())
        return time.perf_counter() - t

    small, large = refusal_time(10), refusal_time(20_000)
    assert large < small * 5 + 0.05


# -- wash trades ---------------------------------------------------------------------------


def honest_and_wash() -> tuple[list[Entry], list[Entry], list[Entry], list[Entry]]:
    """Honest demand of 100 Wh at 0.30 and supply at 0.10 (uniform price 0.20); a wash pair of
    owner W (accounts W1 and W2) of 10 Wh at 0.29 / 0.28, only reached after honest supply."""
    bids = [entry("H1", 100, 0.30, uuid="hb", tie=0)]
    asks = [entry("H2", 100, 0.10, "solar", side="ask", uuid="ha", tie=0)]
    wash_bid = [entry("W1", 10, 0.29, uuid="wb", tie=1)]
    wash_ask = [entry("W2", 10, 0.28, "solar", side="ask", uuid="wa", tie=1)]
    return bids, asks, wash_bid, wash_ask


def uniform_price(result: list[Any]) -> float:
    assert len({f.price_buy for f in result}) == 1
    return float(result[0].price_buy)


def test_a_wash_pair_moves_the_uniform_price_unless_owners_are_known() -> None:
    bids, asks, wb, wa = honest_and_wash()
    honest = uniform_price(clear(bids, asks, "uniform"))
    assert honest == pytest.approx(0.20)
    washed = clear(bids + wb, asks + wa, "uniform")
    assert uniform_price(washed) == pytest.approx(0.285)  # +42.5 %: the market cannot tell
    owners = {"W1": "W", "W2": "W"}
    fair = clear(bids + wb, asks + wa, "uniform", owners=owners)
    assert fills(fair) == fills(clear(bids, asks, "uniform"))
    assert uniform_price(fair) == honest


def test_owner_defaults_to_the_participant() -> None:
    bids, asks, wb, wa = honest_and_wash()
    # Owners named only for others change nothing; an owner equal to the id is the id.
    assert fills(clear(bids + wb, asks + wa, owners={"H1": "H1", "X": "Y"})) == fills(clear(bids + wb, asks + wa))


def test_sourced_bids_respect_owners_too() -> None:
    bids = [entry("W1", 10, 0.5, "solar", uuid="wb", tie=0), entry("H1", 10, 0.4, "solar", uuid="hb", tie=1)]
    asks = [entry("W2", 10, 0.1, "solar", side="ask", uuid="wa", tie=0)]
    assert [(f.bid.uuid, f.ask.uuid) for f in clear(bids, asks)] == [("wb", "wa")]
    assert [(f.bid.uuid, f.ask.uuid) for f in clear(bids, asks, owners={"W1": "W", "W2": "W"})] == [("hb", "wa")]


def test_the_market_clears_with_the_owners_it_is_given() -> None:
    for yellow in (False, True):
        states = GridStates()
        m = Market(MarketConfig(duration=D, pricing="uniform", yellow_fee=0.001 if yellow else 0.0), states)
        m.owners = {"W1": "W", "W2": "W"}
        m.open_round(0)
        if yellow:
            states.set(OPEN, "YELLOW")
        m.submit("H1", "bid", msg(price=0.30, quantity=100))
        m.submit("H2", "ask", EntryMsg(100, 0.10, (OPEN, OPEN + D), source="solar"))
        m.submit("W1", "bid", msg(price=0.29, quantity=10))
        m.submit("W2", "ask", EntryMsg(10, 0.28, (OPEN, OPEN + D), source="solar"))
        settled = m.open_round(D).settlements  # the slot at OPEN is last_settle: cleared
        assert settled and {(s.buyer_id, s.seller_id) for s in settled} == {("H1", "H2")}, yellow


def test_registry_owner_field() -> None:
    reg = Registry.from_dict(
        {
            "participants": [
                {"id": "W1", "token": "t1", "owner": "acme"},
                {"id": "W2", "token": "t2", "owner": "acme"},
                {"id": "H1", "token": "t3"},
                {"id": "H2", "token": "t4", "owner": "H2"},
            ]
        }
    )
    assert [reg.owner(p) for p in ("W1", "W2", "H1", "H2", "unknown")] == ["acme", "acme", "H1", "H2", "unknown"]
    assert reg.owners() == {"W1": "acme", "W2": "acme"}
    with pytest.raises(msgspec.ValidationError):
        Registry.from_dict({"participants": [{"id": "A", "token": "t", "owner": ""}]})


# Random honest books, and a wash pair of one owner anywhere in them.
PARTIES = ["h0", "h1", "h2", "h3"]
prices = st.sampled_from([0.05, 0.1, 0.15, 0.2, 0.25, 0.3])


@st.composite
def honest_books(draw: Any) -> tuple[list[Entry], list[Entry]]:
    bids = [
        entry(draw(st.sampled_from(PARTIES)), draw(st.integers(1, 200)), draw(prices), uuid=f"b{k}", tie=2 * k)
        for k in range(draw(st.integers(0, 8)))
    ]
    asks = [
        entry(
            draw(st.sampled_from(PARTIES)),
            draw(st.integers(1, 200)),
            draw(prices),
            "solar",
            side="ask",
            uuid=f"a{k}",
            tie=2 * k,
        )
        for k in range(draw(st.integers(0, 8)))
    ]
    return bids, asks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    honest_books(),
    prices,
    prices,
    st.integers(1, 200),
    st.integers(1, 200),
    st.integers(0, 16),
    st.sampled_from(PRICINGS),
)
def test_a_wash_pair_alone_never_moves_honest_fills_or_prices(
    book: tuple[list[Entry], list[Entry]],
    p_bid: float,
    p_ask: float,
    q_bid: int,
    q_ask: int,
    tie: int,
    pricing: Pricing,
) -> None:
    bids, asks = book
    wb = entry("W1", q_bid, p_bid, uuid="wb", tie=tie)
    wa = entry("W2", q_ask, p_ask, "solar", side="ask", uuid="wa", tie=tie)
    owners = {"W1": "W", "W2": "W"}
    result = clear([*bids, wb], [*asks, wa], pricing, owners=owners)
    assert all(owners.get(f.bid.participant, f.bid.participant) != owners.get(f.ask.participant) for f in result)
    # The numpy kernel agrees with the scan wherever it may decide (no same-owner pair).
    b, a = sorted([*bids, wb], key=bid_order), sorted([*asks, wa], key=ask_order)
    merged = _merge_unless_self_pair(b, a, owners)
    if merged is not None:
        assert merged == _greedy(b, a, owners)
    if not any("w" in (f.bid.uuid[0], f.ask.uuid[0]) for f in result):
        # The pair traded with nobody honest: everything is as if it had not been there.
        assert fills(result) == fills(clear(bids, asks, pricing))
