"""`LiveProsumerEnv` (controller/live_env.py) trading on a real market server: the agent
is a socket.io participant, the others are `microte participant`, the environment steps
the sim market. Its trajectory is the in-process environment's, step for step."""

from __future__ import annotations

import asyncio
import secrets
import sys
from pathlib import Path

import numpy as np

from controller.envs import ProsumerEnv
from controller.live_env import LiveProsumerEnv
from controller.sim import CONTROLLER_ID, market_process, write_registry

SCENARIO = Path(__file__).parents[2] / "scenarios" / "community.toml"
IDS = [f"H{i:02d}" for i in range(1, 21)]
ACTION = np.array([0.7, 1.0, 0.3, 1.0], dtype=np.float32)


async def test_the_live_env_trades_over_sockets_like_the_inproc_env(tmp_path: Path) -> None:
    tokens = {pid: secrets.token_urlsafe(12) for pid in [*IDS, CONTROLLER_ID]}
    registry = tmp_path / "registry.toml"
    write_registry(registry, tokens)
    args = ["--registry", str(registry), "--scenario", str(SCENARIO), "--port", "0"]
    args += ["--ledger", f"sqlite:///{tmp_path}/live.db", "--mode", "sim", "--log-level", "WARNING"]
    async with market_process(args) as url:
        others = [a for pid in IDS if pid != "H06" for a in ("--id", pid)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "participant", "--url", url, "--scenario", str(SCENARIO),
            "--registry", str(registry), *others, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(30):
                while b"participants connected" not in await proc.stderr.readline():
                    pass

            def live_episode() -> tuple[list[np.ndarray], list[float]]:
                env = LiveProsumerEnv(
                    SCENARIO, "H06", url=url, token=tokens["H06"], controller=(CONTROLLER_ID, tokens[CONTROLLER_ID]),
                    days=0.25,
                )  # fmt: skip
                try:
                    obs, _ = env.reset()
                    seen, rewards = [obs], []
                    truncated = False
                    while not truncated:
                        obs, reward, _, truncated, _ = env.step(ACTION)
                        seen.append(obs)
                        rewards.append(reward)
                    return seen, rewards
                finally:
                    env.close()

            live_obs, live_rewards = await asyncio.to_thread(live_episode)
        finally:
            proc.terminate()
            await proc.wait()
    inproc = ProsumerEnv(SCENARIO, "H06", days=0.25)
    obs, _ = inproc.reset()
    ref_obs, ref_rewards = [obs], []
    for _ in range(24):
        obs, reward, *_ = inproc.step(ACTION)
        ref_obs.append(obs)
        ref_rewards.append(reward)
    # The live reset steps round 0 to its end (its delivery is the in-process step 1's
    # reward); from then on both place the same orders at the same market time.
    assert len(live_rewards) == 23
    assert np.allclose(live_rewards, ref_rewards[1:], atol=1e-9), (live_rewards, ref_rewards)
    assert any(r != 0 for r in live_rewards)
    for k in range(23):  # the observation after each step (the last one: zeros in both)
        assert np.allclose(live_obs[k], ref_obs[k]), k
