"""Grid physics of a low-voltage feeder (seed 004, PEMT-CoSim): where participants sit on a
real feeder model, what a power flow says about their net injections, and the DSO's state
of a slot that follows from it.

- `FeederConfig`: the scenario's `[feeder]` table (network, participant -> bus mapping,
  base loads, transformer rating, thresholds).
- `Feeder`: a pandapower network with one injection element per participant bus;
  `run(bus injections) -> FlowResult` is a full AC power flow (pandapower `runpp`).
- `classify(FlowResult, Thresholds) -> GREEN | YELLOW | RED`: pure.
- `Sensitivities`: the feeder's injection shift factors (a PTDF of a radial network: an
  injection at a bus flows over every branch on its path to the slack) and branch limits;
  `limit_fills` uses them to keep P2P fills within the limits (capacity-aware clearing).

pandapower (~2 s to import) is imported only inside the functions that need a network, so
importing this module (the scenario loader, the market server) stays fast. Everything
except `load_net`/`Feeder` works on plain data.

Sign convention: an injection is the power a bus (or participant) exports to the feeder in
W (generation minus consumption; negative when it draws power). A branch flow is positive
towards the slack (the transformer and the grid above it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from market.core.capacity import Branch, CapacityLimits, Sensitivities
from market.core.protocol import GridState

if TYPE_CHECKING:  # pragma: no cover
    import pandapower as pp

# Shipped pandapower networks a scenario may name (`network = "..."`), by their function in
# `pandapower.networks`.
NETWORKS: dict[str, str] = {
    "kerber_landnetz_freileitung_1": "create_kerber_landnetz_freileitung_1",
    "kerber_landnetz_freileitung_2": "create_kerber_landnetz_freileitung_2",
    "kerber_landnetz_kabel_1": "create_kerber_landnetz_kabel_1",
    "kerber_landnetz_kabel_2": "create_kerber_landnetz_kabel_2",
    "kerber_dorfnetz": "create_kerber_dorfnetz",
    "kerber_vorstadtnetz_kabel_1": "create_kerber_vorstadtnetz_kabel_1",
    "kerber_vorstadtnetz_kabel_2": "create_kerber_vorstadtnetz_kabel_2",
    "cigre_lv": "create_cigre_network_lv",
}

SEVERITY: dict[GridState, int] = {"GREEN": 0, "YELLOW": 1, "RED": 2}
PREFIX = "microte:"  # name prefix of the injection elements the feeder adds
Band = tuple[float, float]


class Thresholds(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A voltage outside a band or a loading above a limit (percent of the rating) moves the
    slot to that state; RED wins over YELLOW. A power flow that does not converge is RED."""

    v_yellow: Band = (0.95, 1.05)
    v_red: Band = (0.92, 1.08)
    loading_yellow: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 80.0
    loading_red: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 100.0

    def __post_init__(self) -> None:
        (ry_lo, ry_hi), (rr_lo, rr_hi) = self.v_yellow, self.v_red
        if not 0 < rr_lo <= ry_lo < ry_hi <= rr_hi < 2:
            raise ValueError("voltage bands must nest: 0 < v_red[0] <= v_yellow[0] < v_yellow[1] <= v_red[1] < 2")
        if self.loading_yellow > self.loading_red:
            raise ValueError("loading_yellow must not exceed loading_red")


class FeederConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The scenario's `[feeder]` table."""

    network: str = "kerber_landnetz_kabel_1"  # a name of NETWORKS (ignored when `file` is set)
    file: str | None = None  # a pandapower JSON network (relative: to the scenario file)
    # participant -> bus (index or unique name); participants not listed are spread round
    # robin over the buses that carry the network's own loads, in load order.
    buses: dict[str, int | str] = {}
    # The network's own loads at buses without a participant: this many kW each (None keeps
    # the network's values; 0 removes them). Loads at participant buses are replaced by them.
    base_load_kw: Annotated[float, msgspec.Meta(ge=0, le=1e5)] | None = None
    trafo_kva: Annotated[float, msgspec.Meta(gt=0, le=1e6)] | None = None  # every transformer's rating
    ext_grid_vm_pu: Annotated[float, msgspec.Meta(gt=0.5, lt=1.5)] = 1.0  # slack voltage
    # pandapower's Kerber networks draw their service cables' types with Python's `random`
    # (unseeded): they are built under this seed, so the same config is the same feeder.
    network_seed: int = 0
    thresholds: Thresholds = Thresholds()
    # DSO agent: slots assessed ahead (>= the market's close_steps, so a state lands before
    # the gate), the /grid LEM slot length, and its registry id.
    lookahead: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 8
    lem_duration: Annotated[int, msgspec.Meta(gt=0, le=86400)] = 900
    dso_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "dso"
    # Capacity-aware clearing in the live market (docs/grid.md): fills that would load a
    # branch past `max_loading` x its rating, on top of the DSO's forecast flows, are cut.
    capacity: bool = False
    max_loading: Annotated[float, msgspec.Meta(gt=0, le=10)] = 1.0

    def __post_init__(self) -> None:
        if self.file is None and self.network not in NETWORKS:
            raise ValueError(f"unknown feeder network {self.network!r} (known: {', '.join(NETWORKS)}; or set file)")


class FlowResult(msgspec.Struct, frozen=True):
    """One power flow: extreme bus voltages (pu), highest line and transformer loading (% of
    rating), losses (kW; lines and transformers), and every bus voltage. None when the power
    flow did not converge."""

    converged: bool
    vm_min_pu: float | None = None
    vm_max_pu: float | None = None
    line_loading_max: float | None = None
    trafo_loading_max: float | None = None
    losses_kw: float | None = None
    vm_pu: dict[int, float] = {}

    @property
    def loading_max(self) -> float | None:
        values = [v for v in (self.line_loading_max, self.trafo_loading_max) if v is not None]
        return max(values) if values else None


def classify(result: FlowResult, t: Thresholds) -> GridState:
    """GREEN, YELLOW or RED from a power flow's extremes and the thresholds."""
    if not result.converged or result.vm_min_pu is None or result.vm_max_pu is None:
        return "RED"
    lo, hi, load = result.vm_min_pu, result.vm_max_pu, result.loading_max or 0.0
    if lo < t.v_red[0] or hi > t.v_red[1] or load > t.loading_red:
        return "RED"
    if lo < t.v_yellow[0] or hi > t.v_yellow[1] or load > t.loading_yellow:
        return "YELLOW"
    return "GREEN"


def worst(states: Sequence[GridState]) -> GridState:
    return max(states, key=SEVERITY.__getitem__, default="GREEN")


def average_w(energy_wh: float, start: int, end: int) -> float:
    """Average power in W of `energy_wh` over [start, end)."""
    return energy_wh * 3600.0 / (end - start)


def load_net(config: FeederConfig, base_dir: str | Path | None = None) -> pp.pandapowerNet:
    """The configured network: a shipped one or a pandapower JSON file."""
    import random

    import pandapower as pp
    import pandapower.networks as pn

    if config.file is not None:
        path = Path(config.file)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        return pp.from_json(str(path))
    state = random.getstate()  # leave everyone else's random numbers alone
    try:
        random.seed(config.network_seed)
        return getattr(pn, NETWORKS[config.network])()
    finally:
        random.setstate(state)


def _bus_index(net: Any, ref: int | str) -> int:
    if isinstance(ref, int):
        if ref not in net.bus.index:
            raise ValueError(f"feeder has no bus {ref}")
        return ref
    hits = net.bus.index[net.bus.name == ref].tolist()
    if len(hits) != 1:
        raise ValueError(f"feeder bus name {ref!r} matches {len(hits)} buses")
    return int(hits[0])


def map_participants(net: Any, config: FeederConfig, participants: Sequence[str]) -> dict[str, int]:
    """participant -> bus: the configured ones, the rest round robin over the load buses."""
    unknown = sorted(set(config.buses) - set(participants))
    if unknown:
        raise ValueError(f"feeder maps unknown participants: {', '.join(unknown)}")
    load_buses = list(dict.fromkeys(int(b) for b in net.load.sort_index().bus))
    if not load_buses:
        load_buses = [int(b) for b in net.bus.index if net.bus.at[b, "vn_kv"] < 1.0]
    out: dict[str, int] = {}
    n = 0
    for pid in participants:
        ref = config.buses.get(pid)
        if ref is None:
            out[pid] = load_buses[n % len(load_buses)]
            n += 1
        else:
            out[pid] = _bus_index(net, ref)
    return out


class Feeder:
    """A feeder with participants on buses; `run` is one AC power flow (pandapower)."""

    def __init__(self, net: Any, config: FeederConfig, participants: Sequence[str]) -> None:
        import pandapower as pp

        self.config = config
        self.net = net
        self.bus_of = map_participants(net, config, participants)
        hosts = sorted(set(self.bus_of.values()))
        own = ~net.load.name.fillna("").astype(str).str.startswith(PREFIX)
        at_host = net.load.bus.isin(hosts)
        net.load.loc[own & at_host, "in_service"] = False  # participants replace the house there
        if config.base_load_kw is not None:
            net.load.loc[own & ~at_host, "p_mw"] = config.base_load_kw / 1000.0
            net.load.loc[own & ~at_host, "q_mvar"] = 0.0
        if config.trafo_kva is not None:
            net.trafo["sn_mva"] = config.trafo_kva / 1000.0
        net.ext_grid["vm_pu"] = config.ext_grid_vm_pu
        self.element_of: dict[int, int] = {
            bus: int(pp.create_load(net, bus, p_mw=0.0, q_mvar=0.0, name=f"{PREFIX}{bus}")) for bus in hosts
        }
        self._sens: Sensitivities | None = None
        self.runs = 0

    @classmethod
    def load(cls, config: FeederConfig, participants: Sequence[str], base_dir: str | Path | None = None) -> Feeder:
        return cls(load_net(config, base_dir), config, participants)

    def bus_injections(self, injections_w: Mapping[str, float]) -> dict[int, float]:
        """Participants' injections (W) summed per bus; participants not on the feeder are ignored."""
        out: dict[int, float] = {}
        for pid in sorted(injections_w):
            bus = self.bus_of.get(pid)
            if bus is not None:
                out[bus] = out.get(bus, 0.0) + injections_w[pid]
        return out

    def run(self, bus_injections_w: Mapping[int, float]) -> FlowResult:
        """AC power flow with these injections (W per bus, unity power factor) at the
        participant buses (others inject 0) on top of the base loads."""
        import pandapower as pp

        net = self.net
        unknown = sorted(set(bus_injections_w) - set(self.element_of))
        if unknown:
            raise ValueError(f"no participant on buses {unknown}")
        for bus, element in self.element_of.items():
            net.load.at[element, "p_mw"] = -bus_injections_w.get(bus, 0.0) / 1e6
        self.runs += 1
        try:
            # Only the loads' P changes between runs: pandapower reuses its internal model
            # (3x faster; the result agrees with a fresh run to ~1e-9).
            pp.runpp(net, numba=False, recycle={"trafo": False, "gen": False, "bus_pq": True})
        except pp.LoadflowNotConverged:
            return FlowResult(converged=False)
        return flow_result(net)

    def sensitivities(self) -> Sensitivities:
        """Shift factors and limits, rated at the lowest voltage of the RED band (a branch
        carries its rated current with fewer kW at a lower voltage)."""
        if self._sens is None:
            self._sens = sensitivities(self.net, self.config.thresholds.v_red[0])
        return self._sens

    def capacity_limits(self, max_loading: float = 1.0) -> CapacityLimits:
        return CapacityLimits(dict(self.bus_of), self.sensitivities(), max_loading)


def flow_result(net: Any) -> FlowResult:
    """The extremes of a network's last power flow results."""
    bus = net.res_bus.vm_pu[net.bus.in_service]
    lines = net.res_line.loading_percent[net.line.in_service]
    trafos = net.res_trafo.loading_percent[net.trafo.in_service]
    losses = float(net.res_line.pl_mw.sum()) + float(net.res_trafo.pl_mw.sum() if len(net.trafo) else 0.0)
    return FlowResult(
        converged=True,
        vm_min_pu=float(bus.min()),
        vm_max_pu=float(bus.max()),
        line_loading_max=float(lines.max()) if len(lines) else None,
        trafo_loading_max=float(trafos.max()) if len(trafos) else None,
        losses_kw=losses * 1000.0,
        vm_pu={int(b): float(v) for b, v in bus.items()},
    )


def sensitivities(net: Any, v_pu: float = 1.0) -> Sensitivities:
    """Paths from every bus to the slack over in-service lines, transformers and closed
    bus-bus switches, and each branch's limit in kW at `v_pu` (unity power factor);
    raises ValueError for a meshed network."""
    import numpy as np

    open_lines = set()
    if len(net.switch):
        sw = net.switch
        open_lines = {int(e) for e in sw.element[(sw.et == "l") & ~sw.closed.astype(bool)]}
    branches: list[Branch] = []
    edges: list[tuple[int, int, int]] = []  # (bus, bus, branch)
    for i, row in net.line[net.line.in_service].iterrows():
        if int(i) in open_lines:
            continue
        kv = float(net.bus.at[row.from_bus, "vn_kv"])
        limit = math.sqrt(3) * kv * v_pu * float(row.max_i_ka) * float(row.df) * float(row.parallel) * 1000.0
        edges.append((int(row.from_bus), int(row.to_bus), len(branches)))
        branches.append(Branch("line", int(i), str(row["name"]) if row["name"] is not None else f"line {i}", limit))
    for i, row in net.trafo[net.trafo.in_service].iterrows():
        edges.append((int(row.hv_bus), int(row.lv_bus), len(branches)))
        name = str(row["name"]) if row["name"] is not None else f"trafo {i}"
        branches.append(Branch("trafo", int(i), name, float(row.sn_mva) * float(row.parallel) * v_pu * 1000.0))
    if len(net.switch):
        sw = net.switch
        for i, row in sw[(sw.et == "b") & sw.closed.astype(bool)].iterrows():
            edges.append((int(row.bus), int(row.element), len(branches)))
            branches.append(Branch("switch", int(i), str(row["name"]), math.inf))
    slacks = net.ext_grid.bus[net.ext_grid.in_service].tolist()
    if len(slacks) != 1:
        raise ValueError("sensitivities need exactly one external grid (slack)")
    slack = int(slacks[0])
    adjacent: dict[int, list[tuple[int, int]]] = {}
    for a, b, br in edges:
        adjacent.setdefault(a, []).append((b, br))
        adjacent.setdefault(b, []).append((a, br))
    paths: dict[int, tuple[int, ...]] = {slack: ()}
    queue = [slack]
    seen_edges = 0
    while queue:
        bus = queue.pop()
        for other, br in adjacent.get(bus, []):
            if other in paths:
                continue
            paths[other] = (br, *paths[bus])
            seen_edges += 1
            queue.append(other)
    live = {int(b) for b in np.asarray(net.bus.index[net.bus.in_service])}
    reached_edges = sum(1 for a, b, _ in edges if a in paths and b in paths)
    if reached_edges != seen_edges:
        raise ValueError("the feeder is meshed: sensitivities need a radial network")
    return Sensitivities(
        branches=tuple(branches),
        paths={b: p for b, p in sorted(paths.items()) if b in live},
        slack=slack,
        v_pu=v_pu,
    )
