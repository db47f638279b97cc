"""The DSO agent (seed 004): power flows on the feeder, grid states for upcoming slots.

A socket.io client with role `dso`. Ahead of delivery it forecasts every participant's net
injection (its profiles: generation minus load, without batteries), runs a pandapower
power flow on the feeder, classifies the slot GREEN/YELLOW/RED by the scenario's
thresholds and sends `grid_state.set` on `/grid` when the state differs from the one in
force, so the auction (RED: no P2P fill; YELLOW: `yellow_fee`) and community pricing react.
After delivery it runs the power flow again on the metered injections (read back from the
ledger). Both results go to the ledger as `GridFlowRecord`s (table `grid_flows`).

Driving: `microte sim` calls `before_step`/`after_step` around every `step` (deterministic:
each state is set before the step that clears its slot). Standalone (`microte dso`, e.g.
against an rt market) it follows `start_round` on `/market` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import socketio

from controller.scenario import Scenario, load_scenario
from market.core import wire
from market.core.protocol import GridState
from market.core.records import Batch, GridFlowRecord
from market.core.sink import Sink
from market.feeder.network import Feeder, FeederConfig, FlowResult, average_w, classify, worst
from participants.profiles import SiteProfiles, build_profiles
from participants.spec import decode_specs

log = logging.getLogger("microte.dso")


# -- pure helpers ------------------------------------------------------------------------------


def forecast_injections(profiles: Mapping[str, SiteProfiles], start: int, end: int) -> dict[str, float]:
    """Each participant's forecast net injection (W, export positive) over [start, end)."""
    out: dict[str, float] = {}
    for pid in sorted(profiles):
        gen, load = profiles[pid].slot((start, end))
        out[pid] = average_w(sum(gen.values()) - load, start, end)
    return out


def metered_injections(rows: Iterable[Mapping[str, Any]], start: int, end: int) -> dict[str, float]:
    """Net injection (W) per participant from the ledger's `meters` rows of slot [start,
    end): exported energy (the sum of `generation`) minus imported (`consumption.other.external`)."""
    out: dict[str, float] = {}
    for r in rows:
        if r["time_interval_start"] != start or r["time_interval_end"] != end:
            continue
        exported = sum(json.loads(r["generation"]).values())
        imported = json.loads(r["consumption"]).get("other", {}).get("external", 0)
        out[r["participant_id"]] = average_w(exported - imported, start, end)
    return out


def flow_record(
    kind: str,
    slot: tuple[int, int],
    result: FlowResult,
    state: GridState,
    injections: Mapping[str, float],
    now: int,
    buses: Mapping[int, float] | Mapping[str, float] | None = None,
) -> GridFlowRecord:
    """The ledger's row of one power flow; `buses`: the injections it ran on, W per bus."""
    per_bus = {str(b): round(w, 3) for b, w in sorted((buses or {}).items(), key=lambda x: int(x[0]))}
    return GridFlowRecord(
        id=f"pf{slot[0]}.{kind}",
        kind=kind,
        time_delivery_start=slot[0],
        time_delivery_end=slot[1],
        state=state,
        converged=result.converged,
        vm_min_pu=_round(result.vm_min_pu),
        vm_max_pu=_round(result.vm_max_pu),
        line_loading_max=_round(result.line_loading_max),
        trafo_loading_max=_round(result.trafo_loading_max),
        losses_kw=_round(result.losses_kw),
        injection_kw=round(sum(injections.values()) / 1000.0, 6),
        participants=len(injections),
        time=now,
        buses=json.dumps(per_bus, separators=(",", ":")),
    )


def _round(v: float | None) -> float | None:
    # 9 digits: the ledger holds what the power flow says, not its last-bit noise.
    return None if v is None else round(v, 9)


# -- the agent -------------------------------------------------------------------------------


class DsoAgent:
    def __init__(
        self,
        scenario: Scenario,
        feeder: Feeder,
        *,
        pid: str,
        token: str,
        sink: Sink | None = None,
        base_dir: str | Path | None = None,
        participants: Sequence[str] | None = None,
        serializer: str = "json",
    ) -> None:
        if scenario.feeder is None:
            raise ValueError("the scenario has no [feeder] table")
        self.config: FeederConfig = scenario.feeder
        self.scenario = scenario
        self.feeder = feeder
        self.pid, self.token = pid, token
        self.sink = sink
        specs = [s for s in decode_specs(scenario.participants) if participants is None or s.id in participants]
        self.profiles = {s.id: build_profiles(s, scenario.seed, scenario.timezone, base_dir) for s in specs}
        self.sio = socketio.AsyncClient(reconnection=False, serializer=wire.serializer(serializer))
        self.states: dict[int, GridState] = {}  # LEM slot start -> the state in force (set by us)
        self.assessed: set[int] = set()  # LEM slot starts with a forecast flow
        self.records: list[GridFlowRecord] = []
        self.flow_seconds: list[float] = []  # wall time of each power flow
        self.errors: list[Any] = []  # refused grid_state.set replies
        self._lock = asyncio.Lock()
        self.flows_sent = 0  # grid_flows.set accepted (capacity-aware clearing)
        self._flows_done: set[int] = set()  # auction slots whose flows were accepted or whose gate closed
        self._now: int | None = None

    # -- connection ------------------------------------------------------------------------

    async def connect(self, url: str, *, listen: bool = False) -> None:
        """Connect to `/grid` (and to `/market` when `listen`: follow `start_round`)."""
        namespaces = ["/grid", "/market"] if listen else ["/grid"]
        if listen:
            self.sio.on("start_round", self._on_start_round, namespace="/market")
        await self.sio.connect(
            url, namespaces=namespaces, transports=["websocket"], auth={"id": self.pid, "token": self.token}
        )

    async def close(self) -> None:
        if self.sio.connected:
            await self.sio.disconnect()

    # -- rounds ----------------------------------------------------------------------------

    async def before_step(self, t: int) -> None:
        """Assess the LEM slots of [t, t + lookahead slots) not assessed yet; set their states."""
        async with self._lock:
            await self._assess_from(t)

    async def after_step(self, slot: tuple[int, int]) -> None:
        """The metered power flow of a delivered slot; then the market clock is at its start."""
        async with self._lock:
            self._now = slot[0]
            await self._metered(slot)

    async def _on_start_round(self, payload: Any) -> None:
        try:
            async with self._lock:
                t, d = int(payload["time"]), int(payload["duration"])
                self._now = t
                await self._assess_from(int(payload["next_settle"][0]))
                # sim: the slot before this round was processed before this round opened;
                # rt: the one before that (its readings are in after `meter_grace`).
                last = t - d if payload.get("mode") == "sim" else t - 2 * d
                await self._metered((last, last + d))
        except Exception:
            log.exception("dso: round %s failed", payload.get("time") if isinstance(payload, dict) else payload)

    async def _assess_from(self, t: int) -> None:
        lem = self.config.lem_duration
        horizon = t + self.config.lookahead * max(lem, self.scenario.step)
        first = -(-t // lem) * lem  # a LEM slot that started already cannot be set any more
        for start in range(first, horizon, lem):
            if start in self.assessed or (self._now is not None and start <= self._now):
                continue
            await self._forecast((start, start + lem))
        if self.config.capacity:
            await self._send_flows(t, horizon)

    async def _forecast(self, slot: tuple[int, int]) -> None:
        injections = forecast_injections(self.profiles, *slot)
        result, state = await self._flow(injections)
        self.assessed.add(slot[0])
        buses = self.feeder.bus_injections(injections)
        await self._store(flow_record("forecast", slot, result, state, injections, self._now or 0, buses))
        if state != self.states.get(slot[0], "GREEN"):
            reply = await self.sio.call(
                "grid_state.set", {"time_delivery": list(slot), "state": state}, namespace="/grid", timeout=30
            )
            if isinstance(reply, dict) and reply.get("ok"):
                self.states[slot[0]] = state
            else:
                self.errors.append(reply)
                log.warning("dso: grid_state.set %s %s refused: %s", slot, state, reply)

    async def _send_flows(self, t: int, horizon: int) -> None:
        """Capacity-aware clearing: the branch flows before trading of every auction slot of
        [t, horizon) whose gate is open, from the forecast injections on the feeder's
        lossless model (the one the clearing cuts with). A slot is sent until accepted or
        its gate has closed (before the market's first round nothing is accepted yet)."""
        sens, d = self.feeder.sensitivities(), self.scenario.step
        for start in range(-(-t // d) * d, horizon, d):
            if start in self._flows_done:
                continue
            injections = self.feeder.bus_injections(forecast_injections(self.profiles, start, start + d))
            body = {"time_delivery": [start, start + d], "flows_w": sens.flows(injections)}
            reply = await self.sio.call("grid_flows.set", body, namespace="/grid", timeout=30)
            ok = isinstance(reply, dict) and reply.get("ok")
            code = reply.get("error", {}).get("code") if isinstance(reply, dict) and not ok else None
            if ok or code == "closed":
                self._flows_done.add(start)
                self.flows_sent += bool(ok)
            if not ok and code not in ("unavailable", "closed"):  # not open yet / no longer: nothing to fix
                self.errors.append(reply)
                log.warning("dso: grid_flows.set %s refused: %s", start, reply)

    async def _metered(self, slot: tuple[int, int]) -> None:
        if self.sink is None or slot[0] < 0:
            return
        rows = await self.sink.read("meters", ("time_interval_start", slot[0] - 1))
        injections = metered_injections(rows, *slot)
        if not injections:
            return
        result, state = await self._flow(injections)
        buses = self.feeder.bus_injections(injections)
        await self._store(flow_record("metered", slot, result, state, injections, self._now or slot[0], buses))

    async def _flow(self, injections: Mapping[str, float]) -> tuple[FlowResult, GridState]:
        started = time.perf_counter()
        result = await asyncio.to_thread(self.feeder.run, self.feeder.bus_injections(injections))
        self.flow_seconds.append(time.perf_counter() - started)
        return result, classify(result, self.config.thresholds)

    async def _store(self, record: GridFlowRecord) -> None:
        self.records.append(record)
        if self.sink is not None:
            await self.sink.write(Batch((record,)))

    def state_of(self, slot_start: int, duration: int) -> GridState:
        """The state this agent put in force for an auction slot (worst overlapping LEM slot)."""
        lem = self.config.lem_duration
        starts = range(slot_start // lem * lem, slot_start + duration, lem)
        return worst([self.states.get(s, "GREEN") for s in starts])


# -- `microte dso` ---------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario TOML with a [feeder] table")
    p.add_argument("--url", default="http://127.0.0.1:8765", help="market server URL")
    p.add_argument("--id", help="registry id of the DSO (default: the feeder's dso_id)")
    p.add_argument("--token", required=True)
    p.add_argument("--ledger", help="ledger URL: power-flow results are written, meter readings read")
    p.add_argument("--serializer", choices=["json", "msgpack"], default="json")
    p.add_argument("--log-level", default="INFO")


async def serve(args: argparse.Namespace) -> int:
    from ledger import open_sink

    scenario = load_scenario(args.scenario)
    if scenario.feeder is None:
        raise SystemExit(f"{args.scenario}: no [feeder] table")
    base = Path(args.scenario).parent
    ids = [s.id for s in decode_specs(scenario.participants)]
    feeder = await asyncio.to_thread(Feeder.load, scenario.feeder, ids, base)
    sink = open_sink(args.ledger) if args.ledger else None
    if sink is not None:
        await sink.start()
    agent = DsoAgent(
        scenario,
        feeder,
        pid=args.id or scenario.feeder.dso_id,
        token=args.token,
        sink=sink,
        base_dir=base,
        serializer=args.serializer,
    )
    try:
        await agent.connect(args.url, listen=True)
        print(f"microte dso {agent.pid} connected to {args.url}", flush=True)
        await agent.sio.wait()
    finally:
        await agent.close()
        if sink is not None:
            await sink.close()
    return 0


def main(args: argparse.Namespace) -> int:
    from controller import runloop

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return runloop.run(serve(args))


def summary(records: Sequence[GridFlowRecord]) -> dict[str, Any]:
    """Counts of states per kind, and the extremes over all slots (for reports and logs)."""
    out: dict[str, Any] = {}
    for kind in ("forecast", "metered"):
        rows = [r for r in records if r.kind == kind]
        out[kind] = {
            "slots": len(rows),
            "states": {s: sum(r.state == s for r in rows) for s in ("GREEN", "YELLOW", "RED")},
            "vm_max_pu": max((r.vm_max_pu for r in rows if r.vm_max_pu is not None), default=None),
            "vm_min_pu": min((r.vm_min_pu for r in rows if r.vm_min_pu is not None), default=None),
            "loading_max": max(
                (v for r in rows for v in (r.line_loading_max, r.trafo_loading_max) if v is not None), default=None
            ),
        }
    return out
