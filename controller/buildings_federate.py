"""The buildings federate of `microte cosim` (issue #18 item 5; docs/grid.md, "Buildings federate").

N thermal houses (participants/thermal.py) whose HVACs run under PEM controllers and a PEM
coordinator (participants/pem.py), or under plain thermostats, stepped `dt` seconds at a
time through every market slot. Per slot it publishes the houses' HVAC power and energy per
feeder bus (`buildings/hvac`), which the grid federate adds to the bus injections of its
metered power flow; it subscribes to the coordinator's target (`grid/buildings_target`),
the feeder capacity the grid's forecast leaves for the houses (`target_w`).

The scenario's `[cosim.buildings]` table configures it (`BuildingsConfig`, decoded
strictly); without the table `microte cosim` runs without this federate. The pure parts
(decoding, bus assignment, the target rule, the published values) are apart from
`buildings_federate`, the HELICS shell.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from controller import helics_io as io
from controller.scenario import Scenario

if TYPE_CHECKING:
    from participants.pem import Trajectory

log = logging.getLogger("microte.cosim.buildings")

KEYS = {"hvac": "buildings/hvac", "target": "grid/buildings_target"}


class BuildingsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The scenario's `[cosim.buildings]` table."""

    houses: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 30
    # houses, start temperatures and PEM draws are seeded by the scenario's seed + this
    seed_offset: int = 0
    # the TMY3 year is mapped onto this calendar year (default: the scenario start's, UTC)
    weather_year: Annotated[int, msgspec.Meta(ge=1900, le=2200)] | None = None
    tmy3: str | None = None  # a TMY3 file (relative: to the scenario); default pvlib's Greensboro NC
    mode: Literal["pem", "thermostat"] = "pem"
    dt: Annotated[int, msgspec.Meta(gt=0, le=3600)] = 60  # house step, s; divides the slot
    packet_seconds: Annotated[int, msgspec.Meta(gt=0, le=86400)] = 300
    # house i sits on buses[i % len(buses)] (index or unique name; each must carry a market
    # participant); empty: round robin over the feeder's load buses that carry one
    buses: list[int | str] = []


def buildings_config(sc: Scenario, where: str) -> BuildingsConfig | None:
    """The `[cosim.buildings]` table of a scenario, or None without one; a bad table (an
    unknown key, a wrong type, a `dt` that does not divide the slot) exits naming it."""
    unknown = sorted(set(sc.cosim) - {"buildings"})
    if unknown:
        raise SystemExit(
            f"{where}: unknown table(s) {', '.join(f'[cosim.{k}]' for k in unknown)} (known: [cosim.buildings])"
        )
    if "buildings" not in sc.cosim:
        return None
    try:
        cfg = msgspec.convert(sc.cosim["buildings"], BuildingsConfig)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"{where}: [cosim.buildings]: {exc}") from None
    if sc.step % cfg.dt:
        raise SystemExit(f"{where}: [cosim.buildings]: dt = {cfg.dt} does not divide the slot ({sc.step} s)")
    return cfg


# -- pure helpers --------------------------------------------------------------------------------


def default_buses(load_buses: Sequence[int], hosts: Collection[int]) -> list[int]:
    """The feeder's load buses, in load order, that carry a market participant."""
    return [b for b in dict.fromkeys(load_buses) if b in hosts]


def assign_buses(n: int, candidates: Sequence[int], hosts: Collection[int]) -> list[int]:
    """House i on candidates[i % len(candidates)] (round robin, like participants without a
    `[feeder.buses]` entry). Every bus must carry a market participant: the grid federate
    adds the houses to that bus's injection (its feeder has a load element there only)."""
    if n and not candidates:
        raise ValueError("no bus for the houses: the feeder has no load bus with a market participant")
    bare = sorted(set(candidates) - set(hosts))
    if bare:
        raise ValueError(f"bus(es) {bare} carry no market participant (houses must share a participant's bus)")
    return [candidates[i % len(candidates)] for i in range(n)]


def target_w(rating_w: float, max_loading: float, head_import_w: float | None) -> float:
    """The feeder capacity left for the houses: the transformers' rating times `max_loading`
    minus the forecast import at the feeder head (W; an export adds room), floored at 0. A
    forecast power flow that did not converge (None) leaves nothing."""
    if head_import_w is None or not math.isfinite(head_import_w):
        return 0.0
    return max(0.0, rating_w * max_loading - head_import_w)


def slot_target(message: Mapping[str, Any] | None, start: int) -> float | None:
    """The target of the slot starting at `start` in a `grid/buildings_target` value, if any."""
    if message is None or message.get("time_delivery", [None])[0] != start:
        return None
    return float(message["target_w"])


def slot_values(
    traj: Trajectory, bus_of_house: Sequence[int], start: int, end: int, target: float | None
) -> dict[str, Any]:
    """The `buildings/hvac` value of one slot: HVAC energy (Wh) and mean power (W drawn)
    per bus, the peak of the houses' total, the target used (None: no limit) and counts."""
    import numpy as np

    per_house_ws = traj.hvac_w.sum(axis=1) * traj.dt  # int64: W*s is exact
    ws: dict[int, int] = {}
    for bus, e in zip(bus_of_house, per_house_ws.tolist(), strict=True):
        ws[bus] = ws.get(bus, 0) + int(e)
    order = sorted(ws)
    return {
        "time_delivery": [start, end],
        "load_w": {str(b): round(ws[b] / (end - start), 3) for b in order},
        "energy_wh": {str(b): round(ws[b] / 3600, 6) for b in order},
        "peak_w": int(np.max(traj.load_w)) if len(traj.load_w) else 0,
        "target_w": target,
        "requested": int(traj.requested.sum()),
        "accepted": int(traj.accepted.sum()),
        "opted_out_steps": int(traj.opted_out.sum()),
    }


# -- what the grid federate needs for the houses (a pandapower net) -----------------------------


def trafo_rating_w(net: Any) -> float:
    """The in-service transformers' rating in W (kVA at unity power factor)."""
    t = net.trafo[net.trafo.in_service]
    if not len(t):
        raise ValueError("the buildings target needs a transformer at the feeder head; the feeder has none")
    return float((t.sn_mva * t.parallel).sum()) * 1e6


def head_import_w(net: Any) -> float:
    """Power into the feeder through its transformers (HV side) in the last power flow, W."""
    return float(net.res_trafo.p_hv_mw[net.trafo.in_service].sum()) * 1e6


def _bus(net: Any, ref: int | str) -> int:
    if isinstance(ref, int):
        if ref not in net.bus.index:
            raise ValueError(f"[cosim.buildings] buses: the feeder has no bus {ref}")
        return ref
    hits = net.bus.index[net.bus.name == ref].tolist()
    if len(hits) != 1:
        raise ValueError(f"[cosim.buildings] buses: bus name {ref!r} matches {len(hits)} buses")
    return int(hits[0])


def house_buses(sc: Scenario, cfg: BuildingsConfig, base: Path) -> list[int]:
    """The bus of every house on the scenario's feeder (see `BuildingsConfig.buses`)."""
    from market.feeder.network import load_net, map_participants
    from participants.spec import decode_specs

    assert sc.feeder is not None
    net = load_net(sc.feeder, base)
    hosts = set(map_participants(net, sc.feeder, [s.id for s in decode_specs(sc.participants)]).values())
    load_buses = [int(b) for b in net.load.sort_index().bus]
    candidates = [_bus(net, r) for r in cfg.buses] if cfg.buses else default_buses(load_buses, hosts)
    return assign_buses(cfg.houses, candidates, hosts)


# -- the federate --------------------------------------------------------------------------------


def buildings_federate(
    scenario_path: str, sc: Scenario, cfg: BuildingsConfig, broker: str, rounds: int
) -> dict[str, Any]:
    """The houses through `rounds` slots; see the module docstring and docs/grid.md for the
    time sequence (it runs at tau + 2 of every slot, between the grid's target and its
    metered power flow)."""
    from participants.pem import PemConfig, initial_state, simulate
    from participants.thermal import houses
    from participants.weather import pvlib_tmy3, read_tmy3

    base = Path(scenario_path).parent
    year = cfg.weather_year or dt.datetime.fromtimestamp(sc.start_time, dt.UTC).year
    weather = read_tmy3(base / cfg.tmy3, year) if cfg.tmy3 else pvlib_tmy3(year)
    seed = sc.seed + cfg.seed_offset
    h = houses(cfg.houses, seed)
    bus_of_house = house_buses(sc, cfg, base)
    pem = PemConfig(packet_seconds=cfg.packet_seconds)
    state = initial_state(h, seed)

    fed = io.federate("buildings", broker)
    pub, sub = io.publish(fed, KEYS["hvac"]), io.subscribe(fed, KEYS["target"])
    io.enter_executing(fed)
    d = sc.step
    slots: list[dict[str, Any]] = []
    untargeted = 0
    try:
        for k in range(rounds):
            io.request(fed, k * d + 2)
            t = sc.start_time + k * d
            target = slot_target(io.receive(sub), t)
            if target is None:
                untargeted += 1
                if untargeted == 1:
                    log.warning(
                        "no coordinator target from the grid for slot %d (%s): the houses run without a limit",
                        t,
                        KEYS["target"],
                    )
            traj = simulate(
                h, weather, t, t + d, cfg.dt, cfg.mode, math.inf if target is None else target, seed, pem, state
            )
            state = traj.final
            values = slot_values(traj, bus_of_house, t, t + d, target)
            io.send(pub, values)
            slots.append(values)
    finally:
        io.close(fed)
    return {
        "federate": "buildings",
        "houses": cfg.houses,
        "mode": cfg.mode,
        "weather": f"{weather.name} ({weather.station}) onto {year}",
        "untargeted": untargeted,
        "slots": slots,
    }
