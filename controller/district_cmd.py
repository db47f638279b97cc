"""`microte sim DISTRICT.toml`: a scenario with `[[communities]]` runs the district of
markets (docs/hierarchy.md), in this process (`--transport inproc`) or as one market
process per community and one for the district (`--transport socket`, the default), and
prints what each market traded, locally and through the district."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controller import runloop
from ledger import read_rows
from market.core.hierarchy import UPSTREAM_ID


def ledger_template(url: str) -> str:
    """A SQLite file name without `{market}` gets one: `run.db` -> `run-{market}.db`
    (a PostgreSQL URL without it means one database with a schema per market)."""
    if "{market}" in url or not url.startswith("sqlite:///"):
        return url
    stem, dot, ext = url.rpartition(".")
    return f"{stem}-{{market}}.{ext}" if dot and "/" not in ext else f"{url}-{{market}}"


def summary(urls: dict[str, str]) -> list[str]:
    lines = [f"{'market':<12} {'P2P kWh':>9} {'via upstream kWh':>17} {'grid in kWh':>12} {'grid out kWh':>13}  ledger"]
    for market, url in urls.items():
        p2p = up = grid_in = grid_out = 0
        for t in read_rows(url, "transactions"):
            if t["kind"] in ("p2p", "bess_compensation"):
                if UPSTREAM_ID in (t["seller_id"], t["buyer_id"]):
                    up += t["quantity"]
                else:
                    p2p += t["quantity"]
            elif t["kind"] == "grid_buy":
                grid_in += t["quantity"]
            elif t["kind"] == "grid_sell":
                grid_out += t["quantity"]
        kwh = f"{p2p / 1000:>9.1f} {up / 1000:>17.1f} {grid_in / 1000:>12.1f} {grid_out / 1000:>13.1f}"
        lines.append(f"{market:<12} {kwh}  {url}")
    return lines


def main(args: argparse.Namespace) -> int:
    for flag, given in (("--participants", args.participants), ("--days", args.days), ("--fleet", args.fleet)):
        if given:
            print(f"microte sim: {flag} is not for a district (set it in each community's scenario)", file=sys.stderr)
            return 2
    from controller.district_socket import run_district_socket

    ledger = ledger_template(args.ledger)
    try:
        if args.transport == "inproc":
            urls = runloop.run(_inproc(Path(args.scenario), ledger))
        else:
            urls = runloop.run(run_district_socket(Path(args.scenario), ledger))
    except ValueError as err:
        print(f"microte sim: {err}", file=sys.stderr)
        return 2
    print("\n".join(summary(urls)))
    return 0


async def _inproc(path: Path, ledger: str) -> dict[str, str]:
    from controller.hierarchy import run_district

    _run, urls, _seconds = await run_district(path, ledger)
    return urls
