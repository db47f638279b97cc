"""A feeder scenario end to end (`run_sim`): server subprocess, prosumer clients, the DSO
agent with pandapower power flows; grid states on the ledger, and no P2P fill in a RED slot."""

from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest

from controller.dso import metered_injections
from controller.scenario import load_scenario
from controller.sim import run_sim
from ledger import read_rows
from market.feeder.network import Feeder, classify

pytest.importorskip("pandapower")

SCENARIO = Path(__file__).parents[2] / "scenarios" / "feeder.toml"


def morning(tmp_path: Path) -> Path:
    """The feeder scenario from 06:00 UTC (08:00 in Berlin): PV ramps up to the noon peak."""
    text = SCENARIO.read_text()
    start = next(line for line in text.splitlines() if line.startswith("start = "))
    path = tmp_path / "feeder.toml"
    path.write_text(text.replace(start, 'start = "2026-06-15T06:00:00Z"'))
    return path


async def test_feeder_run_sets_grid_states_from_power_flows_and_red_slots_clear_no_p2p(tmp_path: Path) -> None:
    scenario_path = morning(tmp_path)
    url = f"sqlite:///{tmp_path}/feeder.db"
    result = await run_sim(scenario_path, ledger=url, days=0.125, progress=False)  # 12 rounds, 06:00-09:00
    assert result.missing_total == 0

    flows = read_rows(url, "grid_flows")
    forecast = {r["time_delivery_start"]: r for r in flows if r["kind"] == "forecast"}
    metered = {r["time_delivery_start"]: r for r in flows if r["kind"] == "metered"}
    scenario = load_scenario(scenario_path)
    slots = [scenario.start_time + i * scenario.step for i in range(12)]
    assert sorted(metered) == slots  # every delivered slot's power flow on the metered injections
    assert set(slots) <= set(forecast)  # and, ahead of it, on the forecast
    assert {r["state"] for r in forecast.values()} == {"GREEN", "YELLOW", "RED"}  # the morning ramp

    # The DSO set YELLOW and RED (GREEN is the default) before the gates, once per slot.
    states = {g["time_delivery_start"]: g["state"] for g in read_rows(url, "grid_states")}
    rows = read_rows(url, "grid_states")
    assert all(g["revision"] == 0 for g in rows)
    # One DSO, under its /grid pseudonym (docs/parity.md, Pseudonyms), never its registry id.
    assert len({g["dso_id"] for g in rows}) == 1 and rows[0]["dso_id"].startswith("ps-")
    assert states == {s: r["state"] for s, r in forecast.items() if r["state"] != "GREEN"}

    # RED: no P2P fill and no P2P transaction; the other slots do trade.
    fills: dict[int, int] = defaultdict(int)
    for s in read_rows(url, "settlements"):
        fills[s["time_delivery_start"]] += 1
    p2p = {t["time_delivery_start"] for t in read_rows(url, "transactions") if t["kind"] == "p2p"}
    red = [s for s in slots if states.get(s) == "RED"]
    assert red and all(fills[s] == 0 and s not in p2p for s in red)
    tradable = [s for s in slots[2:] if states.get(s) != "RED"]  # the first two close before anyone bids
    assert tradable and all(fills[s] > 0 for s in tradable)
    assert any(states.get(s) == "YELLOW" for s in tradable)

    # The ledger's results are pandapower's on the metered injections (recomputed here).
    assert scenario.feeder is not None
    feeder = Feeder.load(scenario.feeder, [p["id"] for p in scenario.participants], scenario_path.parent)
    meters = read_rows(url, "meters")
    for start in (slots[0], red[0]):
        r = feeder.run(feeder.bus_injections(metered_injections(meters, start, start + scenario.step)))
        row = metered[start]
        assert row["vm_max_pu"] == pytest.approx(r.vm_max_pu, abs=1e-7)
        assert row["trafo_loading_max"] == pytest.approx(r.trafo_loading_max, abs=1e-4)
        assert row["line_loading_max"] == pytest.approx(r.line_loading_max, abs=1e-4)
        assert row["state"] == classify(r, scenario.feeder.thresholds)
    assert metered[red[0]]["trafo_loading_max"] > 100
    # ...and each power flow runs again from the ledger alone: its row's per-bus injections
    # (forecasts too) on the scenario's feeder give the row's figures (#18 item 7).
    for row in (forecast[slots[3]], metered[slots[3]], metered[red[0]]):
        buses = {int(b): w for b, w in json.loads(row["buses"]).items()}
        assert buses and sum(buses.values()) == pytest.approx(row["injection_kw"] * 1000, abs=0.1)
        again = feeder.run(buses)
        assert row["vm_max_pu"] == pytest.approx(again.vm_max_pu, abs=1e-6)
        assert row["line_loading_max"] == pytest.approx(again.line_loading_max, abs=1e-3)

    # `microte grid-report`: voltage and loading next to P2P volume and prices, per slot.
    from controller import grid_report

    args = argparse.Namespace(ledger=url, out=str(tmp_path / "report"), scenario=None)
    assert grid_report.main(args) == 0
    png, table = tmp_path / "report" / "grid.png", tmp_path / "report" / "grid_slots.csv"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    with table.open() as fh:
        report_rows = list(csv.DictReader(fh))
    assert [int(r["start"]) for r in report_rows] == slots
    assert [r["state"] for r in report_rows] == [states.get(s, "GREEN") for s in slots]
    assert all(float(r["p2p_kwh"]) == 0 for r in report_rows if r["state"] == "RED")


async def test_helics_broker_market_and_grid_federates_exchange_values_both_ways(tmp_path: Path) -> None:
    """`microte cosim --no-weather`: a real HELICS broker, the market federate (microte with its
    server, clients and controller) and the pandapower grid federate, on loopback."""
    pytest.importorskip("helics")
    import asyncio

    from controller import cosim

    scenario_path = morning(tmp_path)
    url = f"sqlite:///{tmp_path}/cosim.db"
    parser = argparse.ArgumentParser()
    cosim.add_arguments(parser)
    args = parser.parse_args([str(scenario_path), "--no-weather", "--rounds", "6", "--ledger", url])
    out = await asyncio.to_thread(cosim.run_all, args, timeout=120)
    market, grid = out["market"], out["grid"]
    assert market["rounds"] == 6 and "weather" not in out
    # market -> grid: forecasts of 3 + 5 slots and 6 metered slots, each a power flow.
    assert grid["power_flows"] == 3 + 5 + 6
    # grid -> market: a power flow result for every metered slot, and the states it set as DSO.
    received = market["received"]
    scenario = load_scenario(scenario_path)
    slots = [scenario.start_time + i * scenario.step for i in range(6)]
    assert [r["slot"] for r in received] == slots
    states = {g["time_delivery_start"]: g["state"] for g in read_rows(url, "grid_states")}
    assert market["states_set"] == len(states) > 0
    flows = read_rows(url, "grid_flows")
    forecast = {r["time_delivery_start"]: r["state"] for r in flows if r["kind"] == "forecast"}
    assert states == {s: v for s, v in forecast.items() if v != "GREEN"}
    # The grid federate's voltages are pandapower's on the market's metered injections.
    assert scenario.feeder is not None
    feeder = Feeder.load(scenario.feeder, [p["id"] for p in scenario.participants], scenario_path.parent)
    meters = read_rows(url, "meters")
    metered = {r["time_delivery_start"]: r for r in flows if r["kind"] == "metered"}
    for r in received:
        flow = feeder.run(feeder.bus_injections(metered_injections(meters, r["slot"], r["slot"] + scenario.step)))
        assert r["vm_max_pu"] == pytest.approx(flow.vm_max_pu, abs=1e-7)
        assert metered[r["slot"]]["vm_max_pu"] == pytest.approx(flow.vm_max_pu, abs=1e-7)
        assert r["state"] == classify(flow, scenario.feeder.thresholds)
