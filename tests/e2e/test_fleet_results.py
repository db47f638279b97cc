"""/fleet `auth.columns`: fills and deliveries in columns, the same events as the v1 batches."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import socketio

from market.core.engine import MarketConfig
from market.server.app import MarketServer
from tests.e2e.conftest import TOKENS, FlakySink, client, registry, running, serving

CONFIG = MarketConfig(duration=60, round_timeout=0.5)
SLOT = [720, 780]
MEMBERS = ("P1", "P2", "P3")


async def fleet(url: str, *, columns: bool) -> tuple[socketio.AsyncClient, list[tuple[str, Any]]]:
    sio = socketio.AsyncClient(reconnection=False)
    got: list[tuple[str, Any]] = []
    for event in ("settled", "delivery", "settled.columns", "delivery.columns"):
        sio.on(event, lambda data, event=event: got.append((event, data)), namespace="/fleet")
    creds = [{"id": p, "token": TOKENS[p]} for p in MEMBERS]
    await sio.connect(
        url, namespaces=["/fleet"], auth={"fleet": creds, "columns": columns}, transports=["websocket"], wait_timeout=5
    )
    return sio, got


def as_v1(event: str, data: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(participant, event, payload) of a batch, v1 or columnar, as PROTOCOL.md's events."""
    if event in ("settled", "delivery"):
        return [(e["participant"], event, {k: v for k, v in e.items() if k != "participant"}) for e in data["events"]]
    if event == "settled.columns":
        fields = [k for k in data if k != "participant"]
        return [(p, "settled", {f: data[f][k] for f in fields}) for k, p in enumerate(data["participant"])]
    table = data["transactions"]
    rows = [dict(zip(table, values, strict=True)) for values in zip(*table.values(), strict=True)]
    return [
        (p, "delivery", {"time_delivery": data["time_delivery"], "transactions": [rows[j] for j in picks], "seq": seq})
        for p, seq, picks in zip(data["participant"], data["seq"], data["rows"], strict=True)
    ]


async def trade_two_rounds(url: str, f: socketio.AsyncClient) -> None:
    """P1 sells to P2 and P3 (a fill each), all three meter the slot, which is processed."""
    ctl = await client(url, "CTL", "/simulation")
    assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
    orders = {
        "participant": ["P1", "P2", "P3"],
        "side": ["ask", "bid", "bid"],
        "quantity": [80, 50, 30],
        "price": [0.1, 0.3, 0.25],
        "time_delivery": [SLOT, SLOT, SLOT],
        "source": ["solar", None, None],
    }
    assert (await f.call("orders.columns", orders, namespace="/fleet"))["refused"] == []
    assert (await ctl.call("step", {"time": 660}, namespace="/simulation"))["round"]["trades"] == 2
    readings = {
        "participant": ["P1", "P2", "P3"],
        "time_interval": [SLOT, SLOT, SLOT],
        "generation": {"solar": [100, None, None]},
        "other": {"external": [None, 50, 40]},
    }
    task = asyncio.ensure_future(ctl.call("step", {"time": 720}, namespace="/simulation"))
    await asyncio.sleep(0.05)
    assert (await f.call("meters.columns", readings, namespace="/fleet"))["refused"] == []
    assert (await task)["round"]["metered"] == 3
    await asyncio.sleep(0.1)
    await ctl.disconnect()


async def test_columnar_results_are_the_v1_events_and_resume_returns_them(ledger_url: str, tmp_path: Any) -> None:
    """The same rounds on two servers, one fleet v1 and one columnar: each member gets the
    same events, `seq` included; and `resume` on /market returns them as PROTOCOL.md's."""
    events: dict[bool, list[tuple[str, str, dict[str, Any]]]] = {}
    for columns in (False, True):
        async with running(CONFIG, f"sqlite:///{tmp_path}/{columns}.db") as (url, _server):
            f, got = await fleet(url, columns=columns)
            await trade_two_rounds(url, f)
            kinds = {event for event, _ in got}
            assert kinds == ({"settled.columns", "delivery.columns"} if columns else {"settled", "delivery"})
            events[columns] = [e for event, data in got for e in as_v1(event, data)]
            # The grid is no participant: nothing is made or kept for it.
            assert _server.outbox.since("grid", 0) == ([], False)
            if columns:  # what a member was sent in columns, asked for again on /market
                for pid in MEMBERS:
                    back = await client(url, pid)
                    replay = await back.call("resume", {"since": 0}, namespace="/market")
                    mine = [(e, p) for who, e, p in events[True] if who == pid]
                    assert [(e["event"], e["data"]) for e in replay["events"]] == mine
                    await back.disconnect()
            await f.disconnect()
    assert events[True] == events[False]
    settled = [(p, e["side"], e["quantity"]) for p, kind, e in events[True] if kind == "settled"]
    assert sorted(settled) == [("P1", "ask", 30), ("P1", "ask", 50), ("P2", "bid", 50), ("P3", "bid", 30)]
    delivered = {p for p, kind, e in events[True] if kind == "delivery" and e["time_delivery"] == SLOT}
    assert delivered == set(MEMBERS)


async def test_a_member_that_logs_in_on_market_gets_its_events_there(ledger_url: str) -> None:
    """A columnar fleet's member logged in on /market since: its fills and delivery go to
    that session as the v1 events, and the fleet's columns leave it out."""
    async with running(CONFIG, ledger_url) as (url, _server):
        f, got = await fleet(url, columns=True)
        alone = await client(url, "P3")
        mine: list[tuple[str, Any]] = []
        for event in ("settled", "delivery"):
            alone.on(event, lambda data, event=event: mine.append((event, data)), namespace="/market")
        await trade_two_rounds(url, f)
        assert {p for event, data in got for p, _, _ in as_v1(event, data)} == {"P1", "P2"}
        assert [e for e, _ in mine] == ["settled", "delivery"]
        assert mine[0][1]["quantity"] == 30 and mine[1][1]["time_delivery"] == SLOT
        await alone.disconnect()
        await f.disconnect()


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
async def test_auth_columns_other_than_a_bool_refuses_the_connection(ledger_url: str, value: Any) -> None:
    async with running(CONFIG, ledger_url) as (url, server):
        auth = {"fleet": [{"id": "P1", "token": TOKENS["P1"]}], "columns": value}
        sio = socketio.AsyncClient(reconnection=False)
        errors: list[Any] = []
        sio.on("connect_error", errors.append, namespace="/fleet")
        with pytest.raises(socketio.exceptions.ConnectionError):
            await sio.connect(url, namespaces=["/fleet"], auth=auth, transports=["websocket"], wait_timeout=5)
        assert [e.get("message", e) if isinstance(e, dict) else e for e in errors] == [
            "invalid: auth.columns must be true or false"
        ]
        assert server.online() == []


async def test_an_unknown_source_column_refuses_only_the_readings_that_use_it(ledger_url: str) -> None:
    """A batch's sources are checked once when all are known; a column of an unknown one
    refuses the readings with a value in it, as each reading on its own would be."""
    async with running(CONFIG, ledger_url) as (url, _server):
        f, _ = await fleet(url, columns=True)
        ctl = await client(url, "CTL", "/simulation")
        assert (await ctl.call("step", {"time": 600}, namespace="/simulation"))["ok"]
        step = asyncio.ensure_future(ctl.call("step", {"time": 660}, namespace="/simulation"))
        await asyncio.sleep(0.05)
        readings = {
            "participant": ["P1", "P2", "P3"],
            "time_interval": [[660, 720]] * 3,
            "generation": {"solar": [10, None, 5], "nuclear": [None, 7, None]},
            "other": {"external": [None, 50, 40]},
        }
        reply = await f.call("meters.columns", readings, namespace="/fleet")
        assert [(r["index"], r["code"], r["message"]) for r in reply["refused"]] == [
            (1, "invalid", "unknown source 'nuclear' in generation")
        ]
        assert (await step)["round"]["metered"] == 2
        await ctl.disconnect()
        await f.disconnect()


async def test_rt_fills_whose_write_failed_reach_the_columnar_fleet_once_stored(ledger_url: str) -> None:
    """rt: a boundary whose fills the ledger refuses announces nothing; a later boundary
    that stores them sends them to a columnar fleet as `settled.columns`, once."""
    config = MarketConfig(mode="rt", duration=2, meter_grace=0.2)
    sink = FlakySink(ledger_url)
    server = MarketServer(config, registry(), sink)
    async with serving(server) as url:
        f, got = await fleet(url, columns=True)
        slot = (int(time.time()) // 2 + 4) * 2
        orders = {
            "participant": ["P1", "P2"],
            "side": ["ask", "bid"],
            "quantity": [40, 40],
            "price": [0.1, 0.3],
            "time_delivery": [[slot, slot + 2]] * 2,
            "source": ["solar", None],
        }
        assert (await f.call("orders.columns", orders, namespace="/fleet"))["refused"] == []
        sink.failing = True  # the boundary that clears the slot cannot store its fills
        deadline = time.monotonic() + 12

        def held() -> int:  # fills cleared and kept back: their write failed
            return sum(len(fills) for fills, _ in server._unannounced_fills)

        while not held() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert held() == 1, "the clearing's write did not fail"
        assert not [e for e, _ in got if e.startswith("settled")]  # nothing announced unstored
        sink.failing = False
        while not [e for e, _ in got if e.startswith("settled")] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        fills = [(p, e["side"], e["quantity"]) for event, data in got for p, _, e in as_v1(event, data)
                 if event == "settled.columns"]  # fmt: skip
        assert sorted(fills) == [("P1", "ask", 40), ("P2", "bid", 40)]
        await f.disconnect()
