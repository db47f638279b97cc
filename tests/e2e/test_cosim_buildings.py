"""`microte cosim` with the buildings federate (issue #18 item 5): real HELICS broker, the
market, grid, weather and buildings federates as processes on loopback.

The houses' values are checked against the PEM core run directly, the grid's target
against the rule recomputed from the ledger's forecast rows, and the metered power flows
against the same run without the houses."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.test_feeder import SCENARIO

pytest.importorskip("helics")
pytest.importorskip("pandapower")

from controller import cosim
from controller.dso import metered_injections
from controller.scenario import load_scenario
from ledger import read_rows
from market.feeder.network import Feeder, load_net
from participants.pem import PemConfig, initial_state, simulate
from participants.thermal import houses
from participants.weather import pvlib_tmy3

ROUNDS = 4
TABLE = "[cosim.buildings]\nhouses = 10\ndt = 60\npacket_seconds = 300\n"


def evening(tmp_path: Path, table: str = TABLE) -> Path:
    """The feeder scenario from 18:00 UTC (afternoon heat in Greensboro, the houses' TMY3),
    the transformer held to 25 % for the houses' target, so that the coordinator denies."""
    text = SCENARIO.read_text()
    start = next(line for line in text.splitlines() if line.startswith("start = "))
    trafo = next(line for line in text.splitlines() if line.startswith("trafo_kva = "))
    text = text.replace(start, 'start = "2026-06-15T18:00:00Z"').replace(trafo, f"{trafo}\nmax_loading = 0.25")
    path = tmp_path / "buildings.toml"
    path.write_text(f"{text}\n{table}")
    return path


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cosim.add_arguments(parser)
    return parser.parse_args(list(argv))


def rows(url: str, kind: str) -> dict[int, dict]:
    return {r["time_delivery_start"]: r for r in read_rows(url, "grid_flows") if r["kind"] == kind}


async def test_the_houses_load_reaches_the_grid_under_the_target_it_computes(tmp_path: Path) -> None:
    path = evening(tmp_path)
    url, bare = f"sqlite:///{tmp_path}/b.db", f"sqlite:///{tmp_path}/bare.db"
    out = await asyncio.to_thread(cosim.run_all, parse(str(path), "--rounds", str(ROUNDS), "--ledger", url), timeout=90)
    assert set(out) == {"broker", "market", "grid", "weather", "buildings"}
    sc = load_scenario(path)
    assert sc.feeder is not None
    d = sc.step
    slots = [sc.start_time + k * d for k in range(ROUNDS)]
    published = out["buildings"]["slots"]
    assert [s["time_delivery"] for s in published] == [[t, t + d] for t in slots]
    assert out["buildings"]["untargeted"] == 0

    # The target of each slot: 63 kVA x 0.25 minus the feeder head's import in the
    # forecast power flow of that slot (re-run here from the ledger's forecast row).
    feeder = Feeder.load(sc.feeder, [p["id"] for p in sc.participants], path.parent)
    forecast = rows(url, "forecast")
    for s in published:
        feeder.run({int(b): w for b, w in json.loads(forecast[s["time_delivery"][0]]["buses"]).items()})
        head_w = float(feeder.net.res_trafo.p_hv_mw.sum()) * 1e6
        assert s["target_w"] == pytest.approx(max(0.0, 63_000 * 0.25 - head_w), abs=1.0)
    assert sum(s["requested"] - s["accepted"] for s in published) > 0  # the target binds: requests denied

    # The houses' values are the PEM core's on the scenario's seed, Greensboro 2026, with the
    # published targets, houses round robin over the feeder's 8 load buses.
    h = houses(10, sc.seed)
    weather = pvlib_tmy3(2026)
    buses = [int(b) for b in load_net(sc.feeder, path.parent).load.sort_index().bus]
    assert len(buses) == 8
    state = initial_state(h, sc.seed)
    for s in published:
        t = s["time_delivery"][0]
        traj = simulate(h, weather, t, t + d, 60, "pem", s["target_w"], sc.seed, PemConfig(packet_seconds=300), state)
        state = traj.final
        wh: dict[str, float] = {}
        for i, e in enumerate(traj.hvac_w.sum(axis=1) * 60 / 3600):
            wh[str(buses[i % 8])] = wh.get(str(buses[i % 8]), 0.0) + float(e)
        assert s["energy_wh"] == pytest.approx(wh, abs=1e-6)
        assert s["load_w"] == pytest.approx({b: e * 3600 / d for b, e in wh.items()}, abs=1e-3)
        assert (s["requested"], s["accepted"]) == (int(traj.requested.sum()), int(traj.accepted.sum()))
    total_wh = sum(sum(s["energy_wh"].values()) for s in published)
    assert total_wh > 5000 and out["grid"]["houses_kwh"] == pytest.approx(total_wh / 1000, abs=1e-5)

    # The metered flows ran on the meters' injections minus the houses' load; each row says
    # so in its buses and injection and re-runs from them.
    metered, meters = rows(url, "metered"), read_rows(url, "meters")
    assert sorted(metered) == slots
    for s in published:
        t = s["time_delivery"][0]
        want = feeder.bus_injections(metered_injections(meters, t, t + d))
        for b, w in s["load_w"].items():
            want[int(b)] = want.get(int(b), 0.0) - w
        got = {int(b): w for b, w in json.loads(metered[t]["buses"]).items()}
        assert got == pytest.approx(want, abs=0.01)
        assert metered[t]["injection_kw"] * 1000 == pytest.approx(sum(want.values()), abs=0.01)
        assert metered[t]["vm_min_pu"] == pytest.approx(feeder.run(got).vm_min_pu, abs=1e-7)

    # The same run without the houses (`--no-buildings`: three federates, as before): the
    # same meters and forecasts; each metered row's injection is higher by the houses' load.
    argv = ["--rounds", str(ROUNDS), "--ledger", bare, "--no-buildings"]
    out_bare = await asyncio.to_thread(cosim.run_all, parse(str(path), *argv), timeout=90)
    assert "buildings" not in out_bare and "houses_kwh" not in out_bare["grid"]
    assert {t: r["buses"] for t, r in rows(bare, "forecast").items()} == {t: r["buses"] for t, r in forecast.items()}
    without = rows(bare, "metered")
    for s in published:
        t = s["time_delivery"][0]
        houses_kw = sum(s["load_w"].values()) / 1000
        assert without[t]["injection_kw"] - metered[t]["injection_kw"] == pytest.approx(houses_kw, abs=1e-5)
        assert metered[t]["vm_min_pu"] < without[t]["vm_min_pu"]  # the houses pull the voltage down


def test_a_bad_buildings_table_is_refused_before_anything_starts(tmp_path: Path) -> None:
    path = evening(tmp_path, "[cosim.buildings]\nhouses = 4\ncolour = 'red'\n")
    started = time.monotonic()
    with pytest.raises(SystemExit, match=r"\[cosim\.buildings\]: Object contains unknown field `colour`"):
        cosim.run_all(parse(str(path), "--rounds", "1", "--ledger", f"sqlite:///{tmp_path}/x.db"))
    assert time.monotonic() - started < 5


async def test_a_buildings_federate_that_cannot_start_ends_the_run_at_once(tmp_path: Path) -> None:
    """A bus name the feeder does not have: only the buildings federate (which loads the
    feeder) finds out, and exits before registering while the others wait for it at the
    broker. They are stopped and the run fails in seconds, naming it and its reason."""
    path = evening(tmp_path, "[cosim.buildings]\nhouses = 4\nbuses = ['no_such_bus']\n")
    args = parse(str(path), "--rounds", "2", "--ledger", f"sqlite:///{tmp_path}/x.db")
    started = time.monotonic()
    why = r"the buildings federate failed \(exit 1\): ValueError: \[cosim.buildings\] buses: bus name 'no_such_bus'"
    with pytest.raises(RuntimeError, match=why):
        await asyncio.to_thread(cosim.run_all, args, timeout=120)
    assert time.monotonic() - started < 30


def test_the_broker_port_leaves_the_ports_of_its_federates_cores_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """HELICS's broker on P hands its local federates P + 5, P + 6, ...: one of them taken
    failed a start in 20 with four federates ("unable to register federate")."""
    while True:
        bad = cosim.free_port()
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", bad + 8))  # the 4th federate's
        except OSError:
            holder.close()
            continue
        break
    with holder:
        offered = iter([bad, 0])
        real = cosim.free_port
        monkeypatch.setattr(cosim, "free_port", lambda: next(offered) or real())
        port = cosim.broker_port(federates=4)
        assert port != bad
        for p in (port, port + 1, *range(port + 5, port + 9)):
            assert cosim.port_is_free(p)
