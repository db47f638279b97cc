"""`microte market`: run the market server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time

from aiohttp import web

from controller import runloop
from controller.scenario import Scenario, load_scenario
from ledger import open_sink
from market.core.records import RunRecord
from market.core.registry import Registry
from market.server.app import MarketServer, canonical_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", required=True, help="TOML file of participants (id, token, role)")
    p.add_argument("--scenario", help="scenario TOML: market settings and grid tariff (flags override it)")
    p.add_argument("--mode", choices=["sim", "rt"], default="sim")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    p.add_argument("--ledger", default="sqlite:///microte.db", help="ledger URL (sqlite:///file, postgresql://...)")
    p.add_argument("--duration", type=int, help="slot duration in seconds")
    p.add_argument("--close-steps", type=int)
    p.add_argument("--round-timeout", type=float, help="seconds a sim round waits for meter readings")
    p.add_argument("--meter-grace", type=float, help="rt: seconds after a slot's end that readings are accepted")
    p.add_argument(
        "--durability",
        choices=["ack", "round"],
        help="ack: entries and readings durable before each reply (rt default); "
        "round: durable with the round, before the step reply (sim default)",
    )
    p.add_argument("--serializer", choices=["json", "msgpack"], default="json")
    p.add_argument("--log-level", default="INFO")


async def serve(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario) if args.scenario else Scenario()
    config = scenario.market_config(
        args.mode,
        duration=args.duration,
        close_steps=args.close_steps,
        round_timeout=args.round_timeout,
        meter_grace=args.meter_grace,
        durability=args.durability,
    )
    run = RunRecord(
        id=f"{scenario.name}-{scenario.seed}-{int(time.time())}",
        scenario=scenario.name,
        seed=scenario.seed,
        started=int(time.time()),
        config=canonical_config(config),
    )
    server = MarketServer(
        config, Registry.from_toml(args.registry), open_sink(args.ledger), serializer=args.serializer, run=run
    )
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"microte market listening on http://{args.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    logging.getLogger("microte.market").info("shutting down: closing connections, flushing the ledger")
    await runner.cleanup()
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return runloop.run(serve(args))
