"""`microte pseudonym resolve PSEUDONYM... --key FILE --registry FILE`: the registry id behind
each keyed pseudonym of the `/grid` market, for the operator who holds the key.

One line `PSEUDONYM ID` per pseudonym found; a pseudonym that is no registry id's under this
key is named on stderr, and the exit status is then 1. Pseudonyms of an external service
cannot be resolved here: the service holds that mapping.
"""

from __future__ import annotations

import argparse
import sys

from market.community.pseudonyms import read_key, resolve
from market.core.registry import Registry


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    r = sub.add_parser("resolve", help="the registry id of each pseudonym (keyed HMAC), for the operator")
    r.add_argument("pseudonyms", nargs="+", metavar="PSEUDONYM")
    r.add_argument("--key", required=True, help="the pseudonym key file (pseudonym.key beside the registry)")
    r.add_argument("--registry", required=True, help="the registry TOML whose ids the pseudonyms were made of")


def main(args: argparse.Namespace) -> int:
    try:
        key = read_key(args.key)
        ids = Registry.from_toml(args.registry).ids()
    except (OSError, ValueError) as err:
        print(f"microte pseudonym: {err}", file=sys.stderr)
        return 2
    missing = 0
    for pseudonym in args.pseudonyms:
        pid = resolve(key, pseudonym, ids)
        if pid is None:
            missing += 1
            print(f"{pseudonym}: not the pseudonym of any id in {args.registry} under this key", file=sys.stderr)
        else:
            print(f"{pseudonym} {pid}")
    return 1 if missing else 0
