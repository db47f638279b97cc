"""The PEM coordinator as a market participant (participants/pem_site.py): its target rule,
its meter reading against its houses' rows, its bids, its clock, and the spec's checks."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from market.core.records import HouseSlotRecord, PemSlotRecord
from participants.pem_site import PemSite, bid_price, house_wh, slot_target
from participants.profiles import build_profiles
from participants.sites import site_for
from participants.spec import ParticipantSpec, PemSpec, PvSpec, SyntheticLoad, decode_spec

START = 1_689_051_600  # 2023-07-10 05:00 UTC: midnight in Greensboro (standard time)
SLOT = 900


def site(houses: int = 6, mode: str = "pem", capacity_kw: float | None = 12.0, **kw: Any) -> PemSite:
    spec = ParticipantSpec(id="PEM1", pem=PemSpec(houses=houses, mode=mode, capacity_kw=capacity_kw))  # type: ignore[arg-type]
    p = site_for(spec, 3, timezone="America/New_York", **kw)
    assert isinstance(p, PemSite)
    return p


def round_msg(t: int, *, close_steps: int = 2) -> dict[str, Any]:
    slots = [[t + k * SLOT, t + (k + 1) * SLOT] for k in range(4)]
    return {
        "time": t,
        "duration": SLOT,
        "mode": "sim",
        "timezone": "America/New_York",
        "current_round": slots[0],
        "last_round": [t - SLOT, t],
        "last_settle": slots[close_steps - 1],
        "next_settle": slots[close_steps - 1],
        "market_info": [
            {"time_delivery": s, "grid": {"buy_price": 0.24, "sell_price": 0.08}, "grid_state": "GREEN"} for s in slots
        ],
    }


def test_target_is_the_capacity_left_after_the_others_import() -> None:
    # 4 kWh imported over 15 min is 16 kW on average: 50 kW leave 34 kW.
    assert slot_target(50.0, 4000, SLOT) == pytest.approx(34_000)
    assert slot_target(50.0, -2000, SLOT) == pytest.approx(58_000)  # an export leaves more room
    assert slot_target(10.0, 4000, SLOT) == 0.0  # never below zero
    assert math.isinf(slot_target(None, 4000, SLOT))


def test_target_counts_the_other_participants_forecast() -> None:
    other = ParticipantSpec(id="H01", load=SyntheticLoad(annual_kwh=4000), pv=PvSpec(kw=5.0, weather="greensboro"))
    p = site(others=[other])
    noon = (START + 12 * 3600, START + 12 * 3600 + SLOT)
    gen, load = build_profiles(other, 3, "America/New_York").slot(noon)
    assert gen["solar"] > 0  # the weather file's sun at noon
    assert p.target(noon) == pytest.approx(slot_target(12.0, load - gen["solar"], SLOT))


def test_meter_reading_is_the_sum_of_the_house_rows() -> None:
    p = site()
    meter, _ = p.on_round(round_msg(START))
    assert meter is not None
    rows = p.take_records()
    houses = [r for r in rows if isinstance(r, HouseSlotRecord)]
    (summary,) = [r for r in rows if isinstance(r, PemSlotRecord)]
    assert len(houses) == 6 and {h.house for h in houses} == set(range(6))
    assert meter["consumption"]["other"]["external"] == sum(h.hvac_wh for h in houses) == summary.load_wh
    assert summary.requested >= summary.accepted == sum(h.accepted for h in houses)
    assert summary.requested == sum(h.requested for h in houses)
    assert summary.target_w == math.floor(p.target((START, START + SLOT)))
    assert p.take_records() == []  # taken once


def test_house_wh_rounds_joules_half_up() -> None:
    class T:
        dt = 60
        hvac_w = np.array([[30, 30], [0, 0], [3600, 0]], dtype=np.int64)  # 3600 J, 0 J, 216000 J

    assert house_wh(T()).tolist() == [1, 0, 60]  # type: ignore[arg-type]


def test_houses_never_run_above_the_target() -> None:
    p = site(houses=20, capacity_kw=40.0)
    for k in range(8):
        p.on_round(round_msg(START + 14 * 3600 + k * SLOT))  # the hot afternoon
    pem = [r for r in p.take_records() if isinstance(r, PemSlotRecord)]
    assert len(pem) == 8
    for r in pem:
        assert r.target_w is not None
        # What runs anyway (opted out) could exceed it alone; here no device is that far out.
        assert r.steps_over == 0 and r.peak_w <= r.target_w
    assert sum(r.denied for r in pem) > 0  # the target did bind


def test_bids_its_lookahead_at_an_urgency_price() -> None:
    p = site()
    _, orders = p.on_round(round_msg(START))
    (order,) = orders
    slot = (START + SLOT, START + 2 * SLOT)
    assert order["side"] == "bid" and order["time_delivery"] == list(slot)
    assert order["quantity"] == p.forecast(slot)[1] > 0
    assert 0.08 < order["price"] < 0.24
    # The look-ahead changed nothing: metering that slot next round gives what was forecast.
    meter, _ = p.on_round(round_msg(START + SLOT))
    assert meter is not None and meter["consumption"]["other"]["external"] == order["quantity"]


def test_bid_price_follows_urgency() -> None:
    assert bid_price(0.0, 0.24, 0.08) == pytest.approx(0.0801)
    assert bid_price(0.5, 0.24, 0.08) == pytest.approx(0.16)
    assert bid_price(7.0, 0.24, 0.08) == pytest.approx(0.2399)
    assert bid_price(0.5, None, 0.08) is None


def test_slots_are_simulated_once_and_in_order() -> None:
    a, b = site(), site()
    a.on_round(round_msg(START))
    a.on_round(round_msg(START + 3 * SLOT))  # a step that jumped ahead: the gap is simulated
    b.on_round(round_msg(START))
    for k in (1, 2, 3):
        b.on_round(round_msg(START + k * SLOT))
    assert a.state.air.tolist() == b.state.air.tolist()
    with pytest.raises(ValueError, match="before the houses' clock"):
        a.energy((START + SLOT, START + 2 * SLOT))


def test_same_seed_same_rows() -> None:
    def rows() -> list[Any]:
        p = site()
        for k in range(3):
            p.on_round(round_msg(START + k * SLOT))
        return p.take_records()

    assert rows() == rows()


def test_thermostat_mode_makes_no_packets() -> None:
    p = site(mode="thermostat")
    p.on_round(round_msg(START + 15 * 3600))
    (summary,) = [r for r in p.take_records() if isinstance(r, PemSlotRecord)]
    assert summary.mode == "thermostat" and summary.requested == summary.accepted == 0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"id": "P", "pem": {"houses": 3}, "load": {"kind": "synthetic"}}, "no load, pv"),
        ({"id": "P", "pem": {"houses": 3}, "trader": {"kind": "fixed_price"}}, "no load, pv"),
        ({"id": "P", "pem": {"houses": 0}}, "houses"),
        ({"id": "P", "pem": {"houses": 3, "mode": "smart"}}, "mode"),
        ({"id": "P", "pem": {"houses": 3, "colour": "red"}}, "colour"),
    ],
)
def test_bad_pem_tables_are_refused(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_spec(table)


def test_dt_must_divide_the_slot() -> None:
    spec = ParticipantSpec(id="PEM1", pem=PemSpec(houses=2, dt=420))
    p = site_for(spec, 0)
    with pytest.raises(ValueError, match="does not divide"):
        p.on_round(round_msg(START))


def test_untaken_rows_are_bounded() -> None:
    from participants.pem_site import PENDING_SLOTS

    p = site(houses=1)
    for k in range(PENDING_SLOTS + 3):
        p.on_round(round_msg(START + k * SLOT))
    assert len(p.records) == PENDING_SLOTS * 2 and p.dropped == 3
    assert p.records[0].time_delivery_start == START + 3 * SLOT  # type: ignore[attr-defined]
