"""`microte participant`: connect a scenario's prosumers to a running market until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from controller import runloop


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8765", help="market server address")
    p.add_argument("--scenario", required=True, help="scenario TOML with the participants' devices and traders")
    p.add_argument("--registry", required=True, help="TOML with each participant's id and token")
    p.add_argument("--id", action="append", dest="ids", help="only these participants (repeatable)")
    p.add_argument(
        "--connect-retry",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="keep retrying while nothing listens at --url for this long (a refusal is final at once; default 30)",
    )
    p.add_argument(
        "--ledger",
        metavar="URL",
        help="sqlite:/// or postgresql:// ledger for a pem site's house rows (docs/pem.md; required with one)",
    )
    p.add_argument("--log-level", default="INFO")


def _tokens(path: str) -> dict[str, str]:
    import tomllib

    with open(path, "rb") as f:
        data = tomllib.load(f)
    return {e["id"]: e["token"] for e in data.get("participants", []) if "token" in e}


async def run(args: argparse.Namespace) -> int:
    # Imported here: `microte market` shares this module's arguments, not the client stack.
    from controller.scenario import load_scenario
    from controller.site_records import plain_database, site_records
    from participants.fleet import Fleet
    from participants.spec import decode_specs

    scenario = load_scenario(args.scenario)
    tokens = _tokens(args.registry)
    everyone = decode_specs(scenario.participants)
    specs = [s for s in everyone if not args.ids or s.id in args.ids]
    if any(s.pem is not None for s in specs) and not (args.ledger and plain_database(args.ledger)):
        raise SystemExit("a pem site writes its houses' rows: give --ledger sqlite:///... or postgresql://...")
    absent = [s.id for s in specs if s.id not in tokens]
    if absent:
        raise SystemExit(f"no token in {args.registry} for: {', '.join(absent)}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fleet = Fleet(
        args.url,
        [(s, tokens[s.id]) for s in specs],
        scenario.seed,
        timezone=scenario.timezone,
        base_dir=Path(args.scenario).parent,
        connect_retry=args.connect_retry,
        others=everyone,
    )
    async with fleet, site_records([c.prosumer for c in fleet.clients], args.ledger) as flush:
        logging.getLogger("microte.participant").info("%d participants connected to %s", len(specs), args.url)
        while not stop.is_set():  # the houses' rows go out about every second, and at the end
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            await flush()
    for pid, st in fleet.stats().items():
        print(f"{pid}: rounds={st.rounds} fills={st.fills} cost={st.cost / 1e6:.2f} errors={st.errors}")
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return runloop.run(run(args))
