"""`ProsumerEnv` against a live market server (docs/rl.md, *Against a live server*).

The agent is a real socket.io participant on `/market`: it hears `start_round`, meters its
devices, places the orders its actions make and hears its fills and deliveries, like any
client written from PROTOCOL.md. With the controller's token (a `sim` market) the
environment also steps the market: one `step` call per environment step. Without it (an
`rt` market someone else runs) a step waits for the market's next round.

The socket client runs on an event loop in a background thread that the environment owns
(`close()` stops it); the Gymnasium calls block on it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import gymnasium
import numpy as np
import socketio

from controller.envs import OBS_FIELDS, _Agent, action_space, delivery_between, observation_space, orders_of
from controller.scenario import community, load_scenario
from participants.messages import StartRound, parse
from participants.prosumer import Prosumer

T = TypeVar("T")


class _Client:
    """The agent's `/market` session and, in sim, the controller's `/simulation` one."""

    def __init__(self, prosumer: Prosumer, timeout: float) -> None:
        self.prosumer, self.timeout = prosumer, timeout
        self.sio = socketio.AsyncClient(reconnection=False)
        self.ctl: socketio.AsyncClient | None = None
        self.round: asyncio.Queue[StartRound] = asyncio.Queue(maxsize=64)
        self.delivered: set[int] = set()
        self.arrived = asyncio.Event()  # a delivery was handled
        self.sio.on("start_round", self._start_round, namespace="/market")
        self.sio.on("settled", self.prosumer.on_settled, namespace="/market")
        self.sio.on("delivery", self._delivery, namespace="/market")

    async def _start_round(self, payload: Any) -> None:
        msg = parse(payload, StartRound)
        meter, _ = self.prosumer.on_round_msg(msg, trade=False)
        if meter is not None:
            # Not awaited here: this handler runs in the socket's reader.
            await self.sio.emit("meter", meter, namespace="/market")
        if self.round.full():
            self.round.get_nowait()  # an agent that does not step keeps only the newest rounds
        self.round.put_nowait(msg)

    async def _delivery(self, payload: Any) -> None:
        self.prosumer.on_delivery(payload)
        if isinstance(payload, dict) and isinstance(payload.get("time_delivery"), list):
            self.delivered.add(int(payload["time_delivery"][0]))
        self.arrived.set()

    async def connect(self, url: str, pid: str, token: str, controller: tuple[str, str] | None) -> None:
        auth = {"id": pid, "token": token}
        await self.sio.connect(url, namespaces=["/market"], transports=["websocket"], auth=auth, wait_timeout=10)
        if controller is not None:
            self.ctl = socketio.AsyncClient(reconnection=False)
            auth = {"id": controller[0], "token": controller[1]}
            await self.ctl.connect(
                url, namespaces=["/simulation"], transports=["websocket"], auth=auth, wait_timeout=10
            )

    async def step_market(self, t: int) -> dict[str, Any]:
        assert self.ctl is not None
        reply = await self.ctl.call("step", {"time": t}, namespace="/simulation", timeout=self.timeout)
        if not (isinstance(reply, dict) and reply.get("ok")):
            raise RuntimeError(f"the market refused step {t}: {reply}")
        return dict(reply["round"])

    async def next_round(self) -> StartRound:
        return await asyncio.wait_for(self.round.get(), self.timeout)

    async def await_delivery(self, slot: int) -> None:
        """The delivery of `slot` (it travels on the agent's socket, the step reply on the
        controller's: either may come first)."""
        async with asyncio.timeout(self.timeout):
            while slot not in self.delivered:
                self.arrived.clear()
                await self.arrived.wait()

    async def orders(self, orders: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(await self.sio.call("orders", {"orders": orders}, namespace="/market", timeout=self.timeout))

    async def close(self) -> None:
        for c in (self.sio, self.ctl):
            if c is not None:
                await c.disconnect()


class LiveProsumerEnv(gymnasium.Env[np.ndarray, np.ndarray]):
    """`ProsumerEnv`'s spaces, observation, actions and reward, trading on the market at
    `url` as participant `participant` (token `token`), with its devices from `scenario`.
    `controller=(id, token)`: a sim market, stepped by this environment from the
    scenario's start, `days` long. Without: an rt market, one step per market round."""

    metadata = {"render_modes": []}  # noqa: RUF012 (gymnasium's convention)

    def __init__(
        self,
        scenario: str | Path,
        participant: str,
        *,
        url: str,
        token: str,
        controller: tuple[str, str] | None = None,
        days: float | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.scenario = load_scenario(scenario, {"days": days} if days is not None else None)
        specs = {s.id: s for s in community(self.scenario, None)}
        if participant not in specs:
            raise ValueError(f"no such participant in the scenario: {participant!r}")
        self.participant, self.url, self.token, self.controller = participant, url, token, controller
        self.base_dir, self.participant_spec, self.timeout = Path(scenario).parent, specs[participant], timeout
        self.observation_space, self.action_space = observation_space(), action_space()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="microte-live-env", daemon=True)
        self._thread.start()
        self._client: _Client | None = None
        self._agent: _Agent | None = None
        self._round = 0
        self._delivered = (0, 0, 0, 0)  # the last step's delivery, seen in the next observation

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Connect (again) and see the first round. In sim the market is stepped from the
        scenario's start: a market that already ran past it refuses (start a fresh one)."""
        super().reset(seed=seed)
        if self._client is not None:
            self._run(self._client.close())
        prosumer = Prosumer(
            self.participant_spec, self.scenario.seed, timezone=self.scenario.timezone, base_dir=self.base_dir
        )
        self._client = client = _Client(prosumer, self.timeout)
        self._agent = _Agent(prosumer, self.scenario.timezone)
        self._run(client.connect(self.url, self.participant, self.token, self.controller))
        self._round = 0
        before = self._agent.snapshot()
        if self.controller is not None:
            self._run(client.step_market(self.scenario.start_time))
        obs = self._observe(self._run(client.next_round()), (0, 0))
        self._delivered = delivery_between(before, self._agent.snapshot())
        return obs, {"slot": self._slot}

    def _observe(self, msg: StartRound, fills: tuple[int, int]) -> np.ndarray:
        assert self._agent is not None
        self._agent.fills = fills
        self._slot = msg.current_round[0]
        return self._agent.observe(msg)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        client, agent = self._client, self._agent
        if client is None or agent is None or agent.obs is None:
            raise RuntimeError("no episode running: call reset() first")
        orders = orders_of(agent.obs, action)
        replies = self._run(client.orders(orders)).get("results", []) if orders else []
        before = agent.snapshot()
        self._round += 1
        if self.controller is not None:
            t = self.scenario.start_time + self._round * self.scenario.step
            self._run(client.step_market(t))
            self._run(client.await_delivery(t))
        msg = self._run(client.next_round())
        now = agent.snapshot()
        # A sim step processes the round's own slot before it replies: the agent sees that
        # delivery one step later, as a participant deciding at `start_round` would (and as
        # the in-process environment does).
        agent.delivery, self._delivered = self._delivered, delivery_between(before, now)
        paid, received = self._delivered[0], self._delivered[1]
        truncated = self.controller is not None and self._round >= self.scenario.rounds - 1
        obs = self._observe(msg, (now[4] - before[4], now[5] - before[5]))
        if truncated:
            obs = np.zeros(len(OBS_FIELDS), dtype=np.float32)
        info = {"orders": orders, "refused": [r for r in replies if not r.get("ok")], "slot": self._slot}
        info.update(paid=paid, received=received)
        return obs, -(paid - received) / 1e6, False, truncated, info

    def close(self) -> None:
        if self._client is not None:
            self._run(self._client.close())
            self._client = None
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
