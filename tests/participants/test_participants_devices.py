import pytest
from hypothesis import given
from hypothesis import strategies as st

from market.core.protocol import MeterMsg, decode
from participants.devices import Battery, Commitment, Plan, meter_reading, split_own_use
from participants.spec import BatterySpec

SLOT = (1_700_000_100, 1_700_001_000)  # 900 s
energy = st.integers(min_value=0, max_value=20_000)
sources = st.dictionaries(st.sampled_from(["solar", "wind", "hydro"]), energy, max_size=3)
batteries = st.one_of(
    st.none(),
    st.builds(
        lambda cap, p, eff, frac: Battery(cap, p, eff, int(cap * frac)),
        st.integers(1, 50_000),
        st.integers(1, 20_000),
        st.floats(0.05, 1.0),
        st.floats(0.0, 1.0),
    ),
)
plans = st.builds(
    Plan,
    charge=st.booleans(),
    discharge=st.booleans(),
    sold=st.dictionaries(st.sampled_from(["solar", "wind", "hydro"]), energy, max_size=3),
    bought=energy,
    bess_export=energy,
)


def test_battery_from_spec():
    b = Battery.from_spec(BatterySpec(capacity_wh=10_000, power_w=5_000, efficiency=0.9, soc=0.5))
    assert b == Battery(10_000, 5_000, 0.9, 5_000)
    assert b.limit(900) == 1250 and b.limit(3600) == 5000


@given(st.integers(1, 10**7), st.floats(0.01, 1.0), st.floats(0.0, 1.0))
def test_max_input_is_the_largest_that_fits(cap, eff, frac):
    b = Battery(cap, 1000, eff, int(cap * frac))
    x = b.max_input()
    room = cap - b.soc_wh
    assert b.stored(x) <= room
    assert b.stored(x + 1) > room


def test_efficiency_applied_on_charge():
    b = Battery(10_000, 10_000, 0.9, 0)
    meter, after = meter_reading(0, {"solar": 1000}, b, Plan(), SLOT)
    assert meter["consumption"]["bess"] == {"solar": 1000}
    assert after is not None and after.soc_wh == 900
    # Discharge is lossless: the stored energy covers that much load.
    meter, after2 = meter_reading(900, {}, after, Plan(), SLOT)
    assert meter["consumption"]["other"] == {"bess": 900, "external": 0}
    assert after2 is not None and after2.soc_wh == 0


def test_power_limit_and_capacity():
    b = Battery(1000, 2000, 1.0, 900)  # 500 Wh per 900 s slot, 100 Wh room
    meter, after = meter_reading(0, {"solar": 800}, b, Plan(), SLOT)
    assert meter["consumption"]["bess"] == {"solar": 100}
    assert meter["generation"] == {"solar": 700}
    assert after is not None and after.soc_wh == 1000
    meter, after = meter_reading(5000, {}, after, Plan(), SLOT)
    assert meter["consumption"]["other"] == {"bess": 500, "external": 4500}
    assert after is not None and after.soc_wh == 500


def test_commitments_steer_the_battery():
    b = Battery(10_000, 10_000, 1.0, 5_000)
    # Sold solar is exported, not stored; the rest charges.
    plan = Commitment(sold={"solar": 300, "bess": 400}).plan()
    assert plan == Plan(sold={"solar": 300}, bess_export=400)
    meter, after = meter_reading(100, {"solar": 1000}, b, plan, SLOT)
    assert meter["generation"] == {"solar": 300, "bess": 400}
    assert meter["consumption"] == {"bess": {"solar": 600}, "other": {"solar": 100, "external": 0}}
    assert after is not None and after.soc_wh == 5_000 - 400 + 600
    # Bought energy is left to be imported, the battery covers only the rest.
    meter, _ = meter_reading(1000, {}, b, Commitment(bought=700).plan(), SLOT)
    assert meter["consumption"]["other"] == {"bess": 300, "external": 700}


def test_the_battery_covers_committed_sales_the_site_did_not_produce():
    # 800 Wh of solar sold, 500 produced with a load of 100: 400 exported, 400 short. The
    # battery discharges the shortfall before the reading and exports it as `bess` (the
    # market books it as bess_compensation).
    b = Battery(10_000, 10_000, 1.0, 5_000)
    meter, after = meter_reading(100, {"solar": 500}, b, Commitment(sold={"solar": 800}).plan(), SLOT)
    assert meter["generation"] == {"solar": 400, "bess": 400}
    assert meter["consumption"] == {"bess": {}, "other": {"solar": 100, "external": 0}}
    assert after is not None and after.soc_wh == 4_600
    # After the committed `bess` sales, within the power limit (500 Wh per 900 s slot) ...
    b = Battery(10_000, 2_000, 1.0, 5_000)
    plan = Commitment(sold={"solar": 800, "bess": 300}).plan()
    meter, after = meter_reading(0, {"solar": 500}, b, plan, SLOT)
    assert meter["generation"] == {"solar": 500, "bess": 500}  # 300 sold as bess + 200 of the 300 short
    assert after is not None and after.soc_wh == 4_500
    # ... and the state of charge; before the battery covers the site's own load.
    b = Battery(10_000, 10_000, 1.0, 600)
    meter, after = meter_reading(2_000, {"solar": 1_000}, b, Commitment(sold={"solar": 500}).plan(), SLOT)
    assert meter["generation"] == {"bess": 500}
    assert meter["consumption"]["other"] == {"solar": 1_000, "bess": 100, "external": 900}
    assert after is not None and after.soc_wh == 0
    # Wind counts like solar; a source sold within what was produced needs nothing.
    b = Battery(10_000, 10_000, 1.0, 5_000)
    meter, _ = meter_reading(
        0, {"solar": 500, "wind": 100}, b, Commitment(sold={"solar": 500, "wind": 300}).plan(), SLOT
    )
    assert meter["generation"] == {"solar": 500, "wind": 100, "bess": 200}


def test_no_battery_means_plain_net_metering():
    meter, after = meter_reading(500, {"solar": 200, "wind": 600}, None, Plan(bess_export=100), SLOT)
    assert after is None
    assert meter == {
        "time_interval": list(SLOT),
        "generation": {"wind": 300},
        "consumption": {"bess": {}, "other": {"solar": 200, "wind": 300, "external": 0}},
    }


def test_bad_inputs():
    with pytest.raises(ValueError):
        meter_reading(-1, {}, None, Plan(), SLOT)
    with pytest.raises(ValueError):
        meter_reading(1, {"bess": 3}, None, Plan(), SLOT)


def test_split_own_use_in_source_order():
    assert split_own_use(700, {"wind": 500, "solar": 400}) == (
        {"solar": 400, "wind": 300},
        {"solar": 0, "wind": 200},
        0,
    )
    assert split_own_use(1000, {"solar": 400}) == ({"solar": 400}, {"solar": 0}, 600)


@given(energy, sources, batteries, plans, st.sampled_from([60, 900, 3600]))
def test_meter_accounts_for_every_wh(load, gen, battery, plan, duration):
    slot = (SLOT[0] - SLOT[0] % duration, SLOT[0] - SLOT[0] % duration + duration)
    meter, after = meter_reading(load, gen, battery, plan, slot)
    decode(meter, MeterMsg)  # a valid wire payload
    other = meter["consumption"]["other"]
    charge = meter["consumption"]["bess"]
    export = meter["generation"]
    assert sum(other.values()) == load
    assert "external" in other
    for src, g in gen.items():
        assert other.get(src, 0) + charge.get(src, 0) + export.get(src, 0) == g
    assert all(v > 0 for v in export.values()) and all(v > 0 for v in charge.values())
    assert all(v > 0 for k, v in other.items() if k != "external")
    if battery is None:
        assert after is None and "bess" not in export and not charge and "bess" not in other
        return
    assert after is not None
    assert 0 <= after.soc_wh <= after.capacity_wh
    out = export.get("bess", 0) + other.get("bess", 0)
    drawn = sum(charge.values())
    assert out + drawn <= battery.limit(duration)
    assert after.soc_wh == battery.soc_wh - out + battery.stored(drawn)
    # The battery exports its committed `bess` sales and the shortfall of committed sales
    # of other sources (net of own use), as far as its charge and power allow.
    shortfall = sum(max(0, q - (gen.get(s, 0) - other.get(s, 0))) for s, q in plan.sold.items())
    room = min(battery.soc_wh, battery.limit(duration))
    assert export.get("bess", 0) == min(plan.bess_export + shortfall, room)
    if not plan.charge:
        assert drawn == 0
    if not plan.discharge:
        assert other.get("bess", 0) == 0
    # Committed sales per source are exported before anything is stored.
    for src, sold in plan.sold.items():
        if src in gen and charge.get(src):
            assert export.get(src, 0) >= min(sold, gen[src] - other.get(src, 0))
