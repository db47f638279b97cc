"""The Market state machine: rounds, entry validation, meters, the slot lifecycle, a full round trip."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from market.core.engine import Market, MarketConfig, Phase
from market.core.errors import IllegalTransition, MarketError
from market.core.grid import GridStates, GridTariff
from market.core.protocol import OrderMsg, OrdersMsg
from tests.market.builders import ask, bid, market, meter, rows

D = 60


def code(fn: Any, *args: Any, **kw: Any) -> str:
    with pytest.raises(MarketError) as info:
        fn(*args, **kw)
    return info.value.code


def started(t: int = 0, **config: Any) -> Market:
    m = market(**config)
    m.open_round(t)
    return m


def state(m: Market) -> Any:
    """Everything a refused action must leave unchanged, as the public API shows it."""
    delivering = m.delivering()
    return copy.deepcopy(
        (
            m.book.entries(),
            len(m.book),
            m.times,
            delivering,
            [m.phase(s) for s in range(-600, 12_000, D)],
            {s: m.metered(s) for s in delivering},
        )
    )


# -- rounds ------------------------------------------------------------------------------


def test_first_round() -> None:
    m = market(duration=D, close_steps=2)
    r = m.open_round(600)
    assert r.settled == [] and r.settlements == []
    assert r.start_round == {
        "mode": "sim",
        "time": 600,
        "duration": 60,
        "timezone": "UTC",
        "current_round": [600, 660],
        "last_round": [540, 600],
        "next_settle": [720, 780],
        "last_settle": [660, 720],
        "market_info": [
            {"time_delivery": [600, 660], "grid": {"buy_price": 0.2, "sell_price": 0.1}, "grid_state": "GREEN"},
            {"time_delivery": [660, 720], "grid": {"buy_price": 0.2, "sell_price": 0.1}, "grid_state": "GREEN"},
            {"time_delivery": [720, 780], "grid": {"buy_price": 0.2, "sell_price": 0.1}, "grid_state": "GREEN"},
        ],
    }
    assert m.phase(600) is Phase.DELIVERING
    assert m.phase(660) is Phase.MATCHED
    assert m.phase(720) is Phase.OPEN
    assert m.delivering() == [600]


def test_close_steps_1_market_info_has_two_slots() -> None:
    m = market(duration=D, close_steps=1)
    r = m.open_round(0)
    assert [i["time_delivery"] for i in r.start_round["market_info"]] == [[0, 60], [60, 120]]


def test_second_round_last_round_is_previous_current() -> None:
    m = started(0)
    r = m.open_round(60)
    assert r.start_round["last_round"] == [0, 60]
    assert m.delivering() == [0, 60]


@pytest.mark.parametrize(("t", "duration"), [(0, None), (30, None), (-60, None), (90, 60), (100, 120)])
def test_round_must_advance_and_align(t: int, duration: int | None) -> None:
    m = started(0)
    before = state(m)
    assert code(m.open_round, t, duration) == "invalid"
    assert state(m) == before


def test_before_first_round_unavailable() -> None:
    m = market()
    assert code(bid, m, "B", 10, 0.1, (120, 180)) == "unavailable"
    assert code(m.meter, "B", meter(slot=(0, 60))) == "unavailable"
    assert code(m.cancel, "B", "B.0") == "unavailable"


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        MarketConfig(price_min=1.0, price_max=1.0)
    with pytest.raises(ValueError):
        MarketConfig(dispatch=("solar",))
    with pytest.raises(ValueError):
        MarketConfig(dispatch=("external",))


# -- entries -----------------------------------------------------------------------------


def test_bid_reply_and_uuids() -> None:
    m = started(0)
    r = bid(m, "B", 100, 0.12, (120, 180), id="x")
    first = r["entry"]["uuid"]
    assert isinstance(first, str) and first
    assert r == {
        "entry": {
            "uuid": first,
            "id": "x",
            "side": "bid",
            "quantity": 100,
            "price": 0.12,
            "time_delivery": [120, 180],
            "source": None,
            "time_submission": 0,
        }
    }
    # Market-made ids: unique, whoever submits and for whichever slot.
    uuids = [
        first,
        ask(m, "S", 100, 0.1, (120, 180))["entry"]["uuid"],
        bid(m, "B", 100, 0.12, (180, 240))["entry"]["uuid"],
        bid(m, "B", 100, 0.12, (120, 180))["entry"]["uuid"],
    ]
    assert len(set(uuids)) == 4
    assert [m.book.get(u) is not None for u in uuids] == [True] * 4


@pytest.mark.parametrize("slot", [(60, 120), (0, 60), (-60, 0)])
def test_gate_closed_for_last_settle_and_earlier(slot: tuple[int, int]) -> None:
    m = started(0)
    before = state(m)
    assert code(bid, m, "B", 10, 0.1, slot) == "closed"
    assert code(ask, m, "S", 10, 0.1, slot) == "closed"
    assert state(m) == before


def test_next_settle_and_horizon() -> None:
    m = started(0, horizon=3)
    bid(m, "B", 10, 0.1, (120, 180))  # next_settle
    bid(m, "B", 10, 0.1, (120 + 3 * D, 180 + 3 * D))  # the last slot of the horizon
    before = state(m)
    assert code(bid, m, "B", 10, 0.1, (120 + 4 * D, 180 + 4 * D)) == "invalid"
    assert state(m) == before


@pytest.mark.parametrize("slot", [(150, 210), (120, 240), (120, 150), (180, 120)])
def test_misaligned_slot_invalid(slot: tuple[int, int]) -> None:
    m = started(0)
    assert code(bid, m, "B", 10, 0.1, slot) == "invalid"


def test_price_bounds_inclusive() -> None:
    m = started(0, price_min=0.0, price_max=1.0)
    bid(m, "B", 10, 0.0, (120, 180))
    bid(m, "B", 10, 1.0, (120, 180))
    before = state(m)
    assert code(bid, m, "B", 10, -0.01, (120, 180)) == "invalid"
    assert code(ask, m, "S", 10, 1.01, (120, 180)) == "invalid"
    assert state(m) == before


def test_max_quantity() -> None:
    m = started(0, max_quantity=1000)
    bid(m, "B", 1000, 0.1, (120, 180))
    assert code(bid, m, "B", 1001, 0.1, (120, 180)) == "invalid"


def test_sources() -> None:
    m = started(0)
    before = state(m)
    assert code(ask, m, "S", 10, 0.1, (120, 180), source=None) == "invalid"
    assert code(ask, m, "S", 10, 0.1, (120, 180), source="coal") == "invalid"
    assert code(bid, m, "B", 10, 0.1, (120, 180), source="coal") == "invalid"
    assert code(ask, m, "S", 10, 0.1, (120, 180), source="external") == "invalid"
    assert state(m) == before
    ask(m, "S", 10, 0.1, (120, 180), source="bess")
    bid(m, "B", 10, 0.1, (120, 180), source="wind")


def test_client_id_idempotent() -> None:
    m = started(0)
    first = bid(m, "B", 100, 0.12, (120, 180), id="x")
    again = bid(m, "B", 100, 0.12, (120, 180), id="x")
    assert again == {"entry": first["entry"], "duplicate": True}
    assert len(m.book) == 1
    before = state(m)
    assert code(bid, m, "B", 101, 0.12, (120, 180), id="x") == "conflict"
    assert code(ask, m, "B", 100, 0.12, (120, 180), id="x") == "conflict"
    assert state(m) == before
    # Another participant's id space is its own.
    assert "duplicate" not in bid(m, "C", 100, 0.12, (120, 180), id="x")
    assert bid(m, "B", 5, 0.12, (120, 180))["entry"]["uuid"] != first["entry"]["uuid"]
    assert len(m.book) == 3


def test_cancel() -> None:
    m = started(0)
    uuid = bid(m, "B", 100, 0.12, (120, 180))["entry"]["uuid"]
    before = state(m)
    assert code(m.cancel, "C", uuid) == "not_found"
    assert code(m.cancel, "B", "nope") == "not_found"
    assert state(m) == before
    assert m.cancel("B", uuid)["entry"]["uuid"] == uuid
    assert len(m.book) == 0
    assert code(m.cancel, "B", uuid) == "not_found"


def test_entry_uuids_are_slot_first_so_a_rounds_entries_are_neighbours_in_key_order() -> None:
    """`slot.participant.n`: the ledger's key index takes a round's entries at one place (with
    `participant.slot.n` a durable commit wrote a page per participant, 21 -> 27 rounds/s
    over 3 days at 1,000 participants, docs/benchmarks.md)."""
    m = started(0)
    later = bid(m, "A", 5, 0.1, (180, 240))["entry"]["uuid"]
    now = [bid(m, p, 5, 0.1, (120, 180))["entry"]["uuid"] for p in ("Z", "A", "a.b")]
    assert now == ["120.Z.0", "120.A.0", "120.a.b.0"] and later == "180.A.0"
    assert max(now) < later


def test_cancel_of_an_own_entry_past_gate_closure_is_closed_whatever_the_id() -> None:
    m = started(0)
    mine = bid(m, "a.b", 100, 0.12, (120, 180))["entry"]["uuid"]
    m.open_round(60)  # the slot's gate closes: the unmatched entry leaves the book
    assert mine not in {e.uuid for e in m.book.entries()}
    assert code(m.cancel, "a.b", mine) == "closed"
    assert code(m.cancel, "b", mine) == "not_found"  # not its own: nothing said of the slot
    assert code(m.cancel, "a.b", "x.a.b.0") == "not_found"
    # An entry of a ledger written before uuids were slot first (a market restarted on it).
    assert code(m.cancel, "a.b", "a.b.120.0") == "closed"
    assert code(m.cancel, "b", "a.b.120.0") == "not_found"
    assert code(m.cancel, "a.b", "a.b.x.0") == "not_found"


def test_cancelled_entry_is_not_matched() -> None:
    m = started(0)
    uuid = bid(m, "B", 100, 0.12, (120, 180))["entry"]["uuid"]
    ask(m, "S", 100, 0.1, (120, 180))
    m.cancel("B", uuid)
    assert m.open_round(60).settlements == []


def test_orders_each_on_its_own() -> None:
    m = started(0)
    orders = OrdersMsg(
        orders=[
            OrderMsg("bid", 10, 0.1, (120, 180)),
            OrderMsg("ask", 10, 0.1, (120, 180)),  # no source
            OrderMsg("ask", 10, 0.1, (60, 120), source="solar"),  # closed
            OrderMsg("ask", 10, 0.1, (120, 180), id="k", source="solar"),
            OrderMsg("ask", 10, 0.1, (120, 180), id="k", source="solar"),  # duplicate
            OrderMsg("ask", 11, 0.1, (120, 180), id="k", source="solar"),  # conflict
        ]
    )
    results = m.submit_orders("P", orders)
    assert [r["ok"] for r in results] == [True, False, False, True, True, False]
    assert [r["error"]["code"] for r in results if not r["ok"]] == ["invalid", "closed", "conflict"]
    assert results[4]["duplicate"] is True and results[4]["entry"] == results[3]["entry"]
    uuids = [r["entry"]["uuid"] for r in results if r["ok"]]
    assert uuids[1] == uuids[2] != uuids[0]
    assert len(m.book) == 2


# -- meters ------------------------------------------------------------------------------


def test_meter_only_for_the_delivering_slot() -> None:
    m = started(0)
    assert m.meter("P", meter(gen={"solar": 5}, slot=(0, 60))) == {}
    assert m.metered(0) == ["P"]
    before = state(m)
    assert code(m.meter, "P", meter(slot=(60, 120))) == "invalid"  # matched, not delivered yet
    assert code(m.meter, "P", meter(slot=(120, 180))) == "invalid"  # open
    assert code(m.meter, "P", meter(slot=(-60, 0))) == "closed"  # before the current round
    assert code(m.meter, "P", meter(slot=(30, 90))) == "invalid"  # misaligned
    assert code(m.meter, "Q", meter(gen={"coal": 1}, slot=(0, 60))) == "invalid"
    assert code(m.meter, "Q", meter(bess={"external": 1}, slot=(0, 60))) == "invalid"
    assert state(m) == before
    m.process(0, now=60)
    assert code(m.meter, "Q", meter(slot=(0, 60))) == "closed"


def test_meter_duplicate_and_conflict() -> None:
    m = started(0)
    reading = meter(gen={"solar": 5}, other={"external": 3}, slot=(0, 60))
    m.meter("P", reading)
    assert m.meter("P", meter(gen={"solar": 5}, other={"external": 3}, slot=(0, 60))) == {"duplicate": True}
    before = state(m)
    assert code(m.meter, "P", meter(gen={"solar": 6}, other={"external": 3}, slot=(0, 60))) == "conflict"
    assert state(m) == before


def test_meter_each_replies_and_refuses_as_meter_one_by_one() -> None:
    """A batch of readings checks each interval once: every reply, refusal and the state
    after are what `meter` gives reading by reading, whatever the mix and its order."""
    batch = [
        ("P", meter(gen={"solar": 5}, other={"external": 3}, slot=(0, 60))),
        ("P", meter(gen={"solar": 5}, other={"external": 3}, slot=(0, 60))),  # duplicate
        ("P", meter(gen={"solar": 6}, slot=(0, 60))),  # conflict
        ("Q", meter(gen={"coal": 1}, slot=(0, 60))),  # unknown source
        ("Q", meter(gen={"coal": 1}, slot=(30, 90))),  # misaligned comes first
        ("Q", meter(gen={"coal": 1}, slot=(60, 120))),  # unknown source before not delivered
        ("Q", meter(slot=(60, 120))),  # not delivered yet
        ("R", meter(slot=(-60, 0))),  # before the current round
        ("R", meter(other={"external": 7}, slot=(0, 60))),
    ]
    one, each = started(0), started(0)
    expected: list[Any] = []
    for pid, msg in batch:
        try:
            expected.append(one.meter(pid, msg))
        except MarketError as err:
            expected.append((err.code, err.message))
    got = [(r.code, r.message) if isinstance(r, MarketError) else r for r in each.meter_each(batch)]
    assert got == expected
    assert [e for e in expected if isinstance(e, tuple)][:3] == [
        ("conflict", "a different reading for interval 0 was already accepted"),
        ("invalid", "unknown source 'coal' in generation"),
        ("invalid", "time_interval [30, 90] is not an aligned 60 s slot"),
    ]
    assert state(each) == state(one) and each.take_journal() == one.take_journal()
    idle = market()  # before the first round: each is refused as `meter` refuses it
    assert [r.code for r in idle.meter_each(batch[:2])] == [code(idle.meter, *batch[0])] * 2


def test_rt_style_meter_for_last_round_until_processed() -> None:
    m = started(0, mode="rt")
    m.open_round(60)
    m.meter("P", meter(gen={"solar": 1}, slot=(0, 60)))  # last_round is still delivering
    m.process(0, now=65)
    assert code(m.meter, "Q", meter(slot=(0, 60))) == "closed"
    m.meter("P", meter(slot=(60, 120)))


# -- lifecycle ---------------------------------------------------------------------------


def test_process_twice_is_illegal_and_changes_nothing() -> None:
    m = started(0)
    m.meter("P", meter(other={"external": 5}, slot=(0, 60)))
    m.process(0, now=60)
    before = state(m)
    with pytest.raises(IllegalTransition):
        m.process(0, now=61)
    assert state(m) == before
    assert m.phase(0) is Phase.PROCESSED


@pytest.mark.parametrize("slot", [60, 120, 6000])
def test_process_before_delivery_is_illegal(slot: int) -> None:
    m = started(0)
    before = state(m)
    with pytest.raises(IllegalTransition):
        m.process(slot, now=60)
    assert state(m) == before


def test_red_slot_has_no_fills() -> None:
    states = GridStates()
    states.set(120, "RED")
    m = Market(MarketConfig(), states)
    m.open_round(0)
    bid(m, "B", 100, 0.2, (120, 180))
    ask(m, "S", 100, 0.1, (120, 180))
    bid(m, "B", 100, 0.2, (180, 240))
    ask(m, "S", 100, 0.1, (180, 240))
    assert m.open_round(60).settlements == []
    assert m.start_round_payload()["market_info"][1]["grid_state"] == "RED"
    assert len(m.open_round(120).settlements) == 1  # the next slot is GREEN
    m.meter("S", meter(gen={"solar": 100}, slot=(120, 180)))
    m.meter("B", meter(other={"external": 100}, slot=(120, 180)))
    assert [t.kind for t in m.process(120, now=180).transactions] == ["grid_buy", "grid_sell"]


# -- full round trip ---------------------------------------------------------------------


def test_round_trip() -> None:
    tariff = GridTariff(price=0.125, fee=1.0)
    m = market(duration=D, close_steps=2, grid=tariff)
    m.open_round(0)
    b = bid(m, "B", 100, 0.25, (120, 180), id="my-bid")["entry"]
    a = ask(m, "S", 150, 0.125, (120, 180), source="solar")["entry"]
    bid(m, "C", 50, 0.0625, (120, 180))  # below every ask: not filled
    m.process(0, now=60)

    r = m.open_round(60)  # last_settle = [120, 180]: matched now
    assert m.phase(120) is Phase.MATCHED
    [s] = r.settlements
    assert (s.commit_id, s.seller_id, s.buyer_id, s.energy_source, s.quantity) == ("c120-0", "S", "B", "solar", 100)
    assert (s.price_buy, s.price_sell, s.amount_buy, s.amount_sell, s.dispatch, s.seq) == (
        0.1875,
        0.1875,
        18750,
        18750,
        False,
        0,
    )
    assert (s.bid_uuid, s.ask_uuid, s.bid_id, s.ask_id, s.time_creation) == (b["uuid"], a["uuid"], "my-bid", None, 60)
    common = {"commit_id": "c120-0", "quantity": 100, "source": "solar", "time_delivery": [120, 180]}
    assert r.settled == [
        ("B", {**common, "uuid": b["uuid"], "id": "my-bid", "side": "bid", "price": 0.1875}),
        ("S", {**common, "uuid": a["uuid"], "id": None, "side": "ask", "price": 0.1875}),
    ]
    assert len(m.book) == 0  # the rest of the slot's entries are gone
    m.process(60, now=120)

    m.open_round(120)
    assert m.phase(120) is Phase.DELIVERING
    m.meter("S", meter(gen={"solar": 130}, other={"solar": 10}, slot=(120, 180)))
    m.meter("B", meter(other={"external": 120}, slot=(120, 180)))
    result = m.process(120, now=180)
    assert result.slot == (120, 180)
    assert result.metered == ["B", "S"]
    assert rows(result.transactions) == [
        ("p2p", "S", "B", "solar", 100, 0.1875, 0.1875, 18750, 18750, "c120-0"),
        ("grid_buy", "grid", "B", "grid", 20, 0.25, 0.25, 5000, 5000, None),
        ("self", "S", "S", "solar", 10, 0.0, 0.0, 0, 0, None),
        ("grid_sell", "S", "grid", "solar", 30, 0.125, 0.125, 3750, 3750, None),
    ]
    assert [t.id for t in result.transactions] == ["t120-0", "t120-1", "t120-2", "t120-3"]
    assert {p: [t["kind"] for t in d["transactions"]] for p, d in result.deliveries.items() if p != "grid"} == {
        "S": ["p2p", "self", "grid_sell"],
        "B": ["p2p", "grid_buy"],
    }
    assert result.deliveries["B"]["time_delivery"] == [120, 180]
    assert result.deliveries["B"]["transactions"][0] == result.transactions[0].row()
    assert [(x.id, x.participant_id, x.generation, x.consumption) for x in result.meters] == [
        ("m120-B", "B", "{}", '{"bess":{},"other":{"external":120}}'),
        ("m120-S", "S", '{"solar":130}', '{"bess":{},"other":{"solar":10}}'),
    ]
    assert m.phase(120) is Phase.PROCESSED and m.delivering() == []


def test_close_steps_1_round_trip() -> None:
    m = market(duration=D, close_steps=1)
    m.open_round(0)
    bid(m, "B", 100, 0.25, (60, 120))
    ask(m, "S", 100, 0.125, (60, 120))
    r = m.open_round(60)  # last_settle == current_round: matched and delivered at once
    assert len(r.settlements) == 1 and m.phase(60) is Phase.DELIVERING
    m.meter("S", meter(gen={"solar": 100}, slot=(60, 120)))
    m.meter("B", meter(other={"external": 100}, slot=(60, 120)))
    assert [t.kind for t in m.process(60, now=120).transactions] == ["p2p"]


def test_settled_of_some_parties_are_theirs_of_all_and_the_outcome_is_the_same() -> None:
    def two_fills(**kw: Any) -> Any:
        m = market(duration=D, close_steps=2)
        m.open_round(0)
        for buyer, seller in (("B", "S"), ("C", "T")):
            bid(m, buyer, 100, 0.25, (120, 180))
            ask(m, seller, 100, 0.125, (120, 180))
        return m.open_round(60, **kw)

    every = two_fills()
    for parties in ({"B"}, {"S", "C"}, set(), {"B", "S", "C", "T", "X"}):
        some = two_fills(parties=parties)
        assert some.settled == [(p, e) for p, e in every.settled if p in parties]
        assert some.settlements == every.settlements and some.start_round == every.start_round


def test_deliveries_of_some_parties_are_theirs_of_all_and_the_rows_the_same() -> None:
    def delivered(**kw: Any) -> Any:
        m = market(duration=D, close_steps=1)
        m.open_round(0)
        bid(m, "B", 100, 0.25, (60, 120))
        ask(m, "S", 100, 0.125, (60, 120))
        m.open_round(60)
        m.meter("S", meter(gen={"solar": 130}, slot=(60, 120)))
        m.meter("B", meter(other={"external": 120}, slot=(60, 120)))
        return m.process(60, now=120, **kw)

    every = delivered()
    assert set(every.deliveries) == {"B", "S", "grid"}
    for parties in ({"B"}, {"S", "X"}, set(), frozenset()):
        some = delivered(parties=parties)
        assert some.deliveries == {p: d for p, d in every.deliveries.items() if p in parties}
        assert some.transactions == every.transactions and some.meters == every.meters


def test_a_market_without_a_journal_books_meters_and_exchanges_the_same() -> None:
    def run(journal: bool) -> Any:
        m = market(duration=D, close_steps=1, journal=journal)
        m.open_round(0)
        bid(m, "B", 100, 0.25, (60, 120))
        ask(m, "S", 100, 0.125, (60, 120), source="solar")
        r = m.open_round(60)
        replies = [
            m.meter("S", meter(gen={"solar": 100}, slot=(60, 120))),
            m.meter("B", meter(other={"external": 100}, slot=(60, 120))),
            m.meter("B", meter(other={"external": 100}, slot=(60, 120))),  # a duplicate
        ]
        assert code(m.meter, "B", meter(other={"external": 90}, slot=(60, 120))) == "conflict"
        return m, r.settlements, replies, m.process(60, now=120)

    m, fills, replies, result = run(False)
    ref, ref_fills, ref_replies, ref_result = run(True)
    assert (fills, replies, result.transactions, result.deliveries, result.metered) == (
        ref_fills,
        ref_replies,
        ref_result.transactions,
        ref_result.deliveries,
        ref_result.metered,
    )
    assert m.take_journal() == [] and result.meters == []
    assert {r.TABLE for r in ref.take_journal()} == {"entries", "meters"} and len(ref_result.meters) == 2


def test_pay_as_bid_engine() -> None:
    m = market(pricing="pay_as_bid")
    m.open_round(0)
    bid(m, "B", 100, 0.25, (120, 180))
    ask(m, "S", 100, 0.125, (120, 180))
    r = m.open_round(60)
    assert [(p, e["side"], e["price"]) for p, e in r.settled] == [("B", "bid", 0.25), ("S", "ask", 0.125)]


def test_reset() -> None:
    m = started(0)
    before = bid(m, "B", 100, 0.25, (120, 180), id="x")["entry"]["uuid"]
    m.reset()
    assert len(m.book) == 0 and m.times is None and m.delivering() == []
    m.open_round(0)
    after = bid(m, "B", 5, 0.25, (120, 180), id="x")  # the client id is free again
    assert "duplicate" not in after
    assert after["entry"]["uuid"] != before  # ids keep counting: never reused


def test_entries_submitted_far_ahead_are_matched_when_their_gate_closes() -> None:
    m = started(0)
    bid(m, "B", 100, 0.25, (300, 360))
    ask(m, "S", 100, 0.125, (300, 360))
    for t in (60, 120, 180):
        assert m.open_round(t).settlements == []
        m.process(t - 60, now=t)
    assert len(m.open_round(240).settlements) == 1  # last_settle = [300, 360]
