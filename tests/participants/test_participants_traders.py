import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from market.core.protocol import OrdersMsg, decode
from participants.devices import Battery, Commitment
from participants.spec import BatteryTrader, FixedPriceTrader, NoTrader, RandomPriceTrader
from participants.traders import DRAWING, TRADERS, Observation, draws, inside, trader_for

SLOT = (1_700_001_000, 1_700_001_900)
SPECS = {
    "none": NoTrader(),
    "fixed_price": FixedPriceTrader(bid_price=0.2, ask_price=0.08),
    "random_price": RandomPriceTrader(),
    "battery": BatteryTrader(),
}


def obs(load=1000, gen=None, kind="fixed_price", **kw):
    defaults = dict(grid_buy=0.30, grid_sell=0.05, grid_buy_mean=0.30)
    defaults.update(kw)
    return Observation(next_settle=SLOT, generation=gen or {}, load=load, trader=SPECS[kind], **defaults)


def valid(orders):
    if orders:
        decode({"orders": orders}, OrdersMsg)
    ids = [o["id"] for o in orders]
    assert len(set(ids)) == len(ids)
    assert all(o["time_delivery"] == list(SLOT) for o in orders)
    return orders


def test_registry_and_spec_lookup():
    assert set(TRADERS) == {"none", "fixed_price", "random_price", "battery"}
    for kind, spec in SPECS.items():
        assert trader_for(spec) is TRADERS[kind]


def test_none_returns_nothing():
    assert TRADERS["none"](obs(kind="none", gen={"solar": 5000}), np.random.default_rng(0)) == []


def test_fixed_price_bids_and_asks_residuals():
    rng = np.random.default_rng(0)
    orders = valid(TRADERS["fixed_price"](obs(load=1000, gen={"solar": 300}), rng))
    assert orders == [{"side": "bid", "quantity": 700, "price": 0.2, "time_delivery": list(SLOT), "id": f"{SLOT[0]}-0"}]
    orders = valid(TRADERS["fixed_price"](obs(load=1000, gen={"solar": 900, "wind": 600}), rng))
    assert [(o["side"], o["quantity"], o.get("source"), o["price"]) for o in orders] == [("ask", 500, "wind", 0.08)]
    orders = valid(TRADERS["fixed_price"](obs(load=100, gen={"solar": 900, "wind": 600}), rng))
    assert [(o["quantity"], o["source"]) for o in orders] == [(800, "solar"), (600, "wind")]


def test_fixed_price_net_of_commitments_and_clamped_to_grid_band():
    committed = Commitment(bought=400, sold={"solar": 100})
    orders = valid(TRADERS["fixed_price"](obs(load=1000, committed=committed), np.random.default_rng(0)))
    assert orders[0]["quantity"] == 600
    narrow = obs(load=1000, gen={"wind": 5000}, grid_buy=0.15, grid_sell=0.10)
    orders = valid(TRADERS["fixed_price"](narrow, np.random.default_rng(0)))
    assert all(0.10 < o["price"] < 0.15 for o in orders)
    unknown = obs(load=1000, grid_buy=None, grid_sell=None)
    assert TRADERS["fixed_price"](unknown, np.random.default_rng(0))[0]["price"] == 0.2


def test_random_price_seeded_and_within_band():
    o = obs(load=800, gen={"wind": 100}, kind="random_price")
    a = valid(TRADERS["random_price"](o, np.random.default_rng(11)))
    b = valid(TRADERS["random_price"](o, np.random.default_rng(11)))
    c = valid(TRADERS["random_price"](o, np.random.default_rng(12)))
    assert a == b and a != c
    assert a[0]["quantity"] == 700
    assert TRADERS["random_price"](obs(kind="random_price", grid_buy=None), np.random.default_rng(0)) == []


@given(
    st.integers(0, 10_000),
    st.dictionaries(st.sampled_from(["solar", "wind"]), st.integers(0, 10_000)),
    st.floats(0.0, 1.0),
    st.floats(0.001, 1.0),
    st.integers(0, 2**32),
)
def test_random_price_always_strictly_inside(load, gen, sell, spread, seed):
    o = obs(load=load, gen=gen, kind="random_price", grid_sell=sell, grid_buy=sell + spread)
    for order in valid(TRADERS["random_price"](o, np.random.default_rng(seed))):
        assert sell < order["price"] < sell + spread


def battery(soc, cap=10_000, power=4_000):
    return Battery(cap, power, 0.9, soc)


def test_battery_trader_covers_load_from_battery_first():
    rng = np.random.default_rng(0)
    # No battery: plain residual bid inside the band.
    orders = valid(TRADERS["battery"](obs(load=1000, kind="battery"), rng))
    assert [(o["side"], o["quantity"]) for o in orders] == [("bid", 1000)]
    # 500 Wh above the 20% reserve: bids only the rest (power limit 1000 Wh per slot).
    orders = valid(TRADERS["battery"](obs(load=1000, kind="battery", battery=battery(2500)), rng))
    assert [(o["side"], o["quantity"]) for o in orders] == [("bid", 500)]
    orders = valid(TRADERS["battery"](obs(load=3000, kind="battery", battery=battery(9000)), rng))
    assert [(o["side"], o["quantity"]) for o in orders if o["side"] == "bid"] == [("bid", 2000)]


def test_battery_trader_stores_surplus_when_cheap_and_sells_when_dear():
    rng = np.random.default_rng(0)
    cheap = obs(load=0, gen={"solar": 3000}, kind="battery", battery=battery(2000), grid_buy=0.2, grid_buy_mean=0.3)
    orders = valid(TRADERS["battery"](cheap, rng))
    # 1000 Wh (power limit) kept to charge, the rest asked.
    assert [(o["side"], o["quantity"], o["source"]) for o in orders] == [("ask", 2000, "solar")]
    dear = obs(load=0, gen={"solar": 3000}, kind="battery", battery=battery(6000), grid_buy=0.4, grid_buy_mean=0.3)
    orders = valid(TRADERS["battery"](dear, rng))
    assert [(o["quantity"], o["source"]) for o in orders] == [(3000, "solar"), (1000, "bess")]
    full = obs(load=0, kind="battery", battery=battery(9500), grid_buy=0.2, grid_buy_mean=0.3)
    orders = valid(TRADERS["battery"](full, rng))
    assert [(o["quantity"], o["source"]) for o in orders] == [(1000, "bess")]
    sold = obs(load=0, kind="battery", battery=battery(9500), committed=Commitment(sold={"bess": 600}))
    assert [o["quantity"] for o in TRADERS["battery"](sold, rng)] == [400]
    low = obs(load=0, kind="battery", battery=battery(1500), grid_buy=0.4, grid_buy_mean=0.3)
    assert TRADERS["battery"](low, rng) == []


@pytest.mark.parametrize("kind", ["fixed_price", "random_price", "battery"])
@given(
    load=st.integers(0, 50_000),
    gen=st.dictionaries(st.sampled_from(["solar", "wind"]), st.integers(0, 50_000)),
    soc=st.integers(0, 10_000),
    seed=st.integers(0, 1000),
)
def test_orders_always_valid_and_inside_band(kind, load, gen, soc, seed):
    o = obs(load=load, gen=gen, kind=kind, battery=battery(soc), grid_buy=0.3, grid_sell=0.05)
    for order in valid(TRADERS[kind](o, np.random.default_rng(seed))):
        assert 0.05 < order["price"] < 0.3
        assert order["quantity"] > 0
        if order["side"] == "ask":
            assert order["source"] in {"solar", "wind", "bess"}


def test_inside():
    assert inside(0.5, 0.1, 0.3) < 0.3
    assert inside(0.0, 0.1, 0.3) > 0.1
    assert inside(0.2, 0.1, 0.3) == 0.2
    assert inside(0.2, None, 0.3) == 0.2
    assert inside(0.2, 0.3, 0.3) == 0.2


def test_only_drawing_traders_touch_their_generator():
    """`Prosumer` hands traders outside `DRAWING` one shared generator: they must never draw."""
    assert (
        {name for name, t in TRADERS.items() if draws(t)}
        == {"random_price"}
        == {name for name, t in TRADERS.items() if t in DRAWING}
    )
    assert draws(lambda obs, rng: [])  # unknown traders are assumed to draw
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    full = Battery(capacity_wh=10_000, power_w=5_000, efficiency=0.9, soc_wh=9_000)
    for kind in ("none", "fixed_price", "battery"):
        for load, pv, band, b in itertools.product([0, 300], [0, 500], [(0.3, 0.05), (None, None)], [None, full]):
            o = obs(load, {"solar": pv}, kind, grid_buy=band[0], grid_sell=band[1], grid_buy_mean=0.2, battery=b)
            TRADERS[kind](o, rng)
    assert rng.bit_generator.state == before
