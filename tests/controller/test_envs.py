"""The research environments (controller/envs.py): Gymnasium and PettingZoo API checks,
seeding, and the reward against the ledger rows of the episode."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from pettingzoo.test import parallel_api_test

import controller.envs  # noqa: F401 (registers microte/Prosumer-v0)
from controller.envs import ACT_FIELDS, OBS_FIELDS, ProsumerEnv, parallel_env
from market.core.records import Transaction

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"


def make(**kw: object) -> ProsumerEnv:
    env = gymnasium.make("microte/Prosumer-v0", scenario=SCENARIO, participant="H06", **kw)
    return env.unwrapped  # type: ignore[return-value]


def episode(env: ProsumerEnv, seed: int, policy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    obs, _ = env.reset(seed=seed)
    seen, rewards = [obs], []
    while True:
        obs, reward, terminated, truncated, _ = env.step(policy)
        seen.append(obs)
        rewards.append(reward)
        if terminated or truncated:
            return np.array(seen), np.array(rewards)


def test_prosumer_env_passes_gymnasium_check_env() -> None:
    env = make(seed=1, days=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either (bounds, dtypes, determinism)
        check_env(env, skip_render_check=True)
    assert env.observation_space.shape == (len(OBS_FIELDS),) and env.action_space.shape == (len(ACT_FIELDS),)


def test_the_same_seed_gives_the_same_trajectory_and_another_seed_another() -> None:
    env = make(days=0.5)
    act = np.array([0.6, 1.0, 0.3, 1.0], dtype=np.float32)
    a, b, c = episode(env, 7, act), episode(env, 7, act), episode(env, 8, act)
    assert len(a[1]) == 48  # one step per 15 min round, then truncated
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_the_return_is_minus_the_agents_bill_in_the_ledger_rows() -> None:
    env = make(days=1.0, keep_records=True)
    _, rewards = episode(env, 3, np.array([0.7, 1.0, 0.3, 1.0], dtype=np.float32))
    rows = [r for r in env.records if isinstance(r, Transaction)]
    paid = sum(r.amount_buy for r in rows if r.buyer_id == "H06") - sum(
        r.amount_sell for r in rows if r.seller_id == "H06"
    )
    assert any(r.kind == "p2p" and "H06" in (r.buyer_id, r.seller_id) for r in rows), "the agent should trade P2P"
    assert rewards.sum() == pytest.approx(-paid / 1e6, abs=1e-9)


def test_actions_out_of_range_are_clipped_and_bad_use_is_a_clear_error() -> None:
    env = make(days=0.1)
    env.reset(seed=1)
    obs, reward, *_ = env.step(np.array([np.nan, 5.0, -3.0, np.inf], dtype=np.float32))
    assert np.isfinite(obs).all() and np.isfinite(reward)
    with pytest.raises(ValueError, match="no such participant"):
        gymnasium.make("microte/Prosumer-v0", scenario=SCENARIO, participant="nobody").reset()
    fresh = make(days=0.1)
    with pytest.raises(RuntimeError, match="reset"):
        fresh.step(np.zeros(4, dtype=np.float32))


def test_parallel_env_passes_the_pettingzoo_api_test() -> None:
    env = parallel_env(scenario=SCENARIO, seed=2, days=0.25)
    assert len(env.possible_agents) == 20
    parallel_api_test(env, num_cycles=30)
    env.reset(seed=2)
    steps = 0
    while env.agents:
        _obs, _rewards, _, truncated, _ = env.step({a: env.action_space(a).sample() for a in env.agents})
        steps += 1
    assert steps == 24 and all(truncated.values())
