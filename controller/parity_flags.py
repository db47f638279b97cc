"""The /grid (Parity) flags of `microte market` and `microte sim`: argument parsing only,
so that `microte sim` parses its command line without importing the server."""

from __future__ import annotations

import argparse

PARITY_FLAGS = {  # ParityConfig field -> flag
    "lem_duration": "--lem-duration",
    "solve_every": "--lem-solve-every",
    "solve_delay": "--lem-solve-delay",
}


def add_parity_arguments(p: argparse.ArgumentParser) -> None:
    """The /grid flags (ParityConfig; they override the scenario's `[parity]` table)."""
    p.add_argument("--lem-duration", type=int, help="/grid: LEM slot length in seconds (default 900)")
    p.add_argument(
        "--lem-solve-every",
        type=int,
        help="/grid: the periodic LEM solver runs every this many seconds of the market clock (default 3600; 0: off)",
    )
    p.add_argument("--lem-solve-delay", type=int, help="/grid: ... this many seconds after each boundary (default 60)")


def parity_overrides(args: argparse.Namespace) -> dict[str, int | None]:
    """ParityConfig fields given on the command line (None: not given)."""
    return {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in PARITY_FLAGS.items()}


def parity_flags(args: argparse.Namespace) -> list[str]:
    """The /grid flags given, as `microte market` arguments (`microte sim` passes them on)."""
    return [a for f, v in parity_overrides(args).items() if v is not None for a in (PARITY_FLAGS[f], str(v))]
