"""`microte sim DISTRICT.toml`: a scenario with `[[communities]]` runs the district of
markets (docs/hierarchy.md), in this process (`--transport inproc`) or as one market
process per community and one for the district (`--transport socket`, the default), and
prints what each market traded, locally and through the district."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from controller import runloop
from controller.run_report.district import summary


def ledger_template(url: str) -> str:
    """A SQLite file name without `{market}` gets one: `run.db` -> `run-{market}.db`
    (a PostgreSQL URL without it means one database with a schema per market)."""
    if "{market}" in url or not url.startswith("sqlite:///"):
        return url
    stem, dot, ext = url.rpartition(".")
    return f"{stem}-{{market}}.{ext}" if dot and "/" not in ext else f"{url}-{{market}}"


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
