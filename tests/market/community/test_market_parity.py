"""Parity core (seed 000, PROTOCOL.md /grid): pricing with worked numbers, tokens, SLAs.

Defaults are the seed's: GREEN pbBAU 20, psBAU 6.5, pbP2P 14, psP2P 8 (cents per kWh),
beta 0; YELLOW 24, 6.3, 14, 8, beta 0.025 (currency per kWh of a member's net flow, times
the community's flow share (Ec - Ep)/(Ec + Ep)). Every expected amount is computed by hand in
the comment above it.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from market.community.messages import (
    SEED_DEFAULTS,
    GridStateSetMsg,
    KpiMeasureMsg,
    LemDefaultsSetMsg,
    LemMeasureMsg,
    LemParams,
    LemSetMsg,
    ParityConfig,
    SlaSetMsg,
)
from market.community.parity import Parity
from market.community.solver import auction_money, lem_prices, measurements_from_meters, solve_lem
from market.community.state import Change, Measurement
from market.core.errors import MarketError
from market.core.protocol import decode
from market.core.records import (
    GridStateRecord,
    KpiValueRecord,
    LemRecord,
    LemResultRecord,
    MeterRecord,
    Record,
    SlaResultRecord,
    TokenTransfer,
    Transaction,
)

T = 1_699_999_200  # 12:00 UTC (an hour boundary)
Q = 900  # one LEM slot
GREEN = SEED_DEFAULTS["GREEN"]
YELLOW = SEED_DEFAULTS["YELLOW"]
ROLES = {"AGG": "aggregator", "ORA": "oracle", "DSO": "dso", "OP": "operator"}


def role_of(pid: str) -> str | None:
    return ROLES.get(pid, "prosumer" if pid.startswith("P") else None)


def amounts(params: LemParams, **energies: tuple[int, int]) -> tuple[float, float, dict[str, int]]:
    """(p_buy, p_sell, amounts) for players given as name=(consumption Wh, production Wh)."""
    sol = solve_lem(params, list(energies), {p: Measurement(c, e) for p, (c, e) in energies.items()})
    return sol.p_buy, sol.p_sell, sol.amounts


# -- pricing formulas, worked by hand --------------------------------------------------------


def test_more_consumption_than_production() -> None:
    # Ec = 4, Ep = 2, matched 2: p_buy = (4*20 - 2*(20-14))/4 = 17 c; p_sell = (2*6.5 + 2*(8-6.5))/2 = 8 c.
    # A: -3*0.17 = -0.51; B: 2*0.08 - 1*0.17 = -0.01.
    p_buy, p_sell, got = amounts(GREEN, A=(3000, 0), B=(1000, 2000))
    assert (p_buy, p_sell) == pytest.approx((0.17, 0.08))
    assert got == {"A": -510_000, "B": -10_000}


def test_more_production_than_consumption() -> None:
    # Ec = 1, Ep = 4, matched 1: p_buy = (20 - 6)/1 = 14 c; p_sell = (4*6.5 + 1*1.5)/4 = 6.875 c.
    # A: -1*0.14; B: 4*0.06875 = 0.275.
    p_buy, p_sell, got = amounts(GREEN, A=(1000, 0), B=(0, 4000))
    assert (p_buy, p_sell) == pytest.approx((0.14, 0.06875))
    assert got == {"A": -140_000, "B": 275_000}


def test_balanced_community_trades_all_at_p2p_prices() -> None:
    # Ec = Ep = 2: p_buy = (40 - 12)/2 = 14 c = pbP2P; p_sell = (13 + 3)/2 = 8 c = psP2P.
    p_buy, p_sell, got = amounts(GREEN, A=(2000, 0), B=(0, 2000))
    assert (p_buy, p_sell) == pytest.approx((0.14, 0.08))
    assert got == {"A": -280_000, "B": 160_000}


def test_no_consumption_buys_at_bau_and_sells_at_bau() -> None:
    # Ec = 0: p_buy = pbBAU = 20 c (nobody pays it); Ep = 2, matched 0: p_sell = psBAU = 6.5 c. B: 2*0.065.
    p_buy, p_sell, got = amounts(GREEN, A=(0, 0), B=(0, 2000))
    assert (p_buy, p_sell) == pytest.approx((0.20, 0.065))
    assert got == {"A": 0, "B": 130_000}


def test_no_production_pays_bau() -> None:
    # Ep = 0: p_sell = psBAU; Ec = 2, matched 0: p_buy = pbBAU = 20 c. A: -2*0.20.
    p_buy, p_sell, got = amounts(GREEN, A=(2000, 0))
    assert (p_buy, p_sell) == pytest.approx((0.20, 0.065))
    assert got == {"A": -400_000}


def test_nothing_at_all() -> None:
    assert amounts(GREEN, A=(0, 0), B=(0, 0)) == (0.20, 0.065, {"A": 0, "B": 0})
    assert lem_prices(GREEN, 0.0, 0.0) == (0.20, 0.065)


def test_sell_price_gives_the_matched_share_psp2p() -> None:
    """The seeds/README.md correction: the matched share earns psP2P, never less than psBAU."""
    p_buy, p_sell = lem_prices(GREEN, 1.0, 4.0)
    # 1 of 4 kWh matched at 8 c, 3 at 6.5 c: (8 + 19.5)/4 = 6.875 c (the faulty formula gave 6.125).
    assert p_sell == pytest.approx((1 * 0.08 + 3 * 0.065) / 4)
    assert GREEN.ps_bau / 100 <= p_sell <= GREEN.ps_p2p / 100
    assert GREEN.pb_p2p / 100 <= p_buy <= GREEN.pb_bau / 100


def test_beta_following_the_community_costs_countering_earns() -> None:
    # YELLOW, Ec = 3, Ep = 1, matched 1: p_buy = (72 - 10)/3 = 20.667 c; p_sell = (6.3 + 1.7)/1 = 8 c.
    # Community flow (Ec - Ep)/(Ec + Ep) = 2/4 = +0.5 (it consumes).
    # A consumes (follows, ef = +3): -3*0.20667 - 0.025*3*0.5 = -0.62 - 0.0375 = -0.6575.
    # B produces (counters, ef = -1): 1*0.08 - 0.025*(-1)*0.5 = 0.08 + 0.0125 = 0.0925.
    p_buy, p_sell, got = amounts(YELLOW, A=(3000, 0), B=(0, 1000))
    assert (p_buy, p_sell) == pytest.approx((0.62 / 3, 0.08))
    assert got == {"A": -657_500, "B": 92_500}
    no_beta = LemParams(24.0, 6.3, 14.0, 8.0, 0.0)
    assert amounts(no_beta, A=(3000, 0), B=(0, 1000))[2] == {"A": -620_000, "B": 80_000}


def test_beta_when_the_community_exports() -> None:
    # YELLOW, Ec = 1, Ep = 3, flow -2/4 = -0.5 (it exports): p_buy = (24 - 10)/1 = 14 c;
    # p_sell = (3*6.3 + 1*1.7)/3 = 6.8667 c.
    # A exports (follows, ef = -3): 3*0.068667 - 0.025*(-3)*(-0.5) = 0.206 - 0.0375 = 0.1685.
    # B consumes (counters, ef = +1): -0.14 - 0.025*1*(-0.5) = -0.14 + 0.0125 = -0.1275.
    _, _, got = amounts(YELLOW, A=(0, 3000), B=(1000, 0))
    assert got == {"A": 168_500, "B": -127_500}


# -- the core: LEMs, solving, tokens ---------------------------------------------------------


def commit(core: Parity, change: Change) -> dict[str, Any]:
    core.apply(change.records)
    return change.reply


def set_lem(core: Parity, start: int, players: list[str], params: dict[str, float] | None = None) -> None:
    payload: dict[str, Any] = {"time_delivery": [start, start + Q], "players": players}
    if params is not None:
        payload["params"] = params
    commit(core, core.set_lem("AGG", decode(payload, LemSetMsg), now=start - 60))


def measure(core: Parity, pid: str, start: int, consumption: int, production: int) -> None:
    msg = decode(
        {"time_delivery": [start, start + Q], "consumption": consumption, "production": production}, LemMeasureMsg
    )
    commit(core, core.measure(pid, msg, now=start + Q))


def grid(core: Parity, start: int, state: str) -> None:
    msg = decode({"time_delivery": [start, start + Q], "state": state}, GridStateSetMsg)
    commit(core, core.set_grid_state("DSO", msg, now=start - 60))


def new_core(**config: Any) -> Parity:
    return Parity(ParityConfig(**config), role_of=role_of)


def test_solve_moves_tokens_between_players_and_the_aggregator() -> None:
    core = new_core()
    set_lem(core, T, ["P1", "P2"])
    measure(core, "P1", T, 3000, 0)
    measure(core, "P2", T, 1000, 2000)
    change = core.solve(T, T + 3600, now=T + 3660)
    reply = commit(core, change)
    assert reply["balances"] == {"P1": -510_000, "P2": -10_000}
    assert [(t["from"], t["to"], t["amount"]) for t in reply["transfers"]] == [
        ("P1", "AGG", 510_000),
        ("P2", "AGG", 10_000),
    ]
    assert [t.id for t in change.records if isinstance(t, TokenTransfer)] == [
        f"t/s{T}-{T + Q}/P1/AGG",
        f"t/s{T}-{T + Q}/P2/AGG",
    ]
    assert core.balances() == {"AGG": 520_000, "P1": -510_000, "P2": -10_000}
    assert core.balances("P2") == {"P2": -10_000} and core.balances("P9") == {"P9": 0}
    rows = [r for r in change.records if isinstance(r, LemResultRecord)]
    assert [(r.participant_id, r.measured, r.amount, r.grid_state) for r in rows] == [
        ("P1", "prosumer", -510_000, "GREEN"),
        ("P2", "prosumer", -10_000, "GREEN"),
    ]
    # Solved once: a second solve finds nothing, and the LEM is closed to measurements.
    again = core.solve(T, T + 3600, now=T + 7200)
    assert again == Change((), {"balances": {}, "transfers": [], "lems": []})
    with pytest.raises(MarketError) as err:
        core.measure(
            "P1", decode({"time_delivery": [T, T + Q], "consumption": 1, "production": 0}, LemMeasureMsg), T + Q
        )
    assert err.value.code in ("closed", "conflict")


def test_totals_over_several_lems_move_as_one_transfer_each() -> None:
    core = new_core()
    set_lem(core, T, ["P1", "P2"])
    set_lem(core, T + Q, ["P1", "P2"])
    measure(core, "P1", T, 1000, 0)  # LEM 1: Ec = Ep = 1: P1 -0.14, P2 +0.08
    measure(core, "P2", T, 0, 1000)
    measure(core, "P1", T + Q, 0, 1000)  # LEM 2: the other way round: P1 +0.08, P2 -0.14
    measure(core, "P2", T + Q, 1000, 0)
    reply = commit(core, core.solve(T, T + 2 * Q, now=T + 2 * Q))
    assert reply["balances"] == {"P1": -60_000, "P2": -60_000}
    assert [lem["balances"] for lem in reply["lems"]] == [
        {"P1": -140_000, "P2": 80_000},
        {"P1": 80_000, "P2": -140_000},
    ]
    assert [(t["from"], t["to"], t["amount"]) for t in reply["transfers"]] == [
        ("P1", "AGG", 60_000),
        ("P2", "AGG", 60_000),
    ]


def test_only_ended_lems_inside_the_window_are_solved() -> None:
    core = new_core()
    for k in range(4):
        set_lem(core, T + k * Q, ["P1"])
    reply = commit(core, core.solve(T + Q, T + 4 * Q, now=T + 3 * Q))
    # [T, T+Q] is before the window; [T+3Q, T+4Q] has not ended at T+3Q.
    assert [lem["time_delivery"][0] for lem in reply["lems"]] == [T + Q, T + 2 * Q]
    assert not core.is_solved(T) and not core.is_solved(T + 3 * Q)


def test_red_slot_is_skipped() -> None:
    core = new_core()
    grid(core, T, "RED")
    set_lem(core, T, ["P1", "P2"])
    measure(core, "P1", T, 3000, 0)
    measure(core, "P2", T, 0, 1000)
    change = core.solve(T, T + Q, now=T + Q)
    reply = commit(core, change)
    assert reply["transfers"] == [] and reply["balances"] == {"P1": 0, "P2": 0}
    assert reply["lems"][0]["skipped"] is True and reply["lems"][0]["grid_state"] == "RED"
    assert core.balances() == {}
    assert core.is_solved(T)  # not solved again later
    assert not any(isinstance(r, TokenTransfer) for r in change.records)


def test_yellow_slot_uses_the_yellow_defaults() -> None:
    core = new_core()
    grid(core, T, "YELLOW")
    set_lem(core, T, ["P1", "P2"])
    measure(core, "P1", T, 3000, 0)
    measure(core, "P2", T, 0, 1000)
    reply = commit(core, core.solve(T, T + Q, now=T + Q))
    assert reply["balances"] == {"P1": -657_500, "P2": 92_500}  # test_beta_following_...


def test_lem_params_override_the_defaults() -> None:
    # Own params: pbBAU 30, psBAU 5, pbP2P 10, psP2P 12. Ec = 2, Ep = 1, matched 1:
    # p_buy = (2*30 - 1*20)/2 = 20 c; p_sell = (1*5 + 1*7)/1 = 12 c. P1: -2*0.20; P2: 1*0.12.
    # (GREEN defaults would give p_buy (40 - 6)/2 = 17 c and p_sell 8 c: -0.34 and 0.08.)
    # GREEN (in YELLOW the operator's defaults apply: test_own_parameters_apply_in_green_...).
    core = new_core()
    set_lem(core, T, ["P1", "P2"], {"pbBAU": 30, "psBAU": 5, "pbP2P": 10, "psP2P": 12, "beta": 0})
    measure(core, "P1", T, 2000, 0)
    measure(core, "P2", T, 0, 1000)
    reply = commit(core, core.solve(T, T + Q, now=T + Q))
    assert reply["balances"] == {"P1": -400_000, "P2": 120_000}
    assert reply["lems"][0]["p_buy"] == pytest.approx(0.20) and reply["lems"][0]["p_sell"] == pytest.approx(0.12)


def test_operator_defaults_apply_at_solve_time() -> None:
    core = new_core()
    set_lem(core, T, ["P1", "P2"])
    measure(core, "P1", T, 2000, 0)
    measure(core, "P2", T, 0, 1000)
    # New GREEN defaults after the LEM was set: the same numbers as the override above.
    msg = decode(
        {"grid_state": "GREEN", "pbBAU": 30.0, "psBAU": 5.0, "pbP2P": 10.0, "psP2P": 12.0, "beta": 0.0},
        LemDefaultsSetMsg,
    )
    reply = commit(core, core.set_defaults("OP", msg, now=T))
    assert reply == {
        "defaults": {"grid_state": "GREEN", "pbBAU": 30.0, "psBAU": 5.0, "pbP2P": 10.0, "psP2P": 12.0, "beta": 0.0}
    }
    assert commit(core, core.solve(T, T + Q, now=T + Q))["balances"] == {"P1": -400_000, "P2": 120_000}


def test_meter_readings_count_where_a_prosumer_measured_nothing() -> None:
    core = new_core()
    set_lem(core, T, ["P1", "P2", "P3"])
    measure(core, "P1", T, 1000, 0)  # its own measurement wins over its meters
    fallback = {T: {"P1": Measurement(9999, 9999), "P2": Measurement(0, 2000)}}
    change = core.solve(T, T + Q, now=T + Q, fallback=fallback)
    rows = {r.participant_id: r for r in change.records if isinstance(r, LemResultRecord)}
    assert [(p, r.measured, r.consumption, r.production) for p, r in rows.items()] == [
        ("P1", "prosumer", 1000, 0),
        ("P2", "meter", 0, 2000),
        ("P3", "none", 0, 0),
    ]


def meter(pid: str, start: int, generation: str, consumption: str, d: int = 60) -> MeterRecord:
    return MeterRecord(f"m{start}-{pid}", pid, start, start + d, generation, consumption, start + d)


def test_measurements_from_meters() -> None:
    records = [
        # import 300 (external), export 600 + 100; self-consumption (bess, other.solar) not counted
        meter("P1", T, '{"solar":600,"wind":100}', '{"bess":{"solar":50},"other":{"external":300,"solar":100}}'),
        meter("P1", T + 840, '{"solar":5}', '{"bess":{},"other":{"external":7}}'),  # same LEM: adds up
        meter("P2", T + Q, "{}", '{"bess":{},"other":{"external":40}}'),  # next LEM
        meter("P3", T + 600, '{"solar":1}', '{"bess":{},"other":{}}', d=600),  # straddles two LEMs: ignored
    ]
    assert measurements_from_meters(records, Q) == {
        T: {"P1": Measurement(307, 705)},
        T + Q: {"P2": Measurement(40, 0)},
    }


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)), min_size=1, max_size=6),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.sampled_from(["GREEN", "YELLOW", "RED"]), min_size=4, max_size=4),
)
def test_tokens_are_conserved(lems: list[list[tuple[int, int]]], states: list[str]) -> None:
    core = new_core()
    for k, energies in enumerate(lems):
        start = T + k * Q
        grid(core, start, states[k])
        players = [f"P{i}" for i in range(len(energies))]
        set_lem(core, start, players)
        for p, (c, e) in zip(players, energies, strict=True):
            measure(core, p, start, c, e)
    change = core.solve(T, T + len(lems) * Q, now=T + len(lems) * Q)
    reply = commit(core, change)
    balances = core.balances()
    assert sum(balances.values()) == 0  # every transfer takes from one account what it gives another
    for p, total in reply["balances"].items():
        assert balances.get(p, 0) == total
    assert balances.get("AGG", 0) == -sum(reply["balances"].values())
    assert all(t.amount > 0 for t in change.records if isinstance(t, TokenTransfer))
    for k, lem in enumerate(reply["lems"]):
        assert lem["skipped"] == (states[k] == "RED")


# -- grid state ------------------------------------------------------------------------------


def test_grid_state_only_before_the_slot_starts_and_revisions_count() -> None:
    core = new_core()
    msg = decode({"time_delivery": [T, T + Q], "state": "YELLOW"}, GridStateSetMsg)
    first = core.set_grid_state("DSO", msg, now=T - 1)
    assert first.reply == {"grid_state": {"time_delivery": [T, T + Q], "state": "YELLOW"}}
    commit(core, first)
    red = core.set_grid_state("DSO", decode({"time_delivery": [T, T + Q], "state": "RED"}, GridStateSetMsg), now=T - 1)
    assert [r.row()["id"] for r in red.records] == [f"g{T}.1"]
    commit(core, red)
    assert core.grid_state(T) == "RED" and core.grid_state(T + Q) == "GREEN"
    with pytest.raises(MarketError) as err:
        core.set_grid_state("DSO", msg, now=T)
    assert err.value.code == "closed"


def test_auction_slots_take_the_most_severe_overlapping_state() -> None:
    core = new_core()
    grid(core, T, "YELLOW")
    grid(core, T + Q, "RED")
    assert core.auction_state(T, 60) == "YELLOW"  # one-minute auction slots inside a LEM slot
    assert core.auction_state(T + Q + 60, 60) == "RED"
    assert core.auction_state(T + 2 * Q, 60) == "GREEN"
    assert core.auction_state(T, 3600) == "RED"  # an hour-long auction slot overlaps both


# -- SLAs and KPIs ---------------------------------------------------------------------------

SLA: dict[str, Any] = {
    "id": "sla1",
    "start": T,
    "end": T + 7200,
    "kpis": [
        {
            "id": "KPI1",
            "signal": "voltage",
            "rule": "gt",
            "limit": 5,
            "penalty": 1000,
            "players": ["P1", "P2"],
            "resolution": 3600,
        },
        {
            "id": "KPI2",
            "signal": "power",
            "rule": "lt",
            "limit": 2.0,
            "penalty": 500,
            "players": ["P3", "ORA"],
            "resolution": 3600,
        },
    ],
}


def kpi(core: Parity, pid: str, kpi_id: str, start: int, value: float) -> dict[str, Any]:
    msg = decode({"sla": "sla1", "kpi": kpi_id, "time_interval": [start, start + 3600], "value": value}, KpiMeasureMsg)
    return commit(core, core.measure_kpi(pid, msg, now=start + 3600))


def test_sla_penalties_gt_and_lt_applied_once() -> None:
    core = new_core()
    reply = commit(core, core.set_sla("AGG", decode(SLA, SlaSetMsg), now=T - 60))
    assert reply["sla"]["kpis"][0]["players"] == ["P1", "P2"] and reply["sla"]["aggregator"] == "AGG"
    kpi(core, "P1", "KPI1", T, 6.0)  # 6 > 5: breaks
    kpi(core, "P1", "KPI1", T + 3600, 5.0)  # 5 > 5 is false: keeps
    kpi(core, "P2", "KPI1", T, 4)
    kpi(core, "P2", "KPI1", T + 3600, 7.5)  # breaks
    kpi(core, "P3", "KPI2", T, 1.0)  # 1 < 2: breaks
    kpi(core, "P3", "KPI2", T + 3600, 2.0)  # keeps
    kpi(core, "ORA", "KPI2", T, 3.0)  # keeps; ORA has no value for the second hour: nothing to judge
    with pytest.raises(MarketError) as err:
        core.solve_sla("AGG", "sla1", now=T + 7199)
    assert err.value.code == "invalid"
    change = core.solve_sla("AGG", "sla1", now=T + 3 * 3600)
    reply = commit(core, change)
    assert reply == {
        "penalties": [
            {"player": "P1", "kpi": "KPI1", "time_interval": [T, T + 3600], "amount": 1000},
            {"player": "P2", "kpi": "KPI1", "time_interval": [T + 3600, T + 7200], "amount": 1000},
            {"player": "P3", "kpi": "KPI2", "time_interval": [T, T + 3600], "amount": 500},
        ]
    }
    assert [r.row()["id"] for r in change.records] == [
        f"p/sla1/KPI1/P1/{T}",
        f"p/sla1/KPI1/P2/{T + 3600}",
        f"p/sla1/KPI2/P3/{T}",
        "sla1",
    ]
    assert isinstance(change.records[-1], SlaResultRecord) and change.records[-1].amount == 2500
    assert core.balances() == {"AGG": 2500, "P1": -1000, "P2": -1000, "P3": -500}
    # Applied once: checking again replies the same, moves nothing and writes nothing.
    again = core.solve_sla("OP", "sla1", now=T + 4 * 3600)
    assert again.records == () and again.reply == {**reply, "duplicate": True}
    commit(core, again)
    assert core.balances() == {"AGG": 2500, "P1": -1000, "P2": -1000, "P3": -500}
    with pytest.raises(MarketError) as err:
        kpi(core, "ORA", "KPI2", T + 3600, 0.0)
    assert err.value.code == "closed"


def test_sla_is_set_before_its_period_and_kpi_values_after_theirs() -> None:
    """The market clock judges both: an SLA whose period has started (or passed) and a KPI
    value for a period that has not ended are `invalid`, naming the field and the bound."""
    core = new_core()
    for now in (T, T + 1, T + 3 * 3600):  # at its start, during it, after its end
        with pytest.raises(MarketError) as err:
            core.set_sla("AGG", decode(SLA, SlaSetMsg), now=now)
        assert err.value.code == "invalid"
        assert f"start {T}" in err.value.message and f"market time {now}" in err.value.message
    assert core.snapshot() == new_core().snapshot()
    commit(core, core.set_sla("AGG", decode(SLA, SlaSetMsg), now=T - 1))  # a second before: fine
    before = core.snapshot()
    first, second = [T, T + 3600], [T + 3600, T + 7200]
    for interval, now in ((first, T - 1), (first, T), (first, T + 3599), (second, T + 3600), (second, T + 7199)):
        msg = decode({"sla": "sla1", "kpi": "KPI1", "time_interval": interval, "value": 1.0}, KpiMeasureMsg)
        with pytest.raises(MarketError) as err:
            core.measure_kpi("P1", msg, now=now)
        assert err.value.code == "invalid"
        assert f"time_interval {interval}" in err.value.message and f"market time {now}" in err.value.message
    assert core.snapshot() == before
    for interval, now in ((first, T + 3600), (second, T + 9 * 3600)):  # once ended (even after the SLA's end)
        msg = decode({"sla": "sla1", "kpi": "KPI1", "time_interval": interval, "value": 1.0}, KpiMeasureMsg)
        commit(core, core.measure_kpi("P1", msg, now=now))


# -- refusals change nothing -----------------------------------------------------------------


def test_refused_actions_change_nothing() -> None:
    core = new_core()
    set_lem(core, T, ["P1", "P2"])
    measure(core, "P1", T, 100, 0)
    commit(core, core.set_sla("AGG", decode(SLA, SlaSetMsg), now=T - 60))
    kpi(core, "P1", "KPI1", T, 1.0)
    before = core.snapshot()
    lem_msg = {"time_delivery": [T, T + Q], "consumption": 1, "production": 0}
    kpi_msg = {"sla": "sla1", "kpi": "KPI1", "time_interval": [T, T + 3600], "value": 1.0}
    cases: list[tuple[Any, str]] = [
        (
            lambda: core.set_grid_state(
                "DSO", decode({"time_delivery": [T, T + Q], "state": "RED"}, GridStateSetMsg), T
            ),
            "closed",
        ),
        (
            lambda: core.set_grid_state(
                "DSO", decode({"time_delivery": [T + 1, T + Q + 1], "state": "RED"}, GridStateSetMsg), 0
            ),
            "invalid",
        ),
        (lambda: decode({"time_delivery": [T, T + Q], "state": "BLUE"}, GridStateSetMsg), "invalid"),
        (
            lambda: decode(
                {"grid_state": "GREEN", "pbBAU": float("nan"), "psBAU": 1, "pbP2P": 1, "psP2P": 1, "beta": 0},
                LemDefaultsSetMsg,
            ),
            "invalid",
        ),
        (
            lambda: decode(
                {"grid_state": "GREEN", "pbBAU": True, "psBAU": 1, "pbP2P": 1, "psP2P": 1, "beta": 0}, LemDefaultsSetMsg
            ),
            "invalid",
        ),
        (
            lambda: decode({"grid_state": "GREEN", "pbBAU": 1, "psBAU": 1, "pbP2P": 1, "psP2P": 1}, LemDefaultsSetMsg),
            "invalid",
        ),
        (
            lambda: core.set_lem("AGG", decode({"time_delivery": [T, T + Q], "players": ["P3"]}, LemSetMsg), T - 60),
            "conflict",
        ),
        (
            lambda: core.set_lem(
                "AGG", decode({"time_delivery": [T + Q, T + 2 * Q], "players": ["P1", "P1"]}, LemSetMsg), T
            ),
            "invalid",
        ),
        (
            lambda: core.set_lem(
                "AGG", decode({"time_delivery": [T + Q, T + 2 * Q], "players": ["ORA"]}, LemSetMsg), T
            ),
            "invalid",
        ),
        (
            lambda: core.set_lem(
                "AGG", decode({"time_delivery": [T + Q, T + 2 * Q], "players": ["NOBODY"]}, LemSetMsg), T
            ),
            "invalid",
        ),
        (lambda: core.set_lem("AGG", decode({"time_delivery": [T - Q, T], "players": ["P1"]}, LemSetMsg), T), "closed"),
        (lambda: decode({"time_delivery": [T, T + Q], "players": []}, LemSetMsg), "invalid"),
        (
            lambda: decode({"time_delivery": [T, T + Q], "players": ["P1"], "params": {"pbBAU": 1}}, LemSetMsg),
            "invalid",
        ),
        (lambda: core.measure("P1", decode(lem_msg, LemMeasureMsg), T + Q), "conflict"),  # a second save
        (lambda: core.measure("P2", decode(lem_msg, LemMeasureMsg), T + Q - 1), "invalid"),  # not ended
        (lambda: core.measure("P3", decode(lem_msg, LemMeasureMsg), T + Q), "forbidden"),  # not a player
        (
            lambda: core.measure(
                "P1", decode({**lem_msg, "time_delivery": [T + Q, T + 2 * Q]}, LemMeasureMsg), T + 9 * Q
            ),
            "not_found",
        ),
        (lambda: decode({**lem_msg, "consumption": -1}, LemMeasureMsg), "invalid"),
        (lambda: decode({**lem_msg, "consumption": 1.5}, LemMeasureMsg), "invalid"),
        (lambda: core.solve(T + Q, T, T + Q), "invalid"),
        (lambda: core.set_sla("AGG", decode(SLA, SlaSetMsg), T - 60), "conflict"),
        (lambda: core.set_sla("AGG", decode({**SLA, "id": "s2"}, SlaSetMsg), T), "invalid"),  # has started
        (lambda: core.measure_kpi("P2", decode(kpi_msg, KpiMeasureMsg), T + 3599), "invalid"),  # not ended
        (lambda: core.set_sla("AGG", decode({**SLA, "id": "s2", "end": T + 5000}, SlaSetMsg), T), "invalid"),
        (lambda: core.set_sla("AGG", decode({**SLA, "id": "s2", "end": T}, SlaSetMsg), T), "invalid"),
        (
            lambda: core.set_sla("AGG", decode({**SLA, "id": "s2", "kpis": [SLA["kpis"][0]] * 2}, SlaSetMsg), T),
            "invalid",
        ),
        (lambda: decode({**SLA, "kpis": [{**SLA["kpis"][0], "rule": "eq"}]}, SlaSetMsg), "invalid"),
        (lambda: core.measure_kpi("P1", decode(kpi_msg, KpiMeasureMsg), T + 3600), "conflict"),
        (lambda: core.measure_kpi("P3", decode(kpi_msg, KpiMeasureMsg), T + 3600), "forbidden"),
        (lambda: core.measure_kpi("P2", decode({**kpi_msg, "kpi": "KPI9"}, KpiMeasureMsg), T + 3600), "not_found"),
        (lambda: core.measure_kpi("P2", decode({**kpi_msg, "sla": "nope"}, KpiMeasureMsg), T + 3600), "not_found"),
        (
            lambda: core.measure_kpi("P2", decode({**kpi_msg, "time_interval": [T + 60, T + 3660]}, KpiMeasureMsg), T),
            "invalid",
        ),
        (
            lambda: core.measure_kpi(
                "P2", decode({**kpi_msg, "time_interval": [T + 7200, T + 10800]}, KpiMeasureMsg), T
            ),
            "invalid",
        ),
        (lambda: decode({**kpi_msg, "value": float("inf")}, KpiMeasureMsg), "invalid"),
        (lambda: core.solve_sla("AGG", "nope", T + 7200), "not_found"),
    ]
    for action, code in cases:
        with pytest.raises(MarketError) as err:
            action()
        assert err.value.code == code, (code, err.value)
    assert core.snapshot() == before


# -- the ledger rebuilds the state -----------------------------------------------------------


def test_restore_from_records_gives_the_same_state() -> None:
    core = new_core()
    written: list[Record] = []

    def keep(change: Change) -> dict[str, Any]:
        written.extend(change.records)
        return commit(core, change)

    keep(core.set_grid_state("DSO", decode({"time_delivery": [T, T + Q], "state": "YELLOW"}, GridStateSetMsg), T - 60))
    keep(core.set_grid_state("DSO", decode({"time_delivery": [T, T + Q], "state": "RED"}, GridStateSetMsg), T - 30))
    keep(
        core.set_grid_state("DSO", decode({"time_delivery": [T + Q, T + 2 * Q], "state": "YELLOW"}, GridStateSetMsg), T)
    )
    keep(core.set_lem("AGG", decode({"time_delivery": [T, T + Q], "players": ["P1", "P2"]}, LemSetMsg), T))
    keep(
        core.set_lem(
            "AGG",
            decode(
                {
                    "time_delivery": [T + Q, T + 2 * Q],
                    "players": ["P1", "P2"],
                    "params": {"pbBAU": 30, "psBAU": 5, "pbP2P": 10, "psP2P": 12, "beta": 0.01},
                },
                LemSetMsg,
            ),
            T,
        )
    )
    for start in (T, T + Q):
        keep(
            core.measure(
                "P1",
                decode({"time_delivery": [start, start + Q], "consumption": 2000, "production": 0}, LemMeasureMsg),
                T + 2 * Q,
            )
        )
        keep(
            core.measure(
                "P2",
                decode({"time_delivery": [start, start + Q], "consumption": 0, "production": 1000}, LemMeasureMsg),
                T + 2 * Q,
            )
        )
    keep(core.solve(T, T + 2 * Q, T + 2 * Q))
    keep(core.set_sla("AGG", decode(SLA, SlaSetMsg), T - 1))
    msg = decode({"sla": "sla1", "kpi": "KPI1", "time_interval": [T, T + 3600], "value": 9.0}, KpiMeasureMsg)
    keep(core.measure_kpi("P1", msg, T + 3600))
    keep(core.solve_sla("AGG", "sla1", T + 7200))
    assert any(isinstance(r, GridStateRecord) for r in written) and any(isinstance(r, KpiValueRecord) for r in written)
    assert any(isinstance(r, LemRecord) and r.params is not None for r in written)

    again = new_core()
    again.restore(reversed(written))  # any order
    assert again.snapshot() == core.snapshot()
    again.restore(written)  # replaying the same records moves no token twice
    assert again.balances() == core.balances()


# -- the flow term does not grow with the community (issue #19 item 6) -------------------------


def community(homes: int) -> dict[str, tuple[int, int]]:
    """`homes` members: 8 in 10 import 1 kWh, 2 in 10 export 1 kWh (Ec = 0.8 N, Ep = 0.2 N)."""
    return {f"H{i}": ((1000, 0) if i % 10 < 8 else (0, 1000)) for i in range(homes)}


def test_the_flow_term_stays_in_proportion_from_10_to_100_homes() -> None:
    """YELLOW (beta 0.025). The community's flow is (Ec - Ep)/(Ec + Ep) = 0.6 of its volume
    whatever its size, so each member's flow term is beta * its net flow * 0.6: 0.015 for a
    1 kWh importer in 10 homes and in 100 (the old beta*(ec-ep)*(Ec-Ep) charged 0.15 in 10
    homes and 1.50 in 100, six times the 0.215 energy bill).
    p_buy = (0.8N*24 - 0.2N*10)/0.8N = 21.5 c; p_sell = (0.2N*6.3 + 0.2N*1.7)/0.2N = 8 c.
    Importer: -0.215 - 0.025*1*0.6 = -0.23; exporter: 0.08 + 0.025*1*0.6 = 0.095."""
    for homes in (10, 100):
        p_buy, p_sell, got = amounts(YELLOW, **community(homes))
        assert (p_buy, p_sell) == pytest.approx((0.215, 0.08))
        assert got["H0"] == -230_000 and got["H9"] == 95_000, homes  # H0 imports, H9 exports
        assert set(got.values()) == {-230_000, 95_000}
        # The term is bounded by beta per kWh of the member's own net flow, at any size.
        flow = {
            p: got[p] - round(1e6 * (e / 1000 * p_sell - c / 1000 * p_buy)) for p, (c, e) in community(homes).items()
        }
        assert all(abs(v) <= 0.025 * 1e6 for v in flow.values())


def test_the_flow_term_is_zero_for_a_balanced_or_empty_community() -> None:
    # Ec = Ep = 2: no net flow, no term: the GREEN-like P2P prices alone (YELLOW: p_buy 14 c, p_sell 8 c).
    assert amounts(YELLOW, A=(2000, 0), B=(0, 2000))[2] == {"A": -280_000, "B": 160_000}
    assert amounts(YELLOW, A=(0, 0))[2] == {"A": 0}


# -- the aggregator's own parameters apply in GREEN only (issue #19 item 7) --------------------


def test_own_parameters_apply_in_green_and_the_yellow_defaults_in_yellow() -> None:
    """As the reference: the aggregator refines the market in GREEN; in YELLOW the operator's
    YELLOW defaults (with their beta) apply whatever the LEM says, so an aggregator cannot
    switch off the DSO's congestion pricing. Own params 30, 5, 10, 12, beta 0 (as above);
    Ec = 2, Ep = 1. GREEN: P1 -0.40, P2 +0.12. YELLOW with the defaults: p_buy = (48 - 10)/2
    = 19 c, p_sell = 8 c, flow (2 - 1)/3: P1 -0.38 - 0.025*2/3 = -0.396667, P2 0.08 + 0.025/3
    = 0.088333."""
    own = {"pbBAU": 30, "psBAU": 5, "pbP2P": 10, "psP2P": 12, "beta": 0}
    core = new_core()
    grid(core, T + Q, "YELLOW")
    for start in (T, T + Q):
        set_lem(core, start, ["P1", "P2"], own)
        measure(core, "P1", start, 2000, 0)
        measure(core, "P2", start, 0, 1000)
    reply = commit(core, core.solve(T, T + 2 * Q, now=T + 2 * Q))
    green, yellow = reply["lems"]
    assert (green["grid_state"], green["params"], green["balances"]) == (
        "GREEN",
        "lem",
        {"P1": -400_000, "P2": 120_000},
    )
    assert (yellow["grid_state"], yellow["params"], yellow["balances"]) == (
        "YELLOW",
        "defaults",
        {"P1": -396_667, "P2": 88_333},
    )
    assert yellow["p_buy"] == pytest.approx(0.19) and yellow["p_sell"] == pytest.approx(0.08)


def tx(slot: int, seller: str, buyer: str, amount_sell: int, amount_buy: int, kind: str = "p2p") -> Transaction:
    return Transaction(
        id=f"t{slot}{seller}{buyer}{kind}",
        kind=kind,  # type: ignore[arg-type]
        time_delivery_start=slot,
        time_delivery_end=slot + 60,
        seller_id=seller,
        buyer_id=buyer,
        energy_source="solar",
        quantity=1000,
        price_buy=amount_buy / 1000 / 1000,
        price_sell=amount_sell / 1000 / 1000,
        amount_buy=amount_buy,
        amount_sell=amount_sell,
        commit_id=None,
        time_creation=slot + 60,
    )


def test_the_auction_s_money_is_netted_so_each_kwh_is_paid_once() -> None:
    """P1 sells P2 1 kWh in the auction at 0.125 and P2 buys 2 kWh more from the grid at
    0.24: the LEM moves in tokens only the difference between its price of each player's
    energy and what the auction already moved, so the two sum to the LEM's price; what the
    players pay in tokens the aggregator gets; in RED the auction's settlement stands."""
    money = auction_money(
        [
            tx(T, "P1", "P2", 125_000, 125_000),
            tx(T + 60, "grid", "P2", 480_000, 480_000, "grid_buy"),
            tx(T + Q - 30, "P1", "P2", 1, 1),  # straddles the LEM slot's end: left out
            tx(T + Q, "P1", "P2", 125_000, 125_000),  # the next LEM slot
        ],
        Q,
    )
    assert money == {T: {"P1": 125_000, "P2": -605_000, "grid": 480_000}, T + Q: {"P1": 125_000, "P2": -125_000}}
    core = new_core()
    set_lem(core, T, ["P1", "P2"])
    set_lem(core, T + Q, ["P1", "P2"])
    grid(core, T + Q, "RED")
    measure(core, "P1", T, 0, 1000)
    measure(core, "P2", T, 3000, 0)
    gross = solve_lem(
        ParityConfig().defaults["GREEN"], ["P1", "P2"], {"P1": Measurement(0, 1000), "P2": Measurement(3000, 0)}
    )
    change = core.solve(T, T + 3600, now=T + 3660, auction=money)
    results = {(r.time_delivery_start, r.participant_id): r for r in change.records if isinstance(r, LemResultRecord)}
    for p in ("P1", "P2"):
        assert results[T, p].auction == money[T][p]
        assert results[T, p].amount + results[T, p].auction == gross.amounts[p]  # paid once, at the LEM's price
        assert results[T + Q, p].amount == 0 and results[T + Q, p].auction == money[T + Q][p]  # RED: the auction's
    moved = [t for t in change.records if isinstance(t, TokenTransfer)]
    assert sum(t.amount for t in moved if t.payee_id == "AGG") - sum(
        t.amount for t in moved if t.payer_id == "AGG"
    ) == -(results[T, "P1"].amount + results[T, "P2"].amount)
