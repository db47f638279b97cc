"""A scripted market over real socket.io: the ledger holds exactly the rows PROTOCOL.md specifies."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import socketio

from ledger.digest import read_rows
from market.core.engine import MarketConfig
from tests.e2e.conftest import Inbox, client, refusal, running

CONFIG = MarketConfig(duration=60, close_steps=2, round_timeout=2.0)
EMPTY = {"generation": {}, "consumption": {"bess": {}, "other": {"external": 0}}}


def scripted_meters(sio: socketio.AsyncClient, readings: dict[int, dict[str, Any]], replies: list[Any]) -> None:
    """On every start_round, send this client's reading of the current round (zeros if unscripted)."""

    async def on_start_round(msg: dict[str, Any]) -> None:
        start = msg["current_round"][0]
        reading = {"time_interval": msg["current_round"], **readings.get(start, EMPTY)}
        replies.append(await sio.call("meter", reading, namespace="/market"))

    sio.on("start_round", on_start_round, namespace="/market")


async def step(ctl: socketio.AsyncClient, t: int) -> dict[str, Any]:
    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=10)
    assert reply["ok"], reply
    return reply["round"]


async def test_scripted_round_gives_the_specified_rows(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, _server):
        p1, p2 = await client(url, "P1"), await client(url, "P2")
        ctl = await client(url, "CTL", "/simulation")
        in1, in2 = Inbox(p1, "settled", "delivery"), Inbox(p2, "settled", "delivery")
        r1: list[Any] = []
        r2: list[Any] = []
        scripted_meters(p1, {720: {"generation": {"solar": 600}, "consumption": {"other": {"solar": 100}}}}, r1)
        scripted_meters(p2, {720: {"consumption": {"other": {"external": 500}}}}, r2)

        await step(ctl, 600)  # next_settle is [720, 780]
        ask = await p1.call(
            "ask", {"quantity": 500, "price": 0.10, "time_delivery": [720, 780], "source": "solar"}, namespace="/market"
        )
        bid = await p2.call(
            "bid", {"id": "b1", "quantity": 400, "price": 0.20, "time_delivery": [720, 780]}, namespace="/market"
        )
        assert ask["ok"] and bid["ok"], (ask, bid)
        assert bid["entry"]["id"] == "b1" and bid["entry"]["quantity"] == 400

        matched = await step(ctl, 660)  # [720, 780] is last_settle: cleared now
        assert matched["trades"] == 1
        delivered = await step(ctl, 720)  # [720, 780] is delivered and processed
        assert delivered["metered"] == 2 and delivered["missing"] == ["P3"]
        await asyncio.sleep(0.1)

        assert [s["side"] for s in in1.events["settled"]] == ["ask"]
        assert in2.events["settled"][0]["price"] == pytest.approx(0.15)
        assert in2.events["settled"][0]["id"] == "b1"
        assert all(r["ok"] for r in r1 + r2)
        for c in (p1, p2, ctl):
            await c.disconnect()

    rows = [r for r in read_rows(ledger_url, "transactions") if r["time_delivery_start"] == 720]
    got = sorted(
        (r["kind"], r["seller_id"], r["buyer_id"], r["energy_source"], r["quantity"], r["amount_buy"], r["amount_sell"])
        for r in rows
    )
    assert got == sorted(
        [
            ("p2p", "P1", "P2", "solar", 400, 60000, 60000),  # 400 Wh at 0.15 per kWh = 0.06
            ("self", "P1", "P1", "solar", 100, 0, 0),
            ("grid_sell", "P1", "grid", "solar", 200, 20000, 20000),  # default tariff: sell 0.10
            ("grid_buy", "grid", "P2", "grid", 100, 20000, 20000),  # buy 0.10 * (1 + 1.0)
        ]
    )
    settlements = read_rows(ledger_url, "settlements")
    assert [(s["seller_id"], s["buyer_id"], s["quantity"]) for s in settlements] == [("P1", "P2", 400)]
    assert len(in2.events["delivery"]) >= 1
    delivery_720 = [d for d in in2.events["delivery"] if d["time_delivery"] == [720, 780]]
    assert {t["kind"] for t in delivery_720[0]["transactions"]} == {"p2p", "grid_buy"}


async def test_bid_for_a_closed_slot_gets_closed(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, _server):
        p1 = await client(url, "P1")
        ctl = await client(url, "CTL", "/simulation")
        scripted_meters(p1, {}, [])
        await step(ctl, 600)
        late = await p1.call("bid", {"quantity": 10, "price": 0.1, "time_delivery": [660, 720]}, namespace="/market")
        assert late == {"ok": False, "error": {"code": "closed", "message": late["error"]["message"]}}
        await p1.disconnect()
        await ctl.disconnect()


async def test_wrong_token_is_refused(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, _server):
        assert (await refusal(url, "P1", token="not-the-token")).startswith("unauthorized")
        assert (await refusal(url, "NOBODY", token="x")).startswith("unauthorized")
        # A prosumer may not drive the simulation.
        assert (await refusal(url, "P1", "/simulation")).startswith("unauthorized")


async def test_silent_participant_does_not_stall_and_is_missing(ledger_url: str) -> None:
    config = MarketConfig(duration=60, round_timeout=0.5)
    async with running(config, ledger_url) as (url, _server):
        p1 = await client(url, "P1")
        p2 = await client(url, "P2")  # connected but never meters
        ctl = await client(url, "CTL", "/simulation")
        scripted_meters(p1, {}, [])
        r = await step(ctl, 600)
        assert r["missing"] == ["P2", "P3"] and r["metered"] == 1
        await p2.disconnect()  # leaves mid-run: later rounds do not wait for it at all
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        r = await step(ctl, 660)
        assert loop.time() - t0 < 0.4
        assert r["missing"] == ["P2", "P3"]
        await p1.disconnect()
        await ctl.disconnect()
