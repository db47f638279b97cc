"""A write that fails leaves no trace: under `ack` durability an event answered
`unavailable` (the ledger could not store it, say the disk is full) is undone completely:
not in the book, not filled, and its retry is a new entry that reaches the ledger."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from controller.sim import StepUnavailable
from controller.sim import step as sim_step
from ledger import read_rows
from market.core.engine import MarketConfig
from market.core.errors import MarketError
from market.core.protocol import EntryMsg, UpstreamFillMsg, UpstreamFillsMsg
from market.server.app import MarketServer
from tests.e2e.conftest import FlakySink, Inbox, client, registry, serving


async def test_a_bid_refused_for_a_failed_write_changes_nothing(ledger_url: str) -> None:
    sink = FlakySink(ledger_url)
    server = MarketServer(MarketConfig(mode="rt", duration=60, durability="ack"), registry(), sink)
    async with serving(server) as url:
        p1 = await client(url, "P1")
        slot = (int(time.time()) // 60 + 4) * 60
        bid = {"id": "b1", "quantity": 10, "price": 0.2, "time_delivery": [slot, slot + 60]}
        sink.failing = True
        refused = await p1.call("bid", bid, namespace="/market")
        assert refused["error"]["code"] == "unavailable", refused
        assert len(server.market.book) == 0  # undone: nothing can fill it
        cancel = await p1.call("cancel", {"uuid": f"{slot}.P1.0"}, namespace="/market")
        assert cancel["error"]["code"] == "not_found", cancel
        sink.failing = False
        retried = await p1.call("bid", bid, namespace="/market")
        assert retried["ok"] and not retried.get("duplicate"), retried
        assert len(server.market.book) == 1
        # A cancel whose write fails leaves the entry open.
        sink.failing = True
        failed_cancel = await p1.call("cancel", {"uuid": retried["entry"]["uuid"]}, namespace="/market")
        assert failed_cancel["error"]["code"] == "unavailable", failed_cancel
        assert server.market.book.get(retried["entry"]["uuid"]) is not None
        sink.failing = False
        await p1.disconnect()
    stored = [r["id"] for r in read_rows(ledger_url, "entries")]
    assert stored == [retried["entry"]["uuid"]]
    assert read_rows(ledger_url, "cancels") == []


async def test_upstream_fills_refused_by_the_ledger_leave_nothing_behind(tmp_path: Path) -> None:
    """A community whose ledger refuses a batch of district fills answers `unavailable` and
    keeps none of it, in memory or queued for a later write: the next, different fills of
    the slot are the ones stored (docs/hierarchy.md)."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    sink = FlakySink(url)
    server = MarketServer(MarketConfig(duration=60, close_steps=2), registry(), sink, in_district=True)
    async with serving(server):
        m = server.market
        m.open_round(0)
        m.submit("P1", "bid", EntryMsg(quantity=1000, price=0.2, time_delivery=(120, 180)))
        m.open_round(60)  # closes (120, 180): P1's bid is a residual
        (residual,) = server.upstream_residuals(120)

        def fills(q: int, ref: str) -> UpstreamFillsMsg:
            return UpstreamFillsMsg((120, 180), [UpstreamFillMsg(residual["id"], q, 0.15, "solar", ref)])

        sink.failing = True
        with pytest.raises(MarketError) as refused:
            await server.upstream_fills(fills(500, "x"))
        assert refused.value.code == "unavailable"
        sink.failing = False
        reply = await server.upstream_fills(fills(700, "z"))
        assert reply["settled"] == 1 and reply["events"][0]["quantity"] == 700
        await server.upstream_fills(fills(200, "y"))  # a later batch: what was left
    stored = [(s["commit_id"], s["quantity"], s["ask_uuid"]) for s in read_rows(url, "settlements")]
    assert stored == [("u120-0", 700, "z"), ("u120-1", 200, "y")]


async def test_rt_round_durability_acknowledges_nothing_while_a_round_is_not_stored(ledger_url: str) -> None:
    """Under `round` durability an rt market acknowledges entries before they are durable,
    to store them with the round. If that store fails (a full disk), what it acknowledged
    waits in memory for the next boundary: from then on it refuses (`unavailable`, nothing
    changed) until the ledger has taken it, rather than acknowledging more it cannot store."""
    sink = FlakySink(ledger_url)
    server = MarketServer(MarketConfig(mode="rt", duration=2, durability="round"), registry(), sink)
    async with serving(server) as url:
        p1 = await client(url, "P1")

        def bid(n: int) -> dict[str, object]:
            slot = (int(time.time()) // 2 + 6) * 2
            return {"id": f"b{n}", "quantity": 10, "price": 0.2, "time_delivery": [slot, slot + 2]}

        async def boundary() -> None:  # the next round boundary has passed and been handled
            start = server.market.times.time if server.market.times else 0
            for _ in range(100):
                await asyncio.sleep(0.05)
                if server.market.times is not None and server.market.times.time > start:
                    await asyncio.sleep(0.2)
                    return
            raise AssertionError("no round boundary")

        await boundary()
        first = await p1.call("bid", bid(1), namespace="/market")
        assert first["ok"], first  # acknowledged, to be stored with the round
        sink.failing = True
        await boundary()  # its store fails: the entry waits in memory
        booked = len(server.market.book)
        refused = await p1.call("bid", bid(2), namespace="/market")
        assert refused["error"]["code"] == "unavailable", refused
        assert len(server.market.book) == booked  # nothing changed
        sink.failing = False
        await boundary()  # the ledger takes what waited
        again = await p1.call("bid", bid(3), namespace="/market")
        assert again["ok"], again
        await boundary()
        await p1.disconnect()
    stored = {r["client_id"] for r in read_rows(ledger_url, "entries")}
    assert stored == {"b1", "b3"}


async def test_a_retried_step_is_answered_only_once_its_round_is_stored(ledger_url: str) -> None:
    """A `step` whose round could not be stored is answered `unavailable`; the controller's
    retry of the same step must not be answered before that round's records are durable."""
    sink = FlakySink(ledger_url)
    server = MarketServer(MarketConfig(duration=60, round_timeout=0.2), registry(), sink)
    async with serving(server) as url:
        ctl = await client(url, "CTL", "/simulation")
        assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
        sink.failing = True
        failed = await ctl.call("step", {"time": 660}, namespace="/simulation")
        assert failed["error"]["code"] == "unavailable", failed
        still = await ctl.call("step", {"time": 660}, namespace="/simulation")  # the disk is still full
        assert still["error"]["code"] == "unavailable", still
        sink.failing = False
        retried = await ctl.call("step", {"time": 660}, namespace="/simulation")
        assert retried["ok"], retried
        stored = [r["current_round_start"] for r in read_rows(ledger_url, "rounds")]
        assert stored == [600, 660]  # durable when the retry was answered, not at the next step
        await ctl.disconnect()


async def test_the_controller_asks_again_while_the_ledger_refuses_and_goes_on_once_it_takes_the_round(
    ledger_url: str,
) -> None:
    """`microte sim`'s controller (`controller.sim.step`): a step answered `unavailable` is
    asked again with backoff; when the disk has room again the retry is answered, with the
    round stored. A disk that stays full ends the run after `retry_for`; another refusal is
    returned at once."""
    sink = FlakySink(ledger_url)
    server = MarketServer(MarketConfig(duration=60, round_timeout=0.2), registry(), sink)
    async with serving(server) as url:
        ctl = await client(url, "CTL", "/simulation")
        assert (await sim_step(ctl, 600, 10))["ok"]
        sink.failing = True
        loop = asyncio.get_running_loop()
        loop.call_later(0.6, setattr, sink, "failing", False)  # room again after 0.6 s
        t0 = loop.time()
        reply = await sim_step(ctl, 660, 10)
        assert reply["ok"] and loop.time() - t0 >= 0.5, reply
        assert [r["current_round_start"] for r in read_rows(ledger_url, "rounds")] == [600, 660]
        sink.failing = True
        with pytest.raises(StepUnavailable):
            await sim_step(ctl, 720, 10, retry_for=0.5)
        sink.failing = False
        assert (await sim_step(ctl, 720, 10))["ok"]  # the retry once there is room
        earlier = await sim_step(ctl, 600, 10)  # not after the last round: refused, not retried
        assert earlier["error"]["code"] == "invalid", earlier
        await ctl.disconnect()


async def test_a_slot_whose_store_failed_is_delivered_once_it_is_stored(ledger_url: str) -> None:
    """The deliveries of a slot go out once its records are durable: if that store fails,
    they go out when a later write has stored them (here the retried step), not never."""
    sink = FlakySink(ledger_url)
    server = MarketServer(MarketConfig(duration=60, round_timeout=0.5), registry(), sink)
    async with serving(server) as url:
        ctl = await client(url, "CTL", "/simulation")
        p1, p2 = await client(url, "P1"), await client(url, "P2")
        inbox = Inbox(p1, "delivery")
        slot = [720, 780]

        async def meters(msg: dict[str, object]) -> None:  # P2 delivers its 40 Wh of the slot
            gen = {"solar": 40} if msg["current_round"] == slot else {}
            await p2.call("meter", {"time_interval": msg["current_round"], "generation": gen}, namespace="/market")

        p2.on("start_round", meters, namespace="/market")
        assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
        assert (await p1.call("bid", {"quantity": 40, "price": 0.3, "time_delivery": slot}, namespace="/market"))["ok"]
        ask = {"quantity": 40, "price": 0.1, "time_delivery": slot, "source": "solar"}
        assert (await p2.call("ask", ask, namespace="/market"))["ok"]
        assert (await ctl.call("step", {"time": 660}, namespace="/simulation"))["ok"]
        sink.failing = True
        failed = await ctl.call("step", {"time": 720}, namespace="/simulation")
        assert failed["error"]["code"] == "unavailable", failed
        await asyncio.sleep(0.2)
        assert [d["time_delivery"] for d in inbox.events["delivery"]] == []  # not durable: not sent
        sink.failing = False
        assert server.rounds_processed == 2  # /metrics: processed and stored
        assert (await ctl.call("step", {"time": 720}, namespace="/simulation"))["ok"]
        await asyncio.sleep(0.2)
        assert [d["time_delivery"] for d in inbox.events["delivery"]] == [slot]
        assert server.rounds_processed == 3
        for c in (p1, p2, ctl):
            await c.disconnect()
