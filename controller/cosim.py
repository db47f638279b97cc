"""`microte cosim SCENARIO`: microte as HELICS federates (seed 004, PEMT-CoSim; docs/grid.md).

Three or four federates over one HELICS broker (zmq core), time in seconds since the
scenario start:

- `market`: the whole microte market (server subprocess, the scenario's prosumer clients,
  the controller stepping rounds). Publishes the net injections per feeder bus, forecast
  for the slots whose gate closes next (`market/forecast`) and metered after each round
  (`market/injections`); subscribes to the grid's states (`grid/grid_state`), which it
  hands to the auction as the DSO (`/grid` `grid_state.set`), and to the grid's power
  flow results (`grid/voltages`), which it writes to the ledger (`grid_flows`).
- `grid`: a pandapower feeder (`market.feeder.Feeder`). Runs the power flows of both
  kinds, classifies the forecast slots and publishes states and results. Adds "background"
  PV of non-market neighbours from the weather federate at every participant bus.
- `weather`: a reference PV system of 1 kW (the synthetic solar model): publishes its
  output per kW (`weather/pv_pu`) for the current slot and the next ones.
- `buildings` (only with a `[cosim.buildings]` table; controller/buildings_federate.py):
  thermal houses under PEM (or thermostats). The grid publishes the houses' coordinator
  target from each slot's forecast flow (`grid/buildings_target`); the houses publish
  their HVAC load per bus (`buildings/hvac`), which the grid subtracts from the bus
  injections of the slot's metered flow (and the market's `grid_flows` row records).

Time in slot k (tau = k * step): weather and market publish at tau (forecasts), the grid
answers at tau+1 (states; the houses' target of slot k), the market applies the states at
tau+2, steps its round and publishes the metered injections while the houses step slot k
and publish their load, and the grid answers at tau+3 (voltages). Every federate is
uninterruptible: it is granted exactly the times it requests.

`microte cosim SCENARIO` starts the broker and the federates (subprocesses) on this
machine and watches them together; `--federate market|grid|weather|buildings --broker
tcp://HOST:PORT` runs one federate against a broker elsewhere (`--broker-only` runs just
the broker, for as many federates as the scenario has).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, Any

import msgspec

from controller import buildings_federate as bld
from controller import helics_io as io
from controller.scenario import Scenario, load_scenario

log = logging.getLogger("microte.cosim")

FEDERATES = ("market", "grid", "weather", "buildings")
KEYS = {
    "forecast": "market/forecast",
    "injections": "market/injections",
    "grid_state": "grid/grid_state",
    "voltages": "grid/voltages",
    "pv_pu": "weather/pv_pu",
    "hvac": bld.KEYS["hvac"],
    "buildings_target": bld.KEYS["target"],
}
DEFAULT_PORT = 23500


class Options(msgspec.Struct, frozen=True):
    scenario: str
    broker: str = f"tcp://127.0.0.1:{DEFAULT_PORT}"
    days: float | None = None
    rounds: int | None = None  # cut the run to this many rounds
    weather: bool = True  # the weather federate takes part (the grid subscribes to it)
    buildings: bool = True  # the buildings federate takes part if the scenario has [cosim.buildings]
    background_pv_kw: float = 0.0  # neighbours' PV per participant bus, times weather/pv_pu
    ledger: str = "sqlite:///microte-cosim.db"
    log_level: str = "WARNING"


def _scenario(opts: Options) -> Scenario:
    sc = load_scenario(opts.scenario)
    if opts.days is not None:
        sc = msgspec.structs.replace(sc, days=opts.days)
    if sc.feeder is None:
        raise SystemExit(f"{opts.scenario}: cosim needs a [feeder] table")
    return sc


def _buildings(opts: Options, sc: Scenario) -> bld.BuildingsConfig | None:
    """The buildings federate's table when it takes part, else None (exits on a bad table)."""
    cfg = bld.buildings_config(sc, opts.scenario)
    return cfg if opts.buildings else None


def kinds_of(opts: Options) -> list[str]:
    """The federates of a run: market and grid, weather unless left out, buildings with the table."""
    sc = _scenario(opts)
    return ["market", "grid"] + ["weather"] * opts.weather + ["buildings"] * (_buildings(opts, sc) is not None)


def _rounds(opts: Options, sc: Scenario) -> int:
    return min(sc.rounds, opts.rounds) if opts.rounds else sc.rounds


def _lookahead(sc: Scenario) -> int:
    """Slots ahead the forecast covers: the gate of slot t + L*step closes at a later round."""
    return int(sc.market.get("close_steps", 2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def broker_port(tries: int = 20, federates: int = 3) -> int:
    """A port P for a zmq broker with P + 1 free too: HELICS binds both (its reply socket on
    P + 1), and checking P alone failed about one start in ten on a busy machine. The broker
    hands its local federates' cores P + 5, P + 6, ... (one each, HELICS 3.6): those must be
    free too, or that federate fails "unable to register federate" (seen 1 start in 20 with 4)."""
    for _ in range(tries):
        port = free_port()
        needed = (port, port + 1, *range(port + 5, port + 5 + federates))
        if needed[-1] <= 65535 and all(port_is_free(p) for p in needed):
            return port
    raise RuntimeError(f"no free pair of ports for the HELICS broker in {tries} tries")


# -- the broker ----------------------------------------------------------------------------------


def start_broker(port: int, federates: int, host: str = "127.0.0.1") -> Any:
    import helics as h

    bind = "127.0.0.1" if host == "0.0.0.0" else host
    taken = [p for p in (port, port + 1) if not port_is_free(p, bind)]
    if taken:  # the zmq broker needs both: say which one is in use instead of HELICS's bind error
        raise RuntimeError(f"the HELICS broker needs ports {port} and {port + 1}: port {taken[0]} is in use")
    broker = h.helicsCreateBroker(
        "zmq", f"microte-{port}", f"-f {federates} --loglevel=warning --local_interface=tcp://{host} --port={port}"
    )
    if not h.helicsBrokerIsConnected(broker):
        raise RuntimeError(f"the HELICS broker on port {port} did not start")
    return broker


def wait_broker(broker: Any, timeout_ms: int = -1) -> bool:
    import helics as h

    done: bool = h.helicsBrokerWaitForDisconnect(broker, timeout_ms)
    if done:
        h.helicsBrokerFree(broker)
    return done


# -- the weather federate ------------------------------------------------------------------------


def weather_federate(opts: Options) -> dict[str, Any]:
    """A 1 kW reference PV system: its output per kW for the current and the next slots."""
    from zoneinfo import ZoneInfo

    from participants.spec import PvSpec
    from participants.synthetic import SolarProfile, stable_key

    sc = _scenario(opts)
    pv = SolarProfile(PvSpec(kw=1.0), sc.seed, stable_key("weather"), ZoneInfo(sc.timezone))
    fed = io.federate("weather", opts.broker)
    pub = io.publish(fed, KEYS["pv_pu"])
    import helics as h

    h.helicsFederateEnterExecutingMode(fed)
    d, n, published = sc.step, _rounds(opts, sc), 0
    try:
        for k in range(n):
            io.request(fed, k * d)
            t = sc.start_time + k * d
            starts = [t + i * d for i in range(_lookahead(sc) + 1)]
            io.send(pub, {"pv_pu": {str(s): pv.wh(s, s + d) * 3600 / d / 1000 for s in starts}})
            published += 1
    finally:
        io.close(fed)
    return {"federate": "weather", "published": published}


# -- the grid federate ---------------------------------------------------------------------------


def grid_federate(opts: Options) -> dict[str, Any]:
    """Power flows of the market's injections (forecast and metered) on the pandapower feeder;
    with the buildings federate, the houses' target from the forecast and their HVAC load
    in the metered flow."""
    from market.feeder.network import Feeder, classify
    from participants.spec import decode_specs

    sc = _scenario(opts)
    assert sc.feeder is not None
    ids = [s.id for s in decode_specs(sc.participants)]
    feeder = Feeder.load(sc.feeder, ids, Path(opts.scenario).parent)
    fed = io.federate("grid", opts.broker)
    pub_state, pub_volt = io.publish(fed, KEYS["grid_state"]), io.publish(fed, KEYS["voltages"])
    sub_fc, sub_inj = io.subscribe(fed, KEYS["forecast"]), io.subscribe(fed, KEYS["injections"])
    sub_pv = io.subscribe(fed, KEYS["pv_pu"]) if opts.weather else None
    houses_on = _buildings(opts, sc) is not None
    pub_target = io.publish(fed, KEYS["buildings_target"]) if houses_on else None
    sub_hvac = io.subscribe(fed, KEYS["hvac"]) if houses_on else None
    rating_w = bld.trafo_rating_w(feeder.net) if houses_on else 0.0
    io.enter_executing(fed)
    d, n = sc.step, _rounds(opts, sc)
    pv: dict[int, float] = {}
    targets: dict[int, float] = {}  # slot start -> the houses' target from its forecast flow
    flows, seconds, houses_wh = 0, 0.0, 0.0

    def run(
        slot: Sequence[int], buses: Mapping[str, float], houses: Mapping[str, float] | None = None
    ) -> dict[str, Any]:
        """One power flow; `houses`: W the houses draw per bus (metered slots, buildings federate)."""
        nonlocal flows, seconds
        inj = {int(b): w for b, w in buses.items()}
        extra = opts.background_pv_kw * 1000 * pv.get(slot[0], 0.0)
        for b in feeder.element_of:
            inj[b] = inj.get(b, 0.0) + extra
        for bus, w in (houses or {}).items():
            inj[int(bus)] = inj.get(int(bus), 0.0) - w
        started = time.perf_counter()
        result = feeder.run(inj)
        seconds += time.perf_counter() - started
        flows += 1
        state = classify(result, sc.feeder.thresholds)  # type: ignore[union-attr]
        out = {"time_delivery": list(slot), "state": state, "flow": msgspec.to_builtins(result)}
        if houses_on and houses is None:  # a forecast: what it leaves the houses
            head = bld.head_import_w(feeder.net) if result.converged else None
            targets[slot[0]] = bld.target_w(rating_w, sc.feeder.max_loading, head)  # type: ignore[union-attr]
        if houses is not None:
            out["houses_w"] = dict(houses)
        return out

    def hvac_of(metered: Mapping[str, Any]) -> dict[str, float] | None:
        """The houses' load of the metered slot (None without the buildings federate)."""
        nonlocal houses_wh
        got = io.receive(sub_hvac)
        if not houses_on:
            return None
        if got is None or got["time_delivery"] != metered["time_delivery"]:
            log.warning("no houses' load for slot %s: its power flow runs without them", metered["time_delivery"])
            return {}
        houses_wh += sum(got["energy_wh"].values())
        return {str(b): float(w) for b, w in got["load_w"].items()}

    def weather() -> None:
        got = io.receive(sub_pv)
        if got is not None:
            pv.update({int(s): float(v) for s, v in got["pv_pu"].items()})

    try:
        for k in range(n):
            tau = k * d
            io.request(fed, tau + 1)
            weather()
            forecast = io.receive(sub_fc)
            if forecast is not None:
                io.send(pub_state, [run(f["time_delivery"], f["buses"]) for f in forecast])
            t = sc.start_time + tau
            if pub_target is not None and t in targets:  # this slot's, for the houses at tau + 2
                io.send(pub_target, {"time_delivery": [t, t + d], "target_w": targets.pop(t)})
            io.request(fed, tau + 3)
            weather()
            metered = io.receive(sub_inj)
            if metered is not None:
                io.send(pub_volt, run(metered["time_delivery"], metered["buses"], hvac_of(metered)))
    finally:
        io.close(fed)
    out = {"federate": "grid", "power_flows": flows, "seconds": round(seconds, 3)}
    return out | ({"houses_kwh": round(houses_wh / 1000, 6)} if houses_on else {})


# -- the market federate -------------------------------------------------------------------------


async def market_federate(opts: Options, progress: bool = False) -> dict[str, Any]:
    """The microte market, stepped in HELICS time; see the module docstring."""
    import socketio

    from controller.dso import flow_record, forecast_injections, metered_injections
    from controller.scenario import community
    from controller.sim import CONTROLLER_ID, fresh_ledger, market_process, write_registry
    from ledger import open_sink
    from market.core import wire
    from market.core.records import Batch
    from market.feeder.network import FlowResult, load_net, map_participants
    from participants.fleet import Fleet
    from participants.profiles import build_profiles

    sc = _scenario(opts)
    assert sc.feeder is not None
    base = Path(opts.scenario).parent
    specs = community(sc, None)
    ids = [s.id for s in specs]
    net = await asyncio.to_thread(load_net, sc.feeder, base)
    bus_of = map_participants(net, sc.feeder, ids)
    profiles = {s.id: build_profiles(s, sc.seed, sc.timezone, base) for s in specs}
    dso_id = sc.feeder.dso_id
    tokens = {s.id: secrets.token_urlsafe(18) for s in specs} | {
        CONTROLLER_ID: secrets.token_urlsafe(18),
        dso_id: secrets.token_urlsafe(18),
    }
    fed = await asyncio.to_thread(io.federate, "market", opts.broker)
    pub_fc, pub_inj = io.publish(fed, KEYS["forecast"]), io.publish(fed, KEYS["injections"])
    sub_state, sub_volt = io.subscribe(fed, KEYS["grid_state"]), io.subscribe(fed, KEYS["voltages"])
    import helics as h

    d, n, lookahead = sc.step, _rounds(opts, sc), _lookahead(sc)
    stats: dict[str, Any] = {"federate": "market", "rounds": 0, "states_set": 0, "flows": 0, "received": []}
    states: dict[int, str] = {}
    forecast_of: dict[int, dict[str, float]] = {}  # slot start -> injection per participant (W)
    metered_of: dict[int, dict[str, float]] = {}

    def per_bus(inj: Mapping[str, float]) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid in sorted(inj):
            if pid in bus_of:
                out[str(bus_of[pid])] = out.get(str(bus_of[pid]), 0.0) + inj[pid]
        return out

    def forecast(start: int) -> dict[str, Any]:
        inj = forecast_injections(profiles, start, start + d)
        forecast_of[start] = inj
        return {"time_delivery": [start, start + d], "buses": per_bus(inj)}

    def with_houses(buses: Mapping[str, float], houses: Mapping[str, float]) -> dict[str, float]:
        """Per-bus injections with the houses' draw taken off: what the grid's flow ran on,
        so that the ledger row re-runs (`Feeder.run(buses)`)."""
        both = dict(buses)
        for b, w in houses.items():
            both[b] = both.get(b, 0.0) - w
        return both

    fresh_ledger(opts.ledger)
    with tempfile.TemporaryDirectory(prefix="microte-cosim-") as tmp:
        registry = Path(tmp) / "registry.toml"
        write_registry(registry, tokens, {dso_id: "dso"})
        args = ["--registry", str(registry), "--scenario", opts.scenario, "--port", "0", "--ledger", opts.ledger]
        async with market_process([*args, "--mode", "sim", "--log-level", opts.log_level]) as url:
            members = [(s, tokens[s.id]) for s in specs]
            async with Fleet(url, members, sc.seed, concurrency=64, timezone=sc.timezone, base_dir=base):
                ctl = socketio.AsyncClient(reconnection=False, serializer=wire.serializer("json"))
                dso = socketio.AsyncClient(reconnection=False, serializer=wire.serializer("json"))
                await ctl.connect(
                    url, namespaces=["/simulation"], auth={"id": CONTROLLER_ID, "token": tokens[CONTROLLER_ID]}
                )
                await dso.connect(url, namespaces=["/grid"], auth={"id": dso_id, "token": tokens[dso_id]})
                sink = open_sink(opts.ledger)
                await sink.start()

                async def results(now: int) -> None:
                    """Apply the grid's states (as the DSO) and record its power flows."""
                    records = []
                    for msg in io.receive(sub_state) or []:
                        start = msg["time_delivery"][0]
                        flow = msgspec.convert(msg["flow"], FlowResult, strict=False)
                        inj = forecast_of.get(start, {})
                        records.append(
                            flow_record("forecast", (start, start + d), flow, msg["state"], inj, now, per_bus(inj))
                        )
                        if msg["state"] != states.get(start, "GREEN") and start > now:
                            reply = await dso.call(
                                "grid_state.set",
                                {"time_delivery": [start, start + d], "state": msg["state"]},
                                namespace="/grid",
                                timeout=30,
                            )
                            if isinstance(reply, dict) and reply.get("ok"):
                                states[start] = msg["state"]
                                stats["states_set"] += 1
                    volt = io.receive(sub_volt)
                    if volt is not None:
                        start = volt["time_delivery"][0]
                        flow = msgspec.convert(volt["flow"], FlowResult, strict=False)
                        inj = metered_of.get(start, {})
                        buses = per_bus(inj)
                        if "houses_w" in volt:  # the houses' HVAC load ran in this flow too
                            buses = with_houses(buses, volt["houses_w"])
                        record = flow_record("metered", (start, start + d), flow, volt["state"], inj, now, buses)
                        if "houses_w" in volt:  # the row's injection is what the flow ran on
                            record = msgspec.structs.replace(record, injection_kw=round(sum(buses.values()) / 1e3, 6))
                        records.append(record)
                        stats["received"].append({"slot": start, "vm_max_pu": flow.vm_max_pu, "state": volt["state"]})
                    if records:
                        await sink.write(Batch(tuple(records)))
                        stats["flows"] += len(records)

                try:
                    await asyncio.to_thread(h.helicsFederateEnterExecutingMode, fed)
                    timeout = float(sc.market.get("round_timeout", 10.0)) + 30
                    for k in range(n):
                        tau, t = k * d, sc.start_time + k * d
                        await asyncio.to_thread(io.request, fed, tau)
                        await results(t - d if k else 0)  # the voltages of the previous slot
                        first = range(lookahead + 1) if k == 0 else [lookahead]
                        io.send(pub_fc, [forecast(t + i * d) for i in first])
                        await asyncio.to_thread(io.request, fed, tau + 2)
                        await results(t - d if k else 0)  # the states, before this round clears
                        reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=timeout)
                        if not reply.get("ok"):
                            raise RuntimeError(f"step {t} refused: {reply}")
                        stats["rounds"] += 1
                        rows = await sink.read("meters", ("time_interval_start", t - 1))
                        inj = metered_injections(rows, t, t + d)
                        metered_of[t] = inj
                        io.send(pub_inj, {"time_delivery": [t, t + d], "buses": per_bus(inj)})
                        if progress:
                            print(f"round {k + 1}/{n} t={t} states set={stats['states_set']}", flush=True)
                    await asyncio.to_thread(io.request, fed, n * d)
                    await results(sc.start_time + (n - 1) * d)
                finally:
                    await asyncio.to_thread(io.close, fed)
                    await sink.close()
                    await dso.disconnect()
                    await ctl.disconnect()
    return stats


# -- the command ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", help="scenario TOML with a [feeder] table")
    p.add_argument("--federate", choices=[*FEDERATES, "all"], default="all", help="run one federate (default: all)")
    p.add_argument("--broker", help="broker address tcp://HOST:PORT (default: start one on a free local port)")
    p.add_argument("--broker-only", action="store_true", help="run just a broker (for federates on other machines)")
    p.add_argument("--broker-host", default="127.0.0.1", help="interface of a started broker (0.0.0.0: all)")
    p.add_argument(
        "--broker-port", type=int, default=0, help=f"port of a started broker (0: free; e.g. {DEFAULT_PORT})"
    )
    p.add_argument("--no-weather", action="store_true", help="without the weather federate")
    p.add_argument("--no-buildings", action="store_true", help="without the buildings federate ([cosim.buildings])")
    p.add_argument("--background-pv-kw", type=float, default=0.0, help="neighbours' PV per participant bus (kW)")
    p.add_argument("--days", type=float, help="override the scenario's number of days")
    p.add_argument("--rounds", type=int, help="stop after this many rounds")
    p.add_argument("--ledger", default="sqlite:///microte-cosim.db", help="ledger of the market federate")
    p.add_argument("--log-level", default="WARNING")


def _options(args: argparse.Namespace, broker: str) -> Options:
    return Options(
        scenario=args.scenario,
        broker=broker,
        days=args.days,
        rounds=args.rounds,
        weather=not args.no_weather,
        buildings=not args.no_buildings,
        background_pv_kw=args.background_pv_kw,
        ledger=args.ledger,
        log_level=args.log_level,
    )


def run_one(kind: str, opts: Options) -> dict[str, Any]:
    if kind == "market":
        from controller import runloop

        out: dict[str, Any] = {}

        async def go() -> int:
            out.update(await market_federate(opts))
            return 0

        runloop.run(go())
        return out
    if kind == "grid":
        return grid_federate(opts)
    if kind == "weather":
        return weather_federate(opts)
    if kind == "buildings":
        sc = _scenario(opts)
        cfg = _buildings(opts, sc)
        if cfg is None:
            raise SystemExit(f"{opts.scenario}: the buildings federate needs a [cosim.buildings] table")
        return bld.buildings_federate(opts.scenario, sc, cfg, opts.broker, _rounds(opts, sc))
    raise ValueError(f"unknown federate {kind!r}")


def federate_command(kind: str, opts: Options) -> list[str]:
    """The command line of one federate of `run_all` (its own process)."""
    return [sys.executable, "-m", "controller.cosim", msgspec.json.encode(opts).decode(), kind]


def run_all(args: argparse.Namespace, *, timeout: float = 600.0) -> dict[str, Any]:
    """Broker in this process, every federate in its own subprocess; their summaries.

    The federates are watched together: the first that fails (or exits before registering,
    which leaves the others waiting at the broker for it) stops the rest at once and the run
    fails naming it (and the last line of its stderr, which is echoed to ours meanwhile). The
    scenario and its `[cosim.buildings]` table are checked before anything starts. A broker
    port that cannot be bound is retried on another free pair, unless it was given
    (`--broker-port`)."""
    opts = _options(args, "")
    kinds = kinds_of(opts)
    attempts = 1 if args.broker_port else 3
    for attempt in range(attempts):
        port = args.broker_port or broker_port(federates=len(kinds))
        try:
            broker = start_broker(port, len(kinds), args.broker_host)
            break
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            log.warning("the HELICS broker could not start on port %d: another pair", port)
    address = f"tcp://{'127.0.0.1' if args.broker_host == '0.0.0.0' else args.broker_host}:{port}"
    opts = msgspec.structs.replace(opts, broker=address)
    procs = {
        kind: subprocess.Popen(federate_command(kind, opts), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for kind in kinds
    }
    tails = {kind: _Tail(proc.stderr) for kind, proc in procs.items()}
    out: dict[str, Any] = {"broker": address}
    failed = False
    try:
        with ThreadPoolExecutor(len(procs)) as pool:
            # each federate's stdout drained in a thread (its stderr in its _Tail) while the others are watched
            running = {pool.submit(_output, proc): kind for kind, proc in procs.items()}
            deadline = time.monotonic() + timeout
            while running:
                done, _ = wait(running, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
                if not done:
                    failed = True
                    _stop(procs)
                    raise TimeoutError(f"the {', '.join(sorted(running.values()))} federate(s) ran past {timeout:g} s")
                for future in done:
                    kind = running.pop(future)
                    stdout = future.result()
                    code = procs[kind].returncode
                    if code != 0:
                        failed = True
                        _stop(procs)
                        why = tails[kind].last()
                        why = f": {why}" if why else ""
                        raise RuntimeError(f"the {kind} federate failed (exit {code}){why}; the others were stopped")
                    out[kind] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        _stop(procs)
        if not wait_broker(broker, 1_000 if failed else 10_000):
            _drop_broker(broker)
    return out


def _output(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    text = proc.stdout.read()
    proc.wait()
    return text


class _Tail:
    """A federate's stderr echoed to ours as it comes (its logs stay live); its last line is
    kept to say why it failed."""

    def __init__(self, stream: IO[str] | None) -> None:
        self.lines: deque[str] = deque(maxlen=1)
        self.thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.thread.start()

    def _pump(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            sys.stderr.write(line)
            if line.strip():
                self.lines.append(line.strip())

    def last(self) -> str:
        self.thread.join(timeout=2)  # the pipe closes when the process ends
        return self.lines[-1] if self.lines else ""


def _stop(procs: Mapping[str, subprocess.Popen[str]]) -> None:
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
    for proc in procs.values():
        proc.wait()


def _drop_broker(broker: Any) -> None:
    """A broker still waiting for federates that are gone: disconnect it and free it."""
    import helics as h

    with contextlib.suppress(Exception):
        h.helicsBrokerDisconnect(broker)
    with contextlib.suppress(Exception):
        h.helicsBrokerFree(broker)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.broker_only:
        port = args.broker_port or DEFAULT_PORT
        kinds = len(kinds_of(_options(args, "")))
        broker = start_broker(port, kinds, args.broker_host)
        print(f"microte cosim broker on tcp://{args.broker_host}:{port} for {kinds} federates", flush=True)
        wait_broker(broker)
        return 0
    if args.federate != "all":
        broker = args.broker or f"tcp://127.0.0.1:{DEFAULT_PORT}"
        print(json.dumps(run_one(args.federate, _options(args, broker))), flush=True)
        return 0
    result = run_all(args)
    print(json.dumps(result, indent=2))
    return 0


def _child(argv: Sequence[str]) -> int:
    """`python -m controller.cosim OPTIONS_JSON KIND`: one federate of `run_all`."""
    opts = msgspec.json.decode(argv[0], type=Options)
    logging.basicConfig(level=opts.log_level.upper())
    print(json.dumps(run_one(argv[1], opts)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
