"""`microte init pemt`: the PEMT-CoSim case (seed 004) as a scenario that runs as it is.

`--houses N` houses on pandapower's Kerber rural feeder, in Greensboro NC (pvlib's TMY3
file, shipped: no download) on its hottest July day: each house is a market participant
with its household load and, every third house, a PV array on the same weather; one PEM
coordinator `PEM1` runs the houses' HVAC units and trades their energy in the auction
(participants/pem_site.py). `--mode thermostat` writes the same case without PEM, the
baseline of docs/pem.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import tomli_w

from controller.scenario import load_scenario

# Greensboro's TMY3 day with the highest peak temperature in July; local standard time is
# UTC-5, so the local day starts at 05:00 UTC.
DAY_START = "2023-07-10T05:00:00Z"
SITE = "PEM1"
KW_PER_HOUSE = 1.7  # feeder capacity per house: plain thermostats exceed it on the hot afternoon


def scenario(houses: int, mode: str, seed: int, days: float) -> dict[str, Any]:
    """The scenario's tables (see the module docstring)."""
    participants: list[dict[str, Any]] = []
    for i in range(houses):
        p: dict[str, Any] = {
            "id": f"H{i + 1:02d}",
            "load": {"kind": "synthetic", "annual_kwh": 3000 + 250 * (i % 7)},
            "trader": {"kind": "fixed_price", "bid_price": 0.20, "ask_price": 0.12},
        }
        if i % 3 == 0:
            p["pv"] = {"kw": 5.0, "weather": "greensboro"}
        participants.append(p)
    capacity = round(KW_PER_HOUSE * houses, 1)
    participants.append(
        {
            "id": SITE,
            "pem": {"houses": houses, "mode": mode, "weather": "greensboro", "capacity_kw": capacity},
        }
    )
    return {
        "name": f"pemt-{mode}",
        "seed": seed,
        "start": DAY_START,
        "days": days,
        "step": 900,
        "timezone": "America/New_York",
        "market": {"close_steps": 2, "pricing": "midpoint", "round_timeout": 10.0},
        "grid": {"price": 0.08, "fee": 2.0, "tou": [{"hours": [14, 15, 16, 17, 18], "price": 0.12}]},
        "feeder": {
            "network": "kerber_landnetz_kabel_1",
            "trafo_kva": round(capacity / 0.95),  # the coordinator's capacity at power factor 0.95
            "base_load_kw": 0.0,
            "lookahead": 8,
            # The coordinator's houses hang off the transformer's busbar: their load is the
            # transformer's (the feeder's limit), not one cable's.
            "buses": {SITE: "main_busbar"},
        },
        "participants": participants,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--houses", type=int, default=30, help="thermal houses (and household participants)")
    p.add_argument("--out", required=True, type=Path, help="directory for scenario.toml")
    p.add_argument("--mode", choices=("pem", "thermostat"), default="pem", help="PEM, or plain thermostats")
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--days", type=float, default=1.0)


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.houses <= 99:
        print("microte init pemt: --houses must be 1..99", file=sys.stderr)
        return 2
    path = args.out / "scenario.toml"
    if path.exists():
        print(f"microte init pemt: {path} exists; choose another --out", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    text = f"# microte init pemt --houses {args.houses} --mode {args.mode} (docs/pem.md)\n"
    path.write_text(text + tomli_w.dumps(scenario(args.houses, args.mode, args.seed, args.days)))
    load_scenario(path)  # what was written loads as it is
    print(f"wrote {path}")
    print(f"run it: microte sim {path} --ledger sqlite:///{args.out / 'pemt.db'}")
    return 0
