import tomllib

import numpy as np
import pytest

from participants.spec import (
    BatteryTrader,
    CsvLoad,
    FixedPriceTrader,
    NoTrader,
    SyntheticLoad,
    decode_spec,
    decode_specs,
    synthetic_spec,
    to_table,
)

SCENARIO = """
[[participants]]
id = "H01"
load = { kind = "synthetic", annual_kwh = 3500 }
pv = { kw = 5 }
wind = { kw = 3.0 }
battery = { capacity_wh = 10000, power_w = 5000, efficiency = 0.95, soc = 0.5 }
trader = { kind = "fixed_price", bid_price = 0.20, ask_price = 0.08 }

[[participants]]
id = "H02"
load = { kind = "csv", path = "profiles/h02.csv" }
"""


def test_decode_scenario_tables():
    h01, h02 = decode_specs(tomllib.loads(SCENARIO)["participants"])
    assert h01.load == SyntheticLoad(annual_kwh=3500.0)
    assert h01.pv is not None and h01.pv.kw == 5.0 and h01.pv.latitude == 50.0
    assert h01.battery is not None and h01.battery.capacity_wh == 10000
    assert h01.trader == FixedPriceTrader(bid_price=0.2, ask_price=0.08)
    assert h02.load == CsvLoad(path="profiles/h02.csv")
    assert h02.trader == NoTrader() and h02.pv is None


@pytest.mark.parametrize(
    "table",
    [
        {"id": "x", "pv": {"kw": 1, "tilt": 30}},  # unknown field
        {"id": "x", "colour": "red"},
        {"id": "x", "trader": {"kind": "magic"}},
        {"id": "x", "battery": {"capacity_wh": 10, "power_w": 5, "efficiency": 1.5}},
        {"id": "x", "pv": {"kw": -1}},
        {"id": ""},
    ],
)
def test_decode_refuses_bad_tables(table):
    with pytest.raises(ValueError):
        decode_spec(table)


def test_duplicate_ids_refused():
    with pytest.raises(ValueError, match="duplicate"):
        decode_specs([{"id": "a"}, {"id": "a"}])


def test_synthetic_specs_are_seeded_and_round_trip():
    a = [synthetic_spec(i, np.random.default_rng(7)) for i in range(3)]
    b = [synthetic_spec(i, np.random.default_rng(7)) for i in range(3)]
    assert a == b
    rng = np.random.default_rng(1)
    specs = [synthetic_spec(i, rng) for i in range(400)]
    assert specs[0].id == "S0001" and specs[399].id == "S0400"
    for s in specs:
        assert decode_spec(to_table(s)) == s
        assert s.load is not None or s.pv is not None or s.wind is not None
    share = lambda f: sum(map(f, specs)) / len(specs)  # noqa: E731
    assert 0.85 < share(lambda s: s.load is not None) < 0.98
    assert 0.4 < share(lambda s: s.pv is not None) < 0.6
    assert 0.02 < share(lambda s: s.wind is not None) < 0.15
    assert 0.08 < share(lambda s: s.battery is not None) < 0.35
    kinds = {type(s.trader) for s in specs}
    assert len(kinds) == 4
    assert not any(isinstance(s.trader, BatteryTrader) for s in specs if s.battery is None)
