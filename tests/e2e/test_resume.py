"""Reconnect and resume: open entries stay, missed private events are replayed in order,
one live session per id, and payload fields cannot impersonate another participant."""

from __future__ import annotations

import asyncio
from typing import Any

from market.core.engine import MarketConfig
from participants.client import ParticipantClient
from participants.prosumer import Prosumer
from participants.spec import decode_spec
from tests.e2e.conftest import TOKENS, client, running

CONFIG = MarketConfig(duration=60, round_timeout=0.3)
SLOT = [720, 780]


def seller_meters(sio: Any) -> None:
    """The seller delivers its 40 Wh of [720, 780] (so the absent buyer owes for it)."""

    async def on_start_round(msg: dict[str, Any]) -> None:
        gen = {"solar": 40} if msg["current_round"] == SLOT else {}
        await sio.call("meter", {"time_interval": msg["current_round"], "generation": gen}, namespace="/market")

    sio.on("start_round", on_start_round, namespace="/market")


async def step(ctl: Any, t: int) -> dict[str, Any]:
    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=10)
    assert reply["ok"], reply
    return reply["round"]


async def test_a_participant_that_was_away_gets_what_it_missed(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, _server):
        ctl = await client(url, "CTL", "/simulation")
        p1, p2 = await client(url, "P1"), await client(url, "P2")
        seller_meters(p2)
        await step(ctl, 600)
        bid = await p1.call("bid", {"quantity": 40, "price": 0.3, "time_delivery": SLOT}, namespace="/market")
        ask = {"quantity": 40, "price": 0.1, "time_delivery": SLOT, "source": "solar"}
        assert bid["ok"] and (await p2.call("ask", ask, namespace="/market"))["ok"]
        await p1.disconnect()  # away while its bid is matched and delivered
        await step(ctl, 660)
        await step(ctl, 720)
        back = await client(url, "P1")
        replay = await back.call("resume", {"since": 0}, namespace="/market")
        assert replay["ok"], replay
        events = [(e["event"], e["data"]["seq"]) for e in replay["events"]]
        assert [e for e, _ in events][:1] == ["settled"] and "delivery" in [e for e, _ in events]
        assert [s for _, s in events] == list(range(1, len(events) + 1))  # numbered, in order
        settled = replay["events"][0]["data"]
        assert settled["uuid"] == bid["entry"]["uuid"] and settled["quantity"] == 40
        # Asking again after the last one gets nothing new.
        assert (await back.call("resume", {"since": events[-1][1]}, namespace="/market"))["events"] == []
        for c in (back, p2, ctl):
            await c.disconnect()


async def test_open_entries_survive_a_reconnect_and_cancel_is_own_only(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        p1, p2 = await client(url, "P1"), await client(url, "P2")
        seller_meters(p2)
        await step(ctl, 600)
        bid = await p1.call("bid", {"quantity": 40, "price": 0.3, "time_delivery": SLOT}, namespace="/market")
        uuid = bid["entry"]["uuid"]
        await p1.disconnect()
        assert server.market.book.get(uuid) is not None
        # P2 cannot cancel it, nor act for P1 through payload fields.
        assert (await p2.call("cancel", {"uuid": uuid}, namespace="/market"))["error"]["code"] == "not_found"
        forged = {"quantity": 40, "price": 0.1, "time_delivery": SLOT, "source": "solar", "participant_id": "P1"}
        assert (await p2.call("ask", forged, namespace="/market"))["error"]["code"] == "invalid"
        assert server.market.book.get(uuid) is not None and len(server.market.book) == 1
        back = await client(url, "P1")
        assert (await back.call("cancel", {"uuid": uuid}, namespace="/market"))["ok"]
        for c in (back, p2, ctl):
            await c.disconnect()


async def test_a_second_login_replaces_the_first(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        first = await client(url, "P1")
        second = await client(url, "P1")
        await asyncio.sleep(0.2)
        assert not first.connected and second.connected
        assert server.sessions["/market"].online() == ["P1"]
        await second.disconnect()


async def test_participant_client_reconnects_and_resumes(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        spec = decode_spec({"id": "P1", "load": {"kind": "synthetic"}, "trader": {"kind": "none"}})
        pc = ParticipantClient(Prosumer(spec, 1))
        await pc.connect(url, "P1", TOKENS["P1"])
        p2 = await client(url, "P2")
        seller_meters(p2)
        await step(ctl, 600)
        bid = {"quantity": 40, "price": 0.3, "time_delivery": SLOT}
        assert (await pc.sio.call("bid", bid, namespace="/market"))["ok"]
        ask = {"quantity": 40, "price": 0.1, "time_delivery": SLOT, "source": "solar"}
        assert (await p2.call("ask", ask, namespace="/market"))["ok"]
        await step(ctl, 660)  # P1 hears its fill (and deliveries of its own grid imports) live
        await asyncio.sleep(0.1)
        before, delivered = pc.last_seq, pc.stats.delivered
        assert before >= 1
        # P1's network drops (its websocket closes under it); it misses the delivery of [720, 780].
        await pc.sio.eio.ws.close()
        for _ in range(50):
            if "P1" not in server.sessions["/market"].sid_of:
                break
            await asyncio.sleep(0.02)
        await step(ctl, 720)
        assert "P1" not in server.sessions["/market"].sid_of  # the delivery went to the outbox only
        for _ in range(100):
            if pc.last_seq > before:
                break
            await asyncio.sleep(0.05)
        # The built-in reconnection, then `resume`: the missed delivery is handled exactly once.
        assert pc.connected and pc.last_seq > before, (pc.last_seq, before)
        assert pc.stats.delivered == delivered + (pc.last_seq - before)
        await pc.disconnect()
        await p2.disconnect()
        await ctl.disconnect()
