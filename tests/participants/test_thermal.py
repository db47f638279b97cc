import math
from dataclasses import replace

import numpy as np
import pytest

from participants.thermal import (
    Houses,
    Propagator,
    ThermalState,
    gains,
    houses,
    hvac_heat,
    steady_state,
    step,
    thermostat,
)

OFF = np.zeros(3)


@pytest.fixture
def three():
    return houses(3, 7)


def test_houses_are_reproducible_and_keyed_by_index():
    a, b = houses(10, 3), houses(30, 3)
    for name in ("ua", "ca", "cm", "hm", "solar_m2", "cop", "rated_w", "setpoint"):
        assert np.array_equal(getattr(a, name), getattr(b, name)[:10])
    assert not np.array_equal(houses(10, 4).ua, a.ua)
    assert np.array_equal(b.keys, np.arange(30))


def test_default_houses_are_sensible():
    h = houses(200, 0)
    floor = h.ca / (3 * 1.2 * 1006 * 2.44)
    assert floor.min() >= 150 and floor.max() <= 200
    assert h.rated_w.dtype == np.int64 and h.rated_w.min() >= 3000 and h.rated_w.max() <= 4500
    assert h.cop.min() >= 2.8 and h.cop.max() <= 3.4
    assert np.all(np.abs(h.setpoint - 23) <= 0.5) and np.all(h.band == 1.0) and h.cooling.all()
    # Envelope time constants of hours, air-mass exchange of minutes.
    tau_h = (h.ca + h.cm) / h.ua / 3600
    assert tau_h.min() > 5 and tau_h.max() < 20
    assert (h.ca / h.hm / 60).max() < 20


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ua": 0.0}, "ua must be > 0"),
        ({"hm": -1.0}, "hm must be > 0"),
        ({"solar_m2": np.array([1.0, 2.0])}, "solar_m2 has shape (2,)"),
        ({"rated_w": 3000.5}, "whole watts"),
        ({"mass_solar": 1.5}, "mass_solar must be in [0, 1]"),
        ({"cop": math.nan}, "cop must be finite"),
        ({"keys": np.array([0, 0, 1])}, "distinct"),
    ],
)
def test_bad_parameters_are_refused(three, change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        replace(three, **change)


def test_take_keeps_keys(three):
    sub = three.take([2, 0])
    assert list(sub.keys) == [2, 0] and sub.ua[0] == three.ua[2]


def test_tiny_mass_is_the_one_node_exponential(three):
    """Cm -> 0: the mass follows the air, and the air is one RC node with Ca, time constant
    Ca/UA, heated by all the gains."""
    h = replace(three, cm=1e-6)
    power = h.rated_w * np.array([1, 0, 1])
    s0 = ThermalState(np.full(3, 23.0), np.full(3, 23.0))
    for t in (30.0, 600.0, 3600.0):
        qa, qm = gains(h, 700.0, power)
        final = 34.0 + (qa + qm) / h.ua
        expected = final + (23.0 - final) * np.exp(-h.ua * t / h.ca)
        assert np.allclose(step(h, s0, t, 34.0, 700.0, power).air, expected, rtol=0, atol=1e-9)


def test_stiff_coupling_is_one_node_with_both_capacities(three):
    """Hm -> infinity: air and mass move together as one node of Ca + Cm, starting from
    their capacity-weighted mean."""
    h = replace(three, hm=1e13)
    s0 = ThermalState(np.full(3, 25.0), np.full(3, 22.0))
    start = (h.ca * 25.0 + h.cm * 22.0) / (h.ca + h.cm)
    qa, qm = gains(h, 300.0, OFF)
    final = 30.0 + (qa + qm) / h.ua
    for t in (600.0, 7200.0):
        expected = final + (start - final) * np.exp(-h.ua * t / (h.ca + h.cm))
        out = step(h, s0, t, 30.0, 300.0, OFF)
        assert np.allclose(out.air, expected, rtol=0, atol=1e-6)
        assert np.allclose(out.mass, expected, rtol=0, atol=1e-6)


def euler(h: Houses, i: int, air: float, mass: float, t: float, h_step: float, outdoor, ghi, power) -> tuple:
    """Plain explicit Euler on the ETP equations of house `i`, scalars only."""
    qa, qm = gains(h, ghi, power)
    ua, ca, cm, hm, qa_i, qm_i = (float(x[i]) for x in (h.ua, h.ca, h.cm, h.hm, qa, qm))
    for _ in range(round(t / h_step)):
        da = (ua * (outdoor - air) + hm * (mass - air) + qa_i) / ca
        dm = (hm * (air - mass) + qm_i) / cm
        air += h_step * da
        mass += h_step * dm
    return air, mass


def test_two_nodes_match_a_fine_euler_integration(three):
    power = three.rated_w * np.array([1, 0, 0])
    s0 = ThermalState(np.array([24.0, 22.5, 23.0]), np.array([23.0, 24.0, 26.0]))
    exact = step(three, s0, 600.0, 33.0, 850.0, power)
    for i in range(3):
        air, mass = euler(three, i, s0.air[i], s0.mass[i], 600.0, 0.005, 33.0, 850.0, power)
        assert exact.air[i] == pytest.approx(air, rel=1e-6)
        assert exact.mass[i] == pytest.approx(mass, rel=1e-6)
        # ... and that is a real change of state, not only the start value.
        assert abs(air - s0.air[i]) > 0.3


def test_steps_compose_exactly(three):
    power = three.rated_w * np.array([1, 1, 0])
    s0 = ThermalState(np.array([24.0, 22.5, 23.0]), np.array([23.0, 24.0, 26.0]))
    once = step(three, s0, 600.0, 33.0, 850.0, power)
    many = s0
    small = Propagator(three, 1.0)
    for _ in range(600):
        many = small.advance(three, many, 33.0, 850.0, power)
    assert np.allclose(once.air, many.air, rtol=0, atol=1e-10)
    assert np.allclose(once.mass, many.mass, rtol=0, atol=1e-10)


def test_energy_balance(three):
    """Heat stored in air and mass = heat in through the envelope + all gains (HVAC's
    negative), integrated over an hour along the exact trajectory (Simpson, 1 s)."""
    power = three.rated_w * np.array([1, 0, 1])
    s = ThermalState(np.array([24.0, 22.5, 23.0]), np.array([23.0, 24.0, 26.0]))
    prop = Propagator(three, 1.0)
    airs = [s.air]
    for _ in range(3600):
        s = prop.advance(three, s, 31.0, 600.0, power)
        airs.append(s.air)
    air = np.array(airs)
    w = np.ones(3601)
    w[1:-1:2], w[2:-1:2] = 4, 2
    air_integral = (w[:, None] * air).sum(axis=0) / 3  # K.s
    qa, qm = gains(three, 600.0, power)
    heat_in = three.ua * (31.0 * 3600 - air_integral) + (qa + qm) * 3600
    stored = three.ca * (s.air - 24.0 * np.array([1, 0, 0]) - np.array([0, 22.5, 23.0])) + three.cm * (
        s.mass - np.array([23.0, 24.0, 26.0])
    )
    assert np.allclose(stored, heat_in, rtol=1e-6)
    assert (stored[[0, 2]] < 0).all() and stored[1] > 0  # the cooled houses lost heat


def test_steady_state_is_a_fixed_point(three):
    power = three.rated_w * np.array([0, 1, 0])
    star = steady_state(three, 29.0, 400.0, power)
    after = step(three, star, 3600.0, 29.0, 400.0, power)
    assert np.allclose(after.air, star.air, atol=1e-9) and np.allclose(after.mass, star.mass, atol=1e-9)
    assert star.air[1] < star.air[0]  # the running unit holds its house cooler


def test_hvac_heat_sign(three):
    h = replace(three, cooling=np.array([True, False, True]))
    q = hvac_heat(h, np.full(3, 1000.0))
    assert q[0] == -h.cop[0] * 1000 and q[1] == h.cop[1] * 1000


def test_thermostat_hysteresis(three):
    h = replace(three, setpoint=23.0, band=1.0, cooling=np.array([True, True, False]))
    # Cooling: on above 24, off below 22, keeps its state in between; heating mirrored.
    assert list(thermostat(h, np.array([24.1, 23.0, 21.9]), np.array([False, False, False]))) == [True, False, True]
    assert list(thermostat(h, np.array([23.5, 21.9, 23.0]), np.array([True, True, True]))) == [True, False, True]
    assert list(thermostat(h, np.array([22.0, 24.0, 24.1]), np.array([True, False, True]))) == [True, False, False]
