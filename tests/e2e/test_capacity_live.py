"""Capacity-aware clearing in the live market (issue #18 item 4, docs/grid.md): turned on
from the scenario (`[feeder] capacity = true`) or `microte market --capacity`, fed the DSO
agent's forecast branch flows each round (`grid_flows.set` on `/grid`), and every cut on
the ledger (`curtailments`) with the branch that bound it."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from controller.dso import forecast_injections
from controller.scenario import load_scenario
from controller.sim import run_sim
from ledger import read_rows
from market.feeder.network import Feeder
from participants.profiles import build_profiles
from participants.spec import decode_specs
from tests.e2e.test_feeder import morning
from tests.e2e.test_grid import Q, T, connect, ok, refused, running, step


async def test_a_sim_run_curtails_fills_to_the_feeder_and_says_why(tmp_path: Path) -> None:
    """The feeder scenario's morning with capacity-aware clearing at 10 % of every rating:
    some fills are cut; each cut names its binding branch; what was kept is exactly the
    settlement's quantity; and no slot's kept fills plus the DSO's forecast flows load any
    branch past its limit on the clearing's own (lossless) model."""
    path = morning(tmp_path)
    ledger = f"sqlite:///{tmp_path / 'cap.db'}"
    overrides = {"feeder.capacity": True, "feeder.max_loading": 0.1}
    result = await run_sim(path, ledger=ledger, days=0.125, progress=False, overrides=overrides)
    assert result.missing_total == 0
    cuts = read_rows(ledger, "curtailments")
    fills = {s["commit_id"]: s for s in read_rows(ledger, "settlements")}
    assert cuts, "10 % of the ratings must bind somewhere in the morning"
    assert any(c["kept"] for c in cuts) and any(not c["kept"] for c in cuts)  # cut to what fits, and dropped
    for c in cuts:
        assert 0 <= c["kept"] < c["cleared"]
        # Cut to what fits: the binding branch had room for `kept` and no more (a dropped
        # fill: not even 1 Wh, the base alone may be past the limit).
        per_wh = 3600 / (c["time_delivery_end"] - c["time_delivery_start"])
        assert (c["kept"] + 1) * per_wh > c["limit_w"] - c["flow_w"] >= c["kept"] * per_wh - 1e-6 or (
            not c["kept"] and c["flow_w"] >= c["limit_w"]
        )
        if c["kept"]:
            f = fills[c["commit_id"]]
            assert (f["bid_uuid"], f["ask_uuid"], f["quantity"]) == (c["bid_uuid"], c["ask_uuid"], c["kept"])
        else:
            assert c["commit_id"] is None
    # The base flows the market used are the DSO agent's forecast on the lossless model,
    # for every slot whose gate was still open when the agent could first send them.
    scenario = load_scenario(path, overrides)
    assert scenario.feeder is not None
    specs = decode_specs(scenario.participants)
    feeder = Feeder.load(scenario.feeder, [s.id for s in specs], path.parent)
    sens = feeder.sensitivities()
    assert {c["branch"] for c in cuts} <= {b.name for b in sens.branches}
    profiles = {s.id: build_profiles(s, scenario.seed, scenario.timezone, path.parent) for s in specs}
    d = scenario.step
    bases = {r["time_delivery_start"]: json.loads(r["flows_w"]) for r in read_rows(ledger, "base_flows")}
    slots = [scenario.start_time + i * d for i in range(int(0.125 * 86400) // d)]
    assert set(slots[2:-2]) <= set(bases)  # all but the first slots (closed before the first round)
    for start, base in bases.items():
        forecast = sens.flows(feeder.bus_injections(forecast_injections(profiles, start, start + d)))
        assert base == pytest.approx(forecast)
    # Kept fills on top of the base never push a branch past 10 % of its rating (or past
    # its base flow, where the base alone is over it: then fills may only relieve it).
    by_slot: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for f in fills.values():
        by_slot[f["time_delivery_start"]].append(f)
    for start, slot_fills in by_slot.items():
        base = bases.get(start, [0.0] * len(sens.branches))
        flow = list(base)
        for f in slot_fills:
            seller, buyer = feeder.bus_of.get(f["seller_id"]), feeder.bus_of.get(f["buyer_id"])
            up = set(sens.paths[seller]) if seller is not None else set()
            down = set(sens.paths[buyer]) if buyer is not None else set()
            for b in up - down:
                flow[b] += f["quantity"] * 3600 / d
            for b in down - up:
                flow[b] -= f["quantity"] * 3600 / d
        for b, br in enumerate(sens.branches):
            cap = br.limit_kw * 1000 * 0.1
            assert min(-cap, base[b]) - 1e-6 <= flow[b] <= max(cap, base[b]) + 1e-6, (start, br.name)


async def test_grid_flows_set_is_checked_and_changes_nothing_when_refused(ledger_url: str) -> None:
    """Only the DSO; only with capacity on; one value per branch; only while the gate is open."""
    async with running(ledger_url) as (url, ns):
        ctl, dso, p1 = await connect(url, "CTL", "/simulation"), await connect(url, "DSO"), await connect(url, "P1")
        await step(ctl, T - 120)
        body = {"time_delivery": [T + 60, T + 120], "flows_w": [0.0]}
        await refused(dso, "grid_flows.set", body, "invalid")  # capacity-aware clearing is off
        from market.core.capacity import Branch, CapacityLimits, Sensitivities

        sens = Sensitivities(
            (Branch("trafo", 0, "t", 100.0), Branch("line", 0, "l", 30.0)), {0: (), 1: (0,), 2: (1, 0)}, 0
        )
        ns.ms.market.capacity = CapacityLimits({"P1": 2, "P2": 1}, sens)
        await refused(p1, "grid_flows.set", {**body, "flows_w": [0.0, 0.0]}, "forbidden")
        await refused(dso, "grid_flows.set", body, "invalid")  # one value for two branches
        await refused(dso, "grid_flows.set", {**body, "flows_w": [0.0, "1"]}, "invalid")
        await refused(dso, "grid_flows.set", {**body, "flows_w": [0.0, float("inf")]}, "invalid")
        await refused(dso, "grid_flows.set", {"time_delivery": [T - 120, T - 60], "flows_w": [0.0, 0.0]}, "closed")
        await refused(dso, "grid_flows.set", {"time_delivery": [T + 61, T + 121], "flows_w": [0.0, 0.0]}, "invalid")
        assert ns.ms.market.base_flows == {}
        got = await ok(dso, "grid_flows.set", {**body, "flows_w": [1000.0, 25_000.0]})
        assert got == {"ok": True, "time_delivery": [T + 60, T + 120], "branches": 2}
        assert ns.ms.market.base_flows == {T + 60: [1000.0, 25_000.0]}
        for c in (ctl, dso, p1):
            await c.disconnect()
    assert Q == 900
