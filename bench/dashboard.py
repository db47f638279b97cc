"""What watching costs the market: sim rounds with no observer against rounds with K
dashboards connected to `/observe`, measured in the same run, alternating.

    python bench/dashboard.py [--n 200] [--observers 5] [--rounds 40] [--blocks 3]

One `microte market` subprocess (sim, SQLite ledger on disk), the scenario's community
grown to N prosumers as a `participants.fleet.Fleet` in a second process (the load), a
controller stepping rounds here, and K observer connections in a third process (each reads
every snapshot and decodes it, like the page). The blocks alternate: no observer, then K
observers, `--blocks` times each, so drift of a shared machine falls on both. Prints each
`step`'s p50/p99, rounds/s and the server process's CPU per round (what watching costs the
market, whatever the client processes take of the same cores) per phase, and the snapshots
the observers received. Never asserts (DESIGN.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path and bench/ledger.py would
# shadow the `ledger` package: put the project root there instead.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(_ROOT), *(p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench")]

from bench.ceiling import percentile, proc_cpu  # noqa: E402
from bench.sim import server_pid  # noqa: E402

SCENARIO = _ROOT / "scenarios" / "community.toml"
OBSERVERS = "OP"  # observer i logs in as OP<i> (one live session per id: each needs its own)


def fleet_worker(url: str, specs: list[Any], tokens: dict[str, str], seed: int, tz: str, stop: Any) -> None:
    from participants.fleet import Fleet

    async def run() -> None:
        fleet = Fleet(url, [(s, tokens[s.id]) for s in specs], seed, timezone=tz, base_dir=SCENARIO.parent)
        async with fleet:
            while not stop.is_set():
                await asyncio.sleep(0.1)

    asyncio.run(run())


def observer_worker(url: str, tokens: dict[str, str], k: int, watch: Any, counts: Any) -> None:
    import socketio

    async def one(i: int) -> None:
        while True:
            await asyncio.to_thread(watch.wait)
            sio = socketio.AsyncClient(reconnection=False)

            def got(data: Any) -> None:
                json.dumps(data)  # what the page does with it: read it all
                counts[i] += 1

            sio.on("snapshot", got, namespace="/observe")
            await sio.connect(
                url,
                namespaces=["/observe"],
                auth={"id": f"{OBSERVERS}{i}", "token": tokens[f"{OBSERVERS}{i}"]},
                transports=["websocket"],
            )
            while watch.is_set():
                await asyncio.sleep(0.05)
            await sio.disconnect()

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(k)))

    asyncio.run(run())


async def bench(n: int, k: int, rounds: int, blocks: int) -> dict[str, Any]:
    import msgspec
    import socketio

    from controller.scenario import community, load_scenario
    from controller.sim import CONTROLLER_ID, market_process, write_registry

    scenario = load_scenario(SCENARIO)
    total = (2 * blocks * rounds + 5) * scenario.step
    scenario = msgspec.structs.replace(scenario, days=total / 86400)
    specs = community(scenario, n)
    tokens = {s.id: secrets.token_urlsafe(18) for s in specs}
    watchers = {f"{OBSERVERS}{i}": secrets.token_urlsafe(18) for i in range(k)}
    tokens |= {CONTROLLER_ID: secrets.token_urlsafe(18), **watchers}
    ctx = mp.get_context("spawn")
    stop, watch = ctx.Event(), ctx.Event()
    counts = ctx.Array("i", k)
    with tempfile.TemporaryDirectory(prefix="microte-bench-") as tmp:
        registry = Path(tmp) / "registry.toml"
        write_registry(registry, tokens, dict.fromkeys(watchers, "operator"))
        args = [
            *("--registry", str(registry), "--scenario", str(SCENARIO), "--port", "0"),
            *("--ledger", f"sqlite:///{Path(tmp) / 'ledger.db'}", "--mode", "sim", "--log-level", "WARNING"),
        ]
        async with market_process(args) as url:
            fleet = ctx.Process(
                target=fleet_worker, args=(url, specs, tokens, scenario.seed, scenario.timezone, stop), daemon=True
            )
            observers = ctx.Process(target=observer_worker, args=(url, watchers, k, watch, counts), daemon=True)
            fleet.start()
            observers.start()
            ctl = socketio.AsyncClient(reconnection=False)
            await ctl.connect(
                url,
                namespaces=["/simulation"],
                transports=["websocket"],
                auth={"id": CONTROLLER_ID, "token": tokens[CONTROLLER_ID]},
            )
            for _ in range(300):  # every prosumer logged in
                status = await ctl.call("status", {}, namespace="/simulation")
                if len(status["participants"]["online"]) >= n:
                    break
                await asyncio.sleep(0.1)
            spid = server_pid()
            phases: dict[str, list[float]] = {"none": [], "watched": []}
            walls: dict[str, float] = {"none": 0.0, "watched": 0.0}
            cpus: dict[str, float] = {"none": 0.0, "watched": 0.0}  # the server's CPU seconds
            i = 0

            async def step() -> float:
                nonlocal i
                t = scenario.start_time + i * scenario.step
                i += 1
                t0 = time.perf_counter()
                reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=60)
                if not reply.get("ok"):
                    raise RuntimeError(f"step refused: {reply}")
                return time.perf_counter() - t0

            for _ in range(3):
                await step()  # warm-up
            for _ in range(blocks):
                for phase in ("none", "watched"):
                    if phase == "watched":
                        watch.set()
                        await asyncio.sleep(1.0)  # the observers are connected
                    t0, c0 = time.perf_counter(), proc_cpu(spid)
                    phases[phase] += [await step() for _ in range(rounds)]
                    walls[phase] += time.perf_counter() - t0
                    cpus[phase] += proc_cpu(spid) - c0
                    if phase == "watched":
                        watch.clear()
                        await asyncio.sleep(1.0)  # and gone
            await ctl.disconnect()
            stop.set()
            fleet.join(10)
            observers.terminate()
    out: dict[str, Any] = {"n": n, "observers": k, "rounds_per_phase": blocks * rounds}
    for phase, times in phases.items():
        out[phase] = {
            "rounds_per_second": round(len(times) / walls[phase], 1),
            "p50_ms": round(percentile(times, 50) * 1000, 1),
            "p99_ms": round(percentile(times, 99) * 1000, 1),
            "server_cpu_ms_per_round": round(cpus[phase] / len(times) * 1000, 2),
        }
    out["watched_vs_none"] = round(out["watched"]["rounds_per_second"] / out["none"]["rounds_per_second"], 3)
    out["server_cpu_watched_vs_none"] = round(
        out["watched"]["server_cpu_ms_per_round"] / out["none"]["server_cpu_ms_per_round"], 3
    )
    out["snapshots_received"] = list(counts)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--observers", type=int, default=5)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--blocks", type=int, default=3)
    a = p.parse_args()
    print(json.dumps(asyncio.run(bench(a.n, a.observers, a.rounds, a.blocks)), indent=1))


if __name__ == "__main__":
    main()
