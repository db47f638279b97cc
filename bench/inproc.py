"""In-process runs and the research environments against the socket run, in one run.

    python bench/inproc.py [--n 10 50] [--days 1] [--steps 960] [--episodes 4]

1. For each N: `microte sim` over sockets (`run_sim`, a market server process and one
   connection per participant) and `--transport inproc`, the same scenario, seed and days,
   each writing its SQLite ledger: rounds/s of each, the ratio, and whether the digests
   are equal (they must be).
2. `microte/Prosumer-v0` (H06 the agent, 19 scripted participants): steps/s of a new
   environment, of the first and the later one-day episodes of one seed, and the cost of
   a step broken down: market core (`Market` methods), scripted participants
   (the scripted prosumers' `Population`, participants/population.py), the agent's
   observation and its orders.
3. `parallel_env` with 50 agents: steps/s.

Prints a markdown table; never asserts (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

import numpy as np  # noqa: E402

from controller import envs  # noqa: E402
from controller.sim import run_sim  # noqa: E402
from ledger import ledger_digest  # noqa: E402
from market.core.engine import Market  # noqa: E402
from participants.population import MeterBatch, OrderBatch, Population  # noqa: E402
from participants.prosumer import Prosumer  # noqa: E402

SCENARIO = _ROOT / "scenarios" / "community.toml"


async def transports(n: int, days: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out: dict[str, Any] = {"n": n}
        for transport in ("socket", "inproc"):
            url = f"sqlite:///{tmp}/{transport}.db"
            r = await run_sim(SCENARIO, ledger=url, participants=n, days=days, progress=False, transport=transport)
            out[transport] = r.summary.rounds_per_second
            out[f"{transport}_digest"] = ledger_digest(url)
        out["same"] = out["socket_digest"] == out["inproc_digest"]
        return out


class Timers:
    """Inclusive seconds spent in wrapped methods, by group (nested calls of another group
    are subtracted, so the groups add up to the time inside them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # [start, time in nested groups]

    def wrap(self, owner: Any, name: str, group: str) -> None:
        fn: Callable[..., Any] = getattr(owner, name)

        def timed(*a: Any, **kw: Any) -> Any:
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*a, **kw)
            finally:
                start, nested = self._stack.pop()
                spent = time.perf_counter() - start
                self.seconds[group] += spent - nested
                if self._stack:
                    self._stack[-1][1] += spent

        setattr(owner, name, timed)


def env_episodes(episodes: int) -> list[float]:
    """Steps/s of each of `episodes` one-day episodes of the same seed, one after another
    in one process (as training runs them): the first computes the days' profiles,
    forecasts and random draws, the later ones find them (participants/synthetic.py)."""
    env = envs.ProsumerEnv(SCENARIO, "H06", seed=1, days=1)
    action = np.array([0.6, 1.0, 0.3, 1.0], dtype=np.float32)
    out = []
    for _ in range(episodes):
        env.reset(seed=1)
        t0, n, truncated = time.perf_counter(), 0, False
        while not truncated:
            *_, truncated, _ = env.step(action)
            n += 1
        out.append(n / (time.perf_counter() - t0))
    return out


def env_steps(steps: int, breakdown: bool) -> tuple[float, dict[str, float]]:
    timers = Timers()
    if breakdown:
        for name in ("open_round", "submit_orders", "submit_each", "meter", "meter_each", "process"):
            timers.wrap(Market, name, "market core")
        for name in ("on_round_msg", "on_settled", "on_delivery"):
            timers.wrap(Prosumer, name, "participants")
        for name in ("on_round", "on_settlements", "on_transactions"):
            timers.wrap(Population, name, "participants")
        timers.wrap(MeterBatch, "messages", "participants")  # the members' readings, as the market takes them
        timers.wrap(OrderBatch, "entries", "participants")
        timers.wrap(envs._Agent, "observe", "agent observation")
        timers.wrap(envs, "orders_of", "agent orders")
    env = envs.ProsumerEnv(SCENARIO, "H06", seed=1, days=10)
    env.reset(seed=1)
    action = np.array([0.6, 1.0, 0.3, 1.0], dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(steps):
        *_, truncated, _ = env.step(action)
        if truncated:
            env.reset()
    seconds = time.perf_counter() - t0
    shares = {g: s / seconds for g, s in timers.seconds.items()}
    if breakdown:
        shares["other (env, inproc glue)"] = 1 - sum(shares.values())
    return steps / seconds, shares


def parallel_steps(agents: int, steps: int) -> float:
    env = envs.parallel_env(scenario=SCENARIO, seed=1, participants=agents, days=10)
    env.reset(seed=1)
    rng = np.random.default_rng(0)
    actions = {a: rng.uniform(0, 1, 4).astype(np.float32) for a in env.possible_agents}
    t0 = time.perf_counter()
    for _ in range(steps):
        env.step(actions)
        if not env.agents:
            env.reset()
    return steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[10, 50])
    p.add_argument("--days", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=960)
    p.add_argument("--episodes", type=int, default=4, help="one-day episodes after the first")
    args = p.parse_args()
    print("| N | socket rounds/s | inproc rounds/s | inproc / socket | same digest |")
    print("|---|---|---|---|---|")
    for n in args.n:
        r = asyncio.run(transports(n, args.days))
        print(f"| {n} | {r['socket']:.1f} | {r['inproc']:.1f} | {r['inproc'] / r['socket']:.1f}x | {r['same']} |")
    rate, _ = env_steps(args.steps, breakdown=False)
    _, shares = env_steps(args.steps, breakdown=True)
    first, *later = env_episodes(1 + args.episodes)
    print(
        f"\nmicrote/Prosumer-v0, 19 scripted participants: {rate:.0f} steps/s over {args.steps} steps of a new"
        f" environment; one-day episodes of one seed: the first {first:.0f} steps/s, the next {len(later)}"
        f" {min(later):.0f}-{max(later):.0f}; a step's time:"
    )
    for group, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"- {group}: {100 * share:.0f} %")
    print(f"\nparallel_env, 50 agents: {parallel_steps(50, args.steps // 4):.0f} steps/s")


if __name__ == "__main__":
    main()
