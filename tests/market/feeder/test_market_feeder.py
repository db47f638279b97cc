"""Feeders (market/feeder.py): bus mapping, real pandapower power flows, thresholds,
sensitivities and capacity-aware limits on fills."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from market.core.book import Entry, tie_key
from market.core.capacity import CapacityLimits, limit_fills
from market.core.clearing import Fill, clear
from market.feeder.network import Feeder, FeederConfig, FlowResult, Thresholds, classify, load_net, worst

pp = pytest.importorskip("pandapower")

KERBER = FeederConfig(network="kerber_landnetz_kabel_1", base_load_kw=0.5)
HOUSES = [f"H{i:02d}" for i in range(1, 17)]  # two per load bus of the Kerber feeder


def test_importing_the_feeder_module_does_not_import_pandapower() -> None:
    code = "import sys, market.feeder, controller.scenario; print('pandapower' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- thresholds (pure) ---------------------------------------------------------------------------


def result(vmin: float = 1.0, vmax: float = 1.0, line: float = 10.0, trafo: float = 10.0) -> FlowResult:
    return FlowResult(True, vmin, vmax, line, trafo, 0.1)


@pytest.mark.parametrize(
    ("flow", "state"),
    [
        (result(), "GREEN"),
        (result(vmax=1.05), "GREEN"),  # on the band's edge is inside
        (result(vmax=1.0501), "YELLOW"),
        (result(vmin=0.949), "YELLOW"),
        (result(line=80.5), "YELLOW"),
        (result(trafo=100.0), "YELLOW"),
        (result(trafo=100.1), "RED"),
        (result(vmax=1.081), "RED"),
        (result(vmin=0.919, line=85), "RED"),
        (FlowResult(converged=False), "RED"),
    ],
)
def test_classify_by_voltage_band_and_loading(flow: FlowResult, state: str) -> None:
    assert classify(flow, Thresholds()) == state


def test_thresholds_must_nest_and_configs_name_known_networks() -> None:
    with pytest.raises(ValueError, match="nest"):
        Thresholds(v_yellow=(0.9, 1.1), v_red=(0.92, 1.08))
    with pytest.raises(ValueError, match="loading_yellow"):
        Thresholds(loading_yellow=110)
    with pytest.raises(msgspec.ValidationError, match="unknown feeder network"):
        msgspec.convert({"network": "atlantis"}, FeederConfig)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"netwrok": "kerber_dorfnetz"}, FeederConfig)  # a typo fails loudly
    assert worst(["GREEN", "RED", "YELLOW"]) == "RED" and worst([]) == "GREEN"


# -- real power flows ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kerber() -> Feeder:
    return Feeder.load(KERBER, HOUSES)


def direct(config: FeederConfig, bus_kw: dict[int, float]) -> Any:
    """pandapower on its own: the same network, base loads and injections as static generators."""
    net = load_net(config)
    host = net.load.bus.isin(list(bus_kw))
    net.load.loc[host, "in_service"] = False
    net.load.loc[~host, "p_mw"] = (config.base_load_kw or 0) / 1000
    net.load.loc[~host, "q_mvar"] = 0.0
    if config.trafo_kva:
        net.trafo["sn_mva"] = config.trafo_kva / 1000
    net.ext_grid["vm_pu"] = config.ext_grid_vm_pu
    for bus, kw in bus_kw.items():
        pp.create_sgen(net, bus, p_mw=kw / 1000)
    pp.runpp(net, numba=False)
    return net


def test_a_shipped_network_is_the_same_every_time_and_leaves_random_alone() -> None:
    import random

    random.seed(99)
    expected = random.random()
    random.seed(99)
    # Kerber networks draw their service cables with `random`: built under `network_seed`.
    nets = [load_net(KERBER) for _ in range(3)]
    assert random.random() == expected
    assert all(n.line.std_type.tolist() == nets[0].line.std_type.tolist() for n in nets)
    other = load_net(msgspec.structs.replace(KERBER, network_seed=5))
    assert other.line.std_type.tolist() != nets[0].line.std_type.tolist()


def test_participants_fill_the_load_buses_round_robin_or_as_mapped(kerber: Feeder) -> None:
    load_buses = list(dict.fromkeys(int(b) for b in load_net(KERBER).load.bus))
    assert [kerber.bus_of[h] for h in HOUSES] == load_buses * 2
    cfg = FeederConfig(buses={"H02": "loadbus_2_2", "H03": 5})
    f = Feeder.load(cfg, ["H01", "H02", "H03"])
    assert f.bus_of == {"H01": load_buses[0], "H02": 17, "H03": 5}
    assert f.bus_injections({"H01": 1000.0, "H03": 500.0, "X": 9.0}) == {load_buses[0]: 1000.0, 5: 500.0}
    with pytest.raises(ValueError, match="unknown participants"):
        Feeder.load(FeederConfig(buses={"ZZ": 3}), ["H01"])
    with pytest.raises(ValueError, match="matches 0 buses"):
        Feeder.load(FeederConfig(buses={"H01": "nowhere"}), ["H01"])


def test_noon_pv_on_a_kerber_feeder_is_red_and_matches_pandapower_run_directly(kerber: Feeder) -> None:
    morning = kerber.bus_injections({h: 1500.0 if i % 2 else -600.0 for i, h in enumerate(HOUSES)})
    noon = kerber.bus_injections(dict.fromkeys(HOUSES, 8500.0))  # 136 kW of PV behind 100 kVA
    calm, heavy = kerber.run(morning), kerber.run(noon)
    assert classify(calm, KERBER.thresholds) == "GREEN"
    assert classify(heavy, KERBER.thresholds) == "RED"
    assert heavy.vm_max_pu is not None and heavy.vm_max_pu > 1.05  # PV lifts the voltage at the ends
    assert heavy.trafo_loading_max is not None and heavy.trafo_loading_max > 100
    # pandapower on its own, on the same network and injections, says the same (to Newton-
    # Raphson's precision: the feeder reuses pandapower's model between runs).
    net = direct(KERBER, {b: w / 1000 for b, w in noon.items()})
    assert heavy.vm_max_pu == pytest.approx(net.res_bus.vm_pu.max(), abs=1e-7)
    assert heavy.vm_min_pu == pytest.approx(net.res_bus.vm_pu.min(), abs=1e-7)
    assert heavy.line_loading_max == pytest.approx(net.res_line.loading_percent.max(), abs=1e-4)
    assert heavy.trafo_loading_max == pytest.approx(net.res_trafo.loading_percent.max(), abs=1e-4)
    losses = (net.res_line.pl_mw.sum() + net.res_trafo.pl_mw.sum()) * 1000
    assert heavy.losses_kw == pytest.approx(losses, abs=1e-4)
    assert heavy.vm_pu == pytest.approx({int(b): v for b, v in net.res_bus.vm_pu.items()}, abs=1e-7)
    again = kerber.run(morning)  # the same injections, the same result
    assert again.vm_pu == pytest.approx(calm.vm_pu, abs=1e-7) and again.loading_max == pytest.approx(calm.loading_max)


def test_yellow_between_the_thresholds_and_a_smaller_transformer(kerber: Feeder) -> None:
    mid = kerber.bus_injections(dict.fromkeys(HOUSES, 5300.0))
    r = kerber.run(mid)
    assert classify(r, KERBER.thresholds) == "YELLOW"  # the transformer above 80 %
    small = Feeder.load(msgspec.structs.replace(KERBER, trafo_kva=40), HOUSES)
    assert classify(small.run(mid), KERBER.thresholds) == "RED"


def test_a_users_pandapower_json_and_cigre_lv(tmp_path: Path) -> None:
    net = load_net(KERBER)
    pp.to_json(net, str(tmp_path / "mine.json"))
    mine = Feeder.load(FeederConfig(file="mine.json", base_load_kw=0.5), HOUSES, base_dir=tmp_path)
    inj = {h: 4000.0 for h in HOUSES}
    a, b = mine.run(mine.bus_injections(inj)), Feeder.load(KERBER, HOUSES).run(mine.bus_injections(inj))
    assert a.vm_pu == pytest.approx(b.vm_pu, abs=1e-7) and a.loading_max == pytest.approx(b.loading_max, abs=1e-4)
    cigre = Feeder.load(FeederConfig(network="cigre_lv"), HOUSES)
    r = cigre.run(cigre.bus_injections({h: 2000.0 for h in HOUSES}))
    assert r.converged and classify(r, Thresholds()) in ("GREEN", "YELLOW")
    assert len(cigre.sensitivities().paths) == len(cigre.net.bus)


# -- sensitivities and capacity-aware clearing -------------------------------------------------


def test_sensitivities_estimate_the_branch_flows_of_the_power_flow(kerber: Feeder) -> None:
    sens = kerber.sensitivities()
    assert sens.paths[sens.slack] == () and sens.v_pu == 0.92
    inj = kerber.bus_injections({h: 3000.0 if i % 3 else -2000.0 for i, h in enumerate(HOUSES)})
    kerber.run(inj)
    flows = sens.flows(inj)
    for b, br in enumerate(sens.branches):
        if br.kind == "line":
            # pandapower's p_to_mw: power arriving at the slack-side bus... lines run away from the slack here
            actual = -kerber.net.res_line.at[br.index, "p_from_mw"] * 1e6
        else:
            actual = -kerber.net.res_trafo.at[br.index, "p_hv_mw"] * 1e6
        assert flows[b] == pytest.approx(actual, rel=0.05, abs=150)  # lossless: the estimate includes the losses
    ptdf = sens.ptdf()
    assert len(ptdf) == len(sens.branches) and all(v in (0.0, 1.0) for row in ptdf for v in row)


def entry(pid: str, side: str, qty: int, price: float, slot: int = 0) -> Entry:
    uuid = f"{pid}.{slot}.{side}"
    return Entry(
        uuid=uuid,
        id=None,
        participant=pid,
        side=side,  # type: ignore[arg-type]
        quantity=qty,
        price=price,
        time_delivery=(slot, slot + 900),
        source="solar" if side == "ask" else None,
        time_submission=0,
        tie=tie_key(uuid),
    )


def test_capacity_aware_fills_keep_every_branch_within_its_limit() -> None:
    """Sellers at the end of branch 1 sell to buyers on branch 2: unconstrained, the branch-1
    cable carries more than its rating; limited, the power flow stays within 100 %."""
    cfg = FeederConfig(
        network="kerber_landnetz_kabel_1",
        base_load_kw=0.0,
        buses={"S1": "loadbus_1_6", "S2": "loadbus_1_6", "S3": "loadbus_1_5", "B1": "loadbus_2_1", "B2": "loadbus_2_2"},
    )
    ids = ["S1", "S2", "S3", "B1", "B2"]
    feeder = Feeder.load(cfg, ids)
    # 15 kWh in 15 minutes: 60 kW each; S1 and S2 share the 98 kW service cable of loadbus_1_6.
    asks = [entry("S1", "ask", 15_000, 0.10), entry("S2", "ask", 15_000, 0.11), entry("S3", "ask", 15_000, 0.12)]
    bids = [entry("B1", "bid", 20_000, 0.25), entry("B2", "bid", 20_000, 0.24)]
    fills = clear(bids, asks)

    def physical(fs: list[Fill]) -> dict[str, float]:  # each fill as delivered: seller exports, buyer imports
        out: dict[str, float] = dict.fromkeys(ids, 0.0)
        for f in fs:
            out[f.ask.participant] += f.quantity * 4.0
            out[f.bid.participant] -= f.quantity * 4.0
        return out

    free = feeder.run(feeder.bus_injections(physical(fills)))
    assert free.line_loading_max is not None and free.line_loading_max > 100
    limits = feeder.capacity_limits()
    kept = limit_fills(fills, limits, 900)
    assert 0 < sum(f.quantity for f in kept) < sum(f.quantity for f in fills)
    capped = feeder.run(feeder.bus_injections(physical(kept)))
    assert capped.line_loading_max is not None and capped.line_loading_max <= 100
    assert capped.trafo_loading_max is not None and capped.trafo_loading_max <= 100
    # Merit order: the cheapest ask keeps its fill whole; the rest is what still fits.
    assert kept[0] == fills[0]
    assert all(k.quantity <= f.quantity for k, f in zip(kept, fills, strict=False))
    # Not on the feeder (say, a participant at the slack) or no branch in common: nothing to cut.
    far = CapacityLimits({}, limits.sensitivities)
    assert limit_fills(fills, far, 900) == fills


def test_limit_fills_counts_the_base_flow_and_relief() -> None:
    feeder = Feeder.load(FeederConfig(base_load_kw=0.0), ["A", "B"])
    limits = feeder.capacity_limits()
    sens = limits.sensitivities
    a, b = feeder.bus_of["A"], feeder.bus_of["B"]
    fills = clear([entry("B", "bid", 10_000, 0.2)], [entry("A", "ask", 10_000, 0.1)])
    # A base flow that fills branch A's first line up to its limit leaves no room to export more...
    first = sens.paths[a][0]
    base = [0.0] * len(sens.branches)
    base[first] = sens.branches[first].limit_kw * 1000
    if first in sens.paths[b]:  # (A and B share it: the trade does not cross it)
        pytest.skip("A and B share the line")
    assert limit_fills(fills, limits, 900, base) == []
    # ...while a flow the other way makes room.
    base[first] = -sens.branches[first].limit_kw * 1000
    assert limit_fills(fills, limits, 900, base) == fills
