"""rt mode: the market steps itself on the wall clock, whatever the clients do."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import socketio

from ledger import read_rows
from market.core.engine import MarketConfig
from participants.fleet import Fleet
from participants.spec import decode_specs
from tests.e2e.conftest import TOKENS, client, running

P3 = decode_specs([{"id": "P3", "load": {"kind": "synthetic"}, "trader": {"kind": "fixed_price"}}])[0]


def rt_script(sio: socketio.AsyncClient, side: str, reading: dict[str, Any], replies: list[Any]) -> None:
    """Each round: meter the slot that just ended, then trade 30 Wh for the next open slot."""

    async def on_start_round(msg: dict[str, Any]) -> None:
        assert msg["mode"] == "rt"
        replies.append(await sio.call("meter", {"time_interval": msg["last_round"], **reading}, namespace="/market"))
        order = {"quantity": 30, "price": 0.1 if side == "ask" else 0.3, "time_delivery": msg["next_settle"]}
        replies.append(
            await sio.call(side, order | ({"source": "solar"} if side == "ask" else {}), namespace="/market")
        )

    sio.on("start_round", on_start_round, namespace="/market")


async def test_rt_market_runs_rounds_on_the_wall_clock(ledger_url: str) -> None:
    config = MarketConfig(mode="rt", duration=2, close_steps=1, meter_grace=0.5)
    async with running(config, ledger_url) as (url, server):
        seller, buyer = await client(url, "P1"), await client(url, "P2")
        r1: list[Any] = []
        r2: list[Any] = []
        rt_script(seller, "ask", {"generation": {"solar": 50}}, r1)
        rt_script(buyer, "bid", {"consumption": {"other": {"external": 40}}}, r2)
        async with Fleet(url, [(P3, TOKENS["P3"])], seed=1) as fleet:
            await asyncio.sleep(8.5)
            times = server.market.times
            assert times is not None
            late = await seller.call("meter", {"time_interval": [times.time - 6, times.time - 4]}, namespace="/market")
            assert late["ok"] is False and late["error"]["code"] == "closed", late
        await seller.disconnect()
        await buyer.disconnect()
    rounds = read_rows(ledger_url, "rounds")
    starts = sorted(r["current_round_start"] for r in rounds)
    assert len(starts) >= 3, rounds
    assert all(b - a == 2 for a, b in itertools.pairwise(starts)), starts  # every slot, once
    meters = read_rows(ledger_url, "meters")
    for start in starts[1:]:  # the first round's readings were for a slot before the market opened
        assert sorted(m["participant_id"] for m in meters if m["time_interval_start"] == start) == ["P1", "P2", "P3"]
    p2p = [t for t in read_rows(ledger_url, "transactions") if t["kind"] == "p2p"]
    assert p2p and all((t["seller_id"], t["buyer_id"], t["quantity"]) == ("P1", "P2", 30) for t in p2p)
    assert all(t["price_buy"] == 0.2 for t in p2p)
    # Only the very first reading (a slot before the market opened) may be refused.
    refused = [r for r in r1 + r2 if not r["ok"]]
    assert all(r["error"]["code"] == "closed" for r in refused) and len(refused) <= 2, refused
    assert fleet.stats()["P3"].meters >= 3
