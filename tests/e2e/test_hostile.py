"""Hostile clients cannot exhaust the server: connections that never log in are bounded in
number and age (websocket and polling alike), reserved event names and binary attachments
are refused without a trace in the state, and real participants keep trading meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import aiohttp

from ledger import open_sink
from market.core.engine import MarketConfig
from market.server.app import MarketServer
from market.server.guard import ConnectionGuard
from tests.e2e.conftest import client, registry, serving


def server_with(ledger_url: str, **limits: float) -> MarketServer:
    guard = ConnectionGuard(**limits)  # type: ignore[arg-type]
    return MarketServer(
        MarketConfig(mode="rt", duration=60, durability="ack"), registry(), open_sink(ledger_url), guard=guard
    )


async def bid_ok(url: str, pid: str = "P1") -> None:
    p = await client(url, pid)
    slot = (int(time.time()) // 60 + 4) * 60
    reply = await p.call("bid", {"quantity": 10, "price": 0.2, "time_delivery": [slot, slot + 60]}, namespace="/market")
    assert reply["ok"], reply
    await p.disconnect()


async def test_two_thousand_idle_sockets_do_not_lock_participants_out(ledger_url: str) -> None:
    server = server_with(ledger_url, max_pending=200, auth_timeout=30)
    async with serving(server) as url, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        ws_url = url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        hostile = []
        for _ in range(20):  # 2,000 in batches of 100
            hostile += await asyncio.gather(*(http.ws_connect(ws_url) for _ in range(100)))
        await asyncio.sleep(0.5)
        assert server.guard.pending <= 200
        assert len(server.sio.eio.sockets) <= 200  # the oldest were closed to make room
        await bid_ok(url)  # a real participant connects and trades
        for ws in hostile:
            await ws.close()


async def test_evicted_connections_are_freed_at_once(ledger_url: str) -> None:
    """An evicted websocket whose client never reads is closed on the server's side at once,
    not after aiohttp's 10 s wait for the client's half of the close handshake, and no
    closed connection leaves engine.io's 25 s ping task behind (a flood of them held the
    server's heap until full collections took 0.7-0.8 s)."""
    import os

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    server = server_with(ledger_url, max_pending=20, auth_timeout=30)
    async with serving(server) as url, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        ws_url = url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        before = fds()
        held = [await http.ws_connect(ws_url) for _ in range(200)]  # never read again
        await asyncio.sleep(1.0)
        # The client still holds its 200 ends; the server keeps only the 20 newest of its own.
        assert fds() - before < 200 + 60, fds() - before
        tasks = len(asyncio.all_tasks())
        for _ in range(300):  # polling handshakes, evicted too
            async with http.get(url + "/socket.io/?EIO=4&transport=polling") as r:
                assert r.status == 200
        await asyncio.sleep(0.2)
        # engine.io's 25 s ping task of each closed connection is cancelled with it.
        assert len(asyncio.all_tasks()) - tasks < 50, len(asyncio.all_tasks()) - tasks
        assert len(server.sio._pings) <= 25
        await bid_ok(url)
        for ws in held:
            await ws.close()


async def test_connections_that_never_log_in_are_closed_after_the_deadline(ledger_url: str) -> None:
    server = server_with(ledger_url, auth_timeout=1.0)
    async with serving(server) as url, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        ws_url = url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        idle = [await http.ws_connect(ws_url) for _ in range(50)]
        for _ in range(300):  # polling handshakes: engine.io sessions without a socket
            async with http.get(url + "/socket.io/?EIO=4&transport=polling") as r:
                assert r.status == 200
        assert len(server.sio.eio.sockets) == 350
        p2 = await client(url, "P2")  # logged in: kept
        await asyncio.sleep(2.5)
        assert len(server.sio.eio.sockets) == 1, len(server.sio.eio.sockets)
        assert server.guard.closed_unauthenticated >= 350
        assert p2.connected
        await p2.disconnect()
        for ws in idle:
            await ws.close()


async def test_one_address_is_capped(ledger_url: str) -> None:
    server = server_with(ledger_url, max_per_address=20, auth_timeout=30)
    async with serving(server) as url, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        for _ in range(25):
            async with http.get(url + "/socket.io/?EIO=4&transport=polling") as r:
                pass
        assert server.guard.connections == 20 and server.guard.refused == 5
        assert r.status != 200  # the 25th was refused


async def test_reserved_event_names_are_answered_invalid_and_change_nothing(ledger_url: str) -> None:
    server = server_with(ledger_url)
    async with serving(server) as url:
        p1 = await client(url, "P1")
        for name in ("disconnect", "connect", "connect_error"):
            reply = await p1.call(name, {}, namespace="/market", timeout=5)
            assert reply["error"]["code"] == "invalid", (name, reply)
        assert server.sessions["/market"].online() == ["P1"]  # the session survived
        slot = (int(time.time()) // 60 + 4) * 60
        ok = await p1.call(
            "bid", {"quantity": 10, "price": 0.2, "time_delivery": [slot, slot + 60]}, namespace="/market"
        )
        assert ok["ok"], ok
        await p1.disconnect()


async def test_binary_attachments_are_refused_and_not_kept(ledger_url: str) -> None:
    server = server_with(ledger_url)
    async with serving(server) as url:
        p1 = await client(url, "P1")
        await p1.emit("bid", {"blob": b"\x00" * 100_000}, namespace="/market")
        for _ in range(50):
            if not p1.connected:
                break
            await asyncio.sleep(0.1)
        assert not p1.connected  # the connection is closed
        assert server.sio._binary_packet == {}  # nothing buffered
        assert len(server.market.book) == 0
        await p1.disconnect()
        await bid_ok(url)  # the participant can log in again


async def test_a_byte_flood_is_refused_before_it_is_decoded(ledger_url: str) -> None:
    """A logged-in client past its connection's byte budget gets `rate_limited` for each
    packet without the server decoding it (decoding 1,000-order batches it then refused
    was a third of the server's time in the hostile soak); a connection that has not
    logged in and sends more than its small budget is closed. Others trade meanwhile."""
    import json

    server = server_with(ledger_url, inbound_rate=50_000, inbound_burst=200_000)
    handled = 0
    handle_event = server.sio._handle_event

    async def counting(*args: Any) -> None:
        nonlocal handled
        handled += 1
        await handle_event(*args)

    server.sio._handle_event = counting  # runs only for packets that were decoded
    slot = (int(time.time()) // 60 + 4) * 60
    order = {"side": "bid", "quantity": 1, "price": 0.01, "time_delivery": [slot, slot + 60]}
    batch = json.dumps(["orders", {"orders": [order] * 1000}])  # ~80 KB
    async with serving(server) as url, aiohttp.ClientSession() as http:
        ws_url = url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        ws = await http.ws_connect(ws_url)
        await ws.receive()  # engine.io open
        await ws.send_str("40/market," + json.dumps({"id": "P1", "token": "tok-p1"}))
        await ws.receive()  # socket.io connect ack
        for n in range(40):
            await ws.send_str(f"42/market,{n}{batch}")
        replies: dict[int, Any] = {}
        while len(replies) < 40:
            msg = await asyncio.wait_for(ws.receive(), 10)
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data.startswith("43/market,"):
                head, body = msg.data[len("43/market,") :].split("[", 1)
                replies[int(head)] = json.loads("[" + body)[0]
        limited = [r for r in replies.values() if not r["ok"] and "bytes" in r["error"]["message"]]
        assert all(r["error"]["code"] == "rate_limited" for r in limited)
        assert len(limited) >= 36, [r.get("error") for r in replies.values()]
        assert handled <= 4, handled  # the refused ones were never decoded
        await bid_ok(url, "P2")

        raw = await http.ws_connect(ws_url)  # never logs in, sends ~100 KB at once
        await raw.receive()
        junk = json.dumps(["bid", {"pad": "x" * 100_000}])
        with contextlib.suppress(ConnectionError):
            await raw.send_str(f"42/market,{junk}")
        msg = await asyncio.wait_for(raw.receive(), 5)
        closing = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
        assert msg.type in closing or msg.data == "1", msg  # engine.io CLOSE, then the socket's
        assert handled <= 4
        await ws.close()


async def test_a_slow_reader_is_closed_before_it_grows_the_server(ledger_url: str) -> None:
    import json
    import resource

    server = server_with(ledger_url)
    for i in range(4096):  # P1 has a full outbox: every `resume` page is ~130 KB
        server.outbox.push("P1", "delivery", {"time_delivery": [i, i + 60], "pad": "x" * 2000})
    async with serving(server) as url, aiohttp.ClientSession() as http:
        ws = await http.ws_connect(url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket")
        await ws.receive()  # engine.io open
        await ws.send_str("40/market," + json.dumps({"id": "P1", "token": "tok-p1"}))
        await ws.receive()  # socket.io connect ack
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # A resume paged to 64 events per reply, asked 3,000 times by a client that never reads.
        for n in range(3000):
            try:
                await ws.send_str(f'42/market,{n}["resume",{{"since":0}}]')
            except ConnectionError:
                break
            if n % 100 == 0:
                await asyncio.sleep(0)
        for _ in range(100):
            if not server.sio.eio.sockets:
                break
            await asyncio.sleep(0.05)
        assert not server.sio.eio.sockets, "the slow reader is still connected"
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
        assert grown_mb < 150, f"the server grew by {grown_mb:.0f} MB"
        p1 = await client(url, "P1")  # the participant can come back and page through
        page = await p1.call("resume", {"since": 0}, namespace="/market")
        assert page["ok"] and len(page["events"]) == 64 and page["more"] is True
        await p1.disconnect()
        await ws.close()


async def test_malformed_frames_log_no_tracebacks_and_few_lines(ledger_url: str, caplog: Any) -> None:
    import logging

    server = server_with(ledger_url)
    caplog.set_level(logging.INFO)
    async with serving(server) as url, aiohttp.ClientSession() as http:
        ws_url = url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
        for frame in ("4{not json", "4" + "9" * 50, "42/nope,[1,2", "4x", "47"):
            for _ in range(40):  # 200 malformed frames, on fresh unauthenticated connections
                ws = await http.ws_connect(ws_url)
                await ws.receive()
                await ws.send_str(frame)
                await ws.close()
        await bid_ok(url)  # the market still works
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks[0].getMessage()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noisy) < 100, f"{len(noisy)} warning lines for 200 bad frames"
