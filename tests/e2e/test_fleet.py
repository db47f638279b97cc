"""/fleet: one connection for many prosumers, each authenticated, none impersonated."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import socketio

from market.core.engine import MarketConfig
from tests.e2e.conftest import TOKENS, client, running

CONFIG = MarketConfig(duration=60, round_timeout=0.5)
SLOT = [720, 780]


async def fleet(url: str, creds: list[dict[str, str]]) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(url, namespaces=["/fleet"], auth={"fleet": creds}, transports=["websocket"], wait_timeout=5)
    return sio


async def test_one_bad_member_token_refuses_the_whole_fleet(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        errors: list[Any] = []
        sio = socketio.AsyncClient(reconnection=False)
        sio.on("connect_error", errors.append, namespace="/fleet")
        creds = [{"id": "P1", "token": TOKENS["P1"]}, {"id": "P2", "token": "wrong"}]
        with pytest.raises(socketio.exceptions.ConnectionError):
            await sio.connect(url, namespaces=["/fleet"], auth={"fleet": creds}, transports=["websocket"])
        assert str(errors[0].get("message", errors[0])).startswith("unauthorized")
        assert server.online() == []


async def test_fleet_trades_for_its_members_only(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        f = await fleet(url, [{"id": p, "token": TOKENS[p]} for p in ("P1", "P2")])
        got: dict[str, list[Any]] = {"settled": [], "delivery": []}
        for event in got:
            f.on(event, got[event].append, namespace="/fleet")
        assert server.online() == ["P1", "P2"]
        assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
        orders = [
            {
                "participant": "P1",
                "side": "ask",
                "quantity": 50,
                "price": 0.1,
                "time_delivery": SLOT,
                "source": "solar",
            },
            {"participant": "P2", "side": "bid", "quantity": 50, "price": 0.3, "time_delivery": SLOT},
            {"participant": "P3", "side": "bid", "quantity": 50, "price": 0.3, "time_delivery": SLOT},  # not a member
        ]
        reply = await f.call("orders", {"orders": orders}, namespace="/fleet")
        assert [r["ok"] for r in reply["results"]] == [True, True, False]
        assert reply["results"][2]["error"]["code"] == "unauthorized"
        step = await ctl.call("step", {"time": 660}, namespace="/simulation")
        assert step["ok"] and step["round"]["trades"] == 1
        readings = [
            {"participant": "P1", "time_interval": SLOT, "generation": {"solar": 50}},
            {"participant": "P2", "time_interval": SLOT, "consumption": {"other": {"external": 50}}},
        ]
        task = asyncio.ensure_future(ctl.call("step", {"time": 720}, namespace="/simulation"))
        await asyncio.sleep(0.05)
        meters = await f.call("meters", {"readings": readings}, namespace="/fleet")
        assert [r["ok"] for r in meters["results"]] == [True, True]
        r = await task
        assert r["ok"] and r["round"]["metered"] == 2
        await asyncio.sleep(0.1)
        # Fills and deliveries arrive as one batch per round, each naming its participant.
        assert sorted(e["participant"] for b in got["settled"] for e in b["events"]) == ["P1", "P2"]
        delivered = [e for b in got["delivery"] for e in b["events"] if e["time_delivery"] == SLOT]
        assert sorted(e["participant"] for e in delivered) == ["P1", "P2"]
        p2p = [t for e in delivered for t in e["transactions"] if t["kind"] == "p2p"]
        assert {(t["seller_id"], t["buyer_id"], t["quantity"]) for t in p2p} == {("P1", "P2", 50)}
        await f.disconnect()
        await ctl.disconnect()


async def test_a_member_taken_over_by_another_fleet_is_no_longer_the_first_ones(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        first = await fleet(url, [{"id": p, "token": TOKENS[p]} for p in ("P1", "P2")])
        assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]

        def bids(*pids: str) -> dict[str, Any]:
            return {
                "orders": [
                    {"participant": p, "side": "bid", "quantity": 10, "price": 0.2, "time_delivery": SLOT} for p in pids
                ]
            }

        # Both members trade through the first connection (what it speaks for is now known) ...
        reply = await first.call("orders", bids("P1", "P2"), namespace="/fleet")
        assert [r["ok"] for r in reply["results"]] == [True, True]
        # ... until P2 logs in on a second one: from then on only the second speaks for it.
        second = await fleet(url, [{"id": "P2", "token": TOKENS["P2"]}])
        reply = await first.call("orders", bids("P1", "P2"), namespace="/fleet")
        assert [r["ok"] for r in reply["results"]] == [True, False]
        assert reply["results"][1]["error"]["code"] == "unauthorized"
        reply = await second.call("orders", bids("P2", "P1"), namespace="/fleet")
        assert [r["ok"] for r in reply["results"]] == [True, False]
        # The second leaves: P2 is nobody's, and the first still does not speak for it.
        await second.disconnect()
        await asyncio.sleep(0.1)
        reply = await first.call("orders", bids("P2", "P1"), namespace="/fleet")
        assert [r["ok"] for r in reply["results"]] == [False, True]
        assert server.online() == ["P1"]
        await first.disconnect()
        await ctl.disconnect()
