"""A load process of the soak test: `python soak_worker.py URL TOKENS_JSON OUT` connects the
prosumers of TOKENS_JSON (id -> token) and, at every `start_round`, has each trade 20 Wh
for `next_settle` (even ids sell solar, odd ids buy) and meter the slot just started. Every
acknowledged entry uuid is appended to OUT once its reply arrives, with its acknowledgement
latency in ms and the Unix time it was sent (`uuid ms sent` per line)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import socketio


async def prosumer(url: str, pid: str, token: str, seller: bool, out: Any) -> None:
    sio = socketio.AsyncClient(reconnection=True, reconnection_delay=0.2, reconnection_delay_max=1.0)
    reading = {"generation": {"solar": 30}} if seller else {"consumption": {"other": {"external": 30}}}

    async def on_start_round(msg: dict[str, Any]) -> None:
        order: dict[str, Any] = {"quantity": 20, "price": 0.1 if seller else 0.3, "time_delivery": msg["next_settle"]}
        if seller:
            order["source"] = "solar"
        try:
            t0, sent = time.perf_counter(), time.time()
            r = await sio.call("ask" if seller else "bid", order, namespace="/market", timeout=5)
            ms = (time.perf_counter() - t0) * 1000
            if r.get("ok") and not r.get("duplicate"):
                out.write(f"{r['entry']['uuid']} {ms:.3f} {sent:.3f}\n")
                out.flush()
            await sio.call("meter", {"time_interval": msg["current_round"], **reading}, namespace="/market", timeout=5)
        except Exception:  # the server is stopped or restarting: the next round trades again
            pass

    sio.on("start_round", on_start_round, namespace="/market")
    while True:
        try:
            await sio.connect(url, namespaces=["/market"], auth={"id": pid, "token": token}, transports=["websocket"])
            break
        except Exception:
            await asyncio.sleep(0.5)
    await sio.wait()


async def main() -> None:
    url, tokens, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    with open(path, "a") as out:
        await asyncio.gather(*(prosumer(url, p, t, int(p[1:]) % 2 == 0, out) for p, t in tokens.items()))


if __name__ == "__main__":
    asyncio.run(main())
