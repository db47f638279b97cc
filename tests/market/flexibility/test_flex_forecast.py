"""The aggregator's strategy settings (docs/flexibility.md, *Allocation strategies*): fair's
modulation cap, and the forecast of who can deliver from the contract's energy source and
the prosumer's delivery history."""

from __future__ import annotations

from typing import Any

import pytest

from market.core.errors import MarketError
from market.core.protocol import decode
from market.flexibility.contracts import Contract
from market.flexibility.forecast import daylight_permille, deliverable, sun_elevation, trust_permille
from market.flexibility.machine import Flexibility
from market.flexibility.messages import (
    AnswerMsg,
    ContractRegisterMsg,
    FlexConfig,
    FlexMeterMsg,
    FundMsg,
    RequestMsg,
    StrategyMsg,
)

T0 = 1_800_000_000  # 2027-01-15 08:00 UTC
SLOT = 900
NOON = T0 + 4 * 3600  # 12:00 UTC: the sun is ~19 degrees up at 50 N, 0 E
NIGHT = T0 + 16 * 3600  # 00:00 UTC


def terms(**kw: Any) -> ContractRegisterMsg:
    base: dict[str, Any] = {
        "aggregator": "AGG",
        "source": "bess",
        "production": 0,
        "consumption": 500,
        "flex_up": 2000,
        "flex_down": 2000,
        "duration": 3600,
        "notice": 600,
        "price_up": 0.30,
        "price_down": 0.10,
        "expires": T0 + 30 * 86400,
    }
    return decode(base | kw, ContractRegisterMsg)


def community(**contracts: dict[str, Any]) -> Flexibility:
    core = Flexibility(FlexConfig(slot=SLOT))
    for pid, kw in contracts.items():
        core.register(pid, terms(**kw), T0)
    core.fund("OPS", FundMsg(aggregator="AGG", amount=10**9, id="budget"), T0)
    core.take_outbox()
    return core


def request(core: Flexibility, power: int, start: int, answers: dict[str, bool]) -> dict[str, Any]:
    msg = RequestMsg(aggregator="AGG", power=power, start=start, end=start + SLOT)
    rid = core.open_request("DSO", msg, start - SLOT).request.id
    for pid, yes in answers.items():
        core.answer(pid, AnswerMsg(rid, yes), start - SLOT)
    reply: dict[str, Any] = core.allocate(rid, start - SLOT)["request"]
    return reply


def powers(req: dict[str, Any]) -> list[tuple[str, int]]:
    return [(a["prosumer"], a["power"]) for a in req["allocations"]]


# -- fair's cap is the aggregator's setting ------------------------------------------------------


def test_fair_modulation_cap_is_a_setting_of_the_aggregator() -> None:
    core = community(A={"flex_up": 2000}, B={"flex_up": 3000}, C={"flex_up": 1000}, D={"flex_up": 5000})
    yes = dict.fromkeys("ABCD", True)
    # The seed's 25 %: room 2750 W of the 11000 W guaranteed; 3000 W asked: 250 short.
    assert request(core, 3000, NOON, yes)["shortfall"] == 250
    assert core.set_strategy("AGG", StrategyMsg("fair", max_modulation_pct=50)) == {
        "strategy": "fair",
        "max_modulation_pct": 50,
    }
    wide = request(core, 3000, NOON + 3600, yes)
    assert wide["shortfall"] == 0 and sum(p for _, p in powers(wide)) == 3000
    # 3000 of 11000: A 545 r 5000, B 818 r 2000, C 272 r 8000, D 1363 r 7000; 2 W left: C, D.
    assert powers(wide) == [("A", 545), ("B", 818), ("C", 273), ("D", 1364)]
    with pytest.raises(MarketError) as err:
        core.set_strategy("AGG", StrategyMsg("reputation", max_modulation_pct=50))
    assert err.value.code == "invalid" and "fair" in err.value.message
    for bad in ({"max_modulation_pct": 0}, {"max_modulation_pct": 101}, {"price_weight": -1}, {"forecast": 1}):
        with pytest.raises(MarketError):
            decode({"strategy": "fair"} | bad, StrategyMsg)


# -- the energy source: no sun, no curtailment and no extra PV ------------------------------------


def test_sun_and_daylight() -> None:
    assert sun_elevation(NIGHT, 50.0, 0.0) < -50
    assert 18 < sun_elevation(NOON, 50.0, 0.0) < 20  # 90 - 50 - 21 (declination mid-January)
    assert daylight_permille(NIGHT, NIGHT + SLOT, 50.0, 0.0, 15.0) == 0
    assert daylight_permille(NOON, NOON + SLOT, 50.0, 0.0, 15.0) == 1000
    dawn = daylight_permille(T0 + 3600, T0 + 3600 + SLOT, 50.0, 0.0, 15.0)  # 09:00-09:15: sun ~8 degrees up
    assert 0 < dawn < 1000
    # the least light of the window counts: a window into the night gives nothing
    assert daylight_permille(T0 + 7 * 3600, T0 + 10 * 3600, 50.0, 0.0, 15.0) == 0


def test_deliverable_flexibility_by_source_direction_and_trust() -> None:
    config = FlexConfig()
    solar = Contract("fc1", "S", "AGG", "solar", 3000, 400, 2400, 2000, 3600, 600, 0.1, 0.1, T0 + 86400, "active", 1, 1)
    battery = Contract("fc2", "B", "AGG", "bess", 0, 500, 2000, 2000, 3600, 600, 0.3, 0.1, T0 + 86400, "active", 1, 2)
    night, noon = (NIGHT, NIGHT + SLOT), (NOON, NOON + SLOT)
    # up: 400 W from load the site can shed at any hour, the other 2000 W only with sunshine
    assert deliverable(solar, "up", *night, 1000, config) == 400
    assert deliverable(solar, "up", *noon, 1000, config) == 2400
    # down: curtailing PV (up to its 3000 W of production) needs sunshine too
    assert deliverable(solar, "down", *night, 1000, config) == 0
    assert deliverable(solar, "down", *noon, 1000, config) == 2000
    # a battery is dispatchable at any hour; trust scales what is expected
    assert deliverable(battery, "down", *night, 1000, config) == 2000
    assert deliverable(battery, "up", *night, 500, config) == 1000
    assert trust_permille(0, 0, prior=2) == 1000
    assert trust_permille(1, 0, prior=2) == 666  # one delivery with nothing: (2 * 1000 + 0) // 3
    assert trust_permille(2, 1000 + 500, prior=2) == 875


def test_forecast_solar_is_not_offered_curtailment_at_night_nor_more_pv() -> None:
    core = community(S={"source": "solar", "production": 3000, "consumption": 400, "flex_up": 2400, "price_up": 0.10})
    core.register("B", terms(), T0)
    core.take_outbox()
    assert core.set_strategy("AGG", StrategyMsg("reputation", forecast=True)) == {
        "strategy": "reputation",
        "forecast": True,
    }
    noon_down = request(core, -1000, NOON, {"S": True, "B": True})
    assert noon_down["offered"] == ["S", "B"]  # with sunshine S can curtail
    night_down = request(core, -1000, NIGHT, {"B": True})
    assert night_down["offered"] == ["B"]  # no sun: S has nothing to curtail
    assert powers(night_down) == [("B", -1000)]
    # Up at night: S (score 102 - 10 = 92 before B's 102 - 30 = 72) can shed its 400 W of
    # load, not raise its PV: 400 W, then B's 2000 W; 600 W short.
    night_up = request(core, 3000, NIGHT + 3600, {"S": True, "B": True})
    assert powers(night_up) == [("S", 400), ("B", 2000)] and night_up["shortfall"] == 600
    # Without the forecast the contract alone decides: S's whole 2400 W at night.
    core.set_strategy("AGG", StrategyMsg("reputation"))
    blind = request(core, 3000, NIGHT + 7200, {"S": True, "B": True})
    assert powers(blind) == [("S", 2400), ("B", 600)]


def test_a_prosumer_that_under_delivered_is_trusted_less() -> None:
    core = community(P1={}, P2={})
    core.set_strategy("AGG", StrategyMsg("fair", forecast=True))
    first = request(core, 1000, T0 + 1800, {"P1": True, "P2": True})
    assert powers(first) == [("P1", 500), ("P2", 500)]  # nothing known yet: both trusted fully
    window = (T0 + 1800, T0 + 2700)
    # baseline -125 Wh (500 W of load); P1 does nothing (delivered 0), P2 its 125 Wh.
    core.meter("P1", FlexMeterMsg("fr1", window, 0, 125), T0 + 2700)
    core.meter("P2", FlexMeterMsg("fr1", window, 0, 0), T0 + 2700)
    assert (core.trust("P1"), core.trust("P2")) == (666, 1000)
    # Estimates 2000 * 666 / 1000 = 1332 W and 2000 W: 600 W apportioned 240 / 360.
    second = request(core, 600, T0 + 3600, {"P1": True, "P2": True})
    assert powers(second) == [("P1", 240), ("P2", 360)]
    resumed = Flexibility(FlexConfig(slot=SLOT))
    resumed.resume([])
    assert resumed.trust("P1") == 1000
