"""Bid acknowledgement latency in rt mode: N participants each sending B bids per second.

Starts `microte market --mode rt` as a subprocess (as a user would), connects N real
socket.io clients on loopback, and has each send acknowledged `bid`s at a steady rate for
a while; prints p50/p99/max of the time from emit to acknowledgement.

    python bench/rt.py [--n 100] [--rate 10] [--seconds 10] [--durability ack|round]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import socketio

from controller.sim import market_process
from market.core import wire

D = 10  # slot duration (s): the first round opens within D seconds of start


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else math.nan


async def participant(url: str, pid: str, rate: float, until: float, out: list[float], errors: list[object]) -> None:
    sio = socketio.AsyncClient(reconnection=False, serializer=wire.serializer("json"))
    await sio.connect(url, namespaces=["/market"], auth={"id": pid, "token": "t-" + pid}, transports=["websocket"])
    loop = asyncio.get_running_loop()
    start = loop.time()
    period = 1 / rate
    k = 0
    while loop.time() < until:
        t = time.time()
        slot = (int(t) // D + 3) * D  # an open slot (next_settle is two slots ahead)
        bid = {"quantity": 100, "price": 0.2, "time_delivery": [slot, slot + D]}
        sent = time.perf_counter()
        reply = await sio.call("bid", bid, namespace="/market", timeout=10)
        out.append((time.perf_counter() - sent) * 1000)
        if not reply.get("ok"):
            errors.append(reply)
        k += 1
        await asyncio.sleep(max(0.0, start + k * period - loop.time()))
    await sio.disconnect()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry.toml"
        registry.write_text(
            "".join(f'[[participants]]\nid = "P{i}"\ntoken = "t-P{i}"\nrole = "prosumer"\n' for i in range(args.n))
        )
        server = [
            "--registry",
            str(registry),
            "--port",
            "0",
            "--mode",
            "rt",
            "--duration",
            str(D),
            "--ledger",
            f"sqlite:///{tmp}/rt.db",
            "--durability",
            args.durability,
            "--log-level",
            "WARNING",
        ]
        async with market_process(server) as url:
            while True:  # the market opens its first round on the next boundary
                probe = socketio.AsyncClient(reconnection=False)
                await probe.connect(url, namespaces=["/market"], auth={"id": "P0", "token": "t-P0"})
                slot = (int(time.time()) // D + 3) * D
                r = await probe.call(
                    "bid", {"quantity": 1, "price": 0.1, "time_delivery": [slot, slot + D]}, namespace="/market"
                )
                await probe.disconnect()
                if r.get("ok"):
                    break
                await asyncio.sleep(1)
            latencies: list[float] = []
            errors: list[object] = []
            until = asyncio.get_running_loop().time() + args.seconds
            await asyncio.gather(
                *(participant(url, f"P{i}", args.rate, until, latencies, errors) for i in range(args.n))
            )
    print(
        f"# rt bid acknowledgement latency ({platform.platform()}, {platform.python_version()}, "
        f"durability={args.durability})"
    )
    print(
        f"N={args.n} rate={args.rate}/s each, {len(latencies)} bids, {len(errors)} refused: "
        f"p50 {percentile(latencies, 50):.2f} ms, p99 {percentile(latencies, 99):.2f} ms, "
        f"max {max(latencies):.2f} ms"
    )
    if errors:
        print("first refusal:", errors[0])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--rate", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--durability", choices=["ack", "round"], default="ack")
    from controller import runloop

    runloop.run(main(p.parse_args()))
