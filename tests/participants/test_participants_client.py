"""The socket shell against a minimal stand-in server on loopback (the real market is
exercised by tests/e2e); checks auth, event wiring, acknowledgements and clean shutdown."""

import asyncio
from typing import Any

import pytest
import socketio
from aiohttp import web

from market.core.protocol import MeterMsg, OrdersMsg, decode
from participants.client import ParticipantClient
from participants.fleet import Fleet, run_participants
from participants.prosumer import Prosumer
from participants.spec import FixedPriceTrader, ParticipantSpec, PvSpec, SyntheticLoad

D = 900
T0 = 1_718_956_800
TOKENS = {"H01": "secret-1", "H02": "secret-2"}


def spec(pid: str) -> ParticipantSpec:
    return ParticipantSpec(id=pid, load=SyntheticLoad(3500), pv=PvSpec(kw=5), trader=FixedPriceTrader())


def round_payload(t: int) -> dict[str, Any]:
    slot = lambda k: [t + k * D, t + (k + 1) * D]  # noqa: E731
    return {
        "mode": "sim",
        "time": t,
        "duration": D,
        "timezone": "UTC",
        "current_round": slot(0),
        "last_round": slot(-1),
        "next_settle": slot(2),
        "last_settle": slot(1),
        "market_info": [
            {"time_delivery": slot(2), "grid": {"buy_price": 0.3, "sell_price": 0.05}, "grid_state": "GREEN"}
        ],
    }


class FakeMarket(socketio.AsyncNamespace):
    def __init__(self) -> None:
        super().__init__("/market")
        self.who: dict[str, str] = {}
        self.received: list[tuple[str, str, Any]] = []
        self.meters = asyncio.Event()

    async def on_connect(self, sid, environ, auth=None):
        if not isinstance(auth, dict) or TOKENS.get(auth.get("id")) != auth.get("token"):
            raise socketio.exceptions.ConnectionRefusedError("unauthorized: unknown id or wrong token")
        self.who[sid] = auth["id"]

    async def on_orders(self, sid, data):
        self.received.append((self.who[sid], "orders", data))
        decode(data, OrdersMsg)
        return {"ok": True, "results": [{"ok": True, "entry": {}} for _ in data["orders"]]}

    async def on_meter(self, sid, data):
        self.received.append((self.who[sid], "meter", data))
        decode(data, MeterMsg)
        if sum(1 for _, e, _ in self.received if e == "meter") == len(self.who):
            self.meters.set()
        return {"ok": False, "error": {"code": "closed", "message": "late"}} if self.who[sid] == "H02" else {"ok": True}


@pytest.fixture
async def server():
    sio = socketio.AsyncServer(async_mode="aiohttp", async_handlers=False)
    market = FakeMarket()
    sio.register_namespace(market)
    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", sio, market
    finally:
        await runner.cleanup()


async def until(cond, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


async def test_round_trip_and_bill(server):
    url, sio, market = server
    client = ParticipantClient(Prosumer(spec("H01"), seed=1))
    await client.connect(url, "H01", TOKENS["H01"])
    assert client.connected
    sid = next(iter(market.who))
    fill = {
        "commit_id": "c1",
        "uuid": "u",
        "id": "x",
        "side": "bid",
        "quantity": 50,
        "price": 0.2,
        "source": None,
        "time_delivery": [T0, T0 + D],
    }
    await sio.emit("settled", fill, to=sid, namespace="/market")
    await sio.emit("start_round", round_payload(T0), namespace="/market")
    await asyncio.wait_for(market.meters.wait(), 5)
    events = [e for _, e, _ in market.received]
    assert events == ["orders", "meter"]  # orders first: the meter may end the round
    rows = [
        {
            "id": "t1",
            "kind": "p2p",
            "seller_id": "X",
            "buyer_id": "H01",
            "quantity": 50,
            "amount_buy": 10_000,
            "amount_sell": 10_000,
        }
    ]
    await sio.emit("delivery", {"time_delivery": [T0, T0 + D], "transactions": rows}, to=sid, namespace="/market")
    await until(lambda: client.stats.delivered == 1)
    s = client.stats
    assert s.fills == 1 and s.meters == 1 and s.accepted == s.orders > 0 and s.errors == 0
    assert s.paid == 10_000 and s.p2p_bought_wh == 50
    assert client.prosumer.commitments[T0].bought == 50
    assert [e for e, _ in client.replies] == ["orders", "meter"]
    await client.disconnect()
    assert not client.connected


async def test_refused_login_says_unauthorized(server):
    url, _, _ = server
    client = ParticipantClient(Prosumer(spec("H01")), reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError, match="unauthorized"):
        await client.connect(url, "H01", "wrong")


async def test_fleet_counts_errors_and_disconnects_all(server):
    url, sio, market = server
    members = [(spec(p), t) for p, t in TOKENS.items()]
    async with Fleet(url, members, seed=2) as fleet:
        await until(lambda: len(market.who) == 2)
        await sio.emit("start_round", round_payload(T0), namespace="/market")
        await asyncio.wait_for(market.meters.wait(), 5)
        await until(lambda: sum(len(c.replies) for c in fleet.clients) == 4)
        stats = fleet.stats()
    assert stats["H02"].errors == 1 and stats["H01"].errors == 0
    assert all(not c.connected for c in fleet.clients)


async def test_fleet_refusal_disconnects_the_others(server):
    url, _, _ = server
    members = [(spec("H01"), TOKENS["H01"]), (spec("H02"), "wrong")]
    fleet = Fleet(url, members, seed=2, reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await fleet.connect()
    assert all(not c.connected for c in fleet.clients)


async def test_run_participants_until_stopped(server):
    url, _, market = server
    stop = asyncio.Event()
    task = asyncio.create_task(run_participants(url, [(spec("H01"), TOKENS["H01"])], 0, stop=stop))
    await until(lambda: len(market.who) == 1)
    stop.set()
    stats = await asyncio.wait_for(task, 5)
    assert set(stats) == {"H01"}


async def test_disconnect_releases_waiting_handlers(server):
    url, _, _ = server
    client = ParticipantClient(Prosumer(spec("H01"), seed=1), timeout=30)
    await client.connect(url, "H01", TOKENS["H01"])
    fut = await client._emit("never_answered", {})
    assert client._waiting
    await client.disconnect()
    assert fut.done() and fut.result()["ok"] is False


async def test_one_deadline_for_a_rounds_replies():
    """Acknowledgements of a round share one `timeout`; one still missing then counts as an
    error (`no reply`), the others are kept, and nothing is left waiting or cancelled."""
    client = ParticipantClient(Prosumer(spec("H01"), seed=1), timeout=0.2)
    loop = asyncio.get_running_loop()
    answered, silent, early = loop.create_future(), loop.create_future(), loop.create_future()
    early.set_result({"ok": True, "results": []})
    client._waiting |= {answered, silent, early}
    loop.call_later(0.01, answered.set_result, {"ok": True})
    t = loop.time()
    replies = await client._replies([early, answered, silent])
    assert 0.15 < loop.time() - t < 2
    assert replies[:2] == [{"ok": True, "results": []}, {"ok": True}]
    assert replies[2]["ok"] is False and replies[2]["error"]["code"] == "unavailable"
    assert not client._waiting and not silent.cancelled()
    client._record("meter", replies[2], 0)
    client._record("orders", replies[2], 3)
    assert client.stats.errors == 2 and client.stats.rejected == 3
    # All answered: no wait for the deadline.
    a, b = loop.create_future(), loop.create_future()
    loop.call_soon(a.set_result, {"ok": True})
    loop.call_soon(b.set_result, {"ok": True})
    t = loop.time()
    assert await client._replies([a, b]) == [{"ok": True}, {"ok": True}]
    assert loop.time() - t < 0.1
