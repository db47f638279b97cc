"""The DSO agent (controller/dso.py): forecasts and meters -> power flow -> `grid_state.set`,
against a real market server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import socketio

from controller.dso import DsoAgent, flow_record, forecast_injections, metered_injections, summary
from controller.scenario import Scenario
from market.core.records import Batch, GridFlowRecord, MeterRecord
from market.core.registry import Registry
from market.core.sink import MemorySink
from market.feeder.network import Feeder, FlowResult
from market.server.app import MarketServer
from participants.profiles import build_profiles
from participants.spec import decode_specs
from tests.e2e.conftest import serving

pytest.importorskip("pandapower")

NOON = 1_781_517_600  # 2026-06-15 10:00 UTC, noon in Berlin
IDS = [f"H{i}" for i in range(1, 9)]
TOKENS = {"dso": "tok-dso", "CTL": "tok-ctl"} | {p: f"tok-{p}" for p in IDS}


def scenario(trafo_kva: float = 40.0, **feeder: Any) -> Scenario:
    return msgspec.convert(
        {
            "name": "dso-test",
            "seed": 3,
            "start": NOON,
            "step": 900,
            "timezone": "Europe/Berlin",
            "participants": [
                {"id": p, "load": {"kind": "synthetic", "annual_kwh": 3000}, "pv": {"kw": 12.0}} for p in IDS
            ],
            "feeder": {"network": "kerber_landnetz_kabel_1", "trafo_kva": trafo_kva, "base_load_kw": 0.3, **feeder},
        },
        Scenario,
    )


@pytest.fixture(scope="module")
def feeder() -> Feeder:
    sc = scenario()
    assert sc.feeder is not None
    return Feeder.load(sc.feeder, IDS)


def test_forecast_and_metered_injections() -> None:
    sc = scenario()
    profiles = {s.id: build_profiles(s, sc.seed, sc.timezone) for s in decode_specs(sc.participants)}
    inj = forecast_injections(profiles, NOON, NOON + 900)
    gen, load = profiles["H1"].slot((NOON, NOON + 900))
    assert inj["H1"] == pytest.approx((sum(gen.values()) - load) * 4.0)
    assert inj["H1"] > 1000  # noon in June: PV exports
    rows = [
        MeterRecord(
            "m1", "H1", NOON, NOON + 900, '{"solar":1500}', '{"bess":{},"other":{"external":0,"solar":200}}', NOON
        ).row(),
        MeterRecord("m2", "H2", NOON, NOON + 900, "{}", '{"bess":{},"other":{"external":250}}', NOON).row(),
        MeterRecord("m3", "H3", NOON + 900, NOON + 1800, "{}", '{"bess":{},"other":{"external":9}}', NOON).row(),
    ]
    assert metered_injections(rows, NOON, NOON + 900) == {"H1": 6000.0, "H2": -1000.0}


def test_flow_record_and_summary() -> None:
    r = flow_record("metered", (0, 900), FlowResult(converged=False), "RED", {"a": 1500.0, "b": -500.0}, 900)
    assert r == GridFlowRecord(
        "pf0.metered", "metered", 0, 900, "RED", False, None, None, None, None, None, 1.0, 2, 900
    )
    s = summary([r])
    assert s["metered"]["states"] == {"GREEN": 0, "YELLOW": 0, "RED": 1} and s["forecast"]["slots"] == 0


@asynccontextmanager
async def market(sink: MemorySink) -> AsyncIterator[tuple[str, MarketServer]]:
    roles = {"dso": "dso", "CTL": "controller"}
    registry = Registry.from_dict(
        {"participants": [{"id": p, "token": t, "role": roles.get(p, "prosumer")} for p, t in TOKENS.items()]}
    )
    server = MarketServer(scenario().market_config("sim", round_timeout=0.5), registry, sink)
    async with serving(server) as url:
        yield url, server


async def test_the_agent_sets_red_before_the_gate_and_records_flows(feeder: Feeder) -> None:
    sink = MemorySink()
    async with market(sink) as (url, server):
        agent = DsoAgent(scenario(), feeder, pid="dso", token=TOKENS["dso"], sink=sink)
        await agent.connect(url)
        try:
            await agent.before_step(NOON)
            lookahead = 8
            assert sorted(agent.assessed) == [NOON + 900 * i for i in range(lookahead)]
            forecasts = [r for r in agent.records if r.kind == "forecast"]
            assert len(forecasts) == lookahead and {r.state for r in forecasts} == {"RED"}
            assert all(r.trafo_loading_max is not None and r.trafo_loading_max > 100 for r in forecasts)
            # The auction has the states, and /grid wrote them to the ledger.
            assert all(server.market.grid_states.get(NOON + 900 * i) == "RED" for i in range(lookahead))
            assert len(await sink.read("grid_states")) == lookahead
            assert len(await sink.read("grid_flows")) == lookahead
            # The next round assesses one more slot; nothing is set twice.
            await server.step(NOON, None)
            await agent.after_step((NOON, NOON + 900))
            await agent.before_step(NOON + 900)
            assert len(agent.assessed) == lookahead + 1 and len(await sink.read("grid_states")) == lookahead + 1
            assert agent.state_of(NOON + 1800, 900) == "RED" and agent.errors == []
            # Metered: the readings of the slot that was delivered, read back from the ledger.
            await sink.write(
                Batch(
                    tuple(
                        MeterRecord(f"m{NOON}-{p}", p, NOON, NOON + 900, '{"solar":100}', '{"other":{}}', NOON)
                        for p in IDS
                    )
                )
            )
            await agent.after_step((NOON, NOON + 900))
            metered = [r for r in agent.records if r.kind == "metered"]
            assert len(metered) == 1 and metered[0].injection_kw == pytest.approx(3.2)
            assert metered[0].state == "GREEN" and metered[0].participants == len(IDS)
            assert len(agent.flow_seconds) == lookahead + 2
        finally:
            await agent.close()


async def test_a_green_feeder_sets_nothing_and_a_listening_agent_follows_start_round(feeder: Feeder) -> None:
    sink = MemorySink()
    big = scenario(trafo_kva=400.0)
    assert big.feeder is not None
    async with market(sink) as (url, _server):
        agent = DsoAgent(big, Feeder.load(big.feeder, IDS), pid="dso", token=TOKENS["dso"], sink=sink)
        await agent.connect(url, listen=True)
        ctl = socketio.AsyncClient(reconnection=False)
        await ctl.connect(url, namespaces=["/simulation"], auth={"id": "CTL", "token": TOKENS["CTL"]})
        try:
            reply = await ctl.call("step", {"time": NOON}, namespace="/simulation", timeout=10)
            assert reply["ok"]
            for _ in range(200):  # start_round reaches the agent asynchronously
                if len(agent.assessed) == 8:
                    break
                await asyncio.sleep(0.02)
            # Listening, it assesses from next_settle (the slots before are cleared already).
            assert sorted(agent.assessed) == [NOON + 1800 + 900 * i for i in range(8)]
            states = {r.state for r in agent.records}
            assert states == {"GREEN"} and await sink.read("grid_states") == []
            assert json.loads(json.dumps(summary(agent.records)))["forecast"]["slots"] == 8
        finally:
            await ctl.disconnect()
            await agent.close()


def test_grid_report_slot_table_joins_flows_states_and_fills() -> None:
    from controller.grid_view import slot_table

    def flow(kind: str, start: int, vmax: float, trafo: float) -> dict[str, Any]:
        row = flow_record(kind, (start, start + 900), FlowResult(True, 1.0, vmax, 20.0, trafo, 1.0), "GREEN", {}, 0)
        return msgspec.structs.asdict(row)

    flows = [flow("forecast", 0, 1.04, 70), flow("metered", 0, 1.041, 71), flow("forecast", 900, 1.06, 120)]
    flows.append(flow("forecast", 1800, 1.0, 1))  # beyond the last metered slot: left out... unless metered
    flows.append(flow("metered", 900, 1.061, 121))
    states = [
        {"time_delivery_start": 900, "time_delivery_end": 1800, "state": "YELLOW", "revision": 0},
        {"time_delivery_start": 900, "time_delivery_end": 1800, "state": "RED", "revision": 1},
    ]
    fills = [
        {"time_delivery_start": 0, "time_delivery_end": 900, "quantity": 1000, "price_buy": 0.2, "price_sell": 0.1},
        {"time_delivery_start": 0, "time_delivery_end": 900, "quantity": 3000, "price_buy": 0.1, "price_sell": 0.1},
    ]
    txs = [{"time_delivery_start": 900, "kind": "grid_buy", "price_buy": 0.3, "price_sell": 0.3}]
    rows = slot_table(flows, states, fills, txs)
    assert [(r.start, r.state, r.source) for r in rows] == [(0, "GREEN", "both"), (900, "RED", "both")]
    assert rows[0].vm_max_pu == 1.041 and rows[0].forecast_vm_max_pu == 1.04 and rows[0].forecast_loading_max == 70
    assert rows[0].fills == 2 and rows[0].p2p_kwh == 4.0
    assert rows[0].p2p_price_buy == pytest.approx(0.125) and rows[0].p2p_price_sell == pytest.approx(0.1)
    assert rows[1].trafo_loading_max == 121 and rows[1].grid_price_buy == 0.3 and rows[1].p2p_price_buy is None
