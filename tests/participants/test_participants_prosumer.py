import numpy as np
import pytest

from market.core.protocol import MeterMsg, OrdersMsg, decode
from market.core.records import amount
from participants.prosumer import Prosumer
from participants.spec import (
    BatterySpec,
    BatteryTrader,
    FixedPriceTrader,
    NoTrader,
    ParticipantSpec,
    PvSpec,
    SyntheticLoad,
    synthetic_spec,
)

D = 900
T0 = 1_718_956_800  # 2024-06-21 08:00 UTC, aligned to 900 s
SPEC = ParticipantSpec(
    id="H01",
    load=SyntheticLoad(3500),
    pv=PvSpec(kw=5),
    battery=BatterySpec(capacity_wh=10_000, power_w=5_000, efficiency=0.95, soc=0.5),
    trader=FixedPriceTrader(bid_price=0.2, ask_price=0.08),
)


def start_round(t, mode="sim", c=2, tz="UTC", buy=0.30, sell=0.05):
    slot = lambda k: [t + k * D, t + (k + 1) * D]  # noqa: E731
    return {
        "mode": mode,
        "time": t,
        "duration": D,
        "timezone": tz,
        "current_round": slot(0),
        "last_round": slot(-1),
        "next_settle": slot(c),
        "last_settle": slot(c - 1),
        "market_info": [
            {"time_delivery": slot(k), "grid": {"buy_price": buy, "sell_price": sell}, "grid_state": "GREEN"}
            for k in range(c, c + 4)
        ],
    }


def test_round_gives_valid_meter_and_orders():
    p = Prosumer(SPEC, seed=1)
    meter, orders = p.on_round(start_round(T0))
    m = decode(meter, MeterMsg)
    assert m.time_interval == (T0, T0 + D)
    _, load = p.energy((T0, T0 + D))
    assert sum(m.consumption.other.values()) == load
    assert orders
    decode({"orders": orders}, OrdersMsg)
    assert all(o["time_delivery"] == [T0 + 2 * D, T0 + 3 * D] for o in orders)
    assert p.stats.rounds == 1 and p.stats.meters == 1 and p.stats.orders == len(orders)


def test_repeated_round_sends_nothing_twice():
    p = Prosumer(SPEC, seed=1)
    p.on_round(start_round(T0))
    assert p.on_round(start_round(T0)) == (None, [])


def test_deterministic_across_instances():
    spec = synthetic_spec(3, np.random.default_rng(5))
    runs = []
    for _ in range(2):
        p = Prosumer(spec, seed=9)
        runs.append([p.on_round(start_round(T0 + k * D)) for k in range(20)])
    assert runs[0] == runs[1]


def test_rt_mode_meters_the_slot_that_ended():
    p = Prosumer(SPEC, seed=1)
    meter, _ = p.on_round(start_round(T0, mode="rt"))
    assert meter is not None and meter["time_interval"] == [T0 - D, T0]


def test_settled_commitments_steer_the_meter():
    spec = ParticipantSpec(
        id="B1",
        battery=BatterySpec(capacity_wh=10_000, power_w=8_000, efficiency=1.0, soc=0.5),
        trader=BatteryTrader(),
    )
    p = Prosumer(spec, seed=1)
    fill = {
        "commit_id": "c1",
        "uuid": "u1",
        "id": f"{T0}-0",
        "side": "ask",
        "quantity": 700,
        "price": 0.2,
        "source": "bess",
        "time_delivery": [T0, T0 + D],
    }
    p.on_settled(fill)
    p.on_settled(fill)  # a repeated fill is counted once
    assert p.commitments[T0].sold == {"bess": 700}
    meter, _ = p.on_round(start_round(T0))
    assert meter is not None and meter["generation"] == {"bess": 700}
    assert p.battery is not None and p.battery.soc_wh == 5000 - 700
    assert p.stats.fills == 1 and p.stats.sold_wh == 700


def test_a_solar_sale_the_site_did_not_produce_is_covered_by_its_battery():
    spec = ParticipantSpec(
        id="B2",
        pv=PvSpec(kw=5),
        battery=BatterySpec(capacity_wh=10_000, power_w=8_000, efficiency=1.0, soc=0.5),
        trader=BatteryTrader(),
    )
    p = Prosumer(spec, seed=1)
    solar = p.energy((T0, T0 + D))[0]["solar"]
    assert solar > 0
    fill = {"commit_id": "c1", "uuid": "u1", "id": f"{T0}-0", "side": "ask", "quantity": solar + 300,
            "price": 0.2, "source": "solar", "time_delivery": [T0, T0 + D]}  # fmt: skip
    p.on_settled(fill)
    meter, _ = p.on_round(start_round(T0))
    assert meter is not None and meter["generation"] == {"solar": solar, "bess": 300}
    assert p.battery is not None and p.battery.soc_wh == 5000 - 300


def test_forecast_error_moves_what_the_trader_sees_not_the_meter():
    exact = ParticipantSpec(id="F1", load=SyntheticLoad(3500), pv=PvSpec(kw=6), trader=FixedPriceTrader())
    noisy = ParticipantSpec(
        id="F1", load=SyntheticLoad(3500), pv=PvSpec(kw=6, forecast_error=0.3), trader=FixedPriceTrader()
    )
    slots = [(T0 + k * D, T0 + (k + 1) * D) for k in range(12)]
    a, b, again = Prosumer(exact, seed=3), Prosumer(noisy, seed=3), Prosumer(noisy, seed=3)
    assert all(a.forecast(s) == a.energy(s) for s in slots)  # no error: the forecast is exact
    assert [b.energy(s) for s in slots] == [a.energy(s) for s in slots]  # what happens is the same
    forecasts = [b.forecast(s) for s in slots]
    assert forecasts == [again.forecast(s) for s in reversed(slots)][::-1]  # seeded per slot, not by call order
    assert all(f[1] == a.energy(s)[1] for f, s in zip(forecasts, slots, strict=True))  # load is exact
    off = [f[0]["solar"] / a.energy(s)[0]["solar"] - 1 for f, s in zip(forecasts, slots, strict=True)]
    assert any(abs(x) > 0.05 for x in off) and all(abs(x) < 2 for x in off)
    # The trader trades what it forecasts; the meter reads what the site did.
    ra, rb = ([p.on_round(start_round(T0 + k * D)) for k in range(8)] for p in (a, b))
    assert [m for m, _ in ra] == [m for m, _ in rb]
    assert [o for _, o in ra] != [o for _, o in rb]


def test_bill_and_grid_only_counterfactual():
    spec = ParticipantSpec(id="L1", load=SyntheticLoad(3500), trader=NoTrader())
    p = Prosumer(spec, seed=2)
    for k in range(3):
        p.on_round(start_round(T0 + k * D))
    _, load = p.energy((T0 + 2 * D, T0 + 3 * D))
    bought = min(100, load)
    rows = [
        {
            "id": "t1",
            "kind": "p2p",
            "seller_id": "X",
            "buyer_id": "L1",
            "quantity": bought,
            "amount_buy": 20_000,
            "amount_sell": 20_000,
        },
        {
            "id": "t2",
            "kind": "grid_buy",
            "seller_id": "grid",
            "buyer_id": "L1",
            "quantity": load - bought,
            "amount_buy": amount(load - bought, 0.3),
            "amount_sell": 0,
        },
    ]
    delivery = {"time_delivery": [T0 + 2 * D, T0 + 3 * D], "transactions": rows}
    p.on_delivery(delivery)
    p.on_delivery(delivery)  # once per slot
    s = p.stats
    assert s.delivered == 1 and s.compared == 1
    assert s.paid == 20_000 + amount(load - bought, 0.3) and s.received == 0
    assert s.p2p_bought_wh == bought and s.grid_bought_wh == load - bought
    assert s.grid_only_paid == amount(load, 0.3) and s.grid_only_received == 0
    assert s.savings == s.grid_only_cost - s.cost


def test_time_going_back_restarts_the_run():
    p = Prosumer(SPEC, seed=1)
    first = [p.on_round(start_round(T0 + k * D)) for k in range(4)]
    again = [p.on_round(start_round(T0 + k * D)) for k in range(4)]
    assert first == again
    assert p.stats.rounds == 8


def test_timezone_from_the_round_is_used():
    p = Prosumer(ParticipantSpec(id="P", pv=PvSpec(kw=5)), seed=1)
    p.on_round(start_round(T0, tz="Europe/Berlin"))
    assert p.timezone == "Europe/Berlin"


def test_bad_payload_raises_value_error():
    p = Prosumer(SPEC)
    with pytest.raises(ValueError):
        p.on_round({"time": "soon"})
    with pytest.raises(ValueError):
        p.on_settled({"side": "bid"})


def test_memory_is_bounded():
    p = Prosumer(SPEC, seed=1)
    for k in range(400):
        p.on_round(start_round(T0 + k * D))
    assert len(p._prices) <= 110 and len(p._pending) <= 110 and len(p._energy) <= 4
    # The heaps `_forget` pops from track exactly what is kept, and stay as small.
    assert sorted(p._starts) == sorted(p._kept) and len(p._kept) <= 110
    assert set(p._prices) | set(p._pending) | set(p.commitments) | p._delivered <= p._kept
    assert sorted(p._energy_keys) == sorted(p._energy)


def test_forgetting_drops_every_old_slot_even_late_ones():
    """Slots before the window are dropped from every table, also ones that arrive late (a
    replayed fill or delivery of an old slot), like a full scan of the tables would."""
    p = Prosumer(SPEC, seed=1)
    for k in range(120):
        p.on_round(start_round(T0 + k * D))
    old = T0 + 3 * D  # far out of the 96-slot window by now
    fill = {"side": "ask", "quantity": 5, "price": 0.1, "time_delivery": [old, old + D], "commit_id": "late"}
    p.on_settled(fill)
    p.on_delivery({"time_delivery": [old, old + D], "transactions": []})
    assert old in p.commitments and old in p._fills and old in p._delivered
    p.on_round(start_round(T0 + 120 * D))
    assert old not in p.commitments and old not in p._fills and old not in p._delivered
    # Forgotten, so a replay counts again (as before the heaps).
    p.on_settled(fill)
    assert p.stats.fills == 2
    # A jump far ahead forgets everything but the new window at once.
    p.on_round(start_round(T0 + 1000 * D))
    horizon = T0 + (1000 - 96) * D
    assert all(s >= horizon for s in [*p._prices, *p._pending, *p.commitments, *p._fills, *p._delivered])
    assert all(s[0] >= T0 + 999 * D for s in p._energy)


def test_community_runs_and_trades_are_consistent():
    """A small community over a day: every meter and batch is valid, batteries stay in range."""
    rng = np.random.default_rng(3)
    people = [Prosumer(synthetic_spec(i, rng), seed=3) for i in range(30)]
    for k in range(96):
        for p in people:
            meter, orders = p.on_round(start_round(T0 + k * D))
            decode(meter, MeterMsg)
            if orders:
                decode({"orders": orders}, OrdersMsg)
                assert all(0.05 < o["price"] < 0.30 for o in orders)
            if p.battery is not None:
                assert 0 <= p.battery.soc_wh <= p.battery.capacity_wh
