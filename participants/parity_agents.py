"""The agents of the Parity market's flow (seed 000) for `microte sim` (docs/parity.md, *Agents*).

On `/grid`, each with its own session and token, as the seed's nodes are:

- the **aggregator** sets the LEM of its prosumers for every LEM slot before it starts (with
  its own parameters if it has some), and one SLA per `sla_length` before it starts;
- each **prosumer** saves, once a LEM slot has ended, the energy its meter measured at the
  grid connection in it (`lem.measure`), and, once a KPI period has ended, its value of every
  KPI it must comply with (`kpi.measure`);
- an **oracle** saves the community's value of the KPIs measured for the whole community.

The LEM solver and the SLA checker are the server's periodic ones (`[parity]` `solve_every`,
`sla_grace`). The agents act between the controller's steps and wait for every reply, so a
run's ledger depends on the scenario and seed only. A prosumer's flows are what its own
client metered (`Prosumer.flows`), not a second model of the site.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import socketio

from market.core import wire
from participants.parity_config import COMMUNITY, AgentKpi, AgentsConfig, decode_agents
from participants.prosumer import Prosumer


class ParityAgents:
    """The aggregator, the prosumers' `/grid` side and the oracle of one sim run."""

    def __init__(
        self,
        config: AgentsConfig,
        prosumers: Mapping[str, Prosumer],
        tokens: Mapping[str, str],
        *,
        lem_duration: int,
        step: int,
        end: int,
        serializer: str = "json",
    ) -> None:
        self.config = config
        self.prosumers = prosumers
        self.players = list(config.players if config.players is not None else prosumers)
        unknown = [p for p in self.players if p not in prosumers]
        if unknown:
            raise ValueError(f"[parity.agents] players {unknown} are not participants of the scenario")
        self.kpis = [self._kpi_players(k) for k in config.kpis]
        self.tokens = tokens
        self.lem_duration, self.step, self.end = lem_duration, step, end
        self.serializer = serializer
        self.clients: dict[str, socketio.AsyncClient] = {}
        self._lems_set = self._measured = self._kpis_done = -(2**62)  # up to which time each is done
        self._first_lem: int | None = None  # the first LEM slot set
        self._slas: list[tuple[str, int, int]] = []  # (id, start, end) of the SLAs set
        self.replies = 0

    def _kpi_players(self, kpi: AgentKpi) -> AgentKpi:
        if kpi.signal in COMMUNITY:
            if self.config.oracle is None:
                raise ValueError(f"[parity.agents] KPI {kpi.id!r}: a community signal needs an `oracle`")
            return msgspec.structs.replace(kpi, players=kpi.players or [self.config.oracle])
        players = kpi.players if kpi.players is not None else self.players
        unknown = [p for p in players if p not in self.prosumers]
        if unknown:
            raise ValueError(f"[parity.agents] KPI {kpi.id!r}: players {unknown} are not prosumers of the scenario")
        return msgspec.structs.replace(kpi, players=players)

    # -- sessions --------------------------------------------------------------------------

    async def connect(self, url: str) -> None:
        ids = [*self.config.ids(), *self._saving_players()]
        for pid in ids:
            client = socketio.AsyncClient(reconnection=False, serializer=wire.serializer(self.serializer))
            await client.connect(
                url,
                namespaces=["/grid"],
                transports=["websocket"],
                auth={"id": pid, "token": self.tokens[pid]},
            )
            self.clients[pid] = client

    async def close(self) -> None:
        await asyncio.gather(*(c.disconnect() for c in self.clients.values()), return_exceptions=True)

    def _saving_players(self) -> list[str]:
        """The prosumers that save measurements or KPI values, in order."""
        wanted = set(self.players) if self.config.measure else set()
        wanted |= {p for k in self.kpis if k.signal not in COMMUNITY for p in (k.players or ())}
        return [p for p in self.prosumers if p in wanted]

    async def _call(self, pid: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        reply = await self.clients[pid].call(event, data, namespace="/grid", timeout=60)
        self.replies += 1
        if not isinstance(reply, dict) or not reply.get("ok"):
            raise RuntimeError(f"/grid {event} by {pid} refused: {reply}")
        return reply

    # -- between the controller's steps ----------------------------------------------------

    async def before_step(self, t: int) -> None:
        """Before the step to `t` (the market clock is at the previous step): the LEMs of the
        slots starting before the step after it, the SLAs starting at `t`, and what the
        prosumers and the oracle measured in the LEM slots and KPI periods ended by now."""
        now = t - self.step
        await self._set_lems(t + self.step)
        await self._set_slas(t)
        await self.measure(now)

    async def measure(self, now: int) -> None:
        """Save every measurement and KPI value of periods ended by `now` (and not yet saved)."""
        await self._save_lems(now)
        await self._save_kpis(now)

    async def finish(self, now: int) -> dict[str, Any]:
        """At the end of a run (the market clock at its last step, `now`): save what is left,
        then the aggregator solves the LEMs and checks the SLAs that ended, as the periodic
        solver and checker would after the run (an SLA they checked already answers
        `duplicate` and moves nothing). Returns the last `lem.solve` reply."""
        await self.measure(now)
        agg = self.config.aggregator
        solved = await self._call(agg, "lem.solve", {"start": 0, "end": now})
        for sla_id, _start, end in self._slas:
            if end <= now:
                await self._call(agg, "sla.solve", {"sla": sla_id})
        return solved

    async def _set_lems(self, until: int) -> None:
        d = self.lem_duration
        first = max(self._lems_set, -(-(until - self.step) // d) * d)
        calls = []
        for s in range(first, min(until, self.end), d):
            body: dict[str, Any] = {"time_delivery": [s, s + d], "players": self.players}
            if self.config.params is not None:
                body["params"] = self.config.params
            calls.append(body)
        for body in calls:  # in order: the ledger's rows follow the slots
            await self._call(self.config.aggregator, "lem.set", body)
        if calls:
            self._lems_set = calls[-1]["time_delivery"][0] + d
            if self._first_lem is None:
                self._first_lem = calls[0]["time_delivery"][0]

    async def _set_slas(self, t: int) -> None:
        length = self.config.sla_length
        if not length or not self.kpis or t % length or t + length > self.end:
            return
        sla_id = f"SLA{t}"
        kpis = [
            {
                "id": k.id,
                "signal": k.signal,
                "rule": k.rule,
                "limit": k.limit,
                "penalty": k.penalty,
                "players": k.players,
                "resolution": k.resolution,
            }
            for k in self.kpis
        ]
        await self._call(self.config.aggregator, "sla.set", {"id": sla_id, "start": t, "end": t + length, "kpis": kpis})
        self._slas.append((sla_id, t, t + length))

    def _flows(self, pid: str, start: int, end: int) -> tuple[int, int]:
        """(Wh imported, Wh exported) a prosumer metered in the auction slots of [start, end)."""
        flows = self.prosumers[pid].flows
        got = [flows.get(s, (0, 0)) for s in range(start, end, self.step)]
        return sum(g[0] for g in got), sum(g[1] for g in got)

    async def _save_lems(self, now: int) -> None:
        """Each player's measurement of every LEM slot set that ended by `now`, once."""
        if not self.config.measure or self._first_lem is None:
            return
        d = self.lem_duration
        start = max(self._measured, self._first_lem)
        while start + d <= now and start < self._lems_set:
            for pid in self.players:
                imported, exported = self._flows(pid, start, start + d)
                body = {"time_delivery": [start, start + d], "consumption": imported, "production": exported}
                await self._call(pid, "lem.measure", body)
            start += d
        self._measured = start

    async def _save_kpis(self, now: int) -> None:
        for sla_id, start, end in self._slas:
            for kpi in self.kpis:
                for a in range(start, end, kpi.resolution):
                    b = a + kpi.resolution
                    if b > now or b <= self._kpis_done:
                        continue
                    for pid in kpi.players or ():
                        value = self._kpi_value(kpi, pid, a, b)
                        body = {"sla": sla_id, "kpi": kpi.id, "time_interval": [a, b], "value": value}
                        await self._call(pid, "kpi.measure", body)
        self._kpis_done = max(self._kpis_done, now)

    def _kpi_value(self, kpi: AgentKpi, pid: str, a: int, b: int) -> float:
        if kpi.signal in COMMUNITY:
            flows = [self._flows(p, a, b) for p in self.players]
            return float(sum(f[0] if kpi.signal == "community_import_wh" else f[1] for f in flows))
        imported, exported = self._flows(pid, a, b)
        return float(imported if kpi.signal == "import_wh" else exported)


__all__: Sequence[str] = ("AgentKpi", "AgentsConfig", "ParityAgents", "decode_agents")
