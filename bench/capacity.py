"""Cost of capacity-aware clearing: one slot, N bid/ask pairs, a radial feeder of 10 or 100
branches (paths up to that deep). Prints clear time without and with the capacity check.

    python bench/capacity.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from market.core.capacity import Branch, CapacityLimits, Sensitivities
from market.core.engine import Market, MarketConfig
from tests.market.builders import ask, bid

SLOT = (1800, 2700)


def run(n: int, capacity: CapacityLimits | None) -> float:
    m = Market(MarketConfig(duration=900), capacity=capacity)
    m.open_round(0)
    for i in range(n):
        bid(m, f"P{2 * i}", 100, 0.30, SLOT)
        ask(m, f"P{2 * i + 1}", 100, 0.10, SLOT)
    t = time.perf_counter()
    m.open_round(900)
    return time.perf_counter() - t


def main() -> None:
    for depth in (10, 100):
        branches = tuple(Branch("line", i, f"l{i}", 1e9) for i in range(depth))
        paths = {b: tuple(range(b, -1, -1)) for b in range(depth)}
        limits = CapacityLimits({f"P{i}": i % depth for i in range(20000)}, Sensitivities(branches, paths, 0))
        for n in (100, 1000, 5000):
            plain = statistics.median(run(n, None) for _ in range(5))
            checked = statistics.median(run(n, limits) for _ in range(5))
            extra = checked - plain
            print(
                f"depth {depth:3d} fills {n:5d}: clear {plain * 1000:7.1f} ms, with capacity check "
                f"{checked * 1000:7.1f} ms (+{extra * 1000:.1f} ms, {extra / n * 1e6:.1f} us/fill)"
            )


if __name__ == "__main__":
    main()
