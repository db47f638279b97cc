"""The `microte` command: `market` (serve), `participant` (clients), `sim` (a whole run), `ledger`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any

from controller import parity_flags

# Subcommand -> (module with its `add_arguments` and `main`, help). A command's module is
# imported only when that command runs (or its --help is asked): `microte --help` and
# `microte sim` do not import the stacks of the others (the server, HELICS, the report).
COMMANDS: dict[str, tuple[str | None, str]] = {
    "market": ("controller.serve", "run the market server"),
    "participant": ("controller.participant", "connect participant clients of a scenario"),
    "sim": (None, "simulate a scenario over real socket.io on loopback (or in-process)"),
    "flexsim": ("controller.flexsim", "simulate aggregator flexibility: fair vs reputation (seed 001)"),
    "dso": ("controller.dso", "DSO agent: power flows on the scenario's feeder, grid states on /grid"),
    "grid-report": ("controller.grid_report", "voltage and loading per slot next to P2P volume and prices (PNG)"),
    "report": ("controller.run_report", "a run's figures and one self-contained HTML page, from its ledger"),
    "cosim": ("controller.cosim", "HELICS co-simulation: market, pandapower grid, weather (and buildings) federates"),
    "sweep": ("controller.sweep", "run every combination of scenario values over several seeds, compare the KPIs"),
    "init": ("controller.init_cmd", "a market's registry and scenario from a seed's config file"),
    "pseudonym": ("controller.pseudonym_cmd", "/grid pseudonyms: resolve them (the operator, by key)"),
    "ledger": (None, "ledger tools"),
}


def _module(command: str) -> Any:
    name = COMMANDS[command][0]
    assert name is not None
    return importlib.import_module(name)


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line; given `argv`, only the arguments of the command it names are set
    up (every command is listed either way), else those of all commands."""
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    p = argparse.ArgumentParser(prog="microte", description="microte local energy market")
    sub = p.add_subparsers(dest="command", required=True)
    for command, (_, help) in COMMANDS.items():
        c = sub.add_parser(command, help=help)
        if argv is not None and command != named:
            continue
        if command == "sim":
            _sim_arguments(c)
        elif command == "ledger":
            _ledger_arguments(c)
        else:
            _module(command).add_arguments(c)
    return p


def _sim_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("scenario", help="scenario TOML file")
    s.add_argument("--ledger", default="sqlite:///microte-sim.db", help="ledger URL (a SQLite file is rewritten)")
    s.add_argument("--participants", type=int, help="scale the community to N (seeded synthetic prosumers)")
    s.add_argument("--days", type=float, help="override the scenario's number of days")
    s.add_argument("--fleet", type=int, default=0, metavar="K", help="serve the participants over K /fleet connections")
    s.add_argument("--serializer", choices=["json", "msgpack"], default="json")
    s.add_argument(
        "--transport",
        choices=["socket", "inproc"],
        default="socket",
        help="socket: a market server process and socket.io clients; inproc: the same engine and participants "
        "called in this process (same ledger digest, no sockets)",
    )
    parity_flags.add_parity_arguments(s)


def _ledger_arguments(led: argparse.ArgumentParser) -> None:
    led.add_argument(
        "action",
        choices=["digest", "verify", "balances"],
        help="digest: sha256 of the ordered ledger rows; verify: check a chain ledger's rows against its anchors; "
        "balances: a chain ledger's token balances on chain next to the database's money",
    )
    led.add_argument("url")
    led.add_argument("--record", metavar="ID", help="verify: print the inclusion proof (JSON) of this record")
    led.add_argument("--table", help="verify --record: the record's table (when the id is in several)")
    led.add_argument(
        "--markets",
        action="store_true",
        help="digest: every market of a PostgreSQL database (a schema each, docs/hierarchy.md): each one's digest, "
        "then one over all",
    )


def main(argv: list[str] | None = None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    args = parser(argv).parse_args(argv)
    if COMMANDS[args.command][0] is not None:  # a subcommand's own main(args)
        main_of: Callable[[argparse.Namespace], int] = _module(args.command).main
        return main_of(args)
    if args.command == "sim":
        from controller import sim  # the client stack and progress bar: only for this command

        lem = parity_flags.parity_flags(args)
        if _is_district(args.scenario):  # [[communities]]: a market of markets (docs/hierarchy.md)
            from controller import district_cmd

            if lem or args.serializer != "json":
                print("microte sim: --lem-* and --serializer are not for a district", file=sys.stderr)
                return 2
            return district_cmd.main(args)
        if args.transport == "inproc" and (args.fleet or lem or args.serializer != "json"):
            print(
                "microte sim: --fleet, --serializer and --lem-* are socket options (--transport socket)",
                file=sys.stderr,
            )
            return 2
        return sim.main(
            args.scenario, args.ledger, args.participants, args.days, args.serializer, args.fleet, lem, args.transport
        )
    if args.command == "ledger":
        if args.action in ("verify", "balances"):
            from controller import ledger_cmd

            return ledger_cmd.main(args)
        from ledger import ledger_digest

        try:
            if args.markets:
                return _market_digests(args.url)
            print(ledger_digest(args.url))
        except ValueError as err:  # a memory: URL, or a scheme it cannot read
            print(f"microte ledger digest: {err}", file=sys.stderr)
            return 2
        return 0
    return 2


def _market_digests(url: str) -> int:
    from ledger import ledger_digest
    from ledger.markets import digest_of_all, market_url, markets_in

    schemas = markets_in(url)
    if not schemas:
        print(f"microte ledger digest: no market schemas (m_...) in {url}", file=sys.stderr)
        return 2
    digests = {m: ledger_digest(market_url(url, m.removeprefix("m_"))) for m in schemas}
    for m, d in digests.items():
        print(f"{m} {d}")
    print(f"all {digest_of_all(digests)}")
    return 0


def _is_district(path: str) -> bool:
    import tomllib

    try:
        with open(path, "rb") as f:
            return bool(tomllib.load(f).get("communities"))
    except (OSError, tomllib.TOMLDecodeError):
        return False  # `microte sim` reports the file's own error
