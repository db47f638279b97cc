"""A small learner on the research environment (docs/rl.md): numpy only, no GPU.

- The pure parts: `LinearPolicy` (action = sigmoid(W @ normalized obs + b)), the
  cross-entropy method (`cem_update`, `cem`) and the training-day schedule.
- `train`: CEM over the linear policy of one prosumer of a scenario (`ProsumerEnv`).
- `evaluate` (a policy) and `rule_bill` (a rule-based trader, run on `InprocMarket` with the
  prosumer not external): mean daily bills on the same days, for the comparison table.
- `main`: `python -m controller.learn --out docs/img` trains, evaluates on held-out days,
  writes the learning curve and prints the markdown table of docs/rl.md.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

from controller.envs import ACT_FIELDS, OBS_FIELDS, ProsumerEnv, episode_scenario
from controller.inproc import InprocMarket
from controller.scenario import Scenario, community, load_scenario
from participants.devices import Battery
from participants.prosumer import Prosumer
from participants.spec import BatteryTrader, FixedPriceTrader, NoTrader, TraderSpec

SCENARIO = Path(__file__).parents[1] / "scenarios" / "community.toml"
PARTICIPANT = "H06"
TRAIN_DAYS = tuple(range(28))  # four weeks from the scenario's start
HELD_OUT_DAYS = tuple(range(30, 37))  # a week never used in training

# Fixed observation normalization (center, scale) per OBS_FIELDS entry, read off a few days of
# H06 in scenarios/community.toml: it keeps W's entries of one order of magnitude.
NORM = {
    "grid_buy": (0.25, 0.03),
    "grid_sell": (0.085, 0.01),
    "grid_state": (0.5, 0.5),
    "load_kwh": (0.05, 0.05),
    "generation_kwh": (0.2, 0.25),
    "soc": (0.5, 0.4),
    "bought_kwh": (0.2, 0.3),
    "sold_kwh": (0.1, 0.3),
    "paid": (0.0, 0.1),
    "p2p_kwh": (0.1, 0.3),
    "grid_kwh": (0.05, 0.15),
    "hour_sin": (0.0, 1.0),
    "hour_cos": (0.0, 1.0),
}
CENTER = np.array([NORM[f][0] for f in OBS_FIELDS])
SCALE = np.array([NORM[f][1] for f in OBS_FIELDS])
N_OBS, N_ACT = len(OBS_FIELDS), len(ACT_FIELDS)
N_PARAMS = N_ACT * N_OBS + N_ACT


# -- pure parts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearPolicy:
    """action = sigmoid(W @ ((obs - CENTER) / SCALE) + b), each in (0, 1)."""

    w: np.ndarray  # (N_ACT, N_OBS)
    b: np.ndarray  # (N_ACT,)

    @classmethod
    def from_vector(cls, theta: np.ndarray) -> LinearPolicy:
        theta = np.asarray(theta, dtype=np.float64)
        if theta.shape != (N_PARAMS,):
            raise ValueError(f"a linear policy has {N_PARAMS} parameters, not {theta.shape}")
        return cls(theta[: N_ACT * N_OBS].reshape(N_ACT, N_OBS), theta[N_ACT * N_OBS :])

    def vector(self) -> np.ndarray:
        out: np.ndarray = np.concatenate([self.w.ravel(), self.b])
        return out

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        x = (np.asarray(obs, dtype=np.float64) - CENTER) / SCALE
        z = np.clip(self.w @ x + self.b, -50.0, 50.0)  # no overflow warning in exp
        action: np.ndarray = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        return action


def cem_update(
    samples: np.ndarray, scores: np.ndarray, n_elite: int, extra_var: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The CEM step: mean and std of the `n_elite` best-scoring samples (highest first; ties by
    index). `extra_var` is added to every variance so the search does not collapse too early."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    elite = np.asarray(samples, dtype=np.float64)[order[:n_elite]]
    return elite.mean(axis=0), np.sqrt(elite.var(axis=0) + extra_var)


def cem(
    score: Callable[[int, np.ndarray], np.ndarray],
    mean: np.ndarray,
    std: np.ndarray,
    rng: np.random.Generator,
    *,
    iterations: int,
    population: int,
    elite_frac: float = 0.25,
    extra_var: float = 0.1,
) -> tuple[np.ndarray, list[tuple[int, float, float]]]:
    """Maximize `score(iteration, samples) -> one score per sample` with diagonal Gaussian CEM.
    The extra variance decays linearly to 0 over the iterations. Returns the final mean and
    (iteration, mean score, best score) per iteration."""
    n_elite = max(1, round(elite_frac * population))
    curve: list[tuple[int, float, float]] = []
    for i in range(iterations):
        samples = mean + std * rng.standard_normal((population, mean.size))
        scores = np.asarray(score(i, samples), dtype=np.float64)
        curve.append((i, float(scores.mean()), float(scores.max())))
        mean, std = cem_update(samples, scores, n_elite, extra_var * (1 - i / iterations))
    return mean, curve


def day_schedule(seed: int, iterations: int, days_per_eval: int, days: Sequence[int]) -> list[list[int]]:
    """The training days of each iteration (every candidate of an iteration plays the same days,
    so they are ranked on equal terms). A stream of its own: the schedule does not depend on
    the population size."""
    rng = np.random.default_rng([seed, 1])
    return [sorted(int(d) for d in rng.choice(days, size=days_per_eval, replace=False)) for _ in range(iterations)]


# -- rollouts ---------------------------------------------------------------------------------


class Day(NamedTuple):
    """One day of one prosumer."""

    bill: float  # currency, negative: earned
    grid_only: float  # the same day without market or battery (`Stats.grid_only_cost`)
    soc: float  # battery state of charge at the end, fraction (0 without a battery)
    stored_kwh: float  # battery energy at the end minus at the start (an episode starts at the spec's soc)


def _day(prosumer: Prosumer, bill: float) -> Day:
    b, spec = prosumer.battery, prosumer.spec.battery
    if b is None or spec is None:
        return Day(bill, prosumer.stats.grid_only_cost / 1e6, 0.0, 0.0)
    stored = (b.soc_wh - Battery.from_spec(spec).soc_wh) / 1000
    return Day(bill, prosumer.stats.grid_only_cost / 1e6, b.soc_wh / b.capacity_wh, stored)


def rollout(
    env: ProsumerEnv, policy: Callable[[np.ndarray], np.ndarray], day: int, seed: int | None
) -> tuple[float, Prosumer]:
    """One day of `env` driven by `policy`: the sum of rewards (minus the day's bill) and the
    agent's prosumer at the end."""
    obs, _ = env.reset(seed=seed, options={"day": day})
    total = 0.0
    while True:
        obs, reward, terminated, truncated, _ = env.step(policy(obs))
        total += reward
        if terminated or truncated:
            assert env._episode is not None
            return total, env._episode.agents[env.participant].prosumer


def episode_return(env: ProsumerEnv, policy: Callable[[np.ndarray], np.ndarray], day: int, seed: int | None) -> float:
    return rollout(env, policy, day, seed)[0]


def train(
    scenario: str | Path = SCENARIO,
    participant: str = PARTICIPANT,
    *,
    seed: int = 0,
    market_seed: int | None = None,
    iterations: int = 15,
    population: int = 20,
    days_per_eval: int = 2,
    train_days: Sequence[int] = TRAIN_DAYS,
    init_std: float = 1.0,
    elite_frac: float = 0.25,
    extra_var: float = 0.1,
) -> tuple[LinearPolicy, list[tuple[int, float, float]]]:
    """CEM over `LinearPolicy` for `participant`, starting from all actions 0.5 (W = 0, b = 0).
    A candidate's score is its mean daily return on the iteration's `day_schedule` days, the
    market run with `market_seed` (None: the scenario's seed). Same arguments, same result.
    Returns the final mean policy and the learning curve (iteration, mean return, best return)."""
    env = ProsumerEnv(scenario, participant, seed=market_seed)
    schedule = day_schedule(seed, iterations, days_per_eval, train_days)

    def score(i: int, samples: np.ndarray) -> np.ndarray:
        days = schedule[i]
        return np.array(
            [np.mean([episode_return(env, LinearPolicy.from_vector(s), d, market_seed) for d in days]) for s in samples]
        )

    rng = np.random.default_rng(seed)
    mean, curve = cem(
        score,
        np.zeros(N_PARAMS),
        np.full(N_PARAMS, init_std),
        rng,
        iterations=iterations,
        population=population,
        elite_frac=elite_frac,
        extra_var=extra_var,
    )
    return LinearPolicy.from_vector(mean), curve


def policy_days(
    policy: Callable[[np.ndarray], np.ndarray],
    days: Sequence[int] = HELD_OUT_DAYS,
    *,
    scenario: str | Path = SCENARIO,
    participant: str = PARTICIPANT,
    market_seed: int | None = None,
) -> list[Day]:
    """`participant` driven by `policy` (an external agent of `ProsumerEnv`), day by day."""
    env = ProsumerEnv(scenario, participant, seed=market_seed)
    out = []
    for d in days:
        ret, prosumer = rollout(env, policy, d, market_seed)
        out.append(_day(prosumer, -ret))
    return out


def evaluate(
    policy: Callable[[np.ndarray], np.ndarray],
    days: Sequence[int] = HELD_OUT_DAYS,
    *,
    scenario: str | Path = SCENARIO,
    participant: str = PARTICIPANT,
    market_seed: int | None = None,
) -> float:
    """Mean daily bill (currency; negative: earned) of `participant` driven by `policy` on `days`."""
    run = policy_days(policy, days, scenario=scenario, participant=participant, market_seed=market_seed)
    return float(np.mean([d.bill for d in run]))


def day_scenario(scenario: str | Path, day: int, market_seed: int | None) -> Scenario:
    """The scenario as `ProsumerEnv.reset(seed=market_seed, options={"day": day})` runs it."""
    return episode_scenario(scenario, market_seed, day=day)[0]


def rule_run(
    trader: TraderSpec,
    day: int,
    *,
    scenario: str | Path = SCENARIO,
    participant: str = PARTICIPANT,
    market_seed: int | None = None,
) -> Prosumer:
    """One day of the scenario on `InprocMarket`, `participant` trading by `trader` (its spec's
    trader replaced; not external): its prosumer at the end (`.stats.cost`: the bill)."""
    scn = day_scenario(scenario, day, market_seed)
    specs = [msgspec.structs.replace(s, trader=trader) if s.id == participant else s for s in community(scn, None)]
    if participant not in {s.id for s in specs}:
        raise ValueError(f"no such participant in the scenario: {participant}")
    market = InprocMarket(scn, specs, base_dir=Path(scenario).parent, own=[participant])
    for i in range(scn.rounds):
        market.step(scn.start_time + i * scn.step)
        market.take_records()  # no ledger: nothing to keep
    return market.prosumers[participant]


def rule_days(
    trader: TraderSpec,
    days: Sequence[int] = HELD_OUT_DAYS,
    *,
    scenario: str | Path = SCENARIO,
    participant: str = PARTICIPANT,
    market_seed: int | None = None,
) -> list[Day]:
    out = []
    for d in days:
        p = rule_run(trader, d, scenario=scenario, participant=participant, market_seed=market_seed)
        out.append(_day(p, p.stats.cost / 1e6))
    return out


def rule_bill(
    trader: TraderSpec,
    days: Sequence[int] = HELD_OUT_DAYS,
    *,
    scenario: str | Path = SCENARIO,
    participant: str = PARTICIPANT,
    market_seed: int | None = None,
) -> float:
    """Mean daily bill (currency) of `participant` trading by `trader` on `days`."""
    run = rule_days(trader, days, scenario=scenario, participant=participant, market_seed=market_seed)
    return float(np.mean([d.bill for d in run]))


# -- I/O --------------------------------------------------------------------------------------


def plot_curve(
    curve: Sequence[tuple[int, float, float]], reference: Sequence[float], path: Path, title: str = ""
) -> None:
    """The learning curve, with the scenario trader's return on the same training days."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [c[0] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(it, [c[1] for c in curve], marker="o", label="CEM population, mean")
    ax.plot(it, [c[2] for c in curve], marker="^", label="CEM population, best")
    ax.plot(it, reference, linestyle="--", color="grey", label="battery trader, same days")
    ax.set_xlabel("iteration")
    ax.set_ylabel("daily return (currency) = minus the bill")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller.learn", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/img"), help="where rl-learning-curve.png goes")
    p.add_argument("--scenario", type=Path, default=SCENARIO)
    p.add_argument("--participant", default=PARTICIPANT)
    p.add_argument("--seed", type=int, default=0, help="the learner's seed (CEM samples, training days)")
    p.add_argument("--market-seed", type=int, default=None, help="the scenario's seed (default: its own)")
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--days-per-eval", type=int, default=2)
    a = p.parse_args(argv)
    where: dict[str, Any] = {"scenario": a.scenario, "participant": a.participant, "market_seed": a.market_seed}

    t0 = time.perf_counter()
    policy, curve = train(
        a.scenario,
        a.participant,
        seed=a.seed,
        market_seed=a.market_seed,
        iterations=a.iterations,
        population=a.population,
        days_per_eval=a.days_per_eval,
    )
    trained = time.perf_counter() - t0
    # The scenario trader's return on each iteration's training days, for the plot.
    schedule = day_schedule(a.seed, a.iterations, a.days_per_eval, TRAIN_DAYS)
    seen = sorted({d for s in schedule for d in s})
    battery = {d: -day.bill for d, day in zip(seen, rule_days(BatteryTrader(), seen, **where), strict=True)}
    reference = [float(np.mean([battery[d] for d in s])) for s in schedule]
    title = f"CEM, linear policy: {a.participant} in {a.scenario.name}, training days"
    plot_curve(curve, reference, a.out / "rl-learning-curve.png", title)

    rows = [("CEM linear policy (external agent)", policy_days(policy, HELD_OUT_DAYS, **where))]
    for name, spec in (
        ("`battery` (its scenario trader)", BatteryTrader()),
        ("`fixed_price` (defaults: bid 0.20, ask 0.08)", FixedPriceTrader()),
        ("`none` (no orders; battery for own use)", NoTrader()),
    ):
        rows.append((name, rule_days(spec, HELD_OUT_DAYS, **where)))
    grid_only = float(np.mean([d.grid_only for d in rows[-1][1]]))

    days = f"{HELD_OUT_DAYS[0]}..{HELD_OUT_DAYS[-1]}"
    print(f"training: {a.iterations} iterations x {a.population} candidates x {a.days_per_eval} days, {trained:.0f} s")
    for i, m, b in curve:
        print(f"  iteration {i:2d}: mean {m:+.4f}  best {b:+.4f}")
    # An episode does not value what is left in the battery: this column does, at the feed-in price.
    feed_in = load_scenario(a.scenario).grid.price
    print(
        f"\n| {a.participant}, held-out days {days} | mean daily bill | best day | worst day | SoC at day end |", end=""
    )
    print(f" bill, stored energy at {feed_in}/kWh |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, run in rows:
        bills = [d.bill for d in run]
        soc, adjusted = np.mean([d.soc for d in run]), np.mean([d.bill - d.stored_kwh * feed_in for d in run])
        print(
            f"| {name} | {np.mean(bills):+.3f} | {min(bills):+.3f} | {max(bills):+.3f} | {soc:.0%} | {adjusted:+.3f} |"
        )
    print(f"| no market, no battery (`Stats.grid_only_cost`) | {grid_only:+.3f} | | | | |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; curve: {a.out / 'rl-learning-curve.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
