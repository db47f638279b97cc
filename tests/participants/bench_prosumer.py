"""CPU micro-benchmark of the prosumers' decisions (no sockets): N synthetic prosumers over
a day of 96 rounds of 15 minutes, with the `settled` and `delivery` events a market sends.

The event stream is recorded once from `golden_scenario` (its stand-in clearing), then
replayed on fresh prosumers under `time.process_time`, so only `Prosumer` work is timed.

    python -m tests.participants.bench_prosumer [-n 100] [--repeat 5] [--days 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from collections.abc import Callable
from typing import Any

from participants.prosumer import Prosumer
from tests.participants import golden_scenario as g

Event = tuple[int, str, Any]  # (prosumer index, method, payload)


def record(n: int, days: int, tz: str) -> list[Event]:
    prosumers = [Prosumer(sp, g.SEED) for sp in g.specs(n)]
    events: list[Event] = []
    for i, p in enumerate(prosumers):
        for name in ("on_round", "on_settled", "on_delivery"):
            method = getattr(p, name)

            def recorded(payload: Any, i: int = i, name: str = name, method: Callable[[Any], Any] = method) -> Any:
                events.append((i, name, payload))
                return method(payload)

            setattr(p, name, recorded)
    s = g.Scenario(prosumers, "sim", tz)
    t0 = g.local_midnight(dt.date(2024, 6, 21), tz)
    for k in range(96 * days):
        s.round(t0 + k * g.D)
    return events


def replay(n: int, events: list[Event]) -> dict[str, float]:
    prosumers = [Prosumer(sp, g.SEED) for sp in g.specs(n)]
    spent = dict.fromkeys(("on_round", "on_settled", "on_delivery"), 0.0)
    clock = time.process_time
    for i, name, payload in events:
        t = clock()
        getattr(prosumers[i], name)(payload)
        spent[name] += clock() - t
    spent["total"] = sum(spent.values())
    return spent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--tz", default="UTC")
    args = ap.parse_args()
    events = record(args.n, args.days, args.tz)
    rounds = 96 * args.days
    counts = {k: sum(1 for e in events if e[1] == k) for k in ("on_round", "on_settled", "on_delivery")}
    print(f"{args.n} prosumers x {rounds} rounds, tz {args.tz}: events {counts}")
    runs = [replay(args.n, events) for _ in range(args.repeat)]
    for key in ("on_round", "on_settled", "on_delivery", "total"):
        xs = [r[key] for r in runs]
        print(
            f"{key:12s} CPU s: best {min(xs):.3f}  median {statistics.median(xs):.3f}"
            f"  ({1000 * statistics.median(xs) / rounds:.2f} ms/round)"
        )


if __name__ == "__main__":
    main()
