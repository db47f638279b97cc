"""Scenario files (TOML): market settings, grid tariff, participants, start, days, step, seed.

```toml
name = "community"
seed = 42
start = "2026-06-01T00:00:00Z"   # or Unix seconds
days = 1
step = 900                        # slot duration, seconds
timezone = "Europe/Berlin"
[market]                          # any MarketConfig field except mode, duration, grid, timezone
close_steps = 2
pricing = "midpoint"              # midpoint | pay_as_bid | uniform
matching = "price_time"           # price_time | pro_rata (docs/protocol.md)
[grid]                            # GridTariff: price (sell, per kWh), fee, tou rules
price = 0.08
fee = 1.5
[[participants]]                  # participants.spec.ParticipantSpec
id = "H01"
...
[feeder]                          # optional: market.feeder.FeederConfig (docs/grid.md)
network = "kerber_landnetz_kabel_1"
[parity]                          # optional: /grid, market.community.ParityConfig (docs/parity.md)
lem_duration = 900                # LEM slot length, s
solve_every = 3600                # periodic LEM solver: every hour of the market clock (0: off)
solve_delay = 60                  # ... a minute after the boundary
[parity.agents]                   # optional: `microte sim` runs the Parity flow's agents
aggregator = "AGG"                # participants.parity_config.AgentsConfig (docs/parity.md)
[cosim.buildings]                 # optional: `microte cosim`'s buildings federate (docs/grid.md)
houses = 30                       # controller.buildings_federate.BuildingsConfig, decoded there
```
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np

from market.community.messages import ParityConfig
from market.core.engine import MarketConfig, canonical_config
from market.core.grid import GridTariff
from market.core.records import RunRecord
from market.feeder.network import FeederConfig
from participants.parity_config import AgentsConfig
from participants.spec import ParticipantSpec, decode_specs, synthetic_spec


class Scenario(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str = "scenario"
    seed: int = 0
    start: int | str = 0
    days: Annotated[float, msgspec.Meta(gt=0, le=3660)] = 1
    step: Annotated[int, msgspec.Meta(gt=0, le=86400)] = 900
    timezone: str = "UTC"
    market: dict[str, Any] = {}
    grid: GridTariff = GridTariff()
    participants: list[dict[str, Any]] = []
    feeder: FeederConfig | None = None  # grid physics: the DSO agent runs power flows on it
    parity: ParityConfig = ParityConfig()  # the /grid market: LEM length, periodic solver
    # `[parity.agents]`: the agents `microte sim` runs on /grid (the server ignores them)
    parity_agents: AgentsConfig | None = None
    # `[cosim.*]`: tables of `microte cosim` only, decoded strictly by it (the server ignores them)
    cosim: dict[str, Any] = {}
    # `[[communities]]`: a district of community markets (docs/hierarchy.md), decoded strictly
    # by controller/hierarchy.py; the district's own `[market]`, `[grid]` and participants.
    communities: list[dict[str, Any]] = []

    @property
    def start_time(self) -> int:
        if isinstance(self.start, int):
            t = self.start
        else:
            t = int(datetime.fromisoformat(self.start.replace("Z", "+00:00")).timestamp())
        return t - t % self.step

    @property
    def rounds(self) -> int:
        return int(self.days * 86400) // self.step

    @property
    def grid_tariff(self) -> GridTariff:
        """The grid tariff in the scenario's timezone."""
        return msgspec.structs.replace(self.grid, timezone=self.timezone)

    def market_config(self, mode: str = "sim", **overrides: Any) -> MarketConfig:
        fields: dict[str, Any] = {
            **self.market,
            "mode": mode,
            "duration": self.step,
            "timezone": self.timezone,
            "grid": msgspec.to_builtins(self.grid_tariff),
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return msgspec.convert(fields, MarketConfig, strict=False)

    def parity_config(self, **overrides: Any) -> ParityConfig:
        """The `[parity]` table with the given fields replaced (None: keep the table's)."""
        fields = {**msgspec.to_builtins(self.parity), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return msgspec.convert(fields, ParityConfig)
        except msgspec.ValidationError as exc:
            raise SystemExit(f"[parity] or --lem-* flags: {exc}") from None


def load_scenario(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """The scenario of a TOML file; `overrides` replace values by dotted key
    (`{"market.pricing": "uniform", "seed": 3}`) before it is validated."""
    data = scenario_table(path, overrides)
    parity = data.get("parity")
    if isinstance(parity, dict) and "agents" in parity:
        data = {**data, "parity": {k: v for k, v in parity.items() if k != "agents"}, "parity_agents": parity["agents"]}
    try:
        return msgspec.convert(data, Scenario, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"{path}: {exc}") from None


def scenario_table(path: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The TOML table of a scenario file with `overrides` applied (see `load_scenario`)."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    for key, value in (overrides or {}).items():
        *tables, last = key.split(".")
        node = data
        for t in tables:
            child = node.setdefault(t, {})
            if not isinstance(child, dict):
                raise SystemExit(f"{path}: cannot set {key!r}: {t!r} is not a table")
            node = child
        node[last] = value
    return data


def run_record(scenario: Scenario, config: MarketConfig) -> RunRecord:
    """The `runs` row a market writes at start (not in the digest: it holds the wall clock)."""
    started = int(time.time())
    return RunRecord(
        id=f"{scenario.name}-{scenario.seed}-{started}",
        scenario=scenario.name,
        seed=scenario.seed,
        started=started,
        config=canonical_config(config),
    )


def community(scenario: Scenario, participants: int | None) -> list[ParticipantSpec]:
    """The scenario's participants, cut or grown to `participants` with seeded synthetic ones."""
    specs = decode_specs(scenario.participants)
    if participants is None:
        return specs
    rng = np.random.default_rng(scenario.seed)
    taken = {s.id for s in specs}
    extra = (synthetic_spec(i, rng) for i in range(10**7))
    grown = specs[:participants]
    while len(grown) < participants:
        spec = next(extra)
        if spec.id not in taken:
            grown.append(spec)
    return grown
