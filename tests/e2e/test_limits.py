"""Limits and integrity over real socket.io (docs/protocol.md, *Limits and integrity*): open
entries per participant are capped, batches pay one rate token per item, a wash pair of
one owner does not trade with itself, and failed logins back off."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import socketio

from ledger import open_sink
from market.core.engine import MarketConfig
from market.core.registry import Registry
from market.dispatch.ratelimit import LoginThrottle, RateLimiter
from market.server.app import MarketServer
from tests.e2e.conftest import TOKENS, Inbox, client, refusal, registry, running

SLOT = [720, 780]


def order(side: str = "bid", price: float = 0.2, quantity: int = 10, **extra: Any) -> dict[str, Any]:
    o = {"side": side, "quantity": quantity, "price": price, "time_delivery": SLOT, **extra}
    if side == "ask":
        o["source"] = "solar"
    return o


def bid(price: float = 0.2, quantity: int = 10, **extra: Any) -> dict[str, Any]:
    """A `bid` payload (no `side`: the event names it)."""
    return {"quantity": quantity, "price": price, "time_delivery": SLOT, **extra}


async def step(ctl: socketio.AsyncClient, t: int) -> dict[str, Any]:
    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=10)
    assert reply["ok"], reply
    return dict(reply["round"])


async def fleet(url: str, pids: list[str], token: str | None = None) -> socketio.AsyncClient:
    sio = socketio.AsyncClient(reconnection=False)
    creds = [{"id": p, "token": token or TOKENS[p]} for p in pids]
    await sio.connect(url, namespaces=["/fleet"], auth={"fleet": creds}, transports=["websocket"], wait_timeout=5)
    return sio


# -- 1. open entries per participant -----------------------------------------------------------


async def test_open_entries_past_the_cap_are_refused_invalid(ledger_url: str) -> None:
    config = MarketConfig(duration=60, round_timeout=0.5, max_open_per_slot=5, max_open_total=8)
    async with running(config, ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        p1, p2 = await client(url, "P1"), await client(url, "P2")
        await step(ctl, 600)
        reply = await p1.call("orders", {"orders": [order()] * 7}, namespace="/market")
        assert [r["ok"] for r in reply["results"]] == [True] * 5 + [False] * 2
        assert {r["error"]["code"] for r in reply["results"][5:]} == {"invalid"}
        assert "max_open_per_slot" in reply["results"][5]["error"]["message"]
        one = await p1.call("bid", bid(), namespace="/market")
        assert one["ok"] is False and one["error"]["code"] == "invalid"
        assert (await p2.call("bid", bid(), namespace="/market"))["ok"]  # others are not affected
        later = [{**order(), "time_delivery": [780, 840]}] * 4
        reply = await p1.call("orders", {"orders": later}, namespace="/market")
        assert [r["ok"] for r in reply["results"]] == [True, True, True, False]  # 8 open in all
        assert "max_open_total" in reply["results"][3]["error"]["message"]
        assert len(server.market.book) == 9
        uuid = reply["results"][0]["entry"]["uuid"]
        assert (await p1.call("cancel", {"uuid": uuid}, namespace="/market"))["ok"]
        assert (await p1.call("bid", bid(time_delivery=[780, 840]), namespace="/market"))["ok"]
        for c in (ctl, p1, p2):
            await c.disconnect()


# -- 2. batches pay by the item ------------------------------------------------------------------


def spend_config(burst: int) -> MarketConfig:
    # A bucket that does not refill during the test: every token spent is counted.
    return MarketConfig(duration=60, round_timeout=0.5, rate_per_second=1e-6, rate_burst=burst)


async def test_an_orders_batch_costs_one_token_per_order(ledger_url: str) -> None:
    async with running(spend_config(100), ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        p1 = await client(url, "P1")
        await step(ctl, 600)
        assert all(
            r["ok"] for r in (await p1.call("orders", {"orders": [order()] * 60}, namespace="/market"))["results"]
        )
        refused = await p1.call("orders", {"orders": [order()] * 50}, namespace="/market")  # 40 tokens left
        assert refused["ok"] is False and refused["error"]["code"] == "rate_limited", refused
        assert len(server.market.book) == 60  # the whole batch was refused, nothing booked
        assert (await p1.call("bid", bid(), namespace="/market"))["ok"]  # a single event costs 1
        assert all(
            r["ok"] for r in (await p1.call("orders", {"orders": [order()] * 39}, namespace="/market"))["results"]
        )
        empty = await p1.call("bid", bid(), namespace="/market")
        assert empty["error"]["code"] == "rate_limited"
        assert len(server.market.book) == 100
        for c in (ctl, p1):
            await c.disconnect()


async def test_fleet_batches_cost_each_member_one_token_per_item(ledger_url: str) -> None:
    async with running(spend_config(100), ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        f = await fleet(url, ["P1", "P2"])
        await step(ctl, 600)
        first = [{"participant": "P1", **order()}] * 60 + [{"participant": "P2", **order()}] * 30
        assert all(r["ok"] for r in (await f.call("orders", {"orders": first}, namespace="/fleet"))["results"])
        # P2 could pay for its 10, P1 (40 left) cannot pay for its 50: nothing of it is booked.
        second = [{"participant": "P2", **order()}] * 10 + [{"participant": "P1", **order()}] * 50
        refused = await f.call("orders", {"orders": second}, namespace="/fleet")
        assert refused["ok"] is False and refused["error"]["code"] == "rate_limited", refused
        assert "P1" in refused["error"]["message"]
        assert len(server.market.book) == 90
        # Items for non-members are refused one by one and charge nobody.
        stranger = [{"participant": "P3", **order()}] * 100 + [{"participant": "P2", **order()}] * 70
        reply = await f.call("orders", {"orders": stranger}, namespace="/fleet")
        assert [r["ok"] for r in reply["results"]] == [False] * 100 + [True] * 70
        assert len(server.market.book) == 160
        # A meters batch costs one per reading: P1 has 40 tokens. (Slot 600 is processed,
        # so paid readings are answered `closed` one by one.)
        reading = {"participant": "P1", "time_interval": [600, 660], "generation": {}}
        refused = await f.call("meters", {"readings": [reading] * 41}, namespace="/fleet")
        assert refused["ok"] is False and refused["error"]["code"] == "rate_limited", refused
        reply = await f.call("meters", {"readings": [reading] * 40}, namespace="/fleet")
        assert {r["error"]["code"] for r in reply["results"]} == {"closed"}
        p1 = await client(url, "P1")  # the bucket is the participant's, whichever way it comes
        assert (await p1.call("bid", bid(), namespace="/market"))["error"]["code"] == "rate_limited"
        for c in (ctl, f, p1):
            await c.disconnect()


async def test_a_fleet_connection_s_bucket_goes_with_it(ledger_url: str) -> None:
    """Each `/fleet` connection pays for its events from a bucket of its own: a client that
    connects, sends and leaves again and again must not leave a bucket behind each time."""
    async with running(spend_config(100), ledger_url) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        await step(ctl, 600)
        held = []
        for _ in range(5):
            f = await fleet(url, ["P1"])
            reply = await f.call("orders", {"orders": [{"participant": "P1", **order()}]}, namespace="/fleet")
            assert reply["results"][0]["ok"], reply
            held.append(len(server.limiter))  # the controller's, P1's and this connection's
            await f.disconnect()
        await asyncio.sleep(0.2)  # the server sees the disconnect
        assert held == [3] * 5
        assert len(server.limiter) == 2  # P1's stays: its tokens are the participant's, not the connection's
        await ctl.disconnect()


def test_rate_limiter_charges_costs_all_or_nothing() -> None:
    rl = RateLimiter(rate=1.0, burst=10)
    assert rl.allow("a", now=0.0, cost=7)
    assert not rl.allow("a", now=0.0, cost=4)  # 3 left: refused, nothing taken
    assert rl.allow("a", now=0.0, cost=3)
    assert not rl.allow("a", now=0.5)
    assert rl.allow("a", now=1.0)  # refilled one
    assert rl.allow_all({"b": 5, "c": 10}, now=0.0)
    assert not rl.allow_all({"b": 6, "d": 1}, now=0.0)  # b cannot pay: d is not charged either
    assert rl.allow("d", now=0.0, cost=10)
    assert not rl.allow("e", now=0.0, cost=11)  # more than the burst never passes


# -- 3. wash trades --------------------------------------------------------------------------------


def washregistry() -> Registry:
    people = {"H1": None, "H2": None, "W1": "W", "W2": "W"}
    return Registry.from_dict(
        {
            "participants": [
                {"id": "CTL", "token": "tok-ctl", "role": "controller"},
                *({"id": p, "token": f"tok-{p}", **({"owner": owner} if owner else {})} for p, owner in people.items()),
            ]
        }
    )


async def test_two_accounts_of_one_owner_do_not_trade_with_each_other(ledger_url: str) -> None:
    config = MarketConfig(duration=60, round_timeout=0.5, pricing="uniform")
    async with running(config, ledger_url, washregistry()) as (url, _server):
        ctl = await client(url, "CTL", "/simulation", token="tok-ctl")
        c = {p: await client(url, p, token=f"tok-{p}") for p in ("H1", "H2", "W1", "W2")}
        inbox = {p: Inbox(s, "settled") for p, s in c.items()}
        await step(ctl, 600)
        for pid, o in (
            ("H1", order("bid", 0.30, 100)),
            ("H2", order("ask", 0.10, 100)),
            ("W1", order("bid", 0.29, 10)),  # the wash pair: only reached after honest supply
            ("W2", order("ask", 0.28, 10)),
        ):
            reply = await c[pid].call(o.pop("side"), o, namespace="/market")
            assert reply["ok"], reply
        matched = await step(ctl, 660)
        await asyncio.sleep(0.1)
        assert matched["trades"] == 1
        assert [(s["quantity"], s["price"]) for s in inbox["H1"].events["settled"]] == [(100, pytest.approx(0.20))]
        assert inbox["W1"].events["settled"] == inbox["W2"].events["settled"] == []
        for s in (ctl, *c.values()):
            await s.disconnect()


# -- 4. failed logins back off ---------------------------------------------------------------------


def test_login_throttle_backs_off_exponentially_and_is_bounded() -> None:
    t = LoginThrottle(failures=5, window=300.0, base=1.0, cap=60.0, max_keys=100)
    keys = ("addr:a", "id:P1")
    for _ in range(4):
        assert t.wait(keys, now=0.0) == 0
        t.failed(keys, now=0.0)
    assert t.wait(keys, now=0.0) == 0
    t.failed(keys, now=0.0)  # the 5th: 1 s
    assert t.wait(keys, now=0.0) == pytest.approx(1.0)
    assert t.wait(["addr:b", "id:P2"], now=0.0) == 0  # others are not affected
    assert t.wait(["addr:b", "id:P1"], now=0.5) == pytest.approx(0.5)  # the id, from anywhere
    assert t.wait(["addr:a"], now=0.5) == pytest.approx(0.5)  # the address, for any id
    waits = []
    now = 1.0
    for _ in range(9):
        assert t.wait(keys, now=now) == 0
        t.failed(keys, now=now)
        waits.append(t.wait(keys, now=now))
        now += waits[-1]
    assert waits == [2, 4, 8, 16, 32, 60, 60, 60, 60]
    t.succeeded("id:P1")  # a success resets the id, not the address
    assert t.wait(["id:P1"], now=now) == 0
    t.failed(["addr:a"], now=now)
    assert t.wait(["addr:a"], now=now) == 60
    # A quiet window forgets the failures.
    t.failed(["id:P3"], now=0.0)
    for _ in range(4):
        t.failed(["id:P3"], now=1000.0)
    assert t.wait(["id:P3"], now=1000.0) == 0
    for k in range(1000):
        t.failed([f"addr:x{k}"], now=now)
    assert len(t) <= 100


async def handshake_refusal(url: str) -> tuple[int, str]:
    """A raw engine.io polling handshake: its HTTP status and the refusal message of its body."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/socket.io/?EIO=4&transport=polling") as r:
        body = await r.text()
        return r.status, (json.loads(body).get("message", "") if r.status == 401 else body)


async def upgrade_status(url: str) -> int:
    """The HTTP status of a websocket handshake (101: upgraded)."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"):
                return 101
        except aiohttp.WSServerHandshakeError as err:
            return err.status


async def test_failed_logins_are_refused_for_a_while_even_with_the_right_token(ledger_url: str) -> None:
    config = MarketConfig(duration=60, round_timeout=0.5)
    async with running(config, ledger_url) as (url, server):
        for _ in range(5):
            assert (await refusal(url, "P1", token="guess")) == "unauthorized: unknown id or wrong token"
        # The address backs off: refused at the handshake, before any engine.io session or
        # websocket upgrade, so a guessing flood costs the server a 401, not a login.
        status, message = await handshake_refusal(url)
        assert status == 401 and message.startswith("unauthorized: too many failed logins"), (status, message)
        assert await upgrade_status(url) == 401
        assert server.guard.connections == 0 and not server.sio.eio.sockets
        polling = socketio.AsyncClient(reconnection=False)  # python-socketio hears it as the connect error
        errors: list[Any] = []
        polling.on("connect_error", errors.append, namespace="/market")
        with pytest.raises(socketio.exceptions.ConnectionError):
            await polling.connect(
                url, namespaces=["/market"], transports=["polling"], auth={"id": "P1", "token": TOKENS["P1"]}
            )
        assert errors and str(errors[0]["message"]).startswith("unauthorized: too many failed logins"), errors
        await asyncio.sleep(1.1)
        p1 = await client(url, "P1")  # the back-off (1 s) is over
        assert server.online() == ["P1"]
        await p1.disconnect()


async def test_fleet_logins_back_off_too(ledger_url: str) -> None:
    config = MarketConfig(duration=60, round_timeout=0.5)
    async with running(config, ledger_url) as (url, _server):
        for _ in range(5):
            with pytest.raises(socketio.exceptions.ConnectionError):
                await fleet(url, ["P1"], token="guess")
        status, message = await handshake_refusal(url)
        assert status == 401 and message.startswith("unauthorized: too many failed logins"), (status, message)


async def test_the_id_backs_off_across_addresses(ledger_url: str) -> None:
    """The per-id count, with addresses given to `on_connect` as aiohttp does."""
    server = MarketServer(MarketConfig(duration=60), registry(), open_sink(ledger_url))
    ns = next(n for n in server.namespaces if n.namespace == "/market")

    def environ(k: int) -> dict[str, Any]:
        return {"aiohttp.request": SimpleNamespace(remote=f"10.0.0.{k}"), "REMOTE_ADDR": "127.0.0.1"}

    for k in range(5):  # five addresses, one failure each: the id is blocked, no address is
        with pytest.raises(socketio.exceptions.ConnectionRefusedError, match="wrong token"):
            await ns.on_connect(f"s{k}", environ(k), {"id": "P1", "token": "guess"})
    with pytest.raises(socketio.exceptions.ConnectionRefusedError, match="too many failed logins"):
        await ns.on_connect("s9", environ(9), {"id": "P1", "token": TOKENS["P1"]})
    await ns.on_connect("s8", environ(8), {"id": "P2", "token": TOKENS["P2"]})  # another id is fine
    assert ns.sessions.sid_of == {"P2": "s8"}
