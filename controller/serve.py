"""`microte market`: run the market server until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
from pathlib import Path

from aiohttp import web

from controller import runloop
from controller.parity_flags import add_parity_arguments, parity_overrides
from controller.scenario import Scenario, load_scenario, run_record
from ledger import open_sink
from market.core.capacity import CapacityLimits
from market.core.clearing import MATCHINGS
from market.core.registry import Registry
from market.server.app import MarketServer
from market.server.guard import ConnectionGuard
from market.server.upstream import UpstreamLink


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
        "--matching",
        choices=list(MATCHINGS),
        help="who trades within a tied price level: price_time (earliest first, default) or pro_rata "
        "(in proportion to quantity)",
    )
    p.add_argument(
        "--durability",
        choices=["ack", "round"],
        help="ack: entries and readings durable before each reply (rt default); "
        "round: durable with the round, before the step reply (sim default)",
    )
    p.add_argument(
        "--in-district",
        action="store_true",
        help="a community in a district (docs/hierarchy.md): keep each slot's residuals and take the "
        "district's fills from the controller (/simulation upstream.*)",
    )
    p.add_argument(
        "--upstream",
        metavar="URL",
        help="rt: join the district market at URL as --upstream-id (docs/hierarchy.md); implies --in-district",
    )
    p.add_argument("--upstream-id", metavar="ID", help="this community's participant id in the district")
    p.add_argument("--upstream-token-file", metavar="FILE", help="file holding this community's token in the district")
    p.add_argument("--serializer", choices=["json", "msgpack"], default="json")
    p.add_argument("--log-level", default="INFO")
    # Connection bounds (docs/reliability.md, Bounds).
    p.add_argument("--auth-timeout", type=float, default=5.0, help="seconds a connection has to log in (then closed)")
    p.add_argument(
        "--max-pending", type=int, default=512, help="connections not logged in kept at once (the oldest is closed)"
    )
    p.add_argument("--max-per-address", type=int, default=4096, help="connections one client address may hold")
    p.add_argument(
        "--inbound-rate",
        type=float,
        default=1_000_000.0,
        help="bytes per second a logged-in connection may send, per participant it speaks for",
    )
    p.add_argument(
        "--inbound-burst", type=float, default=2_000_000.0, help="bytes a logged-in connection may send at once"
    )
    p.add_argument(
        "--outbox-mib",
        type=_mib,
        default=256.0,
        help="private events kept for `resume`, in all: MiB (estimated; the oldest go first)",
    )
    add_parity_arguments(p)
    p.add_argument(
        "--capacity",
        action="store_true",
        help="capacity-aware clearing on the scenario's [feeder] (as `capacity = true` there; docs/grid.md)",
    )


def _mib(text: str) -> float:
    """A size in MiB: a finite number, 0 or more (0: nothing kept)."""
    try:
        mib = float(text)
    except ValueError:
        mib = math.nan
    if not math.isfinite(mib) or mib < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in MiB (a number, 0 or more)")
    return mib


async def serve(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario) if args.scenario else Scenario()
    config = scenario.market_config(
        args.mode,
        duration=args.duration,
        close_steps=args.close_steps,
        round_timeout=args.round_timeout,
        meter_grace=args.meter_grace,
        durability=args.durability,
        matching=args.matching,
    )
    parity = scenario.parity_config(**parity_overrides(args))
    run = run_record(scenario, config)
    guard = ConnectionGuard(
        auth_timeout=args.auth_timeout,
        max_pending=args.max_pending,
        max_per_address=args.max_per_address,
        inbound_rate=args.inbound_rate,
        inbound_burst=args.inbound_burst,
    )
    server = MarketServer(
        config,
        Registry.from_toml(args.registry),
        open_sink(args.ledger),
        serializer=args.serializer,
        run=run,
        guard=guard,
        in_district=args.in_district or bool(args.upstream),
        outbox_bytes=int(args.outbox_mib * 2**20),
    )
    if args.upstream:
        if args.mode != "rt":
            raise SystemExit("--upstream is for rt markets; in sim the district's controller links the markets")
        if not (args.upstream_id and args.upstream_token_file):
            raise SystemExit("--upstream needs --upstream-id and --upstream-token-file")
        token = Path(args.upstream_token_file).read_text().strip()
        server.upstream_link = UpstreamLink(server, args.upstream, args.upstream_id, token, args.serializer)
    server.grid.configure(parity)
    if scenario.feeder is not None and (scenario.feeder.capacity or args.capacity):
        server.market.capacity = feeder_limits(scenario, Path(args.scenario).parent, server.registry.ids("prosumer"))
    elif args.capacity:
        raise SystemExit("--capacity needs a scenario with a [feeder] table")
    # Connections are closed at shutdown (MarketServer._close_connections); a handler still
    # running 1 s later is cancelled, so SIGTERM exits in about 2 s.
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    runloop.settle_heap()
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


def feeder_limits(scenario: Scenario, base_dir: Path, prosumers: list[str]) -> CapacityLimits:
    """The feeder's branch limits for capacity-aware clearing, with the prosumers on their
    buses as the DSO agent maps them (registry order: the order `microte sim` writes)."""
    from market.feeder.network import Feeder  # pandapower: only a market that asks for it

    assert scenario.feeder is not None
    feeder = Feeder.load(scenario.feeder, prosumers, base_dir)
    return feeder.capacity_limits(scenario.feeder.max_loading)
