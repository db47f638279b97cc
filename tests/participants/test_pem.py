import calendar
import datetime as dt
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from participants.pem import (
    PemConfig,
    devices,
    initial_state,
    pem_step,
    request_probability,
    request_rate,
    simulate,
    summarize,
    uniforms,
    urgency,
)
from participants.pem_coordinator import coordinate
from participants.thermal import houses
from participants.weather import Conditions, pvlib_tmy3

M_R = 1 / 300
CFG = PemConfig()


# -- the request rule -----------------------------------------------------------------


@pytest.mark.parametrize("z", [21.1, 21.5, 22.0, 22.7, 23.4, 23.95])
@pytest.mark.parametrize("dt", [1.0, 60.0])
def test_cooling_probability_is_the_formula(z, dt):
    z_min, z_max, z_set = 21.0, 24.0, 22.5 + 0.3  # an asymmetric band
    mu = M_R * (z - z_min) / (z_max - z) * (z_max - z_set) / (z_set - z_min)
    assert request_rate(z, z_min, z_max, z_set, M_R) == pytest.approx(mu, rel=1e-12)
    assert request_probability(z, z_min, z_max, z_set, M_R, dt) == pytest.approx(1 - math.exp(-mu * dt), rel=1e-12)


@pytest.mark.parametrize("z", [45.2, 47.0, 49.0, 51.5, 52.9])
def test_heating_probability_is_the_papers_formula(z):
    """Almassalkhi et al. (ACC 2017) write the rule for water heaters (heating)."""
    z_min, z_max, z_set = 45.0, 53.0, 50.0
    mu = M_R * (z_max - z) / (z - z_min) * (z_set - z_min) / (z_max - z_set)
    assert request_rate(z, z_min, z_max, z_set, M_R, cooling=False) == pytest.approx(mu, rel=1e-12)
    p = request_probability(z, z_min, z_max, z_set, M_R, 30.0, cooling=False)
    assert p == pytest.approx(1 - math.exp(-mu * 30.0), rel=1e-12)


@pytest.mark.parametrize("cooling", [True, False])
def test_rate_at_the_setpoint_is_m_r(cooling):
    for z_set in (21.5, 22.5, 23.7):  # also off centre
        assert request_rate(z_set, 21.0, 24.0, z_set, M_R, cooling) == pytest.approx(M_R, rel=1e-12)


def test_rate_at_the_edges_and_beyond():
    z = np.array([20.0, 22.0, 22.5, 24.0, 24.5])
    cool = request_rate(z, 22.0, 24.0, 23.0, M_R, True)
    heat = request_rate(z, 22.0, 24.0, 23.0, M_R, False)
    assert list(cool[[0, 1]]) == [0, 0] and np.isinf(cool[[3, 4]]).all()
    assert list(heat[[3, 4]]) == [0, 0] and np.isinf(heat[[0, 1]]).all()
    p = request_probability(z, 22.0, 24.0, 23.0, M_R, 60.0)
    assert list(p[[0, 1, 3, 4]]) == [0, 0, 1, 1]


def test_rate_grows_towards_the_needy_edge():
    z = np.linspace(22.001, 23.999, 200)
    assert (np.diff(request_rate(z, 22.0, 24.0, 23.0, M_R)) > 0).all()
    assert (np.diff(request_rate(z, 22.0, 24.0, 23.0, M_R, cooling=False)) < 0).all()


def test_setpoint_outside_the_band_is_refused():
    with pytest.raises(ValueError, match="z_min < z_set < z_max"):
        request_rate(23.0, 22.0, 24.0, 24.0, M_R)


# -- the device side ----------------------------------------------------------------


@pytest.fixture
def four():
    return replace(houses(4, 0), setpoint=23.0, band=1.0)


def test_above_the_band_a_cooler_runs_unasked_and_drops_its_packet(four):
    air = np.array([24.3, 23.0, 23.0, 23.0])
    left = np.array([120.0, 0.0, 0.0, 0.0])
    st_ = pem_step(four, air, left, 0.0, seed=1, t=0, dt=60, cfg=CFG)
    assert st_.devices.forced_on[0] and not st_.devices.requesting[0]
    assert st_.on[0] and st_.power_w[0] == four.rated_w[0]
    assert st_.packet_left[0] == 0  # cancelled: it runs as opted out, not on its packet
    # A zero target grants nothing, yet the opted-out unit still runs.
    assert st_.decision.power_w == four.rated_w[0] and not st_.decision.accepted.any()


def test_below_the_band_a_cooler_stays_off_and_drops_its_packet(four):
    air = np.array([21.8, 23.0, 23.0, 23.0])
    left = np.array([180.0, 0.0, 0.0, 0.0])
    st_ = pem_step(four, air, left, math.inf, seed=1, t=0, dt=60, cfg=CFG)
    assert st_.devices.forced_off[0] and not st_.on[0] and st_.packet_left[0] == 0
    assert not st_.devices.requesting[0] and st_.devices.probability[0] == 0


def test_back_inside_the_band_it_asks_again(four):
    u = np.zeros(4)  # the lowest draw: asks whenever P > 0
    dev = devices(four, np.array([23.99, 23.5, 22.001, 22.0]), np.zeros(4), u, CFG, 60.0)
    assert list(dev.requesting) == [True, True, True, False]  # P = 0 exactly at z_min
    assert not dev.opted_out.any()
    high = devices(four, np.array([24.0, 24.0, 24.0, 24.0]), np.zeros(4), np.full(4, 0.999999), CFG, 60.0)
    assert high.requesting.all()  # at z_max P = 1


def test_a_packet_runs_packet_seconds_in_whole_steps(four):
    air = np.full(4, 23.9)  # held inside the band: only the packet timing is under test
    left = np.zeros(4)
    runs = []
    for k in range(8):
        st_ = pem_step(four, air, left, math.inf, seed=3, t=60 * k, dt=60, cfg=CFG)
        left = st_.packet_left
        if k == 0:
            assert st_.decision.accepted.all()
        runs.append(bool(st_.devices.running[0]) or bool(st_.decision.accepted[0]))
        if k == 4:
            assert (left == 0).all()
    assert runs[:5] == [True] * 5  # granted, then 4 more steps: 300 s
    cfg = PemConfig(packet_seconds=150)
    st_ = pem_step(four, air, np.zeros(4), math.inf, seed=3, t=0, dt=60, cfg=cfg)
    assert st_.packet_left[0] == 90  # 150 s in 60 s steps: 3 steps (ceil)


def test_urgency(four):
    assert list(urgency(four, np.array([23.0, 24.0, 22.0, 23.5]))) == [0.0, 1.0, -1.0, 0.5]


def test_draws_depend_only_on_seed_key_and_time():
    keys = np.arange(30)
    full = uniforms(5, 1_700_000_000, keys)
    assert np.array_equal(uniforms(5, 1_700_000_000, keys[[29, 3, 10]]), full[[29, 3, 10]])
    assert not np.array_equal(uniforms(6, 1_700_000_000, keys), full)
    assert not np.array_equal(uniforms(5, 1_700_000_060, keys), full)
    assert ((full >= 0) & (full < 1)).all()


# -- the coordinator --------------------------------------------------------------------

requests = st.integers(0, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.integers(0, 6000), min_size=n, max_size=n),
        st.lists(st.floats(-1, 1, allow_nan=False), min_size=n, max_size=n),
    )
)


@given(requests, st.integers(0, 100_000), st.floats(-1e3, 2e5, allow_nan=False))
def test_coordinator_never_accepts_above_its_target(req, committed, target):
    asking, power, urg = (np.array(v) for v in req)
    asking = asking.astype(bool)
    power = power.astype(np.int64)
    urg = urg.astype(float)
    keys = np.arange(len(asking))[::-1].copy()
    d = coordinate(asking, power, urg, keys, committed, target)
    granted = int(power[d.accepted].sum())
    assert d.granted_w == granted and d.power_w == committed + granted
    assert not (d.accepted & ~asking).any() and np.array_equal(d.denied, asking & ~d.accepted)
    if d.accepted.any():
        assert committed + granted <= target
    if committed <= target:
        assert d.power_w <= target
    # The grants are a prefix of (most urgent first, then by key): nothing granted ranks
    # after something denied, and the first denied one would not have fitted.
    rank = {int(i): r for r, i in enumerate(np.lexsort((keys, -urg)))}
    if d.accepted.any() and d.denied.any():
        assert max(rank[i] for i in np.flatnonzero(d.accepted)) < min(rank[i] for i in np.flatnonzero(d.denied))
    if d.denied.any():
        first = min(np.flatnonzero(d.denied), key=lambda i: rank[int(i)])
        assert committed + granted + power[first] > math.floor(target)


def test_coordinator_order_and_ties():
    asking = np.array([True, True, True, True])
    power = np.array([1000, 1000, 1000, 1000])
    urg = np.array([0.2, 0.9, 0.2, 0.5])
    keys = np.array([7, 3, 5, 1])
    d = coordinate(asking, power, urg, keys, 500, 3600.0)
    # 0.9 (house 1), 0.5 (house 3), then the 0.2 tie goes to key 5 (house 2) before key 7.
    assert list(d.accepted) == [False, True, True, True] and d.power_w == 3500
    none = coordinate(asking, power, urg, keys, 5000, 3600.0)
    assert not none.accepted.any() and none.denied.all() and none.power_w == 5000
    assert coordinate(asking, power, urg, keys, 0, math.inf).accepted.all()


# -- simulation -------------------------------------------------------------------------


class Flat:
    """Constant weather."""

    def at(self, t):
        shape = np.shape(t)
        return Conditions(np.full(shape, 32.0), np.full(shape, 600.0), np.full(shape, 3.0))


T0 = 1_688_961_600  # 2023-07-10 04:00 UTC


def test_same_seed_same_trajectory_other_seed_other_one():
    h = houses(12, 2)
    a = simulate(h, Flat(), T0, T0 + 7200, 60, "pem", target_w=30000.0, seed=4)
    b = simulate(h, Flat(), T0, T0 + 7200, 60, "pem", target_w=30000.0, seed=4)
    c = simulate(h, Flat(), T0, T0 + 7200, 60, "pem", target_w=30000.0, seed=5)
    assert np.array_equal(a.air, b.air) and np.array_equal(a.hvac_w, b.hvac_w)
    assert np.array_equal(a.requested, b.requested) and np.array_equal(a.accepted, b.accepted)
    assert not np.array_equal(a.hvac_w, c.hvac_w)


def test_a_house_does_not_depend_on_its_batch_nor_on_the_chunks():
    h = houses(12, 2)
    whole = simulate(h, Flat(), T0, T0 + 7200, 60, "pem", seed=4)  # no target: houses independent
    subset = [9, 2, 5]
    part = simulate(
        h.take(subset), Flat(), T0, T0 + 7200, 60, "pem", seed=4, initial=_take(initial_state(h, 4), subset)
    )
    assert np.array_equal(part.air, whole.air[subset]) and np.array_equal(part.hvac_w, whole.hvac_w[subset])
    first = simulate(h, Flat(), T0, T0 + 3600, 60, "pem", seed=4)
    second = simulate(h, Flat(), T0 + 3600, T0 + 7200, 60, "pem", seed=4, initial=first.final)
    assert np.array_equal(np.hstack([first.air, second.air]), whole.air)
    assert np.array_equal(np.hstack([first.hvac_w, second.hvac_w]), whole.hvac_w)


def _take(s, idx):
    return type(s)(s.air[idx], s.mass[idx], s.on[idx], s.packet_left[idx])


def test_initial_state_is_keyed_per_house():
    h = houses(12, 2)
    assert np.array_equal(initial_state(h.take([3, 7]), 9).air, initial_state(h, 9).air[[3, 7]])


def test_simulate_refuses_ragged_spans():
    with pytest.raises(ValueError, match="multiple of dt"):
        simulate(houses(2, 0), Flat(), T0, T0 + 90, 60)


def test_targets_may_vary_per_step():
    h = houses(10, 1)
    tr = simulate(h, Flat(), T0, T0 + 3600, 60, "pem", target_w=lambda t: np.where(t < T0 + 1800, 30000.0, 20000.0))
    assert tr.target_w[0] == 30000.0 and tr.target_w[-1] == 20000.0
    assert (tr.load_w <= tr.target_w).all() and tr.load_w[30:].max() > 15000


CAPACITY_W = 65_000.0  # about 0.8 of the thermostats' peak, just above their peak-hour mean


def test_hot_day_pem_holds_the_feeder_capacity_with_small_comfort_cost():
    """30 houses on the hottest July day of Greensboro's TMY3 (July 10, 35.6 C): the plain
    thermostats exceed the capacity; PEM with it as target never does."""
    weather = pvlib_tmy3(2023)
    start = calendar.timegm(dt.date(2023, 7, 10).timetuple()) - round(weather.tz_hours * 3600)
    h = houses(30, 0)
    plain = summarize(simulate(h, weather, start, start + 86400, 60, "thermostat", seed=1), h, CAPACITY_W)
    pem_tr = simulate(h, weather, start, start + 86400, 60, "pem", target_w=CAPACITY_W, seed=1)
    pem = summarize(pem_tr, h, CAPACITY_W)
    print(f"\nthermostat {plain}\npem        {pem}")
    assert plain.peak_w > CAPACITY_W and plain.steps_over > 60
    assert pem.peak_w <= CAPACITY_W and pem.steps_over == 0
    assert (pem_tr.load_w <= pem_tr.target_w).all()
    # Comfort: nobody gets warm (the coordinator serves the most urgent first), and the
    # overcooling of whole packets stays below 0.01 K on average over the day.
    assert pem.above_kh < 0.1
    assert pem.degree_hours / (30 * 24) < 0.01 and pem.max_excursion < 0.6
    assert abs(pem.hvac_kwh / plain.hvac_kwh - 1) < 0.15
