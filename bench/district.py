"""A district of C communities x N prosumers in lockstep (docs/hierarchy.md, issue 22).

Writes C community scenarios of N seeded synthetic prosumers each (a different seed per
community) and a district over them, then runs them in one process (controller/hierarchy.py)
and over sockets (a `microte market` process per market, controller/district_socket.py),
and the same communities without the district. Prints rounds/s, CPU per community per
round, the projection to M machines, and the district's effect on self-sufficiency and
money.

    python bench/district.py [--communities 20] [--prosumers 50] [--days 0.25] [--no-socket]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tomli_w

from controller.district_socket import run_district_socket
from controller.hierarchy import run_district
from controller.inproc import run_inproc
from controller.scenario import load_scenario
from ledger import read_rows
from market.core.hierarchy import UPSTREAM_ID
from participants.spec import decode_specs, synthetic_spec, to_table

HEAD = {
    "start": "2026-06-15T00:00:00Z",
    "step": 900,
    "timezone": "Europe/Berlin",
    "market": {"close_steps": 2, "pricing": "midpoint"},
    "grid": {"price": 0.08, "fee": 2.0},
}


def write_district(out: Path, communities: int, prosumers: int, days: float) -> Path:
    refs = []
    for c in range(communities):
        rng = np.random.default_rng(1000 + c)
        specs = [to_table(synthetic_spec(i, rng)) for i in range(prosumers)]
        sc = {"name": f"c{c:02d}", "seed": 100 + c, "days": days, **HEAD, "participants": specs}
        (out / f"c{c:02d}.toml").write_text(tomli_w.dumps(sc))
        refs.append({"id": f"c{c:02d}", "scenario": f"c{c:02d}.toml"})
    district = {"name": "district", "seed": 9, "days": days, **HEAD, "communities": refs}
    path = out / "district.toml"
    path.write_text(tomli_w.dumps(district))
    return path


def cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def money(urls: dict[str, str], communities: list[str]) -> tuple[int, int, int]:
    """(grid imports Wh, grid exports Wh, net paid micro-currency) of the communities' members."""
    imports = exports = paid = 0
    for c in communities:
        for t in read_rows(urls[c], "transactions"):
            if t["kind"] == "grid_buy" and t["buyer_id"] != UPSTREAM_ID:
                imports += t["quantity"]
            if t["kind"] == "grid_sell" and t["seller_id"] != UPSTREAM_ID:
                exports += t["quantity"]
            if t["buyer_id"] != UPSTREAM_ID and t["buyer_id"] != "grid":
                paid += t["amount_buy"]
            if t["seller_id"] not in (UPSTREAM_ID, "grid"):
                paid -= t["amount_sell"]
    return imports, exports, paid


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--communities", type=int, default=20)
    p.add_argument("--prosumers", type=int, default=50)
    p.add_argument("--days", type=float, default=0.25)
    p.add_argument("--no-socket", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        path = write_district(out, args.communities, args.prosumers, args.days)
        rounds = load_scenario(path).rounds
        ids = [f"c{c:02d}" for c in range(args.communities)]
        c0 = cpu()
        run, urls, seconds = asyncio.run(run_district(path, f"sqlite:///{out}/in-{{market}}.db"))
        c1 = cpu()
        load = os.getloadavg()[0]
        print(f"{args.communities} communities x {args.prosumers} prosumers, {rounds} rounds, load {load:.2f}")
        print(
            f"in-process: {rounds / seconds:.1f} rounds/s ({seconds:.2f} s), "
            f"CPU {(c1 - c0) / rounds / args.communities * 1000:.2f} ms per community per round; "
            f"{run.passed_up} residual orders up, {run.brought_down} fills down"
        )
        if not args.no_socket:
            timing: dict[str, float] = {}
            sock = asyncio.run(run_district_socket(path, f"sqlite:///{out}/so-{{market}}.db", timing=timing))
            wall = timing["rounds"]
            per = {k: timing[k] / rounds * 1000 for k in ("below", "top", "down")}
            print(
                f"sockets: {rounds / wall:.1f} rounds/s ({wall:.2f} s; start-up of {len(sock)} processes "
                f"{timing['startup']:.1f} s); per round: communities stepping and passing their residuals up "
                f"{per['below']:.0f} ms (all {args.communities} at once on {os.cpu_count()} CPUs), district step "
                f"{per['top']:.0f} ms, fills down {per['down']:.0f} ms; "
                f"CPU {timing['cpu'] / rounds / args.communities * 1000:.1f} ms per community per round "
                "(every market, member and controller process, rounds only)"
            )
            serial = per["top"] + per["down"]
            parallel = per["below"]
            for m in (1, 2, 5, 10, 20):
                # The communities spread over m machines of this kind; the district round and the
                # barrier stay serial (the controller waits for the slowest community).
                print(f"  projection, {m} machine(s): {1000 / (parallel / m + serial):.1f} rounds/s")
        alone: dict[str, str] = {}
        for c in ids:
            sc = load_scenario(out / f"{c}.toml")
            alone[c] = f"sqlite:///{out}/alone-{c}.db"
            asyncio.run(run_inproc(sc, decode_specs(sc.participants), ledger=alone[c]))
        with_d, without = money(urls, ids), money(alone, ids)
        print(
            f"grid imports {without[0] / 1000:.1f} -> {with_d[0] / 1000:.1f} kWh, "
            f"exports {without[1] / 1000:.1f} -> {with_d[1] / 1000:.1f} kWh, "
            f"members' net bill {without[2] / 1e6:.2f} -> {with_d[2] / 1e6:.2f} (currency units) with the district"
        )


if __name__ == "__main__":
    main()
