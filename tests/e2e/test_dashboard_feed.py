"""The dashboard's wire side without a browser (market/server/dashboard.py, docs/dashboard.md):
`/observe` is read-only and for operator and DSO only, nothing is built while nobody
watches, lists are bounded, a slow observer is skipped, rt snapshots count down, and the
page's assets are served locally with no address outside the server."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import aiohttp
import socketio

from market.core.engine import MarketConfig
from market.core.registry import Registry
from market.server import dashboard
from tests.e2e.conftest import TOKENS, client, refusal, running
from tests.e2e.test_dashboard import registry

T = 1_699_963_200
D = 900
CONFIG = MarketConfig(duration=D, close_steps=2, round_timeout=0.3)


async def step(ctl: socketio.AsyncClient, t: int) -> None:
    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=10)
    assert reply["ok"], reply


async def observer(url: str, pid: str = "OP", token: str = "tok-op") -> tuple[socketio.AsyncClient, list[Any]]:
    sio = socketio.AsyncClient(reconnection=False)
    got: list[Any] = []
    sio.on("snapshot", got.append, namespace="/observe")
    await sio.connect(
        url, namespaces=["/observe"], auth={"id": pid, "token": token}, transports=["websocket"], wait_timeout=5
    )
    return sio, got


async def test_nothing_is_built_while_nobody_watches(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url, registry()) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        for i in range(4):
            await step(ctl, T + i * D)
        await asyncio.sleep(3 * dashboard.FEED_INTERVAL)
        assert (server.dashboard.built, server.dashboard.sent) == (0, 0)

        obs, got = await observer(url)
        await step(ctl, T + 4 * D)
        for _ in range(50):
            if any(s["round"]["time"] == T + 4 * D for s in got):
                break
            await asyncio.sleep(0.05)
        assert got and got[-1]["round"]["time"] == T + 4 * D and got[-1]["rounds_processed"] == 5
        await obs.disconnect()
        await asyncio.sleep(3 * dashboard.FEED_INTERVAL)
        built = server.dashboard.built
        await step(ctl, T + 5 * D)
        await asyncio.sleep(3 * dashboard.FEED_INTERVAL)
        assert server.dashboard.built == built  # asleep again once the last observer left
        await ctl.disconnect()


async def test_observe_is_read_only_and_for_operator_and_dso(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url, registry()) as (url, _server):
        assert await refusal(url, "P1", "/observe") == "unauthorized: role prosumer may not use /observe"
        assert await refusal(url, "CTL", "/observe") == "unauthorized: role controller may not use /observe"
        for pid, token in (("OP", "tok-op"), ("DSO", "tok-dso")):
            obs, _ = await observer(url, pid, token)
            reply = await obs.call("snapshot", {}, namespace="/observe", timeout=5)
            assert reply["ok"] and reply["snapshot"]["mode"] == "sim" and reply["snapshot"]["round"] is None
            for event, payload in (("bid", {"quantity": 1, "price": 0.1, "time_delivery": [T, T + D]}), ("step", {})):
                bad = await obs.call(event, payload, namespace="/observe", timeout=5)
                assert bad == {"ok": False, "error": {"code": "invalid", "message": f"unknown event {event!r}"}}
            bad = await obs.call("snapshot", {"all": True}, namespace="/observe", timeout=5)
            assert not bad["ok"] and bad["error"]["code"] == "invalid"
            await obs.disconnect()


async def test_lists_are_bounded(ledger_url: str) -> None:
    many = Registry.from_dict(
        {
            "participants": [
                *({"id": f"S{i:02d}", "token": "t"} for i in range(30)),
                {"id": "B", "token": "t"},
                {"id": "CTL", "role": "controller", "token": TOKENS["CTL"]},
                {"id": "OP", "role": "operator", "token": "tok-op"},
            ]
        }
    )
    async with running(CONFIG, ledger_url, many) as (url, _server):
        ctl = await client(url, "CTL", "/simulation")
        sellers = [await client(url, f"S{i:02d}", token="t") for i in range(30)]
        buyer = await client(url, "B", token="t")
        await step(ctl, T)
        horizon = [T + k * D for k in range(2, 20)]  # 18 open slots
        for seller in sellers:
            ask = {"quantity": 10, "price": 0.05, "time_delivery": [T + 2 * D, T + 3 * D], "source": "solar"}
            assert (await seller.call("ask", ask, namespace="/market"))["ok"]
        for start in horizon:
            bid = {"quantity": 1000, "price": 0.3, "time_delivery": [start, start + D]}
            assert (await buyer.call("bid", bid, namespace="/market"))["ok"]
        obs, _ = await observer(url)
        snap = (await obs.call("snapshot", {}, namespace="/observe"))["snapshot"]
        assert [b["slot"] for b in snap["book"]] == horizon[: dashboard.BOOK_SLOTS]
        assert snap["participants"]["offline"] == 0 and snap["participants"]["registered"] == 31
        await step(ctl, T + D)  # [T+2D, T+3D] clears: 30 fills
        snap = (await obs.call("snapshot", {}, namespace="/observe"))["snapshot"]
        assert snap["last_clearing"]["fills"] == 30 and snap["last_clearing"]["volume_wh"] == 300
        assert len(snap["fills"]) == dashboard.RECENT_FILLS
        assert {f["buyer"] for f in snap["fills"]} == {"B"}
        for c in (*sellers, buyer):
            await c.disconnect()
        await step(ctl, T + 2 * D)
        snap = (await obs.call("snapshot", {}, namespace="/observe"))["snapshot"]
        assert snap["participants"]["offline"] == 31
        assert len(snap["participants"]["offline_ids"]) == 31  # under MISSING_SHOWN: all listed
        assert snap["last_processed"]["missing"] == 31
        await obs.disconnect()
        await ctl.disconnect()


class _Sio:
    """A stand-in server: observer sessions s0, s1, ... with `queued[i]` packets unsent."""

    def __init__(self, queued: list[int]) -> None:
        self._queued = {f"e-s{i}": q for i, q in enumerate(queued)}
        self.emitted: list[Any] = []

        class _Manager:
            @staticmethod
            def eio_sid_from_sid(sid: str, namespace: str) -> str:
                return "e-" + sid

        self.manager = _Manager()

    def queued(self, eio_sid: str) -> int:
        return self._queued[eio_sid]

    async def emit(self, *args: Any, **kwargs: Any) -> None:
        self.emitted.append((args, kwargs))


async def test_a_slow_observer_is_skipped_not_queued() -> None:
    slow, fine = dashboard.MAX_UNSENT + 1, dashboard.MAX_UNSENT
    for queued, skipped in (([fine, slow, fine], ["s1"]), ([slow], ["s0"]), ([fine, fine], [])):
        sio = _Sio(queued)
        feed = dashboard.DashboardFeed(None, sio)  # type: ignore[arg-type]
        for i in range(len(queued)):
            feed.namespace.sessions.add(f"s{i}", f"OP{i}", "operator")
        await feed.broadcast({"mode": "sim"})
        assert (feed.sent, feed.skipped) == (len(queued) - len(skipped), len(skipped))
        if len(skipped) == len(queued):
            assert sio.emitted == []  # nobody to send to: nothing encoded
        else:  # one emit to the room, encoded once, the slow ones skipped
            ((args, kwargs),) = sio.emitted
            assert args == ("snapshot", {"mode": "sim"}) and kwargs["to"] == dashboard.ROOM
            assert kwargs["skip_sid"] == skipped


async def test_rt_snapshot_counts_down(ledger_url: str) -> None:
    rt = MarketConfig(mode="rt", duration=3, meter_grace=0.2)
    async with running(rt, ledger_url, registry()) as (url, _server):
        obs, got = await observer(url)
        reply = await obs.call("snapshot", {}, namespace="/observe")
        r = reply["snapshot"]["round"]
        assert r is not None and 0 <= r["closes_in"] <= 3 and r["duration"] == 3
        for _ in range(100):  # the next boundary's round reaches the observer by itself
            if any(s["round"] and s["round"]["time"] > r["time"] for s in got):
                break
            await asyncio.sleep(0.05)
        assert any(s["round"]["time"] == r["time"] + 3 for s in got)
        await obs.disconnect()


async def test_assets_are_local(ledger_url: str) -> None:
    async with running(CONFIG, ledger_url, registry()) as (url, _server), aiohttp.ClientSession() as http:
        for path, kind in (
            ("/dashboard", "text/html"),
            ("/dashboard/dashboard.js", "text/javascript"),
            ("/dashboard/dashboard.css", "text/css"),
        ):
            async with http.get(url + path) as r:
                assert r.status == 200 and r.content_type == kind
                body = await r.text()
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", body), f"{path} names another host"
        async with http.get(url + "/dashboard/other.js") as r:
            assert r.status == 404
