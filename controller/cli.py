"""The `microte` command: `market` (serve), `participant` (clients), `sim` (a whole run)."""

from __future__ import annotations

import argparse
import sys

from controller import serve


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="microte", description="microte local energy market")
    sub = p.add_subparsers(dest="command", required=True)
    serve.add_arguments(sub.add_parser("market", help="run the market server"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv if argv is not None else sys.argv[1:])
    if args.command == "market":
        return serve.main(args)
    return 2
