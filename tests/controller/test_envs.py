"""The research environments (controller/envs.py): Gymnasium and PettingZoo API checks,
seeding, and the reward against the ledger rows of the episode."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from hypothesis import given
from hypothesis import strategies as st
from pettingzoo.test import parallel_api_test

import controller.envs  # noqa: F401 (registers microte/Prosumer-v0)
from controller.envs import ACT_FIELDS, OBS_FIELDS, ProsumerEnv, episode_scenario, parallel_env
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


def test_an_episode_without_its_records_trades_and_pays_as_one_that_keeps_them() -> None:
    # keep_records=False makes no ledger records of entries and readings (Market journal=False):
    # the observations and rewards must not depend on that.
    act = np.array([0.7, 1.0, 0.3, 1.0], dtype=np.float32)
    kept, lean = make(days=0.5, keep_records=True), make(days=0.5)
    a, b = episode(kept, 5, act), episode(lean, 5, act)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert any(r.TABLE == "entries" for r in kept.records) and any(r.TABLE == "meters" for r in kept.records)
    assert not lean._episode.market.market.journaling and lean.records == []


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


@pytest.mark.parametrize(
    ("participants", "agents", "one_open"),
    [(40, None, False), (30, ["S0005", "H06", "S0003"], False), (30, None, True)],
)
def test_the_crowd_of_agents_sees_and_trades_as_an_agent_each(
    participants: int, agents: list[str] | None, one_open: bool, tmp_path: Path
) -> None:
    """The parallel env's agents as arrays (`_Crowd`, their orders booked in one batch)
    against an `_Agent` each: the same observations, orders, refusals, rewards and ledger,
    step by step, actions of every kind (out of range, NaN, agents that do not act).
    `one_open`: one open entry per slot and participant, so that most second orders are
    refused."""
    scenario = SCENARIO
    if one_open:
        scenario = tmp_path / "one_open.toml"
        scenario.write_text(SCENARIO.read_text().replace("[market]\n", "[market]\nmax_open_per_slot = 1\n", 1))
    envs = [
        parallel_env(scenario=scenario, seed=3, days=0.5, participants=participants, agents=agents, crowd=crowd)
        for crowd in (True, False)
    ]
    refused = 0
    (obs_a, info_a), (obs_b, info_b) = (e.reset(seed=3) for e in envs)
    assert envs[0]._episode is not None and envs[0]._episode.crowd is not None
    assert envs[1]._episode is not None and envs[1]._episode.crowd is None
    episodes = [ep for ep in (e._episode for e in envs) if ep is not None]
    for ep in episodes:
        ep.keep_records = True
    rng = np.random.default_rng(5)
    steps = orders = 0
    while envs[0].agents:
        for a in obs_a:
            np.testing.assert_array_equal(obs_a[a], obs_b[a], err_msg=f"{steps} {a}")
        assert info_a == info_b
        names = envs[0].agents
        actions = {a: rng.uniform(-0.5, 1.5, len(ACT_FIELDS)).astype(np.float32) for a in names[1:]}  # one idle
        if steps % 7 == 0:
            actions[names[-1]] = np.array([np.nan, 1.0, np.inf, -np.inf], dtype=np.float32)
        obs_a, rew_a, _, trunc_a, info_a = envs[0].step(actions)
        obs_b, rew_b, _, trunc_b, info_b = envs[1].step(actions)
        assert rew_a == rew_b and trunc_a == trunc_b
        orders += sum(len(i["orders"]) for i in info_a.values())
        refused += sum(len(i["refused"]) for i in info_a.values())
        steps += 1
    assert steps == 48 and orders > 4 * len(names)
    assert (refused > 10) if one_open else (refused == 0)
    assert episodes[0].records == episodes[1].records and len(episodes[0].records) > 1000


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=4, max_size=4))
def test_an_action_is_clipped_as_numpy_clips_it(values):
    from controller.envs import _unit

    action = np.array(values, dtype=np.float32)
    expected = np.clip(np.nan_to_num(action.astype(np.float64), nan=0.0), 0.0, 1.0).tolist()
    assert _unit(action) == expected


def test_the_environments_import_no_socket_or_database_stack():
    """An environment is in-process and writes no ledger: importing it (what
    `gymnasium.make("microte/Prosumer-v0")` does first) pulls in neither the socket.io client
    and server nor the database libraries, about a second of imports."""
    import subprocess
    import sys

    code = (
        "import sys, controller.envs\n"
        "print(sorted(m for m in ('socketio', 'engineio', 'aiohttp', 'sqlalchemy', 'dataset') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_scenario_file_is_parsed_again_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO.read_text())
    first, _ = episode_scenario(path, 3, 1.0)
    assert episode_scenario(path, 3, 1.0)[0] is first  # a reset every day: not parsed again
    assert episode_scenario(path, 4, 1.0)[0].seed == 4
    path.write_text(SCENARIO.read_text().replace('name = "', 'name = "edited-', 1))
    edited, _ = episode_scenario(path, 3, 1.0)
    assert edited.name.startswith("edited-") and edited.start_time == first.start_time


def test_the_agents_orders_booked_decoded_are_booked_as_the_wire_decodes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ProsumerEnv` books its agent's orders as entries already decoded (`submit_each`);
    through the `orders` event's decoding instead (`submit`), the same observations, infos
    (refusals included: one open entry per slot) and ledger records."""
    import controller.envs as envs_module

    scenario = tmp_path / "one_open.toml"
    scenario.write_text(SCENARIO.read_text().replace("[market]\n", "[market]\nmax_open_per_slot = 1\n", 1))

    def run() -> tuple[list[np.ndarray], list[object], list[object]]:
        env = ProsumerEnv(scenario, "H06", seed=4, days=0.5, keep_records=True)
        obs, _ = env.reset(seed=4)
        rng = np.random.default_rng(9)
        seen, infos = [obs], []
        for _ in range(48):
            obs, reward, _, _, info = env.step(rng.uniform(0, 1, len(ACT_FIELDS)).astype(np.float32))
            seen.append(obs)
            infos.append((reward, info))
        return seen, infos, env.records

    decoded = run()
    monkeypatch.setattr(envs_module, "_within_bounds", lambda orders: False)
    wire = run()
    assert all(np.array_equal(a, b) for a, b in zip(decoded[0], wire[0], strict=True))
    assert decoded[1] == wire[1] and decoded[2] == wire[2]
    assert sum(len(info["refused"]) for _, info in decoded[1]) > 5  # type: ignore[index]
